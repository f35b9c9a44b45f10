"""A 2x2 world of regions on SDK game servers, bots walking across it, Atlas moving them by prediction.

    python examples/world_demo.py                      # 40 bots, 20 s, 20 units/s
    python examples/world_demo.py --bots 12 --seconds 6 --speed 25 --region 50

Everything runs in this one process, on free ports of 127.0.0.1 (``atlas.demo.world``): four
``WorldGame`` servers (``region-0-0`` .. ``region-1-1``), each owning a 100 x 100 box of a 200 x 200
world; Atlas in front of them with a control channel to each, the world's regions and the predictor on
(default tuning unless the options say otherwise); and the bots. Each bot walks in straight lines,
turning every few seconds and bouncing off the world's edges, and sends
``{"type":"move","x":..,"y":..,"z":0,"seq":N}`` 20 times a second; the server that owns it answers each
move with its ``seq``, the number of moves processed so far (the player's state, which travels with
every transfer) and its own name. The bots check every answer.

A line every few seconds shows the progress; at the end a table gives the crossings (prepared before
the crossing or not), the transfers, and the bots' checks. Exit status 0 when no message was lost,
duplicated or reordered and at least 90 % of the crossings were prepared; 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Callable, Sequence

import trio

from atlas.config import PredictorConfig
from atlas.demo.world import DemoProgress, DemoResult, World, percentile, run_world_demo
from atlas.supervisor import AtlasStarted


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bots", type=int, default=40, help="bots walking (default 40)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds they walk (default 20)")
    parser.add_argument("--speed", type=float, default=20.0, help="world units per second (default 20)")
    parser.add_argument("--rate", type=float, default=20.0, help="moves per second per bot (default 20)")
    parser.add_argument("--size", type=int, default=2, help="regions per side (default 2: 2x2)")
    parser.add_argument("--region", type=float, default=100.0, help="width of a region (default 100)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the bots (default 1)")
    parser.add_argument("--lookahead", type=float, help="[predictor] lookahead, seconds (default 0.5)")
    parser.add_argument("--margin", type=float, help="[predictor] margin, world units (default 5)")
    parser.add_argument("--prepare-ttl", type=float, help="[predictor] prepare_ttl, seconds (default 3)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every transfer")
    args = parser.parse_args(argv)
    if args.bots < 0 or args.seconds < 0 or args.speed < 0 or args.rate <= 0 or args.size < 1:
        parser.error("--bots, --seconds and --speed must be >= 0, --rate > 0, --size >= 1")
    return args


def predictor_config(args: argparse.Namespace) -> PredictorConfig:
    defaults = PredictorConfig()
    return PredictorConfig(
        lookahead=defaults.lookahead if args.lookahead is None else args.lookahead,
        margin=defaults.margin if args.margin is None else args.margin,
        prepare_ttl=defaults.prepare_ttl if args.prepare_ttl is None else args.prepare_ttl,
    )


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def count(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def share(part: int, whole: int) -> str:
    return f"{part} ({100 * part / whole:.1f} %)" if whole else f"{part}"


def causes(counter: Counter[str]) -> str:
    return ", ".join(f"{why}: {n}" for why, n in counter.most_common()) or "none"


def on_started(args: argparse.Namespace, settings: PredictorConfig) -> Callable[[World, AtlasStarted], None]:
    def show(world: World, atlas: AtlasStarted) -> None:
        last = world.servers[-1].name
        ports = ", ".join(str(s.port) for s in world.servers)
        print(
            f"world: {world.size}x{world.size} regions of {world.region:g} units, "
            f"servers {world.servers[0].name} .. {last} on ports {ports}"
        )
        print(
            f"atlas: ws://127.0.0.1:{atlas.proxy.port}/  predictor: lookahead {settings.lookahead:g} s, "
            f"margin {settings.margin:g}, hysteresis {settings.hysteresis:g}, "
            f"prepare_ttl {settings.prepare_ttl:g} s"
        )
        print(
            f"bots: {args.bots} at {args.speed:g} units/s, {args.rate:g} moves/s each, for {args.seconds:g} s"
        )

    return show


def show_progress(p: DemoProgress) -> None:
    prepared = f"{100 * p.prepared_crossings / p.crossings:.0f} %" if p.crossings else "-"
    print(
        f"[{p.elapsed:5.1f} s] bots {p.connected:3d}  moves {p.sent} sent, {p.acked} acked  "
        f"switches {p.switches}  crossings {p.crossings} (prepared {prepared})  preparing {p.preparing}",
        flush=True,
    )


def report(result: DemoResult) -> list[str]:
    fleet, stats, probe = result.fleet, result.predictor, result.probe
    late = result.late_moves
    rows: list[tuple[str, str]] = [
        ("crossings", f"{stats.crossings}"),
        ("  prepared before the crossing", share(stats.prepared_crossings, stats.crossings)),
        ("  unprepared", share(stats.unprepared_crossings, stats.crossings)),
        ("region transfers asked / refused", f"{probe.transfers} / {sum(probe.transfers_refused.values())}"),
        ("  committed / rolled back", f"{probe.committed} / {sum(probe.rolled_back.values())}"),
        ("  link ready at the first ask", share(probe.transfers_ready_first_try, probe.transfers)),
        ("  prepared from scratch (cold)", f"{probe.transfers_cold}"),
        ("  refused at once", causes(probe.transfers_refused)),
        ("preparations asked (predictor)", f"{stats.preparations}"),
        ("  refused by the coordinator", causes(probe.preparations_refused)),
        ("  used / unused", f"{probe.preparations_used} / {causes(probe.preparations_unused)}"),
        (
            "atlas_transfers_total (region)",
            f"committed {result.committed_metric}, rolled_back {result.rolled_back_metric}",
        ),
        ("moves sent / acked", f"{fleet.sent} / {fleet.acked}"),
        ("  lost", f"{fleet.lost}"),
        ("  duplicated", f"{fleet.duplicates}"),
        ("  reordered", f"{fleet.reordered + result.server_out_of_order}"),
        ("  state errors (moves != seq + 1)", f"{fleet.state_errors}"),
        ("server switches seen by the bots", f"{fleet.switches}"),
        (
            "moves the old server handled late",
            f"p50 {percentile(late, 0.5)}, p90 {percentile(late, 0.9)}, max {max(late, default=None)}",
        ),
        (
            "stall, atlas_transfer_stall_seconds",
            f"p50 {ms(result.stall_p50)}, p99 {ms(result.stall_p99)} (histogram estimate)",
        ),
        (
            "stall, per transfer (measured)",
            f"p50 {ms(percentile(probe.stalls, 0.5))}, p99 {ms(percentile(probe.stalls, 0.99))}",
        ),
        (
            "client messages held at a switch",
            f"p50 {count(result.held_p50)}, p99 {count(result.held_p99)} (histogram estimate)",
        ),
        (
            "move round trip, all",
            f"p50 {ms(percentile(fleet.rtts, 0.5))}, p99 {ms(percentile(fleet.rtts, 0.99))}, "
            f"max {ms(max(fleet.rtts, default=None))}",
        ),
        (
            "  first move on the new server",
            f"p50 {ms(percentile(fleet.switch_rtts, 0.5))}, p99 {ms(percentile(fleet.switch_rtts, 0.99))}, "
            f"max {ms(max(fleet.switch_rtts, default=None))}",
        ),
        ("skim events / region decisions dropped", f"{result.skim_dropped} / {result.decisions_dropped}"),
        ("bots failed", causes(Counter(fleet.errors))),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    prepared = result.prepared_share
    lines.append(
        ("OK" if result.ok else "FAILED")
        + f": {fleet.lost + fleet.duplicates + fleet.reordered + result.server_out_of_order} messages lost,"
        + " duplicated or reordered; "
        + ("no crossings" if prepared is None else f"{100 * prepared:.1f} % of crossings prepared")
        + " (target: 0 and >= 90 %)"
    )
    return lines


async def main(args: argparse.Namespace) -> int:
    settings = predictor_config(args)
    result = await run_world_demo(
        bots=args.bots,
        seconds=args.seconds,
        speed=args.speed,
        rate=args.rate,
        size=args.size,
        region=args.region,
        seed=args.seed,
        predictor=settings,
        started=on_started(args, settings),
        progress=show_progress,
    )
    print()
    for line in report(result):
        print(line)
    return 0 if result.ok else 1


if __name__ == "__main__":
    arguments = parse_args()
    logging.basicConfig(level=logging.INFO if arguments.verbose else logging.WARNING, format="%(message)s")
    if not arguments.verbose:
        # An unused preparation ends as a rolled-back transfer, logged at WARNING: expected here.
        logging.getLogger("atlas.transfer").setLevel(logging.ERROR)
    try:
        sys.exit(trio.run(main, arguments))
    except KeyboardInterrupt:
        sys.exit(130)
