"""Two game servers, Atlas in front, and one player who moves between them without reconnecting.

    python examples/two_server_world.py

Everything runs in this one process, on free ports of 127.0.0.1, and stops by itself after a few
seconds: two SDK game servers (``world-west`` and ``world-east``, chat rooms from ``atlas.demo``),
Atlas in front of them with a control channel to each, and a scripted player. The player picks a
nickname and says a few lines on the server it landed on; then it moves twice over the same WebSocket:

1. it asks for it itself (``/move <other server>``): the game calls ``request_transfer``;
2. Atlas's admin side moves it back (``transfers.transfer(client_id, target, TransferReason.ADMIN)``,
   what ``atlas transfer`` and the admin API do).

Each time it arrives with its nickname and message count (the profile is the transfer state), and keeps
talking. The transcript (``>`` sent, ``<`` received) is printed; the exit status is 0 if every step
went as expected.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from atlas.config import AdminConfig, Config, ProxyConfig, ServerConfig
from atlas.control.lifecycle import TransferReason
from atlas.demo import ChatGame
from atlas.supervisor import AtlasStarted, serve_atlas

HOST = "127.0.0.1"
NAMES = ("world-west", "world-east")
#: Seconds any one step may take before the script gives up.
STEP = 10.0


class Player:
    """The scripted player: sends a line, prints it, and prints what comes back."""

    def __init__(self, ws: WebSocketConnection, out: Callable[[str], None]) -> None:
        self.ws = ws
        self.out = out

    async def say(self, line: str) -> None:
        self.out(f"> {line}")
        await self.ws.send_message(line)

    async def hear(self) -> str:
        with trio.fail_after(STEP):
            line = await self.ws.get_message()
        assert isinstance(line, str)
        self.out(f"< {line}")
        return line

    async def expect(self, line: str) -> None:
        heard = await self.hear()
        if heard != line:
            raise RuntimeError(f"expected {line!r}, got {heard!r}")


async def play(atlas: AtlasStarted, out: Callable[[str], None]) -> None:
    """Connect through Atlas and play the script; raises if anything differs from it."""
    async with open_websocket_url(f"ws://{HOST}:{atlas.proxy.port}/") as ws:
        player = Player(ws, out)
        # Which server did Atlas's balancer pick? Chat rooms greet a new player, then /server says.
        greeting = await player.hear()
        here = greeting.removeprefix("welcome to ").split(",")[0]
        there = next(name for name in NAMES if name != here)
        (session,) = atlas.runtime.clients
        client_id = session.client_id

        await player.say("/nick ada")
        await player.expect("you are now ada")
        for line in ("hello, world", "anyone here?"):
            await player.say(line)
            await player.expect(f"[{here}] ada: {line}")

        out(f"-- the player asks to move to {there}")
        await player.say(f"/move {there}")
        await player.expect(f"moving to {there}...")
        await player.expect(f"welcome to {there}, you are ada (2 messages sent so far)")
        await player.say("hi from the other side")
        await player.expect(f"[{there}] ada: hi from the other side")
        await player.say("/me")
        await player.expect(f"you are ada, 3 messages sent, on {there}")

        out(f"-- Atlas's admin moves the player back to {here}")
        with trio.fail_after(STEP):
            outcome = await atlas.transfers.transfer(client_id, here, TransferReason.ADMIN)
        if not outcome.committed:
            raise RuntimeError(f"the admin transfer failed: {outcome.failure}")
        await player.expect(f"welcome to {here}, you are ada (3 messages sent so far)")
        await player.say("back home")
        await player.expect(f"[{here}] ada: back home")
        await player.say("/me")
        await player.expect(f"you are ada, 4 messages sent, on {here}")

        (still,) = atlas.runtime.clients
        if still is not session or ws.closed is not None:
            raise RuntimeError("the player's connection did not survive the moves")
        out(f"-- one connection all along (client {client_id}), two moves, the profile intact")


async def control_channels_up(atlas: AtlasStarted) -> None:
    """Wait until Atlas has its control channel to both servers (it opens them right after starting)."""
    # Nothing announces a channel coming up: poll, bounded.
    for _ in range(int(STEP / 0.01)):
        if all(atlas.transfers.channels.get(name) for name in NAMES):
            return
        await trio.sleep(0.01)
    raise RuntimeError("Atlas's control channels did not come up")


async def main(out: Callable[[str], None] = print) -> int:
    """Run the world, play the script, stop everything; 0 if the script went as expected."""
    async with trio.open_nursery() as nursery:
        games = [ChatGame(name) for name in NAMES]
        ports = [await nursery.start(game.serve) for game in games]
        config = Config(
            proxy=ProxyConfig(listen=f"{HOST}:0"),
            admin=AdminConfig(listen=f"{HOST}:0"),
            servers=tuple(
                ServerConfig(
                    name=game.name,
                    url=f"ws://{HOST}:{port}/",
                    control_url=f"ws://{HOST}:{port}/atlas/control",
                )
                for game, port in zip(games, ports, strict=True)
            ),
        )
        atlas: AtlasStarted = await nursery.start(serve_atlas, config)
        for game, port in zip(games, ports, strict=True):
            out(f"{game.name}: ws://{HOST}:{port}/ (control endpoint /atlas/control)")
        out(f"Atlas:      ws://{HOST}:{atlas.proxy.port}/")
        status = 0
        try:
            await control_channels_up(atlas)
            await play(atlas, out)
        except (RuntimeError, trio.TooSlowError) as exc:
            out(f"error: {exc or 'a step timed out'}")
            status = 1
        nursery.cancel_scope.cancel()
    return status


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    sys.exit(trio.run(main))
