"""Predictive region transitions: movement events in, preparations and transfers out.

Theory of operation
-------------------
The movement analyzer (atlas/skim) turns skimmed client messages into :class:`~atlas.skim.Movement`
events and hands them, never blocking, to :meth:`RegionService.offer`, which feeds them straight to the
sans-IO :class:`~atlas.world.Predictor` (a plain call: no channel and no task hop per movement, which
at thousands of movements a second would cost more scheduling than prediction). While the world map
has no region, nothing can be predicted, and ``offer`` returns at once. The predictor's decisions,
rare next to movements, go through a bounded channel (full: dropped and counted) to
:meth:`RegionService.serve`, which acts on them through the transfer coordinator:

* ``Prepare``: :meth:`TransferCoordinator.prepare` (advance notice to both servers, a link opened to the
  target, parked for ``prepare_ttl``);
* ``Transfer``: :meth:`TransferCoordinator.request` with reason ``region_boundary`` (which uses a waiting
  preparation for the same target); its outcome is reported back to the predictor (``moved``);
* ``CancelPrepare``: :meth:`TransferCoordinator.cancel_prepared`.

Once a second it expires stale preparations and forgets clients that left. Everything but ``offer`` runs in
one task; transfers run in the coordinator's nursery, and only a small task per transfer waits for its
outcome.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from atlas.control.coordinator import TransferCoordinator, TransferRefused
from atlas.control.lifecycle import TransferReason
from atlas.world import CancelPrepare, Decision, Predictor, Prepare, Transfer, Vec3

if TYPE_CHECKING:
    from atlas.runtime import Runtime
    from atlas.skim import SkimEvent

__all__ = ["RegionService"]

log = logging.getLogger("atlas.world")

_HOUSEKEEPING = 1.0
_DECISION_BUFFER = 1024


class RegionService:
    """Connects the movement analyzer, the predictor and the transfer coordinator."""

    def __init__(self, runtime: Runtime, predictor: Predictor, transfers: TransferCoordinator) -> None:
        self.runtime = runtime
        self.predictor = predictor
        self.transfers = transfers
        #: Decisions dropped because `serve` had too many waiting (the predictor is told, so it retries).
        self.decisions_dropped = 0
        self._tracked: set[str] = set()
        self._send, self._receive = trio.open_memory_channel[list[Decision]](_DECISION_BUFFER)

    def offer(self, event: SkimEvent) -> None:
        """An analyzer's event (the dispatcher's ``on_event``): a movement goes to the predictor at once.

        Synchronous and never waits: the predictor is a plain call, and its decisions are queued for
        `serve` (dropped when too many wait). Does nothing while the world map has no region.
        """
        if not len(self.runtime.world):
            if self._tracked:  # the last region went: start afresh once there are regions again
                self._forget_all()
            return
        position = getattr(event, "position", None)
        if position is None:
            return
        client_id = event.client_id
        session = self.runtime.clients.get(client_id)
        if session is None:
            return
        if client_id not in self._tracked:
            self._tracked.add(client_id)
            self.predictor.moved(client_id, session.link.backend.name)
        velocity = getattr(event, "velocity", None)
        decisions = self.predictor.observe(
            client_id, Vec3(*position), Vec3(*velocity) if velocity is not None else None, event.time
        )
        if decisions:
            try:
                self._send.send_nowait(decisions)
            except trio.WouldBlock:
                self.decisions_dropped += 1
                self._report(client_id)  # it asked for nothing after all: the predictor may ask again

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._housekeeping)
            task_status.started()
            async for decisions in self._receive:
                self._act(nursery, decisions)

    def _act(self, nursery: trio.Nursery, decisions: list[Decision]) -> None:
        # The coordinator keeps a preparation longer than the predictor does: the predictor extends its own
        # while the client keeps heading there, and says CancelPrepare when it gives up.
        ttl = 4 * self.runtime.config.predictor.prepare_ttl
        for decision in decisions:
            if isinstance(decision, Prepare):
                try:
                    self.transfers.prepare(
                        decision.client_id, decision.target_backend, TransferReason.REGION_BOUNDARY, ttl
                    )
                except TransferRefused as exc:
                    log.debug("no preparation for %s: %s", decision.client_id, exc)
            elif isinstance(decision, Transfer):
                try:
                    request = self.transfers.request(
                        decision.client_id, decision.target_backend, TransferReason.REGION_BOUNDARY
                    )
                except TransferRefused as exc:
                    log.debug("no region transfer for %s: %s", decision.client_id, exc)
                    self._report(decision.client_id)
                    continue
                nursery.start_soon(self._await_outcome, decision.client_id, request.done)
            else:
                self.transfers.cancel_prepared(decision.client_id, decision.target_backend)

    async def _await_outcome(self, client_id: str, done: trio.Event) -> None:
        await done.wait()
        self._report(client_id)

    def _report(self, client_id: str) -> None:
        """Tell the predictor where the client is now (moved, or still at the source)."""
        session = self.runtime.clients.get(client_id)
        if session is None:
            self._tracked.discard(client_id)
            self.predictor.forget(client_id)
        else:
            self.predictor.moved(client_id, session.link.backend.name)

    def _forget_all(self) -> None:
        """Stop tracking every client (their preparations are cancelled)."""
        for client_id in list(self._tracked):
            self._tracked.discard(client_id)
            self._cancel(self.predictor.forget(client_id))

    def _cancel(self, decisions: list[Decision]) -> None:
        for decision in decisions:
            if isinstance(decision, CancelPrepare):
                self.transfers.cancel_prepared(decision.client_id, decision.target_backend)

    async def _housekeeping(self) -> None:
        while True:
            await trio.sleep(_HOUSEKEEPING)
            self._cancel(self.predictor.expire(trio.current_time()))
            live = {session.client_id for session in self.runtime.clients}
            for client_id in list(self._tracked):
                if client_id not in live:
                    self._tracked.discard(client_id)
                    self._cancel(self.predictor.forget(client_id))
