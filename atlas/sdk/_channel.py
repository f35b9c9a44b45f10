"""One control channel from Atlas, as the game server holds it: its identity and a bounded send."""

from __future__ import annotations

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from atlas.control.messages import ServerMessage, encode

__all__ = ["ChannelGone", "ControlChannel"]

#: Seconds one control message may take to go out before the channel is considered broken.
SEND_TIMEOUT = 10.0


class ChannelGone(Exception):
    """The control channel closed, or broke while sending; nothing more can go out on it."""


@attrs.define(eq=False)
class ControlChannel:
    """A control WebSocket from one Atlas node.

    ``scope`` wraps the channel's reader: a send that fails cancels it, which ends the channel, and the
    transfers that came through it then roll back (see ``_control.py``).
    """

    ws: WebSocketConnection
    node: str = "?"
    """The Atlas node's name, from ``hello``."""
    version: int | None = None
    """The protocol version chosen in ``welcome`` (None before ``hello``)."""
    open: bool = True
    welcomed: trio.Event = attrs.field(factory=trio.Event)
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    close_code: tuple[int, str] = (1000, "")

    async def send(self, message: ServerMessage) -> None:
        """Send one message; :class:`ChannelGone` if the channel cannot take it."""
        await self.send_text(encode(message))

    async def send_text(self, text: str) -> None:
        """Send one already-encoded message; :class:`ChannelGone` if the channel cannot take it."""
        if not self.open:
            raise ChannelGone(f"the control channel from {self.node} is closed")
        with trio.move_on_after(SEND_TIMEOUT):
            try:
                await self.ws.send_message(text)
            except ConnectionClosed:
                self.close()
                raise ChannelGone(f"the control channel from {self.node} closed") from None
            return
        # A send cut off half way leaves a broken frame on the wire: the channel cannot be used again.
        self.close()
        raise ChannelGone(f"the control channel from {self.node} took over {SEND_TIMEOUT:g} s to send")

    def close(self) -> None:
        """Stop using the channel: no more sends, and its reader ends."""
        self.open = False
        self.scope.cancel()
