"""The rebalancer: moves clients from overloaded backends to underloaded ones (off by default).

Theory of operation
-------------------
Balancers place *new* clients; players stay where they landed, so a backend that was popular an hour
ago may be full while one that joined since is empty. With ``[transfer] rebalance = true``,
:func:`serve_rebalancer` runs a *round* every ``rebalance_interval`` seconds: it takes a snapshot of
the backends and their movable clients, asks the pure policy :func:`plan_moves` which clients to move
where, starts those transfers (reason ``load_balancing``) and waits for all of them to end before the
next round, so that a round always sees the counts its predecessor left.

The policy (:func:`plan_moves`), exactly. With ``load = connections / capacity``:

* only **healthy** backends take part (draining ones are emptied by the drain, unhealthy and ejected
  ones fail over);
* a **source** is a backend whose load is *strictly above* ``high_watermark``; a **target** is one
  that can take one more client and stay *at or below* ``low_watermark`` (``(connections + 1) /
  capacity <= low_watermark``, and ``connections + 1 <= capacity``);
* moves are planned one at a time, each re-evaluated on the counts as the planned moves leave them:
  one client from the most loaded source to the least loaded target (ties: the first in the pool's
  order); a backend that received a client in this round gives none, and one that gave receives none;
* a client moved (or tried) less than ``cooldown`` seconds ago is not moved; clients are taken in
  the order given (the registry's order: the longest connected first);
* at most ``rebalance_batch`` moves per round; planning stops earlier when no source has a client to
  give or no target has room.

So a source is relieved down to the high watermark (not below it), a target is filled up to the low
watermark (never above it), and since ``low_watermark <= high_watermark`` a backend filled by the
rebalancer is never a source of the rebalancer. (The configuration refuses ``low_watermark >
high_watermark``, which would let clients ping-pong between backends both "too full" and "too
empty"; the policy still plans nothing for such settings, should a caller build them by hand.)
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Final

import attrs
import trio

from atlas.control.coordinator import TransferRefused
from atlas.control.lifecycle import TransferReason
from atlas.pool import BackendState

if TYPE_CHECKING:
    from atlas.config import TransferConfig
    from atlas.control.coordinator import TransferCoordinator
    from atlas.runtime import Runtime

__all__ = ["BackendLoad", "Move", "RoundResult", "plan_moves", "rebalance_once", "serve_rebalancer"]

log = logging.getLogger("atlas.rebalancer")

Move = tuple[str, str]
"""A planned move: ``(client id, target backend name)``."""

_ROUND_GRACE: Final = 5.0
"""Seconds a round waits for its transfers beyond ``[transfer] timeout`` (rollbacks are bounded too)."""


@attrs.frozen
class BackendLoad:
    """What the policy needs to know of one backend."""

    name: str
    connections: int = attrs.field(validator=attrs.validators.ge(0))
    capacity: int = attrs.field(validator=attrs.validators.ge(1))
    healthy: bool = True
    """Taking new clients (not draining, unhealthy or ejected)."""

    @property
    def load(self) -> float:
        """``connections / capacity``."""
        return self.connections / self.capacity


def plan_moves(
    backends: Sequence[BackendLoad],
    clients: Mapping[str, str],
    now: float,
    last_moved: Mapping[str, float],
    config: TransferConfig,
) -> list[Move]:
    """The moves of one rebalancing round (pure; the module docstring states the rule).

    ``clients`` maps each *movable* client id to the name of its backend, in the order clients
    should be considered; ``last_moved`` maps client ids to when the rebalancer last moved (or tried
    to move) them, on the same clock as ``now``. Returns ``(client, target)`` pairs in the order to
    start them.
    """
    high, low = config.high_watermark, config.low_watermark
    if low > high:
        return []
    counts = {b.name: b.connections for b in backends if b.healthy}
    capacity = {b.name: b.capacity for b in backends if b.healthy}
    order = {name: i for i, name in enumerate(counts)}
    movable: dict[str, deque[str]] = {name: deque() for name in counts}
    for client_id, server in clients.items():
        moved_at = last_moved.get(client_id)
        if server in movable and (moved_at is None or now - moved_at >= config.cooldown):
            movable[server].append(client_id)
    gave: set[str] = set()
    took: set[str] = set()
    moves: list[Move] = []
    while len(moves) < config.rebalance_batch:
        sources = [
            name
            for name in counts
            if name not in took and movable[name] and counts[name] / capacity[name] > high
        ]
        targets = [
            name
            for name in counts
            if name not in gave
            and counts[name] + 1 <= capacity[name]
            and (counts[name] + 1) / capacity[name] <= low
        ]
        if not sources or not targets:
            break
        source = max(sources, key=lambda n: (counts[n] / capacity[n], -order[n]))
        target = min(targets, key=lambda n: (counts[n] / capacity[n], order[n]))
        client_id = movable[source].popleft()
        moves.append((client_id, target))
        counts[source] -= 1
        counts[target] += 1
        gave.add(source)
        took.add(target)
    return moves


@attrs.frozen
class RoundResult:
    """What one round did."""

    planned: int
    committed: int


async def serve_rebalancer(
    runtime: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a rebalancing round every ``rebalance_interval`` seconds until cancelled.

    With ``[transfer] rebalance = false`` (the default) it reports started and returns at once.
    Needs ``runtime.transfers`` (the supervisor starts the coordinator first).
    """
    config = runtime.config.transfer
    if not config.rebalance:
        task_status.started()
        return
    transfers = runtime.transfers
    if transfers is None:
        raise RuntimeError("serve_rebalancer needs the transfer coordinator (runtime.transfers)")
    log.info(
        "rebalancer on: every %g s, up to %d client(s) from backends above %g%% load to backends up to %g%%",
        config.rebalance_interval,
        config.rebalance_batch,
        config.high_watermark * 100,
        config.low_watermark * 100,
        extra={"event": "rebalance"},
    )
    last_moved: dict[str, float] = {}
    task_status.started()
    while True:
        await trio.sleep(config.rebalance_interval)
        await rebalance_once(runtime, transfers, last_moved)


async def rebalance_once(
    runtime: Runtime, transfers: TransferCoordinator, last_moved: dict[str, float]
) -> RoundResult:
    """One round: snapshot, plan, transfer, wait for the outcomes (bounded).

    ``last_moved`` is the rebalancer's memory between rounds (client id to the time of its last
    move or attempt, on trio's clock); it is updated and pruned here.
    """
    config = runtime.config.transfer
    now = trio.current_time()
    for client_id in [c for c, t in last_moved.items() if now - t >= config.cooldown]:
        del last_moved[client_id]
    backends = [
        BackendLoad(b.name, b.connections, b.capacity, b.state is BackendState.HEALTHY) for b in runtime.pool
    ]
    clients = {
        s.client_id: s.link.backend.name
        for s in runtime.clients
        if s.movable
        and s.client_id not in transfers.active
        and runtime.pool.get(s.link.backend.name) is s.link.backend
    }
    moves = plan_moves(backends, clients, now, last_moved, config)
    if not moves:
        return RoundResult(0, 0)
    routes = Counter((clients[c], target) for c, target in moves)
    log.info(
        "rebalancing: moving %d client(s): %s",
        len(moves),
        ", ".join(f"{source} -> {target} x{n}" for (source, target), n in routes.items()),
        extra={"event": "rebalance"},
    )
    committed = 0

    async def move(client_id: str, target: str) -> None:
        nonlocal committed
        try:
            outcome = await transfers.transfer(client_id, target, TransferReason.LOAD_BALANCING)
        except TransferRefused as exc:
            log.debug("rebalancing: client %s not moved: %s", client_id, exc, extra={"client": client_id})
            return
        if outcome.committed:
            committed += 1

    with trio.move_on_after(config.timeout + runtime.proxy.close_timeout + _ROUND_GRACE):
        async with trio.open_nursery() as nursery:
            for client_id, target in moves:
                last_moved[client_id] = now
                nursery.start_soon(move, client_id, target)
    if committed < len(moves):
        log.info("rebalancing: moved %d of %d client(s)", committed, len(moves), extra={"event": "rebalance"})
    return RoundResult(len(moves), committed)
