"""WebSocket client helpers for the end-to-end tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from trio_websocket import WebSocketConnection, open_websocket_url

__all__ = ["open_ws"]


@asynccontextmanager
async def open_ws(url: str, **kwargs: Any) -> AsyncIterator[WebSocketConnection]:
    """``open_websocket_url`` that also closes its socket when the server closed first.

    trio-websocket's client reader stops at the server's TCP close without closing its own socket,
    which ``filterwarnings = error`` turns into a ResourceWarning failure.
    """
    async with open_websocket_url(url, **kwargs) as ws:
        yield ws
    await ws._stream.aclose()
