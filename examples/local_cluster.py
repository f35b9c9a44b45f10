"""Run a local cluster of three game servers and show how to put Atlas in front of it.

    python examples/local_cluster.py

starts ``game-server-1`` (echo) on 8080 and ``game-server-2``, ``game-server-3`` (chat) on 8081
and 8082, the backends Atlas's default configuration points at: SDK game servers with their control
endpoint on ``/atlas/control``, whose players can ``/move`` between them. Ctrl-C stops all three.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from functools import partial

import trio

from atlas.demo import serve_demo_cluster

NEXT_STEPS = """
Now, in a second terminal, start Atlas in front of the cluster (the default config balances
clients over these three servers):

    python -m atlas serve

and in a third terminal connect a client through Atlas:

    python -m atlas client ws://127.0.0.1:9000

Type a line and press Enter to send it. /server names the server you landed on and /who lists
the players there; /nick NAME renames you, /me shows your name and how many messages you sent,
and /move game-server-2 moves you to that server over the same connection, name and count
included. Ctrl-D disconnects the client; Ctrl-C here stops the cluster.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run a local cluster of demo game servers.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument(
        "--ports",
        type=int,
        nargs="+",
        default=[8080, 8081, 8082],
        help="one port per server; the first is the echo server (default: 8080 8081 8082)",
    )
    return parser.parse_args(argv)


async def main(args: argparse.Namespace) -> int:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            try:
                ports = await nursery.start(partial(serve_demo_cluster, args.host, args.ports))
            except OSError as exc:
                print(f"error: {exc.strerror or exc}", file=sys.stderr)
                return 1
            for index, port in enumerate(ports):
                kind = "echo" if index == 0 else "chat"
                print(f"game-server-{index + 1} ({kind}) on ws://{args.host}:{port}")
            print(NEXT_STEPS, flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sys.exit(trio.run(main, parse_args()))
