"""Tests for skimming: the pre-filter, the movement and event parsers, the analyzer loader, the dispatcher."""

from __future__ import annotations

import json
import logging
import math
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import msgspec
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from atlas.config import Config, PredictorConfig, RegionConfig, WorldConfig
from atlas.control import regions
from atlas.control.regions import RegionService
from atlas.errors import ConfigError
from atlas.runtime import Runtime
from atlas.skim import (
    EVENT_KINDS,
    OP_BINARY,
    OP_TEXT,
    Analyzer,
    AnalyzerState,
    Direction,
    Dispatcher,
    DispatcherStatistics,
    EventAnalyzer,
    EventSink,
    GameEvent,
    Movement,
    MovementAnalyzer,
    MovementPath,
    SkimEvent,
    SkimFilter,
    SkimFrame,
    Vector,
    frame_to_sse,
    load_analyzer,
    load_analyzers,
    parse_event,
    parse_movement,
)
from atlas.supervisor import analyzers_for
from atlas.world import Box, CancelPrepare, Predictor, PredictorSettings, Prepare, Transfer, Vec3, WorldMap


def frame(
    payload: bytes | str,
    *,
    client: str = "c-1",
    backend: str = "game-1",
    direction: Direction = "up",
    opcode: int = OP_TEXT,
    time: float = 0.0,
) -> SkimFrame:
    data = payload.encode() if isinstance(payload, str) else payload
    return SkimFrame(client, backend, direction, opcode, data, time)


def encode(message: object) -> bytes:
    return json.dumps(message).encode()


# ------------------------------------------------------------------------------------------------
# SkimFrame and SkimFilter
# ------------------------------------------------------------------------------------------------


def test_skim_frame_is_a_frozen_record() -> None:
    f = SkimFrame(client_id="c-1", backend="b", direction="down", opcode=OP_BINARY, payload=b"\x00", time=2.5)
    assert f == SkimFrame("c-1", "b", "down", OP_BINARY, b"\x00", 2.5)
    with pytest.raises(AttributeError):
        f.payload = b"other"  # type: ignore[misc]


def test_filter_keeps_the_first_then_one_in_n_eligible_frames() -> None:
    skim = SkimFilter(max_size=100, sample_every=3)
    assert [skim.wants(OP_TEXT, 10) for _ in range(7)] == [True, False, False, True, False, False, True]


def test_ineligible_frames_do_not_advance_the_sampling() -> None:
    skim = SkimFilter(max_size=100, sample_every=2)
    assert skim.wants(OP_TEXT, 10)
    assert not skim.wants(OP_TEXT, 101)  # too big
    assert not skim.wants(OP_BINARY, 10)  # text only
    assert not skim.wants(9, 0)  # ping
    assert not skim.wants(0, 10)  # continuation
    assert not skim.wants(OP_TEXT, 10)  # the 2nd eligible frame
    assert skim.wants(OP_TEXT, 10)  # the 3rd


@pytest.mark.parametrize(
    ("text_only", "opcode", "wanted"),
    [
        (True, OP_TEXT, True),
        (True, OP_BINARY, False),
        (False, OP_TEXT, True),
        (False, OP_BINARY, True),
        (False, 0, False),
        (False, 3, False),
        (False, 8, False),
        (False, 9, False),
        (False, 10, False),
        (False, -1, False),
    ],
)
def test_filter_opcodes(text_only: bool, opcode: int, wanted: bool) -> None:
    assert SkimFilter(text_only=text_only).wants(opcode, 1) is wanted


def test_filter_size_limit_is_inclusive() -> None:
    skim = SkimFilter(max_size=64)
    assert skim.wants(OP_TEXT, 64)
    assert not skim.wants(OP_TEXT, 65)
    assert skim.wants(OP_TEXT, 0)


def test_filter_directions_and_copy() -> None:
    skim = SkimFilter(directions=("up",))
    assert skim.taps("up")
    assert not skim.taps("down")
    both = SkimFilter(sample_every=5, directions=("up", "down"), text_only=False)
    assert both.taps("up")
    assert both.taps("down")
    assert both.wants(OP_TEXT, 1)
    assert not both.wants(OP_TEXT, 1)
    fresh = both.copy()
    assert fresh.wants(OP_BINARY, 1)  # a fresh count: its first eligible frame is wanted
    assert (fresh.max_size, fresh.sample_every, fresh.directions, fresh.text_only) == (
        4096,
        5,
        ("up", "down"),
        False,
    )
    assert "sample_every=5" in repr(fresh)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_size": 0},
        {"sample_every": 0},
        {"sample_every": 1.5},
        {"directions": ()},
        {"directions": ("sideways",)},
        {"directions": ("up", "up")},
        {"directions": "up"},
    ],
)
def test_filter_rejects_bad_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SkimFilter(**kwargs)


@given(
    every=st.integers(min_value=1, max_value=300),
    sizes=st.lists(st.integers(min_value=0, max_value=200), max_size=400),
)
def test_filter_sampling_count(every: int, sizes: list[int]) -> None:
    skim = SkimFilter(max_size=100, sample_every=every)
    wanted = [skim.wants(OP_TEXT, size) for size in sizes]
    eligible = [size <= 100 for size in sizes]
    assert sum(wanted) == math.ceil(sum(eligible) / every)
    assert all(e for w, e in zip(wanted, eligible, strict=True) if w)


# ------------------------------------------------------------------------------------------------
# Movement: every recognised format
# ------------------------------------------------------------------------------------------------

MOVES: list[tuple[str, object, Vector, Vector | None]] = [
    # the seed's example, verbatim
    ("seed example", {"client": "move", "x": 123, "y": 456}, (123.0, 456.0, 0.0), None),
    ("client top-level xyz", {"client": "move", "x": 1, "y": 2, "z": 3}, (1.0, 2.0, 3.0), None),
    ("type move xy", {"type": "move", "x": 1.5, "y": -2}, (1.5, -2.0, 0.0), None),
    ("action move xyz", {"action": "move", "x": 0, "y": 0, "z": -7.25}, (0.0, 0.0, -7.25), None),
    ("type position xy", {"type": "position", "x": 10, "y": 20}, (10.0, 20.0, 0.0), None),
    ("position object", {"type": "move", "position": {"x": 1, "y": 2, "z": 3}}, (1.0, 2.0, 3.0), None),
    ("position object no z", {"client": "move", "position": {"x": 1, "y": 2}}, (1.0, 2.0, 0.0), None),
    ("pos array 2", {"action": "move", "pos": [4, 5]}, (4.0, 5.0, 0.0), None),
    ("pos array 3", {"type": "position", "pos": [4, 5.5, 6]}, (4.0, 5.5, 6.0), None),
    ("coords object", {"type": "move", "coords": {"x": -1, "y": -2, "z": -3}}, (-1.0, -2.0, -3.0), None),
    ("coords object no z", {"action": "move", "coords": {"x": 9, "y": 8}}, (9.0, 8.0, 0.0), None),
    (
        "seed with velocity",
        {"type": "move", "x": 1, "y": 2, "velocity": {"x": 0.5, "y": 0, "z": 0}},
        (1.0, 2.0, 0.0),
        (0.5, 0.0, 0.0),
    ),
    (
        "extra fields ignored",
        {"type": "move", "id": 7, "client": {"name": "bob"}, "data": "x", "x": 1, "y": 2, "seq": [1, 2]},
        (1.0, 2.0, 0.0),
        None,
    ),
    (
        "horizon gorc_event",
        {
            "type": "gorc_event",
            "object_id": "obj-1",
            "channel": 0,
            "event": "move",
            "player_id": "p-1",
            "data": {
                "player_id": "p-1",
                "new_position": {"x": 100.5, "y": -20.0, "z": 3.0},
                "velocity": {"x": 1.0, "y": 0.5, "z": 0.0},
                "movement_state": "walking",
                "client_timestamp": 1700000000123,
            },
        },
        (100.5, -20.0, 3.0),
        (1.0, 0.5, 0.0),
    ),
    (
        "horizon gorc_event without velocity",
        {"type": "gorc_event", "event": "move", "data": {"new_position": {"x": 1, "y": 2, "z": 3}}},
        (1.0, 2.0, 3.0),
        None,
    ),
    (
        "horizon move_request",
        {
            "namespace": "movement",
            "event": "move_request",
            "data": {"target_x": 1, "target_y": 2, "target_z": 3},
        },
        (1.0, 2.0, 3.0),
        None,
    ),
    (
        "horizon move_request no z",
        {"namespace": "movement", "event": "move_request", "data": {"target_x": 1.25, "target_y": 2}},
        (1.25, 2.0, 0.0),
        None,
    ),
]


@pytest.mark.parametrize(
    ("message", "position", "velocity"), [m[1:] for m in MOVES], ids=[m[0] for m in MOVES]
)
def test_movement_formats_are_recognised(message: object, position: Vector, velocity: Vector | None) -> None:
    assert parse_movement(encode(message)) == (position, velocity)


def test_movement_with_whitespace_and_key_order() -> None:
    payload = b'{\n  "y" : 2 ,\n  "x" : 1e2 ,\n  "client" : "move"\n}'
    assert parse_movement(payload) == ((100.0, 2.0, 0.0), None)


finite = st.floats(allow_nan=False, allow_infinity=False) | st.integers(min_value=-(10**18), max_value=10**18)


def _vec(x: float, y: float, z: float | None) -> dict[str, float]:
    return {"x": x, "y": y} | ({} if z is None else {"z": z})


SEED_SHAPES = ("xyz", "position", "pos", "coords")


def _seed_message(
    discriminator: tuple[str, str], shape: str, x: float, y: float, z: float | None
) -> dict[str, Any]:
    key, value = discriminator
    message: dict[str, Any] = {key: value}
    if shape == "xyz":
        message |= _vec(x, y, z)
    elif shape == "pos":
        message["pos"] = [x, y] if z is None else [x, y, z]
    else:
        message[shape] = _vec(x, y, z)
    return message


@given(
    discriminator=st.sampled_from(
        [("client", "move"), ("type", "move"), ("action", "move"), ("type", "position")]
    ),
    shape=st.sampled_from(SEED_SHAPES),
    x=finite,
    y=finite,
    z=st.none() | finite,
)
def test_seed_formats_with_any_numbers(
    discriminator: tuple[str, str], shape: str, x: float, y: float, z: float | None
) -> None:
    message = _seed_message(discriminator, shape, x, y, z)
    assert parse_movement(encode(message)) == ((float(x), float(y), 0.0 if z is None else float(z)), None)


@given(position=st.tuples(finite, finite, finite), velocity=st.none() | st.tuples(finite, finite, finite))
def test_horizon_formats_with_any_numbers(
    position: tuple[float, float, float], velocity: tuple[float, float, float] | None
) -> None:
    expected = (tuple(map(float, position)), None if velocity is None else tuple(map(float, velocity)))
    data: dict[str, Any] = {"player_id": "p", "new_position": _vec(*position), "movement_state": 0}
    if velocity is not None:
        data["velocity"] = _vec(*velocity)
    gorc = {
        "type": "gorc_event",
        "object_id": "o",
        "channel": 0,
        "event": "move",
        "player_id": "p",
        "data": data,
    }
    assert parse_movement(encode(gorc)) == expected
    x, y, z = position
    older = {
        "namespace": "movement",
        "event": "move_request",
        "data": {"target_x": x, "target_y": y, "target_z": z},
    }
    assert parse_movement(encode(older)) == (expected[0], None)


# ------------------------------------------------------------------------------------------------
# Movement: look-alikes
# ------------------------------------------------------------------------------------------------

LOOK_ALIKES: list[tuple[str, bytes]] = [
    ("type moved", encode({"type": "moved", "x": 1, "y": 2})),
    ("client moved", encode({"client": "moved", "x": 1, "y": 2})),
    ("action Move (case)", encode({"action": "Move", "x": 1, "y": 2})),
    ("type move without coordinates", encode({"type": "move"})),
    ("client move without coordinates", encode({"client": "move", "speed": 3})),
    ("x without y", encode({"type": "move", "x": 1})),
    ("string coordinates", encode({"type": "move", "x": "1", "y": "2"})),
    ("one string coordinate", encode({"client": "move", "x": 1, "y": "2"})),
    ("string z", encode({"client": "move", "x": 1, "y": 2, "z": "3"})),
    ("null coordinates", encode({"type": "move", "x": None, "y": None})),
    ("boolean coordinates", encode({"type": "move", "x": True, "y": False})),
    ("object coordinates", encode({"type": "move", "x": {"value": 1}, "y": {"value": 2}})),
    ("position of strings", encode({"type": "move", "position": {"x": "1", "y": "2"}})),
    ("position of booleans", encode({"type": "move", "position": {"x": True, "y": 1}})),
    ("position as array", encode({"type": "move", "position": [1, 2]})),
    ("pos of strings", encode({"type": "move", "pos": ["1", "2"]})),
    ("pos too short", encode({"type": "move", "pos": [1]})),
    ("pos too long", encode({"type": "move", "pos": [1, 2, 3, 4]})),
    ("pos as object", encode({"type": "move", "pos": {"x": 1, "y": 2}})),
    ("coords without y", encode({"type": "move", "coords": {"x": 1}})),
    ("chat with x and y", encode({"type": "chat", "x": 1, "y": 2})),
    ("type decides over client", encode({"type": "chat", "client": "move", "x": 1, "y": 2})),
    ("nested move in chat", encode({"type": "chat", "message": {"type": "move", "x": 1, "y": 2}})),
    ("nested move in data", encode({"type": "state", "data": {"client": "move", "x": 1, "y": 2}})),
    ("nested move without outer type", encode({"player": {"type": "move", "x": 1, "y": 2}})),
    ("no discriminator", encode({"x": 1, "y": 2, "z": 3})),
    ("array of moves", encode([{"type": "move", "x": 1, "y": 2}])),
    (
        "gorc_event of another event",
        encode({"type": "gorc_event", "event": "chat", "data": {"new_position": _vec(1, 2, 3)}}),
    ),
    (
        "gorc_event move without position",
        encode({"type": "gorc_event", "event": "move", "data": {"velocity": _vec(1, 2, 3)}}),
    ),
    (
        "gorc_event move with string position",
        encode(
            {"type": "gorc_event", "event": "move", "data": {"new_position": {"x": "1", "y": "2", "z": "3"}}}
        ),
    ),
    (
        "gorc_event move with data not an object",
        encode({"type": "gorc_event", "event": "move", "data": [1, 2, 3]}),
    ),
    (
        "gorc_event move with position at top",
        encode({"type": "gorc_event", "event": "move", "new_position": _vec(1, 2, 3)}),
    ),
    (
        "move_request in another namespace",
        encode({"namespace": "chat", "event": "move_request", "data": {"target_x": 1, "target_y": 2}}),
    ),
    (
        "movement namespace, other event",
        encode({"namespace": "movement", "event": "move", "data": {"target_x": 1, "target_y": 2}}),
    ),
    (
        "move_request without namespace",
        encode({"event": "move_request", "data": {"target_x": 1, "target_y": 2}}),
    ),
    (
        "move_request without target_y",
        encode({"namespace": "movement", "event": "move_request", "data": {"target_x": 1}}),
    ),
    (
        "move_request with string targets",
        encode(
            {"namespace": "movement", "event": "move_request", "data": {"target_x": "1", "target_y": "2"}}
        ),
    ),
    ("number out of range", b'{"type":"move","x":1e999,"y":2}'),
    ("NaN", b'{"type":"move","x":NaN,"y":2}'),
    ("not JSON", b"type=move x=1 y=2"),
    ("truncated JSON", b'{"type":"move","x":1,"y":2'),
    ("trailing garbage", b'{"type":"move","x":1,"y":2} extra'),
    ("empty", b""),
    ("invalid UTF-8 in the type", b'{"type":"mov\xff","x":1,"y":2}'),
    ("invalid UTF-8 in a key", b'{"type":"move","\xff":1,"x":1,"y":2'),
    ("a number", b"42"),
    ("a string", b'"move"'),
]


@pytest.mark.parametrize("payload", [m[1] for m in LOOK_ALIKES], ids=[m[0] for m in LOOK_ALIKES])
def test_look_alikes_are_not_movement(payload: bytes) -> None:
    assert parse_movement(payload) is None


def test_utf8_is_checked_only_where_the_parser_reads() -> None:
    # Unread fields are skipped, not decoded: the relay, not the parser, validates every text message.
    assert parse_movement(b'{"type":"move","x":1,"y":2,"name":"\xff"}') == ((1.0, 2.0, 0.0), None)
    assert parse_movement(b'{"type":"mov\xff","x":1,"y":2}', [MovementPath(("p",))]) is None
    assert parse_event(b'{"type":"chat","message":"\xff"}') is None  # the whole message is decoded


# ------------------------------------------------------------------------------------------------
# Movement: configured paths
# ------------------------------------------------------------------------------------------------


def test_configured_path_to_an_object_or_an_array() -> None:
    path = MovementPath(("payload", "player", "pos"))
    assert parse_movement(encode({"payload": {"player": {"pos": {"x": 1, "y": 2, "z": 3}}}}), [path]) == (
        (1.0, 2.0, 3.0),
        None,
    )
    assert parse_movement(encode({"payload": {"player": {"pos": [1, 2]}}}), [path]) == ((1.0, 2.0, 0.0), None)
    # not configured: not recognised
    assert parse_movement(encode({"payload": {"player": {"pos": [1, 2]}}})) is None


def test_configured_path_with_a_match_and_a_velocity() -> None:
    path = MovementPath.from_options(
        {"position": "body.at", "velocity": ["body", "vel"], "match": ["op"], "equals": "update"}
    )
    assert path == MovementPath(("body", "at"), velocity=("body", "vel"), match=("op",), equals="update")
    good = {"op": "update", "body": {"at": [1, 2, 3], "vel": {"x": 1, "y": 1}}}
    assert parse_movement(encode(good), [path]) == ((1.0, 2.0, 3.0), (1.0, 1.0, 0.0))
    assert parse_movement(encode(good | {"op": "chat"}), [path]) is None
    assert parse_movement(encode({k: v for k, v in good.items() if k != "op"}), [path]) is None
    no_velocity = {"op": "update", "body": {"at": [1, 2]}}
    assert parse_movement(encode(no_velocity), [path]) == ((1.0, 2.0, 0.0), None)
    bad_velocity = {"op": "update", "body": {"at": [1, 2], "vel": "fast"}}
    assert parse_movement(encode(bad_velocity), [path]) is None


def test_configured_path_with_indices_and_integer_match() -> None:
    path = MovementPath(("d", 1, "p"), match=("op",), equals=3)
    assert parse_movement(encode({"op": 3, "d": [{}, {"p": [5, 6]}]}), [path]) == ((5.0, 6.0, 0.0), None)
    assert (
        parse_movement(encode({"op": "3", "d": [{}, {"p": [5, 6]}]}), [path]) is None
    )  # compared with its type
    assert (
        parse_movement(
            encode({"op": True, "d": [{}, {"p": [5, 6]}]}),
            [MovementPath(("d", 1, "p"), match=("op",), equals=1)],
        )
        is None
    )
    assert parse_movement(encode({"op": 3, "d": [{}]}), [path]) is None
    assert parse_movement(encode({"op": 3, "d": {"1": {"p": [5, 6]}}}), [path]) is None


def test_configured_paths_apply_where_builtins_do_not() -> None:
    path = MovementPath(("p",))
    # a message the built-in decoder rejects (a string "x") can still match a path
    assert parse_movement(encode({"x": "left", "p": [1, 2]}), [path]) == ((1.0, 2.0, 0.0), None)
    # built-in formats win
    assert parse_movement(encode({"type": "move", "x": 7, "y": 8, "p": [1, 2]}), [path]) == (
        (7.0, 8.0, 0.0),
        None,
    )
    # the paths rules are the same: numbers only
    for bad in ([1, "2"], [True, 2], {"x": 1}, {"x": 1, "y": None}, [1, 2, 3, 4], "1,2", None):
        assert parse_movement(encode({"p": bad}), [path]) is None
    assert parse_movement(b"not json", [path]) is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, "missing key 'position'"),
        ({"position": []}, "position path must not be empty"),
        ({"position": ["a"], "equals": "x"}, "'match' and 'equals' go together"),
        ({"position": ["a"], "match": ["t"]}, "'match' and 'equals' go together"),
        ({"position": ["a"], "positon": ["b"]}, "unknown key 'positon'"),
        ({"position": [1.5]}, "a JSON path step is a string key or an integer index"),
        ({"position": ["a", True]}, "a JSON path step is a string key or an integer index"),
        ({"position": 5}, "a JSON path is a list"),
        ({"position": ["a", ""]}, "empty key"),
        ({"position": ["a"], "match": ["t"], "equals": 1.5}, "equals must be a string or an integer"),
    ],
)
def test_movement_path_errors(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MovementPath.from_options(raw)


# ------------------------------------------------------------------------------------------------
# Movement: robustness
# ------------------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | finite | st.text(max_size=8)
interesting_keys = st.sampled_from(
    [
        "type", "client", "action", "namespace", "event", "x", "y", "z", "position", "pos", "coords",
        "velocity", "data", "new_position", "target_x", "target_y", "target_z", "p",
    ]
)  # fmt: skip
interesting_values = st.sampled_from(["move", "position", "gorc_event", "move_request", "movement", "chat"])
json_values = st.recursive(
    json_scalars | interesting_values,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(interesting_keys | st.text(max_size=4), children, max_size=6)
    ),
    max_leaves=30,
)


def _check_result(result: object) -> None:
    if result is None:
        return
    assert isinstance(result, tuple)
    position, velocity = result
    for vector in (position,) if velocity is None else (position, velocity):
        assert len(vector) == 3
        assert all(type(v) is float and math.isfinite(v) for v in vector)


PATHS = (MovementPath(("data", "p")), MovementPath(("p",), velocity=("v",), match=("type",), equals="move"))


@given(value=json_values)
def test_random_json_never_crashes_the_parser(value: object) -> None:
    payload = encode(value)
    _check_result(parse_movement(payload))
    _check_result(parse_movement(payload, PATHS))
    event = parse_event(payload)
    assert event is None or (event[0] in EVENT_KINDS and isinstance(event[1], dict))


@given(payload=st.binary(max_size=200))
def test_random_bytes_never_crash_the_parser(payload: bytes) -> None:
    _check_result(parse_movement(payload, PATHS))
    parse_event(payload)


# ------------------------------------------------------------------------------------------------
# Game events
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ({"type": "connect", "name": "bob"}, "connect"),
        ({"type": "join", "room": "lobby"}, "join"),
        ({"type": "leave", "room": "lobby"}, "leave"),
        ({"type": "chat", "message": "hello"}, "chat"),
        ({"type": "error", "code": 42, "message": "bad move"}, "error"),
        ({"action": "join", "room": "r"}, "join"),
        ({"client": "chat", "message": "hi"}, "chat"),
        ({"type": "chat", "x": 1, "y": 2}, "chat"),
    ],
)
def test_game_events_are_recognised(message: dict[str, Any], kind: str) -> None:
    assert parse_event(encode(message)) == (kind, message)


@pytest.mark.parametrize(
    "payload",
    [
        encode({"type": "chatting", "message": "hi"}),
        encode({"type": "move", "x": 1, "y": 2}),
        encode({"type": "Chat"}),
        encode({"message": {"type": "chat"}}),
        encode({"type": ["chat"]}),
        encode({"type": "state", "action": "join"}),  # type decides
        encode([{"type": "chat"}]),
        b"chat: hello",
        b"",
    ],
)
def test_not_game_events(payload: bytes) -> None:
    assert parse_event(payload) is None


def _event_alone(payload: bytes) -> tuple[str, dict[str, Any]] | None:
    """`parse_event` with no decode of the movement parser to share (another payload was decoded last)."""
    parse_movement(b'{"type":"other"}')
    return parse_event(payload)


def _event_after_movement(payload: bytes) -> tuple[str, dict[str, Any]] | None:
    """`parse_event` right after the movement parser decoded the same payload, as the analyzers do."""
    parse_movement(payload)
    return parse_event(payload)


SHARED_DECODE_CASES = [
    encode({"type": "join", "room": "lobby"}),
    encode({"type": "chat", "x": "1", "y": 2}),  # not the movement parser's shape
    encode({"action": "leave", "pos": [1, 2, 3, 4]}),
    encode({"client": "chat", "namespace": 7, "data": [1]}),
    encode({"type": "move", "x": 1, "y": 2}),
    b'{"type":"error","z":1e999}',
    b'{"type":"chat","event":"\\ud800"}',
    b'{"type":"chat"',
    b"\xff",
]


@pytest.mark.parametrize("payload", SHARED_DECODE_CASES)
def test_parse_event_reads_the_shared_decode_the_same(payload: bytes) -> None:
    assert _event_after_movement(payload) == _event_alone(payload)


@given(value=json_values)
def test_parse_event_reads_the_shared_decode_the_same_on_random_json(value: object) -> None:
    payload = encode(value)
    assert _event_after_movement(payload) == _event_alone(payload)


@given(
    value=st.dictionaries(
        st.sampled_from(["type", "action", "client", "namespace", "event", "x", "y", "pos", "data"]),
        json_values | st.sampled_from(["join", "leave", "chat", "error", "connect"]),
    )
)
def test_parse_event_reads_the_shared_decode_the_same_on_random_messages(value: object) -> None:
    payload = encode(value)
    assert _event_after_movement(payload) == _event_alone(payload)


def test_the_shared_decode_is_by_identity_and_only_of_bytes() -> None:
    payload = bytearray(b'{"type":"move","x":1,"y":2}')
    assert parse_movement(payload) == ((1.0, 2.0, 0.0), None)  # type: ignore[arg-type]
    payload[9:13] = b"chat"  # the same object, another message: decoded again
    assert parse_movement(payload) is None  # type: ignore[arg-type]
    assert parse_event(bytes(payload)) == ("chat", {"type": "chat", "x": 1, "y": 2})
    first, second = b'{"type":"move","x":1,"y":2}', b'{"type":"move","x":3,"y":4}'
    assert parse_movement(first) == ((1.0, 2.0, 0.0), None)
    assert parse_movement(second) == ((3.0, 4.0, 0.0), None)
    assert parse_movement(first) == ((1.0, 2.0, 0.0), None)


@pytest.fixture
def skim_log() -> Iterator[list[logging.LogRecord]]:
    """Every record of the ``atlas.skim`` logger, at DEBUG (independent of other tests' logging setup)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("atlas.skim")
    handler = Keep(logging.DEBUG)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


async def _run_analyzer(analyzer: Analyzer, frames: list[SkimFrame]) -> list[SkimEvent]:
    """Feed ``frames`` to ``analyzer`` and return what it emitted once the channel ended."""
    events: list[SkimEvent] = []
    send, receive = trio.open_memory_channel[SkimFrame](len(frames) + 1)
    for each in frames:
        send.send_nowait(each)
    send.close()
    with trio.fail_after(5):
        await analyzer.run(receive, events.append)
    return events


async def test_event_analyzer_logs_in_the_seeds_style(skim_log: list[logging.LogRecord]) -> None:
    frames = [
        frame('{"client":"move","x":123,"y":456}', time=1.0),
        frame('{"type":"join","room":"lobby"}', time=2.0),
        frame('{"type":"chat","message":"hi"}', time=3.0),
        frame('{"type":"error","code":7}', client="c-2", direction="down", time=4.0),
        frame('{"type":"leave"}', time=5.0),
        frame('{"type":"ping"}', time=6.0),
        frame(encode({"type": "chat", "message": "hi"}), opcode=OP_BINARY),  # binary: ignored
    ]
    analyzer = EventAnalyzer()
    events = await _run_analyzer(analyzer, frames)
    lines = [(r.levelno, r.getMessage(), r.client, r.event) for r in skim_log]  # type: ignore[attr-defined]
    assert lines == [
        (logging.DEBUG, 'Client c-1 movement detected: {"client":"move","x":123,"y":456}', "c-1", "movement"),
        (logging.INFO, 'Client c-1 join detected: {"type":"join","room":"lobby"}', "c-1", "join"),
        (logging.DEBUG, 'Client c-1 chat detected: {"type":"chat","message":"hi"}', "c-1", "chat"),
        (
            logging.WARNING,
            'Server game-1 to client c-2 error detected: {"type":"error","code":7}',
            "c-2",
            "error",
        ),
        (logging.INFO, 'Client c-1 leave detected: {"type":"leave"}', "c-1", "leave"),
    ]
    assert all(r.server == "game-1" for r in skim_log)  # type: ignore[attr-defined]
    assert events == [
        GameEvent(
            client_id="c-1", backend="game-1", time=2.0, kind="join", detail={"type": "join", "room": "lobby"}
        ),
        GameEvent(
            client_id="c-1", backend="game-1", time=3.0, kind="chat", detail={"type": "chat", "message": "hi"}
        ),
        GameEvent(
            client_id="c-2", backend="game-1", time=4.0, kind="error", detail={"type": "error", "code": 7}
        ),
        GameEvent(client_id="c-1", backend="game-1", time=5.0, kind="leave", detail={"type": "leave"}),
    ]
    assert (analyzer.frames, analyzer.recognised) == (7, 5)


async def test_event_analyzer_keeps_routine_traffic_below_info(skim_log: list[logging.LogRecord]) -> None:
    logging.getLogger("atlas.skim").setLevel(logging.INFO)
    frames = [frame('{"type":"chat","message":"hi"}'), frame('{"type":"move","x":1,"y":2}')] * 50
    events = await _run_analyzer(EventAnalyzer(), frames)
    assert skim_log == []
    assert len(events) == 50  # chat is still emitted


async def test_event_analyzer_escapes_and_truncates_payloads(skim_log: list[logging.LogRecord]) -> None:
    payload = '{"type":"chat",\n"message":"' + "x" * 50 + '"}'
    await _run_analyzer(EventAnalyzer(max_log_chars=30, kinds=["chat"]), [frame(payload)])
    (record,) = skim_log
    assert record.getMessage() == 'Client c-1 chat detected: {"type":"chat",\\n"message":"xxx…'
    assert "\n" not in record.getMessage()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": ""},
        {"kinds": ["dance"]},
        {"kinds": "chat"},
        {"max_log_chars": 0},
        {"paths": [{"position": 1}]},
    ],
)
def test_event_analyzer_options_are_checked(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        EventAnalyzer(**kwargs)


# ------------------------------------------------------------------------------------------------
# The movement analyzer
# ------------------------------------------------------------------------------------------------


async def test_movement_analyzer_emits_movements_from_client_text_frames() -> None:
    analyzer = MovementAnalyzer(paths=[{"position": ["payload", "player", "pos"]}])
    frames = [
        frame('{"client":"move","x":123,"y":456}', time=1.0),
        frame('{"type":"move","x":1,"y":2}', direction="down"),  # server to client: not this client
        frame('{"type":"move","x":1,"y":2}', opcode=OP_BINARY),  # binary frame
        frame('{"type":"chat","x":1,"y":2}'),
        frame('{"payload":{"player":{"pos":[1,2,3]}}}', client="c-9", backend="game-2", time=2.0),
    ]
    events = await _run_analyzer(analyzer, frames)
    assert events == [
        Movement(client_id="c-1", backend="game-1", time=1.0, position=(123.0, 456.0, 0.0)),
        Movement(client_id="c-9", backend="game-2", time=2.0, position=(1.0, 2.0, 3.0), velocity=None),
    ]
    assert (analyzer.frames, analyzer.recognised) == (5, 2)


def test_movement_analyzer_parses_only_while_movements_are_wanted() -> None:
    analyzer = MovementAnalyzer()
    wanted = False
    analyzer.wanted = lambda: wanted
    emitted: list[SkimEvent] = []
    move = frame('{"type":"move","x":1,"y":2}')
    analyzer.feed(move, emitted.append)
    assert (analyzer.frames, analyzer.recognised, emitted) == (1, 0, [])  # counted, not parsed
    wanted = True
    analyzer.feed(move, emitted.append)
    assert (analyzer.frames, analyzer.recognised, len(emitted)) == (2, 1, 1)


async def test_atlas_wants_movements_only_with_a_predictor_and_a_region() -> None:
    def movement_wanted(config: Config) -> bool:
        analyzers = analyzers_for(Runtime.from_config(config))
        (analyzer,) = [a for a in analyzers if isinstance(a, MovementAnalyzer)]
        assert analyzer.wanted is not None
        return analyzer.wanted()

    assert not movement_wanted(Config())  # the default: a predictor, but no region
    one_region = WorldConfig(regions=(RegionConfig(id="r", owner="s", min=(0, 0, 0), max=(1, 1, 1)),))
    assert movement_wanted(Config(world=one_region))
    assert not movement_wanted(Config(world=one_region, predictor=PredictorConfig(enabled=False)))


def test_movement_analyzer_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"paths\[1\]: missing key 'position'"):
        MovementAnalyzer(paths=[{"position": ["a"]}, {"velocity": ["b"]}])
    with pytest.raises(ValueError):
        MovementAnalyzer(name="")
    with pytest.raises(ValueError):
        MovementAnalyzer(paths={"position": ["a"]})  # type: ignore[dict-item]
    assert MovementAnalyzer(name="m2", paths=[MovementPath(("p",))]).paths == (MovementPath(("p",)),)


def test_events_are_frozen() -> None:
    event = Movement(client_id="c", backend="b", time=0.0, position=(1.0, 2.0, 3.0))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        event.position = (0.0, 0.0, 0.0)  # type: ignore[misc]
    assert isinstance(event, SkimEvent)


# ------------------------------------------------------------------------------------------------
# Loading analyzers
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A package ``skim_plugins_test`` with a few good and bad analyzers; yields its name."""
    package = tmp_path / "skim_plugins_test"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "good.py").write_text(
        textwrap.dedent(
            """
            class Counter:
                def __init__(self, *, name="counter", every=1):
                    if every < 1:
                        raise ValueError("every must be at least 1")
                    self.name = name
                    self.every = every

                async def run(self, frames, emit):
                    async for _ in frames:
                        pass

            def make(**options):
                return Counter(**options)

            class NoRun:
                name = "norun"

            class SyncRun:
                name = "syncrun"

                def run(self, frames, emit):
                    pass

            class NoName:
                async def run(self, frames, emit):
                    pass

            class AsyncFeed(Counter):
                async def feed(self, frame, emit):
                    pass

            class NotCallableFeed(Counter):
                feed = 3

            NOT_CALLABLE = 3
            """
        )
    )
    (package / "broken.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "skim_plugins_test"
    for name in [m for m in sys.modules if m.startswith("skim_plugins_test")]:
        del sys.modules[name]


def test_load_a_plugin_with_options(plugins: str) -> None:
    analyzer = load_analyzer(f"{plugins}.good:Counter", {"name": "c2", "every": 3})
    assert analyzer.name == "c2"
    assert isinstance(analyzer, Analyzer)
    assert load_analyzer(f"{plugins}.good:make", {}).name == "counter"


def test_load_the_builtins() -> None:
    movement = load_analyzer("atlas.skim:MovementAnalyzer", {"paths": [{"position": ["p"]}]})
    assert isinstance(movement, MovementAnalyzer)
    assert movement.paths == (MovementPath(("p",)),)
    assert isinstance(load_analyzer("atlas.skim:EventAnalyzer"), EventAnalyzer)


NOT_OF_THE_FORM = "is not of the form 'package.module:ClassName'"
NO_ASYNC_RUN = "did not give an analyzer: it has no 'async def run(frames, emit)' method"
NO_SYNC_FEED = (
    "did not give an analyzer: its 'feed' is not a plain (synchronous) method 'def feed(frame, emit)'"
)
LOAD_ERRORS: list[tuple[str, dict[str, object], str]] = [
    ("x.y:Z", {}, "path: cannot import 'x.y:Z': No module named 'x'"),
    ("{p}.good", {}, f"path: '{{p}}.good' {NOT_OF_THE_FORM}"),
    ("{p}.good:", {}, f"path: '{{p}}.good:' {NOT_OF_THE_FORM}"),
    ("{p}/good:Counter", {}, f"path: '{{p}}/good:Counter' {NOT_OF_THE_FORM}"),
    ("{p}.nothere:Counter", {}, "path: cannot import '{p}.nothere:Counter': No module named '{p}.nothere'"),
    ("{p}.broken:Counter", {}, "path: cannot import '{p}.broken:Counter': RuntimeError: boom at import"),
    ("{p}.good:Missing", {}, "path: cannot import '{p}.good:Missing': '{p}.good' has no attribute 'Missing'"),
    (
        "{p}.good:Counter.x",
        {},
        "path: cannot import '{p}.good:Counter.x': '{p}.good.Counter' has no attribute 'x'",
    ),
    ("{p}.good:NOT_CALLABLE", {}, "path: '{p}.good:NOT_CALLABLE' is not a class or a factory function"),
    (
        "{p}.good:Counter",
        {"evry": 2},
        "options: {p}.good:Counter: Counter.__init__() got an unexpected keyword argument 'evry'",
    ),
    ("{p}.good:Counter", {"every": 0}, "options: {p}.good:Counter: every must be at least 1"),
    ("{p}.good:Counter", {"not valid": 0}, "options: not a valid option name: 'not valid'"),
    ("{p}.good:NoRun", {}, f"path: '{{p}}.good:NoRun' {NO_ASYNC_RUN}"),
    ("{p}.good:SyncRun", {}, f"path: '{{p}}.good:SyncRun' {NO_ASYNC_RUN}"),
    (
        "{p}.good:NoName",
        {},
        "path: '{p}.good:NoName' did not give an analyzer: its 'name' is not a non-empty string",
    ),
    ("{p}.good:AsyncFeed", {}, f"path: '{{p}}.good:AsyncFeed' {NO_SYNC_FEED}"),
    ("{p}.good:NotCallableFeed", {}, f"path: '{{p}}.good:NotCallableFeed' {NO_SYNC_FEED}"),
    (
        "atlas.skim:MovementAnalyzer",
        {"paths": [{"positon": ["p"]}]},
        "options: atlas.skim:MovementAnalyzer: paths[0]: unknown key 'positon' "
        "(expected position, velocity, match, equals)",
    ),
]


@pytest.mark.parametrize(("path", "options", "error"), LOAD_ERRORS)
def test_load_analyzer_errors(plugins: str, path: str, options: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_analyzer(path.format(p=plugins), options, where="analyzers[0]")
    assert caught.value.errors == ("analyzers[0]." + error.format(p=plugins),)


def test_load_analyzers_reports_every_problem(plugins: str) -> None:
    entries = [
        ("atlas.skim:MovementAnalyzer", None),
        ("x.y:Z", {}),
        ("atlas.skim:MovementAnalyzer", {}),
        ("atlas.skim:MovementAnalyzer", {"name": "movement-2"}),
        (f"{plugins}.good:Counter", {"every": 0}),
    ]
    with pytest.raises(ConfigError) as caught:
        load_analyzers(entries)
    assert caught.value.errors == (
        "analyzers[1].path: cannot import 'x.y:Z': No module named 'x'",
        "analyzers[2].options: analyzer name 'movement' is already used by analyzers[0]; "
        "give it another 'name' option",
        f"analyzers[4].options: {plugins}.good:Counter: every must be at least 1",
    )
    good = load_analyzers(
        [("atlas.skim:MovementAnalyzer", None), ("atlas.skim:EventAnalyzer", {"kinds": ["chat"]})]
    )
    assert [a.name for a in good] == ["movement", "events"]


# ------------------------------------------------------------------------------------------------
# The dispatcher
# ------------------------------------------------------------------------------------------------


# Tests that step the fan-out batch by batch with wait_all_tasks_blocked() hand each batch on at
# once: with the default pause between batches, the next one would wait for the (real) clock.
NOW = 0.0


class Stuck:
    """An analyzer that never reads its channel."""

    name = "stuck"

    async def run(self, frames: trio.MemoryReceiveChannel[SkimFrame], emit: EventSink) -> None:
        await trio.sleep_forever()


class Collect:
    """An analyzer that keeps every frame and emits one event per frame."""

    def __init__(self, name: str = "collect") -> None:
        self.name = name
        self.frames: list[SkimFrame] = []

    async def run(self, frames: trio.MemoryReceiveChannel[SkimFrame], emit: EventSink) -> None:
        async for each in frames:
            self.frames.append(each)
            emit(GameEvent(client_id=each.client_id, backend=each.backend, time=each.time, kind="seen"))


class Feed(Collect):
    """`Collect` with the synchronous fast path: the dispatcher calls ``feed`` and never starts ``run``."""

    def __init__(self, name: str = "feed") -> None:
        super().__init__(name)
        self.ran = False

    async def run(self, frames: trio.MemoryReceiveChannel[SkimFrame], emit: EventSink) -> None:
        self.ran = True
        await super().run(frames, emit)

    def feed(self, frame: SkimFrame, emit: EventSink) -> None:
        self.frames.append(frame)
        emit(GameEvent(client_id=frame.client_id, backend=frame.backend, time=frame.time, kind="fed"))


class Crash:
    """An analyzer that fails on its first frame."""

    name = "crash"

    async def run(self, frames: trio.MemoryReceiveChannel[SkimFrame], emit: EventSink) -> None:
        async for _ in frames:
            raise RuntimeError("analyzer bug")


class Quit:
    """An analyzer that returns at once."""

    name = "quit"

    async def run(self, frames: trio.MemoryReceiveChannel[SkimFrame], emit: EventSink) -> None:
        return


def _analyzer(stats: DispatcherStatistics, name: str) -> Any:
    (found,) = [each for each in stats.analyzers if each.name == name]
    return found


async def test_a_stuck_analyzer_never_blocks_the_relay_or_the_others(nursery: trio.Nursery) -> None:
    dispatcher = Dispatcher(size=8, analyzer_buffer=4, batch_interval=NOW)
    collect = Collect()
    await nursery.start(dispatcher.serve, [Stuck(), collect])
    # A "relay" offering one frame per checkpoint: the fan-out keeps up, the stuck analyzer's
    # channel fills after 4 frames and every later frame is dropped for it alone.
    with trio.fail_after(5):
        for i in range(1000):
            assert dispatcher.offer(frame(f"{i}", time=float(i)))
            await trio.testing.wait_all_tasks_blocked()
    stats = dispatcher.statistics()
    assert [f.payload for f in collect.frames] == [f"{i}".encode() for i in range(1000)]
    assert (stats.offered, stats.dropped_input, stats.delivered, stats.queued) == (1000, 0, 1000, 0)
    assert stats.dropped_per_analyzer == {"stuck": 996, "collect": 0}
    stuck = _analyzer(stats, "stuck")
    assert (stuck.delivered, stuck.dropped, stuck.queued, stuck.state) == (4, 996, 4, AnalyzerState.RUNNING)
    assert _analyzer(stats, "collect").delivered == 1000
    assert stats.events == 1000  # no sink: counted and discarded


async def test_a_full_input_queue_drops_and_counts_without_waiting(nursery: trio.Nursery) -> None:
    dispatcher = Dispatcher(size=4, analyzer_buffer=2)
    fed = Feed()
    await nursery.start(dispatcher.serve, [Stuck(), fed])
    await trio.testing.wait_all_tasks_blocked()  # the fan-out waits for a frame
    # A burst with no checkpoint in between (offer itself never is one): 4 fill the input queue
    # (the first wakes the fan-out, which cannot run yet), the rest are dropped.
    results = [dispatcher.offer(frame(f"{i}")) for i in range(10)]
    assert results == [True] * 4 + [False] * 6
    stats = dispatcher.statistics()
    assert (stats.offered, stats.dropped_input, stats.delivered, stats.queued) == (10, 6, 0, 4)
    await trio.testing.wait_all_tasks_blocked()
    stats = dispatcher.statistics()
    assert (stats.delivered, stats.queued) == (4, 0)
    assert stats.dropped_per_analyzer == {"stuck": 2, "feed": 0}
    assert [f.payload for f in fed.frames] == [f"{i}".encode() for i in range(4)]
    # and it recovers: the next offer is taken again
    assert dispatcher.offer(frame("again"))


async def test_the_fan_out_takes_a_burst_in_slices_of_32(nursery: trio.Nursery) -> None:
    dispatcher = Dispatcher(size=200, analyzer_buffer=200)
    fed, collect = Feed(), Collect()
    await nursery.start(dispatcher.serve, [fed, collect])
    await trio.testing.wait_all_tasks_blocked()
    seen: list[int] = []

    async def watch() -> None:
        """Another task: it runs between the fan-out's slices, never in the middle of one."""
        while len(fed.frames) < 100:
            seen.append(len(fed.frames))
            await trio.lowlevel.checkpoint()

    for i in range(100):
        dispatcher.offer(frame(f"{i}"))
    async with trio.open_nursery() as watching:
        watching.start_soon(watch)
    assert {n for n in seen if n} <= {32, 64, 96}  # whole slices, no checkpoint per frame
    assert {n for n in seen if n}  # and another task ran between them
    stats = dispatcher.statistics()
    assert (stats.delivered, stats.queued) == (100, 0)
    assert _analyzer(stats, "collect").delivered == 100
    await trio.testing.wait_all_tasks_blocked()
    assert [f.payload for f in collect.frames] == [f.payload for f in fed.frames]


async def test_a_feed_analyzer_is_called_instead_of_run(nursery: trio.Nursery) -> None:
    events: list[SkimEvent] = []
    dispatcher = Dispatcher(on_event=events.append)
    fed = Feed()
    await nursery.start(dispatcher.serve, [fed, Crash()])
    for i in range(3):
        dispatcher.offer(frame(str(i), time=float(i)))
    await trio.testing.wait_all_tasks_blocked()
    assert not fed.ran
    assert [e.time for e in events] == [0.0, 1.0, 2.0]
    assert {e.kind for e in events} == {"fed"}  # type: ignore[attr-defined]
    feed_stats = _analyzer(dispatcher.statistics(), "feed")
    assert (feed_stats.delivered, feed_stats.dropped, feed_stats.queued) == (3, 0, 0)
    assert feed_stats.state is AnalyzerState.RUNNING


class CrashFeed:
    """A feed analyzer that fails on its second frame."""

    name = "crash-feed"

    def __init__(self) -> None:
        self.seen = 0

    async def run(self, frames: trio.MemoryReceiveChannel[SkimFrame], emit: EventSink) -> None:
        raise AssertionError("run is not used when there is a feed")

    def feed(self, frame: SkimFrame, emit: EventSink) -> None:
        self.seen += 1
        if self.seen == 2:
            raise RuntimeError("analyzer bug")


async def test_a_failing_feed_analyzer_stops_alone(
    nursery: trio.Nursery, skim_log: list[logging.LogRecord]
) -> None:
    dispatcher = Dispatcher()
    crash, fed = CrashFeed(), Feed()
    await nursery.start(dispatcher.serve, [crash, fed])
    for i in range(4):
        dispatcher.offer(frame(str(i)))
    await trio.testing.wait_all_tasks_blocked()
    stats = dispatcher.statistics()
    assert crash.seen == 2
    assert (_analyzer(stats, "crash-feed").state, _analyzer(stats, "crash-feed").delivered) == (
        AnalyzerState.FAILED,
        2,
    )
    assert len(fed.frames) == 4  # the frame it failed on still reached the next analyzer
    assert [r.getMessage() for r in skim_log if r.levelno == logging.ERROR] == [
        "skim analyzer crash-feed failed; it gets no more frames"
    ]


async def test_an_async_feed_is_refused() -> None:
    class AsyncFeed(Collect):
        async def feed(self, frame: SkimFrame, emit: EventSink) -> None:
            pass

    with pytest.raises(ValueError, match="'collect': its 'feed' is not a plain"):
        await Dispatcher().serve([AsyncFeed()])


async def test_offer_never_checkpoints() -> None:
    # offer is synchronous: a tight loop of offers into a full channel is not a checkpoint, so
    # no other task runs in between (and nothing can make it wait).
    dispatcher = Dispatcher(size=2)
    ran = False

    async def other() -> None:
        nonlocal ran
        ran = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        outcomes = [dispatcher.offer(frame("x")) for _ in range(10_000)]
        assert not ran
    assert outcomes.count(True) == 2
    assert dispatcher.statistics().dropped_input == 9_998


async def test_frames_offered_before_serve_wait_in_the_input(nursery: trio.Nursery) -> None:
    dispatcher = Dispatcher(size=3)
    assert [dispatcher.offer(frame(str(i))) for i in range(5)] == [True, True, True, False, False]
    collect = Collect()
    await nursery.start(dispatcher.serve, [collect])
    await trio.testing.wait_all_tasks_blocked()
    assert [f.payload for f in collect.frames] == [b"0", b"1", b"2"]


async def test_a_failing_analyzer_stops_alone(
    nursery: trio.Nursery, skim_log: list[logging.LogRecord]
) -> None:
    dispatcher = Dispatcher(batch_interval=NOW)
    collect = Collect()
    await nursery.start(dispatcher.serve, [Crash(), collect, Quit()])
    for i in range(3):
        dispatcher.offer(frame(str(i)))
        await trio.testing.wait_all_tasks_blocked()
    stats = dispatcher.statistics()
    assert _analyzer(stats, "crash").state is AnalyzerState.FAILED
    assert _analyzer(stats, "crash").delivered == 1
    assert _analyzer(stats, "quit").state is AnalyzerState.FINISHED
    assert _analyzer(stats, "quit").delivered == 0
    assert _analyzer(stats, "collect").state is AnalyzerState.RUNNING
    assert len(collect.frames) == 3
    failed = [r for r in skim_log if r.levelno == logging.ERROR]
    assert len(failed) == 1
    assert failed[0].getMessage() == "skim analyzer crash failed; it gets no more frames"
    assert failed[0].exc_info is not None


async def test_events_reach_the_sink_and_never_block(
    nursery: trio.Nursery, skim_log: list[logging.LogRecord]
) -> None:
    send, receive = trio.open_memory_channel[SkimEvent](2)
    dispatcher = Dispatcher(on_event=send.send_nowait, batch_interval=NOW)
    await nursery.start(dispatcher.serve, [Collect()])
    for i in range(5):
        dispatcher.offer(frame(str(i)))
        await trio.testing.wait_all_tasks_blocked()
    stats = dispatcher.statistics()
    assert (stats.events, stats.events_dropped, stats.event_errors) == (5, 3, 0)
    assert [receive.receive_nowait().time for _ in range(2)] == [0.0, 0.0]

    def broken(event: SkimEvent) -> None:
        raise ValueError("predictor bug")

    dispatcher.on_event = broken
    for i in range(3):
        dispatcher.offer(frame(str(i)))
        await trio.testing.wait_all_tasks_blocked()
    stats = dispatcher.statistics()
    assert (stats.events, stats.event_errors) == (8, 3)
    assert _analyzer(stats, "collect").state is AnalyzerState.RUNNING  # the analyzer did not die
    assert [r.getMessage() for r in skim_log if r.levelno == logging.ERROR] == [
        "skim event sink failed; further failures are only counted"
    ]


async def test_subscribe_gets_only_its_clients_frames(nursery: trio.Nursery) -> None:
    dispatcher = Dispatcher(tap_buffer=3, batch_interval=NOW)
    await nursery.start(dispatcher.serve, [Stuck()])
    assert not dispatcher.is_tapped("c-1")
    with dispatcher.subscribe("c-1") as tap, dispatcher.subscribe("c-2", size=10) as other:
        assert dispatcher.is_tapped("c-1")
        assert dispatcher.statistics().subscribers == 2
        for i in range(4):
            dispatcher.offer(frame(f"one-{i}", client="c-1"))
            dispatcher.offer(frame(f"two-{i}", client="c-2"))
            dispatcher.offer(frame(f"three-{i}", client="c-3"))
        await trio.testing.wait_all_tasks_blocked()
        got = [tap.receive_nowait().payload for _ in range(3)]
        assert got == [b"one-0", b"one-1", b"one-2"]  # one-3 did not fit in the tap's 3 slots
        with pytest.raises(trio.WouldBlock):
            tap.receive_nowait()
        assert [other.receive_nowait().client_id for _ in range(4)] == ["c-2"] * 4
        stats = dispatcher.statistics()
        assert (stats.tap_delivered, stats.tap_dropped) == (7, 1)
        # the client's session ends: its tap reads the end of the channel
        dispatcher.offer(frame("last", client="c-1"))
        await trio.testing.wait_all_tasks_blocked()
        dispatcher.close_client("c-1")
        assert not dispatcher.is_tapped("c-1")
        assert tap.receive_nowait().payload == b"last"
        with pytest.raises(trio.EndOfChannel):
            tap.receive_nowait()
    assert dispatcher.statistics().subscribers == 0
    assert not dispatcher.is_tapped("c-2")
    dispatcher.offer(frame("after", client="c-2"))
    await trio.testing.wait_all_tasks_blocked()
    assert dispatcher.statistics().tap_delivered == 8  # nobody is subscribed any more


async def test_two_subscribers_of_one_client_and_a_reader_that_left(nursery: trio.Nursery) -> None:
    dispatcher = Dispatcher()
    await nursery.start(dispatcher.serve, [])
    with dispatcher.subscribe("c-1") as first:
        with dispatcher.subscribe("c-1") as second:
            second.close()  # the reader went away without leaving the with block
            dispatcher.offer(frame("x"))
            await trio.testing.wait_all_tasks_blocked()
            assert first.receive_nowait().payload == b"x"
        assert dispatcher.is_tapped("c-1")
    assert not dispatcher.is_tapped("c-1")


async def test_serve_checks_names_and_runs_once_at_a_time(nursery: trio.Nursery) -> None:
    dispatcher = Dispatcher()
    with pytest.raises(ValueError, match="'collect' is used 2 times"):
        await dispatcher.serve([Collect(), Collect()])
    scope = trio.CancelScope()

    async def serve(task_status: trio.TaskStatus[None]) -> None:
        with scope:
            await dispatcher.serve([Collect()], task_status=task_status)

    await nursery.start(serve)
    with pytest.raises(RuntimeError, match="already serving"):
        await dispatcher.serve([])
    scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    assert _analyzer(dispatcher.statistics(), "collect").state is AnalyzerState.STOPPED
    # it may serve again
    collect = Collect("again")
    await nursery.start(dispatcher.serve, [collect])
    dispatcher.offer(frame("x"))
    await trio.testing.wait_all_tasks_blocked()
    assert len(collect.frames) == 1


async def test_the_fan_out_pauses_between_batches_while_frames_keep_coming(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    dispatcher = Dispatcher(size=8)
    assert dispatcher.batch_interval == 0.01
    fed = Feed()
    await nursery.start(dispatcher.serve, [fed])
    await trio.testing.wait_all_tasks_blocked()
    dispatcher.offer(frame("0"))  # the first frame after a quiet spell goes at once
    await trio.testing.wait_all_tasks_blocked()
    assert len(fed.frames) == 1
    start = trio.current_time()
    dispatcher.offer(frame("1"))  # within the pause: they wait for it to end, and go together
    dispatcher.offer(frame("2"))
    await trio.testing.wait_all_tasks_blocked()
    assert len(fed.frames) == 1
    assert dispatcher.statistics().queued == 2
    await trio.sleep(0.015)
    await trio.testing.wait_all_tasks_blocked()
    assert [f.payload for f in fed.frames] == [b"0", b"1", b"2"]
    assert trio.current_time() - start < 0.02
    # A pause ends early once half the queue is used: nothing is dropped for waiting.
    for i in range(3, 7):
        dispatcher.offer(frame(str(i)))
    await trio.testing.wait_all_tasks_blocked()
    assert len(fed.frames) == 7
    assert dispatcher.statistics().dropped_input == 0
    await trio.sleep(1.0)  # quiet: the fan-out parks, and the next frame goes at once again
    dispatcher.offer(frame("7"))
    await trio.testing.wait_all_tasks_blocked()
    assert len(fed.frames) == 8


async def test_an_offer_during_a_batch_goes_in_the_next_one(nursery: trio.Nursery) -> None:
    dispatcher = Dispatcher(batch_interval=NOW)

    class Echo(Feed):
        def feed(self, frame: SkimFrame, emit: EventSink) -> None:
            super().feed(frame, emit)
            if frame.payload == b"ping":
                dispatcher.offer(msgspec.structs.replace(frame, payload=b"pong"))

    echo = Echo()
    await nursery.start(dispatcher.serve, [echo])
    dispatcher.offer(frame("ping"))
    await trio.testing.wait_all_tasks_blocked()
    assert [f.payload for f in echo.frames] == [b"ping", b"pong"]


def test_dispatcher_settings_and_frozen_statistics() -> None:
    with pytest.raises(ValueError):
        Dispatcher(0)
    for interval in (-0.1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="batch_interval"):
            Dispatcher(batch_interval=interval)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Dispatcher(analyzer_buffer=0)
    with pytest.raises(ValueError):
        Dispatcher(tap_buffer=-1)
    stats = Dispatcher().statistics()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.offered = 5  # type: ignore[misc]
    assert stats.dropped_per_analyzer == {}


async def test_builtin_analyzers_behind_the_dispatcher(nursery: trio.Nursery) -> None:
    events: list[SkimEvent] = []
    dispatcher = Dispatcher(on_event=events.append)
    analyzers = load_analyzers([("atlas.skim:MovementAnalyzer", None), ("atlas.skim:EventAnalyzer", None)])
    await nursery.start(dispatcher.serve, analyzers)
    dispatcher.offer(frame('{"type":"join","room":"a"}', time=1.0))
    dispatcher.offer(frame('{"type":"move","pos":[1,2,3]}', time=2.0))
    await trio.testing.wait_all_tasks_blocked()
    assert sorted(events, key=lambda e: e.time) == [
        GameEvent(
            client_id="c-1", backend="game-1", time=1.0, kind="join", detail={"type": "join", "room": "a"}
        ),
        Movement(client_id="c-1", backend="game-1", time=2.0, position=(1.0, 2.0, 3.0)),
    ]


# ------------------------------------------------------------------------------------------------
# The region service's intake (atlas.control.regions): movement events straight to the predictor
# ------------------------------------------------------------------------------------------------


class FakeTransfers:
    """Records what the region service asks of the transfer coordinator."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def prepare(self, client_id: str, target: str, reason: object, ttl: float) -> None:
        self.calls.append(("prepare", client_id, target))

    def request(self, client_id: str, target: str, reason: object) -> Any:
        self.calls.append(("request", client_id, target))
        return SimpleNamespace(done=trio.Event())

    def cancel_prepared(self, client_id: str, target: str | None = None) -> bool:
        self.calls.append(("cancel", client_id, target or ""))
        return True


def _region_service(
    world: WorldMap, clients: tuple[str, ...] = ("c-1",)
) -> tuple[RegionService, FakeTransfers]:
    link = SimpleNamespace(backend=SimpleNamespace(name="a"))
    sessions = {client: SimpleNamespace(client_id=client, link=link) for client in clients}
    registry = SimpleNamespace(get=sessions.get, __iter__=None)
    runtime = SimpleNamespace(
        world=world, clients=registry, config=SimpleNamespace(predictor=SimpleNamespace(prepare_ttl=3.0))
    )
    transfers = FakeTransfers()
    predictor = Predictor(world, PredictorSettings(lookahead=0.5, margin=5.0, min_interval=0.0))
    return RegionService(runtime, predictor, transfers), transfers  # type: ignore[arg-type]


def _two_regions() -> WorldMap:
    """``a`` owns x < 0, ``b`` owns x >= 0 (within 1000 units)."""
    world = WorldMap()
    world.add("west", Box(Vec3(-1000.0, -1000.0, -1000.0), Vec3(0.0, 1000.0, 1000.0)), "a")
    world.add("east", Box(Vec3(0.0, -1000.0, -1000.0), Vec3(1000.0, 1000.0, 1000.0)), "b")
    return world


def _move(x: float, t: float, client: str = "c-1") -> Movement:
    return Movement(client_id=client, backend="a", time=t, position=(x, 0.0, 0.0), velocity=(10.0, 0.0, 0.0))


def test_the_region_service_does_nothing_without_regions() -> None:
    service, transfers = _region_service(WorldMap())
    for i in range(10):
        service.offer(_move(float(i), float(i)))
    service.offer(GameEvent(client_id="c-1", backend="a", time=1.0, kind="chat"))
    stats = service.predictor.statistics()
    assert (stats.clients, stats.observations) == (0, 0)
    assert transfers.calls == []


async def test_the_region_service_observes_at_once_and_acts_in_its_task(nursery: trio.Nursery) -> None:
    service, transfers = _region_service(_two_regions(), clients=("c-1", "c-2"))
    shadow = Predictor(_two_regions(), service.predictor.settings)  # what the predictor decides
    assert shadow.moved("c-1", "a") == []
    await nursery.start(service.serve)
    service.offer(_move(-100.0, 1.0))
    service.offer(_move(-50.0, 2.0, client="gone"))  # no such session: ignored
    service.offer(GameEvent(client_id="c-1", backend="a", time=2.0, kind="chat"))
    # A plain call: the predictor has the movement before anything else runs.
    assert service.predictor.statistics().observations == 1
    assert service.predictor.client("gone") is None
    expected: list[tuple[str, str, str]] = []
    for step in range(1, 40):
        x, t = -100.0 + 8.0 * step, 1.0 + 0.5 * step
        service.offer(_move(x, t))
        for decision in shadow.observe("c-1", Vec3(x, 0.0, 0.0), Vec3(10.0, 0.0, 0.0), t):
            kind = {Prepare: "prepare", Transfer: "request", CancelPrepare: "cancel"}[type(decision)]
            expected.append((kind, "c-1", decision.target_backend))
    assert ("request", "c-1", "b") in expected
    assert transfers.calls == []  # the decisions wait for serve
    await trio.testing.wait_all_tasks_blocked()
    assert transfers.calls == expected


async def test_the_region_service_starts_afresh_when_the_last_region_goes(nursery: trio.Nursery) -> None:
    world = _two_regions()
    service, _ = _region_service(world)
    await nursery.start(service.serve)
    service.offer(_move(-500.0, 1.0))
    assert service.predictor.client("c-1") is not None
    world.remove("west")
    world.remove("east")
    service.offer(_move(-400.0, 2.0))
    assert service.predictor.client("c-1") is None  # forgotten, not fed a stale motion later
    world.add("west", Box(Vec3(-1000.0, -1000.0, -1000.0), Vec3(0.0, 1000.0, 1000.0)), "a")
    service.offer(_move(-300.0, 3.0))
    assert service.predictor.statistics().observations == 2


def test_the_region_service_drops_decisions_it_cannot_queue() -> None:
    clients = tuple(f"c-{i}" for i in range(regions._DECISION_BUFFER + 10))
    service, transfers = _region_service(_two_regions(), clients)
    for client in clients:  # serve is not running: each crossing queues one Transfer
        service.offer(_move(-100.0, 1.0, client=client))
        service.offer(_move(100.0, 2.0, client=client))
    assert service.decisions_dropped == 10
    assert transfers.calls == []
    # the predictor was told that the last client is still where it was, so it asks again
    snapshot = service.predictor.client(clients[-1])
    assert snapshot is not None
    assert service.predictor.observe(clients[-1], Vec3(110.0, 0.0, 0.0), None, 3.0) != []


# ------------------------------------------------------------------------------------------------
# The live tap's wire form
# ------------------------------------------------------------------------------------------------


def test_frame_to_sse() -> None:
    text = frame_to_sse(frame('{"a":"line\\nbreak"}\n', time=1.5))
    assert text.startswith(b"event: up\ndata: ")
    assert text.endswith(b"\n\n")
    assert text.count(b"\n") == 3  # a newline in the payload cannot end the event
    body = json.loads(text.split(b"data: ", 1)[1])
    assert body == {
        "client": "c-1",
        "backend": "game-1",
        "direction": "up",
        "opcode": 1,
        "time": 1.5,
        "size": 20,
        "text": '{"a":"line\\nbreak"}\n',
    }
    binary = frame_to_sse(frame(b"\x00\xff", direction="down", opcode=OP_BINARY))
    assert binary.startswith(b"event: down\n")
    assert json.loads(binary.split(b"data: ", 1)[1])["base64"] == "AP8="
    invalid = frame_to_sse(frame(b"\xff"))
    assert json.loads(invalid.split(b"data: ", 1)[1])["text"] == "\ufffd"


# ------------------------------------------------------------------------------------------------
# docs/skimming.md: its examples work as written
# ------------------------------------------------------------------------------------------------

DOC = Path(__file__).parent.parent / "docs" / "skimming.md"


def _doc_blocks(language: str) -> list[str]:
    import re

    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.S)


async def test_the_documented_plugin_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (source,) = [block for block in _doc_blocks("python") if "class TeleportDetector" in block]
    package = tmp_path / "mygame"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "teleport.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ConfigError, match=r"analyzers\[2\].options: .* max_jump must be positive"):
            load_analyzer("mygame.teleport:TeleportDetector", {"max_jump": 0}, where="analyzers[2]")
        detector = load_analyzer("mygame.teleport:TeleportDetector", {"max_jump": 80.0})
        events = await _run_analyzer(
            detector,
            [
                frame('{"type":"move","x":0,"y":0}', time=1.0),
                frame('{"type":"move","x":10,"y":0}', time=2.0),
                frame('{"type":"move","x":110,"y":0}', time=3.0),
            ],
        )
        (teleport,) = events
        assert (teleport.client_id, teleport.time, teleport.distance) == ("c-1", 3.0, 100.0)  # type: ignore[attr-defined]
        # behind the dispatcher, after the built-in movement analyzer: its feed is called directly
        fed: list[SkimEvent] = []
        dispatcher = Dispatcher(on_event=fed.append)
        detector = load_analyzer("mygame.teleport:TeleportDetector", {"max_jump": 80.0})
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.serve, [MovementAnalyzer(), detector])
            for x, t in ((0, 1.0), (10, 2.0), (110, 3.0)):
                dispatcher.offer(frame(encode({"type": "move", "x": x, "y": 0}), time=t))
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert [type(e).__name__ for e in fed] == ["Movement", "Movement", "Movement", "Teleport"]
        assert _analyzer(dispatcher.statistics(), "teleport").queued == 0  # no channel: fed directly
    finally:
        for name in [m for m in sys.modules if m == "mygame" or m.startswith("mygame.")]:
            del sys.modules[name]


def test_the_documented_configuration_loads() -> None:
    import tomllib

    for block in _doc_blocks("toml"):
        entries = [(each["path"], each.get("options")) for each in tomllib.loads(block).get("analyzers", [])]
        entries = [entry for entry in entries if not entry[0].startswith("mygame.")]
        assert load_analyzers(entries)
    skim = tomllib.loads(next(b for b in _doc_blocks("toml") if "[skim]" in b))["skim"]
    skim_filter = SkimFilter(skim["max_size"], skim["sample_every"], skim["directions"], skim["text_only"])
    assert skim_filter.taps("up")
    Dispatcher(skim["buffer"], analyzer_buffer=skim["analyzer_buffer"], tap_buffer=skim["tap_buffer"])
    paths = next(b for b in _doc_blocks("toml") if "options.paths" in b)
    (movement,) = load_analyzers(
        [(each["path"], each.get("options")) for each in tomllib.loads(paths)["analyzers"]]
    )
    assert isinstance(movement, MovementAnalyzer)
    update = {"op": "player_update", "payload": {"player": {"pos": [1, 2, 3], "vel": {"x": 0, "y": 1}}}}
    assert parse_movement(encode(update), movement.paths) == ((1.0, 2.0, 3.0), (0.0, 1.0, 0.0))
    assert parse_movement(b'{"t":7,"p":{"x":1,"y":2}}', movement.paths) == ((1.0, 2.0, 0.0), None)
    assert parse_movement(b'{"t":"7","p":{"x":1,"y":2}}', movement.paths) is None


def test_the_documented_formats_and_log_lines() -> None:
    (examples,) = [block for block in _doc_blocks("json") if '"client":"move"' in block]
    for line in examples.splitlines():
        assert parse_movement(line.encode()) is not None, line
