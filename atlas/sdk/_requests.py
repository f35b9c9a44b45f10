"""A game server's own requests to Atlas: ``transfer.request``, answered ``transfer.accepted``/``.refused``.

The request goes out on a control channel and the caller waits, bounded, for the answer, which the
channel's reader hands over by request id (``ControlChannel.answer``). With several Atlas nodes (one
control channel each) only the node that relays the player can move it: the channels are tried in turn
until one accepts. An accepted request only means the transfer has *started*; it then runs like any
other (docs/protocol.md section 7) and may still be rolled back.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final, get_args

import trio

from atlas.control.messages import Reason, TransferAccepted, TransferRequest
from atlas.sdk._channel import ChannelGone

if TYPE_CHECKING:
    from atlas.sdk._player import Player
    from atlas.sdk._server import GameServer

__all__ = ["REQUEST_TIMEOUT", "TransferRequestRefused", "request_transfer"]

#: Seconds :meth:`GameServer.request_transfer` waits for Atlas's answer (a caller may cancel sooner).
REQUEST_TIMEOUT: Final = 10.0

_REASONS: Final = frozenset(get_args(Reason))

logger = logging.getLogger("atlas.sdk")


class TransferRequestRefused(Exception):
    """A transfer asked for with :meth:`GameServer.request_transfer` did not start; ``reason`` says why.

    Atlas refused it (no such target, the target is down, the client is already moving, ...), or it
    could not be asked: no control channel is up, the player is not on this server, or no answer came
    in time (the transfer may then still start).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        """Why, for people (Atlas's words when Atlas refused)."""


async def request_transfer(server: GameServer, player: Player, target: str, reason: Reason) -> str:
    """Ask Atlas to move ``player`` to ``target``; the transfer id, or :class:`TransferRequestRefused`."""
    if reason not in _REASONS:
        raise ValueError(f"reason must be one of {', '.join(sorted(_REASONS))}, not {reason!r}")
    if server.players.get(player.id) is not player or not player.connected:
        raise TransferRequestRefused(f"player {player.id} is not on {server.name}")
    channels = [channel for channel in server._channels if channel.open and channel.version is not None]
    if not channels:
        raise TransferRequestRefused(f"{server.name} has no control channel from Atlas")
    refusals: list[str] = []
    with trio.move_on_after(REQUEST_TIMEOUT) as waiting:
        for channel in channels:
            message = TransferRequest(
                request=channel.new_request_id(), client=player.id, target=target, reason=reason
            )
            try:
                answer = await channel.request(message)
            except ChannelGone as exc:
                refusals.append(str(exc))
                continue
            if isinstance(answer, TransferAccepted):
                logger.info(
                    "%s: Atlas moves player %s to %s (transfer %s, %s)",
                    server.name,
                    player.id,
                    target,
                    answer.transfer,
                    reason,
                )
                return answer.transfer
            refusals.append(answer.reason if len(channels) == 1 else f"{channel.node}: {answer.reason}")
    if waiting.cancelled_caught:
        refusals.append(f"no answer from Atlas within {REQUEST_TIMEOUT:g} s")
    why = "; ".join(refusals)
    logger.info("%s: no transfer of player %s to %s: %s", server.name, player.id, target, why)
    raise TransferRequestRefused(why)
