"""Changes to the set of backends made through the ops server: admin calls and Horizon registrations.

`Membership` applies the decisions of the sans-IO `HorizonRegistry` to the runtime's pool and keeps
the two in step: a registration record lives exactly as long as its backend is in the pool, so a
server removed by a drain (``remove=True``) or by anything else stops being "registered" as soon as
its backend is gone.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import attrs

from atlas.config import ServerConfig
from atlas.ops._errors import ApiError
from atlas.ops.horizon import (
    HORIZON_TAG,
    HeartbeatReport,
    HorizonRegistry,
    RegisteredServer,
    RegisterOutcome,
    Registration,
)
from atlas.pool import Backend, BackendState
from atlas.world import RegionConflict

if TYPE_CHECKING:
    from atlas.runtime import Runtime

__all__ = ["Membership", "Registered"]

log = logging.getLogger("atlas.ops")

_SERVER_FIELDS = ("name", "url", "capacity", "weight", "tags", "control_url")


@attrs.frozen
class Registered:
    """The result of a registration: what happened, and the server's registered neighbours."""

    outcome: RegisterOutcome
    adjacent: list[RegisteredServer]


class Membership:
    """Backend membership changes on one runtime, with the registry of registered servers."""

    def __init__(self, runtime: Runtime, registry: HorizonRegistry) -> None:
        self.runtime = runtime
        self.registry = registry

    # -- keeping the registry in step with the pool --------------------------------------------------

    def sync(self) -> None:
        """Forget registrations whose backend left the pool (removed once drained, or replaced)."""
        pool = self.runtime.pool

        def still_there(record: RegisteredServer) -> bool:
            backend = pool.get(record.name)
            return backend is not None and backend.url == record.registration.url

        self.registry.retain(still_there)

    def record(self, name: str) -> RegisteredServer | None:
        """The registration of ``name`` if its backend is still in the pool."""
        self.sync()
        return self.registry.get(name)

    def backend(self, name: str) -> Backend:
        """The backend called ``name``; `ApiError` 404 if there is none."""
        backend = self.runtime.pool.get(name)
        if backend is None:
            raise ApiError(404, f"no server named {name!r}")
        return backend

    # -- admin calls ---------------------------------------------------------------------------------

    def add(self, body: dict[str, Any]) -> Backend:
        """Add a backend from an admin ``POST /api/v1/servers`` body (validated like the config)."""
        unknown = sorted(set(body) - set(_SERVER_FIELDS))
        if unknown:
            raise ApiError(400, f"{unknown[0]}: unknown field")
        for key in ("name", "url"):
            if key not in body:
                raise ApiError(400, f"{key}: missing required field")
        server = _server_config(body)
        if server.name in self.runtime.pool:
            raise ApiError(409, f"a server named {server.name!r} already exists")
        try:
            backend = Backend.from_url(
                server.name,
                server.url,
                capacity=server.capacity,
                weight=server.weight,
                tags=server.tags,
                control_url=server.control_url,
            )
        except ValueError as exc:
            raise ApiError(400, f"url: {exc}") from None
        self.runtime.add_backend(backend)
        log.info("server %s added at %s", backend.name, backend.url, extra={"server": backend.name})
        return backend

    def drain(self, name: str) -> Backend:
        """Stop sending new clients to ``name``; it keeps the ones it has."""
        try:
            backend = self.runtime.drain_backend(name)
        except KeyError:
            raise ApiError(404, f"no server named {name!r}") from None
        log.info("server %s draining", name, extra={"server": name})
        return backend

    def remove(self, name: str) -> Backend:
        """Drain ``name`` and remove it once empty (at once if it is empty); unregisters it too."""
        try:
            backend = self.runtime.drain_backend(name, remove=True)
        except KeyError:
            raise ApiError(404, f"no server named {name!r}") from None
        if name in self.registry:
            self.registry.unregister(name)
            self.runtime.world.remove(name)  # its Horizon region (named after the server), if any
        self.sync()
        log.info(
            "server %s %s",
            name,
            "removed" if self.runtime.pool.get(name) is not backend else "draining, removed once empty",
            extra={"server": name},
        )
        return backend

    # -- Horizon registration ------------------------------------------------------------------------

    def register(self, registration: Registration) -> Registered:
        """Make a registered server routable (see `RegisterOutcome` for the three cases).

        Raises `ApiError` 409 when the name belongs to a server that did not register (a configured
        or admin-added one), 400 when the address makes no usable backend.
        """
        self.sync()
        name = registration.name
        pool = self.runtime.pool
        existing = pool.get(name)
        if existing is not None and name not in self.registry:
            raise ApiError(409, f"a server named {name!r} already exists and was not registered")
        draining = existing is not None and existing.state is BackendState.DRAINING
        outcome = self.registry.classify(registration, draining=draining)
        if outcome is RegisterOutcome.UPDATED:
            assert existing is not None  # a live record always has its backend (sync)
            existing.capacity = registration.capacity
        else:
            try:
                backend = Backend.from_url(
                    name, registration.url, capacity=registration.capacity, tags=(HORIZON_TAG,)
                )
            except ValueError as exc:
                raise ApiError(400, f"address: {exc}") from None
            if existing is not None:
                self._detach(existing)
            self.runtime.add_backend(backend)
        self.registry.register(registration, now=time.time(), draining=draining)
        self._place_in_world(registration)
        # Registration counts as the first heartbeat: from now on, silence makes the monitor probe it.
        self.runtime.health.track_heartbeats(name)
        log.info(
            "server %s registered at %s (%s)",
            name,
            registration.url,
            outcome.value,
            extra={"server": name, "event": "register"},
        )
        return Registered(outcome, self.registry.adjacent(name, registration.region_coord))

    def _place_in_world(self, registration: Registration) -> None:
        """A Horizon server owns the world cell named by its ``region_coord`` (``[world] horizon``)."""
        world = self.runtime.config.world
        if not world.horizon:
            return
        try:
            self.runtime.world.register_horizon(registration, z_size=world.horizon_z_size)
        except (RegionConflict, ValueError) as exc:
            log.warning(
                "server %s: its region cannot join the world map: %s",
                registration.name,
                exc,
                extra={"server": registration.name, "event": "register"},
            )

    def heartbeat(self, name: str, body: object) -> bool:
        """Record a heartbeat of ``name``; return whether the server is draining.

        Raises `ApiError` 404 if ``name`` is not registered, 400 if the body is malformed
        (`atlas.ops.horizon.RegistrationError`, raised as is for the app to answer).
        """
        record = self.record(name)
        if record is None:
            raise ApiError(404, f"no registered server named {name!r}")
        report = HeartbeatReport.from_json(body, server_id=name)
        self.registry.heartbeat(name, report, now=time.time())
        self.runtime.health.heartbeat(name)
        backend = self.runtime.pool.get(name)
        return record.leaving or backend is None or backend.state is BackendState.DRAINING

    def _detach(self, old: Backend) -> None:
        """Take ``old`` out of the pool so a new record can use its name; its clients stay on it."""
        self.runtime.pool.remove(old.name)
        old.state = BackendState.DRAINING
        # The runtime drops a backend "once empty" by name: a pending removal of the old record must
        # not later remove the new one. The health monitor needs nothing: adding the new record under
        # the same name replaces the old one there.
        self.runtime.cancel_removal(old.name)


def _server_config(body: dict[str, Any]) -> ServerConfig:
    """Validate an admin server body with the config's own record and validators."""
    kinds: dict[str, tuple[type, ...]] = {
        "name": (str,),
        "url": (str,),
        "capacity": (int,),
        "weight": (int,),
        "control_url": (str,),
    }
    for key, types in kinds.items():
        if key in body and (isinstance(body[key], bool) or not isinstance(body[key], types)):
            expected = "a string" if types == (str,) else "an integer"
            raise ApiError(400, f"{key}: expected {expected}")
    tags = body.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise ApiError(400, "tags: expected an array of strings")
    fields = attrs.fields(ServerConfig)
    values = {key: body[key] for key in _SERVER_FIELDS if key in body}
    values["tags"] = tuple(tags)
    for key, value in values.items():
        attribute = getattr(fields, key)
        if attribute.validator is not None:
            try:
                attribute.validator(None, attribute, value)
            except ValueError as exc:
                reason = str(exc)
                raise ApiError(400, reason if reason.startswith(key) else f"{key}: {reason}") from None
    server = ServerConfig(name=values["name"], url=values["url"])
    return attrs.evolve(
        server,
        capacity=values.get("capacity", server.capacity),
        weight=values.get("weight", server.weight),
        tags=values["tags"],
        control_url=values.get("control_url", server.control_url),
    )
