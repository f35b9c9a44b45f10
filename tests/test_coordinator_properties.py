"""The seven transfer guarantees (DESIGN.md section 4) through the coordinator, under random timing.

Real :class:`ClientSession` relays and the real :class:`TransferCoordinator`, on memory streams and
virtual time. The game servers are scripted fakes: their data links stream numbered messages to the
client and record what the client sent; their control channels (a duck-typed WebSocket under a real
:class:`ControlChannel`) answer each transfer step as hypothesis says: at once, late, with a refusal,
never (the step times out) or by dropping the channel. Servers without a channel get blind transfers.
Hypothesis also picks how many clients there are, when transfers are asked for (often for a client that
is already being moved), where to, and whether opening the link to the target fails.

After every example the fakes' records are checked against the guarantees:

1. no client connection was closed;
2. every client message reached exactly one backend, in order, and never a backend that did not own
   the client at the time (an SDK source never gets more than the ``delivered`` Atlas reported);
3. each client got, per link it was on, a gap-free prefix of what that link sent, links in the order
   they owned the client, none after its successor; after an SDK cut exactly ``sent`` from the source;
4. every committed SDK transfer told the source (notice, begin, complete) and the target (prepare,
   commit with the source's state), and the target received no client message before it committed;
5. every transfer ended within its deadline (plus the bounded rollback); a rolled back one left the
   client on its source and told both servers whose channel was up;
6. when a transfer returns, the link it gave up (the source's, or the target's on rollback) is closed
   and its scope cancelled;
7. a request for a client already being moved is refused with that reason, and one client's transfers
   never overlap.
"""

from __future__ import annotations

import collections
import itertools
from typing import Any, Literal

import attrs
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import event as note
from hypothesis import strategies as st
from trio.testing import MockClock, memory_stream_pair, wait_all_tasks_blocked
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, TextMessage

from atlas.config import Config, FailoverConfig, ProxyConfig, ServerConfig, TransferConfig
from atlas.control import messages
from atlas.control.channel import ControlChannel, ControlChannels
from atlas.control.coordinator import TransferCoordinator, TransferOutcome, TransferRefused
from atlas.control.lifecycle import TransferReason
from atlas.errors import HandshakeError
from atlas.pool import Backend
from atlas.proxy.frames import FrameScanner
from atlas.proxy.session import BackendLink, ClientSession
from atlas.runtime import Runtime

SERVERS = ("b1", "b2", "b3")
TIMEOUT = 1.0  # [transfer] timeout
CLOSE_TIMEOUT = 0.5
SLOW = 0.4  # a late answer: within the timeout alone, past it when three steps are late
MAX_MESSAGE = 1 << 16
TICK = 0.02  # how often a server link sends the client a message
MAX_SENT = 400  # the most one link or client sends (bounds every loop)

Behaviour = Literal["ok", "slow", "refuse", "silent", "drop"]
LinkBehaviour = Literal["ok", "slow", "fail"]

REFUSALS = ("already being transferred", "is already on", "cannot be moved now", "cannot take a client")


@attrs.define(eq=False)
class ServerLink:
    """A game server's end of one client's data link: streams numbered messages, records the client's."""

    name: str
    server: FakeServer
    client: str
    transfer: str | None
    atlas_side: BackendLink
    stream: trio.StapledStream[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream]
    ws: Connection = attrs.Factory(lambda: Connection(ConnectionType.SERVER))
    received: list[str] = attrs.Factory(list)
    sent: int = 0
    sending: bool = False
    committed: bool = False
    stopped_for: str | None = None
    """The transfer for which this (source) link stopped sending: it resumes if that one is aborted."""
    closing: bool = False
    died: bool = False
    ended: bool = False
    arrival: trio.Event = attrs.Factory(trio.Event)
    """Set (and replaced) at each client message."""

    async def run(self, stop: trio.Event) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stream_out, stop)
            await self._read()
            nursery.cancel_scope.cancel()
        self.ended = True

    async def die(self) -> None:
        """Vanish without a Close, as a crashed server: what Atlas sent and this end did not read is lost."""
        self.closing = self.died = True
        self.sending = False
        await self.stream.aclose()

    async def _read(self) -> None:
        while True:
            try:
                data = await self.stream.receive_some()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            self.ws.receive_data(bytes(data) or None)
            for event in self.ws.events():
                if isinstance(event, TextMessage):
                    self._from_client(event.data)
                elif isinstance(event, CloseConnection):
                    self.closing = True
                    # Answer Atlas's Close and close the connection, as a server does.
                    await self._send_raw(self.ws.send(event.response()))
                    await self.stream.aclose()
                    return
            if not data:
                return

    def _from_client(self, text: str) -> None:
        if self.transfer is not None and self.transfer in self.server.prepared and not self.committed:
            self.server.violations.append(f"{self.name} got {text} before it committed")
        self.received.append(text)
        self.arrival.set()
        self.arrival = trio.Event()

    async def _stream_out(self, stop: trio.Event) -> None:
        while not stop.is_set() and self.sent < MAX_SENT:
            if self.sending and not self.ended:
                data = self.ws.send(TextMessage(data=f"{self.name}:{self.sent}"))
                self.sent += 1  # counted before the await: the count is what the source reports
                if not await self._send_raw(data):
                    return
            await trio.sleep(TICK)

    async def _send_raw(self, data: bytes) -> bool:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True


@attrs.define(eq=False)
class FakeServer:
    """A game server: its data links, and (when ``controlled``) a scripted control channel."""

    name: str
    controlled: bool
    script: list[Behaviour]
    nursery: trio.Nursery
    channels: ControlChannels
    handed: dict[str, Any]
    channel: ControlChannel | None = None
    dropped: bool = False
    control_log: list[messages.AtlasMessage] = attrs.Factory(list)
    links: list[ServerLink] = attrs.Factory(list)
    pending: dict[str, ServerLink] = attrs.Factory(dict)
    """Links opened for a transfer, by transfer id."""
    prepared: set[str] = attrs.Factory(set)
    aborted: set[str] = attrs.Factory(set)
    violations: list[str] = attrs.Factory(list)

    def connect(self) -> None:
        if self.controlled:
            self.channel = ControlChannel(
                backend=self.name,
                ws=self,  # type: ignore[arg-type]  # duck-typed: send_message is all a channel sends with
                welcome=messages.Welcome(version=messages.PROTOCOL_VERSION, server=self.name),
                on_request=self.channels.on_request,
            )
            self.channels._set(self.channel)
            self.nursery.start_soon(self.channel.serve_writes)

    async def send_message(self, text: str) -> None:
        """What the control channel sends: handled in a task of its own, as a server would."""
        message = messages.decode_from_atlas(text)
        self.control_log.append(message)
        if isinstance(message, messages.TransferPrepare):
            self.prepared.add(message.transfer)
        if isinstance(message, messages.TransferPrepare | messages.TransferBegin | messages.TransferCommit):
            behaviour = self.script.pop(0) if self.script else "ok"
            self.nursery.start_soon(self._answer, message, behaviour)
        elif isinstance(message, messages.TransferAbort):
            self.aborted.add(message.transfer)
            target_link = self.pending.pop(message.transfer, None)
            if target_link is not None:  # the target forgets the player (even if it had committed)
                target_link.committed = target_link.sending = False
            for link in self.links:
                if link.stopped_for == message.transfer:  # the source carries on with its player
                    link.stopped_for = None
                    link.sending = True

    def current(self, client: str) -> ServerLink | None:
        """The link through which this server serves ``client`` now, if any."""
        return next(
            (
                link
                for link in reversed(self.links)
                if link.client == client
                and not link.closing
                and (link.transfer is None or link.committed or link.transfer not in self.prepared)
            ),
            None,
        )

    async def _answer(self, message: Any, behaviour: Behaviour) -> None:
        if behaviour == "silent":
            return
        if behaviour == "drop":
            assert self.channel is not None
            self.dropped = True
            self.channel._drop()
            self.channels._unset(self.channel)
            # As the SDK does when its control channel closes: every transfer through it rolls back.
            for step in self.control_log:
                transfer = getattr(step, "transfer", None)
                if transfer is not None:
                    self.aborted.add(transfer)
            for source_link in self.links:
                if source_link.stopped_for is not None:
                    source_link.stopped_for = None
                    source_link.sending = True
            return
        if behaviour == "slow":
            await trio.sleep(SLOW)
        if message.transfer in self.aborted:
            return
        reply: messages.ServerMessage
        if behaviour == "refuse":
            reply = messages.TransferReject(transfer=message.transfer, reason="scripted refusal")
        elif isinstance(message, messages.TransferPrepare):
            reply = messages.TransferReady(transfer=message.transfer)
        elif isinstance(message, messages.TransferBegin) and (link := self.current(message.client)) is None:
            reply = messages.TransferReject(transfer=message.transfer, reason="no such player here")
        elif isinstance(message, messages.TransferBegin):
            assert link is not None
            # The SDK snapshots once it has every message Atlas says it delivered; never more.
            with trio.move_on_after(TIMEOUT):
                while len(link.received) < message.delivered:
                    await link.arrival.wait()
            if len(link.received) != message.delivered and not link.died:
                self.violations.append(
                    f"{link.name}: delivered {message.delivered}, received {len(link.received)}"
                )
            link.sending = False
            link.stopped_for = message.transfer
            state = {"transfer": message.transfer, "from": link.name, "sent": link.sent}
            self.handed[message.transfer] = state
            reply = messages.TransferState(transfer=message.transfer, state=state, sent=link.sent)
        else:
            assert isinstance(message, messages.TransferCommit)
            if message.state != self.handed.get(message.transfer):
                self.violations.append(f"{self.name}: commit {message.transfer} with the wrong state")
            link = self.pending[message.transfer]
            link.committed = link.sending = True
            reply = messages.TransferCommitted(transfer=message.transfer)
        assert self.channel is not None
        if self.channel.ready:
            self.channel._dispatch(reply)


@attrs.define(eq=False)
class FakeProvider:
    """Opens links to the fake servers (and fails or dawdles as scripted)."""

    runtime: Runtime
    servers: dict[str, FakeServer]
    nursery: trio.Nursery
    stop: trio.Event
    script: list[LinkBehaviour]
    coordinator: TransferCoordinator | None = None
    links: list[ServerLink] = attrs.Factory(list)
    by_atlas_side: dict[int, ServerLink] = attrs.Factory(dict)
    _numbers: Any = attrs.Factory(itertools.count)

    def open(self, server: FakeServer, client: str, transfer: str | None) -> BackendLink:
        near, far = memory_stream_pair()
        backend = self.runtime.pool.get(server.name)
        assert backend is not None
        atlas_side = BackendLink(
            backend=backend, stream=near, scanner=FrameScanner(masked=False, max_message_size=MAX_MESSAGE)
        )
        link = ServerLink(
            name=f"{server.name}#{next(self._numbers)}",
            server=server,
            client=client,
            transfer=transfer,
            atlas_side=atlas_side,
            stream=far,
        )
        if transfer is None:
            link.sending = True
        elif transfer in server.prepared:
            server.pending[transfer] = link  # an SDK target: it sends once it committed
        else:
            link.sending = True  # blind: a plain server greets its new connection at once
        self.links.append(link)
        server.links.append(link)
        self.by_atlas_side[id(atlas_side)] = link
        self.nursery.start_soon(link.run, self.stop)
        return atlas_side

    async def open_link_to(self, backend: Backend, *, transfer: str, subprotocol: str | None) -> BackendLink:
        behaviour = self.script.pop(0) if self.script else "ok"
        if behaviour == "fail":
            raise HandshakeError(502, "scripted connect failure")
        if behaviour == "slow":
            await trio.sleep(SLOW)
        assert self.coordinator is not None
        client = next(r.client_id for r in self.coordinator.active.values() if r.id == transfer)
        return self.open(self.servers[backend.name], client, transfer)

    def link_closed(self, link: BackendLink) -> None:
        pass

    def failed_over(self, session: ClientSession, old: BackendLink, new: BackendLink | None) -> None:
        assert new is not None  # a server is always left to fail over to


@attrs.define(eq=False)
class ClientLinks:
    """One client's link provider: the shared one, plus failover through the coordinator (as Atlas's)."""

    shared: FakeProvider
    client: str

    async def open_link(self, exclude: frozenset[str]) -> BackendLink:
        async def connect() -> BackendLink:
            name = next(name for name in SERVERS if name not in exclude)
            return self.shared.open(self.shared.servers[name], self.client, None)

        assert self.shared.coordinator is not None
        return await self.shared.coordinator.fail_over(self.client, ",".join(sorted(exclude)), connect)

    async def open_link_to(self, backend: Backend, *, transfer: str, subprotocol: str | None) -> BackendLink:
        return await self.shared.open_link_to(backend, transfer=transfer, subprotocol=subprotocol)

    def link_closed(self, link: BackendLink) -> None:
        self.shared.link_closed(link)

    def failed_over(self, session: ClientSession, old: BackendLink, new: BackendLink | None) -> None:
        self.shared.failed_over(session, old, new)


@attrs.define(eq=False)
class FakeClient:
    """A game client: streams numbered messages, records what it receives."""

    name: str
    stream: trio.StapledStream[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream]
    ws: Connection = attrs.Factory(lambda: Connection(ConnectionType.CLIENT))
    sent: int = 0
    received: list[str] = attrs.Factory(list)
    closed: bool = False

    async def stream_out(self, interval: float, stop: trio.Event) -> None:
        while not stop.is_set() and self.sent < MAX_SENT:
            data = self.ws.send(TextMessage(data=f"{self.name}:{self.sent}"))
            self.sent += 1
            await self.stream.send_all(data)
            await trio.sleep(interval)

    async def read(self) -> None:
        while True:
            data = await self.stream.receive_some()
            self.ws.receive_data(bytes(data) or None)
            for event in self.ws.events():
                if isinstance(event, TextMessage):
                    self.received.append(event.data)
                elif isinstance(event, CloseConnection):
                    self.closed = True
                    await self.stream.send_all(self.ws.send(event.response()))
                    return
            if not data:
                return


@attrs.frozen
class Ask:
    client: int
    target: int
    at: float
    reason: TransferReason


@attrs.frozen
class Done:
    ask: Ask
    client: str
    started: float
    ended: float
    outcome: TransferOutcome | None
    refused: str | None
    gave_up: list[BackendLink]
    """The links the transfer left behind: the source's if it committed, the target's if not."""


behaviours = st.lists(st.sampled_from(["ok", "ok", "slow", "refuse", "silent", "drop"]), max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    clients=st.integers(1, 3),
    controlled=st.lists(st.sampled_from([True, True, True, False]), min_size=3, max_size=3),
    scripts=st.lists(behaviours, min_size=3, max_size=3),
    link_script=st.lists(st.sampled_from(["ok", "ok", "ok", "slow", "fail"]), max_size=6),
    asks=st.lists(
        st.builds(
            Ask,
            client=st.integers(0, 2),
            target=st.sampled_from([0, 1, 1, 2, 2]),
            at=st.sampled_from([0.0, 0.001, 0.05, 0.3, 0.7, 1.2, 2.0]),
            reason=st.sampled_from([r for r in TransferReason if r is not TransferReason.FAILOVER]),
        ),
        min_size=1,
        max_size=8,
    ),
    client_interval=st.sampled_from([0.005, 0.03, 0.1]),
    deaths=st.lists(st.tuples(st.integers(0, 2), st.sampled_from([0.0, 0.02, 0.3, 0.6, 1.1])), max_size=2),
)
async def test_coordinator_keeps_the_guarantees_with_misbehaving_servers(
    autojump_clock: MockClock,
    clients: int,
    controlled: list[bool],
    scripts: list[list[Behaviour]],
    link_script: list[LinkBehaviour],
    asks: list[Ask],
    client_interval: float,
    deaths: list[tuple[int, float]],
) -> None:
    config = Config(
        proxy=ProxyConfig(listen="127.0.0.1:0", close_timeout=CLOSE_TIMEOUT),
        servers=tuple(
            ServerConfig(name=name, url=f"ws://127.0.0.1:{9000 + i}") for i, name in enumerate(SERVERS)
        ),
        transfer=TransferConfig(timeout=TIMEOUT),
    )
    runtime = Runtime.from_config(config)
    channels = ControlChannels()
    coordinator = TransferCoordinator(runtime, channels)
    handed: dict[str, Any] = {}
    done: list[Done] = []
    moving: collections.Counter[str] = collections.Counter()  # transfers under way, by client
    stop = trio.Event()
    with trio.fail_after(600):  # virtual time: a hang fails fast
        async with trio.open_nursery() as nursery:
            await nursery.start(coordinator.serve)
            servers = {
                name: FakeServer(name, controlled[i], list(scripts[i]), nursery, channels, handed)
                for i, name in enumerate(SERVERS)
            }
            for server in servers.values():
                server.connect()
            provider = FakeProvider(runtime, servers, nursery, stop, list(link_script), coordinator)
            sessions: list[ClientSession] = []
            fakes: list[FakeClient] = []
            owners: dict[str, list[BackendLink]] = {}
            session_nursery_done = trio.Event()

            async def run_sessions(task_status: trio.TaskStatus[None]) -> None:
                async with trio.open_nursery() as inner:
                    for i in range(clients):
                        name = f"c{i}"
                        near, far = memory_stream_pair()
                        first = provider.open(servers[SERVERS[i % 3]], name, None)
                        session = ClientSession(
                            client_id=name,
                            peer="198.51.100.2:40000",
                            client_stream=near,
                            link=first,
                            provider=ClientLinks(provider, name),
                            failover=FailoverConfig(),
                            max_message_size=MAX_MESSAGE,
                            validate_utf8=True,
                            close_timeout=CLOSE_TIMEOUT,
                        )
                        owners[name] = [first]
                        session.on_link = owners[name].append
                        runtime.clients.add(session)
                        sessions.append(session)
                        fake = FakeClient(name, far)
                        fakes.append(fake)
                        inner.start_soon(session.run)
                        inner.start_soon(fake.read)
                        inner.start_soon(fake.stream_out, client_interval, stop)
                    task_status.started()
                session_nursery_done.set()

            await nursery.start(run_sessions)

            async def ask(a: Ask) -> None:
                await trio.sleep(a.at)
                session = sessions[a.client % clients]
                name = session.client_id
                # Relative to where the client is now: 0 is its own server (refused), 1 and 2 the others.
                target = SERVERS[(SERVERS.index(session.link.backend.name) + a.target) % 3]
                started = trio.current_time()
                before = session.link
                try:
                    request = coordinator.request(name, target, a.reason)
                except TransferRefused as exc:
                    # Guarantee 7: refused as "already being transferred" only while one is.
                    assert ("already being transferred" in str(exc)) is (moving[name] > 0), str(exc)
                    done.append(Done(a, name, started, started, None, str(exc), []))
                    return
                assert moving[name] == 0, "a second transfer of one client started"  # guarantee 7
                moving[name] += 1
                await request.done.wait()
                moving[name] -= 1
                outcome = request.outcome
                assert outcome is not None
                if outcome.committed:
                    gave_up = [before]
                else:
                    gave_up = [
                        link.atlas_side for link in provider.links if link.transfer == request.record.id
                    ]
                done.append(Done(a, name, started, trio.current_time(), outcome, None, gave_up))
                # Guarantee 6: what the transfer gave up is closed by the time it returns.
                for link in gave_up:
                    assert link.closed, f"{outcome.transfer} left {link.backend.name}'s link open"
                    assert link.scope.cancel_called or not outcome.committed

            async def kill(client: int, at: float) -> None:
                """The server end of the client's current link vanishes (no Close): a failover."""
                await trio.sleep(at)
                link = provider.by_atlas_side[id(sessions[client % clients].link)]
                await link.die()

            async with trio.open_nursery() as asking:
                for a in asks:
                    asking.start_soon(ask, a)
                for client, at in deaths:
                    asking.start_soon(kill, client, at)
            await trio.sleep(0.5)  # traffic after the last transfer
            stop.set()
            await trio.sleep(2 * TICK)
            await wait_all_tasks_blocked()

            check_guarantees(sessions, fakes, servers, provider, owners, done)
            for d in done:
                note(describe(d))

            for session in sessions:
                session.close(1001, "test over")
            await session_nursery_done.wait()
            nursery.cancel_scope.cancel()
    for fake in fakes:
        assert fake.closed  # closed by the test, never by a transfer


def check_guarantees(
    sessions: list[ClientSession],
    fakes: list[FakeClient],
    servers: dict[str, FakeServer],
    provider: FakeProvider,
    owners: dict[str, list[BackendLink]],
    done: list[Done],
) -> None:
    for server in servers.values():
        assert server.violations == []
    by_link = provider.by_atlas_side
    for session, fake in zip(sessions, fakes, strict=True):
        name = session.client_id
        # 1: the client's connection is open, on the last link that took it over.
        assert session.ending is None
        assert not fake.closed
        chain = [by_link[id(link)] for link in owners[name]]
        assert session.link is owners[name][-1]
        # 2: each message at exactly one backend, in order; links that never owned the client got none.
        # A failover loses what the dead server had not read yet: a gap, but only right after a dead link.
        expected = [f"{name}:{i}" for i in range(fake.sent)]
        at = 0
        previous_died = False
        for link in chain:
            if link.received:
                start = expected.index(link.received[0])
                assert start == at or (start > at and previous_died), f"{name}: lost before {link.name}"
                assert link.received == expected[start : start + len(link.received)], f"{link.name}"
                at = start + len(link.received)
            previous_died = link.died
        assert at == len(expected) or chain[-1].died, f"{name}: {expected[at:]} never delivered"
        for link in provider.links:
            if link.client == name and link not in chain:
                assert link.received == [], f"{link.name} never owned {name} but got messages"
        # 3: per link a gap-free prefix of what it sent, links in the order they owned the client.
        order = [text.rsplit(":", 1)[0] for text in fake.received]
        runs = [key for key, _ in itertools.groupby(order)]
        chain_names = [link.name for link in chain]
        assert len(runs) == len(set(runs)), f"a link's messages resumed after another's: {runs}"
        positions = [chain_names.index(run) for run in runs]
        assert positions == sorted(positions), f"{runs} out of the ownership order {chain_names}"
        for link in chain:
            mine = [text for text in fake.received if text.rsplit(":", 1)[0] == link.name]
            assert mine == [f"{link.name}:{i}" for i in range(len(mine))]
        current = chain[-1]
        assert sum(1 for run in order if run == current.name) == current.sent  # the owner's: all of them
    finished = [d for d in done if d.outcome is not None]
    for d in finished:
        outcome = d.outcome
        assert outcome is not None
        source, target = servers[outcome.source], servers[outcome.target]
        # 5: within the deadline plus the bounded rollback (telling two servers, closing one link).
        assert d.ended - d.started <= TIMEOUT + 3 * CLOSE_TIMEOUT + 0.01
        if outcome.committed:
            gave_up = by_link[id(d.gave_up[0])]
            assert gave_up.server is source
            if not outcome.blind:
                # 4: advance notice to both, the state through Atlas, the target's ack before it owned.
                kinds = {
                    (server, type(m).__name__)
                    for server in (source, target)
                    for m in server.control_log
                    if getattr(m, "transfer", None) == outcome.transfer
                }
                told = {("s" if s is source else "t", k) for s, k in kinds}
                assert told - {("s", "TransferComplete")} == {
                    ("s", "TransferNotice"),
                    ("s", "TransferBegin"),
                    ("t", "TransferPrepare"),
                    ("t", "TransferCommit"),
                }
                # `complete` comes after the switch, best effort: not when the source's channel dropped.
                assert ("s", "TransferComplete") in told or source.dropped
                # 3 after an SDK cut: the client got exactly what the source said it sent.
                state = source.handed[outcome.transfer]
                assert state["from"] == gave_up.name
                client = fakes[[s.client_id for s in sessions].index(d.client)]
                assert (
                    sum(1 for text in client.received if text.rsplit(":", 1)[0] == gave_up.name)
                    == state["sent"]
                )
        # 5: rolled back: both servers told (those whose channel is still up).
        elif not outcome.blind:
            for server in (source, target):
                if not server.dropped:
                    aborts = [
                        m
                        for m in server.control_log
                        if isinstance(m, messages.TransferAbort) and m.transfer == outcome.transfer
                    ]
                    assert len(aborts) == 1, f"{server.name} not told of {outcome.transfer}'s rollback"
    # 7 (the rest is checked as requests are made): every refusal names a reason.
    for d in done:
        if d.refused is not None:
            assert any(reason in d.refused for reason in REFUSALS), d.refused


def describe(d: Done) -> str:
    """How one request ended, for hypothesis's statistics (pytest --hypothesis-show-statistics)."""
    if d.outcome is None:
        return "refused: " + next((r for r in REFUSALS if d.refused and r in d.refused), "other")
    kind = "blind" if d.outcome.blind else "sdk"
    if d.outcome.committed:
        return f"{kind} committed"
    return f"{kind} rolled back: " + (d.outcome.failure or "?").split(":")[0]
