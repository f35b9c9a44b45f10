"""Tests for the sans-IO backend pool and its balancers."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from atlas.errors import BackendUnavailableError
from atlas.pool import (
    BALANCER_NAMES,
    Backend,
    BackendPool,
    BackendState,
    Balancer,
    LeastConnections,
    PoolStatistics,
    PowerOfTwo,
    Random,
    RoundRobin,
    WeightedRoundRobin,
    make_balancer,
)


def backend(
    name: str,
    *,
    capacity: int = 1000,
    weight: int = 1,
    connections: int = 0,
    state: BackendState = BackendState.HEALTHY,
) -> Backend:
    b = Backend.from_url(name, f"ws://{name}.test:9000/", capacity=capacity, weight=weight)
    b.connections = connections
    b.state = state
    return b


def equal_backends(count: int, *, capacity: int = 1000) -> list[Backend]:
    return [backend(f"b{i}", capacity=capacity) for i in range(count)]


def pool_of(backends: Sequence[Backend], balancer: Balancer | None = None) -> BackendPool:
    pool = BackendPool(balancer if balancer is not None else LeastConnections())
    for b in backends:
        pool.add(b)
    return pool


def lighter(a: Backend, b: Backend) -> bool:
    return a.connections * b.weight < b.connections * a.weight


def equal_load(a: Backend, b: Backend) -> bool:
    return a.connections * b.weight == b.connections * a.weight


# --- Backend.from_url ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "host", "port", "path", "secure"),
    [
        ("ws://game.example", "game.example", 80, "/", False),
        ("wss://game.example", "game.example", 443, "/", True),
        ("ws://game.example:9000", "game.example", 9000, "/", False),
        ("wss://game.example:8443/play", "game.example", 8443, "/play", True),
        ("ws://10.0.0.7:9000/ws/game?room=4&v=2", "10.0.0.7", 9000, "/ws/game?room=4&v=2", False),
        ("ws://[::1]:9000/x", "::1", 9000, "/x", False),
        ("wss://[2001:db8::1]", "2001:db8::1", 443, "/", True),
        ("WS://Game.Example/Path", "game.example", 80, "/Path", False),
        ("ws://game_server-1:65535/", "game_server-1", 65535, "/", False),
        ("ws://game.example:", "game.example", 80, "/", False),
        ("ws://game.example?q=1", "game.example", 80, "/?q=1", False),
    ],
)
def test_from_url_parses(url: str, host: str, port: int, path: str, secure: bool) -> None:
    b = Backend.from_url("b", url, capacity=10, weight=3, tags=["eu", "pvp"])
    assert (b.host, b.port, b.path, b.secure) == (host, port, path, secure)
    assert b.url == url
    assert (b.name, b.capacity, b.weight, b.tags) == ("b", 10, 3, ("eu", "pvp"))
    assert b.state is BackendState.HEALTHY
    assert b.connections == 0
    assert b.available
    assert b.load == 0.0


def test_from_url_defaults() -> None:
    b = Backend.from_url("b", "ws://h")
    assert (b.capacity, b.weight, b.tags) == (1000, 1, ())


@pytest.mark.parametrize(
    "url",
    [
        "",
        "game.example:9000",
        "http://game.example/",
        "https://game.example/",
        "tcp://game.example:9000",
        "ws:game.example",
        "ws:/game.example",
        "ws://",
        "ws:///path",
        "ws://:9000/",
        "ws://game.example:0/",
        "ws://game.example:65536/",
        "ws://game.example:-1/",
        "ws://game.example:port/",
        "ws://game.example:+80/",
        "ws://user@game.example/",
        "ws://user:pw@game.example/",
        "ws://game.example/#frag",
        "ws://game.example#",
        "ws://game example/",
        " ws://game.example/",
        "ws://game.example/\n",
        "ws://game.example/a b",
        "ws://g\u00e9.example/",
        "ws://[::1/",
        "ws://[not-ipv6]/",
        "ws://[10.0.0.1]/",
        "ws://game!.example/",
        "ws://game%2eexample/",
    ],
)
def test_from_url_rejects(url: str) -> None:
    with pytest.raises(ValueError, match=r".+"):
        Backend.from_url("b", url)


@given(st.text(max_size=40))
def test_from_url_garbage_raises_only_value_error(url: str) -> None:
    try:
        b = Backend.from_url("b", url)
    except ValueError:
        return
    assert b.port >= 1
    assert b.path.startswith("/")


@given(
    secure=st.booleans(),
    host=st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
    port=st.none() | st.integers(1, 65535),
    path=st.from_regex(r"(/[A-Za-z0-9._~-]{0,8}){0,4}", fullmatch=True),
    query=st.from_regex(r"[A-Za-z0-9=&]{0,12}", fullmatch=True),
)
def test_from_url_round_trip(secure: bool, host: str, port: int | None, path: str, query: str) -> None:
    scheme = "wss" if secure else "ws"
    url = f"{scheme}://{host}{'' if port is None else f':{port}'}{path}"
    if query:
        url += f"?{query}"
    b = Backend.from_url("b", url)
    assert b.secure is secure
    assert b.host == host
    assert b.port == (port if port is not None else (443 if secure else 80))
    assert b.path == (path or "/") + (f"?{query}" if query else "")


@pytest.mark.parametrize(("capacity", "weight"), [(0, 1), (-1, 1), (1, 0), (1, -3)])
def test_from_url_rejects_bad_numbers(capacity: int, weight: int) -> None:
    with pytest.raises(ValueError, match=r".+"):
        Backend.from_url("b", "ws://h", capacity=capacity, weight=weight)


def test_backend_rejects_empty_name_and_string_tags() -> None:
    with pytest.raises(ValueError, match=r".+"):
        Backend.from_url("", "ws://h")
    with pytest.raises(TypeError):
        Backend.from_url("b", "ws://h", tags="eu")


def test_backend_connections_cannot_go_negative() -> None:
    b = backend("b")
    with pytest.raises(ValueError, match=r".+"):
        b.connections = -1


def test_available_and_load() -> None:
    b = backend("b", capacity=4)
    assert b.available
    b.connections = 3
    assert b.available
    assert b.load == 0.75
    b.connections = 4
    assert not b.available
    assert b.load == 1.0
    b.connections = 0
    for state in (BackendState.UNHEALTHY, BackendState.EJECTED, BackendState.DRAINING):
        b.state = state
        assert not b.available
    b.state = BackendState.HEALTHY
    assert b.available


def test_backends_compare_by_identity() -> None:
    a, b = backend("same"), backend("same")
    assert a != b
    assert len({a, b}) == 2


# --- make_balancer ------------------------------------------------------------------------------


def test_make_balancer_names() -> None:
    expected = {
        "least_connections": LeastConnections,
        "round_robin": RoundRobin,
        "random": Random,
        "weighted_round_robin": WeightedRoundRobin,
        "power_of_two": PowerOfTwo,
    }
    assert set(BALANCER_NAMES) == set(expected)
    assert BALANCER_NAMES[0] == "least_connections"
    for name, cls in expected.items():
        assert isinstance(make_balancer(name), cls)
        assert isinstance(make_balancer(name, rng=random.Random(1)), cls)


@pytest.mark.parametrize("name", ["", "leastconn", "Round_Robin", "round-robin", "p2c"])
def test_make_balancer_rejects_unknown(name: str) -> None:
    with pytest.raises(ValueError, match="unknown balancing algorithm"):
        make_balancer(name)


def test_make_balancer_passes_the_rng() -> None:
    candidates = equal_backends(10)
    for name in ("random", "power_of_two"):
        first = make_balancer(name, rng=random.Random(42))
        second = make_balancer(name, rng=random.Random(42))
        assert [first.pick(candidates) for _ in range(50)] == [second.pick(candidates) for _ in range(50)]


# --- every balancer, through the pool -----------------------------------------------------------

backend_specs = st.lists(
    st.tuples(
        st.integers(1, 4),  # capacity
        st.integers(1, 5),  # weight
        st.integers(0, 4),  # connections (clamped to capacity)
        st.sampled_from(BackendState),
    ),
    max_size=8,
)


def build(specs: list[tuple[int, int, int, BackendState]]) -> list[Backend]:
    return [
        backend(f"b{i}", capacity=cap, weight=w, connections=min(conn, cap), state=state)
        for i, (cap, w, conn, state) in enumerate(specs)
    ]


@given(
    algorithm=st.sampled_from(BALANCER_NAMES),
    seed=st.integers(0, 2**32),
    specs=backend_specs,
    excluded=st.sets(st.integers(0, 7)),
)
def test_choose_only_picks_usable_backends_until_full(
    algorithm: str,
    seed: int,
    specs: list[tuple[int, int, int, BackendState]],
    excluded: set[int],
) -> None:
    backends = build(specs)
    exclude = {f"b{i}" for i in excluded}
    pool = pool_of(backends, make_balancer(algorithm, rng=random.Random(seed)))
    usable = [b for b in backends if b.state is BackendState.HEALTHY and b.name not in exclude]
    room = sum(b.capacity - b.connections for b in usable)
    for _ in range(room):
        picked = pool.choose(exclude=exclude)
        assert picked is not None
        assert picked in usable
        assert picked.connections < picked.capacity
        pool.acquire(picked)
    # Every usable backend is now full: nothing more can be chosen, and nothing exceeded capacity.
    assert pool.choose(exclude=exclude) is None
    for b in backends:
        assert b.connections <= b.capacity
    for b in usable:
        assert b.connections == b.capacity


def test_choose_returns_none_on_an_empty_pool() -> None:
    for name in BALANCER_NAMES:
        assert BackendPool(make_balancer(name)).choose() is None


def test_choose_returns_none_when_nothing_is_usable() -> None:
    pool = pool_of(
        [
            backend("full", capacity=2, connections=2),
            backend("sick", state=BackendState.UNHEALTHY),
            backend("ejected", state=BackendState.EJECTED),
            backend("draining", state=BackendState.DRAINING),
            backend("excluded"),
        ]
    )
    assert pool.choose(exclude={"excluded"}) is None
    assert pool.choose() is pool.get("excluded")


def test_choose_skips_excluded_for_retries() -> None:
    pool = pool_of(equal_backends(3), RoundRobin())
    tried: set[str] = set()
    while (b := pool.choose(exclude=tried)) is not None:
        assert b.name not in tried
        tried.add(b.name)
    assert tried == {"b0", "b1", "b2"}


# --- capacity: acquire / release ----------------------------------------------------------------


def test_acquire_beyond_capacity_raises() -> None:
    b = backend("b", capacity=2)
    pool = pool_of([b])
    pool.acquire(b)
    pool.acquire(b)
    assert b.connections == 2
    assert pool.choose() is None
    with pytest.raises(BackendUnavailableError, match="'b' is full"):
        pool.acquire(b)
    assert b.connections == 2


def test_acquire_checks_capacity_after_it_shrinks() -> None:
    b = backend("b", capacity=5, connections=4)
    pool = pool_of([b])
    b.capacity = 3
    assert not b.available
    assert b.load > 1
    with pytest.raises(BackendUnavailableError):
        pool.acquire(b)


def test_acquire_on_a_foreign_backend_raises() -> None:
    pool = pool_of([backend("b")])
    with pytest.raises(KeyError):
        pool.acquire(backend("b"))  # same name, different record
    with pytest.raises(KeyError):
        pool.acquire(backend("other"))


def test_release_never_goes_below_zero() -> None:
    b = backend("b", capacity=2)
    pool = pool_of([b])
    pool.acquire(b)
    pool.release(b)
    pool.release(b)
    assert b.connections == 0
    assert b.available


def test_release_works_after_removal() -> None:
    b = backend("b")
    pool = pool_of([b])
    pool.acquire(b)
    pool.acquire(b)
    assert pool.remove("b") is b
    pool.release(b)
    assert b.connections == 1
    with pytest.raises(KeyError):
        pool.acquire(b)


# --- registry -----------------------------------------------------------------------------------


def test_add_get_remove() -> None:
    a, b, c = backend("a"), backend("b"), backend("c")
    pool = pool_of([a, b])
    assert len(pool) == 2
    assert "a" in pool
    assert "c" not in pool
    assert a not in pool  # membership is by name
    assert pool.get("a") is a
    assert pool.get("c") is None
    pool.add(c)
    assert list(pool) == [a, b, c]
    with pytest.raises(ValueError, match="'a' is already in the pool"):
        pool.add(backend("a"))
    assert pool.get("a") is a
    assert pool.remove("b") is b
    assert list(pool) == [a, c]
    assert "b" not in pool
    with pytest.raises(KeyError, match="'b'"):
        pool.remove("b")
    pool.add(backend("b"))
    assert [x.name for x in pool] == ["a", "c", "b"]


def test_iteration_is_a_snapshot() -> None:
    pool = pool_of(equal_backends(4))
    for b in pool:
        pool.remove(b.name)
    assert len(pool) == 0


def test_statistics() -> None:
    pool = pool_of([])
    assert pool.statistics() == PoolStatistics(backends=0, available=0, connections=0, capacity=0)
    pool.add(backend("a", capacity=10, connections=3))
    pool.add(backend("b", capacity=5, connections=5))
    pool.add(backend("c", capacity=7, connections=1, state=BackendState.DRAINING))
    pool.add(backend("d", capacity=2))
    stats = pool.statistics()
    assert stats == PoolStatistics(backends=4, available=2, connections=9, capacity=24)
    a = pool.get("a")
    assert a is not None
    pool.acquire(a)
    pool.remove("b")
    assert pool.statistics() == PoolStatistics(backends=3, available=2, connections=5, capacity=19)


# --- round robin --------------------------------------------------------------------------------


@given(count=st.integers(1, 12), rounds=st.integers(1, 6))
def test_round_robin_is_exactly_even(count: int, rounds: int) -> None:
    candidates = equal_backends(count)
    rr = RoundRobin()
    picks = [rr.pick(candidates) for _ in range(rounds * count)]
    assert Counter(b.name for b in picks) == {b.name: rounds for b in candidates}
    # ... and in candidate order, starting with the first.
    assert picks == candidates * rounds


@given(
    universe=st.integers(1, 8),
    steps=st.lists(st.sets(st.integers(0, 7), min_size=1), min_size=1, max_size=40),
)
def test_round_robin_survives_changing_candidates(universe: int, steps: list[set[int]]) -> None:
    everyone = equal_backends(8)[:universe]
    rr = RoundRobin()
    previous: Backend | None = None
    for step in steps:
        candidates = [b for i, b in enumerate(everyone) if i in step] or everyone[:1]
        picked = rr.pick(candidates)
        assert picked in candidates
        if previous is not None and previous in candidates:
            # The previous pick is still there: the next one follows it.
            after = candidates.index(previous) + 1
            assert picked is candidates[after % len(candidates)]
        previous = picked


def test_round_robin_continues_after_its_last_pick_leaves() -> None:
    a, b, c, d = equal_backends(4)
    rr = RoundRobin()
    assert [rr.pick([a, b, c, d]) for _ in range(2)] == [a, b]
    # b fills up: c is next, not a or d.
    assert rr.pick([a, c, d]) is c
    # b comes back before c in order; d follows c.
    assert rr.pick([a, b, c, d]) is d
    assert rr.pick([a, b, c, d]) is a
    # The last pick (a) leaves: whatever slid into its place is next.
    assert rr.pick([b, c, d]) is b
    assert rr.pick([b, c, d]) is c
    assert rr.pick([b, c, d]) is d
    # d, the last pick and the end of the list, leaves: wrap to the start.
    assert rr.pick([b, c]) is b


# --- weighted round robin -----------------------------------------------------------------------

weights_lists = st.lists(st.integers(1, 12), min_size=1, max_size=8)


@given(weights=weights_lists, cycles=st.integers(1, 3))
def test_weighted_round_robin_is_exact_over_each_cycle(weights: list[int], cycles: int) -> None:
    candidates = [backend(f"b{i}", weight=w) for i, w in enumerate(weights)]
    wrr = WeightedRoundRobin()
    total = sum(weights)
    for _ in range(cycles):
        counts = Counter(wrr.pick(candidates).name for _ in range(total))
        assert counts == {b.name: b.weight for b in candidates}


@given(weights=weights_lists)
def test_weighted_round_robin_is_smooth(weights: list[int]) -> None:
    # Smooth: after any t picks, no backend is a whole pick ahead of its share t*w/W.
    candidates = [backend(f"b{i}", weight=w) for i, w in enumerate(weights)]
    wrr = WeightedRoundRobin()
    total = sum(weights)
    counts: Counter[str] = Counter()
    for t in range(1, 2 * total + 1):
        counts[wrr.pick(candidates).name] += 1
        for b in candidates:
            assert counts[b.name] * total < t * b.weight + total


def test_weighted_round_robin_interleaves_like_nginx() -> None:
    a = backend("a", weight=5)
    b = backend("b", weight=1)
    c = backend("c", weight=1)
    wrr = WeightedRoundRobin()
    sequence = "".join(wrr.pick([a, b, c]).name for _ in range(14))
    assert sequence == "aabacaa" * 2


def test_weighted_round_robin_forgets_backends_that_leave() -> None:
    weights = {"a": 5, "b": 3, "c": 1}
    candidates = [backend(name, weight=w) for name, w in weights.items()]
    wrr = WeightedRoundRobin()
    for _ in range(4):  # mid-cycle: the smooth weights are far from zero
        wrr.pick(candidates)
    assert wrr.pick([backend("z")]).name == "z"  # a, b and c leave, and are forgotten
    comeback = [backend(name, weight=w) for name, w in weights.items()]
    fresh = WeightedRoundRobin()
    assert [wrr.pick(comeback).name for _ in range(18)] == [fresh.pick(comeback).name for _ in range(18)]


def test_weighted_round_robin_skips_unavailable_through_the_pool() -> None:
    a = backend("a", weight=3)
    b = backend("b", weight=1, capacity=1)
    pool = pool_of([a, b], WeightedRoundRobin())
    picks = []
    for _ in range(8):
        picked = pool.choose()
        assert picked is not None
        pool.acquire(picked)
        picks.append(picked.name)
    assert picks.count("b") == 1
    assert picks.count("a") == 7


# --- least connections --------------------------------------------------------------------------


@given(
    count=st.integers(1, 8),
    ops=st.lists(st.one_of(st.just("connect"), st.integers(0, 7)), max_size=200),
)
def test_least_connections_fills_evenly(count: int, ops: list[str | int]) -> None:
    # "connect": a new client (choose, then acquire). An integer: a client leaves that backend.
    backends = equal_backends(count)
    pool = pool_of(backends, LeastConnections())

    def connect() -> None:
        before = [b.connections for b in backends]
        picked = pool.choose()
        assert picked is not None
        assert picked.connections == min(before)
        pool.acquire(picked)
        after = [b.connections for b in backends]
        # An arrival never widens the spread, and from an even start it stays within one.
        assert max(after) - min(after) <= max(max(before) - min(before), 1)

    for op in ops:
        if isinstance(op, int):
            pool.release(backends[op % count])
        else:
            connect()
    # Departures can unbalance the backends; arrivals even them out again.
    peak = max(b.connections for b in backends)
    for _ in range(sum(peak - b.connections for b in backends)):
        connect()
    assert [b.connections for b in backends] == [peak] * count


@given(
    loads=st.lists(st.tuples(st.integers(0, 20), st.integers(1, 5)), min_size=1, max_size=10),
)
def test_least_connections_picks_the_lowest_ratio(loads: list[tuple[int, int]]) -> None:
    candidates = [backend(f"b{i}", weight=w, connections=c) for i, (c, w) in enumerate(loads)]
    lc = LeastConnections()
    for _ in range(3):
        picked = lc.pick(candidates)
        assert not any(lighter(other, picked) for other in candidates)


@given(count=st.integers(1, 10))
def test_least_connections_rotates_ties(count: int) -> None:
    # Without acquiring (connects that fail, say), equal backends still take turns.
    candidates = equal_backends(count)
    lc = LeastConnections()
    picks = [lc.pick(candidates) for _ in range(count)]
    assert {b.name for b in picks} == {b.name for b in candidates}


def test_least_connections_respects_weights() -> None:
    heavy = backend("heavy", weight=3)
    light = backend("light", weight=1)
    pool = pool_of([heavy, light], LeastConnections())
    for _ in range(40):
        picked = pool.choose()
        assert picked is not None
        pool.acquire(picked)
    assert (heavy.connections, light.connections) == (30, 10)


# --- random and power of two --------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Random, PowerOfTwo])
def test_random_choices_spread_over_all_candidates(cls: type[Random] | type[PowerOfTwo]) -> None:
    candidates = equal_backends(10)
    balancer = cls(random.Random(1234))
    counts = Counter(balancer.pick(candidates).name for _ in range(2000))
    assert set(counts) == {b.name for b in candidates}
    assert min(counts.values()) > 100  # 200 expected each


@pytest.mark.parametrize("cls", [Random, PowerOfTwo])
def test_random_choices_with_one_candidate(cls: type[Random] | type[PowerOfTwo]) -> None:
    only = backend("only")
    balancer = cls(random.Random(0))
    assert all(balancer.pick([only]) is only for _ in range(10))


def test_random_choices_work_without_an_rng() -> None:
    candidates = equal_backends(3)
    assert Random().pick(candidates) in candidates
    assert PowerOfTwo().pick(candidates) in candidates


@given(
    seed=st.integers(0, 2**32),
    loads=st.lists(st.tuples(st.integers(0, 20), st.integers(1, 5)), min_size=2, max_size=10),
)
def test_power_of_two_never_picks_the_heavier_of_two(seed: int, loads: list[tuple[int, int]]) -> None:
    candidates = [backend(f"b{i}", weight=w, connections=c) for i, (c, w) in enumerate(loads)]
    p2c = PowerOfTwo(random.Random(seed))
    for _ in range(20):
        picked = p2c.pick(candidates)
        # It compared the pick with some other candidate, so it is never the strictly heaviest.
        assert any(not lighter(other, picked) for other in candidates if other is not picked)
    first, second = candidates[:2]
    if not equal_load(first, second):
        lightest = first if lighter(first, second) else second
        assert all(p2c.pick([first, second]) is lightest for _ in range(20))


def test_power_of_two_balances_through_the_pool() -> None:
    backends = equal_backends(5)
    pool = pool_of(backends, PowerOfTwo(random.Random(7)))
    for _ in range(500):
        picked = pool.choose()
        assert picked is not None
        pool.acquire(picked)
    counts = [b.connections for b in backends]
    assert max(counts) - min(counts) <= 5  # random would typically spread ~30
