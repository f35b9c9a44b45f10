"""Tests for the demo game servers and the interactive client (real sockets on 127.0.0.1)."""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import socket
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
    wrap_client_stream,
)
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from atlas.config import AdminConfig, Config, ProxyConfig, ServerConfig
from atlas.demo import (
    ChatRoom,
    run_client,
    serve_chat_server,
    serve_demo_cluster,
    serve_echo_server,
)
from atlas.demo.rules import ChatRules, EchoRules, Move, Profile, Say
from atlas.supervisor import AtlasStarted, serve_atlas
from tests.wsclient import until

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
# Generous bound for one test step on a loaded CI machine; nothing here should come close.
STEP = 10.0


def url(port: int) -> str:
    return f"ws://{HOST}:{port}/"


@asynccontextmanager
async def connect(port: int, *, max_message_size: int = 1024 * 1024) -> AsyncIterator[WebSocketConnection]:
    """A test client that owns its TCP stream.

    trio-websocket 0.12's ``open_websocket_url`` leaves the client socket open when the server
    starts the closing handshake, which ``filterwarnings = error`` turns into a failure.
    """
    with trio.fail_after(STEP):
        stream = await trio.open_tcp_stream(HOST, port)
    async with stream, trio.open_nursery() as nursery:
        with trio.fail_after(STEP):
            ws = await wrap_client_stream(
                nursery, stream, f"{HOST}:{port}", "/", max_message_size=max_message_size
            )
        try:
            yield ws
        finally:
            with trio.move_on_after(STEP, shield=True):
                await ws.aclose()
            nursery.cancel_scope.cancel()


async def receive(ws: WebSocketConnection) -> str | bytes:
    with trio.fail_after(STEP):
        return await ws.get_message()


async def receive_text(ws: WebSocketConnection) -> str:
    message = await receive(ws)
    assert isinstance(message, str)
    return message


class RawClient:
    """A wsproto client over a trio stream, for sending exactly the frames a test needs."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: deque[Event] = deque()

    @classmethod
    @asynccontextmanager
    async def open(cls, port: int) -> AsyncIterator[RawClient]:
        with trio.fail_after(STEP):
            stream = await trio.open_tcp_stream(HOST, port)
        async with stream:
            client = cls(stream)
            await client.send(Request(host=f"{HOST}:{port}", target="/"))
            assert isinstance(await client.next_event(), AcceptConnection)
            yield client

    async def send(self, *events: Event) -> None:
        await self.stream.send_all(b"".join(self.ws.send(event) for event in events))

    async def next_event(self) -> Event:
        with trio.fail_after(STEP):
            while not self.events:
                data = await self.stream.receive_some(65536)
                self.ws.receive_data(data or None)
                self.events.extend(self.ws.events())
        return self.events.popleft()


def unused_port() -> int:
    """A port nothing listens on (bound, then released; the kernel does not reuse it soon)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
        assert isinstance(port, int)
        return port


# ------------------------------------------------------------------------------------------------
# ChatRoom (sans-IO)


def test_chat_room_numbers_players_and_routes_messages() -> None:
    room = ChatRoom("game-server-2")
    first, welcome = room.join()
    second, _ = room.join()
    assert (first, second) == ("player-1", "player-2")
    assert welcome.recipients == ("player-1",)
    assert welcome.message == "welcome to game-server-2, you are player-1"

    said = room.receive_text("player-2", "hello")
    assert said.recipients == ("player-1", "player-2")
    assert said.message == "[game-server-2] player-2: hello"

    who = room.receive_text("player-1", "/who")
    assert who.recipients == ("player-1",)
    assert who.message == "players on game-server-2: player-1, player-2"
    assert room.receive_text("player-2", "/server").message == "game-server-2"

    assert room.leave("player-1")
    assert not room.leave("player-1")
    assert room.players == ("player-2",)
    third, _ = room.join()
    assert third == "player-3"  # numbers are never reused
    assert room.receive_text("player-1", "ghost").recipients == ()


# ------------------------------------------------------------------------------------------------
# The demo cluster's rules (sans-IO): profiles, commands, moves


def test_chat_rules_greet_broadcast_and_answer_commands() -> None:
    room = ChatRules("game-server-2")
    assert room.join("c1") == [Say(("c1",), "welcome to game-server-2, you are player-1")]
    room.join("c2")
    assert room.receive("c1", "hi") == [Say(("c1", "c2"), "[game-server-2] player-1: hi")]
    assert room.receive("c2", "/who") == [Say(("c2",), "players on game-server-2: player-1, player-2")]
    assert room.receive("c2", "/server") == [Say(("c2",), "game-server-2")]
    assert room.receive("c1", "/nick ada") == [Say(("c1",), "you are now ada")]
    assert room.receive("c1", "  /me ") == [Say(("c1",), "you are ada, 1 message sent, on game-server-2")]
    assert room.receive("c1", "/nick two words") == [
        Say(("c1",), "usage: /nick NAME (up to 24 characters, no spaces)")
    ]
    assert room.receive("c1", "/dance") == [Say(("c1", "c2"), "[game-server-2] ada: /dance")]  # plain text
    assert room.receive("c1", "/me") == [Say(("c1",), "you are ada, 2 messages sent, on game-server-2")]
    assert room.receive("ghost", "hi") == []
    assert room.leave("c1")
    assert not room.leave("c1")


def test_echo_rules_echo_without_a_greeting() -> None:
    game = EchoRules("game-server-1")
    assert game.join("c1") == []
    assert game.receive("c1", "ping") == [Say(("c1",), "ping")]
    assert game.receive("c1", "/me") == [Say(("c1",), "you are player-1, 1 message sent, on game-server-1")]


def test_move_commands_and_their_answers() -> None:
    room = ChatRules("game-server-2")
    room.join("c1")
    assert room.receive("c1", "/move game-server-3") == Move("c1", "game-server-3")
    assert room.receive("c1", "/move game-server-2") == [
        Say(("c1",), "cannot move: you are already on game-server-2")
    ]
    usage = [Say(("c1",), "usage: /move <server>, for example /move game-server-2")]
    assert room.receive("c1", "/move") == usage
    assert room.receive("c1", "/move a b") == usage
    move = Move("c1", "game-server-3")
    assert room.moving(move) == [Say(("c1",), "moving to game-server-3...")]
    assert room.cannot_move(move, "no server game-server-3") == [
        Say(("c1",), "cannot move: no server game-server-3")
    ]
    assert room.receive("c1", "/me") == [Say(("c1",), "you are player-1, 0 messages sent, on game-server-2")]


def test_a_profile_travels_as_the_transfer_state() -> None:
    west, east = ChatRules("game-server-2"), ChatRules("game-server-3")
    west.join("c1")
    west.receive("c1", "/nick ada")
    west.receive("c1", "hello")
    state = west.state_of("c1")
    assert state == {"nick": "ada", "messages": 1}
    east.join("c9")
    assert east.arrive("c1", state) == [
        Say(("c1",), "welcome to game-server-3, you are ada (1 message sent so far)")
    ]
    assert east.receive("c1", "/me") == [Say(("c1",), "you are ada, 1 message sent, on game-server-3")]
    assert east.receive("c1", "again") == [Say(("c9", "c1"), "[game-server-3] ada: again")]
    assert east.profile("c1") == Profile("ada", 2)


def test_new_names_skip_names_that_moved_in_and_bad_states_start_afresh() -> None:
    room = ChatRules("game-server-3")
    room.arrive("c1", {"nick": "player-1", "messages": 4})
    room.join("c2")
    assert [p.nick for p in room.players.values()] == ["player-1", "player-2"]
    bad_states: list[Any] = [
        None,
        [],
        {"nick": "", "messages": 1},
        {"nick": "x", "messages": -1},
        {"nick": "x"},
    ]
    for bad in [*bad_states, {"nick": "x", "messages": True}, {"nick": "a b", "messages": 1}]:
        assert Profile.from_state(bad) is None
    assert room.arrive("c3", {"nick": 7}) == [
        Say(("c3",), "welcome to game-server-3, you are player-3"),
        Say(("c3",), "your profile did not survive the move"),
    ]


# ------------------------------------------------------------------------------------------------
# Echo server


async def test_echo_server_echoes_text_and_bytes_in_order(nursery: trio.Nursery) -> None:
    port = await nursery.start(serve_echo_server, HOST, 0)
    assert isinstance(port, int)
    assert port > 0
    messages: list[str | bytes] = ["hello", b"\x00\x01binary", "", b"", "ünïcødé", "last"]
    async with connect(port) as ws:
        for message in messages:
            await ws.send_message(message)
        for message in messages:
            assert await receive(ws) == message


async def test_echo_server_echoes_a_5_mb_binary_message(nursery: trio.Nursery) -> None:
    port = await nursery.start(serve_echo_server, HOST, 0)
    payload = bytes(range(256)) * (5 * 1024 * 1024 // 256)
    async with connect(port, max_message_size=8 * 1024 * 1024) as ws:
        await ws.send_message(payload)
        assert await receive(ws) == payload


async def test_echo_server_echoes_the_close_code(nursery: trio.Nursery) -> None:
    port = await nursery.start(serve_echo_server, HOST, 0)
    async with connect(port) as ws:
        with trio.fail_after(STEP):
            await ws.aclose(4001, "bye now")
        # trio-websocket records the code and reason of the close frame the server answered with.
        assert ws.closed is not None
        assert (ws.closed.code, ws.closed.reason) == (4001, "bye now")
    async with connect(port) as ws:
        await ws.send_message("still serving")
        assert await receive(ws) == "still serving"


async def test_echo_server_echoes_fragments_with_an_interleaved_ping(nursery: trio.Nursery) -> None:
    port = await nursery.start(serve_echo_server, HOST, 0)
    async with RawClient.open(port) as client:
        await client.send(
            TextMessage("frag", message_finished=False),
            Ping(b"mid"),
            TextMessage("mented", message_finished=True),
        )
        assert await client.next_event() == Pong(b"mid")
        echoed = await client.next_event()
        assert isinstance(echoed, TextMessage)
        assert echoed.data == "fragmented"
        await client.send(CloseConnection(3000, "custom"))
        closed = await client.next_event()
        assert isinstance(closed, CloseConnection)
        assert (closed.code, closed.reason) == (3000, "custom")


async def test_echo_server_fails_the_connection_on_invalid_utf8(nursery: trio.Nursery) -> None:
    port = await nursery.start(serve_echo_server, HOST, 0)
    async with RawClient.open(port) as client:
        # A masked (all-zero key) text frame whose payload is not UTF-8.
        await client.stream.send_all(b"\x81\x82\x00\x00\x00\x00\xff\xfe")
        closed = await client.next_event()
        # trio-websocket fails the connection by dropping TCP (1006), which Autobahn accepts;
        # a close frame with 1007 would be accepted as well.
        assert isinstance(closed, CloseConnection)
        assert closed.code in (1006, 1007)


async def test_echo_server_closes_sessions_with_1001_on_shutdown(nursery: trio.Nursery) -> None:
    server_scope = trio.CancelScope()

    async def run_server(*, task_status: trio.TaskStatus[int]) -> None:
        with server_scope:
            await serve_echo_server(HOST, 0, task_status=task_status)

    port = await nursery.start(run_server)
    async with connect(port) as ws:
        await ws.send_message("before")
        assert await receive(ws) == "before"
        server_scope.cancel()
        with pytest.raises(ConnectionClosed) as closed:
            await receive(ws)
        assert closed.value.reason is not None
        assert closed.value.reason.code == 1001


async def test_echo_server_refuses_messages_over_the_limit(nursery: trio.Nursery) -> None:
    port = await nursery.start(partial(serve_echo_server, max_message_size=1024), HOST, 0)
    async with connect(port) as ws:
        await ws.send_message(b"x" * 2048)
        with pytest.raises(ConnectionClosed) as closed:
            await receive(ws)
        assert closed.value.reason is not None
        assert closed.value.reason.code == 1009


async def test_echo_server_survives_a_garbage_client(nursery: trio.Nursery) -> None:
    port = await nursery.start(serve_echo_server, HOST, 0)
    stream = await trio.open_tcp_stream(HOST, port)
    async with stream:
        await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        with trio.fail_after(STEP):
            answer = await stream.receive_some(1024)
        assert answer.startswith(b"HTTP/1.1 400")
    async with connect(port) as ws:
        await ws.send_message("ok")
        assert await receive(ws) == "ok"


async def test_port_in_use_raises_oserror(nursery: trio.Nursery) -> None:
    port = await nursery.start(serve_echo_server, HOST, 0)
    with pytest.raises(OSError) as raised, trio.fail_after(STEP):
        await nursery.start(serve_echo_server, HOST, port)
    assert raised.value.errno == errno.EADDRINUSE
    assert f"{HOST}:{port}" in str(raised.value)


# ------------------------------------------------------------------------------------------------
# Chat server


async def test_chat_server_welcome_broadcast_who_and_server(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="atlas.demo")
    port = await nursery.start(partial(serve_chat_server, name="game-server-2"), HOST, 0)
    async with connect(port) as alice:
        assert await receive(alice) == "welcome to game-server-2, you are player-1"
        async with connect(port) as bob:
            assert await receive(bob) == "welcome to game-server-2, you are player-2"

            await alice.send_message("hi bob")
            assert await receive(alice) == "[game-server-2] player-1: hi bob"
            assert await receive(bob) == "[game-server-2] player-1: hi bob"

            await bob.send_message("/who")
            assert await receive(bob) == "players on game-server-2: player-1, player-2"
            await bob.send_message("/server")
            assert await receive(bob) == "game-server-2"

            # /who and /server went to bob only: alice's next message is the next broadcast.
            await bob.send_message("hi alice")
            assert await receive(alice) == "[game-server-2] player-2: hi alice"
            assert await receive(bob) == "[game-server-2] player-2: hi alice"

            await bob.send_message(b"\x01\x02")
            assert await receive(bob) == b"\x01\x02"

        # bob left: the server notices and drops him from the list.
        with trio.fail_after(STEP):
            while True:
                await alice.send_message("/who")
                if await receive(alice) == "players on game-server-2: player-1":
                    break
                await trio.sleep(0.01)

    # bob's departure was logged in the same step that took him off the list.
    lines = [r.getMessage() for r in caplog.records if r.name == "atlas.demo"]
    assert "game-server-2: player-1 connected from 127.0.0.1:" in "\n".join(lines)
    assert "game-server-2: player-2 disconnected" in lines


async def test_chat_server_drops_a_player_that_does_not_read(nursery: trio.Nursery) -> None:
    port = await nursery.start(
        partial(serve_chat_server, name="chat", queue_size=2, send_timeout=1.0), HOST, 0
    )
    big = "x" * (512 * 1024)
    # A client that stops reading after the welcome: once trio-websocket's one-message queue is
    # full its reader stops, and the TCP window fills up.
    async with connect(port) as sleeper:
        assert await receive(sleeper) == "welcome to chat, you are player-1"
        async with connect(port, max_message_size=2 * len(big)) as talker:
            assert await receive(talker) == "welcome to chat, you are player-2"
            with trio.fail_after(STEP):
                while True:
                    await talker.send_message(big)
                    assert await receive(talker) == f"[chat] player-2: {big}"
                    await talker.send_message("/who")
                    if await receive(talker) == "players on chat: player-2":
                        break
            # The talker was never held up and keeps being served.
            await talker.send_message("/server")
            assert await receive(talker) == "chat"


# ------------------------------------------------------------------------------------------------
# Demo cluster


async def test_demo_cluster_starts_three_servers(nursery: trio.Nursery) -> None:
    ports = await nursery.start(serve_demo_cluster, HOST, (0, 0, 0))
    assert isinstance(ports, list)
    assert len(ports) == 3
    assert len(set(ports)) == 3
    async with connect(ports[0]) as echo:
        await echo.send_message("ping")
        assert await receive(echo) == "ping"
    for index, port in enumerate(ports[1:], start=2):
        async with connect(port) as chat:
            assert await receive(chat) == f"welcome to game-server-{index}, you are player-1"
            await chat.send_message("/server")
            assert await receive(chat) == f"game-server-{index}"


async def test_demo_cluster_port_in_use_raises_oserror_and_releases_ports(
    nursery: trio.Nursery,
) -> None:
    taken = await nursery.start(serve_echo_server, HOST, 0)
    free = unused_port()
    with pytest.raises(OSError) as raised, trio.fail_after(STEP):
        await nursery.start(serve_demo_cluster, HOST, (free, taken, 0))
    assert raised.value.errno == errno.EADDRINUSE
    # The port bound before the failure was released again.
    port = await nursery.start(serve_echo_server, HOST, free)
    assert port == free


@asynccontextmanager
async def demo_world(nursery: trio.Nursery) -> AsyncIterator[AtlasStarted]:
    """The demo cluster on free ports, and Atlas in front of it with a control channel to each server."""
    ports = await nursery.start(serve_demo_cluster, HOST, (0, 0, 0))
    config = Config(
        proxy=ProxyConfig(listen=f"{HOST}:0"),
        admin=AdminConfig(listen=f"{HOST}:0"),
        servers=tuple(
            ServerConfig(
                name=f"game-server-{i + 1}",
                url=f"ws://{HOST}:{port}",
                control_url=f"ws://{HOST}:{port}/atlas/control",
            )
            for i, port in enumerate(ports)
        ),
    )
    async with trio.open_nursery() as inner:
        atlas: AtlasStarted = await inner.start(serve_atlas, config)
        channels = atlas.transfers.channels
        await until(lambda: all(channels.get(server.name) for server in config.servers))
        yield atlas
        inner.cancel_scope.cancel()


async def test_demo_cluster_moves_a_player_with_its_profile_over_one_connection(
    nursery: trio.Nursery,
) -> None:
    async with demo_world(nursery) as atlas, connect(atlas.proxy.port) as ws:
        # Wherever the balancer put the player: a chat room greets it first, the echo game does not.
        await ws.send_message("/server")
        while (here := await receive_text(ws)).startswith("welcome to "):
            pass
        (session,) = atlas.runtime.clients
        await ws.send_message("/nick ada")
        assert await receive_text(ws) == "you are now ada"
        await ws.send_message("hello")
        assert await receive_text(ws) in ("hello", f"[{here}] ada: hello")

        async def move(target: str, sent: int) -> None:
            await ws.send_message(f"/move {target}")
            assert await receive_text(ws) == f"moving to {target}..."
            message = "message" if sent == 1 else "messages"
            assert (
                await receive_text(ws) == f"welcome to {target}, you are ada ({sent} {message} sent so far)"
            )

        if here != "game-server-2":
            await move("game-server-2", 1)
        await ws.send_message("on two")
        assert await receive_text(ws) == "[game-server-2] ada: on two"
        await move("game-server-3", 2)
        await ws.send_message("/me")
        assert await receive_text(ws) == "you are ada, 2 messages sent, on game-server-3"
        await ws.send_message("on three")
        assert await receive_text(ws) == "[game-server-3] ada: on three"
        await move("game-server-2", 3)
        await ws.send_message("/me")
        assert await receive_text(ws) == "you are ada, 3 messages sent, on game-server-2"

        await ws.send_message("/move nowhere")
        assert await receive_text(ws) == "cannot move: no server nowhere"
        await ws.send_message("/move game-server-2")
        assert await receive_text(ws) == "cannot move: you are already on game-server-2"
        await ws.send_message("/server")
        assert await receive_text(ws) == "game-server-2"

        # One connection all along: the same client session in Atlas, never closed.
        assert ws.closed is None
        assert list(atlas.runtime.clients) == [session]


async def test_two_server_world_example_runs_and_exits_0() -> None:
    spec = importlib.util.spec_from_file_location(
        "two_server_world", REPO_ROOT / "examples" / "two_server_world.py"
    )
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    lines: list[str] = []
    with trio.fail_after(30):
        assert await example.main(lines.append) == 0
    transcript = "\n".join(lines)
    assert "< you are now ada" in lines
    assert "< moving to world-" in transcript
    assert lines[-1].startswith("-- one connection all along")
    assert any(line.startswith("< you are ada, 4 messages sent, on world-") for line in lines)


# ------------------------------------------------------------------------------------------------
# Interactive client


class Output:
    """Collects the client's output lines and lets a test wait for a given number of them."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._changed = trio.Event()

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, count: int) -> list[str]:
        with trio.fail_after(STEP):
            while len(self.lines) < count:
                await self._changed.wait()
        return self.lines


async def test_client_sends_lines_prints_messages_and_exits_0_on_eof(
    nursery: trio.Nursery,
) -> None:
    port = await nursery.start(partial(serve_chat_server, name="game-server-2"), HOST, 0)
    stdin_writer, stdin = trio.testing.memory_stream_one_way_pair()
    out = Output()
    status: list[int] = []
    finished = trio.Event()

    async def client() -> None:
        status.append(await run_client(url(port), stdin=stdin, out=out))
        finished.set()

    nursery.start_soon(client)
    assert await out.wait_for(2) == [
        f"connected to {url(port)}",
        "< welcome to game-server-2, you are player-1",
    ]
    # Two lines in one chunk, one split over two chunks, and a CRLF line ending.
    await stdin_writer.send_all(b"hello\n/ser")
    await stdin_writer.send_all(b"ver\r\n")
    assert await out.wait_for(4) == [
        f"connected to {url(port)}",
        "< welcome to game-server-2, you are player-1",
        "< [game-server-2] player-1: hello",
        "< game-server-2",
    ]
    await stdin_writer.aclose()  # end of file
    with trio.fail_after(STEP):
        await finished.wait()
    assert status == [0]
    assert len(out.lines) == 4


async def test_client_reports_server_close(nursery: trio.Nursery) -> None:
    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message(b"\x00" * 3)
        await ws.aclose(4000, "kicked")

    server = await nursery.start(serve_websocket, handler, HOST, 0, None)
    never_written, stdin = trio.testing.memory_stream_one_way_pair()
    out = Output()
    with trio.fail_after(STEP):
        status = await run_client(url(server.port), stdin=stdin, out=out)
    assert status == 1
    assert out.lines == [
        f"connected to {url(server.port)}",
        "< <3 bytes binary>",
        "closed: 4000 kicked",
    ]
    await never_written.aclose()


async def serve_raw(nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=HOST))
    port = listeners[0].socket.getsockname()[1]
    assert isinstance(port, int)
    return port


async def test_client_reports_a_rejected_handshake(nursery: trio.Nursery) -> None:
    async def refuse(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
        await stream.aclose()

    port = await serve_raw(nursery, refuse)
    out = Output()
    with trio.fail_after(STEP):
        status = await run_client(url(port), stdin=trio.testing.MemoryReceiveStream(), out=out)
    assert status == 1
    assert out.lines == [f"error: cannot connect to {url(port)}: handshake rejected with HTTP 503"]


async def test_client_gives_up_after_connect_timeout(nursery: trio.Nursery) -> None:
    async def never_answer(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    port = await serve_raw(nursery, never_answer)
    out = Output()
    with trio.fail_after(STEP):
        status = await run_client(
            url(port), stdin=trio.testing.MemoryReceiveStream(), out=out, connect_timeout=0.2
        )
    assert status == 1
    assert out.lines == [f"error: cannot connect to {url(port)}: timed out after 0.2s"]


async def test_client_reads_the_process_stdin_by_default(nursery: trio.Nursery) -> None:
    port = await nursery.start(serve_echo_server, HOST, 0)
    code = (
        "import sys, trio\n"
        "from atlas.demo import run_client\n"
        f"sys.exit(trio.run(run_client, {url(port)!r}))\n"
    )
    with trio.fail_after(STEP):
        # stdin is a pipe (FdStream); nothing is written, so the client sees end of file.
        result = await trio.run_process(
            [sys.executable, "-c", code], stdin=b"", capture_stdout=True, cwd=REPO_ROOT
        )
    assert result.returncode == 0
    assert result.stdout.decode().splitlines() == [f"connected to {url(port)}"]


async def test_example_reports_a_port_in_use_in_one_line(nursery: trio.Nursery) -> None:
    port = await nursery.start(serve_echo_server, HOST, 0)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with trio.fail_after(STEP):
        result = await trio.run_process(
            [sys.executable, str(REPO_ROOT / "examples" / "chat_server.py"), "--port", str(port)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode().splitlines() == [
        f"error: cannot listen on {HOST}:{port}: {os.strerror(errno.EADDRINUSE)}"
    ]


async def test_client_to_a_closed_port_prints_one_line_and_returns_1() -> None:
    port = unused_port()
    out = Output()
    with trio.fail_after(STEP):
        status = await run_client(url(port), stdin=trio.testing.MemoryReceiveStream(), out=out)
    assert status == 1
    assert out.lines == [f"error: cannot connect to {url(port)}: Connection refused"]


async def test_client_with_a_bad_url_prints_one_line_and_returns_1() -> None:
    out = Output()
    status = await run_client("http://127.0.0.1:1/", stdin=trio.testing.MemoryReceiveStream(), out=out)
    assert status == 1
    assert len(out.lines) == 1
    assert out.lines[0].startswith("error: cannot connect to http://127.0.0.1:1/: ")
