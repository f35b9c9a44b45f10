"""A demo world: a grid of regions on SDK game servers, bots walking across it, Atlas moving them.

What runs (everything in one trio run, on free ports of 127.0.0.1):

- :func:`serve_world`: ``size x size`` :class:`WorldGame` servers, ``region-<i>-<j>`` owning the box
  ``[i*region, (i+1)*region) x [j*region, (j+1)*region)`` (z in ``[-region/2, region/2)``). It reports a
  :class:`World`, which knows the servers' ports and the ``[world]`` regions; :func:`world_config` turns
  it into an Atlas :class:`~atlas.config.Config` (control channels, the regions, the predictor on).
- :func:`run_bots`: simulated players connecting through Atlas. Each walks in straight lines at a fixed
  speed, turning now and then and bouncing off the world's outer edges, and sends
  ``{"type":"move","x":..,"y":..,"z":0,"seq":N}`` (a movement format the skim analyzer recognises) at a
  fixed rate. Every move is answered by the server owning the player with
  ``{"type":"ack","seq":N,"moves":M,"server":NAME}``; the bot checks every ack (see :class:`BotReport`).
- :func:`run_world_demo`: all of it together, plus a :class:`TransferProbe` on the coordinator, and a
  :class:`DemoResult` with the predictor's crossing counts, the transfers and the bots' checks.
  ``examples/world_demo.py`` prints it; ``tests/test_world_demo.py`` asserts on it.

Checking that nothing is lost
-----------------------------
The player's state on the server (``seq``: the last move's sequence number, ``moves``: how many moves it
processed) is the transfer state (``on_transfer_out`` / ``on_transfer_in``), so it follows the player from
server to server. The answer to move ``N`` must therefore say ``moves == N + 1`` whichever server sends it:
a move processed twice or never (on either side of a transfer), or state left behind, breaks it. The bot
also checks the acks themselves: one per move, in order, none twice, none missing at the end.

Where bots start
----------------
A bot starts at a random point *inside the region of the server Atlas placed it on* (the server's
``welcome`` names it). Starting anywhere in the world would make most first moves a "crossing" from
wherever the balancer put the client, which is a placement problem, not a boundary crossing.
"""

from __future__ import annotations

import json
import math
import random
import re
import urllib.parse
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection, wrap_client_stream

from atlas.config import (
    AdminConfig,
    Config,
    LoggingConfig,
    PredictorConfig,
    ProxyConfig,
    RegionConfig,
    ServerConfig,
    WorldConfig,
)
from atlas.control.coordinator import TransferCoordinator, TransferOutcome, TransferRefused
from atlas.control.lifecycle import TransferReason
from atlas.sdk import GameServer, Player
from atlas.skim import DispatcherStatistics
from atlas.supervisor import AtlasStarted, serve_atlas
from atlas.world import PredictorStatistics

__all__ = [
    "BotReport",
    "DemoProgress",
    "DemoResult",
    "FleetReport",
    "ProbeSummary",
    "TransferProbe",
    "World",
    "WorldGame",
    "WorldServer",
    "percentile",
    "region_name",
    "run_bots",
    "run_world_demo",
    "serve_world",
    "world_config",
]

#: Seconds a bot may take to connect and be welcomed, and that the demo waits for control channels.
CONNECT_TIMEOUT = 10.0
#: Seconds a bot waits, after its last move, for the acks still in flight.
DRAIN_TIMEOUT = 5.0
#: Seconds allowed for a bot's closing handshake.
CLOSE_TIMEOUT = 2.0
#: A bot keeps a heading for this many seconds (uniformly drawn) before it turns.
LEG_SECONDS = (2.0, 5.0)

_NAME = re.compile(r"region-(\d+)-(\d+)")


def region_name(i: int, j: int) -> str:
    """The name of the server owning cell ``(i, j)`` of the grid: ``region-<i>-<j>``."""
    return f"region-{i}-{j}"


# ------------------------------------------------------------------------------------------------
# The game server
# ------------------------------------------------------------------------------------------------


def _parse_move(message: str | bytes) -> tuple[int, float, float] | None:
    """``(seq, x, y)`` of a ``{"type":"move",...}`` message, or None."""
    if isinstance(message, bytes):
        return None
    try:
        data = json.loads(message)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("type") != "move":
        return None
    seq, x, y = data.get("seq"), data.get("x"), data.get("y")
    if not isinstance(seq, int) or isinstance(seq, bool):
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (x, y)):
        return None
    return seq, float(x), float(y)  # type: ignore[arg-type]  # checked just above


class WorldGame(GameServer):
    """An SDK game server owning one region of the demo world; it answers every move with an ack.

    Per player it keeps ``seq`` (the last move's sequence number), ``moves`` (moves processed, on any
    server) and the last position, in ``player.data``: the transfer state. ``box`` is its region
    ``(x0, y0, x1, y1)``, used only to count moves it handled for players outside it (``outside``).
    Keyword arguments go to :class:`~atlas.sdk.GameServer`.
    """

    def __init__(
        self, name: str, box: tuple[float, float, float, float] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(name, **kwargs)
        self.box = box
        self.moves = 0
        """Moves this server processed."""
        self.out_of_order = 0
        """Moves whose ``seq`` was not the player's previous one plus one (must stay 0)."""
        self.outside = 0
        """Moves processed while the player was outside ``box`` (the time a player spends on its old
        server after crossing, until the transfer)."""
        self.ignored = 0
        """Messages that were not moves."""
        self.late_moves: list[int] = []
        """For each player handed to another server: the moves it sent from outside ``box`` that this
        server still handled (from the crossing of the face to the transfer's cut)."""
        self._outside_run: dict[str, int] = {}

    async def on_connect(self, player: Player) -> None:
        """A new player: fresh state, and a welcome naming this server."""
        player.data.update(seq=-1, moves=0, x=None, y=None)
        await player.send(json.dumps({"type": "welcome", "server": self.name, "player": player.id}))

    async def on_message(self, player: Player, message: str | bytes) -> None:
        """A move: check its ``seq``, count it, answer with an ack. Anything else is ignored."""
        move = _parse_move(message)
        if move is None:
            self.ignored += 1
            return
        seq, x, y = move
        data = player.data
        if seq != data["seq"] + 1:
            self.out_of_order += 1
        data["seq"] = seq
        data["moves"] += 1
        data["x"], data["y"] = x, y
        self.moves += 1
        box = self.box
        if box is not None and not (box[0] <= x < box[2] and box[1] <= y < box[3]):
            self.outside += 1
            self._outside_run[player.id] = self._outside_run.get(player.id, 0) + 1
        else:
            self._outside_run.pop(player.id, None)
        await player.send(
            json.dumps({"type": "ack", "seq": seq, "moves": data["moves"], "server": self.name})
        )

    async def on_transfer_out(self, player: Player) -> Any:
        """The state that travels: ``seq``, ``moves`` and the position."""
        return dict(player.data)

    async def on_disconnect(self, player: Player, reason: str) -> None:
        """Note how late a player that moved away left (``late_moves``)."""
        run = self._outside_run.pop(player.id, 0)
        if reason == "transferred":
            self.late_moves.append(run)

    async def on_transfer_in(self, player: Player, state: Any) -> None:
        """Install the arriving player's state."""
        player.data.update(state)


# ------------------------------------------------------------------------------------------------
# The world
# ------------------------------------------------------------------------------------------------


@attrs.frozen
class WorldServer:
    """One server of the world: its name, its cell, its port and the game object."""

    name: str
    cell: tuple[int, int]
    port: int
    game: WorldGame = attrs.field(eq=False, repr=False)

    def url(self, host: str) -> str:
        """The data URL Atlas connects to."""
        return f"ws://{host}:{self.port}/"

    def control_url(self, host: str) -> str:
        """The control endpoint."""
        return f"ws://{host}:{self.port}{self.game.control_path}"


@attrs.frozen
class World:
    """What :func:`serve_world` reports: the grid, its servers and their regions."""

    size: int
    region: float
    host: str
    servers: tuple[WorldServer, ...]

    @property
    def extent(self) -> float:
        """The world's width (and height): ``size * region``; the world is ``[0, extent)`` on x and y."""
        return self.size * self.region

    def box(self, name: str) -> tuple[float, float, float, float] | None:
        """The region ``(x0, y0, x1, y1)`` of server ``name``, or None if it is not one of the world's."""
        match = _NAME.fullmatch(name)
        if match is None:
            return None
        i, j = int(match[1]), int(match[2])
        if not (i < self.size and j < self.size):
            return None
        r = self.region
        return (i * r, j * r, (i + 1) * r, (j + 1) * r)

    def owner_at(self, x: float, y: float) -> str | None:
        """The server owning ``(x, y)`` (half-open boxes, as Atlas's), or None outside the world."""
        if not (0.0 <= x < self.extent and 0.0 <= y < self.extent):
            return None
        return region_name(int(x // self.region), int(y // self.region))

    @property
    def regions(self) -> tuple[RegionConfig, ...]:
        """The ``[[world.regions]]`` entries: one box per server, z in ``[-region/2, region/2)``."""
        half = self.region / 2
        result = []
        for server in self.servers:
            box = self.box(server.name)
            assert box is not None
            result.append(
                RegionConfig(
                    id=server.name,
                    owner=server.name,
                    min=(box[0], box[1], -half),
                    max=(box[2], box[3], half),
                )
            )
        return tuple(result)

    def world_table(self, *, spawn: bool = False) -> WorldConfig:
        """The ``[world]`` table; with ``spawn``, new clients go to the owner of the world's centre."""
        centre = self.extent / 2
        return WorldConfig(
            spawn="region" if spawn else "balancer",
            spawn_point=(centre, centre, 0.0),
            regions=self.regions,
        )


async def serve_world(
    size: int = 2,
    region: float = 100.0,
    *,
    host: str = "127.0.0.1",
    task_status: trio.TaskStatus[World] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``size x size`` :class:`WorldGame` servers on free ports until cancelled; report the World."""
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    if not (math.isfinite(region) and region > 0):
        raise ValueError(f"region must be a positive width, got {region}")
    async with trio.open_nursery() as nursery:
        servers = []
        for i in range(size):
            for j in range(size):
                name = region_name(i, j)
                box = (i * region, j * region, (i + 1) * region, (j + 1) * region)
                game = WorldGame(name, box, host=host, port=0)
                port: int = await nursery.start(game.serve)
                servers.append(WorldServer(name=name, cell=(i, j), port=port, game=game))
        task_status.started(World(size=size, region=region, host=host, servers=tuple(servers)))


def world_config(
    world: World,
    *,
    listen: str = "127.0.0.1:0",
    admin_listen: str = "127.0.0.1:0",
    spawn: bool = False,
    predictor: PredictorConfig | None = None,
) -> Config:
    """Atlas's configuration for ``world``: its servers with their control URLs, the regions, the predictor.

    ``predictor`` defaults to ``PredictorConfig()`` (on, default tuning); ``spawn`` places new clients by
    the world's ``spawn = "region"`` rule (the owner of the world's centre) instead of the balancer.
    """
    host = world.host
    return Config(
        proxy=ProxyConfig(listen=listen),
        admin=AdminConfig(listen=admin_listen),
        logging=LoggingConfig(level="warning"),
        servers=tuple(
            ServerConfig(name=s.name, url=s.url(host), control_url=s.control_url(host)) for s in world.servers
        ),
        world=world.world_table(spawn=spawn),
        predictor=predictor if predictor is not None else PredictorConfig(),
    )


# ------------------------------------------------------------------------------------------------
# Bots
# ------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) of ``values`` by nearest rank, or None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


@attrs.define
class BotReport:
    """One bot's run, updated live while it runs."""

    bot: int
    sent: int = 0
    """Moves sent."""
    acked: int = 0
    """Distinct moves acknowledged."""
    duplicates: int = 0
    """Acks of a move already acknowledged (must stay 0)."""
    reordered: int = 0
    """Acks that came after the ack of a later move (must stay 0)."""
    state_errors: int = 0
    """Acks whose ``moves`` was not ``seq + 1``: a move processed twice or never, or state left behind
    by a transfer (must stay 0)."""
    unexpected: int = 0
    """Messages that were neither a welcome nor the ack of a move sent (must stay 0)."""
    switches: int = 0
    """Times the acks started coming from another server."""
    servers: list[str] = attrs.field(factory=list)
    """The servers it was on, in order (consecutive repeats merged)."""
    distance: float = 0.0
    """World units walked."""
    rtts: list[float] = attrs.field(factory=list, repr=False)
    """Seconds from sending each move to its ack."""
    switch_rtts: list[float] = attrs.field(factory=list, repr=False)
    """The round trips of the first move acked by each new server (the client-visible stall)."""
    error: str | None = None
    """Why the bot could not run to the end (connection refused, closed...), or None."""
    finished: bool = False

    @property
    def lost(self) -> int:
        """Moves sent and never acknowledged (meaningful once the bot finished)."""
        return self.sent - self.acked


@attrs.frozen
class FleetReport:
    """All the bots' reports, with totals."""

    bots: tuple[BotReport, ...]

    def _sum(self, field: str) -> int:
        return sum(int(getattr(bot, field)) for bot in self.bots)

    @property
    def sent(self) -> int:
        """Moves sent."""
        return self._sum("sent")

    @property
    def acked(self) -> int:
        """Moves acknowledged."""
        return self._sum("acked")

    @property
    def lost(self) -> int:
        """Moves never acknowledged."""
        return self._sum("lost")

    @property
    def duplicates(self) -> int:
        """Duplicated acks."""
        return self._sum("duplicates")

    @property
    def reordered(self) -> int:
        """Reordered acks."""
        return self._sum("reordered")

    @property
    def state_errors(self) -> int:
        """Acks with a wrong ``moves`` count."""
        return self._sum("state_errors")

    @property
    def unexpected(self) -> int:
        """Unexpected messages."""
        return self._sum("unexpected")

    @property
    def switches(self) -> int:
        """Server switches seen by the bots."""
        return self._sum("switches")

    @property
    def errors(self) -> list[str]:
        """The bots' errors, ``"bot <n>: <why>"``."""
        return [f"bot {bot.bot}: {bot.error}" for bot in self.bots if bot.error is not None]

    @property
    def distance(self) -> float:
        """World units walked, all bots together."""
        return sum(bot.distance for bot in self.bots)

    @property
    def rtts(self) -> list[float]:
        """Every move's round trip."""
        return [rtt for bot in self.bots for rtt in bot.rtts]

    @property
    def switch_rtts(self) -> list[float]:
        """The round trips of the first move acked after each switch."""
        return [rtt for bot in self.bots for rtt in bot.switch_rtts]

    @property
    def clean(self) -> bool:
        """Nothing lost, duplicated, reordered or miscounted, no unexpected message, no bot failed."""
        return not (
            self.lost
            or self.duplicates
            or self.reordered
            or self.state_errors
            or self.unexpected
            or self.errors
        )


class _Walker:
    """A point walking in straight legs at ``speed``, turning at random, bouncing off the world's edges."""

    def __init__(self, rng: random.Random, x: float, y: float, speed: float, extent: float) -> None:
        self.rng = rng
        self.x, self.y = x, y
        self.speed = speed
        self.low, self.high = 0.5, extent - 0.5
        self.leg = 0.0
        self._turn()

    def _turn(self) -> None:
        heading = self.rng.uniform(0.0, 2 * math.pi)
        self.vx, self.vy = self.speed * math.cos(heading), self.speed * math.sin(heading)
        self.leg = self.rng.uniform(*LEG_SECONDS)

    def step(self, dt: float) -> float:
        """Walk ``dt`` seconds; returns the distance walked."""
        self.leg -= dt
        if self.leg <= 0:
            self._turn()
        self.x, self.vx = self._bounce(self.x + self.vx * dt, self.vx)
        self.y, self.vy = self._bounce(self.y + self.vy * dt, self.vy)
        return self.speed * dt

    def _bounce(self, p: float, v: float) -> tuple[float, float]:
        if p < self.low:
            return min(2 * self.low - p, self.high), -v
        if p > self.high:
            return max(2 * self.high - p, self.low), -v
        return p, v


class _BotFailed(Exception):
    pass


async def _open_bot(
    nursery: trio.Nursery, stream: trio.SocketStream, url: urllib.parse.SplitResult
) -> WebSocketConnection:
    resource = (url.path or "/") + (f"?{url.query}" if url.query else "")
    try:
        return await wrap_client_stream(nursery, stream, url.netloc, resource)
    except HandshakeError as exc:
        raise _BotFailed(f"handshake failed: {exc}") from None


async def _bot(
    report: BotReport,
    url: str,
    *,
    rng: random.Random,
    speed: float,
    duration: float,
    rate: float,
    world: World | None,
    size: int,
    region: float,
) -> None:
    """One bot: connect, be welcomed, walk and send for ``duration`` seconds, wait for the last acks."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    extent = size * region
    geometry = world or World(size=size, region=region, host=host, servers=())
    sent_at: dict[int, float] = {}
    acked: set[int] = set()
    highest = -1
    everyone_acked = trio.Event()
    welcomed = trio.Event()
    first_server: list[str] = []
    sending_done = False

    def on_message(message: str | bytes) -> None:
        nonlocal highest, sending_done
        now = trio.current_time()
        try:
            data = json.loads(message)
            kind = data["type"]
        except (ValueError, TypeError, KeyError):
            report.unexpected += 1
            return
        if kind == "welcome" and not welcomed.is_set():
            first_server.append(str(data.get("server")))
            report.servers.append(first_server[0])
            welcomed.set()
            return
        seq, moves, server = data.get("seq"), data.get("moves"), data.get("server")
        if kind != "ack" or not isinstance(seq, int) or seq not in sent_at:
            report.unexpected += 1
            return
        if seq in acked:
            report.duplicates += 1
            return
        if seq < highest:
            report.reordered += 1
        highest = max(highest, seq)
        acked.add(seq)
        report.acked = len(acked)
        if moves != seq + 1:
            report.state_errors += 1
        rtt = now - sent_at[seq]
        report.rtts.append(rtt)
        if report.servers and server != report.servers[-1]:
            report.switches += 1
            report.switch_rtts.append(rtt)
        if not report.servers or server != report.servers[-1]:
            report.servers.append(str(server))
        if sending_done and len(acked) == report.sent:
            everyone_acked.set()

    async def read(ws: WebSocketConnection) -> None:
        try:
            while True:
                on_message(await ws.get_message())
        except ConnectionClosed as exc:
            if not report.finished and report.error is None:
                report.error = f"closed by the server: {exc.reason}"
            welcomed.set()
            everyone_acked.set()

    with trio.move_on_after(CONNECT_TIMEOUT) as connecting:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            report.error = f"cannot connect: {exc}"
            return
    if connecting.cancelled_caught:
        report.error = "timed out connecting"
        return
    async with stream, trio.open_nursery() as nursery:
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                ws = await _open_bot(nursery, stream, parts)
                nursery.start_soon(read, ws)
                await welcomed.wait()
        except trio.TooSlowError:
            report.error = "no welcome in time"
            nursery.cancel_scope.cancel()
            return
        except _BotFailed as exc:
            report.error = str(exc)
            nursery.cancel_scope.cancel()
            return
        if report.error is not None:
            nursery.cancel_scope.cancel()
            return
        box = geometry.box(first_server[0]) if first_server else None
        if box is None:
            box = (0.0, 0.0, extent, extent)
        inset = min(region * 0.1, 5.0)
        walker = _Walker(
            rng,
            rng.uniform(box[0] + inset, box[2] - inset),
            rng.uniform(box[1] + inset, box[3] - inset),
            speed,
            extent,
        )
        start = last = trio.current_time()
        interval = 1.0 / rate
        with trio.move_on_at(start + duration):
            try:
                while report.error is None:
                    now = trio.current_time()
                    report.distance += walker.step(now - last)
                    last = now
                    seq = report.sent
                    message = {"type": "move", "x": round(walker.x, 3), "y": round(walker.y, 3), "z": 0}
                    message["seq"] = seq
                    sent_at[seq] = trio.current_time()
                    await ws.send_message(json.dumps(message))
                    report.sent = seq + 1
                    await trio.sleep_until(start + (seq + 1) * interval)
            except ConnectionClosed as exc:
                report.error = f"closed while sending: {exc.reason}"
        sending_done = True
        if len(acked) == report.sent:
            everyone_acked.set()
        with trio.move_on_after(DRAIN_TIMEOUT):
            await everyone_acked.wait()
        report.finished = True
        with trio.move_on_after(CLOSE_TIMEOUT):
            await ws.aclose()
        nursery.cancel_scope.cancel()


async def run_bots(
    url: str,
    count: int,
    *,
    speed: float,
    duration: float,
    rate: float = 20.0,
    seed: int = 0,
    size: int = 2,
    region: float = 100.0,
    world: World | None = None,
    reports: list[BotReport] | None = None,
) -> FleetReport:
    """Run ``count`` bots against ``url`` (Atlas) for ``duration`` seconds of walking; report on them.

    Each bot walks at ``speed`` world units per second in a world of ``size x size`` regions of width
    ``region`` (or ``world``'s), sending ``rate`` moves per second. ``reports``, when given, receives
    each bot's :class:`BotReport` as the bot starts, for live progress. The whole run is bounded by
    about ``duration`` plus the connect, drain and close timeouts.
    """
    if count < 0 or not (speed >= 0 and duration >= 0 and rate > 0):
        raise ValueError("count, speed and duration must be >= 0 and rate > 0")
    if world is not None:
        size, region = world.size, world.region
    bots = [BotReport(bot=n) for n in range(count)]
    if reports is not None:
        reports.extend(bots)
    async with trio.open_nursery() as nursery:
        for n, report in enumerate(bots):
            nursery.start_soon(
                partial(
                    _bot,
                    report,
                    url,
                    rng=random.Random(seed * 1_000_003 + n),
                    speed=speed,
                    duration=duration,
                    rate=rate,
                    world=world,
                    size=size,
                    region=region,
                )
            )
    return FleetReport(bots=tuple(bots))


# ------------------------------------------------------------------------------------------------
# Watching the coordinator
# ------------------------------------------------------------------------------------------------


def _refusal_kind(why: str) -> str:
    for needle, kind in (
        ("already being transferred", "client busy (another transfer or preparation)"),
        ("cannot take a client", "target unavailable"),
        ("already on", "already on the target"),
        ("no client", "client gone"),
        ("cannot be moved now", "client not movable"),
        ("too many transfers queued", "queue full"),
    ):
        if needle in why:
            return kind
    return why


@attrs.frozen
class ProbeSummary:
    """What the region service asked of the coordinator, and how it ended (``region_boundary`` only)."""

    preparations: int
    """Preparations the coordinator accepted."""
    preparations_refused: Counter[str]
    """Preparations refused at once, by cause. The predictor is not told: it counts them as live."""
    preparations_used: int
    """Preparations that were ready (link to the target open) when the transfer was asked, and used."""
    preparations_unused: Counter[str]
    """Preparations that ended unused, by why (``preparation expired``, ``preparation cancelled``...)."""
    transfers: int
    """Transfers the coordinator accepted."""
    transfers_ready: int
    """... of which used a ready preparation."""
    transfers_ready_first_try: int
    """... of which used a ready preparation at the first request for that target (no refused request
    for the same client and target before it): prepared in time, as the coordinator sees it."""
    transfers_cold: int
    """... of which had to prepare from scratch."""
    transfers_refused: Counter[str]
    """Transfers refused at once, by cause (the predictor retries after ``retry_delay``)."""
    committed: int
    """Transfers committed."""
    rolled_back: Counter[str]
    """Transfers rolled back, by failure."""
    outcome_stalls: tuple[float, ...]
    """``TransferOutcome.stall`` of the committed transfers (what ``atlas_transfer_stall_seconds``
    observes; see docs/world.md, "Demo world", for why it lags one transfer behind)."""
    stalls: tuple[float, ...]
    """The stall of each committed transfer, read from its session once it was measured (seconds from the
    switch to the first message from the new server)."""


class TransferProbe:
    """Counts the region service's requests to a coordinator, by wrapping its ``request`` method.

    Instrumentation for the demo: ``TransferCoordinator.prepare`` and ``transfer`` both go through
    ``request``, so replacing it on the instance sees every region-boundary preparation and transfer.
    A transfer that gets back the very request object a preparation got used that preparation while it
    was ready (the coordinator hands out a waiting preparation only once its link is open).
    """

    def __init__(self, coordinator: TransferCoordinator) -> None:
        self._inner = coordinator.request
        coordinator.request = self._request  # type: ignore[method-assign]  # instrumentation
        self._preparations: list[Any] = []
        self._prepared_ids: set[int] = set()
        self._transfers: list[Any] = []
        self._ready = 0
        self._ready_first_try = 0
        self._retrying: set[tuple[str, str]] = set()
        self._refused_prepare: Counter[str] = Counter()
        self._refused_transfer: Counter[str] = Counter()
        # Per session (by id): the session, and its transfers with the session's last_stall when each
        # was asked (then still the stall of the transfer before it).
        self._sessions: dict[int, tuple[Any, list[tuple[Any, float | None]]]] = {}

    def _request(
        self, client_id: str, target: str, reason: TransferReason, *, prepare_ttl: float | None = None
    ) -> Any:
        if reason is not TransferReason.REGION_BOUNDARY:
            return self._inner(client_id, target, reason, prepare_ttl=prepare_ttl)
        try:
            request = self._inner(client_id, target, reason, prepare_ttl=prepare_ttl)
        except TransferRefused as exc:
            if prepare_ttl is not None:
                self._refused_prepare[_refusal_kind(str(exc))] += 1
            else:
                self._refused_transfer[_refusal_kind(str(exc))] += 1
                self._retrying.add((client_id, target))
            raise
        if prepare_ttl is not None:
            self._preparations.append(request)
            self._prepared_ids.add(id(request))
            return request
        retried = (client_id, target) in self._retrying
        self._retrying.discard((client_id, target))
        if id(request) in self._prepared_ids:
            self._ready += 1
            self._ready_first_try += not retried
        self._transfers.append(request)
        session = getattr(request, "session", None)
        if session is not None:
            entry = self._sessions.setdefault(id(session), (session, []))
            entry[1].append((request, getattr(session, "last_stall", None)))
        return request

    @staticmethod
    def _outcome(request: Any) -> TransferOutcome | None:
        outcome = getattr(request, "outcome", None)
        return outcome if isinstance(outcome, TransferOutcome) else None

    def _measured_stalls(self) -> list[float]:
        stalls = []
        for session, transfers in self._sessions.values():
            later = [seen for _, seen in transfers[1:]] + [getattr(session, "last_stall", None)]
            for (request, _), stall in zip(transfers, later, strict=True):
                outcome = self._outcome(request)
                if outcome is not None and outcome.committed and stall is not None:
                    stalls.append(stall)
        return stalls

    def summary(self) -> ProbeSummary:
        """The counts so far."""
        used = {id(r) for r in self._transfers} & self._prepared_ids
        unused: Counter[str] = Counter()
        for request in self._preparations:
            if id(request) in used:
                continue
            outcome = self._outcome(request)
            unused["pending" if outcome is None else (outcome.failure or "committed?")] += 1
        committed = 0
        rolled_back: Counter[str] = Counter()
        outcome_stalls = []
        for request in self._transfers:
            outcome = self._outcome(request)
            if outcome is None:
                rolled_back["pending"] += 1
            elif outcome.committed:
                committed += 1
                if outcome.stall is not None:
                    outcome_stalls.append(outcome.stall)
            else:
                rolled_back[outcome.failure or "unknown"] += 1
        return ProbeSummary(
            preparations=len(self._preparations),
            preparations_refused=self._refused_prepare.copy(),
            preparations_used=len(used),
            preparations_unused=unused,
            transfers=len(self._transfers),
            transfers_ready=self._ready,
            transfers_ready_first_try=self._ready_first_try,
            transfers_cold=len(self._transfers) - self._ready,
            transfers_refused=self._refused_transfer.copy(),
            committed=committed,
            rolled_back=rolled_back,
            outcome_stalls=tuple(outcome_stalls),
            stalls=tuple(self._measured_stalls()),
        )


def _histogram_quantile(atlas: AtlasStarted, name: str, q: float) -> float | None:
    """Estimate a quantile of a histogram in Atlas's registry (linear within the bucket)."""
    buckets: list[tuple[float, float]] = []
    for metric in atlas.runtime.metrics.registry.collect():
        if metric.name != name:
            continue
        for sample in metric.samples:
            if sample.name == f"{name}_bucket":
                buckets.append((float(sample.labels["le"]), sample.value))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    wanted = q * total
    low_bound, low_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= wanted:
            if math.isinf(bound):
                return low_bound
            if count == low_count:
                return bound
            return low_bound + (bound - low_bound) * (wanted - low_count) / (count - low_count)
        low_bound, low_count = bound, count
    return low_bound


def _skim_dropped(stats: DispatcherStatistics) -> int:
    """Frames lost before reaching the movement analyzer: the input channel's drops and the analyzers'."""
    return stats.dropped_input + sum(a.dropped for a in stats.analyzers) + stats.events_dropped


def _counter(atlas: AtlasStarted, name: str, labels: dict[str, str]) -> int:
    value = atlas.runtime.metrics.registry.get_sample_value(name, labels)
    return int(value or 0)


# ------------------------------------------------------------------------------------------------
# The whole demo
# ------------------------------------------------------------------------------------------------


@attrs.frozen
class DemoProgress:
    """A live snapshot while the demo runs."""

    elapsed: float
    connected: int
    sent: int
    acked: int
    switches: int
    crossings: int
    prepared_crossings: int
    preparing: int


@attrs.frozen
class DemoResult:
    """Everything measured in one run of :func:`run_world_demo`."""

    world: World
    fleet: FleetReport
    predictor: PredictorStatistics
    probe: ProbeSummary
    settings: PredictorConfig
    committed_metric: int
    """``atlas_transfers_total{reason="region_boundary",outcome="committed"}``."""
    rolled_back_metric: int
    """``atlas_transfers_total{reason="region_boundary",outcome="rolled_back"}`` (unused preparations
    end as rolled-back transfers there too)."""
    stall_p50: float | None
    """From the ``atlas_transfer_stall_seconds`` histogram (estimate)."""
    stall_p99: float | None
    held_p50: float | None
    """Client messages held during a switch, from ``atlas_transfer_held_messages`` (estimate)."""
    held_p99: float | None
    decisions_dropped: int
    """Predictor decisions the region service dropped (too many waiting for the coordinator)."""
    skim_dropped: int
    """Frames or events the skim pipeline dropped before the predictor (input channel, analyzers, sink)."""
    seconds: float
    """Wall time of the bots' run."""

    @property
    def crossings(self) -> int:
        """Crossings that led to a transfer."""
        return self.predictor.crossings

    @property
    def prepared_share(self) -> float | None:
        """Prepared crossings / crossings, or None without crossings."""
        c = self.predictor
        return c.prepared_crossings / c.crossings if c.crossings else None

    @property
    def ready_share(self) -> float | None:
        """Transfers that found a ready preparation at their first request / transfers accepted, or None.

        The coordinator's view of "prepared in time": the link to the target was open when the move was
        asked for. It is lower than `prepared_share` when the coordinator refused preparations the
        predictor then counted as live (docs/world.md, "Demo world").
        """
        probe = self.probe
        return probe.transfers_ready_first_try / probe.transfers if probe.transfers else None

    @property
    def outside_moves(self) -> int:
        """Moves the servers handled for players outside their region."""
        return sum(s.game.outside for s in self.world.servers)

    @property
    def late_moves(self) -> list[int]:
        """Per transfer: moves the old server handled after the player crossed out of its region."""
        return [run for s in self.world.servers for run in s.game.late_moves]

    @property
    def server_out_of_order(self) -> int:
        """Moves a server saw out of sequence (must be 0)."""
        return sum(s.game.out_of_order for s in self.world.servers)

    @property
    def ok(self) -> bool:
        """The demo's bar: nothing lost, duplicated or reordered, and >= 90 % of crossings prepared."""
        share = self.prepared_share
        return self.fleet.clean and not self.server_out_of_order and (share is None or share >= 0.9)


async def _wait_for(condition: Callable[[], bool], seconds: float) -> None:
    """Poll (bounded) for state inside Atlas that no event announces."""
    with trio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110  # no event to wait on
            await trio.sleep(0.01)


async def run_world_demo(
    *,
    bots: int = 40,
    seconds: float = 20.0,
    speed: float = 20.0,
    size: int = 2,
    region: float = 100.0,
    rate: float = 20.0,
    seed: int = 1,
    spawn: bool = False,
    predictor: PredictorConfig | None = None,
    host: str = "127.0.0.1",
    started: Callable[[World, AtlasStarted], None] | None = None,
    progress: Callable[[DemoProgress], None] | None = None,
    progress_interval: float = 3.0,
) -> DemoResult:
    """Start the world and Atlas in this trio run, walk ``bots`` bots for ``seconds``, and measure.

    ``started`` is called once the world and Atlas run (before the bots connect); ``progress`` every
    ``progress_interval`` seconds with a :class:`DemoProgress`. Everything started here is stopped
    before it returns.
    """
    settings = predictor if predictor is not None else PredictorConfig()
    async with trio.open_nursery() as nursery:
        world: World = await nursery.start(partial(serve_world, size, region, host=host))
        config = world_config(world, spawn=spawn, predictor=settings)
        atlas: AtlasStarted = await nursery.start(serve_atlas, config)
        channels = atlas.transfers.channels
        await _wait_for(
            lambda: all(channels.get(s.name) is not None for s in world.servers),
            CONNECT_TIMEOUT,
        )
        regions = atlas.runtime.regions
        assert regions is not None, "the predictor is off"
        probe = TransferProbe(atlas.transfers)
        if started is not None:
            started(world, atlas)
        reports: list[BotReport] = []
        begun = trio.current_time()

        def snapshot() -> DemoProgress:
            stats = regions.predictor.statistics()
            return DemoProgress(
                elapsed=trio.current_time() - begun,
                connected=len(atlas.runtime.clients),
                sent=sum(r.sent for r in reports),
                acked=sum(r.acked for r in reports),
                switches=sum(r.switches for r in reports),
                crossings=stats.crossings,
                prepared_crossings=stats.prepared_crossings,
                preparing=stats.preparing,
            )

        async def report_progress() -> None:
            assert progress is not None
            while True:
                await trio.sleep(progress_interval)
                progress(snapshot())

        async with trio.open_nursery() as watching:
            if progress is not None:
                watching.start_soon(report_progress)
            fleet = await run_bots(
                f"ws://{host}:{atlas.proxy.port}/",
                bots,
                speed=speed,
                duration=seconds,
                rate=rate,
                seed=seed,
                world=world,
                reports=reports,
            )
            watching.cancel_scope.cancel()
        elapsed = trio.current_time() - begun
        # Let the sessions end and the last transfers finish, so every outcome is in.
        with trio.move_on_after(DRAIN_TIMEOUT):
            await atlas.runtime.clients.wait_empty()
            while atlas.transfers.active:  # noqa: ASYNC110  # no event to wait on
                await trio.sleep(0.01)
        dispatcher = atlas.runtime.skim
        result = DemoResult(
            world=world,
            fleet=fleet,
            predictor=regions.predictor.statistics(),
            probe=probe.summary(),
            settings=settings,
            committed_metric=_counter(
                atlas, "atlas_transfers_total", {"reason": "region_boundary", "outcome": "committed"}
            ),
            rolled_back_metric=_counter(
                atlas, "atlas_transfers_total", {"reason": "region_boundary", "outcome": "rolled_back"}
            ),
            stall_p50=_histogram_quantile(atlas, "atlas_transfer_stall_seconds", 0.5),
            stall_p99=_histogram_quantile(atlas, "atlas_transfer_stall_seconds", 0.99),
            held_p50=_histogram_quantile(atlas, "atlas_transfer_held_messages", 0.5),
            held_p99=_histogram_quantile(atlas, "atlas_transfer_held_messages", 0.99),
            decisions_dropped=regions.decisions_dropped,
            skim_dropped=0 if dispatcher is None else _skim_dropped(dispatcher.statistics()),
            seconds=elapsed,
        )
        nursery.cancel_scope.cancel()
    return result
