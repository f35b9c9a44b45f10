"""The ops HTTP server: the app of ``atlas/ops/app.py`` on hypercorn's trio worker.

`serve_ops` runs until cancelled. Hypercorn stops gracefully when its ``shutdown_trigger`` returns,
but a cancellation from outside would cut it off in the middle of its own cleanup; so hypercorn runs
in a shielded cancel scope of its own, and when `serve_ops` is cancelled it fires the trigger and
gives that scope a deadline (`STOP_TIMEOUT`): the server always stops, within a bounded time.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import TYPE_CHECKING, Final, cast

import attrs
import hypercorn
import hypercorn.trio
import hypercorn.typing
import trio

from atlas.config import ListenAddress
from atlas.errors import StartupError
from atlas.ops.app import create_app

if TYPE_CHECKING:
    from atlas.ops.horizon import HorizonRegistry
    from atlas.runtime import Runtime

__all__ = ["STOP_TIMEOUT", "OpsListening", "check_exposure", "serve_ops"]

log = logging.getLogger("atlas.ops")

#: Seconds hypercorn gets to finish open requests once asked to stop.
GRACEFUL_TIMEOUT: Final = 1.0
#: Hard bound on how long `serve_ops` takes to return once cancelled.
STOP_TIMEOUT: Final = 3.0


@attrs.frozen
class OpsListening:
    """Reported by `serve_ops` once it accepts: the bound ``(host, port)`` addresses."""

    addresses: tuple[tuple[str, int], ...]

    @property
    def port(self) -> int:
        """The bound port."""
        return self.addresses[0][1]

    @property
    def url(self) -> str:
        """``http://host:port/`` of the first address (what the CLI's ``--url`` takes)."""
        host, port = self.addresses[0]
        return f"http://{ListenAddress(host, port)}"


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(listen: str, token: str) -> ListenAddress:
    """Parse ``[admin] listen``; refuse a non-loopback address without a token.

    Raises:
        StartupError: ``admin.listen: 0.0.0.0:9001 is not loopback: set [admin] token``.
    """
    address = ListenAddress.parse(listen)
    if not token and not _is_loopback(address.host):
        raise StartupError(f"admin.listen: {address} is not loopback: set [admin] token")
    return address


class _QuietStartup(logging.Filter):
    """Drops hypercorn's "Running on ... (CTRL + C to quit)": `serve_ops` logs its own line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Running on")


_http_log = logging.getLogger("atlas.ops.http")
_http_log.addFilter(_QuietStartup())


def _hypercorn_config(address: ListenAddress) -> hypercorn.Config:
    config = hypercorn.Config()
    config.bind = [str(address)]
    config.accesslog = None
    config.errorlog = _http_log
    config.graceful_timeout = GRACEFUL_TIMEOUT
    config.include_server_header = False
    return config


def _check_bindable(address: ListenAddress) -> None:
    """Bind a throw-away socket the way hypercorn will, so a busy port fails here, in one line.

    (hypercorn leaks its socket when the bind fails; it still fails cleanly, below, if the port is
    taken in between.)
    """
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((address.host, address.port))
    except OSError as exc:
        raise StartupError(f"admin.listen: cannot listen on {address}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _parse_bind(bind: str) -> tuple[str, int]:
    # hypercorn reports "http://127.0.0.1:9001" or "http://[::1]:9001".
    parsed = ListenAddress.parse(bind.partition("://")[2])
    return parsed.host, parsed.port


async def serve_ops(
    runtime: Runtime,
    *,
    registry: HorizonRegistry | None = None,
    task_status: trio.TaskStatus[OpsListening] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ops app on ``[admin] listen`` until cancelled.

    Reports `OpsListening` once the socket accepts (so ``listen = "127.0.0.1:0"`` works with
    ``nursery.start``). Whether to run it at all (``[admin] enabled``) is the caller's decision.
    ``registry`` keeps Horizon registrations (a new one by default).

    Raises:
        StartupError: (one line, before binding) the address is not loopback and no token is set;
            or the address cannot be bound (in use, unknown host).
    """
    admin = runtime.config.admin
    address = check_exposure(admin.listen, admin.token)
    _check_bindable(address)
    app = cast(hypercorn.typing.ASGIFramework, create_app(runtime, registry=registry))
    config = _hypercorn_config(address)
    stop = trio.Event()
    server_scope = trio.CancelScope(shield=True)

    async def run_hypercorn(task_status: trio.TaskStatus[list[str]]) -> None:
        with server_scope:
            await hypercorn.trio.serve(app, config, shutdown_trigger=stop.wait, task_status=task_status)

    started = False
    try:
        async with trio.open_nursery() as nursery:
            try:
                binds: list[str] = await nursery.start(run_hypercorn)
                started = True
                listening = OpsListening(tuple(_parse_bind(bind) for bind in binds))
                log.info("ops server on %s", ", ".join(binds))
                task_status.started(listening)
                await trio.sleep_forever()
            finally:
                stop.set()
                server_scope.deadline = trio.current_time() + STOP_TIMEOUT
    except* OSError as group:
        if started:
            raise
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise StartupError(f"admin.listen: cannot listen on {address}: {_reason(first)}") from None
