"""Atlas's side of the control channels: one WebSocket to each game server that has a control endpoint.

Theory of operation
-------------------
:func:`serve_control_channels` runs one task per backend with a ``control_url``, in a nursery of its own,
and reconciles that set with the pool once a second (backends come and go at run time). Each task
connects (bounded by ``connect_timeout``), says ``hello``, waits for ``welcome``, then reads messages
until the connection drops, and connects again with exponential back-off (capped at 10 s).

A :class:`ControlChannel` is only usable between ``welcome`` and the drop (``ready``). Replies to
transfer steps are routed by transfer id: :meth:`ControlChannel.request` registers a one-slot memory
channel for the id, sends, and waits (the caller bounds the wait). ``load`` reports are kept as
``last_load``, and their ``accepting`` goes to the backend (``Backend.accepting``: the balancer, transfers
and failovers pass over a server that takes no new players; reset when the channel drops). A channel that
drops fails every request waiting on it (:class:`ChannelClosed`), so a transfer in flight rolls back at
once rather than at its deadline.

Writes go through an ordered outbox: :meth:`ControlChannel.post` (and ``send``) queue a message without
waiting, and one writer task per channel (:meth:`ControlChannel.serve_writes`, beside the reader) writes
them. So a caller whose deadline strikes (a rollback telling servers within ``close_timeout``) never cuts
a frame in half and leaves the channel unusable, and telling a slow server never holds up a transfer.

Cross-server traffic (``relay.*``, ``object.handoff``) goes to the ``on_relay`` hook, which the relay
service (relay.py) sets. A target's answer to an ``object.offer`` is a reply like a transfer step's,
routed by the offer's id to :meth:`ControlChannel.request`; an answer nobody waits for (any more) goes to
``on_relay`` too.
"""

from __future__ import annotations

import contextlib
import logging
import math
import ssl
from collections.abc import Callable, Iterable

import attrs
import trio
import trio_websocket

from atlas.config import WsUrl
from atlas.control.messages import (
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    AtlasMessage,
    Hello,
    Load,
    ObjectAccept,
    ObjectHandoff,
    ObjectReject,
    ProtocolError,
    RelayClient,
    RelayRegion,
    RelaySend,
    ServerMessage,
    TransferAbort,
    TransferCommitted,
    TransferReady,
    TransferReject,
    TransferRequest,
    TransferState,
    Welcome,
    decode_from_server,
    encode,
)
from atlas.runtime import Runtime

__all__ = ["ChannelClosed", "ControlChannel", "ControlChannels", "RelayTraffic", "serve_control_channels"]

log = logging.getLogger("atlas.control")

_RECONCILE_PERIOD = 1.0
_MAX_EARLY = 1024
_OUTBOX = 4096  # messages queued for one server; more means it stopped reading
_MAX_BACKOFF = 10.0
_Reply = (
    TransferReady
    | TransferReject
    | TransferState
    | TransferCommitted
    | TransferAbort
    | ObjectAccept
    | ObjectReject
)
RelayTraffic = RelaySend | RelayRegion | RelayClient | ObjectHandoff | ObjectAccept | ObjectReject
"""What a channel hands to ``on_relay``: relay requests, handoffs, and offer answers nobody waits for."""


def _no_requests(_channel: ControlChannel, _request: TransferRequest) -> None:
    """The default ``on_request``: no coordinator, no transfers."""


def _no_relay(channel: ControlChannel, message: RelayTraffic) -> None:
    """The default ``on_relay``: no relay service, the message is ignored."""
    log.debug("control %s: no relay service for %s", channel.backend, type(message).__name__)


class ChannelClosed(Exception):
    """The control channel dropped (or was never up) while a request needed it."""


@attrs.define(eq=False)
class ControlChannel:
    """One live control connection to a game server."""

    backend: str
    ws: trio_websocket.WebSocketConnection
    welcome: Welcome
    last_load: Load | None = None
    ready: bool = True
    on_request: Callable[[ControlChannel, TransferRequest], None] = attrs.field(
        default=lambda _channel, _request: None
    )
    on_relay: Callable[[ControlChannel, RelayTraffic], None] = attrs.field(default=_no_relay)
    on_load: Callable[[Load], None] = attrs.field(default=lambda _load: None)
    _waiting: dict[str, trio.MemorySendChannel[_Reply | None]] = attrs.field(factory=dict)
    # A refusal nobody was waiting for yet (a source rejecting at `notice`): kept for the next request
    # (the most recent _MAX_EARLY of them: the oldest is forgotten first).
    _early: dict[str, _Reply] = attrs.field(factory=dict)
    _outbox: trio.MemorySendChannel[str] = attrs.field(init=False)
    _outgoing: trio.MemoryReceiveChannel[str] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._outbox, self._outgoing = trio.open_memory_channel[str](_OUTBOX)

    def post(self, message: AtlasMessage) -> None:
        """Queue one message for :meth:`serve_writes`, in order, without waiting.

        Raises :class:`ChannelClosed` if the channel is down or its outbox is full (the server stopped
        reading). A message is written whole or not at all: nobody's cancellation can cut one in half.
        """
        if not self.ready:
            raise ChannelClosed(f"control channel of {self.backend} is down")
        try:
            self._outbox.send_nowait(encode(message))
        except trio.WouldBlock:
            raise ChannelClosed(f"control channel of {self.backend} is not keeping up") from None

    async def send(self, message: AtlasMessage) -> None:
        """:meth:`post`, then a checkpoint (for callers in a loop)."""
        self.post(message)
        await trio.lowlevel.checkpoint()

    async def serve_writes(self) -> None:
        """Write the outbox to the server until the channel drops (run beside the reader)."""
        async for text in self._outgoing:
            try:
                await self.ws.send_message(text)
            except trio_websocket.ConnectionClosed:
                self._drop()
                return

    async def request(self, message: AtlasMessage, transfer: str) -> _Reply:
        """Send ``message`` and wait for the server's reply about ``transfer`` (caller bounds the wait).

        ``transfer`` is a transfer id, or the id of an ``object.offer`` (its answer's ``handoff``).
        """
        early = self._early.pop(transfer, None)
        if early is not None:
            return early
        send, receive = trio.open_memory_channel[_Reply | None](1)
        self._waiting[transfer] = send
        try:
            await self.send(message)
            reply = await receive.receive()
        finally:
            self._waiting.pop(transfer, None)
            send.close()
            receive.close()
        if reply is None:
            raise ChannelClosed(f"control channel of {self.backend} closed")
        return reply

    def _dispatch(self, message: ServerMessage) -> None:
        if isinstance(message, Load):
            self.last_load = message
            self.on_load(message)
            return
        if isinstance(message, Welcome):
            return
        if isinstance(message, TransferRequest):
            self.on_request(self, message)
            return
        if isinstance(message, RelaySend | RelayRegion | RelayClient | ObjectHandoff):
            self.on_relay(self, message)
            return
        if isinstance(message, ObjectAccept | ObjectReject):
            answered = self._waiting.get(message.handoff)
            if answered is None:
                self.on_relay(self, message)  # too late, or an unknown offer: the relay service decides
            else:
                with contextlib.suppress(trio.WouldBlock):  # a repeated answer: the first one counts
                    answered.send_nowait(message)
            return
        waiter = self._waiting.get(message.transfer)
        if waiter is None:
            if isinstance(message, TransferReject | TransferAbort):
                if len(self._early) >= _MAX_EARLY:
                    del self._early[next(iter(self._early))]
                self._early[message.transfer] = message
            else:
                log.debug("control %s: no transfer %s waits for %s", self.backend, message.transfer, message)
            return
        try:
            waiter.send_nowait(message)
        except trio.WouldBlock:
            log.warning(
                "control %s: a second reply about transfer %s dropped", self.backend, message.transfer
            )

    def _drop(self) -> None:
        self.ready = False
        self._outbox.close()  # serve_writes ends; later posts raise ChannelClosed
        for waiter in self._waiting.values():
            with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                waiter.send_nowait(None)


class ControlChannels:
    """The live control channels by backend name (read by the transfer coordinator).

    ``on_request`` is called (synchronously) with each ``transfer.request`` a server sends, and the
    channel it came on; the transfer coordinator sets it. ``on_relay`` is called the same way with the
    server's relay traffic (:data:`RelayTraffic`); the relay service sets it. Both are read when a
    channel comes up: set them before :func:`serve_control_channels` starts.
    """

    def __init__(self) -> None:
        self._channels: dict[str, ControlChannel] = {}
        self.on_request: Callable[[ControlChannel, TransferRequest], None] = _no_requests
        self.on_relay: Callable[[ControlChannel, RelayTraffic], None] = _no_relay

    def get(self, backend: str) -> ControlChannel | None:
        """The backend's channel if it is up, else None (the backend then gets blind transfers)."""
        channel = self._channels.get(backend)
        return channel if channel is not None and channel.ready else None

    def __iter__(self) -> Iterable[ControlChannel]:
        return iter(list(self._channels.values()))

    def _set(self, channel: ControlChannel) -> None:
        self._channels[channel.backend] = channel

    def _unset(self, channel: ControlChannel) -> None:
        if self._channels.get(channel.backend) is channel:
            del self._channels[channel.backend]


async def serve_control_channels(
    runtime: Runtime,
    channels: ControlChannels,
    *,
    node: str = "atlas",
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep one control channel per backend that has a ``control_url``, until cancelled."""
    running: dict[tuple[str, str], trio.CancelScope] = {}
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            wanted = {(b.name, b.control_url) for b in runtime.pool if b.control_url}
            for key in list(running):
                if key not in wanted:
                    running.pop(key).cancel()
            for key in wanted - set(running):
                scope = trio.CancelScope()
                running[key] = scope
                nursery.start_soon(_keep_channel, runtime, channels, key[0], key[1], node, scope)
            await trio.sleep(_RECONCILE_PERIOD)


async def _keep_channel(
    runtime: Runtime,
    channels: ControlChannels,
    backend: str,
    url: str,
    node: str,
    scope: trio.CancelScope,
) -> None:
    """Connect, serve, reconnect with back-off, until the scope is cancelled."""
    failures = 0
    with scope:
        while True:
            try:
                await _serve_one(runtime, channels, backend, url, node)
                failures = 0
            # _serve_one's nursery wraps what its body raises in an ExceptionGroup.
            except* (
                OSError,
                trio_websocket.HandshakeError,
                trio.TooSlowError,
                ProtocolError,
                ssl.SSLError,
            ) as group:
                failures += 1
                if failures == 1 or math.log2(failures).is_integer():
                    why = "; ".join(str(exc) for exc in group.exceptions)
                    log.warning("control channel of %s (%s) unavailable: %s", backend, url, why)
            await trio.sleep(min(_MAX_BACKOFF, 0.2 * 2 ** min(failures, 10)))


async def _serve_one(runtime: Runtime, channels: ControlChannels, backend: str, url: str, node: str) -> None:
    target = WsUrl.parse(url)
    timeout = runtime.proxy.connect_timeout
    context = runtime.backend_ssl_context() if target.secure else None
    async with trio.open_nursery() as nursery:
        with trio.fail_after(timeout):
            ws = await trio_websocket.connect_websocket(
                nursery, target.host, target.port, target.resource, use_ssl=context or False
            )
        try:
            with trio.fail_after(timeout):
                await ws.send_message(encode(Hello(versions=list(SUPPORTED_VERSIONS), node=node)))
                first = decode_from_server(await ws.get_message())
            if not isinstance(first, Welcome) or first.version != PROTOCOL_VERSION:
                raise ProtocolError(f"expected welcome with version {PROTOCOL_VERSION}, got {first!r}")
            channel = ControlChannel(
                backend=backend,
                ws=ws,
                welcome=first,
                on_request=channels.on_request,
                on_relay=channels.on_relay,
                on_load=lambda load: _set_accepting(runtime, backend, load.accepting),
            )
            channels._set(channel)
            log.info("control channel of %s up (%s)", backend, first.server, extra={"server": backend})
            nursery.start_soon(channel.serve_writes)
            try:
                await _read(channel)
            finally:
                channel._drop()
                channels._unset(channel)
                _set_accepting(runtime, backend, True)
                log.info("control channel of %s down", backend, extra={"server": backend})
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            with trio.move_on_after(1, shield=True):
                await ws.aclose()
                # trio-websocket 0.12 leaves its socket open when the server closed first.
                await trio.aclose_forcefully(ws._stream)
            nursery.cancel_scope.cancel()


def _set_accepting(runtime: Runtime, name: str, accepting: bool) -> None:
    """Apply a server's ``accepting`` (from its load reports) to its backend: the balancer reads it."""
    backend = runtime.pool.get(name)
    if backend is None or backend.accepting is accepting:
        return
    backend.accepting = accepting
    if accepting:
        log.info("%s accepts new players again", name, extra={"server": name, "event": "accepting"})
    else:
        log.info(
            "%s takes no new players (its load report)", name, extra={"server": name, "event": "accepting"}
        )


async def _read(channel: ControlChannel) -> None:
    while True:
        try:
            text = await channel.ws.get_message()
        except trio_websocket.ConnectionClosed:
            return
        try:
            message = decode_from_server(text)
        except ProtocolError as exc:
            log.warning("control %s: ignoring a malformed message: %s", channel.backend, exc)
            continue
        channel._dispatch(message)
