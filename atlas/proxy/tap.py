"""The skim tap: connects each session's frame scanners to the skim dispatcher.

The scanner calls the tap for each whole message its pre-filter wants (``atlas.skim.SkimFilter``, one
copy per scanner so every client is sampled evenly), with the payload already unmasked; the tap wraps it
in a ``SkimFrame`` and offers it to the dispatcher, which drops and counts when full. Nothing here can
block the relay. A link installed later (failover, transfer) gets its down tap through the session's
``on_link`` hook.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from atlas.skim import Direction, SkimFilter, SkimFrame

if TYPE_CHECKING:
    from atlas.proxy.session import BackendLink, ClientSession
    from atlas.runtime import Runtime

__all__ = ["SkimTaps"]


class SkimTaps:
    """Attaches and detaches the skim tap of each session (one instance per listener)."""

    def __init__(self, runtime: Runtime) -> None:
        config = runtime.config.skim
        self._dispatcher = runtime.skim
        self._filter = SkimFilter(
            max_size=config.max_size,
            sample_every=config.sample_every,
            directions=config.directions,
            text_only=config.text_only,
        )
        self._up = self._dispatcher is not None and self._filter.taps("up")
        self._down = self._dispatcher is not None and self._filter.taps("down")

    def attach(self, session: ClientSession) -> None:
        """Tap a new session's up direction and its current link, and every link it gets later."""
        if self._up:
            session.up.set_tap(self._tap(session, "up"), self._filter.copy())
        if self._down:
            session.on_link = lambda link: self._attach_down(session, link)
            self._attach_down(session, session.link)

    def detach(self, session: ClientSession) -> None:
        """The session ended: end its live taps (``GET /api/v1/clients/{id}/tap``)."""
        if self._dispatcher is not None:
            self._dispatcher.close_client(session.client_id)

    def _attach_down(self, session: ClientSession, link: BackendLink) -> None:
        link.scanner.set_tap(self._tap(session, "down"), self._filter.copy())

    def _tap(self, session: ClientSession, direction: Direction) -> Callable[[int, bytes], None]:
        assert self._dispatcher is not None
        offer = self._dispatcher.offer
        # The run's clock itself: the same time as trio.current_time() for less than half its cost
        # (no look-up of the run context per message).
        now = trio.lowlevel.current_clock().current_time
        client_id = session.client_id

        def tap(opcode: int, payload: bytes) -> None:
            offer(SkimFrame(client_id, session.link.backend.name, direction, opcode, payload, now()))

        return tap
