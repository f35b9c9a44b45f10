"""Failover end to end: a backend *process* is killed under live clients, over real sockets."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from atlas.config import AdminConfig, Config, ProxyConfig, ServerConfig
from atlas.supervisor import AtlasStarted, serve_atlas
from tests.wsclient import until

ECHO_SERVER = Path(__file__).resolve().parent.parent / "examples" / "echo_server.py"


@asynccontextmanager
async def echo_process(name: str) -> AsyncIterator[tuple[trio.Process, int]]:
    """An echo backend in its own process; yields it and its port once it reports listening."""
    process = await trio.lowlevel.open_process(
        [sys.executable, str(ECHO_SERVER), "--port", "0", "--name", name],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    try:
        line = b""
        with trio.fail_after(30):
            while b"\n" not in line:
                chunk = await process.stdout.receive_some()
                assert chunk, "the echo server exited before listening"
                line += chunk
        # "<name> (echo) listening on ws://127.0.0.1:<port>"
        port = int(line.split(b"\n")[0].rsplit(b":", 1)[1])
        yield process, port
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(10):
            await process.wait()
        await process.stdout.aclose()


async def test_backend_killed_under_200_clients_every_client_moves_nothing_lost() -> None:
    clients, before, after = 200, 5, 5
    async with (
        echo_process("gs-1") as (victim, port1),
        echo_process("gs-2") as (_, port2),
        echo_process("gs-3") as (_, port3),
    ):
        config = Config(
            proxy=ProxyConfig(listen="127.0.0.1:0"),
            admin=AdminConfig(listen="127.0.0.1:0"),
            servers=tuple(
                ServerConfig(name=f"gs-{i + 1}", url=f"ws://127.0.0.1:{port}", capacity=1000)
                for i, port in enumerate((port1, port2, port3))
            ),
        )
        async with trio.open_nursery() as nursery:
            atlas: AtlasStarted = await nursery.start(serve_atlas, config)
            url = f"ws://127.0.0.1:{atlas.proxy.port}/"
            pool = atlas.runtime.pool
            phase_one_done = trio.Semaphore(0)
            killed = trio.Event()
            echoes: dict[int, list[str]] = {}
            connections: list[WebSocketConnection] = []

            async def exchange(ws: WebSocketConnection, n: int, rounds: range) -> None:
                for i in rounds:
                    await ws.send_message(f"{n}:{i}")
                    with trio.fail_after(20):
                        message = await ws.get_message()
                    assert isinstance(message, str)
                    echoes[n].append(message)

            async def client(n: int) -> None:
                echoes[n] = []
                async with open_websocket_url(url) as ws:
                    connections.append(ws)
                    await exchange(ws, n, range(before))
                    phase_one_done.release()
                    await killed.wait()
                    await exchange(ws, n, range(before, before + after))
                    assert not ws.closed

            with trio.fail_after(120):
                async with trio.open_nursery() as clients_nursery:
                    for n in range(clients):
                        clients_nursery.start_soon(client, n)
                    for _ in range(clients):
                        await phase_one_done.acquire()
                    on_victim = pool.get("gs-1")
                    assert on_victim is not None
                    moved = on_victim.connections
                    assert moved >= clients // 4
                    victim.send_signal(signal.SIGKILL)
                    await until(lambda: on_victim.connections == 0)
                    killed.set()
            with trio.fail_after(10):
                await atlas.runtime.clients.wait_empty()
            assert [b.connections for b in pool] == [0, 0, 0]  # everyone has left cleanly
            registry = atlas.runtime.metrics.registry
            assert registry.get_sample_value("atlas_failovers_total", {"outcome": "moved"}) == moved
            # Each failover ran through the transfer coordinator, as a transfer with reason failover.
            failovers = {"reason": "failover", "outcome": "committed"}
            assert registry.get_sample_value("atlas_transfers_total", failovers) == moved
            nursery.cancel_scope.cancel()
    assert len(connections) == clients
    for n, got in echoes.items():
        assert got == [f"{n}:{i}" for i in range(before + after)], n
