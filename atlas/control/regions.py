"""Predictive region transitions: movement events in, preparations and transfers out.

Theory of operation
-------------------
The movement analyzer (atlas/skim) turns skimmed client messages into :class:`~atlas.skim.Movement`
events and hands them, never blocking, to :meth:`RegionService.offer` (a bounded channel that drops and
counts when full). :meth:`RegionService.serve` feeds them to the sans-IO
:class:`~atlas.world.Predictor` and acts on its decisions through the transfer coordinator:

* ``Prepare``: :meth:`TransferCoordinator.prepare` (advance notice to both servers, a link opened to the
  target, parked for ``prepare_ttl``);
* ``Transfer``: :meth:`TransferCoordinator.request` with reason ``region_boundary`` (which uses a waiting
  preparation for the same target); its outcome is reported back to the predictor (``moved``);
* ``CancelPrepare``: :meth:`TransferCoordinator.cancel_prepared`.

Once a second it expires stale preparations and forgets clients that left. Everything runs in one task;
transfers run in the coordinator's nursery, and only a small task per transfer waits for its outcome.
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


class RegionService:
    """Connects the movement analyzer, the predictor and the transfer coordinator."""

    def __init__(self, runtime: Runtime, predictor: Predictor, transfers: TransferCoordinator) -> None:
        self.runtime = runtime
        self.predictor = predictor
        self.transfers = transfers
        self.dropped = 0
        self._tracked: set[str] = set()
        self._send, self._receive = trio.open_memory_channel[tuple[str, Vec3, Vec3 | None, float]](4096)

    def offer(self, event: SkimEvent) -> None:
        """An analyzer's event (the dispatcher's ``on_event``): movement is queued, never waited for."""
        position = getattr(event, "position", None)
        if position is None:
            return
        velocity = getattr(event, "velocity", None)
        try:
            self._send.send_nowait(
                (
                    event.client_id,
                    Vec3(*position),
                    Vec3(*velocity) if velocity is not None else None,
                    event.time,
                )
            )
        except trio.WouldBlock:
            self.dropped += 1

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._housekeeping)
            task_status.started()
            async for client_id, position, velocity, t in self._receive:
                session = self.runtime.clients.get(client_id)
                if session is None:
                    continue
                if client_id not in self._tracked:
                    self._tracked.add(client_id)
                    self.predictor.moved(client_id, session.link.backend.name)
                self._act(nursery, self.predictor.observe(client_id, position, velocity, t))

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

    async def _housekeeping(self) -> None:
        while True:
            await trio.sleep(_HOUSEKEEPING)
            for decision in self.predictor.expire(trio.current_time()):
                if isinstance(decision, CancelPrepare):
                    self.transfers.cancel_prepared(decision.client_id, decision.target_backend)
            live = {session.client_id for session in self.runtime.clients}
            for client_id in list(self._tracked):
                if client_id not in live:
                    self._tracked.discard(client_id)
                    for decision in self.predictor.forget(client_id):
                        if isinstance(decision, CancelPrepare):
                            self.transfers.cancel_prepared(decision.client_id, decision.target_backend)
