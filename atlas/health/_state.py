"""The health state machines of the backends: sans-IO, no ``await``, time passed in as floats.

Theory of operation
-------------------
Each backend's health is three small state machines, each an `enum.Enum`, with every allowed
transition in the one table `_TRANSITIONS` (as h11's ``_state.py`` does):

* `ProbeHealth` (HEALTHY <-> UNHEALTHY) follows the active probes: ``unhealthy_threshold``
  consecutive failed probes make a healthy backend unhealthy, ``healthy_threshold`` consecutive
  successful ones make it healthy again. A result resets the run of the opposite kind.
* `Ejection` (INCLUDED <-> EJECTED) is passive outlier detection: ``consecutive_failures`` connect
  or handshake failures and abnormal closes in a row eject the backend until
  ``now + min(base_ejection_time * 2**(n - 1), max_ejection_time)``, ``n`` being the number of times
  this backend was ejected; the ejection expires when that time has passed. The failure count is
  *not* reset by the ejection: only a success (after the un-ejection, since an ejected backend gets
  no new connections) resets it, so a backend that fails again right after coming back is ejected
  again at once, for twice as long.
* `OperatorState` (IN_SERVICE <-> DRAINING) is the operator's: a draining backend is being emptied
  on purpose. It is still probed and still counts failures.

The pool-wide rule lives in `HealthBook`: at most ``max_ejection_percent`` of the tracked backends
are ejected at once, rounded down, but one ejection is always allowed (Envoy's rule), even with a
single backend or a percentage of 0 (switch ``[outlier] enabled`` off to never eject). A backend that
reaches the failure count while the cap is full stays in rotation; its next failure tries again.
The cap is checked when ejecting: backends leaving the pool later do not un-eject anyone early.

The routing state, `atlas.pool.BackendState`, is derived (`BackendHealth.state`): DRAINING wins
over everything, then UNHEALTHY, then EJECTED, else HEALTHY. A backend is *down* (`BackendHealth.down`)
when it is UNHEALTHY or EJECTED, whether or not it also drains: its live clients should fail over.
Every transition returns a `HealthChange` that says whether the backend just went down.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator, Mapping
from typing import Final, TypeVar, cast

import attrs

from atlas.config import HealthConfig, OutlierConfig
from atlas.errors import AtlasError
from atlas.pool import BackendState

__all__ = [
    "BackendHealth",
    "Ejection",
    "HealthBook",
    "HealthChange",
    "HealthEvent",
    "HealthTransitionError",
    "OperatorState",
    "ProbeHealth",
    "ejection_time",
]


class ProbeHealth(enum.Enum):
    """The verdict of the active probes."""

    #: Passing its probes (the initial state: a new backend is trusted until probes say otherwise).
    HEALTHY = "healthy"
    #: Failed ``unhealthy_threshold`` probes in a row, and has not passed ``healthy_threshold`` since.
    UNHEALTHY = "unhealthy"


class Ejection(enum.Enum):
    """Whether passive outlier detection has taken the backend out of rotation."""

    #: In rotation.
    INCLUDED = "included"
    #: Out of rotation until its ejection time has passed.
    EJECTED = "ejected"


class OperatorState(enum.Enum):
    """The operator's wish for the backend."""

    #: Normal service.
    IN_SERVICE = "in_service"
    #: Being emptied on purpose: no new clients, whatever its health.
    DRAINING = "draining"


class HealthEvent(enum.Enum):
    """What can happen to a backend's health; see `_TRANSITIONS` for where each event is allowed."""

    #: ``unhealthy_threshold`` consecutive probes failed.
    PROBES_FAILED = "probes_failed"
    #: ``healthy_threshold`` consecutive probes succeeded.
    PROBES_PASSED = "probes_passed"
    #: Outlier detection ejected the backend.
    EJECT = "eject"
    #: The ejection time has passed.
    EJECTION_EXPIRED = "ejection_expired"
    #: The operator started draining the backend.
    DRAIN = "drain"
    #: The operator put a draining backend back in service.
    RESUME = "resume"


_State = ProbeHealth | Ejection | OperatorState
_S = TypeVar("_S", ProbeHealth, Ejection, OperatorState)

#: Every allowed transition, in one place: ``(current state, event) -> next state``. Anything else
#: is a bug in the caller and raises `HealthTransitionError`.
_TRANSITIONS: Final[Mapping[tuple[_State, HealthEvent], _State]] = {
    (ProbeHealth.HEALTHY, HealthEvent.PROBES_FAILED): ProbeHealth.UNHEALTHY,
    (ProbeHealth.UNHEALTHY, HealthEvent.PROBES_PASSED): ProbeHealth.HEALTHY,
    (Ejection.INCLUDED, HealthEvent.EJECT): Ejection.EJECTED,
    (Ejection.EJECTED, HealthEvent.EJECTION_EXPIRED): Ejection.INCLUDED,
    (OperatorState.IN_SERVICE, HealthEvent.DRAIN): OperatorState.DRAINING,
    (OperatorState.DRAINING, HealthEvent.RESUME): OperatorState.IN_SERVICE,
}


class HealthTransitionError(AtlasError):
    """An event was applied in a state that does not allow it (a bug in the caller)."""


def _next(state: _S, event: HealthEvent) -> _S:
    """The state ``event`` leads to from ``state``; `HealthTransitionError` if not allowed."""
    try:
        new = _TRANSITIONS[state, event]
    except KeyError:
        raise HealthTransitionError(f"{event.value} is not allowed in state {state.value}") from None
    return cast(_S, new)


def ejection_time(ejections: int, base: float, cap: float) -> float:
    """Seconds of a backend's ``ejections``-th ejection: ``min(base * 2**(ejections - 1), cap)``.

    Exact for any count (no float overflow for a backend ejected thousands of times).

    Raises:
        ValueError: ``ejections`` is below 1.
    """
    if ejections < 1:
        raise ValueError(f"ejections must be >= 1, got {ejections}")
    exponent = ejections - 1
    if base >= cap or exponent > math.log2(cap / base):
        return cap
    return min(math.ldexp(base, exponent), cap)


@attrs.frozen
class HealthChange:
    """One transition of one backend, as reported by `BackendHealth` and `HealthBook`."""

    #: The backend's name.
    name: str
    #: What happened.
    event: HealthEvent
    #: The routing state before the event.
    previous: BackendState
    #: The routing state after it (may equal `previous`: an unhealthy draining backend drains).
    state: BackendState
    #: True when the backend was up (neither UNHEALTHY nor EJECTED) and is now down: its live
    #: clients should fail over.
    went_down: bool
    #: A human-readable reason, for the log line.
    detail: str = ""


@attrs.define(eq=False)
class BackendHealth:
    """The three health machines of one backend, plus the counters that drive them.

    Change it only through its methods (or a `HealthBook`): they keep the counters and the states
    consistent. Counters are consecutive runs: ``probe_successes`` and ``probe_failures`` for the
    active probes, ``passive_failures`` for real traffic.
    """

    name: str
    probe_health: ProbeHealth = ProbeHealth.HEALTHY
    ejection: Ejection = Ejection.INCLUDED
    operator: OperatorState = OperatorState.IN_SERVICE
    probe_successes: int = 0
    probe_failures: int = 0
    last_probe_failure: str = ""
    passive_failures: int = 0
    #: How many times this backend has been ejected (the ``n`` of the back-off).
    ejections: int = 0
    #: When the current ejection ends, or None when not ejected.
    ejected_until: float | None = None
    #: When the last heartbeat arrived, or None for a backend that does not send heartbeats.
    last_heartbeat: float | None = None

    @classmethod
    def from_state(cls, name: str, state: BackendState) -> BackendHealth:
        """A fresh record for a backend currently in ``state``.

        DRAINING and UNHEALTHY are kept; EJECTED, which needs an ejection time, starts HEALTHY.
        """
        health = cls(name)
        if state is BackendState.DRAINING:
            health.operator = OperatorState.DRAINING
        elif state is BackendState.UNHEALTHY:
            health.probe_health = ProbeHealth.UNHEALTHY
        return health

    @property
    def state(self) -> BackendState:
        """The routing state: DRAINING, else UNHEALTHY, else EJECTED, else HEALTHY."""
        if self.operator is OperatorState.DRAINING:
            return BackendState.DRAINING
        if self.probe_health is ProbeHealth.UNHEALTHY:
            return BackendState.UNHEALTHY
        if self.ejection is Ejection.EJECTED:
            return BackendState.EJECTED
        return BackendState.HEALTHY

    @property
    def down(self) -> bool:
        """Whether the backend failed its probes or was ejected (draining or not)."""
        return self.probe_health is ProbeHealth.UNHEALTHY or self.ejection is Ejection.EJECTED

    @property
    def registered(self) -> bool:
        """Whether the backend sends heartbeats (at least one was recorded)."""
        return self.last_heartbeat is not None

    def apply(self, event: HealthEvent, detail: str = "") -> HealthChange:
        """Apply ``event`` through the transition table and report the change.

        Raises:
            HealthTransitionError: ``event`` is not allowed in the backend's current states.
        """
        previous, was_down = self.state, self.down
        for current in (self.probe_health, self.ejection, self.operator):
            if (current, event) in _TRANSITIONS:
                break
        else:
            states = f"{self.probe_health.value}, {self.ejection.value}, {self.operator.value}"
            raise HealthTransitionError(f"{self.name}: {event.value} is not allowed in states {states}")
        if isinstance(current, ProbeHealth):
            self.probe_health = _next(current, event)
        elif isinstance(current, Ejection):
            self.ejection = _next(current, event)
        else:
            self.operator = _next(current, event)
        return HealthChange(
            name=self.name,
            event=event,
            previous=previous,
            state=self.state,
            went_down=self.down and not was_down,
            detail=detail,
        )

    # -- active probes ----------------------------------------------------------------------------

    def probe_succeeded(self, healthy_threshold: int) -> HealthChange | None:
        """Record a successful probe; the change when it completes a run of ``healthy_threshold``."""
        self.probe_failures = 0
        self.probe_successes += 1
        if self.probe_health is ProbeHealth.UNHEALTHY and self.probe_successes >= healthy_threshold:
            return self.apply(HealthEvent.PROBES_PASSED, f"{self.probe_successes} probes in a row passed")
        return None

    def probe_failed(self, unhealthy_threshold: int, reason: str = "") -> HealthChange | None:
        """Record a failed probe; the change when it completes a run of ``unhealthy_threshold``."""
        self.probe_successes = 0
        self.probe_failures += 1
        self.last_probe_failure = reason
        if self.probe_health is ProbeHealth.HEALTHY and self.probe_failures >= unhealthy_threshold:
            detail = f"{self.probe_failures} probes in a row failed"
            return self.apply(HealthEvent.PROBES_FAILED, f"{detail} (last: {reason})" if reason else detail)
        return None

    # -- passive outlier detection ----------------------------------------------------------------

    def passive_failed(self) -> int:
        """Count one connect/handshake failure or abnormal close; returns the consecutive count."""
        self.passive_failures += 1
        return self.passive_failures

    def passive_succeeded(self) -> None:
        """A connection to the backend succeeded: the run of passive failures is over."""
        self.passive_failures = 0

    def eject(self, now: float, base: float, cap: float) -> HealthChange:
        """Eject the backend for its back-off time from ``now``.

        Raises:
            HealthTransitionError: it is already ejected.
        """
        ejections = self.ejections + 1
        duration = ejection_time(ejections, base, cap)
        detail = f"{self.passive_failures} failures in a row; ejection {ejections} for {duration:g} s"
        change = self.apply(HealthEvent.EJECT, detail)
        self.ejections = ejections
        self.ejected_until = now + duration
        return change

    def expire(self, now: float) -> HealthChange | None:
        """End the ejection if its time has come (``now >= ejected_until``); else None."""
        if self.ejected_until is None or now < self.ejected_until:
            return None
        self.ejected_until = None
        return self.apply(HealthEvent.EJECTION_EXPIRED, f"ejection {self.ejections} is over")

    # -- heartbeats -------------------------------------------------------------------------------

    def heartbeat(self, now: float) -> None:
        """Record a heartbeat (the first one makes the backend a registered one)."""
        self.last_heartbeat = now

    def heartbeat_deadline(self, timeout: float) -> float | None:
        """When the heartbeats count as stopped, or None if the backend sends none."""
        return None if self.last_heartbeat is None else self.last_heartbeat + timeout

    def heartbeat_stale(self, now: float, timeout: float) -> bool:
        """Whether a registered backend has sent no heartbeat for ``timeout`` seconds."""
        deadline = self.heartbeat_deadline(timeout)
        return deadline is not None and now >= deadline

    def should_drop(self, now: float, timeout: float) -> bool:
        """Whether a registered backend is gone: heartbeats stopped *and* its probes failed."""
        return self.probe_health is ProbeHealth.UNHEALTHY and self.heartbeat_stale(now, timeout)


class HealthBook:
    """The health of every tracked backend, and the pool-wide ejection cap.

    Sans-IO: every method takes the time it needs and returns what changed, if anything. The
    thresholds come from the ``[health]`` and ``[outlier]`` tables.
    """

    def __init__(self, health: HealthConfig, outlier: OutlierConfig) -> None:
        self.health = health
        self.outlier = outlier
        self._backends: dict[str, BackendHealth] = {}

    # -- membership -------------------------------------------------------------------------------

    def add(self, name: str, state: BackendState = BackendState.HEALTHY) -> BackendHealth:
        """Track a backend now in ``state`` (see `BackendHealth.from_state`).

        Raises:
            ValueError: ``name`` is already tracked.
        """
        if name in self._backends:
            raise ValueError(f"backend {name!r} is already tracked")
        health = self._backends[name] = BackendHealth.from_state(name, state)
        return health

    def remove(self, name: str) -> BackendHealth | None:
        """Stop tracking ``name``; returns its record, or None if it was not tracked."""
        return self._backends.pop(name, None)

    def get(self, name: str) -> BackendHealth | None:
        """The record of ``name``, or None."""
        return self._backends.get(name)

    def __getitem__(self, name: str) -> BackendHealth:
        return self._backends[name]

    def __contains__(self, name: object) -> bool:
        return name in self._backends

    def __len__(self) -> int:
        return len(self._backends)

    def __iter__(self) -> Iterator[BackendHealth]:
        return iter(tuple(self._backends.values()))

    # -- the ejection cap -------------------------------------------------------------------------

    @property
    def ejected(self) -> int:
        """How many tracked backends are ejected now."""
        return sum(1 for b in self._backends.values() if b.ejection is Ejection.EJECTED)

    @property
    def ejection_limit(self) -> int:
        """Most backends that may be ejected at once: ``max_ejection_percent`` of them, at least 1."""
        return max(1, len(self._backends) * self.outlier.max_ejection_percent // 100)

    # -- events -----------------------------------------------------------------------------------

    def probe_succeeded(self, name: str) -> HealthChange | None:
        """Record a successful probe of ``name`` (KeyError if untracked)."""
        return self._backends[name].probe_succeeded(self.health.healthy_threshold)

    def probe_failed(self, name: str, reason: str = "") -> HealthChange | None:
        """Record a failed (or timed-out) probe of ``name`` (KeyError if untracked)."""
        return self._backends[name].probe_failed(self.health.unhealthy_threshold, reason)

    def passive_failed(self, name: str, now: float) -> HealthChange | None:
        """Record a connect/handshake failure or abnormal close; eject when the rules say so.

        Does nothing when ``[outlier] enabled`` is off. Ejects when the consecutive count reaches
        ``consecutive_failures``, the backend is not ejected yet, and the cap has room.
        """
        if not self.outlier.enabled:
            return None
        backend = self._backends[name]
        count = backend.passive_failed()
        if (
            count < self.outlier.consecutive_failures
            or backend.ejection is Ejection.EJECTED
            or self.ejected >= self.ejection_limit
        ):
            return None
        return backend.eject(now, self.outlier.base_ejection_time, self.outlier.max_ejection_time)

    def passive_succeeded(self, name: str) -> None:
        """Record a successful connection to ``name``: its run of passive failures is over."""
        self._backends[name].passive_succeeded()

    def expire(self, name: str, now: float) -> HealthChange | None:
        """Un-eject ``name`` if its ejection time has passed."""
        return self._backends[name].expire(now)

    def drain(self, name: str) -> HealthChange | None:
        """The operator drains ``name``; None if it already drains."""
        backend = self._backends[name]
        if backend.operator is OperatorState.DRAINING:
            return None
        return backend.apply(HealthEvent.DRAIN, "drained by the operator")

    def resume(self, name: str) -> HealthChange | None:
        """The operator puts ``name`` back in service; None if it was not draining."""
        backend = self._backends[name]
        if backend.operator is OperatorState.IN_SERVICE:
            return None
        return backend.apply(HealthEvent.RESUME, "back in service")

    def heartbeat(self, name: str, now: float) -> None:
        """Record a heartbeat from ``name`` (KeyError if untracked)."""
        self._backends[name].heartbeat(now)
