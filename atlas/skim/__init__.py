"""Skimming: a non-blocking tap on the relay, and the analyzers that read what it skims.

The relay asks a `SkimFilter` about each frame before unmasking anything, builds a `SkimFrame` for
the frames it wants, and `Dispatcher.offer` s them (a bounded queue: when full it drops and counts,
so skimming can never slow the relay). The `Dispatcher` fans frames out in batches to analyzers
(called directly through their optional ``feed``, or each behind its own bounded channel) and to
live taps (`Dispatcher.subscribe`, rendered with `frame_to_sse`). Analyzers are a small plug-in
interface (`Analyzer`, loaded by import path with
`load_analyzer`) and emit `SkimEvent` s: the built-in `MovementAnalyzer` emits `Movement` (pure
parser: `parse_movement`), the `EventAnalyzer` logs game events in the seed's style and emits
`GameEvent` (pure parser: `parse_event`). docs/skimming.md is the user's guide.
"""

from atlas.skim._analyzer import (
    Analyzer,
    EventSink,
    GameEvent,
    Movement,
    SkimEvent,
    Vector,
    load_analyzer,
    load_analyzers,
)
from atlas.skim._dispatch import AnalyzerState, AnalyzerStatistics, Dispatcher, DispatcherStatistics
from atlas.skim._events import EVENT_KINDS, EventAnalyzer, parse_event
from atlas.skim._frames import OP_BINARY, OP_TEXT, Direction, SkimFilter, SkimFrame, frame_to_sse
from atlas.skim._movement import MovementAnalyzer, MovementPath, PathStep, parse_movement

__all__ = [
    "EVENT_KINDS",
    "OP_BINARY",
    "OP_TEXT",
    "Analyzer",
    "AnalyzerState",
    "AnalyzerStatistics",
    "Direction",
    "Dispatcher",
    "DispatcherStatistics",
    "EventAnalyzer",
    "EventSink",
    "GameEvent",
    "Movement",
    "MovementAnalyzer",
    "MovementPath",
    "PathStep",
    "SkimEvent",
    "SkimFilter",
    "SkimFrame",
    "Vector",
    "frame_to_sse",
    "load_analyzer",
    "load_analyzers",
    "parse_event",
    "parse_movement",
]
