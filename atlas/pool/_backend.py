"""Backend records and the pool that owns them.

A `Backend` is the live, mutable record of one game server: where it is, how many clients it may
take, and how many it has. The `BackendPool` is the registry of those records and the one place
connection counts change, so that capacity is enforced in a single spot: the proxy calls
`BackendPool.choose` and then `BackendPool.acquire` with no ``await`` in between (so no other task
can take the last slot in the meantime), and `BackendPool.release` when the client leaves.

Nothing here does I/O. Health checkers, the admin API and registration change a backend's `state`
and the pool's membership; a `Balancer` (see ``_balancers.py``) only ever sees the backends that can
take a client right now.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Container, Iterable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import attrs

from atlas.errors import BackendUnavailableError

if TYPE_CHECKING:
    from atlas.pool._balancers import Balancer

__all__ = ["Backend", "BackendPool", "BackendState", "PoolStatistics"]

_DEFAULT_PORTS = {"ws": 80, "wss": 443}
# RFC 3986 reg-name without percent-encoding and sub-delims: what a DNS name or IPv4 address can be.
_REG_NAME = re.compile(r"[A-Za-z0-9._~-]+")


class BackendState(enum.Enum):
    """Whether a backend may take new clients.

    Only `HEALTHY` backends are offered new clients. The others keep the clients they have until
    someone (failover, a drain, the admin) moves them.
    """

    #: Passing its health checks; takes new clients up to its capacity.
    HEALTHY = "healthy"
    #: Failing its active health checks.
    UNHEALTHY = "unhealthy"
    #: Ejected by passive outlier detection, for a back-off period.
    EJECTED = "ejected"
    #: Being emptied on purpose (maintenance): keeps its clients, takes no new ones.
    DRAINING = "draining"


def _to_tags(tags: Iterable[str]) -> tuple[str, ...]:
    # A bare string is an iterable of one-letter tags: almost certainly a mistake.
    if isinstance(tags, str):
        raise TypeError(f"tags must be an iterable of strings, not the string {tags!r}")
    return tuple(tags)


def _check_path(_instance: Any, _attribute: Any, value: str) -> None:
    if not value.startswith("/"):
        raise ValueError(f"path must start with '/': {value!r}")


@attrs.define(eq=False)
class Backend:
    """One game server: the live record the pool owns.

    Build it with `from_url`. Records compare by identity: two records with the same fields are
    still two backends as far as the pool is concerned.

    ``host`` is bare (``::1``, not ``[::1]``); ``path`` is the request target to use on the backend
    (path and query, ``/`` when the URL has none). ``connections`` is the number of live clients
    routed here; change it only through `BackendPool.acquire` and `BackendPool.release`.
    """

    name: str = attrs.field(validator=attrs.validators.min_len(1))
    url: str
    host: str = attrs.field(validator=attrs.validators.min_len(1))
    port: int = attrs.field(validator=[attrs.validators.ge(1), attrs.validators.le(65535)])
    path: str = attrs.field(validator=_check_path)
    secure: bool
    capacity: int = attrs.field(validator=attrs.validators.ge(1))
    weight: int = attrs.field(validator=attrs.validators.ge(1))
    tags: tuple[str, ...] = attrs.field(default=(), converter=_to_tags)
    state: BackendState = attrs.field(
        default=BackendState.HEALTHY, validator=attrs.validators.instance_of(BackendState)
    )
    connections: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    control_url: str = ""
    """The server's control endpoint (``ws://``/``wss://``); empty for a plain server."""
    accepting: bool = True
    """The server's own word, from its control channel's ``load`` reports: False while it takes no new
    players. Back to True when the channel drops (a plain server cannot say)."""

    @classmethod
    def from_url(
        cls,
        name: str,
        url: str,
        *,
        capacity: int = 1000,
        weight: int = 1,
        tags: Iterable[str] = (),
        control_url: str = "",
    ) -> Backend:
        """Build a healthy, empty backend from a ``ws://`` or ``wss://`` URL.

        The port defaults to 80 for ``ws`` and 443 for ``wss``. The host may be a DNS name, an IPv4
        address or a bracketed IPv6 address. The URL must be ASCII without whitespace, and may not
        carry user information or a fragment (RFC 6455 section 3 forbids fragments).

        Raises:
            ValueError: the URL is not a usable WebSocket URL, or ``name``, ``capacity`` or
                ``weight`` is invalid (capacity and weight must be at least 1).
        """
        if not url.isascii() or any(ch <= " " or ch == "\x7f" for ch in url):
            raise ValueError(f"{url!r}: must be ASCII without whitespace or control characters")
        if "#" in url:
            raise ValueError(f"{url!r}: a WebSocket URL cannot have a fragment")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"{url!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(f"{url!r}: not a ws:// or wss:// URL")
        if "@" in parts.netloc:
            raise ValueError(f"{url!r}: a WebSocket URL cannot carry user information")
        host = parts.hostname
        if not host:
            raise ValueError(f"{url!r}: missing host")
        if parts.netloc.startswith("["):
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{url!r}: bad IPv6 address {host!r}") from None
        elif not _REG_NAME.fullmatch(host):
            raise ValueError(f"{url!r}: bad host {host!r}")
        if port is None:
            port = _DEFAULT_PORTS[scheme]
        elif port == 0:
            raise ValueError(f"{url!r}: port 0 is not a port one can connect to")
        target = parts.path or "/"
        if parts.query:
            target = f"{target}?{parts.query}"
        return cls(
            name=name,
            url=url,
            host=host,
            port=port,
            path=target,
            secure=scheme == "wss",
            capacity=capacity,
            weight=weight,
            tags=tags,
            control_url=control_url,
        )

    @property
    def available(self) -> bool:
        """Whether the backend can take one more client: `HEALTHY`, accepting and below capacity."""
        return self.state is BackendState.HEALTHY and self.accepting and self.connections < self.capacity

    @property
    def load(self) -> float:
        """Share of the capacity in use: ``connections / capacity`` (above 1 if capacity shrank)."""
        return self.connections / self.capacity


@attrs.frozen
class PoolStatistics:
    """A snapshot of a `BackendPool` (see `BackendPool.statistics`)."""

    #: Backends in the pool, whatever their state.
    backends: int
    #: Backends that can take a client now (see `Backend.available`).
    available: int
    #: Live client connections over all backends.
    connections: int
    #: Total capacity over all backends, whatever their state.
    capacity: int


class BackendPool:
    """The registry of backends, and the one place that counts their connections.

    Backends are kept in the order they were added; balancers see candidates in that order.
    ``balancer`` is a public attribute so a configuration reload can swap the algorithm.
    """

    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer
        self._backends: dict[str, Backend] = {}

    def add(self, backend: Backend) -> None:
        """Add a backend.

        Raises:
            ValueError: a backend with the same name is already in the pool.
        """
        if backend.name in self._backends:
            raise ValueError(f"backend {backend.name!r} is already in the pool")
        self._backends[backend.name] = backend

    def remove(self, name: str) -> Backend:
        """Remove the backend called ``name`` and return its record.

        The record keeps its connection count; `release` still works on it as its clients leave.

        Raises:
            KeyError: no backend has that name.
        """
        try:
            return self._backends.pop(name)
        except KeyError:
            raise KeyError(f"no backend named {name!r}") from None

    def get(self, name: str) -> Backend | None:
        """The backend called ``name``, or None."""
        return self._backends.get(name)

    def __iter__(self) -> Iterator[Backend]:
        """Iterate over a snapshot of the backends, in the order they were added."""
        return iter(tuple(self._backends.values()))

    def __len__(self) -> int:
        return len(self._backends)

    def __contains__(self, name: object) -> bool:
        """Whether a backend with this name is in the pool."""
        return name in self._backends

    def choose(self, *, exclude: Container[str] = ()) -> Backend | None:
        """The balancer's pick among the available backends whose names are not in ``exclude``.

        Returns None when no backend can take a client (all full, not healthy or excluded): the
        caller refuses the client (HTTP 503) rather than waiting. ``exclude`` lets a caller retry
        after a connect failure without getting the same backend again. Choosing does not count
        a connection: call `acquire` on the result before the next checkpoint.
        """
        candidates = [b for b in self._backends.values() if b.available and b.name not in exclude]
        if not candidates:
            return None
        return self.balancer.pick(candidates)

    def acquire(self, backend: Backend) -> None:
        """Count one more client on ``backend``.

        Raises:
            KeyError: ``backend`` is not this pool's record (it was removed or never added).
            BackendUnavailableError: ``backend`` is at capacity. This cannot happen right after
                `choose` returned it, with no checkpoint in between.
        """
        if self._backends.get(backend.name) is not backend:
            raise KeyError(f"backend {backend.name!r} is not in this pool")
        if backend.connections >= backend.capacity:
            raise BackendUnavailableError(
                f"backend {backend.name!r} is full ({backend.connections}/{backend.capacity} connections)"
            )
        backend.connections += 1

    def release(self, backend: Backend) -> None:
        """Count one client less on ``backend`` (never below zero).

        Works on records that were removed from the pool since, so a leaving client need not care.
        """
        if backend.connections > 0:
            backend.connections -= 1

    def statistics(self) -> PoolStatistics:
        """A snapshot of the pool's size, availability and load."""
        backends = self._backends.values()
        return PoolStatistics(
            backends=len(backends),
            available=sum(1 for b in backends if b.available),
            connections=sum(b.connections for b in backends),
            capacity=sum(b.capacity for b in backends),
        )
