"""Prometheus metrics in Atlas's own registry.

Two kinds of numbers, kept apart on purpose:

* *events* (a connection accepted or refused, a handshake's latency, a health-check result, an ejection,
  a failover) are counted with prometheus-client's counters and histograms when they happen: at most a
  few per connection, never per message;
* *traffic* (messages and bytes relayed each way, live connections per backend, backend states) is not
  counted on the hot path at all: the relay keeps plain integers per session, and :class:`_LiveCollector`
  reads them, plus the totals of sessions that already ended, when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from atlas.pool import BackendState

if TYPE_CHECKING:
    from atlas.control.regions import RegionService
    from atlas.control.relay import RelayService
    from atlas.runtime import Runtime
    from atlas.skim import DispatcherStatistics

__all__ = ["AtlasMetrics"]

disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series


class AtlasMetrics:
    """Every metric Atlas exports, registered in one private :class:`CollectorRegistry`."""

    def __init__(self, runtime: Runtime) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.accepted = Counter(
            "atlas_connections_accepted_total",
            "Client connections that completed both handshakes.",
            registry=registry,
        )
        self.refused = Counter(
            "atlas_connections_refused_total",
            "Client connections refused during the handshake, by reason.",
            ["reason"],
            registry=registry,
        )
        self.handshake_seconds = Histogram(
            "atlas_handshake_seconds",
            "Time from accept to the client's 101, both handshakes included.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=registry,
        )
        self.health_checks = Counter(
            "atlas_health_checks_total",
            "Active health-check probes, by backend and result (success, failure, timeout).",
            ["server", "result"],
            registry=registry,
        )
        self.ejections = Counter(
            "atlas_ejections_total",
            "Backends ejected by passive outlier detection.",
            ["server"],
            registry=registry,
        )
        self.failovers = Counter(
            "atlas_failovers_total",
            "Clients moved off a failed backend, by outcome (moved, closed).",
            ["outcome"],
            registry=registry,
        )
        registry.register(_LiveCollector(runtime))


class _LiveCollector(Collector):
    """Reads the relay's plain counters and the pool's state at scrape time."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        runtime = self._runtime
        connections = GaugeMetricFamily(
            "atlas_client_connections", "Live client connections, by backend.", labels=["server"]
        )
        capacity = GaugeMetricFamily(
            "atlas_backend_capacity", "Configured capacity, by backend.", labels=["server"]
        )
        state = GaugeMetricFamily(
            "atlas_backend_state",
            "1 for the backend's current state, 0 otherwise.",
            labels=["server", "state"],
        )
        for backend in runtime.pool:
            connections.add_metric([backend.name], backend.connections)
            capacity.add_metric([backend.name], backend.capacity)
            for each in BackendState:
                state.add_metric([backend.name, each.value], 1.0 if backend.state is each else 0.0)
        yield connections
        yield capacity
        yield state
        totals = runtime.clients.traffic_totals()
        messages = CounterMetricFamily(
            "atlas_messages_relayed", "WebSocket messages relayed, by direction.", labels=["direction"]
        )
        messages.add_metric(["client_to_server"], totals.messages_up)
        messages.add_metric(["server_to_client"], totals.messages_down)
        yield messages
        data = CounterMetricFamily(
            "atlas_bytes_relayed",
            "Bytes relayed (frames, headers included), by direction.",
            labels=["direction"],
        )
        data.add_metric(["client_to_server"], totals.bytes_up)
        data.add_metric(["server_to_client"], totals.bytes_down)
        yield data
        active = GaugeMetricFamily("atlas_clients", "Live client sessions.")
        active.add_metric([], len(runtime.clients))
        yield active
        if runtime.skim is not None:
            yield from _skim_metrics(runtime.skim.statistics())
        if runtime.regions is not None:
            yield from _region_metrics(runtime.regions)
        if runtime.relay is not None:
            yield from _relay_metrics(runtime.relay)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation)
    family.add_metric([], value)
    return family


def _skim_metrics(stats: DispatcherStatistics) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    yield _counter("atlas_skim_offered", "Messages the relay offered to the skim tap.", stats.offered)
    yield _counter(
        "atlas_skim_dropped",
        "Messages the skim tap dropped because its channel was full.",
        stats.dropped_input,
    )
    delivered = CounterMetricFamily(
        "atlas_skim_analyzer_delivered", "Messages handed to each analyzer.", labels=["analyzer"]
    )
    dropped = CounterMetricFamily(
        "atlas_skim_analyzer_dropped",
        "Messages an analyzer missed: its channel was full.",
        labels=["analyzer"],
    )
    for analyzer in stats.analyzers:
        delivered.add_metric([analyzer.name], analyzer.delivered)
        dropped.add_metric([analyzer.name], analyzer.dropped)
    yield delivered
    yield dropped
    yield _counter("atlas_skim_events", "Events the analyzers emitted.", stats.events)
    yield _counter(
        "atlas_skim_events_dropped", "Analyzer events dropped (a full consumer).", stats.events_dropped
    )
    taps = GaugeMetricFamily("atlas_skim_tap_subscribers", "Live taps open (GET /api/v1/clients/{id}/tap).")
    taps.add_metric([], stats.subscribers)
    yield taps


def _region_metrics(regions: RegionService) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    stats = regions.predictor.statistics()
    crossings = CounterMetricFamily(
        "atlas_region_crossings",
        "Region boundary crossings that led to a transfer, by whether a preparation was ready before.",
        labels=["prepared"],
    )
    crossings.add_metric(["true"], stats.prepared_crossings)
    crossings.add_metric(["false"], stats.unprepared_crossings)
    yield crossings
    preparations = CounterMetricFamily(
        "atlas_region_preparations", "Predicted preparations, by fate.", labels=["fate"]
    )
    preparations.add_metric(["issued"], stats.preparations)
    preparations.add_metric(["used"], stats.preparations_used)
    preparations.add_metric(["expired"], stats.preparations_expired)
    preparations.add_metric(["cancelled"], stats.preparations_cancelled)
    yield preparations
    yield _counter(
        "atlas_region_decisions_dropped",
        "Predictor decisions dropped: too many were waiting for the coordinator (it asks again).",
        regions.decisions_dropped,
    )


def _relay_metrics(relay: RelayService) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    stats = relay.statistics()
    messages = CounterMetricFamily(
        "atlas_server_relay_messages",
        "Server-to-server relay traffic, by outcome (dropped: the relay's queue was full).",
        labels=["outcome"],
    )
    messages.add_metric(["relayed"], stats.relayed)
    messages.add_metric(["undeliverable"], stats.undeliverable)
    messages.add_metric(["dropped"], stats.dropped)
    yield messages
    handoffs = CounterMetricFamily(
        "atlas_object_handoffs", "Object handoffs between servers that ended, by outcome.", labels=["outcome"]
    )
    handoffs.add_metric(["acked"], stats.handoffs_acked)
    handoffs.add_metric(["rejected"], stats.handoffs_rejected)
    handoffs.add_metric(["withdrawn"], stats.handoffs_withdrawn)
    yield handoffs
    pending = GaugeMetricFamily("atlas_object_handoffs_in_progress", "Object handoffs under way.")
    pending.add_metric([], stats.handoffs_in_progress)
    yield pending
