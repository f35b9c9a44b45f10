"""Tests for the game-server SDK (atlas.sdk): the test plays Atlas's part by hand, over real sockets.

The fake Atlas follows docs/protocol.md: it opens the control channel (hello/welcome), opens data links
with ``X-Atlas-Client-Id`` (and ``X-Atlas-Transfer`` for a transfer), relays nothing but reads and
counts what the server sends on each link, and drives the transfer steps. Readiness comes from
``nursery.start``; nothing sleeps for a fixed time. The pure parts (the phase table, the send gate) run
without sockets, on virtual time.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection, wrap_client_stream

from atlas.config import AdminConfig, Config, ProxyConfig, ServerConfig
from atlas.control.messages import (
    AtlasMessage,
    Hello,
    Load,
    ServerMessage,
    TransferAbort,
    TransferAccepted,
    TransferBegin,
    TransferCommit,
    TransferCommitted,
    TransferComplete,
    TransferNotice,
    TransferPrepare,
    TransferReady,
    TransferRefused,
    TransferReject,
    TransferRequest,
    TransferState,
    Welcome,
    decode_from_server,
    encode,
)
from atlas.sdk import GameServer, Player, PlayerDisconnected, TransferInfo, TransferRequestRefused
from atlas.sdk._handoff import SOURCE_TRANSITIONS, TARGET_TRANSITIONS, Handoff, IllegalHandoff, Phase
from atlas.supervisor import AtlasStarted, serve_atlas
from tests.wsclient import until

HOST = "127.0.0.1"
CONTROL = "/atlas/control"
# Generous bound for one test step on a loaded CI machine; nothing here should come close.
STEP = 10.0
# Atlas's timeout_ms for steps that are expected to succeed.
LONG_MS = 10_000

M = TypeVar("M", bound=ServerMessage)


# --------------------------------------------------------------------------------------------------
# A game that records what happens to it


class Game(GameServer):
    """Counts each player's messages in ``player.data["count"]`` and echoes ``<server>:<msg>:<count>``."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.log: list[tuple[Any, ...]] = []
        self._events, self._seen = trio.open_memory_channel[tuple[Any, ...]](math.inf)
        self.refuse: set[str] = set()  # "in" / "out": on_transfer_prepare says no
        self.fail_in = False  # on_transfer_in raises
        self.gate = trio.Event()
        self.gate.set()  # on_message("slow") waits for this
        self.abort_gate = trio.Event()
        self.abort_gate.set()  # on_transfer_aborted waits for this

    def record(self, *event: Any) -> None:
        self.log.append(event)
        self._events.send_nowait(event)

    async def next_event(self, *kinds: str) -> tuple[Any, ...]:
        """The next recorded event of one of ``kinds`` (events of other kinds before it are skipped)."""
        with trio.fail_after(STEP):
            while True:
                event = await self._seen.receive()
                if event[0] in kinds:
                    return event

    def kinds(self) -> list[str]:
        return [event[0] for event in self.log]

    async def on_connect(self, player: Player) -> None:
        self.record("connect", player.id)

    async def on_message(self, player: Player, message: str | bytes) -> None:
        if message == "slow":
            await self.gate.wait()
        if message == "boom":
            raise RuntimeError("boom")
        if isinstance(message, str) and message.startswith("move "):
            try:
                transfer = await self.request_transfer(player, message.removeprefix("move "))
            except TransferRequestRefused as exc:
                await player.send(f"refused: {exc.reason}")
            else:
                await player.send(f"accepted: {transfer}")
            return
        if message in ("kick", "kick and keep sending"):
            await player.send("bye")
            player.close(4001, "go away")
            if message == "kick and keep sending":
                await player.send("never")  # raises PlayerDisconnected, which ends this call quietly
            return
        count = player.data.get("count", 0) + 1
        player.data["count"] = count
        self.record("message", player.id, message, player.received)
        await player.send(f"{self.name}:{message!s}:{count}")

    async def on_disconnect(self, player: Player, reason: str) -> None:
        self.record("disconnect", player.id, reason)

    async def on_transfer_prepare(self, info: TransferInfo) -> bool:
        self.record("prepare", info)
        return info.direction not in self.refuse

    async def on_transfer_out(self, player: Player) -> Any:
        self.record("out", player.id, player.received, player.sent)
        return dict(player.data)

    async def on_transfer_in(self, player: Player, state: Any) -> None:
        self.record("in", player.id, state)
        await player.send("arrived")  # queued until the transfer is committed
        if self.fail_in:
            raise ValueError("corrupt state")
        await super().on_transfer_in(player, state)

    async def on_transfer_aborted(self, player: Player) -> None:
        self.record("aborted", player.id)
        await self.abort_gate.wait()

    async def on_transfer_in_aborted(self, info: TransferInfo, reason: str) -> None:
        self.record("in_aborted", info.client, reason)


@asynccontextmanager
async def serving(*games: GameServer) -> AsyncIterator[list[int]]:
    """Serve ``games`` for the duration of the block; yields their ports."""
    async with trio.open_nursery() as nursery:
        ports = [await nursery.start(game.serve) for game in games]
        yield ports
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------------------------------
# The fake Atlas


@asynccontextmanager
async def open_ws(
    port: int, path: str = "/", headers: Sequence[tuple[str, str]] = ()
) -> AsyncIterator[WebSocketConnection]:
    """A client WebSocket that owns its TCP stream.

    trio-websocket 0.12's own client leaves its socket open when the server closes first, which
    ``filterwarnings = error`` turns into a failure.
    """
    with trio.fail_after(STEP):
        stream = await trio.open_tcp_stream(HOST, port)
    async with stream, trio.open_nursery() as nursery:
        with trio.fail_after(STEP):
            ws = await wrap_client_stream(
                nursery,
                stream,
                f"{HOST}:{port}",
                path,
                extra_headers=[(name.encode(), value.encode()) for name, value in headers],
            )
        try:
            yield ws
        finally:
            with trio.move_on_after(STEP, shield=True):
                await ws.aclose()
            nursery.cancel_scope.cancel()


def link_headers(client: str, transfer: str | None = None) -> list[tuple[str, str]]:
    headers = [("X-Atlas-Client-Id", client)]
    if transfer is not None:
        headers.append(("X-Atlas-Transfer", transfer))
    return headers


class Control:
    """Atlas's end of one control channel."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, message: AtlasMessage) -> None:
        await self.ws.send_message(encode(message))

    async def receive(self) -> ServerMessage:
        with trio.fail_after(STEP):
            return decode_from_server(await self.ws.get_message())

    async def expect_closed(self) -> tuple[int, str | None]:
        """Wait for the server to close the channel (load reports may come first)."""
        with trio.fail_after(STEP):
            try:
                while isinstance(message := decode_from_server(await self.ws.get_message()), Load):
                    pass
            except ConnectionClosed as exc:
                assert exc.reason is not None
                return exc.reason.code, exc.reason.reason
        raise AssertionError(f"expected the channel to close, got {message!r}")

    async def expect(self, kind: type[M]) -> M:
        """The next message that is not a load report (unless a load report is what is expected)."""
        while True:
            message = await self.receive()
            if isinstance(message, Load) and kind is not Load:
                continue
            assert isinstance(message, kind), message
            return message


@asynccontextmanager
async def open_control(port: int) -> AsyncIterator[Control]:
    """A control channel past hello/welcome."""
    async with open_ws(port, CONTROL) as ws:
        control = Control(ws)
        await control.send(Hello(versions=[1], node="fake-atlas"))
        await control.expect(Welcome)
        yield control


async def receive(ws: WebSocketConnection) -> str | bytes:
    with trio.fail_after(STEP):
        return await ws.get_message()


async def receive_n(ws: WebSocketConnection, n: int) -> list[str | bytes]:
    return [await receive(ws) for _ in range(n)]


async def expect_closed(ws: WebSocketConnection) -> tuple[int, str | None]:
    """Wait for the server to close ``ws`` (no message may come first); returns code and reason."""
    with trio.fail_after(STEP):
        try:
            message = await ws.get_message()
        except ConnectionClosed as exc:
            assert exc.reason is not None
            return exc.reason.code, exc.reason.reason
    raise AssertionError(f"expected the link to close, got {message!r}")


# --------------------------------------------------------------------------------------------------
# Control channel: hello, welcome, load, versioning, garbage


async def test_hello_welcome_and_load_reports() -> None:
    game = Game("game-a", capacity=7, load_interval=0.05)
    game.tick_ms = 12.5
    async with serving(game) as [port], open_ws(port, CONTROL) as ws:
        control = Control(ws)
        await control.send(Hello(versions=[1], node="atlas-1"))
        welcome = await control.receive()
        assert welcome == Welcome(version=1, server="game-a", capabilities=["transfer", "relay"])
        first = await control.receive()
        assert first == Load(players=0, capacity=7, tick_ms=12.5, accepting=True)
        async with open_ws(port, "/play", link_headers("c1")):
            await game.next_event("connect")
            game.accepting = False
            # Reports keep coming every load_interval; wait for one that shows the change.
            while await control.expect(Load) != Load(players=1, capacity=7, tick_ms=12.5, accepting=False):
                pass
        assert game.statistics().control_channels == 1


async def test_version_negotiation_and_unknown_fields() -> None:
    game = Game("game-a")
    async with serving(game) as [port]:
        async with open_ws(port, CONTROL) as ws:
            # A later Atlas offering versions this SDK does not know, with fields it does not know.
            await ws.send_message('{"type": "hello", "versions": [3, 1, 2], "node": "n", "region": "eu"}')
            welcome = decode_from_server(await receive(ws))
            assert isinstance(welcome, Welcome) and welcome.version == 1
        async with open_ws(port, CONTROL) as ws:
            await ws.send_message(encode(Hello(versions=[2, 3], node="future")))
            assert await expect_closed(ws) == (4000, "no common protocol version")


async def test_malformed_control_messages_are_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="atlas.sdk")
    game = Game("game-a")
    async with serving(game) as [port], open_ws(port, CONTROL) as ws:
        control = Control(ws)
        garbage: list[str | bytes] = [
            "not json",
            "[1, 2]",
            '{"no": "type"}',
            '{"type": "transfer.teleport", "transfer": "t"}',  # a type from the future
            '{"type": "transfer.begin", "transfer": "t"}',  # fields missing
            b"\xff\xfe",
        ]
        for text in garbage:
            await ws.send_message(text)
        # A transfer step before hello is ignored too.
        await control.send(TransferComplete(transfer="t0", client="c"))
        await control.send(Hello(versions=[1], node="atlas-1"))
        assert (await control.receive()) == Welcome(
            version=1, server="game-a", capabilities=["transfer", "relay"]
        )
        await control.expect(Load)
        # Still up: a transfer step after the garbage is answered.
        await control.send(TransferBegin(transfer="t1", client="c", delivered=0, timeout_ms=LONG_MS))
        reject = await control.expect(TransferReject)
        assert reject.transfer == "t1" and "unknown transfer" in reject.reason
    ignored = [r for r in caplog.records if "ignoring" in r.getMessage()]
    assert len(ignored) >= len(garbage) + 1


# --------------------------------------------------------------------------------------------------
# Data links


async def test_plain_link_connect_messages_in_order_disconnect() -> None:
    game = Game("game-a")
    async with serving(game) as [port]:
        async with open_ws(port, "/play?room=1", link_headers("c1")) as ws:
            assert await game.next_event("connect") == ("connect", "c1")
            player = game.players["c1"]
            assert player.path == "/play?room=1"
            assert player.headers["x-atlas-client-id"] == "c1"
            for i in range(5):
                await ws.send_message(f"m{i}")
            assert await receive_n(ws, 5) == [f"game-a:m{i}:{i + 1}" for i in range(5)]
            messages = [event for event in game.log if event[0] == "message"]
            # In order, one at a time: each on_message saw the previous ones counted.
            assert messages == [("message", "c1", f"m{i}", i) for i in range(5)]
            assert (player.received, player.sent) == (5, 5)
        assert await game.next_event("disconnect") == ("disconnect", "c1", "closed")
        assert "c1" not in game.players

        # A direct connection (no Atlas) gets a generated id.
        async with open_ws(port, "/") as ws:
            _, client = await game.next_event("connect")
            assert client.startswith("local-")
            await ws.send_message(b"\x01")
            assert await receive(ws) == "game-a:b'\\x01':1"


async def test_hook_error_ends_that_player_only() -> None:
    game = Game("game-a")
    async with serving(game) as [port]:
        async with (
            open_ws(port, "/", link_headers("bad")) as bad,
            open_ws(port, "/", link_headers("good")) as good,
        ):
            await bad.send_message("boom")
            assert await expect_closed(bad) == (1011, "internal error")
            assert await game.next_event("disconnect") == ("disconnect", "bad", "error")
            await good.send_message("still here")
            assert await receive(good) == "game-a:still here:1"


@pytest.mark.parametrize("command", ["kick", "kick and keep sending"])
async def test_kick_sends_what_is_queued_then_closes(command: str) -> None:
    game = Game("game-a")
    async with serving(game) as [port], open_ws(port, "/", link_headers("c1")) as ws:
        await ws.send_message(command)
        await ws.send_message("after the kick")  # not processed
        assert await receive(ws) == "bye"
        assert await expect_closed(ws) == (4001, "go away")
        assert await game.next_event("disconnect") == ("disconnect", "c1", "kicked")
        assert game.kinds() == ["connect", "disconnect"]


async def test_shutdown_closes_links_going_away() -> None:
    game = Game("game-a")
    async with trio.open_nursery() as nursery:
        server_scope = trio.CancelScope()

        async def run(*, task_status: trio.TaskStatus[int]) -> None:
            with server_scope:
                await game.serve(task_status=task_status)

        port = await nursery.start(run)
        async with open_control(port) as control, open_ws(port, "/", link_headers("c1")) as link:
            await game.next_event("connect")
            server_scope.cancel()
            assert await expect_closed(link) == (1001, "server shutting down")
            assert await control.expect_closed() == (1001, "server shutting down")
        assert await game.next_event("disconnect") == ("disconnect", "c1", "shutdown")
        with pytest.raises(OSError):  # the port is released
            await trio.open_tcp_stream(HOST, port)


async def test_duplicate_client_id_is_refused() -> None:
    game = Game("game-a")
    async with serving(game) as [port], open_ws(port, "/", link_headers("c1")):
        await game.next_event("connect")
        rejected: list[ConnectionRejected] = []
        try:
            async with open_ws(port, "/", link_headers("c1")):
                pass
        except* ConnectionRejected as group:
            rejected.extend(exc for exc in group.exceptions if isinstance(exc, ConnectionRejected))
        assert [exc.status_code for exc in rejected] == [409]
        assert list(game.players) == ["c1"]


async def test_health_probe_is_answered_but_is_not_a_player() -> None:
    game = Game("game-a")
    async with serving(game) as [port]:
        async with open_ws(port, "/", [("X-Atlas-Health-Check", "1")]) as ws:
            await ws.aclose(1000, "health check")
        async with open_ws(port, "/", link_headers("c1")):
            await game.next_event("connect")
            assert game.kinds() == ["connect"]
            assert list(game.players) == ["c1"]


async def test_blind_transfer_links() -> None:
    """Without a prepared transfer, a transfer link is a new player; a link closed 'transferred' left."""
    game = Game("game-a")
    async with serving(game) as [port]:
        async with open_ws(port, "/", link_headers("c1", transfer="blind-1")) as ws:
            assert await game.next_event("connect") == ("connect", "c1")
            await ws.send_message("hi")
            assert await receive(ws) == "game-a:hi:1"
            await ws.aclose(1000, "transferred")
        assert await game.next_event("disconnect") == ("disconnect", "c1", "transferred")


# --------------------------------------------------------------------------------------------------
# Transfers


async def test_full_transfer_between_two_servers() -> None:
    source, target = Game("game-a"), Game("game-b")
    async with serving(source, target) as [port_a, port_b]:
        async with open_control(port_a) as control_a, open_control(port_b) as control_b:
            async with open_ws(port_a, "/play", link_headers("c1")) as link_a:
                await source.next_event("connect")
                for i in range(3):
                    await link_a.send_message(f"m{i}")
                relayed_down = await receive_n(link_a, 3)
                assert relayed_down[-1] == "game-a:m2:3"

                # 1. advance notice to the source, prepare/ready with the target
                await control_a.send(
                    TransferNotice(
                        transfer="t1", client="c1", target="game-b", reason="admin", timeout_ms=LONG_MS
                    )
                )
                await control_b.send(
                    TransferPrepare(
                        transfer="t1", client="c1", source="game-a", reason="admin", timeout_ms=LONG_MS
                    )
                )
                assert await control_b.expect(TransferReady) == TransferReady(transfer="t1")
                _, info_in = await target.next_event("prepare")
                assert (info_in.direction, info_in.peer, info_in.client, info_in.player) == (
                    "in",
                    "game-a",
                    "c1",
                    None,
                )
                _, info_out = await source.next_event("prepare")
                assert (info_out.direction, info_out.peer, info_out.player) == (
                    "out",
                    "game-b",
                    source.players["c1"],
                )

                # 2. the target's data link, parked: no on_connect, not a player yet
                async with open_ws(port_b, "/play", link_headers("c1", transfer="t1")) as link_b:
                    # 3. the cut: 3 messages were delivered to the source
                    await control_a.send(
                        TransferBegin(transfer="t1", client="c1", delivered=3, timeout_ms=LONG_MS)
                    )
                    state = await control_a.expect(TransferState)
                    assert state == TransferState(transfer="t1", state={"count": 3}, sent=3)
                    assert await source.next_event("out") == ("out", "c1", 3, 3)
                    assert source.players["c1"].handing_off
                    assert "connect" not in target.kinds() and "c1" not in target.players

                    # 4. commit on the target; held client messages then flow to it
                    await control_b.send(
                        TransferCommit(transfer="t1", client="c1", state=state.state, timeout_ms=LONG_MS)
                    )
                    assert await control_b.expect(TransferCommitted) == TransferCommitted(transfer="t1")
                    assert await target.next_event("in") == ("in", "c1", {"count": 3})
                    await link_b.send_message("m3")
                    # The target's first send (from on_transfer_in) waited for the commit.
                    assert await receive_n(link_b, 2) == ["arrived", "game-b:m3:4"]  # the count moved too
                    player_b = target.players["c1"]
                    assert (player_b.received, player_b.sent) == (1, 2)

                    # 5. complete: the source forgets the player and closes its link
                    await control_a.send(TransferComplete(transfer="t1", client="c1"))
                    assert await source.next_event("disconnect") == ("disconnect", "c1", "transferred")
                    assert await expect_closed(link_a) == (1000, "transferred")
                    assert "c1" not in source.players
                    assert "connect" not in target.kinds()
        assert source.statistics().transfers_completed == 1
        assert target.statistics().transfers_committed == 1
        assert source.statistics().transfers_in_progress == target.statistics().transfers_in_progress == 0


async def test_begin_waits_until_delivered_messages_are_processed() -> None:
    game = Game("game-a")
    game.gate = trio.Event()
    async with serving(game) as [port], open_control(port) as control:
        async with open_ws(port, "/", link_headers("c1")) as link:
            await game.next_event("connect")
            await link.send_message("slow")
            await link.send_message("quick")
            await control.send(
                TransferNotice(transfer="t1", client="c1", target="b", reason="admin", timeout_ms=LONG_MS)
            )
            await control.send(TransferBegin(transfer="t1", client="c1", delivered=2, timeout_ms=LONG_MS))
            await game.next_event("prepare")
            game.gate.set()
            state = await control.expect(TransferState)
            # on_transfer_out ran only after both messages were processed (and their echoes sent).
            assert game.kinds()[-3:] == ["message", "message", "out"]
            assert await game.next_event("out") == ("out", "c1", 2, 2)
            assert state.sent == 2
            assert await receive_n(link, 2) == ["game-a:slow:1", "game-a:quick:2"]


async def test_begin_that_cannot_be_satisfied_in_time_is_aborted_and_the_player_resumes() -> None:
    game = Game("game-a")
    async with serving(game) as [port], open_control(port) as control:
        async with open_ws(port, "/", link_headers("c1")) as link:
            await game.next_event("connect")
            await link.send_message("m0")
            await control.send(
                TransferNotice(transfer="t1", client="c1", target="b", reason="admin", timeout_ms=LONG_MS)
            )
            # Atlas claims 5 messages were delivered; only 1 was.
            await control.send(TransferBegin(transfer="t1", client="c1", delivered=5, timeout_ms=100))
            abort = await control.expect(TransferAbort)
            assert (abort.transfer, abort.client) == ("t1", "c1")
            assert "1 of 5" in abort.reason
            assert await game.next_event("aborted") == ("aborted", "c1")
            await link.send_message("m1")
            assert await receive_n(link, 2) == ["game-a:m0:1", "game-a:m1:2"]
            assert not game.players["c1"].handing_off


async def test_sends_during_handoff_are_queued_and_flushed_in_order_on_abort() -> None:
    game = Game("game-a")
    async with serving(game) as [port], open_control(port) as control:
        async with open_ws(port, "/", link_headers("c1")) as link:
            await game.next_event("connect")
            await link.send_message("m0")
            assert await receive(link) == "game-a:m0:1"
            await control.send(
                TransferNotice(transfer="t1", client="c1", target="b", reason="admin", timeout_ms=LONG_MS)
            )
            await control.send(TransferBegin(transfer="t1", client="c1", delivered=1, timeout_ms=LONG_MS))
            state = await control.expect(TransferState)
            assert state.sent == 1
            player = game.players["c1"]
            assert player.handing_off
            for i in range(3):
                assert await game.send_to("c1", f"tick{i}")
            assert await game.broadcast("news") == 1
            assert player.sent == 1  # queued, not sent

            await control.send(TransferAbort(transfer="t1", client="c1", reason="target died"))
            assert await game.next_event("aborted") == ("aborted", "c1")
            await link.send_message("m1")
            assert await receive_n(link, 5) == ["tick0", "tick1", "tick2", "news", "game-a:m1:2"]
            assert (player.sent, player.received, player.handing_off) == (6, 2, False)


async def test_control_channel_loss_rolls_back_the_source() -> None:
    game = Game("game-a")
    async with serving(game) as [port]:
        async with open_ws(port, "/", link_headers("c1")) as link:
            await game.next_event("connect")
            async with open_control(port) as control:
                await control.send(
                    TransferNotice(transfer="t1", client="c1", target="b", reason="admin", timeout_ms=LONG_MS)
                )
                await control.send(TransferBegin(transfer="t1", client="c1", delivered=0, timeout_ms=LONG_MS))
                await control.expect(TransferState)
                assert await game.send_to("c1", "queued")
            # Atlas's control channel is gone: the source keeps the player and flushes.
            assert await game.next_event("aborted") == ("aborted", "c1")
            assert await receive(link) == "queued"
            await link.send_message("m0")
            assert await receive(link) == "game-a:m0:1"


async def test_complete_drops_queued_sends() -> None:
    game = Game("game-a")
    async with serving(game) as [port], open_control(port) as control:
        async with open_ws(port, "/", link_headers("c1")) as link:
            await game.next_event("connect")
            await control.send(
                TransferNotice(transfer="t1", client="c1", target="b", reason="admin", timeout_ms=LONG_MS)
            )
            await control.send(TransferBegin(transfer="t1", client="c1", delivered=0, timeout_ms=LONG_MS))
            assert (await control.expect(TransferState)).sent == 0
            player = game.players["c1"]
            await player.send("never delivered")
            await control.send(TransferComplete(transfer="t1", client="c1"))
            assert await expect_closed(link) == (1000, "transferred")
            assert await game.next_event("disconnect") == ("disconnect", "c1", "transferred")
            with pytest.raises(PlayerDisconnected):
                await player.send("too late")
            assert not await game.send_to("c1", "too late")


async def test_a_transferred_close_before_complete_completes_the_source() -> None:
    # Atlas closes the source's link with 1000 "transferred" only after the switch; the close may be
    # read before transfer.complete (another connection): the transfer is complete, not rolled back.
    game = Game("game-a")
    async with serving(game) as [port], open_control(port) as control:
        async with open_ws(port, "/", link_headers("c1")) as link:
            await game.next_event("connect")
            await control.send(
                TransferNotice(transfer="t1", client="c1", target="b", reason="admin", timeout_ms=LONG_MS)
            )
            await control.send(TransferBegin(transfer="t1", client="c1", delivered=0, timeout_ms=LONG_MS))
            await control.expect(TransferState)
            await link.aclose(1000, "transferred")
        assert await game.next_event("disconnect") == ("disconnect", "c1", "transferred")
        await until(lambda: game.statistics().transfers_in_progress == 0)
        stats = game.statistics()
        assert (stats.transfers_completed, stats.transfers_aborted) == (1, 0)
        await control.send(TransferComplete(transfer="t1", client="c1"))  # late: nothing to answer
        # Nothing was sent about t1 (no transfer.abort): the next message answers this commit.
        await control.send(TransferCommit(transfer="t9", client="c9", state={}, timeout_ms=LONG_MS))
        assert (await control.expect(TransferReject)).transfer == "t9"


async def test_a_message_past_the_cut_is_a_rollback_even_without_transfer_abort() -> None:
    # transfer.begin says Atlas relays no more messages unless it rolls back: one more message is the
    # rollback, even if Atlas's transfer.abort never comes (Atlas bounds the time it spends telling).
    game = Game("game-a")
    async with serving(game) as [port], open_control(port) as control:
        async with open_ws(port, "/", link_headers("c1")) as link:
            await game.next_event("connect")
            await control.send(
                TransferNotice(transfer="t1", client="c1", target="b", reason="admin", timeout_ms=LONG_MS)
            )
            await control.send(TransferBegin(transfer="t1", client="c1", delivered=0, timeout_ms=LONG_MS))
            assert (await control.expect(TransferState)).sent == 0
            assert await game.send_to("c1", "queued")
            await link.send_message("m0")  # Atlas resumed the client on this server
            assert await game.next_event("aborted") == ("aborted", "c1")
            assert await receive_n(link, 2) == ["queued", "game-a:m0:1"]
            assert game.statistics().transfers_aborted == 1
            # The SDK told Atlas nothing (Atlas rolled back first): the next message answers this commit.
            await control.send(TransferCommit(transfer="t9", client="c9", state={}, timeout_ms=LONG_MS))
            assert (await control.expect(TransferReject)).transfer == "t9"


async def test_a_notice_right_after_a_rollback_waits_for_it() -> None:
    game = Game("game-a")
    game.abort_gate = trio.Event()
    async with serving(game) as [port], open_control(port) as control:
        async with open_ws(port, "/", link_headers("c1")) as link:
            await game.next_event("connect")
            await control.send(
                TransferNotice(transfer="t1", client="c1", target="b", reason="admin", timeout_ms=LONG_MS)
            )
            await control.send(TransferBegin(transfer="t1", client="c1", delivered=0, timeout_ms=LONG_MS))
            assert (await control.expect(TransferState)).sent == 0
            assert await game.send_to("c1", "queued")
            # Atlas rolls t1 back and at once moves the client again: t2 waits for t1's rollback.
            await control.send(TransferAbort(transfer="t1", client="c1", reason="target died"))
            await control.send(
                TransferNotice(transfer="t2", client="c1", target="b", reason="admin", timeout_ms=LONG_MS)
            )
            await control.send(TransferBegin(transfer="t2", client="c1", delivered=0, timeout_ms=LONG_MS))
            assert await game.next_event("aborted") == ("aborted", "c1")
            game.abort_gate.set()
            state = await control.expect(TransferState)
            # t1's queued send went out before t2 held the player, and t2 counts it.
            assert (state.transfer, state.sent) == ("t2", 1)
            assert await receive(link) == "queued"


async def test_a_client_brought_back_waits_for_its_leaving_player() -> None:
    # The client left (Atlas switched it away), and Atlas brings it back before this server has read
    # the end of the first transfer: the new transfer waits for it rather than refusing.
    game = Game("game-a")
    async with serving(game) as [port], open_control(port) as control:
        async with open_ws(port, "/", link_headers("c1")) as link:
            await game.next_event("connect")
            await control.send(
                TransferNotice(transfer="t1", client="c1", target="b", reason="admin", timeout_ms=LONG_MS)
            )
            await control.send(TransferBegin(transfer="t1", client="c1", delivered=0, timeout_ms=LONG_MS))
            await control.expect(TransferState)
            await control.send(
                TransferPrepare(transfer="t2", client="c1", source="b", reason="admin", timeout_ms=LONG_MS)
            )
            await link.aclose(1000, "transferred")  # t1 ends here
            assert await control.expect(TransferReady) == TransferReady(transfer="t2")
        async with open_ws(port, "/", link_headers("c1", transfer="t2")) as back:
            await control.send(
                TransferCommit(transfer="t2", client="c1", state={"count": 7}, timeout_ms=LONG_MS)
            )
            assert await control.expect(TransferCommitted) == TransferCommitted(transfer="t2")
            await back.send_message("m")
            assert await receive_n(back, 2) == ["arrived", "game-a:m:8"]
        stats = game.statistics()
        assert (stats.transfers_completed, stats.transfers_committed, stats.transfers_aborted) == (1, 1, 0)


async def test_abort_on_the_target_drops_the_parked_link() -> None:
    game = Game("game-b")
    async with serving(game) as [port], open_control(port) as control:
        await control.send(
            TransferPrepare(transfer="t1", client="c1", source="a", reason="failover", timeout_ms=LONG_MS)
        )
        await control.expect(TransferReady)
        async with open_ws(port, "/", link_headers("c1", transfer="t1")) as link:
            await control.send(TransferAbort(transfer="t1", client="c1", reason="source died"))
            assert await expect_closed(link) == (1000, "transfer aborted")
        assert await game.next_event("in_aborted") == ("in_aborted", "c1", "source died")
        assert game.kinds() == ["prepare", "in_aborted"]
        assert not game.players
        # A late commit for it is refused with the reason.
        await control.send(TransferCommit(transfer="t1", client="c1", state={}, timeout_ms=LONG_MS))
        reject = await control.expect(TransferReject)
        assert "source died" in reject.reason


async def test_on_transfer_in_failure_aborts_and_ends_the_arriving_player() -> None:
    game = Game("game-b")
    game.fail_in = True
    async with serving(game) as [port], open_control(port) as control:
        await control.send(
            TransferPrepare(transfer="t1", client="c1", source="a", reason="admin", timeout_ms=LONG_MS)
        )
        await control.expect(TransferReady)
        async with open_ws(port, "/", link_headers("c1", transfer="t1")) as link:
            await control.send(
                TransferCommit(transfer="t1", client="c1", state={"count": 1}, timeout_ms=LONG_MS)
            )
            abort = await control.expect(TransferAbort)
            assert "on_transfer_in failed" in abort.reason and "corrupt state" in abort.reason
            # Its queued "arrived" never went out: the link only closes.
            assert await expect_closed(link) == (1000, "transfer aborted")
        # Two tasks report the rollback (the link session and the transfer): in either order.
        assert {await game.next_event("disconnect", "in_aborted") for _ in range(2)} == {
            ("disconnect", "c1", "transfer_aborted"),
            ("in_aborted", "c1", abort.reason),
        }
        assert "connect" not in game.kinds() and not game.players


async def test_target_whose_link_closes_before_commit_tells_atlas() -> None:
    game = Game("game-b")
    async with serving(game) as [port], open_control(port) as control:
        await control.send(
            TransferPrepare(transfer="t1", client="c1", source="a", reason="admin", timeout_ms=LONG_MS)
        )
        await control.expect(TransferReady)
        async with open_ws(port, "/", link_headers("c1", transfer="t1")):
            pass
        abort = await control.expect(TransferAbort)
        assert (abort.transfer, abort.client) == ("t1", "c1")
        assert await game.next_event("in_aborted") == ("in_aborted", "c1", abort.reason)


async def test_reject_from_on_transfer_prepare() -> None:
    target, source = Game("game-b"), Game("game-a")
    target.refuse.add("in")
    source.refuse.add("out")
    async with serving(target, source) as [port_b, port_a]:
        async with open_control(port_b) as control_b:
            await control_b.send(
                TransferPrepare(transfer="t1", client="c1", source="a", reason="admin", timeout_ms=LONG_MS)
            )
            reject = await control_b.expect(TransferReject)
            assert reject.transfer == "t1" and "refused" in reject.reason
            assert target.kinds() == ["prepare"]  # nothing to abort: it never agreed
        async with open_control(port_a) as control_a, open_ws(port_a, "/", link_headers("c1")):
            await source.next_event("connect")
            await control_a.send(
                TransferNotice(transfer="t2", client="c1", target="b", reason="admin", timeout_ms=LONG_MS)
            )
            assert (await control_a.expect(TransferReject)).transfer == "t2"
            # Atlas's begin for it still gets an answer.
            await control_a.send(TransferBegin(transfer="t2", client="c1", delivered=0, timeout_ms=LONG_MS))
            assert "refused" in (await control_a.expect(TransferReject)).reason
            assert "out" not in source.kinds()


async def test_one_transfer_per_client_and_unknown_clients_are_refused() -> None:
    game = Game("game-a")
    async with serving(game) as [port], open_control(port) as control, open_ws(port, "/", link_headers("c1")):
        await game.next_event("connect")
        await control.send(
            TransferNotice(transfer="t0", client="nobody", target="b", reason="admin", timeout_ms=LONG_MS)
        )
        assert "not on game-a" in (await control.expect(TransferReject)).reason
        await control.send(
            TransferNotice(transfer="t1", client="c1", target="b", reason="admin", timeout_ms=LONG_MS)
        )
        await game.next_event("prepare")
        # Another Atlas node cannot move the client while this one does.
        async with open_control(port) as other:
            await other.send(
                TransferNotice(transfer="t2", client="c1", target="c", reason="admin", timeout_ms=LONG_MS)
            )
            reject = await other.expect(TransferReject)
            assert reject.transfer == "t2" and "already being transferred (t1)" in reject.reason
        assert game.statistics().transfers_in_progress == 1


async def test_a_new_notice_from_the_same_atlas_supersedes_the_previous_transfer() -> None:
    # Atlas runs one transfer per client at a time: a new notice means it gave up the previous one,
    # whose transfer.abort never came (Atlas bounds the time it spends telling servers).
    game = Game("game-a")
    async with serving(game) as [port], open_control(port) as control, open_ws(port, "/", link_headers("c1")):
        await game.next_event("connect")
        await control.send(
            TransferNotice(transfer="t1", client="c1", target="b", reason="admin", timeout_ms=LONG_MS)
        )
        await game.next_event("prepare")
        await control.send(
            TransferNotice(transfer="t2", client="c1", target="c", reason="admin", timeout_ms=LONG_MS)
        )
        assert await game.next_event("aborted") == ("aborted", "c1")  # t1, rolled back here
        _, info = await game.next_event("prepare")
        assert (info.id, info.peer) == ("t2", "c")
        # A late step of t1 is refused with how it ended; t2 goes on.
        await control.send(TransferBegin(transfer="t1", client="c1", delivered=0, timeout_ms=LONG_MS))
        reject = await control.expect(TransferReject)
        assert reject.transfer == "t1" and "Atlas started transfer t2" in reject.reason
        await control.send(TransferBegin(transfer="t2", client="c1", delivered=0, timeout_ms=LONG_MS))
        assert (await control.expect(TransferState)).transfer == "t2"


async def test_a_full_or_draining_target_refuses() -> None:
    game = Game("game-b", capacity=1)
    async with serving(game) as [port], open_control(port) as control, open_ws(port, "/", link_headers("c0")):
        await game.next_event("connect")
        await control.send(
            TransferPrepare(transfer="t1", client="c1", source="a", reason="admin", timeout_ms=LONG_MS)
        )
        assert "full" in (await control.expect(TransferReject)).reason
        game.capacity = 10
        game.accepting = False
        await control.send(
            TransferPrepare(transfer="t2", client="c1", source="a", reason="admin", timeout_ms=LONG_MS)
        )
        assert "not accepting" in (await control.expect(TransferReject)).reason
        assert "prepare" not in game.kinds()


# --------------------------------------------------------------------------------------------------
# Transfers the game asks for: request_transfer (transfer.request, answered accepted / refused)


async def test_request_transfer_returns_the_transfer_id_or_raises_atlas_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="atlas.sdk")
    game = Game("game-a")
    async with serving(game) as [port], open_control(port) as control:
        async with open_ws(port, "/", link_headers("c1")) as link:
            await game.next_event("connect")
            await link.send_message("move game-b")
            request = await control.expect(TransferRequest)
            assert (request.client, request.target, request.reason) == ("c1", "game-b", "client_request")
            await control.send(TransferAccepted(request=request.request, transfer="t-7"))
            assert await receive(link) == "accepted: t-7"

            await link.send_message("move nowhere")
            second = await control.expect(TransferRequest)
            assert second.request != request.request  # ids are not reused on a channel
            await control.send(TransferRefused(request=second.request, reason="no server nowhere"))
            assert await receive(link) == "refused: no server nowhere"

            # An answer nobody waits for (repeated, or too late) is logged and ignored.
            await control.send(TransferAccepted(request=request.request, transfer="t-7"))
            await link.send_message("still here")
            assert await receive(link) == "game-a:still here:1"
    assert any("no such request is waiting" in r.getMessage() for r in caplog.records)


async def test_request_transfer_without_a_control_channel_raises() -> None:
    game = Game("game-a")
    async with serving(game) as [port], open_ws(port, "/", link_headers("c1")) as link:
        await game.next_event("connect")
        await link.send_message("move game-b")
        assert await receive(link) == "refused: game-a has no control channel from Atlas"


async def test_request_transfer_fails_when_the_channel_closes_before_the_answer() -> None:
    game = Game("game-a")
    async with serving(game) as [port], open_ws(port, "/", link_headers("c1")) as link:
        await game.next_event("connect")
        async with open_control(port) as control:
            await link.send_message("move game-b")
            await control.expect(TransferRequest)
        assert (
            await receive(link) == "refused: the control channel from fake-atlas closed before Atlas answered"
        )


async def test_request_transfer_without_an_answer_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("atlas.sdk._requests.REQUEST_TIMEOUT", 0.2)
    game = Game("game-a")
    async with serving(game) as [port], open_control(port) as control:
        async with open_ws(port, "/", link_headers("c1")) as link:
            await game.next_event("connect")
            await link.send_message("move game-b")
            await control.expect(TransferRequest)
            assert await receive(link) == "refused: no answer from Atlas within 0.2 s"


async def test_request_transfer_checks_its_arguments() -> None:
    game = Game("game-a")
    async with serving(game) as [port], open_control(port):
        async with open_ws(port, "/", link_headers("c1")):
            await game.next_event("connect")
            player = game.players["c1"]
            with pytest.raises(ValueError, match="reason must be one of"):
                await game.request_transfer(player, "game-b", "teleport")  # type: ignore[arg-type]
        await game.next_event("disconnect")
        with pytest.raises(TransferRequestRefused) as refused:
            await game.request_transfer(player, "game-b")
        assert refused.value.reason == "player c1 is not on game-a"


async def test_request_transfer_through_atlas_moves_the_player_with_its_state() -> None:
    """A real Atlas: the game asks, Atlas accepts and runs the usual transfer; or Atlas says why not."""
    games = {name: Game(name) for name in ("gs-a", "gs-b")}
    async with serving(*games.values()) as ports:
        config = Config(
            proxy=ProxyConfig(listen="127.0.0.1:0"),
            admin=AdminConfig(listen="127.0.0.1:0"),
            servers=tuple(
                ServerConfig(
                    name=name, url=f"ws://{HOST}:{port}/play", control_url=f"ws://{HOST}:{port}{CONTROL}"
                )
                for name, port in zip(games, ports, strict=True)
            ),
        )
        async with trio.open_nursery() as nursery:
            atlas: AtlasStarted = await nursery.start(serve_atlas, config)
            channels = atlas.transfers.channels
            await until(lambda: all(channels.get(name) is not None for name in games))
            async with open_ws(atlas.proxy.port, "/play") as ws:
                await ws.send_message("m0")
                first = await receive(ws)
                assert isinstance(first, str)
                here = first.split(":")[0]
                there = next(name for name in games if name != here)
                source, target = games[here], games[there]
                await ws.send_message("m1")
                assert await receive(ws) == f"{here}:m1:2"
                (client,) = source.players

                await ws.send_message("move nowhere")
                assert await receive(ws) == "refused: no server nowhere"
                await ws.send_message(f"move {here}")
                assert await receive(ws) == f"refused: client {client} is already on {here}"

                await ws.send_message(f"move {there}")
                accepted = await receive(ws)
                assert isinstance(accepted, str) and accepted.startswith("accepted: t-")
                # The usual transfer follows: the target says it arrived once it owns the client.
                assert await receive(ws) == "arrived"
                assert await target.next_event("in") == ("in", client, {"count": 2})
                await ws.send_message("m2")
                assert await receive(ws) == f"{there}:m2:3"  # same connection, and the count moved along
                _, info = await source.next_event("prepare")
                assert (info.id, info.reason, info.peer) == (
                    accepted.removeprefix("accepted: "),
                    "client_request",
                    there,
                )
                assert await source.next_event("disconnect") == ("disconnect", client, "transferred")
                assert ws.closed is None
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------------------------------
# The count a source reports covers exactly what its link carries (hypothesis, real sockets)


async def _sent_scenario(before: list[str], during: list[str], abort: bool) -> None:
    game = Game("game-a")
    async with serving(game) as [port], open_control(port) as control:
        async with open_ws(port, "/", link_headers("c1")) as link, trio.open_nursery() as nursery:
            await game.next_event("connect")
            seen: list[str | bytes] = []
            closed: list[tuple[int, str | None]] = []
            arrived = trio.Event()

            async def read_link() -> None:
                nonlocal arrived
                try:
                    while True:
                        seen.append(await link.get_message())
                        arrived.set()
                        arrived = trio.Event()
                except ConnectionClosed as exc:
                    assert exc.reason is not None
                    closed.append((exc.reason.code, exc.reason.reason))
                    arrived.set()

            async def wait_seen(n: int) -> None:
                with trio.fail_after(STEP):
                    while len(seen) < n and not closed:
                        await arrived.wait()

            async def wait_echo(message: str) -> None:
                with trio.fail_after(STEP):
                    while message not in seen and not closed:
                        await arrived.wait()

            accepted = 0  # game sends the SDK took (sent, or queued during the hand-off)

            async def play(script: list[str], first: int) -> int:
                nonlocal accepted
                ticks = first
                for op in script:
                    if op == "game":
                        accepted += await game.send_to("c1", f"tick{ticks}")
                        ticks += 1
                    else:
                        await trio.lowlevel.checkpoint()
                return ticks

            nursery.start_soon(read_link)
            clients = ticks = 0
            for op in before:
                if op == "client":
                    await link.send_message(f"c{clients}")
                    clients += 1
                else:
                    ticks = await play([op], ticks)
            await control.send(
                TransferNotice(transfer="t", client="c1", target="b", reason="admin", timeout_ms=LONG_MS)
            )
            await control.send(
                TransferBegin(transfer="t", client="c1", delivered=clients, timeout_ms=LONG_MS)
            )
            # Game sends race with the snapshot.
            played = trio.Event()

            async def play_during() -> None:
                await play(during, ticks)
                played.set()

            nursery.start_soon(play_during)
            state = await control.expect(TransferState)
            read_before_state = len(seen)
            assert state.sent >= read_before_state  # the rest is still in flight
            event(
                "messages in flight when the state arrived"
                if state.sent > read_before_state
                else "none in flight"
            )
            await wait_seen(state.sent)
            assert state.state == ({"count": clients} if clients else {})
            expected_echoes = [f"game-a:c{i}:{i + 1}" for i in range(clients)]
            queued = accepted - (state.sent - clients)
            event("sends queued during the hand-off" if queued else "none queued")
            if abort:
                await control.send(TransferAbort(transfer="t", client="c1", reason="test"))
                await game.next_event("aborted")
                await link.send_message("fin")
                expected_echoes.append(f"game-a:fin:{clients + 1}")
                with trio.fail_after(STEP):
                    await played.wait()
                await wait_echo(expected_echoes[-1])
                # Everything the SDK counted reaches the link, and nothing else.
                player = game.players["c1"]
                await wait_seen(player.sent)
                assert len(seen) == player.sent
            else:
                await control.send(TransferComplete(transfer="t", client="c1"))
                await wait_seen(state.sent + 1)
                # Exactly `sent` messages, then the close: nothing after the cut.
                assert closed == [(1000, "transferred")]
                assert len(seen) == state.sent
            echoes = [m for m in seen if isinstance(m, str) and m.startswith("game-a:")]
            assert echoes == expected_echoes
            game_sends = [m for m in seen if isinstance(m, str) and m.startswith("tick")]
            assert game_sends == [f"tick{i}" for i in range(len(game_sends))]  # in order, none twice
            nursery.cancel_scope.cancel()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    before=st.lists(st.sampled_from(["client", "game", "yield"]), max_size=12),
    during=st.lists(st.sampled_from(["game", "yield"]), max_size=8),
    abort=st.booleans(),
)
def test_sent_is_exactly_what_the_link_carries_before_the_source_goes_quiet(
    before: list[str], during: list[str], abort: bool
) -> None:
    trio.run(_sent_scenario, before, during, abort)


# --------------------------------------------------------------------------------------------------
# Pure parts: the phase table and the send gate


def test_handoff_tables_allow_only_the_protocol_order() -> None:
    for direction, table in (("out", SOURCE_TRANSITIONS), ("in", TARGET_TRANSITIONS)):
        for start, allowed in table.items():
            for phase in Phase:
                if phase not in table:
                    continue
                handoff = Handoff(direction, start)  # type: ignore[arg-type]
                if phase in allowed:
                    handoff.advance(phase)
                    assert handoff.phase is phase
                else:
                    with pytest.raises(IllegalHandoff):
                        handoff.advance(phase)
    source = Handoff("out")
    begin = TransferBegin(transfer="t", client="c", delivered=0, timeout_ms=1)
    complete = TransferComplete(transfer="t", client="c")
    abort = TransferAbort(transfer="t", client="c", reason="r")
    assert source.accepts(begin) and source.accepts(abort) and not source.accepts(complete)
    for phase in (Phase.NOTIFIED, Phase.DRAINING, Phase.HANDED_OFF):
        source.advance(phase)
    assert source.accepts(complete) and not source.accepts(begin)
    source.advance(Phase.COMPLETED)
    assert source.done and not source.accepts(abort)
    target = Handoff("in")
    commit = TransferCommit(transfer="t", client="c", state=None, timeout_ms=1)
    assert not target.accepts(commit)
    target.advance(Phase.READY)
    assert target.accepts(commit)


class FakeOutbox:
    """A bounded outbox in place of the link's WebSocket; the test plays the writer."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: collections.deque[str | bytes] = collections.deque()
        self.room = trio.Event()
        self.arrived = trio.Event()

    def send_nowait(self, message: str | bytes) -> None:
        if len(self.items) >= self.size:
            raise trio.WouldBlock
        self.items.append(message)
        self.arrived.set()

    async def wait_room(self) -> None:
        while len(self.items) >= self.size:
            self.room = trio.Event()
            await self.room.wait()

    def finish(self) -> None:
        pass

    def drain(self) -> list[str | bytes]:
        out = list(self.items)
        self.items.clear()
        self.room.set()
        return out

    async def receive(self) -> str | bytes:
        while not self.items:
            self.arrived = trio.Event()
            await self.arrived.wait()
        self.room.set()
        return self.items.popleft()


def make_player(size: int, send_timeout: float = 1.0) -> tuple[Player, FakeOutbox]:
    outbox = FakeOutbox(size)
    return Player("p", path="/", headers={}, outbox=outbox, send_timeout=send_timeout), outbox


def drain(outbox: FakeOutbox) -> list[str | bytes]:
    return outbox.drain()


async def test_gate_queues_then_flushes_in_order(autojump_clock: trio.testing.MockClock) -> None:
    player, inbox = make_player(16)
    await player.send("a")
    assert await player._hold() == 1
    await player.send("b")
    await player.send(b"c")
    assert (player.sent, player.handing_off, drain(inbox)) == (1, True, ["a"])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(player._release)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(player.send, "d")  # must not overtake the flush
    assert (player.sent, player.handing_off, drain(inbox)) == (4, False, ["b", b"c", "d"])
    with pytest.raises(TypeError):
        await player.send(42)  # type: ignore[arg-type]


async def test_hold_waits_for_a_send_in_progress(autojump_clock: trio.testing.MockClock) -> None:
    player, inbox = make_player(1, send_timeout=30.0)
    await player.send("a")
    held: list[int] = []

    async def hold() -> None:
        held.append(await player._hold())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(player.send, "b")  # blocks: the outbox is full
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(hold)
        await trio.testing.wait_all_tasks_blocked()
        assert held == []
        assert await inbox.receive() == "a"
    # "b" went out before the gate closed, so the count includes it.
    assert held == [2] and await inbox.receive() == "b"


async def test_a_player_whose_outbox_stays_full_is_dropped(autojump_clock: trio.testing.MockClock) -> None:
    player, _inbox = make_player(1, send_timeout=2.0)
    await player.send("a")
    start = trio.current_time()
    with pytest.raises(PlayerDisconnected) as caught:
        await player.send("b")
    assert caught.value.reason == "too_slow"
    assert trio.current_time() - start == pytest.approx(2.0)
    assert not player.connected and player.sent == 1
