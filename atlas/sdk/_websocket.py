"""The server side of RFC 6455 that the SDK serves with: wsproto for the protocol, trio for the socket.

Why not trio-websocket (which the SDK used before): it runs a reader task per connection that hands
each message to the caller through a memory channel, and it serializes sends with a lock, so a message in
and its answer out cost a game server about eight trio scheduling passes, ~150 us of CPU per message
answered. A game server behind Atlas sees every player's every message (4,000 a second for 200 players
at 20 Hz), and a process that spends its time switching tasks also answers Atlas's transfer steps late.

Theory of operation
-------------------
:func:`read_handshake` reads the client's opening handshake on an accepted stream and returns a
:class:`Handshake`, which the server accepts (:meth:`Handshake.accept` returns a :class:`WebSocket`) or
rejects with an HTTP status. A :class:`WebSocket` has no task of its own:

* **Reading** is done by whoever calls :meth:`WebSocket.get_message` (a player's link session, the
  control channel's reader): when no whole message is buffered it reads the socket once and feeds
  wsproto. A Ping gets its Pong as it is read. The peer's Close is answered once the messages that came
  before it have been taken (so that they may still be answered, as RFC 6455 allows); the next call
  then raises :class:`WebSocketClosed` with the peer's code and reason. Exactly one task reads at a time.
* **Writing** never waits for the socket in the caller. :meth:`WebSocket.send_nowait` encodes the message
  at once and, when nothing is queued before it, writes it straight to the non-blocking socket (one
  system call, no task switch: the common case). Whatever the kernel does not take is queued, in order,
  for the connection's writer task, :meth:`WebSocket.serve_writes`, which its owner runs beside the
  reader and which bounds each write with a timeout. The queue is bounded in messages:
  :meth:`send_nowait` raises :class:`trio.WouldBlock` when it is full and :meth:`send_message` waits for
  room (the caller bounds the wait).
* **Closing** (:meth:`WebSocket.aclose`, once the writer has stopped): whatever is still queued goes
  first, then the Close frame; then the peer's answering Close is awaited (reading and dropping what
  comes before it) and the TCP connection is closed. A write cut off half way (the writer was cancelled
  or timed out) leaves the stream unusable: it is closed without a Close frame.

No compression extension is offered or accepted (docs/protocol.md, transport).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import os
import struct
import sys
from typing import Final

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

__all__ = ["Handshake", "WebSocket", "WebSocketClosed", "WriterEnd", "read_handshake"]

#: Bytes asked for in one read.
RECEIVE_SIZE: Final = 64 * 1024
#: The largest opening handshake accepted (request line and headers), in bytes.
MAX_HANDSHAKE_SIZE: Final = 64 * 1024
#: Close code when no Close frame came (RFC 6455, 7.1.5); never sent.
ABNORMAL: Final = 1006
MESSAGE_TOO_BIG: Final = 1009

# Writing straight to the socket's file descriptor (the fast path) needs write(2) on sockets.
_DIRECT_WRITES: Final = sys.platform != "win32"


class WebSocketClosed(Exception):
    """The WebSocket is closed (or closing): nothing more can be read, or sent.

    ``code`` and ``reason`` are those of the peer's Close frame when the peer closed first, of this
    side's Close when this side closed first, and 1006 (``reason`` says why) when the connection ended
    without a Close frame.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"WebSocket closed: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class WriterEnd(enum.Enum):
    """Why :meth:`WebSocket.serve_writes` returned."""

    FINISHED = "finished"
    """:meth:`WebSocket.finish` was called and everything queued before it is written."""
    TOO_SLOW = "too_slow"
    """One write took longer than the writer's timeout (the peer does not read)."""
    BROKEN = "broken"
    """The connection broke under a write (or was closed)."""


class Handshake:
    """A client's opening handshake, read and valid, waiting for :meth:`accept` or :meth:`reject`."""

    def __init__(
        self, stream: trio.abc.Stream, connection: WSConnection, request: Request, max_message_size: int
    ) -> None:
        self._stream = stream
        self._connection = connection
        self._max_message_size = max_message_size
        self.path: str = request.target
        """The request target (path and query)."""
        self.headers: list[tuple[bytes, bytes]] = list(request.extra_headers)
        """The request's headers as sent (but ``Host``, ``Sec-WebSocket-Protocol`` and
        ``Sec-WebSocket-Extensions``), names lower-cased."""

    async def accept(self) -> WebSocket:
        """Answer 101 (no subprotocol, no extension); the :class:`WebSocket` is then open.

        :raises WebSocketClosed: the peer went away before it could be answered.
        """
        data = self._connection.send(AcceptConnection())
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise WebSocketClosed(ABNORMAL, "the connection broke during the handshake") from None
        connection = self._connection.connection
        assert connection is not None  # wsproto made it when it accepted
        return WebSocket(self._stream, connection, max_message_size=self._max_message_size)

    async def reject(self, status: int, body: bytes, content_type: bytes = b"text/plain") -> None:
        """Answer with an HTTP error ``status`` and ``body`` (the connection is then done)."""
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
        data = self._connection.send(RejectConnection(status_code=status, headers=headers, has_body=True))
        data += self._connection.send(RejectData(data=body, body_finished=True))
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._stream.send_all(data)


async def read_handshake(stream: trio.abc.Stream, *, max_message_size: int) -> Handshake | None:
    """Read an opening handshake from ``stream`` (the caller bounds the time).

    Returns None when the peer went away first, or sent something that is not a WebSocket handshake
    (it is then answered with an HTTP error, as wsproto advises).
    """
    connection = WSConnection(ConnectionType.SERVER)
    size = 0
    while True:
        try:
            data = await stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        size += len(data)
        if not data:
            return None
        try:
            connection.receive_data(bytes(data))
            for event in connection.events():
                if isinstance(event, Request):
                    return Handshake(stream, connection, event, max_message_size)
        except RemoteProtocolError as exc:
            hint = exc.event_hint
            if isinstance(hint, RejectConnection):
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError
                ):
                    await stream.send_all(connection.send(hint))
            return None
        if size > MAX_HANDSHAKE_SIZE:
            return None


def _data_frame(message: str | bytes) -> bytes:
    """One unfragmented server frame (unmasked) carrying ``message``.

    Encoded here rather than by wsproto, which would refuse once the peer's Close has been read: until
    that Close is answered, this side may still finish sending (RFC 6455 5.5.1). (And it is cheaper.)
    """
    if isinstance(message, str):
        first, payload = 0x81, message.encode()
    else:
        first, payload = 0x82, message
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


class WebSocket:
    """An open server-side WebSocket (see the module docstring for who reads, who writes, and when).

    ``connection`` is wsproto's, past the handshake (:meth:`Handshake.accept` makes both). On a plain
    socket, writes go straight to it when they can; on any other stream, through the writer task.

    :param queue_size: messages that may wait for the writer task before :meth:`send_nowait` raises
        :class:`trio.WouldBlock`.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        connection: Connection,
        *,
        max_message_size: int,
        queue_size: int = 1024,
    ) -> None:
        self._stream = stream
        self._connection = connection
        self._max_message_size = max_message_size
        self.queue_size = queue_size
        fd = -1
        if _DIRECT_WRITES and type(stream) is trio.SocketStream:
            fd = stream.socket.fileno()
        self._fd = fd if fd >= 0 else None
        # Reading.
        self._messages: collections.deque[str | bytes] = collections.deque()
        self._parts: list[str | bytes] = []
        self._part_size = 0
        self._closed: tuple[int, str] | None = None
        self._fault: tuple[int, str] | None = None  # a protocol error read, to close with
        self._peer_close: CloseConnection | None = None  # the peer's Close, read but not answered yet
        # Writing: frames not yet handed to the kernel, in order (the first may be the rest of a frame).
        self._queue: collections.deque[bytes] = collections.deque()
        self._writing = False
        self._dirty = False
        self._finishing = False
        self._wake_writer = trio.Event()
        self._room = trio.Event()
        self._stream_closed = False

    @property
    def close_reason(self) -> tuple[int, str] | None:
        """The code and reason the WebSocket closed (or is closing) with; None while it is open."""
        return self._closed

    def _closed_error(self) -> WebSocketClosed:
        assert self._closed is not None
        return WebSocketClosed(*self._closed)

    # -- reading ---------------------------------------------------------------------------------------

    async def get_message(self) -> str | bytes:
        """The next message (``str`` for text, ``bytes`` for binary), reading the socket if need be.

        :raises WebSocketClosed: the peer closed (its code and reason), or this side did, or the
            connection ended without a Close (1006).
        """
        while True:
            if self._messages:
                return self._messages.popleft()
            if self._peer_close is not None and self._closed is None:
                self._set_closed(self._peer_close.code, self._peer_close.reason or "")
                self._write_control(self._peer_close.response())  # the answering Close
            if self._fault is not None and self._closed is None:
                self._set_closed(*self._fault)
                self._write_control(CloseConnection(code=self._fault[0], reason=self._fault[1]))
            if self._closed is not None:
                raise self._closed_error()
            try:
                data = await self._stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self._set_closed(ABNORMAL, "the connection was lost")
                self._connection.receive_data(None)
                continue
            self._feed(data)

    def _feed(self, data: bytes | bytearray) -> None:
        """Feed bytes read from the socket to wsproto and act on its events."""
        connection = self._connection  # open: get_message feeds only until the peer's Close or a fault
        connection.receive_data(data if isinstance(data, bytes) else bytes(data))
        for event in connection.events():
            if isinstance(event, TextMessage | BytesMessage):
                self._part_size += len(event.data)
                if self._part_size > self._max_message_size:
                    self._fail(MESSAGE_TOO_BIG, f"message larger than {self._max_message_size}")
                    return
                data_part = event.data if isinstance(event, TextMessage) else bytes(event.data)
                if event.message_finished:
                    if not self._parts:
                        message = data_part
                    elif isinstance(data_part, str):
                        message = "".join([*self._parts, data_part])  # type: ignore[list-item]
                    else:
                        message = b"".join([*self._parts, data_part])  # type: ignore[list-item]
                    self._parts.clear()
                    self._part_size = 0
                    if self._closed is None:
                        self._messages.append(message)
                else:
                    self._parts.append(data_part)
            elif isinstance(event, Ping):
                self._write_control(event.response())
            elif isinstance(event, CloseConnection):
                if connection.state is ConnectionState.REMOTE_CLOSING:
                    # Answered once the messages before it are consumed (RFC 6455 5.5.1 lets an
                    # endpoint finish what it is sending first), so that they can still be answered.
                    self._peer_close = event
                    return
                else:
                    # wsproto could not parse what came (code 1002, 1007, ...) and left the state
                    # open: close with that code.
                    self._fail(event.code, event.reason or "protocol error")
                    return

    def _fail(self, code: int, reason: str) -> None:
        """The peer broke the protocol (or a limit): read no further, and close with ``code``.

        Whole messages that came before the fault are still returned by :meth:`get_message`, and may
        still be answered: the Close goes out once they are consumed.
        """
        if self._fault is None:
            self._fault = (code, reason)

    def _set_closed(self, code: int, reason: str) -> None:
        if self._closed is None:
            self._closed = (code, reason)
            self._room.set()  # senders waiting for room find the WebSocket closed

    # -- writing ---------------------------------------------------------------------------------------

    def send_nowait(self, message: str | bytes) -> None:
        """Send ``message`` after everything sent before: written now if nothing waits, else queued.

        :raises WebSocketClosed: the WebSocket is closed or closing, or broke.
        :raises trio.WouldBlock: ``queue_size`` messages are waiting for the writer task already.
        """
        if self._closed is not None:
            raise self._closed_error()
        if self._finishing:
            raise WebSocketClosed(1000, "no more messages are sent on this WebSocket")
        if len(self._queue) >= self.queue_size:
            raise trio.WouldBlock
        self._write(_data_frame(message))

    async def send_message(self, message: str | bytes) -> None:
        """:meth:`send_nowait`, waiting for room in the queue first (the caller bounds the wait).

        :raises WebSocketClosed: as :meth:`send_nowait`.
        """
        while True:
            try:
                self.send_nowait(message)
            except trio.WouldBlock:
                await self.wait_room()
            else:
                return

    async def wait_room(self) -> None:
        """Wait until :meth:`send_nowait` can take a message (or the WebSocket closes)."""
        while len(self._queue) >= self.queue_size and self._closed is None:
            if self._room.is_set():
                self._room = trio.Event()  # one event for all who wait; the writer sets it
            await self._room.wait()

    def finish(self) -> None:
        """Send nothing more: :meth:`serve_writes` returns once everything queued is written."""
        self._finishing = True
        self._wake_writer.set()

    def _write_control(self, event: Event) -> None:
        """Write a control frame (a Pong, a Close), whatever the queue's bound."""
        try:
            data = self._connection.send(event)
        except LocalProtocolError:
            return  # the state no longer allows it (a Close already went out)
        with contextlib.suppress(WebSocketClosed):
            self._write(data)

    def _write(self, data: bytes) -> None:
        """Hand ``data`` to the kernel now if nothing is queued before it, else queue it (in order)."""
        if self._dirty or self._stream_closed:
            raise WebSocketClosed(ABNORMAL, "the connection broke")
        if not self._queue and not self._writing and self._fd is not None:
            try:
                written = os.write(self._fd, data)
            except BlockingIOError:
                written = 0
            except OSError as exc:
                self._dirty = True
                self._set_closed(ABNORMAL, f"the connection broke: {exc.strerror or exc}")
                self._room.set()
                raise WebSocketClosed(ABNORMAL, "the connection broke") from None
            if written == len(data):
                return
            data = data[written:]
        self._queue.append(data)
        self._wake_writer.set()

    async def serve_writes(self, write_timeout: float) -> WriterEnd:
        """Write what :meth:`send_nowait` queued, in order, until :meth:`finish` or a failure.

        Run by the WebSocket's owner beside its reader; one write may take at most ``write_timeout``
        seconds.
        Cancelling it in the middle of a write leaves the stream unusable (:meth:`aclose` then closes it
        without a Close frame).
        """
        while True:
            while not self._queue:
                if self._finishing:
                    return WriterEnd.FINISHED
                if self._dirty:
                    return WriterEnd.BROKEN
                self._wake_writer = trio.Event()
                await self._wake_writer.wait()
            data = b"".join(self._queue) if len(self._queue) > 1 else self._queue[0]
            self._queue.clear()
            self._room.set()
            self._writing = True
            try:
                with trio.move_on_after(write_timeout) as writing:
                    await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._dirty = True
                self._set_closed(ABNORMAL, "the connection broke")
                return WriterEnd.BROKEN
            except BaseException:
                self._dirty = True  # cancelled in the middle of a write
                raise
            finally:
                self._writing = False
            if writing.cancelled_caught:
                self._dirty = True
                self._set_closed(ABNORMAL, "a write timed out")
                return WriterEnd.TOO_SLOW

    # -- closing ---------------------------------------------------------------------------------------

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close: what is queued, then Close ``code``/``reason``; await the peer's Close; close TCP.

        Call it once the writer task has stopped, and bound it (it waits for the peer). Safe to call
        twice; the TCP connection is closed whatever happens.
        """
        if self._stream_closed:
            return
        try:
            connection = self._connection
            if not self._dirty and not self._writing:
                if connection.state is ConnectionState.OPEN:
                    self._set_closed(code, reason)
                    self._queue.append(connection.send(CloseConnection(code=code, reason=reason or None)))
                elif self._peer_close is not None and connection.state is ConnectionState.REMOTE_CLOSING:
                    self._set_closed(self._peer_close.code, self._peer_close.reason or "")
                    self._queue.append(connection.send(self._peer_close.response()))
                if self._queue:
                    queued = b"".join(self._queue)
                    self._queue.clear()
                    await self._stream.send_all(queued)
                if self._fault is not None:
                    # The peer broke the protocol and wsproto reads it no further: half-close, and drop
                    # what still comes until the peer closes too (closing with unread bytes would reset
                    # the connection, and the peer could lose our Close).
                    if isinstance(self._stream, trio.abc.HalfCloseableStream):
                        await self._stream.send_eof()
                    while await self._stream.receive_some(RECEIVE_SIZE):
                        pass
                # Wait for the peer's answer (a server closes the TCP connection first, then).
                while connection.state is ConnectionState.LOCAL_CLOSING and self._fault is None:
                    data = await self._stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        break
                    connection.receive_data(bytes(data))
                    for _event in connection.events():
                        pass  # messages after our Close are dropped; the answering Close ends the loop
        except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
            pass
        finally:
            self._set_closed(code, reason)
            self._stream_closed = True
            self._wake_writer.set()
            await trio.aclose_forcefully(self._stream)
