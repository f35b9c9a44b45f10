"""The demo cluster's game servers on the SDK: an echo game and chat rooms whose players can ``/move``.

Each game is a :class:`~atlas.sdk.GameServer` whose hooks feed :mod:`atlas.demo.rules` and send what
the rules answer. The player's profile (nickname, messages sent) is the transfer state, so a player
that moves, by ``/move <server>`` or by any transfer Atlas runs, arrives with it. ``/move`` asks Atlas
with :meth:`~atlas.sdk.GameServer.request_transfer` from inside ``on_message``; the line that says so
(``moving to ...``) is sent before ``on_message`` returns, so it still comes from this server, and the
player's next lines already reach the target.
"""

from __future__ import annotations

from typing import Any

from atlas.demo.rules import ChatRules, EchoRules, GameRules, Move, Say
from atlas.sdk import GameServer, Player, TransferRequestRefused

__all__ = ["ChatGame", "DemoGame", "EchoGame"]


class DemoGame(GameServer):
    """A game server playing ``rules`` (the server's name is ``rules.name``).

    Keyword arguments go to :class:`~atlas.sdk.GameServer` (``host``, ``port``, ...).
    """

    def __init__(self, rules: GameRules, **kwargs: Any) -> None:
        super().__init__(rules.name, **kwargs)
        self.rules = rules

    async def on_connect(self, player: Player) -> None:
        """A new player: a fresh profile (``player-<n>``), greeted in a chat room."""
        await self._say(self.rules.join(player.id))

    async def on_message(self, player: Player, message: str | bytes) -> None:
        """A line from the player: the rules answer it; ``/move`` asks Atlas. Binary is echoed."""
        if isinstance(message, bytes):
            await player.send(message)  # binary: echoed, in every game
            return
        answer = self.rules.receive(player.id, message)
        if not isinstance(answer, Move):
            await self._say(answer)
            return
        try:
            await self.request_transfer(player, answer.target)
        except TransferRequestRefused as exc:
            await self._say(self.rules.cannot_move(answer, exc.reason))
        else:
            await self._say(self.rules.moving(answer))

    async def on_disconnect(self, player: Player, reason: str) -> None:
        """The player left, or moved away: forget its profile here."""
        self.rules.leave(player.id)

    async def on_transfer_out(self, player: Player) -> Any:
        """The player's profile is its transfer state."""
        return self.rules.state_of(player.id)

    async def on_transfer_in(self, player: Player, state: Any) -> None:
        """The player arrives with its profile, and is welcomed with it."""
        await self._say(self.rules.arrive(player.id, state))

    async def on_transfer_aborted(self, player: Player) -> None:
        """A move that had started was rolled back: tell the player it stays."""
        await self._say(self.rules.move_rolled_back(player.id))

    async def _say(self, lines: list[Say]) -> None:
        for line in lines:
            for key in line.to:
                await self.send_to(key, line.text)


class EchoGame(DemoGame):
    """An echo game (:class:`~atlas.demo.rules.EchoRules`) called ``name``."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(EchoRules(name), **kwargs)


class ChatGame(DemoGame):
    """A chat room (:class:`~atlas.demo.rules.ChatRules`) called ``name``."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(ChatRules(name), **kwargs)
