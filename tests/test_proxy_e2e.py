"""End to end over real sockets on 127.0.0.1 (port 0): clients -> Atlas -> backends."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import attrs
import h11
import pytest
import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    WebSocketRequest,
    serve_websocket,
)

from atlas.config import AdminConfig, Config, FailoverConfig, ProxyConfig, ServerConfig
from atlas.demo.servers import serve_echo_server
from atlas.errors import StartupError
from atlas.proxy.frames import CloseCode
from atlas.supervisor import AtlasStarted, serve_atlas
from tests.wsclient import open_ws, until

#: Every in-process Atlas in the tests runs its ops server on a free port.
EPHEMERAL_ADMIN = AdminConfig(listen="127.0.0.1:0")


def _config(ports: Sequence[int], **proxy: object) -> Config:
    settings: dict[str, object] = {"listen": "127.0.0.1:0", **proxy}
    return Config(
        admin=EPHEMERAL_ADMIN,
        proxy=ProxyConfig(**settings),  # type: ignore[arg-type]
        servers=tuple(
            ServerConfig(name=f"gs-{i + 1}", url=f"ws://127.0.0.1:{port}", capacity=1000)
            for i, port in enumerate(ports)
        ),
    )


@asynccontextmanager
async def running_atlas(config: Config, shutdown: trio.Event | None = None) -> AsyncIterator[AtlasStarted]:
    async with trio.open_nursery() as nursery:
        started: AtlasStarted = await nursery.start(
            lambda task_status: serve_atlas(config, shutdown=shutdown, task_status=task_status)
        )
        yield started
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def echo_backends(count: int) -> AsyncIterator[list[int]]:
    async with trio.open_nursery() as nursery:
        ports = [await nursery.start(serve_echo_server, "127.0.0.1", 0) for _ in range(count)]
        yield ports
        nursery.cancel_scope.cancel()


def _reason(exc: ConnectionClosed) -> CloseReason:
    assert exc.reason is not None
    return exc.reason


def _url(started: AtlasStarted, path: str = "/") -> str:
    return f"ws://127.0.0.1:{started.proxy.port}{path}"


async def _refused(started: AtlasStarted) -> tuple[h11.Response, bytes]:
    """Send a WebSocket upgrade and return Atlas's (non-101) answer, read to EOF.

    trio-websocket leaks its socket on a rejected handshake, so rejections are checked with h11.
    """
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET",
        target="/",
        headers=[
            ("host", "127.0.0.1"),
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
    )
    stream = await trio.open_tcp_stream("127.0.0.1", started.proxy.port)
    async with stream:
        await stream.send_all(conn.send(request) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        with trio.fail_after(10):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some())
                    continue
                assert isinstance(event, h11.Response), event
                body = b""
                while not isinstance(part := conn.next_event(), h11.EndOfMessage):
                    if part is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some())
                    elif isinstance(part, h11.Data):
                        body += part.data
                return event, body


async def test_500_concurrent_clients_every_message_echoed_once_in_order() -> None:
    clients, messages = 500, 20
    results: dict[int, list[str]] = {}
    async with echo_backends(3) as ports, running_atlas(_config(ports)) as atlas:
        all_connected = trio.Event()
        connected = 0

        async def client(n: int) -> None:
            nonlocal connected
            async with open_ws(_url(atlas)) as ws:
                connected += 1
                if connected == clients:
                    all_connected.set()
                await all_connected.wait()
                got: list[str] = []
                for i in range(messages):
                    await ws.send_message(f"{n}:{i}")
                for _ in range(messages):
                    message = await ws.get_message()
                    assert isinstance(message, str)
                    got.append(message)
                results[n] = got

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for n in range(clients):
                    nursery.start_soon(client, n)
        with trio.fail_after(10):
            await atlas.runtime.clients.wait_empty()
        counts = [b.connections for b in atlas.runtime.pool]
        assert counts == [0, 0, 0]
        assert atlas.runtime.clients.statistics().accepted_total == clients
    assert len(results) == clients
    for n, got in results.items():
        assert got == [f"{n}:{i}" for i in range(messages)]


async def test_least_connections_spreads_clients_evenly() -> None:
    async with echo_backends(3) as ports, running_atlas(_config(ports)) as atlas:
        async with trio.open_nursery() as nursery:
            opened = trio.Semaphore(0)
            release = trio.Event()

            async def hold() -> None:
                async with open_ws(_url(atlas)):
                    opened.release()
                    await release.wait()

            for _ in range(30):
                nursery.start_soon(hold)
            for _ in range(30):
                await opened.acquire()
            assert sorted(b.connections for b in atlas.runtime.pool) == [10, 10, 10]
            release.set()


async def test_no_backend_available_answers_503_with_retry_after() -> None:
    async with echo_backends(1) as ports:
        config = attrs.evolve(
            _config(ports, retry_after=7),
            servers=(ServerConfig(name="tiny", url=f"ws://127.0.0.1:{ports[0]}", capacity=1),),
        )
        async with running_atlas(config) as atlas, open_ws(_url(atlas)):
            response, body = await _refused(atlas)
            assert response.status_code == 503
            assert dict(response.headers)[b"retry-after"] == b"7"
            assert body.endswith(b"\n")
            assert body.count(b"\n") == 1


async def test_refused_backend_is_skipped_then_502_when_all_fail() -> None:
    # A port with nothing listening: bind one, note the port, close it.
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    dead_port = sock.getsockname()[1]
    sock.close()
    async with echo_backends(1) as ports:
        config = _config([dead_port, ports[0]])
        async with running_atlas(config) as atlas:
            for _ in range(4):  # least connections alternates; the dead one is always skipped
                async with open_ws(_url(atlas)) as ws:
                    await ws.send_message("hi")
                    assert await ws.get_message() == "hi"
        async with running_atlas(_config([dead_port])) as atlas:
            assert (await _refused(atlas))[0].status_code == 502


async def test_hung_backend_times_out_with_502_never_hangs() -> None:
    async with trio.open_nursery() as nursery:
        hung = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        accepted: list[trio.SocketStream] = []

        async def accept_and_ignore() -> None:
            while True:
                accepted.append(await hung.accept())

        nursery.start_soon(accept_and_ignore)
        port = hung.socket.getsockname()[1]
        config = _config([port], connect_timeout=0.3, connect_attempts=1)
        async with running_atlas(config) as atlas:
            with trio.fail_after(5):
                assert (await _refused(atlas))[0].status_code == 502
        nursery.cancel_scope.cancel()
    for stream in accepted:
        await stream.aclose()
    await hung.aclose()


async def test_headers_path_and_subprotocol_are_forwarded() -> None:
    seen: list[WebSocketRequest] = []

    async def handler(request: WebSocketRequest) -> None:
        seen.append(request)
        ws = await request.accept(subprotocol="game.v2")
        await ws.send_message(request.path)
        with trio.move_on_after(5), contextlib.suppress(ConnectionClosed):
            await ws.get_message()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        config = _config([server.port])
        async with (
            running_atlas(config) as atlas,
            open_ws(
                _url(atlas, "/world/7?token=abc"),
                subprotocols=["game.v1", "game.v2"],
                extra_headers=[
                    (b"origin", b"https://play.example"),
                    (b"cookie", b"session=1"),
                    (b"authorization", b"Bearer xyz"),
                    (b"x-forwarded-for", b"203.0.113.9"),
                    (b"x-secret-hop", b"nope"),
                ],
            ) as ws,
        ):
            assert ws.subprotocol == "game.v2"
            assert await ws.get_message() == "/world/7?token=abc"
        nursery.cancel_scope.cancel()
    request = seen[0]
    headers = {k.lower(): v for k, v in request.headers}
    assert headers[b"origin"] == b"https://play.example"
    assert headers[b"cookie"] == b"session=1"
    assert headers[b"authorization"] == b"Bearer xyz"
    assert headers[b"x-forwarded-for"] == b"203.0.113.9, 127.0.0.1"
    assert headers[b"x-forwarded-proto"] == b"http"
    assert headers[b"x-atlas-client-id"]
    assert b"x-secret-hop" not in headers
    assert request.proposed_subprotocols == ("game.v1", "game.v2")


async def _serve_vanishing(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A backend that answers one message, then drops the TCP connection without a close frame."""

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        with contextlib.suppress(ConnectionClosed):
            message = await ws.get_message()
            await ws.send_message(f"vanishing: {message!s}")
        await trio.aclose_forcefully(ws._stream)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        task_status.started(server.port)


async def test_backend_that_vanishes_closes_the_client_with_1011_without_failover() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serve_vanishing)
        config = attrs.evolve(_config([port]), failover=FailoverConfig(enabled=False))
        async with running_atlas(config) as atlas, open_ws(_url(atlas)) as ws:
            await ws.send_message("bye")
            assert await ws.get_message() == "vanishing: bye"
            with trio.fail_after(5), pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert _reason(closed.value).code == CloseCode.INTERNAL_ERROR
        nursery.cancel_scope.cancel()


async def test_backend_that_vanishes_with_nowhere_to_go_closes_with_1013() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serve_vanishing)
        async with running_atlas(_config([port])) as atlas, open_ws(_url(atlas)) as ws:
            await ws.send_message("bye")
            assert await ws.get_message() == "vanishing: bye"
            with trio.fail_after(5), pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert _reason(closed.value).code == CloseCode.TRY_AGAIN_LATER
        nursery.cancel_scope.cancel()


async def test_backend_that_vanishes_fails_over_without_closing_the_client() -> None:
    async with trio.open_nursery() as nursery, echo_backends(1) as ports:
        vanishing = await nursery.start(_serve_vanishing)
        config = attrs.evolve(
            _config([vanishing, ports[0]]), failover=FailoverConfig(notice="moved to another server")
        )
        async with running_atlas(config) as atlas:
            # Least connections with ties in turn: the first client lands on the vanishing server.
            async with open_ws(_url(atlas)) as ws:
                assert [b.connections for b in atlas.runtime.pool] == [1, 0]
                await ws.send_message("one")
                assert await ws.get_message() == "vanishing: one"
                with trio.fail_after(5):
                    assert await ws.get_message() == "moved to another server"
                for i in range(20):
                    await ws.send_message(f"after {i}")
                for i in range(20):
                    assert await ws.get_message() == f"after {i}"
                assert [b.connections for b in atlas.runtime.pool] == [0, 1]
                (session,) = list(atlas.runtime.clients)
                assert session.failovers == 1
                assert session.messages_down == 21  # relayed ones; the notice is Atlas's own
        nursery.cancel_scope.cancel()


async def test_shutdown_drains_clients_with_1001_and_returns() -> None:
    async with echo_backends(1) as ports:
        shutdown = trio.Event()
        config = _config(ports, drain_timeout=5.0)
        returned = trio.Event()

        async def run_atlas(task_status: trio.TaskStatus[AtlasStarted]) -> None:
            await serve_atlas(config, shutdown=shutdown, task_status=task_status)
            returned.set()

        async with trio.open_nursery() as nursery:
            started: AtlasStarted = await nursery.start(run_atlas)
            async with open_ws(_url(started)) as ws:
                await ws.send_message("x")
                assert await ws.get_message() == "x"
                shutdown.set()
                with trio.fail_after(5), pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert _reason(closed.value).code == CloseCode.GOING_AWAY
            # serve_atlas returns by itself once drained.
            with trio.fail_after(5):
                await returned.wait()
        # New connections are refused once it is down.
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", started.proxy.port)


async def test_listen_port_in_use_is_a_startup_error() -> None:
    busy = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = busy.socket.getsockname()[1]
    config = Config(proxy=ProxyConfig(listen=f"127.0.0.1:{port}"), admin=EPHEMERAL_ADMIN)
    with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{port}"):
        await serve_atlas(config)
    await busy.aclose()


async def test_plain_http_request_gets_426() -> None:
    async with echo_backends(1) as ports, running_atlas(_config(ports)) as atlas:
        stream = await trio.open_tcp_stream("127.0.0.1", atlas.proxy.port)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some():
                data += chunk
        assert data.startswith(b"HTTP/1.1 426 ")
        await stream.aclose()


async def test_silent_client_is_dropped_after_handshake_timeout() -> None:
    async with echo_backends(1) as ports, running_atlas(_config(ports, handshake_timeout=0.2)) as atlas:
        stream = await trio.open_tcp_stream("127.0.0.1", atlas.proxy.port)
        with trio.fail_after(5):
            assert await stream.receive_some() == b""
        await stream.aclose()


async def test_idle_client_is_closed_with_1001() -> None:
    async with echo_backends(1) as ports, running_atlas(_config(ports, idle_timeout=0.3)) as atlas:
        async with open_ws(_url(atlas)) as ws:
            with trio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert _reason(closed.value).code == CloseCode.GOING_AWAY
            assert _reason(closed.value).reason == "idle timeout"


async def test_a_control_endpoint_that_is_down_does_not_stop_atlas(caplog: pytest.LogCaptureFixture) -> None:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    dead = sock.getsockname()[1]
    sock.close()
    async with echo_backends(1) as ports:
        config = attrs.evolve(
            _config(ports),
            servers=(
                ServerConfig(
                    name="gs-1",
                    url=f"ws://127.0.0.1:{ports[0]}",
                    control_url=f"ws://127.0.0.1:{dead}/atlas/control",
                ),
            ),
        )
        async with running_atlas(config) as atlas:
            await until(lambda: any("unavailable" in r.getMessage() for r in caplog.records))
            # Still serving: the backend gets blind transfers only, but clients are relayed as ever.
            async with open_ws(_url(atlas)) as ws:
                await ws.send_message("still here")
                assert await ws.get_message() == "still here"


async def test_a_client_over_its_message_rate_is_closed_with_1008_and_others_carry_on() -> None:
    async with echo_backends(1) as ports:
        config = _config(ports, message_rate=1.0, message_burst=5)
        async with running_atlas(config) as atlas, open_ws(_url(atlas)) as calm:
            async with open_ws(_url(atlas)) as eager:
                for i in range(5):  # the burst: one message per read, each answered
                    await eager.send_message(f"m{i}")
                    assert await eager.get_message() == f"m{i}"
                await eager.send_message("m5")  # over: 5 tokens spent, not one second later
                answers: list[str] = []
                with trio.fail_after(5), pytest.raises(ConnectionClosed) as closed:
                    while True:
                        answers.append(str(await eager.get_message()))
                assert _reason(closed.value).code == CloseCode.POLICY_VIOLATION
                assert _reason(closed.value).reason == "message rate limit exceeded"
                assert answers in ([], ["m5"])  # relayed before the close, like any earlier message
            for i in range(3):
                await calm.send_message(f"c{i}")
                assert await calm.get_message() == f"c{i}"
