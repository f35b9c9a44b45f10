"""Cross-server relay and object handoff: Atlas's routing and the SDK's hooks, over real sockets.

Three SDK game servers own three regions of a world laid out along x (gs-1 holds x in [0, 100),
gs-2 [100, 200), gs-3 [200, 300)); Atlas (``serve_atlas``) routes between their control channels. Some
tests add servers Atlas cannot relay to (no control channel, a channel that never comes up, a server
without the ``relay`` capability) or a *mute* server that welcomes Atlas and then never answers. A few
play Atlas's part by hand against one SDK server (``tests.test_sdk``'s fake Atlas), and the sans-IO
parts (addressing, the handoff table) run without sockets.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
import trio_websocket

from atlas.config import (
    AdminConfig,
    Config,
    ProxyConfig,
    RegionConfig,
    ServerConfig,
    TransferConfig,
    WorldConfig,
)
from atlas.control import messages as wire
from atlas.control.channel import ControlChannels
from atlas.control.lifecycle import TransferReason
from atlas.control.relay import (
    HANDOFF_TRANSITIONS,
    Delivery,
    HandoffPhase,
    HandoffRecord,
    IllegalHandoff,
    Undelivered,
    _AtlasDirectory,
    address,
    plan_handoff,
)
from atlas.runtime import Runtime
from atlas.sdk import (
    GameServer,
    HandoffRejected,
    ObjectOffer,
    RelayMessage,
    RelayUnavailable,
    Undeliverable,
)
from atlas.supervisor import AtlasStarted, serve_atlas
from tests.test_sdk import link_headers, open_control, serving
from tests.test_sdk import open_ws as open_link
from tests.wsclient import open_ws, until

STEP = 10.0
"""Generous bound for one test step; nothing here should come close."""


class WorldGame(GameServer):
    """Records what other servers send it; keeps the objects it is handed in ``objects``."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self._relays, self.relays = trio.open_memory_channel[RelayMessage](math.inf)
        self._undeliverable, self.undeliverable = trio.open_memory_channel[Undeliverable](math.inf)
        self._offers, self.offers = trio.open_memory_channel[ObjectOffer](math.inf)
        self._withdrawn, self.withdrawn = trio.open_memory_channel[tuple[ObjectOffer, str]](math.inf)
        self.objects: dict[str, Any] = {}
        self.take_objects = True
        self.gate = trio.Event()
        self.gate.set()  # on_object_offer waits for it before deciding
        self.fail_offers = False

    async def on_relay(self, message: RelayMessage) -> None:
        self._relays.send_nowait(message)

    async def on_relay_undeliverable(self, notice: Undeliverable) -> None:
        self._undeliverable.send_nowait(notice)

    async def on_object_offer(self, offer: ObjectOffer) -> bool:
        self._offers.send_nowait(offer)
        await self.gate.wait()
        if self.fail_offers:
            raise RuntimeError("cannot take it")
        if not self.take_objects:
            return False
        self.objects[offer.object] = offer.state
        return True

    async def on_object_withdrawn(self, offer: ObjectOffer, reason: str) -> None:
        self.objects.pop(offer.object, None)
        self._withdrawn.send_nowait((offer, reason))


async def next_of(channel: trio.MemoryReceiveChannel[Any]) -> Any:
    with trio.fail_after(STEP):
        return await channel.receive()


REGIONS = (
    RegionConfig(id="r1", owner="gs-1", min=(0, 0, 0), max=(100, 100, 100)),
    RegionConfig(id="r2", owner="gs-2", min=(100, 0, 0), max=(200, 100, 100)),
    RegionConfig(id="r3", owner="gs-3", min=(200, 0, 0), max=(300, 100, 100)),
)


@asynccontextmanager
async def world(
    *,
    extra: Sequence[ServerConfig] = (),
    regions: Sequence[RegionConfig] = (),
    transfer_timeout: float = 5.0,
    wait_for: Sequence[str] = (),
) -> AsyncIterator[tuple[AtlasStarted, list[WorldGame]]]:
    """Three SDK servers behind a real Atlas, every control channel up (and those of ``wait_for``)."""
    games = [WorldGame(f"gs-{i}") for i in (1, 2, 3)]
    async with trio.open_nursery() as nursery:
        ports = [await nursery.start(game.serve) for game in games]
        config = Config(
            proxy=ProxyConfig(listen="127.0.0.1:0"),
            admin=AdminConfig(listen="127.0.0.1:0"),
            servers=(
                *(
                    ServerConfig(
                        name=game.name,
                        url=f"ws://127.0.0.1:{port}/play",
                        control_url=f"ws://127.0.0.1:{port}/atlas/control",
                    )
                    for game, port in zip(games, ports, strict=True)
                ),
                *extra,
            ),
            transfer=TransferConfig(timeout=transfer_timeout),
            world=WorldConfig(regions=(*REGIONS, *regions)),
        )
        atlas: AtlasStarted = await nursery.start(serve_atlas, config)
        channels = atlas.transfers.channels
        names = [game.name for game in games] + list(wait_for)
        await until(lambda: all(channels.get(name) for name in names))
        yield atlas, games
        nursery.cancel_scope.cancel()


class Mute:
    """A fake game server: it welcomes Atlas (with ``capabilities``), records what Atlas sends, and
    answers nothing unless told to."""

    def __init__(self, capabilities: Sequence[str]) -> None:
        self.capabilities = list(capabilities)
        self._received, self.received = trio.open_memory_channel[wire.AtlasMessage](math.inf)
        self.control: trio_websocket.WebSocketConnection | None = None

    async def handler(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            if request.path != "/atlas/control":
                await ws.get_message()  # a data link or a health probe: hold it until it closes
                return
            wire.decode_from_atlas(await ws.get_message())  # hello
            welcome = wire.Welcome(version=1, server="mute", capabilities=self.capabilities)
            await ws.send_message(wire.encode(welcome))
            self.control = ws
            while True:
                self._received.send_nowait(wire.decode_from_atlas(await ws.get_message()))
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            await trio.aclose_forcefully(ws._stream)

    async def send(self, message: wire.ServerMessage) -> None:
        assert self.control is not None
        await self.control.send_message(wire.encode(message))

    async def expect(self, kind: type[Any]) -> Any:
        message = await next_of(self.received)
        assert isinstance(message, kind), message
        return message


@asynccontextmanager
async def mute_server(name: str, capabilities: Sequence[str]) -> AsyncIterator[tuple[Mute, ServerConfig]]:
    mute = Mute(capabilities)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, mute.handler, "127.0.0.1", 0, None)
        port = server.port
        yield (
            mute,
            ServerConfig(
                name=name,
                url=f"ws://127.0.0.1:{port}/play",
                control_url=f"ws://127.0.0.1:{port}/atlas/control",
            ),
        )
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def client_on(
    atlas: AtlasStarted, server: str
) -> AsyncIterator[tuple[str, trio_websocket.WebSocketConnection]]:
    """A client connected through Atlas and moved to ``server``; yields its id and its WebSocket."""
    async with open_ws(f"ws://127.0.0.1:{atlas.proxy.port}/play") as ws:
        peer = f"127.0.0.1:{ws.local.port}"  # type: ignore[union-attr]
        await until(lambda: any(s.peer == peer for s in atlas.runtime.clients))
        (session,) = [s for s in atlas.runtime.clients if s.peer == peer]
        if session.link.backend.name != server:
            await move(atlas, session.client_id, server)
        yield session.client_id, ws


async def move(atlas: AtlasStarted, client: str, server: str) -> None:
    with trio.fail_after(STEP):
        outcome = await atlas.transfers.transfer(client, server, TransferReason.ADMIN)
    assert outcome.committed, outcome.failure
    assert not outcome.blind


async def message_of(ws: trio_websocket.WebSocketConnection) -> str | bytes:
    with trio.fail_after(STEP):
        return await ws.get_message()


# --------------------------------------------------------------------------------------------------
# Relayed messages


async def test_server_to_server_arrives_in_order() -> None:
    async with world() as (atlas, (gs1, gs2, _gs3)):
        ids = [await gs1.send_to_server("gs-2", {"n": i}) for i in range(50)]
        got = [await next_of(gs2.relays) for _ in range(50)]
        registry = atlas.runtime.metrics.registry
        relayed = registry.get_sample_value("atlas_server_relay_messages_total", {"outcome": "relayed"})
        assert relayed == 50
    assert len(set(ids)) == 50
    assert [m.payload for m in got] == [{"n": i} for i in range(50)]
    assert {(m.from_server, m.kind, m.client, m.point) for m in got} == {("gs-1", "server", None, None)}


async def test_region_relays_reach_the_owner_of_the_point() -> None:
    async with world() as (_atlas, (gs1, gs2, gs3)):
        await gs1.send_to_region((150, 5, 5), "to r2")
        message = await next_of(gs2.relays)
        assert message == RelayMessage(
            from_server="gs-1", kind="region", payload="to r2", point=(150.0, 5.0, 5.0)
        )
        # A face two regions share belongs to the one it is the low side of (boxes are half-open).
        await gs1.send_to_region([100, 0, 0], ["edge"])
        assert (await next_of(gs2.relays)).payload == ["edge"]
        await gs3.send_to_region((50, 50, 50), None)
        assert (await next_of(gs1.relays)).from_server == "gs-3"
        await gs1.send_to_region((10, 10, 10), "to my own region")
        assert (await next_of(gs1.relays)).payload == "to my own region"
        with pytest.raises(ValueError, match="three finite numbers"):
            await gs1.send_to_region((1, 2), "x")
        with pytest.raises(ValueError, match="three finite numbers"):
            await gs1.send_to_region((1, 2, math.nan), "x")


async def test_client_relays_reach_the_client_on_whichever_server_it_is() -> None:
    async with world() as (atlas, (gs1, _gs2, gs3)):
        async with client_on(atlas, "gs-2") as (client, ws):
            await gs1.send_to_client(client, "ping 1")
            assert await message_of(ws) == "ping 1"
            await move(atlas, client, "gs-3")
            await gs1.send_to_client(client, {"ping": 2})
            assert json.loads(await message_of(ws)) == {"ping": 2}
            await gs3.send_to_client(client, "from the server it is on")
            assert await message_of(ws) == "from the server it is on"
    assert gs1.undeliverable.statistics().current_buffer_used == 0


async def test_client_relays_sent_during_transfers_arrive_exactly_once() -> None:
    count = 300
    async with world() as (atlas, (gs1, _gs2, _gs3)):
        async with client_on(atlas, "gs-2") as (client, ws):
            got: list[str] = []

            async def read() -> None:
                while len(got) < count:
                    message = await message_of(ws)
                    assert isinstance(message, str)
                    got.append(message)

            async def send() -> None:
                for i in range(count):
                    await gs1.send_to_client(client, str(i))
                    await trio.sleep(0.002)

            async def shuttle() -> None:
                for target in ["gs-3", "gs-2", "gs-3", "gs-1", "gs-2"]:
                    await move(atlas, client, target)

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read)
                    nursery.start_soon(send)
                    nursery.start_soon(shuttle)
    # Nothing lost, nothing twice (a message may overtake another while the client changes servers).
    assert sorted(int(m) for m in got) == list(range(count))
    assert gs1.undeliverable.statistics().current_buffer_used == 0


async def test_undeliverable_relays_come_back_with_the_reason() -> None:
    async with mute_server("old", ["transfer"]) as (_old, old):
        plain = ServerConfig(name="plain", url="ws://127.0.0.1:9/play")
        lonely = RegionConfig(id="r9", owner="plain", min=(900, 0, 0), max=(1000, 100, 100))
        async with world(extra=(plain, old), regions=(lonely,), wait_for=("old",)) as (_atlas, games):
            gs1 = games[0]
            cases: list[tuple[Callable[[int], Awaitable[str]], str]] = [
                (partial(gs1.send_to_server, "nowhere"), "no server nowhere"),
                (partial(gs1.send_to_server, "plain"), "plain has no control channel"),
                (partial(gs1.send_to_server, "old"), "old does not take relayed messages"),
                (partial(gs1.send_to_region, (5000, 0, 0)), "no region holds [5000, 0, 0]"),
                (partial(gs1.send_to_region, (950, 5, 5)), "plain has no control channel"),
                (partial(gs1.send_to_client, "nobody"), "no client nobody"),
            ]
            for n, (send, reason) in enumerate(cases, start=1):
                relay = await send(n)
                notice = await next_of(gs1.undeliverable)
                assert notice.relay == relay
                assert notice.payload == n
                assert notice.reason.startswith(reason), notice.reason
    assert notice.kind == "client" and notice.client == "nobody"


async def test_sending_without_atlas_raises() -> None:
    game = WorldGame("alone")
    with pytest.raises(RelayUnavailable):
        await game.send_to_server("gs-2", 1)
    with pytest.raises(HandoffRejected, match="no control channel"):
        await game.hand_off("rock", {}, to_server="gs-2")
    with pytest.raises(ValueError, match="exactly one"):
        await game.hand_off("rock", {}, to_server="gs-2", to_point=(1, 2, 3))
    with pytest.raises(ValueError, match="exactly one"):
        await game.hand_off("rock", {})
    with pytest.raises(TypeError):
        await game.hand_off("rock", object(), to_server="gs-2")


# --------------------------------------------------------------------------------------------------
# Object handoff


async def test_handoff_completes_only_after_the_target_accepts() -> None:
    async with world() as (atlas, (gs1, gs2, gs3)):
        gs2.gate = trio.Event()
        outcome: list[str] = []

        async def hand_off() -> None:
            outcome.append(await gs1.hand_off("rock-1", {"hp": 7}, to_point=(150, 1, 1)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hand_off)
            offer = await next_of(gs2.offers)
            assert (offer.object, offer.from_server, offer.state, offer.point) == (
                "rock-1",
                "gs-1",
                {"hp": 7},
                (150.0, 1.0, 1.0),
            )
            assert offer.timeout == 5.0
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert outcome == []  # the target has not decided: the source still owns the object
            gs2.gate.set()
        assert outcome == ["gs-2"]
        assert gs2.objects == {"rock-1": {"hp": 7}}
        # By name, too.
        assert await gs2.hand_off("rock-1", gs2.objects.pop("rock-1"), to_server="gs-3") == "gs-3"
        assert gs3.objects == {"rock-1": {"hp": 7}}
        assert gs2.withdrawn.statistics().current_buffer_used == 0
        registry = atlas.runtime.metrics.registry
        assert registry.get_sample_value("atlas_object_handoffs_total", {"outcome": "acked"}) == 2
        assert registry.get_sample_value("atlas_object_handoffs_in_progress") == 0


async def test_handoff_rejections_leave_the_object_with_the_source() -> None:
    async with world() as (_atlas, (gs1, gs2, _gs3)):
        gs2.take_objects = False
        with pytest.raises(HandoffRejected, match="gs-2 refused: declined") as refused:
            await gs1.hand_off("rock", 1, to_point=(150, 1, 1))
        assert refused.value.reason.startswith("gs-2 refused")
        gs2.take_objects, gs2.fail_offers = True, True
        with pytest.raises(HandoffRejected, match="failed to take it: RuntimeError"):
            await gs1.hand_off("rock", 1, to_server="gs-2")
        cases: list[tuple[dict[str, Any], str]] = [
            ({"to_point": (5, 5, 5)}, "gs-1 owns [5, 5, 5] already"),
            ({"to_point": (5000, 5, 5)}, "no region holds [5000, 5, 5]"),
            ({"to_server": "gs-1"}, "the object is on gs-1 already"),
            ({"to_server": "nowhere"}, "no server nowhere"),
        ]
        for where, reason in cases:
            with pytest.raises(HandoffRejected) as rejected:
                await gs1.hand_off("rock", 1, **where)
            assert rejected.value.reason == reason
        assert gs2.objects == {}


async def test_handoff_of_an_object_already_on_its_way_is_rejected() -> None:
    async with world() as (_atlas, (gs1, gs2, _gs3)):
        gs2.gate = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(gs1.hand_off, "rock", 1, to_server="gs-2"))
            await next_of(gs2.offers)
            with pytest.raises(HandoffRejected, match="already being handed off"):
                await gs1.hand_off("rock", 1, to_server="gs-2")
            gs2.gate.set()
        assert gs2.objects == {"rock": 1}


async def test_handoff_to_a_target_that_never_answers_times_out_and_is_withdrawn() -> None:
    async with mute_server("mute", ["transfer", "relay"]) as (mute, config):
        region = RegionConfig(id="r4", owner="mute", min=(300, 0, 0), max=(400, 100, 100))
        async with world(extra=(config,), regions=(region,), transfer_timeout=0.5, wait_for=("mute",)) as (
            _atlas,
            games,
        ):
            gs1 = games[0]
            with trio.fail_after(STEP), pytest.raises(HandoffRejected) as rejected:
                await gs1.hand_off("ghost", {"a": 1}, to_point=(350, 1, 1))
            assert rejected.value.reason == "timed out: mute did not answer in 0.5 s"
            offer = await mute.expect(wire.ObjectOffer)
            assert (offer.object, offer.from_server, offer.state, offer.timeout_ms) == (
                "ghost",
                "gs-1",
                {"a": 1},
                500,
            )
            withdrawn = await mute.expect(wire.ObjectWithdrawn)
            assert withdrawn.handoff == offer.handoff
            # An accept that comes after all that is answered by withdrawing the offer again.
            await mute.send(wire.ObjectAccept(handoff=offer.handoff))
            again = await mute.expect(wire.ObjectWithdrawn)
            assert again.handoff == offer.handoff
            # The mute server's relays: delivered as relay.message.
            await gs1.send_to_region((399, 1, 1), {"hello": "mute"})
            relayed = await mute.expect(wire.RelayMessage)
            assert relayed.payload == {"hello": "mute"} and relayed.kind == "region"


async def test_handoff_whose_target_hook_is_too_slow_is_refused() -> None:
    async with world(transfer_timeout=0.3) as (_atlas, (gs1, gs2, _gs3)):
        gs2.gate = trio.Event()  # never set: the hook is cancelled at the offer's deadline
        with trio.fail_after(STEP), pytest.raises(HandoffRejected):
            await gs1.hand_off("rock", 1, to_server="gs-2")
        assert gs2.objects == {}


# --------------------------------------------------------------------------------------------------
# The SDK's side, with the test playing Atlas


async def test_sdk_passes_a_client_relay_back_when_the_player_is_not_here() -> None:
    game = WorldGame("gs-x")
    async with serving(game) as (port,), open_control(port) as control:
        await control.send(
            wire.RelayMessage(from_server="gs-1", kind="client", payload="hi", client="c9", relay="m-4")
        )
        passed = await control.expect(wire.RelayClient)
        assert passed == wire.RelayClient(client="c9", payload="hi", relay="m-4", from_server="gs-1", hops=1)
        # A player that is here gets it.
        async with open_link(port, "/play", link_headers("c1")) as link:
            await until(lambda: "c1" in game.players)
            await control.send(
                wire.RelayMessage(from_server="gs-1", kind="client", payload=[1, 2], client="c1")
            )
            with trio.fail_after(STEP):
                assert await link.get_message() == "[1,2]"


async def test_sdk_gives_an_object_back_when_atlas_withdraws_the_offer() -> None:
    game = WorldGame("gs-x")
    game.gate = trio.Event()
    async with serving(game) as (port,), open_control(port) as control:
        offer = wire.ObjectOffer(handoff="h-1", object="rock", from_server="gs-1", state=3, timeout_ms=10_000)
        await control.send(offer)
        await next_of(game.offers)
        await control.send(wire.ObjectWithdrawn(handoff="h-1", reason="the offer timed out"))
        await trio.testing.wait_all_tasks_blocked(0.05)
        game.gate.set()  # the hook takes the object after the withdrawal: it is given back
        given_back, reason = await next_of(game.withdrawn)
        assert (given_back.object, reason) == ("rock", "the offer timed out")
        assert game.objects == {}
        # A later offer is accepted, and a withdrawal after the accept gives it back too.
        await control.send(
            wire.ObjectOffer(handoff="h-2", object="stone", from_server="gs-1", state=4, timeout_ms=10_000)
        )
        assert await control.expect(wire.ObjectAccept) == wire.ObjectAccept(handoff="h-2")
        assert game.objects == {"stone": 4}
        await control.send(wire.ObjectWithdrawn(handoff="h-2", reason="the source's control channel closed"))
        assert (await next_of(game.withdrawn))[0].object == "stone"
        assert game.objects == {}


async def test_sdk_hand_off_fails_when_the_channel_closes_before_the_answer() -> None:
    game = WorldGame("gs-x")
    async with serving(game) as (port,):
        async with open_control(port) as control:
            async with trio.open_nursery() as nursery:

                async def close_after_the_request() -> None:
                    await control.expect(wire.ObjectHandoff)
                    await control.ws.aclose()

                nursery.start_soon(close_after_the_request)
                with pytest.raises(HandoffRejected, match="closed before Atlas answered"):
                    await game.hand_off("rock", 1, to_server="gs-2")


# --------------------------------------------------------------------------------------------------
# Sans-IO: addressing and the handoff table


class FakeDirectory:
    def __init__(self) -> None:
        self.servers = {"a", "b", "plain"}
        self.clients = {"c1": "b"}

    def is_server(self, name: str) -> bool:
        return name in self.servers

    def owner_at(self, point: wire.Point) -> str | None:
        return "a" if point[0] < 10 else "b" if point[0] < 20 else None

    def server_of(self, client: str) -> str | None:
        return self.clients.get(client)

    def unreachable(self, server: str) -> str | None:
        return f"{server} has no control channel" if server == "plain" else None


def test_address() -> None:
    d = FakeDirectory()
    assert address("a", wire.RelaySend(to_server="b", payload=1, relay="m-1"), d) == Delivery(
        "b", wire.RelayMessage(from_server="a", kind="server", payload=1, relay="m-1")
    )
    assert address("a", wire.RelayRegion(point=(15, 0, 0), payload=2), d) == Delivery(
        "b", wire.RelayMessage(from_server="a", kind="region", payload=2, point=(15, 0, 0))
    )
    assert address("a", wire.RelayClient(client="c1", payload=3, hops=2), d) == Delivery(
        "b", wire.RelayMessage(from_server="a", kind="client", payload=3, client="c1", hops=2)
    )
    refused = address("a", wire.RelaySend(to_server="plain", payload=4, relay="m-2"), d)
    assert refused == Undelivered(
        wire.RelayUndeliverable(
            kind="server", reason="plain has no control channel", payload=4, to_server="plain", relay="m-2"
        )
    )
    region = address("a", wire.RelayRegion(point=(25, 0, 0), payload=5), d)
    assert isinstance(region, Undelivered) and region.message.reason == "no region holds [25, 0, 0]"
    client = address("a", wire.RelayClient(client="c1", payload=6, hops=5), d)
    assert isinstance(client, Undelivered) and "kept moving" in client.message.reason


def test_plan_handoff() -> None:
    d = FakeDirectory()

    def plan(**where: Any) -> str:
        planned = plan_handoff("a", wire.ObjectHandoff(handoff="h", object="o", state=None, **where), d)
        return planned if isinstance(planned, str) else f"refused: {planned.message.reason}"

    assert plan(point=(15, 0, 0)) == "b"
    assert plan(to_server="b") == "b"
    assert plan(point=(5, 0, 0)) == "refused: a owns [5, 0, 0] already"
    assert plan(to_server="a") == "refused: the object is on a already"
    assert plan(to_server="plain") == "refused: plain has no control channel"
    assert plan() == "refused: an object handoff needs exactly one of point and to_server"
    assert plan(point=(15, 0, 0), to_server="b").startswith("refused: an object handoff needs exactly one")


def test_atlas_directory_says_why_a_server_cannot_be_reached() -> None:
    config = Config(
        servers=(
            ServerConfig(name="plain", url="ws://127.0.0.1:9/"),
            ServerConfig(name="down", url="ws://127.0.0.1:9/", control_url="ws://127.0.0.1:9/atlas/control"),
        ),
        world=WorldConfig(regions=REGIONS),
    )
    directory = _AtlasDirectory(Runtime.from_config(config), ControlChannels())
    assert directory.unreachable("plain") == "plain has no control channel"
    assert directory.unreachable("down") == "the control channel of down is down"
    assert directory.unreachable("gone") == "no server gone"
    assert directory.owner_at((250.0, 1.0, 1.0)) == "gs-3"
    assert directory.server_of("nobody") is None


def test_handoff_table() -> None:
    record = HandoffRecord(id="h-1", source="a", source_handoff="h", object="o", target="b")
    with pytest.raises(IllegalHandoff):
        record.advance(HandoffPhase.ACKED)
    record.advance(HandoffPhase.ACCEPTED)
    record.advance(HandoffPhase.ACKED)
    assert record.done
    with pytest.raises(IllegalHandoff):
        record.advance(HandoffPhase.WITHDRAWN)
    ends = {phase for phase, nexts in HANDOFF_TRANSITIONS.items() if not nexts}
    assert ends == {HandoffPhase.ACKED, HandoffPhase.REJECTED, HandoffPhase.WITHDRAWN}


def test_new_messages_round_trip() -> None:
    from_server: list[wire.ServerMessage] = [
        wire.RelaySend(to_server="b", payload={"x": [1, None]}, relay="m-1"),
        wire.RelayRegion(point=(1.5, -2.0, 3.0), payload="hi"),
        wire.RelayClient(client="c", payload=None, from_server="a", hops=1),
        wire.ObjectHandoff(handoff="h", object="o", state={"hp": 1}, point=(1.0, 2.0, 3.0)),
        wire.ObjectAccept(handoff="h"),
        wire.ObjectReject(handoff="h", reason="full"),
    ]
    for message in from_server:
        assert wire.decode_from_server(wire.encode(message)) == message
    from_atlas: list[wire.AtlasMessage] = [
        wire.RelayMessage(from_server="a", kind="client", payload=[1], client="c"),
        wire.RelayUndeliverable(kind="region", reason="no region", payload=1, point=(0.0, 0.0, 0.0)),
        wire.ObjectOffer(handoff="h", object="o", from_server="a", state=2, timeout_ms=5000),
        wire.ObjectAck(handoff="h", to_server="b"),
        wire.ObjectRejected(handoff="h", reason="timed out"),
        wire.ObjectWithdrawn(handoff="h", reason="late"),
    ]
    for sent in from_atlas:
        assert wire.decode_from_atlas(wire.encode(sent)) == sent
    # Optional fields are left out on the wire; a point is [x, y, z].
    text = wire.encode(wire.RelayMessage(from_server="a", kind="region", payload=1, point=(1.0, 2.0, 3.0)))
    assert msgspec.json.decode(text) == {
        "type": "relay.message",
        "from_server": "a",
        "kind": "region",
        "payload": 1,
        "point": [1.0, 2.0, 3.0],
    }
    with pytest.raises(wire.ProtocolError):
        wire.decode_from_server('{"type": "relay.region", "point": [1, 2], "payload": 1}')
