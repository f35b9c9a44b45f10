"""Cross-server traffic on the game server's side: relayed messages, and object handoffs both ways.

Theory of operation
-------------------
Sending needs no task: :meth:`Relay.send` puts ``relay.send`` / ``relay.region`` / ``relay.client`` on
the oldest open control channel (one channel, so what one server sends another stays in order) and
returns the relay id it gave the message. :meth:`Relay.hand_off` sends ``object.handoff`` and waits
(bounded by ``handoff_timeout``) for Atlas's ``object.ack`` or ``object.rejected``, which the channel's
reader hands over by handoff id; a channel that closes first fails the wait (the source keeps the object:
Atlas then withdraws the offer from the target).

Receiving runs in :meth:`Relay.serve_channel`, one task per control channel, started by the channel's
session (``_control.py``), which cancels it when the channel closes. The reader hands it Atlas's relay
traffic through :meth:`Relay.receive`, which never blocks (a full inbox drops, and logs). The task calls
the game's hooks one message at a time, in order: ``on_relay``, ``on_client_relay`` (the player must be
here and not being handed off, else the message goes back to Atlas, which forwards it to wherever the
client is now), ``on_relay_undeliverable`` and ``on_object_withdrawn``. Each ``object.offer`` gets a task
of its own, so a slow game hook cannot make other offers miss their deadlines: it asks
``on_object_offer`` (bounded by the offer's ``timeout_ms``) and answers ``object.accept`` or
``object.reject``. Offer tasks are not cancelled when the channel closes: their hooks finish (bounded),
and an object accepted but whose accept could not go out is given back through ``on_object_withdrawn``.

An offer on the target, as a tiny state machine::

    DECIDING ─hook says yes, accept being sent─► ACCEPTED ─withdrawn by Atlas / accept not sent─► WITHDRAWN
        ├──── hook says no, fails or is too slow ──► REFUSED
        └──── withdrawn by Atlas while deciding ───► WITHDRAWN (the hook's yes, if it comes, is given back)
"""

from __future__ import annotations

import collections
import contextlib
import enum
import itertools
import logging
import math
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs
import msgspec
import trio

from atlas.control import messages as wire
from atlas.control.messages import Point, RelayKind
from atlas.sdk._channel import ChannelGone, ControlChannel
from atlas.sdk._player import Player, PlayerDisconnected

if TYPE_CHECKING:
    from atlas.sdk._server import GameServer

__all__ = [
    "RELAY_MESSAGES",
    "HandoffRejected",
    "ObjectOffer",
    "Relay",
    "RelayMessage",
    "RelayUnavailable",
    "Undeliverable",
    "as_point",
    "deliver_to_player",
    "payload_text",
]

logger = logging.getLogger("atlas.sdk")

RELAY_MESSAGES: Final = (
    wire.RelayMessage,
    wire.RelayUndeliverable,
    wire.ObjectOffer,
    wire.ObjectAck,
    wire.ObjectRejected,
    wire.ObjectWithdrawn,
)
"""Atlas's messages that :meth:`Relay.receive` takes."""

#: Messages waiting for the relay task of one channel.
_INBOX: Final = 1024
#: Offers being decided at once on one channel; more are refused at once.
_MAX_DECIDING: Final = 256
#: Accepted offers remembered, to give one back if Atlas withdraws it later.
_REMEMBERED: Final = 256
#: Seconds ``on_object_withdrawn`` may take.
_WITHDRAW_TIMEOUT: Final = 5.0


# -- what the game sees ---------------------------------------------------------------------------------


@attrs.frozen
class RelayMessage:
    """A message another server sent this one through Atlas (``on_relay``, ``on_client_relay``)."""

    from_server: str
    """The sending server's name (as Atlas's configuration names it)."""
    kind: RelayKind
    """How it was addressed: ``"server"`` (to this server by name), ``"region"`` (to the owner of
    ``point``), ``"client"`` (to the player ``client``, wherever it is)."""
    payload: Any
    """What the sender sent: any JSON value, decoded (dicts, lists, str, numbers, bools, None)."""
    client: str | None = None
    """For ``kind="client"``: the client id of the player it is for."""
    point: Point | None = None
    """For ``kind="region"``: the point the sender addressed."""


@attrs.frozen
class Undeliverable:
    """A message this server relayed reached nobody (``on_relay_undeliverable``)."""

    relay: str | None
    """The id the ``send_to_*`` call returned."""
    kind: RelayKind
    reason: str
    """Why, for people: ``no server gs-9``, ``no region holds [5, 0, 0]``, ``no client 9f-1``, ..."""
    payload: Any
    to_server: str | None = None
    point: Point | None = None
    client: str | None = None


@attrs.frozen
class ObjectOffer:
    """Another server hands this one an object (``on_object_offer``, ``on_object_withdrawn``)."""

    handoff: str
    """Atlas's id for this offer."""
    object: str
    """The object's id, as the source names it."""
    from_server: str
    """The source server's name."""
    state: Any
    """The object's state, as the source sent it (any JSON value)."""
    timeout: float
    """Seconds ``on_object_offer`` has to answer."""
    point: Point | None = None
    """Where the object went, when the source handed it off by position."""


class HandoffRejected(Exception):
    """An object handoff did not happen (:meth:`GameServer.hand_off`): the object is still this server's.

    ``reason`` says why: the target refused or did not answer in time, no region holds the point, no
    such server, no control channel is up, ...
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        """Why, for people (Atlas's words when Atlas answered)."""


class RelayUnavailable(Exception):
    """A message could not be relayed because no control channel from Atlas is up (or it just closed)."""


def payload_text(payload: Any) -> str:
    """What the default ``on_client_relay`` sends a player: a string as it is, anything else as JSON."""
    if isinstance(payload, str):
        return payload
    return msgspec.json.encode(payload).decode("utf-8")


class _PassBack(Exception):
    """The player is being handed off: the message must go to its next server instead."""


async def deliver_to_player(player: Player, message: RelayMessage) -> None:
    """Send a client relay's payload to ``player``, unless its hand-off to another server has begun.

    Checked and sent under the player's send lock, so a hand-off cannot start in between (a plain
    ``player.send`` would then be queued, and dropped when the player leaves). A player whose hand-off
    has begun makes it raise :class:`_PassBack`; the relay then goes back to Atlas.
    """
    text = payload_text(message.payload)
    async with player._lock:
        player._check_connected()
        if player._held is not None:
            if player._transfer is not None:
                raise _PassBack
            player._held.append(text)  # arriving: its sends flow once it is installed
            return
        await player._put(text)


# -- the machinery -----------------------------------------------------------------------------------


class _Phase(enum.Enum):
    DECIDING = "deciding"
    ACCEPTED = "accepted"
    REFUSED = "refused"
    WITHDRAWN = "withdrawn"


@attrs.define(eq=False)
class _Offer:
    offer: ObjectOffer
    phase: _Phase = _Phase.DECIDING
    withdrawn: str | None = None
    """Atlas's reason, when it withdrew the offer."""


@attrs.frozen
class _GiveBack:
    """Call ``on_object_withdrawn`` for an offer this server had accepted (queued behind relay messages)."""

    offer: ObjectOffer
    reason: str


_Inbound = wire.RelayMessage | wire.RelayUndeliverable | wire.ObjectOffer | _GiveBack


@attrs.define(eq=False)
class _ChannelRelay:
    """The relay state of one control channel."""

    inbox: trio.MemorySendChannel[_Inbound]
    # The server's own object handoffs waiting for Atlas's answer, by handoff id (None: channel closed).
    waiting: dict[str, trio.MemorySendChannel[wire.ObjectAck | wire.ObjectRejected | None]] = attrs.field(
        factory=dict
    )
    # Offers being decided, and accepted ones (most recent last), by Atlas's handoff id.
    offers: collections.OrderedDict[str, _Offer] = attrs.field(factory=collections.OrderedDict)


class Relay:
    """Cross-server traffic of one :class:`~atlas.sdk.GameServer` (see the module docstring)."""

    def __init__(self, server: GameServer) -> None:
        self._server = server
        # Insertion order is arrival order: the oldest open channel carries what this server sends.
        self._channels: dict[ControlChannel, _ChannelRelay] = {}
        self._ids = itertools.count(1)

    # -- sending ---------------------------------------------------------------------------------------

    def _channel(self) -> tuple[ControlChannel, _ChannelRelay] | None:
        for channel, state in self._channels.items():
            if channel.open and channel.version is not None:
                return channel, state
        return None

    async def send(
        self, make: type[wire.RelaySend | wire.RelayRegion | wire.RelayClient], **fields: Any
    ) -> str:
        """Send one relay request built as ``make(relay=<new id>, **fields)``; returns the id."""
        found = self._channel()
        if found is None:
            raise RelayUnavailable(f"{self._server.name} has no control channel from Atlas")
        relay = f"m-{next(self._ids)}"
        message = make(relay=relay, **fields)
        try:
            await found[0].send(message)
        except ChannelGone as exc:
            raise RelayUnavailable(str(exc)) from None
        return relay

    async def hand_off(
        self,
        object_id: str,
        state: Any,
        *,
        to_point: Sequence[float] | None,
        to_server: str | None,
    ) -> str:
        """Hand ``object_id`` off (see :meth:`GameServer.hand_off`); returns the server that took it."""
        if (to_point is None) == (to_server is None):
            raise ValueError("hand_off needs exactly one of to_point and to_server")
        point = None if to_point is None else as_point(to_point)
        msgspec.json.encode(state)  # TypeError now, rather than a half-made handoff
        found = self._channel()
        if found is None:
            raise HandoffRejected(f"{self._server.name} has no control channel from Atlas")
        channel, relay = found
        handoff = f"h-{next(self._ids)}"
        answers, answer = trio.open_memory_channel[wire.ObjectAck | wire.ObjectRejected | None](1)
        relay.waiting[handoff] = answers
        try:
            with answers, answer:
                try:
                    await channel.send(
                        wire.ObjectHandoff(
                            handoff=handoff, object=object_id, state=state, point=point, to_server=to_server
                        )
                    )
                except ChannelGone as exc:
                    raise HandoffRejected(str(exc)) from None
                reply: wire.ObjectAck | wire.ObjectRejected | None = None
                with trio.move_on_after(self._server.handoff_timeout) as waiting:
                    try:
                        reply = await answer.receive()
                    except trio.Cancelled:
                        if not waiting.cancel_called:
                            logger.warning(
                                "%s: hand_off of %s cancelled while Atlas decides: it may have moved",
                                self._server.name,
                                object_id,
                            )
                        raise
        finally:
            del relay.waiting[handoff]
        if waiting.cancelled_caught:
            raise HandoffRejected(f"no answer from Atlas within {self._server.handoff_timeout:g} s")
        if reply is None:
            raise HandoffRejected(f"the control channel from {channel.node} closed before Atlas answered")
        if isinstance(reply, wire.ObjectRejected):
            logger.info("%s: object %s stays here: %s", self._server.name, object_id, reply.reason)
            raise HandoffRejected(reply.reason)
        logger.info("%s: object %s handed off to %s", self._server.name, object_id, reply.to_server)
        return reply.to_server

    # -- receiving -------------------------------------------------------------------------------------

    def receive(self, channel: ControlChannel, message: wire.AtlasMessage) -> None:
        """Take one of :data:`RELAY_MESSAGES` from the channel's reader (never blocks)."""
        relay = self._channels.get(channel)
        if relay is None:
            return
        if isinstance(message, wire.ObjectAck | wire.ObjectRejected):
            waiting = relay.waiting.get(message.handoff)
            if waiting is None:
                logger.warning(
                    "%s: ignoring %s for handoff %s: nothing waits for it",
                    self._server.name,
                    type(message).__name__,
                    message.handoff,
                )
                return
            try:
                waiting.send_nowait(message)
            except trio.WouldBlock:
                logger.warning(
                    "%s: a second answer about handoff %s ignored", self._server.name, message.handoff
                )
        elif isinstance(message, wire.ObjectWithdrawn):
            self._withdraw(relay, message)
        elif isinstance(message, wire.RelayMessage | wire.RelayUndeliverable | wire.ObjectOffer):
            self._queue(relay, message)

    def _queue(self, relay: _ChannelRelay, item: _Inbound) -> None:
        try:
            relay.inbox.send_nowait(item)
        except trio.WouldBlock:
            logger.warning("%s: relay inbox full: %s dropped", self._server.name, type(item).__name__)

    def _withdraw(self, relay: _ChannelRelay, message: wire.ObjectWithdrawn) -> None:
        record = relay.offers.get(message.handoff)
        if record is None:
            logger.debug(
                "%s: withdrawn offer %s is not (or no longer) here", self._server.name, message.handoff
            )
        elif record.phase is _Phase.DECIDING:
            record.withdrawn = message.reason  # its task gives the object back if the hook takes it
        elif record.phase is _Phase.ACCEPTED:
            record.phase = _Phase.WITHDRAWN
            self._queue(relay, _GiveBack(record.offer, message.reason))

    async def serve_channel(
        self,
        channel: ControlChannel,
        *,
        task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the relay side of one control channel; hands back the scope that ends it (channel closed)."""
        inbox, messages = trio.open_memory_channel[_Inbound](_INBOX)
        relay = _ChannelRelay(inbox)
        self._channels[channel] = relay
        try:
            async with trio.open_nursery() as offers:
                with trio.CancelScope() as scope:
                    task_status.started(scope)
                    with messages:
                        async for item in messages:
                            await self._handle(channel, relay, item, offers)
                # The channel closed: the handoffs waiting on it fail; offers being decided finish (bounded).
                _fail_waiting(relay)
        finally:
            del self._channels[channel]
            _fail_waiting(relay)
            inbox.close()

    async def _handle(
        self, channel: ControlChannel, relay: _ChannelRelay, item: _Inbound, offers: trio.Nursery
    ) -> None:
        server = self._server
        if isinstance(item, wire.ObjectOffer):
            self._start_offer(channel, relay, item, offers)
        elif isinstance(item, _GiveBack):
            await _give_back(server, item.offer, item.reason)
        elif isinstance(item, wire.RelayUndeliverable):
            notice = Undeliverable(
                relay=item.relay,
                kind=item.kind,
                reason=item.reason,
                payload=item.payload,
                to_server=item.to_server,
                point=item.point,
                client=item.client,
            )
            await _call(server, "on_relay_undeliverable", server.on_relay_undeliverable(notice))
        elif item.kind == "client" and item.client is not None:
            await self._to_player(channel, item)
        else:
            message = RelayMessage(
                from_server=item.from_server, kind=item.kind, payload=item.payload, point=item.point
            )
            await _call(server, "on_relay", server.on_relay(message))

    async def _to_player(self, channel: ControlChannel, item: wire.RelayMessage) -> None:
        server = self._server
        assert item.client is not None
        player = server.players.get(item.client)
        # A player whose hand-off to another server has begun would lose what it is sent now.
        leaving = player is not None and player.handing_off and player._transfer is not None
        if player is not None and player.connected and not leaving:
            message = RelayMessage(
                from_server=item.from_server, kind="client", payload=item.payload, client=item.client
            )
            try:
                await server.on_client_relay(player, message)
                return
            except _PassBack:
                pass
            except PlayerDisconnected as exc:
                if exc.player_id != player.id:
                    return
            except Exception:
                logger.exception("%s: on_client_relay raised for player %s", server.name, player.id)
                return
        # Not (or no longer) here: back to Atlas, which forwards it to where the client is now.
        passed_on = wire.RelayClient(
            client=item.client,
            payload=item.payload,
            relay=item.relay,
            from_server=item.from_server,
            hops=item.hops + 1,
        )
        try:
            await channel.send(passed_on)
        except ChannelGone:
            logger.warning(
                "%s: a relay for client %s was lost with the control channel", server.name, item.client
            )

    # -- offers ------------------------------------------------------------------------------------------

    def _start_offer(
        self, channel: ControlChannel, relay: _ChannelRelay, message: wire.ObjectOffer, offers: trio.Nursery
    ) -> None:
        offer = ObjectOffer(
            handoff=message.handoff,
            object=message.object,
            from_server=message.from_server,
            state=message.state,
            timeout=message.timeout_ms / 1000,
            point=message.point,
        )
        deciding = sum(1 for r in relay.offers.values() if r.phase is _Phase.DECIDING)
        if message.handoff in relay.offers:
            logger.warning("%s: ignoring a repeated object.offer %s", self._server.name, message.handoff)
            return
        record = _Offer(offer)
        relay.offers[offer.handoff] = record
        if deciding >= _MAX_DECIDING:
            offers.start_soon(self._answer, channel, relay, record, "busy: too many offers being decided")
        else:
            offers.start_soon(self._decide, channel, relay, record)

    async def _decide(self, channel: ControlChannel, relay: _ChannelRelay, record: _Offer) -> None:
        server = self._server
        offer = record.offer
        taken = False
        refusal = "declined"
        with trio.move_on_after(offer.timeout) as deciding:
            try:
                taken = bool(await server.on_object_offer(offer))
            except Exception as exc:
                logger.exception("%s: on_object_offer raised", server.name)
                refusal = f"failed to take it: {type(exc).__name__}"
        if deciding.cancelled_caught:
            refusal = f"did not decide within {offer.timeout:g} s"
        if not taken:
            await self._answer(channel, relay, record, refusal)
            return
        if record.withdrawn is not None:  # Atlas gave up on the offer while the game was taking it
            record.phase = _Phase.WITHDRAWN
            await _give_back(server, offer, record.withdrawn)
            return
        record.phase = _Phase.ACCEPTED
        relay.offers.move_to_end(offer.handoff)
        sent = False
        try:
            await channel.send(wire.ObjectAccept(handoff=offer.handoff))
            sent = True
        except ChannelGone:
            pass
        finally:
            if not sent and record.phase is _Phase.ACCEPTED:
                record.phase = _Phase.WITHDRAWN
                with trio.CancelScope(shield=True):
                    await _give_back(
                        server, offer, "the accept could not be sent: the control channel closed"
                    )
            _forget(relay)
        if sent:
            logger.info("%s: took object %s from %s", server.name, offer.object, offer.from_server)

    async def _answer(
        self, channel: ControlChannel, relay: _ChannelRelay, record: _Offer, reason: str
    ) -> None:
        record.phase = _Phase.REFUSED
        relay.offers.pop(record.offer.handoff, None)
        logger.info("%s: refusing object %s: %s", self._server.name, record.offer.object, reason)
        with contextlib.suppress(ChannelGone):
            await channel.send(wire.ObjectReject(handoff=record.offer.handoff, reason=reason))


def as_point(value: Sequence[float]) -> Point:
    """``value`` as a protocol point; ValueError unless it is three finite numbers."""
    coords = tuple(float(c) for c in value)
    if len(coords) != 3 or not all(math.isfinite(c) for c in coords):
        raise ValueError(f"a point is three finite numbers [x, y, z], not {value!r}")
    return (coords[0], coords[1], coords[2])


def _fail_waiting(relay: _ChannelRelay) -> None:
    for waiting in relay.waiting.values():
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            waiting.send_nowait(None)


def _forget(relay: _ChannelRelay) -> None:
    """Keep the most recent accepted offers only (those Atlas may still withdraw)."""
    ended = [h for h, r in relay.offers.items() if r.phase is not _Phase.DECIDING]
    for handoff in ended[: max(0, len(ended) - _REMEMBERED)]:
        del relay.offers[handoff]


async def _give_back(server: GameServer, offer: ObjectOffer, reason: str) -> None:
    logger.warning(
        "%s: object %s from %s is withdrawn: %s", server.name, offer.object, offer.from_server, reason
    )
    with trio.move_on_after(_WITHDRAW_TIMEOUT) as scope:
        await _call(server, "on_object_withdrawn", server.on_object_withdrawn(offer, reason))
    if scope.cancelled_caught:
        logger.warning(
            "%s: on_object_withdrawn took over %g s and was cancelled", server.name, _WITHDRAW_TIMEOUT
        )


async def _call(server: GameServer, name: str, hook: Awaitable[None]) -> None:
    """Await a game hook; an exception is logged, not raised (one bad message must not stop the others)."""
    try:
        await hook
    except Exception:
        logger.exception("%s: %s raised", server.name, name)
