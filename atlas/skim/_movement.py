"""Movement recognition: `parse_movement` (pure) and the `MovementAnalyzer` that emits `Movement` events.

Recognised, from a text message holding one JSON object (docs/skimming.md has the table):

* the seed's formats: a ``"client":"move"``, ``"action":"move"``, ``"type":"move"`` or
  ``"type":"position"`` message whose position is top-level ``x``, ``y`` (, ``z``), or
  ``position: {x, y, z}``, ``pos: [x, y(, z)]`` or ``coords: {x, y, z}``, and optionally a
  ``velocity: {x, y, z}``;
* Horizon's ``{"type":"gorc_event","event":"move","data":{"new_position":{...},"velocity":{...}}}``
  and its older ``{"namespace":"movement","event":"move_request","data":{"target_x":...}}``;
* configured JSON paths (`MovementPath`).

Rules: ``type``, when the message has one, decides (``{"type":"chat","client":"move",...}`` is a chat
message); coordinates are JSON numbers (integers or floats, never booleans, strings or null), and
finite; a missing z is 0.0; only the top level of the message counts (a move nested inside another
message is not a movement).

Speed: the built-in formats are decoded by msgspec into a loose `Struct` that keeps only the fields
they use, typed as floats, so msgspec itself rejects strings and booleans and skips everything
else. On a 57-byte ``{"type":"move","position":{...}}`` message that is about 2x faster than
decoding to a ``dict`` and matching in Python (measured ~330 ns against ~630 ns per message, 33-byte
seed message ~290 ns against ~680 ns, a 243-byte Horizon message ~870 ns against ~2.3 µs).
Configured paths need the generic tree: they decode the message a second time, to ``dict``, and
only when the built-in formats did not match. The last payload decoded is remembered (by identity):
the `EventAnalyzer`, fed the same frame right after, reads its discriminators from that decode
instead of decoding the message again.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import attrs
import msgspec
import trio

from atlas.skim._analyzer import EventSink, Movement, Vector
from atlas.skim._frames import OP_TEXT, SkimFrame

__all__ = ["MovementAnalyzer", "MovementPath", "PathStep", "parse_movement"]

PathStep = str | int
"""One step of a JSON path: an object key, or an array index."""


# ------------------------------------------------------------------------------------------------
# Configured paths
# ------------------------------------------------------------------------------------------------


def _to_steps(value: object) -> tuple[PathStep, ...]:
    """A path from a list of keys and indices, or a dotted string of keys (``"payload.player.pos"``)."""
    if isinstance(value, str):
        steps: tuple[object, ...] = tuple(value.split(".")) if value else ()
    elif isinstance(value, list | tuple):
        steps = tuple(value)
    else:
        raise TypeError(f"a JSON path is a list of keys and indices or a dotted string, not {value!r}")
    for step in steps:
        if isinstance(step, bool) or not isinstance(step, str | int):
            raise TypeError(f"a JSON path step is a string key or an integer index, not {step!r}")
        if isinstance(step, str) and not step:
            raise ValueError("a JSON path step may not be an empty key")
    return steps  # type: ignore[return-value]  # every step checked above


def _check_position(_instance: object, _attribute: attrs.Attribute[Any], value: tuple[PathStep, ...]) -> None:
    if not value:
        raise ValueError("position path must not be empty")


def _check_equals(_instance: object, _attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, str | int)):
        raise TypeError(f"equals must be a string or an integer, not {value!r}")


@attrs.frozen
class MovementPath:
    """A configured movement format: where the position (and velocity) sit in a JSON message.

    The value at `position` is an object with numeric ``x``, ``y`` (and optional ``z``) or an array
    of 2 or 3 numbers. When `match` is set, the message counts only if the value at `match` equals
    `equals` (a string or an integer, compared with its type). Build one in code
    (``MovementPath(("payload", "player", "pos"), match=("kind",), equals="move")``) or from a
    config table with `from_options`.
    """

    position: tuple[PathStep, ...] = attrs.field(converter=_to_steps, validator=_check_position)
    """Path to the position."""
    velocity: tuple[PathStep, ...] = attrs.field(default=(), converter=_to_steps)
    """Path to the velocity (same shapes); empty: none. Missing in a message: velocity None."""
    match: tuple[PathStep, ...] = attrs.field(default=(), converter=_to_steps)
    """Path to a discriminator field; empty: every message is tried."""
    equals: str | int | None = attrs.field(default=None, validator=_check_equals)
    """The value `match` must hold; required with `match`, not allowed without it."""

    def __attrs_post_init__(self) -> None:
        if bool(self.match) != (self.equals is not None):
            raise ValueError("'match' and 'equals' go together: give both or neither")

    @classmethod
    def from_options(cls, raw: Mapping[str, object]) -> MovementPath:
        """Build one from a config table (keys ``position``, ``velocity``, ``match``, ``equals``).

        Raises:
            ValueError: an unknown or missing key, or a bad value (the message says which).
        """
        if not isinstance(raw, Mapping):
            raise ValueError(f"a movement path is a table (position, velocity, match, equals), not {raw!r}")
        unknown = sorted(str(key) for key in raw if key not in {"position", "velocity", "match", "equals"})
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} (expected position, velocity, match, equals)")
        if "position" not in raw:
            raise ValueError("missing key 'position'")
        try:
            return cls(
                position=raw["position"],  # the converters check these
                velocity=raw.get("velocity", ()),
                match=raw.get("match", ()),
                equals=raw.get("equals"),  # type: ignore[arg-type]  # so does the validator
            )
        except TypeError as exc:
            raise ValueError(str(exc)) from None


_MISSING: Final = object()


def _walk(tree: object, steps: tuple[PathStep, ...]) -> object:
    """The value at ``steps`` in a decoded JSON tree, or `_MISSING`."""
    for step in steps:
        if type(step) is str:
            if type(tree) is not dict:
                return _MISSING
            tree = tree.get(step, _MISSING)
            if tree is _MISSING:
                return _MISSING
        else:
            if type(tree) is not list or not -len(tree) <= step < len(tree):  # type: ignore[operator]
                return _MISSING
            tree = tree[step]  # type: ignore[index]
    return tree


def _number(value: object) -> float | None:
    """``value`` as a finite float if it is a JSON number (not a boolean), else None."""
    if type(value) is float:
        return value if math.isfinite(value) else None
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:
            return None
    return None


def _vector(value: object) -> Vector | None:
    """An ``{x, y(, z)}`` object or a ``[x, y(, z)]`` array of numbers as a `Vector`, else None."""
    if type(value) is dict:
        x, y = _number(value.get("x")), _number(value.get("y"))
        z = _number(value["z"]) if "z" in value else 0.0
    elif type(value) is list and 2 <= len(value) <= 3:
        x, y = _number(value[0]), _number(value[1])
        z = _number(value[2]) if len(value) == 3 else 0.0
    else:
        return None
    if x is None or y is None or z is None:
        return None
    return (x, y, z)


def _match_path(tree: object, path: MovementPath) -> tuple[Vector, Vector | None] | None:
    if path.match:
        found = _walk(tree, path.match)
        if type(found) is not type(path.equals) or found != path.equals:
            return None
    position = _vector(_walk(tree, path.position))
    if position is None:
        return None
    velocity: Vector | None = None
    if path.velocity:
        raw = _walk(tree, path.velocity)
        if raw is not _MISSING and raw is not None:
            velocity = _vector(raw)
            if velocity is None:  # there, but not a vector: a malformed message
                return None
    return position, velocity


# ------------------------------------------------------------------------------------------------
# Built-in formats
# ------------------------------------------------------------------------------------------------


# gc=False: decoded records never hold a reference back to themselves, so they cannot be in a cycle;
# untracked, they cost the garbage collector nothing (thousands are decoded a second).
class _Vec(msgspec.Struct, gc=False):
    x: float
    y: float
    z: float = 0.0


class _Data(msgspec.Struct, gc=False):
    # Horizon's gorc_event move
    new_position: _Vec | None = None
    velocity: _Vec | None = None
    # Horizon's older movement/move_request
    target_x: float | None = None
    target_y: float | None = None
    target_z: float = 0.0


class _Message(msgspec.Struct, gc=False):
    # Discriminators are Any: a non-string value just does not match (a client object in a move
    # message must not make the message unreadable).
    type: Any = None
    client: Any = None
    action: Any = None
    namespace: Any = None
    event: Any = None
    # Positions: typed, so msgspec rejects strings, booleans and out-of-range numbers itself.
    x: float | None = None
    y: float | None = None
    z: float = 0.0
    position: _Vec | None = None
    pos: list[float] | None = None
    coords: _Vec | None = None
    velocity: _Vec | None = None
    # Only decoded (into _Data) for the two Horizon forms: other messages may put anything there.
    data: msgspec.Raw = msgspec.Raw()


_decode_message: Final = msgspec.json.Decoder(_Message).decode
_decode_data: Final = msgspec.json.Decoder(_Data).decode
_decode_tree: Final = msgspec.json.Decoder().decode
_MOVE_TYPES: Final = frozenset(("move", "position"))


class _Undecoded(enum.Enum):
    SHAPE = "JSON, but not the shape of a built-in format"
    NOT_JSON = "not JSON"


# The last payload `_message` decoded and the outcome, as one tuple (replaced whole, never mutated).
# The built-in analyzers are fed the same frame one after the other, so the second one finds the
# first one's decode here; holding one payload alive is all it costs.
_last: tuple[bytes, _Message | _Undecoded] = (b"", _Undecoded.NOT_JSON)


def _message(payload: bytes) -> _Message | _Undecoded:
    """``payload`` decoded as a `_Message`, or why not; the same payload (object) twice is decoded once."""
    global _last
    last = _last
    if last[0] is payload:
        return last[1]
    try:
        found: _Message | _Undecoded = _decode_message(payload)
    except msgspec.ValidationError:
        found = _Undecoded.SHAPE
    except (msgspec.DecodeError, UnicodeDecodeError):  # msgspec raises UnicodeDecodeError for a bad string
        found = _Undecoded.NOT_JSON
    if type(payload) is bytes:  # immutable: the same object always holds the same message
        _last = (payload, found)
    return found


def _decoded(payload: bytes) -> _Message | None:
    """The `_Message` of ``payload`` if it is the payload decoded last and it decoded, else None (no work)."""
    last = _last
    if last[0] is payload and type(last[1]) is _Message:
        return last[1]
    return None


def _seed_format(message: _Message) -> tuple[Vector, Vector | None] | None:
    if message.position is not None:
        vec = message.position
        position = (vec.x, vec.y, vec.z)
    elif message.pos is not None:
        pos = message.pos
        if len(pos) == 2:
            position = (pos[0], pos[1], 0.0)
        elif len(pos) == 3:
            position = (pos[0], pos[1], pos[2])
        else:
            return None
    elif message.coords is not None:
        vec = message.coords
        position = (vec.x, vec.y, vec.z)
    elif message.x is not None and message.y is not None:
        position = (message.x, message.y, message.z)
    else:
        return None
    velocity = message.velocity
    return position, None if velocity is None else (velocity.x, velocity.y, velocity.z)


def _builtin(message: _Message) -> tuple[Vector, Vector | None] | None:
    kind = message.type
    if kind is None:
        if message.client == "move" or message.action == "move":
            return _seed_format(message)
        if message.namespace == "movement" and message.event == "move_request" and message.data:
            data = _decode_data(message.data)
            if data.target_x is None or data.target_y is None:
                return None
            return (data.target_x, data.target_y, data.target_z), None
        return None
    if type(kind) is str and kind in _MOVE_TYPES:
        return _seed_format(message)
    if kind == "gorc_event" and message.event == "move" and message.data:
        data = _decode_data(message.data)
        if data.new_position is None:
            return None
        vec, velocity = data.new_position, data.velocity
        return (vec.x, vec.y, vec.z), None if velocity is None else (velocity.x, velocity.y, velocity.z)
    return None


def parse_movement(payload: bytes, paths: Sequence[MovementPath] = ()) -> tuple[Vector, Vector | None] | None:
    """The position and velocity a movement message carries, or None if it is not one.

    ``payload`` is a text message's payload (UTF-8 JSON). The built-in formats are tried first, then
    each of ``paths`` in order. Never raises on any input. UTF-8 is checked only in the strings the
    formats read (checking every text message is the relay's job: ``proxy.validate_utf8``).
    """
    message = _message(payload)
    if message is _Undecoded.NOT_JSON:
        return None
    if message is _Undecoded.SHAPE:
        found = None  # JSON, but not the shape of a built-in format: the paths may still match
    else:
        try:
            found = _builtin(message)
        except msgspec.ValidationError:
            found = None  # a Horizon ``data`` of the wrong shape
        except (msgspec.DecodeError, UnicodeDecodeError):
            return None
    if found is not None or not paths:
        return found
    try:
        tree = _decode_tree(payload)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    for path in paths:
        found = _match_path(tree, path)
        if found is not None:
            return found
    return None


def _to_paths(value: Iterable[MovementPath | Mapping[str, object]]) -> tuple[MovementPath, ...]:
    if isinstance(value, str | Mapping):
        raise ValueError("paths must be a list of movement paths")
    paths: list[MovementPath] = []
    for index, each in enumerate(value):
        if isinstance(each, MovementPath):
            paths.append(each)
            continue
        try:
            paths.append(MovementPath.from_options(each))
        except ValueError as exc:
            raise ValueError(f"paths[{index}]: {exc}") from None
    return tuple(paths)


# ------------------------------------------------------------------------------------------------
# The analyzer
# ------------------------------------------------------------------------------------------------


class MovementAnalyzer:
    """Emits a `Movement` for every movement message a client sends (``up`` text frames only).

    Server-to-client frames are ignored: a server telling a client where *other* players are must not
    move this client. Options (keyword arguments, or the ``options`` table of its ``[[analyzers]]``
    entry): ``name`` (default ``"movement"``) and ``paths``, a list of `MovementPath` or of tables
    for `MovementPath.from_options`.
    """

    def __init__(
        self,
        *,
        name: str = "movement",
        paths: Iterable[MovementPath | Mapping[str, object]] = (),
    ) -> None:
        """Check the options.

        Raises:
            ValueError: a bad name or path (the message says which: ``paths[1]: missing key 'position'``).
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, not {name!r}")
        self.name = name
        self.paths: tuple[MovementPath, ...] = _to_paths(paths)
        #: Frames read, and movement messages recognised among them.
        self.frames = 0
        self.recognised = 0
        #: Set by the host: whether anything consumes movements now. While it says no, frames are
        #: counted but not parsed (Atlas: the predictor, with at least one region on the map).
        self.wanted: Callable[[], bool] | None = None

    async def run(self, frames: trio.MemoryReceiveChannel[SkimFrame], emit: EventSink) -> None:
        """Read ``frames`` until the channel ends; `feed` each one."""
        feed = self.feed
        async for frame in frames:
            feed(frame, emit)

    def feed(self, frame: SkimFrame, emit: EventSink) -> None:
        """Emit a `Movement` if ``frame`` is a movement message (the dispatcher calls it per frame)."""
        self.frames += 1
        if frame.opcode != OP_TEXT or frame.direction != "up":
            return
        wanted = self.wanted
        if wanted is not None and not wanted():
            return
        found = parse_movement(frame.payload, self.paths)
        if found is None:
            return
        self.recognised += 1
        emit(
            Movement(
                client_id=frame.client_id,
                backend=frame.backend,
                time=frame.time,
                position=found[0],
                velocity=found[1],
            )
        )
