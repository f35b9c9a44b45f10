"""Transfers under load: clients streaming at game-tick rate while Atlas moves them around.

    python benchmarks/transfer_load.py                  # 200 clients x 20 Hz, 1,000 transfers, SDK servers
    python benchmarks/transfer_load.py --servers plain       # the same among plain (blind) backends
    python benchmarks/transfer_load.py --mass 1000           # then: 1,000 idle clients moved at once

Atlas and three game servers run in this process; the clients run in a child process (so they do not
compete with Atlas for this process's time). Each client sends numbered messages; with SDK servers the
server answers ``seq:count:server`` where ``count`` is the player's message counter, which moves with
the player, so any loss, duplicate, reordering or lost state shows; with plain backends the server echoes
and records, per client, what it received. Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import random
import subprocess
import sys
import time
from collections import defaultdict
from typing import Any

import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

from atlas.config import AdminConfig, Config, ProxyConfig, ServerConfig, SkimConfig, TransferConfig
from atlas.control.coordinator import TransferOutcome, TransferRefused
from atlas.control.lifecycle import TransferReason
from atlas.sdk import GameServer, Player
from atlas.supervisor import AtlasStarted, serve_atlas


class CounterGame(GameServer):
    async def on_connect(self, player: Player) -> None:
        player.data["count"] = 0

    async def on_message(self, player: Player, message: str | bytes) -> None:
        player.data["count"] += 1
        await player.send(f"{message!s}:{player.data['count']}:{self.name}")

    async def on_transfer_out(self, player: Player) -> Any:
        return {"count": player.data["count"]}

    async def on_transfer_in(self, player: Player, state: Any) -> None:
        player.data["count"] = state["count"]


class PlainRecorder:
    def __init__(self) -> None:
        # Per client, one list per link in the order the links opened (see tests/test_transfer_e2e.py).
        self.links: dict[str, list[list[str]]] = defaultdict(list)

    def handler_for(self, name: str) -> Any:
        async def handler(request: WebSocketRequest) -> None:
            headers = {k.lower(): v for k, v in request.headers}
            client = headers.get(b"x-atlas-client-id", b"").decode()
            received: list[str] = []
            if client:
                self.links[client].append(received)
            ws = await request.accept()
            with contextlib.suppress(ConnectionClosed):
                while True:
                    message = await ws.get_message()
                    received.append(str(message))
                    # After Atlas's Close a send fails, yet earlier messages can still be read.
                    with contextlib.suppress(ConnectionClosed):
                        await ws.send_message(f"{message!s}:0:{name}")

        return handler


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# -- the client process -----------------------------------------------------------------------------


async def clients_main(url: str, count: int, rate: float, seconds: float) -> None:
    """Stream numbered messages from ``count`` clients for ``seconds``; print one JSON report."""
    reports: list[dict[str, Any]] = []

    async def one(n: int) -> None:
        sent = 0
        got: list[tuple[int, int, str, float]] = []
        sent_at: dict[int, float] = {}
        closed = False
        try:
            async with open_websocket_url(url) as ws:

                async def reader(ws: WebSocketConnection) -> None:
                    while True:
                        message = await ws.get_message()
                        seq, cnt, server = str(message).split(":")
                        got.append((int(seq), int(cnt), server, trio.current_time()))

                async with trio.open_nursery() as inner:
                    inner.start_soon(reader, ws)
                    await trio.sleep(random.random() / rate)
                    deadline = trio.current_time() + seconds
                    while trio.current_time() < deadline:
                        sent_at[sent] = trio.current_time()
                        await ws.send_message(str(sent))
                        sent += 1
                        await trio.sleep(1 / rate)
                    with trio.move_on_after(5):
                        while len(got) < sent:  # noqa: ASYNC110 - the last answers are in flight
                            await trio.sleep(0.01)
                    inner.cancel_scope.cancel()
        except ConnectionClosed:
            closed = True
        seqs = [g[0] for g in got]
        rtts = [g[3] - sent_at[g[0]] for g in got if g[0] in sent_at]
        switch_rtts = [
            got[i][3] - sent_at[got[i][0]] for i in range(1, len(got)) if got[i][2] != got[i - 1][2]
        ]
        reports.append(
            {
                "sent": sent,
                "received": len(got),
                "lost": len(set(range(sent)) - set(seqs)),
                "duplicated": len(seqs) - len(set(seqs)),
                "reordered": sum(1 for a, b in itertools.pairwise(seqs) if b < a),
                "state_errors": sum(1 for g in got if g[1] not in (0, g[0] + 1)),
                "switches": sum(1 for a, b in itertools.pairwise(got) if a[2] != b[2]),
                "closed": closed,
                "rtt": rtts,
                "switch_rtt": switch_rtts,
            }
        )

    async with trio.open_nursery() as nursery:
        for n in range(count):
            nursery.start_soon(one, n)
            await trio.sleep(0.002)
    rtts = [r for report in reports for r in report.pop("rtt")]
    switch_rtts = [r for report in reports for r in report.pop("switch_rtt")]
    summary = {key: sum(r[key] for r in reports) for key in ("sent", "received", "lost", "duplicated")}
    summary |= {
        key: sum(r[key] for r in reports) for key in ("reordered", "state_errors", "switches", "closed")
    }
    summary["rtt_ms"] = {q: round(pct(rtts, p) * 1000, 2) for q, p in (("p50", 0.5), ("p99", 0.99))}
    summary["first_reply_after_switch_ms"] = {
        q: round(pct(switch_rtts, p) * 1000, 2) for q, p in (("p50", 0.5), ("p99", 0.99))
    }
    print(json.dumps(summary), flush=True)


# -- the game-server process --------------------------------------------------------------------------


async def servers_main(kind: str) -> None:
    """Run three game servers; print their ports as one JSON line; run until stdin closes."""
    recorder = PlainRecorder()
    async with trio.open_nursery() as nursery:
        ports = []
        for i in range(3):
            name = f"gs-{i + 1}"
            if kind == "sdk":
                ports.append(await nursery.start(CounterGame(name, capacity=100_000).serve))
            else:
                server = await nursery.start(
                    serve_websocket, recorder.handler_for(name), "127.0.0.1", 0, None
                )
                ports.append(server.port)
        print(json.dumps(ports), flush=True)
        stdin = trio.lowlevel.FdStream(0)
        while await stdin.receive_some():
            pass  # until the parent closes our stdin
        if kind == "plain":
            # Every client message reached exactly one backend, in order (the recorder saw them all).
            errors = sum(
                1
                for links in recorder.links.values()
                if [int(m) for link in links for m in link] != list(range(sum(map(len, links))))
            )
            bad = []
            for client, links in recorder.links.items():
                flat = [int(m) for link in links for m in link]
                if flat != list(range(len(flat))):
                    where = next(i for i, m in enumerate(flat) if m != i)
                    sizes = [len(link) for link in links]
                    bad.append(
                        {
                            "client": client,
                            "at": where,
                            "around": flat[max(0, where - 3) : where + 4],
                            "links": sizes[:12],
                        }
                    )
            print(json.dumps({"plain_backend_order_errors": errors, "examples": bad[:3]}), flush=True)
        nursery.cancel_scope.cancel()


# -- the Atlas process ----------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> int:
    games = await trio.lowlevel.open_process(
        [sys.executable, __file__, "--servers-child", args.servers],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
    )
    assert games.stdout is not None and games.stdin is not None
    line = b""
    with trio.fail_after(30):
        while b"\n" not in line:
            line += await games.stdout.receive_some()
    ports = json.loads(line.split(b"\n")[0])
    async with trio.open_nursery() as nursery:
        servers: list[ServerConfig] = []
        for i, port in enumerate(ports):
            name = f"gs-{i + 1}"
            if args.servers == "sdk":
                servers.append(
                    ServerConfig(
                        name=name,
                        url=f"ws://127.0.0.1:{port}/play",
                        control_url=f"ws://127.0.0.1:{port}/atlas/control",
                        capacity=100_000,
                    )
                )
            else:
                servers.append(ServerConfig(name=name, url=f"ws://127.0.0.1:{port}", capacity=100_000))
        config = Config(
            proxy=ProxyConfig(listen="127.0.0.1:0", max_connections=100_000),
            admin=AdminConfig(listen="127.0.0.1:0"),
            servers=tuple(servers),
            transfer=TransferConfig(timeout=5.0),
            skim=SkimConfig(enabled=not args.no_skim),
        )
        atlas: AtlasStarted = await nursery.start(serve_atlas, config)
        if args.servers == "sdk":
            for _ in range(1000):
                if all(atlas.transfers.channels.get(s.name) for s in servers):
                    break
                await trio.sleep(0.01)
        url = f"ws://127.0.0.1:{atlas.proxy.port}/play"
        outcomes: list[TransferOutcome] = []
        report: dict[str, Any] = {}
        if args.clients:
            child = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    url,
                    str(args.clients),
                    str(args.rate),
                    str(args.seconds),
                ],
                stdout=subprocess.PIPE,
            )
            assert child.stdout is not None
            for _ in range(3000):  # wait (bounded) for the clients to connect
                if len(atlas.runtime.clients) >= args.clients:
                    break
                await trio.sleep(0.01)
            names = [s.name for s in servers]
            rng = random.Random(1)
            started = time.perf_counter()
            interval = (args.seconds - 2) / max(1, args.transfers)

            async def one_transfer() -> None:
                idle = [s for s in atlas.runtime.clients if s.client_id not in atlas.transfers.active]
                if not idle:
                    return
                session = rng.choice(idle)
                target = rng.choice([n for n in names if n != session.link.backend.name])
                with contextlib.suppress(TransferRefused):
                    outcomes.append(
                        await atlas.transfers.transfer(session.client_id, target, TransferReason.ADMIN)
                    )

            async with trio.open_nursery() as movers:
                for _ in range(args.transfers):
                    movers.start_soon(one_transfer)
                    await trio.sleep(interval)
            moving_time = time.perf_counter() - started
            output = b""
            with trio.fail_after(args.seconds + 60):
                while chunk := await child.stdout.receive_some():
                    output += chunk
                await child.wait()
            report = json.loads(output.decode().strip().splitlines()[-1])
            report["transfers_asked"] = args.transfers
            report["transfers_committed"] = sum(o.committed for o in outcomes)
            report["transfers_rolled_back"] = [o.failure for o in outcomes if not o.committed][:5]
            report["transfer_window_s"] = round(moving_time, 2)
            durations = [o.duration for o in outcomes if o.committed]
            holds = [o.hold for o in outcomes if o.committed and o.hold is not None]
            report["transfer_duration_ms"] = {
                q: round(pct(durations, p) * 1000, 2) for q, p in (("p50", 0.5), ("p99", 0.99))
            }
            report["hold_ms"] = {q: round(pct(holds, p) * 1000, 2) for q, p in (("p50", 0.5), ("p99", 0.99))}
        if args.mass:
            report["mass"] = await mass_move(atlas, url, args.mass, [s.name for s in servers])
        nursery.cancel_scope.cancel()
    await games.stdin.aclose()  # the game servers report (plain: per-client order) and exit
    rest = b""
    with trio.move_on_after(30):
        while chunk := await games.stdout.receive_some():
            rest += chunk
    for extra in rest.decode().split("\n"):
        if extra.strip():
            report |= json.loads(extra)
    with trio.move_on_after(10):
        await games.wait()
    if games.returncode is None:
        games.kill()
    print(json.dumps(report, indent=1))
    return 0


async def mass_move(atlas: AtlasStarted, url: str, count: int, names: list[str]) -> dict[str, Any]:
    """Connect ``count`` idle clients to the first server, then move them all to the second at once."""
    first, second = names[0], names[1]
    for name in names[1:]:
        atlas.runtime.drain_backend(name)  # new clients all land on the first server
    ready = trio.Event()
    done = trio.Event()
    connected = 0

    async def idle_client() -> None:
        nonlocal connected
        async with open_websocket_url(url):
            connected += 1
            if connected == count:
                ready.set()
            await done.wait()

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(idle_client)
        with trio.fail_after(120):
            await ready.wait()
        for name in names[1:]:
            backend = atlas.runtime.pool.get(name)
            assert backend is not None
            atlas.runtime.health.backend_resumed(backend)
        sessions = [s for s in atlas.runtime.clients if s.link.backend.name == first]
        started = time.perf_counter()
        outcomes: list[TransferOutcome] = []

        async def move(client_id: str) -> None:
            with contextlib.suppress(TransferRefused):
                outcomes.append(await atlas.transfers.transfer(client_id, second, TransferReason.MAINTENANCE))

        async with trio.open_nursery() as movers:
            for session in sessions:
                movers.start_soon(move, session.client_id)
        elapsed = time.perf_counter() - started
        done.set()
    holds = [o.hold for o in outcomes if o.committed and o.hold is not None]
    return {
        "clients": len(sessions),
        "committed": sum(o.committed for o in outcomes),
        "seconds": round(elapsed, 3),
        "hold_ms": {q: round(pct(holds, p) * 1000, 2) for q, p in (("p50", 0.5), ("p99", 0.99))},
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--servers-child":
        trio.run(servers_main, sys.argv[2])
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        url, count, rate, seconds = sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
        trio.run(clients_main, url, count, rate, seconds)
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", choices=["sdk", "plain"], default="sdk")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--transfers", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the clients stream")
    parser.add_argument("--mass", type=int, default=0, help="then move this many idle clients at once")
    parser.add_argument("--no-skim", action="store_true")
    sys.exit(trio.run(main, parser.parse_args()))
