"""TLS termination for clients (``wss://`` to Atlas): config, start-up checks, and end to end on 127.0.0.1."""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
import trustme
from trio_websocket import ConnectionClosed, WebSocketRequest

from atlas.config import AdminConfig, Config, ProxyConfig, ServerConfig, TlsVersion
from atlas.control.lifecycle import TransferReason
from atlas.errors import ConfigError, StartupError
from atlas.proxy import reactor
from atlas.proxy.tls import server_ssl_context
from atlas.supervisor import AtlasStarted, serve_atlas
from tests.wsclient import open_ws, until, websocket_servers


@attrs.frozen
class Pki:
    """A CA, and the PEM files of a server certificate it issued for 127.0.0.1 and localhost."""

    ca: trustme.CA
    cert: Path
    key: Path

    def client_context(self, *, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if maximum is not None:
            context.maximum_version = maximum
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    folder = tmp_path_factory.mktemp("pki")
    cert, key = folder / "server.pem", folder / "server.key"
    server.private_key_pem.write_to_path(str(key))
    server.cert_chain_pems[0].write_to_path(str(cert))
    for blob in server.cert_chain_pems[1:]:
        blob.write_to_path(str(cert), append=True)
    return Pki(ca, cert, key)


def _config(pki: Pki, ports: Sequence[int], tls_min_version: TlsVersion = "1.2") -> Config:
    return Config(
        admin=AdminConfig(listen="127.0.0.1:0"),
        proxy=ProxyConfig(
            listen="127.0.0.1:0",
            tls_cert=str(pki.cert),
            tls_key=str(pki.key),
            tls_min_version=tls_min_version,
        ),
        servers=tuple(
            ServerConfig(name=f"gs-{i + 1}", url=f"ws://127.0.0.1:{port}", capacity=1000)
            for i, port in enumerate(ports)
        ),
    )


class Backends:
    """Plain echo backends that record the ``X-Forwarded-Proto`` of every client link."""

    def __init__(self) -> None:
        self.protos: list[str] = []

    async def handler(self, request: WebSocketRequest) -> None:
        headers = {k.lower(): v for k, v in request.headers}
        if b"x-atlas-client-id" in headers:
            self.protos.append(headers[b"x-forwarded-proto"].decode())
        ws = await request.accept()
        with contextlib.suppress(ConnectionClosed):
            while True:
                message = await ws.get_message()
                with contextlib.suppress(ConnectionClosed):
                    await ws.send_message(message)

    @asynccontextmanager
    async def serve(self, count: int) -> AsyncIterator[list[int]]:
        async with websocket_servers(self.handler, count) as ports:
            yield ports


async def failing_tls_handshake(port: int, context: ssl.SSLContext) -> None:
    """A TLS client whose handshake with Atlas fails; it closes its socket, as any client would.

    (trio-websocket's client keeps its socket open after a failed TLS handshake, so that Atlas would
    only see the failure at ``handshake_timeout``.)
    """
    client = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", port), context, server_hostname="127.0.0.1"
    )
    try:
        with pytest.raises(trio.BrokenResourceError):
            await client.do_handshake()
    finally:
        await trio.aclose_forcefully(client)


@asynccontextmanager
async def running_atlas(config: Config) -> AsyncIterator[AtlasStarted]:
    async with trio.open_nursery() as nursery:
        started: AtlasStarted = await nursery.start(serve_atlas, config)
        yield started
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------------------------------
# Config and start-up
# --------------------------------------------------------------------------------------------------


def _errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        Config.from_toml(text)
    return list(info.value.errors)


def test_tls_keys_come_together_and_the_version_is_checked() -> None:
    assert _errors('[proxy]\ntls_cert = "cert.pem"\n') == ["proxy.tls_key: required with tls_cert"]
    assert _errors('[proxy]\ntls_key = "key.pem"\n') == ["proxy.tls_cert: required with tls_key"]
    assert _errors('[proxy]\ntls_min_version = "1.1"\n') == ["proxy.tls_min_version: must be one of 1.2, 1.3"]
    config = Config.from_toml('[proxy]\ntls_cert = "c.pem"\ntls_key = "k.pem"\ntls_min_version = "1.3"\n')
    assert config.proxy.tls and config.proxy.tls_min_version == "1.3"
    assert Config.from_toml(config.to_toml()) == config
    assert not ProxyConfig().tls
    assert server_ssl_context(ProxyConfig()) is None


def test_missing_or_bad_tls_files_are_one_line_startup_errors(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    cases: list[tuple[Path, Path, str]] = [
        (missing, pki.key, f"proxy.tls_cert: cannot read {missing}: No such file or directory"),
        (pki.cert, missing, f"proxy.tls_key: cannot read {missing}: No such file or directory"),
        (pki.key, pki.key, f"proxy.tls_cert: {pki.key} holds no PEM certificate"),
        (pki.cert, pki.cert, f"proxy.tls_key: {pki.cert} holds no PEM private key"),
    ]
    other = trustme.CA().issue_cert("localhost")
    other_key = tmp_path / "other.key"
    other.private_key_pem.write_to_path(str(other_key))
    cases.append(
        (
            pki.cert,
            other_key,
            f"proxy.tls_key: the key in {other_key} does not match the certificate in {pki.cert}",
        )
    )
    for cert, key, message in cases:
        with pytest.raises(StartupError) as info:
            server_ssl_context(ProxyConfig(tls_cert=str(cert), tls_key=str(key)))
        assert str(info.value) == message


async def test_atlas_does_not_start_on_a_missing_tls_file(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    config = attrs.evolve(
        _config(pki, [1]),
        proxy=ProxyConfig(listen="127.0.0.1:0", tls_cert=str(missing), tls_key=str(pki.key)),
    )
    with pytest.raises(StartupError) as info, trio.fail_after(10):
        await serve_atlas(config)
    assert str(info.value) == f"proxy.tls_cert: cannot read {missing}: No such file or directory"


# --------------------------------------------------------------------------------------------------
# The reactor's helpers on a TLS stream
# --------------------------------------------------------------------------------------------------


async def test_reactor_helpers_use_the_tls_stream_and_never_its_socket(pki: Pki) -> None:
    server_context = server_ssl_context(ProxyConfig(tls_cert=str(pki.cert), tls_key=str(pki.key)))
    assert server_context is not None
    a, b = trio.socket.socketpair()
    server = trio.SSLStream(trio.SocketStream(a), server_context, server_side=True)
    client = trio.SSLStream(trio.SocketStream(b), pki.client_context(), server_hostname="localhost")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    assert server.selected_alpn_protocol() is None  # the client offered none
    assert reactor.socket_fd(server) is None  # never lent to the reactor
    await reactor.send_all(client, b"hello")  # through TLS, not os.write on the socket
    assert await reactor.receive_some(server, 100) == b"hello"
    await reactor.send_all(server, b"back")
    assert await reactor.receive_some(client, 100) == b"back"
    assert reactor.close_now(server)
    assert server.transport_stream.socket.fileno() == -1
    assert reactor.close_now(server)  # idempotent
    await trio.aclose_forcefully(client)


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------


async def test_wss_client_gets_ordered_echoes_and_backends_see_https(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="atlas.proxy")
    backends = Backends()
    async with backends.serve(1) as ports, running_atlas(_config(pki, ports)) as atlas:
        assert atlas.proxy.tls and atlas.proxy.scheme == "wss"
        assert f"listening on wss://127.0.0.1:{atlas.proxy.port}" in caplog.messages
        url = f"wss://127.0.0.1:{atlas.proxy.port}/game"
        with trio.fail_after(20):
            async with open_ws(url, ssl_context=pki.client_context()) as ws:
                await until(lambda: len(atlas.runtime.clients) == 1)
                (session,) = list(atlas.runtime.clients)
                assert isinstance(session.client_stream, trio.SSLStream)
                assert session._reactor_fds(session.link) is None  # the pumps relay it, not the reactor
                count = 200
                # Many messages in flight at once, both ways, then every answer in order.
                for i in range(count):
                    await ws.send_message(f"m{i}")
                got = [await ws.get_message() for _ in range(count)]
                assert got == [f"m{i}" for i in range(count)]
                big = "x" * 200_000  # many TLS records for one message
                await ws.send_message(big)
                assert await ws.get_message() == big
        assert backends.protos == ["https"]


async def test_a_transfer_between_backends_keeps_a_tls_client_whole(pki: Pki) -> None:
    backends = Backends()
    async with backends.serve(2) as ports, running_atlas(_config(pki, ports)) as atlas:
        url = f"wss://127.0.0.1:{atlas.proxy.port}/"
        with trio.fail_after(20):
            async with open_ws(url, ssl_context=pki.client_context()) as ws:
                await until(lambda: len(atlas.runtime.clients) == 1)
                (session,) = list(atlas.runtime.clients)
                source = session.link.backend.name
                target = "gs-2" if source == "gs-1" else "gs-1"
                received: list[str] = []
                sent = 0

                async def read() -> None:
                    with contextlib.suppress(ConnectionClosed):
                        while True:
                            message = await ws.get_message()
                            assert isinstance(message, str)
                            received.append(message)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read)
                    for _ in range(50):
                        await ws.send_message(str(sent))
                        sent += 1
                    outcome = await atlas.transfers.transfer(session.client_id, target, TransferReason.ADMIN)
                    assert outcome.committed, (outcome.failure, outcome.phase)
                    for _ in range(50):
                        await ws.send_message(str(sent))
                        sent += 1
                    await until(lambda: received[-1:] == [str(sent - 1)])
                    nursery.cancel_scope.cancel()
                assert session.link.backend.name == target
                # In order, never twice (the source's answers still in flight at the cut may be lost).
                numbers = [int(m) for m in received]
                assert numbers == sorted(set(numbers))
        assert backends.protos == ["https", "https"]


async def test_a_tls_client_fails_over_with_its_scheme(pki: Pki) -> None:
    backends = Backends()
    async with backends.serve(2) as ports, running_atlas(_config(pki, ports)) as atlas:
        url = f"wss://127.0.0.1:{atlas.proxy.port}/"
        with trio.fail_after(20):
            async with open_ws(url, ssl_context=pki.client_context()) as ws:
                await ws.send_message("one")
                assert await ws.get_message() == "one"
                (session,) = list(atlas.runtime.clients)
                first = session.link.backend.name
                session.fail_over()  # what the health monitor does when a backend dies
                await until(lambda: session.link.backend.name != first and session.failovers == 1)
                await ws.send_message("two")
                assert await ws.get_message() == "two"
        assert backends.protos == ["https", "https"]


async def test_failed_tls_handshakes_leave_a_live_session_alone(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="atlas.proxy")
    backends = Backends()
    async with backends.serve(1) as ports, running_atlas(_config(pki, ports)) as atlas:
        port = atlas.proxy.port
        url = f"wss://127.0.0.1:{port}/"
        with trio.fail_after(20):
            async with open_ws(url, ssl_context=pki.client_context()) as live:
                await live.send_message("before")
                assert await live.get_message() == "before"
                # Plain HTTP to the TLS port: the connection is closed, nothing is answered.
                plain = await trio.open_tcp_stream("127.0.0.1", port)
                async with plain:
                    await plain.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    with contextlib.suppress(trio.BrokenResourceError):
                        assert await plain.receive_some(1000) == b""
                # A client that does not trust Atlas's certificate.
                wrong = ssl.create_default_context()
                trustme.CA().configure_trust(wrong)
                await failing_tls_handshake(port, wrong)
                await until(lambda: sum("TLS handshake failed" in m for m in caplog.messages) == 2)
                await live.send_message("after")
                assert await live.get_message() == "after"
        failures = [r for r in caplog.records if getattr(r, "event", None) == "tls_failed"]
        assert len(failures) == 2 and all(r.levelno == logging.INFO for r in failures)
        assert backends.protos == ["https"]


async def test_tls_min_version_refuses_older_clients(pki: Pki) -> None:
    backends = Backends()
    async with backends.serve(1) as ports, running_atlas(_config(pki, ports, tls_min_version="1.3")) as atlas:
        url = f"wss://127.0.0.1:{atlas.proxy.port}/"
        with trio.fail_after(20):
            await failing_tls_handshake(atlas.proxy.port, pki.client_context(maximum=ssl.TLSVersion.TLSv1_2))
            async with open_ws(url, ssl_context=pki.client_context()) as ws:
                await ws.send_message("ok")
                assert await ws.get_message() == "ok"


async def test_the_tls_handshake_is_bounded_by_the_handshake_timeout(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="atlas.proxy")
    backends = Backends()
    async with backends.serve(1) as ports, running_atlas(_config(pki, ports)) as atlas:
        atlas_config = atlas.runtime.config
        assert atlas_config.proxy.handshake_timeout == 10.0
        # One deadline for the TLS handshake and the upgrade (shortened here): a client that connects and
        # never starts TLS is closed at it, and so is one that finishes TLS but sends no request.
        short = attrs.evolve(atlas_config.proxy, handshake_timeout=0.2)
        atlas.runtime.config = attrs.evolve(atlas_config, proxy=short)
        with trio.fail_after(10):
            silent = await trio.open_tcp_stream("127.0.0.1", atlas.proxy.port)
            async with silent:
                with contextlib.suppress(trio.BrokenResourceError):
                    assert await silent.receive_some(100) == b""
            tcp = await trio.open_tcp_stream("127.0.0.1", atlas.proxy.port)
            quiet = trio.SSLStream(tcp, pki.client_context(), server_hostname="127.0.0.1")
            async with quiet:
                await quiet.do_handshake()
                with contextlib.suppress(trio.BrokenResourceError):
                    assert await quiet.receive_some(100) == b""
        assert any(m.endswith("no TLS handshake within 0.2 s") for m in caplog.messages)
        assert any(m.endswith("no upgrade request within 0.2 s") for m in caplog.messages)
