"""Operator log lines: the text format, written the same way as the stock formatter it replaced."""

from __future__ import annotations

import io
import json
import logging
import sys
import time

import pytest

from atlas.logs import TextFormatter, configure_logging


def stock_formatter() -> logging.Formatter:
    formatter = logging.Formatter(
        "%(asctime)s.%(msecs)03dZ %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
    )
    formatter.converter = time.gmtime
    return formatter


@pytest.mark.parametrize(
    ("level", "message", "args"),
    [
        (logging.INFO, "client %s connected from %s -> %s", ("a-1", "127.0.0.1:5", "gs-1")),
        (logging.WARNING, "plain 100% text", ()),
        (logging.ERROR, "%d items", (3,)),
    ],
)
def test_text_lines_match_the_stock_formatter(level: int, message: str, args: tuple[object, ...]) -> None:
    formatter = TextFormatter()
    for created in (1795661762.0, 1795661762.999, 1795661763.5):
        record = logging.LogRecord("atlas.proxy", level, __file__, 1, message, args, None)
        record.created = created
        record.msecs = (created - int(created)) * 1000
        assert formatter.format(record) == stock_formatter().format(record)


def test_text_lines_carry_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        info = sys.exc_info()
    record = logging.LogRecord("atlas.proxy", logging.ERROR, __file__, 1, "failed", (), info)
    expected = stock_formatter().format(record)
    record.exc_text = None
    assert TextFormatter().format(record) == expected
    assert "ValueError: boom" in expected


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_configured_lines_have_the_extras_but_no_caller_lookup(fmt: str) -> None:
    out = io.StringIO()
    root = logging.getLogger("atlas")
    saved = (root.handlers[:], root.level, root.propagate)
    switches = (logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
    configure_logging("info", fmt, stream=out)  # type: ignore[arg-type]
    try:
        logging.getLogger("atlas.proxy").info("client %s connected", "a-1", extra={"client": "a-1"})
        logging.getLogger("atlas.proxy").debug("not shown")
        assert logging.logProcesses is False
        assert logging.logThreads is False
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        root.propagate = saved[2]
        logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing = switches
    (line,) = out.getvalue().splitlines()
    if fmt == "json":
        entry = json.loads(line)
        assert entry["message"] == "client a-1 connected"
        assert entry["client"] == "a-1"
        assert entry["level"] == "info"
    else:
        assert line.endswith(" INFO    atlas.proxy: client a-1 connected")
