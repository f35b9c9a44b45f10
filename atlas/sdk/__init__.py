"""The Python SDK for game servers behind Atlas: a small :class:`GameServer` base on trio.

A game subclasses :class:`GameServer`, overrides the hooks it needs, and serves::

    class Echo(GameServer):
        async def on_message(self, player: Player, message: str | bytes) -> None:
            await player.send(message)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(Echo("echo-1", port=8081).serve)

The SDK implements the server side of Atlas's control protocol (docs/protocol.md): ``hello`` and
``welcome``, ``load`` reports, both sides of a transfer with a state handoff, so a player moves
between servers without its connection dropping and without a message lost, duplicated or reordered,
and :meth:`GameServer.request_transfer`, with which the game itself asks Atlas to move a player; and
cross-server traffic through Atlas: messages to another server, to the owner of a region, to a client
wherever it is, and object handoffs between regions (:meth:`GameServer.hand_off`).
docs/sdk.md is the guide. Everything public is re-exported here; the ``_*`` modules are private.
"""

from atlas.sdk._handoff import Direction, TransferInfo
from atlas.sdk._links import CLIENT_ID_HEADER, HEALTH_CHECK_HEADER, TRANSFER_HEADER
from atlas.sdk._player import Player, PlayerDisconnected
from atlas.sdk._relay import HandoffRejected, ObjectOffer, RelayMessage, RelayUnavailable, Undeliverable
from atlas.sdk._requests import TransferRequestRefused
from atlas.sdk._server import GameServer, GameServerStatistics

__all__ = [
    "CLIENT_ID_HEADER",
    "HEALTH_CHECK_HEADER",
    "TRANSFER_HEADER",
    "Direction",
    "GameServer",
    "GameServerStatistics",
    "HandoffRejected",
    "ObjectOffer",
    "Player",
    "PlayerDisconnected",
    "RelayMessage",
    "RelayUnavailable",
    "TransferInfo",
    "TransferRequestRefused",
    "Undeliverable",
]
