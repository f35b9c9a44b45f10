"""One control channel from Atlas, as the game server holds it: its identity and a bounded send.

The server's own requests (``transfer.request``) wait on the channel for Atlas's answer, by request id.
"""

from __future__ import annotations

import contextlib
import itertools

import attrs
import trio

from atlas.control.messages import ServerMessage, TransferAccepted, TransferRefused, TransferRequest, encode
from atlas.sdk._websocket import WebSocket, WebSocketClosed

__all__ = ["ChannelGone", "ControlChannel"]

#: Seconds a control message may wait for room, or one write may take, before the channel is broken.
SEND_TIMEOUT = 10.0


class ChannelGone(Exception):
    """The control channel closed, or broke while sending; nothing more can go out on it."""


@attrs.define(eq=False)
class ControlChannel:
    """A control WebSocket from one Atlas node.

    ``scope`` wraps the channel's reader: a send that fails cancels it, which ends the channel, and the
    transfers that came through it then roll back (see ``_control.py``).
    """

    ws: WebSocket
    node: str = "?"
    """The Atlas node's name, from ``hello``."""
    version: int | None = None
    """The protocol version chosen in ``welcome`` (None before ``hello``)."""
    open: bool = True
    welcomed: trio.Event = attrs.field(factory=trio.Event)
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    close_code: tuple[int, str] = (1000, "")
    # The server's transfer.request messages awaiting an answer, by request id (None: the channel closed).
    _requests: dict[str, trio.MemorySendChannel[TransferAccepted | TransferRefused | None]] = attrs.field(
        factory=dict
    )
    _request_ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))

    def new_request_id(self) -> str:
        """A request id not used before on this channel."""
        return f"r-{next(self._request_ids)}"

    async def request(self, message: TransferRequest) -> TransferAccepted | TransferRefused:
        """Send ``message`` and wait for Atlas's answer to it (the caller bounds the wait).

        :raises ChannelGone: the channel closed before the answer came (or could not take the request).
        """
        answers, answer = trio.open_memory_channel[TransferAccepted | TransferRefused | None](1)
        self._requests[message.request] = answers
        try:
            with answers, answer:
                await self.send(message)
                reply = await answer.receive()
        finally:
            del self._requests[message.request]
        if reply is None:
            raise ChannelGone(f"the control channel from {self.node} closed before Atlas answered")
        return reply

    def answer(self, message: TransferAccepted | TransferRefused) -> bool:
        """Hand Atlas's answer to the request waiting for it; False if none is (unknown or given up)."""
        waiting = self._requests.get(message.request)
        if waiting is None:
            return False
        with contextlib.suppress(trio.WouldBlock):  # a repeated answer: the first one counts
            waiting.send_nowait(message)
        return True

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
            except WebSocketClosed:
                self.close()
                raise ChannelGone(f"the control channel from {self.node} closed") from None
            return
        # Atlas has not read the channel for that long: it is of no use any more.
        self.close()
        raise ChannelGone(f"the control channel from {self.node} took over {SEND_TIMEOUT:g} s to send")

    def close(self) -> None:
        """Stop using the channel: no more sends, its reader ends, and waiting requests fail."""
        self.open = False
        self.scope.cancel()
        for waiting in self._requests.values():
            with contextlib.suppress(trio.WouldBlock):
                waiting.send_nowait(None)
