"""What the relay hands to the skim tap: which frames (`SkimFilter`), in what form (`SkimFrame`).

The relay asks `SkimFilter.wants` about every data frame *before* it unmasks or copies anything; only
when the answer is yes does it build a `SkimFrame` (payload unmasked) and offer it to the
`Dispatcher`. Both are on the relay's hot path, so both are measured in nanoseconds: ``wants`` is a
few integer comparisons, and a `SkimFrame` is a frozen `msgspec.Struct` without GC tracking (about
a tenth of the cost of a frozen attrs instance). `frame_to_sse` renders a frame for the live tap.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Final, Literal

import msgspec

__all__ = ["OP_BINARY", "OP_TEXT", "Direction", "SkimFilter", "SkimFrame", "frame_to_sse"]

Direction = Literal["up", "down"]
"""``up``: client to server; ``down``: server to client."""

OP_TEXT: Final = 1
"""WebSocket opcode of a text frame (RFC 6455 5.2)."""
OP_BINARY: Final = 2
"""WebSocket opcode of a binary frame."""

_DIRECTIONS: Final = frozenset(("up", "down"))


class SkimFrame(msgspec.Struct, frozen=True, gc=False):
    """One skimmed message, as the relay saw it.

    Frozen; ``gc=False`` is safe because every field is a scalar, and makes creation cheap (about
    55 ns). Build it positionally or by keyword:
    ``SkimFrame(client_id, backend, "up", OP_TEXT, payload, trio.current_time())``.
    """

    client_id: str
    """The Atlas client id (``<prefix>-<n>``)."""
    backend: str
    """Name of the backend the client is linked to when the frame passed."""
    direction: Direction
    """``up`` (client to server) or ``down`` (server to client)."""
    opcode: int
    """`OP_TEXT` or `OP_BINARY`."""
    payload: bytes
    """The whole message payload, already unmasked."""
    time: float
    """The trio clock's time (``trio.current_time()``) when the relay saw it."""


class SkimFilter:
    """The relay's pre-filter, which says whether a frame is skimmed at all.

    A frame is *eligible* when its opcode is text (or binary too, unless ``text_only``) and its
    payload is at most ``max_size`` bytes; of the eligible frames, the first and then one in every
    ``sample_every`` are wanted. Ineligible frames do not advance the sampling count. ``directions``
    says which pumps consult the filter at all (`taps`); it is checked once per pump, not per frame.

    The sampling count lives in the instance. One instance per pump (`copy`) samples each client
    evenly, which is what movement prediction needs; one instance shared by every session samples
    1 in ``sample_every`` of all traffic, so a quiet client may never be seen.

    Only unfragmented messages are skimmed: the relay passes the opcode of a frame with FIN set,
    and 0 (continuation) for anything else, which is never wanted. Control frames (opcodes 8 to 10)
    are never wanted either.
    """

    __slots__ = ("_countdown", "_every", "_max_opcode", "_max_size", "directions", "text_only")

    def __init__(
        self,
        max_size: int = 4096,
        sample_every: int = 1,
        directions: Iterable[Direction] = ("up",),
        text_only: bool = True,
    ) -> None:
        """Check and store the settings.

        Raises:
            ValueError: ``max_size`` or ``sample_every`` below 1, or ``directions`` empty or holding
                something other than ``"up"`` and ``"down"``.
        """
        if isinstance(directions, str):
            raise ValueError(f"directions must be a collection of 'up'/'down', not the string {directions!r}")
        chosen = tuple(directions)
        if not chosen or not set(chosen) <= _DIRECTIONS or len(set(chosen)) != len(chosen):
            raise ValueError(f"directions must be 'up', 'down' or both, once each; got {chosen!r}")
        if type(max_size) is not int or max_size < 1:
            raise ValueError(f"max_size must be an integer of at least 1, got {max_size!r}")
        if type(sample_every) is not int or sample_every < 1:
            raise ValueError(f"sample_every must be an integer of at least 1, got {sample_every!r}")
        self.directions: tuple[Direction, ...] = chosen
        self.text_only = bool(text_only)
        self._max_size = max_size
        self._every = sample_every
        self._max_opcode = OP_TEXT if self.text_only else OP_BINARY
        self._countdown = 1  # the first eligible frame is wanted

    @property
    def max_size(self) -> int:
        """Largest payload, in bytes, that is skimmed."""
        return self._max_size

    @property
    def sample_every(self) -> int:
        """One eligible frame in this many is wanted."""
        return self._every

    def taps(self, direction: Direction) -> bool:
        """Whether frames going ``direction`` are skimmed at all (ask once per pump)."""
        return direction in self.directions

    def wants(self, opcode: int, size: int) -> bool:
        """Whether to skim a frame with this ``opcode`` and payload ``size``; advances the sampling.

        Decide before unmasking or copying. No allocation (for ``sample_every`` up to 256, CPython's
        cached small integers) and about 100 ns per call.
        """
        if size > self._max_size or not 0 < opcode <= self._max_opcode:
            return False
        left = self._countdown - 1
        if left:
            self._countdown = left
            return False
        self._countdown = self._every
        return True

    def copy(self) -> SkimFilter:
        """A filter with the same settings and a fresh sampling count (its first eligible frame is wanted)."""
        return SkimFilter(self._max_size, self._every, self.directions, self.text_only)

    def __repr__(self) -> str:
        return (
            f"SkimFilter(max_size={self._max_size}, sample_every={self._every}, "
            f"directions={self.directions!r}, text_only={self.text_only})"
        )


class _SseFrame(msgspec.Struct, omit_defaults=True):
    client: str
    backend: str
    direction: str
    opcode: int
    time: float
    size: int
    text: str | None = None
    base64: str | None = None


_sse_encoder: Final = msgspec.json.Encoder()


def frame_to_sse(frame: SkimFrame) -> bytes:
    """Render ``frame`` as one server-sent event for the live tap (``GET /api/v1/clients/{id}/tap``).

    The event is named after the direction and carries one JSON object on one ``data:`` line
    (JSON escapes every newline, so a payload can never end the event early)::

        event: up
        data: {"client":"c-1","backend":"game-1","direction":"up","opcode":1,"time":12.5,"size":2,"text":"hi"}

    A text payload is given as ``text`` (invalid UTF-8 replaced by U+FFFD), a binary one as
    ``base64``. ``time`` is the trio clock (seconds, monotonic), as in `SkimFrame.time`.
    """
    payload = frame.payload
    record = _SseFrame(
        client=frame.client_id,
        backend=frame.backend,
        direction=frame.direction,
        opcode=frame.opcode,
        time=frame.time,
        size=len(payload),
    )
    if frame.opcode == OP_TEXT:
        record.text = payload.decode("utf-8", "replace")
    else:
        record.base64 = base64.b64encode(payload).decode("ascii")
    return b"event: " + frame.direction.encode("ascii") + b"\ndata: " + _sse_encoder.encode(record) + b"\n\n"
