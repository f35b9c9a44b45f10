"""Horizon-compatible server registration: the wire records and the registry of registered servers.

Horizon game servers (Far-Beyond-Dev/Horizon) register with Atlas over plain HTTP and keep the
registration alive with heartbeats (``docs/admin-api.md`` and ``horizon-compat.md`` give the exact
JSON). This module is the sans-IO half of that: it turns decoded JSON into validated records
(`Registration`, `HeartbeatReport`), keeps what Atlas knows about each registered server in a
`HorizonRegistry`, and builds the JSON answers Horizon parses. It never touches the backend pool
or the network: the ops app (``atlas/ops/app.py``) applies the decisions to the `Runtime`.

A registered server is named by the ``name`` it sends; that name is also its ``server_id`` in every
later call and the name of its backend in the pool.
"""

from __future__ import annotations

import enum
import ipaddress
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

import attrs

from atlas.config import ListenAddress, ServerConfig

__all__ = [
    "HORIZON_TAG",
    "PREPARE_SHUTDOWN_DEADLINE",
    "HeartbeatReport",
    "HorizonRegistry",
    "RegionCoord",
    "RegisterOutcome",
    "RegisteredServer",
    "Registration",
    "RegistrationError",
    "WorldPoint",
    "heartbeat_answer",
    "registration_answer",
]

#: ``deadline_secs`` of the ``PrepareShutdown`` command sent to a draining server.
PREPARE_SHUTDOWN_DEADLINE: Final = 30

#: Tag given to the backend of every registered server.
HORIZON_TAG: Final = "horizon"


class RegistrationError(ValueError):
    """A registration or heartbeat body is malformed; the message names the field and the reason."""


# ------------------------------------------------------------------------------------------------
# JSON field readers: strict types (no bool for an int, no string for a number), one-line reasons.
# ------------------------------------------------------------------------------------------------


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def _object(value: object, field: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise RegistrationError(f"{field}: expected an object, got {_describe(value)}")
    return value


def _required(data: Mapping[str, Any], key: str, prefix: str = "") -> object:
    if key not in data:
        raise RegistrationError(f"{prefix}{key}: missing required field")
    return data[key]


def _string(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise RegistrationError(f"{field}: expected a string, got {_describe(value)}")
    return value


def _integer(value: object, field: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RegistrationError(f"{field}: expected an integer, got {_describe(value)}")
    if minimum is not None and value < minimum:
        raise RegistrationError(f"{field}: must be >= {minimum}, got {value}")
    return value


def _number(value: object, field: str, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RegistrationError(f"{field}: expected a number, got {_describe(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise RegistrationError(f"{field}: expected a finite number, got {_describe(value)}")
    if minimum is not None and number < minimum:
        raise RegistrationError(f"{field}: must be >= {minimum}, got {value}")
    return number


def _boolean(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise RegistrationError(f"{field}: expected true or false, got {_describe(value)}")
    return value


def _check_server_field(field: str, value: object) -> None:
    """Run `ServerConfig`'s validator of ``field``, so registered names obey the config's rules."""
    attribute = getattr(attrs.fields(ServerConfig), field)
    if attribute.validator is not None:
        try:
            attribute.validator(None, attribute, value)
        except ValueError as exc:
            raise RegistrationError(f"{field}: {exc}") from None


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------


@attrs.frozen
class RegionCoord:
    """A cell of Horizon's 3-D grid of regions."""

    x: int
    y: int
    z: int

    def is_adjacent(self, other: RegionCoord) -> bool:
        """Whether ``other`` is one of the 6 face neighbours of this cell (not itself, not a diagonal)."""
        return abs(self.x - other.x) + abs(self.y - other.y) + abs(self.z - other.z) == 1

    def to_json(self) -> dict[str, int]:
        """``{"x": .., "y": .., "z": ..}``."""
        return {"x": self.x, "y": self.y, "z": self.z}

    @classmethod
    def from_json(cls, value: object, field: str = "region_coord") -> RegionCoord:
        """Read ``{"x", "y", "z"}`` integers; raise `RegistrationError` otherwise."""
        data = _object(value, field)
        x, y, z = (_integer(_required(data, k, f"{field}."), f"{field}.{k}") for k in ("x", "y", "z"))
        return cls(x, y, z)


@attrs.frozen
class WorldPoint:
    """A point in world coordinates (the middle of a server's region)."""

    x: float
    y: float
    z: float

    def to_json(self) -> dict[str, float]:
        """``{"x": .., "y": .., "z": ..}``."""
        return {"x": self.x, "y": self.y, "z": self.z}

    @classmethod
    def from_json(cls, value: object, field: str = "center") -> WorldPoint:
        """Read ``{"x", "y", "z"}`` finite numbers; raise `RegistrationError` otherwise."""
        data = _object(value, field)
        x, y, z = (_number(_required(data, k, f"{field}."), f"{field}.{k}") for k in ("x", "y", "z"))
        return cls(x, y, z)


def _effective_address(address: str, peer_host: str | None) -> str:
    """Validate ``host:port``; an unspecified host (``0.0.0.0``, ``::``) becomes the peer's address.

    Horizon sends its *bind* address, which is often ``0.0.0.0:8080``: the address Atlas can reach
    it at is the one its registration came from.
    """
    try:
        parsed = ListenAddress.parse(address)
    except ValueError as exc:
        raise RegistrationError(f"address: {exc}") from None
    if parsed.port == 0:
        raise RegistrationError(f"address: port must be 1..65535, got 0 in {address!r}")
    host = parsed.host
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        unspecified = False
    if unspecified and peer_host:
        host = peer_host
    return str(ListenAddress(host, parsed.port))


@attrs.frozen
class Registration:
    """A validated ``POST /api/v1/servers/register`` body.

    ``address`` is where Atlas connects (``host:port``; see `from_json` for the unspecified-host
    rule); ``sent_address`` is the address as Horizon sent it.
    """

    name: str
    address: str
    region_coord: RegionCoord
    center: WorldPoint
    bounds: float
    capacity: int
    version: str = ""
    metadata: Mapping[str, Any] = attrs.field(factory=dict)
    sent_address: str = ""

    @property
    def url(self) -> str:
        """The backend URL: ``ws://<address>`` (clients keep the path they asked for)."""
        return f"ws://{self.address}"

    @classmethod
    def from_json(cls, data: object, *, peer_host: str | None = None) -> Registration:
        """Validate a decoded registration body.

        ``name`` follows the config's server-name rules and ``capacity`` must be at least 1;
        ``version`` and ``metadata`` may be missing (or null). Unknown fields are ignored, as
        Horizon's own parser does. An ``address`` whose host is unspecified (``0.0.0.0`` or ``::``)
        is given ``peer_host``, the address the registration came from.

        Raises:
            RegistrationError: a field is missing or wrong (the message names it).
        """
        body = _object(data, "body")
        name = _string(_required(body, "name"), "name")
        _check_server_field("name", name)
        sent_address = _string(_required(body, "address"), "address")
        address = _effective_address(sent_address, peer_host)
        region_coord = RegionCoord.from_json(_required(body, "region_coord"))
        center = WorldPoint.from_json(_required(body, "center"))
        bounds = _number(_required(body, "bounds"), "bounds", minimum=0.0)
        capacity = _integer(_required(body, "capacity"), "capacity")
        _check_server_field("capacity", capacity)
        version_value = body.get("version")
        version = "" if version_value is None else _string(version_value, "version")
        metadata_value = body.get("metadata")
        metadata = {} if metadata_value is None else dict(_object(metadata_value, "metadata"))
        registration = cls(
            name=name,
            address=address,
            region_coord=region_coord,
            center=center,
            bounds=bounds,
            capacity=capacity,
            version=version,
            metadata=metadata,
            sent_address=sent_address,
        )
        _check_server_field("url", registration.url)
        return registration


@attrs.frozen
class HeartbeatReport:
    """A validated ``PUT /api/v1/servers/{server_id}/heartbeat`` body.

    Horizon never counts its players (``current_connections`` is always 0, ``load`` 0.0,
    ``accepting_connections`` true): Atlas records the report but its own count of the clients it
    routed is the truth.
    """

    current_connections: int
    load: float
    accepting_connections: bool
    avg_tick_ms: float = 0.0
    memory_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        """The load fields, as received."""
        return {
            "current_connections": self.current_connections,
            "load": self.load,
            "accepting_connections": self.accepting_connections,
            "avg_tick_ms": self.avg_tick_ms,
            "memory_bytes": self.memory_bytes,
        }

    @classmethod
    def from_json(cls, data: object, *, server_id: str) -> HeartbeatReport:
        """Validate a decoded heartbeat body sent to the URL of ``server_id``.

        ``server_id``, ``current_connections``, ``load`` and ``accepting_connections`` are required
        (as in Horizon's own type); ``avg_tick_ms`` and ``memory_bytes`` default to 0.

        Raises:
            RegistrationError: a field is missing or wrong, or ``server_id`` differs from the URL's.
        """
        body = _object(data, "body")
        sent_id = _string(_required(body, "server_id"), "server_id")
        if sent_id != server_id:
            raise RegistrationError(f"server_id: {sent_id!r} does not match the URL's {server_id!r}")
        return cls(
            current_connections=_integer(
                _required(body, "current_connections"), "current_connections", minimum=0
            ),
            load=_number(_required(body, "load"), "load"),
            accepting_connections=_boolean(_required(body, "accepting_connections"), "accepting_connections"),
            avg_tick_ms=_number(body.get("avg_tick_ms", 0.0), "avg_tick_ms"),
            memory_bytes=_integer(body.get("memory_bytes", 0), "memory_bytes", minimum=0),
        )


class RegisterOutcome(enum.Enum):
    """What a registration does to the registry (and so to the pool)."""

    #: A name not registered before: a new backend.
    CREATED = "created"
    #: The same name at the same address, still registered: the record is updated in place.
    UPDATED = "updated"
    #: The same name at another address, after it unregistered, or while draining: a fresh backend
    #: replaces the old one (which keeps its clients until they leave).
    REPLACED = "replaced"


@attrs.define(eq=False)
class RegisteredServer:
    """What Atlas knows about one registered server (wall-clock times, ``time.time()``)."""

    registration: Registration
    registered_at: float
    last_heartbeat: HeartbeatReport | None = None
    last_heartbeat_at: float | None = None
    leaving: bool = False
    """True once it unregistered (or an operator removed it): kept until its backend is gone."""

    @property
    def name(self) -> str:
        """The server's name, which is also its ``server_id`` and its backend's name."""
        return self.registration.name


class HorizonRegistry:
    """Registered servers by name. Sans-IO: the caller passes the current time.

    The registry only remembers; the ops app keeps it in step with the pool (`retain`) and makes the
    pool changes each `RegisterOutcome` calls for.
    """

    def __init__(self) -> None:
        self._servers: dict[str, RegisteredServer] = {}

    def get(self, name: str) -> RegisteredServer | None:
        """The record of ``name``, or None."""
        return self._servers.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._servers

    def __iter__(self) -> Iterator[RegisteredServer]:
        """A snapshot of the records, in registration order."""
        return iter(tuple(self._servers.values()))

    def __len__(self) -> int:
        return len(self._servers)

    def classify(self, registration: Registration, *, draining: bool = False) -> RegisterOutcome:
        """What `register` would do with ``registration`` (changes nothing).

        ``draining`` says the server's backend is draining: a server that registers again then gets a
        fresh backend, as one that unregistered does.
        """
        record = self._servers.get(registration.name)
        if record is None:
            return RegisterOutcome.CREATED
        if draining or record.leaving or record.registration.address != registration.address:
            return RegisterOutcome.REPLACED
        return RegisterOutcome.UPDATED

    def register(self, registration: Registration, *, now: float, draining: bool = False) -> RegisterOutcome:
        """Record ``registration`` and return its outcome (see `classify`).

        An update keeps the first registration time and the last heartbeat; a replacement starts a
        fresh record.
        """
        outcome = self.classify(registration, draining=draining)
        record = self._servers.get(registration.name)
        if outcome is RegisterOutcome.UPDATED and record is not None:
            record.registration = registration
        else:
            self._servers[registration.name] = RegisteredServer(registration, registered_at=now)
        return outcome

    def heartbeat(self, name: str, report: HeartbeatReport, *, now: float) -> RegisteredServer:
        """Record a heartbeat of ``name``; raise `KeyError` if it is not registered."""
        record = self._servers[name]
        record.last_heartbeat = report
        record.last_heartbeat_at = now
        return record

    def unregister(self, name: str) -> RegisteredServer:
        """Mark ``name`` as leaving; raise `KeyError` if it is not registered."""
        record = self._servers[name]
        record.leaving = True
        return record

    def retain(self, keep: Callable[[RegisteredServer], bool]) -> list[str]:
        """Forget every record for which ``keep`` is false; return their names."""
        gone = [name for name, record in self._servers.items() if not keep(record)]
        for name in gone:
            del self._servers[name]
        return gone

    def adjacent(self, name: str, region_coord: RegionCoord) -> list[RegisteredServer]:
        """Registered servers (not leaving, not ``name``) in the 6 cells next to ``region_coord``."""
        return [
            record
            for record in self._servers.values()
            if record.name != name
            and not record.leaving
            and record.registration.region_coord.is_adjacent(region_coord)
        ]


# ------------------------------------------------------------------------------------------------
# Answers, exactly as Horizon parses them
# ------------------------------------------------------------------------------------------------


def registration_answer(
    registration: Registration,
    *,
    message: str,
    heartbeat_interval: int,
    adjacent: list[RegisteredServer],
) -> dict[str, Any]:
    """The registration reply: all five fields Horizon's parser requires."""
    return {
        "success": True,
        "server_id": registration.name,
        "message": message,
        "heartbeat_interval_secs": heartbeat_interval,
        "adjacent_servers": [
            {
                "server_id": record.name,
                "address": record.registration.address,
                "region_coord": record.registration.region_coord.to_json(),
            }
            for record in adjacent
        ],
    }


def heartbeat_answer(*, message: str, draining: bool) -> dict[str, Any]:
    """The heartbeat reply; a draining server is told to ``PrepareShutdown``."""
    commands: list[dict[str, Any]] = []
    if draining:
        commands.append({"type": "PrepareShutdown", "deadline_secs": PREPARE_SHUTDOWN_DEADLINE})
    return {"success": True, "message": message, "commands": commands}
