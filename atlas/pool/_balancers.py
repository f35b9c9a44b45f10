"""Load-balancing algorithms: pick one backend among the candidates that can take a client.

A balancer never sees a backend that cannot take a client: `BackendPool.choose` filters out the
full, unhealthy and excluded ones and passes the rest, non-empty and in the pool's order. So a
balancer only has to be fair among its candidates, and every pick costs O(n) at most (no sorting).
Balancers may keep state between picks (a cursor, smooth weights); they tolerate the candidate list
changing from one call to the next, as backends fill, recover, join and leave.

Loads are compared as ``connections / weight`` by cross-multiplication, exact on integers.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from atlas.pool._backend import Backend

__all__ = [
    "BALANCER_NAMES",
    "Balancer",
    "LeastConnections",
    "PowerOfTwo",
    "Random",
    "RoundRobin",
    "WeightedRoundRobin",
    "make_balancer",
]


class Balancer(Protocol):
    """A load-balancing algorithm."""

    def pick(self, candidates: Sequence[Backend]) -> Backend:
        """Return one of ``candidates``.

        ``candidates`` is non-empty, every one of them is available, and their order is stable
        from call to call (the pool's order) apart from backends appearing and disappearing.
        """
        ...


def _less_loaded(a: Backend, b: Backend) -> bool:
    """Whether ``a.connections / a.weight < b.connections / b.weight``, exactly."""
    return a.connections * b.weight < b.connections * a.weight


class LeastConnections:
    """The candidate with the fewest connections per unit of weight (the default).

    Ties are broken by rotating among the tied candidates, so that equal backends fill evenly even
    when picks are not followed by a connection (a failed connect) and several pickers share
    counts, instead of always piling onto the first.
    """

    __slots__ = ("_turn",)

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, candidates: Sequence[Backend]) -> Backend:
        """Return a least-loaded candidate; see `Balancer.pick`."""
        best = candidates[0]
        tied = [best]
        for backend in itertools.islice(candidates, 1, None):
            lhs = backend.connections * best.weight
            rhs = best.connections * backend.weight
            if lhs < rhs:
                best = backend
                tied = [backend]
            elif lhs == rhs:
                tied.append(backend)
        if len(tied) == 1:
            return best
        choice = tied[self._turn % len(tied)]
        self._turn += 1
        return choice


class RoundRobin:
    """Each candidate in turn, in the candidates' order, ignoring weights and loads.

    The cursor remembers the last pick by name and position. If the candidate list changed since
    (a backend filled up, recovered, joined or left), the next pick is the one after the last pick
    in the new list; if the last pick itself is gone, the backend that slid into its place.
    """

    __slots__ = ("_last_index", "_last_name")

    def __init__(self) -> None:
        self._last_name: str | None = None
        self._last_index = 0

    def pick(self, candidates: Sequence[Backend]) -> Backend:
        """Return the next candidate in turn; see `Balancer.pick`."""
        count = len(candidates)
        index = self._last_index
        if not (index < count and candidates[index].name == self._last_name):
            # The list changed (or this is the first pick): find where we were, if still there.
            for position, backend in enumerate(candidates):
                if backend.name == self._last_name:
                    index = position
                    break
            else:
                # Gone: whatever now sits in its place is its successor.
                index -= 1
        index = (index + 1) % count
        choice = candidates[index]
        self._last_name = choice.name
        self._last_index = index
        return choice


class Random:
    """A uniformly random candidate, ignoring weights and loads.

    Pass a seeded ``rng`` for reproducible picks (tests, simulations).
    """

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def pick(self, candidates: Sequence[Backend]) -> Backend:
        """Return a random candidate; see `Balancer.pick`."""
        return self._rng.choice(candidates)


class WeightedRoundRobin:
    """nginx's smooth weighted round robin.

    Each pick adds every candidate's weight to its current weight, picks the highest current
    weight (the first one on ties) and subtracts the total weight from it. Over ``sum(weights)``
    picks from a fresh start each backend is picked exactly ``weight`` times, and the picks are
    spread out: weights 5, 1, 1 give ``a a b a c a a``, not ``a a a a a b c``.

    The state is keyed by backend name and holds only the current candidates: a backend that is
    not a candidate (removed, full, unhealthy, excluded) is forgotten and starts afresh, at zero,
    when it comes back.
    """

    __slots__ = ("_current",)

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def pick(self, candidates: Sequence[Backend]) -> Backend:
        """Return the next candidate by smooth weighted round robin; see `Balancer.pick`."""
        previous = self._current
        current: dict[str, int] = {}
        total = 0
        best = candidates[0]
        best_weight = 0
        for backend in candidates:
            weight = previous.get(backend.name, 0) + backend.weight
            current[backend.name] = weight
            total += backend.weight
            if backend is best or weight > best_weight:
                best = backend
                best_weight = weight
        current[best.name] = best_weight - total
        self._current = current
        return best


class PowerOfTwo:
    """The power of two random choices.

    Draws two distinct candidates at random and picks the one with fewer connections per unit of
    weight (the first drawn on a tie). Nearly as even as least connections, and it does not herd
    every picker onto the same backend when counts are stale or shared between nodes.
    """

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def pick(self, candidates: Sequence[Backend]) -> Backend:
        """Return the less loaded of two random candidates; see `Balancer.pick`."""
        count = len(candidates)
        if count == 1:
            return candidates[0]
        first = self._rng.randrange(count)
        second = self._rng.randrange(count - 1)
        if second >= first:
            second += 1
        a, b = candidates[first], candidates[second]
        return b if _less_loaded(b, a) else a


_FACTORIES: Final[dict[str, Callable[[random.Random | None], Balancer]]] = {
    "least_connections": lambda _rng: LeastConnections(),
    "round_robin": lambda _rng: RoundRobin(),
    "random": Random,
    "weighted_round_robin": lambda _rng: WeightedRoundRobin(),
    "power_of_two": PowerOfTwo,
}

#: The algorithm names `make_balancer` accepts, default first.
BALANCER_NAMES: Final[tuple[str, ...]] = tuple(_FACTORIES)


def make_balancer(algorithm: str, *, rng: random.Random | None = None) -> Balancer:
    """A fresh balancer for an algorithm name from the configuration.

    ``rng`` seeds the random algorithms (``random``, ``power_of_two``); the others ignore it.

    Raises:
        ValueError: ``algorithm`` is not one of `BALANCER_NAMES`.
    """
    try:
        factory = _FACTORIES[algorithm]
    except KeyError:
        expected = ", ".join(BALANCER_NAMES)
        raise ValueError(f"unknown balancing algorithm {algorithm!r}; expected one of {expected}") from None
    return factory(rng)
