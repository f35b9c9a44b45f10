"""The health nursery: one checker task per backend, started and cancelled as backends come and go.

Theory of operation
-------------------
:func:`serve_health_checks` owns the health nursery. It keeps one checker per backend the monitor
tracks, keyed by the backend's record (a backend removed and re-added under the same name gets a new
checker). Each checker runs in a cancel scope it hands back through ``task_status.started(scope)``;
when the monitor's membership Event fires, the loop reconciles: it cancels the checkers of backends
that left and starts checkers for backends that joined.

A checker sleeps until the earliest of three times, or until the monitor says its backend changed:

* its next probe (every ``interval`` plus up to ``jitter`` random seconds, the first one within
  ``jitter`` of its start), when active checks are on, or when the backend is registered and its
  heartbeats stopped (then it is probed even with active checks off);
* the end of the backend's ejection, to put it back in rotation;
* the backend's heartbeat deadline, to start probing a registered server that went quiet.

A probe is bounded by ``timeout``; its result goes to the monitor, which changes the state, logs,
counts and calls ``on_backend_down``. A registered backend whose heartbeats stopped and whose probes
failed is dropped: drained with ``remove=True``, so it leaves the pool once its clients are gone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from typing import TYPE_CHECKING

import attrs
import trio

from atlas.health._probes import ProbeReport, ProbeResult, run_probe
from atlas.pool import Backend

if TYPE_CHECKING:
    from atlas.runtime import Runtime

__all__ = ["serve_health_checks"]

log = logging.getLogger("atlas.health")


async def serve_health_checks(
    runtime: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run one health checker per backend of ``runtime.health`` until cancelled.

    Reports readiness once a checker runs for every backend present at the start. Backends added or
    removed later (through the runtime) get their checker started or cancelled.
    """
    monitor = runtime.health
    checkers: dict[str, _Checker] = {}
    async with trio.open_nursery() as nursery:
        ready = False
        while True:
            changed = monitor.membership_changed()  # taken first: changes from here on wake us
            members = monitor.members()
            for name, checker in list(checkers.items()):
                # A checker also ends by itself when it sees its backend gone; if the same record
                # came back meanwhile, it needs a new one.
                if not checker.running or members.get(name) is not checker.backend:
                    checker.scope.cancel()
                    del checkers[name]
            for name, backend in members.items():
                if name not in checkers:
                    checker = _Checker(backend)
                    checker.scope = await nursery.start(_serve_checker, runtime, checker)
                    checkers[name] = checker
            if not ready:
                task_status.started()
                ready = True
            await changed.wait()


@attrs.define(eq=False)
class _Checker:
    """One backend's checker task, as its owner sees it."""

    backend: Backend
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    running: bool = True


async def _serve_checker(
    runtime: Runtime, checker: _Checker, *, task_status: trio.TaskStatus[trio.CancelScope]
) -> None:
    """Check one backend until its scope (handed to the caller) is cancelled or it leaves the monitor."""
    try:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await _check(runtime, checker.backend)
    finally:
        checker.running = False


async def _check(runtime: Runtime, backend: Backend) -> None:
    monitor = runtime.health
    config = monitor.health
    name = backend.name
    next_probe = trio.current_time() + random.uniform(0, config.jitter)
    dropping = False
    while monitor.tracks(backend):
        monitor.expire_ejection(backend)
        if not dropping and monitor.should_drop(name):
            dropping = True
            _drop(runtime, backend)
            continue
        probing = config.enabled or monitor.heartbeat_stale(name)
        if probing and trio.current_time() >= next_probe:
            report = await _probe(runtime, backend)
            monitor.probe_finished(backend, report)
            next_probe = trio.current_time() + config.interval + random.uniform(0, config.jitter)
            continue
        wake_at = min(next_probe if probing else math.inf, monitor.next_deadline(name))
        changed = monitor.changed(name)
        with trio.move_on_at(wake_at):
            await changed.wait()


async def _probe(runtime: Runtime, backend: Backend) -> ProbeReport:
    """One probe of ``backend``; an unexpected error counts as a failure (and is logged)."""
    config = runtime.health.health
    ssl_context = runtime.backend_ssl_context() if backend.secure else None
    try:
        report = await run_probe(
            config.probe, backend, path=config.path, time_limit=config.timeout, ssl_context=ssl_context
        )
    except Exception as exc:  # this backend's checker is the boundary: one bad probe must not stop them all
        log.exception("health probe of backend %s crashed", backend.name, extra={"server": backend.name})
        return ProbeReport(ProbeResult.FAILURE, f"probe error: {exc!r}")
    if report.result is not ProbeResult.SUCCESS:
        log.debug(
            "health probe of backend %s: %s: %s",
            backend.name,
            report.result.value,
            report.detail,
            extra={"server": backend.name},
        )
    return report


def _drop(runtime: Runtime, backend: Backend) -> None:
    """Drop a registered backend that stopped its heartbeats and fails its probes."""
    log.warning(
        "backend %s sends no heartbeats and fails its health checks: removing it once its clients left",
        backend.name,
        extra={"server": backend.name, "event": "dropped"},
    )
    with contextlib.suppress(KeyError):  # already out of the pool
        runtime.drain_backend(backend.name, remove=True)
