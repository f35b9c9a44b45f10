"""Atlas's exception hierarchy.

Library exceptions (OSError, trio's BrokenResourceError, ...) and malformed HTTP are translated into these
at the I/O edge, so the rest of Atlas handles a small, named set of failures.
"""

from __future__ import annotations

__all__ = [
    "AtlasError",
    "BackendUnavailableError",
    "ConfigError",
    "HandshakeError",
    "StartupError",
]


class AtlasError(Exception):
    """Base class of every error Atlas raises on purpose."""


class ConfigError(AtlasError):
    """A configuration could not be loaded.

    ``errors`` holds one ``path: reason`` line per problem found (for example
    ``servers[2].url: not a ws:// or wss:// URL``); ``str()`` joins them with newlines.
    """

    def __init__(self, errors: list[str] | tuple[str, ...]) -> None:
        self.errors: tuple[str, ...] = tuple(errors)
        super().__init__("\n".join(self.errors))


class StartupError(AtlasError):
    """Atlas could not start (port in use, unresolvable address, ...); the message is one line."""


class HandshakeError(AtlasError):
    """A WebSocket opening handshake failed.

    ``status`` is the HTTP status Atlas answers the client with (400, 426, 502, 503, ...).
    """

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"{status}: {reason}")


class BackendUnavailableError(AtlasError):
    """No backend could take a client (all full, unhealthy, or failing)."""
