"""The rules of the demo cluster's games, without I/O: players, their portable profile, the commands.

One :class:`GameRules` per game server. It knows the players on that server by key (the client id) and
keeps each one's :class:`Profile`: a nickname and a count of the lines the player has said. The profile
is what travels with a player when it moves to another server (:meth:`GameRules.state_of` on the source,
:meth:`GameRules.arrive` on the target), so a player keeps its name and its count across moves.

Every input returns what to do: :class:`Say` records (which players get which line) or, for
``/move <server>``, a :class:`Move` that the I/O shell (``atlas.demo.games``) carries out by asking
Atlas, reporting back with :meth:`GameRules.moving` or :meth:`GameRules.cannot_move`.

The two kinds of game differ in what a plain line does: :class:`EchoRules` sends it back to the
player, :class:`ChatRules` broadcasts it to the room as ``[<server>] <name>: <text>`` and greets new
players. The commands are the same everywhere:

======================  ==========================================================================
``/server``             the server's name
``/who``                ``players on <server>: <name>, <name>, ...``
``/me``                 ``you are <name>, <n> messages sent, on <server>``
``/nick NAME``          change the nickname (up to 24 characters, no spaces)
``/move <server>``      ask Atlas to move the player there (``moving to ...`` / ``cannot move: ...``)
======================  ==========================================================================

Any other line, ``/`` or not, is a plain line and counts as a message sent.
"""

from __future__ import annotations

import abc
from typing import Any, Final

import attrs

__all__ = [
    "MAX_NICK_LENGTH",
    "ChatRules",
    "EchoRules",
    "GameRules",
    "Move",
    "Profile",
    "Say",
]

#: The longest nickname ``/nick`` takes.
MAX_NICK_LENGTH: Final = 24


@attrs.define
class Profile:
    """What a player carries from server to server."""

    nick: str
    messages: int = 0
    """Plain lines the player has said (commands not counted), on every server it has been on."""

    def to_state(self) -> dict[str, Any]:
        """The profile as the transfer state (JSON)."""
        return {"nick": self.nick, "messages": self.messages}

    @classmethod
    def from_state(cls, state: Any) -> Profile | None:
        """The profile a transfer state describes, or None if it is not one."""
        if not isinstance(state, dict):
            return None
        nick, messages = state.get("nick"), state.get("messages")
        if not isinstance(nick, str) or not _valid_nick(nick):
            return None
        if not isinstance(messages, int) or isinstance(messages, bool) or messages < 0:
            return None
        return cls(nick, messages)


@attrs.frozen
class Say:
    """One line to send, and the players (by key) who get it."""

    to: tuple[str, ...]
    text: str


@attrs.frozen
class Move:
    """The player ``player`` asked to move to the server ``target``: ask Atlas."""

    player: str
    target: str


def _valid_nick(nick: str) -> bool:
    return 0 < len(nick) <= MAX_NICK_LENGTH and not any(c.isspace() for c in nick)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


@attrs.define
class GameRules(abc.ABC):
    """The rules shared by every demo game; :class:`EchoRules` and :class:`ChatRules` add the rest.

    ``name`` is the server's name. New players are named ``player-<n>``, numbered from 1 per server in
    joining order, never reused, and skipping names a player who moved here already has.
    """

    name: str
    _players: dict[str, Profile] = attrs.field(factory=dict, init=False)
    _joined: int = attrs.field(default=0, init=False)

    @property
    def players(self) -> dict[str, Profile]:
        """The players here by key, in joining (or arrival) order (a copy)."""
        return dict(self._players)

    def profile(self, key: str) -> Profile | None:
        """The profile of the player ``key``, if it is here."""
        return self._players.get(key)

    # -- players come and go ---------------------------------------------------------------------------

    def join(self, key: str) -> list[Say]:
        """A new player (not one moving in) connected."""
        taken = {profile.nick for profile in self._players.values()}
        while True:
            self._joined += 1
            nick = f"player-{self._joined}"
            if nick not in taken:
                break
        self._players[key] = Profile(nick)
        return self.greet(key)

    def arrive(self, key: str, state: Any) -> list[Say]:
        """A player moved here from another server with ``state`` (see :meth:`state_of`)."""
        profile = Profile.from_state(state)
        if profile is None:
            self._players.pop(key, None)  # a fresh start rather than a broken profile
            return [*self.join(key), Say((key,), "your profile did not survive the move")]
        self._players[key] = profile
        return [
            Say(
                (key,),
                f"welcome to {self.name}, you are {profile.nick} "
                f"({_plural(profile.messages, 'message')} sent so far)",
            )
        ]

    def state_of(self, key: str) -> dict[str, Any]:
        """The state that moves with the player ``key`` to another server."""
        return self._players[key].to_state()

    def leave(self, key: str) -> bool:
        """The player left (or moved away); False if it was not here (leaving twice is fine)."""
        return self._players.pop(key, None) is not None

    # -- what players say ------------------------------------------------------------------------------

    def receive(self, key: str, text: str) -> list[Say] | Move:
        """A line from the player ``key``: the lines to send, or a :class:`Move` to ask Atlas for."""
        profile = self._players.get(key)
        if profile is None:
            return []
        command, _, argument = text.strip().partition(" ")
        argument = argument.strip()
        if command == "/server" and not argument:
            return [Say((key,), self.name)]
        if command == "/who" and not argument:
            names = ", ".join(p.nick for p in self._players.values())
            return [Say((key,), f"players on {self.name}: {names}")]
        if command == "/me" and not argument:
            sent = _plural(profile.messages, "message")
            return [Say((key,), f"you are {profile.nick}, {sent} sent, on {self.name}")]
        if command == "/nick":
            if not _valid_nick(argument):
                return [Say((key,), f"usage: /nick NAME (up to {MAX_NICK_LENGTH} characters, no spaces)")]
            profile.nick = argument
            return [Say((key,), f"you are now {argument}")]
        if command == "/move":
            if not argument or " " in argument:
                return [Say((key,), "usage: /move <server>, for example /move game-server-2")]
            if argument == self.name:
                return [Say((key,), f"cannot move: you are already on {self.name}")]
            return Move(key, argument)
        profile.messages += 1
        return self.said(key, profile, text)

    def moving(self, move: Move) -> list[Say]:
        """Atlas accepted ``move``: the transfer has started."""
        return [Say((move.player,), f"moving to {move.target}...")]

    def cannot_move(self, move: Move, reason: str) -> list[Say]:
        """Atlas refused ``move`` (or could not be asked)."""
        return [Say((move.player,), f"cannot move: {reason}")]

    def move_rolled_back(self, key: str) -> list[Say]:
        """A transfer of the player ``key`` started but was rolled back: it stays here."""
        return [Say((key,), f"the move did not happen: you are still on {self.name}")]

    # -- what differs between games --------------------------------------------------------------------

    def greet(self, key: str) -> list[Say]:
        """What a new player is told when it connects."""
        return []

    @abc.abstractmethod
    def said(self, key: str, profile: Profile, text: str) -> list[Say]:
        """A plain line from the player ``key`` (already counted)."""


@attrs.define
class EchoRules(GameRules):
    """An echo game: a plain line comes back to its sender unchanged; new players are not greeted."""

    def said(self, key: str, profile: Profile, text: str) -> list[Say]:
        """The line, back to its sender."""
        return [Say((key,), text)]


@attrs.define
class ChatRules(GameRules):
    """A chat room: a new player is greeted; a plain line goes to everyone here, the sender included."""

    def greet(self, key: str) -> list[Say]:
        """``welcome to <server>, you are <name>``."""
        return [Say((key,), f"welcome to {self.name}, you are {self._players[key].nick}")]

    def said(self, key: str, profile: Profile, text: str) -> list[Say]:
        """``[<server>] <name>: <text>``, to everyone here."""
        return [Say(tuple(self._players), f"[{self.name}] {profile.nick}: {text}")]
