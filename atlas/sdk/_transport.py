"""Listening: bind, accept TCP streams, read the WebSocket opening handshake, hand each request on.

Every accepted stream is the per-connection error boundary: whatever goes wrong in one connection is
logged and ends that connection only, and its socket is closed when it ends. The WebSocket itself is
``_websocket.py``'s (no task of its own: the route's tasks read and write it). The listeners are bound
before anything starts, so a port in use is a plain ``OSError`` from ``nursery.start``.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

import trio

from atlas.sdk._websocket import Handshake, WebSocket, WebSocketClosed, read_handshake

__all__ = ["HANDSHAKE_TIMEOUT", "accept", "header_map", "open_listeners", "serve_requests"]

logger = logging.getLogger("atlas.sdk")

#: Seconds a peer has to complete the opening handshake.
HANDSHAKE_TIMEOUT = 10.0
#: Seconds to wait for the listeners to close.
_CLOSE_TIMEOUT = 2.0

Route = Callable[[Handshake], Awaitable[None]]


async def open_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """Bind ``host:port``; ``OSError`` names the address on failure."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        code = exc.errno if exc.errno is not None else errno.EIO
        raise OSError(code, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


async def serve_requests(
    listeners: Sequence[trio.SocketListener],
    route: Route,
    *,
    name: str,
    max_message_size: int,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve WebSocket requests on bound ``listeners`` until cancelled; reports the port when accepting."""
    try:
        port = listeners[0].socket.getsockname()[1]
        handler = partial(_serve_stream, route=route, name=name, max_message_size=max_message_size)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handler, list(listeners))
            logger.info("%s listening on port %d", name, port)
            task_status.started(port)
    finally:
        with trio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            for listener in listeners:
                await listener.aclose()


async def _serve_stream(stream: trio.SocketStream, *, route: Route, name: str, max_message_size: int) -> None:
    """One connection, from handshake to close; never raises ``Exception``."""
    try:
        handshake: Handshake | None = None
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            handshake = await read_handshake(stream, max_message_size=max_message_size)
        if handshake is not None:
            await route(handshake)
    except* WebSocketClosed:
        pass  # the peer went away during the handshake or the close
    except* Exception:
        logger.exception("%s: a connection failed", name)
    finally:
        await trio.aclose_forcefully(stream)


async def accept(handshake: Handshake) -> WebSocket | None:
    """Finish the opening handshake; None if the peer did not take the answer (in time)."""
    with trio.move_on_after(HANDSHAKE_TIMEOUT):
        try:
            return await handshake.accept()
        except WebSocketClosed:
            return None
    return None


async def reject(handshake: Handshake, status: int, why: str) -> None:
    """Refuse the opening handshake with an HTTP ``status`` and ``why`` as the body."""
    with trio.move_on_after(HANDSHAKE_TIMEOUT):
        await handshake.reject(status, why.encode())


def header_map(headers: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    """Request headers by lower-case name; repeated headers joined with ``, ``."""
    found: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        found[name] = f"{found[name]}, {value}" if name in found else value
    return found
