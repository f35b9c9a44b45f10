"""One transfer as one game server sees it: its phases, their table, and what each phase accepts (no I/O).

A server is the *source* of a transfer (direction ``"out"``: its player leaves) or its *target*
(direction ``"in"``: a player arrives). The phases::

    source:  PREPARING ─► NOTIFIED ─► DRAINING ─► HANDED_OFF ─► COMPLETED
    target:  PREPARING ─► READY ─► COMMITTING ─► COMMITTED
    both:    any phase that is not an end ──► ABORTED

* PREPARING: ``on_transfer_prepare`` is running (after ``transfer.notice`` on the source,
  ``transfer.prepare`` on the target);
* NOTIFIED (source): the game agreed; ``transfer.begin`` is awaited;
* DRAINING (source): ``transfer.begin`` arrived; waiting until the player has processed ``delivered``
  messages, then the player's sends are held and ``on_transfer_out`` takes the snapshot;
* HANDED_OFF (source): ``transfer.state`` was sent; sends are queued until ``complete`` or ``abort``;
* READY (target): ``transfer.ready`` was sent; the data link parks; ``transfer.commit`` is awaited;
* COMMITTING (target): ``on_transfer_in`` is installing the player;
* COMMITTED (target): the player is installed; ``transfer.committed`` is sent and nothing rolls back here.

:data:`SOURCE_TRANSITIONS` and :data:`TARGET_TRANSITIONS` are the whole tables; :meth:`Handoff.advance`
raises :class:`IllegalHandoff` for anything else. :meth:`Handoff.accepts` says which of Atlas's messages
a phase takes (``transfer.abort`` is taken by every phase that is not an end).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Final, Literal

import attrs

from atlas.control.messages import (
    AtlasMessage,
    TransferAbort,
    TransferBegin,
    TransferCommit,
    TransferComplete,
)

if TYPE_CHECKING:
    from atlas.sdk._player import Player

__all__ = [
    "SOURCE_TRANSITIONS",
    "TARGET_TRANSITIONS",
    "Direction",
    "Handoff",
    "IllegalHandoff",
    "Phase",
    "TransferInfo",
]

Direction = Literal["in", "out"]
"""``"out"``: this server is the source (its player leaves); ``"in"``: it is the target."""


class Phase(enum.Enum):
    """Where a transfer stands on this server (see the module docstring)."""

    PREPARING = "preparing"
    NOTIFIED = "notified"
    DRAINING = "draining"
    HANDED_OFF = "handed_off"
    COMPLETED = "completed"
    READY = "ready"
    COMMITTING = "committing"
    COMMITTED = "committed"
    ABORTED = "aborted"


SOURCE_TRANSITIONS: Final[dict[Phase, frozenset[Phase]]] = {
    Phase.PREPARING: frozenset({Phase.NOTIFIED, Phase.ABORTED}),
    Phase.NOTIFIED: frozenset({Phase.DRAINING, Phase.ABORTED}),
    Phase.DRAINING: frozenset({Phase.HANDED_OFF, Phase.ABORTED}),
    Phase.HANDED_OFF: frozenset({Phase.COMPLETED, Phase.ABORTED}),
    Phase.COMPLETED: frozenset(),
    Phase.ABORTED: frozenset(),
}
"""Every allowed transition of the source's side."""

TARGET_TRANSITIONS: Final[dict[Phase, frozenset[Phase]]] = {
    Phase.PREPARING: frozenset({Phase.READY, Phase.ABORTED}),
    Phase.READY: frozenset({Phase.COMMITTING, Phase.ABORTED}),
    Phase.COMMITTING: frozenset({Phase.COMMITTED, Phase.ABORTED}),
    Phase.COMMITTED: frozenset(),
    Phase.ABORTED: frozenset(),
}
"""Every allowed transition of the target's side."""

# Which step message from Atlas each phase takes. A begin that arrives while the source's game is still
# deciding (PREPARING) waits its turn; anything else out of turn is a protocol slip, logged and ignored.
_ACCEPTS: Final[dict[tuple[Direction, Phase], tuple[type[AtlasMessage], ...]]] = {
    ("out", Phase.PREPARING): (TransferBegin,),
    ("out", Phase.NOTIFIED): (TransferBegin,),
    ("out", Phase.HANDED_OFF): (TransferComplete,),
    ("in", Phase.READY): (TransferCommit,),
}


class IllegalHandoff(Exception):
    """A transfer was asked to move to a phase its table does not allow from where it stands."""


@attrs.frozen
class TransferInfo:
    """What a game server is told about a transfer that involves it (given to ``on_transfer_prepare``)."""

    id: str
    """The transfer id (``transfer`` in the protocol)."""
    client: str
    """The client id of the player who moves (``X-Atlas-Client-Id``)."""
    direction: Direction
    """``"out"``: the player leaves this server; ``"in"``: it arrives here."""
    peer: str
    """The other server's name: the target for ``"out"``, the source for ``"in"``."""
    reason: str
    """Why: ``load_balancing``, ``maintenance``, ``region_boundary``, ``failover``, ``admin`` or
    ``client_request``."""
    timeout: float
    """Seconds Atlas gave this step (``timeout_ms`` / 1000); the hook must answer within them."""
    player: Player | None = None
    """The leaving player (direction ``"out"``); ``None`` for ``"in"``: it has no link here yet."""


@attrs.define
class Handoff:
    """The phase of one transfer on this server; :meth:`advance` is the only way to change it."""

    direction: Direction
    phase: Phase = Phase.PREPARING

    @property
    def done(self) -> bool:
        """Whether the transfer has reached an end (completed, committed or aborted)."""
        return not self._table[self.phase]

    @property
    def _table(self) -> dict[Phase, frozenset[Phase]]:
        return SOURCE_TRANSITIONS if self.direction == "out" else TARGET_TRANSITIONS

    def advance(self, phase: Phase) -> None:
        """Move to ``phase``; :class:`IllegalHandoff` if the table does not allow it."""
        if phase not in self._table[self.phase]:
            raise IllegalHandoff(
                f"{self.direction} transfer: {self.phase.value} -> {phase.value} is not allowed"
            )
        self.phase = phase

    def accepts(self, message: AtlasMessage) -> bool:
        """Whether Atlas's ``message`` about this transfer is one this phase takes."""
        if self.done:
            return False
        if isinstance(message, TransferAbort):
            return True
        return isinstance(message, _ACCEPTS.get((self.direction, self.phase), ()))
