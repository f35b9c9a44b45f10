"""Example game servers (backends) to run behind Atlas: echo server, chat server, demo cluster.

The echo and chat servers here are plain WebSocket servers (trio-websocket, no control protocol): the
echo server is the Autobahn conformance backend, and both show what any backend gets from Atlas. The
demo cluster is made of SDK game servers instead (``atlas.demo.games``), whose players can move.

Theory of operation
-------------------
Each server binds its listening sockets first, outside any nursery, so that a port in use surfaces
as a plain ``OSError`` from ``nursery.start`` (not wrapped in an ``ExceptionGroup``) before anything
was started. It then runs ``trio.serve_listeners`` in a nursery it owns and reports the bound port
with ``task_status.started(port)``.

Every accepted TCP stream gets its own session nursery (``_serve_stream``): trio-websocket's
``wrap_server_stream`` starts the WebSocket reader task in it, the handshake is bounded by
``HANDSHAKE_TIMEOUT``, and the close handshake by ``CLOSE_TIMEOUT``. All errors of one client are
caught at that boundary and logged, so a misbehaving client can never take the server down. A
session ended by the server's own cancellation closes with 1001 (going away), otherwise 1000.

The chat server's rules live in :class:`ChatRoom`, a plain class with no I/O: a player joins, sends
text, leaves, and the room answers with :class:`ChatOutput` records (who gets which message). The
trio shell gives every player a bounded outbox drained by one writer task; a broadcast only ever
calls ``send_nowait`` on outboxes, so a slow player cannot block anyone else. A player whose outbox
is full, or whose socket does not take a message within ``send_timeout``, is dropped and closed
with 1008.
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

import attrs
import trio
from trio_websocket import ConnectionClosed, Endpoint, WebSocketConnection, wrap_server_stream

from atlas.demo.games import ChatGame, EchoGame

__all__ = [
    "CLOSE_TIMEOUT",
    "ECHO_SEND_TIMEOUT",
    "HANDSHAKE_TIMEOUT",
    "ChatOutput",
    "ChatRoom",
    "serve_chat_server",
    "serve_demo_cluster",
    "serve_echo_server",
]

logger = logging.getLogger("atlas.demo")

#: Seconds a client has to complete the opening handshake.
HANDSHAKE_TIMEOUT = 10.0
#: Seconds the server waits for the closing handshake (and for closing listeners) before giving up.
CLOSE_TIMEOUT = 2.0
#: On shutdown, how long to leave the connection open after sending close 1001.
_GOING_AWAY_CLOSE_TIMEOUT = 0.05
#: The echo server drops a client that does not take an echoed message within this many seconds.
ECHO_SEND_TIMEOUT = 30.0
#: Read size for the WebSocket reader; large enough that multi-megabyte messages stream quickly.
_RECEIVE_BUFFER_SIZE = 64 * 1024
#: Close code for a chat player dropped because it could not keep up (1008: policy violation).
_TOO_SLOW_CODE = 1008
# Defaults of the public functions, shared with the demo cluster.
_ECHO_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
_CHAT_MAX_MESSAGE_SIZE = 1024 * 1024
_CHAT_QUEUE_SIZE = 256
_CHAT_SEND_TIMEOUT = 5.0

_Session = Callable[[WebSocketConnection], Awaitable[None]]


# --------------------------------------------------------------------------------------------------
# Shared server shell


async def _bind(host: str, port: int) -> list[trio.SocketListener]:
    """Open the TCP listeners for ``host:port``; ``OSError`` names the address on failure."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        code = exc.errno if exc.errno is not None else errno.EIO
        raise OSError(code, f"cannot listen on {host}:{port}: {reason}") from exc


async def _close_listeners(listeners: Sequence[trio.SocketListener]) -> None:
    """Close listeners (idempotent), bounded and shielded so it also runs during cancellation."""
    with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
        for listener in listeners:
            await listener.aclose()


def _bound_port(listeners: Sequence[trio.SocketListener]) -> int:
    # With port 0 and a host that resolves to several addresses each listener may get its own
    # port; the first one is the one reported.
    port = listeners[0].socket.getsockname()[1]
    assert isinstance(port, int)
    return port


def _describe_peer(ws: WebSocketConnection) -> str:
    try:
        remote = ws.remote
    except OSError:  # getpeername() fails once the peer has reset the connection
        return "(disconnected peer)"
    if isinstance(remote, Endpoint):
        return f"{remote.address}:{remote.port}"
    return remote


async def _serve_stream(
    stream: trio.SocketStream,
    session: _Session,
    *,
    server_name: str,
    max_message_size: int,
) -> None:
    """Run one client connection: handshake, ``session(ws)``, close; never raises ``Exception``.

    This is the per-client error boundary: a disconnect, a protocol error or a bug in ``session``
    ends this client only.
    """
    try:
        async with stream, trio.open_nursery() as nursery:
            ws: WebSocketConnection | None = None
            with trio.move_on_after(HANDSHAKE_TIMEOUT):
                request = await wrap_server_stream(
                    nursery,
                    stream,
                    max_message_size=max_message_size,
                    receive_buffer_size=_RECEIVE_BUFFER_SIZE,
                )
                ws = await request.accept()
            if ws is None:
                logger.debug("%s: opening handshake timed out", server_name)
                nursery.cancel_scope.cancel()
                return
            try:
                await session(ws)
            finally:
                # Cancelled from outside means the server is shutting down: tell the client. The
                # WebSocket reader task was cancelled too, so the client's answering close frame
                # cannot be read: send ours and drop the connection soon after.
                going_away = trio.current_effective_deadline() == -math.inf
                close_timeout = _GOING_AWAY_CLOSE_TIMEOUT if going_away else CLOSE_TIMEOUT
                with trio.move_on_after(close_timeout, shield=True):
                    await ws.aclose(1001 if going_away else 1000)
                # Stops the reader task if the close handshake timed out.
                nursery.cancel_scope.cancel()
    except* ConnectionClosed:
        pass  # the peer went away: an ordinary end of a session
    except* Exception:
        logger.exception("%s: client session failed", server_name)


async def _run_server(
    listeners: list[trio.SocketListener],
    session: _Session,
    *,
    server_name: str,
    max_message_size: int,
    task_status: trio.TaskStatus[int],
) -> None:
    """Serve WebSocket sessions on already-bound ``listeners`` until cancelled."""
    try:
        port = _bound_port(listeners)
        handler = partial(
            _serve_stream,
            session=session,
            server_name=server_name,
            max_message_size=max_message_size,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handler, listeners)
            logger.info("%s listening on port %d", server_name, port)
            task_status.started(port)
    finally:
        # serve_listeners closes them too; this covers cancellation before it started.
        await _close_listeners(listeners)


# --------------------------------------------------------------------------------------------------
# Echo server


async def _echo_session(ws: WebSocketConnection, *, server_name: str) -> None:
    peer = _describe_peer(ws)
    logger.info("%s: client %s connected", server_name, peer)
    try:
        while True:
            # Waiting for the client's next message is unbounded on purpose: idle clients are fine.
            message = await ws.get_message()
            with trio.move_on_after(ECHO_SEND_TIMEOUT) as send_scope:
                await ws.send_message(message)
            if send_scope.cancelled_caught:
                logger.warning("%s: client %s too slow, dropping it", server_name, peer)
                return
    except ConnectionClosed:
        pass
    finally:
        logger.info("%s: client %s disconnected", server_name, peer)


async def serve_echo_server(
    host: str,
    port: int,
    *,
    name: str = "echo",
    max_message_size: int = _ECHO_MAX_MESSAGE_SIZE,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a WebSocket echo server on ``host:port`` until cancelled.

    Every message is sent back as it came: text as text, binary as binary, in order. Close codes
    and reasons sent by a client are echoed in the closing handshake, and messages up to
    ``max_message_size`` bytes are accepted (bigger ones are refused with close code 1009), which
    makes it a suitable backend for the Autobahn conformance suite.

    Supports ``nursery.start``: ``port = await nursery.start(serve_echo_server, "127.0.0.1", 0)``
    hands back the bound port once the server accepts connections.

    :raises OSError: if the address cannot be bound (for example the port is in use), before
        ``task_status.started`` is called.
    """
    listeners = await _bind(host, port)
    await _run_server(
        listeners,
        partial(_echo_session, server_name=name),
        server_name=name,
        max_message_size=max_message_size,
        task_status=task_status,
    )


# --------------------------------------------------------------------------------------------------
# Chat server: sans-IO rules


@attrs.frozen
class ChatOutput:
    """One message the room wants sent, and the players (by name) who should receive it."""

    recipients: tuple[str, ...]
    message: str


@attrs.define
class ChatRoom:
    """The rules of the chat game server, without I/O.

    Players are named ``player-<n>``, numbered from 1 in joining order and never reused. Text from
    a player is broadcast to every player (the sender included) as ``[<room>] player-<n>: <text>``;
    the commands ``/who`` and ``/server`` are answered to the sender only.
    """

    name: str
    _players: list[str] = attrs.field(factory=list, init=False)
    _joined: int = attrs.field(default=0, init=False)

    @property
    def players(self) -> tuple[str, ...]:
        """The players in the room, in joining order."""
        return tuple(self._players)

    def join(self) -> tuple[str, ChatOutput]:
        """Add a new player; returns its name and the welcome message for it."""
        self._joined += 1
        player = f"player-{self._joined}"
        self._players.append(player)
        return player, ChatOutput((player,), f"welcome to {self.name}, you are {player}")

    def leave(self, player: str) -> bool:
        """Remove ``player``; returns False if it was not in the room (leaving twice is fine)."""
        if player not in self._players:
            return False
        self._players.remove(player)
        return True

    def receive_text(self, player: str, text: str) -> ChatOutput:
        """Handle text from ``player``; text from a player not in the room goes nowhere."""
        if player not in self._players:
            return ChatOutput((), "")
        command = text.strip()
        if command == "/who":
            return ChatOutput((player,), f"players on {self.name}: {', '.join(self._players)}")
        if command == "/server":
            return ChatOutput((player,), self.name)
        return ChatOutput(tuple(self._players), f"[{self.name}] {player}: {text}")


# --------------------------------------------------------------------------------------------------
# Chat server: trio shell


@attrs.define
class _Seat:
    """A connected player's outbox and the cancel scope of its session."""

    outbox: trio.MemorySendChannel[str | bytes]
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    dropped: bool = False


@attrs.define
class _ChatServer:
    """Connects WebSocket sessions to a :class:`ChatRoom`; owns no tasks."""

    room: ChatRoom
    queue_size: int
    send_timeout: float
    _seats: dict[str, _Seat] = attrs.field(factory=dict, init=False)

    async def session(self, ws: WebSocketConnection) -> None:
        """Run one player: a reader (this task) and a writer draining its outbox."""
        outbox, inbox = trio.open_memory_channel[str | bytes](self.queue_size)
        player, welcome = self.room.join()
        seat = _Seat(outbox)
        self._seats[player] = seat
        logger.info("%s: %s connected from %s", self.room.name, player, _describe_peer(ws))
        try:
            with outbox, inbox, seat.scope:
                self._deliver(welcome)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write, ws, player, inbox, nursery.cancel_scope)
                    await self._read(ws, player)
                    nursery.cancel_scope.cancel()
            if seat.dropped:
                # If a send was cut off by the drop, this close frame follows a partial frame and
                # the client sees a protocol error instead; either way it is disconnected.
                with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                    await ws.aclose(_TOO_SLOW_CODE, "too slow")
        finally:
            self._seats.pop(player, None)
            self.room.leave(player)
            logger.info("%s: %s disconnected", self.room.name, player)

    async def _read(self, ws: WebSocketConnection, player: str) -> None:
        try:
            while True:
                message = await ws.get_message()
                if isinstance(message, bytes):
                    self._send_to(player, message)
                else:
                    self._deliver(self.room.receive_text(player, message))
        except ConnectionClosed:
            pass

    async def _write(
        self,
        ws: WebSocketConnection,
        player: str,
        inbox: trio.MemoryReceiveChannel[str | bytes],
        session_scope: trio.CancelScope,
    ) -> None:
        try:
            async for message in inbox:
                with trio.move_on_after(self.send_timeout) as send_scope:
                    await ws.send_message(message)
                if send_scope.cancelled_caught:
                    self._drop(player, f"a send took over {self.send_timeout:g}s")
                    return
        except ConnectionClosed:
            pass
        finally:
            session_scope.cancel()

    def _deliver(self, output: ChatOutput) -> None:
        for player in output.recipients:
            self._send_to(player, output.message)

    def _send_to(self, player: str, message: str | bytes) -> None:
        seat = self._seats.get(player)
        if seat is None:
            return
        try:
            seat.outbox.send_nowait(message)
        except trio.WouldBlock:
            self._drop(player, f"outbox full ({self.queue_size} messages)")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the session is ending

    def _drop(self, player: str, why: str) -> None:
        """Remove a player that cannot keep up and cancel its session; it is closed with 1008."""
        seat = self._seats.pop(player, None)
        if seat is None:
            return
        seat.dropped = True
        self.room.leave(player)
        logger.warning("%s: dropping %s, too slow: %s", self.room.name, player, why)
        seat.scope.cancel()


async def serve_chat_server(
    host: str,
    port: int,
    *,
    name: str,
    queue_size: int = _CHAT_QUEUE_SIZE,
    send_timeout: float = _CHAT_SEND_TIMEOUT,
    max_message_size: int = _CHAT_MAX_MESSAGE_SIZE,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a tiny chat game server called ``name`` on ``host:port`` until cancelled.

    On connect a player gets ``welcome to <name>, you are player-<n>``. Each text message is
    broadcast to every player of this server (the sender included) as
    ``[<name>] player-<n>: <text>``; ``/who`` answers the sender with the players on this server,
    ``/server`` with the server's name; binary messages are echoed to the sender. See
    :class:`ChatRoom` for the rules.

    Each player has an outbox of ``queue_size`` messages; a player whose outbox overflows, or whose
    connection does not take a message within ``send_timeout`` seconds, is dropped (close code
    1008) so it cannot hold up the others. Connects and disconnects are logged at INFO on the
    ``atlas.demo`` logger.

    Supports ``nursery.start``, handing back the bound port (``port=0`` picks a free one).

    :raises OSError: if the address cannot be bound, before ``task_status.started`` is called.
    """
    listeners = await _bind(host, port)
    server = _ChatServer(ChatRoom(name), queue_size=queue_size, send_timeout=send_timeout)
    await _run_server(
        listeners,
        server.session,
        server_name=name,
        max_message_size=max_message_size,
        task_status=task_status,
    )


# --------------------------------------------------------------------------------------------------
# Demo cluster


async def serve_demo_cluster(
    host: str = "127.0.0.1",
    ports: Sequence[int] = (8080, 8081, 8082),
    *,
    task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a demo cluster of SDK game servers until cancelled, all in one nursery this task owns.

    ``game-server-1`` is an echo game (:class:`~atlas.demo.games.EchoGame`) on ``ports[0]``;
    ``game-server-2``, ``game-server-3``, ... are chat rooms (:class:`~atlas.demo.games.ChatGame`) on
    the remaining ports. Each serves its control endpoint on ``/atlas/control`` on its own port (Atlas's
    ``control_url``), and every player can ``/move <server>`` and keeps its nickname and message count
    when it moves (see :mod:`atlas.demo.rules`). Supports ``nursery.start``, handing back the list of
    bound ports (in the order of ``ports``) once every server accepts connections.

    :raises OSError: promptly, and before anything is served, if any port cannot be bound; the
        ports already bound are released.
    :raises ValueError: if ``ports`` is empty.
    """
    if not ports:
        raise ValueError("the demo cluster needs at least one port")
    bound: list[list[trio.SocketListener]] = []
    try:
        for port in ports:
            bound.append(await _bind(host, port))
        async with trio.open_nursery() as nursery:
            bound_ports: list[int] = []
            for index, listeners in enumerate(bound):
                name = f"game-server-{index + 1}"
                game = EchoGame(name) if index == 0 else ChatGame(name, send_timeout=_CHAT_SEND_TIMEOUT)
                bound_ports.append(await nursery.start(game.serve_listeners, listeners))
            task_status.started(bound_ports)
    finally:
        for listeners in bound:
            await _close_listeners(listeners)
