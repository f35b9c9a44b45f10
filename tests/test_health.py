"""Tests for backend health: the sans-IO state machines, the monitor, the probes and the checkers.

Checker tests run on virtual time (``autojump_clock``) against in-process backends on 127.0.0.1:0: a
trio-websocket echo server, a raw h11 HTTP responder, and a "hung" TCP listener that accepts and never
answers. None of them waits on another process, so virtual time and real sockets mix safely.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import h11
import pytest
import trio
from hypothesis import event, given
from hypothesis import strategies as st
from trio.testing import MockClock
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

from atlas.config import Config, HealthConfig, OutlierConfig, ProxyConfig, ServerConfig
from atlas.health import (
    HEALTH_CHECK_HEADER,
    BackendHealth,
    Ejection,
    HealthBook,
    HealthEvent,
    HealthMonitor,
    HealthTransitionError,
    OperatorState,
    ProbeHealth,
    ProbeReport,
    ProbeResult,
    ejection_time,
    probe_headers,
    probe_target,
    run_probe,
    serve_health_checks,
)
from atlas.pool import Backend, BackendState
from atlas.proxy.listener import serve_proxy
from atlas.runtime import Runtime

# --------------------------------------------------------------------------------------------------
# Helpers


def _health(**overrides: Any) -> HealthConfig:
    settings: dict[str, Any] = {"interval": 1.0, "timeout": 0.5, "jitter": 0.0, **overrides}
    return HealthConfig(**settings)


def _runtime(
    servers: dict[str, str],
    *,
    health: HealthConfig | None = None,
    outlier: OutlierConfig | None = None,
    proxy: ProxyConfig | None = None,
) -> Runtime:
    config = Config(
        proxy=proxy or ProxyConfig(listen="127.0.0.1:0"),
        servers=tuple(ServerConfig(name=name, url=url) for name, url in servers.items()),
        health=health or _health(),
        outlier=outlier or OutlierConfig(),
    )
    return Runtime.from_config(config)


def _state(record: Backend | BackendHealth) -> BackendState:
    """The record's routing state (a call, so that mypy does not narrow it between two checks)."""
    return record.state


def _checks(runtime: Runtime, name: str, result: str) -> float:
    value = runtime.metrics.registry.get_sample_value(
        "atlas_health_checks_total", {"server": name, "result": result}
    )
    return value or 0.0


def _ejections(runtime: Runtime, name: str) -> float:
    value = runtime.metrics.registry.get_sample_value("atlas_ejections_total", {"server": name})
    return value or 0.0


@attrs.define
class DownRecorder:
    """An ``on_backend_down`` callback that remembers its calls and can be waited on."""

    calls: list[tuple[str, float]] = attrs.field(factory=list)
    event: trio.Event = attrs.field(factory=trio.Event)

    def __call__(self, backend: Backend) -> None:
        self.calls.append((backend.name, trio.current_time()))
        self.event.set()

    async def wait(self, limit: float = 60.0) -> None:
        with trio.fail_after(limit):
            await self.event.wait()


@pytest.fixture
def health_log() -> Iterator[list[logging.LogRecord]]:
    """Records of the ``atlas.health`` logger (whatever other tests did to the ``atlas`` logger)."""
    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("atlas.health")
    handler = _Keep(logging.DEBUG)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@attrs.define
class Tally:
    """A count that tests can wait on."""

    count: int = 0
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def add(self) -> None:
        self.count += 1
        self._changed.set()
        self._changed = trio.Event()

    async def reach(self, count: int, limit: float = 10.0) -> None:
        with trio.fail_after(limit):
            while self.count < count:
                await self._changed.wait()


@attrs.define
class HungStats:
    accepted: int = 0
    closed_by_prober: Tally = attrs.field(factory=Tally)


@asynccontextmanager
async def hung_backend() -> AsyncIterator[tuple[int, HungStats]]:
    """A TCP listener that accepts, reads whatever comes, and never answers."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = int(listeners[0].socket.getsockname()[1])
    stats = HungStats()

    async def handler(stream: trio.SocketStream) -> None:
        stats.accepted += 1
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):
                while await stream.receive_some():
                    pass
        stats.closed_by_prober.add()

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        yield port, stats
        nursery.cancel_scope.cancel()


@attrs.define
class WsStats:
    requests: list[tuple[str, dict[bytes, bytes]]] = attrs.field(factory=list)
    closes: list[CloseReason | None] = attrs.field(factory=list)
    closed: Tally = attrs.field(factory=Tally)


@asynccontextmanager
async def ws_backend() -> AsyncIterator[tuple[int, WsStats]]:
    """A trio-websocket echo server that records each request and how each connection closed."""
    stats = WsStats()

    async def handler(request: WebSocketRequest) -> None:
        stats.requests.append((request.path, dict(request.headers)))
        ws = await request.accept()
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except ConnectionClosed as exc:
            stats.closes.append(exc.reason)
            stats.closed.add()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        yield server.port, stats
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def http_backend(status: Callable[[], int]) -> AsyncIterator[tuple[int, list[h11.Request]]]:
    """A raw h11 responder: every request is answered with ``status()`` and an empty body."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = int(listeners[0].socket.getsockname()[1])
    requests: list[h11.Request] = []

    async def handler(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some())
                    continue
                break
            assert isinstance(event, h11.Request)
            requests.append(event)
            headers = [(b"content-length", b"0"), (b"connection", b"close")]
            data = conn.send(h11.Response(status_code=status(), headers=headers)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(data)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        yield port, requests
        nursery.cancel_scope.cancel()


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def health_checks(runtime: Runtime) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_health_checks, runtime)
        yield
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------------------------------
# Sans-IO: the transition table


_EXPECTED_TABLE = {
    (ProbeHealth.HEALTHY, HealthEvent.PROBES_FAILED): ProbeHealth.UNHEALTHY,
    (ProbeHealth.UNHEALTHY, HealthEvent.PROBES_PASSED): ProbeHealth.HEALTHY,
    (Ejection.INCLUDED, HealthEvent.EJECT): Ejection.EJECTED,
    (Ejection.EJECTED, HealthEvent.EJECTION_EXPIRED): Ejection.INCLUDED,
    (OperatorState.IN_SERVICE, HealthEvent.DRAIN): OperatorState.DRAINING,
    (OperatorState.DRAINING, HealthEvent.RESUME): OperatorState.IN_SERVICE,
}


@pytest.mark.parametrize("event", list(HealthEvent))
@pytest.mark.parametrize("probe", list(ProbeHealth))
@pytest.mark.parametrize("ejection", list(Ejection))
@pytest.mark.parametrize("operator", list(OperatorState))
def test_transition_table(
    event: HealthEvent, probe: ProbeHealth, ejection: Ejection, operator: OperatorState
) -> None:
    health = BackendHealth("b", probe_health=probe, ejection=ejection, operator=operator)
    allowed = [state for state in (probe, ejection, operator) if (state, event) in _EXPECTED_TABLE]
    if not allowed:
        with pytest.raises(HealthTransitionError):
            health.apply(event)
        assert (health.probe_health, health.ejection, health.operator) == (probe, ejection, operator)
        return
    change = health.apply(event)
    (moved,) = allowed
    new = _EXPECTED_TABLE[moved, event]
    assert new in (health.probe_health, health.ejection, health.operator)
    assert change.event is event
    assert change.state is health.state


@pytest.mark.parametrize(
    ("probe", "ejection", "operator", "state", "down"),
    [
        (ProbeHealth.HEALTHY, Ejection.INCLUDED, OperatorState.IN_SERVICE, BackendState.HEALTHY, False),
        (ProbeHealth.UNHEALTHY, Ejection.INCLUDED, OperatorState.IN_SERVICE, BackendState.UNHEALTHY, True),
        (ProbeHealth.HEALTHY, Ejection.EJECTED, OperatorState.IN_SERVICE, BackendState.EJECTED, True),
        (ProbeHealth.UNHEALTHY, Ejection.EJECTED, OperatorState.IN_SERVICE, BackendState.UNHEALTHY, True),
        (ProbeHealth.HEALTHY, Ejection.INCLUDED, OperatorState.DRAINING, BackendState.DRAINING, False),
        (ProbeHealth.UNHEALTHY, Ejection.EJECTED, OperatorState.DRAINING, BackendState.DRAINING, True),
    ],
)
def test_routing_state_is_derived(
    probe: ProbeHealth, ejection: Ejection, operator: OperatorState, state: BackendState, down: bool
) -> None:
    health = BackendHealth("b", probe_health=probe, ejection=ejection, operator=operator)
    assert health.state is state
    assert health.down is down


def test_from_state_keeps_draining_and_unhealthy() -> None:
    assert BackendHealth.from_state("b", BackendState.DRAINING).state is BackendState.DRAINING
    assert BackendHealth.from_state("b", BackendState.UNHEALTHY).state is BackendState.UNHEALTHY
    assert BackendHealth.from_state("b", BackendState.EJECTED).state is BackendState.HEALTHY


# --------------------------------------------------------------------------------------------------
# Sans-IO: active probes


@given(
    unhealthy=st.integers(1, 5),
    healthy=st.integers(1, 5),
    start=st.sampled_from([BackendState.HEALTHY, BackendState.UNHEALTHY]),
    results=st.lists(st.booleans(), max_size=60),
)
def test_probe_health_changes_exactly_after_the_threshold_run(
    unhealthy: int, healthy: int, start: BackendState, results: list[bool]
) -> None:
    health = BackendHealth.from_state("b", start)
    successes = failures = 0
    for ok in results:
        before = health.probe_health
        if ok:
            change = health.probe_succeeded(healthy)
            successes, failures = successes + 1, 0
        else:
            change = health.probe_failed(unhealthy, "refused")
            successes, failures = 0, failures + 1
        after = health.probe_health
        if after is before:
            assert change is None
        else:
            assert change is not None
            if ok:
                assert (before, change.event, successes) == (
                    ProbeHealth.UNHEALTHY,
                    HealthEvent.PROBES_PASSED,
                    healthy,
                )
            else:
                assert (before, change.event, failures) == (
                    ProbeHealth.HEALTHY,
                    HealthEvent.PROBES_FAILED,
                    unhealthy,
                )
            assert change.went_down is (not ok)
        # A long enough run always decides, whatever came before it.
        if failures >= unhealthy:
            assert after is ProbeHealth.UNHEALTHY
        if successes >= healthy:
            assert after is ProbeHealth.HEALTHY
        assert (health.probe_successes, health.probe_failures) == (successes, failures)


def test_probe_failure_detail_names_the_last_reason() -> None:
    health = BackendHealth("b")
    assert health.probe_failed(2, "refused") is None
    change = health.probe_failed(2, "no answer within 2 s")
    assert change is not None
    assert change.detail == "2 probes in a row failed (last: no answer within 2 s)"
    assert (change.previous, change.state, change.went_down) == (
        BackendState.HEALTHY,
        BackendState.UNHEALTHY,
        True,
    )


# --------------------------------------------------------------------------------------------------
# Sans-IO: ejection back-off and the pool-wide cap


@given(
    base=st.floats(0.001, 1000.0),
    cap=st.floats(0.001, 10000.0),
    ejections=st.integers(1, 5000),
)
def test_back_off_doubles_and_caps(base: float, cap: float, ejections: int) -> None:
    duration = ejection_time(ejections, base, cap)
    assert duration <= cap
    assert duration == min(base * 2.0 ** min(ejections - 1, 1000), cap)
    assert ejection_time(ejections + 1, base, cap) == min(2 * duration, cap)


def test_back_off_examples() -> None:
    assert [ejection_time(n, 30.0, 300.0) for n in range(1, 7)] == [30, 60, 120, 240, 300, 300]
    assert ejection_time(10**6, 30.0, 300.0) == 300.0
    assert ejection_time(1, 60.0, 10.0) == 10.0
    with pytest.raises(ValueError, match="ejections"):
        ejection_time(0, 30.0, 300.0)


@pytest.mark.parametrize(
    ("backends", "percent", "limit"),
    [(1, 0, 1), (1, 50, 1), (2, 50, 1), (3, 50, 1), (4, 50, 2), (10, 10, 1), (10, 35, 3), (5, 100, 5)],
)
def test_ejection_limit_allows_at_least_one(backends: int, percent: int, limit: int) -> None:
    book = HealthBook(HealthConfig(), OutlierConfig(max_ejection_percent=percent))
    for i in range(backends):
        book.add(f"b{i}")
    assert book.ejection_limit == limit


_Op = tuple[Any, ...]


def _ops(backends: int) -> st.SearchStrategy[list[_Op]]:
    index = st.integers(0, backends - 1)
    return st.lists(
        st.one_of(
            st.tuples(st.just("probe"), index, st.booleans()),
            st.tuples(st.just("passive"), index, st.booleans()),
            st.tuples(st.just("failures"), index, st.integers(1, 5)),  # a burst of passive failures
            st.tuples(st.just("advance"), st.floats(0.0, 200.0)),
            st.tuples(st.just("drain"), index),
        ),
        min_size=10,
        max_size=150,
    )


@given(st.data())
def test_health_book_properties(data: st.DataObject) -> None:
    """Random sequences of probe results, passive signals, drains and time.

    Never more than the cap ejected; an ejection happens exactly when allowed; the k-th ejection of a
    backend lasts min(base * 2**(k-1), max); ejections end exactly at their time; DRAINING is kept.
    """
    count = data.draw(st.integers(1, 6), label="backends")
    outlier = OutlierConfig(
        consecutive_failures=data.draw(st.integers(1, 4), label="consecutive_failures"),
        base_ejection_time=data.draw(st.floats(0.5, 60.0), label="base"),
        max_ejection_time=data.draw(st.floats(0.5, 600.0), label="cap"),
        max_ejection_percent=data.draw(st.integers(0, 100), label="percent"),
    )
    health = HealthConfig(
        unhealthy_threshold=data.draw(st.integers(1, 3)), healthy_threshold=data.draw(st.integers(1, 3))
    )
    book = HealthBook(health, outlier)
    names = [f"b{i}" for i in range(count)]
    for name in names:
        book.add(name)
    limit = max(1, count * outlier.max_ejection_percent // 100)
    ejections: Counter[str] = Counter()
    drained: set[str] = set()
    now = 0.0

    def passive_failure(name: str) -> None:
        record = book[name]
        was_ejected, was_down = record.ejection is Ejection.EJECTED, record.down
        ejected_before = book.ejected
        change = book.passive_failed(name, now)
        reached = record.passive_failures >= outlier.consecutive_failures
        may_eject = reached and not was_ejected and ejected_before < limit
        assert (change is not None) == may_eject
        if reached and not was_ejected and not may_eject:
            event("ejection refused: the cap is full")
        if change is None:
            return
        event("ejected")
        ejections[name] += 1
        assert change.event is HealthEvent.EJECT
        assert change.went_down is not was_down
        assert record.ejections == ejections[name]
        expected = min(outlier.base_ejection_time * 2 ** (ejections[name] - 1), outlier.max_ejection_time)
        assert record.ejected_until == pytest.approx(now + expected)

    for op in data.draw(_ops(count), label="ops"):
        kind = op[0]
        if kind == "advance":
            now += op[1]
            for name in names:
                until = book[name].ejected_until
                change = book.expire(name, now)
                assert (change is not None) == (until is not None and now >= until)
                if change is not None:
                    event("ejection expired")
        elif kind == "probe":
            name = names[op[1]]
            if op[2]:
                book.probe_succeeded(name)
            else:
                book.probe_failed(name, "refused")
        elif kind == "passive" and op[2]:
            book.passive_succeeded(names[op[1]])
            assert book[names[op[1]]].passive_failures == 0
        elif kind == "passive":
            passive_failure(names[op[1]])
        elif kind == "failures":
            for _ in range(op[2]):
                passive_failure(names[op[1]])
        else:
            book.drain(names[op[1]])
            drained.add(names[op[1]])
        assert book.ejected <= limit
        for name in names:
            record = book[name]
            assert (record.ejected_until is not None) == (record.ejection is Ejection.EJECTED)
            assert record.down == (
                record.probe_health is ProbeHealth.UNHEALTHY or record.ejection is Ejection.EJECTED
            )
            if name in drained:
                assert _state(record) is BackendState.DRAINING
            if record.ejections >= 2:
                event("ejected twice or more")


def test_passive_failures_are_ignored_when_outlier_detection_is_off() -> None:
    book = HealthBook(HealthConfig(), OutlierConfig(enabled=False, consecutive_failures=1))
    book.add("b")
    assert book.passive_failed("b", 0.0) is None
    assert book["b"].ejection is Ejection.INCLUDED


def test_a_failure_right_after_the_ejection_ends_ejects_again_for_longer() -> None:
    book = HealthBook(
        HealthConfig(), OutlierConfig(consecutive_failures=3, base_ejection_time=10, max_ejection_time=25)
    )
    book.add("b")
    for _ in range(2):
        assert book.passive_failed("b", 0.0) is None
    assert book.passive_failed("b", 0.0) is not None
    assert book.expire("b", 9.99) is None
    assert book.expire("b", 10.0) is not None
    # On probation: the failure count was not reset by the ejection, so one failure is enough.
    assert book.passive_failed("b", 10.0) is not None
    assert book["b"].ejected_until == 30.0
    assert book.expire("b", 30.0) is not None
    # A success after the ejection resets the count: it takes the full run again.
    book.passive_succeeded("b")
    assert book.passive_failed("b", 30.0) is None
    assert book.passive_failed("b", 30.0) is None
    assert book.passive_failed("b", 30.0) is not None
    assert book["b"].ejected_until == 55.0  # capped at 25 s


def test_heartbeat_staleness_and_drop_decision() -> None:
    health = BackendHealth("b")
    assert not health.registered
    assert health.heartbeat_deadline(90) is None
    assert not health.heartbeat_stale(1000.0, 90)
    health.heartbeat(10.0)
    assert health.registered
    assert health.heartbeat_deadline(90) == 100.0
    assert not health.heartbeat_stale(99.9, 90)
    assert health.heartbeat_stale(100.0, 90)
    assert not health.should_drop(100.0, 90)  # still passes its probes
    health.probe_failed(1, "refused")
    assert health.should_drop(100.0, 90)
    assert not health.should_drop(99.0, 90)


# --------------------------------------------------------------------------------------------------
# The monitor


def _backend(name: str, port: int = 9000) -> Backend:
    return Backend.from_url(name, f"ws://127.0.0.1:{port}/")


def test_monitor_tracks_the_runtime_backends() -> None:
    runtime = _runtime({"a": "ws://127.0.0.1:9001", "b": "ws://127.0.0.1:9002"})
    assert set(runtime.health.members()) == {"a", "b"}
    extra = _backend("c")
    runtime.add_backend(extra)
    assert runtime.health.members()["c"] is extra
    runtime.drain_backend("c", remove=True)
    assert "c" not in runtime.health.members()
    assert runtime.health.get("c") is None


def test_monitor_with_a_plain_pool_ejects_and_calls_back(health_log: list[logging.LogRecord]) -> None:
    now = 100.0
    a, b = _backend("a"), _backend("b")
    monitor = HealthMonitor(
        HealthConfig(),
        OutlierConfig(consecutive_failures=2, base_ejection_time=30, max_ejection_percent=50),
        backends=[a, b],
        clock=lambda: now,
    )
    down: list[str] = []
    monitor.on_backend_down = lambda backend: down.append(backend.name)
    monitor.connect_failed(a)
    assert _state(a) is BackendState.HEALTHY
    monitor.abnormal_close(a)
    assert _state(a) is BackendState.EJECTED
    assert down == ["a"]
    # The cap (50 % of 2 = 1) keeps b in rotation, however often it fails.
    for _ in range(5):
        monitor.connect_failed(b)
    assert _state(b) is BackendState.HEALTHY
    assert down == ["a"]
    assert monitor.next_deadline("a") == 130.0
    now = 130.0
    monitor.expire_ejection(a)
    assert _state(a) is BackendState.HEALTHY
    # Now there is room: b's next failure ejects it.
    monitor.connect_failed(b)
    assert _state(b) is BackendState.EJECTED
    stats = monitor.statistics()
    assert (stats.backends, stats.healthy, stats.ejected, stats.down, stats.ejection_limit) == (2, 1, 1, 1, 1)
    health = [r for r in health_log if getattr(r, "event", None) == "health"]
    assert [(r.levelno, getattr(r, "server", None), getattr(r, "state", None)) for r in health] == [
        (logging.WARNING, "a", "ejected"),
        (logging.INFO, "a", "healthy"),
        (logging.WARNING, "b", "ejected"),
    ]
    assert "ejection 1 for 30 s" in health[0].getMessage()


def test_connect_succeeded_resets_the_run() -> None:
    backend = _backend("a")
    monitor = HealthMonitor(
        HealthConfig(), OutlierConfig(consecutive_failures=2), backends=[backend], clock=lambda: 0.0
    )
    for _ in range(3):
        monitor.connect_failed(backend)
        monitor.connect_succeeded(backend)
    assert _state(backend) is BackendState.HEALTHY


def test_signals_about_records_that_left_are_ignored() -> None:
    old = _backend("a")
    monitor = HealthMonitor(
        HealthConfig(), OutlierConfig(consecutive_failures=1), backends=[old], clock=lambda: 0.0
    )
    new = _backend("a")
    monitor.backend_added(new)  # replaces the record of the same name
    monitor.connect_failed(old)
    assert (old.state, new.state) == (BackendState.HEALTHY, BackendState.HEALTHY)
    monitor.backend_removed("a")
    monitor.connect_failed(new)
    monitor.probe_finished(new, ProbeReport(ProbeResult.FAILURE, "refused"))
    assert _state(new) is BackendState.HEALTHY
    monitor.backend_removed("a")  # unknown names are ignored


def test_draining_is_kept_but_a_draining_backend_still_goes_down() -> None:
    backend = _backend("a")
    monitor = HealthMonitor(
        HealthConfig(unhealthy_threshold=2, healthy_threshold=1), OutlierConfig(), backends=[backend]
    )
    down: list[str] = []
    monitor.on_backend_down = lambda b: down.append(b.name)
    monitor.backend_drained(backend)
    monitor.backend_drained(backend)  # twice is harmless
    assert _state(backend) is BackendState.DRAINING
    for _ in range(2):
        monitor.probe_finished(backend, ProbeReport(ProbeResult.TIMEOUT, "no answer"))
    assert _state(backend) is BackendState.DRAINING
    assert down == ["a"]  # its clients should fail over even though it drains
    monitor.backend_resumed(backend)
    assert _state(backend) is BackendState.UNHEALTHY
    monitor.probe_finished(backend, ProbeReport(ProbeResult.SUCCESS))
    assert _state(backend) is BackendState.HEALTHY


def test_a_failing_callback_is_logged_not_raised(health_log: list[logging.LogRecord]) -> None:
    backend = _backend("a")
    monitor = HealthMonitor(
        HealthConfig(), OutlierConfig(consecutive_failures=1), backends=[backend], clock=lambda: 0.0
    )

    def boom(_backend: Backend) -> None:
        raise RuntimeError("bug in the supervisor")

    monitor.on_backend_down = boom
    monitor.connect_failed(backend)
    assert _state(backend) is BackendState.EJECTED
    assert any(r.levelno == logging.ERROR and r.exc_info for r in health_log)


def test_heartbeat_api() -> None:
    now = 5.0
    backend = _backend("a")
    monitor = HealthMonitor(
        _health(heartbeat_timeout=10), OutlierConfig(), backends=[backend], clock=lambda: now
    )
    assert monitor.heartbeat("nobody") is False
    with pytest.raises(KeyError):
        monitor.track_heartbeats("nobody")
    assert not monitor.heartbeat_stale("a")
    assert monitor.next_deadline("a") == math.inf
    monitor.track_heartbeats("a")
    assert monitor.next_deadline("a") == 15.0
    now = 12.0
    assert monitor.heartbeat("a") is True
    assert monitor.next_deadline("a") == 22.0
    now = 22.0
    assert monitor.heartbeat_stale("a")
    assert monitor.next_deadline("a") == math.inf
    assert monitor.statistics().registered == 1


async def test_runtime_monitor_counts_ejections() -> None:
    runtime = _runtime({"a": "ws://127.0.0.1:9001"}, outlier=OutlierConfig(consecutive_failures=2))
    backend = runtime.pool.get("a")
    assert backend is not None
    runtime.health.connect_failed(backend)
    runtime.health.connect_failed(backend)
    assert _state(backend) is BackendState.EJECTED
    assert _ejections(runtime, "a") == 1.0
    assert runtime.pool.choose() is None


# --------------------------------------------------------------------------------------------------
# Probes


def test_probe_headers_and_target() -> None:
    backend = Backend.from_url("a", "ws://[::1]:9000/game?v=2")
    headers = dict(probe_headers(backend))
    assert headers[b"host"] == b"[::1]:9000"
    assert headers[b"upgrade"] == b"websocket"
    assert headers[b"connection"] == b"Upgrade"
    assert headers[b"sec-websocket-version"] == b"13"
    assert len(headers[b"sec-websocket-key"]) == 24
    assert headers[HEALTH_CHECK_HEADER[0]] == b"1"
    assert b"x-forwarded-for" not in headers
    assert dict(probe_headers(Backend.from_url("b", "wss://game.example")))[b"host"] == b"game.example"
    assert probe_target(backend, "/") == b"/game?v=2"
    assert probe_target(backend, "/health?deep=1") == b"/game/health?v=2&deep=1"
    assert probe_target(Backend.from_url("c", "ws://h:1"), "/health") == b"/health"


async def test_websocket_probe_handshakes_and_closes_cleanly(autojump_clock: MockClock) -> None:
    async with ws_backend() as (port, stats):
        backend = Backend.from_url("a", f"ws://127.0.0.1:{port}/play")
        report = await run_probe("websocket", backend, path="/", time_limit=5)
        assert report == ProbeReport(ProbeResult.SUCCESS)
        await stats.closed.reach(1)
    ((path, headers),) = stats.requests
    assert path == "/play"
    assert headers[b"x-atlas-health-check"] == b"1"
    (reason,) = stats.closes
    assert reason is not None
    assert (reason.code, reason.reason) == (1000, "health check")


async def test_websocket_probe_fails_on_a_refused_upgrade(autojump_clock: MockClock) -> None:
    async with http_backend(lambda: 404) as (port, _requests):
        report = await run_probe("websocket", _backend("a", port), time_limit=5)
    assert report.result is ProbeResult.FAILURE
    assert "404" in report.detail


async def test_probes_time_out_on_a_hung_backend(autojump_clock: MockClock) -> None:
    async with hung_backend() as (port, stats):
        for kind in ("websocket", "http"):
            start = trio.current_time()
            report = await run_probe(kind, _backend("a", port), time_limit=2)
            assert report == ProbeReport(ProbeResult.TIMEOUT, "no answer within 2 s")
            assert trio.current_time() - start == pytest.approx(2.0)
        await stats.closed_by_prober.reach(2)
    assert stats.accepted == 2


async def test_refused_connections_fail(autojump_clock: MockClock) -> None:
    backend = _backend("a", _closed_port())
    for kind in ("websocket", "http", "tcp"):
        report = await run_probe(kind, backend, time_limit=2)
        assert report.result is ProbeResult.FAILURE, kind
        assert report.detail


async def test_tcp_probe_connects(autojump_clock: MockClock) -> None:
    async with hung_backend() as (port, stats):
        assert await run_probe("tcp", _backend("a", port), time_limit=2) == ProbeReport(ProbeResult.SUCCESS)
        await stats.closed_by_prober.reach(1)


@pytest.mark.parametrize(
    ("status", "result"),
    [
        (200, ProbeResult.SUCCESS),
        (302, ProbeResult.SUCCESS),
        (404, ProbeResult.FAILURE),
        (503, ProbeResult.FAILURE),
    ],
)
async def test_http_probe(autojump_clock: MockClock, status: int, result: ProbeResult) -> None:
    async with http_backend(lambda: status) as (port, requests):
        report = await run_probe("http", _backend("a", port), path="/healthz", time_limit=2)
    assert report.result is result
    if result is ProbeResult.FAILURE:
        assert report.detail == f"HTTP {status}"
    (request,) = requests
    assert (request.method, request.target) == (b"GET", b"/healthz")
    assert (b"x-atlas-health-check", b"1") in list(request.headers)


# --------------------------------------------------------------------------------------------------
# Checkers


async def test_hung_backend_becomes_unhealthy_and_calls_back(
    autojump_clock: MockClock, health_log: list[logging.LogRecord]
) -> None:
    async with hung_backend() as (hung_port, stats), ws_backend() as (good_port, _):
        runtime = _runtime(
            {"hung": f"ws://127.0.0.1:{hung_port}", "good": f"ws://127.0.0.1:{good_port}"},
            health=_health(unhealthy_threshold=3),
        )
        down = DownRecorder()
        runtime.health.on_backend_down = down
        start = trio.current_time()
        async with health_checks(runtime):
            await down.wait()
            # Probes at 0, 1.5 and 3.0 s, each timing out after 0.5 s.
            ((name, when),) = down.calls
            assert name == "hung"
            assert when == pytest.approx(start + 3.5)
            hung = runtime.pool.get("hung")
            assert hung is not None
            assert _state(hung) is BackendState.UNHEALTHY
            assert _checks(runtime, "hung", "timeout") == 3
            assert _checks(runtime, "good", "success") >= 3
            for _ in range(5):
                choice = runtime.pool.choose()
                assert choice is not None
                assert choice.name == "good"
        assert stats.accepted == 3
    lines = [r for r in health_log if getattr(r, "event", None) == "health"]
    assert len(lines) == 1
    assert lines[0].levelno == logging.WARNING
    assert "no answer within 0.5 s" in lines[0].getMessage()


async def test_backend_recovers_after_the_healthy_threshold(autojump_clock: MockClock) -> None:
    status = 503
    async with http_backend(lambda: status) as (port, _requests):
        runtime = _runtime(
            {"a": f"ws://127.0.0.1:{port}"},
            health=_health(probe="http", unhealthy_threshold=2, healthy_threshold=3),
        )
        backend = runtime.pool.get("a")
        assert backend is not None
        async with health_checks(runtime):
            await trio.sleep(0.5)  # probe at 0
            assert _state(backend) is BackendState.HEALTHY
            await trio.sleep(1.0)  # probe at 1
            assert _state(backend) is BackendState.UNHEALTHY
            status = 200
            await trio.sleep(2.0)  # probes at 2 and 3
            assert _state(backend) is BackendState.UNHEALTHY
            await trio.sleep(1.0)  # probe at 4: the third success in a row
            assert _state(backend) is BackendState.HEALTHY
            assert _checks(runtime, "a", "failure") == 2
            assert _checks(runtime, "a", "success") == 3


async def test_ejection_ends_on_time_with_active_checks_off(autojump_clock: MockClock) -> None:
    runtime = _runtime(
        {"a": "ws://127.0.0.1:9001", "b": "ws://127.0.0.1:9002"},
        health=_health(enabled=False),
        outlier=OutlierConfig(consecutive_failures=2, base_ejection_time=10, max_ejection_time=25),
    )
    backend = runtime.pool.get("a")
    assert backend is not None
    async with health_checks(runtime):
        start = trio.current_time()
        runtime.health.connect_failed(backend)
        runtime.health.connect_failed(backend)
        assert _state(backend) is BackendState.EJECTED
        await trio.sleep_until(start + 9.9)
        assert _state(backend) is BackendState.EJECTED
        await trio.sleep_until(start + 10.0)
        await trio.testing.wait_all_tasks_blocked()
        assert _state(backend) is BackendState.HEALTHY
        runtime.health.abnormal_close(backend)  # on probation: ejected again, for 20 s
        assert _state(backend) is BackendState.EJECTED
        await trio.sleep_until(start + 29.9)
        assert _state(backend) is BackendState.EJECTED
        await trio.sleep_until(start + 30.1)
        assert _state(backend) is BackendState.HEALTHY
    assert _checks(runtime, "a", "success") + _checks(runtime, "a", "timeout") == 0  # never probed
    assert _ejections(runtime, "a") == 2


async def test_checkers_follow_membership(autojump_clock: MockClock) -> None:
    async with hung_backend() as (port, _stats):
        runtime = _runtime({"a": f"ws://127.0.0.1:{port}"}, health=_health(probe="tcp"))
        async with health_checks(runtime):
            await trio.sleep(2.5)  # probes at 0, 1, 2
            assert _checks(runtime, "a", "success") == 3
            runtime.add_backend(_backend("b", port))
            await trio.sleep(2.0)
            assert _checks(runtime, "b", "success") == 2
            runtime.drain_backend("a", remove=True)
            assert runtime.pool.get("a") is None
            before = _checks(runtime, "a", "success")
            await trio.sleep(5.0)
            assert _checks(runtime, "a", "success") == before
            assert _checks(runtime, "b", "success") == 7
            # Re-added under the same name: a new record, a new checker.
            runtime.add_backend(_backend("a", port))
            await trio.sleep(0.5)
            assert _checks(runtime, "a", "success") == before + 1
            # The same record removed and added back at once: still exactly one checker.
            b = runtime.pool.get("b")
            assert b is not None
            runtime.drain_backend("b", remove=True)
            runtime.add_backend(b)
            before = _checks(runtime, "b", "success")
            await trio.sleep(5.0)
            assert _checks(runtime, "b", "success") == before + 5


async def test_draining_backend_is_still_probed_and_goes_down(autojump_clock: MockClock) -> None:
    async with hung_backend() as (port, _stats):
        runtime = _runtime({"a": f"ws://127.0.0.1:{port}"}, health=_health(unhealthy_threshold=2))
        down = DownRecorder()
        runtime.health.on_backend_down = down
        runtime.drain_backend("a")
        async with health_checks(runtime):
            await down.wait()
        backend = runtime.pool.get("a")
        assert backend is not None
        assert _state(backend) is BackendState.DRAINING
        health = runtime.health.get("a")
        assert health is not None
        assert health.probe_health is ProbeHealth.UNHEALTHY


async def test_registered_server_whose_heartbeats_stop_is_probed_then_dropped(
    autojump_clock: MockClock, health_log: list[logging.LogRecord]
) -> None:
    async with hung_backend() as (port, _stats):
        # Active checks off: only the heartbeat timeout makes Atlas probe it.
        runtime = _runtime({}, health=_health(enabled=False, heartbeat_timeout=10, unhealthy_threshold=2))
        down = DownRecorder()
        runtime.health.on_backend_down = down
        async with health_checks(runtime):
            start = trio.current_time()
            runtime.add_backend(_backend("horizon-0", port))
            runtime.health.track_heartbeats("horizon-0")
            await trio.sleep(8.0)
            assert runtime.health.heartbeat("horizon-0")
            await trio.sleep_until(start + 17.9)  # deadline: 8 + 10
            assert _checks(runtime, "horizon-0", "timeout") == 0
            assert runtime.pool.get("horizon-0") is not None
            await down.wait()
            # Probes at 18 and 19.5, each timing out after 0.5 s; dropped right away (no clients).
            ((name, when),) = down.calls
            assert name == "horizon-0"
            assert when == pytest.approx(start + 20.0)
            await trio.testing.wait_all_tasks_blocked()
            assert runtime.pool.get("horizon-0") is None
            assert "horizon-0" not in runtime.health.members()
            assert _checks(runtime, "horizon-0", "timeout") == 2
    assert any("sends no heartbeats" in r.getMessage() for r in health_log)


async def test_registered_server_that_still_answers_is_kept(autojump_clock: MockClock) -> None:
    async with ws_backend() as (port, _stats):
        runtime = _runtime({}, health=_health(enabled=False, heartbeat_timeout=10))
        backend = _backend("horizon-0", port)
        async with health_checks(runtime):
            runtime.add_backend(backend)
            runtime.health.track_heartbeats("horizon-0")
            await trio.sleep(60.0)
            assert runtime.pool.get("horizon-0") is backend
            assert _state(backend) is BackendState.HEALTHY
            assert _checks(runtime, "horizon-0", "success") >= 45


async def test_a_dropped_server_with_clients_leaves_when_they_do(autojump_clock: MockClock) -> None:
    runtime = _runtime(
        {}, health=_health(enabled=False, heartbeat_timeout=5, unhealthy_threshold=1, probe="tcp")
    )
    backend = _backend("horizon-0", _closed_port())
    down = DownRecorder()
    runtime.health.on_backend_down = down
    async with health_checks(runtime):
        runtime.add_backend(backend)
        runtime.pool.acquire(backend)
        runtime.health.track_heartbeats("horizon-0")
        await down.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert _state(backend) is BackendState.DRAINING
        assert runtime.pool.get("horizon-0") is backend
        runtime.release(backend)
        assert runtime.pool.get("horizon-0") is None


# --------------------------------------------------------------------------------------------------
# End to end: a hung backend never hangs a client


@asynccontextmanager
async def _open_ws(url: str) -> AsyncIterator[WebSocketConnection]:
    async with open_websocket_url(url) as ws:
        yield ws
    await ws._stream.aclose()  # see tests/test_proxy_e2e.py: open_ws


async def test_hung_backend_never_hangs_a_client(autojump_clock: MockClock) -> None:
    async with hung_backend() as (hung_port, _stats), ws_backend() as (good_port, _):
        runtime = _runtime(
            {"hung": f"ws://127.0.0.1:{hung_port}", "good": f"ws://127.0.0.1:{good_port}"},
            health=_health(unhealthy_threshold=2),
            proxy=ProxyConfig(listen="127.0.0.1:0", connect_timeout=3.0, connect_attempts=2),
        )
        down = DownRecorder()
        runtime.health.on_backend_down = down
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            listening = await nursery.start(
                lambda task_status: serve_proxy(runtime, shutdown=shutdown, task_status=task_status)
            )
            await nursery.start(serve_health_checks, runtime)
            url = f"ws://127.0.0.1:{listening.port}/"
            # Before the checks notice: the hung backend may be tried first, but only for connect_timeout.
            start = trio.current_time()
            async with _open_ws(url) as ws:
                await ws.send_message("one")
                assert await ws.get_message() == "one"
            assert trio.current_time() - start <= 3.0 + 0.1
            await down.wait()
            # After: no client is ever sent there.
            for i in range(4):
                start = trio.current_time()
                async with _open_ws(url) as ws:
                    await ws.send_message(f"m{i}")
                    assert await ws.get_message() == f"m{i}"
                assert trio.current_time() - start < 0.1
            shutdown.set()
            nursery.cancel_scope.cancel()


async def test_hung_backend_is_ejected_by_real_traffic(autojump_clock: MockClock) -> None:
    async with hung_backend() as (hung_port, _stats), ws_backend() as (good_port, _):
        runtime = _runtime(
            {"hung": f"ws://127.0.0.1:{hung_port}", "good": f"ws://127.0.0.1:{good_port}"},
            health=_health(enabled=False),
            outlier=OutlierConfig(consecutive_failures=1, base_ejection_time=60),
            proxy=ProxyConfig(listen="127.0.0.1:0", connect_timeout=2.0, connect_attempts=2),
        )
        down = DownRecorder()
        runtime.health.on_backend_down = down
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            listening = await nursery.start(
                lambda task_status: serve_proxy(runtime, shutdown=shutdown, task_status=task_status)
            )
            await nursery.start(serve_health_checks, runtime)
            url = f"ws://127.0.0.1:{listening.port}/"
            for i in range(4):
                start = trio.current_time()
                async with _open_ws(url) as ws:
                    await ws.send_message(f"m{i}")
                    assert await ws.get_message() == f"m{i}"
                # The first client waits out one connect_timeout on the hung backend, no one else does.
                assert trio.current_time() - start <= (2.1 if i == 0 else 0.1)
            assert [name for name, _ in down.calls] == ["hung"]
            hung = runtime.pool.get("hung")
            assert hung is not None
            assert _state(hung) is BackendState.EJECTED
            assert _ejections(runtime, "hung") == 1
            shutdown.set()
            nursery.cancel_scope.cancel()
