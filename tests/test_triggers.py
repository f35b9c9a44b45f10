"""What triggers transfers: the admin endpoint and CLI, drains that move clients, and the rebalancer.

The endpoint is tested through Starlette's TestClient with a fake coordinator, then for real over
sockets. Drains and the rebalancer run end to end over real sockets on 127.0.0.1 (plain echo backends:
blind transfers), and on virtual time against a fake coordinator for retries, give-ups and bounds. The
rebalancing policy is a pure function, tested with hypothesis.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from atlas.cli import main
from atlas.config import AdminConfig, Config, ProxyConfig, ServerConfig, TransferConfig
from atlas.control.coordinator import TransferOutcome, TransferRefused
from atlas.control.drain import MAX_ATTEMPTS, MAX_CONCURRENT, RETRY_DELAY, DrainProgress, serve_drains
from atlas.control.lifecycle import Phase, TransferReason, TransferRecord
from atlas.control.rebalancer import BackendLoad, plan_moves, rebalance_once, serve_rebalancer
from atlas.ops._render import render_transfer
from atlas.ops.client import AdminClient, AdminError
from atlas.ops.server import OpsListening, serve_ops
from atlas.pool import Backend, BackendState
from atlas.runtime import Runtime
from atlas.supervisor import AtlasStarted, serve_atlas
from tests.test_ops import TOKEN, add_session, api, assert_error, make_runtime
from tests.wsclient import open_ws

# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def outcome(*, committed: bool = True, client: str = "c-1", failure: str | None = None) -> TransferOutcome:
    return TransferOutcome(
        transfer="t-abc-1",
        client=client,
        source="gs-1",
        target="gs-2",
        reason="admin",
        committed=committed,
        blind=True,
        phase="completed" if committed else "rolled_back",
        failure=failure,
        duration=0.0032,
    )


class FakeTransfers:
    """A stand-in coordinator: answers each transfer with ``result`` (or raises it), records calls.

    With ``move``, a committed transfer really moves the (memory-stream) session to the target in the
    pool's counts, as the coordinator would.
    """

    def __init__(
        self,
        runtime: Runtime,
        result: TransferOutcome | TransferRefused | Callable[[str], TransferOutcome | None] | None = None,
        *,
        delay: float = 0.0,
    ) -> None:
        self.runtime = runtime
        self.result = result
        self.delay = delay
        self.active: dict[str, TransferRecord] = {}
        self.calls: list[tuple[str, str, TransferReason, float]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.release = trio.Event()
        self.hold = False

    async def transfer(self, client_id: str, target: str, reason: TransferReason) -> TransferOutcome:
        self.calls.append((client_id, target, reason, trio.current_time()))
        result = self.result(client_id) if callable(self.result) else self.result
        if isinstance(result, TransferRefused):
            raise result
        session = self.runtime.clients.get(client_id)
        if session is None:
            raise TransferRefused(f"no client {client_id}")
        self.active[client_id] = TransferRecord(
            id=f"t-{len(self.calls)}",
            client_id=client_id,
            source=session.link.backend.name,
            target=target,
            reason=reason,
            blind=True,
        )
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.hold:
                await self.release.wait()
            await trio.sleep(self.delay)
        finally:
            self.in_flight -= 1
            del self.active[client_id]
        if result is None:  # commit: move the session in the pool's counts
            backend = self.runtime.pool.get(target)
            assert backend is not None
            self.runtime.pool.acquire(backend)
            old = session.link.backend
            session.link = attrs.evolve(session.link, backend=backend)
            self.runtime.release(old)
            return attrs.evolve(outcome(client=client_id), target=target, reason=reason.value)
        return result


def install(runtime: Runtime, fake: FakeTransfers) -> None:
    runtime.transfers = fake  # type: ignore[assignment]


class EchoBackends:
    """Plain backends (no control channel) that echo and record what each client sent each of them."""

    def __init__(self) -> None:
        self.received: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))

    async def handler(self, name: str, request: WebSocketRequest) -> None:
        headers = {k.lower(): v for k, v in request.headers}
        ws = await request.accept()
        if b"x-atlas-client-id" not in headers:  # Atlas's health probe
            with contextlib.suppress(ConnectionClosed):
                await ws.get_message()
            return
        client = headers[b"x-atlas-client-id"].decode()
        with contextlib.suppress(ConnectionClosed):
            while True:
                message = await ws.get_message()
                assert isinstance(message, str)
                self.received[name][client].append(message)
                await ws.send_message(message)

    @asynccontextmanager
    async def serve(self, *names: str) -> AsyncIterator[dict[str, str]]:
        """Serve one backend per name; yields their URLs by name."""
        async with trio.open_nursery() as nursery:
            urls = {}
            for name in names:
                server = await nursery.start(
                    serve_websocket, partial(self.handler, name), "127.0.0.1", 0, None
                )
                urls[name] = f"ws://127.0.0.1:{server.port}"
            yield urls
            nursery.cancel_scope.cancel()


def atlas_config(urls: dict[str, str], *, capacity: int = 1000, **transfer: Any) -> Config:
    return Config(
        proxy=ProxyConfig(listen="127.0.0.1:0"),
        admin=AdminConfig(listen="127.0.0.1:0"),
        servers=tuple(ServerConfig(name=name, url=url, capacity=capacity) for name, url in urls.items()),
        transfer=TransferConfig(**transfer),
    )


@asynccontextmanager
async def running_atlas(config: Config) -> AsyncIterator[AtlasStarted]:
    async with trio.open_nursery() as nursery:
        started: AtlasStarted = await nursery.start(serve_atlas, config)
        yield started
        nursery.cancel_scope.cancel()


def ops_url(started: AtlasStarted) -> str:
    assert started.ops is not None
    return started.ops.url


def client_id_of(started: AtlasStarted, ws: WebSocketConnection) -> str:
    peer = f"127.0.0.1:{ws.local.port}"  # type: ignore[union-attr]
    (session,) = [s for s in started.runtime.clients if s.peer == peer]
    return session.client_id


async def until(condition: Callable[[], bool], *, seconds: float = 20.0) -> None:
    """Wait (bounded) for a condition on Atlas's state that no event announces."""
    with trio.fail_after(seconds):
        while True:
            if condition():
                return
            await trio.sleep(0.01)


async def echo(ws: WebSocketConnection, message: str) -> None:
    await ws.send_message(message)
    with trio.fail_after(5):
        assert await ws.get_message() == message


def add_backend(runtime: Runtime, name: str, url: str, *, capacity: int = 1000) -> Backend:
    backend = Backend.from_url(name, url, capacity=capacity)
    runtime.add_backend(backend)
    return backend


@contextmanager
def captured(logger: str) -> Iterator[list[str]]:
    """The messages logged by ``logger`` at INFO and above while the block runs."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Keep(logging.INFO)
    log = logging.getLogger(logger)
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


# ------------------------------------------------------------------------------------------------
# POST /api/v1/clients/{id}/transfer and GET /api/v1/transfers, with a fake coordinator
# ------------------------------------------------------------------------------------------------


def test_transfer_endpoint_committed() -> None:
    runtime = make_runtime()
    session = add_session(runtime, "gs-1")
    fake = FakeTransfers(runtime, outcome(client=session.client_id))
    install(runtime, fake)
    with api(runtime) as client:
        response = client.post(f"/api/v1/clients/{session.client_id}/transfer", json={"to": "gs-2"})
        assert response.status_code == 200, response.text
        assert response.json() == outcome(client=session.client_id).to_json()
        assert response.json()["duration_ms"] == 3.2
        response = client.post(
            f"/api/v1/clients/{session.client_id}/transfer", json={"to": "gs-2", "reason": "maintenance"}
        )
        assert response.status_code == 200
    assert [(c, t, r) for c, t, r, _ in fake.calls] == [
        (session.client_id, "gs-2", TransferReason.ADMIN),
        (session.client_id, "gs-2", TransferReason.MAINTENANCE),
    ]


def test_transfer_endpoint_rolled_back_is_a_409_with_the_outcome() -> None:
    runtime = make_runtime()
    session = add_session(runtime, "gs-1")
    rolled_back = outcome(committed=False, client=session.client_id, failure="gs-2 refused: full")
    install(runtime, FakeTransfers(runtime, rolled_back))
    with api(runtime) as client:
        response = client.post(f"/api/v1/clients/{session.client_id}/transfer", json={"to": "gs-2"})
        assert_error(response, 409, "rolled back", "gs-2 refused: full")
        body = response.json()
        assert body["outcome"] == "rolled_back"
        assert body["failure"] == "gs-2 refused: full"
        assert {k: v for k, v in body.items() if k not in ("error", "status")} == rolled_back.to_json()


def test_transfer_endpoint_refusals_and_validation() -> None:
    runtime = make_runtime()
    session = add_session(runtime, "gs-1")
    path = f"/api/v1/clients/{session.client_id}/transfer"
    fake = FakeTransfers(runtime, TransferRefused(f"client {session.client_id} is already being transferred"))
    install(runtime, fake)
    with api(runtime) as client:
        response = client.post(path, json={"to": "gs-2"})
        assert_error(response, 409, "already being transferred")
        assert "outcome" not in response.json()

        assert_error(client.post("/api/v1/clients/nope/transfer", json={"to": "gs-2"}), 404, "'nope'")
        assert_error(client.post(path, json={}), 400, "to: missing required field")
        assert_error(client.post(path, json={"to": 3}), 400, "to: expected a server name")
        assert_error(client.post(path, json={"to": ""}), 400, "to: expected a server name")
        assert_error(client.post(path, json={"to": "gs-2", "why": "x"}), 400, "why: unknown field")
        assert_error(client.post(path, json={"to": "gs-2", "reason": 1}), 400, "reason: expected a string")
        assert_error(
            client.post(path, json={"to": "gs-2", "reason": "fun"}), 400, "reason: must be one of", "admin"
        )
        assert_error(client.post(path, content=b"[1]"), 400, "JSON object")
        assert_error(client.post(path), 400, "JSON object")
        assert_error(client.get(path), 405)
    assert len(fake.calls) == 1  # only the first call reached the coordinator

    runtime.transfers = None
    with api(runtime) as client:
        assert_error(client.post(path, json={"to": "gs-2"}), 503, "transfers are not running")
        assert client.get("/api/v1/transfers").json() == []


def test_list_transfers() -> None:
    runtime = make_runtime()
    fake = FakeTransfers(runtime)
    install(runtime, fake)
    record = TransferRecord(
        id="t-abc-7",
        client_id="c-9",
        source="gs-1",
        target="gs-2",
        reason=TransferReason.LOAD_BALANCING,
        blind=False,
    )
    record.advance(Phase.PREPARING)
    fake.active["c-9"] = record
    with api(runtime) as client:
        (view,) = client.get("/api/v1/transfers").json()
    elapsed = view.pop("elapsed_ms")
    assert isinstance(elapsed, float)
    assert elapsed >= 0
    assert view == {
        "id": "t-abc-7",
        "client": "c-9",
        "from": "gs-1",
        "to": "gs-2",
        "reason": "load_balancing",
        "phase": "preparing",
        "blind": False,
    }


def test_transfer_endpoints_need_the_token() -> None:
    runtime = make_runtime(token=TOKEN)
    session = add_session(runtime, "gs-1")
    install(runtime, FakeTransfers(runtime, outcome(client=session.client_id)))
    path = f"/api/v1/clients/{session.client_id}/transfer"
    with api(runtime) as client:
        assert_error(client.post(path, json={"to": "gs-2"}), 401, "missing bearer token")
        assert_error(client.get("/api/v1/transfers"), 401, "missing bearer token")
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert client.post(path, json={"to": "gs-2"}, headers=good).status_code == 200
        assert client.get("/api/v1/transfers", headers=good).status_code == 200


def test_render_transfer() -> None:
    assert render_transfer(outcome().to_json()) == "committed in 3.2 ms"
    rolled_back = outcome(committed=False, failure="timed out while preparing").to_json()
    assert render_transfer(rolled_back) == "rolled back: timed out while preparing"


def test_admin_client_transfer() -> None:
    answers = {
        "c-1": httpx.Response(200, json=outcome().to_json()),
        "c-2": httpx.Response(
            409,
            json={**outcome(committed=False, failure="x").to_json(), "error": "rolled back", "status": 409},
        ),
        "c-3": httpx.Response(409, json={"error": "client c-3 is already on gs-2", "status": 409}),
    }
    seen: list[tuple[str, bytes]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.raw_path.decode(), request.content))
        return answers[request.url.path.split("/")[4]]

    with AdminClient("http://atlas.test", transport=httpx.MockTransport(answer)) as client:
        assert client.transfer("c-1", "gs-2")["outcome"] == "committed"
        assert client.transfer("c-2", "gs-2", reason="maintenance")["failure"] == "x"
        with pytest.raises(AdminError) as info:
            client.transfer("c-3", "gs-2")
    assert str(info.value) == "client c-3 is already on gs-2 (HTTP 409)"
    assert info.value.status == 409
    assert seen[0][0] == "/api/v1/clients/c-1/transfer"
    assert json.loads(seen[0][1]) == {"to": "gs-2", "reason": "admin"}
    assert json.loads(seen[1][1]) == {"to": "gs-2", "reason": "maintenance"}


# ------------------------------------------------------------------------------------------------
# The endpoint and the CLI for real
# ------------------------------------------------------------------------------------------------


async def test_transfer_over_http_moves_a_live_client() -> None:
    backends = EchoBackends()
    async with backends.serve("gs-1", "gs-2") as urls, running_atlas(atlas_config(urls)) as started:
        async with open_ws(f"ws://127.0.0.1:{started.proxy.port}/") as ws:
            await echo(ws, "before")
            client_id = client_id_of(started, ws)
            session = started.runtime.clients.get(client_id)
            assert session is not None
            source = session.link.backend.name
            target = "gs-2" if source == "gs-1" else "gs-1"
            async with httpx.AsyncClient(base_url=ops_url(started)) as http:
                response = await http.post(f"/api/v1/clients/{client_id}/transfer", json={"to": target})
                assert response.status_code == 200, response.text
                answer = response.json()
                assert (answer["outcome"], answer["from"], answer["to"]) == ("committed", source, target)
                assert (answer["client"], answer["reason"], answer["blind"]) == (client_id, "admin", True)
                assert answer["duration_ms"] > 0
                await echo(ws, "after")
                assert backends.received[source][client_id] == ["before"]
                assert backends.received[target][client_id] == ["after"]
                assert (await http.get(f"/api/v1/clients/{client_id}")).json()["server"] == target
                assert (await http.get("/api/v1/transfers")).json() == []

                again = await http.post(f"/api/v1/clients/{client_id}/transfer", json={"to": target})
                assert again.status_code == 409
                assert again.json()["error"] == f"client {client_id} is already on {target}"
                unknown = await http.post(f"/api/v1/clients/{client_id}/transfer", json={"to": "gs-9"})
                assert (unknown.status_code, unknown.json()["error"]) == (409, "no server gs-9")
            await echo(ws, "still here")
            assert session.failovers == 0


async def atlas_cli(*args: str) -> int:
    """Run the command line in a worker thread (it is synchronous), as a user would."""
    return await trio.to_thread.run_sync(main, list(args))


async def test_cli_transfer(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATLAS_ADMIN_URL", raising=False)
    monkeypatch.delenv("ATLAS_ADMIN_TOKEN", raising=False)
    backends = EchoBackends()
    async with backends.serve("gs-1", "gs-2") as urls, running_atlas(atlas_config(urls)) as started:
        url = ops_url(started)
        async with open_ws(f"ws://127.0.0.1:{started.proxy.port}/") as ws:
            await echo(ws, "hello")
            client_id = client_id_of(started, ws)
            session = started.runtime.clients.get(client_id)
            assert session is not None
            target = "gs-2" if session.link.backend.name == "gs-1" else "gs-1"
            assert await atlas_cli("transfer", client_id, target, "--url", url) == 0
            out = capsys.readouterr().out
            assert out.startswith("committed in ")
            assert out.endswith(" ms\n")
            await echo(ws, "moved")
            assert backends.received[target][client_id] == ["moved"]

            back = "gs-1" if target == "gs-2" else "gs-2"
            assert (
                await atlas_cli(
                    "transfer", client_id, back, "--url", url, "--json", "--reason", "maintenance"
                )
                == 0
            )
            answer = capsys.readouterr().out
            assert '"outcome": "committed"' in answer
            assert '"reason": "maintenance"' in answer

            assert await atlas_cli("transfer", client_id, back, "--url", url) == 1
            captured = capsys.readouterr()
            assert captured.out == ""
            assert captured.err == f"atlas: error: client {client_id} is already on {back} (HTTP 409)\n"
            assert await atlas_cli("transfer", "nope", back, "--url", url) == 1
            assert capsys.readouterr().err == "atlas: error: no client with id 'nope' (HTTP 404)\n"
            await echo(ws, "still here")


async def test_cli_transfer_rolled_back_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    runtime = make_runtime()
    session = add_session(runtime, "gs-1")
    failed = outcome(committed=False, client=session.client_id, failure="timed out while preparing")
    install(runtime, FakeTransfers(runtime, failed))
    async with trio.open_nursery() as nursery:
        ops: OpsListening = await nursery.start(partial(serve_ops, runtime))
        assert await atlas_cli("transfer", session.client_id, "gs-2", "--url", ops.url) == 1
        assert capsys.readouterr().out == "rolled back: timed out while preparing\n"
        assert await atlas_cli("transfer", session.client_id, "gs-2", "--url", ops.url, "--json") == 1
        assert '"outcome": "rolled_back"' in capsys.readouterr().out
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------------
# Drains move clients
# ------------------------------------------------------------------------------------------------

DRAIN_CLIENTS = 20
LOW_RATE = 10.0
HIGH_RATE = 1000.0


@pytest.mark.parametrize("rate", [LOW_RATE, HIGH_RATE])
async def test_drain_moves_every_client_at_a_bounded_rate_without_disconnects(rate: float) -> None:
    n = DRAIN_CLIENTS
    backends = EchoBackends()
    async with backends.serve("gs-1", "gs-2") as urls:
        config = atlas_config({"gs-1": urls["gs-1"]}, drain_rate=rate)
        async with running_atlas(config) as started:
            runtime = started.runtime
            proxy_url = f"ws://127.0.0.1:{started.proxy.port}/"
            ids: dict[int, str] = {}
            sent: dict[int, int] = {}
            echoed: dict[int, list[int]] = defaultdict(list)
            disconnected: list[int] = []
            connected = trio.Semaphore(0)
            stop = trio.Event()

            async def client(k: int) -> None:
                async with open_ws(proxy_url) as ws:
                    ids[k] = client_id_of(started, ws)
                    connected.release()

                    async def reader() -> None:
                        try:
                            while True:
                                message = await ws.get_message()
                                assert isinstance(message, str)
                                echoed[k].append(int(message.split(":")[1]))
                        except ConnectionClosed:
                            disconnected.append(k)

                    async with trio.open_nursery() as inner:
                        inner.start_soon(reader)
                        i = 0
                        while not stop.is_set():
                            await ws.send_message(f"{k}:{i}")
                            i += 1
                            sent[k] = i
                            await trio.sleep(0.02)
                        # Still echoing after the drain: one more message, and it comes back. (A blind
                        # cut may drop the source's echoes still in flight; this one went to gs-2.)
                        await ws.send_message(f"{k}:{i}")
                        i += 1
                        sent[k] = i
                        await until(lambda: bool(echoed[k]) and echoed[k][-1] == i - 1, seconds=5)
                        inner.cancel_scope.cancel()

            with captured("atlas.drain") as lines, trio.fail_after(60):
                async with trio.open_nursery() as clients:
                    for k in range(n):
                        clients.start_soon(client, k)
                        await connected.acquire()
                    add_backend(runtime, "gs-2", urls["gs-2"])
                    async with httpx.AsyncClient(base_url=ops_url(started)) as http:
                        begin = trio.current_time()
                        drained = await http.post("/api/v1/servers/gs-1/drain")
                        assert drained.status_code == 200
                        await until(lambda: all(s.link.backend.name == "gs-2" for s in runtime.clients))
                        elapsed = trio.current_time() - begin
                        await until(lambda: any("finished" in line for line in lines))
                        servers = {s["name"]: s for s in (await http.get("/api/v1/servers")).json()}
                    stop.set()
            assert (servers["gs-1"]["connections"], servers["gs-2"]["connections"]) == (0, n)
            assert servers["gs-1"]["state"] == "draining"
            assert len(runtime.clients) == 0  # they all left at the end, by themselves
    # Transfers start at most `rate` per second: n of them take at least (n - 1) / rate.
    assert elapsed >= (n - 1) / rate
    if rate == HIGH_RATE:
        assert elapsed < (n - 1) / LOW_RATE
    assert disconnected == []
    for k in range(n):
        cid = ids[k]
        # Every message reached exactly one backend, in order, none lost: first gs-1, then gs-2.
        on_1, on_2 = backends.received["gs-1"][cid], backends.received["gs-2"][cid]
        assert on_1 + on_2 == [f"{k}:{i}" for i in range(sent[k])], k
        assert on_2, k
        assert echoed[k] == sorted(set(echoed[k])), k
    assert lines[0] == f"drain of gs-1 started: moving {n} client(s) away, at most {rate:g} per second"
    assert lines[-1] == f"drain of gs-1 finished: moved {n}, left 0"


async def test_delete_moves_the_clients_then_removes_the_server() -> None:
    backends = EchoBackends()
    async with backends.serve("gs-1", "gs-2") as urls:
        async with running_atlas(atlas_config({"gs-1": urls["gs-1"]}, drain_rate=200.0)) as started:
            runtime = started.runtime
            async with contextlib.AsyncExitStack() as stack:
                sockets = [
                    await stack.enter_async_context(open_ws(f"ws://127.0.0.1:{started.proxy.port}/"))
                    for _ in range(5)
                ]
                for i, ws in enumerate(sockets):
                    await echo(ws, f"m{i}")
                add_backend(runtime, "gs-2", urls["gs-2"])
                async with httpx.AsyncClient(base_url=ops_url(started)) as http:
                    answer = await http.delete("/api/v1/servers/gs-1")
                    assert answer.status_code == 202
                    assert answer.json()["removed"] is False
                    await until(lambda: "gs-1" not in runtime.pool)
                for i, ws in enumerate(sockets):
                    await echo(ws, f"again{i}")
                assert sum(len(m) for m in backends.received["gs-2"].values()) == 5


# -- on virtual time, with a fake coordinator ------------------------------------------------------


def drain_runtime(*, clients: int, servers: int = 2, drain_rate: float = 100.0) -> Runtime:
    runtime = make_runtime(servers=servers)
    runtime = Runtime.from_config(
        attrs.evolve(runtime.config, transfer=TransferConfig(drain_rate=drain_rate))
    )
    for i in range(clients):
        add_session(runtime, "gs-1", peer=f"203.0.113.7:{50000 + i}")
    return runtime


def on(runtime: Runtime, name: str) -> list[str]:
    return [s.client_id for s in runtime.clients if s.link.backend.name == name]


async def test_drain_paces_starts_and_bounds_concurrency(autojump_clock: trio.testing.MockClock) -> None:
    runtime = drain_runtime(clients=50, drain_rate=1000.0)
    fake = FakeTransfers(runtime, delay=1.0)
    install(runtime, fake)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_drains, runtime)
        runtime.drain_backend("gs-1")
        await until(lambda: not on(runtime, "gs-1"), seconds=60)
        nursery.cancel_scope.cancel()
    assert len(on(runtime, "gs-2")) == 50
    assert fake.most_in_flight == MAX_CONCURRENT
    starts = [at for _, _, _, at in fake.calls]
    assert all(b - a >= 1 / 1000.0 - 1e-9 for a, b in itertools.pairwise(starts))
    assert {(target, reason) for _, target, reason, _ in fake.calls} == {("gs-2", TransferReason.MAINTENANCE)}


async def test_drain_rate_is_respected(autojump_clock: trio.testing.MockClock) -> None:
    runtime = drain_runtime(clients=10, drain_rate=2.0)
    fake = FakeTransfers(runtime)
    install(runtime, fake)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_drains, runtime)
        runtime.drain_backend("gs-1")
        await until(lambda: not on(runtime, "gs-1"), seconds=60)
        nursery.cancel_scope.cancel()
    starts = [at for _, _, _, at in fake.calls]
    assert len(starts) == 10
    assert starts[-1] - starts[0] >= 9 / 2.0 - 1e-9


async def test_drain_retries_then_leaves_a_client_in_place(autojump_clock: trio.testing.MockClock) -> None:
    runtime = drain_runtime(clients=4)
    stubborn = on(runtime, "gs-1")[1]

    def result(client_id: str) -> TransferOutcome | None:
        if client_id == stubborn:
            return outcome(committed=False, client=client_id, failure="gs-2 refused: not now")
        return None

    fake = FakeTransfers(runtime, result)
    install(runtime, fake)
    with captured("atlas.drain") as lines:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_drains, runtime)
            runtime.drain_backend("gs-1")
            await until(lambda: any("finished" in line for line in lines), seconds=60)
            await trio.sleep(30)  # nothing more happens: the drain is over
            nursery.cancel_scope.cancel()
    assert on(runtime, "gs-1") == [stubborn]
    tries = [at for client, _, _, at in fake.calls if client == stubborn]
    assert len(tries) == MAX_ATTEMPTS
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    assert all(gap >= RETRY_DELAY * (i + 1) - 1e-9 for i, gap in enumerate(gaps)), gaps
    assert len(fake.calls) == 3 + MAX_ATTEMPTS
    assert lines == [
        "drain of gs-1 started: moving 4 client(s) away, at most 100 per second",
        f"drain of gs-1: client {stubborn} stays until it disconnects ({MAX_ATTEMPTS} attempts failed, "
        "last: rolled back: gs-2 refused: not now)",
        "drain of gs-1 finished: moved 3, left 1",
    ]


async def test_drain_without_a_target_gives_up_after_bounded_attempts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runtime = drain_runtime(clients=3, servers=1)
    fake = FakeTransfers(runtime)
    install(runtime, fake)
    with captured("atlas.drain") as lines:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_drains, runtime)
            runtime.drain_backend("gs-1")
            await until(lambda: any("finished" in line for line in lines), seconds=60)
            nursery.cancel_scope.cancel()
    assert fake.calls == []
    assert len(on(runtime, "gs-1")) == 3
    assert lines[1:] == [
        f"drain of gs-1: 3 client(s) stay until they disconnect ({MAX_ATTEMPTS} attempts failed, "
        "last: no other server can take it)",
        "drain of gs-1 finished: moved 0, left 3",
    ]


async def test_drain_skips_clients_being_moved_and_stops_when_resumed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runtime = drain_runtime(clients=3)
    busy = on(runtime, "gs-1")[0]
    fake = FakeTransfers(runtime)
    fake.hold = True
    install(runtime, fake)
    fake.active[busy] = TransferRecord(
        id="t-x", client_id=busy, source="gs-1", target="gs-2", reason=TransferReason.ADMIN, blind=True
    )
    with captured("atlas.drain") as lines:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_drains, runtime)
            backend = runtime.drain_backend("gs-1")
            await until(lambda: len(fake.calls) == 2, seconds=10)
            await trio.sleep(5)
            assert busy not in [client for client, *_ in fake.calls]
            backend.state = BackendState.HEALTHY  # back in service: the mover is cancelled
            await until(lambda: any("stopped" in line for line in lines), seconds=10)
            nursery.cancel_scope.cancel()
    assert lines[-1] == "drain of gs-1 stopped (back in service): moved 0, left 0"


def test_drain_progress_bookkeeping() -> None:
    progress = DrainProgress("gs-1", max_attempts=2, retry_delay=1.0)
    assert progress.due("a", 0.0)
    progress.start("a")
    assert not progress.due("a", 0.0)
    assert progress.failed("a", "no", 0.0) is False
    assert not progress.due("a", 0.5)
    assert progress.next_retry() == 1.0
    assert progress.due("a", 1.0)
    assert progress.failed("a", "still no", 1.0) is True
    assert progress.left == {"a": "still no"}
    assert not progress.due("a", 100.0)
    assert progress.next_retry() == math.inf
    assert progress.finished(["a"])
    progress.start("b")
    assert not progress.finished(["a"])
    progress.succeeded("b")
    assert (progress.moved, progress.finished(["a"])) == (1, True)
    progress.start("c")
    progress.abandon("c")  # not tried after all: no attempt counted
    assert progress.due("c", 0.0)
    assert progress.next_retry() == math.inf
    progress.forget([])
    assert progress.left == {}


# ------------------------------------------------------------------------------------------------
# The rebalancing policy
# ------------------------------------------------------------------------------------------------


@st.composite
def rebalance_cases(
    draw: st.DrawFn,
) -> tuple[list[BackendLoad], dict[str, str], float, dict[str, float], TransferConfig]:
    backends: list[BackendLoad] = []
    clients: dict[str, str] = {}
    last_moved: dict[str, float] = {}
    now = 1000.0
    cooldown = draw(st.sampled_from([0.0, 10.0, 60.0]))
    for i in range(draw(st.integers(1, 6))):
        capacity = draw(st.integers(1, 20))
        connections = draw(st.integers(0, capacity + 2))
        name = f"b{i}"
        backends.append(BackendLoad(name, connections, capacity, draw(st.booleans() | st.just(True))))
        for j in range(draw(st.integers(0, connections))):
            client = f"{name}-c{j}"
            clients[client] = name
            if draw(st.booleans()):
                last_moved[client] = now - draw(st.floats(0, 2 * cooldown + 1))
    high = draw(st.sampled_from([0.25, 0.5, 0.75, 0.8, 0.9, 1.0]))
    low = draw(st.sampled_from([x for x in (0.0, 0.1, 0.25, 0.5, 0.6, 0.75, 0.8) if x <= high]))
    config = TransferConfig(
        rebalance=True,
        high_watermark=high,
        low_watermark=low,
        rebalance_batch=draw(st.integers(1, 12)),
        cooldown=cooldown,
    )
    return backends, clients, now, last_moved, config


def _sources_and_targets(
    counts: dict[str, int], capacity: dict[str, int], config: TransferConfig
) -> tuple[set[str], set[str]]:
    sources = {n for n in counts if counts[n] / capacity[n] > config.high_watermark}
    targets = {
        n
        for n in counts
        if counts[n] + 1 <= capacity[n] and (counts[n] + 1) / capacity[n] <= config.low_watermark
    }
    return sources, targets


@settings(max_examples=400)
@given(rebalance_cases())
def test_plan_moves_keeps_its_rule(
    case: tuple[list[BackendLoad], dict[str, str], float, dict[str, float], TransferConfig],
) -> None:
    backends, clients, now, last_moved, config = case
    moves = plan_moves(backends, clients, now, last_moved, config)
    assert len(moves) <= config.rebalance_batch
    moved = [client for client, _ in moves]
    assert len(set(moved)) == len(moved)
    healthy = {b.name for b in backends if b.healthy}
    counts = {b.name: b.connections for b in backends if b.healthy}
    capacity = {b.name: b.capacity for b in backends if b.healthy}
    gave: set[str] = set()
    took: set[str] = set()
    for client, target in moves:
        source = clients[client]
        # Cooldown: never a client moved less than `cooldown` ago.
        assert client not in last_moved or now - last_moved[client] >= config.cooldown
        assert source in healthy and target in healthy and source != target
        # Only from a backend above the high watermark (as earlier moves of the round left it) ...
        assert counts[source] / capacity[source] > config.high_watermark
        counts[source] -= 1
        counts[target] += 1
        # ... only to one that stays at or below the low watermark, and within its capacity.
        assert counts[target] / capacity[target] <= config.low_watermark
        assert counts[target] <= capacity[target]
        gave.add(source)
        took.add(target)
    assert not gave & took
    if len(moves) < config.rebalance_batch:
        # Nothing more could have been moved: no source with a client to give has a target left.
        sources, targets = _sources_and_targets(counts, capacity, config)
        eligible = {
            clients[c]
            for c in clients
            if c not in moved and (c not in last_moved or now - last_moved[c] >= config.cooldown)
        }
        assert not (sources & eligible and targets - gave), (sources, eligible, targets, gave)


@given(rebalance_cases(), st.lists(st.floats(0.5, 40.0), min_size=1, max_size=8))
def test_rebalancing_rounds_never_move_a_client_twice_within_cooldown(
    case: tuple[list[BackendLoad], dict[str, str], float, dict[str, float], TransferConfig],
    steps: list[float],
) -> None:
    backends, clients, now, last_moved, config = case
    clients, last_moved = dict(clients), dict(last_moved)
    history: dict[str, list[float]] = defaultdict(list)
    for client, at in last_moved.items():
        history[client].append(at)
    counts = {b.name: b.connections for b in backends}
    for step in steps:
        loads = [attrs.evolve(b, connections=counts[b.name]) for b in backends]
        for client, target in plan_moves(loads, clients, now, last_moved, config):
            counts[clients[client]] -= 1
            counts[target] += 1
            clients[client] = target
            last_moved[client] = now
            history[client].append(now)
        now += step
    for times in history.values():
        assert all(b - a >= config.cooldown for a, b in itertools.pairwise(times))


def test_plan_moves_examples() -> None:
    config = TransferConfig(high_watermark=0.5, low_watermark=0.5, rebalance_batch=3, cooldown=60.0)
    full = BackendLoad("a", 10, 10)
    empty = BackendLoad("b", 0, 10)
    clients = {f"c{i}": "a" for i in range(10)}
    assert plan_moves([full, empty], clients, 0.0, {}, config) == [("c0", "b"), ("c1", "b"), ("c2", "b")]
    # Five at most: a is then at its high watermark, b at its low one.
    big = attrs.evolve(config, rebalance_batch=100)
    assert len(plan_moves([full, empty], clients, 0.0, {}, big)) == 5
    # Cooldown: recently moved clients are skipped.
    assert plan_moves([full, empty], clients, 30.0, {"c0": 0.0, "c1": 0.0}, config)[0] == ("c2", "b")
    # Unhealthy backends neither give nor take; the least loaded target first.
    sick = BackendLoad("s", 0, 10, healthy=False)
    some = BackendLoad("d", 2, 10)
    assert {t for _, t in plan_moves([full, sick, some, empty], clients, 0.0, {}, big)} == {"b", "d"}
    assert plan_moves([full, sick, some, empty], clients, 0.0, {}, config)[0] == ("c0", "b")
    # A backend at the high watermark exactly gives nothing.
    assert plan_moves([BackendLoad("a", 5, 10), empty], clients, 0.0, {}, config) == []


# ------------------------------------------------------------------------------------------------
# The rebalancer, live
# ------------------------------------------------------------------------------------------------


async def test_rebalancing_rounds_over_real_sockets() -> None:
    backends = EchoBackends()
    async with backends.serve("gs-1", "gs-2") as urls:
        config = atlas_config(
            {"gs-1": urls["gs-1"]},
            capacity=10,
            high_watermark=0.5,
            low_watermark=0.5,
            rebalance_batch=3,
            cooldown=60.0,
        )
        async with running_atlas(config) as started, contextlib.AsyncExitStack() as stack:
            runtime = started.runtime
            sockets = [
                await stack.enter_async_context(open_ws(f"ws://127.0.0.1:{started.proxy.port}/"))
                for _ in range(10)
            ]
            for i, ws in enumerate(sockets):
                await echo(ws, f"m{i}")
            add_backend(runtime, "gs-2", urls["gs-2"], capacity=10)
            last_moved: dict[str, float] = {}
            with trio.fail_after(30):
                first = await rebalance_once(runtime, started.transfers, last_moved)
                second = await rebalance_once(runtime, started.transfers, last_moved)
                third = await rebalance_once(runtime, started.transfers, last_moved)
            assert (first.planned, first.committed) == (3, 3)
            assert (second.planned, second.committed) == (2, 2)
            assert (third.planned, third.committed) == (0, 0)
            assert len(last_moved) == 5
            assert [b.connections for b in runtime.pool] == [5, 5]
            for i, ws in enumerate(sockets):
                await echo(ws, f"after{i}")
            assert sum(len(m) for m in backends.received["gs-2"].values()) == 5
            assert all(s.failovers == 0 for s in runtime.clients)


async def test_serve_rebalancer_moves_clients_when_on() -> None:
    backends = EchoBackends()
    async with backends.serve("gs-1", "gs-2") as urls:
        config = atlas_config(
            {"gs-1": urls["gs-1"]},
            capacity=10,
            rebalance=True,
            rebalance_interval=0.05,
            high_watermark=0.6,
            low_watermark=0.4,
        )
        async with running_atlas(config) as started, contextlib.AsyncExitStack() as stack:
            runtime = started.runtime
            sockets = [
                await stack.enter_async_context(open_ws(f"ws://127.0.0.1:{started.proxy.port}/"))
                for _ in range(8)
            ]
            add_backend(runtime, "gs-2", urls["gs-2"], capacity=10)
            # gs-1 gives until it is at 60 %, gs-2 takes up to 40 %: two clients move.
            await until(
                lambda: [b.connections for b in runtime.pool] == [6, 2] and not started.transfers.active
            )
            for i, ws in enumerate(sockets):
                await echo(ws, f"m{i}")
            assert sum(len(m) for m in backends.received["gs-2"].values()) == 2


async def test_serve_rebalancer_does_nothing_when_off(autojump_clock: trio.testing.MockClock) -> None:
    runtime = drain_runtime(clients=10)
    fake = FakeTransfers(runtime)
    install(runtime, fake)
    assert runtime.config.transfer.rebalance is False
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_rebalancer, runtime)
        await trio.sleep(60)
        nursery.cancel_scope.cancel()
    assert fake.calls == []
