"""The reactor: one trio task that moves the bytes of every plain-socket session.

Theory of operation
-------------------
A relay built from trio tasks pays trio's wait-and-reschedule cycle for every chunk of every direction of
every client: at game tick rates that cycle, not the relaying, is the cost. The reactor removes it from the
steady state. One task (:meth:`Reactor.serve`, started in the listener nursery) owns a private
``select.epoll`` and waits for it with ``trio.lowlevel.wait_readable``; each wake-up it takes every ready
file descriptor and, without awaiting anything, for each:

* reads once (``os.read``, the socket is non-blocking) from the source of a :class:`Direction`;
* passes the bytes through the direction's :class:`~atlas.proxy.frames.FrameScanner`
  (:meth:`Direction.take`, the same step the task pumps use);
* writes the forwardable bytes to the other socket. A partial write keeps the rest in the direction,
  stops reading its source (backpressure: the kernel then holds what the peer sends) and waits for
  ``EPOLLOUT`` on the destination.

The reactor only moves bytes and tracks boundaries. Everything else belongs to the session's tasks: a
session *lends* both directions from its own task with :meth:`Reactor.relay_pair` (an idle session is one
parked task), a pump task lends one with :meth:`Reactor.relay`, and the lender sleeps until the reactor
gives it back with a :class:`Handback`: the source ended (``EOF``), a chunk needs the session (``FED``:
the scanner stopped at a Close frame, a protocol error or a transfer hold; the bytes to forward are in
``Direction.out``, unsent), the destination broke (``SEND_FAILED``), or the session took the direction back
(``REVOKED``: failover, a transfer step, a stream about to be closed). The pump then runs the session's
ordinary trio logic (close handshake, failover, transfers) and lends the direction again when plain
relaying resumes. Cancelling a lending pump gives the direction back synchronously (the abort callback of
``wait_task_rescheduled``), so a cancelled session never leaves a file descriptor in the reactor; bytes a
write left half-sent stay in the direction and mark it ``dirty``, exactly like a cancelled ``send_all``.

Only streams whose socket the reactor can reach are lent (:func:`socket_fd`): a ``trio.SocketStream``,
or a :class:`PrependedStream` whose prepended bytes were consumed. Memory streams in tests and TLS keep
the task pumps, which share :meth:`Direction.take` with the reactor. A ``trio.SSLStream`` (a ``wss://``
client, a ``wss://`` backend) is never lent: the bytes on its socket are TLS records that only its
``SSLObject`` can turn into frames, so the reactor's ``os.read``/``os.write`` would bypass the encryption.
The helpers below (:func:`send_all`, :func:`receive_some`) take their socket shortcut only for an exact
``trio.SocketStream`` and use the stream's own methods for anything else.

A session must call :meth:`Reactor.forget` on a socket (with its directions) before closing it, so a file
descriptor number reused by the kernel never meets a stale registration.
"""

from __future__ import annotations

import enum
import os
import select
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import trio

from atlas.proxy.frames import CloseCode

if TYPE_CHECKING:
    from atlas.proxy.frames import FrameScanner

__all__ = [
    "Direction",
    "Handback",
    "PrependedStream",
    "RateLimiter",
    "Reactor",
    "ReactorStatistics",
    "close_now",
    "receive_some",
    "send_all",
    "serve_reactor",
    "socket_fd",
]

_RECEIVE_SIZE: Final = 64 * 1024
_MAX_EVENTS: Final = 1024
_EPOLLIN: Final = select.EPOLLIN
_EPOLLOUT: Final = select.EPOLLOUT
_READ_EVENTS: Final = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_WRITE_EVENTS: Final = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR


class Handback(enum.IntEnum):
    """Why the reactor gave a direction back to its session."""

    EOF = 0
    """The source stream ended or broke; nothing is pending."""
    FED = 1
    """A chunk needs the session (Close, protocol error, hold): ``out`` holds its bytes, none sent."""
    SEND_FAILED = 2
    """The destination broke while sending ``out`` (``sent`` bytes of it went)."""
    REVOKED = 3
    """The session (or the reactor's shutdown) took the direction back; ``out[sent:]`` is still to send."""


class RateLimiter:
    """A token bucket of messages: ``rate`` per second on average, ``burst`` at once.

    ``clock`` (seconds, monotonic) is ``time.monotonic`` unless a test gives its own.
    """

    __slots__ = ("_clock", "_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def allow(self, count: int) -> bool:
        """Take ``count`` messages from the bucket; False once the client went over its rate."""
        now = self._clock()
        tokens = min(self.burst, self._tokens + (now - self._last) * self.rate) - count
        self._tokens = tokens
        self._last = now
        return tokens >= 0


class Direction:
    """One direction of one session: its scanner, its byte count and what is in flight.

    The task pumps and the reactor both scan with :meth:`take`; while lent to the reactor, ``src`` and
    ``dst`` are the file descriptors it reads and writes.
    """

    __slots__ = (
        "attention",
        "delivered",
        "dirty",
        "dst",
        "kind",
        "lender",
        "limiter",
        "nbytes",
        "out",
        "partner",
        "scanner",
        "sent",
        "src",
        "taken",
        "task",
        "whole",
    )

    def __init__(self, scanner: FrameScanner) -> None:
        self.scanner = scanner
        self.nbytes = 0
        """Bytes received in this direction."""
        self.whole = True
        """The last chunk :meth:`take` returned starts and ends at message boundaries."""
        self.taken = 0
        """How many messages the last chunk :meth:`take` returned completes."""
        self.delivered = 0
        """Messages whose last byte was written to a destination (a chunk counts once written whole)."""
        self.limiter: RateLimiter | None = None
        """A client's message rate limit (up direction only); past it the scanner fails with 1008."""
        self.attention = False
        """After :meth:`take`: the scanner stopped (Close, error) or reached its hold limit."""
        self.dirty = False
        """Part of a chunk went out and the rest did not: no frame may be injected in this direction."""
        self.out: bytes | bytearray = b""
        self.sent = 0
        self.src = -1
        self.dst = -1
        self.task: trio.lowlevel.Task | None = None
        self.kind = Handback.REVOKED
        """Why the reactor gave this direction back, the last time it did."""
        self.lender: Reactor | None = None
        self.partner: Direction | None = None
        """The other direction lent together with this one (:meth:`Reactor.relay_pair`)."""

    def abort(self, _: object) -> trio.lowlevel.Abort:
        """The lending task was cancelled: the reactor lets go of this direction and its partner."""
        lender = self.lender
        if lender is not None:
            partner = self.partner
            lender._release(self)
            if partner is not None:
                lender._release(partner)
        return trio.lowlevel.Abort.SUCCEEDED

    def take(self, data: bytes | bytearray) -> bytes | bytearray:
        """Count and scan received bytes; return what may be forwarded now (the per-chunk step)."""
        scanner = self.scanner
        self.nbytes += len(data)
        whole = scanner.at_boundary
        before = scanner.messages
        out = scanner.feed(data)
        taken = self.taken = scanner.messages - before
        limiter = self.limiter
        if limiter is not None and taken and not limiter.allow(taken):
            scanner.fail(CloseCode.POLICY_VIOLATION, "message rate limit exceeded")
        self.whole = whole and scanner.at_boundary
        self.attention = bool(scanner.state) or scanner.messages >= scanner.limit
        return out


class PrependedStream(trio.abc.Stream):
    """A stream that first yields some already-received bytes, then reads its inner stream.

    A backend may speak right behind its 101 answer; those bytes arrive with the handshake and are
    replayed first. Once they are consumed the reactor may relay the inner socket directly.
    """

    def __init__(self, inner: trio.abc.Stream, head: bytes) -> None:
        self.inner = inner
        self.head = head

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """The prepended bytes (all at once), then whatever the inner stream gives."""
        if self.head:
            head, self.head = self.head, b""
            await trio.lowlevel.checkpoint()
            return head
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send to the inner stream."""
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        """Wait on the inner stream."""
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """Half-close the inner stream."""
        await self.inner.send_eof()  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        """Close the inner stream."""
        await self.inner.aclose()


def socket_fd(stream: trio.abc.Stream) -> int | None:
    """The file descriptor the reactor may relay ``stream`` through, or None (task pumps only)."""
    if isinstance(stream, PrependedStream):
        if stream.head:
            return None
        stream = stream.inner
    if type(stream) is trio.SocketStream:
        fd = stream.socket.fileno()
        return fd if fd >= 0 else None
    return None


def _plain_fd(stream: trio.abc.Stream) -> int | None:
    """The descriptor of a plain socket stream (open or closed: -1), None for any other stream."""
    if type(stream) is trio.SocketStream:
        return stream.socket.fileno()
    return None


async def send_all(stream: trio.abc.Stream, data: bytes | bytearray | memoryview) -> None:
    """``stream.send_all(data)``; to a plain socket the bytes are first written without waiting.

    When the kernel takes them all at once (the usual case for a handshake or a Close frame), that is
    the whole send: no scheduler round trip. Otherwise what is left goes through ``send_all``, which
    waits for room. Raises what ``send_all`` raises.
    """
    fd = _plain_fd(stream)
    if fd is not None and data:
        if fd < 0:
            raise trio.ClosedResourceError("the socket was already closed")
        try:
            sent = os.write(fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
        if sent == len(data):
            return
        data = memoryview(data)[sent:]
    await stream.send_all(data)


async def receive_some(stream: trio.abc.Stream, max_bytes: int) -> bytes | bytearray:
    """``stream.receive_some(max_bytes)``; from a plain socket, bytes already there are taken at once.

    For a read that usually finds its bytes waiting (a client's request, right after the connection
    was accepted): no scheduler round trip then. Otherwise one ``wait_readable`` (a checkpoint) and
    the read. Other streams: their own ``receive_some``. Raises what ``receive_some`` raises.
    """
    fd = _plain_fd(stream)
    if fd is None:
        return await stream.receive_some(max_bytes)
    while True:
        if fd < 0:
            raise trio.ClosedResourceError("the socket was already closed")
        try:
            return os.read(fd, max_bytes)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
        try:
            await trio.lowlevel.wait_readable(fd)
        except trio.ClosedResourceError:
            raise trio.ClosedResourceError("the socket was closed while being read") from None
        fd = _plain_fd(stream)
        assert fd is not None


def close_now(stream: trio.abc.Stream) -> bool:
    """Close a plain socket stream (or a :class:`PrependedStream` or ``SSLStream`` over one) at once.

    What ``trio.aclose_forcefully`` does for such a stream, without its two scheduler round trips:
    closing a socket needs no waiting (trio wakes whoever waits on it). A TLS stream's socket is closed
    without a ``close_notify``, as ``aclose_forcefully`` would (it cancels the attempt to send one).
    False for other streams. Idempotent.
    """
    if isinstance(stream, PrependedStream):
        stream = stream.inner
    if type(stream) is not trio.SocketStream and isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if type(stream) is trio.SocketStream:
        stream.socket.close()
        return True
    return False


class _Entry:
    """What the reactor watches on one file descriptor."""

    __slots__ = ("mask", "reader", "writer")

    def __init__(self) -> None:
        self.reader: Direction | None = None
        """The direction whose source this is."""
        self.writer: Direction | None = None
        """The direction with bytes pending for this destination."""
        self.mask = 0


class ReactorStatistics:
    """A snapshot of a reactor's counters."""

    __slots__ = ("events", "lent", "partial_writes", "wakeups")

    def __init__(self, wakeups: int, events: int, partial_writes: int, lent: int) -> None:
        self.wakeups = wakeups
        self.events = events
        self.partial_writes = partial_writes
        self.lent = lent

    def __repr__(self) -> str:
        return (
            f"ReactorStatistics(wakeups={self.wakeups}, events={self.events}, "
            f"partial_writes={self.partial_writes}, lent={self.lent})"
        )


class Reactor:
    """Relays the directions sessions lend it, all in one task (see the module docstring)."""

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._entries: dict[int, _Entry] = {}
        self._lent = 0
        self.closed = False
        """True until :meth:`serve` runs and again once it stopped: nothing can be lent then."""
        self._wakeups = 0
        self._events = 0
        self._partial_writes = 0

    def statistics(self) -> ReactorStatistics:
        """Counters: wake-ups, epoll events handled, partial writes, and directions lent right now."""
        return ReactorStatistics(self._wakeups, self._events, self._partial_writes, self._lent)

    @property
    def running(self) -> bool:
        """Whether directions may be lent now."""
        return self._epoll is not None and not self.closed

    # -- the sessions' side ------------------------------------------------------------------------

    async def relay(self, d: Direction, src: int, dst: int) -> Handback:
        """Lend ``d`` (read ``src``, write ``dst``) until the reactor gives it back; say why.

        Cancellation gives the direction back at once; what it had in flight stays in ``d.out``.
        """
        if not self.running or d.task is not None:
            await trio.lowlevel.checkpoint()
            return Handback.REVOKED
        self._lend(d, src, dst, trio.lowlevel.current_task())
        await trio.lowlevel.wait_task_rescheduled(d.abort)
        return d.kind

    async def relay_pair(
        self, a: Direction, a_src: int, a_dst: int, b: Direction, b_src: int, b_dst: int
    ) -> None:
        """Lend two directions from one task until either is given back; then the other is revoked.

        The caller reads ``a.kind`` and ``b.kind`` (the one not given back first is ``REVOKED``, with its
        bytes in flight, if any, in ``out``). One parked task for both directions of a session: an idle
        session costs no pump tasks.
        """
        if not self.running or a.task is not None or b.task is not None:
            await trio.lowlevel.checkpoint()
            a.kind = b.kind = Handback.REVOKED
            return
        task = trio.lowlevel.current_task()
        self._lend(a, a_src, a_dst, task)
        self._lend(b, b_src, b_dst, task)
        a.partner = b
        b.partner = a
        await trio.lowlevel.wait_task_rescheduled(a.abort)

    def _lend(self, d: Direction, src: int, dst: int, task: trio.lowlevel.Task) -> None:
        d.src = src
        d.dst = dst
        d.out = b""  # left over only by a cancelled lending, whose task has moved on
        d.sent = 0
        d.kind = Handback.REVOKED
        d.task = task
        d.lender = self
        self._lent += 1
        self._watch(src).reader = d
        self._update(src)

    def revoke(self, d: Direction) -> None:
        """Take ``d`` back now if it is lent: its task wakes up with :attr:`Handback.REVOKED`."""
        if d.task is not None:
            self._give_back(d, Handback.REVOKED)

    def forget(self, fd: int | None, directions: tuple[Direction, ...]) -> None:
        """Take back those of ``directions`` that use ``fd`` (call before closing its socket)."""
        if fd is None:
            return
        for d in directions:
            if d.task is not None and fd in (d.src, d.dst):
                self._give_back(d, Handback.REVOKED)

    # -- bookkeeping -------------------------------------------------------------------------------

    def _watch(self, fd: int) -> _Entry:
        entry = self._entries.get(fd)
        if entry is None:
            entry = self._entries[fd] = _Entry()
        return entry

    def _update(self, fd: int) -> None:
        """Bring ``fd``'s epoll registration in line with its entry (unregistered when idle)."""
        entry = self._entries.get(fd)
        if entry is None:
            return
        reader = entry.reader
        mask = (_EPOLLIN if reader is not None and not reader.out else 0) | (
            _EPOLLOUT if entry.writer is not None else 0
        )
        if mask == entry.mask:
            if reader is None and entry.writer is None:
                del self._entries[fd]
            return
        epoll = self._epoll
        assert epoll is not None
        old = entry.mask
        entry.mask = mask
        try:
            if not mask:
                epoll.unregister(fd)
            elif not old:
                epoll.register(fd, mask)
            else:
                epoll.modify(fd, mask)
        except FileExistsError:
            epoll.modify(fd, mask)
        except (FileNotFoundError, OSError):
            # The descriptor was closed (which unregisters it) before we were told: start afresh.
            if mask:
                try:
                    epoll.register(fd, mask)
                except OSError:
                    entry.mask = 0
        if reader is None and entry.writer is None:
            del self._entries[fd]

    def _release(self, d: Direction) -> None:
        """Stop watching anything for ``d`` (its pending bytes, if any, stay with it)."""
        if d.task is None:
            return
        d.task = None
        d.lender = None
        d.partner = None
        self._lent -= 1
        entry = self._entries.get(d.src)
        if entry is not None and entry.reader is d:
            entry.reader = None
            self._update(d.src)
        entry = self._entries.get(d.dst)
        if entry is not None and entry.writer is d:
            entry.writer = None
            self._update(d.dst)

    def _give_back(self, d: Direction, kind: Handback) -> None:
        """Wake ``d``'s task with ``kind`` (a partner lent with it is revoked: one wake-up for both)."""
        task = d.task
        assert task is not None
        partner = d.partner
        d.kind = kind
        self._release(d)
        if partner is not None:
            self._release(partner)
        trio.lowlevel.reschedule(task)

    # -- the hot path ------------------------------------------------------------------------------

    def _read(self, d: Direction) -> None:
        try:
            data = os.read(d.src, _RECEIVE_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._give_back(d, Handback.EOF)
            return
        out = d.take(data)
        if d.attention:
            d.out = out
            d.sent = 0
            self._give_back(d, Handback.FED)
            return
        if out:
            self._write(d, out, 0)

    def _write(self, d: Direction, out: bytes | bytearray, sent: int) -> None:
        """Write ``out[sent:]`` to ``d.dst``; keep what does not fit and wait for the socket."""
        try:
            n = os.write(d.dst, memoryview(out)[sent:] if sent else out)
        except BlockingIOError:
            n = 0
        except OSError:
            d.out = out
            d.sent = sent
            self._give_back(d, Handback.SEND_FAILED)
            return
        sent += n
        if sent == len(out):
            d.delivered += d.taken
            if d.out:
                # A backlog drained: read the source again, stop watching the destination.
                d.out = b""
                d.sent = 0
                d.dirty = False
                entry = self._entries.get(d.dst)
                if entry is not None and entry.writer is d:
                    entry.writer = None
                    self._update(d.dst)
                self._update(d.src)
            return
        self._partial_writes += 1
        first = not d.out
        d.out = out
        d.sent = sent
        d.dirty = sent > 0
        if first:
            self._watch(d.dst).writer = d
            self._update(d.dst)
            self._update(d.src)

    async def serve(self, *, task_status: trio.TaskStatus[Reactor] = trio.TASK_STATUS_IGNORED) -> None:
        """Relay lent directions until cancelled; give every lent direction back when stopping."""
        if self._epoll is not None or self.closed:
            raise RuntimeError("a Reactor serves once")
        epoll = self._epoll = select.epoll()
        try:
            task_status.started(self)
            fileno = epoll.fileno()
            poll = epoll.poll
            wait_readable = trio.lowlevel.wait_readable
            entries_get = self._entries.get
            read = self._read
            write = self._write
            while True:
                await wait_readable(fileno)
                events = poll(0, _MAX_EVENTS)
                self._wakeups += 1
                self._events += len(events)
                for fd, mask in events:
                    entry = entries_get(fd)
                    if entry is None:
                        continue
                    if mask & _READ_EVENTS:
                        d = entry.reader
                        if d is not None and not d.out:
                            read(d)
                    if mask & _WRITE_EVENTS:
                        d = entry.writer
                        if d is not None:
                            write(d, d.out, d.sent)
        finally:
            self.closed = True
            for entry in list(self._entries.values()):
                d = entry.reader
                if d is not None and d.task is not None:
                    self._give_back(d, Handback.REVOKED)
            self._entries.clear()
            epoll.close()


async def serve_reactor(*, task_status: trio.TaskStatus[Reactor] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a new :class:`Reactor` until cancelled; report it once it can take directions."""
    await Reactor().serve(task_status=task_status)
