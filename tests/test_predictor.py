"""Tests for the sans-IO predictor: prepare before a crossing, transfer once past it, never ping-pong."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, cast

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from atlas.control.lifecycle import TransferReason
from atlas.world import (
    CancelPrepare,
    Cell,
    Decision,
    Grid,
    Predictor,
    PredictorSettings,
    Prepare,
    Transfer,
    Vec3,
    WorldMap,
)

SETTINGS = PredictorSettings()
HYSTERESIS = SETTINGS.hysteresis


def two_regions() -> WorldMap:
    """``a`` owns x in [-1000, 0), ``b`` owns x in [0, 1000) (y, z in [-1000, 1000)): one face at x = 0."""
    grid = Grid(Vec3(1000.0, 2000.0, 2000.0), Vec3(-1000.0, -1000.0, -1000.0))
    return WorldMap.from_grid(grid, {Cell(0, 0, 0): "a", Cell(1, 0, 0): "b"})


def four_quadrants() -> WorldMap:
    """``a`` (x < 0, y < 0), ``b`` (x >= 0, y < 0), ``c`` (x < 0, y >= 0), ``d`` (x >= 0, y >= 0)."""
    grid = Grid(Vec3(1000.0, 1000.0, 2000.0), Vec3(-1000.0, -1000.0, -1000.0))
    owners = {Cell(0, 0, 0): "a", Cell(1, 0, 0): "b", Cell(0, 1, 0): "c", Cell(1, 1, 0): "d"}
    return WorldMap.from_grid(grid, owners)


@attrs.define
class Ledger:
    """Replays decisions as the coordinator would, and checks they make sense in order.

    A Prepare is never issued for a (client, target) that is live; a CancelPrepare always names a
    live one; a Transfer says ``prepared`` exactly when it consumes a live one. After every batch
    the live set matches what the predictor reports.
    """

    predictor: Predictor
    live: set[tuple[str, str]] = attrs.field(factory=set)
    log: list[tuple[float, Vec3 | None, Decision]] = attrs.field(factory=list)

    def take(
        self, decisions: Iterable[Decision], t: float = math.nan, p: Vec3 | None = None
    ) -> list[Decision]:
        decisions = list(decisions)
        for d in decisions:
            key = (d.client_id, d.target_backend)
            if isinstance(d, Prepare):
                assert key not in self.live, f"second Prepare while one is live: {d}"
                assert d.eta_seconds >= 0.0
                self.live.add(key)
            elif isinstance(d, CancelPrepare):
                assert key in self.live, f"cancel of nothing: {d}"
                self.live.remove(key)
            else:
                assert d.reason is TransferReason.REGION_BOUNDARY
                assert d.prepared == (key in self.live)
                self.live.discard(key)
            self.log.append((t, p, d))
        clients = {client for client, _ in self.live} | {d.client_id for d in decisions}
        for client in clients:
            snapshot = self.predictor.client(client)
            reported = set() if snapshot is None else {(client, target) for target in snapshot.preparing}
            assert reported == {key for key in self.live if key[0] == client}
        return decisions

    def observe(self, client: str, p: Vec3, v: Vec3 | None, t: float) -> list[Decision]:
        return self.take(self.predictor.observe(client, p, v, t), t, p)

    def of(self, kind: type[Decision]) -> list[tuple[float, Vec3 | None, Decision]]:
        return [entry for entry in self.log if isinstance(entry[2], kind)]

    def summary(self) -> list[tuple[str, ...]]:
        """The decisions so far, without their ETAs: ``("prepare", target)``, ``("transfer", target,
        "prepared" | "cold")``, ``("cancel", target, why)``."""
        out: list[tuple[str, ...]] = []
        for _, _, d in self.log:
            if isinstance(d, Prepare):
                out.append(("prepare", d.target_backend))
            elif isinstance(d, Transfer):
                out.append(("transfer", d.target_backend, "prepared" if d.prepared else "cold"))
            else:
                out.append(("cancel", d.target_backend, d.why))
        return out


def tracker(world: WorldMap, owner: str = "a", settings: PredictorSettings = SETTINGS) -> Ledger:
    ledger = Ledger(Predictor(world, settings))
    assert ledger.take(ledger.predictor.moved("c", owner)) == []
    return ledger


def walk(
    ledger: Ledger,
    start: Vec3,
    velocity: Vec3,
    dt: float,
    steps: int,
    *,
    t0: float = 0.0,
    send_velocity: bool = False,
) -> float:
    """Observe ``steps`` positions along a straight line; return the time of the last one."""
    t = t0
    for k in range(steps):
        t = t0 + k * dt
        ledger.observe("c", start + velocity.scale(k * dt), velocity if send_velocity else None, t)
    return t


# ------------------------------------------------------------------------------------------------
# Straight across a face
# ------------------------------------------------------------------------------------------------


@given(
    speed=st.floats(2.0, 50.0),
    dt=st.floats(0.02, 0.2),
    send_velocity=st.booleans(),
    y=st.floats(-900.0, 900.0),
    z=st.floats(-900.0, 900.0),
)
def test_straight_crossing_prepares_before_and_transfers_once(
    speed: float, dt: float, send_velocity: bool, y: float, z: float
) -> None:
    ledger = tracker(two_regions())
    x0 = -(SETTINGS.margin + speed * SETTINGS.lookahead + 10 * speed * dt + 10.0)
    x_end = HYSTERESIS + 10 * speed * dt + 20.0
    velocity = Vec3(speed, 0.0, 0.0)
    xs = []
    k = 0
    while (x := x0 + speed * k * dt) < x_end:
        xs.append(x)
        ledger.observe("c", Vec3(x, y, z), velocity if send_velocity else None, k * dt)
        k += 1

    assert len(ledger.log) == 2, ledger.log
    (_, p_prep, prepare), (_, p_move, transfer) = ledger.log
    assert isinstance(prepare, Prepare) and prepare.target_backend == "b"
    assert p_prep is not None and p_prep.x < 0.0  # before its position crossed
    assert 0.0 < prepare.eta_seconds < 2 * (-p_prep.x / speed) + dt
    assert transfer == Transfer("c", "b", prepared=True)
    first_deep = next(x for x in xs if x > HYSTERESIS)  # the first observation hysteresis inside
    assert p_move is not None and p_move.x == first_deep

    stats = ledger.predictor.statistics()
    assert (stats.crossings, stats.prepared_crossings, stats.unprepared_crossings) == (1, 1, 0)
    assert (stats.transfers, stats.preparations, stats.preparations_used) == (1, 1, 1)
    assert stats.preparations_expired == stats.preparations_cancelled == stats.preparing == 0
    snapshot = ledger.predictor.client("c")
    assert snapshot is not None and snapshot.owner == "b"
    assert (snapshot.crossings, snapshot.prepared_crossings) == (1, 1)


def test_a_slow_crossing_keeps_its_preparation_alive() -> None:
    """At 1 unit/s the client needs ~7 s from prepare to transfer, more than prepare_ttl: refreshed."""
    ledger = tracker(two_regions())
    walk(ledger, Vec3(-20.0, 0.0, 0.0), Vec3(1.0, 0.0, 0.0), 0.1, 300)
    assert ledger.summary() == [("prepare", "b"), ("transfer", "b", "prepared")]


def test_a_teleport_is_an_unprepared_crossing() -> None:
    ledger = tracker(two_regions())
    ledger.observe("c", Vec3(-50.0, 0.0, 0.0), None, 0.0)
    decisions = ledger.observe("c", Vec3(50.0, 0.0, 0.0), None, 0.1)
    assert decisions[0] == Transfer("c", "b", prepared=False)
    stats = ledger.predictor.statistics()
    assert (stats.crossings, stats.prepared_crossings, stats.unprepared_crossings) == (1, 0, 1)


def test_a_crossing_prepared_only_after_the_face_is_unprepared() -> None:
    """lookahead 0 and margin 0: nothing is predicted, the preparation comes once it is inside."""
    ledger = tracker(two_regions(), settings=PredictorSettings(lookahead=0.0, margin=0.0, smoothing=0.0))
    walk(ledger, Vec3(-5.0, 0.0, 0.0), Vec3(10.0, 0.0, 0.0), 0.1, 20)
    kinds = [type(d) for _, _, d in ledger.log]
    assert kinds == [Prepare, Transfer]
    assert ledger.log[0][1] is not None and ledger.log[0][1].x >= 0.0
    stats = ledger.predictor.statistics()
    assert (stats.crossings, stats.prepared_crossings, stats.unprepared_crossings) == (1, 0, 1)


# ------------------------------------------------------------------------------------------------
# Hovering on a face
# ------------------------------------------------------------------------------------------------

hover_steps = st.lists(
    st.tuples(
        st.floats(-0.999, 0.999),  # position, as a fraction of the hysteresis either side of the face
        st.floats(0.001, 0.5),  # seconds since the previous message
        st.none() | st.builds(Vec3, *[st.floats(-100.0, 100.0)] * 3),  # the message's velocity
    ),
    min_size=1,
    max_size=300,
)


@given(owner=st.sampled_from(["a", "b"]), steps=hover_steps, y=st.floats(-900.0, 900.0))
def test_hovering_on_a_face_never_transfers(
    owner: str, steps: list[tuple[float, float, Vec3 | None]], y: float
) -> None:
    ledger = tracker(two_regions(), owner)
    t = 0.0
    for fraction, dt, velocity in steps:
        t += dt
        ledger.observe("c", Vec3(fraction * HYSTERESIS, y, 0.0), velocity, t)
    assert ledger.of(Transfer) == []
    assert ledger.predictor.statistics().transfers == 0
    ledger.take(ledger.predictor.expire(t + SETTINGS.prepare_ttl))
    assert ledger.live == set()


@given(steps=hover_steps)
def test_crossing_then_hovering_transfers_exactly_once(steps: list[tuple[float, float, Vec3 | None]]) -> None:
    ledger = tracker(two_regions())
    t = walk(ledger, Vec3(-30.0, 0.0, 0.0), Vec3(10.0, 0.0, 0.0), 0.05, 70)  # ends at x = 4.5
    assert [d for _, _, d in ledger.of(Transfer)] == [Transfer("c", "b", prepared=True)]
    for fraction, dt, velocity in steps:
        t += dt
        ledger.observe("c", Vec3(fraction * HYSTERESIS, 0.0, 0.0), velocity, t)
    assert len(ledger.of(Transfer)) == 1
    snapshot = ledger.predictor.client("c")
    assert snapshot is not None and snapshot.owner == "b"


@given(offset=st.floats(-1.9, 1.9), speed=st.floats(3.0, 30.0))
def test_diagonal_near_a_corner_transfers_once_to_the_far_region(offset: float, speed: float) -> None:
    ledger = tracker(four_quadrants())
    dt = 0.05
    k = 0
    while (s := -40.0 + speed * k * dt) < 30.0:
        ledger.observe("c", Vec3(s, s + offset, 0.0), None, k * dt)
        k += 1
    assert [d for _, _, d in ledger.of(Transfer)] == [Transfer("c", "d", prepared=True)]
    prepare_d = [(p, d) for _, p, d in ledger.of(Prepare) if d.target_backend == "d"]
    assert len(prepare_d) == 1
    p = prepare_d[0][0]
    assert p is not None and (p.x < 0.0 or p.y < 0.0)  # before it entered d
    assert ledger.live == set()  # whatever b or c got was cancelled when it moved to d


def test_diagonal_exactly_through_a_corner() -> None:
    ledger = tracker(four_quadrants())
    walk(ledger, Vec3(-30.0, -30.0, 0.0), Vec3(10.0, 10.0, 0.0), 0.05, 80)
    assert ledger.summary() == [
        # b's and c's regions are equally near: the tie goes to the smaller region id (c's cell 0,1,0).
        ("prepare", "c"),
        ("prepare", "d"),
        ("transfer", "d", "prepared"),
        ("cancel", "c", "owner_changed"),
    ]
    stats = ledger.predictor.statistics()
    assert (stats.crossings, stats.prepared_crossings, stats.preparations_cancelled) == (1, 1, 1)


# ------------------------------------------------------------------------------------------------
# Preparations that are not used
# ------------------------------------------------------------------------------------------------


def test_an_unused_preparation_expires_once() -> None:
    ledger = tracker(two_regions())
    t_last = walk(ledger, Vec3(-20.0, 0.0, 0.0), Vec3(10.0, 0.0, 0.0), 0.1, 18)  # stops at x = -3
    assert [type(d) for _, _, d in ledger.log] == [Prepare]
    predictor = ledger.predictor
    ttl = SETTINGS.prepare_ttl
    assert ledger.take(predictor.expire(t_last + ttl - 0.001)) == []
    assert ledger.take(predictor.expire(t_last + ttl)) == [CancelPrepare("c", "b", "expired")]
    assert ledger.take(predictor.expire(t_last + ttl + 10.0)) == []
    stats = predictor.statistics()
    assert (stats.preparations, stats.preparations_expired, stats.preparing) == (1, 1, 0)


def test_turning_back_before_the_face_cancels_when_the_preparation_expires() -> None:
    ledger = tracker(two_regions())
    t_turn = walk(ledger, Vec3(-20.0, 0.0, 0.0), Vec3(10.0, 0.0, 0.0), 0.1, 18)  # up to x = -3
    walk(ledger, Vec3(-3.0, 0.0, 0.0), Vec3(-10.0, 0.0, 0.0), 0.1, 60, t0=t_turn + 0.1)
    decisions = [d for _, _, d in ledger.log]
    assert decisions[0].target_backend == "b" and isinstance(decisions[0], Prepare)
    assert decisions[1:] == [CancelPrepare("c", "b", "expired")]
    t_cancel = ledger.log[1][0]
    # Refreshed while it still approached (a few smoothed samples after the turn), then left to expire.
    assert t_turn + SETTINGS.prepare_ttl <= t_cancel <= t_turn + SETTINGS.prepare_ttl + 0.5
    assert ledger.predictor.statistics().transfers == 0


def test_moving_away_from_a_face_just_crossed_prepares_nothing() -> None:
    """margin > hysteresis: without the approach rule the old owner would be prepared at once."""
    ledger = tracker(two_regions(), settings=PredictorSettings(margin=20.0, hysteresis=2.0))
    walk(ledger, Vec3(-30.0, 0.0, 0.0), Vec3(1.0, 0.0, 0.0), 0.1, 500)
    assert [type(d) for _, _, d in ledger.log] == [Prepare, Transfer]


def test_moved_and_forget_cancel_live_preparations() -> None:
    ledger = tracker(two_regions())
    walk(ledger, Vec3(-10.0, 0.0, 0.0), Vec3(10.0, 0.0, 0.0), 0.1, 5)
    predictor = ledger.predictor
    assert ledger.take(predictor.moved("c", "b")) == [CancelPrepare("c", "b", "owner_changed")]
    assert ledger.take(predictor.moved("c", "b")) == []
    ledger.take(predictor.moved("c", "a"))
    ledger.observe("c", Vec3(-4.0, 0.0, 0.0), Vec3(10.0, 0.0, 0.0), 1.0)
    assert ("c", "b") in ledger.live
    assert ledger.take(predictor.forget("c")) == [CancelPrepare("c", "b", "forgotten")]
    assert predictor.forget("c") == [] and "c" not in predictor and predictor.client("c") is None
    assert predictor.statistics().preparations_cancelled == 2


# ------------------------------------------------------------------------------------------------
# Owners: rollbacks, other triggers, unknown owners, world changes
# ------------------------------------------------------------------------------------------------


def test_a_rolled_back_transfer_is_retried_after_the_retry_delay() -> None:
    ledger = tracker(two_regions())
    t = walk(ledger, Vec3(-10.0, 0.0, 0.0), Vec3(10.0, 0.0, 0.0), 0.1, 14)  # x = 3: transferred
    assert len(ledger.of(Transfer)) == 1
    # Movements go on while the transfer runs (the predictor believes b owns the client) ...
    for _ in range(3):
        t += 0.1
        assert ledger.observe("c", Vec3(3.0, 0.0, 0.0), None, t) == []
    predictor = ledger.predictor
    assert ledger.take(predictor.moved("c", "a")) == []  # ... then it rolls back: the source kept it
    retry_at = t + SETTINGS.retry_delay
    while t < retry_at + 0.35:
        t += 0.1
        decisions = ledger.observe("c", Vec3(3.0, 0.0, 0.0), None, t)
        if t < retry_at:
            assert not any(isinstance(d, Transfer) for d in decisions)
    transfers = ledger.of(Transfer)
    assert len(transfers) == 2 and transfers[1][0] >= retry_at
    assert transfers[1][2] == Transfer("c", "b", prepared=True)  # prepared again while held
    stats = predictor.statistics()
    assert (stats.transfers, stats.crossings, stats.prepared_crossings) == (2, 1, 1)


def test_confirming_a_transfer_changes_nothing() -> None:
    ledger = tracker(two_regions())
    t = walk(ledger, Vec3(-10.0, 0.0, 0.0), Vec3(10.0, 0.0, 0.0), 0.1, 14)
    assert ledger.take(ledger.predictor.moved("c", "b")) == []
    ledger.observe("c", Vec3(4.0, 0.0, 0.0), None, t + 0.1)
    assert len(ledger.log) == 2


def test_a_client_without_an_owner_gets_no_decisions() -> None:
    predictor = Predictor(two_regions())
    for k in range(50):
        assert predictor.observe("c", Vec3(-10.0 + k, 0.0, 0.0), None, k * 0.1) == []
    snapshot = predictor.client("c")
    assert snapshot is not None and snapshot.owner is None and snapshot.velocity is not None
    assert snapshot.velocity.x == pytest.approx(10.0)


def test_regions_of_one_owner_need_no_transfer() -> None:
    world = two_regions()
    world.set_owner("cell:1,0,0", "a")
    ledger = tracker(world)
    walk(ledger, Vec3(-20.0, 0.0, 0.0), Vec3(10.0, 0.0, 0.0), 0.1, 50)
    assert ledger.log == []


def test_the_world_can_change_under_the_predictor() -> None:
    world = two_regions()
    ledger = tracker(world)
    t = walk(ledger, Vec3(-15.0, 0.0, 0.0), Vec3(10.0, 0.0, 0.0), 0.1, 10)  # prepared b at ~-10
    assert ("c", "b") in ledger.live
    world.assign(Cell(1, 0, 0), "e")  # b's cell changes hands
    walk(ledger, Vec3(-5.0, 0.0, 0.0), Vec3(10.0, 0.0, 0.0), 0.1, 10, t0=t + 0.1)
    assert ledger.summary() == [
        ("prepare", "b"),
        ("prepare", "e"),  # the new owner of the region ahead
        ("transfer", "e", "prepared"),
        ("cancel", "b", "owner_changed"),  # b's preparation is dropped when the client moves to e
    ]


# ------------------------------------------------------------------------------------------------
# Motion estimates
# ------------------------------------------------------------------------------------------------


def test_velocity_is_derived_from_positions_when_absent() -> None:
    predictor = Predictor(two_regions())
    predictor.observe("c", Vec3(0.0, 0.0, 0.0), None, 0.0)
    snapshot = predictor.client("c")
    assert snapshot is not None and snapshot.velocity == Vec3.ZERO
    predictor.observe("c", Vec3(1.0, 2.0, 3.0), None, 0.5)
    snapshot = predictor.client("c")
    assert snapshot is not None and snapshot.velocity == Vec3(2.0, 4.0, 6.0)
    assert snapshot.position == Vec3(0.5, 1.0, 1.5)  # smoothing 0.5: halfway
    predictor.observe("c", Vec3(2.0, 4.0, 6.0), None, 1.0)
    snapshot = predictor.client("c")
    assert snapshot is not None and snapshot.velocity == Vec3(2.0, 4.0, 6.0)
    assert snapshot.position is not None
    assert snapshot.predicted == snapshot.position + snapshot.velocity.scale(SETTINGS.lookahead)


def test_a_message_velocity_is_used_and_smoothed() -> None:
    predictor = Predictor(two_regions())
    predictor.observe("c", Vec3.ZERO, Vec3(4.0, 0.0, 0.0), 0.0)
    snapshot = predictor.client("c")
    assert snapshot is not None and snapshot.velocity == Vec3(4.0, 0.0, 0.0)
    predictor.observe("c", Vec3.ZERO, Vec3(0.0, 0.0, 0.0), 0.1)
    snapshot = predictor.client("c")
    assert snapshot is not None and snapshot.velocity == Vec3(2.0, 0.0, 0.0)


def test_messages_in_one_burst_move_the_position_only() -> None:
    predictor = Predictor(two_regions(), PredictorSettings(smoothing=0.0))
    predictor.observe("c", Vec3.ZERO, None, 0.0)
    predictor.observe("c", Vec3(1.0, 0.0, 0.0), None, 0.1)
    predictor.observe("c", Vec3(1.1, 0.0, 0.0), None, 0.100001)  # 1 µs later: no 100 000 units/s
    snapshot = predictor.client("c")
    assert snapshot is not None and snapshot.velocity == Vec3(10.0, 0.0, 0.0)
    assert snapshot.position == Vec3(1.1, 0.0, 0.0)
    predictor.observe("c", Vec3(2.0, 0.0, 0.0), None, 0.2)
    snapshot = predictor.client("c")
    assert snapshot is not None and snapshot.velocity is not None
    assert snapshot.velocity.x == pytest.approx(10.0)  # measured from t = 0.1


def test_duplicate_out_of_order_and_non_finite_observations_are_ignored() -> None:
    predictor = Predictor(two_regions())
    predictor.observe("c", Vec3(1.0, 0.0, 0.0), None, 2.0)
    assert predictor.observe("c", Vec3(50.0, 0.0, 0.0), None, 2.0) == []
    assert predictor.observe("c", Vec3(50.0, 0.0, 0.0), None, 1.5) == []
    assert predictor.observe("c", Vec3(math.nan, 0.0, 0.0), None, 3.0) == []
    assert predictor.observe("c", Vec3(0.0, 0.0, 0.0), Vec3(math.inf, 0.0, 0.0), 3.0) == []
    assert predictor.observe("c", Vec3(0.0, 0.0, 0.0), None, math.inf) == []
    snapshot = predictor.client("c")
    assert snapshot is not None and snapshot.time == 2.0 and snapshot.position == Vec3(1.0, 0.0, 0.0)
    stats = predictor.statistics()
    assert (stats.observations, stats.ignored) == (1, 5)


def test_acceleration_is_estimated_when_enabled() -> None:
    settings = PredictorSettings(use_acceleration=True, smoothing=0.0)
    predictor = Predictor(two_regions(), settings)
    for k in range(20):
        t = k * 0.1
        predictor.observe("c", Vec3(2.0 * t * t, 0.0, 0.0), None, t)  # a = 4
    snapshot = predictor.client("c")
    assert snapshot is not None and snapshot.acceleration is not None
    assert snapshot.acceleration.x == pytest.approx(4.0)
    assert snapshot.position is not None and snapshot.velocity is not None and snapshot.predicted is not None
    ahead = settings.lookahead
    expected = snapshot.position.x + snapshot.velocity.x * ahead + 2.0 * ahead * ahead
    assert snapshot.predicted.x == pytest.approx(expected)
    plain = Predictor(two_regions(), PredictorSettings(smoothing=0.0))
    for k in range(20):
        plain.observe("c", Vec3(2.0 * (k * 0.1) ** 2, 0.0, 0.0), None, k * 0.1)
    snapshot = plain.client("c")
    assert snapshot is not None and snapshot.acceleration == Vec3.ZERO


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lookahead", -0.1, ">= 0"),
        ("margin", math.nan, "finite"),
        ("hysteresis", math.inf, "finite"),
        ("prepare_ttl", 0.0, "> 0"),
        ("smoothing", 1.0, "below 1"),
        ("smoothing", -0.5, ">= 0"),
        ("retry_delay", True, "finite number"),
    ],
)
def test_settings_are_validated(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        attrs.evolve(PredictorSettings(), **{field: cast(Any, value)})


def test_settings_defaults() -> None:
    s = PredictorSettings()
    assert (s.lookahead, s.margin, s.hysteresis, s.prepare_ttl, s.smoothing, s.use_acceleration) == (
        0.5,
        5.0,
        2.0,
        3.0,
        0.5,
        False,
    )
    assert (s.retry_delay, s.min_interval) == (1.0, 0.01)
