"""Drains that move clients: a draining backend's clients are transferred away at a bounded rate.

Theory of operation
-------------------
A backend becomes DRAINING in several ways (``POST /api/v1/servers/{name}/drain``, ``DELETE`` of a
server, a Horizon unregister, a registered server dropped by its health checks). In every case it
stops getting new clients; :func:`serve_drains` then empties it *without disconnecting anyone*: each
of its clients is moved to another backend by the transfer coordinator, reason ``maintenance``.

:func:`serve_drains` runs in the root nursery. It has no hook into the places that drain a backend:
it reconciles instead, every :data:`RECONCILE_INTERVAL` seconds, the set of draining backends in the
pool with the movers it runs, one per draining backend, each in its own cancel scope (in a nursery
owned here). A backend that comes back into service, or is taken out of the pool while it still has
clients (a re-registration replaced it: those clients stay with it), has its mover cancelled; a mover
that finished is not started again for the same backend record.

One mover (``_Mover.run``) paces the *starts* of transfers: one every ``1 / [transfer] drain_rate``
seconds, at most :data:`MAX_CONCURRENT` under way at once (transfers overlap; a slow one does not
stop the drain). The target of each client is the pool's balancer's pick among the other backends
(``runtime.pool.choose(exclude={name})``), taken in the client's own task right before the request,
with no checkpoint in between, so the pick is never stale. Clients already being moved (by anyone),
or that cannot be moved right now (closing, failing over), are skipped and looked at again later.

A client that cannot be moved (no other backend can take it, the coordinator refused the transfer,
or it rolled back) is retried after :data:`RETRY_DELAY` times its number of failures, at most
:data:`MAX_ATTEMPTS` times in all; then it is left in place (one log line) and stays until it leaves
by itself. The drain is finished when the backend has no clients left other than those; one log line
says so, with how many clients were moved and how many were left.

A draining backend that *goes down* (fails its probes, is ejected) fails its clients over instead (the
health monitor's failover, in the sessions): such clients are not movable and leave by themselves.
The bookkeeping of one drain, :class:`DrainProgress`, is sans-IO.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

import attrs
import trio

from atlas.control.coordinator import TransferRefused
from atlas.control.lifecycle import TransferReason
from atlas.pool import Backend, BackendState

if TYPE_CHECKING:
    from atlas.control.coordinator import TransferCoordinator
    from atlas.proxy.session import ClientSession
    from atlas.runtime import Runtime

__all__ = [
    "MAX_ATTEMPTS",
    "MAX_CONCURRENT",
    "RECONCILE_INTERVAL",
    "RETRY_DELAY",
    "DrainProgress",
    "serve_drains",
]

log = logging.getLogger("atlas.drain")

#: Seconds between two looks at the pool for backends that started or stopped draining.
RECONCILE_INTERVAL: Final = 0.5
#: Transfers one drain may have under way at the same time.
MAX_CONCURRENT: Final = 32
#: Times a drain tries to move one client before leaving it in place.
MAX_ATTEMPTS: Final = 3
#: Seconds before a client that could not be moved is tried again, times its number of failures.
RETRY_DELAY: Final = 1.0
#: Longest a mover sleeps without looking at its backend's clients again.
_POLL: Final = 0.5


@attrs.define
class _Failures:
    count: int
    retry_at: float
    last: str


class DrainProgress:
    """The bookkeeping of one drain (sans-IO): moved, under way, waiting to retry, left in place.

    Times are whatever clock the caller uses (the mover uses ``trio.current_time()``).
    """

    def __init__(
        self, backend: str, *, max_attempts: int = MAX_ATTEMPTS, retry_delay: float = RETRY_DELAY
    ) -> None:
        self.backend = backend
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.moved = 0
        """Clients this drain moved away (committed transfers)."""
        self.left: dict[str, str] = {}
        """Clients given up on, with the last reason: they stay until they leave."""
        self.in_flight: set[str] = set()
        """Clients whose transfer this drain started and that have not ended yet."""
        self._failures: dict[str, _Failures] = {}

    def due(self, client_id: str, now: float) -> bool:
        """Whether ``client_id`` should be moved now: not under way, not given up, not waiting."""
        if client_id in self.in_flight or client_id in self.left:
            return False
        failures = self._failures.get(client_id)
        return failures is None or failures.retry_at <= now

    def next_retry(self) -> float:
        """The earliest time a failed client may be tried again (``math.inf`` if none waits)."""
        waiting = [
            f.retry_at
            for client_id, f in self._failures.items()
            if client_id not in self.left and client_id not in self.in_flight
        ]
        return min(waiting, default=math.inf)

    def start(self, client_id: str) -> None:
        """A transfer of ``client_id`` is about to be requested."""
        self.in_flight.add(client_id)

    def abandon(self, client_id: str) -> None:
        """The transfer of ``client_id`` was not requested after all (it left, or is moving already)."""
        self.in_flight.discard(client_id)

    def succeeded(self, client_id: str) -> None:
        """The client was moved away."""
        self.in_flight.discard(client_id)
        self._failures.pop(client_id, None)
        self.moved += 1

    def failed(self, client_id: str, why: str, now: float) -> bool:
        """The client could not be moved; returns True if it is now given up (left in place)."""
        self.in_flight.discard(client_id)
        failures = self._failures.get(client_id)
        if failures is None:
            failures = self._failures[client_id] = _Failures(0, now, why)
        failures.count += 1
        failures.last = why
        failures.retry_at = now + self.retry_delay * failures.count
        if failures.count >= self.max_attempts:
            self.left[client_id] = why
            return True
        return False

    def forget(self, present: Iterable[str]) -> None:
        """Drop what is known of clients no longer on the backend (they left, or failed over)."""
        keep = set(present)
        for client_id in [c for c in self._failures if c not in keep and c not in self.in_flight]:
            del self._failures[client_id]
        for client_id in [c for c in self.left if c not in keep]:
            del self.left[client_id]

    def finished(self, present: Iterable[str]) -> bool:
        """Whether nothing is left to do: every client still ``present`` was given up, none under way."""
        return not self.in_flight and all(client_id in self.left for client_id in present)


async def serve_drains(
    runtime: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Move the clients of draining backends away until cancelled (see the module docstring).

    Needs ``runtime.transfers`` (the supervisor starts the coordinator first).
    """
    transfers = runtime.transfers
    if transfers is None:
        raise RuntimeError("serve_drains needs the transfer coordinator (runtime.transfers)")
    movers: dict[Backend, _Mover] = {}  # by record: a name may come back as another backend
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            for backend, mover in list(movers.items()):
                in_pool = runtime.pool.get(backend.name) is backend
                resumed = backend.state is not BackendState.DRAINING
                # A backend taken out of the pool with clients (replaced by a re-registration) keeps
                # them until they leave; one removed once empty lets its mover finish by itself.
                detached = not in_pool and backend.connections > 0
                stop = resumed or detached
                if stop and not mover.done:
                    mover.scope.cancel()
                    log.info(
                        "drain of %s stopped (%s): moved %d, left %d",
                        backend.name,
                        "back in service" if resumed else "replaced",
                        mover.progress.moved,
                        len(mover.progress.left),
                        extra={"server": backend.name, "event": "drain_stopped"},
                    )
                if stop or (not in_pool and mover.done):
                    del movers[backend]
            for backend in runtime.pool:
                if backend.state is BackendState.DRAINING and backend not in movers:
                    mover = _Mover(runtime, transfers, backend)
                    movers[backend] = mover
                    await nursery.start(mover.run)
            await trio.sleep(RECONCILE_INTERVAL)


class _Mover:
    """Empties one draining backend (one per drain; ``run`` hands back its cancel scope)."""

    def __init__(self, runtime: Runtime, transfers: TransferCoordinator, backend: Backend) -> None:
        self.runtime = runtime
        self.transfers = transfers
        self.backend = backend
        self.progress = DrainProgress(backend.name)
        self.scope = trio.CancelScope()
        self.done = False
        self._changed = trio.Event()
        self._slots = trio.Semaphore(MAX_CONCURRENT)

    def _sessions(self) -> list[ClientSession]:
        return [s for s in self.runtime.clients if s.link.backend is self.backend]

    def _can_move(self, session: ClientSession) -> bool:
        return (
            session.link.backend is self.backend
            and session.movable
            and session.client_id not in self.transfers.active
        )

    def _target_exists(self) -> bool:
        return any(b.available and b.name != self.backend.name for b in self.runtime.pool)

    async def run(self, *, task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED) -> None:
        """Move the backend's clients away; returns once only clients given up on are left."""
        name = self.backend.name
        rate = self.runtime.config.transfer.drain_rate
        progress = self.progress
        with self.scope:
            task_status.started(self.scope)
            announced = bool(self._sessions())
            if announced:
                log.info(
                    "drain of %s started: moving %d client(s) away, at most %g per second",
                    name,
                    len(self._sessions()),
                    rate,
                    extra={"server": name, "event": "drain_started"},
                )
            async with trio.open_nursery() as nursery:
                while True:
                    self._changed = trio.Event()  # before looking: a transfer ending from now on wakes us
                    sessions = self._sessions()
                    present = [s.client_id for s in sessions]
                    progress.forget(present)
                    if progress.finished(present):
                        break
                    now = trio.current_time()
                    due = [s for s in sessions if progress.due(s.client_id, now) and self._can_move(s)]
                    if due and not self._target_exists():
                        self._no_target([s.client_id for s in due], now)
                        due = []
                    if not due:
                        await self._wait(min(now + _POLL, progress.next_retry()))
                        continue
                    for session in due:
                        await self._slots.acquire()
                        if not self._can_move(session):
                            self._slots.release()
                            continue
                        progress.start(session.client_id)
                        nursery.start_soon(self._move, session.client_id)
                        await trio.sleep(1 / rate)
            self.done = True
            if announced or progress.moved:
                log.info(
                    "drain of %s finished: moved %d, left %d",
                    name,
                    progress.moved,
                    len(progress.left),
                    extra={"server": name, "event": "drain_finished"},
                )

    async def _wait(self, deadline: float) -> None:
        """Sleep until ``deadline`` or until a transfer of this drain ends, whichever is first."""
        with trio.move_on_at(deadline):
            await self._changed.wait()

    async def _move(self, client_id: str) -> None:
        progress = self.progress
        try:
            session = self.runtime.clients.get(client_id)
            if session is None or not self._can_move(session):
                progress.abandon(client_id)  # it left, or something else moves it: not an attempt
                return
            why: str | None = None
            # No checkpoint between the pick and the request: the target is still available.
            target = self.runtime.pool.choose(exclude={self.backend.name})
            if target is None:
                why = "no other server can take it"
            else:
                try:
                    outcome = await self.transfers.transfer(
                        client_id, target.name, TransferReason.MAINTENANCE
                    )
                except TransferRefused as exc:
                    why = f"refused: {exc}"
                else:
                    if not outcome.committed:
                        why = f"rolled back: {outcome.failure}"
            if why is None:
                progress.succeeded(client_id)
            elif progress.failed(client_id, why, trio.current_time()):
                log.warning(
                    "drain of %s: client %s stays until it disconnects (%d attempts failed, last: %s)",
                    self.backend.name,
                    client_id,
                    progress.max_attempts,
                    why,
                    extra={"server": self.backend.name, "client": client_id, "event": "drain_left"},
                )
        finally:
            self._slots.release()
            self._changed.set()

    def _no_target(self, clients: list[str], now: float) -> None:
        """No other backend can take a client: each due client counts a failed attempt."""
        why = "no other server can take it"
        given_up = [c for c in clients if self.progress.failed(c, why, now)]
        if given_up:
            log.warning(
                "drain of %s: %d client(s) stay until they disconnect (%d attempts failed, last: %s)",
                self.backend.name,
                len(given_up),
                self.progress.max_attempts,
                why,
                extra={"server": self.backend.name, "event": "drain_left"},
            )
