"""The directory of live client sessions: ids, lookups and counts for the relay and the ops plane."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import attrs
import trio

from atlas.proxy.session import ClientSession

__all__ = ["ClientRegistry", "ClientStatistics", "TrafficTotals"]


@attrs.frozen
class TrafficTotals:
    """Messages and bytes relayed each way, over live and ended sessions."""

    messages_up: int = 0
    messages_down: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


@attrs.frozen
class ClientStatistics:
    """A snapshot of the registry's counters."""

    active: int
    accepted_total: int
    refused_total: int


class ClientRegistry:
    """Live sessions by client id.

    Client ids are ``<node prefix>-<counter>``: unique within the process and, through the random prefix,
    across Atlas processes and restarts, so a backend never sees the same id for two players.
    """

    def __init__(self, *, prefix: str | None = None) -> None:
        self._prefix = prefix or os.urandom(3).hex()
        self._ids = itertools.count(1)
        self._sessions: dict[str, ClientSession] = {}
        self.accepted_total = 0
        self.refused_total = 0
        self._emptied: trio.Event | None = None
        # Traffic of sessions that have ended (live ones are read from the sessions themselves).
        self._ended = TrafficTotals()

    def new_id(self) -> str:
        """A fresh client id."""
        return f"{self._prefix}-{next(self._ids)}"

    def add(self, session: ClientSession) -> None:
        """Register a session that has completed both handshakes."""
        self._sessions[session.client_id] = session
        self.accepted_total += 1

    def discard(self, client_id: str) -> None:
        """Forget a session (safe to call twice), keeping its traffic in the totals."""
        session = self._sessions.pop(client_id, None)
        if session is not None:
            ended = self._ended
            self._ended = TrafficTotals(
                ended.messages_up + session.messages_up,
                ended.messages_down + session.messages_down,
                ended.bytes_up + session.bytes_up,
                ended.bytes_down + session.bytes_down,
            )
        if not self._sessions and self._emptied is not None:
            self._emptied.set()

    async def wait_empty(self) -> None:
        """Return once no session is live (the caller bounds the wait)."""
        while self._sessions:
            self._emptied = trio.Event()
            await self._emptied.wait()

    def get(self, client_id: str) -> ClientSession | None:
        """The session with this id, if it is live."""
        return self._sessions.get(client_id)

    def __iter__(self) -> Iterator[ClientSession]:
        return iter(list(self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)

    def traffic_totals(self) -> TrafficTotals:
        """Messages and bytes relayed each way so far, by every session live or ended."""
        ended = self._ended
        live = list(self._sessions.values())
        return TrafficTotals(
            ended.messages_up + sum(s.messages_up for s in live),
            ended.messages_down + sum(s.messages_down for s in live),
            ended.bytes_up + sum(s.bytes_up for s in live),
            ended.bytes_down + sum(s.bytes_down for s in live),
        )

    def statistics(self) -> ClientStatistics:
        """Counters as a frozen snapshot."""
        return ClientStatistics(
            active=len(self._sessions),
            accepted_total=self.accepted_total,
            refused_total=self.refused_total,
        )
