"""A game server's ``load`` reports steer the balancer: ``accepting: false`` takes it out of rotation."""

from __future__ import annotations

import trio

from atlas.config import AdminConfig, Config, ProxyConfig, ServerConfig
from atlas.control.coordinator import TransferRefused
from atlas.control.lifecycle import TransferReason
from atlas.pool import Backend, BackendPool, LeastConnections
from atlas.sdk import GameServer, Player
from atlas.supervisor import AtlasStarted, serve_atlas
from tests.wsclient import open_ws, until


class Echo(GameServer):
    """Answers every message with its own name."""

    async def on_message(self, player: Player, message: str | bytes) -> None:
        await player.send(self.name)


def test_a_server_that_is_not_accepting_is_not_available() -> None:
    pool = BackendPool(LeastConnections())
    busy, free = Backend.from_url("busy", "ws://h:1"), Backend.from_url("free", "ws://h:2")
    pool.add(busy)
    pool.add(free)
    pool.acquire(free)  # least connections would pick "busy"...
    busy.accepting = False
    assert not busy.available
    assert pool.choose() is free  # ...but it said it takes no new players


async def test_accepting_false_in_a_load_report_keeps_new_clients_and_transfers_away() -> None:
    async with trio.open_nursery() as nursery:
        games = [Echo(f"gs-{i}", load_interval=0.05) for i in (1, 2)]
        ports = [await nursery.start(game.serve) for game in games]
        config = Config(
            proxy=ProxyConfig(listen="127.0.0.1:0"),
            admin=AdminConfig(listen="127.0.0.1:0"),
            servers=tuple(
                ServerConfig(
                    name=game.name,
                    url=f"ws://127.0.0.1:{port}/play",
                    control_url=f"ws://127.0.0.1:{port}/atlas/control",
                )
                for game, port in zip(games, ports, strict=True)
            ),
        )
        atlas: AtlasStarted = await nursery.start(serve_atlas, config)
        pool = atlas.runtime.pool
        gs1 = pool.get("gs-1")
        assert gs1 is not None
        await until(lambda: all(atlas.transfers.channels.get(game.name) for game in games))
        games[0].accepting = False
        await until(lambda: not gs1.accepting)
        url = f"ws://127.0.0.1:{atlas.proxy.port}/play"
        for _ in range(4):
            async with open_ws(url) as ws:
                await ws.send_message("hi")
                assert await ws.get_message() == "gs-2"
        await until(lambda: len(atlas.runtime.clients) == 0)
        async with open_ws(url) as ws:
            await ws.send_message("hi")
            assert await ws.get_message() == "gs-2"
            (client,) = list(atlas.runtime.clients)
            try:
                atlas.transfers.request(client.client_id, "gs-1", TransferReason.ADMIN)
            except TransferRefused as exc:
                assert str(exc) == "gs-1 cannot take a client now (not accepting new players)"
            else:
                raise AssertionError("a transfer to a server that is not accepting was started")
            games[0].accepting = True
            await until(lambda: gs1.accepting)
            outcome = await atlas.transfers.transfer(client.client_id, "gs-1", TransferReason.ADMIN)
            assert outcome.committed
            await ws.send_message("hi")
            assert await ws.get_message() == "gs-1"
        nursery.cancel_scope.cancel()
