"""The demo world (atlas.demo.world): SDK region servers, bots walking across boundaries, Atlas moving them.

The end-to-end run is short (12 bots for 6 s in 50-unit regions at 25 units/s, so each bot crosses a
face every two seconds or so) and checks the demo's bar: no move lost, duplicated or reordered across
the region transfers, the player's state carried along, and at least 90 % of the crossings prepared
before the client crossed.
"""

from __future__ import annotations

import json
import random

import trio

from atlas.config import PredictorConfig
from atlas.demo.world import World, WorldGame, percentile, run_world_demo, serve_world, world_config
from atlas.runtime import world_from_config
from atlas.world import Vec3
from tests.wsclient import open_ws


async def test_bots_cross_regions_without_losing_a_message() -> None:
    with trio.fail_after(60):
        result = await run_world_demo(bots=12, seconds=6.0, speed=25.0, region=50.0, seed=3)
    fleet, stats, probe = result.fleet, result.predictor, result.probe
    assert fleet.errors == []
    assert fleet.sent > 12 * 6 * 20 * 0.8
    assert (fleet.lost, fleet.duplicates, fleet.reordered, fleet.state_errors, fleet.unexpected) == (0,) * 5
    assert result.server_out_of_order == 0
    assert fleet.clean
    assert stats.crossings >= 1
    assert fleet.switches >= 1
    share = result.prepared_share
    assert share is not None and share >= 0.9, stats
    # The bots saw the committed transfers in the acks (one that commits after a bot's last move is not
    # seen: hence <=).
    assert probe.committed >= 1
    assert fleet.switches <= probe.committed
    assert result.decisions_dropped == 0
    assert result.ok


async def test_world_regions_match_atlas_world_map() -> None:
    async with trio.open_nursery() as nursery:
        world: World = await nursery.start(serve_world, 3, 40.0)
        nursery.cancel_scope.cancel()
    names = [s.name for s in world.servers]
    assert names == [f"region-{i}-{j}" for i in range(3) for j in range(3)]
    assert len({s.port for s in world.servers}) == 9
    config = world_config(world, spawn=True, predictor=PredictorConfig(lookahead=0.4))
    assert [s.control_url for s in config.servers] == [
        f"ws://127.0.0.1:{s.port}/atlas/control" for s in world.servers
    ]
    assert config.world.spawn == "region"
    assert config.predictor.lookahead == 0.4
    atlas_map = world_from_config(config.world)
    rng = random.Random(5)
    points = [(rng.uniform(-10, 130), rng.uniform(-10, 130)) for _ in range(2000)]
    points += [(x, y) for x in (0.0, 40.0, 80.0, 119.999, 120.0) for y in (0.0, 39.999, 40.0, 80.0)]
    for x, y in points:
        assert world.owner_at(x, y) == atlas_map.owner_at(Vec3(x, y, 0.0)), (x, y)
    # The spawn point (the world's centre) is owned, so spawn = "region" places clients.
    assert atlas_map.spawn_owner(Vec3(*config.world.spawn_point)) == "region-1-1"


async def test_world_game_acks_moves_and_counts_gaps() -> None:
    game = WorldGame("region-0-0", (0.0, 0.0, 100.0, 100.0))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(game.serve)
        async with open_ws(f"ws://127.0.0.1:{port}/") as ws:
            welcome = json.loads(await ws.get_message())
            assert welcome["type"] == "welcome" and welcome["server"] == "region-0-0"
            answers = []
            for seq, x in ((0, 10.0), (1, 150.0), (3, 20.0)):  # seq 2 is missing; x=150 is outside
                await ws.send_message(json.dumps({"type": "move", "x": x, "y": 5, "z": 0, "seq": seq}))
                answers.append(json.loads(await ws.get_message()))
            await ws.send_message('{"type":"chat","message":"hi"}')
            await ws.send_message(json.dumps({"type": "move", "x": 1, "y": 1, "seq": 4}))
            answers.append(json.loads(await ws.get_message()))
        nursery.cancel_scope.cancel()
    assert [(a["type"], a["seq"], a["moves"], a["server"]) for a in answers] == [
        ("ack", 0, 1, "region-0-0"),
        ("ack", 1, 2, "region-0-0"),
        ("ack", 3, 3, "region-0-0"),
        ("ack", 4, 4, "region-0-0"),
    ]
    assert (game.moves, game.out_of_order, game.outside, game.ignored) == (4, 1, 1, 1)
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([], 0.5) is None
