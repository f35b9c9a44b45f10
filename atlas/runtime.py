"""The state every part of one Atlas process shares: configuration, backends, clients, metrics.

One :class:`Runtime` is built per process by the supervisor and handed to each long-lived part (the
listener, the health checker, the ops server). It holds no tasks and no nurseries: those belong to the
parts themselves.
"""

from __future__ import annotations

import ssl

import attrs

from atlas.config import Config, ProxyConfig
from atlas.errors import StartupError
from atlas.ops.metrics import AtlasMetrics
from atlas.pool import Backend, BackendPool, make_balancer
from atlas.proxy.clients import ClientRegistry

__all__ = ["Runtime"]


@attrs.define(eq=False)
class Runtime:
    """Shared state of one Atlas process (see the module docstring)."""

    config: Config
    pool: BackendPool
    clients: ClientRegistry = attrs.field(factory=ClientRegistry)
    metrics: AtlasMetrics = attrs.field(init=False)
    backend_ssl: ssl.SSLContext | None = None
    accepting: bool = True
    """False once the drain has begun: new upgrades are refused with 503."""
    handshaking: int = 0
    """Clients between accept and the end of their handshakes (they count toward the limit)."""

    def __attrs_post_init__(self) -> None:
        self.metrics = AtlasMetrics(self)

    @property
    def proxy(self) -> ProxyConfig:
        """The ``[proxy]`` settings."""
        return self.config.proxy

    @classmethod
    def from_config(cls, config: Config) -> Runtime:
        """A runtime whose pool holds the config's static servers."""
        pool = BackendPool(make_balancer(config.balancer.algorithm))
        for server in config.servers:
            try:
                backend = Backend.from_url(
                    server.name, server.url, capacity=server.capacity, weight=server.weight, tags=server.tags
                )
            except ValueError as exc:  # config validation makes this unreachable; keep the message
                raise StartupError(f"servers: {server.name}: {exc}") from None
            pool.add(backend)
        return cls(config=config, pool=pool)

    def backend_ssl_context(self) -> ssl.SSLContext:
        """The TLS context for ``wss://`` backends (the system's trust store), made once."""
        if self.backend_ssl is None:
            self.backend_ssl = ssl.create_default_context()
        return self.backend_ssl
