"""An interactive WebSocket client: stdin lines go out as text messages, messages come back printed.

This is what ``python -m atlas client ws://127.0.0.1:9000`` runs.

The client opens the TCP (and TLS) stream itself and hands it to trio-websocket's
``wrap_client_stream``, rather than using ``open_websocket_url``, for two reasons: with
trio-websocket 0.12 the client's socket is left open whenever the *server* starts the closing
handshake (the client then waits for a TCP close it never acts on), and a TLS failure would only
surface as a connect timeout. Owning the stream (``async with stream``) closes it on every path and
lets TLS errors be reported as they are.

Once connected, two tasks share the connection: one reads stdin and sends each line, the other
prints every message received. Whichever ends first (stdin at end of file, or the server closing)
cancels the other.
"""

from __future__ import annotations

import os
import ssl
import stat
import urllib.parse
from collections.abc import Callable

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

__all__ = ["run_client"]

#: Biggest message the client accepts from the server.
_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
#: Seconds allowed for the closing handshake.
_CLOSE_TIMEOUT = 5.0
_READ_SIZE = 64 * 1024
#: Close codes that count as a normal end of the session (exit status 0).
_NORMAL_CLOSE_CODES = frozenset({1000, 1001})

_Output = Callable[[str], None]


async def run_client(
    url: str,
    *,
    stdin: trio.abc.ReceiveStream | None = None,
    out: _Output = print,
    connect_timeout: float = 10.0,
) -> int:
    """Connect to ``url`` and chat interactively; returns the process exit status.

    Prints ``connected to <url>``, then sends every line read from ``stdin`` (split on newlines,
    decoded as UTF-8, one text message per line) while printing every message received as
    ``< <text>`` or ``< <n bytes binary>``. All output goes through ``out``, one line per call.

    - End of file on ``stdin``: closes the connection with 1000 and returns 0.
    - The server closes: prints ``closed: <code> <reason>``; returns 0 for 1000 and 1001, else 1.
    - The connection cannot be opened within ``connect_timeout`` seconds (refused, unknown host,
      TLS failure, handshake rejected or timed out, bad URL): prints one line
      ``error: cannot connect to <url>: <reason>`` and returns 1, without a traceback.

    ``stdin`` defaults to the process's standard input (``trio.lowlevel.FdStream(os.dup(0))``, or
    a thread-backed reader when fd 0 is a regular file or ``/dev/null``, which cannot be polled);
    a stream passed in is not closed by this function.
    """

    def fail(reason: str) -> int:
        out(f"error: cannot connect to {url}: {reason}")
        return 1

    try:
        target = _Target.from_url(url)
    except ValueError as exc:
        return fail(str(exc))

    deadline = trio.current_time() + connect_timeout
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] | None = None
    with trio.move_on_at(deadline):
        try:
            stream = await target.open_stream()
        except _ConnectError as exc:
            return fail(str(exc))
    if stream is None:
        return fail(f"timed out after {connect_timeout:g}s")

    async with stream:
        status: int | None = None
        rejected: ConnectionRejected | None = None
        try:
            async with trio.open_nursery() as nursery:
                ws: WebSocketConnection | None = None
                with trio.move_on_at(deadline):
                    ws = await wrap_client_stream(
                        nursery,
                        stream,
                        target.host_header,
                        target.resource,
                        max_message_size=_MAX_MESSAGE_SIZE,
                    )
                if ws is not None:
                    out(f"connected to {url}")
                    try:
                        status = await _converse_on_stdin(ws, stdin, out)
                    finally:
                        with trio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                            await ws.aclose(1000)
                # Stops the reader task (it is otherwise waiting for more data).
                nursery.cancel_scope.cancel()
        except* ConnectionRejected as group:
            # trio-websocket raises the server's refusal from its reader task.
            first = group.exceptions[0]
            assert isinstance(first, ConnectionRejected)
            rejected = first
    if rejected is not None:
        return fail(f"handshake rejected with HTTP {rejected.status_code}")
    if status is None:
        return fail(f"timed out after {connect_timeout:g}s")
    return status


async def _converse_on_stdin(
    ws: WebSocketConnection, stdin: trio.abc.ReceiveStream | None, out: _Output
) -> int:
    if stdin is not None:
        return await _converse(ws, stdin, out)
    # Opened only once connected: FdStream puts the terminal in non-blocking mode while open.
    async with _open_stdin() as own_stdin:
        if isinstance(own_stdin, trio.lowlevel.FdStream):
            out = _blocking_while_writing(out, own_stdin.fileno())
        return await _converse(ws, own_stdin, out)


def _blocking_while_writing(out: _Output, fd: int) -> _Output:
    """Wrap ``out`` so the file behind ``fd`` is in blocking mode while ``out`` runs.

    ``FdStream`` makes the whole open file non-blocking, and in a terminal stdin, stdout and stderr
    usually share one open file: a long line printed while the terminal is busy would then be cut
    short silently. Nothing reads stdin while this synchronous call runs, so switching is safe.
    """

    def write(line: str) -> None:
        os.set_blocking(fd, True)
        try:
            out(line)
        finally:
            os.set_blocking(fd, False)

    return write


async def _converse(ws: WebSocketConnection, stdin: trio.abc.ReceiveStream, out: _Output) -> int:
    """Run the sender and the printer until one of them ends the session; returns the status."""
    results: list[int] = []

    async with trio.open_nursery() as nursery:

        async def print_until_closed() -> None:
            results.append(await _print_incoming(ws, out))
            nursery.cancel_scope.cancel()

        async def send_until_eof() -> None:
            if await _send_lines(stdin, ws):
                results.append(0)
                nursery.cancel_scope.cancel()
            # Otherwise the connection closed under us; the printer reports how.

        nursery.start_soon(print_until_closed)
        nursery.start_soon(send_until_eof)
    return results[0]


async def _print_incoming(ws: WebSocketConnection, out: _Output) -> int:
    """Print messages until the connection closes; returns the exit status the close implies."""
    while True:
        try:
            message = await ws.get_message()
        except ConnectionClosed as exc:
            code = exc.reason.code if exc.reason is not None else 1006
            reason = (exc.reason.reason if exc.reason is not None else None) or ""
            out(f"closed: {code} {reason}".rstrip())
            return 0 if code in _NORMAL_CLOSE_CODES else 1
        if isinstance(message, bytes):
            out(f"< <{len(message)} bytes binary>")
        else:
            out(f"< {message}")


async def _send_lines(stdin: trio.abc.ReceiveStream, ws: WebSocketConnection) -> bool:
    """Send each line of ``stdin`` as a text message; True at end of file, False if ws closed.

    Reading stdin waits for the user, so it has no timeout; a final line without a newline is sent
    at end of file.
    """
    pending = b""
    try:
        while True:
            data = await stdin.receive_some(_READ_SIZE)
            if not data:
                if pending:
                    await ws.send_message(_decode_line(pending))
                return True
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                await ws.send_message(_decode_line(line))
    except ConnectionClosed:
        return False


def _decode_line(line: bytes) -> str:
    return line.removesuffix(b"\r").decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------------
# Connecting


class _ConnectError(Exception):
    """The TCP or TLS connection could not be opened; the message is the one-line reason."""


@attrs.frozen
class _Target:
    """Where a ``ws://`` or ``wss://`` URL points."""

    host: str
    port: int
    resource: str
    host_header: str
    tls: bool

    @classmethod
    def from_url(cls, url: str) -> _Target:
        """Parse a WebSocket URL; ``ValueError`` says what is wrong with it."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise ValueError("not a ws:// or wss:// URL")
        if not parts.hostname:
            raise ValueError("the URL has no host")
        tls = parts.scheme == "wss"
        port = parts.port  # raises ValueError for a port out of range
        resource = parts.path or "/"
        if parts.query:
            resource += "?" + parts.query
        return cls(
            host=parts.hostname,
            port=port if port is not None else (443 if tls else 80),
            resource=resource,
            host_header=parts.netloc.rpartition("@")[2],
            tls=tls,
        )

    async def open_stream(self) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
        """Open the TCP connection (and TLS session for ``wss://``); raises ``_ConnectError``."""
        try:
            tcp = await trio.open_tcp_stream(self.host, self.port)
        except OSError as exc:
            raise _ConnectError(_os_error_reason(exc)) from None
        if not self.tls:
            return tcp
        tls = trio.SSLStream(tcp, ssl.create_default_context(), server_hostname=self.host)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(tcp)
            cause = exc.__cause__
            raise _ConnectError(f"TLS handshake failed: {cause or exc}") from None
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        return tls


def _os_error_reason(exc: OSError) -> str:
    # trio reports "all attempts to connect to host:port failed" and keeps each attempt's error
    # in a group below it; the first attempt's error ("Connection refused") is the useful part.
    attempts = exc.__cause__
    if isinstance(attempts, BaseExceptionGroup) and isinstance(attempts.exceptions[0], OSError):
        exc = attempts.exceptions[0]
    if exc.errno is not None:
        return os.strerror(exc.errno) if exc.errno > 0 else exc.strerror or str(exc)
    return str(exc)


# --------------------------------------------------------------------------------------------------
# Standard input


class _BlockingFdReceiveStream(trio.abc.ReceiveStream):
    """Reads a file descriptor that cannot be polled (a regular file, ``/dev/null``) in a thread.

    Reads from such files never block for long, so a read is not abandoned on cancellation (which
    would race with closing the descriptor).
    """

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        fd = self._fd
        if fd is None:
            raise trio.ClosedResourceError("stdin was already closed")
        return await trio.to_thread.run_sync(os.read, fd, max_bytes or _READ_SIZE)

    async def aclose(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        await trio.lowlevel.checkpoint()


def _open_stdin() -> trio.abc.ReceiveStream:
    """Open a stream on a duplicate of fd 0 (the caller closes it)."""
    fd = os.dup(0)
    mode = os.fstat(fd).st_mode
    if os.isatty(fd) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return trio.lowlevel.FdStream(fd)
    return _BlockingFdReceiveStream(fd)
