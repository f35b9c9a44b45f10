"""Admission checks at the handshake that need no backend: the Origin allow-list.

Pure functions over a request and sets built once from the configuration; the listener calls them only
when the matching setting is on, so a default configuration pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Iterable

from atlas.errors import HandshakeError
from atlas.proxy.handshake import UpgradeRequest

__all__ = ["check_origin", "origin_set"]


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
