"""The relay service: cross-server messages and object handoffs, routed between control channels.

Theory of operation
-------------------
Game servers talk to each other through Atlas, over their control channels (docs/protocol.md section 10
has the messages and diagrams). A server addresses a message to another server by name
(``relay.send``), to whoever owns the region holding a point of the world (``relay.region``, resolved
with ``runtime.world``), or to a client wherever it is (``relay.client``, resolved with
``runtime.clients``). Atlas delivers it as ``relay.message``, or tells the sender why it could not
(``relay.undeliverable``: no such server, no owner, no such client, the target's channel is down or
does not announce the ``relay`` capability).

A channel's reader hands this traffic to :meth:`RelayService.offer` (``ControlChannels.on_relay``), which
never blocks: it queues it for :meth:`RelayService.serve`, which runs in the root nursery and does the
routing. Addressing is sans-IO (:func:`address` and :func:`plan_handoff`, against a :class:`Directory`);
the trio shell only moves messages and time:

* **Delivery order.** Every destination channel has one bounded outbox and one writer task, so the
  messages one server relays to another arrive in the order it sent them. A full outbox (a server that
  does not read) makes the message undeliverable rather than slow anyone down. A writer whose channel is
  down fails what it holds, and one with nothing to send for a while ends.
* **Clients that move.** A client relay is addressed to the server whose data link the client has when
  Atlas routes it. While the client is being cut over (its transfer is past ``prepared``), relays to it
  wait, in order, until the transfer has ended, and then go to whoever owns the client. A server that
  gets one for a player that has left, or whose sends are held for a hand-off, passes it back
  (``relay.client`` with ``from_server`` and ``hops``); after ``_MAX_HOPS`` passes it is undeliverable.
  (The coordinator has no per-transfer signal, so the wait polls its table every 10 ms.)
* **Object handoff.** ``object.handoff`` from the source becomes an ``object.offer`` to the target
  (the owner of ``point``, or ``to_server``) under Atlas's own id, in one task per handoff, bounded by
  the handoff timeout (``[transfer] timeout``). The target's ``object.accept`` makes the object the
  target's: Atlas then tells the source ``object.ack``, and only then may the source drop it. A refusal,
  the deadline, or the target's channel closing gives the source ``object.rejected`` (it keeps the
  object). When the target may hold an object that did not move (it never answered in time, or it
  accepted but the source can no longer be told), Atlas sends it ``object.withdrawn``, and answers a
  late ``object.accept`` the same way. :class:`HandoffRecord` is the state machine.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import itertools
import logging
import os
import time
from typing import TYPE_CHECKING, Final, Protocol

import attrs
import trio

from atlas.control.channel import ChannelClosed, ControlChannel, ControlChannels, RelayTraffic
from atlas.control.lifecycle import Phase
from atlas.control.messages import (
    RELAY_CAPABILITY,
    AtlasMessage,
    ObjectAccept,
    ObjectAck,
    ObjectHandoff,
    ObjectOffer,
    ObjectReject,
    ObjectRejected,
    ObjectWithdrawn,
    Point,
    RelayClient,
    RelayMessage,
    RelayRegion,
    RelaySend,
    RelayUndeliverable,
)
from atlas.world import Vec3

if TYPE_CHECKING:
    from atlas.runtime import Runtime

__all__ = [
    "HANDOFF_TRANSITIONS",
    "Delivery",
    "Directory",
    "HandoffPhase",
    "HandoffRecord",
    "IllegalHandoff",
    "RelayService",
    "RelayStatistics",
    "Undelivered",
    "address",
    "plan_handoff",
    "serve_relay",
]

log = logging.getLogger("atlas.relay")

_INBOX: Final = 1024
"""Relay traffic read from the channels and waiting to be routed."""
_OUTBOX: Final = 1024
"""Messages waiting to go out on one channel."""
_IDLE: Final = 30.0
"""Seconds a channel's writer waits with nothing to send before it ends."""
_MAX_HOPS: Final = 4
"""How often a client relay may be passed back by servers the client had left."""
_MAX_PENDING: Final = 4096
"""Object handoffs in progress at once."""
_REMEMBERED: Final = 1024
"""Ended object handoffs remembered."""
_FOLLOW_POLL: Final = 0.01
_CUTTING_OVER: Final = frozenset(
    {Phase.HOLDING, Phase.HANDING_OFF, Phase.CUTTING, Phase.COMMITTING, Phase.SWITCHED}
)


# -- addressing (sans-IO) ---------------------------------------------------------------------------


class Directory(Protocol):
    """What addressing needs to know about the cluster (Atlas's runtime and channels, or a test's fake)."""

    def is_server(self, name: str) -> bool:
        """Whether a backend of that name exists."""
        ...

    def owner_at(self, point: Point) -> str | None:
        """The owner of the region holding ``point``, or None."""
        ...

    def server_of(self, client: str) -> str | None:
        """The server whose data link ``client`` has now, or None if there is no such client."""
        ...

    def unreachable(self, server: str) -> str | None:
        """Why relay traffic cannot go to ``server`` now (no channel, no capability), or None."""
        ...


@attrs.frozen
class Delivery:
    """Deliver ``message`` on ``target``'s control channel."""

    target: str
    message: RelayMessage


@attrs.frozen
class Undelivered:
    """Tell the sender ``message`` (its relay reached nobody)."""

    message: RelayUndeliverable


def _where(point: Point) -> str:
    return "[" + ", ".join(f"{c:g}" for c in point) + "]"


def address(
    sender: str, message: RelaySend | RelayRegion | RelayClient, directory: Directory
) -> Delivery | Undelivered:
    """Where a relay request from ``sender`` goes, or why it goes nowhere."""
    target: str | None
    if isinstance(message, RelaySend):
        target = message.to_server if directory.is_server(message.to_server) else None
        why = f"no server {message.to_server}"
        undeliverable = RelayUndeliverable(
            kind="server",
            reason="",
            payload=message.payload,
            to_server=message.to_server,
            relay=message.relay,
        )
        delivery = RelayMessage(
            from_server=sender, kind="server", payload=message.payload, relay=message.relay
        )
    elif isinstance(message, RelayRegion):
        target = directory.owner_at(message.point)
        why = f"no region holds {_where(message.point)}"
        undeliverable = RelayUndeliverable(
            kind="region", reason="", payload=message.payload, point=message.point, relay=message.relay
        )
        delivery = RelayMessage(
            from_server=sender,
            kind="region",
            payload=message.payload,
            point=message.point,
            relay=message.relay,
        )
    else:
        target = directory.server_of(message.client)
        why = f"no client {message.client}"
        if message.hops > _MAX_HOPS:
            target, why = None, f"client {message.client} kept moving (passed on {message.hops} times)"
        undeliverable = RelayUndeliverable(
            kind="client", reason="", payload=message.payload, client=message.client, relay=message.relay
        )
        delivery = RelayMessage(
            from_server=sender,
            kind="client",
            payload=message.payload,
            client=message.client,
            relay=message.relay,
            hops=message.hops,
        )
    if target is not None:
        blocked = directory.unreachable(target)
        if blocked is None:
            return Delivery(target, delivery)
        why = blocked
    undeliverable.reason = why
    return Undelivered(undeliverable)


def plan_handoff(sender: str, message: ObjectHandoff, directory: Directory) -> str | Undelivered:
    """The target of an object handoff from ``sender`` (a server name), or why there is none.

    On refusal the :class:`Undelivered` carries no relay message; its ``message.reason`` is the reason
    for ``object.rejected``.
    """
    target: str | None
    if (message.point is None) == (message.to_server is None):
        why = "an object handoff needs exactly one of point and to_server"
        target = None
    elif message.point is not None:
        target = directory.owner_at(message.point)
        why = f"no region holds {_where(message.point)}"
        if target == sender:
            target, why = None, f"{sender} owns {_where(message.point)} already"
    else:
        assert message.to_server is not None
        target = message.to_server if directory.is_server(message.to_server) else None
        why = f"no server {message.to_server}"
        if target == sender:
            target, why = None, f"the object is on {sender} already"
    if target is not None:
        blocked = directory.unreachable(target)
        if blocked is None:
            return target
        why = blocked
    return Undelivered(RelayUndeliverable(kind="server", reason=why, payload=None, to_server=target))


# -- the state of one object handoff (sans-IO) ------------------------------------------------------


class HandoffPhase(enum.Enum):
    """Where an object handoff stands at Atlas."""

    OFFERED = "offered"
    """``object.offer`` went to the target; its answer is awaited (bounded)."""
    ACCEPTED = "accepted"
    """The target took the object; the source is being told."""
    ACKED = "acked"
    """The source got ``object.ack``: the object is the target's."""
    REJECTED = "rejected"
    """Refused, timed out or lost with the target's channel: the source keeps the object."""
    WITHDRAWN = "withdrawn"
    """Accepted, but the source could not be told: the target was told to give the object back."""


HANDOFF_TRANSITIONS: Final[dict[HandoffPhase, frozenset[HandoffPhase]]] = {
    HandoffPhase.OFFERED: frozenset({HandoffPhase.ACCEPTED, HandoffPhase.REJECTED}),
    HandoffPhase.ACCEPTED: frozenset({HandoffPhase.ACKED, HandoffPhase.WITHDRAWN}),
    HandoffPhase.ACKED: frozenset(),
    HandoffPhase.REJECTED: frozenset(),
    HandoffPhase.WITHDRAWN: frozenset(),
}
"""The allowed phase changes of an object handoff."""


class IllegalHandoff(Exception):
    """A phase change the table does not allow."""


@attrs.define
class HandoffRecord:
    """One object handoff; :meth:`advance` is the only way to change its phase."""

    id: str
    """Atlas's id (the offer's ``handoff``)."""
    source: str
    source_handoff: str
    """The source's id (the ``handoff`` of its ``object.handoff``, ``object.ack`` and ``.rejected``)."""
    object: str
    target: str
    phase: HandoffPhase = HandoffPhase.OFFERED
    reason: str | None = None
    """Why it was rejected or withdrawn."""
    started: float = attrs.field(factory=time.monotonic)

    @property
    def done(self) -> bool:
        """Whether the handoff has ended."""
        return not HANDOFF_TRANSITIONS[self.phase]

    def advance(self, phase: HandoffPhase, reason: str | None = None) -> None:
        """Move to ``phase``; :class:`IllegalHandoff` if the table does not allow it."""
        if phase not in HANDOFF_TRANSITIONS[self.phase]:
            raise IllegalHandoff(f"handoff {self.id}: {self.phase.value} -> {phase.value} is not allowed")
        self.phase = phase
        if reason is not None:
            self.reason = reason


# -- the trio shell ---------------------------------------------------------------------------------


@attrs.frozen
class RelayStatistics:
    """A snapshot of the relay service's counters (see :meth:`RelayService.statistics`)."""

    relayed: int
    """Messages delivered to a server's channel (``relay.message``)."""
    undeliverable: int
    """Relay requests answered with ``relay.undeliverable``."""
    dropped: int
    """Relay traffic dropped because a queue was full and nobody could be told."""
    handoffs_in_progress: int
    handoffs_acked: int
    handoffs_rejected: int
    handoffs_withdrawn: int


@attrs.frozen
class _Outgoing:
    message: AtlasMessage
    bounce: tuple[ControlChannel, RelayUndeliverable] | None = None
    """Who to tell, and what, if ``message`` cannot be delivered."""


@attrs.frozen
class _ClientRelay:
    sender: str
    reply_to: ControlChannel | None
    message: RelayClient


class _AtlasDirectory:
    """The :class:`Directory` of a running Atlas: its pool, world map, clients and control channels."""

    def __init__(self, runtime: Runtime, channels: ControlChannels) -> None:
        self.runtime = runtime
        self.channels = channels

    def is_server(self, name: str) -> bool:
        return self.runtime.pool.get(name) is not None

    def owner_at(self, point: Point) -> str | None:
        return self.runtime.world.owner_at(Vec3(*point))

    def server_of(self, client: str) -> str | None:
        session = self.runtime.clients.get(client)
        return None if session is None else session.link.backend.name

    def unreachable(self, server: str) -> str | None:
        channel = self.channels.get(server)
        if channel is None:
            backend = self.runtime.pool.get(server)
            if backend is None:
                return f"no server {server}"
            if not backend.control_url:
                return f"{server} has no control channel"
            return f"the control channel of {server} is down"
        if RELAY_CAPABILITY not in channel.welcome.capabilities:
            return f"{server} does not take relayed messages (no {RELAY_CAPABILITY!r} capability)"
        return None


class RelayService:
    """Routes relay traffic and runs object handoffs between control channels (see the module docstring).

    Creating it sets ``channels.on_relay``: create it before the channels come up.

    :param handoff_timeout: seconds the target of an object handoff has to answer (default: the
        ``[transfer] timeout``).
    """

    def __init__(
        self, runtime: Runtime, channels: ControlChannels, *, handoff_timeout: float | None = None
    ) -> None:
        self.runtime = runtime
        self.channels = channels
        self.handoff_timeout = runtime.config.transfer.timeout if handoff_timeout is None else handoff_timeout
        self.handoffs: dict[str, HandoffRecord] = {}
        """Object handoffs in progress, by Atlas's id."""
        self._directory = _AtlasDirectory(runtime, channels)
        self._inbox_send, self._inbox_receive = trio.open_memory_channel[tuple[ControlChannel, RelayTraffic]](
            _INBOX
        )
        self._outboxes: dict[ControlChannel, trio.MemorySendChannel[_Outgoing]] = {}
        # Client relays waiting for their client's cut-over to end, in order, by client id.
        self._following: dict[str, list[_ClientRelay]] = {}
        self._prefix = os.urandom(3).hex()
        self._ids = itertools.count(1)
        self._relayed = 0
        self._undeliverable = 0
        self._dropped = 0
        self._ended = {HandoffPhase.ACKED: 0, HandoffPhase.REJECTED: 0, HandoffPhase.WITHDRAWN: 0}
        # How recent handoffs ended, by Atlas's id (to tell a repeated accept from a late one).
        self._recent: collections.OrderedDict[str, HandoffPhase] = collections.OrderedDict()
        channels.on_relay = self.offer

    def statistics(self) -> RelayStatistics:
        """A snapshot of the counters."""
        return RelayStatistics(
            relayed=self._relayed,
            undeliverable=self._undeliverable,
            dropped=self._dropped,
            handoffs_in_progress=len(self.handoffs),
            handoffs_acked=self._ended[HandoffPhase.ACKED],
            handoffs_rejected=self._ended[HandoffPhase.REJECTED],
            handoffs_withdrawn=self._ended[HandoffPhase.WITHDRAWN],
        )

    def offer(self, channel: ControlChannel, message: RelayTraffic) -> None:
        """Queue relay traffic a channel read (never blocks: when the queue is full, it is dropped)."""
        try:
            self._inbox_send.send_nowait((channel, message))
        except trio.WouldBlock:
            self._dropped += 1
            log.warning("relay queue full: %s from %s dropped", type(message).__name__, channel.backend)

    async def serve(self, *, task_status: trio.TaskStatus[RelayService] = trio.TASK_STATUS_IGNORED) -> None:
        """Route relay traffic until cancelled: writers, waits and handoffs run in a nursery owned here."""
        async with trio.open_nursery() as nursery:
            task_status.started(self)
            async for channel, message in self._inbox_receive:
                self._handle(nursery, channel, message)

    # -- routing -----------------------------------------------------------------------------------

    def _handle(self, nursery: trio.Nursery, channel: ControlChannel, message: RelayTraffic) -> None:
        if isinstance(message, RelayClient):
            if message.from_server is None:
                relay = _ClientRelay(channel.backend, channel, message)
            else:  # passed back by a server the client had left: answer the original sender
                relay = _ClientRelay(message.from_server, self.channels.get(message.from_server), message)
            self._route_client(nursery, relay)
        elif isinstance(message, RelaySend | RelayRegion):
            self._route(nursery, channel.backend, channel, message)
        elif isinstance(message, ObjectHandoff):
            self._start_handoff(nursery, channel, message)
        elif isinstance(message, ObjectAccept):
            record = self.handoffs.get(message.handoff)
            phase = record.phase if record is not None else self._recent.get(message.handoff)
            if phase in (HandoffPhase.ACCEPTED, HandoffPhase.ACKED):
                log.debug("relay: repeated object.accept of %s from %s", message.handoff, channel.backend)
                return
            # The offer is over (it timed out, or is unknown): the target must not keep the object.
            log.warning(
                "relay: late object.accept of %s from %s: withdrawn", message.handoff, channel.backend
            )
            withdrawn = ObjectWithdrawn(
                handoff=message.handoff, reason="the offer was over when it was accepted"
            )
            self._post(nursery, channel, _Outgoing(withdrawn))
        else:
            log.debug("relay: late object.reject of %s from %s ignored", message.handoff, channel.backend)

    def _route_client(self, nursery: trio.Nursery, relay: _ClientRelay) -> None:
        client = relay.message.client
        waiting = self._following.get(client)
        if waiting is not None:
            waiting.append(relay)  # behind the relays already waiting for this client
        elif self._moving(client):
            self._following[client] = [relay]
            nursery.start_soon(self._follow, nursery, client)
        else:
            self._route(nursery, relay.sender, relay.reply_to, relay.message)

    def _moving(self, client: str) -> bool:
        transfers = self.runtime.transfers
        record = transfers.active.get(client) if transfers is not None else None
        return record is not None and record.phase in _CUTTING_OVER

    async def _follow(self, nursery: trio.Nursery, client: str) -> None:
        """Hold a moving client's relays until its transfer has ended (bounded), then route them in order."""
        with trio.move_on_after(self.runtime.config.transfer.timeout + 1.0):
            while self._moving(client):  # noqa: ASYNC110  # the coordinator signals no transfer's end
                await trio.sleep(_FOLLOW_POLL)
        for relay in self._following.pop(client, []):
            self._route_client(nursery, relay)

    def _route(
        self,
        nursery: trio.Nursery,
        sender: str,
        reply_to: ControlChannel | None,
        message: RelaySend | RelayRegion | RelayClient,
    ) -> None:
        decision = address(sender, message, self._directory)
        if isinstance(decision, Undelivered):
            self._undeliver(nursery, reply_to, decision.message)
            return
        target = self.channels.get(decision.target)
        assert target is not None  # address() checked it, and nothing ran since
        bounce = None if reply_to is None else (reply_to, _undeliverable_of(decision))
        self._post(nursery, target, _Outgoing(decision.message, bounce))

    def _undeliver(
        self, nursery: trio.Nursery, reply_to: ControlChannel | None, message: RelayUndeliverable
    ) -> None:
        self._undeliverable += 1
        log.info("relay: undeliverable %s relay: %s", message.kind, message.reason)
        if reply_to is None:
            return
        self._post(nursery, reply_to, _Outgoing(message))

    def _post(self, nursery: trio.Nursery, channel: ControlChannel, item: _Outgoing) -> None:
        """Queue ``item`` on ``channel``'s outbox, starting its writer if it has none."""
        outbox = self._outboxes.get(channel)
        if outbox is None:
            outbox, receive = trio.open_memory_channel[_Outgoing](_OUTBOX)
            self._outboxes[channel] = outbox
            nursery.start_soon(self._write, nursery, channel, outbox, receive)
        try:
            outbox.send_nowait(item)
        except trio.WouldBlock:
            self._failed(nursery, item, f"{channel.backend} is not keeping up (its relay queue is full)")

    def _failed(self, nursery: trio.Nursery, item: _Outgoing, why: str) -> None:
        if item.bounce is None:
            self._dropped += 1
            log.warning("relay: %s dropped: %s", type(item.message).__name__, why)
            return
        reply_to, message = item.bounce
        message.reason = why
        self._undeliver(nursery, reply_to, message)

    async def _write(
        self,
        nursery: trio.Nursery,
        channel: ControlChannel,
        outbox: trio.MemorySendChannel[_Outgoing],
        receive: trio.MemoryReceiveChannel[_Outgoing],
    ) -> None:
        """Send one channel's outbox in order; end when the channel is down or idle."""
        with receive:
            while channel.ready:
                item: _Outgoing | None = None
                with trio.move_on_after(_IDLE):
                    item = await receive.receive()
                if item is None:
                    break
                try:
                    await channel.send(item.message)
                except ChannelClosed:
                    self._failed(nursery, item, f"the control channel of {channel.backend} closed")
                else:
                    if isinstance(item.message, RelayMessage):
                        self._relayed += 1
            # Retire: later posts start a new writer; what is queued here now can no longer go out.
            if self._outboxes.get(channel) is outbox:
                del self._outboxes[channel]
            outbox.close()
            why = f"the control channel of {channel.backend} closed"
            while True:
                try:
                    item = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                if not channel.ready:
                    self._failed(nursery, item, why)
                else:  # idle, but one came in at the last moment: post it again
                    self._post(nursery, channel, item)

    # -- object handoff ----------------------------------------------------------------------------

    def _start_handoff(self, nursery: trio.Nursery, channel: ControlChannel, message: ObjectHandoff) -> None:
        source = channel.backend
        why: str | None = None
        for record in self.handoffs.values():
            if record.source == source and record.source_handoff == message.handoff:
                why = f"handoff {message.handoff} is already in progress"
            elif record.source == source and record.object == message.object:
                why = f"object {message.object} is already being handed off ({record.source_handoff})"
        if why is None and len(self.handoffs) >= _MAX_PENDING:
            why = "too many object handoffs in progress"
        target = None
        if why is None:
            planned = plan_handoff(source, message, self._directory)
            if isinstance(planned, Undelivered):
                why = planned.message.reason
            else:
                target = planned
        target_channel = None if target is None else self.channels.get(target)
        if why is not None or target is None or target_channel is None:
            why = why or "no target"
            self._ended[HandoffPhase.REJECTED] += 1
            log.info("relay: object %s from %s not handed off: %s", message.object, source, why)
            self._post(nursery, channel, _Outgoing(ObjectRejected(handoff=message.handoff, reason=why)))
            return
        record = HandoffRecord(
            id=f"h-{self._prefix}-{next(self._ids)}",
            source=source,
            source_handoff=message.handoff,
            object=message.object,
            target=target,
        )
        self.handoffs[record.id] = record
        nursery.start_soon(self._hand_off, record, channel, target_channel, message)

    async def _hand_off(
        self, record: HandoffRecord, source: ControlChannel, target: ControlChannel, message: ObjectHandoff
    ) -> None:
        """Offer the object to the target, then tell the source (and, if need be, the target) the outcome."""
        timeout = self.handoff_timeout
        offer = ObjectOffer(
            handoff=record.id,
            object=record.object,
            from_server=record.source,
            state=message.state,
            timeout_ms=int(timeout * 1000),
            point=message.point,
        )
        withdraw: str | None = None
        try:
            reply = None
            with trio.move_on_after(timeout):
                try:
                    reply = await target.request(offer, record.id)
                except ChannelClosed:
                    record.advance(HandoffPhase.REJECTED, f"the control channel of {record.target} closed")
            if isinstance(reply, ObjectAccept):
                record.advance(HandoffPhase.ACCEPTED)
            elif isinstance(reply, ObjectReject):
                record.advance(HandoffPhase.REJECTED, f"{record.target} refused: {reply.reason}")
            elif not record.done:
                record.advance(
                    HandoffPhase.REJECTED, f"timed out: {record.target} did not answer in {timeout:g} s"
                )
                withdraw = "the offer timed out"
            with trio.move_on_after(self.runtime.proxy.close_timeout):
                if record.phase is HandoffPhase.ACCEPTED:
                    try:
                        await source.send(ObjectAck(handoff=record.source_handoff, to_server=record.target))
                        record.advance(HandoffPhase.ACKED)
                    except ChannelClosed:
                        record.advance(
                            HandoffPhase.WITHDRAWN, f"the control channel of {record.source} closed"
                        )
                        withdraw = record.reason
                else:
                    assert record.reason is not None
                    with contextlib.suppress(ChannelClosed):
                        await source.send(ObjectRejected(handoff=record.source_handoff, reason=record.reason))
                if withdraw is not None:
                    with contextlib.suppress(ChannelClosed):
                        await target.send(ObjectWithdrawn(handoff=record.id, reason=withdraw))
        finally:
            del self.handoffs[record.id]
            self._recent[record.id] = record.phase
            while len(self._recent) > _REMEMBERED:
                self._recent.popitem(last=False)
            if record.done:
                self._ended[record.phase] += 1
            self._log(record)

    def _log(self, record: HandoffRecord) -> None:
        elapsed = (time.monotonic() - record.started) * 1000
        if record.phase is HandoffPhase.ACKED:
            log.info(
                "relay: object %s moved %s -> %s (%s) in %.1f ms",
                record.object,
                record.source,
                record.target,
                record.source_handoff,
                elapsed,
            )
        else:
            log.warning(
                "relay: object %s stays on %s (handoff %s to %s %s: %s)",
                record.object,
                record.source,
                record.source_handoff,
                record.target,
                record.phase.value,
                record.reason,
            )


def _undeliverable_of(delivery: Delivery) -> RelayUndeliverable:
    """What the sender is told if a delivery fails after all (the reason is filled in then)."""
    message = delivery.message
    return RelayUndeliverable(
        kind=message.kind,
        reason="",
        payload=message.payload,
        to_server=delivery.target if message.kind == "server" else None,
        point=message.point,
        client=message.client,
        relay=message.relay,
    )


async def serve_relay(
    runtime: Runtime,
    channels: ControlChannels,
    *,
    handoff_timeout: float | None = None,
    task_status: trio.TaskStatus[RelayService] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a :class:`RelayService` until cancelled; reports it once it routes.

    Start it before the control channels, so that every channel hands its relay traffic to it.
    """
    service = RelayService(runtime, channels, handoff_timeout=handoff_timeout)
    await service.serve(task_status=task_status)
