"""Data links: one session per client WebSocket; its task reads (in-order ``on_message``), a writer writes.

A link is either *plain* (a new player: ``on_connect``) or a *transfer link*: it carries
``X-Atlas-Transfer`` naming a transfer this server prepared as the target. A transfer link is parked:
its player exists but is not in ``players``, its sends are queued, and its reader holds whatever it
reads until the transfer task admits the player after ``on_transfer_in`` (or ends the link if the
transfer is rolled back). A link that names a transfer this server never prepared is a *blind* transfer
from Atlas's point of view, and here simply a new player.

The session's own task reads the link and calls ``on_message`` with each message, with no hand-off to
another task; the link's writer task only writes what the socket did not take at once (``_websocket.py``).
The session is the one place a player ends: whatever ends it (the peer, the game, a transfer, a slow
socket, the server stopping) records a reason on the player and cancels the player's scope; the session
then closes the link with the matching code and calls ``on_disconnect`` exactly once for a player that
was installed (``on_connect`` or ``on_transfer_in`` was called).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

import trio

from atlas.sdk._player import (
    CLOSED,
    ERROR,
    KICKED,
    SHUTDOWN,
    TOO_SLOW,
    TRANSFER_ABORTED,
    TRANSFERRED,
    Player,
    PlayerDisconnected,
)
from atlas.sdk._transfers import Incoming
from atlas.sdk._transport import accept, header_map, reject
from atlas.sdk._websocket import Handshake, WebSocket, WebSocketClosed, WriterEnd

if TYPE_CHECKING:
    from atlas.sdk._server import GameServer

__all__ = ["CLIENT_ID_HEADER", "HEALTH_CHECK_HEADER", "TRANSFER_HEADER", "serve_link"]

logger = logging.getLogger("atlas.sdk")

CLIENT_ID_HEADER: Final = "x-atlas-client-id"
"""The header with which Atlas names the client of a data link."""
TRANSFER_HEADER: Final = "x-atlas-transfer"
"""The header with which Atlas marks a data link opened for a transfer (its value: the transfer id)."""
HEALTH_CHECK_HEADER: Final = "x-atlas-health-check"
"""The header of Atlas's WebSocket health probe: answered, but not a player."""

#: Seconds to wait for the closing handshake of a link.
CLOSE_TIMEOUT = 2.0
#: On shutdown the WebSocket's reader task is cancelled too, so the peer's answering close frame cannot
#: be read: send ours and drop the connection soon after.
GOING_AWAY_CLOSE_TIMEOUT = 0.05
#: Seconds ``on_disconnect`` may take.
DISCONNECT_HOOK_TIMEOUT = 5.0

_CLOSE_FOR: Final[dict[str, tuple[int, str]]] = {
    CLOSED: (1000, ""),
    TRANSFERRED: (1000, "transferred"),
    TRANSFER_ABORTED: (1000, "transfer aborted"),
    TOO_SLOW: (1008, "too slow"),
    ERROR: (1011, "internal error"),
    SHUTDOWN: (1001, "server shutting down"),
}


async def serve_link(server: GameServer, request: Handshake) -> None:
    """Accept one data link and run its player until the link ends."""
    headers = header_map(request.headers)
    if HEALTH_CHECK_HEADER in headers:
        await _answer_probe(request)
        return
    client_id = headers.get(CLIENT_ID_HEADER) or f"local-{uuid.uuid4().hex}"
    transfer_id = headers.get(TRANSFER_HEADER)
    incoming: Incoming | None = None
    if transfer_id:
        incoming = server._transfers.incoming.get(transfer_id)
        if incoming is None:
            logger.info(
                "%s: client %s arrives with transfer %s that was not prepared here: a new player",
                server.name,
                client_id,
                transfer_id,
            )
        elif incoming.info.client != client_id or incoming.player is not None or incoming.handoff.done:
            await reject(request, 409, f"transfer {transfer_id} does not expect this link")
            return
    if incoming is None and not transfer_id and server._has_connected(client_id):
        await reject(request, 409, f"client {client_id} is already connected")
        return
    # A blind transfer link for a client whose old link here is still open: Atlas has moved the client
    # away from that link (and closes it), so the new player takes the client's place in `players`.
    ws = await accept(request)
    if ws is None:
        return
    ws.queue_size = server.outbox_size
    player = Player(
        client_id,
        path=request.path,
        headers=headers,
        outbox=ws,
        send_timeout=server.send_timeout,
        parked=incoming is not None,
    )
    if incoming is not None and not incoming.attach(player):
        player._end(TRANSFER_ABORTED)  # rolled back during the handshake
    await _run(server, ws, player, incoming)


async def _answer_probe(request: Handshake) -> None:
    """A health probe: the handshake is the answer; let the probe close first (bounded)."""
    ws = await accept(request)
    if ws is None:
        return
    with trio.move_on_after(CLOSE_TIMEOUT):
        try:
            while True:
                await ws.get_message()
        except WebSocketClosed:
            pass
    with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
        await ws.aclose(1000, "health check")


async def _run(server: GameServer, ws: WebSocket, player: Player, incoming: Incoming | None) -> None:
    try:
        with player._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_write, ws, player, server.send_timeout)
                if incoming is None:
                    server._install(player)
                    if not await _call(server.on_connect, player, "on_connect"):
                        return
                await _read(server, ws, player)
                if player._ending != KICKED:
                    nursery.cancel_scope.cancel()
                # else the writer drains the outbox, then ends the link
    finally:
        going_away = trio.current_effective_deadline() == -math.inf
        player._end(player._ending or (SHUTDOWN if going_away else CLOSED))
        reason = player._ending or CLOSED
        server._uninstall(player)
        if incoming is not None and not player._admitted.is_set():
            incoming.fail("the transfer's data link closed")
        if player._transfer is not None:
            player._transfer.link_closed(transferred=reason == TRANSFERRED)
        code, text = player._close if reason == KICKED else _CLOSE_FOR.get(reason, (1000, ""))
        with trio.move_on_after(GOING_AWAY_CLOSE_TIMEOUT if going_away else CLOSE_TIMEOUT, shield=True):
            await ws.aclose(code, text)
        if player._installed:
            with trio.move_on_after(DISCONNECT_HOOK_TIMEOUT, shield=True):
                await _call(server.on_disconnect, player, "on_disconnect", reason)
        logger.debug("%s: player %s left (%s)", server.name, player.id, reason)


async def _call(hook: Callable[..., Awaitable[None]], player: Player, name: str, *args: object) -> bool:
    """Run a player's hook; False (and the player ends with ``error``) if it raised.

    A :class:`PlayerDisconnected` that escapes the hook is not an error: about this player, its link
    is ending anyway; about another player, it is a send to someone who just left.
    """
    try:
        await hook(player, *args)
    except PlayerDisconnected as exc:
        return exc.player_id != player.id
    except Exception:
        logger.exception("%s raised for player %s", name, player.id)
        player._end(ERROR)
        return False
    return True


async def _read(server: GameServer, ws: WebSocket, player: Player) -> None:
    """Hand the player's messages to ``on_message``, one at a time, in order."""
    admitted = player._admitted
    while True:
        try:
            message = await ws.get_message()
        except WebSocketClosed as exc:
            # Atlas moved the client away without telling us first: a blind transfer (or a transfer
            # whose transfer.complete is still on its way on the control channel: see _run).
            moved = exc.code == 1000 and exc.reason == "transferred"
            player._end(TRANSFERRED if moved else CLOSED)
            return
        if not admitted.is_set():
            # A parked (transferred-in) player's messages wait until the transfer is committed.
            await admitted.wait()
        if player._transfer is not None:
            player._transfer.message_beyond_cut()  # a message past transfer.begin's count: rolled back
        if not player.connected:
            return  # kicked: nothing more is processed
        if not await _call(server.on_message, player, "on_message", message):
            return
        player._processed()


async def _write(ws: WebSocket, player: Player, send_timeout: float) -> None:
    """Write what the socket did not take at once, in order; ends the player if the link cannot keep up."""
    end = await ws.serve_writes(send_timeout)
    if end is WriterEnd.TOO_SLOW:
        logger.warning("%s: a send took over %g s, dropping the player", player.id, send_timeout)
        player._end(TOO_SLOW)
        return
    # The player was kicked and everything before is sent, or the link broke.
    player._end(CLOSED)
