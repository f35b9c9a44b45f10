"""Transfers end to end over real sockets: clients stream numbered messages while they are moved around."""

from __future__ import annotations

import contextlib
import random
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from atlas.config import AdminConfig, Config, ProxyConfig, ServerConfig, TransferConfig
from atlas.control.coordinator import TransferOutcome, TransferRefused
from atlas.control.lifecycle import TransferReason
from atlas.supervisor import AtlasStarted, serve_atlas
from tests.wsclient import open_ws, stream_numbered, websocket_servers


class Recorder:
    """Plain backends (no control channel) that echo and record what each client sent them."""

    def __init__(self) -> None:
        # Per client, one list per backend link, in the order the links were opened: messages on different
        # links are processed concurrently here, so only the links' concatenation has a meaningful order.
        self.links: dict[str, list[list[str]]] = defaultdict(list)
        self.transfer_links = 0

    async def handler(self, request: WebSocketRequest) -> None:
        headers = {k.lower(): v for k, v in request.headers}
        if b"x-atlas-client-id" not in headers:  # Atlas's health probe
            ws = await request.accept()
            with contextlib.suppress(ConnectionClosed):
                await ws.get_message()
            return
        client = headers[b"x-atlas-client-id"].decode()
        if b"x-atlas-transfer" in headers:
            self.transfer_links += 1
        received: list[str] = []
        self.links[client].append(received)
        ws = await request.accept()
        with contextlib.suppress(ConnectionClosed):
            while True:
                message = await ws.get_message()
                assert isinstance(message, str)
                received.append(message)
                # A send fails once Atlas's Close (the cut) has arrived, but messages that came before the
                # Close can still be read: keep reading until get_message says the connection is closed.
                with contextlib.suppress(ConnectionClosed):
                    await ws.send_message(message)

    def received(self, client: str) -> list[str]:
        """What the client's links carried, link after link."""
        return [message for link in self.links[client] for message in link]

    @asynccontextmanager
    async def servers(self, count: int) -> AsyncIterator[list[int]]:
        async with websocket_servers(self.handler, count) as ports:
            yield ports


async def test_blind_transfers_under_streaming_lose_duplicate_and_reorder_nothing() -> None:
    clients, transfers, rate = 40, 200, 50.0
    recorder = Recorder()
    async with recorder.servers(3) as ports:
        config = Config(
            proxy=ProxyConfig(listen="127.0.0.1:0"),
            admin=AdminConfig(listen="127.0.0.1:0"),
            servers=tuple(
                ServerConfig(name=f"gs-{i + 1}", url=f"ws://127.0.0.1:{port}") for i, port in enumerate(ports)
            ),
            transfer=TransferConfig(timeout=5.0),
        )
        async with trio.open_nursery() as nursery:
            atlas: AtlasStarted = await nursery.start(serve_atlas, config)
            url = f"ws://127.0.0.1:{atlas.proxy.port}/"
            sent: dict[int, int] = {}
            echoed: dict[int, list[str]] = {}
            ids: dict[int, str] = {}
            connected = trio.Semaphore(0)
            stop = trio.Event()
            outcomes: list[TransferOutcome] = []

            async def client(n: int, ws: WebSocketConnection) -> None:
                echoed[n] = []
                sent[n] = await stream_numbered(
                    ws,
                    label=lambda i: f"{n}:{i}",
                    received=echoed[n],
                    stop=stop,
                    rate=rate,
                    wait_for_answers=False,  # a blind cut may drop the source's last answers
                )

            async def run_client(n: int) -> None:
                async with open_ws(url) as ws:
                    peer = f"127.0.0.1:{ws.local.port}"  # type: ignore[union-attr]
                    (session,) = [s for s in atlas.runtime.clients if s.peer == peer]
                    ids[n] = session.client_id
                    connected.release()
                    await client(n, ws)

            with trio.fail_after(120):
                async with trio.open_nursery() as clients_nursery:
                    for n in range(clients):
                        clients_nursery.start_soon(run_client, n)
                        await connected.acquire()
                    rng = random.Random(7)
                    names = [f"gs-{i + 1}" for i in range(3)]

                    async def one_transfer() -> None:
                        idle = [n for n in range(clients) if ids[n] not in atlas.transfers.active]
                        if not idle:
                            return
                        n = rng.choice(idle)
                        session = atlas.runtime.clients.get(ids[n])
                        assert session is not None
                        target = rng.choice([x for x in names if x != session.link.backend.name])
                        with contextlib.suppress(TransferRefused):  # already moving: pick another
                            outcomes.append(
                                await atlas.transfers.transfer(ids[n], target, TransferReason.ADMIN)
                            )

                    async with trio.open_nursery() as movers:
                        for _ in range(transfers):
                            movers.start_soon(one_transfer)
                            await trio.sleep(0.002)
                    stop.set()
            with trio.fail_after(10):
                await atlas.runtime.clients.wait_empty()
            nursery.cancel_scope.cancel()
    committed = [o for o in outcomes if o.committed]
    assert len(committed) >= transfers * 0.8  # the rest were refused: that client was already moving
    assert all(o.committed for o in outcomes), [(o.failure, o.phase) for o in outcomes if not o.committed]
    assert recorder.transfer_links == len(committed)
    for n in range(clients):
        # Guarantee 2: every client message reached exactly one backend, in order, none lost.
        assert recorder.received(ids[n]) == [f"{n}:{i}" for i in range(sent[n])], n
        # Guarantee 3: the client sees echoes in order, never twice (a blind cut may drop the
        # source's replies that were still in flight: the source cannot be told where the cut is).
        got = [int(m.split(":")[1]) for m in echoed[n]]
        assert got == sorted(set(got)), n
