"""The supervisor: one root nursery per process that owns every long-lived part of Atlas.

The tree (docs/architecture.md draws it)::

    root nursery (serve_atlas)
     ├─ listener nursery (serve_proxy): accept loops, one task per client session, idle sweeper
     ├─ health nursery (serve_health_checks): one checker per backend
     ├─ cross-server relay (serve_relay): relayed messages and object handoffs; one writer per channel it
     │   sends on, one task per object handoff
     ├─ control channels (serve_control_channels): one task per backend with a control endpoint
     ├─ transfer coordinator (TransferCoordinator.serve): one task per transfer, each in its own scope
     ├─ skim dispatcher (Dispatcher.serve): one task per analyzer, fed by the relay's tap
     ├─ region service (RegionService.serve): movement -> predictor -> prepare / transfer
     ├─ drains (serve_drains): one mover per draining backend, moving its clients away at a bounded rate
     ├─ rebalancer (serve_rebalancer): rounds of load-balancing transfers, when [transfer] rebalance is on
     └─ ops server (serve_ops): admin API, /metrics, Horizon registration (hypercorn on trio)
 Shutdown is a drain followed by one cancellation of the root scope:
the ``shutdown`` event makes the listener stop accepting and close its clients with 1001 within
``drain_timeout``; when it returns, the root scope is cancelled and everything else stops with it.
"""

from __future__ import annotations

import gc
import logging
import signal
from collections.abc import AsyncIterator

import attrs
import trio

from atlas.config import Config
from atlas.control.channel import ControlChannels, serve_control_channels
from atlas.control.coordinator import TransferCoordinator
from atlas.control.drain import serve_drains
from atlas.control.rebalancer import serve_rebalancer
from atlas.control.regions import RegionService
from atlas.control.relay import serve_relay
from atlas.errors import ConfigError, StartupError
from atlas.health import serve_health_checks
from atlas.ops.server import OpsListening, serve_ops
from atlas.pool import Backend
from atlas.proxy.listener import ProxyListening, fail_over_backend, serve_proxy
from atlas.runtime import Runtime
from atlas.skim import Analyzer, MovementAnalyzer, load_analyzers
from atlas.world import Predictor, PredictorSettings

__all__ = ["AtlasStarted", "run_until_signalled", "serve_atlas"]

log = logging.getLogger("atlas")


@attrs.frozen
class AtlasStarted:
    """What :func:`serve_atlas` reports once Atlas accepts clients."""

    proxy: ProxyListening
    runtime: Runtime
    transfers: TransferCoordinator
    ops: OpsListening | None
    """The ops server's address, or None when ``[admin] enabled = false``."""


async def serve_atlas(
    config: Config,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[AtlasStarted] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run Atlas on ``config`` until ``shutdown`` is set (then drain) or the caller cancels.

    Reports :class:`AtlasStarted` once clients are accepted. Raises :class:`StartupError` when a part
    cannot start (the listen address is in use, ...).
    """
    shutdown = shutdown if shutdown is not None else trio.Event()
    runtime = Runtime.from_config(config)
    channels = ControlChannels()
    transfers = TransferCoordinator(runtime, channels)
    runtime.transfers = transfers
    runtime.health.on_backend_down = lambda backend: _fail_over(runtime, backend)
    try:
        async with trio.open_nursery() as root:
            ops: OpsListening | None = None
            if config.admin.enabled:
                ops = await root.start(serve_ops, runtime)
            await root.start(serve_health_checks, runtime)
            # Before the channels: each channel hands its relay traffic to the hook the relay sets.
            runtime.relay = await root.start(
                lambda task_status: serve_relay(runtime, channels, task_status=task_status)
            )
            await root.start(
                lambda task_status: serve_control_channels(runtime, channels, task_status=task_status)
            )
            await root.start(transfers.serve)
            await _start_analysis(root, runtime, transfers)
            await root.start(serve_drains, runtime)
            await root.start(serve_rebalancer, runtime)
            proxy_done = trio.Event()

            async def proxy(task_status: trio.TaskStatus[ProxyListening]) -> None:
                try:
                    await serve_proxy(runtime, shutdown=shutdown, task_status=task_status)
                finally:
                    proxy_done.set()

            listening: ProxyListening = await root.start(proxy)
            task_status.started(AtlasStarted(proxy=listening, runtime=runtime, transfers=transfers, ops=ops))
            # serve_proxy drains and returns once shutdown is set; then everything else stops.
            await proxy_done.wait()
            root.cancel_scope.cancel()
    except* StartupError as group:
        raise group.exceptions[0] from None


async def _start_analysis(root: trio.Nursery, runtime: Runtime, transfers: TransferCoordinator) -> None:
    """Start the skim dispatcher with its analyzers and, with a predictor, the region service."""
    dispatcher = runtime.skim
    if dispatcher is None:
        return
    config = runtime.config
    analyzers = analyzers_for(runtime)
    if config.predictor.enabled:
        p = config.predictor
        settings = PredictorSettings(
            lookahead=p.lookahead,
            margin=p.margin,
            hysteresis=p.hysteresis,
            prepare_ttl=p.prepare_ttl,
            smoothing=p.smoothing,
            use_acceleration=p.use_acceleration,
            retry_delay=p.retry_delay,
            min_interval=p.min_interval,
        )
        regions = RegionService(runtime, Predictor(runtime.world, settings), transfers)
        runtime.regions = regions
        dispatcher.on_event = regions.offer
        await root.start(regions.serve)
    await root.start(dispatcher.serve, analyzers)


def analyzers_for(runtime: Runtime) -> list[Analyzer]:
    """The ``[[analyzers]]`` of the config, loaded and wired to what consumes their events.

    Movements feed the predictor only: without it, or while the map has no region, a movement analyzer
    counts frames but parses none (parsing is a few percent of the relay's CPU at game-tick rates).

    Raises:
        StartupError: an analyzer cannot be loaded (every problem, one per ``; ``).
    """
    try:
        analyzers = load_analyzers([(a.path, a.options) for a in runtime.config.analyzers])
    except ConfigError as exc:
        raise StartupError("; ".join(exc.errors)) from None
    world = runtime.world
    predicting = runtime.config.predictor.enabled
    for analyzer in analyzers:
        if isinstance(analyzer, MovementAnalyzer):
            analyzer.wanted = (lambda: len(world) > 0) if predicting else (lambda: False)
    return analyzers


def _fail_over(runtime: Runtime, backend: Backend) -> None:
    """The health monitor gave up on ``backend``: move its live clients (when failover is on)."""
    moved = fail_over_backend(runtime, backend)
    if moved:
        log.warning("backend %s is down: failing over %d client(s)", backend.name, moved)


async def run_until_signalled(config: Config) -> None:
    """Run Atlas until SIGINT or SIGTERM; the first signal drains, a second one stops at once."""
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            nursery.start_soon(_watch_signals, signals, shutdown, nursery.cancel_scope)
            await nursery.start(_serve_then_stop, config, shutdown, nursery.cancel_scope)
            # Everything loaded at start-up lives as long as the process: keep it out of the garbage
            # collector's full passes, which otherwise walk it again and again under load.
            gc.freeze()
            await trio.sleep_forever()


async def _serve_then_stop(
    config: Config,
    shutdown: trio.Event,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[AtlasStarted] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve Atlas; once it has drained and returned, cancel ``scope`` (the signal watcher's)."""
    await serve_atlas(config, shutdown=shutdown, task_status=task_status)
    scope.cancel()


async def _watch_signals(signals: AsyncIterator[int], shutdown: trio.Event, scope: trio.CancelScope) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if not shutdown.is_set():
            log.info("%s received: draining (send it again to stop at once)", name)
            shutdown.set()
        else:
            log.warning("%s received again: stopping now", name)
            scope.cancel()
            return
