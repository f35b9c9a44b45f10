"""The transfer coordinator: runs each transfer as a task in its own cancel scope, with rollback.

Theory of operation
-------------------
Anyone may ask for a transfer (the admin API, a drain, the rebalancer, the predictor) with
:meth:`TransferCoordinator.transfer`; the request is checked at once (the client exists, is not already
being moved, the target exists and can take it) and queued to :meth:`TransferCoordinator.serve`, which
runs in the root nursery and starts one task per transfer in a nursery it owns. The caller waits for the
:class:`TransferOutcome`.

Each transfer task drives one :class:`~atlas.control.lifecycle.TransferRecord` through its phases
(lifecycle.py has the table) inside ``trio.move_on_after([transfer] timeout)``. Atlas-aware servers (with
a live control channel) get the full protocol of docs/protocol.md; otherwise the transfer is *blind*.
The session does the data-plane steps (hold the client at a message boundary, cut the source after its
last message, switch links); this module does the talking and the bookkeeping.

Rollback is the answer to every failure before the switch: a refusal, a dropped channel or link, a step
past its deadline. It is shielded and bounded: the session resumes on the source (held messages flow to
it, in order), the target link is closed, and both servers are told ``transfer.abort``. After the switch
nothing is rolled back: completing the source's side is best effort, since the client is already safe.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio
from prometheus_client import Counter, Histogram

from atlas.control import messages
from atlas.control.channel import ChannelClosed, ControlChannel, ControlChannels
from atlas.control.lifecycle import Phase, TransferReason, TransferRecord
from atlas.control.messages import (
    TransferAbort,
    TransferBegin,
    TransferCommit,
    TransferCommitted,
    TransferComplete,
    TransferNotice,
    TransferPrepare,
    TransferReady,
    TransferState,
)
from atlas.errors import AtlasError, HandshakeError

if TYPE_CHECKING:
    from atlas.proxy.session import BackendLink, ClientSession
    from atlas.runtime import Runtime

__all__ = ["TransferCoordinator", "TransferOutcome", "TransferRefused"]

log = logging.getLogger("atlas.transfer")

_QUEUE = 1024
_UNUSED_PREPARATION = {"preparation expired": "expired", "preparation cancelled": "cancelled"}


class TransferRefused(AtlasError):
    """A transfer request was refused before it started; the message says why."""


class _RollBack(Exception):
    def __init__(self, why: str) -> None:
        self.why = why
        super().__init__(why)


@attrs.frozen
class TransferOutcome:
    """How a transfer ended, as the admin API reports it."""

    transfer: str
    client: str
    source: str
    target: str
    reason: str
    committed: bool
    blind: bool
    phase: str
    failure: str | None
    duration: float
    stall: float | None = None
    """Seconds from the cut (Atlas stopped relaying the source) to the target's first message relayed,
    if that came before the transfer ended; ``atlas_transfer_stall_seconds`` records every one."""
    hold: float | None = None
    """Seconds the client's messages were held: from the hold taking effect to the switch (or rollback).

    This is the cut-over's own cost to the client: input sent meanwhile waits this long at most."""

    def to_json(self) -> dict[str, Any]:
        """The outcome as a JSON-able dict."""
        return {
            "transfer": self.transfer,
            "client": self.client,
            "from": self.source,
            "to": self.target,
            "reason": self.reason,
            "outcome": "committed" if self.committed else "rolled_back",
            "blind": self.blind,
            "phase": self.phase,
            "failure": self.failure,
            "duration_ms": round(self.duration * 1000, 3),
            "stall_ms": None if self.stall is None else round(self.stall * 1000, 3),
            "hold_ms": None if self.hold is None else round(self.hold * 1000, 3),
        }


@attrs.define(eq=False)
class _Request:
    session: ClientSession
    target: str
    reason: TransferReason
    record: TransferRecord
    done: trio.Event = attrs.field(factory=trio.Event)
    outcome: TransferOutcome | None = None
    new_link: BackendLink | None = None
    """The target link while the transfer owns it (before the switch), for the rollback to close."""
    prepare_ttl: float | None = None
    """Set for a preparation: after PREPARED, wait this long for ``go`` before giving up."""
    go: trio.Event = attrs.field(factory=trio.Event)
    """A preparation is used: carry on with the cut-over."""
    cancel: trio.Event = attrs.field(factory=trio.Event)
    """A preparation is no longer wanted."""
    after: trio.Event | None = None
    """Start only once this (a replaced preparation's ``done``) is set."""
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    """The transfer's steps; cancelled (with ``abandoned`` set) when its source fails under it."""
    abandoned: str | None = None

    @property
    def preparing(self) -> bool:
        """A preparation not yet used or dropped: a new request for the client may take it over."""
        return self.prepare_ttl is not None and not self.go.is_set() and not self.cancel.is_set()


@attrs.frozen
class _Answer:
    """An answer to a server's ``transfer.request``, sent from the coordinator's nursery."""

    channel: ControlChannel
    message: messages.TransferAccepted | messages.TransferRefused


class _Metrics:
    def __init__(self, runtime: Runtime) -> None:
        registry = runtime.metrics.registry
        self.transfers = Counter(
            "atlas_transfers_total",
            "Transfers by reason and outcome: committed, rolled_back, expired or cancelled (preparations).",
            ["reason", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "atlas_transfer_duration_seconds",
            "Time from a transfer's request to its end.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=registry,
        )
        self.stall = Histogram(
            "atlas_transfer_stall_seconds",
            "Client-visible stall: from the cut (the source no longer relayed) to the target's first.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=registry,
        )
        self.held = Histogram(
            "atlas_transfer_held_messages",
            "Client messages held during a transfer and delivered to the new owner.",
            buckets=(0, 1, 2, 5, 10, 20, 50, 100, 500),
            registry=registry,
        )


class TransferCoordinator:
    """Starts, tracks and finishes transfers (see the module docstring)."""

    def __init__(self, runtime: Runtime, channels: ControlChannels) -> None:
        self.runtime = runtime
        self.channels = channels
        self.active: dict[str, TransferRecord] = {}
        self._prefix = os.urandom(3).hex()
        self._ids = itertools.count(1)
        self._send, self._receive = trio.open_memory_channel[_Request | _Answer](_QUEUE)
        self._metrics = _Metrics(runtime)
        # Preparations done and waiting to be used, by client id.
        self._prepared: dict[str, _Request] = {}
        # Every queued or running request, by client id (at most one each, but for a preparation that is
        # being replaced by a request for another target, which then waits for it to end).
        self._requests: dict[str, _Request] = {}
        channels.on_request = self._on_server_request

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run transfers until cancelled: one task each, in a nursery owned here."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for item in self._receive:
                if isinstance(item, _Request):
                    nursery.start_soon(self._run, item)
                else:
                    nursery.start_soon(_tell, item.channel, item.message)

    def request(
        self, client_id: str, target: str, reason: TransferReason, *, prepare_ttl: float | None = None
    ) -> _Request:
        """Check and queue a transfer; :class:`TransferRefused` says why it cannot start.

        With ``prepare_ttl``, only prepare it (advance notice to both servers and a link opened to the
        target) and keep it ready that long: a later request for the same target uses it.
        """
        session = self.runtime.clients.get(client_id)
        if session is None:
            raise TransferRefused(f"no client {client_id}")
        after: trio.Event | None = None
        current = self._requests.get(client_id)
        if current is not None:
            if not current.preparing:
                raise TransferRefused(f"client {client_id} is already being transferred")
            if current.target == target:
                if prepare_ttl is None:
                    current.record.reason = reason
                    current.go.set()  # a preparation (done or under way) for this very move: use it
                return current
            # Prepared for somewhere else: drop that preparation, and start once it has ended.
            current.cancel.set()
            after = current.done
        if not session.movable:
            raise TransferRefused(f"client {client_id} cannot be moved now (closing or failing over)")
        backend = self.runtime.pool.get(target)
        if backend is None:
            raise TransferRefused(f"no server {target}")
        source = session.link.backend
        if backend is source:
            raise TransferRefused(f"client {client_id} is already on {target}")
        if not backend.available:
            why = backend.state.value
            if backend.connections >= backend.capacity:
                why = f"full, {backend.connections}/{backend.capacity}"
            elif not backend.accepting:
                why = "not accepting new players"
            raise TransferRefused(f"{target} cannot take a client now ({why})")
        blind = self.channels.get(source.name) is None or self.channels.get(target) is None
        record = TransferRecord(
            id=f"t-{self._prefix}-{next(self._ids)}",
            client_id=client_id,
            source=source.name,
            target=target,
            reason=reason,
            blind=blind,
        )
        request = _Request(
            session=session, target=target, reason=reason, record=record, prepare_ttl=prepare_ttl, after=after
        )
        try:
            self._send.send_nowait(request)
        except trio.WouldBlock:
            raise TransferRefused("too many transfers queued; try again later") from None
        self.active[client_id] = record
        self._requests[client_id] = request
        return request

    def _on_server_request(self, channel: ControlChannel, message: messages.TransferRequest) -> None:
        """A game server asked to move one of its players (``transfer.request``): start it or refuse."""
        answer: messages.TransferAccepted | messages.TransferRefused
        try:
            session = self.runtime.clients.get(message.client)
            if session is None or session.link.backend.name != channel.backend:
                raise TransferRefused(f"client {message.client} is not on {channel.backend}")
            started = self.request(message.client, message.target, TransferReason(message.reason))
        except TransferRefused as exc:
            answer = messages.TransferRefused(request=message.request, reason=str(exc))
        else:
            answer = messages.TransferAccepted(request=message.request, transfer=started.record.id)
        try:
            self._send.send_nowait(_Answer(channel, answer))
        except trio.WouldBlock:
            log.warning("transfer queue full: the answer to %s's request is dropped", channel.backend)

    def prepare(self, client_id: str, target: str, reason: TransferReason, ttl: float) -> _Request:
        """Prepare a move of ``client_id`` to ``target`` (see :meth:`request`); TransferRefused if not."""
        return self.request(client_id, target, reason, prepare_ttl=ttl)

    def cancel_prepared(self, client_id: str, target: str | None = None) -> bool:
        """Drop a waiting preparation (of ``target``, or any); returns whether there was one."""
        waiting = self._prepared.get(client_id)
        if waiting is None or (target is not None and waiting.target != target):
            return False
        waiting.cancel.set()
        return True

    async def transfer(self, client_id: str, target: str, reason: TransferReason) -> TransferOutcome:
        """Move ``client_id`` to ``target`` and wait for the outcome (committed or rolled back)."""
        request = self.request(client_id, target, reason)
        await request.done.wait()
        assert request.outcome is not None
        return request.outcome

    # -- one transfer ------------------------------------------------------------------------------

    async def _run(self, request: _Request) -> None:
        record = request.record
        session = request.session
        try:
            why: str | None = None
            with request.scope:
                try:
                    await self._drive(request)
                except _RollBack as exc:
                    why = exc.why
            if request.scope.cancelled_caught and record.can_roll_back:
                why = request.abandoned or "cancelled"
            if why is not None:
                await self._roll_back(request, why)
        finally:
            self._forget(request)
            stall = session.last_stall if record.phase is Phase.COMPLETED else None
            request.outcome = self._outcome(record, stall=stall)
            self._account(request.outcome)
            request.done.set()

    async def _drive(self, request: _Request) -> None:
        """The steps of one transfer, within ``[transfer] timeout``; raises _RollBack on any failure."""
        record = request.record
        if request.after is not None:
            await request.after.wait()
        timeout = self.runtime.config.transfer.timeout
        deadline = trio.current_time() + timeout
        with trio.move_on_at(deadline) as preparing:
            await self._prepare(request)
        if preparing.cancelled_caught:
            raise _RollBack(f"timed out while {record.phase.value}")
        if request.prepare_ttl is not None:
            await self._wait_for_go(request)
            deadline = trio.current_time() + timeout  # a used preparation gets a fresh budget
        old: BackendLink | None = None
        with trio.move_on_at(deadline):
            old = await self._cut_over(request)
        if old is None:
            raise _RollBack(f"timed out while {record.phase.value}")
        # The target owns the client: finishing the source's side cannot fail the transfer, and it is
        # not cut short by the transfer's deadline (an old link closed without its Close handshake may
        # be reset, and lose the last client messages its backend had not read). Bounded on its own.
        with trio.CancelScope(shield=True), trio.move_on_after(2 * self.runtime.proxy.close_timeout):
            source_channel = self.channels.get(record.source)
            if source_channel is not None and not record.blind:
                await _tell(source_channel, TransferComplete(transfer=record.id, client=record.client_id))
            await request.session.retire_link(old)
        record.advance(Phase.COMPLETED)

    def _forget(self, request: _Request) -> None:
        client_id = request.record.client_id
        if self.active.get(client_id) is request.record:
            del self.active[client_id]
        if self._requests.get(client_id) is request:
            del self._requests[client_id]

    @staticmethod
    def _outcome(record: TransferRecord, *, stall: float | None = None) -> TransferOutcome:
        return TransferOutcome(
            transfer=record.id,
            client=record.client_id,
            source=record.source,
            target=record.target,
            reason=record.reason.value,
            committed=record.phase is Phase.COMPLETED,
            blind=record.blind,
            phase=record.phase.value,
            failure=record.failure,
            duration=record.duration,
            stall=stall,
            hold=_held_for(record),
        )

    # -- failover: a transfer whose source is gone ---------------------------------------------------

    async def fail_over(
        self, client_id: str, source: str, connect: Callable[[], Awaitable[BackendLink]]
    ) -> BackendLink:
        """Account a failover as a transfer (reason ``failover``) while ``connect`` finds the client a link.

        The session calls this (through its link provider) once ``source`` is lost; its messages are held
        meanwhile. A transfer of the client still before its switch is abandoned first (rolled back:
        both servers told, its target link closed), since its source is the one that failed; one past
        its switch is let finish. The failover is then the client's one transfer: other requests are
        refused until it ends. There is no state to hand over (the source is gone), so it is blind: the
        new server sees a new connection. ``connect``'s HandshakeError (or cancellation by the
        failover's deadline) propagates after the failure is recorded.
        """
        current = self._requests.get(client_id)
        if current is not None:
            if current.record.can_roll_back:
                current.abandoned = f"{source} failed during the transfer"
                current.scope.cancel()
            with trio.move_on_after(2 * self.runtime.proxy.close_timeout):
                await current.done.wait()
        record = TransferRecord(
            id=f"t-{self._prefix}-{next(self._ids)}",
            client_id=client_id,
            source=source,
            target="",
            reason=TransferReason.FAILOVER,
            blind=True,
        )
        self.active[client_id] = record
        record.advance(Phase.PREPARING)
        try:
            link = await connect()
        except BaseException as exc:
            record.roll_back(getattr(exc, "reason", None) or "no game server answered in time")
            raise
        else:
            record.target = link.backend.name
            for phase in (Phase.PREPARED, Phase.HOLDING, Phase.SWITCHED, Phase.COMPLETED):
                record.advance(phase)
            return link
        finally:
            if self.active.get(client_id) is record:
                del self.active[client_id]
            self._account(self._outcome(record), failover=True)

    async def _wait_for_go(self, request: _Request) -> None:
        """A preparation waits (up to its ttl) for the move to be asked for, or to be cancelled."""
        self._prepared[request.record.client_id] = request
        try:
            with trio.move_on_after(request.prepare_ttl or 0):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_set_when, request.cancel, nursery.cancel_scope)
                    await request.go.wait()
                    nursery.cancel_scope.cancel()
        finally:
            self._prepared.pop(request.record.client_id, None)
        if not request.go.is_set():
            raise _RollBack("preparation cancelled" if request.cancel.is_set() else "preparation expired")
        if not request.session.movable:
            raise _RollBack("the client cannot be moved now")

    async def _prepare(self, request: _Request) -> None:
        record = request.record
        session = request.session
        runtime = self.runtime
        target = runtime.pool.get(record.target)
        if target is None:
            raise _RollBack(f"{record.target} was removed")
        timeout_ms = int(runtime.config.transfer.timeout * 1000)
        source_channel = self.channels.get(record.source)
        target_channel = self.channels.get(record.target)
        if not record.blind and (source_channel is None or target_channel is None):
            raise _RollBack("a control channel dropped")
        record.advance(Phase.PREPARING)
        if source_channel is not None and target_channel is not None:
            await _tell(
                source_channel,
                TransferNotice(
                    transfer=record.id,
                    client=record.client_id,
                    target=record.target,
                    reason=record.reason.value,
                    timeout_ms=timeout_ms,
                ),
            )
            reply = await _ask(
                target_channel,
                TransferPrepare(
                    transfer=record.id,
                    client=record.client_id,
                    source=record.source,
                    reason=record.reason.value,
                    timeout_ms=timeout_ms,
                ),
                record.id,
            )
            if not isinstance(reply, TransferReady):
                raise _RollBack(f"{record.target} refused: {_why(reply)}")
        try:
            request.new_link = await session.provider.open_link_to(
                target, transfer=record.id, subprotocol=session.link.subprotocol
            )
        except HandshakeError as exc:
            raise _RollBack(f"cannot connect to {record.target}: {exc.reason}") from None
        record.advance(Phase.PREPARED)

    async def _cut_over(self, request: _Request) -> BackendLink:
        """Hold, hand off, cut and switch; returns the source's link, still open (the caller retires it)."""
        record = request.record
        session = request.session
        assert request.new_link is not None
        timeout_ms = int(self.runtime.config.transfer.timeout * 1000)
        source_channel = self.channels.get(record.source)
        target_channel = self.channels.get(record.target)
        if not record.blind and (source_channel is None or target_channel is None):
            raise _RollBack("a control channel dropped")
        delivered = await session.hold_client()
        record.advance(Phase.HOLDING)
        if source_channel is None or target_channel is None:
            await session.cut_backend(None)
            cut_at = trio.current_time()
        else:
            record.advance(Phase.HANDING_OFF)
            state = await _ask(
                source_channel,
                TransferBegin(
                    transfer=record.id,
                    client=record.client_id,
                    delivered=delivered,
                    timeout_ms=timeout_ms,
                ),
                record.id,
            )
            if not isinstance(state, TransferState):
                raise _RollBack(f"{record.source} refused: {_why(state)}")
            record.advance(Phase.CUTTING)
            await session.cut_backend(state.sent)
            cut_at = trio.current_time()
            record.advance(Phase.COMMITTING)
            reply = await _ask(
                target_channel,
                TransferCommit(
                    transfer=record.id, client=record.client_id, state=state.state, timeout_ms=timeout_ms
                ),
                record.id,
            )
            if not isinstance(reply, TransferCommitted):
                raise _RollBack(f"{record.target} refused: {_why(reply)}")
        if session.ending is not None or request.new_link.closed:
            raise _RollBack("the client or the target link went away")
        held = session.up.held_messages()
        request.new_link.on_first_message = self._metrics.stall.observe
        old = session.switch_to(request.new_link, stall_from=cut_at)
        request.new_link = None  # the session owns it now
        record.advance(Phase.SWITCHED)
        self._metrics.held.observe(held)
        return old

    async def _roll_back(self, request: _Request, why: str) -> None:
        record = request.record
        session = request.session
        record.roll_back(why)
        session.resume()
        with trio.CancelScope(shield=True), trio.move_on_after(self.runtime.proxy.close_timeout):
            if not record.blind:
                abort = TransferAbort(transfer=record.id, client=record.client_id, reason=why)
                for name in (record.source, record.target):
                    channel = self.channels.get(name)
                    if channel is not None:
                        await _tell(channel, abort)
            if request.new_link is not None:
                await session.retire_link(request.new_link, "transfer rolled back")
                request.new_link = None

    def _account(self, outcome: TransferOutcome, *, failover: bool = False) -> None:
        metrics = self._metrics
        label = "committed" if outcome.committed else "rolled_back"
        if failover and not outcome.committed:
            label = "failed"  # nowhere to go: the client is closed with 1013
        if outcome.failure in _UNUSED_PREPARATION:
            # An unused preparation is the predictor changing its mind, not a failed transfer.
            label = _UNUSED_PREPARATION[outcome.failure]
        metrics.transfers.labels(outcome.reason, label).inc()
        metrics.duration.observe(outcome.duration)
        extra = {
            "client": outcome.client,
            "server": outcome.target,
            "from_server": outcome.source,
            "event": "transfer",
            "transfer": outcome.transfer,
            "outcome": "committed" if outcome.committed else "rolled_back",
        }
        if failover:
            if outcome.committed:
                log.info(
                    "client %s failed over from %s to %s in %.1f ms (transfer %s)",
                    outcome.client,
                    outcome.source,
                    outcome.target,
                    outcome.duration * 1000,
                    outcome.transfer,
                    extra=extra | {"event": "failover"},
                )
            else:
                log.warning(
                    "client %s lost %s and no game server can take it (%s): closing with 1013",
                    outcome.client,
                    outcome.source,
                    outcome.failure,
                    extra=extra | {"event": "failover"},
                )
        elif label in _UNUSED_PREPARATION.values():
            log.debug(
                "transfer %s: preparation for %s %s", outcome.transfer, outcome.target, label, extra=extra
            )
        elif outcome.committed:
            log.info(
                "transfer %s: client %s moved %s -> %s (%s%s) in %.1f ms",
                outcome.transfer,
                outcome.client,
                outcome.source,
                outcome.target,
                outcome.reason,
                ", blind" if outcome.blind else "",
                outcome.duration * 1000,
                extra=extra,
            )
        else:
            log.warning(
                "transfer %s: client %s stays on %s (%s to %s rolled back: %s)",
                outcome.transfer,
                outcome.client,
                outcome.source,
                outcome.reason,
                outcome.target,
                outcome.failure,
                extra=extra,
            )


def _held_for(record: TransferRecord) -> float | None:
    """Time between HOLDING and the phase that ended the hold (SWITCHED or ROLLED_BACK)."""
    held = None
    for phase, at in record.history:
        if phase is Phase.HOLDING:
            held = at
        elif held is not None and phase in (Phase.SWITCHED, Phase.ROLLED_BACK):
            return at - held
    return None


async def _set_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _tell(channel: ControlChannel, message: Any) -> None:
    """Send without waiting for an answer; a dropped channel is ignored (the caller's next step notices)."""
    with contextlib.suppress(ChannelClosed):
        await channel.send(message)


async def _ask(channel: ControlChannel, message: Any, transfer: str) -> Any:
    try:
        return await channel.request(message, transfer)
    except ChannelClosed as exc:
        raise _RollBack(str(exc)) from None


def _why(reply: object) -> str:
    return str(getattr(reply, "reason", type(reply).__name__))
