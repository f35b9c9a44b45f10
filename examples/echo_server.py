"""Run one echo game server, the kind of backend Atlas balances.

    python examples/echo_server.py --port 8080 --name game-server-1

Every message a client sends comes back unchanged (text as text, binary as binary). Ctrl-C stops
the server; connected clients get close code 1001 (going away).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from functools import partial

import trio

from atlas.demo import serve_echo_server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run a WebSocket echo game server.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="port to bind (default: %(default)s)")
    parser.add_argument("--name", default="game-server-1", help="server name (default: %(default)s)")
    return parser.parse_args(argv)


async def main(args: argparse.Namespace) -> int:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            try:
                port = await nursery.start(partial(serve_echo_server, args.host, args.port, name=args.name))
            except OSError as exc:
                print(f"error: {exc.strerror or exc}", file=sys.stderr)
                return 1
            print(f"{args.name} (echo) listening on ws://{args.host}:{port}", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sys.exit(trio.run(main, parse_args()))
