"""Tests for the ClientSession relay, on in-memory streams and virtual time.

The far ends are wsproto ``Connection`` objects (post-handshake): a CLIENT on the client's stream and
a SERVER on the backend's, so every frame Atlas relays or writes is checked by an independent
implementation, including the masking rules of each hop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio.testing import MockClock, memory_stream_pair, wait_all_tasks_blocked
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    TextMessage,
)

from atlas.config import FailoverConfig
from atlas.errors import HandshakeError
from atlas.pool import Backend
from atlas.proxy.frames import OP_BINARY, OP_TEXT, FrameScanner, ScanState, build_frame
from atlas.proxy.session import BackendLink, ClientSession, Ending, EndKind

MAX_MESSAGE = 1 << 20
CLOSE_TIMEOUT = 10.0
NO_FAILOVER = FailoverConfig(enabled=False)


class Peer:
    """One far end of the relay: a stream plus a wsproto connection, recording raw bytes."""

    def __init__(self, stream: trio.abc.HalfCloseableStream, kind: ConnectionType) -> None:
        self.stream = stream
        self.ws = Connection(kind)
        self.sent = bytearray()
        self.received = bytearray()
        self._events: deque[Event] = deque()

    async def send(self, *events: Event) -> bytes:
        data = b"".join(self.ws.send(event) for event in events)
        await self.send_raw(data)
        return data

    async def send_raw(self, data: bytes) -> None:
        self.sent += data
        await self.stream.send_all(data)

    async def receive_raw(self, size: int) -> bytes:
        """Exactly ``size`` more bytes (fails on EOF); their events are queued for :meth:`queued`."""
        got = bytearray()
        while len(got) < size:
            data = await self.stream.receive_some(size - len(got))
            assert data, f"EOF after {len(got)} of {size} bytes"
            got += data
        self.received += got
        self.ws.receive_data(bytes(got))
        self._events.extend(self.ws.events())
        return bytes(got)

    def queued(self) -> list[Event]:
        events = list(self._events)
        self._events.clear()
        return events

    async def next_event(self) -> Event:
        while not self._events:
            data = bytes(await self.stream.receive_some())
            self.received += data
            self.ws.receive_data(data or None)
            self._events.extend(self.ws.events())
        return self._events.popleft()

    async def expect_close(self) -> CloseConnection:
        event = await self.next_event()
        assert isinstance(event, CloseConnection), event
        return event

    async def expect_eof(self) -> None:
        """The other side closed the stream and sent nothing more."""
        assert await self.stream.receive_some() == b""

    async def receive_rest(self) -> bytes:
        """Everything until EOF."""
        got = bytearray()
        while data := await self.stream.receive_some():
            got += data
        self.received += got
        return bytes(got)


@attrs.define(eq=False)
class FakeLinks:
    """A LinkProvider handing out prepared in-memory links (or none: HandshakeError 503)."""

    spare: list[tuple[BackendLink, Peer]] = attrs.Factory(list)
    closed: list[BackendLink] = attrs.Factory(list)
    moves: list[tuple[str, str | None]] = attrs.Factory(list)
    asked: list[frozenset[str]] = attrs.Factory(list)

    def add_backend(self, name: str) -> Peer:
        near, far = memory_stream_pair()
        link = BackendLink(
            backend=Backend.from_url(name, "ws://127.0.0.1:2"),
            stream=near,
            scanner=FrameScanner(masked=False, max_message_size=MAX_MESSAGE),
        )
        peer = Peer(far, ConnectionType.SERVER)
        self.spare.append((link, peer))
        return peer

    async def open_link(self, exclude: frozenset[str]) -> BackendLink:
        self.asked.append(exclude)
        await trio.sleep(0.5)  # a backend handshake takes (virtual) time: the client is on hold
        if not self.spare:
            raise HandshakeError(503, "no game server can take a new player right now")
        return self.spare.pop(0)[0]

    async def open_link_to(self, backend: Backend, *, transfer: str, subprotocol: str | None) -> BackendLink:
        for i, (link, _peer) in enumerate(self.spare):
            if link.backend.name == backend.name:
                return self.spare.pop(i)[0]
        raise HandshakeError(503, f"no spare link to {backend.name}")

    def link_closed(self, link: BackendLink) -> None:
        self.closed.append(link)

    def failed_over(self, session: ClientSession, old: BackendLink, new: BackendLink | None) -> None:
        self.moves.append((old.backend.name, new.backend.name if new else None))


@attrs.define
class Harness:
    session: ClientSession
    client: Peer
    backend: Peer
    links: FakeLinks
    ending: Ending | None = None
    done: trio.Event = attrs.Factory(trio.Event)

    async def finished(self) -> Ending:
        await self.done.wait()
        assert self.ending is not None
        return self.ending


def make_harness(
    *,
    pending: bytes = b"",
    close_timeout: float = CLOSE_TIMEOUT,
    failover: FailoverConfig = NO_FAILOVER,
) -> Harness:
    client_far, client_near = memory_stream_pair()
    backend_near, backend_far = memory_stream_pair()
    link = BackendLink(
        backend=Backend.from_url("b", "ws://127.0.0.1:1"),
        stream=backend_near,
        scanner=FrameScanner(masked=False, max_message_size=MAX_MESSAGE),
    )
    links = FakeLinks()
    session = ClientSession(
        client_id="c-1",
        peer="198.51.100.2:40000",
        client_stream=client_near,
        link=link,
        provider=links,
        failover=failover,
        max_message_size=MAX_MESSAGE,
        validate_utf8=True,
        close_timeout=close_timeout,
        pending=pending,
    )
    return Harness(
        session=session,
        client=Peer(client_far, ConnectionType.CLIENT),
        backend=Peer(backend_far, ConnectionType.SERVER),
        links=links,
    )


@asynccontextmanager
async def running(harness: Harness) -> AsyncIterator[Harness]:
    """Run the session in the background; the block must see it to its end."""

    async def run() -> None:
        harness.ending = await harness.session.run()
        harness.done.set()

    # Virtual time: a hang fails fast instead of blocking the suite.
    with trio.fail_after(3600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            yield harness
            await harness.finished()


# -- relaying --------------------------------------------------------------------------------------


async def test_messages_relayed_verbatim_both_ways_then_client_closes(
    autojump_clock: MockClock,
) -> None:
    big = bytes(range(256)) * 300  # 76800 bytes: streamed through, not buffered
    async with running(make_harness()) as h:
        up = await h.client.send(
            TextMessage(data="hello ✓"),
            BytesMessage(data=big),
            TextMessage(data="frag", message_finished=False),
            Ping(payload=b"are you there"),
            TextMessage(data="ment €", message_finished=True),
        )
        assert await h.backend.receive_raw(len(up)) == up
        got_up = h.backend.queued()
        assert [type(e) for e in got_up] == [TextMessage, BytesMessage, TextMessage, Ping, TextMessage]
        assert got_up[0] == TextMessage(data="hello ✓")

        down = await h.backend.send(
            TextMessage(data="welcome"), Pong(payload=b"yes"), BytesMessage(data=big[::-1])
        )
        assert await h.client.receive_raw(len(down)) == down
        got_down = h.client.queued()
        assert got_down == [
            TextMessage(data="welcome"),
            Pong(payload=b"yes"),
            BytesMessage(data=big[::-1]),
        ]

        # The client closes; the close handshake is relayed both ways.
        await h.client.send(CloseConnection(code=1000, reason="done"))
        close = await h.backend.expect_close()
        assert (close.code, close.reason) == (1000, "done")
        await h.backend.send(close.response())
        reply = await h.client.expect_close()
        assert (reply.code, reply.reason) == (1000, "done")
        assert h.client.ws.state is ConnectionState.CLOSED
        ending = await h.finished()

    assert ending == Ending(EndKind.CLEAN, 1000, "done")
    assert h.session.messages_up == 3
    assert h.session.messages_down == 2
    assert h.session.bytes_up == len(h.client.sent)
    assert h.session.bytes_down == len(h.backend.sent)
    assert h.session.activity() == len(h.client.sent) + len(h.backend.sent)
    # Every byte each side sent arrived at the other, and nothing else.
    await h.backend.expect_eof()
    await h.client.expect_eof()
    assert h.backend.received == h.client.sent
    assert h.client.received == h.backend.sent


async def test_backend_initiated_close_is_relayed_and_answered(autojump_clock: MockClock) -> None:
    async with running(make_harness()) as h:
        await h.backend.send(TextMessage(data="last words"), CloseConnection(1012, "restart"))
        assert await h.client.next_event() == TextMessage(data="last words")
        close = await h.client.expect_close()
        assert (close.code, close.reason) == (1012, "restart")
        await h.client.send(close.response())
        echo = await h.backend.expect_close()
        assert (echo.code, echo.reason) == (1012, "restart")
        ending = await h.finished()

    assert ending == Ending(EndKind.CLEAN, 1012, "restart")
    assert h.session.messages_down == 1
    await h.client.expect_eof()
    await h.backend.expect_eof()


async def test_pending_bytes_are_relayed_before_the_stream(autojump_clock: MockClock) -> None:
    sender = Connection(ConnectionType.CLIENT)
    wire = sender.send(TextMessage(data="first")) + sender.send(BytesMessage(data=b"\x00" * 500))
    wire += sender.send(TextMessage(data="third"))
    cut = len(wire) // 2  # inside the second frame
    h = make_harness(pending=wire[:cut])
    await h.client.send_raw(wire[cut:])
    async with running(h):
        assert await h.backend.receive_raw(len(wire)) == wire
        assert h.backend.queued() == [
            TextMessage(data="first"),
            BytesMessage(data=b"\x00" * 500),
            TextMessage(data="third"),
        ]
        await h.client.send(CloseConnection(1000))
        await h.backend.send((await h.backend.expect_close()).response())
        await h.client.expect_close()

    assert await h.finished() == Ending(EndKind.CLEAN, 1000, "")
    assert h.session.messages_up == 3
    assert h.session.bytes_up == cut + len(h.client.sent)


# -- a side goes away ------------------------------------------------------------------------------


async def test_backend_vanishing_sends_1011_to_the_client(autojump_clock: MockClock) -> None:
    async with running(make_harness()) as h:
        await h.backend.send(TextMessage(data="bye?"))
        assert await h.client.next_event() == TextMessage(data="bye?")
        await h.backend.stream.aclose()
        close = await h.client.expect_close()
        assert close.code == 1011
        await h.client.send(close.response())
        ending = await h.finished()

    assert ending.kind is EndKind.BACKEND_GONE
    assert ending.code == 1011
    await h.client.expect_eof()


async def test_client_vanishing_sends_1001_to_the_backend(autojump_clock: MockClock) -> None:
    async with running(make_harness()) as h:
        await h.client.send(TextMessage(data="about to drop"))
        assert await h.backend.next_event() == TextMessage(data="about to drop")
        await h.client.stream.aclose()
        close = await h.backend.expect_close()
        assert close.code == 1001
        ending = await h.finished()

    assert ending.kind is EndKind.CLIENT_GONE
    assert ending.code == 1001
    await h.backend.expect_eof()


# -- protocol errors -------------------------------------------------------------------------------


async def test_client_protocol_error_fails_the_client_after_earlier_answers(
    autojump_clock: MockClock,
) -> None:
    async with running(make_harness()) as h:
        good = h.client.ws.send(TextMessage(data="echo me"))
        bad = build_frame(OP_TEXT, b"not masked", mask=False)
        await h.client.send_raw(good + bad)

        # The backend sees the good frame, then Atlas's Close; it answers both.
        assert await h.backend.next_event() == TextMessage(data="echo me")
        close = await h.backend.expect_close()
        assert close.code == 1001
        # (wsproto sends nothing but the answering Close once it has seen a Close: write the echo.)
        await h.backend.send_raw(
            build_frame(OP_TEXT, b"echo me", mask=False) + h.backend.ws.send(close.response())
        )

        # The echo of what came before the bad frame reaches the client, then Atlas's 1002.
        assert await h.client.next_event() == TextMessage(data="echo me")
        failed = await h.client.expect_close()
        assert failed.code == 1002
        ending = await h.finished()

    assert ending == Ending(EndKind.CLIENT_ERROR, 1002, "unmasked frame from client")
    # The bad frame never reached the backend; one Close did.
    assert await h.backend.receive_rest() == b""
    assert h.backend.received.startswith(good)
    assert bad not in h.backend.received
    await h.client.expect_eof()


async def test_client_protocol_error_when_backend_never_answers(autojump_clock: MockClock) -> None:
    async with running(make_harness()) as h:
        await h.client.send_raw(build_frame(OP_BINARY, b"\x00", mask=False))
        close = await h.backend.expect_close()
        assert close.code == 1001
        start = trio.current_time()
        failed = await h.client.expect_close()
        assert failed.code == 1002
        assert trio.current_time() - start >= CLOSE_TIMEOUT
        ending = await h.finished()

    assert ending.kind is EndKind.CLIENT_ERROR
    assert ending.code == 1002


async def test_client_invalid_utf8_inside_a_streamed_frame(autojump_clock: MockClock) -> None:
    # Part of the bad frame has already gone to the backend: no Close can be injected there, so
    # the backend is just disconnected; the client gets 1007.
    payload = bytearray(b"a" * 100_000)
    payload[90_000] = 0xFF
    frame = build_frame(OP_TEXT, bytes(payload), mask=True)
    async with running(make_harness()) as h:
        await h.client.send_raw(frame[:50_000])
        assert await h.backend.receive_raw(50_000) == frame[:50_000]
        await h.client.send_raw(frame[50_000:])
        close = await h.client.expect_close()
        assert close.code == 1007
        ending = await h.finished()

    assert ending.kind is EndKind.CLIENT_ERROR
    assert ending.code == 1007
    assert await h.backend.receive_rest() == b""


async def test_backend_protocol_error_fails_both_sides(autojump_clock: MockClock) -> None:
    async with running(make_harness()) as h:
        await h.backend.send_raw(build_frame(OP_TEXT, b"masked!", mask=True))
        close = await h.backend.expect_close()
        assert close.code == 1002
        to_client = await h.client.expect_close()
        assert to_client.code == 1011
        await h.client.send(to_client.response())
        ending = await h.finished()

    assert ending.kind is EndKind.BACKEND_ERROR
    assert ending.code == 1002


# -- closing ---------------------------------------------------------------------------------------


async def test_backend_never_answering_the_clients_close_times_out(
    autojump_clock: MockClock,
) -> None:
    async with running(make_harness()) as h:
        await h.client.send(CloseConnection(4000, "leaving"))
        close = await h.backend.expect_close()
        assert (close.code, close.reason) == (4000, "leaving")
        start = trio.current_time()
        answer = await h.client.expect_close()
        assert answer.code == 4000
        assert trio.current_time() - start >= CLOSE_TIMEOUT
        ending = await h.finished()

    assert ending.kind is EndKind.CLOSE_TIMEOUT
    assert trio.current_time() - start < 2 * CLOSE_TIMEOUT
    await h.client.expect_eof()
    await h.backend.expect_eof()


async def test_close_requested_from_outside(autojump_clock: MockClock) -> None:
    async with running(make_harness()) as h:
        await h.client.send(TextMessage(data="ping"))
        assert await h.backend.next_event() == TextMessage(data="ping")
        await h.backend.send(TextMessage(data="pong"))
        assert await h.client.next_event() == TextMessage(data="pong")

        h.session.close(1001, "bye")

        to_client = await h.client.expect_close()
        assert (to_client.code, to_client.reason) == (1001, "bye")
        to_backend = await h.backend.expect_close()
        assert to_backend.code == 1001
        await h.client.send(to_client.response())
        ending = await h.finished()

    assert ending == Ending(EndKind.REQUESTED, 1001, "bye")
    assert h.session.messages_up == 1
    assert h.session.messages_down == 1
    await h.client.expect_eof()
    await h.backend.expect_eof()


async def test_close_requested_before_run(autojump_clock: MockClock) -> None:
    h = make_harness()
    h.session.close(1012, "draining")
    async with running(h):
        to_client = await h.client.expect_close()
        assert (to_client.code, to_client.reason) == (1012, "draining")
        assert (await h.backend.expect_close()).code == 1001
        await h.client.send(to_client.response())
    assert await h.finished() == Ending(EndKind.REQUESTED, 1012, "draining")


# -- pending bytes that finish the up direction ----------------------------------------------------


async def test_pending_protocol_error_sends_one_close_to_the_backend(
    autojump_clock: MockClock,
) -> None:
    # The client's first frames came with its upgrade request and the second one is bad. Whatever
    # the client sends afterwards must not make Atlas send the backend a second Close.
    sender = Connection(ConnectionType.CLIENT)
    good = sender.send(TextMessage(data="hi"))
    pending = good + build_frame(OP_TEXT, b"unmasked", mask=False)
    h = make_harness(pending=pending)
    await h.client.send_raw(sender.send(TextMessage(data="still talking")))
    async with running(h):
        # The backend never answers: Atlas gives up after the close timeout and hangs up.
        received = await h.backend.receive_rest()
        assert (await h.client.expect_close()).code == 1002

    assert await h.finished() == Ending(EndKind.CLIENT_ERROR, 1002, "unmasked frame from client")
    scanner = FrameScanner(masked=True, max_message_size=MAX_MESSAGE)
    relayed = scanner.feed(received)
    assert scanner.state is ScanState.CLOSED
    assert scanner.close_code == 1001
    assert relayed.startswith(good)
    assert len(relayed) == len(good) + scanner.close_frame_size
    # Nothing after that one Close frame.
    assert received == relayed, f"{len(received) - len(relayed)} bytes after the Close"


async def test_pending_close_waits_for_the_backends_answer(autojump_clock: MockClock) -> None:
    # A Close that came with the upgrade request is relayed like any other (compare the test
    # above where the Close came through the stream): the client that half-closes after it
    # still gets the backend's answer, and the session ends clean.
    sender = Connection(ConnectionType.CLIENT)
    h = make_harness(pending=sender.send(CloseConnection(1000, "quick")))
    async with running(h):
        close = await h.backend.expect_close()
        assert (close.code, close.reason) == (1000, "quick")
        await h.client.stream.send_eof()
        await wait_all_tasks_blocked()
        assert not h.done.is_set(), f"ended {h.ending} before the backend answered"
        await h.backend.send(close.response())
        assert (await h.client.expect_close()).code == 1000

    assert await h.finished() == Ending(EndKind.CLEAN, 1000, "quick")


async def test_client_half_close_after_its_close_frame_still_ends_clean(
    autojump_clock: MockClock,
) -> None:
    async with running(make_harness()) as h:
        await h.client.send(CloseConnection(1000, "quick"))
        close = await h.backend.expect_close()
        await h.client.stream.send_eof()
        await wait_all_tasks_blocked()
        assert not h.done.is_set(), f"ended {h.ending} before the backend answered"
        await h.backend.send(close.response())
        assert (await h.client.expect_close()).code == 1000

    assert await h.finished() == Ending(EndKind.CLEAN, 1000, "quick")


# -- failover ---------------------------------------------------------------------------------------


async def test_failover_moves_the_client_and_holds_its_messages(autojump_clock: MockClock) -> None:
    h = make_harness(failover=FailoverConfig(notice="moved"))
    second = h.links.add_backend("b2")
    async with running(h):
        await h.client.send(TextMessage(data="m1"))
        assert await h.backend.next_event() == TextMessage(data="m1")
        await h.backend.stream.aclose()  # the first backend dies without a Close frame
        await wait_all_tasks_blocked()
        # Sent while the session has no backend: held, then delivered to the new one, in order.
        await h.client.send(TextMessage(data="m2"), TextMessage(data="m3"))
        assert await h.client.next_event() == TextMessage(data="moved")
        assert await second.next_event() == TextMessage(data="m2")
        assert await second.next_event() == TextMessage(data="m3")
        await second.send(TextMessage(data="from b2"))
        assert await h.client.next_event() == TextMessage(data="from b2")
        assert h.links.moves == [("b", "b2")]
        assert h.links.asked == [frozenset({"b"})]
        assert h.session.link.backend.name == "b2"
        await h.client.send(CloseConnection(code=1000))
        assert (await second.expect_close()).code == 1000
        await second.send(CloseConnection(code=1000))
        ending = await h.finished()
    assert ending.kind is EndKind.CLEAN
    assert h.session.failovers == 1
    assert h.session.messages_up == 3
    assert h.session.messages_down == 1
    assert [link.backend.name for link in h.links.closed] == ["b", "b2"]


async def test_failover_drops_the_rest_of_a_message_cut_in_half(autojump_clock: MockClock) -> None:
    h = make_harness(failover=FailoverConfig())
    second = h.links.add_backend("b2")
    async with running(h):
        first_half = build_frame(OP_TEXT, b"half", mask=True, fin=False)
        await h.client.send_raw(first_half)
        await h.backend.receive_raw(len(first_half))
        await h.backend.stream.aclose()
        await wait_all_tasks_blocked()
        # The end of the cut message, then a whole one: only the whole one reaches the new backend.
        await h.client.send_raw(build_frame(0x0, b" and the rest", mask=True))
        await h.client.send_raw(build_frame(OP_TEXT, b"whole", mask=True))
        h.client.ws = Connection(ConnectionType.CLIENT)  # its own state still thinks it is mid-message
        assert await second.next_event() == TextMessage(data="whole")
        assert h.session.up.discarded == 1
        h.session.close(1001, "test over")
        await h.client.expect_close()
        await h.finished()


async def test_failover_with_no_backend_left_closes_1013(autojump_clock: MockClock) -> None:
    async with running(make_harness(failover=FailoverConfig())) as h:
        await h.backend.stream.aclose()
        close = await h.client.expect_close()
        assert close.code == 1013
        await h.client.send(close.response())
        ending = await h.finished()
    assert ending.kind is EndKind.NO_BACKEND
    assert h.links.moves == [("b", None)]


async def test_fail_over_requested_from_outside_moves_a_live_link(autojump_clock: MockClock) -> None:
    h = make_harness(failover=FailoverConfig())
    second = h.links.add_backend("b2")
    async with running(h):
        h.session.fail_over()  # the health checker gave up on a backend that is still connected
        await h.backend.expect_eof()
        await h.client.send(TextMessage(data="after"))
        assert await second.next_event() == TextMessage(data="after")
        h.session.close(1001, "test over")
        await h.client.expect_close()
        await h.finished()


# -- transfer steps --------------------------------------------------------------------------------


async def test_transfer_steps_cut_over_without_loss_or_reorder(autojump_clock: MockClock) -> None:
    h = make_harness()
    target = h.links.add_backend("b2")
    new_link = h.links.spare.pop()[0]
    async with running(h):
        for i in range(3):
            await h.client.send(TextMessage(data=f"m{i}"))
        for i in range(3):
            assert await h.backend.next_event() == TextMessage(data=f"m{i}")
        assert await h.session.hold_client() == 3
        # Sent during the hold: kept for the target, not given to the source.
        await h.client.send(TextMessage(data="m3"), TextMessage(data="m4"))
        await h.backend.send(TextMessage(data="s0"), TextMessage(data="s1"))
        await h.session.cut_backend(2)
        assert await h.client.next_event() == TextMessage(data="s0")
        assert await h.client.next_event() == TextMessage(data="s1")
        await h.backend.send(TextMessage(data="after the cut"))  # the source broke its promise
        old = h.session.switch_to(new_link)
        assert old.backend.name == "b"
        assert await target.next_event() == TextMessage(data="m3")
        assert await target.next_event() == TextMessage(data="m4")
        await target.send(TextMessage(data="t0"))
        assert await h.client.next_event() == TextMessage(data="t0")
        await h.session.retire_link(old)
        assert (await h.backend.expect_close()).reason == "transferred"
        await h.client.send(TextMessage(data="m5"))
        assert await target.next_event() == TextMessage(data="m5")
        assert h.session.last_stall is not None
        h.session.close(1001, "test over")
        await h.client.expect_close()
        await h.finished()
    assert h.session.messages_up == 6
    assert h.session.messages_down == 3  # s0, s1, t0: "after the cut" never reached the client


async def test_transfer_rollback_resumes_the_source_in_order(autojump_clock: MockClock) -> None:
    async with running(make_harness()) as h:
        await h.client.send(TextMessage(data="m0"))
        assert await h.backend.next_event() == TextMessage(data="m0")
        assert await h.session.hold_client() == 1
        await h.client.send(TextMessage(data="m1"), TextMessage(data="m2"))
        await h.backend.send(TextMessage(data="s0"))
        await h.session.cut_backend(0)
        await h.backend.send(TextMessage(data="s1"))
        await wait_all_tasks_blocked()
        h.session.resume()
        assert await h.backend.next_event() == TextMessage(data="m1")
        assert await h.backend.next_event() == TextMessage(data="m2")
        assert await h.client.next_event() == TextMessage(data="s0")
        assert await h.client.next_event() == TextMessage(data="s1")
        await h.client.send(TextMessage(data="m3"))
        assert await h.backend.next_event() == TextMessage(data="m3")
        h.session.close(1001, "test over")
        await h.client.expect_close()
        await h.finished()


async def test_hold_waits_for_the_message_under_way(autojump_clock: MockClock) -> None:
    async with running(make_harness()) as h:
        first = build_frame(OP_TEXT, b"he", mask=True, fin=False)
        await h.client.send_raw(first)
        await h.backend.receive_raw(len(first))
        async with trio.open_nursery() as nursery:
            counted: list[int] = []

            async def hold() -> None:
                counted.append(await h.session.hold_client())

            nursery.start_soon(hold)
            await wait_all_tasks_blocked()
            assert counted == []  # mid-message: the hold waits for the message's end
            await h.client.send_raw(build_frame(0x0, b"llo", mask=True))
        assert counted == [1]
        h.session.resume()
        h.session.close(1001, "test over")
        await h.finished()


# -- the transfer guarantees under random interleavings (hypothesis) --------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    before=st.integers(0, 5),
    during=st.integers(0, 5),
    after=st.integers(0, 5),
    source_before=st.integers(0, 4),
    source_late=st.integers(0, 3),
    target_sends=st.integers(0, 3),
    commit=st.booleans(),
    delays=st.lists(st.sampled_from([0.0, 0.001, 0.05]), min_size=6, max_size=6),
)
async def test_transfer_guarantees_hold_in_every_interleaving(
    autojump_clock: MockClock,
    before: int,
    during: int,
    after: int,
    source_before: int,
    source_late: int,
    target_sends: int,
    commit: bool,
    delays: list[float],
) -> None:
    """Guarantees 1, 2, 3 and 5 of DESIGN.md section 4, for a cut-over or a rollback at a random moment.

    The client streams numbered messages before, during and after the transfer; the source sends some
    messages before the cut and some "late" ones after it (which must never reach the client once it
    switched); the target sends after the switch. Every step waits a random (virtual) delay.
    """
    h = make_harness()
    target = h.links.add_backend("b2")
    new_link = h.links.spare.pop()[0]
    sent_by_client: list[str] = []

    async def client_sends(count: int) -> None:
        for _ in range(count):
            text = f"c{len(sent_by_client)}"
            sent_by_client.append(text)
            await h.client.send(TextMessage(data=text))

    async with running(h):
        await client_sends(before)
        await trio.sleep(delays[0])
        for i in range(source_before):
            await h.backend.send(TextMessage(data=f"s{i}"))
        await trio.sleep(delays[1])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_sends, during)  # racing with the hold
            await trio.sleep(delays[2])
            delivered = await h.session.hold_client()
            await h.session.cut_backend(source_before)
        for i in range(source_late):
            await h.backend.send(TextMessage(data=f"late{i}"))
        await trio.sleep(delays[3])
        if commit:
            old = h.session.switch_to(new_link)
            await h.session.retire_link(old)
            owner = target
            for i in range(target_sends):
                await target.send(TextMessage(data=f"t{i}"))
        else:
            h.session.resume()
            owner = h.backend
        await trio.sleep(delays[4])
        await client_sends(after)
        await trio.sleep(delays[5])
        # Guarantee 1: the client's connection is still open.
        assert h.session.ending is None
        # Guarantee 2: every client message reached exactly one backend, in order.
        expected_at_owner = len(sent_by_client) - (delivered if commit else 0)
        got_source = [e for e in h.backend.queued() if isinstance(e, TextMessage)]
        while len(got_source) < (delivered if commit else len(sent_by_client)):
            event = await h.backend.next_event()
            if isinstance(event, TextMessage):
                got_source.append(event)
        got_target: list[Event] = []
        if commit:
            while len(got_target) < expected_at_owner:
                event = await target.next_event()
                if isinstance(event, TextMessage):
                    got_target.append(event)
        texts = [e.data for e in got_source + got_target if isinstance(e, TextMessage)]
        assert texts == sent_by_client
        # Guarantee 3: the source's messages up to the cut, then (after a switch) only the target's.
        expected_down = [f"s{i}" for i in range(source_before)]
        expected_down += (
            [f"t{i}" for i in range(target_sends)] if commit else [f"late{i}" for i in range(source_late)]
        )
        got_down: list[str] = []
        while len(got_down) < len(expected_down):
            event = await h.client.next_event()
            if isinstance(event, TextMessage):
                got_down.append(event.data)
        assert got_down == expected_down
        # Guarantee 5: a rollback leaves the client on its source.
        assert (h.session.link.backend.name == "b2") is commit
        assert owner is (target if commit else h.backend)
        h.session.close(1001, "test over")
        await h.client.expect_close()
        await h.finished()
