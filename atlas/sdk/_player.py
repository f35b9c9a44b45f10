"""A player: one client's data link to this game server, with its counts and its send gate.

:meth:`Player.send` hands the message to the player's *outbox*: the link's WebSocket, which writes it to
the socket at once when nothing waits before it, and otherwise queues it (bounded, ``outbox_size``
messages) for the link's writer task (``_websocket.py``, ``_links.py``). A message is counted in
:attr:`Player.sent` the moment the outbox takes it, because from then on it reaches the link, in order,
unless the link dies; so ``sent`` is exactly what the link carries once the outbox is drained.

Sends to one player are serialized by one FIFO lock: a send that finds the lock free and the outbox with
room completes without waiting (no task switch); any other waits its turn. During a transfer the gate
closes: :meth:`Player._hold` takes the lock (so a send in progress finishes first), then parks later
sends in a queue instead of the outbox and returns the count at that instant. That count is what the
source reports as ``sent`` in ``transfer.state``; nothing queued after it reaches the link unless the
transfer is aborted, when :meth:`Player._release` moves the queue to the outbox in order (still under the
lock, so later sends cannot overtake it).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import trio

from atlas.sdk._websocket import WebSocketClosed

if TYPE_CHECKING:
    from atlas.sdk._transfers import Outgoing

__all__ = ["Outbox", "Player", "PlayerDisconnected"]

#: Why a player's link ended, as given to ``on_disconnect``.
CLOSED = "closed"
KICKED = "kicked"
TRANSFERRED = "transferred"
TRANSFER_ABORTED = "transfer_aborted"
TOO_SLOW = "too_slow"
ERROR = "error"
SHUTDOWN = "shutdown"


class PlayerDisconnected(Exception):
    """The player has left this server (its link closed or it was transferred): it cannot be sent to."""

    def __init__(self, player_id: str, reason: str) -> None:
        super().__init__(f"player {player_id} is disconnected ({reason})")
        self.player_id = player_id
        self.reason = reason


class Outbox(Protocol):
    """Where a player's messages go: its link's WebSocket (``_websocket.WebSocket``), or a test's fake."""

    def send_nowait(self, message: str | bytes) -> None:
        """Take ``message``: :class:`trio.WouldBlock` when full, ``WebSocketClosed`` once closed."""

    async def wait_room(self) -> None:
        """Wait until :meth:`send_nowait` may take a message (or the outbox is closed)."""

    def finish(self) -> None:
        """Take nothing more; what was taken still goes out, then the link closes."""


class Player:
    """One client connected to this game server, through one data link from Atlas (or directly).

    Created by :class:`~atlas.sdk.GameServer`, never by the game. ``id`` is the client id Atlas sent in
    ``X-Atlas-Client-Id`` (a generated ``local-...`` id for a direct connection); it stays the same when
    the client moves to another server. ``data`` is the game's own dict for this player.
    """

    def __init__(
        self,
        id: str,
        *,
        path: str,
        headers: Mapping[str, str],
        outbox: Outbox,
        send_timeout: float,
        parked: bool = False,
    ) -> None:
        self.id = id
        """The client id (``X-Atlas-Client-Id``), or ``local-<hex>`` for a direct connection."""
        self.path = path
        """The request target of the player's link (path and query)."""
        self.headers = headers
        """The request headers of the player's link, names lower-cased, repeated values joined by ``, ``."""
        self.data: dict[str, Any] = {}
        """The game's state for this player (the default transfer state)."""
        self._outbox = outbox
        self._send_timeout = send_timeout
        self._lock = trio.Lock()
        # Sends parked while the gate is closed (a hand-off, or a transferred-in player before commit).
        self._held: collections.deque[str | bytes] | None = collections.deque() if parked else None
        self._sent = 0
        self._received = 0
        self._progress: trio.Event | None = None
        self._ending: str | None = None
        self._close: tuple[int, str] = (1000, "")
        self._admitted = trio.Event()
        if not parked:
            self._admitted.set()
        self._installed = False
        self._scope = trio.CancelScope()
        self._transfer: Outgoing | None = None

    def __repr__(self) -> str:
        return f"<Player {self.id} sent={self._sent} received={self._received}>"

    @property
    def sent(self) -> int:
        """Messages sent to this player on its link since the link opened (queued sends not counted)."""
        return self._sent

    @property
    def received(self) -> int:
        """Messages from this player whose ``on_message`` has returned, since its link opened."""
        return self._received

    @property
    def connected(self) -> bool:
        """False once the player's link is ending (it left, was kicked, dropped or transferred)."""
        return self._ending is None

    @property
    def handing_off(self) -> bool:
        """True while sends are queued instead of sent (the player is being handed to another server)."""
        return self._held is not None

    async def send(self, message: str | bytes) -> None:
        """Send ``message`` (text or binary) to the player, after everything sent to it before.

        Returns once the player's outbox took the message (the writer puts it on the link); waits for
        room when the outbox is full. While the player is being handed off to another server the message
        is queued instead: it is sent, in order, if the transfer is aborted, and dropped if the player
        leaves.

        :raises PlayerDisconnected: the player has left, or its outbox stayed full for ``send_timeout``
            seconds (the player is then dropped as too slow).
        :raises TypeError: ``message`` is neither ``str`` nor ``bytes``.
        """
        if not isinstance(message, (str, bytes)):
            raise TypeError(f"a message is str or bytes, not {type(message).__name__}")
        if not self._lock.locked():
            # Nobody sends before us: done without waiting if the outbox has room (the common case).
            self._check_connected()
            if self._held is not None:
                self._held.append(message)
                return
            if self._put_nowait(message):
                return
        async with self._lock:
            self._check_connected()
            if self._held is not None:
                self._held.append(message)
                return
            await self._put(message)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Disconnect the player: what is already in its outbox is still sent, then its link closes.

        Later sends raise :class:`PlayerDisconnected`; ``on_disconnect`` is called with ``"kicked"``.
        Closing twice is harmless.
        """
        if self._ending is not None:
            return
        self._close = (code, reason)
        self._ending = KICKED
        self._outbox.finish()  # the writer drains what is in it, then ends the link
        self._wake()

    # -- used by the server ----------------------------------------------------------------------------

    def _check_connected(self) -> None:
        if self._ending is not None:
            raise PlayerDisconnected(self.id, self._ending)

    def _put_nowait(self, message: str | bytes) -> bool:
        """Hand one message to the outbox if it has room (the caller holds the lock, or nobody does)."""
        try:
            self._outbox.send_nowait(message)
        except trio.WouldBlock:
            return False
        except WebSocketClosed:
            raise PlayerDisconnected(self.id, self._ending or CLOSED) from None
        self._sent += 1
        return True

    async def _put(self, message: str | bytes) -> None:
        """Hand one message to the outbox, waiting for room (the caller holds the lock)."""
        if self._put_nowait(message):
            return
        with trio.move_on_after(self._send_timeout):
            while True:
                await self._outbox.wait_room()
                self._check_connected()
                if self._put_nowait(message):
                    return
        self._end(TOO_SLOW)
        raise PlayerDisconnected(self.id, TOO_SLOW)

    async def _hold(self) -> int:
        """Close the gate: later sends are queued. Returns :attr:`sent` at that instant."""
        async with self._lock:
            if self._held is None:
                self._held = collections.deque()
            return self._sent

    async def _release(self) -> None:
        """Open the gate: queued sends go to the outbox in order, then sends flow again.

        :raises PlayerDisconnected: the player left meanwhile (the queue is dropped).
        """
        async with self._lock:
            held = self._held
            if held is None:
                return
            try:
                while held:
                    self._check_connected()
                    await self._put(held[0])
                    held.popleft()
                self._held = None
            finally:
                if self._ending is not None:
                    held.clear()
                    self._held = None

    def _drop_held(self) -> int:
        """Forget the queued sends (the player left for another server); returns how many."""
        if self._held is None:
            return 0
        dropped = len(self._held)
        self._held.clear()
        return dropped

    def _admit(self) -> None:
        """Let the reader hand this (transferred-in) player's messages to ``on_message``."""
        self._admitted.set()

    def _processed(self) -> None:
        """One more message went through ``on_message``."""
        self._received += 1
        self._wake()

    async def _wait_received(self, count: int) -> None:
        """Wait until :attr:`received` reaches ``count`` or the player's link ends (caller bounds it)."""
        while self._received < count and self._ending is None:
            if self._progress is None:
                self._progress = trio.Event()
            await self._progress.wait()

    def _wake(self) -> None:
        """Wake whoever waits in :meth:`_wait_received` (an event is made only when someone waits)."""
        if self._progress is not None:
            self._progress.set()
            self._progress = None

    def _end(self, reason: str) -> None:
        """End the player's link now (the first reason given is the one kept)."""
        if self._ending is None:
            self._ending = reason
        self._scope.cancel()
        self._wake()
