"""The analyzer plug-in interface: the `Analyzer` protocol, the events it emits, and its loader.

An analyzer is any object with a ``name`` and an ``async run(frames, emit)`` method. The `Dispatcher`
gives each analyzer its own bounded channel of `SkimFrame` and an ``emit`` callback; ``run`` reads
frames until the channel ends and calls ``emit`` with `SkimEvent` records (a `Movement`, a
`GameEvent`, or an analyzer's own subclass). ``emit`` never blocks and never raises.

An analyzer may also have a synchronous ``feed(frame, emit)`` method, for work that takes a few
microseconds per frame: the dispatcher then calls it for each frame from its fan-out task, instead of
giving it a channel and a task of its own (which costs a trio scheduling round per frame or per batch).
``run`` stays required: it is what the interface promises, and what runs the analyzer anywhere else.

Analyzers are configured by import path (``package.module:ClassName``) and a table of options,
which become the keyword arguments of the class: `load_analyzer`. Every failure is reported as an
`atlas.errors.ConfigError` line in the style of the config file's own errors
(``analyzers[0].path: cannot import 'x.y:Z': No module named 'x'``).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, cast, runtime_checkable

import attrs
import trio

from atlas.errors import ConfigError
from atlas.skim._frames import SkimFrame

__all__ = [
    "Analyzer",
    "EventSink",
    "GameEvent",
    "Movement",
    "SkimEvent",
    "Vector",
    "load_analyzer",
    "load_analyzers",
]

Vector = tuple[float, float, float]
"""A point or a velocity: ``(x, y, z)``, finite floats."""


@attrs.frozen(kw_only=True)
class SkimEvent:
    """Something an analyzer recognised in a client's traffic. Subclass it for your own events."""

    client_id: str
    """The client the traffic belongs to."""
    backend: str
    """The backend the client was linked to."""
    time: float
    """`SkimFrame.time` of the frame the event was recognised in (the trio clock)."""


@attrs.frozen(kw_only=True)
class Movement(SkimEvent):
    """A client reported its position (and perhaps its velocity); see docs/skimming.md for the formats."""

    position: Vector
    """Where the client says it is; a missing z is 0.0."""
    velocity: Vector | None = None
    """Its velocity, when the message carried one."""


@attrs.frozen(kw_only=True)
class GameEvent(SkimEvent):
    """A recognised game event other than movement: ``connect``, ``join``, ``leave``, ``chat``, ``error``."""

    kind: str
    """What happened (the message's ``type``, ``action`` or ``client`` field)."""
    detail: dict[str, Any] = attrs.field(factory=dict)
    """The message itself, decoded (a JSON object)."""


EventSink = Callable[[SkimEvent], None]
"""Where an analyzer's events go. Synchronous: it must return at once (it may raise `trio.WouldBlock`
to say that the event was dropped, as `trio.MemorySendChannel.send_nowait` does)."""


@runtime_checkable
class Analyzer(Protocol):
    """A skim analyzer: reads frames from its own channel, may emit events.

    ``name`` must be unique among the configured analyzers; it labels the analyzer's metrics and log
    lines. ``run`` is started once, in the `Dispatcher`'s nursery. It should ``async for`` over
    ``frames`` and return when the channel ends; it is cancelled when skimming stops. It may fall
    behind: its channel is bounded, and frames that do not fit are dropped and counted for it alone.
    It should not do blocking I/O in the trio thread (use ``trio.to_thread``) and must reach a
    checkpoint often (``async for`` does, per frame): it shares the thread with the relay. An
    exception it raises is logged and stops this analyzer only.

    Optional fast path: an analyzer that also has a plain (not ``async``) method
    ``feed(frame: SkimFrame, emit: EventSink) -> None`` is not given a channel or a task: the
    dispatcher calls ``feed`` for each frame, in order, from its fan-out task, and never starts
    ``run``. ``feed`` must return quickly (a few microseconds: the other analyzers and the live taps
    wait while it runs, though the relay never does) and must not block; an exception it raises is
    logged and stops this analyzer only, as for ``run``. ``run`` is still required and should do the
    same as ``feed`` does for each frame it reads (the built-in analyzers are written that way).
    """

    name: str

    async def run(self, frames: trio.MemoryReceiveChannel[SkimFrame], emit: EventSink) -> None:
        """Read ``frames`` until the channel ends, calling ``emit`` for each thing recognised."""
        ...


_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_IMPORT_PATH = re.compile(rf"({_IDENTIFIER}(?:\.{_IDENTIFIER})*):({_IDENTIFIER}(?:\.{_IDENTIFIER})*)")


def _import_object(import_path: str) -> object:
    """Import ``package.module:Name`` (``Name`` may be dotted) or raise `ValueError` with the reason."""
    match = _IMPORT_PATH.fullmatch(import_path)
    if match is None:
        raise ValueError(f"{import_path!r} is not of the form 'package.module:ClassName'")
    module_name, attribute = match.groups()
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {import_path!r}: {exc}") from exc
    except Exception as exc:  # the module itself failed while it was being imported
        raise ValueError(f"cannot import {import_path!r}: {type(exc).__name__}: {exc}") from exc
    where = module_name
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"cannot import {import_path!r}: {where!r} has no attribute {part!r}") from None
        where = f"{where}.{part}"
    return target


def _not_an_analyzer(obj: object) -> str | None:
    """Why ``obj`` is not an `Analyzer`, or None when it is one."""
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        return "its 'name' is not a non-empty string"
    run = getattr(obj, "run", None)
    if not inspect.iscoroutinefunction(run):
        return "it has no 'async def run(frames, emit)' method"
    return _feed_problem(obj)


def _feed_problem(obj: object) -> str | None:
    """Why ``obj``'s optional ``feed`` cannot be used (it is async, or not callable), or None."""
    feed = getattr(obj, "feed", None)
    if feed is None:
        return None
    if not callable(feed) or inspect.iscoroutinefunction(feed):
        return "its 'feed' is not a plain (synchronous) method 'def feed(frame, emit)'"
    return None


def load_analyzer(
    import_path: str, options: Mapping[str, object] | None = None, *, where: str = "analyzer"
) -> Analyzer:
    """Import the analyzer class at ``import_path`` and build it with ``options`` as keyword arguments.

    ``import_path`` is ``package.module:ClassName``; any callable that returns an `Analyzer` will do
    (a factory function too). ``where`` names the entry in error messages, ``analyzers[2]`` for
    instance.

    Raises:
        ConfigError: one line, ``<where>.path: ...`` when the path is malformed, the module cannot be
            imported or has no such attribute, or the result is not an analyzer;
            ``<where>.options: ...`` when the class rejects the options.
    """
    try:
        factory = _import_object(import_path)
    except ValueError as exc:
        raise ConfigError([f"{where}.path: {exc}"]) from None
    if not callable(factory):
        raise ConfigError([f"{where}.path: {import_path!r} is not a class or a factory function"])
    options = dict(options or {})
    bad_keys = [key for key in options if not isinstance(key, str) or not key.isidentifier()]
    if bad_keys:
        raise ConfigError([f"{where}.options: not a valid option name: {bad_keys[0]!r}"])
    try:
        analyzer: object = factory(**options)
    except Exception as exc:
        raise ConfigError([f"{where}.options: {import_path}: {exc}"]) from None
    reason = _not_an_analyzer(analyzer)
    if reason is not None:
        raise ConfigError([f"{where}.path: {import_path!r} did not give an analyzer: {reason}"])
    return cast(Analyzer, analyzer)


def load_analyzers(
    entries: Iterable[tuple[str, Mapping[str, object] | None]], *, where: str = "analyzers"
) -> list[Analyzer]:
    """`load_analyzer` for each ``(import_path, options)`` entry, checking that names are unique.

    Raises:
        ConfigError: every problem found, one ``<where>[i].path: ...`` line each (an analyzer whose name
            is already taken: ``<where>[i].options: analyzer name 'movement' is already used by
            <where>[0]; give it another 'name' option``).
    """
    loaded: list[Analyzer] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for index, (import_path, options) in enumerate(entries):
        entry = f"{where}[{index}]"
        try:
            analyzer = load_analyzer(import_path, options, where=entry)
        except ConfigError as exc:
            problems.extend(exc.errors)
            continue
        first = seen.setdefault(analyzer.name, index)
        if first != index:
            problems.append(
                f"{entry}.options: analyzer name {analyzer.name!r} is already used by {where}[{first}]; "
                "give it another 'name' option"
            )
            continue
        loaded.append(analyzer)
    if problems:
        raise ConfigError(problems)
    return loaded
