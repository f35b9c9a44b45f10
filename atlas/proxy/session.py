"""One client's session: the frame-level relay between the client and its backend link.

Theory of operation
-------------------
A session relays two directions:

* *up*: client stream -> :class:`FrameScanner` (masked frames) -> backend link stream;
* *down*: backend link stream -> :class:`FrameScanner` (unmasked frames) -> client stream.

When both streams are plain sockets and a :class:`~atlas.proxy.reactor.Reactor` runs, the session's own
task lends both directions to it (``relay_pair``) and sleeps: the reactor moves the bytes of every such
session from one task, and an idle session costs one parked task. The first time the reactor gives a
direction back (a Close frame, a protocol error, EOF, a broken destination, a transfer step or a failover
taking it back) the session starts two pump tasks in a nursery it owns, which run the logic below with
trio awaits and lend their direction again whenever plain relaying resumes. When that first handback is
the client ending the session (its Close frame, which the backend socket takes at once, or EOF), only
the down direction is left and the session task runs the down pump itself, with no nursery. Streams the
reactor cannot reach (memory streams, TLS, a backend's early bytes) are relayed by the pumps themselves;
both paths scan with the same step (:meth:`~atlas.proxy.reactor.Direction.take`) and finish a chunk that
needs the session with the same code.

Either way whole chunks move: one read may carry many frames and they leave with one write. The scanners
validate and delimit frames but never copy a chunk of complete frames (frames/_scanner doc).

The closing handshake is relayed, not performed: a Close frame from one side is forwarded to the other and
that pump stops; the other pump keeps relaying until the answering Close passes, then both streams close
(Atlas, as the server of the client, closes first). Anything else that ends a session, a peer that broke
the protocol, a peer that vanished, a close requested from outside (drain, idle timeout, an operator), is
recorded as the session's :class:`Ending` and the relay scope is cancelled; :meth:`ClientSession._finish`
then sends Atlas's own Close frames where a frame boundary allows it, waits a bounded time for the
answers, and closes both streams. A pump cancelled half-way through ``send_all`` (or a direction the
reactor wrote half a chunk of) is dirty: no frame is injected into a stream that may hold half a frame;
that side is just disconnected.

Failover
--------
A backend link that ends without a Close frame (the backend died), or that the health checker gives up on
(:meth:`ClientSession.fail_over`), is *lost*, not the end of the session. The down pump, which owns the
client's outgoing direction, moves the client: it closes the old link (its scope is cancelled, its stream
closed, which also wakes an up pump stuck writing to it), asks the :class:`LinkProvider` for a link to
another backend within ``[failover] timeout``, installs it and carries on relaying. Meanwhile the up pump
waits on ``_switching`` and reads nothing more from the client, so what the client sends is held by the
kernel (bounded: the client's writes block when the socket buffers fill: backpressure, never loss), then
goes to the new backend. A chunk that the dead backend refused is sent again to the new one when it holds
whole messages; a message cut in half by the failure cannot be completed and the rest of it is dropped
(``FrameScanner.discard_partial``). When no backend can take the client it is closed with 1013. A
transfer (a move whose source is still alive) reuses these steps.

Nothing here logs per message; counters are plain integers read by the ops plane.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

import attrs
import trio

from atlas.errors import HandshakeError
from atlas.proxy.frames import NO_LIMIT, OP_TEXT, CloseCode, FrameScanner, ScanState, build_close, build_frame
from atlas.proxy.reactor import Direction, Handback, RateLimiter, Reactor, close_now, send_all, socket_fd

if TYPE_CHECKING:
    from atlas.config import FailoverConfig
    from atlas.pool import Backend

__all__ = ["BackendLink", "ClientSession", "EndKind", "Ending", "LinkProvider"]

log = logging.getLogger("atlas.proxy")

_RECEIVE_SIZE: Final = 64 * 1024


class EndKind(enum.Enum):
    """Why a relay stopped."""

    CLEAN = "clean"
    """Both Close frames were relayed."""
    CLOSE_TIMEOUT = "close_timeout"
    """One side sent Close and the other did not answer in time."""
    CLIENT_GONE = "client_gone"
    """The client's stream ended or broke without a Close frame."""
    BACKEND_GONE = "backend_gone"
    """The backend's stream ended or broke without a Close frame."""
    CLIENT_ERROR = "client_error"
    """The client broke RFC 6455."""
    BACKEND_ERROR = "backend_error"
    """The backend broke RFC 6455."""
    REQUESTED = "requested"
    """Atlas closed the session (drain, idle timeout, an operator)."""
    NO_BACKEND = "no_backend"
    """The backend was lost and no other backend could take the client."""


@attrs.frozen
class Ending:
    """How a session ended: a kind, the close code that matters, and a human reason."""

    kind: EndKind
    code: int
    reason: str


@attrs.define(eq=False)
class BackendLink:
    """A client's WebSocket connection to one backend, and the scanner of what that backend sends."""

    backend: Backend
    stream: trio.abc.Stream
    scanner: FrameScanner
    subprotocol: str | None = None
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    """The scope of this link's down pump; cancelling it tears the link down."""
    lost: bool = False
    """The link failed (or was given up) while the session goes on: the session fails over."""
    abnormal: bool = False
    """The backend's side ended without a Close frame (a passive health signal)."""
    closed: bool = False
    up_base: int = 0
    """Client messages delivered to earlier links when this link became current (it got the rest)."""
    stall_from: float | None = None
    """When the previous link stopped being relayed (a transfer's cut took effect), until this link's
    first message: the client-visible stall, which includes the commit round trip of an SDK transfer."""
    on_first_message: Callable[[float], None] | None = None
    """Told the client-visible stall (seconds) when this link relays its first message after a switch."""
    released: trio.Event | None = None
    """Set once the down pump has let go of this link (None: it never took it). Only then may another
    task read the stream: the pump may still be parked in ``receive_some`` when its scope is cancelled."""


class LinkProvider(Protocol):
    """What a session needs from the data plane to open and close backend links."""

    async def open_link(self, exclude: frozenset[str]) -> BackendLink:
        """A failover's link: the best available backend not in ``exclude``; HandshakeError (502/503).

        Atlas's provider runs it through the transfer coordinator (a transfer with reason failover).
        """
        ...

    async def open_link_to(self, backend: Backend, *, transfer: str, subprotocol: str | None) -> BackendLink:
        """A link to ``backend`` for a transfer (``X-Atlas-Transfer``), with the client's subprotocol."""
        ...

    def link_closed(self, link: BackendLink) -> None:
        """``link`` is closed for good: release its backend, record passive health signals."""
        ...

    def failed_over(self, session: ClientSession, old: BackendLink, new: BackendLink | None) -> None:
        """A failover finished: moved to ``new``, or found no backend (``None``)."""
        ...


class ClientSession:
    """One client connection relayed to its current backend link.

    The owner (the listener's connection handler) creates the session after both handshakes, calls
    :meth:`run` in the client's task and releases the backend when it returns. :meth:`close` may be called
    from any task to end the session with a close code (drain, idle timeout, admin).
    """

    # Slots: an idle client is mostly this object, and its __dict__ (30-odd attributes) cost ~1.6 KB.
    __slots__ = (
        "_client_error",
        "_client_fd",
        "_closed_to_backend",
        "_closed_to_client",
        "_down",
        "_down_before",
        "_held_read",
        "_lifted",
        "_pending",
        "_reactor",
        "_relay_scope",
        "_settled",
        "_solo",
        "_switching",
        "_up",
        "client_id",
        "client_stream",
        "close_timeout",
        "connected_at",
        "ending",
        "failover",
        "failovers",
        "hold_limit",
        "last_stall",
        "link",
        "on_link",
        "peer",
        "player_id",
        "provider",
        "up",
    )

    def __init__(
        self,
        *,
        client_id: str,
        peer: str,
        client_stream: trio.abc.Stream,
        link: BackendLink,
        provider: LinkProvider,
        failover: FailoverConfig,
        max_message_size: int,
        validate_utf8: bool,
        close_timeout: float,
        pending: bytes = b"",
        reactor: Reactor | None = None,
        player_id: str | None = None,
        rate_limit: RateLimiter | None = None,
    ) -> None:
        self.client_id = client_id
        self.peer = peer
        #: The verified player id of the client's token (``[auth]``), None without token auth.
        self.player_id = player_id
        self.connected_at = time.time()
        self.client_stream = client_stream
        self.link = link
        self.provider = provider
        self.failover = failover
        self.close_timeout = close_timeout
        self.failovers = 0
        # Messages relayed down by earlier links (the current link's scanner counts from zero).
        self._down_before = 0
        # Set while the client has no usable backend link: the up pump waits on it.
        self._switching: trio.Event | None = None
        # Transfers: the pumps signal that a hold took effect (``_settled``) and wait for it to be lifted
        # (``_lifted``); an up pump reading while held does so in ``_held_read`` so a lift can wake it.
        self._settled = trio.Event()
        self._lifted = trio.Event()
        self._held_read: trio.CancelScope | None = None
        self.hold_limit = failover.hold_limit
        self.last_stall: float | None = None
        #: Called with each link that becomes current after the first (failover, transfer): the skim
        #: tap hooks its scanner there.
        self.on_link: Callable[[BackendLink], None] | None = None
        self.up = FrameScanner(masked=True, max_message_size=max_message_size, validate_utf8=validate_utf8)
        # The two directions: what the pumps (or the reactor, when they lend a direction to it) relay.
        self._up = Direction(self.up)
        self._up.limiter = rate_limit  # past it the client is closed with 1008, like a protocol error
        self._down = Direction(link.scanner)
        self._reactor = reactor
        self._client_fd = socket_fd(client_stream) if reactor is not None else None
        self.ending: Ending | None = None
        self._pending = pending
        self._relay_scope = trio.CancelScope()
        # The session task, while it runs the down pump itself (no nursery): see _end.
        self._solo: trio.lowlevel.Task | None = None
        # Whether a Close frame (relayed, or Atlas's own) has gone out to each side.
        self._closed_to_backend = False
        self._closed_to_client = False
        # A client protocol error waiting for the backend's answer to our Close (see _forward_up).
        self._client_error: Ending | None = None

    # -- counters read by the ops plane ------------------------------------------------------------

    @property
    def messages_up(self) -> int:
        """Complete messages relayed from the client."""
        return self.up.messages

    @property
    def messages_down(self) -> int:
        """Complete messages relayed to the client."""
        return self._down_before + self.link.scanner.messages

    @property
    def bytes_up(self) -> int:
        """Bytes received from the client."""
        return self._up.nbytes

    @bytes_up.setter
    def bytes_up(self, value: int) -> None:
        self._up.nbytes = value

    @property
    def bytes_down(self) -> int:
        """Bytes received from backends."""
        return self._down.nbytes

    @bytes_down.setter
    def bytes_down(self, value: int) -> None:
        self._down.nbytes = value

    def activity(self) -> int:
        """A number that changes whenever bytes move either way (the idle sweeper compares it)."""
        return self.bytes_up + self.bytes_down

    # -- control -----------------------------------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """End the session: Close ``code``/``reason`` to the client, 1001 to the backend."""
        self._end(Ending(EndKind.REQUESTED, code, reason))

    def fail_over(self) -> None:
        """Give up the current backend (dead, hung or ejected) and move the client to another one."""
        self._lose(self.link)

    # -- transfers: the steps the coordinator drives (a transfer is a failover whose source lives) ---

    @property
    def movable(self) -> bool:
        """Whether a transfer may start: relaying normally, no close or failover under way."""
        return (
            self.ending is None
            and self._switching is None
            and not self._closed_to_backend
            and not self._closed_to_client
            and not self.link.lost
        )

    async def hold_client(self) -> int:
        """Stop relaying the client's messages at the next message boundary.

        Returns, once the hold has taken effect and nothing is in flight, how many client messages the
        current link received. Later messages are held (bounded: see ``hold_limit``).
        """
        self._arm()
        self.up.hold_at_boundary()
        self._revoke(self._up)
        while not (self.up.held and not self._up.dirty):
            await self._settled.wait()
            self._settled = trio.Event()
        return self._up.delivered - self.link.up_base

    async def cut_backend(self, sent: int | None) -> None:
        """Relay the current link's messages up to its ``sent``-th (None: the next boundary), then stop."""
        scanner = self.link.scanner
        if sent is None:
            scanner.hold_at_boundary()
        else:
            scanner.hold_after(sent)
        self._revoke(self._down)
        while not (scanner.held and not self._down.dirty):
            await self._settled.wait()
            self._settled = trio.Event()

    def switch_to(self, new: BackendLink, *, stall_from: float | None = None) -> BackendLink:
        """Make ``new`` the client's link and lift the holds; returns the old link, still open.

        Call only while both holds are in effect (after :meth:`hold_client` and :meth:`cut_backend`).
        ``stall_from``: when the old link's last message was relayed (the cut took effect; default now):
        the client-visible stall is measured from there to ``new``'s first message.
        """
        old = self.link
        self._down_before += old.scanner.messages
        new.up_base = self._up.delivered
        new.stall_from = trio.current_time() if stall_from is None else stall_from
        self.last_stall = None
        self._install(new)
        old.scope.cancel()
        self._lift()
        return old

    def _install(self, link: BackendLink) -> None:
        self._revoke(self._up)
        self.link = link
        if self.on_link is not None:
            self.on_link(link)

    def resume(self) -> None:
        """Roll back: lift the holds on the current link; held messages flow to it, in order."""
        self.link.scanner.limit = self.up.limit = NO_LIMIT
        self._lift()

    async def retire_link(self, link: BackendLink, reason: str = "transferred") -> None:
        """Close a link a transfer left behind: Close 1000 to its backend, then the stream.

        Atlas is the backend's client, so it waits (bounded) for the backend to close the TCP connection,
        reading and dropping what the backend still sends. Closing with unread bytes in the socket would
        make the kernel send a reset, and a reset makes the backend's kernel throw away what the backend
        has not read yet: the last client messages relayed to it.
        """
        if not link.closed and link.scanner.state is ScanState.OPEN:
            with (
                trio.move_on_after(self.close_timeout),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                if link.released is not None:
                    await link.released.wait()  # its scope is cancelled: the pump lets go at once
                if await self._send_close(link.stream, True, (CloseCode.NORMAL, reason), mask=True):
                    while await link.stream.receive_some(_RECEIVE_SIZE):
                        pass
        await self._close_link(link)

    def _arm(self) -> None:
        self._settled = trio.Event()
        self._lifted = trio.Event()

    def _lift(self) -> None:
        self.up.limit = NO_LIMIT
        self._lifted.set()
        if self._held_read is not None:
            self._held_read.cancel()

    def _lose(self, link: BackendLink) -> None:
        """Mark ``link`` lost: the up pump holds, the down pump's scope is cancelled and it fails over."""
        if link is self.link and not link.lost:
            link.lost = True
            if self._switching is None:
                self._switching = trio.Event()
            self._revoke(self._up)
            link.scope.cancel()

    def _end(self, ending: Ending) -> None:
        if self.ending is None:
            self.ending = self._client_error or ending
        # The session task running the only pump ends the session only on its way out of the relay
        # scope (every such call returns without awaiting): nothing is left to interrupt.
        if self._solo is None or self._solo is not trio.lowlevel.current_task():
            self._relay_scope.cancel()

    async def run(self) -> Ending:
        """Relay until the session ends, close both streams, and return how it ended."""
        try:
            with self._relay_scope:
                up_open = True
                if self._pending:
                    # Frame bytes the client sent right behind its upgrade request.
                    up_open = await self._forward_up(self._pending)
                if self.ending is None:
                    await self._relay(up_open)
            if self.ending is None:
                # The close-handshake deadline ran out.
                self.ending = self._client_error or Ending(
                    EndKind.CLOSE_TIMEOUT, CloseCode.ABNORMAL, "close timed out"
                )
            await self._finish(self.ending)
        finally:
            if self._reactor is not None:
                self._reactor.forget(self._client_fd, (self._up, self._down))
            if not close_now(self.client_stream):
                await trio.aclose_forcefully(self.client_stream)
            # The relay scope is closed: no pump runs in the link's scope any more.
            await self._close_link(self.link, pumped=False)
        return self.ending

    async def _close_link(self, link: BackendLink, *, pumped: bool = True) -> None:
        """Close ``link`` for good; ``pumped``: its down pump may still run in its scope (cancel it)."""
        if not link.closed:
            link.closed = True
            if pumped:
                link.scope.cancel()
            if self._reactor is not None:
                self._reactor.forget(socket_fd(link.stream), (self._up, self._down))
            if not close_now(link.stream):
                await trio.aclose_forcefully(link.stream)
            self.provider.link_closed(link)

    # -- lending directions to the reactor ---------------------------------------------------------

    def _revoke(self, d: Direction) -> None:
        if self._reactor is not None:
            self._reactor.revoke(d)

    def _reactor_fds(self, link: BackendLink) -> tuple[int, int] | None:
        """``(client fd, link fd)`` when both directions of ``link`` may be lent to the reactor."""
        reactor = self._reactor
        if reactor is None or self._client_fd is None or not reactor.running:
            return None
        fd = socket_fd(link.stream)
        return None if fd is None else (self._client_fd, fd)

    # -- the pumps ---------------------------------------------------------------------------------
    #
    # Each pump either relays one chunk itself (task mode) or lends its direction to the reactor and
    # sleeps until the reactor gives it back (see atlas.proxy.reactor). Both scan with Direction.take
    # and finish a chunk that needs the session with the same code (_after_up, _after_down).

    async def _relay(self, up_open: bool) -> None:
        """Relay both directions until the session ends.

        While nothing needs the session, both directions are lent to the reactor from this task (no pump
        task at all: the common case costs one parked task); from the first handback on, by two pumps.
        """
        first_up: Handback | None = None
        first_down: Handback | None = None
        link = self.link
        if up_open and self._lendable_down(link) and self.up.limit == NO_LIMIT and self._switching is None:
            fds = self._reactor_fds(link)
            if fds is not None:
                assert self._reactor is not None
                await self._reactor.relay_pair(self._up, fds[0], fds[1], self._down, fds[1], fds[0])
                first_up, first_down = self._up.kind, self._down.kind
                if first_down is Handback.REVOKED and not self._down.out:
                    first_up = self._client_first(first_up, fds[1])
                    if first_up is None:
                        # The up direction is finished: the down pump runs in this task (no nursery),
                        # unless the session already ended.
                        if self.ending is None:
                            self._solo = trio.lowlevel.current_task()
                            await self._pump_down(link, first_down)
                        return
        async with trio.open_nursery() as nursery:
            if up_open:
                nursery.start_soon(self._pump_up, link, first_up)
            nursery.start_soon(self._pump_down, link, first_down)

    def _client_first(self, kind: Handback, backend_fd: int) -> Handback | None:
        """The common first handbacks, where the client ends the session, acted on without the pumps.

        ``kind`` is what the reactor gave back of the up direction (the down one was only revoked).
        The client left without a Close: the session ends (None). The client sent a Close: it goes to
        the backend now if the socket takes the whole chunk at once, and the up direction is finished
        (None); else the up pump sends the rest as after a revocation. Returns the handback the up pump
        starts from, or None when there is nothing left for it to do.
        """
        if kind is Handback.EOF:
            self._end(Ending(EndKind.CLIENT_GONE, CloseCode.GOING_AWAY, "client went away"))
            return None
        if (
            kind is not Handback.FED
            or self.up.state is not ScanState.CLOSED
            or self.up.limit != NO_LIMIT
            or self._switching is not None  # a failover began meanwhile: the Close waits for the new link
            or self.link.lost
        ):
            return kind
        d = self._up
        try:
            sent = os.write(backend_fd, d.out)
        except BlockingIOError:
            sent = 0
        except OSError:
            return Handback.REVOKED  # the up pump's send meets the error and acts on it
        if sent < len(d.out):
            d.sent = sent
            d.dirty = sent > 0
            return Handback.REVOKED
        d.out = b""
        self._closed_to_backend = True
        self._close_relayed()
        return None

    def _lendable_down(self, link: BackendLink) -> bool:
        return (
            self._reactor is not None
            and link.scanner.limit == NO_LIMIT
            and link.stall_from is None
            and self._client_error is None
        )

    async def _pump_up(self, first_link: BackendLink | None = None, first: Handback | None = None) -> None:
        """Relay client to backend.

        ``first``: what the reactor gave back of this direction, lent while ``first_link`` was current.
        """
        receive = self.client_stream.receive_some
        scanner = self.up
        d = self._up
        if first is not None and first_link is not None and not await self._up_handback(first_link, first):
            return
        while True:
            if scanner.limit == NO_LIMIT and self._switching is None and self._reactor is not None:
                fds = self._reactor_fds(self.link)
                if fds is not None:
                    if not await self._lend_up(fds):
                        return
                    continue
            try:
                if scanner.messages >= scanner.limit:
                    data = await self._receive_held()
                else:
                    data = await receive(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if data is None:
                # The hold was lifted: forward what was held to whichever link is current now.
                out = d.take(b"")
                if out:
                    await self._send_up(out, True)
                continue
            if not data:
                self._end(Ending(EndKind.CLIENT_GONE, CloseCode.GOING_AWAY, "client went away"))
                return
            if not await self._after_up(d.take(data), d.whole):
                return

    async def _lend_up(self, fds: tuple[int, int]) -> bool:
        """Lend the up direction to the reactor; handle what it gives back. False: the direction is done."""
        assert self._reactor is not None
        link = self.link
        return await self._up_handback(link, await self._reactor.relay(self._up, fds[0], fds[1]))

    async def _up_handback(self, link: BackendLink, kind: Handback) -> bool:
        """Act on what the reactor gave back of the up direction (lent while ``link`` was current)."""
        d = self._up
        out, sent = d.out, d.sent
        d.out, d.sent = b"", 0
        if kind is Handback.EOF:
            self._end(Ending(EndKind.CLIENT_GONE, CloseCode.GOING_AWAY, "client went away"))
            return False
        if kind is Handback.FED:
            return await self._after_up(out, d.whole)
        if out:
            # A chunk was under way to ``link`` when the reactor stopped.
            if kind is Handback.REVOKED and link is self.link and not link.lost:
                await self._send_up(out, d.whole, sent)
            elif self._up_failed(link, d.whole):
                d.dirty = True  # until it is resent: a transfer's hold must not count it yet
                await self._send_up(out, True)
        return await self._after_up(b"", True)

    async def _receive_held(self) -> bytes | bytearray | None:
        """Read the client while its messages are held; None once the hold is lifted.

        Held bytes stay in the up scanner; past ``hold_limit`` the client is not read at all until the
        hold is lifted (backpressure, never loss).
        """
        if self.up.buffered >= self.hold_limit:
            await self._lifted.wait()
            return None
        with trio.CancelScope() as scope:
            self._held_read = scope
            try:
                return await self.client_stream.receive_some(_RECEIVE_SIZE)
            finally:
                self._held_read = None
        return None

    async def _forward_up(self, data: bytes | bytearray) -> bool:
        """Scan and forward client bytes; return False once the up direction is finished."""
        out = self._up.take(data)
        return await self._after_up(out, self._up.whole)

    async def _after_up(self, out: bytes | bytearray, whole: bool) -> bool:
        """Forward a scanned chunk of client bytes and act on where the scanner stopped.

        ``whole``: ``out`` starts and ends at message boundaries. Returns False once the up direction
        is finished.
        """
        scanner = self.up
        if out:
            await self._send_up(out, whole)
        if scanner.messages >= scanner.limit and scanner.at_boundary:
            self._settled.set()
        if not scanner.state:
            return True
        if scanner.state is ScanState.CLOSED:
            self._closed_to_backend = True
            self._close_relayed()
            return False
        assert scanner.error is not None
        error = Ending(EndKind.CLIENT_ERROR, scanner.error.code, scanner.error.reason)
        if not scanner.at_frame_boundary:
            self._end(error)
            return False
        # Everything before the bad frame reached the backend: let its answers reach the client before
        # Atlas's own Close does. The down pump ends the session at the backend's Close. (Set before
        # the send: the answer may be relayed before this task runs again.)
        self._client_error = error
        self._closed_to_backend = True
        self._set_close_deadline()
        if not await self._send_close(
            self.link.stream, True, (CloseCode.GOING_AWAY, "client error"), mask=True
        ):
            self._end(error)
        return False

    async def _send_up(self, out: bytes | bytearray, whole_messages: bool, sent: int = 0) -> None:
        """Send client bytes to the current backend link, or across a failover to the next one.

        ``whole_messages``: ``out`` starts and ends at message boundaries, so if the link fails under it,
        it can be sent again to the new backend (the dead one processed none of it). ``sent``: how much
        of ``out`` already went to the current link. ``out`` is the chunk the up direction took last:
        once written whole, its messages count as delivered.
        """
        d = self._up
        while True:
            if self._switching is not None:
                await self._switching.wait()
            link = self.link
            d.dirty = True
            try:
                await send_all(link.stream, memoryview(out)[sent:] if sent else out)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                if self._up_failed(link, whole_messages):
                    # Still dirty: a transfer's hold must not count until this chunk is resent.
                    sent = 0
                    continue
                d.dirty = False
                return
            d.delivered += d.taken
            d.dirty = False
            return

    def _up_failed(self, link: BackendLink, whole_messages: bool) -> bool:
        """``link`` failed under a chunk of client bytes: lose it; return whether to send it again.

        Part of a message went to the dead backend unless the chunk held whole messages: the rest of it
        cannot follow elsewhere.
        """
        link.abnormal = True
        self._lose(link)
        if whole_messages:
            return True
        self.up.discard_partial()
        return False

    async def _pump_down(self, first_link: BackendLink | None = None, first: Handback | None = None) -> None:
        """Relay backend to client over the current link; across failovers, over the next ones.

        ``first``: what the reactor gave back of ``first_link``'s down direction, if it had it.
        """
        while True:
            link = self.link
            link.released = trio.Event()
            try:
                with link.scope:
                    await self._relay_down(link, first if link is first_link else None)
            finally:
                link.released.set()
            first = None
            if self.link is not link:
                continue  # a transfer switched the client to another link
            if not link.lost:
                return
            if not await self._fail_over(link):
                return

    async def _relay_down(self, link: BackendLink, first: Handback | None) -> None:
        receive = link.stream.receive_some
        scanner = link.scanner
        d = self._down
        d.scanner = scanner
        while True:
            if first is None:
                if scanner.messages >= scanner.limit and scanner.at_boundary:
                    # A transfer's cut: nothing more from this link until the hold is lifted (rollback)
                    # or the link is replaced (the scope is cancelled).
                    self._settled.set()
                    await self._lifted.wait()
                    if self.link is not link:
                        return  # replaced: what this link still holds goes nowhere
                    out = scanner.feed(b"")
                    if out:
                        d.dirty = True
                        await self.client_stream.send_all(out)
                        d.dirty = False
                    continue
                fds = self._reactor_fds(link) if self._lendable_down(link) else None
                if fds is not None:
                    assert self._reactor is not None
                    first = await self._reactor.relay(d, fds[1], fds[0])
            if first is not None:
                # The reactor had this direction and gave it back.
                kind, first = first, None
                out, sent = d.out, d.sent
                d.out, d.sent = b"", 0
                if kind is Handback.REVOKED:
                    if out and not await self._send_down(memoryview(out)[sent:] if sent else out):
                        return
                    continue
                if kind is Handback.SEND_FAILED:
                    self._end(Ending(EndKind.CLIENT_GONE, CloseCode.GOING_AWAY, "client went away"))
                    return
                if kind is Handback.EOF:
                    link.abnormal = True
                    self._lose(link)
                    return
            else:
                try:
                    data = await receive(_RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    # The backend vanished without a Close frame: fail over (or end, if that is off).
                    link.abnormal = True
                    self._lose(link)
                    return
                out = d.take(data)
            if not await self._after_down(link, out):
                return

    async def _after_down(self, link: BackendLink, out: bytes | bytearray) -> bool:
        """Forward a scanned chunk of backend bytes and act on where the scanner stopped.

        Returns False once this link's down direction is finished.
        """
        scanner = link.scanner
        if self._client_error is not None and scanner.state is ScanState.CLOSED:
            # The backend answered our Close: forward what came before it, then fail the client.
            out = out[: len(out) - scanner.close_frame_size]
        if out:
            if not await self._send_down(out):
                return False
            if link.stall_from is not None:
                self.last_stall = stall = trio.current_time() - link.stall_from
                link.stall_from = None
                if link.on_first_message is not None:
                    link.on_first_message(stall)
        if scanner.state:
            if self._client_error is not None:
                self._end(self._client_error)
            elif scanner.state is ScanState.CLOSED:
                self._closed_to_client = True
                self._close_relayed()
            else:
                assert scanner.error is not None
                self._end(Ending(EndKind.BACKEND_ERROR, scanner.error.code, scanner.error.reason))
            return False
        return True

    async def _send_down(self, out: bytes | bytearray | memoryview) -> bool:
        """Send backend bytes to the client; False (and the session ends) if the client is gone."""
        d = self._down
        d.dirty = True
        try:
            await send_all(self.client_stream, out)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._end(Ending(EndKind.CLIENT_GONE, CloseCode.GOING_AWAY, "client went away"))
            return False
        d.dirty = False
        return True

    async def _fail_over(self, old: BackendLink) -> bool:
        """Move the client off the lost link ``old``; return False if the session ended instead."""
        try:
            self._down_before += old.scanner.messages
            await self._close_link(old)
            if not self.failover.enabled or self._closed_to_backend or self._closed_to_client:
                self._end(Ending(EndKind.BACKEND_GONE, CloseCode.INTERNAL_ERROR, "backend went away"))
                return False
            if self._down.dirty or not old.scanner.at_boundary:
                # The client holds part of a message from the dead backend: nothing can complete it.
                self._end(Ending(EndKind.BACKEND_GONE, CloseCode.INTERNAL_ERROR, "backend went away"))
                return False
            self.up.discard_partial()
            new: BackendLink | None = None
            with trio.move_on_after(self.failover.timeout), contextlib.suppress(HandshakeError):
                new = await self.provider.open_link(frozenset({old.backend.name}))
            self.provider.failed_over(self, old, new)
            if new is None:
                self._end(Ending(EndKind.NO_BACKEND, CloseCode.TRY_AGAIN_LATER, "no game server available"))
                return False
            new.up_base = self._up.delivered  # what reaches the new link is counted from here
            self._install(new)
            self.failovers += 1
            if self.failover.notice:
                notice = build_frame(OP_TEXT, self.failover.notice.encode("utf-8"), mask=False)
                self._down.dirty = True
                await self.client_stream.send_all(notice)
                self._down.dirty = False
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._end(Ending(EndKind.CLIENT_GONE, CloseCode.GOING_AWAY, "client went away"))
            return False
        finally:
            if self._switching is not None:
                self._switching.set()
                self._switching = None

    def _close_relayed(self) -> None:
        """A Close frame passed one way: finish when both have, else give the other side a deadline."""
        if self._closed_to_backend and self._closed_to_client:
            code = self.up.close_code if self.up.close_code else self.link.scanner.close_code
            self._end(Ending(EndKind.CLEAN, code, self.up.close_reason))
        else:
            self._set_close_deadline()

    def _set_close_deadline(self) -> None:
        self._relay_scope.deadline = min(self._relay_scope.deadline, trio.current_time() + self.close_timeout)

    # -- closing -----------------------------------------------------------------------------------

    async def _finish(self, ending: Ending) -> None:
        """Send Atlas's own Close frames where needed and wait (bounded) for the answers."""
        kind = ending.kind
        if kind is EndKind.CLEAN:
            return
        to_client: tuple[int, str] | None = None
        to_backend: tuple[int, str] | None = None
        if kind is EndKind.CLIENT_ERROR:
            to_client = (ending.code, ending.reason)
            to_backend = (CloseCode.GOING_AWAY, "client closed")
        elif kind is EndKind.BACKEND_ERROR:
            to_backend = (ending.code, ending.reason)
            to_client = (CloseCode.INTERNAL_ERROR, "backend error")
        elif kind in (EndKind.BACKEND_GONE, EndKind.NO_BACKEND):
            to_client = (ending.code, ending.reason)
        elif kind is EndKind.CLIENT_GONE:
            to_backend = (CloseCode.GOING_AWAY, "client went away")
        elif kind is EndKind.CLOSE_TIMEOUT:
            if self._closed_to_backend and not self._closed_to_client:
                # The backend never answered the client's Close: answer it ourselves.
                to_client = (self.up.close_code or CloseCode.NORMAL, "")
        elif kind is EndKind.REQUESTED:
            to_client = (ending.code, ending.reason)
            to_backend = (CloseCode.GOING_AWAY, "client closed by Atlas")
        with trio.move_on_after(self.close_timeout):
            wait_client = False
            if to_client and not self._closed_to_client:
                wait_client = await self._send_close(
                    self.client_stream,
                    not self._down.dirty and self.link.scanner.at_frame_boundary,
                    to_client,
                    mask=False,
                )
            if to_backend and not self._closed_to_backend:
                at_boundary = not self._up.dirty and self.up.at_frame_boundary
                await self._send_close(self.link.stream, at_boundary, to_backend, mask=True)
            if wait_client and self.up.state is ScanState.OPEN:
                await self._await_close(self.client_stream, self.up)

    @staticmethod
    async def _send_close(
        stream: trio.abc.Stream, at_boundary: bool, close: tuple[int, str], *, mask: bool
    ) -> bool:
        """Send a Close frame if the stream sits at a frame boundary; return whether it was sent."""
        if not at_boundary:
            return False
        try:
            await stream.send_all(build_close(close[0], close[1], mask=mask))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    @staticmethod
    async def _await_close(stream: trio.abc.Stream, scanner: FrameScanner) -> None:
        """Read (and drop) what a peer still sends until its Close frame or EOF."""
        while scanner.state is ScanState.OPEN:
            try:
                data = await stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            scanner.feed(data)
