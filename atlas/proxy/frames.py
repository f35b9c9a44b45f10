"""Sans-IO RFC 6455 frame codec: header scanning for the relay, frame building for Atlas's own frames.

Theory of operation
-------------------
Atlas forwards WebSocket frames *verbatim*. A client's frames are masked and a backend expects masked frames
from its client (Atlas), so client frames pass unchanged; backend frames are unmasked and pass unchanged to
the client. The relay therefore never decodes a message: it only needs to know where frames and messages
begin and end, and whether the peer broke the protocol.

:class:`FrameScanner` does exactly that for one direction of one connection. ``feed(data)`` walks the frame
headers in ``data`` (plus whatever partial frame was held back from the previous call), validates them, and
returns the bytes that may be forwarded now:

* every complete frame, untouched;
* the header and the received part of a *large* frame (``stream_threshold`` bytes or more), so a big message
  streams through instead of being buffered whole;
* never a partial small frame or a partial header: those are held until complete, so the output stream is
  at a frame boundary whenever ``feed`` returns and Atlas can inject its own close frame cleanly.

When the scanner meets a Close frame it forwards it and stops (``state`` becomes ``CLOSED``); when it meets
a protocol violation it forwards everything *before* the bad frame and stops (``state`` becomes
``FAILED``, ``error`` says the close code and why). The caller checks ``state`` once per ``feed``, so the
common path (a chunk of complete data frames) costs one header parse per frame and no copy of the chunk.

Payloads are looked at only where the RFC requires it: text messages are checked for valid UTF-8 (which
for client frames means unmasking them first) unless that check is switched off, and Close payloads are
parsed for their code and reason.
"""

from __future__ import annotations

import codecs
import enum
import os
import struct
from collections.abc import Callable
from typing import Final, Protocol

__all__ = [
    "NO_LIMIT",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONTINUATION",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "CloseCode",
    "FrameError",
    "FrameScanner",
    "ScanState",
    "build_close",
    "build_frame",
    "parse_close",
    "unmask",
]

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

_DATA_OPCODES: Final = frozenset({OP_CONTINUATION, OP_TEXT, OP_BINARY})
_CONTROL_OPCODES: Final = frozenset({OP_CLOSE, OP_PING, OP_PONG})
_MAX_CONTROL_PAYLOAD: Final = 125

#: Frames whose payload is at least this long are streamed through in pieces instead of held whole.
DEFAULT_STREAM_THRESHOLD: Final = 64 * 1024


class CloseCode(enum.IntEnum):
    """Close status codes Atlas sends or names (RFC 6455 section 7.4.1 and the IANA registry)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005
    ABNORMAL = 1006
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013


def _is_valid_wire_code(code: int) -> bool:
    """Whether ``code`` may appear in a Close frame on the wire (RFC 6455 section 7.4)."""
    if 1000 <= code <= 1003 or 1007 <= code <= 1014:
        return True
    return 3000 <= code <= 4999


class _TapFilter(Protocol):
    """The skim pre-filter the scanner consults per message (``atlas.skim.SkimFilter`` is one)."""

    def wants(self, opcode: int, size: int) -> bool:
        """Whether a message with this opcode and payload size is skimmed."""
        ...


class _NoSkim:
    def wants(self, opcode: int, size: int) -> bool:
        return False


_NO_SKIM: Final = _NoSkim()


class FrameError(Exception):
    """A peer broke RFC 6455; ``code`` is the close code to fail the connection with."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code}: {reason}")


class ScanState(enum.IntEnum):
    """Where a :class:`FrameScanner` stands: relaying, stopped at a Close frame, or stopped at an error."""

    OPEN = 0
    CLOSED = 1
    FAILED = 2


def unmask(payload: bytes | bytearray | memoryview, key: bytes, offset: int = 0) -> bytes:
    """Apply (or remove: XOR is its own inverse) the 4-byte masking ``key`` to ``payload``.

    ``offset`` is the position of ``payload`` within its frame's payload, for a frame seen in pieces.
    """
    n = len(payload)
    if n == 0:
        return b""
    if offset % 4:
        key = key[offset % 4 :] + key[: offset % 4]
    # One big-integer XOR runs in C and beats any per-byte Python loop by far.
    repeated = key * (n // 4 + 1)
    value = int.from_bytes(payload, "little") ^ int.from_bytes(repeated[:n], "little")
    return value.to_bytes(n, "little")


def build_frame(opcode: int, payload: bytes = b"", *, mask: bool, fin: bool = True, rsv: int = 0) -> bytes:
    """Encode one frame. ``mask`` must be true for frames Atlas sends to a backend (Atlas is its client)."""
    first = (0x80 if fin else 0) | (rsv & 0x7) << 4 | opcode
    n = len(payload)
    mask_bit = 0x80 if mask else 0
    if n < 126:
        header = bytes((first, mask_bit | n))
    elif n < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, n)
    if not mask:
        return header + payload
    key = os.urandom(4)
    return header + key + unmask(payload, key)


def build_close(code: int | None = CloseCode.NORMAL, reason: str = "", *, mask: bool) -> bytes:
    """Encode a Close frame; ``code=None`` sends an empty payload (no status).

    The reason is truncated to fit the 125-byte control-frame limit without splitting a character.
    """
    if code is None:
        return build_frame(OP_CLOSE, b"", mask=mask)
    data = reason.encode("utf-8")
    if len(data) > _MAX_CONTROL_PAYLOAD - 2:
        data = data[: _MAX_CONTROL_PAYLOAD - 2].decode("utf-8", "ignore").encode("utf-8")
    return build_frame(OP_CLOSE, struct.pack("!H", code) + data, mask=mask)


def parse_close(payload: bytes) -> tuple[int, str]:
    """Decode an (unmasked) Close payload into ``(code, reason)``; no payload gives ``(1005, "")``.

    Raises :class:`FrameError` with 1002 for a bad length or code and 1007 for a reason that is not UTF-8.
    """
    if not payload:
        return CloseCode.NO_STATUS, ""
    if len(payload) == 1:
        raise FrameError(CloseCode.PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not _is_valid_wire_code(code):
        raise FrameError(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(CloseCode.INVALID_DATA, "close reason is not valid UTF-8") from None
    return code, reason


_utf8_decoder = codecs.getincrementaldecoder("utf-8")

# For a masked payload of n < 126 bytes: the high bit of every byte, and the 4-byte key's high bits repeated.
_HIGH_BITS: Final = tuple(int.from_bytes(b"\x80" * n, "little") for n in range(126))
_KEY_REPEAT: Final = tuple(sum(1 << (32 * i) for i in range((n + 3) // 4)) for n in range(126))


def _masked_ascii(view: bytes | bytearray, start: int, end: int) -> bool:
    """Whether the masked payload ``view[start:end]`` (key just before it, < 126 bytes) unmasks to ASCII.

    A byte unmasks to ASCII when its high bit equals its key byte's: compared for all bytes at once with
    two integers, without building the unmasked payload (most game messages are ASCII JSON).
    """
    n = end - start
    high = _HIGH_BITS[n]
    key = int.from_bytes(view[start - 4 : start], "little") * _KEY_REPEAT[n]
    return (int.from_bytes(view[start:end], "little") & high) == (key & high)


NO_LIMIT: Final = 1 << 62
"""``FrameScanner.limit`` when nothing is held."""


class FrameScanner:
    """Validate and delimit the frames of one direction of one WebSocket connection.

    ``masked`` says whether frames in this direction must be masked (client to server) or must not be
    (server to client). See the module docstring for the forwarding contract of :meth:`feed`.

    Attributes the relay reads after each :meth:`feed`: ``state``, ``error`` (when ``FAILED``),
    ``close_code`` and ``close_reason`` (when ``CLOSED``), ``messages`` (complete data messages seen),
    ``close_frame_size`` (the Close frame is the last that many bytes ``feed`` returned), and
    ``at_boundary`` (no data message is half-way through).
    """

    __slots__ = (
        "_buf",
        "_decoder",
        "_discard",
        "_error_pos",
        "_frame_key",
        "_frame_offset",
        "_frame_text",
        "_fwd_end",
        "_fwd_start",
        "_in_message",
        "_masked",
        "_max_message",
        "_message_size",
        "_message_text",
        "_pending_fin",
        "_remaining",
        "_stream_threshold",
        "_tap",
        "_tap_filter",
        "_validate_utf8",
        "close_code",
        "close_frame_size",
        "close_reason",
        "discarded",
        "error",
        "limit",
        "messages",
        "state",
    )

    def __init__(
        self,
        *,
        masked: bool,
        max_message_size: int,
        validate_utf8: bool = True,
        stream_threshold: int = DEFAULT_STREAM_THRESHOLD,
    ) -> None:
        self._masked = masked
        self._max_message = max_message_size
        self._validate_utf8 = validate_utf8
        self._stream_threshold = stream_threshold
        self._buf = bytearray()
        # Message state: is a fragmented message under way, is it text, how big so far.
        self._in_message = False
        self._message_text = False
        self._message_size = 0
        self._decoder: codecs.IncrementalDecoder | None = None
        # Streaming state for a large frame whose header was forwarded and whose payload is arriving.
        self._remaining = 0
        self._frame_key = b""
        self._frame_offset = 0
        self._frame_text = False
        self._pending_fin = False
        # The scan loop leaves its results here so the hot path allocates no tuple per call.
        self._fwd_end = 0
        self._fwd_start = 0
        self._error_pos = 0
        # Dropping the rest of a message whose start went to a backend that is gone (discard_partial).
        self._discard = False
        self.discarded = 0
        # Holding: no frame past the message numbered ``limit`` is forwarded (see hold_after).
        self.limit = NO_LIMIT
        # Skimming (see set_tap): called with (opcode, unmasked payload) for each wanted message.
        self._tap: Callable[[int, bytes], None] | None = None
        self._tap_filter: _TapFilter = _NO_SKIM
        self.state = ScanState.OPEN
        self.error: FrameError | None = None
        self.close_code = 0
        self.close_reason = ""
        self.close_frame_size = 0
        self.messages = 0

    @property
    def at_boundary(self) -> bool:
        """True when the forwarded stream sits between two messages (not inside a fragmented one)."""
        return not self._in_message and not self._remaining

    @property
    def at_frame_boundary(self) -> bool:
        """True when the forwarded stream sits between two frames, so a control frame may be injected."""
        return not self._remaining

    @property
    def buffered(self) -> int:
        """Bytes received but held back (a partial header or small frame)."""
        return len(self._buf)

    def discard_partial(self) -> bool:
        """Drop the rest of the message under way (its start went to a backend that is gone).

        The frames that complete the current message are consumed without being forwarded (a Close frame
        still passes), so the output resumes at a message boundary. Returns whether a message was cut.
        """
        if self.at_boundary:
            return False
        self._discard = True
        return True

    def set_tap(self, tap: Callable[[int, bytes], None] | None, wants: _TapFilter | None = None) -> None:
        """Offer whole, unfragmented data messages to ``tap`` when ``wants.wants(opcode, size)`` says so.

        The filter is asked before anything is unmasked or copied; ``tap`` must not block (the skim
        dispatcher's ``offer`` drops and counts when full). ``None`` switches skimming off.
        """
        self._tap = tap if wants is not None else None
        self._tap_filter = wants if wants is not None else _NO_SKIM

    def hold_after(self, count: int) -> None:
        """Forward no frame that follows the ``count``-th message; hold everything after it.

        Held bytes stay in the scanner (see :attr:`buffered`) until :meth:`release`. Control frames are
        held too, so order is kept.
        """
        self.limit = count

    def hold_at_boundary(self) -> int:
        """Hold from the next message boundary on (the message under way, if any, still passes).

        Returns the number of messages that will have been forwarded when the hold takes effect.
        """
        self.limit = self.messages + (0 if self.at_boundary else 1)
        return self.limit

    @property
    def held(self) -> bool:
        """Whether the hold has taken effect: the output stands at the limit, at a message boundary."""
        return self.messages >= self.limit and self.at_boundary

    def held_messages(self) -> int:
        """How many data messages end inside the held bytes (walks their headers; for metrics)."""
        buf = self._buf
        count = 0
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            length = buf[pos + 1] & 0x7F
            header = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                header = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                header = 10
            if buf[pos + 1] & 0x80:
                header += 4
            if buf[pos] & 0x80 and buf[pos] & 0x0F < 0x8:
                count += 1
            pos += header + length
        return count

    def fail(self, code: CloseCode, reason: str) -> None:
        """End the stream as a protocol error would, for a policy kept outside the scanner (a rate limit).

        What ``feed`` returned so far stands; later calls return nothing. Call at a frame boundary.
        """
        if not self.state:
            self.state = ScanState.FAILED
            self.error = FrameError(code, reason)

    def release(self) -> bytes | bytearray:
        """Lift the hold; return what was held and may be forwarded now (call before any new ``feed``)."""
        self.limit = NO_LIMIT
        return self.feed(b"") if self._buf else b""

    def feed(self, data: bytes | bytearray) -> bytes | bytearray:
        """Take newly received bytes; return the bytes that may be forwarded now (see the module doc)."""
        if self.state:
            return b""
        self._fwd_start = 0
        buf = self._buf
        if buf:
            buf += data
            view: bytes | bytearray = buf
        else:
            view = data
        n = len(view)
        pos = 0
        if self._remaining:
            pos = self._continue_stream(view, n)
            if self.state:
                return b""
        try:
            pos = self._scan(view, pos, n)
        except FrameError as exc:
            self.state = ScanState.FAILED
            self.error = exc
            pos = self._error_pos
            start = min(self._fwd_start, pos)
            if buf:
                out = bytes(view[start:pos])
                buf.clear()
                return out
            return view[start:pos] if start or pos < n else view
        fwd_start = self._fwd_start
        fwd_end = self._fwd_end
        if buf:
            out = bytes(buf[fwd_start:fwd_end])
            del buf[:pos]
            return out
        if pos < n:
            buf += memoryview(view)[pos:]
        if fwd_end == n and not fwd_start:
            return view
        return view[fwd_start:fwd_end]

    def _scan(self, view: bytes | bytearray, pos: int, n: int) -> int:
        """Walk frames from ``pos``; return how far input was consumed (``_fwd_end``: how far to forward)."""
        self._fwd_end = pos
        masked = self._masked
        limit = self.limit
        while n - pos >= 2:
            if self.messages >= limit and not self._in_message:
                break
            b0 = view[pos]
            b1 = view[pos + 1]
            self._error_pos = pos
            opcode = b0 & 0x0F
            length = b1 & 0x7F
            header = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = (view[pos + 2] << 8) | view[pos + 3]
                header = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(view[pos + 2 : pos + 10], "big")
                header = 10
            if b1 & 0x80:
                if not masked:
                    raise FrameError(CloseCode.PROTOCOL_ERROR, "masked frame from server")
                header += 4
            elif masked:
                raise FrameError(CloseCode.PROTOCOL_ERROR, "unmasked frame from client")
            if b0 & 0x70:
                raise FrameError(CloseCode.PROTOCOL_ERROR, "reserved bits set without an extension")
            fin = b0 & 0x80
            if opcode >= 0x8:
                if opcode not in _CONTROL_OPCODES:
                    raise FrameError(CloseCode.PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
                if length > _MAX_CONTROL_PAYLOAD:
                    raise FrameError(CloseCode.PROTOCOL_ERROR, "control frame payload over 125 bytes")
                if not fin:
                    raise FrameError(CloseCode.PROTOCOL_ERROR, "fragmented control frame")
                end = pos + header + length
                if end > n:
                    break
                if opcode == OP_CLOSE:
                    self._on_close(view, pos + header - (4 if masked else 0), pos + header, end)
                    self.close_frame_size = end - pos
                    if self._discard:
                        self._fwd_start = pos
                    self._fwd_end = end
                    self.state = ScanState.CLOSED
                    return n
                pos = end
                self._fwd_end = pos
                if self._discard:
                    self._fwd_start = pos
                continue
            # A data frame.
            if opcode == OP_CONTINUATION:
                if not self._in_message:
                    raise FrameError(CloseCode.PROTOCOL_ERROR, "continuation frame outside a message")
                text = self._message_text
            elif opcode <= OP_BINARY:
                if self._in_message:
                    raise FrameError(CloseCode.PROTOCOL_ERROR, "new message inside a fragmented one")
                text = opcode == OP_TEXT
                self._message_text = text
                self._message_size = 0
            else:
                raise FrameError(CloseCode.PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
            size = self._message_size + length
            if size > self._max_message:
                raise FrameError(CloseCode.MESSAGE_TOO_BIG, f"message over {self._max_message} bytes")
            end = pos + header + length
            if end > n:
                if length < self._stream_threshold or n - pos < header:
                    break
                self._message_size = size
                # A large frame: forward its header and what we have of it, stream the rest later.
                start = pos + header
                self._frame_key = bytes(view[start - 4 : start]) if masked else b""
                self._frame_text = text and self._validate_utf8
                self._pending_fin = bool(fin)
                self._in_message = True  # the message ends when the frame's last byte has passed
                self._remaining = end - start
                self._frame_offset = 0
                self._fwd_end = pos + header
                return self._continue_stream(view, n, start)
            payload: bytes | bytearray | None = None
            if text and self._validate_utf8:
                start = pos + header
                if not (
                    masked and length < 126 and fin and opcode == OP_TEXT and _masked_ascii(view, start, end)
                ):
                    payload = (
                        unmask(view[start:end], bytes(view[start - 4 : start])) if masked else view[start:end]
                    )
                    self._check_text(payload, bool(fin), opcode == OP_CONTINUATION)
            tap = self._tap
            if tap is not None and fin and opcode and self._tap_filter.wants(opcode, length):
                # Skimmed: the payload, unmasked (once, shared with the UTF-8 check), to the tap.
                if payload is None:
                    start = pos + header
                    payload = (
                        unmask(view[start:end], bytes(view[start - 4 : start])) if masked else view[start:end]
                    )
                tap(opcode, bytes(payload))
            self._message_size = size
            pos = end
            self._fwd_end = pos
            if fin:
                self._in_message = False
                self._decoder = None
                if self._discard:
                    self._end_discard(pos)
                else:
                    self.messages += 1
            else:
                self._in_message = True
                if self._discard:
                    self._fwd_start = pos
        return pos

    def _end_discard(self, end: int) -> None:
        """The message being dropped ended at ``end``: forward again from there."""
        self._discard = False
        self._fwd_start = end
        self.discarded += 1

    def _check_text(self, payload: bytes | bytearray, fin: bool, continuation: bool) -> None:
        """Validate one frame's worth of a text message, across fragment boundaries."""
        decoder = self._decoder
        if decoder is None:
            if fin and not continuation:
                if payload.isascii():
                    return
                try:
                    bytes(payload).decode("utf-8")
                except UnicodeDecodeError:
                    raise FrameError(CloseCode.INVALID_DATA, "text message is not valid UTF-8") from None
                return
            decoder = self._decoder = _utf8_decoder()
        try:
            decoder.decode(payload, fin)
        except UnicodeDecodeError:
            raise FrameError(CloseCode.INVALID_DATA, "text message is not valid UTF-8") from None

    def _on_close(self, view: bytes | bytearray, key_at: int, start: int, end: int) -> None:
        payload = bytes(view[start:end])
        if self._masked:
            payload = unmask(payload, bytes(view[key_at:start]))
        self.close_code, self.close_reason = parse_close(payload)

    def _continue_stream(self, view: bytes | bytearray, n: int, start: int = 0) -> int:
        """Pass through the next piece of a large frame's payload; return the new scan position."""
        take = min(self._remaining, n - start)
        end = start + take
        if self._frame_text and take:
            chunk = view[start:end]
            if self._masked:
                chunk = unmask(chunk, self._frame_key, self._frame_offset)
            if self._decoder is None:
                self._decoder = _utf8_decoder()
            last = take == self._remaining and self._pending_fin
            try:
                self._decoder.decode(chunk, last)
            except UnicodeDecodeError:
                # Part of this frame has been forwarded already: fail without a clean boundary.
                self.state = ScanState.FAILED
                self.error = FrameError(CloseCode.INVALID_DATA, "text message is not valid UTF-8")
                return end
        self._frame_offset += take
        self._remaining -= take
        self._fwd_end = end
        if self._discard:
            self._fwd_start = end
        if not self._remaining and self._pending_fin:
            self._in_message = False
            self._decoder = None
            if self._discard:
                self._end_discard(end)
            else:
                self.messages += 1
        return end
