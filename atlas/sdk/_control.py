"""The control endpoint: one session per control WebSocket from Atlas (hello, load reports, routing).

A session reads Atlas's messages in order. ``hello`` is answered with ``welcome`` and starts the load
reports (one at once, then every ``load_interval`` seconds). ``transfer.notice`` and
``transfer.prepare`` start a transfer task (``_transfers.py``) in the session's nursery; the later
steps of a transfer are routed to its task by transfer id, if its phase takes them. Atlas's answers to
the server's own ``transfer.request`` (``transfer.accepted`` / ``transfer.refused``) go to the request
waiting for them, by request id (``_requests.py``). Cross-server traffic (``relay.*``, ``object.*``)
goes to the server's relay (``_relay.py``), whose task for this channel runs beside the load reporter.
A message that is malformed, of an unknown type, or out of turn is logged and ignored: the channel stays
up. When the channel closes (or a send on it fails), every transfer that came through it rolls back,
and every request waiting on it fails, before the session ends.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import trio

from atlas.control.messages import (
    RELAY_CAPABILITY,
    SUPPORTED_VERSIONS,
    AtlasMessage,
    Hello,
    Load,
    ProtocolError,
    TransferAbort,
    TransferAccepted,
    TransferBegin,
    TransferCommit,
    TransferComplete,
    TransferNotice,
    TransferPrepare,
    TransferRefused,
    TransferReject,
    Welcome,
    decode_from_atlas,
)
from atlas.sdk._channel import SEND_TIMEOUT, ChannelGone, ControlChannel
from atlas.sdk._handoff import Handoff, TransferInfo
from atlas.sdk._relay import RELAY_MESSAGES
from atlas.sdk._transfers import Incoming, Outgoing, run_source, run_target
from atlas.sdk._websocket import WebSocket, WebSocketClosed, WriterEnd

if TYPE_CHECKING:
    from atlas.sdk._server import GameServer

__all__ = ["CAPABILITIES", "NO_COMMON_VERSION", "serve_control"]

logger = logging.getLogger("atlas.sdk")

#: What this SDK offers in ``welcome``: it takes part in transfers with a state handoff, and takes
#: relayed messages and object offers.
CAPABILITIES = ("transfer", RELAY_CAPABILITY)
#: Close code and reason when ``hello`` offers no version this SDK speaks.
NO_COMMON_VERSION = (4000, "no common protocol version")
#: Seconds Atlas has to say ``hello`` after the control WebSocket opens.
HELLO_TIMEOUT = 10.0
#: Seconds to wait for the closing handshake of the control WebSocket (on shutdown: a moment).
CLOSE_TIMEOUT = 2.0
GOING_AWAY_CLOSE_TIMEOUT = 0.05


async def serve_control(server: GameServer, ws: WebSocket) -> None:
    """Run one control channel until Atlas closes it (or the server stops)."""
    channel = ControlChannel(ws)
    server._channels.add(channel)
    try:
        async with trio.open_nursery() as nursery:
            writer_scope = await nursery.start(_write, channel)
            load_scope = await nursery.start(_report_load, server, channel)
            relay_scope = await nursery.start(server._relay.serve_channel, channel)
            with channel.scope:
                await _read(server, channel, nursery)
            channel.close()
            writer_scope.cancel()
            load_scope.cancel()
            relay_scope.cancel()
            server._transfers.fail_channel(channel, "the control channel closed")
            # The nursery now waits for those transfers to roll back (each rollback is bounded).
    finally:
        channel.close()
        server._channels.discard(channel)
        going_away = trio.current_effective_deadline() == -math.inf
        code, reason = (1001, "server shutting down") if going_away else channel.close_code
        # Shutting down, the WebSocket's reader is cancelled too: the answering close cannot be read.
        with trio.move_on_after(GOING_AWAY_CLOSE_TIMEOUT if going_away else CLOSE_TIMEOUT, shield=True):
            await ws.aclose(code, reason)
        logger.info("%s: control channel from %s closed", server.name, channel.node)


async def _write(
    channel: ControlChannel, *, task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED
) -> None:
    """The channel's writer: what the socket did not take at once; a stuck or broken one ends the channel."""
    with trio.CancelScope() as scope:
        task_status.started(scope)
        end = await channel.ws.serve_writes(SEND_TIMEOUT)
        if end is not WriterEnd.FINISHED:
            logger.warning("control channel from %s: %s", channel.node, end.value.replace("_", " "))
        channel.close()


async def _report_load(
    server: GameServer,
    channel: ControlChannel,
    *,
    task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send ``load`` right after ``welcome``, then every ``load_interval`` seconds."""
    with trio.CancelScope() as scope:
        task_status.started(scope)
        # Bounded by the channel's life: the reader ends the channel if hello does not come.
        await channel.welcomed.wait()
        while True:
            report = Load(
                players=len(server.players),
                capacity=server.capacity,
                tick_ms=server.tick_ms,
                accepting=server.accepting,
            )
            try:
                await channel.send(report)
            except ChannelGone:
                return
            await trio.sleep(server.load_interval)


async def _read(server: GameServer, channel: ControlChannel, nursery: trio.Nursery) -> None:
    """Read and act on Atlas's messages until the channel closes."""
    hello_by = trio.current_time() + HELLO_TIMEOUT
    while True:
        try:
            if channel.version is not None:
                text = await channel.ws.get_message()
            else:
                with trio.move_on_at(hello_by) as waiting:
                    text = await channel.ws.get_message()
                if waiting.cancelled_caught:
                    logger.warning(
                        "%s: no hello within %g s on a control channel", server.name, HELLO_TIMEOUT
                    )
                    return
        except WebSocketClosed:
            return
        try:
            message = decode_from_atlas(text)
        except ProtocolError as exc:
            # Unknown types land here too: v1 answers them with nothing (docs/protocol.md, versioning).
            logger.warning(
                "%s: ignoring a control message from %s: %s: %.200r", server.name, channel.node, exc, text
            )
            continue
        try:
            await _act(server, channel, message, nursery)
        except ChannelGone:
            return


async def _act(
    server: GameServer, channel: ControlChannel, message: AtlasMessage, nursery: trio.Nursery
) -> None:
    """Act on one decoded message from Atlas."""
    if isinstance(message, Hello):
        await _welcome(server, channel, message)
        return
    if channel.version is None:
        logger.warning("%s: ignoring %s before hello", server.name, type(message).__name__)
        return
    if isinstance(message, TransferNotice):
        await _start_source(server, channel, message, nursery)
    elif isinstance(message, TransferPrepare):
        await _start_target(server, channel, message, nursery)
    elif isinstance(message, TransferAccepted | TransferRefused):
        if not channel.answer(message):
            logger.warning(
                "%s: ignoring %s for request %s: no such request is waiting",
                server.name,
                type(message).__name__,
                message.request,
            )
    elif isinstance(message, RELAY_MESSAGES):
        server._relay.receive(channel, message)
    else:
        await _route(server, channel, message)


async def _welcome(server: GameServer, channel: ControlChannel, hello: Hello) -> None:
    common = set(hello.versions) & set(SUPPORTED_VERSIONS)
    channel.node = hello.node
    if not common:
        logger.error(
            "%s: Atlas node %s speaks protocol versions %s, this SDK %s: closing the control channel",
            server.name,
            hello.node,
            hello.versions,
            list(SUPPORTED_VERSIONS),
        )
        channel.close_code = NO_COMMON_VERSION
        channel.close()
        return
    first = channel.version is None
    channel.version = max(common)
    await channel.send(Welcome(version=channel.version, server=server.name, capabilities=list(CAPABILITIES)))
    if first:
        logger.info(
            "%s: control channel from Atlas node %s (protocol v%d)", server.name, hello.node, channel.version
        )
        channel.welcomed.set()


async def _start_source(
    server: GameServer, channel: ControlChannel, notice: TransferNotice, nursery: trio.Nursery
) -> None:
    if server._transfers.get(notice.transfer) is not None:
        logger.warning("%s: ignoring a repeated transfer.notice for %s", server.name, notice.transfer)
        return
    player = server.players.get(notice.client)
    refusal: str | None = None
    previous = player._transfer if player is not None else None
    if player is None or not player.connected:
        refusal = f"client {notice.client} is not on {server.name}"
    elif previous is not None and not previous.ending:
        if previous.channel is channel:
            # Atlas runs one transfer per client at a time: a new one means it gave up the previous
            # one, whose transfer.abort never came (Atlas bounds the time it spends telling servers).
            previous.abort_by_atlas(f"Atlas started transfer {notice.transfer} of this client")
        else:
            refusal = f"client {notice.client} is already being transferred ({previous.info.id})"
    elif previous is None and player.handing_off:
        refusal = f"client {notice.client} is still arriving on {server.name}"
    if player is None or refusal is not None:
        await _refuse(server, channel, notice.transfer, refusal or "")
        return
    info = TransferInfo(
        id=notice.transfer,
        client=notice.client,
        direction="out",
        peer=notice.target,
        reason=notice.reason,
        timeout=notice.timeout_ms / 1000,
        player=player,
    )
    # A previous transfer that is rolling back (Atlas has moved on) is waited for by the new one.
    out = Outgoing(info, channel, Handoff("out"), player=player, previous=previous)
    server._transfers.outgoing[info.id] = out
    player._transfer = out
    # start_soon, not start: the reader goes on with the next message at once (a burst of notices is
    # read in one pass). The task's scope is on the record already, so an abort that comes first
    # cancels it before it runs.
    nursery.start_soon(run_source, server, out, notice)


async def _start_target(
    server: GameServer, channel: ControlChannel, prepare: TransferPrepare, nursery: trio.Nursery
) -> None:
    if server._transfers.get(prepare.transfer) is not None:
        logger.warning("%s: ignoring a repeated transfer.prepare for %s", server.name, prepare.transfer)
        return
    info = TransferInfo(
        id=prepare.transfer,
        client=prepare.client,
        direction="in",
        peer=prepare.source,
        reason=prepare.reason,
        timeout=prepare.timeout_ms / 1000,
    )
    inc = Incoming(info, channel, Handoff("in"))
    server._transfers.incoming[info.id] = inc
    nursery.start_soon(run_target, server, inc, prepare)  # see _start_source


async def _route(
    server: GameServer,
    channel: ControlChannel,
    message: TransferBegin | TransferCommit | TransferComplete | TransferAbort,
) -> None:
    """Hand a later step to its transfer's task, or answer for a transfer that is not (or no longer) here."""
    name = type(message).__name__
    record = server._transfers.get(message.transfer)
    if record is None:
        ended = server._transfers.ended(message.transfer)
        if isinstance(message, (TransferBegin, TransferCommit)):
            # Atlas waits for an answer to these: give it one rather than let it run into its deadline.
            await _refuse(server, channel, message.transfer, ended or "unknown transfer")
        elif ended is None:
            # A late complete needs nothing (the link's Close said it first); a stray abort is worth a look.
            level = logging.DEBUG if isinstance(message, TransferComplete) else logging.WARNING
            logger.log(level, "%s: ignoring %s for unknown transfer %s", server.name, name, message.transfer)
        return
    if record.channel is not channel:
        logger.warning(
            "%s: ignoring %s for transfer %s from another Atlas node", server.name, name, record.info.id
        )
        return
    if message.client != record.info.client:
        logger.warning(
            "%s: ignoring %s for transfer %s: client %s, expected %s",
            server.name,
            name,
            record.info.id,
            message.client,
            record.info.client,
        )
        return
    if not record.handoff.accepts(message):
        logger.warning(
            "%s: ignoring %s for transfer %s in phase %s",
            server.name,
            name,
            record.info.id,
            record.handoff.phase.value,
        )
        return
    if isinstance(message, TransferAbort):
        record.abort_by_atlas(message.reason)
    else:
        record.deliver(message)


async def _refuse(server: GameServer, channel: ControlChannel, transfer: str, reason: str) -> None:
    logger.info("%s: refusing transfer %s: %s", server.name, transfer, reason)
    server._transfers.remember(transfer, f"refused: {reason}")
    await channel.send(TransferReject(transfer=transfer, reason=reason))
