"""WebSocket client helpers for the end-to-end tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

__all__ = ["open_ws", "stream_numbered", "until", "websocket_servers"]


@asynccontextmanager
async def websocket_servers(
    handler: Callable[[WebSocketRequest], Any], count: int
) -> AsyncIterator[list[int]]:
    """``count`` trio-websocket servers on 127.0.0.1 (free ports), each serving ``handler``; their ports."""
    async with trio.open_nursery() as nursery:
        ports = []
        for _ in range(count):
            server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
            ports.append(server.port)
        yield ports
        nursery.cancel_scope.cancel()


async def until(condition: Callable[[], bool], *, seconds: float = 10.0) -> None:
    """Wait (bounded) for a condition that no event announces (state inside Atlas or a server)."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await trio.sleep(0.01)
    raise AssertionError("condition not reached in time")


@asynccontextmanager
async def open_ws(url: str, **kwargs: Any) -> AsyncIterator[WebSocketConnection]:
    """``open_websocket_url`` that also closes its socket when the server closed first.

    trio-websocket's client reader stops at the server's TCP close without closing its own socket,
    which ``filterwarnings = error`` turns into a ResourceWarning failure.
    """
    async with open_websocket_url(url, **kwargs) as ws:
        yield ws
    await ws._stream.aclose()


async def stream_numbered(
    ws: WebSocketConnection,
    *,
    label: Callable[[int], str],
    received: list[str],
    stop: trio.Event,
    rate: float,
    wait_for_answers: bool,
) -> int:
    """Send ``label(0)``, ``label(1)``, ... at ``rate`` per second until ``stop``, keeping every answer.

    Returns how many messages were sent. With ``wait_for_answers``, returns only once as many answers
    came back (bounded by `until`).
    """
    sent = 0

    async def reader() -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                message = await ws.get_message()
                assert isinstance(message, str)
                received.append(message)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        while not stop.is_set():
            await ws.send_message(label(sent))
            sent += 1
            await trio.sleep(1 / rate)
        if wait_for_answers:
            await until(lambda: len(received) >= sent)  # the last answers are in flight
        nursery.cancel_scope.cancel()
    return sent
