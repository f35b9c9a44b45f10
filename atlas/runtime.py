"""The state every part of one Atlas process shares: configuration, backends, clients, metrics.

One :class:`Runtime` is built per process by the supervisor and handed to each long-lived part (the
listener, the health checker, the ops server). It holds no tasks and no nurseries: those belong to the
parts themselves.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

import attrs

from atlas.config import Config, ProxyConfig, WorldConfig
from atlas.errors import StartupError
from atlas.health import HealthMonitor
from atlas.ops.metrics import AtlasMetrics
from atlas.pool import Backend, BackendPool, BackendState, make_balancer
from atlas.proxy.admission import IpLimiter, origin_set
from atlas.proxy.auth import TokenVerifier
from atlas.proxy.clients import ClientRegistry
from atlas.proxy.tls import server_ssl_context
from atlas.skim import Dispatcher
from atlas.world import Box, Cell, Grid, RegionConflict, Vec3, WorldMap

if TYPE_CHECKING:
    from atlas.control.coordinator import TransferCoordinator
    from atlas.control.regions import RegionService
    from atlas.control.relay import RelayService

__all__ = ["Runtime", "world_from_config"]


def world_from_config(config: WorldConfig) -> WorldMap:
    """The world map the ``[world]`` table describes; StartupError (one line) when it is inconsistent."""
    grid = None
    if all(size > 0 for size in config.cell_size):
        grid = Grid(Vec3(*config.cell_size), Vec3(*config.origin))
    world = WorldMap(grid)
    try:
        for region in config.regions:
            world.add(region.id, Box(Vec3(*region.min), Vec3(*region.max)), region.owner)
        for i, cell in enumerate(config.cells):
            if grid is None:
                raise StartupError(f"world.cells[{i}]: a cell needs world.cell_size (three numbers > 0)")
            world.assign(Cell(*cell.cell), cell.owner)
    except (RegionConflict, ValueError) as exc:
        raise StartupError(f"world: {exc}") from None
    return world


@attrs.define(eq=False)
class Runtime:
    """Shared state of one Atlas process (see the module docstring)."""

    config: Config
    pool: BackendPool
    clients: ClientRegistry = attrs.field(factory=ClientRegistry)
    metrics: AtlasMetrics = attrs.field(init=False)
    health: HealthMonitor = attrs.field(init=False)
    """Backend health: told of membership changes here, of passive signals by the data plane."""
    backend_ssl: ssl.SSLContext | None = None
    client_ssl: ssl.SSLContext | None = None
    """The server-side TLS context of ``[proxy] tls_cert``, built once; None: clients connect in plain."""
    accepting: bool = True
    """False once the drain has begun: new upgrades are refused with 503."""
    handshaking: int = 0
    """Clients between accept and the end of their handshakes (they count toward the limit)."""
    transfers: TransferCoordinator | None = None
    """The transfer coordinator, once the supervisor has started it."""
    world: WorldMap = attrs.field(factory=WorldMap)
    """Regions of the game world and their owners (from the config and Horizon registrations)."""
    skim: Dispatcher | None = None
    """The skim tap's dispatcher (None when ``[skim] enabled = false``)."""
    relay: RelayService | None = None
    """The cross-server relay, once the supervisor started it."""
    regions: RegionService | None = None
    """The predictive region service, once the supervisor started it (needs skimming and a predictor)."""
    origins: frozenset[bytes] | None = attrs.field(init=False)
    """``[proxy] allowed_origins`` as the handshake compares them; None when any origin is allowed."""
    ip_limiter: IpLimiter | None = attrs.field(init=False)
    """Connections per client address (``[proxy] max_connections_per_ip``); None without a limit."""
    verifier: TokenVerifier | None = None
    """The handshake's token check (``[auth] enabled``), built once; None when token auth is off."""
    _remove_when_empty: set[str] = attrs.field(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
        self.origins = origin_set(self.config.proxy.allowed_origins)
        per_ip = self.config.proxy.max_connections_per_ip
        self.ip_limiter = IpLimiter(per_ip) if per_ip else None
        self.metrics = AtlasMetrics(self)
        self.health = HealthMonitor(
            self.config.health, self.config.outlier, metrics=self.metrics, backends=self.pool
        )

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
                    server.name,
                    server.url,
                    capacity=server.capacity,
                    weight=server.weight,
                    tags=server.tags,
                    control_url=server.control_url,
                )
            except ValueError as exc:  # config validation makes this unreachable; keep the message
                raise StartupError(f"servers: {server.name}: {exc}") from None
            pool.add(backend)
        skim = None
        if config.skim.enabled:
            skim = Dispatcher(
                config.skim.buffer,
                analyzer_buffer=config.skim.analyzer_buffer,
                tap_buffer=config.skim.tap_buffer,
                batch_interval=config.skim.batch_interval,
            )
        verifier = TokenVerifier.from_config(config.auth) if config.auth.enabled else None
        return cls(
            config=config,
            pool=pool,
            world=world_from_config(config.world),
            skim=skim,
            verifier=verifier,
            client_ssl=server_ssl_context(config.proxy),
        )

    def cancel_removal(self, name: str) -> None:
        """Forget a pending "remove once empty" of ``name`` (a new backend took the name)."""
        self._remove_when_empty.discard(name)

    # -- backend membership (the admin API and registrations change it at run time) ---------------

    def add_backend(self, backend: Backend) -> None:
        """Add a backend at run time; ValueError if the name is taken."""
        self.pool.add(backend)
        self.health.backend_added(backend)

    def drain_backend(self, name: str, *, remove: bool = False) -> Backend:
        """Stop sending new clients to ``name`` (KeyError if unknown); with ``remove``, drop it once empty."""
        backend = self.pool.get(name)
        if backend is None:
            raise KeyError(name)
        backend.state = BackendState.DRAINING
        self.health.backend_drained(backend)
        if remove:
            self._remove_when_empty.add(name)
            self._maybe_remove(backend)
        return backend

    def release(self, backend: Backend) -> None:
        """A client left ``backend``: count it, and drop a backend waiting to be removed once empty."""
        self.pool.release(backend)
        if self._remove_when_empty:
            self._maybe_remove(backend)

    def _maybe_remove(self, backend: Backend) -> None:
        if backend.connections == 0 and backend.name in self._remove_when_empty:
            self._remove_when_empty.discard(backend.name)
            if self.pool.get(backend.name) is backend:
                self.pool.remove(backend.name)
                self.health.backend_removed(backend.name)

    def backend_ssl_context(self) -> ssl.SSLContext:
        """The TLS context for ``wss://`` backends (the system's trust store), made once."""
        if self.backend_ssl is None:
            self.backend_ssl = ssl.create_default_context()
        return self.backend_ssl
