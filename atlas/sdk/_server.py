"""The :class:`GameServer` base class: the hooks a game overrides, and serving (one port for everything)."""

from __future__ import annotations

import logging
import types
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs
import trio

from atlas.control import messages as wire
from atlas.control.messages import Reason
from atlas.sdk._channel import ControlChannel
from atlas.sdk._control import serve_control
from atlas.sdk._handoff import TransferInfo
from atlas.sdk._links import serve_link
from atlas.sdk._player import Player, PlayerDisconnected
from atlas.sdk._relay import ObjectOffer, Relay, RelayMessage, Undeliverable, as_point, deliver_to_player
from atlas.sdk._requests import request_transfer
from atlas.sdk._transfers import Transfers
from atlas.sdk._transport import accept, open_listeners, serve_requests
from atlas.sdk._websocket import Handshake

__all__ = ["GameServer", "GameServerStatistics"]

logger = logging.getLogger("atlas.sdk")

_DEFAULT_MAX_MESSAGE_SIZE: Final = 1024 * 1024


@attrs.frozen
class GameServerStatistics:
    """A snapshot of a :class:`GameServer` (see :meth:`GameServer.statistics`)."""

    players: int
    """Players installed now."""
    control_channels: int
    """Control channels from Atlas open now."""
    transfers_in_progress: int
    """Transfers under way on this server, as source or target."""
    transfers_completed: int
    """Players handed to another server (this server the source) since it started."""
    transfers_committed: int
    """Players taken from another server (this server the target) since it started."""
    transfers_aborted: int
    """Transfers rolled back, on either side, since the server started."""


class GameServer:
    """The base of a game server that speaks Atlas's control protocol (docs/sdk.md has a tutorial).

    Subclass it and override the hooks (``on_connect``, ``on_message``, ``on_disconnect`` and, for
    transfers, ``on_transfer_prepare``, ``on_transfer_out``, ``on_transfer_in``, ``on_transfer_aborted``,
    ``on_transfer_in_aborted``; for cross-server traffic, ``on_relay``, ``on_client_relay``,
    ``on_relay_undeliverable``, ``on_object_offer``, ``on_object_withdrawn``); then
    ``await nursery.start(server.serve)``.

    One port serves both kinds of WebSocket Atlas opens: the *control channel* on ``control_path``
    (configure Atlas's ``control_url`` as ``ws://host:port/atlas/control``) and *data links*, one per
    client, on any other path. Each player's messages reach ``on_message`` one at a time, in order.

    :param name: this server's name, sent in ``welcome`` (use the name Atlas's configuration gives it).
    :param host: the address to listen on.
    :param port: the port to listen on; 0 picks a free one (``serve`` reports it).
    :param control_path: the path of the control endpoint.
    :param capacity: players this server takes; reported in ``load``, and an incoming transfer is
        refused when it is reached.
    :param load_interval: seconds between ``load`` reports on each control channel.
    :param handoff_timeout: seconds this server waits for Atlas's next step of a transfer (between the
        steps Atlas times itself) before rolling the transfer back on its own.
    :param send_timeout: seconds a player's outbox may stay full, or one message may take to go out,
        before the player is dropped as too slow.
    :param outbox_size: messages buffered per player between :meth:`Player.send` and the socket.
    :param max_message_size: the largest message accepted from a client or from Atlas (bytes or
        characters); bigger ones close the link with 1009.
    """

    def __init__(
        self,
        name: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        control_path: str = "/atlas/control",
        capacity: int = 1000,
        load_interval: float = 5.0,
        handoff_timeout: float = 30.0,
        send_timeout: float = 10.0,
        outbox_size: int = 256,
        max_message_size: int = _DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        if not name:
            raise ValueError("a game server needs a name")
        if not control_path.startswith("/"):
            raise ValueError(f"control_path must start with '/': {control_path!r}")
        if capacity < 0:
            raise ValueError(f"capacity must be 0 or more, not {capacity}")
        for what, value in (
            ("load_interval", load_interval),
            ("handoff_timeout", handoff_timeout),
            ("send_timeout", send_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{what} must be positive, not {value}")
        if outbox_size < 1 or max_message_size < 1:
            raise ValueError("outbox_size and max_message_size must be positive")
        self.name = name
        self.host = host
        self.port = port
        self.control_path = control_path
        self.capacity = capacity
        self.load_interval = load_interval
        self.handoff_timeout = handoff_timeout
        self.send_timeout = send_timeout
        self.outbox_size = outbox_size
        self.max_message_size = max_message_size
        self.tick_ms: float = 0.0
        """The game loop's current tick time in milliseconds, reported in ``load`` (the game sets it)."""
        self.accepting: bool = True
        """Whether this server takes new players; reported in ``load``, and when False an incoming
        transfer is refused (the game sets it, for example to drain)."""
        self._players: dict[str, Player] = {}
        self._players_view: Mapping[str, Player] = types.MappingProxyType(self._players)
        self._transfers = Transfers()
        self._channels: set[ControlChannel] = set()
        self._relay = Relay(self)

    # -- hooks -----------------------------------------------------------------------------------------

    async def on_connect(self, player: Player) -> None:
        """A new player connected (a plain data link). It is in :attr:`players` already.

        Not called for a player that arrives by transfer (see :meth:`on_transfer_in`). If this raises,
        the player is disconnected (close 1011) and :meth:`on_disconnect` is called with ``"error"``.
        """

    async def on_message(self, player: Player, message: str | bytes) -> None:
        """A message from ``player`` (``str`` for a text frame, ``bytes`` for binary).

        A player's messages come one at a time, in order: the next one waits until this returns, and
        :attr:`Player.received` counts those that returned. If this raises, the player is disconnected
        (close 1011, ``on_disconnect`` with ``"error"``), except for a :class:`PlayerDisconnected`
        about another player, which is ignored.
        """

    async def on_disconnect(self, player: Player, reason: str) -> None:
        """``player`` left; it is no longer in :attr:`players` and cannot be sent to.

        Called exactly once for every player that :meth:`on_connect` or :meth:`on_transfer_in` was
        called for. ``reason``: ``"closed"`` (the client or Atlas closed the link), ``"transferred"``
        (it moved to another server), ``"kicked"`` (:meth:`Player.close`), ``"too_slow"``,
        ``"error"`` (a hook raised), ``"shutdown"`` (the server is stopping) or ``"transfer_aborted"``
        (it was arriving by transfer, :meth:`on_transfer_in` ran, and the transfer was rolled back).
        Bounded to 5 s; it runs even while the server shuts down.
        """

    async def on_transfer_prepare(self, info: TransferInfo) -> bool:
        """A transfer involving this server is announced; return False to refuse it.

        ``info.direction`` is ``"in"`` on the target (``transfer.prepare``: the answer is
        ``transfer.ready`` or ``transfer.reject``) and ``"out"`` on the source (``transfer.notice``,
        with ``info.player``; refusing sends ``transfer.reject`` and the transfer is rolled back). Must
        answer within ``info.timeout`` seconds, or the transfer is refused. The default accepts.
        """
        return True

    async def on_transfer_out(self, player: Player) -> Any:
        """Snapshot ``player`` for the target server; return its state (anything JSON can encode).

        Called on the source once every message Atlas delivered has been processed and the player's
        sends are held (sends from now on are queued: dropped if the player leaves, flushed if the
        transfer is aborted). Keep the player until :meth:`on_disconnect` (``"transferred"``) or
        :meth:`on_transfer_aborted`. The default returns ``player.data``.
        """
        return player.data

    async def on_transfer_in(self, player: Player, state: Any) -> None:
        """Install ``player`` arriving from another server, with the ``state`` its source returned.

        ``player`` is in :attr:`players` already; its messages and sends start flowing once this returns
        (sends made in here are queued until then). If this raises or runs past the commit deadline,
        the transfer is aborted and :meth:`on_disconnect` is called with ``"transfer_aborted"``. The
        default updates ``player.data`` with ``state`` when it is a dict.
        """
        if isinstance(state, dict):
            player.data.update(state)

    async def on_transfer_aborted(self, player: Player) -> None:
        """On the source: a transfer of ``player`` that :meth:`on_transfer_prepare` agreed to was rolled back.

        The player stays here as if nothing happened; its queued sends have been sent, in order.
        Bounded to 5 s. The default does nothing.
        """

    async def on_transfer_in_aborted(self, info: TransferInfo, reason: str) -> None:
        """On the target: a transfer that :meth:`on_transfer_prepare` agreed to was rolled back.

        Release whatever was reserved for the player. Bounded to 5 s. The default does nothing.
        """

    # -- hooks: cross-server traffic (docs/sdk.md section 9) ---------------------------------------------

    async def on_relay(self, message: RelayMessage) -> None:
        """A message from another server, addressed to this one by name or as the owner of a region.

        ``message.kind`` is ``"server"`` (:meth:`send_to_server`) or ``"region"`` (:meth:`send_to_region`,
        with ``message.point``); ``message.payload`` is what the sender sent (decoded JSON). Relayed
        messages are handled one at a time, in the order they arrive (what one server sends this one
        arrives in the order it sent it). If this raises, the exception is logged. The default ignores it.
        """

    async def on_client_relay(self, player: Player, message: RelayMessage) -> None:
        """A message from another server for ``player``, one of this server's players (``kind="client"``).

        Called in the same order as :meth:`on_relay`, only while ``player`` is here and not being handed
        off (a message for a player that has left, or is leaving, goes back to Atlas, which forwards it to
        the player's new server). The default sends ``message.payload`` to the player: a string as it is,
        anything else as JSON text; if the player's hand-off begins meanwhile, the message goes on to the
        player's next server instead (a send of your own would be dropped with the hand-off, as any send
        to a leaving player: call ``super().on_client_relay`` to get this).
        """
        await deliver_to_player(player, message)

    async def on_relay_undeliverable(self, notice: Undeliverable) -> None:
        """A message this server relayed reached nobody; ``notice.reason`` says why.

        ``notice.relay`` is the id the ``send_to_*`` call returned; its address and ``payload`` come
        back too. The default logs it.
        """
        logger.warning(
            "%s: relay %s (%s) undeliverable: %s", self.name, notice.relay, notice.kind, notice.reason
        )

    async def on_object_offer(self, offer: ObjectOffer) -> bool:
        """Another server hands this one an object: take it (return True) or refuse (return False).

        Returning True makes ``offer.object``, with ``offer.state``, this server's from then on: install
        it before returning. Atlas then tells the source, which drops it. Must answer within
        ``offer.timeout`` seconds (else it is cancelled and the offer refused); if it raises, the offer is
        refused. Offers are decided concurrently, each in a task of its own. The default refuses.
        """
        return False

    async def on_object_withdrawn(self, offer: ObjectOffer, reason: str) -> None:
        """An object this server took (:meth:`on_object_offer` returned True) did not move after all.

        Rare: Atlas gave up on the offer before the acceptance reached it (it came too late, or the
        source's or this server's control channel closed meanwhile), so the source keeps the object.
        Remove it here. Bounded to 5 s. The default logs a warning only.
        """

    # -- serving ---------------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve data links and the control endpoint on ``host:port`` until cancelled.

        Supports ``nursery.start``: ``port = await nursery.start(server.serve)`` returns the bound port
        once the server accepts connections. Every task it runs is in a nursery it owns; one client's
        or one channel's failure is logged and ends that connection only.

        :raises OSError: the address cannot be bound (before ``task_status.started``).
        """
        listeners = await open_listeners(self.host, self.port)
        await self.serve_listeners(listeners, task_status=task_status)

    async def serve_listeners(
        self,
        listeners: Sequence[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Like :meth:`serve`, on listeners already bound (``host`` and ``port`` are then unused).

        For a caller that binds several servers' ports before starting any, so that a port in use
        fails before anything runs (``atlas.demo.serve_demo_cluster`` does). Reports the first
        listener's port; closes the listeners when it ends.
        """
        await serve_requests(
            listeners,
            self._route,
            name=self.name,
            max_message_size=self.max_message_size,
            task_status=task_status,
        )

    async def _route(self, request: Handshake) -> None:
        if urllib.parse.urlsplit(request.path).path == self.control_path:
            ws = await accept(request)
            if ws is not None:
                await serve_control(self, ws)
        else:
            await serve_link(self, request)

    # -- players ---------------------------------------------------------------------------------------

    @property
    def players(self) -> Mapping[str, Player]:
        """The players on this server by client id (a read-only live view)."""
        return self._players_view

    async def send_to(self, player_id: str, message: str | bytes) -> bool:
        """Send ``message`` to the player ``player_id``; False if no such player is here (or it left)."""
        player = self._players.get(player_id)
        if player is None:
            return False
        try:
            await player.send(message)
        except PlayerDisconnected:
            return False
        return True

    async def broadcast(self, message: str | bytes, *, exclude: Player | None = None) -> int:
        """Send ``message`` to every player (but ``exclude``); returns how many it went to."""
        reached = 0
        for player in list(self._players.values()):
            if player is exclude:
                continue
            try:
                await player.send(message)
            except PlayerDisconnected:
                continue
            reached += 1
        return reached

    async def request_transfer(
        self,
        player: Player,
        target: str,
        reason: Reason = "client_request",
    ) -> str:
        """Ask Atlas to move ``player`` to the server named ``target``; returns the transfer id.

        Sends ``transfer.request`` on the control channel and waits for the answer, at most 10 s
        (cancel the call to give up sooner). Returning means the transfer has *started*: it then runs as
        any transfer does, with this server as its source (:meth:`on_transfer_prepare`,
        :meth:`on_transfer_out`, then :meth:`on_disconnect` with ``"transferred"``, or
        :meth:`on_transfer_aborted` if it is rolled back). Safe to call from :meth:`on_message`: the
        transfer's cut waits for that call to return, so what the game sends the player before
        returning still reaches it from here. Do not wait for the transfer to finish inside
        :meth:`on_message`: it cannot finish before that returns.

        :param reason: one of the protocol's reasons (``"client_request"`` unless the game knows better).
        :raises TransferRequestRefused: Atlas refused (with its reason), no control channel is up,
            ``player`` is not on this server, or no answer came in time.
        :raises ValueError: ``reason`` is not one of the protocol's reasons.
        """
        return await request_transfer(self, player, target, reason)

    # -- cross-server traffic ----------------------------------------------------------------------------

    async def send_to_server(self, server: str, payload: Any) -> str:
        """Send ``payload`` (any JSON value) to the server named ``server``, through Atlas.

        Returns at once with the message's relay id; the target gets it in :meth:`on_relay` (kind
        ``"server"``), after anything this server relayed to it before. If it reaches nobody (no such
        server, its control channel is down), :meth:`on_relay_undeliverable` is called with that id.

        :raises RelayUnavailable: no control channel from Atlas is up.
        :raises TypeError: ``payload`` cannot be encoded as JSON.
        """
        return await self._relay.send(wire.RelaySend, to_server=server, payload=payload)

    async def send_to_region(self, point: Sequence[float], payload: Any) -> str:
        """Send ``payload`` to the server that owns the region holding ``point`` (``[x, y, z]``).

        Atlas looks the owner up on its world map (docs/world.md); it gets the message in
        :meth:`on_relay` with kind ``"region"`` and the point. That may be this server. Otherwise as
        :meth:`send_to_server` (undeliverable when no region holds the point).

        :raises ValueError: ``point`` is not three finite numbers.
        """
        return await self._relay.send(wire.RelayRegion, point=as_point(point), payload=payload)

    async def send_to_client(self, client: str, payload: Any) -> str:
        """Send ``payload`` to the player ``client`` (a client id), on whichever server it is now.

        The server that has the client gets it in :meth:`on_client_relay` (by default, sent to the
        player). A client that is being transferred gets it from its new server once the transfer has
        ended (or from this one, if it was rolled back). Otherwise as :meth:`send_to_server`
        (undeliverable when there is no such client).
        """
        return await self._relay.send(wire.RelayClient, client=client, payload=payload)

    async def hand_off(
        self,
        object_id: str,
        state: Any,
        *,
        to_point: Sequence[float] | None = None,
        to_server: str | None = None,
    ) -> str:
        """Hand the object ``object_id`` and its ``state`` to the owner of ``to_point``, or to ``to_server``.

        Waits until the target has taken it (its :meth:`on_object_offer` returned True) and returns the
        target's name: the object is no longer this server's, drop it now. Until this returns, the
        object is still this server's: keep simulating it. Atlas bounds the target's answer with its
        ``[transfer] timeout``; this call waits at most ``handoff_timeout`` seconds (keep that the
        larger). Cancelling the call while Atlas decides leaves the outcome unknown: do not.

        :raises HandoffRejected: the object did not move and is still this server's (the target
            refused or did not answer in time, no region holds the point, the point is this server's own,
            no such server, no control channel is up, ...); ``reason`` says why.
        :raises ValueError: not exactly one of ``to_point`` and ``to_server``, or a bad point.
        :raises TypeError: ``state`` cannot be encoded as JSON.
        """
        return await self._relay.hand_off(object_id, state, to_point=to_point, to_server=to_server)

    def statistics(self) -> GameServerStatistics:
        """A snapshot of this server's counters."""
        transfers = self._transfers
        return GameServerStatistics(
            players=len(self._players),
            control_channels=len(self._channels),
            transfers_in_progress=len(transfers.outgoing) + len(transfers.incoming),
            transfers_completed=transfers.completed,
            transfers_committed=transfers.committed,
            transfers_aborted=transfers.aborted,
        )

    # -- used by the SDK's modules ---------------------------------------------------------------------

    def _install(self, player: Player) -> None:
        self._players[player.id] = player
        player._installed = True

    def _uninstall(self, player: Player) -> None:
        if self._players.get(player.id) is player:
            del self._players[player.id]

    def _why_not_admit(self, client: str) -> str | None:
        """Why an incoming transfer of ``client`` is refused, or None."""
        if not self.accepting:
            return f"{self.name} is not accepting players"
        if len(self._players) >= self.capacity:
            return f"{self.name} is full ({len(self._players)}/{self.capacity} players)"
        if self._has_connected(client):
            return f"client {client} is already connected to {self.name}"
        return None

    def _has_connected(self, client: str) -> bool:
        """Whether a player of ``client`` is here and not leaving (one that is leaving may be replaced)."""
        player = self._players.get(client)
        return player is not None and player.connected
