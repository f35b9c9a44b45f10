"""Predictive region transitions: when to prepare a client's transfer, and when to make it. Pure, no I/O.

Theory of operation
-------------------
The analyzer feeds every movement message of a client to `Predictor.observe` (position, velocity when
the message has one, and the time on the caller's monotonic clock) and passes the decisions it returns
to the transfer coordinator. Nothing here awaits or reads a clock: time comes in as floats, so the whole
module is tested without sockets or an event loop.

Per client the predictor keeps:

* **Motion**, smoothed per observation with weight ``smoothing`` on the old estimate::

      position = raw + smoothing * (position - raw)
      velocity = measured + smoothing * (velocity - measured)

  ``measured`` is the message's velocity, or, without one, the displacement since the last velocity
  update divided by the time between them. Observations closer than ``min_interval`` to the last
  velocity update move the position only (two messages read in one burst would otherwise make an
  absurd speed). With ``use_acceleration`` the acceleration is smoothed the same way from successive
  velocities. Observations that are not newer than the last one (duplicates, reordered) or not finite
  are ignored.
* **The prediction** ``q = position + velocity * lookahead (+ acceleration * lookahead**2 / 2)``.
* **The owner**, the backend the predictor believes serves the client: set by `Predictor.moved` (on
  placement, and whenever anything else moves the client or a transfer fails), and by its own
  `Transfer` decisions. A client without an owner is tracked but gets no decisions.

Rules, for a client owned by ``O`` at an observation at time ``t`` with raw position ``p``:

1. **Expire** its preparations whose deadline has passed: `CancelPrepare` (``"expired"``).
2. **Transfer** when ``p`` is in a region ``R`` owned by ``B != O`` with
   ``R.box.signed_distance(p) > hysteresis`` (and no hold is on, see 4): `Transfer` to ``B``, reason
   ``region_boundary``. The owner becomes ``B`` at once; a live preparation for ``B`` is consumed, any
   other is cancelled (``"owner_changed"``: it was made for the old source). To come back, the client
   must be ``hysteresis`` deep inside a region of ``O``: ``2 * hysteresis`` of travel, so a client
   hovering on a face (moving less than that) is never bounced.
3. **Prepare** ``B`` when some region ``R`` owned by ``B != O`` *calls for it*: the prediction is in
   the closed ``R`` (``signed_distance(q) >= 0``), or within ``margin`` of it and nearer to it than
   the smoothed position is (``-margin <= signed_distance(q)`` and
   ``signed_distance(q) > signed_distance(position)``: approaching, so a client moving away from a
   face it just crossed does not prepare the way back). Each observation issues at most one new
   `Prepare`, for the deepest such region (ties by region id), and never a second one for a target
   that is already being prepared. Every live preparation whose target is called for again has its
   deadline pushed to ``t + prepare_ttl``: a preparation expires ``prepare_ttl`` seconds after the
   last observation that wanted it. `Predictor.expire` runs rule 1 for clients that went quiet.
4. **Hold**: when `Predictor.moved` reports an owner the predictor did not expect (a transfer rolled
   back or was refused, failover, the rebalancer), rule 2 waits ``retry_delay`` seconds, so a refused
   transfer is not asked again on every message.

A *crossing* is an episode in which the client's raw position is in a region of another backend than
its owner, counted once when it leads to a `Transfer` (retries after a rollback are not new
crossings). It is *prepared* when a preparation for that backend was live at the first observation of
the episode, that is, before the client crossed the face, and *unprepared* otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, TypeAlias

import attrs

from atlas.control.lifecycle import TransferReason
from atlas.world._geometry import Box, Vec3
from atlas.world._map import WorldMap

__all__ = [
    "CancelPrepare",
    "CancelReason",
    "ClientSnapshot",
    "Decision",
    "Predictor",
    "PredictorSettings",
    "PredictorStatistics",
    "Prepare",
    "Transfer",
]

CancelReason = Literal["expired", "owner_changed", "forgotten"]
"""Why a preparation ended without being used (see `CancelPrepare`)."""


def _at_least(
    bound: float, *, strict: bool = False
) -> Callable[[object, attrs.Attribute[float], float], None]:
    def validate(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{attribute.name} must be a finite number, got {value!r}")
        if value < bound or (strict and value == bound):
            raise ValueError(f"{attribute.name} must be {'>' if strict else '>='} {bound}, got {value}")

    return validate


def _fraction(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    _at_least(0.0)(_instance, attribute, value)
    if value >= 1.0:
        raise ValueError(f"{attribute.name} must be below 1, got {value}")


@attrs.frozen
class PredictorSettings:
    """The predictor's tuning knobs (docs/world.md has guidance). Distances in world units."""

    lookahead: float = attrs.field(default=0.5, validator=_at_least(0.0))
    """Seconds ahead the position is predicted. Make it longer than a preparation takes (notice,
    the target's ``transfer.ready``, opening its link) so the link is open before the client crosses."""
    margin: float = attrs.field(default=5.0, validator=_at_least(0.0))
    """A predicted position this close to another backend's region, and approaching it, already
    prepares it. Widens the net for slow clients and for prediction error."""
    hysteresis: float = attrs.field(default=2.0, validator=_at_least(0.0))
    """How deep inside another backend's region the observed position must be (signed distance
    strictly greater) before the client is transferred. Larger than the jitter of positions on a
    face; smaller than half the narrowest region."""
    prepare_ttl: float = attrs.field(default=3.0, validator=_at_least(0.0, strict=True))
    """Seconds a preparation lives after the last observation that called for it."""
    smoothing: float = attrs.field(default=0.5, validator=_fraction)
    """Weight of the old estimate in each update, 0 <= smoothing < 1: 0 uses raw values, towards 1
    smooths more and lags more (the position trails a steady client by about
    ``smoothing / (1 - smoothing)`` message intervals)."""
    use_acceleration: bool = False
    """Estimate an acceleration too and add ``a * lookahead**2 / 2`` to the prediction."""
    retry_delay: float = attrs.field(default=1.0, validator=_at_least(0.0))
    """Seconds without region transfers after an unexpected owner change (a transfer that rolled back,
    or another trigger moved the client)."""
    min_interval: float = attrs.field(default=0.01, validator=_at_least(0.0))
    """Seconds that must separate two velocity updates; closer observations move the position only."""


# ------------------------------------------------------------------------------------------------
# Decisions
# ------------------------------------------------------------------------------------------------


@attrs.frozen
class Prepare:
    """Prepare a transfer of ``client_id`` to ``target_backend``: advance notice, pre-opened link.

    Live until the same client's `Transfer` to that target (which uses it) or `CancelPrepare`.
    """

    client_id: str
    target_backend: str
    eta_seconds: float
    """Estimated seconds until the client reaches the target's region (0: already at or in it)."""


@attrs.frozen
class Transfer:
    """Transfer ``client_id`` to ``target_backend`` now, with reason ``region_boundary``.

    Report the outcome with `Predictor.moved` if it was not this target (rollback, refusal).
    """

    client_id: str
    target_backend: str
    prepared: bool
    """Whether a preparation for this target is live and consumed by this transfer."""
    reason: TransferReason = TransferReason.REGION_BOUNDARY


@attrs.frozen
class CancelPrepare:
    """Drop the preparation of ``client_id`` for ``target_backend`` (idempotent for the coordinator)."""

    client_id: str
    target_backend: str
    why: CancelReason
    """``expired``: no longer called for; ``owner_changed``: the client moved elsewhere;
    ``forgotten``: the client left."""


Decision: TypeAlias = Prepare | Transfer | CancelPrepare
"""What `Predictor` asks of the transfer coordinator."""


@attrs.frozen
class PredictorStatistics:
    """A snapshot of a `Predictor`'s counters (see `Predictor.statistics`)."""

    clients: int
    """Clients tracked now."""
    preparing: int
    """Preparations live now."""
    observations: int
    """Observations used."""
    ignored: int
    """Observations ignored: not finite, duplicate or out-of-order timestamps."""
    preparations: int
    """`Prepare` decisions."""
    preparations_used: int
    """Preparations consumed by a `Transfer`."""
    preparations_expired: int
    """Preparations that expired unused."""
    preparations_cancelled: int
    """Preparations cancelled because the owner changed or the client left."""
    crossings: int
    """Crossings that led to a transfer (see the module docstring)."""
    prepared_crossings: int
    """Crossings prepared before the client crossed the face."""
    unprepared_crossings: int
    """Crossings not prepared in time."""
    transfers: int
    """`Transfer` decisions (a crossing retried after a rollback counts once here per attempt)."""


@attrs.frozen
class ClientSnapshot:
    """What the predictor knows about one client (see `Predictor.client`)."""

    client_id: str
    owner: str | None
    time: float | None
    """Time of the last observation used, or None before the first."""
    position: Vec3 | None
    """Smoothed position."""
    velocity: Vec3 | None
    """Smoothed velocity."""
    acceleration: Vec3 | None
    """Smoothed acceleration (zero unless ``use_acceleration``)."""
    predicted: Vec3 | None
    """The position predicted ``lookahead`` seconds ahead."""
    preparing: tuple[str, ...]
    """Targets with a live preparation, sorted."""
    crossings: int
    prepared_crossings: int


# ------------------------------------------------------------------------------------------------
# Per-client state
# ------------------------------------------------------------------------------------------------


@attrs.define
class _Motion:
    t: float
    raw: Vec3
    position: Vec3
    velocity: Vec3
    acceleration: Vec3
    velocity_known: bool
    acceleration_known: bool
    anchor_t: float
    """Time of the last velocity update (derived velocities are measured from it)."""
    anchor: Vec3
    """Raw position at ``anchor_t``."""


@attrs.define
class _Entry:
    """The current crossing episode: the client is in a region of ``target``, not its owner."""

    target: str
    prepared: bool
    counted: bool = False


@attrs.define
class _Client:
    owner: str | None = None
    motion: _Motion | None = None
    preparations: dict[str, float] = attrs.field(factory=dict)
    """Live preparations: target backend -> deadline (expired when now >= deadline)."""
    asked: _Entry | None = None
    """The episode of this predictor's last `Transfer` (its target is ``asked.target``), until `moved`
    reports an outcome: a rollback restores it, so the retry is not counted as a new crossing."""
    hold_until: float = -math.inf
    entry: _Entry | None = None
    crossings: int = 0
    prepared_crossings: int = 0


@attrs.define
class _Counters:
    observations: int = 0
    ignored: int = 0
    preparations: int = 0
    preparations_used: int = 0
    preparations_expired: int = 0
    preparations_cancelled: int = 0
    crossings: int = 0
    prepared_crossings: int = 0
    transfers: int = 0


class Predictor:
    """Turns clients' movements into prepare and transfer decisions; see the module docstring.

    ``world`` is read at every observation, so region changes take effect at once.
    """

    def __init__(self, world: WorldMap, settings: PredictorSettings | None = None) -> None:
        self._world = world
        self._settings = settings if settings is not None else PredictorSettings()
        self._clients: dict[str, _Client] = {}
        self._preparing: set[str] = set()
        self._counters = _Counters()
        self._now = -math.inf

    @property
    def world(self) -> WorldMap:
        """The world map it reads."""
        return self._world

    @property
    def settings(self) -> PredictorSettings:
        """Its settings."""
        return self._settings

    def __len__(self) -> int:
        return len(self._clients)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._clients

    # --------------------------------------------------------------------------------------------
    # Inputs
    # --------------------------------------------------------------------------------------------

    def observe(self, client_id: str, position: Vec3, velocity: Vec3 | None, t: float) -> list[Decision]:
        """Take one movement of ``client_id`` at time ``t``; return the decisions it calls for.

        ``t`` is on the caller's monotonic clock (the one `expire` is given). An observation whose
        ``t`` is not after the client's last one, or with a value that is not finite, is ignored
        (returns ``[]``).
        """
        if not (math.isfinite(t) and position.is_finite() and (velocity is None or velocity.is_finite())):
            self._counters.ignored += 1
            return []
        client = self._clients.get(client_id)
        if client is None:
            client = self._clients[client_id] = _Client()
        elif client.motion is not None and t <= client.motion.t:
            self._counters.ignored += 1
            return []
        self._counters.observations += 1
        self._now = max(self._now, t)
        decisions: list[Decision] = []
        self._expire_client(client_id, client, t, decisions)
        client.motion = motion = self._update(client.motion, position, velocity, t)
        if client.owner is not None:
            self._maybe_transfer(client_id, client, position, t, decisions)
            self._maybe_prepare(client_id, client, motion, t, decisions)
        return decisions

    def moved(self, client_id: str, backend: str) -> list[Decision]:
        """Tell the predictor that ``client_id`` is now served by ``backend``.

        Call it when the client is placed, after a transfer by any other trigger, and when one of the
        predictor's own transfers ended elsewhere than its target (rolled back, refused); confirming
        a `Transfer` that succeeded is harmless. An owner change cancels the client's preparations
        (``"owner_changed"``), and one the predictor did not expect starts a ``retry_delay`` hold.
        """
        client = self._clients.get(client_id)
        if client is None:
            client = self._clients[client_id] = _Client()
        asked, client.asked = client.asked, None
        if client.owner == backend:
            return []
        decisions: list[Decision] = []
        self._cancel_all(client_id, client, "owner_changed", decisions)
        if client.owner is not None:
            client.hold_until = self._now + self._settings.retry_delay
        if asked is not None and asked.target != backend:
            client.entry = asked  # the transfer failed: the same crossing goes on
        client.owner = backend
        return decisions

    def forget(self, client_id: str) -> list[Decision]:
        """Stop tracking ``client_id`` (it left); return a `CancelPrepare` per live preparation."""
        client = self._clients.pop(client_id, None)
        decisions: list[Decision] = []
        if client is not None:
            self._cancel_all(client_id, client, "forgotten", decisions)
        return decisions

    def expire(self, now: float) -> list[Decision]:
        """Expire the preparations of every client whose deadline is at or before ``now``.

        Observations expire their own client's preparations; call this every second or so for the
        clients that stopped moving or sending.
        """
        self._now = max(self._now, now)
        decisions: list[Decision] = []
        for client_id in sorted(self._preparing):
            self._expire_client(client_id, self._clients[client_id], now, decisions)
        return decisions

    # --------------------------------------------------------------------------------------------
    # Outputs
    # --------------------------------------------------------------------------------------------

    def statistics(self) -> PredictorStatistics:
        """A snapshot of the counters."""
        c = self._counters
        return PredictorStatistics(
            clients=len(self._clients),
            preparing=sum(len(self._clients[cid].preparations) for cid in self._preparing),
            observations=c.observations,
            ignored=c.ignored,
            preparations=c.preparations,
            preparations_used=c.preparations_used,
            preparations_expired=c.preparations_expired,
            preparations_cancelled=c.preparations_cancelled,
            crossings=c.crossings,
            prepared_crossings=c.prepared_crossings,
            unprepared_crossings=c.crossings - c.prepared_crossings,
            transfers=c.transfers,
        )

    def client(self, client_id: str) -> ClientSnapshot | None:
        """What is known about ``client_id``, or None if it is not tracked."""
        client = self._clients.get(client_id)
        if client is None:
            return None
        motion = client.motion
        return ClientSnapshot(
            client_id=client_id,
            owner=client.owner,
            time=None if motion is None else motion.t,
            position=None if motion is None else motion.position,
            velocity=None if motion is None else motion.velocity,
            acceleration=None if motion is None else motion.acceleration,
            predicted=None if motion is None else self._predict(motion),
            preparing=tuple(sorted(client.preparations)),
            crossings=client.crossings,
            prepared_crossings=client.prepared_crossings,
        )

    # --------------------------------------------------------------------------------------------
    # The rules
    # --------------------------------------------------------------------------------------------

    def _update(self, previous: _Motion | None, raw: Vec3, velocity: Vec3 | None, t: float) -> _Motion:
        """The motion after one observation (the smoothing of the module docstring)."""
        if previous is None:
            return _Motion(
                t=t,
                raw=raw,
                position=raw,
                velocity=Vec3.ZERO if velocity is None else velocity,
                acceleration=Vec3.ZERO,
                velocity_known=velocity is not None,
                acceleration_known=False,
                anchor_t=t,
                anchor=raw,
            )
        s = self._settings.smoothing
        position = raw + (previous.position - raw).scale(s)
        dt = t - previous.anchor_t
        if dt < self._settings.min_interval:
            return attrs.evolve(previous, t=t, raw=raw, position=position)
        measured = velocity if velocity is not None else (raw - previous.anchor).scale(1.0 / dt)
        smoothed = measured + (previous.velocity - measured).scale(s) if previous.velocity_known else measured
        acceleration, acceleration_known = Vec3.ZERO, False
        if self._settings.use_acceleration and previous.velocity_known:
            change = (smoothed - previous.velocity).scale(1.0 / dt)
            acceleration_known = True
            acceleration = (
                change + (previous.acceleration - change).scale(s) if previous.acceleration_known else change
            )
        return _Motion(
            t=t,
            raw=raw,
            position=position,
            velocity=smoothed,
            acceleration=acceleration,
            velocity_known=True,
            acceleration_known=acceleration_known,
            anchor_t=t,
            anchor=raw,
        )

    def _predict(self, motion: _Motion) -> Vec3:
        ahead = self._settings.lookahead
        predicted = motion.position + motion.velocity.scale(ahead)
        if self._settings.use_acceleration:
            predicted = predicted + motion.acceleration.scale(0.5 * ahead * ahead)
        return predicted

    def _maybe_transfer(
        self, client_id: str, client: _Client, position: Vec3, t: float, decisions: list[Decision]
    ) -> None:
        """Rule 2, and the bookkeeping of crossing episodes."""
        region = self._world.region_at(position)
        if region is None or region.owner == client.owner:
            client.entry = None
            return
        target = region.owner
        entry = client.entry
        if entry is None or entry.target != target:
            entry = client.entry = _Entry(target, prepared=target in client.preparations)
        if t < client.hold_until or region.box.signed_distance(position) <= self._settings.hysteresis:
            return
        prepared = client.preparations.pop(target, None) is not None
        if prepared:
            self._counters.preparations_used += 1
        decisions.append(Transfer(client_id, target, prepared=prepared))
        self._counters.transfers += 1
        if not entry.counted:
            entry.counted = True
            client.crossings += 1
            self._counters.crossings += 1
            if entry.prepared:
                client.prepared_crossings += 1
                self._counters.prepared_crossings += 1
        self._cancel_all(client_id, client, "owner_changed", decisions)
        client.owner = target
        client.asked = entry

    def _maybe_prepare(
        self, client_id: str, client: _Client, motion: _Motion, t: float, decisions: list[Decision]
    ) -> None:
        """Rule 3."""
        settings = self._settings
        predicted = self._predict(motion)
        wanted: set[str] = set()
        best: Box | None = None
        best_target = ""
        for region, depth in self._world.regions_near(predicted, settings.margin):  # deepest first
            if region.owner == client.owner:
                continue
            if depth >= 0.0 or depth > region.box.signed_distance(motion.position):
                wanted.add(region.owner)
                if best is None:
                    best, best_target = region.box, region.owner
        deadline = t + settings.prepare_ttl
        for target in wanted.intersection(client.preparations):
            client.preparations[target] = deadline
        if best is None or best_target in client.preparations:
            return
        client.preparations[best_target] = deadline
        self._preparing.add(client_id)
        self._counters.preparations += 1
        decisions.append(Prepare(client_id, best_target, eta_seconds=self._eta(best, motion)))

    def _eta(self, box: Box, motion: _Motion) -> float:
        """Seconds until the smoothed motion reaches ``box``, roughly (straight line, current speed)."""
        depth = box.signed_distance(motion.position)
        if depth >= 0.0:
            return 0.0
        hit = box.entry_time(motion.position, motion.velocity)
        if hit is not None:
            return hit
        speed = motion.velocity.length()
        return -depth / speed if speed > 0.0 else self._settings.lookahead

    def _expire_client(self, client_id: str, client: _Client, now: float, decisions: list[Decision]) -> None:
        """Rule 1."""
        for target, deadline in list(client.preparations.items()):
            if now >= deadline:
                del client.preparations[target]
                self._counters.preparations_expired += 1
                decisions.append(CancelPrepare(client_id, target, "expired"))
        if not client.preparations:
            self._preparing.discard(client_id)

    def _cancel_all(
        self, client_id: str, client: _Client, why: CancelReason, decisions: list[Decision]
    ) -> None:
        for target in sorted(client.preparations):
            self._counters.preparations_cancelled += 1
            decisions.append(CancelPrepare(client_id, target, why))
        client.preparations.clear()
        self._preparing.discard(client_id)
