"""The lifecycle of one transfer, as an explicit state machine (sans-IO).

A transfer moves one client from a *source* backend to a *target* backend. Its phases, in order::

    REQUESTED ─► PREPARING ─► PREPARED ─► HOLDING ─┬─► HANDING_OFF ─► CUTTING ─► COMMITTING ─┐
                                                   └── (blind) ───────────────────────────────┤
                                                                                              ▼
                                                  COMPLETED ◄─ SWITCHED ◄─────────────────────┘
    any phase before SWITCHED ──► ROLLED_BACK

* PREPARING: both servers are told (``transfer.notice`` to the source, ``transfer.prepare`` to the
  target) and a link to the target is opened;
* PREPARED: the target said ``transfer.ready`` and its link is open;
* HOLDING: the client's messages stop at a message boundary and are held; the number delivered to the
  source is known;
* HANDING_OFF: ``transfer.begin`` went to the source, which answers with the player's state and the
  number of messages it sent the client;
* CUTTING: Atlas relays the source's messages up to that number, and no further;
* COMMITTING: ``transfer.commit`` (with the state) went to the target, which answers ``committed``;
* SWITCHED: the client's link is the target's; held messages flow to it;
* COMPLETED: the source was told (``transfer.complete``) and its link is closed.

A *blind* transfer (a backend without a control channel) goes from HOLDING straight to SWITCHED, at a
message boundary in both directions, without a state handoff. Anything that fails, refuses or times out
before SWITCHED rolls back: the source keeps the client as if nothing happened. After SWITCHED there is
nothing to roll back to. :data:`TRANSITIONS` is the whole table; :meth:`TransferRecord.advance` raises
:class:`IllegalTransition` for anything else.
"""

from __future__ import annotations

import enum
import time
from typing import Final

import attrs

__all__ = ["TRANSITIONS", "IllegalTransition", "Phase", "TransferReason", "TransferRecord"]


class Phase(enum.Enum):
    """Where a transfer stands (see the module docstring)."""

    REQUESTED = "requested"
    PREPARING = "preparing"
    PREPARED = "prepared"
    HOLDING = "holding"
    HANDING_OFF = "handing_off"
    CUTTING = "cutting"
    COMMITTING = "committing"
    SWITCHED = "switched"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"


class TransferReason(enum.Enum):
    """Why a client is moved."""

    LOAD_BALANCING = "load_balancing"
    MAINTENANCE = "maintenance"
    REGION_BOUNDARY = "region_boundary"
    FAILOVER = "failover"
    ADMIN = "admin"
    CLIENT_REQUEST = "client_request"


_BEFORE_SWITCH: Final = frozenset(
    {
        Phase.REQUESTED,
        Phase.PREPARING,
        Phase.PREPARED,
        Phase.HOLDING,
        Phase.HANDING_OFF,
        Phase.CUTTING,
        Phase.COMMITTING,
    }
)

TRANSITIONS: Final[dict[Phase, frozenset[Phase]]] = {
    Phase.REQUESTED: frozenset({Phase.PREPARING, Phase.ROLLED_BACK}),
    Phase.PREPARING: frozenset({Phase.PREPARED, Phase.ROLLED_BACK}),
    Phase.PREPARED: frozenset({Phase.HOLDING, Phase.ROLLED_BACK}),
    Phase.HOLDING: frozenset({Phase.HANDING_OFF, Phase.SWITCHED, Phase.ROLLED_BACK}),
    Phase.HANDING_OFF: frozenset({Phase.CUTTING, Phase.ROLLED_BACK}),
    Phase.CUTTING: frozenset({Phase.COMMITTING, Phase.ROLLED_BACK}),
    Phase.COMMITTING: frozenset({Phase.SWITCHED, Phase.ROLLED_BACK}),
    Phase.SWITCHED: frozenset({Phase.COMPLETED}),
    Phase.COMPLETED: frozenset(),
    Phase.ROLLED_BACK: frozenset(),
}
"""Every allowed transition; nothing else is."""


class IllegalTransition(Exception):
    """A transfer was asked to move to a phase its table does not allow from where it stands."""


@attrs.define(eq=False)
class TransferRecord:
    """One transfer's identity and progress; :meth:`advance` is the only way to change its phase."""

    id: str
    client_id: str
    source: str
    target: str
    reason: TransferReason
    blind: bool
    """The source or the target speaks no control protocol: no state handoff."""
    phase: Phase = Phase.REQUESTED
    started: float = attrs.field(factory=time.monotonic)
    finished: float | None = None
    failure: str | None = None
    """Why it rolled back."""
    history: list[tuple[Phase, float]] = attrs.field(factory=list)

    @property
    def done(self) -> bool:
        """Whether the transfer reached an end (completed or rolled back)."""
        return not TRANSITIONS[self.phase]

    @property
    def can_roll_back(self) -> bool:
        """Whether the source still owns the client (nothing has been switched yet)."""
        return self.phase in _BEFORE_SWITCH

    @property
    def duration(self) -> float:
        """Seconds from the request to the end (or to now, while under way)."""
        return (self.finished if self.finished is not None else time.monotonic()) - self.started

    def advance(self, phase: Phase, *, now: float | None = None) -> None:
        """Move to ``phase``; :class:`IllegalTransition` if the table does not allow it."""
        if phase not in TRANSITIONS[self.phase]:
            raise IllegalTransition(f"transfer {self.id}: {self.phase.value} -> {phase.value} is not allowed")
        at = time.monotonic() if now is None else now
        self.phase = phase
        self.history.append((phase, at))
        if not TRANSITIONS[phase]:
            self.finished = at

    def roll_back(self, why: str, *, now: float | None = None) -> None:
        """End the transfer with the source keeping the client; ``why`` is kept for the answer."""
        self.failure = why
        self.advance(Phase.ROLLED_BACK, now=now)
