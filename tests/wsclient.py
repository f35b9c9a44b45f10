"""WebSocket client helpers for the end-to-end tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

__all__ = ["open_ws", "until"]


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
