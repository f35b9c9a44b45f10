"""Game-event recognition: `parse_event` (pure) and the `EventAnalyzer` that logs and emits `GameEvent`s.

A message is a game event when its kind is one of `EVENT_KINDS`. The kind is the message's ``type``
when it has one, else its ``action``, else its ``client`` field, the same discriminators the seed's
movement formats use (``{"type":"join","room":"lobby"}``, ``{"action":"leave"}``,
``{"client":"chat","message":"hi"}``). Only the top level of a JSON object counts.

The analyzer writes one log line per recognised message, in the seed's style
(``Client c-1 movement detected: {"client":"move","x":123,"y":456}``), at a level that keeps routine
traffic out of production logs: chat and movement at DEBUG, connect/join/leave at INFO, error at
WARNING. Each record carries ``extra={"client": ..., "server": ..., "event": kind, "direction": ...}``
for the JSON log format. Payloads in log lines are cut to ``max_log_chars`` and their control
characters escaped, so a client cannot forge log lines.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import msgspec
import trio

from atlas.skim._analyzer import EventSink, GameEvent
from atlas.skim._frames import OP_TEXT, SkimFrame
from atlas.skim._movement import MovementPath, _decoded, _Message, _to_paths, parse_movement

__all__ = ["EVENT_KINDS", "EventAnalyzer", "parse_event"]

log = logging.getLogger("atlas.skim")

EVENT_KINDS: Final = ("connect", "join", "leave", "chat", "error")
"""The kinds of game event recognised (besides movement, which is only logged; see `EventAnalyzer`)."""

_LEVELS: Final = {
    "connect": logging.INFO,
    "join": logging.INFO,
    "leave": logging.INFO,
    "chat": logging.DEBUG,
    "error": logging.WARNING,
    "movement": logging.DEBUG,
}
_KIND_SET: Final = frozenset(EVENT_KINDS)


class _Head(msgspec.Struct, gc=False):  # no cycles possible: untracked (see _movement._Vec)
    type: Any = None
    action: Any = None
    client: Any = None


_decode_head: Final = msgspec.json.Decoder(_Head).decode
_decode_object: Final = msgspec.json.Decoder(dict[str, Any]).decode


def _kind(head: _Head | _Message) -> object:
    if head.type is not None:
        return head.type
    if head.action is not None:
        return head.action
    return head.client


def parse_event(payload: bytes) -> tuple[str, dict[str, Any]] | None:
    """The kind (one of `EVENT_KINDS`) and the decoded message, or None if it is not a game event.

    Never raises on any input. When ``payload`` is the message the movement parser decoded last (the
    same frame, just given to the `MovementAnalyzer`), its discriminators are read from that decode.
    """
    try:
        message = _decoded(payload)
        kind = _kind(_decode_head(payload) if message is None else message)
        if type(kind) is not str or kind not in _KIND_SET:
            return None
        return kind, _decode_object(payload)
    except (msgspec.DecodeError, UnicodeDecodeError):  # not JSON, not an object, not UTF-8
        return None


# Control characters (and DEL) become visible escapes in log lines.
_ESCAPES: Final = {code: f"\\x{code:02x}" for code in (*range(32), 127)} | {
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}


def _printable(payload: bytes, limit: int) -> str:
    text = payload[:limit].decode("utf-8", "replace").translate(_ESCAPES)
    return text + "…" if len(payload) > limit else text


class EventAnalyzer:
    """Logs recognised game events and movement in the seed's style, and emits `GameEvent` records.

    Kinds in `EVENT_KINDS` are emitted as `GameEvent` (``detail`` is the decoded message) and logged;
    ``movement`` (anything `parse_movement` recognises, with the same ``paths``) is only logged, at
    DEBUG and only when DEBUG is enabled for ``atlas.skim``: `Movement` events are the
    `MovementAnalyzer`'s job. Text frames both ways are read; a server-to-client event logs as
    ``Server game-1 to client c-1 error detected: ...``.

    Options: ``name`` (default ``"events"``), ``kinds`` (the subset of `EVENT_KINDS` and
    ``"movement"`` to recognise; default all), ``paths`` (see `MovementAnalyzer`) and
    ``max_log_chars`` (payload shown in a log line, default 200).
    """

    def __init__(
        self,
        *,
        name: str = "events",
        kinds: Sequence[str] = (*EVENT_KINDS, "movement"),
        paths: Iterable[MovementPath | Mapping[str, object]] = (),
        max_log_chars: int = 200,
    ) -> None:
        """Check the options.

        Raises:
            ValueError: a bad name, an unknown kind, a bad path, or ``max_log_chars`` below 1.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, not {name!r}")
        if isinstance(kinds, str):
            raise ValueError("kinds must be a list of event kinds, not a string")
        unknown = [kind for kind in kinds if kind not in _LEVELS]
        if unknown:
            raise ValueError(f"unknown event kind {unknown[0]!r} (known: {', '.join(_LEVELS)})")
        if type(max_log_chars) is not int or max_log_chars < 1:
            raise ValueError(f"max_log_chars must be an integer of at least 1, not {max_log_chars!r}")
        self.name = name
        self.kinds = frozenset(kinds)
        self.paths = _to_paths(paths)
        self.max_log_chars = max_log_chars
        #: Frames read, and messages recognised among them (movement only counts when it is logged).
        self.frames = 0
        self.recognised = 0

    async def run(self, frames: trio.MemoryReceiveChannel[SkimFrame], emit: EventSink) -> None:
        """Read ``frames`` until the channel ends; `feed` each one."""
        feed = self.feed
        async for frame in frames:
            feed(frame, emit)

    def feed(self, frame: SkimFrame, emit: EventSink) -> None:
        """Log ``frame`` if it is a recognised message; emit a `GameEvent` if it is a game event."""
        self.frames += 1
        if frame.opcode != OP_TEXT:
            return
        event = parse_event(frame.payload)
        if event is not None:
            kind, detail = event
            if kind not in self.kinds:
                return
            self.recognised += 1
            self._log(frame, kind)
            emit(
                GameEvent(
                    client_id=frame.client_id,
                    backend=frame.backend,
                    time=frame.time,
                    kind=kind,
                    detail=detail,
                )
            )
        elif (
            log.isEnabledFor(logging.DEBUG)
            and "movement" in self.kinds
            and parse_movement(frame.payload, self.paths) is not None
        ):
            self.recognised += 1
            self._log(frame, "movement")

    def _log(self, frame: SkimFrame, kind: str) -> None:
        level = _LEVELS[kind]
        if not log.isEnabledFor(level):
            return
        extra = {
            "client": frame.client_id,
            "server": frame.backend,
            "event": kind,
            "direction": frame.direction,
        }
        text = _printable(frame.payload, self.max_log_chars)
        if frame.direction == "up":
            log.log(level, "Client %s %s detected: %s", frame.client_id, kind, text, extra=extra)
        else:
            log.log(
                level,
                "Server %s to client %s %s detected: %s",
                frame.backend,
                frame.client_id,
                kind,
                text,
                extra=extra,
            )
