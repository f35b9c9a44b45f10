"""JSON views of Atlas's state for the admin API: plain functions from records to dicts."""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

from atlas import __version__
from atlas.pool import Backend, BackendState

if TYPE_CHECKING:
    from atlas.control.lifecycle import TransferRecord
    from atlas.ops.horizon import RegisteredServer
    from atlas.proxy.session import ClientSession
    from atlas.runtime import Runtime

__all__ = ["client_view", "iso_utc", "server_view", "status_view", "transfer_view"]


def iso_utc(timestamp: float) -> str:
    """``time.time()`` as ISO 8601 in UTC with milliseconds: ``2026-01-31T12:00:00.123Z``."""
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def server_view(backend: Backend, record: RegisteredServer | None) -> dict[str, Any]:
    """One backend, with its Horizon registration when it has one."""
    view: dict[str, Any] = {
        "name": backend.name,
        "url": backend.url,
        "state": backend.state.value,
        "accepting": backend.accepting,
        "connections": backend.connections,
        "capacity": backend.capacity,
        "weight": backend.weight,
        "tags": list(backend.tags),
        "control_url": backend.control_url,
        "last_report": None,
        "registered": record is not None,
    }
    if record is not None:
        if record.last_heartbeat is not None:
            view["last_report"] = record.last_heartbeat.to_json()
        registration = record.registration
        view["registration"] = {
            "address": registration.address,
            "sent_address": registration.sent_address,
            "region_coord": registration.region_coord.to_json(),
            "center": registration.center.to_json(),
            "bounds": registration.bounds,
            "version": registration.version,
            "metadata": dict(registration.metadata),
            "registered_at": iso_utc(record.registered_at),
            "last_heartbeat_at": (
                iso_utc(record.last_heartbeat_at) if record.last_heartbeat_at is not None else None
            ),
            "leaving": record.leaving,
        }
    return view


def client_view(session: ClientSession) -> dict[str, Any]:
    """One live client session."""
    return {
        "id": session.client_id,
        "peer": session.peer,
        "player": session.player_id,
        "server": session.link.backend.name,
        "connected_at": iso_utc(session.connected_at),
        "messages_up": session.messages_up,
        "messages_down": session.messages_down,
        "bytes_up": session.bytes_up,
        "bytes_down": session.bytes_down,
    }


def status_view(runtime: Runtime, *, uptime: float, started_at: float) -> dict[str, Any]:
    """The process at a glance: version, uptime, clients, servers per state, traffic totals."""
    backends = list(runtime.pool)
    by_state = {state.value: 0 for state in BackendState}
    for backend in backends:
        by_state[backend.state.value] += 1
    pool = runtime.pool.statistics()
    clients = runtime.clients.statistics()
    traffic = runtime.clients.traffic_totals()
    return {
        "version": __version__,
        "started_at": iso_utc(started_at),
        "uptime": round(uptime, 3),
        "accepting": runtime.accepting,
        "clients": clients.active,
        "servers": {
            "total": pool.backends,
            "available": pool.available,
            "connections": pool.connections,
            "capacity": pool.capacity,
            **by_state,
        },
        "totals": {
            "accepted": clients.accepted_total,
            "refused": clients.refused_total,
            "messages_up": traffic.messages_up,
            "messages_down": traffic.messages_down,
            "bytes_up": traffic.bytes_up,
            "bytes_down": traffic.bytes_down,
        },
    }


def transfer_view(record: TransferRecord) -> dict[str, Any]:
    """One transfer under way."""
    return {
        "id": record.id,
        "client": record.client_id,
        "from": record.source,
        "to": record.target,
        "reason": record.reason.value,
        "phase": record.phase.value,
        "blind": record.blind,
        "elapsed_ms": round(record.duration * 1000, 3),
    }
