"""The ``atlas`` command line: serve, init, check, an interactive client, and the admin commands.

``status``, ``servers``, ``clients``, ``drain`` and ``transfer`` talk to a running Atlas through its
admin API (`atlas.ops.client.AdminClient`).

Every failure a user can cause (a bad config, a busy port, an unreachable address) ends as one line on
stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from atlas import __version__
from atlas.config import Config, write_default_config
from atlas.control.lifecycle import TransferReason
from atlas.demo.client import run_client
from atlas.demo.servers import serve_demo_cluster
from atlas.errors import ConfigError, StartupError
from atlas.logs import configure_logging
from atlas.ops._render import render_clients, render_drain, render_servers, render_status, render_transfer
from atlas.ops.client import DEFAULT_ADMIN_URL, AdminClient, AdminError
from atlas.runtime import Runtime
from atlas.supervisor import run_until_signalled

__all__ = ["main"]

log = logging.getLogger("atlas")

DEMO_PORTS = (8080, 8081, 8082)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atlas", description="Atlas: WebSocket proxy and load balancer for game servers."
    )
    parser.add_argument("--version", action="version", version=f"atlas {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", "-c", metavar="FILE", help="TOML config (default: embedded)")
    serve.add_argument(
        "--demo",
        action="store_true",
        help="also start example game servers on 127.0.0.1:8080-8082 (a local demo cluster)",
    )
    serve.add_argument("--listen", metavar="HOST:PORT", help="override [proxy] listen")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["text", "json"])

    init = commands.add_parser("init", help="write a complete default config file")
    init.add_argument("path", nargs="?", default="atlas.toml", help="default: atlas.toml")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")

    check = commands.add_parser("check", help="validate a config file")
    check.add_argument("path", metavar="FILE")

    client = commands.add_parser("client", help="an interactive WebSocket client")
    client.add_argument("url", nargs="?", default="ws://127.0.0.1:9000")

    admin = argparse.ArgumentParser(add_help=False)
    admin.add_argument(
        "--url",
        metavar="URL",
        help=f"admin API address (default: $ATLAS_ADMIN_URL or {DEFAULT_ADMIN_URL})",
    )
    admin.add_argument("--token", metavar="TOKEN", help="bearer token (default: $ATLAS_ADMIN_TOKEN)")
    admin.add_argument("--json", action="store_true", help="print the API's JSON answer as it is")
    commands.add_parser("status", parents=[admin], help="a running Atlas at a glance")
    commands.add_parser("servers", parents=[admin], help="list the backend game servers")
    commands.add_parser("clients", parents=[admin], help="list the connected clients")
    drain = commands.add_parser("drain", parents=[admin], help="send no new clients to a server")
    drain.add_argument("name", metavar="NAME", help="server name")
    transfer = commands.add_parser(
        "transfer", parents=[admin], help="move a client to another server, without disconnecting it"
    )
    transfer.add_argument("client", metavar="CLIENT", help="client id (see atlas clients)")
    transfer.add_argument("server", metavar="SERVER", help="target server name")
    transfer.add_argument(
        "--reason",
        choices=[r.value for r in TransferReason],
        default=TransferReason.ADMIN.value,
        help="why, as the servers are told (default: admin)",
    )
    return parser


def _error(message: str) -> int:
    print(f"atlas: error: {message}", file=sys.stderr)
    return 1


def _load(args: argparse.Namespace) -> Config:
    config = Config.from_file(args.config) if args.config else Config.default()
    if args.listen:
        try:
            config = attrs.evolve(config, proxy=attrs.evolve(config.proxy, listen=args.listen))
        except ValueError as exc:
            raise ConfigError([f"--listen: {exc}"]) from None
    return config


def _serve(args: argparse.Namespace) -> int:
    try:
        config = _load(args)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"atlas: config error: {line}", file=sys.stderr)
        return 1
    configure_logging(args.log_level or config.logging.level, args.log_format or config.logging.format)
    try:
        trio.run(_serve_async, config, args.demo)
    except StartupError as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        return 130
    return 0


async def _serve_async(config: Config, demo: bool) -> None:
    try:
        async with trio.open_nursery() as nursery:
            if demo:
                try:
                    await nursery.start(serve_demo_cluster, "127.0.0.1", DEMO_PORTS)
                except OSError as exc:
                    raise StartupError(f"demo cluster: {exc.strerror or exc}") from None
                _print_demo_banner(config)
            await run_until_signalled(config)
            nursery.cancel_scope.cancel()
    except* StartupError as group:
        raise _first_leaf(group) from None


def _first_leaf(group: BaseExceptionGroup[StartupError]) -> StartupError:
    """The first exception in a (possibly nested) group: one clear line beats a tree of them."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    assert isinstance(first, StartupError)
    return first


def _print_demo_banner(config: Config) -> None:
    address = config.proxy.listen_address
    host = "127.0.0.1" if address.host in ("0.0.0.0", "::", "") else address.host
    names = ", ".join(f"{s.name} ({s.url})" for s in config.servers)
    print(
        f"Atlas demo: proxy on {address} in front of {names}.\n"
        f"Connect:  python -m atlas client {'wss' if config.proxy.tls else 'ws'}://{host}:{address.port}\n"
        f"game-server-1 echoes your lines; the others are chat rooms that greet you by name.\n"
        f"Type a line to send it. Everywhere: /server, /who, /nick NAME, and /me (your name and\n"
        f"messages sent); /move game-server-2 moves you to that server over the same connection,\n"
        f"and your name and count move with you. Ctrl-C stops.",
        flush=True,
    )


def _init(args: argparse.Namespace) -> int:
    try:
        write_default_config(args.path, force=args.force)
    except ConfigError as exc:
        return _error(str(exc))
    print(f"wrote {args.path}")
    return 0


def _check(args: argparse.Namespace) -> int:
    try:
        config = Config.from_file(args.path)
        # What start-up reads besides the file (the [auth] key file, say) is checked too.
        Runtime.from_config(config)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 1
    except StartupError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"ok: {args.path}")
    return 0


def _client(args: argparse.Namespace) -> int:
    try:
        return trio.run(run_client, args.url)
    except KeyboardInterrupt:
        return 130


@attrs.frozen
class _AdminCommand:
    """An admin command: the call it makes, how its answer reads, and whether the answer is a success."""

    call: Callable[[AdminClient, argparse.Namespace], Any]
    render: Callable[[Any], str]
    succeeded: Callable[[Any], bool] = lambda _answer: True


_ADMIN_COMMANDS: dict[str, _AdminCommand] = {
    "status": _AdminCommand(lambda api, _args: api.status(), render_status),
    "servers": _AdminCommand(lambda api, _args: api.servers(), render_servers),
    "clients": _AdminCommand(lambda api, _args: api.clients(), render_clients),
    "drain": _AdminCommand(lambda api, args: api.drain(args.name), render_drain),
    "transfer": _AdminCommand(
        lambda api, args: api.transfer(args.client, args.server, reason=args.reason),
        render_transfer,
        succeeded=lambda outcome: outcome["outcome"] == "committed",
    ),
}


def _admin(args: argparse.Namespace) -> int:
    command = _ADMIN_COMMANDS[args.command]
    url = args.url or os.environ.get("ATLAS_ADMIN_URL") or DEFAULT_ADMIN_URL
    token = args.token or os.environ.get("ATLAS_ADMIN_TOKEN") or None
    try:
        with AdminClient(url, token=token) as api:
            answer = command.call(api, args)
    except AdminError as exc:
        return _error(str(exc))
    print(json.dumps(answer, indent=2) if args.json else command.render(answer))
    return 0 if command.succeeded(answer) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``atlas`` command line; returns the process exit status."""
    args = _parser().parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "serve": _serve,
        "init": _init,
        "check": _check,
        "client": _client,
    }
    return handlers.get(args.command, _admin)(args)
