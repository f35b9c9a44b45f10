"""Admission checks at the handshake that need no backend: the Origin allow-list, connections per IP.

Pure functions over a request and sets built once from the configuration; the listener calls them only
when the matching setting is on, so a default configuration pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from atlas.errors import HandshakeError
from atlas.proxy.handshake import UpgradeRequest

__all__ = ["IpLimiter", "check_origin", "origin_set"]


def origin_set(origins: Iterable[str]) -> frozenset[bytes] | None:
    """The allowed origins as compared at the handshake (lower-cased bytes); None for an empty list.

    An origin is ``scheme://host[:port]``, and scheme and host are case-insensitive: lower-casing the
    whole of it is the comparison RFC 6454 asks for (the port is digits).
    """
    allowed = frozenset(origin.lower().encode("ascii") for origin in origins)
    return allowed or None


def check_origin(request: UpgradeRequest, allowed: frozenset[bytes]) -> None:
    """Raise :class:`HandshakeError` 403 unless the request's ``Origin`` is one of ``allowed``.

    A request without ``Origin``, or with several, is refused too.
    """
    origin = request.header(b"origin")
    if origin is None:
        raise HandshakeError(403, "an Origin header is required")
    if origin.lower() not in allowed:
        raise HandshakeError(403, "origin not allowed")


@attrs.define(eq=False)
class IpLimiter:
    """Open connections per client address (``[proxy] max_connections_per_ip``).

    A connection is counted from its accept to its end, handshake included, whether or not it is let in:
    :meth:`acquire` when it is accepted, :meth:`release` exactly once when it ends (every path).
    """

    limit: int
    """Most connections one address may have open; its connection number ``limit + 1`` is refused."""
    _counts: dict[str, int] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")

    def acquire(self, ip: str) -> bool:
        """Count a new connection from ``ip``; whether it is within the limit (else: refuse it)."""
        count = self._counts.get(ip, 0) + 1
        self._counts[ip] = count
        return count <= self.limit

    def release(self, ip: str) -> None:
        """A connection from ``ip`` ended (it was acquired)."""
        count = self._counts[ip] - 1
        if count:
            self._counts[ip] = count
        else:
            del self._counts[ip]

    def count(self, ip: str) -> int:
        """Connections open from ``ip``."""
        return self._counts.get(ip, 0)

    def __len__(self) -> int:
        """Addresses with a connection open."""
        return len(self._counts)
