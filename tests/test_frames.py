"""Tests for the sans-IO frame codec: FrameScanner, build_frame/build_close/parse_close, unmask.

wsproto serves as an independent reference implementation: frames Atlas builds must parse in wsproto
to the same messages, and frames wsproto builds must pass through a scanner untouched.
"""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Pong, TextMessage
from wsproto.frame_protocol import FrameProtocol, Opcode

from atlas.proxy.frames import (
    DEFAULT_STREAM_THRESHOLD,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    CloseCode,
    FrameError,
    FrameScanner,
    ScanState,
    build_close,
    build_frame,
    parse_close,
    unmask,
)

BIG = 1 << 24  # a max_message_size no test message reaches

# -- building test traffic -------------------------------------------------------------------------


class Frame(NamedTuple):
    """One frame to put on the wire."""

    opcode: int
    payload: bytes
    fin: bool = True


class Message(NamedTuple):
    """One data message and the frames that carry it (control frames interleaved)."""

    text: bool
    payload: bytes
    frames: tuple[Frame, ...]


# An item the reference parser yields: ("text", str), ("binary", bytes), ("ping"/"pong", bytes).
Item = tuple[str, str | bytes]

_ALPHABET = ("a", "Z", " ", "~", "é", "ж", "€", "한", "𝄞", "😀")


def make_text(size: int, seed: int) -> str:
    """A string whose UTF-8 encoding is exactly ``size`` bytes, mixing 1- to 4-byte characters."""
    rng = random.Random(seed)
    parts: list[str] = []
    used = 0
    block = min(size, 1500)
    while used < block:
        ch = rng.choice(_ALPHABET)
        width = len(ch.encode("utf-8"))
        if used + width > block:
            ch, width = "a", 1
        parts.append(ch)
        used += width
    text = "".join(parts)
    if size > block:
        repeats, rest = divmod(size, block)
        text = text * repeats + "b" * rest
    assert len(text.encode("utf-8")) == size
    return text


SIZES = st.one_of(
    st.sampled_from([0, 1, 2, 125, 126, 127, 65535, 65536, 70000]),
    st.integers(min_value=0, max_value=400),
)

control_frames = st.builds(
    Frame,
    st.sampled_from([OP_PING, OP_PONG]),
    st.binary(max_size=125),
    fin=st.just(True),
)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    """A text or binary message, split into random fragments with control frames in between."""
    text = draw(st.booleans())
    size = draw(SIZES)
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    payload = make_text(size, seed).encode("utf-8") if text else random.Random(seed).randbytes(size)
    # Fragment boundaries anywhere, including inside multi-byte characters and empty fragments.
    cuts = sorted(draw(st.lists(st.integers(min_value=0, max_value=size), max_size=4)))
    bounds = [0, *cuts, size]
    pieces = [payload[a:b] for a, b in itertools.pairwise(bounds)]
    frames: list[Frame] = []
    for i, piece in enumerate(pieces):
        if i:
            frames.extend(draw(st.lists(control_frames, max_size=2)))
        opcode = (OP_TEXT if text else OP_BINARY) if i == 0 else OP_CONTINUATION
        frames.append(Frame(opcode, piece, fin=i == len(pieces) - 1))
    return Message(text, payload, tuple(frames))


traffic = st.lists(
    st.one_of(messages(), st.builds(lambda f: Message(False, b"", (f,)), control_frames)),
    max_size=6,
)


def is_data(message: Message) -> bool:
    return any(frame.opcode < 0x8 for frame in message.frames)


def encode(frames: Iterable[Frame], *, mask: bool) -> list[bytes]:
    return [build_frame(f.opcode, f.payload, mask=mask, fin=f.fin) for f in frames]


def expected_items(traffic: Sequence[Message]) -> list[Item]:
    """What a reference parser yields for ``traffic``, in order (a message when its last frame arrives)."""
    items: list[Item] = []
    for message in traffic:
        for frame in message.frames:
            if frame.opcode == OP_PING:
                items.append(("ping", frame.payload))
            elif frame.opcode == OP_PONG:
                items.append(("pong", frame.payload))
            elif frame.fin:
                if message.text:
                    items.append(("text", message.payload.decode("utf-8")))
                else:
                    items.append(("binary", message.payload))
    return items


def wsproto_items(data: bytes, *, masked: bool) -> list[Item]:
    """Parse ``data`` with wsproto's frame protocol, reassembling messages."""
    proto = FrameProtocol(client=not masked, extensions=[])
    proto.receive_bytes(data)
    items: list[Item] = []
    parts: list[str | bytes] = []
    for frame in proto.received_frames():
        payload = frame.payload
        if frame.opcode is Opcode.PING or frame.opcode is Opcode.PONG:
            assert isinstance(payload, bytes | bytearray)
            items.append((frame.opcode.name.lower(), bytes(payload)))
            continue
        assert frame.opcode is not Opcode.CLOSE, "no close frame was sent"
        assert not isinstance(payload, tuple)
        parts.append(payload if isinstance(payload, str) else bytes(payload))
        if frame.message_finished:
            if isinstance(payload, str):
                items.append(("text", "".join(p for p in parts if isinstance(p, str))))
            else:
                items.append(("binary", b"".join(p for p in parts if isinstance(p, bytes))))
            parts.clear()
    return items


def frame_starts(frames: Sequence[bytes]) -> list[int]:
    starts = [0]
    for frame in frames:
        starts.append(starts[-1] + len(frame))
    return starts


@st.composite
def chunk_cuts(draw: st.DrawFn, frames: Sequence[bytes]) -> list[int]:
    """Cut points for feeding ``frames``: anywhere, and densely around frame headers and mask keys."""
    starts = frame_starts(frames)
    total = starts[-1]
    near_headers = sorted({min(start + k, total) for start in starts for k in range(15)})
    cut = st.one_of(st.integers(min_value=0, max_value=total), st.sampled_from(near_headers))
    return sorted(set(draw(st.lists(cut, max_size=12))))


def chunks(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def feed_all(scanner: FrameScanner, pieces: Iterable[bytes]) -> bytes:
    return b"".join(scanner.feed(piece) for piece in pieces)


def feed_checked(scanner: FrameScanner, data: bytes, cuts: Sequence[int], boundaries: set[int]) -> bytes:
    """Feed ``data`` in pieces, checking the forwarding contract after every ``feed``."""
    out = bytearray()
    fed = 0
    for piece in chunks(data, cuts):
        out += scanner.feed(piece)
        fed += len(piece)
        assert scanner.state is ScanState.OPEN
        # Every byte received is either forwarded or held back, never both, never lost.
        assert len(out) + scanner.buffered == fed
        assert data.startswith(out)
        if scanner.at_frame_boundary:
            # Only complete frames were forwarded: Atlas may inject a frame here.
            assert len(out) in boundaries
    return bytes(out)


def scanner_for(masked: bool, *, max_message_size: int = BIG, threshold: int | None = None) -> FrameScanner:
    if threshold is None:
        return FrameScanner(masked=masked, max_message_size=max_message_size)
    return FrameScanner(masked=masked, max_message_size=max_message_size, stream_threshold=threshold)


# -- round trips -----------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    traffic=traffic,
    masked=st.booleans(),
    threshold=st.sampled_from([DEFAULT_STREAM_THRESHOLD, 1, 8, 130]),
    data=st.data(),
)
def test_round_trip_forwards_every_byte_and_counts_messages(
    traffic: list[Message], masked: bool, threshold: int, data: st.DataObject
) -> None:
    frames = [frame for message in traffic for frame in encode(message.frames, mask=masked)]
    wire = b"".join(frames)
    cuts = data.draw(chunk_cuts(frames), label="cuts")
    scanner = scanner_for(masked, threshold=threshold)

    out = feed_checked(scanner, wire, cuts, set(frame_starts(frames)))

    assert out == wire
    assert scanner.messages == sum(1 for message in traffic if is_data(message))
    assert scanner.state is ScanState.OPEN
    assert scanner.at_boundary
    assert scanner.buffered == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traffic=traffic, masked=st.booleans())
def test_build_frame_output_parses_in_wsproto_to_the_same_messages(
    traffic: list[Message], masked: bool
) -> None:
    wire = b"".join(frame for message in traffic for frame in encode(message.frames, mask=masked))
    assert wsproto_items(wire, masked=masked) == expected_items(traffic)


@st.composite
def wsproto_events(draw: st.DrawFn) -> list[Event]:
    """Messages (possibly fragmented, fragments split at character boundaries) and pings/pongs."""
    events: list[Event] = []
    for _ in range(draw(st.integers(min_value=0, max_value=5))):
        kind = draw(st.sampled_from(["text", "binary", "ping", "pong"]))
        if kind in ("ping", "pong"):
            payload = draw(st.binary(max_size=125))
            events.append(Ping(payload) if kind == "ping" else Pong(payload))
            continue
        size = draw(SIZES)
        seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
        value: str | bytes = make_text(size, seed) if kind == "text" else random.Random(seed).randbytes(size)
        cuts = sorted(draw(st.lists(st.integers(min_value=0, max_value=len(value)), max_size=3)))
        bounds = [0, *cuts, len(value)]
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            last = i == len(bounds) - 2
            if isinstance(value, str):
                events.append(TextMessage(data=value[a:b], message_finished=last))
            else:
                events.append(BytesMessage(data=value[a:b], message_finished=last))
    return events


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=wsproto_events(), client=st.booleans(), data=st.data())
def test_wsproto_frames_pass_through_a_scanner_untouched(
    events: list[Event], client: bool, data: st.DataObject
) -> None:
    conn = Connection(ConnectionType.CLIENT if client else ConnectionType.SERVER)
    frames = [conn.send(event) for event in events]
    wire = b"".join(frames)
    cuts = data.draw(chunk_cuts(frames), label="cuts")
    scanner = scanner_for(masked=client)

    out = feed_checked(scanner, wire, cuts, set(frame_starts(frames)))

    assert out == wire
    finished = sum(1 for e in events if isinstance(e, TextMessage | BytesMessage) and e.message_finished)
    assert scanner.messages == finished
    assert scanner.at_boundary


@pytest.mark.parametrize("split", range(1, 20))
def test_large_masked_text_frame_split_anywhere_in_its_header_is_accepted(split: int) -> None:
    # A streamed frame (over the threshold) whose masking key arrives in two pieces: the key must
    # be complete before any of the payload is unmasked for the UTF-8 check.
    payload = make_text(70000, 7).encode("utf-8")
    frame = build_frame(OP_TEXT, payload, mask=True)
    after = build_frame(OP_TEXT, b"ok", mask=True)
    scanner = scanner_for(masked=True)

    out = scanner.feed(frame[:split]) + scanner.feed(frame[split:] + after)

    assert scanner.error is None
    assert scanner.state is ScanState.OPEN
    assert out == frame + after
    assert scanner.messages == 2


@pytest.mark.parametrize("split", range(1, 14))
def test_streamed_frame_header_is_never_forwarded_in_part(split: int) -> None:
    # The forwarding contract: never a partial header, so a Close can be injected at the boundary.
    frame = build_frame(OP_BINARY, bytes(70000), mask=True)
    scanner = scanner_for(masked=True)

    first = scanner.feed(frame[:split])

    assert first == (b"" if split < 14 else frame[:split])
    assert first + scanner.feed(frame[split:]) == frame
    assert scanner.messages == 1


# -- garbage ---------------------------------------------------------------------------------------


@st.composite
def frame_like(draw: st.DrawFn) -> bytes:
    """Bytes shaped like a frame header (random bits) followed by some payload."""
    b0 = draw(st.integers(min_value=0, max_value=255))
    masked = draw(st.booleans())
    length = draw(st.one_of(st.integers(min_value=0, max_value=140), st.sampled_from([126, 127])))
    out = bytearray([b0, (0x80 if masked else 0) | min(length, 127)])
    if length == 126:
        out += struct.pack("!H", draw(st.integers(min_value=0, max_value=300)))
    elif length == 127:
        out += struct.pack("!Q", draw(st.integers(min_value=0, max_value=2**64 - 1)))
    if masked:
        out += draw(st.binary(min_size=4, max_size=4))
    out += draw(st.binary(max_size=160))
    return bytes(out)


garbage = st.one_of(
    st.binary(max_size=600),
    st.lists(frame_like(), max_size=6).map(b"".join),
)


@settings(max_examples=400, deadline=None)
@given(
    data=garbage,
    masked=st.booleans(),
    max_message_size=st.integers(min_value=0, max_value=2**20),
    threshold=st.sampled_from([DEFAULT_STREAM_THRESHOLD, 1, 16]),
    cut_points=st.lists(st.integers(min_value=0, max_value=600), max_size=10),
)
def test_garbage_never_raises_and_forwards_a_prefix(
    data: bytes, masked: bool, max_message_size: int, threshold: int, cut_points: list[int]
) -> None:
    scanner = scanner_for(masked, max_message_size=max_message_size, threshold=threshold)
    cuts = sorted({c for c in cut_points if c <= len(data)})
    out = b""
    for piece in chunks(data, cuts):
        got = scanner.feed(piece)
        if scanner.state is not ScanState.OPEN:
            assert scanner.feed(piece) == b""
        out += got

    assert data.startswith(out)
    if scanner.state is ScanState.FAILED:
        assert scanner.error is not None
        assert scanner.error.code in {1002, 1007, 1009}
    elif scanner.state is ScanState.CLOSED:
        assert scanner.error is None
        # The Close frame is the last thing forwarded.
        assert 2 <= scanner.close_frame_size <= len(out)
        assert out[-scanner.close_frame_size] & 0x0F == OP_CLOSE
    else:
        assert scanner.state is ScanState.OPEN
        assert scanner.error is None


# -- violations ------------------------------------------------------------------------------------


def good_frames(mask: bool) -> bytes:
    """Some valid traffic to put before a bad frame."""
    return (
        build_frame(OP_TEXT, "héllo €".encode(), mask=mask)
        + build_frame(OP_PING, b"p", mask=mask)
        + build_frame(OP_BINARY, bytes(range(256)) * 2, mask=mask, fin=False)
        + build_frame(OP_PONG, b"", mask=mask)
        + build_frame(OP_CONTINUATION, b"end", mask=mask)
    )


def assert_fails_after(
    prefix: bytes, bad: bytes, code: int, *, masked: bool, max_message_size: int = BIG
) -> None:
    """Feed ``prefix + bad + more`` in every two-way split and byte by byte: exactly ``prefix`` passes."""
    suffix = build_frame(OP_TEXT, b"after", mask=masked)
    data = prefix + bad + suffix
    feedings = [[data], [bytes([b]) for b in data]]
    feedings += [[data[:i], data[i:]] for i in range(1, len(data))]
    for pieces in feedings:
        scanner = scanner_for(masked, max_message_size=max_message_size)
        out = feed_all(scanner, pieces)
        assert out == prefix, pieces
        assert scanner.state is ScanState.FAILED
        assert scanner.error is not None
        assert scanner.error.code == code
        assert scanner.feed(suffix) == b""


@pytest.mark.parametrize("masked", [True, False])
def test_wrong_masking_fails_with_1002(masked: bool) -> None:
    bad = build_frame(OP_TEXT, b"hi", mask=not masked)
    assert_fails_after(good_frames(masked), bad, 1002, masked=masked)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("rsv", [1, 2, 4, 7])
def test_reserved_bits_fail_with_1002(masked: bool, rsv: int) -> None:
    bad = build_frame(OP_BINARY, b"data", mask=masked, rsv=rsv)
    assert_fails_after(good_frames(masked), bad, 1002, masked=masked)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("opcode", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcodes_fail_with_1002(masked: bool, opcode: int) -> None:
    bad = build_frame(opcode, b"x", mask=masked)
    assert_fails_after(good_frames(masked), bad, 1002, masked=masked)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_control_frame_over_125_bytes_fails_with_1002(masked: bool, opcode: int) -> None:
    bad = build_frame(opcode, b"\x03\xe8" + b"x" * 124, mask=masked)
    assert_fails_after(good_frames(masked), bad, 1002, masked=masked)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_fragmented_control_frame_fails_with_1002(masked: bool, opcode: int) -> None:
    bad = build_frame(opcode, b"\x03\xe8", mask=masked, fin=False)
    assert_fails_after(good_frames(masked), bad, 1002, masked=masked)


@pytest.mark.parametrize("masked", [True, False])
def test_continuation_without_a_message_fails_with_1002(masked: bool) -> None:
    bad = build_frame(OP_CONTINUATION, b"orphan", mask=masked)
    assert_fails_after(good_frames(masked), bad, 1002, masked=masked)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_new_message_inside_a_fragmented_one_fails_with_1002(masked: bool, opcode: int) -> None:
    prefix = good_frames(masked) + build_frame(OP_TEXT, b"part", mask=masked, fin=False)
    prefix += build_frame(OP_PING, b"allowed in between", mask=masked)
    bad = build_frame(opcode, b"new", mask=masked)
    assert_fails_after(prefix, bad, 1002, masked=masked)


@pytest.mark.parametrize("masked", [True, False])
def test_message_over_max_size_across_fragments_fails_with_1009(masked: bool) -> None:
    prefix = build_frame(OP_BINARY, bytes(100), mask=masked)  # exactly the limit: fine
    prefix += build_frame(OP_BINARY, bytes(60), mask=masked, fin=False)
    prefix += build_frame(OP_CONTINUATION, bytes(40), mask=masked, fin=False)
    bad = build_frame(OP_CONTINUATION, bytes(1), mask=masked)
    assert_fails_after(prefix, bad, 1009, masked=masked, max_message_size=100)


@pytest.mark.parametrize("masked", [True, False])
def test_single_frame_over_max_size_fails_with_1009(masked: bool) -> None:
    prefix = build_frame(OP_TEXT, b"x" * 100, mask=masked)
    bad = build_frame(OP_TEXT, b"x" * 101, mask=masked)
    assert_fails_after(prefix, bad, 1009, masked=masked, max_message_size=100)


INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok\xe2\x82", b"\xc0\xaf"]


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("payload", INVALID_UTF8)
def test_invalid_utf8_in_a_text_frame_fails_with_1007(masked: bool, payload: bytes) -> None:
    bad = build_frame(OP_TEXT, payload, mask=masked)
    assert_fails_after(good_frames(masked), bad, 1007, masked=masked)


@pytest.mark.parametrize("masked", [True, False])
def test_invalid_utf8_across_fragments_fails_with_1007(masked: bool) -> None:
    # "€" is e2 82 ac: the first fragment ends in the middle of it, the second does not finish it.
    prefix = good_frames(masked) + build_frame(OP_TEXT, b"ok \xe2\x82", mask=masked, fin=False)
    bad = build_frame(OP_CONTINUATION, b"(", mask=masked)
    assert_fails_after(prefix, bad, 1007, masked=masked)


@pytest.mark.parametrize("masked", [True, False])
def test_text_message_ending_inside_a_character_fails_with_1007(masked: bool) -> None:
    prefix = good_frames(masked) + build_frame(OP_TEXT, b"ok \xe2", mask=masked, fin=False)
    bad = build_frame(OP_CONTINUATION, b"\x82", mask=masked)  # fin, still one byte short
    assert_fails_after(prefix, bad, 1007, masked=masked)


@pytest.mark.parametrize("masked", [True, False])
def test_binary_messages_are_not_checked_for_utf8(masked: bool) -> None:
    data = build_frame(OP_BINARY, b"\xff\xfe", mask=masked)
    scanner = scanner_for(masked)
    assert scanner.feed(data) == data
    assert scanner.state is ScanState.OPEN


@pytest.mark.parametrize("masked", [True, False])
def test_utf8_check_can_be_switched_off(masked: bool) -> None:
    data = build_frame(OP_TEXT, b"\xff", mask=masked)
    scanner = FrameScanner(masked=masked, max_message_size=BIG, validate_utf8=False)
    assert scanner.feed(data) == data
    assert scanner.state is ScanState.OPEN
    assert scanner.messages == 1


@pytest.mark.parametrize("masked", [True, False])
@given(text=st.text(min_size=1, max_size=40), data=st.data())
def test_valid_utf8_split_across_fragments_is_accepted(masked: bool, text: str, data: st.DataObject) -> None:
    encoded = text.encode("utf-8")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(encoded)), max_size=6), label="cuts"))
    bounds = [0, *cuts, len(encoded)]
    pieces = [encoded[a:b] for a, b in itertools.pairwise(bounds)]
    wire = b"".join(
        build_frame(OP_TEXT if i == 0 else OP_CONTINUATION, piece, mask=masked, fin=i == len(pieces) - 1)
        for i, piece in enumerate(pieces)
    )
    scanner = scanner_for(masked)
    assert scanner.feed(wire) == wire
    assert scanner.state is ScanState.OPEN
    assert scanner.messages == 1
    assert wsproto_items(wire, masked=masked) == [("text", text)]


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("position", [0, 10, 70000 - 1])
def test_invalid_utf8_in_a_streamed_frame_fails_with_1007(masked: bool, position: int) -> None:
    payload = bytearray(b"a" * 70000)
    payload[position] = 0xFF
    prefix = good_frames(masked)
    frame = build_frame(OP_TEXT, bytes(payload), mask=masked)
    data = prefix + frame
    for split in (len(prefix) + 14 + 5, len(prefix) + 14 + 40000, len(data) - 1):
        scanner = scanner_for(masked)
        out = scanner.feed(data[:split]) + scanner.feed(data[split:])
        assert scanner.state is ScanState.FAILED
        assert scanner.error is not None
        assert scanner.error.code == 1007
        # Everything before the bad frame passed, the bad frame did not pass whole, and the
        # scanner says that the forwarded stream is not at a frame boundary.
        assert out.startswith(prefix)
        assert data.startswith(out)
        assert len(out) < len(data)
        assert not scanner.at_frame_boundary
        assert scanner.feed(b"more") == b""


@pytest.mark.parametrize("masked", [True, False])
def test_streamed_text_frame_continues_a_character_from_a_previous_fragment(masked: bool) -> None:
    # The streamed frame's UTF-8 check carries over the decoder state of the message so far.
    first = build_frame(OP_TEXT, b"x\xe2", mask=masked, fin=False)
    big = build_frame(OP_CONTINUATION, b"\x82\xac" + b"b" * 70000, mask=masked)
    data = first + big
    scanner = scanner_for(masked)
    out = feed_all(scanner, chunks(data, [len(first) + 20, len(first) + 30000]))
    assert out == data
    assert scanner.state is ScanState.OPEN
    assert scanner.messages == 1
    assert scanner.at_boundary


# -- close frames ----------------------------------------------------------------------------------


def close_frame(payload: bytes, *, mask: bool) -> bytes:
    return build_frame(OP_CLOSE, payload, mask=mask)


@pytest.mark.parametrize("masked", [True, False])
def test_close_payload_of_one_byte_fails_with_1002(masked: bool) -> None:
    assert_fails_after(good_frames(masked), close_frame(b"\x03", mask=masked), 1002, masked=masked)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_invalid_close_codes_fail_with_1002(masked: bool, code: int) -> None:
    bad = close_frame(struct.pack("!H", code) + b"why", mask=masked)
    assert_fails_after(good_frames(masked), bad, 1002, masked=masked)


@pytest.mark.parametrize("masked", [True, False])
def test_close_reason_that_is_not_utf8_fails_with_1007(masked: bool) -> None:
    bad = close_frame(struct.pack("!H", 1000) + b"bad \xff reason", mask=masked)
    assert_fails_after(good_frames(masked), bad, 1007, masked=masked)


VALID_CODES = [1000, 1001, 1002, 1003, *range(1007, 1015), 3000, 4000, 4999]


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("code", VALID_CODES)
def test_valid_close_codes_close_the_scanner(masked: bool, code: int) -> None:
    prefix = good_frames(masked)
    close = close_frame(struct.pack("!H", code) + "bye ✓".encode(), mask=masked)
    after = build_frame(OP_TEXT, b"ignored", mask=masked)
    for split in range(len(prefix), len(prefix) + len(close) + 1):
        scanner = scanner_for(masked)
        data = prefix + close + after
        out = scanner.feed(data[:split]) + scanner.feed(data[split:])
        assert out == prefix + close
        assert scanner.state is ScanState.CLOSED
        assert scanner.error is None
        assert (scanner.close_code, scanner.close_reason) == (code, "bye ✓")
        assert scanner.close_frame_size == len(close)
        assert scanner.feed(after) == b""
        assert scanner.feed(close) == b""


@pytest.mark.parametrize("masked", [True, False])
def test_empty_close_payload_means_no_status(masked: bool) -> None:
    close = close_frame(b"", mask=masked)
    scanner = scanner_for(masked)
    assert scanner.feed(close) == close
    assert scanner.state is ScanState.CLOSED
    assert scanner.close_code == CloseCode.NO_STATUS
    assert scanner.close_reason == ""


@pytest.mark.parametrize("masked", [True, False])
def test_close_inside_a_fragmented_message_is_allowed(masked: bool) -> None:
    data = build_frame(OP_TEXT, b"half", mask=masked, fin=False) + close_frame(b"\x03\xe8", mask=masked)
    scanner = scanner_for(masked)
    assert scanner.feed(data) == data
    assert scanner.state is ScanState.CLOSED
    assert scanner.close_code == 1000
    assert not scanner.at_boundary
    assert scanner.at_frame_boundary


def test_parse_close_matches_the_scanner_rules() -> None:
    assert parse_close(b"") == (1005, "")
    assert parse_close(b"\x03\xe8") == (1000, "")
    assert parse_close(struct.pack("!H", 4321) + "ça".encode()) == (4321, "ça")
    with pytest.raises(FrameError) as one_byte:
        parse_close(b"\x03")
    assert one_byte.value.code == 1002
    with pytest.raises(FrameError) as reserved:
        parse_close(struct.pack("!H", 1005))
    assert reserved.value.code == 1002
    with pytest.raises(FrameError) as not_utf8:
        parse_close(b"\x03\xe8\xff")
    assert not_utf8.value.code == 1007


@given(
    code=st.sampled_from(VALID_CODES),
    reason=st.text(max_size=200),
    mask=st.booleans(),
)
def test_build_close_truncates_reason_at_a_character_boundary(code: int, reason: str, mask: bool) -> None:
    frame = build_close(code, reason, mask=mask)
    scanner = scanner_for(masked=mask)
    assert scanner.feed(frame) == frame
    assert scanner.state is ScanState.CLOSED
    assert scanner.close_code == code
    got = scanner.close_reason
    encoded = got.encode("utf-8")
    assert len(encoded) <= 123
    assert reason.startswith(got)
    if got != reason:
        # Truncated to the longest prefix that fits: the next character would not.
        assert len(reason[: len(got) + 1].encode("utf-8")) > 123
    if code == 1014:
        return  # registered by IANA after wsproto's list: wsproto refuses it
    # wsproto agrees (it parses frames from the other side).
    proto = FrameProtocol(client=not mask, extensions=[])
    proto.receive_bytes(frame)
    (parsed,) = list(proto.received_frames())
    assert parsed.opcode is Opcode.CLOSE
    assert parsed.payload == (code, got)


@pytest.mark.parametrize("mask", [True, False])
def test_build_close_without_code_sends_no_status(mask: bool) -> None:
    frame = build_close(None, mask=mask)
    assert len(frame) == (6 if mask else 2)
    scanner = scanner_for(masked=mask)
    scanner.feed(frame)
    assert scanner.state is ScanState.CLOSED
    assert scanner.close_code == 1005


def test_build_close_reason_of_multibyte_characters_is_cut_before_a_character() -> None:
    frame = build_close(1000, "€" * 60, mask=False)  # 180 bytes of reason, 3 per character
    assert len(frame) == 2 + 2 + 123
    assert parse_close(frame[2:]) == (1000, "€" * 41)
    frame = build_close(1000, "a" + "😀" * 40, mask=False)  # 1 + 4k bytes: 1 + 120 fits
    assert parse_close(frame[2:]) == (1000, "a" + "😀" * 30)


# -- unmask ----------------------------------------------------------------------------------------


@given(
    payload=st.binary(max_size=300),
    key=st.binary(min_size=4, max_size=4),
    data=st.data(),
)
def test_unmask_in_pieces_matches_unmask_of_the_whole(
    payload: bytes, key: bytes, data: st.DataObject
) -> None:
    whole = unmask(payload, key)
    assert whole == bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    assert unmask(whole, key) == payload
    cuts = sorted(data.draw(st.lists(st.integers(0, len(payload)), max_size=5), label="cuts"))
    bounds = [0, *cuts, len(payload)]
    pieces = b"".join(unmask(payload[a:b], key, a) for a, b in itertools.pairwise(bounds))
    assert pieces == whole


@given(payload=st.binary(max_size=300), mask=st.booleans(), opcode=st.sampled_from([1, 2]))
def test_build_frame_header_encodes_length_and_mask(payload: bytes, mask: bool, opcode: int) -> None:
    frame = build_frame(opcode, payload, mask=mask)
    assert frame[0] == 0x80 | opcode
    assert bool(frame[1] & 0x80) == mask
    header = 2 if len(payload) < 126 else 4
    if mask:
        key = frame[header : header + 4]
        assert unmask(frame[header + 4 :], key) == payload
    else:
        assert frame[header:] == payload


@pytest.mark.parametrize(("size", "header"), [(125, 2), (126, 4), (65535, 4), (65536, 10)])
def test_build_frame_uses_the_shortest_length_encoding(size: int, header: int) -> None:
    frame = build_frame(OP_BINARY, bytes(size), mask=False)
    assert len(frame) == header + size
    proto = FrameProtocol(client=True, extensions=[])
    proto.receive_bytes(frame)
    (parsed,) = list(proto.received_frames())
    assert parsed.payload == bytes(size)


def test_wsproto_close_frames_are_recognised_by_the_scanner() -> None:
    conn = Connection(ConnectionType.CLIENT)
    wire = conn.send(TextMessage(data="bye soon")) + conn.send(CloseConnection(1001, "going"))
    scanner = scanner_for(masked=True)
    assert scanner.feed(wire) == wire
    assert scanner.state is ScanState.CLOSED
    assert (scanner.close_code, scanner.close_reason) == (1001, "going")
    assert scanner.messages == 1


@given(st.binary(max_size=125) | st.text(max_size=40).map(lambda t: t.encode("utf-8")[:125]))
def test_small_masked_text_is_validated_like_a_decoder_would(payload: bytes) -> None:
    """The ASCII shortcut for small masked text frames agrees with a plain UTF-8 decode."""
    scanner = FrameScanner(masked=True, max_message_size=1 << 20)
    scanner.feed(build_frame(OP_TEXT, payload, mask=True))
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        assert scanner.state is ScanState.FAILED
    else:
        assert scanner.state is ScanState.OPEN
        assert scanner.messages == 1
