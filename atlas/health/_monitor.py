"""The health monitor: the one object the rest of Atlas tells about a backend's health.

`HealthMonitor` wraps the sans-IO `HealthBook` with what the process needs around it: it writes each
backend's routing state to its `Backend` record, logs one line per change, counts ejections and probe
results in the metrics, and calls `HealthMonitor.on_backend_down` when a backend with live clients
stops being usable. All its methods are synchronous, so the data plane can report a failed connect
without a checkpoint; the checkers (``_checker.py``) learn about changes through trio Events that
these methods set.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import attrs
import trio

from atlas.config import HealthConfig, OutlierConfig
from atlas.health._probes import ProbeReport, ProbeResult
from atlas.health._state import BackendHealth, HealthBook, HealthChange, HealthEvent
from atlas.pool import Backend, BackendState

if TYPE_CHECKING:
    from atlas.ops.metrics import AtlasMetrics

__all__ = ["HealthMonitor", "HealthStatistics"]

log = logging.getLogger("atlas.health")

_VERBS = {
    HealthEvent.PROBES_FAILED: "failed its health checks",
    HealthEvent.PROBES_PASSED: "passed its health checks",
    HealthEvent.EJECT: "ejected",
    HealthEvent.EJECTION_EXPIRED: "back in rotation",
    HealthEvent.DRAIN: "draining",
    HealthEvent.RESUME: "back in service",
}
_WARNINGS = frozenset({HealthEvent.PROBES_FAILED, HealthEvent.EJECT})


def _ignore(_backend: Backend) -> None:
    """The default `HealthMonitor.on_backend_down`: nobody is listening."""


@attrs.frozen
class HealthStatistics:
    """A snapshot of a `HealthMonitor` (see `HealthMonitor.statistics`)."""

    #: Backends tracked.
    backends: int
    #: Backends per routing state (each backend is counted once, under its `Backend.state`).
    healthy: int
    unhealthy: int
    ejected: int
    draining: int
    #: Backends down (failed probes or ejected), draining or not: more than unhealthy + ejected
    #: when a draining backend is down.
    down: int
    #: Backends that send heartbeats.
    registered: int
    #: Backends ejected by outlier detection now (draining or unhealthy ones included), and the
    #: most that may be at once.
    ejections_active: int
    ejection_limit: int


class HealthMonitor:
    """Health of every backend: passive signals in, routing states and ``on_backend_down`` out.

    One per process, on ``runtime.health``; the runtime tells it about membership
    (`backend_added`, `backend_removed`, `backend_drained`), the data plane about real connections
    (`connect_failed`, `connect_succeeded`, `abnormal_close`), the ops plane about heartbeats, and
    the checkers of `serve_health_checks` about probes. The monitor owns ``Backend.state`` of the
    backends it tracks: it rewrites it at every change.

    ``clock`` gives the current time (trio's clock by default). ``metrics`` may be None in tests.
    """

    def __init__(
        self,
        health: HealthConfig,
        outlier: OutlierConfig,
        *,
        metrics: AtlasMetrics | None = None,
        backends: Iterable[Backend] = (),
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._book = HealthBook(health, outlier)
        #: Called (synchronously) with the backend's record when a backend goes down: its probes
        #: failed or it was ejected, while it was neither before. Draining backends included, so
        #: their clients fail over too. The supervisor sets it; exceptions are logged, not raised.
        self.on_backend_down: Callable[[Backend], None] = _ignore
        self._metrics = metrics
        self._clock = clock
        self._backends: dict[str, Backend] = {}
        self._wakeups: dict[str, trio.Event] = {}
        self._membership = trio.Event()
        for backend in backends:
            self.backend_added(backend)

    @property
    def health(self) -> HealthConfig:
        """The ``[health]`` settings in use."""
        return self._book.health

    @property
    def outlier(self) -> OutlierConfig:
        """The ``[outlier]`` settings in use."""
        return self._book.outlier

    # -- membership (the runtime calls these) -----------------------------------------------------

    def backend_added(self, backend: Backend) -> None:
        """Track ``backend``, starting from its current state; its checker starts soon after.

        A different record under the same name replaces the old one; the same record is a no-op.
        """
        name = backend.name
        current = self._backends.get(name)
        if current is backend:
            return
        if current is not None:
            self._forget(name)
        self._book.add(name, backend.state)
        self._backends[name] = backend
        self._wakeups[name] = trio.Event()
        backend.state = self._book[name].state
        self._membership_changed()

    def backend_removed(self, name: str) -> None:
        """Stop tracking ``name`` (its checker is cancelled); unknown names are ignored."""
        if name in self._backends:
            self._forget(name)
            self._membership_changed()

    def backend_drained(self, backend: Backend) -> None:
        """The operator drains ``backend``: it takes no new clients, whatever its health."""
        if not self.tracks(backend):
            self.backend_added(backend)
        self._handle(backend, self._book.drain(backend.name))

    def backend_resumed(self, backend: Backend) -> None:
        """The operator puts a draining ``backend`` back in service (its health decides again)."""
        if not self.tracks(backend):
            self.backend_added(backend)
        self._handle(backend, self._book.resume(backend.name))

    # -- passive signals (the data plane calls these) ---------------------------------------------

    def connect_failed(self, backend: Backend) -> None:
        """A connection or WebSocket handshake to ``backend`` failed (or timed out)."""
        self._passive_failure(backend)

    def abnormal_close(self, backend: Backend) -> None:
        """A connection to ``backend`` ended without a Close frame from it."""
        self._passive_failure(backend)

    def connect_succeeded(self, backend: Backend) -> None:
        """A connection and handshake to ``backend`` succeeded: its run of failures is over."""
        if self.tracks(backend):
            self._book.passive_succeeded(backend.name)

    def _passive_failure(self, backend: Backend) -> None:
        # Records that left the pool still have clients reporting on them: ignore those.
        if self.tracks(backend):
            self._handle(backend, self._book.passive_failed(backend.name, self._clock()))

    # -- heartbeats (the ops plane calls these) ---------------------------------------------------

    def track_heartbeats(self, name: str) -> None:
        """Expect heartbeats from ``name`` from now on (registration counts as the first one).

        Raises:
            KeyError: ``name`` is not tracked (add the backend first).
        """
        if name not in self._backends:
            raise KeyError(name)
        self._book.heartbeat(name, self._clock())
        self._wake(name)

    def heartbeat(self, name: str) -> bool:
        """Record a heartbeat from ``name``; False if no such backend is tracked.

        The first heartbeat makes the backend a *registered* one: when its heartbeats stop for
        ``heartbeat_timeout`` seconds it is probed, and dropped once the probes fail.
        """
        if name not in self._backends:
            return False
        self._book.heartbeat(name, self._clock())
        self._wake(name)
        return True

    # -- the checkers' side -----------------------------------------------------------------------

    def probe_finished(self, backend: Backend, report: ProbeReport) -> None:
        """Count one probe of ``backend`` and apply its result to the health state."""
        if self._metrics is not None:
            self._metrics.health_checks.labels(backend.name, report.result.value).inc()
        if not self.tracks(backend):
            return
        if report.result is ProbeResult.SUCCESS:
            change = self._book.probe_succeeded(backend.name)
        else:
            change = self._book.probe_failed(backend.name, report.detail)
        self._handle(backend, change)

    def expire_ejection(self, backend: Backend) -> None:
        """Put ``backend`` back in rotation if its ejection time has passed."""
        if self.tracks(backend):
            self._handle(backend, self._book.expire(backend.name, self._clock()))

    def heartbeat_stale(self, name: str) -> bool:
        """Whether ``name`` is registered and sent no heartbeat for ``heartbeat_timeout`` seconds."""
        health = self._book.get(name)
        return health is not None and health.heartbeat_stale(self._clock(), self.health.heartbeat_timeout)

    def should_drop(self, name: str) -> bool:
        """Whether ``name`` is registered, its heartbeats stopped, and its probes say it is gone."""
        health = self._book.get(name)
        return health is not None and health.should_drop(self._clock(), self.health.heartbeat_timeout)

    def next_deadline(self, name: str) -> float:
        """When ``name``'s checker must look again: its ejection's end or its heartbeat deadline.

        ``math.inf`` when there is neither (probes have their own schedule).
        """
        health = self._book.get(name)
        if health is None:
            return math.inf
        now = self._clock()
        times = [math.inf]
        if health.ejected_until is not None:
            times.append(health.ejected_until)
        heartbeat = health.heartbeat_deadline(self.health.heartbeat_timeout)
        if heartbeat is not None and heartbeat > now:
            times.append(heartbeat)
        return min(times)

    def changed(self, name: str) -> trio.Event:
        """An Event set at the next change of ``name``'s health (a fresh one after each change)."""
        event = self._wakeups.get(name)
        if event is None:  # untracked: a stale checker must not wait for changes that never come
            event = trio.Event()
            event.set()
        return event

    def membership_changed(self) -> trio.Event:
        """An Event set at the next change of the tracked backends (a fresh one after each change)."""
        return self._membership

    def members(self) -> dict[str, Backend]:
        """A snapshot of the tracked backends, by name."""
        return dict(self._backends)

    # -- reading ----------------------------------------------------------------------------------

    def tracks(self, backend: Backend) -> bool:
        """Whether ``backend`` is the record tracked under its name."""
        return self._backends.get(backend.name) is backend

    def get(self, name: str) -> BackendHealth | None:
        """The health record of ``name`` (read it, do not change it), or None."""
        return self._book.get(name)

    def statistics(self) -> HealthStatistics:
        """A snapshot of the health of the tracked backends."""
        records = list(self._book)
        states = collections.Counter(health.state for health in records)
        return HealthStatistics(
            backends=len(records),
            healthy=states[BackendState.HEALTHY],
            unhealthy=states[BackendState.UNHEALTHY],
            ejected=states[BackendState.EJECTED],
            draining=states[BackendState.DRAINING],
            down=sum(1 for h in records if h.down),
            registered=sum(1 for h in records if h.registered),
            ejections_active=self._book.ejected,
            ejection_limit=self._book.ejection_limit,
        )

    # -- internals --------------------------------------------------------------------------------

    def _forget(self, name: str) -> None:
        self._book.remove(name)
        del self._backends[name]
        self._wakeups.pop(name).set()

    def _wake(self, name: str) -> None:
        event = self._wakeups.get(name)
        if event is not None:
            event.set()
            self._wakeups[name] = trio.Event()

    def _membership_changed(self) -> None:
        self._membership.set()
        self._membership = trio.Event()

    def _handle(self, backend: Backend, change: HealthChange | None) -> None:
        """Make ``change`` visible: routing state first, then the log, metrics, checker, callback."""
        if change is None:
            return
        backend.state = change.state
        level = logging.WARNING if change.event in _WARNINGS else logging.INFO
        log.log(
            level,
            "backend %s %s: %s (%s -> %s)",
            change.name,
            _VERBS[change.event],
            change.detail,
            change.previous.value,
            change.state.value,
            extra={"server": change.name, "event": "health", "state": change.state.value},
        )
        if change.event is HealthEvent.EJECT and self._metrics is not None:
            self._metrics.ejections.labels(change.name).inc()
        self._wake(change.name)
        if change.went_down:
            try:
                self.on_backend_down(backend)
            except Exception:  # the callback's bug must not break the caller (a client's task)
                log.exception("on_backend_down failed for backend %s", change.name)
