"""The reactor on real sockets (127.0.0.1, port 0): relaying, backpressure, handbacks, fairness.

Each test lends a :class:`Direction` from one TCP connection to another and plays both far ends
itself: ``src_peer`` writes into the source socket, ``dst_peer`` reads what the reactor forwarded.
"""

from __future__ import annotations

import os
import socket
import types
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.testing

import atlas.proxy.reactor as reactor_module
import atlas.proxy.session as session_module
from atlas.config import FailoverConfig
from atlas.pool import Backend
from atlas.proxy.frames import (
    OP_BINARY,
    OP_TEXT,
    CloseCode,
    FrameScanner,
    ScanState,
    build_close,
    build_frame,
)
from atlas.proxy.reactor import Direction, Handback, PrependedStream, RateLimiter, Reactor, socket_fd
from atlas.proxy.session import BackendLink, ClientSession, EndKind

MAX_MESSAGE = 1 << 24


@asynccontextmanager
async def running_reactor() -> AsyncIterator[Reactor]:
    async with trio.open_nursery() as nursery:
        reactor: Reactor = await nursery.start(Reactor().serve)
        yield reactor
        nursery.cancel_scope.cancel()


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two ends of one loopback TCP connection."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        accepted: list[trio.SocketStream] = []

        async def accept() -> None:
            accepted.append(await listeners[0].accept())

        nursery.start_soon(accept)
        client = await trio.open_tcp_stream("127.0.0.1", port)
    await listeners[0].aclose()
    return client, accepted[0]


@attrs.define
class Hop:
    """A direction lent from ``src`` (fed by ``src_peer``) to ``dst`` (read by ``dst_peer``)."""

    src: trio.SocketStream
    src_peer: trio.SocketStream
    dst: trio.SocketStream
    dst_peer: trio.SocketStream
    d: Direction

    @classmethod
    async def open(cls, *, masked: bool = False) -> Hop:
        src_peer, src = await tcp_pair()
        dst, dst_peer = await tcp_pair()
        scanner = FrameScanner(masked=masked, max_message_size=MAX_MESSAGE)
        return cls(src, src_peer, dst, dst_peer, Direction(scanner))

    async def lend(self, reactor: Reactor) -> Handback:
        src, dst = socket_fd(self.src), socket_fd(self.dst)
        assert src is not None
        assert dst is not None
        return await reactor.relay(self.d, src, dst)

    async def read_exactly(self, size: int) -> bytes:
        got = bytearray()
        while len(got) < size:
            data = await self.dst_peer.receive_some(size - len(got))
            assert data, f"EOF after {len(got)} of {size} bytes"
            got += data
        return bytes(got)

    async def aclose(self) -> None:
        for stream in (self.src, self.src_peer, self.dst, self.dst_peer):
            await trio.aclose_forcefully(stream)


def frames(count: int, size: int = 60, opcode: int = OP_BINARY) -> bytes:
    return b"".join(build_frame(opcode, bytes([i % 251]) * size, mask=False) for i in range(count))


async def test_relays_frames_verbatim_until_eof() -> None:
    async with running_reactor() as reactor:
        hop = await Hop.open()
        data = frames(500) + build_frame(OP_TEXT, "héllo".encode(), mask=False)
        kinds: list[Handback] = []
        async with trio.open_nursery() as nursery:

            async def lend() -> None:
                kinds.append(await hop.lend(reactor))

            nursery.start_soon(lend)
            await hop.src_peer.send_all(data)
            assert await hop.read_exactly(len(data)) == data
            assert reactor.statistics().lent == 1
            await hop.src_peer.aclose()
        assert kinds == [Handback.EOF]
        assert hop.d.nbytes == len(data)
        assert hop.d.scanner.messages == 501
        assert reactor.statistics().lent == 0
        await hop.aclose()


async def test_close_frame_is_handed_back_unsent() -> None:
    async with running_reactor() as reactor:
        hop = await Hop.open()
        before = frames(3)
        close = build_close(1000, "bye", mask=False)
        await hop.src_peer.send_all(before + close + frames(2))
        kind = await hop.lend(reactor)
        assert kind is Handback.FED
        # What precedes the Close and the Close itself are the session's to send; nothing past it.
        assert bytes(hop.d.out) == before + close
        assert hop.d.scanner.close_code == 1000
        await hop.aclose()


async def test_protocol_error_is_handed_back() -> None:
    async with running_reactor() as reactor:
        hop = await Hop.open()
        good = frames(2)
        await hop.src_peer.send_all(good + build_frame(OP_BINARY, b"x", mask=True))  # masked from a server
        assert await hop.lend(reactor) is Handback.FED
        assert bytes(hop.d.out) == good
        assert hop.d.scanner.error is not None
        await hop.aclose()


async def test_hold_limit_hands_back_at_the_boundary() -> None:
    async with running_reactor() as reactor:
        hop = await Hop.open()
        hop.d.scanner.hold_after(5)
        await hop.src_peer.send_all(frames(8))
        assert await hop.lend(reactor) is Handback.FED
        assert hop.d.scanner.held
        # The first five passed through the reactor or are handed back; the rest is held.
        forwarded = await hop.dst_peer.receive_some() if hop.d.out == b"" else b""
        assert len(forwarded) + len(hop.d.out) == len(frames(5))
        assert hop.d.scanner.buffered == len(frames(3))
        await hop.aclose()


async def test_backpressure_with_a_slow_reader() -> None:
    """A reader that does not read: the reactor keeps the rest, stops reading, and loses nothing."""
    async with running_reactor() as reactor:
        hop = await Hop.open()
        message = build_frame(OP_BINARY, bytes(range(256)) * 64, mask=False)  # 16 KiB frames
        total = 1000
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hop.lend, reactor)

            async def write() -> None:
                for _ in range(total):
                    await hop.src_peer.send_all(message)

            nursery.start_soon(write)
            # Nobody reads the destination: the kernel buffers fill and the reactor must stop.
            await trio.sleep(0.3)
            assert hop.d.out, "the reactor never had to keep a rest"
            stats = reactor.statistics()
            assert stats.partial_writes >= 1
            stalled = hop.d.nbytes
            await trio.sleep(0.2)
            assert hop.d.nbytes == stalled, "the source was read while the destination was full"
            # Now read it all: every byte arrives, in order.
            got = await hop.read_exactly(total * len(message))
            assert got == message * total
            assert not hop.d.dirty
            nursery.cancel_scope.cancel()
        await hop.aclose()


async def test_broken_destination_is_handed_back() -> None:
    async with running_reactor() as reactor:
        hop = await Hop.open()
        # Reset the destination's far end (SO_LINGER 0), then make the reactor write to it.
        hop.dst_peer.socket.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        await hop.dst_peer.aclose()
        await trio.sleep(0.05)
        kinds: list[Handback] = []
        async with trio.open_nursery() as nursery:

            async def lend() -> None:
                kinds.append(await hop.lend(reactor))

            nursery.start_soon(lend)
            with trio.fail_after(5):
                while not kinds:
                    await hop.src_peer.send_all(frames(10))
                    await trio.sleep(0.01)
        assert kinds == [Handback.SEND_FAILED]
        assert hop.d.out
        await hop.aclose()


async def test_cancelling_the_lender_releases_the_direction() -> None:
    async with running_reactor() as reactor:
        hop = await Hop.open()
        with trio.move_on_after(0.05):
            await hop.lend(reactor)
        assert hop.d.task is None
        assert reactor.statistics().lent == 0
        # The direction can be lent again and relays as before.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hop.lend, reactor)
            await hop.src_peer.send_all(frames(3))
            assert await hop.read_exactly(len(frames(3))) == frames(3)
            nursery.cancel_scope.cancel()
        await hop.aclose()


async def test_revoke_and_forget_wake_the_lender() -> None:
    async with running_reactor() as reactor:
        hop = await Hop.open()
        kinds: list[Handback] = []
        async with trio.open_nursery() as nursery:

            async def lend() -> None:
                kinds.append(await hop.lend(reactor))

            nursery.start_soon(lend)
            await trio.testing.wait_all_tasks_blocked()
            reactor.revoke(hop.d)
        assert kinds == [Handback.REVOKED]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lend)
            await trio.testing.wait_all_tasks_blocked()
            reactor.forget(socket_fd(hop.src_peer), (hop.d,))  # not its fd: nothing happens
            assert reactor.statistics().lent == 1
            reactor.forget(socket_fd(hop.dst), (hop.d,))
        assert kinds == [Handback.REVOKED, Handback.REVOKED]
        await hop.aclose()


async def test_stopping_the_reactor_gives_everything_back() -> None:
    hop = await Hop.open()
    kinds: list[Handback] = []
    async with trio.open_nursery() as outer:
        async with running_reactor() as reactor:

            async def lend() -> None:
                kinds.append(await hop.lend(reactor))

            outer.start_soon(lend)
            await trio.testing.wait_all_tasks_blocked()
        assert reactor.closed
    assert kinds == [Handback.REVOKED]
    # A stopped reactor takes nothing.
    assert await hop.lend(reactor) is Handback.REVOKED
    await hop.aclose()


async def test_many_connections() -> None:
    async with running_reactor() as reactor:
        hops = [await Hop.open() for _ in range(100)]
        data = frames(50)
        async with trio.open_nursery() as nursery:
            for hop in hops:
                nursery.start_soon(hop.lend, reactor)
            for hop in hops:
                nursery.start_soon(hop.src_peer.send_all, data)
            for hop in hops:
                assert await hop.read_exactly(len(data)) == data
            assert reactor.statistics().lent == 100
            nursery.cancel_scope.cancel()
        stats = reactor.statistics()
        # Many ready descriptors are served per wake-up.
        assert stats.events > stats.wakeups
        for hop in hops:
            await hop.aclose()


async def test_a_flood_starves_neither_other_connections_nor_other_tasks() -> None:
    async with running_reactor() as reactor:
        flood, ping = await Hop.open(), await Hop.open()
        chunk = frames(1000, size=1000)
        ticks = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood.lend, reactor)
            nursery.start_soon(ping.lend, reactor)

            async def pour() -> None:
                while True:
                    await flood.src_peer.send_all(chunk)

            async def drain() -> None:
                while await flood.dst_peer.receive_some(1 << 20):
                    pass

            async def count() -> None:
                nonlocal ticks
                while True:
                    await trio.lowlevel.checkpoint()
                    ticks += 1

            nursery.start_soon(pour)
            nursery.start_soon(drain)
            nursery.start_soon(count)
            one = frames(1)
            with trio.fail_after(10):
                for _ in range(50):
                    await ping.src_peer.send_all(one)
                    assert await ping.read_exactly(len(one)) == one
            assert ticks > 50
            assert flood.d.nbytes > 0
            nursery.cancel_scope.cancel()
        await flood.aclose()
        await ping.aclose()


async def test_socket_fd_only_for_plain_sockets() -> None:
    a, b = await tcp_pair()
    assert socket_fd(a) == a.socket.fileno()
    prepended = PrependedStream(a, b"early")
    assert socket_fd(prepended) is None  # its head must go through the scanner first
    assert await prepended.receive_some() == b"early"
    assert socket_fd(prepended) == a.socket.fileno()
    near, _far = trio.testing.memory_stream_pair()
    assert socket_fd(near) is None
    await a.aclose()
    await b.aclose()
    assert socket_fd(a) is None


@attrs.define(eq=False)
class NoLinks:
    """A LinkProvider with no other backend (failover ends the session with 1013)."""

    closed: list[BackendLink] = attrs.Factory(list)

    async def open_link(self, exclude: frozenset[str]) -> BackendLink:
        from atlas.errors import HandshakeError

        raise HandshakeError(503, "none")

    async def open_link_to(self, backend: Backend, *, transfer: str, subprotocol: str | None) -> BackendLink:
        raise AssertionError

    def link_closed(self, link: BackendLink) -> None:
        self.closed.append(link)

    def failed_over(self, session: ClientSession, old: BackendLink, new: BackendLink | None) -> None:
        pass


@pytest.mark.parametrize("who_closes", ["client", "backend"])
async def test_session_relays_through_the_reactor(who_closes: str) -> None:
    """A ClientSession on plain sockets lends both directions and still runs its close handshake."""
    async with running_reactor() as reactor:
        client_peer, client = await tcp_pair()
        link_stream, backend_peer = await tcp_pair()
        link = BackendLink(
            backend=Backend.from_url("b", "ws://127.0.0.1:2"),
            stream=link_stream,
            scanner=FrameScanner(masked=False, max_message_size=MAX_MESSAGE),
        )
        links = NoLinks()
        session = ClientSession(
            client_id="c1",
            peer="test",
            client_stream=client,
            link=link,
            provider=links,
            failover=FailoverConfig(enabled=False),
            max_message_size=MAX_MESSAGE,
            validate_utf8=True,
            close_timeout=5,
            reactor=reactor,
        )
        up = b"".join(build_frame(OP_TEXT, b"up %d" % i, mask=True) for i in range(100))
        down = b"".join(build_frame(OP_TEXT, b"down %d" % i, mask=False) for i in range(100))

        async def read_exactly(stream: trio.SocketStream, size: int) -> bytes:
            got = bytearray()
            while len(got) < size:
                data = await stream.receive_some(size - len(got))
                assert data
                got += data
            return bytes(got)

        async with trio.open_nursery() as nursery:
            endings = []

            async def run() -> None:
                endings.append(await session.run())

            nursery.start_soon(run)
            await client_peer.send_all(up)
            await backend_peer.send_all(down)
            assert await read_exactly(backend_peer, len(up)) == up
            assert await read_exactly(client_peer, len(down)) == down
            assert reactor.statistics().lent == 2
            assert session.messages_up == 100
            assert session.messages_down == 100
            if who_closes == "client":
                close = build_close(1000, "done", mask=True)
                await client_peer.send_all(close)
                assert await read_exactly(backend_peer, len(close)) == close
                answer = build_close(1000, "done", mask=False)
                await backend_peer.send_all(answer)
                assert await read_exactly(client_peer, len(answer)) == answer
            else:
                close = build_close(4000, "bye", mask=False)
                await backend_peer.send_all(close)
                assert await read_exactly(client_peer, len(close)) == close
                answer = build_close(4000, "bye", mask=True)
                await client_peer.send_all(answer)
                assert await read_exactly(backend_peer, len(answer)) == answer
        (ending,) = endings
        assert ending.kind is EndKind.CLEAN
        assert reactor.statistics().lent == 0
        assert links.closed == [link]
        assert session.bytes_up == len(up) + len(close if who_closes == "client" else answer)
        for stream in (client_peer, backend_peer):
            await stream.aclose()


async def test_session_backend_gone_through_the_reactor() -> None:
    """The backend vanishes while both directions are lent: the client gets Close 1011."""
    async with running_reactor() as reactor:
        client_peer, client = await tcp_pair()
        link_stream, backend_peer = await tcp_pair()
        link = BackendLink(
            backend=Backend.from_url("b", "ws://127.0.0.1:2"),
            stream=link_stream,
            scanner=FrameScanner(masked=False, max_message_size=MAX_MESSAGE),
        )
        session = ClientSession(
            client_id="c1",
            peer="test",
            client_stream=client,
            link=link,
            provider=NoLinks(),
            failover=FailoverConfig(enabled=False),
            max_message_size=MAX_MESSAGE,
            validate_utf8=True,
            close_timeout=1,
            reactor=reactor,
        )
        async with trio.open_nursery() as nursery:
            endings = []

            async def run() -> None:
                endings.append(await session.run())

            nursery.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()
            assert reactor.statistics().lent == 2
            await backend_peer.aclose()
            got = bytearray()
            while data := await client_peer.receive_some():
                got += data
        assert endings[0].kind is EndKind.BACKEND_GONE
        assert bytes(got) == build_close(1011, "backend went away", mask=False)
        assert link.abnormal
        await client_peer.aclose()


async def test_a_pair_is_lent_from_one_task_and_given_back_together() -> None:
    async with running_reactor() as reactor:
        one, two = await Hop.open(), await Hop.open()
        fds = [socket_fd(s) for s in (one.src, one.dst, two.src, two.dst)]
        assert None not in fds
        a_src, a_dst, b_src, b_dst = (fd for fd in fds if fd is not None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reactor.relay_pair, one.d, a_src, a_dst, two.d, b_src, b_dst)
            await trio.testing.wait_all_tasks_blocked()
            assert reactor.statistics().lent == 2
            await one.src_peer.send_all(frames(4))
            await two.src_peer.send_all(frames(5))
            assert await one.read_exactly(len(frames(4))) == frames(4)
            assert await two.read_exactly(len(frames(5))) == frames(5)
            await two.src_peer.aclose()  # one direction ends: the task wakes once, for both
        assert (one.d.kind, two.d.kind) == (Handback.REVOKED, Handback.EOF)
        assert reactor.statistics().lent == 0
        # Cancelling a task that lent a pair releases both.
        with trio.move_on_after(0.05):
            await reactor.relay_pair(one.d, a_src, a_dst, two.d, b_src, b_dst)
        assert one.d.task is None
        assert two.d.task is None
        assert reactor.statistics().lent == 0
        await one.aclose()
        await two.aclose()


def reactor_session(
    reactor: Reactor, client: trio.SocketStream, link_stream: trio.SocketStream
) -> ClientSession:
    link = BackendLink(
        backend=Backend.from_url("b", "ws://127.0.0.1:2"),
        stream=link_stream,
        scanner=FrameScanner(masked=False, max_message_size=MAX_MESSAGE),
    )
    return ClientSession(
        client_id="c1",
        peer="test",
        client_stream=client,
        link=link,
        provider=NoLinks(),
        failover=FailoverConfig(enabled=False),
        max_message_size=MAX_MESSAGE,
        validate_utf8=True,
        close_timeout=5,
        reactor=reactor,
    )


@pytest.mark.parametrize("write", ["whole", "half", "blocked", "broken"])
async def test_client_close_forwarded_however_the_backend_socket_takes_it(
    write: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session forwards a client's Close from its own task when the backend socket takes it at
    once; when it takes part of it, none, or fails, the up pump sends what is left: the same bytes."""
    calls: list[int] = []

    def fake_write(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if write == "half":
            return os_write(fd, bytes(data)[: len(data) // 2])
        if write == "blocked":
            raise BlockingIOError
        if write == "broken":
            raise BrokenPipeError
        return os_write(fd, data)

    os_write = os.write
    monkeypatch.setattr(session_module, "os", types.SimpleNamespace(write=fake_write))
    async with running_reactor() as reactor:
        client_peer, client = await tcp_pair()
        link_stream, backend_peer = await tcp_pair()
        session = reactor_session(reactor, client, link_stream)
        endings = []
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                endings.append(await session.run())

            nursery.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()
            sent = build_frame(OP_TEXT, b"last words", mask=True) + build_close(1000, "done", mask=True)
            await client_peer.send_all(sent)
            got = bytearray()
            while len(got) < len(sent):
                data = await backend_peer.receive_some()
                assert data
                got += data
            assert bytes(got) == sent
            answer = build_close(1000, "done", mask=False)
            await backend_peer.send_all(answer)
            got = bytearray()
            while data := await client_peer.receive_some():
                got += data
            assert bytes(got) == answer
        assert calls == [len(sent)]
        assert endings[0].kind is EndKind.CLEAN
        assert session.messages_up == 1
        assert reactor.statistics().lent == 0
        for stream in (client_peer, backend_peer):
            await stream.aclose()


async def test_client_vanishing_through_the_reactor_sends_the_backend_1001() -> None:
    async with running_reactor() as reactor:
        client_peer, client = await tcp_pair()
        link_stream, backend_peer = await tcp_pair()
        session = reactor_session(reactor, client, link_stream)
        endings = []
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                endings.append(await session.run())

            nursery.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()
            assert reactor.statistics().lent == 2
            await client_peer.aclose()
            got = bytearray()
            while data := await backend_peer.receive_some():
                got += data
        assert endings[0].kind is EndKind.CLIENT_GONE
        scanner = FrameScanner(masked=True, max_message_size=MAX_MESSAGE)
        scanner.feed(bytes(got))
        assert scanner.close_code == 1001
        assert reactor.statistics().lent == 0
        await backend_peer.aclose()


async def test_send_all_and_receive_some_without_waiting_when_they_can() -> None:
    a, b = await tcp_pair()
    big = bytes(range(256)) * 16 * 1024  # 4 MiB: more than the socket takes at once
    got = bytearray()
    async with trio.open_nursery() as nursery:

        async def read() -> None:
            while len(got) < len(big):
                got.extend(await reactor_module.receive_some(b, 65536))

        nursery.start_soon(read)
        await reactor_module.send_all(a, big)
    assert bytes(got) == big
    # Bytes already there are returned at once; none there: it waits for them.
    await reactor_module.send_all(a, b"now")
    await trio.testing.wait_all_tasks_blocked()
    assert await reactor_module.receive_some(b, 100) == b"now"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reactor_module.receive_some, b, 100)
        await trio.testing.wait_all_tasks_blocked()
        await a.send_all(b"later")
    assert reactor_module.close_now(a)
    assert reactor_module.close_now(a)  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        await reactor_module.send_all(a, b"x")
    assert await reactor_module.receive_some(b, 100) == b""
    await b.aclose()


async def test_helpers_fall_back_to_the_stream_api() -> None:
    left, right = trio.testing.memory_stream_pair()
    await reactor_module.send_all(left, b"hello")
    assert await reactor_module.receive_some(right, 100) == b"hello"
    assert not reactor_module.close_now(left)
    a, b = await tcp_pair()
    assert reactor_module.close_now(PrependedStream(a, b"head"))
    assert a.socket.fileno() == -1
    await b.aclose()


async def test_client_close_waits_for_a_failover_that_began_before_the_session_task_ran() -> None:
    """A failover begun between the handback and the session task: the Close is the up pump's, to
    be sent to the new link once there is one; nothing is written to the lost one."""
    async with running_reactor() as reactor:
        client_peer, client = await tcp_pair()
        link_stream, backend_peer = await tcp_pair()
        session = reactor_session(reactor, client, link_stream)
        close = build_close(1000, "done", mask=True)
        session._up.out = session._up.take(close)
        assert session.up.state is ScanState.CLOSED
        session.fail_over()
        fd = socket_fd(link_stream)
        assert fd is not None
        assert session._client_first(Handback.FED, fd) is Handback.FED
        assert session._up.out == close
        with trio.move_on_after(0.05) as waited:
            await backend_peer.receive_some()
        assert waited.cancelled_caught  # nothing reached the lost backend
        for stream in (client_peer, client, link_stream, backend_peer):
            await stream.aclose()


def test_rate_limiter_is_a_token_bucket() -> None:
    now = [0.0]
    limiter = RateLimiter(10.0, 3, clock=lambda: now[0])
    assert [limiter.allow(1) for _ in range(4)] == [True, True, True, False]  # the burst, then over
    now[0] = 0.1  # one message's worth back: still 0 left after paying the debt
    assert limiter.allow(1) is False
    now[0] = 1.0  # refilled, capped at the burst
    assert limiter.allow(3) is True
    assert limiter.allow(1) is False


def test_a_direction_over_its_rate_fails_its_scanner_with_1008_after_the_chunk() -> None:
    now = [0.0]
    direction = Direction(FrameScanner(masked=True, max_message_size=1 << 16))
    direction.limiter = RateLimiter(1.0, 2, clock=lambda: now[0])
    two = build_frame(OP_TEXT, b"a", mask=True) + build_frame(OP_TEXT, b"b", mask=True)
    assert direction.take(two) == two
    assert not direction.scanner.state and not direction.attention
    third = build_frame(OP_TEXT, b"c", mask=True)
    assert direction.take(third) == third  # relayed, and then the client is over
    assert direction.attention
    assert direction.scanner.error is not None
    assert (direction.scanner.error.code, direction.scanner.error.reason) == (
        CloseCode.POLICY_VIOLATION,
        "message rate limit exceeded",
    )
    assert direction.take(build_frame(OP_TEXT, b"d", mask=True)) == b""  # nothing more
