"""Operator logging: one line per event that matters, as text or as JSON lines.

Records may carry structured fields through ``extra=`` (``client``, ``peer``, ``server``, ``event``, ...);
the JSON format emits them as keys, the text format keeps the human message only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Literal, TextIO

__all__ = ["JsonFormatter", "TextFormatter", "configure_logging"]

_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Format each record as one JSON object: time, level, logger, message and structured extras."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a single JSON line."""
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``2026-11-26T01:56:20.123Z INFO    atlas.proxy: message``, UTC; the date part built once a second."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s.%(msecs)03dZ %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
        self.converter = time.gmtime
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one line (and its traceback, if any, below it)."""
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        record.message = record.getMessage()
        line = f"{self._stamp}.{int(record.msecs):03d}Z {record.levelname:<7} {record.name}: {record.message}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


def configure_logging(
    level: str = "info",
    fmt: Literal["text", "json"] = "text",
    *,
    stream: TextIO | None = None,
) -> None:
    """Send the ``atlas`` loggers to ``stream`` (stderr by default) at ``level`` in format ``fmt``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    # What no Atlas line shows, records need not collect: the caller's file, line and function (a walk
    # up the stack per record), the thread, the process id (a system call) and name. These are the
    # switches the logging documentation names for it ("Optimization"); they act process-wide, which
    # is what this function configures.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger("atlas")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
