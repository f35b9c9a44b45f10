"""The SDK's own server side of RFC 6455 (atlas/sdk/_websocket.py), over real sockets.

The clients here write raw frames (fragments, pings, bad UTF-8, oversized messages, a client that stops
reading) that trio-websocket's client would not send; the rest of the SDK's link behaviour is covered
through tests/test_sdk.py.
"""

from __future__ import annotations

import base64
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.testing
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import TextMessage

from atlas.sdk import GameServer, Player, PlayerDisconnected
from atlas.sdk._websocket import WebSocket
from tests.test_sdk import STEP, serving

HOST = "127.0.0.1"


class Echo(GameServer):
    """Echoes each message; ``flood`` sends 64 KiB messages until the player is dropped."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.disconnects: list[str] = []
        self.messages: list[str | bytes] = []
        self.flood_ended: list[str] = []
        self.gone = trio.Event()

    async def on_message(self, player: Player, message: str | bytes) -> None:
        self.messages.append(message)
        if message == "flood":
            try:
                for _ in range(10_000):
                    await player.send(b"x" * 65536)
            except PlayerDisconnected as exc:
                self.flood_ended.append(exc.reason)
            return
        await player.send(message)

    async def on_disconnect(self, player: Player, reason: str) -> None:
        self.disconnects.append(reason)
        self.gone.set()


class RawPeer:
    """A client that writes frames by hand (masked with a random key, as RFC 6455 asks)."""

    def __init__(self, stream: trio.SocketStream, rest: bytes) -> None:
        self.stream = stream
        self.buffer = bytearray(rest)

    def frame(self, opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
        key = os.urandom(4)
        masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        n = len(payload)
        first = (0x80 if fin else 0) | opcode
        if n < 126:
            head = struct.pack("!BB", first, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", first, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", first, 0x80 | 127, n)
        return head + key + masked

    async def send(self, *frames: bytes) -> None:
        await self.stream.send_all(b"".join(frames))

    async def receive_frame(self) -> tuple[int, bytes]:
        """The next frame from the server (unmasked): opcode and payload."""
        with trio.fail_after(STEP):
            while True:
                if len(self.buffer) >= 2:
                    n = self.buffer[1] & 0x7F
                    at = 2
                    if n == 126 and len(self.buffer) >= 4:
                        n, at = struct.unpack_from("!H", self.buffer, 2)[0], 4
                    elif n == 127 and len(self.buffer) >= 10:
                        n, at = struct.unpack_from("!Q", self.buffer, 2)[0], 10
                    if (n < 126 or at > 2) and len(self.buffer) >= at + n:
                        opcode = self.buffer[0] & 0x0F
                        payload = bytes(self.buffer[at : at + n])
                        del self.buffer[: at + n]
                        return opcode, payload
                chunk = await self.stream.receive_some(65536)
                assert chunk, "the server closed the TCP connection"
                self.buffer += chunk

    async def expect_close(self) -> tuple[int, str]:
        """The server's Close frame (answered), then the end of the TCP connection."""
        opcode, payload = await self.receive_frame()
        while opcode != 0x8:
            opcode, payload = await self.receive_frame()
        await self.send(self.frame(0x8, payload[:2]))
        with trio.fail_after(STEP):
            while await self.stream.receive_some(65536):
                pass
        code = struct.unpack("!H", payload[:2])[0]
        return code, payload[2:].decode()


async def handshake(stream: trio.SocketStream, request: bytes) -> bytes:
    """Send ``request``; return the server's response head and what came after it."""
    await stream.send_all(request)
    data = b""
    with trio.fail_after(STEP):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            assert chunk
            data += chunk
    return data


@asynccontextmanager
async def open_peer(port: int, client: str = "c1") -> AsyncIterator[RawPeer]:
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET / HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nX-Atlas-Client-Id: {client}\r\n\r\n"
    )
    async with await trio.open_tcp_stream(HOST, port) as stream:
        head, _, rest = (await handshake(stream, request.encode())).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        yield RawPeer(stream, rest)


async def test_pings_are_answered_and_fragments_reassembled() -> None:
    game = Echo("ws")
    async with serving(game) as [port], open_peer(port) as peer:
        await peer.send(
            peer.frame(0x1, b"hel", fin=False),
            peer.frame(0x9, b"are you there"),  # a control frame between fragments
            peer.frame(0x0, "lo \u00e9".encode()[:-1], fin=False),
            peer.frame(0x0, "lo \u00e9".encode()[-1:]),  # a character split across fragments
        )
        assert await peer.receive_frame() == (0xA, b"are you there")
        assert await peer.receive_frame() == (0x1, "hello \u00e9".encode())
        await peer.send(peer.frame(0x2, b"\x00\xff"))
        assert await peer.receive_frame() == (0x2, b"\x00\xff")


async def test_a_close_from_the_client_is_answered_with_its_code() -> None:
    game = Echo("ws")
    async with serving(game) as [port], open_peer(port) as peer:
        # Messages right before the Close (one read) are handled, and answered, before the Close is.
        await peer.send(
            peer.frame(0x1, b"hi"),
            peer.frame(0x1, b"there"),
            peer.frame(0x8, struct.pack("!H", 4000) + b"bye"),
        )
        assert await peer.receive_frame() == (0x1, b"hi")
        assert await peer.receive_frame() == (0x1, b"there")
        opcode, payload = await peer.receive_frame()
        assert (opcode, struct.unpack("!H", payload[:2])[0]) == (0x8, 4000)
        with trio.fail_after(STEP):
            assert await peer.stream.receive_some(65536) == b""  # then the server closes TCP
        with trio.fail_after(STEP):
            await game.gone.wait()
        assert (game.messages, game.disconnects) == (["hi", "there"], ["closed"])


async def test_protocol_errors_close_with_their_codes() -> None:
    game = Echo("ws", max_message_size=1000)
    async with serving(game) as [port]:
        async with open_peer(port, "too-big") as peer:
            await peer.send(peer.frame(0x2, b"x" * 1001))
            assert (await peer.expect_close())[0] == 1009
        async with open_peer(port, "bad-utf8") as peer:
            await peer.send(peer.frame(0x1, b"ok"), peer.frame(0x1, b"\xff\xfe"))
            assert await peer.receive_frame() == (0x1, b"ok")
            assert (await peer.expect_close())[0] == 1007
        async with open_peer(port, "unmasked") as peer:
            await peer.send(b"\x81\x02hi")  # a client frame without a mask
            assert (await peer.expect_close())[0] == 1002
    assert sorted(game.disconnects) == ["closed", "closed", "closed"]


async def test_a_request_that_is_not_a_websocket_handshake_gets_an_http_error() -> None:
    game = Echo("ws")
    async with serving(game) as [port]:
        async with await trio.open_tcp_stream(HOST, port) as stream:
            request = f"GET / HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
            head = await handshake(stream, request)
            assert head.startswith(b"HTTP/1.1 400 ")
    assert not game.players


async def test_a_client_that_stops_reading_is_dropped_as_too_slow() -> None:
    # The socket takes what it can at once; the rest waits for the link's writer (outbox_size messages
    # at most); a write that does not finish within send_timeout drops the player.
    game = Echo("ws", outbox_size=4, send_timeout=0.5)
    async with serving(game) as [port], open_peer(port) as peer:
        await peer.send(peer.frame(0x1, b"flood"))  # and never read again
        with trio.fail_after(STEP):
            await game.gone.wait()
        assert game.disconnects == ["too_slow"]
        # The game's sends stopped: PlayerDisconnected if the outbox stayed full that long, else the
        # writer's own timeout ended the player (and cancelled the hook) first.
        assert game.flood_ended in ([], ["too_slow"])


async def test_every_sender_waiting_for_room_gets_it() -> None:
    # On a stream that is not a socket everything goes through the writer task; with a queue of one,
    # later senders wait for room (several at once, as on a control channel): none is forgotten.
    # (Waiting senders are not ordered among themselves: trio wakes them in any order.)
    server_stream, client_stream = trio.testing.lockstep_stream_pair()
    ws = WebSocket(server_stream, Connection(ConnectionType.SERVER), max_message_size=1000, queue_size=1)
    client = Connection(ConnectionType.CLIENT)
    received: list[str] = []

    async def read(count: int) -> None:
        while len(received) < count:
            client.receive_data(bytes(await client_stream.receive_some(65536)))
            received.extend(str(e.data) for e in client.events() if isinstance(e, TextMessage))

    with trio.fail_after(STEP):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ws.serve_writes, STEP)
            ws.send_nowait("a")
            await trio.testing.wait_all_tasks_blocked()  # the writer is writing "a" (lockstep: unread)
            ws.send_nowait("b")  # the queue is full now
            for name in "cde":
                nursery.start_soon(ws.send_message, name)
                await trio.testing.wait_all_tasks_blocked()
            await read(5)
            ws.finish()
    assert received[:2] == ["a", "b"] and sorted(received[2:]) == ["c", "d", "e"]
