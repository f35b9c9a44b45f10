"""Backend health: active probes, passive outlier detection, and the routing state they decide.

Envoy-shaped. The sans-IO core (`HealthBook`, `BackendHealth`) holds three small state machines per
backend (probe health, ejection, the operator's drain) and the pool-wide ejection cap; the
`HealthMonitor` on ``runtime.health`` applies their changes to the pool's `Backend` records, logs
them and calls ``on_backend_down``; `serve_health_checks` runs the health nursery, one checker task
per backend. docs/operations.md ("Health checks") describes the behaviour for operators.
"""

from atlas.health._checker import serve_health_checks
from atlas.health._monitor import HealthMonitor, HealthStatistics
from atlas.health._probes import (
    HEALTH_CHECK_HEADER,
    ProbeReport,
    ProbeResult,
    probe_headers,
    probe_target,
    run_probe,
)
from atlas.health._state import (
    BackendHealth,
    Ejection,
    HealthBook,
    HealthChange,
    HealthEvent,
    HealthTransitionError,
    OperatorState,
    ProbeHealth,
    ejection_time,
)

__all__ = [
    "HEALTH_CHECK_HEADER",
    "BackendHealth",
    "Ejection",
    "HealthBook",
    "HealthChange",
    "HealthEvent",
    "HealthMonitor",
    "HealthStatistics",
    "HealthTransitionError",
    "OperatorState",
    "ProbeHealth",
    "ProbeReport",
    "ProbeResult",
    "ejection_time",
    "probe_headers",
    "probe_target",
    "run_probe",
    "serve_health_checks",
]
