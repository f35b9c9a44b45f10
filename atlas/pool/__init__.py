"""The backend pool: the registry of game servers, their connection counts, and the balancers.

Sans-IO: plain classes, no ``await``. The proxy asks `BackendPool.choose` for a backend, counts the
client with `BackendPool.acquire` before its next checkpoint, and calls `BackendPool.release` when
the client leaves.
"""

from atlas.pool._backend import Backend, BackendPool, BackendState, PoolStatistics
from atlas.pool._balancers import (
    BALANCER_NAMES,
    Balancer,
    LeastConnections,
    PowerOfTwo,
    Random,
    RoundRobin,
    WeightedRoundRobin,
    make_balancer,
)

__all__ = [
    "BALANCER_NAMES",
    "Backend",
    "BackendPool",
    "BackendState",
    "Balancer",
    "LeastConnections",
    "PoolStatistics",
    "PowerOfTwo",
    "Random",
    "RoundRobin",
    "WeightedRoundRobin",
    "make_balancer",
]
