"""Transfers between Atlas-aware game servers (the SDK) under streaming traffic, over real sockets.

A counter game: every message a player sends increments its counter, and the server answers with the
message's sequence number and the counter. The counter lives in the server that owns the player and moves
with it (``on_transfer_out`` / ``on_transfer_in``), so after any number of moves each answer must say
``seq:count`` with ``count == seq + 1``: nothing lost, nothing duplicated, nothing reordered, state intact.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import WebSocketConnection

from atlas.config import AdminConfig, Config, ProxyConfig, ServerConfig, TransferConfig
from atlas.control.coordinator import TransferOutcome, TransferRefused
from atlas.control.lifecycle import TransferReason
from atlas.sdk import GameServer, Player
from atlas.supervisor import AtlasStarted, serve_atlas
from tests.wsclient import open_ws, stream_numbered, until


class CounterGame(GameServer):
    """Counts each player's messages; the count travels with the player."""

    async def on_connect(self, player: Player) -> None:
        player.data["count"] = 0

    async def on_message(self, player: Player, message: str | bytes) -> None:
        player.data["count"] += 1
        await player.send(f"{message!s}:{player.data['count']}:{self.name}")

    async def on_transfer_out(self, player: Player) -> Any:
        return {"count": player.data["count"]}

    async def on_transfer_in(self, player: Player, state: Any) -> None:
        player.data["count"] = state["count"]


@asynccontextmanager
async def game_cluster(count: int) -> AsyncIterator[list[tuple[CounterGame, int]]]:
    async with trio.open_nursery() as nursery:
        servers = []
        for i in range(count):
            game = CounterGame(f"gs-{i + 1}")
            port = await nursery.start(game.serve)
            servers.append((game, port))
        yield servers
        nursery.cancel_scope.cancel()


async def test_sdk_transfers_keep_every_message_and_the_player_state() -> None:
    clients, transfers, rate = 30, 150, 50.0
    async with game_cluster(3) as servers:
        config = Config(
            proxy=ProxyConfig(listen="127.0.0.1:0"),
            admin=AdminConfig(listen="127.0.0.1:0"),
            servers=tuple(
                ServerConfig(
                    name=game.name,
                    url=f"ws://127.0.0.1:{port}/play",
                    control_url=f"ws://127.0.0.1:{port}/atlas/control",
                )
                for game, port in servers
            ),
            transfer=TransferConfig(timeout=5.0),
        )
        async with trio.open_nursery() as nursery:
            atlas: AtlasStarted = await nursery.start(serve_atlas, config)
            channels = atlas.transfers.channels
            await until(lambda: all(channels.get(game.name) for game, _ in servers))
            url = f"ws://127.0.0.1:{atlas.proxy.port}/play"
            ids: dict[int, str] = {}
            answers: dict[int, list[str]] = {}
            sent: dict[int, int] = {}
            stop = trio.Event()
            connected = trio.Semaphore(0)
            outcomes: list[TransferOutcome] = []

            async def stream(n: int, ws: WebSocketConnection) -> None:
                answers[n] = []
                sent[n] = await stream_numbered(
                    ws, label=str, received=answers[n], stop=stop, rate=rate, wait_for_answers=True
                )

            async def run_client(n: int) -> None:
                async with open_ws(url) as ws:
                    peer = f"127.0.0.1:{ws.local.port}"  # type: ignore[union-attr]
                    (session,) = [s for s in atlas.runtime.clients if s.peer == peer]
                    ids[n] = session.client_id
                    connected.release()
                    await stream(n, ws)

            with trio.fail_after(120):
                async with trio.open_nursery() as clients_nursery:
                    for n in range(clients):
                        clients_nursery.start_soon(run_client, n)
                        await connected.acquire()
                    rng = random.Random(11)
                    names = [game.name for game, _ in servers]

                    async def one_transfer() -> None:
                        idle = [n for n in range(clients) if ids[n] not in atlas.transfers.active]
                        if not idle:
                            return
                        n = rng.choice(idle)
                        session = atlas.runtime.clients.get(ids[n])
                        assert session is not None
                        target = rng.choice([x for x in names if x != session.link.backend.name])
                        with contextlib.suppress(TransferRefused):
                            outcome = await atlas.transfers.transfer(ids[n], target, TransferReason.ADMIN)
                            outcomes.append(outcome)

                    async with trio.open_nursery() as movers:
                        for _ in range(transfers):
                            movers.start_soon(one_transfer)
                            await trio.sleep(0.005)
                    stop.set()
            with trio.fail_after(10):
                await atlas.runtime.clients.wait_empty()
            nursery.cancel_scope.cancel()
    committed = [o for o in outcomes if o.committed]
    assert committed, [o.failure for o in outcomes][:5]
    assert all(not o.blind for o in outcomes)
    assert len(committed) >= len(outcomes) * 0.9, [o.failure for o in outcomes if not o.committed][:5]
    for n in range(clients):
        seqs = [int(a.split(":")[0]) for a in answers[n]]
        counts = [int(a.split(":")[1]) for a in answers[n]]
        assert seqs == list(range(sent[n])), n
        assert counts == [s + 1 for s in seqs], n
