"""``atlas status``, ``servers``, ``clients`` and ``drain`` against a real ops server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from atlas.cli import main
from atlas.config import AdminConfig, Config, ProxyConfig, ServerConfig
from atlas.demo.servers import serve_echo_server
from atlas.ops._render import render_drain, render_servers, table
from atlas.ops.client import AdminClient, AdminError, AdminUnreachableError
from atlas.ops.server import OpsListening, serve_ops
from atlas.pool import BackendState
from atlas.proxy.listener import ProxyListening, serve_proxy
from atlas.runtime import Runtime

TOKEN = "cli-token"


@pytest.fixture(autouse=True)
def _no_admin_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATLAS_ADMIN_URL", raising=False)
    monkeypatch.delenv("ATLAS_ADMIN_TOKEN", raising=False)


def make_runtime(*, token: str = "", servers: int = 2) -> Runtime:
    return Runtime.from_config(
        Config(
            proxy=ProxyConfig(listen="127.0.0.1:0"),
            servers=tuple(
                ServerConfig(name=f"game-server-{i + 1}", url=f"ws://127.0.0.1:{18080 + i}", capacity=50)
                for i in range(servers)
            ),
            admin=AdminConfig(listen="127.0.0.1:0", token=token),
        )
    )


@asynccontextmanager
async def running_ops(runtime: Runtime) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        listening: OpsListening = await nursery.start(partial(serve_ops, runtime))
        yield listening.url
        nursery.cancel_scope.cancel()


async def atlas(*args: str) -> int:
    """Run the command line in a worker thread (it is synchronous), as a user would."""
    return await trio.to_thread.run_sync(main, list(args))


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_status(capsys: pytest.CaptureFixture[str]) -> None:
    runtime = make_runtime()
    async with running_ops(runtime) as url:
        assert await atlas("status", "--url", url) == 0
        out = capsys.readouterr().out
        lines = out.splitlines()
        assert lines[0].split() == ["version", "0.1.0"]
        assert "accepting    yes" in out
        assert "servers      2 (2 healthy), 2 available" in out
        assert "connections  0 of 100 capacity" in out

        assert await atlas("status", "--url", url, "--json") == 0
        status = json.loads(capsys.readouterr().out)
        assert status["servers"]["total"] == 2
        assert status["accepting"] is True


async def test_servers_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    runtime = make_runtime()
    async with running_ops(runtime) as url:
        assert await atlas("servers", "--url", url) == 0
        header, first, second = capsys.readouterr().out.splitlines()
        assert header.split() == [
            "NAME",
            "STATE",
            "CLIENTS",
            "CAPACITY",
            "WEIGHT",
            "REGISTERED",
            "URL",
            "TAGS",
        ]
        assert first.split() == [
            "game-server-1",
            "healthy",
            "0",
            "50",
            "1",
            "no",
            "ws://127.0.0.1:18080",
            "-",
        ]
        assert second.split()[0] == "game-server-2"
        # Aligned: every column starts where its header does.
        for column in ("STATE", "REGISTERED", "URL"):
            assert first[header.index(column) - 1] == " "
            assert first[header.index(column)] != " "
        # Numbers are right-aligned under their header's last letter.
        end = header.index("CAPACITY") + len("CAPACITY")
        assert first[end - 2 : end] == "50"

        assert await atlas("servers", "--url", url, "--json") == 0
        servers = json.loads(capsys.readouterr().out)
        assert [s["name"] for s in servers] == ["game-server-1", "game-server-2"]


async def test_clients_lists_a_live_client(capsys: pytest.CaptureFixture[str]) -> None:
    runtime = make_runtime(servers=0)
    async with trio.open_nursery() as nursery:
        echo_port: int = await nursery.start(serve_echo_server, "127.0.0.1", 0)
        proxy: ProxyListening = await nursery.start(partial(serve_proxy, runtime, shutdown=trio.Event()))
        ops: OpsListening = await nursery.start(partial(serve_ops, runtime))
        assert await atlas("clients", "--url", ops.url) == 0
        assert capsys.readouterr().out.strip() == "no clients"

        async with httpx.AsyncClient(base_url=ops.url) as http:
            body = {"name": "echo-1", "url": f"ws://127.0.0.1:{echo_port}"}
            assert (await http.post("/api/v1/servers", json=body)).status_code == 201
        async with open_websocket_url(f"ws://127.0.0.1:{proxy.port}/") as ws:
            await ws.send_message("ping")
            assert await ws.get_message() == "ping"
            assert await atlas("clients", "--url", ops.url) == 0
            header, row = capsys.readouterr().out.splitlines()
            assert header.split()[:5] == ["ID", "PLAYER", "PEER", "SERVER", "CONNECTED"]
            cells = row.split()
            assert cells[1] == "-"  # no token auth: no verified player id
            assert cells[2].startswith("127.0.0.1:")
            assert cells[3] == "echo-1"
            assert cells[4].endswith("Z")
            assert cells[5:7] == ["1", "1"]  # one message each way

            assert await atlas("clients", "--url", ops.url, "--json") == 0
            (client,) = json.loads(capsys.readouterr().out)
            assert client["server"] == "echo-1"
        nursery.cancel_scope.cancel()


async def test_drain(capsys: pytest.CaptureFixture[str]) -> None:
    runtime = make_runtime()
    async with running_ops(runtime) as url:
        assert await atlas("drain", "game-server-1", "--url", url) == 0
        assert capsys.readouterr().out.strip() == "game-server-1: draining, 0 clients left"
        backend = runtime.pool.get("game-server-1")
        assert backend is not None
        assert backend.state is BackendState.DRAINING

        assert await atlas("drain", "nope", "--url", url) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == "atlas: error: no server named 'nope' (HTTP 404)\n"


async def test_token_from_option_or_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = make_runtime(token=TOKEN)
    async with running_ops(runtime) as url:
        assert await atlas("servers", "--url", url) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert err.startswith(
            f"atlas: error: the admin API at {url} refused the request: missing bearer token"
        )

        assert await atlas("servers", "--url", url, "--token", "wrong") == 1
        assert "invalid bearer token" in capsys.readouterr().err

        assert await atlas("servers", "--url", url, "--token", TOKEN) == 0
        assert "game-server-1" in capsys.readouterr().out

        monkeypatch.setenv("ATLAS_ADMIN_URL", url)
        monkeypatch.setenv("ATLAS_ADMIN_TOKEN", TOKEN)
        assert await atlas("status") == 0
        assert capsys.readouterr().out.startswith("version")


def test_unreachable_admin_api_is_one_line_without_traceback() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    commands = (
        ["status"],
        ["servers", "--json"],
        ["clients"],
        ["drain", "game-server-1"],
        ["transfer", "3fa9c1-17", "game-server-2"],
    )
    for command in commands:
        result = subprocess.run(
            [sys.executable, "-m", "atlas", *command, "--url", url],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 1, result
        assert result.stdout == ""
        assert result.stderr.startswith(f"atlas: error: cannot reach the admin API at {url}: ")
        assert result.stderr.count("\n") == 1
        assert "Traceback" not in result.stderr


def test_admin_client_errors() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/status":
            return httpx.Response(200, text="<html>not json</html>")
        return httpx.Response(409, json={"error": "a server named 'x' already exists", "status": 409})

    with AdminClient("http://atlas.test", transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(AdminError, match="not JSON") as info:
            client.status()
        assert info.value.status == 200
        with pytest.raises(AdminError) as info:
            client.add_server("x", "ws://h:1")
        assert str(info.value) == "a server named 'x' already exists (HTTP 409)"
        assert info.value.status == 409

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with AdminClient("http://atlas.test/", transport=httpx.MockTransport(refuse)) as client:
        with pytest.raises(AdminUnreachableError) as unreachable:
            client.servers()
    message = str(unreachable.value)
    assert message == "cannot reach the admin API at http://atlas.test: [Errno 111] Connection refused"


def test_admin_client_quotes_names() -> None:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path.decode())
        view: dict[str, Any] = {"name": "a?b", "state": "draining", "connections": 1}
        return httpx.Response(200, json=view)

    with AdminClient("http://atlas.test", transport=httpx.MockTransport(answer)) as client:
        assert render_drain(client.drain("a?b")) == "a?b: draining, 1 client left"
    assert seen == ["/api/v1/servers/a%3Fb/drain"]


def test_tables() -> None:
    text = table(("A", "NUMBER"), [("x", "1"), ("longer", "12345")], right=frozenset({1}))
    assert text.splitlines() == ["A       NUMBER", "x            1", "longer   12345"]
    assert render_servers([]) == "no servers"
