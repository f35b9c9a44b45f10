#!/usr/bin/env python3
"""Run the Autobahn|Testsuite (through kosoku) against Atlas in front of a conformant echo backend.

    python tests/conformance/run_autobahn.py                    # sections 1-10 through Atlas
    python tests/conformance/run_autobahn.py --cases '5.*,6.*'  # a selection (kosoku globs)
    python tests/conformance/run_autobahn.py --direct           # the echo backend alone

Everything runs in this process on trio, on 127.0.0.1 port 0: the demo echo server
(``atlas.demo.servers.serve_echo_server``), Atlas in front of it (``atlas.supervisor.serve_atlas``),
then the ``kosoku`` console script (a Python 3 port of Autobahn's fuzzingclient) as a subprocess
driving the cases against Atlas. The per-case JSON reports kosoku writes are then read back and
summarised. Sections 12 and 13 (permessage-deflate) are not in the default selection: Atlas does
not negotiate compression.

Exit status: 0 when every case passed (``OK``, ``NON-STRICT`` or ``INFORMATIONAL``, for both the
message exchange and the closing handshake, as Autobahn counts them), 1 when a case did not, 2 when
the run itself could not be completed (kosoku missing or timed out, a server failed to start).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from atlas.config import AdminConfig, Config, ProxyConfig, ServerConfig
from atlas.demo.servers import serve_echo_server
from atlas.errors import StartupError
from atlas.supervisor import AtlasStarted, serve_atlas

HOST = "127.0.0.1"
#: Sections 9.x send messages of up to 16 MiB; both hops must take them.
MAX_MESSAGE_SIZE = 64 * 1024 * 1024
#: Sections 1-10: everything but compression (12.*, 13.*). Autobahn has no section 8 or 11, and
#: kosoku refuses a glob that matches no case.
DEFAULT_CASES = ("1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*")
#: Verdicts Autobahn counts as a pass, for the message exchange and for the closing handshake.
PASSING = frozenset({"OK", "NON-STRICT", "INFORMATIONAL"})
#: Lines of kosoku's output shown when it wrote no reports.
_OUTPUT_TAIL = 5
#: Exit statuses.
EXIT_PASSED, EXIT_FAILED, EXIT_ERROR = 0, 1, 2

logger = logging.getLogger("atlas.conformance")


class RunError(Exception):
    """The conformance run could not be completed (as opposed to a case failing)."""


@attrs.frozen
class CaseReport:
    """One case's verdicts, read back from kosoku's per-case JSON report."""

    case_id: str
    behavior: str
    behavior_close: str
    result: str
    result_close: str
    duration_ms: int

    @property
    def passed(self) -> bool:
        """Both verdicts are ``OK``, ``NON-STRICT`` or ``INFORMATIONAL``."""
        return self.behavior in PASSING and self.behavior_close in PASSING

    @property
    def verdict(self) -> str:
        """The one word Autobahn's table shows: the failing verdict if any, else ``behavior``."""
        if self.behavior not in PASSING or self.behavior_close in PASSING:
            return self.behavior
        return self.behavior_close

    @property
    def sort_key(self) -> tuple[int, ...]:
        """Numeric order: 1.2.10 after 1.2.9."""
        return case_sort_key(self.case_id)


def case_sort_key(case_id: str) -> tuple[int, ...]:
    """``"6.4.10"`` -> ``(6, 4, 10)``."""
    return tuple(int(part) for part in case_id.split("."))


@attrs.frozen
class RunSummary:
    """What a finished run reports: where it ran, for how long, and every case's report."""

    target: str
    seconds: float
    reports: tuple[CaseReport, ...]

    @property
    def failures(self) -> tuple[CaseReport, ...]:
        """The cases that did not pass, in case order."""
        return tuple(report for report in self.reports if not report.passed)


# --------------------------------------------------------------------------------------------------
# Reading kosoku's reports


def _string(raw: dict[str, Any], key: str, where: Path) -> str:
    value = raw.get(key)
    if not isinstance(value, str):
        raise RunError(f"{where}: {key!r} is missing or not a string")
    return value


def load_reports(outdir: Path) -> tuple[CaseReport, ...]:
    """Read ``outdir/index.json`` and the per-case JSON files it names, in case order.

    :raises RunError: if the index is missing or a report is not in Autobahn's format.
    """
    index_path = outdir / "index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"no usable report index at {index_path}: {exc}") from None
    if not isinstance(index, dict):
        raise RunError(f"{index_path}: expected an object of agents")
    reports: list[CaseReport] = []
    # One agent per run (the Server header kosoku saw); read them all anyway.
    for cases in index.values():
        if not isinstance(cases, dict):
            raise RunError(f"{index_path}: expected an object of cases per agent")
        for case_id, entry in cases.items():
            if not isinstance(entry, dict):
                raise RunError(f"{index_path}: case {case_id}: expected an object")
            report_path = outdir / _string(entry, "reportfile", index_path)
            try:
                raw = json.loads(report_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise RunError(f"cannot read the report of case {case_id}: {exc}") from None
            if not isinstance(raw, dict):
                raise RunError(f"{report_path}: expected an object")
            duration = raw.get("duration", 0)
            reports.append(
                CaseReport(
                    case_id=case_id,
                    behavior=_string(raw, "behavior", report_path),
                    behavior_close=_string(raw, "behaviorClose", report_path),
                    result=_string(raw, "result", report_path),
                    result_close=_string(raw, "resultClose", report_path),
                    duration_ms=duration if isinstance(duration, int) else 0,
                )
            )
    return tuple(sorted(reports, key=lambda report: report.sort_key))


# --------------------------------------------------------------------------------------------------
# Summary


def _counts_table(title: str, counts: Counter[str]) -> list[str]:
    width = max([len(title), *map(len, counts)])
    lines = [f"  {title:<{width}}  cases"]
    lines += [f"  {name:<{width}}  {count:5d}" for name, count in counts.most_common()]
    return lines


def _section_table(reports: Sequence[CaseReport]) -> list[str]:
    verdicts = ["OK", "NON-STRICT", "INFORMATIONAL"]
    verdicts += sorted({report.verdict for report in reports} - set(verdicts))
    by_section: dict[int, Counter[str]] = {}
    for report in reports:
        by_section.setdefault(report.sort_key[0], Counter())[report.verdict] += 1
    header = "  section  " + "  ".join(f"{verdict:>13}" for verdict in verdicts)
    lines = [header]
    for section in sorted(by_section):
        counts = by_section[section]
        row = "  ".join(f"{counts[verdict]:13d}" for verdict in verdicts)
        lines.append(f"  {section:>7}  {row}")
    return lines


def format_summary(summary: RunSummary) -> str:
    """The human-readable summary: counts per verdict and per section, and every case not passed."""
    reports = summary.reports
    lines = [
        f"Autobahn|Testsuite against {summary.target}: {len(reports)} cases in {summary.seconds:.1f} s",
        "",
        *_counts_table("behavior", Counter(report.behavior for report in reports)),
        "",
        *_counts_table("behaviorClose", Counter(report.behavior_close for report in reports)),
        "",
        *_section_table(reports),
    ]
    for verdict in ("NON-STRICT", "INFORMATIONAL"):
        ids = [report.case_id for report in reports if report.passed and report.verdict == verdict]
        if ids:
            lines += ["", f"{verdict} (counted as passed): {', '.join(ids)}"]
    slowest = sorted(reports, key=lambda report: report.duration_ms, reverse=True)[:5]
    if slowest:
        lines += [
            "",
            "slowest: "
            + ", ".join(f"{report.case_id} {report.duration_ms / 1000:.1f} s" for report in slowest),
        ]
    failures = summary.failures
    lines.append("")
    if failures:
        lines.append(f"NOT PASSED: {len(failures)} of {len(reports)} cases")
        for report in failures:
            lines.append(
                f"  {report.case_id}: behavior {report.behavior}, behaviorClose {report.behavior_close}"
            )
            if report.behavior not in PASSING:
                lines.append(f"      {report.result}")
            if report.behavior_close not in PASSING:
                lines.append(f"      {report.result_close}")
    else:
        lines.append(f"PASSED: all {len(reports)} cases")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Running


def kosoku_command() -> list[str]:
    """The ``kosoku`` console script of this interpreter's environment (else the one on PATH).

    :raises RunError: if kosoku is not installed.
    """
    beside = Path(sys.executable).parent / "kosoku"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("kosoku")
    if found is None:
        raise RunError("the kosoku console script is not installed (pip install kosoku)")
    return [found]


async def run_kosoku(
    address: str,
    *,
    include: Iterable[str],
    exclude: Iterable[str],
    parallelism: int,
    outdir: Path,
    verbose: bool,
) -> None:
    """Run kosoku's fuzzingclient against ``address`` (``host:port``), reports into ``outdir``.

    kosoku exits 1 when a case fails; that is not an error here (the reports tell which). Its
    output is shown only with ``verbose`` or when it wrote no report index. Cancelling this
    (a timeout around it) terminates kosoku.

    :raises RunError: if kosoku writes no reports.
    """
    command = [*kosoku_command(), address, "-p", str(parallelism), "-o", str(outdir)]
    command += [arg for case in include for arg in ("-i", case)]
    command += [arg for case in exclude for arg in ("-x", case)]
    logger.info("running %s", shlex.join(command))
    # A kept --outdir may hold an earlier run's index: never read that one as this run's.
    (outdir / "index.json").unlink(missing_ok=True)
    process = await trio.run_process(
        command,
        check=False,
        capture_stdout=not verbose,
        capture_stderr=not verbose,
    )
    if not (outdir / "index.json").is_file():
        output = (process.stdout or b"") + (process.stderr or b"")
        # The end of a traceback says what went wrong (an unknown case glob, say).
        tail = "\n".join(output.decode(errors="replace").strip().splitlines()[-_OUTPUT_TAIL:])
        raise RunError(f"kosoku exited with {process.returncode} and wrote no reports\n{tail}")


def atlas_config(backend_port: int) -> Config:
    """Atlas on 127.0.0.1 port 0 with the echo backend as its only server."""
    return Config(
        proxy=ProxyConfig(listen=f"{HOST}:0", max_message_size=MAX_MESSAGE_SIZE),
        admin=AdminConfig(enabled=False),
        servers=(ServerConfig(name="echo", url=f"ws://{HOST}:{backend_port}", capacity=100_000),),
    )


async def run_suite(options: Options, outdir: Path) -> RunSummary:
    """Start the echo backend (and Atlas unless ``options.direct``), run kosoku, read the reports.

    :raises RunError: if the run could not be completed.
    """
    async with trio.open_nursery() as nursery:
        backend_port: int = await nursery.start(
            partial(serve_echo_server, HOST, 0, name="echo", max_message_size=MAX_MESSAGE_SIZE)
        )
        target = f"the echo backend alone (ws://{HOST}:{backend_port})"
        port = backend_port
        if not options.direct:
            started: AtlasStarted = await nursery.start(serve_atlas, atlas_config(backend_port))
            port = started.proxy.port
            target = f"Atlas (ws://{HOST}:{port}) -> echo backend (ws://{HOST}:{backend_port})"
        logger.info("running against %s", target)
        begun = time.monotonic()
        try:
            with trio.move_on_after(options.timeout) as timeout:
                await run_kosoku(
                    f"{HOST}:{port}",
                    include=options.cases,
                    exclude=options.exclude,
                    parallelism=options.parallelism,
                    outdir=outdir,
                    verbose=options.verbose,
                )
        finally:
            nursery.cancel_scope.cancel()
        seconds = time.monotonic() - begun
    if timeout.cancelled_caught:
        raise RunError(f"kosoku did not finish within {options.timeout:g} s (see --timeout)")
    return RunSummary(target=target, seconds=seconds, reports=load_reports(outdir))


# --------------------------------------------------------------------------------------------------
# Command line


@attrs.frozen
class Options:
    """The parsed command line."""

    cases: tuple[str, ...]
    exclude: tuple[str, ...]
    direct: bool
    parallelism: int
    outdir: Path | None
    timeout: float
    verbose: bool


def _globs(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Parse the command line into `Options`."""
    parser = argparse.ArgumentParser(
        description="Run the Autobahn|Testsuite (kosoku) through Atlas to an echo backend.",
    )
    parser.add_argument(
        "--cases",
        type=_globs,
        default=DEFAULT_CASES,
        help=f"comma-separated case ids or globs (default: {','.join(DEFAULT_CASES)})",
    )
    parser.add_argument(
        "--exclude",
        type=_globs,
        default=(),
        help="comma-separated case ids or globs to leave out of --cases",
    )
    parser.add_argument(
        "--direct",
        action="store_true",
        help="run against the echo backend alone, without Atlas (for comparison)",
    )
    parser.add_argument("-p", "--parallelism", type=int, default=4, help="cases run at once (default: 4)")
    parser.add_argument(
        "--outdir",
        type=Path,
        default=None,
        help="keep kosoku's reports (JSON and HTML) here (default: a temporary directory)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        help="seconds the whole kosoku run may take (default: 900)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show kosoku's output and Atlas's logs")
    args = parser.parse_args(argv)
    if args.parallelism < 1:
        parser.error("--parallelism must be at least 1")
    return Options(
        cases=args.cases,
        exclude=args.exclude,
        direct=args.direct,
        parallelism=args.parallelism,
        outdir=args.outdir,
        timeout=args.timeout,
        verbose=args.verbose,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite and print the summary; return the exit status."""
    options = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if options.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    error: str | None = None
    summary: RunSummary | None = None
    with tempfile.TemporaryDirectory(prefix="atlas-autobahn-") as scratch:
        outdir = options.outdir if options.outdir is not None else Path(scratch)
        try:
            summary = trio.run(run_suite, options, outdir)
        except* RunError as group:
            error = "; ".join(str(exc) for exc in group.exceptions)
        except* (OSError, StartupError) as group:
            error = "could not start: " + "; ".join(str(exc) for exc in group.exceptions)
    if summary is None:
        print(f"conformance run failed: {error}", file=sys.stderr)
        return EXIT_ERROR
    print(format_summary(summary))
    if options.outdir is not None:
        print(f"\nreports: {options.outdir / 'index.html'}")
    return EXIT_FAILED if summary.failures else EXIT_PASSED


if __name__ == "__main__":
    sys.exit(main())
