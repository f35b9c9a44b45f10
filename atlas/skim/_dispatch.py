"""The skim dispatcher: from the relay's tap to the analyzers and live taps, without ever waiting.

Theory of operation
-------------------
::

    relay ──offer()──► input queue (bounded) ──fan-out task──┬─► F.feed(frame, emit)  (a call, no task)
      a full queue drops the frame                            ├─► analyzer A's channel ─► A.run
      and counts it (dropped_input)                           ├─► analyzer B's channel ─► B.run
                                                              └─► live taps of that client
                                                                send_nowait each: a full channel
                                                                drops for that reader only

Every hand-over is an append to a bounded queue, a call, or a ``send_nowait`` on a bounded memory
channel, so nothing downstream can make the relay wait: `Dispatcher.offer` is synchronous, never
checkpoints and never raises. A stuck analyzer fills its own channel and then loses frames (counted
per analyzer) while the others, the live taps and the input keep flowing. Analyzers run in the
nursery `Dispatcher.serve` opens; one that raises is logged and stops alone. Events reach the
``on_event`` sink through a synchronous callback, so they cannot block either; a sink that raises
`trio.WouldBlock` drops the event (counted).

Cost. Every ``await channel.receive()`` is a trio checkpoint, a round through the scheduler, even when
a frame is waiting; at thousands of skimmed messages a second those rounds cost more than the
analysis itself. So the fan-out takes what is queued in batches: it parks while the input queue is
empty, the first `offer` wakes it, and it then hands on everything queued then, with a checkpoint
only every ``_SLICE`` (32) frames: a batch of hundreds of frames would otherwise hold the trio thread
for a millisecond or more, and every relayed message would wait behind it (tail latency); frames offered
during those checkpoints wait for the next batch. While frames keep
coming it then pauses ``batch_interval`` (10 ms) between batches, or until the queue is half full,
so that a busy relay pays for one wake-up of the fan-out per interval rather than one per round of
the trio loop (a wake-up is often a round of its own: tens of microseconds). An analyzer with a
synchronous ``feed`` (the built-in ones) is called directly from that loop instead of being woken
through a channel of its own. The input is a plain ``deque`` with a `trio.lowlevel.ParkingLot`
rather than a memory channel because `offer` runs in the relay's task for every skimmed message:
an append costs about a third of ``send_nowait``, and waking the fan-out is paid once per batch.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Final

import attrs
import trio

from atlas.skim._analyzer import Analyzer, EventSink, SkimEvent, _feed_problem
from atlas.skim._frames import SkimFrame

__all__ = ["AnalyzerState", "AnalyzerStatistics", "Dispatcher", "DispatcherStatistics"]

log = logging.getLogger("atlas.skim")

_DEFAULT_SIZE: Final = 1024
_DEFAULT_ANALYZER_BUFFER: Final = 256
_DEFAULT_TAP_BUFFER: Final = 64
_DEFAULT_BATCH_INTERVAL: Final = 0.01
_SLICE: Final = 32
"""Frames the fan-out hands on between two checkpoints (~0.1 ms of analysis with the built-in ones)."""


class AnalyzerState(enum.Enum):
    """Where an analyzer task stands."""

    RUNNING = "running"
    """Its ``run`` is reading frames."""
    FINISHED = "finished"
    """Its ``run`` returned; it gets no more frames."""
    FAILED = "failed"
    """Its ``run`` raised (logged); it gets no more frames."""
    STOPPED = "stopped"
    """Skimming stopped (`Dispatcher.serve` ended) while it was running."""


@attrs.frozen
class AnalyzerStatistics:
    """One analyzer's counters (see `DispatcherStatistics.analyzers`)."""

    name: str
    state: AnalyzerState
    #: Frames put in its channel.
    delivered: int
    #: Frames dropped because its channel was full.
    dropped: int
    #: Frames waiting in its channel now.
    queued: int


@attrs.frozen
class DispatcherStatistics:
    """A snapshot of a `Dispatcher` (see `Dispatcher.statistics`)."""

    #: Frames the relay offered (``atlas_skim_offered_total``).
    offered: int
    #: Frames dropped because the input queue was full (``atlas_skim_dropped_total``).
    dropped_input: int
    #: Frames taken from the input queue and handed on to the analyzers and taps.
    delivered: int
    #: Frames waiting in the input queue now.
    queued: int
    #: Per analyzer, in the order they were given to `Dispatcher.serve`.
    analyzers: tuple[AnalyzerStatistics, ...]
    #: Live taps open now, and frames copied to them or dropped because a tap's channel was full.
    subscribers: int
    tap_delivered: int
    tap_dropped: int
    #: Events analyzers emitted; of those, dropped by the sink (`trio.WouldBlock`) or lost to an
    #: exception in the sink.
    events: int
    events_dropped: int
    event_errors: int

    @property
    def dropped_per_analyzer(self) -> dict[str, int]:
        """Frames each analyzer lost to a full channel, by name (``atlas_skim_analyzer_dropped_total``)."""
        return {each.name: each.dropped for each in self.analyzers}


_Feed = Callable[[SkimFrame, EventSink], None]


class _Lane:
    """One analyzer and how frames reach it: its ``feed`` method, or the sending end of its channel."""

    __slots__ = ("analyzer", "delivered", "dropped", "feed", "send", "state")

    def __init__(
        self, analyzer: Analyzer, send: trio.MemorySendChannel[SkimFrame] | None, feed: _Feed | None
    ) -> None:
        self.analyzer = analyzer
        self.send = send
        self.feed = feed
        self.state = AnalyzerState.RUNNING
        self.delivered = 0
        self.dropped = 0


def _check_size(what: str, value: int) -> int:
    if type(value) is not int or value < 1:
        raise ValueError(f"{what} must be an integer of at least 1, got {value!r}")
    return value


def _check_interval(value: float) -> float:
    if type(value) not in (int, float) or not 0 <= value <= 1:
        raise ValueError(f"batch_interval must be a number of seconds from 0 to 1, got {value!r}")
    return float(value)


class Dispatcher:
    """Takes the frames the relay offers and fans them out to analyzers and live taps.

    One per process. ``size`` bounds the input queue the relay offers to; ``analyzer_buffer`` each
    analyzer's channel; ``tap_buffer`` each live tap's channel (by default); ``batch_interval`` is
    the pause between two batches while frames keep coming. ``on_event`` receives every event the
    analyzers emit (a public attribute: it may be set after construction); None discards them. It
    must return at once; ``some_send_channel.send_nowait`` is a good sink.

    The relay calls `offer`; `serve` runs the analyzers and the fan-out until cancelled (start it with
    ``nursery.start``); the ops API uses `subscribe` for ``GET /api/v1/clients/{id}/tap`` and the
    session's end calls `close_client`.
    """

    def __init__(
        self,
        size: int = _DEFAULT_SIZE,
        *,
        analyzer_buffer: int = _DEFAULT_ANALYZER_BUFFER,
        tap_buffer: int = _DEFAULT_TAP_BUFFER,
        on_event: EventSink | None = None,
        batch_interval: float = _DEFAULT_BATCH_INTERVAL,
    ) -> None:
        """Set up the input queue; `serve` starts the analyzers.

        ``batch_interval`` (seconds) paces the fan-out while frames keep coming: after handing on a
        batch it waits that long before the next (or until half of ``size`` is queued), so that
        frames gather into bigger batches; the first frame after a quiet spell still goes at once.
        0 hands each batch on as soon as the fan-out can run.

        Raises:
            ValueError: a size below 1, or ``batch_interval`` outside [0, 1].
        """
        self.size = _check_size("size", size)
        self.analyzer_buffer = _check_size("analyzer_buffer", analyzer_buffer)
        self.tap_buffer = _check_size("tap_buffer", tap_buffer)
        self.batch_interval = _check_interval(batch_interval)
        self.on_event = on_event
        self._input: collections.deque[SkimFrame] = collections.deque()
        # The fan-out parks here when the input is empty (_idle) and in its pause between two batches
        # (_pausing); offer() wakes it for the first frame, or in the pause once the queue is half full.
        self._wakeup = trio.lowlevel.ParkingLot()
        self._idle = False
        self._pausing = False
        self._lanes: tuple[_Lane, ...] = ()
        # The running analyzers with a feed method, and those with a channel still being read.
        self._feeders: tuple[tuple[_Lane, _Feed], ...] = ()
        self._active: tuple[tuple[_Lane, trio.MemorySendChannel[SkimFrame]], ...] = ()
        self._taps: dict[str, list[trio.MemorySendChannel[SkimFrame]]] = {}
        self._serving = False
        self._offered = 0
        self._dropped_input = 0
        self._tap_delivered = 0
        self._tap_dropped = 0
        self._events = 0
        self._events_dropped = 0
        self._event_errors = 0

    # -- the relay's side -------------------------------------------------------------------------

    def offer(self, frame: SkimFrame) -> bool:
        """Hand ``frame`` to the tap without waiting: True if it was queued, False if it was dropped.

        Synchronous, never a checkpoint, never raises. Up to ``size`` frames wait in the input
        queue; frames offered while `serve` is not running wait there too.
        """
        self._offered += 1
        queue = self._input
        if len(queue) >= self.size:
            self._dropped_input += 1
            return False
        queue.append(frame)
        if self._idle:  # the first frame after a quiet spell wakes the fan-out
            self._idle = False
            self._wakeup.unpark()
        elif self._pausing and len(queue) >= self.size // 2:  # too many to wait for the pause to end
            self._pausing = False
            self._wakeup.unpark()
        return True

    def is_tapped(self, client_id: str) -> bool:
        """Whether a live tap is watching ``client_id`` (the relay may skip sampling for it)."""
        return client_id in self._taps

    def close_client(self, client_id: str) -> None:
        """End the live taps of ``client_id`` (its session ended): they read what is queued, then the end."""
        for send in self._taps.pop(client_id, ()):
            send.close()

    # -- the analyzers' side ----------------------------------------------------------------------

    async def serve(
        self,
        analyzers: Iterable[Analyzer],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run ``analyzers`` and the fan-out until cancelled; reports readiness through ``task_status``.

        Opens its own nursery: one fan-out task, and one task per analyzer that has no ``feed``
        method (an analyzer with one is called from the fan-out instead; see `Analyzer`). May be run
        again after it ended (with new counters per analyzer), but not twice at once.

        Raises:
            ValueError: two analyzers have the same name, or one has an ``async`` ``feed``.
            RuntimeError: `serve` is already running.
        """
        if self._serving:
            raise RuntimeError("this Dispatcher is already serving")
        analyzers = list(analyzers)
        names = collections.Counter(analyzer.name for analyzer in analyzers)
        twice = [name for name, count in names.items() if count > 1]
        if twice:
            raise ValueError(f"analyzer names must be unique; {twice[0]!r} is used {names[twice[0]]} times")
        for analyzer in analyzers:
            problem = _feed_problem(analyzer)
            if problem is not None:
                raise ValueError(f"analyzer {analyzer.name!r}: {problem}")
        self._serving = True
        lanes: list[_Lane] = []
        try:
            async with trio.open_nursery() as nursery:
                for analyzer in analyzers:
                    feed: _Feed | None = getattr(analyzer, "feed", None)
                    if feed is not None:
                        lanes.append(_Lane(analyzer, None, feed))
                        continue
                    send, receive = trio.open_memory_channel[SkimFrame](self.analyzer_buffer)
                    lane = _Lane(analyzer, send, None)
                    lanes.append(lane)
                    nursery.start_soon(
                        self._run_analyzer, lane, receive, name=f"skim analyzer {analyzer.name}"
                    )
                self._lanes = tuple(lanes)
                self._feeders = tuple((lane, lane.feed) for lane in lanes if lane.feed is not None)
                self._active = tuple((lane, lane.send) for lane in lanes if lane.send is not None)
                nursery.start_soon(self._fan_out, name="skim fan-out")
                task_status.started()
        finally:
            self._serving = False
            self._feeders = self._active = ()
            for lane in lanes:
                if lane.send is not None:
                    lane.send.close()
                if lane.state is AnalyzerState.RUNNING:
                    lane.state = AnalyzerState.STOPPED

    async def _run_analyzer(self, lane: _Lane, frames: trio.MemoryReceiveChannel[SkimFrame]) -> None:
        name = lane.analyzer.name
        # Closing our end (whatever happens) makes the fan-out's send_nowait raise BrokenResourceError,
        # which retires the lane.
        with frames:
            try:
                await lane.analyzer.run(frames, self._emit)
            except Exception:
                self._failed(lane)
                return
        lane.state = AnalyzerState.FINISHED
        log.info("skim analyzer %s finished", name, extra={"analyzer": name, "event": "analyzer_finished"})

    def _failed(self, lane: _Lane) -> None:
        """``lane``'s analyzer raised, in ``run`` or ``feed`` (the exception being handled): retire it."""
        lane.state = AnalyzerState.FAILED
        self._feeders = tuple(each for each in self._feeders if each[0] is not lane)
        name = lane.analyzer.name
        log.exception(
            "skim analyzer %s failed; it gets no more frames",
            name,
            extra={"analyzer": name, "event": "analyzer_failed"},
        )

    async def _fan_out(self) -> None:
        queue = self._input
        take = queue.popleft
        emit = self._emit
        taps = self._taps
        interval = self.batch_interval
        while True:
            # One checkpoint per batch: park until offer() wakes us; or, with frames queued, the
            # pause after the last batch was one; or (no pause: frames left from before serve
            # started, or offered by a sink during the last batch) yield once, so that the fan-out
            # never holds the trio thread for more than one batch.
            if not queue:
                self._idle = True
                await self._wakeup.park()
            elif not interval:
                await trio.lowlevel.checkpoint()
            # The batch: what is queued now, without a checkpoint per frame but with one per slice, so
            # that the relay runs between slices (a long batch would hold the trio thread for ms).
            for i in range(len(queue)):
                if i and not i % _SLICE:
                    await trio.lowlevel.checkpoint()
                frame = take()
                for lane, feed in self._feeders:
                    lane.delivered += 1
                    try:
                        feed(frame, emit)
                    except Exception:
                        self._failed(lane)
                for lane, send in self._active:
                    try:
                        send.send_nowait(frame)
                    except trio.WouldBlock:
                        lane.dropped += 1
                    except trio.BrokenResourceError:
                        self._active = tuple(each for each in self._active if each[0] is not lane)
                    else:
                        lane.delivered += 1
                readers = taps.get(frame.client_id)
                if readers:
                    self._to_taps(frame, readers)
            if interval:
                # Let the next batch gather: frames offered meanwhile wait, until the pause ends or
                # the queue is half full. Their time was taken by the relay, so analysis is not
                # skewed; only the hand-over is up to one interval later.
                self._pausing = True
                with trio.move_on_after(interval):
                    await self._wakeup.park()
                self._pausing = False

    def _to_taps(self, frame: SkimFrame, readers: list[trio.MemorySendChannel[SkimFrame]]) -> None:
        for send in readers:
            try:
                send.send_nowait(frame)
            except trio.WouldBlock:
                self._tap_dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the reader went away; subscribe() removes it on exit
            else:
                self._tap_delivered += 1

    def _emit(self, event: SkimEvent) -> None:
        self._events += 1
        sink = self.on_event
        if sink is None:
            return
        try:
            sink(event)
        except trio.WouldBlock:
            self._events_dropped += 1
        except Exception:
            self._event_errors += 1
            if self._event_errors == 1:  # later failures are only counted: no log flood per event
                log.exception("skim event sink failed; further failures are only counted")

    # -- the live tap -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def subscribe(
        self, client_id: str, *, size: int | None = None
    ) -> Iterator[trio.MemoryReceiveChannel[SkimFrame]]:
        """Watch the skimmed frames of ``client_id``: yields a bounded receive channel.

        Its size is ``size``, or the dispatcher's ``tap_buffer``. Frames that do not fit are dropped
        for this reader only (``tap_dropped``). The channel ends when `close_client` is called;
        leaving the ``with`` block unsubscribes. A tap sees what the relay offered (after its filter
        and sampling) while `serve` runs.
        """
        send, receive = trio.open_memory_channel[SkimFrame](
            self.tap_buffer if size is None else _check_size("size", size)
        )
        self._taps.setdefault(client_id, []).append(send)
        try:
            with receive:
                yield receive
        finally:
            send.close()
            readers = self._taps.get(client_id)
            if readers is not None and send in readers:
                readers.remove(send)
                if not readers:
                    del self._taps[client_id]

    # -- counters ---------------------------------------------------------------------------------

    def statistics(self) -> DispatcherStatistics:
        """A frozen snapshot of the counters."""
        return DispatcherStatistics(
            offered=self._offered,
            dropped_input=self._dropped_input,
            delivered=self._offered - self._dropped_input - len(self._input),
            queued=len(self._input),
            analyzers=tuple(
                AnalyzerStatistics(
                    name=lane.analyzer.name,
                    state=lane.state,
                    delivered=lane.delivered,
                    dropped=lane.dropped,
                    queued=0 if lane.send is None else lane.send.statistics().current_buffer_used,
                )
                for lane in self._lanes
            ),
            subscribers=sum(len(readers) for readers in self._taps.values()),
            tap_delivered=self._tap_delivered,
            tap_dropped=self._tap_dropped,
            events=self._events,
            events_dropped=self._events_dropped,
            event_errors=self._event_errors,
        )
