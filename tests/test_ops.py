"""The ops plane: the admin API, /health, /metrics and Horizon registration.

Most endpoints are exercised through Starlette's TestClient (no sockets); the Horizon replay, the
routing of a client to a registered server, startup refusals and shutdown run over real sockets on
127.0.0.1 with ``serve_ops``.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import open_websocket_url

from atlas.config import AdminConfig, Config, FailoverConfig, ProxyConfig, ServerConfig
from atlas.demo.servers import serve_echo_server
from atlas.errors import HandshakeError, StartupError
from atlas.ops.app import MAX_BODY_SIZE, create_app
from atlas.ops.horizon import (
    HeartbeatReport,
    HorizonRegistry,
    RegionCoord,
    RegisterOutcome,
    Registration,
    RegistrationError,
    heartbeat_answer,
    registration_answer,
)
from atlas.ops.server import STOP_TIMEOUT, OpsListening, check_exposure, serve_ops
from atlas.pool import Backend, BackendState
from atlas.proxy.frames import CloseCode, FrameScanner
from atlas.proxy.listener import ProxyListening, serve_proxy
from atlas.proxy.session import BackendLink, ClientSession, EndKind
from atlas.runtime import Runtime

with warnings.catch_warnings():
    # Starlette would rather have httpx2 than httpx; the test client works the same with either.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

TOKEN = "s3cret-token"
FIVE_FIELDS = {"success", "server_id", "message", "heartbeat_interval_secs", "adjacent_servers"}
HB_PATH = "/api/v1/servers/horizon-0-0-0/heartbeat"


def make_runtime(*, servers: int = 2, **admin: Any) -> Runtime:
    settings: dict[str, Any] = {"listen": "127.0.0.1:0", **admin}
    config = Config(
        proxy=ProxyConfig(listen="127.0.0.1:0"),
        servers=tuple(
            ServerConfig(name=f"gs-{i + 1}", url=f"ws://127.0.0.1:{18080 + i}") for i in range(servers)
        ),
        admin=AdminConfig(**settings),
    )
    return Runtime.from_config(config)


@contextmanager
def api(runtime: Runtime, **kwargs: Any) -> Iterator[TestClient]:
    with TestClient(create_app(runtime), backend="trio", **kwargs) as client:
        yield client


class _Links:
    """The data plane's side of a session, reduced to what these tests need (no failover)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def open_link(self, exclude: frozenset[str]) -> BackendLink:
        raise HandshakeError(503, "no failover in these tests")

    async def open_link_to(self, backend: Backend, *, transfer: str, subprotocol: str | None) -> BackendLink:
        raise HandshakeError(503, "no transfers in these tests")

    def link_closed(self, link: BackendLink) -> None:
        self.runtime.release(link.backend)

    def failed_over(self, session: ClientSession, old: BackendLink, new: BackendLink | None) -> None:
        pass


def add_session(runtime: Runtime, server: str, *, peer: str = "203.0.113.7:50123") -> ClientSession:
    """A real ClientSession on memory streams, registered as if the listener had accepted it."""
    backend = runtime.pool.get(server)
    assert backend is not None
    runtime.pool.acquire(backend)
    client_stream, _client_peer = trio.testing.memory_stream_pair()
    link_stream, _backend_peer = trio.testing.memory_stream_pair()
    scanner = FrameScanner(masked=False, max_message_size=1 << 20, validate_utf8=True)
    session = ClientSession(
        client_id=runtime.clients.new_id(),
        peer=peer,
        client_stream=client_stream,
        link=BackendLink(backend=backend, stream=link_stream, scanner=scanner),
        provider=_Links(runtime),
        failover=FailoverConfig(enabled=False),
        max_message_size=1 << 20,
        validate_utf8=True,
        close_timeout=1.0,
    )
    session.bytes_up = 120
    session.bytes_down = 340
    runtime.clients.add(session)
    return session


def horizon_body(
    name: str = "horizon-0-0-0",
    address: str = "127.0.0.1:8081",
    coord: tuple[int, int, int] = (0, 0, 0),
    **extra: Any,
) -> dict[str, Any]:
    """A registration body with Horizon's field order and types."""
    body: dict[str, Any] = {
        "name": name,
        "address": address,
        "region_coord": {"x": coord[0], "y": coord[1], "z": coord[2]},
        "center": {"x": 0.0, "y": 0.0, "z": 0.0},
        "bounds": 1000.0,
        "capacity": 1000,
        "version": "0.1.0",
        "metadata": {},
    }
    body.update(extra)
    return body


def heartbeat_body(server_id: str = "horizon-0-0-0") -> dict[str, Any]:
    return {
        "server_id": server_id,
        "current_connections": 0,
        "load": 0.0,
        "accepting_connections": True,
        "avg_tick_ms": 0.0,
        "memory_bytes": 0,
    }


def assert_error(response: httpx.Response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["status"] == status
    assert isinstance(body["error"], str)
    assert "\n" not in body["error"]
    for fragment in fragments:
        assert fragment in body["error"]


# ------------------------------------------------------------------------------------------------
# /health and /metrics
# ------------------------------------------------------------------------------------------------


def test_health_is_ok_while_accepting_then_503() -> None:
    runtime = make_runtime()
    with api(runtime) as client:
        response = client.get("/health")
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}
        runtime.accepting = False
        response = client.get("/health")
        assert response.status_code == 503
        assert response.json()["status"] == "draining"


def test_metrics_is_prometheus_text() -> None:
    runtime = make_runtime()
    with api(runtime) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert "atlas_connections_accepted" in families
    capacity = {s.labels["server"]: s.value for s in families["atlas_backend_capacity"].samples}
    assert capacity == {"gs-1": 1000.0, "gs-2": 1000.0}


# ------------------------------------------------------------------------------------------------
# Servers
# ------------------------------------------------------------------------------------------------


def test_list_and_get_servers() -> None:
    runtime = make_runtime()
    with api(runtime) as client:
        servers = client.get("/api/v1/servers").json()
        assert [s["name"] for s in servers] == ["gs-1", "gs-2"]
        assert servers[0] == {
            "name": "gs-1",
            "url": "ws://127.0.0.1:18080",
            "state": "healthy",
            "accepting": True,
            "connections": 0,
            "capacity": 1000,
            "weight": 1,
            "tags": [],
            "control_url": "",
            "last_report": None,
            "registered": False,
        }
        assert client.get("/api/v1/servers/gs-2").json()["url"] == "ws://127.0.0.1:18081"
        assert_error(client.get("/api/v1/servers/nope"), 404, "'nope'")


def test_add_server_validates_like_the_config() -> None:
    runtime = make_runtime()
    with api(runtime) as client:
        body = {"name": "gs-3", "url": "ws://10.0.0.3:8080/game", "capacity": 50, "weight": 3, "tags": ["eu"]}
        response = client.post("/api/v1/servers", json=body)
        assert response.status_code == 201, response.text
        assert response.headers["location"] == "/api/v1/servers/gs-3"
        view = response.json()
        assert (view["capacity"], view["weight"], view["tags"], view["state"]) == (50, 3, ["eu"], "healthy")
        backend = runtime.pool.get("gs-3")
        assert backend is not None
        assert (backend.host, backend.port, backend.path) == ("10.0.0.3", 8080, "/game")
        defaults = client.post("/api/v1/servers", json={"name": "gs-4", "url": "ws://h:1"}).json()
        assert (defaults["capacity"], defaults["weight"], defaults["tags"]) == (1000, 1, [])
        controlled = {"name": "gs-5", "url": "ws://h:1", "control_url": "ws://h:2/control"}
        assert client.post("/api/v1/servers", json=controlled).json()["control_url"] == "ws://h:2/control"
        backend = runtime.pool.get("gs-5")
        assert backend is not None
        assert backend.control_url == "ws://h:2/control"

        assert_error(client.post("/api/v1/servers", json=body), 409, "already exists")
        bad = [
            ({"name": "x y", "url": "ws://h:1"}, "name: must not contain spaces"),
            ({"name": "", "url": "ws://h:1"}, "name: must not be empty"),
            ({"name": "x", "url": "http://h:1"}, "url: not a ws:// or wss:// URL"),
            ({"name": "x", "url": "ws://h:1", "capacity": 0}, "capacity: must be >= 1"),
            ({"name": "x", "url": "ws://h:1", "capacity": "5"}, "capacity: expected an integer"),
            ({"name": "x", "url": "ws://h:1", "weight": True}, "weight: expected an integer"),
            ({"name": "x", "url": "ws://h:1", "tags": "eu"}, "tags: expected an array of strings"),
            ({"name": "x", "url": "ws://h:1", "tags": [""]}, "tags[0]: must not be empty"),
            ({"name": "x", "url": "ws://h:1", "colour": "red"}, "colour: unknown field"),
            ({"url": "ws://h:1"}, "name: missing required field"),
            ({"name": "x", "url": "ws://h:1", "control_url": "tcp://h:2"}, "control_url: not a ws://"),
        ]
        for payload, message in bad:
            assert_error(client.post("/api/v1/servers", json=payload), 400, message)
        assert_error(client.post("/api/v1/servers", content=b"{nope"), 400, "invalid JSON")
        assert_error(client.post("/api/v1/servers", content=b"[1, 2]"), 400, "JSON object")
        assert_error(client.post("/api/v1/servers"), 400, "JSON object")
        assert_error(client.post("/api/v1/servers", content=b"\xff\xfe"), 400, "invalid JSON")
    assert [b.name for b in runtime.pool] == ["gs-1", "gs-2", "gs-3", "gs-4", "gs-5"]


def test_drain_server() -> None:
    runtime = make_runtime()
    with api(runtime) as client:
        response = client.post("/api/v1/servers/gs-1/drain")
        assert response.status_code == 200
        assert response.json()["state"] == "draining"
        assert_error(client.post("/api/v1/servers/nope/drain"), 404)
    chosen = {runtime.pool.choose().name for _ in range(10)}  # type: ignore[union-attr]
    assert chosen == {"gs-2"}


def test_delete_server_drains_then_removes_once_empty() -> None:
    runtime = make_runtime()
    session = add_session(runtime, "gs-1")
    with api(runtime) as client:
        response = client.delete("/api/v1/servers/gs-1", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 202
        view = response.json()
        assert (view["state"], view["connections"], view["removed"]) == ("draining", 1, False)
        assert "gs-1" in runtime.pool
        runtime.clients.discard(session.client_id)
        runtime.release(session.link.backend)
        assert "gs-1" not in runtime.pool
        assert_error(client.get("/api/v1/servers/gs-1"), 404)

        response = client.delete("/api/v1/servers/gs-2")
        assert response.status_code == 202
        assert response.json()["removed"] is True
        assert_error(client.delete("/api/v1/servers/gs-2"), 404)
    assert len(runtime.pool) == 0


# ------------------------------------------------------------------------------------------------
# Clients and status
# ------------------------------------------------------------------------------------------------


def test_list_get_and_close_clients() -> None:
    runtime = make_runtime()
    first = add_session(runtime, "gs-1")
    second = add_session(runtime, "gs-2", peer="[2001:db8::1]:4000")
    with api(runtime) as client:
        clients = client.get("/api/v1/clients").json()
        assert [c["id"] for c in clients] == [first.client_id, second.client_id]
        view = clients[0]
        assert view["peer"] == "203.0.113.7:50123"
        assert view["server"] == "gs-1"
        assert (view["messages_up"], view["messages_down"], view["bytes_up"], view["bytes_down"]) == (
            0,
            0,
            120,
            340,
        )
        assert view["connected_at"].endswith("Z")
        assert abs(_parse_iso(view["connected_at"]) - first.connected_at) < 0.01
        assert client.get(f"/api/v1/clients/{second.client_id}").json()["peer"] == "[2001:db8::1]:4000"
        assert_error(client.get("/api/v1/clients/nobody"), 404, "'nobody'")

        response = client.delete(f"/api/v1/clients/{first.client_id}")
        assert response.status_code == 202
        assert response.json() == {"id": first.client_id, "closing": True, "code": 1000, "reason": ""}
        assert first.ending is not None
        assert (first.ending.kind, first.ending.code, first.ending.reason) == (EndKind.REQUESTED, 1000, "")

        response = client.request(
            "DELETE", f"/api/v1/clients/{second.client_id}", json={"code": 4001, "reason": "kicked"}
        )
        assert response.status_code == 202
        assert second.ending is not None
        assert (second.ending.code, second.ending.reason) == (4001, "kicked")
        assert_error(client.delete("/api/v1/clients/nobody"), 404)


def test_close_client_options_are_validated() -> None:
    runtime = make_runtime()
    session = add_session(runtime, "gs-1")
    path = f"/api/v1/clients/{session.client_id}"
    with api(runtime) as client:
        for code in (999, 1002, 1005, 1006, 3000, 5000):
            assert_error(client.request("DELETE", path, json={"code": code}), 400, "code: must be")
        assert_error(client.request("DELETE", path, json={"code": "1000"}), 400, "code: expected an integer")
        assert_error(client.delete(f"{path}?code=abc"), 400, "code: expected an integer")
        assert_error(client.request("DELETE", path, json={"reason": "x" * 124}), 400, "reason: at most 123")
        assert_error(client.request("DELETE", path, json={"reason": 5}), 400, "reason: expected a string")
        assert_error(client.request("DELETE", path, json={"why": "x"}), 400, "why: unknown field")
        assert session.ending is None
        response = client.delete(f"{path}?code=1012&reason=restarting")
        assert response.status_code == 202
    assert session.ending is not None
    assert (session.ending.code, session.ending.reason) == (CloseCode.SERVICE_RESTART, "restarting")


def test_status() -> None:
    runtime = make_runtime()
    add_session(runtime, "gs-1")
    runtime.clients.refused_total = 2
    with api(runtime) as client:
        client.post("/api/v1/servers/gs-2/drain")
        status = client.get("/api/v1/status").json()
    assert status["version"] == "0.1.0"
    assert status["accepting"] is True
    assert status["uptime"] >= 0
    assert status["clients"] == 1
    assert status["servers"] == {
        "total": 2,
        "available": 1,
        "connections": 1,
        "capacity": 2000,
        "healthy": 1,
        "unhealthy": 0,
        "ejected": 0,
        "draining": 1,
    }
    assert status["totals"] == {
        "accepted": 1,
        "refused": 2,
        "messages_up": 0,
        "messages_down": 0,
        "bytes_up": 120,
        "bytes_down": 340,
    }


# ------------------------------------------------------------------------------------------------
# Errors and access
# ------------------------------------------------------------------------------------------------


def test_errors_are_json() -> None:
    runtime = make_runtime()
    with api(runtime, raise_server_exceptions=False) as client:
        assert_error(client.get("/nowhere"), 404, "not found: GET /nowhere")
        response = client.put("/health")
        assert_error(response, 405, "method not allowed")
        assert "GET" in response.headers["allow"]
        assert_error(client.post("/api/v1/servers", content=b"x" * (MAX_BODY_SIZE + 1)), 413)
        runtime.clients = None  # type: ignore[assignment]  # any bug in a handler
        response = client.get("/api/v1/clients")
        assert_error(response, 500, "internal error")
        assert "Traceback" not in response.text


def test_token_guards_every_admin_endpoint() -> None:
    runtime = make_runtime(token=TOKEN)
    session = add_session(runtime, "gs-1")
    guarded = [
        ("GET", "/metrics"),
        ("GET", "/api/v1/status"),
        ("GET", "/api/v1/servers"),
        ("GET", "/api/v1/servers/gs-1"),
        ("POST", "/api/v1/servers"),
        ("POST", "/api/v1/servers/gs-1/drain"),
        ("DELETE", "/api/v1/servers/gs-1"),
        ("GET", "/api/v1/clients"),
        ("GET", f"/api/v1/clients/{session.client_id}"),
        ("DELETE", f"/api/v1/clients/{session.client_id}"),
        ("POST", f"/api/v1/clients/{session.client_id}/transfer"),
        ("GET", "/api/v1/transfers"),
    ]
    wrong = [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer"},
    ]
    with api(runtime) as client:
        for method, path in guarded:
            for headers in wrong:
                response = client.request(method, path, headers=headers)
                assert_error(response, 401, "bearer token")
                assert response.headers["www-authenticate"].startswith("Bearer")
        assert client.get("/health").status_code == 200
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/api/v1/servers", headers=good).status_code == 200
        assert client.get("/metrics", headers=good).status_code == 200
        assert client.get("/api/v1/status", headers={"authorization": f"bearer {TOKEN}"}).status_code == 200
    assert session.ending is None
    assert runtime.pool.get("gs-1") is not None
    assert runtime.pool.get("gs-1").state is BackendState.HEALTHY  # type: ignore[union-attr]


def test_registration_is_open_but_only_for_registered_servers() -> None:
    runtime = make_runtime(token=TOKEN)
    with api(runtime) as client:
        assert client.post("/api/v1/servers/register", json=horizon_body()).status_code == 201
        hb = client.put(HB_PATH, json=heartbeat_body())
        assert hb.status_code == 200
        # A configured server cannot be removed without the token, even through Horizon's call...
        assert_error(client.delete("/api/v1/servers/gs-1"), 401)
        # ... nor can a name be taken over by registering it.
        assert_error(client.post("/api/v1/servers/register", json=horizon_body(name="gs-1")), 409)
        # A registered server unregisters without a token, as Horizon does.
        assert client.delete("/api/v1/servers/horizon-0-0-0").status_code == 202
    assert "horizon-0-0-0" not in runtime.pool
    assert "gs-1" in runtime.pool


def test_registration_endpoints_are_404_when_disabled() -> None:
    runtime = make_runtime(token=TOKEN, allow_registration=False)
    good = {"Authorization": f"Bearer {TOKEN}"}
    with api(runtime) as client:
        for headers in ({}, good):
            assert_error(client.post("/api/v1/servers/register", json=horizon_body(), headers=headers), 404)
            response = client.put(
                "/api/v1/servers/gs-1/heartbeat", json=heartbeat_body("gs-1"), headers=headers
            )
            assert_error(response, 404, "registration is disabled")
        assert_error(client.delete("/api/v1/servers/gs-1"), 401)
    assert [b.name for b in runtime.pool] == ["gs-1", "gs-2"]


def test_exposure_check() -> None:
    assert check_exposure("127.0.0.1:9001", "").port == 9001
    assert check_exposure("[::1]:9001", "").host == "::1"
    assert check_exposure("localhost:9001", "").host == "localhost"
    assert check_exposure("0.0.0.0:9001", "t").host == "0.0.0.0"
    for listen in ("0.0.0.0:9001", "[::]:9001", "10.1.2.3:9001", "ops.example.com:9001"):
        with pytest.raises(StartupError) as info:
            check_exposure(listen, "")
        assert "\n" not in str(info.value)
    with pytest.raises(
        StartupError, match=r"^admin\.listen: 0\.0\.0\.0:9001 is not loopback: set \[admin\] token$"
    ):
        check_exposure("0.0.0.0:9001", "")


# ------------------------------------------------------------------------------------------------
# Horizon registration through the app
# ------------------------------------------------------------------------------------------------


def test_register_answers_all_five_fields_and_routes() -> None:
    runtime = make_runtime(servers=0, heartbeat_interval=12)
    with api(runtime) as client:
        response = client.post("/api/v1/servers/register", json=horizon_body(metadata={"build": "x"}))
        assert response.status_code == 201
        answer = response.json()
        assert set(answer) == {
            "success",
            "server_id",
            "message",
            "heartbeat_interval_secs",
            "adjacent_servers",
        }
        assert answer["success"] is True
        assert answer["server_id"] == "horizon-0-0-0"
        assert answer["heartbeat_interval_secs"] == 12
        assert answer["adjacent_servers"] == []
        backend = runtime.pool.get("horizon-0-0-0")
        assert backend is not None
        assert (backend.url, backend.host, backend.port, backend.capacity) == (
            "ws://127.0.0.1:8081",
            "127.0.0.1",
            8081,
            1000,
        )
        assert runtime.pool.choose() is backend
        view = client.get("/api/v1/servers/horizon-0-0-0").json()
        assert view["registered"] is True
        assert view["tags"] == ["horizon"]
        assert view["last_report"] is None
        registration = view["registration"]
        assert registration["region_coord"] == {"x": 0, "y": 0, "z": 0}
        assert registration["center"] == {"x": 0.0, "y": 0.0, "z": 0.0}
        assert registration["bounds"] == 1000.0
        assert registration["version"] == "0.1.0"
        assert registration["metadata"] == {"build": "x"}
        assert registration["last_heartbeat_at"] is None


def test_adjacent_servers_are_the_six_face_neighbours() -> None:
    runtime = make_runtime(servers=0)
    neighbours = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    others = [(1, 1, 0), (2, 0, 0), (1, 1, 1), (0, -1, -1)]
    with api(runtime) as client:
        for i, coord in enumerate(neighbours + others):
            body = horizon_body(name=f"h{i}", address=f"10.0.0.{i + 1}:8080", coord=coord)
            assert client.post("/api/v1/servers/register", json=body).status_code == 201
        answer = client.post("/api/v1/servers/register", json=horizon_body()).json()
    adjacent = answer["adjacent_servers"]
    assert sorted(tuple(a["region_coord"].values()) for a in adjacent) == sorted(neighbours)
    assert {
        "server_id": "h0",
        "address": "10.0.0.1:8080",
        "region_coord": {"x": 1, "y": 0, "z": 0},
    } in adjacent


def test_reregistration_updates_or_replaces() -> None:
    runtime = make_runtime(servers=0)
    with api(runtime) as client:
        client.post("/api/v1/servers/register", json=horizon_body())
        original = runtime.pool.get("horizon-0-0-0")
        client.put(HB_PATH, json=heartbeat_body())

        response = client.post("/api/v1/servers/register", json=horizon_body(capacity=20))
        assert response.status_code == 200
        assert "updated" in response.json()["message"]
        assert runtime.pool.get("horizon-0-0-0") is original
        assert original is not None
        assert original.capacity == 20
        assert client.get("/api/v1/servers/horizon-0-0-0").json()["last_report"] is not None

        response = client.post("/api/v1/servers/register", json=horizon_body(address="127.0.0.1:9999"))
        assert response.status_code == 200
        replaced = runtime.pool.get("horizon-0-0-0")
        assert replaced is not None
        assert replaced is not original
        assert replaced.url == "ws://127.0.0.1:9999"
        assert client.get("/api/v1/servers/horizon-0-0-0").json()["last_report"] is None


def test_reregistration_after_unregister_keeps_the_new_backend() -> None:
    runtime = make_runtime(servers=0)
    with api(runtime) as client:
        client.post("/api/v1/servers/register", json=horizon_body())
        old_session = add_session(runtime, "horizon-0-0-0")
        old = old_session.link.backend
        assert client.delete("/api/v1/servers/horizon-0-0-0").json()["removed"] is False
        hb = client.put(HB_PATH, json=heartbeat_body()).json()
        assert hb["commands"] == [{"type": "PrepareShutdown", "deadline_secs": 30}]

        # The server restarts at the same address before its last client left.
        response = client.post("/api/v1/servers/register", json=horizon_body())
        assert response.status_code == 200
        new = runtime.pool.get("horizon-0-0-0")
        assert new is not None
        assert new is not old
        assert new.state is BackendState.HEALTHY
        new_session = add_session(runtime, "horizon-0-0-0")

        # Neither the old record emptying nor the new one emptying removes the new backend.
        runtime.clients.discard(old_session.client_id)
        runtime.release(old)
        runtime.clients.discard(new_session.client_id)
        runtime.release(new)
        assert runtime.pool.get("horizon-0-0-0") is new
        hb = client.put(HB_PATH, json=heartbeat_body()).json()
        assert hb["commands"] == []


def test_registration_validation() -> None:
    runtime = make_runtime(servers=0)
    bad = [
        (horizon_body(name="a b"), "name: must not contain spaces"),
        (horizon_body(address="nowhere"), "address: expected host:port"),
        (horizon_body(address="127.0.0.1:0"), "address: port must be 1..65535"),
        (horizon_body() | {"address": 8081}, "address: expected a string"),
        (horizon_body(region_coord={"x": 0.5, "y": 0, "z": 0}), "region_coord.x: expected an integer"),
        (horizon_body(region_coord={"x": 0, "y": 0}), "region_coord.z: missing required field"),
        (horizon_body(center={"x": True, "y": 0, "z": 0}), "center.x: expected a number"),
        (horizon_body(bounds=-1.0), "bounds: must be >= 0"),
        (horizon_body(capacity=0), "capacity: must be >= 1"),
        (horizon_body(capacity=1.5), "capacity: expected an integer"),
        (horizon_body(version=3), "version: expected a string"),
        (horizon_body(metadata=[]), "metadata: expected an object"),
    ]
    with api(runtime) as client:
        for body, message in bad:
            assert_error(client.post("/api/v1/servers/register", json=body), 400, message)
        minimal = horizon_body()
        del minimal["version"], minimal["metadata"]
        minimal["center"] = {"x": 0, "y": 5, "z": -3}  # integers are numbers too
        minimal["future_field"] = 1  # ignored, as Horizon's own parser does
        assert client.post("/api/v1/servers/register", json=minimal).status_code == 201
    assert [b.name for b in runtime.pool] == ["horizon-0-0-0"]


def test_unspecified_address_becomes_the_registering_peer() -> None:
    runtime = make_runtime(servers=0)
    with api(runtime) as client:
        answer = client.post("/api/v1/servers/register", json=horizon_body(address="0.0.0.0:8081")).json()
        assert answer["success"] is True
        view = client.get("/api/v1/servers/horizon-0-0-0").json()
    # Starlette's test client connects from the host "testclient".
    assert view["url"] == "ws://testclient:8081"
    assert view["registration"]["sent_address"] == "0.0.0.0:8081"


def test_heartbeats_are_recorded_but_atlas_counts_connections() -> None:
    runtime = make_runtime(servers=0)
    with api(runtime) as client:
        client.post("/api/v1/servers/register", json=horizon_body())
        health = runtime.health.get("horizon-0-0-0")
        assert health is not None
        assert health.registered  # registration counts as the first heartbeat
        first = health.last_heartbeat
        add_session(runtime, "horizon-0-0-0")
        beat = heartbeat_body() | {"load": 0.25, "avg_tick_ms": 16.5, "memory_bytes": 1 << 20}
        response = client.put(HB_PATH, json=beat)
        assert response.status_code == 200
        assert response.json() == {"success": True, "message": "ok", "commands": []}
        view = client.get("/api/v1/servers/horizon-0-0-0").json()
        assert view["connections"] == 1  # Horizon said 0: Atlas's own count wins
        assert view["last_report"] == {
            "current_connections": 0,
            "load": 0.25,
            "accepting_connections": True,
            "avg_tick_ms": 16.5,
            "memory_bytes": 1 << 20,
        }
        assert view["registration"]["last_heartbeat_at"].endswith("Z")
        assert health.last_heartbeat is not None
        assert first is not None
        assert health.last_heartbeat >= first

        assert_error(client.put("/api/v1/servers/nobody/heartbeat", json=heartbeat_body("nobody")), 404)
        assert_error(client.put("/api/v1/servers/gs-x/heartbeat", json=heartbeat_body()), 404)
        mismatched = heartbeat_body("someone-else")
        assert_error(client.put(HB_PATH, json=mismatched), 400, "server_id")
        no_load = heartbeat_body()
        del no_load["load"]
        assert_error(client.put(HB_PATH, json=no_load), 400, "load: missing")

        client.post("/api/v1/servers/horizon-0-0-0/drain")
        answer = client.put(HB_PATH, json=heartbeat_body()).json()
        assert answer["commands"] == [{"type": "PrepareShutdown", "deadline_secs": 30}]


# ------------------------------------------------------------------------------------------------
# The sans-IO registry
# ------------------------------------------------------------------------------------------------


coords = st.builds(RegionCoord, *(st.integers(-5, 5) for _ in range(3)))


@given(coords, coords)
def test_adjacency_is_symmetric_and_face_only(a: RegionCoord, b: RegionCoord) -> None:
    assert a.is_adjacent(b) == b.is_adjacent(a)
    distance = (abs(a.x - b.x), abs(a.y - b.y), abs(a.z - b.z))
    assert a.is_adjacent(b) == (sorted(distance) == [0, 0, 1])


def _registration(
    name: str = "h", address: str = "10.0.0.1:8080", coord: tuple[int, int, int] = (0, 0, 0)
) -> Registration:
    return Registration.from_json(horizon_body(name=name, address=address, coord=coord))


def test_registry_outcomes() -> None:
    registry = HorizonRegistry()
    assert registry.register(_registration(), now=1.0) is RegisterOutcome.CREATED
    assert registry.register(_registration(), now=2.0) is RegisterOutcome.UPDATED
    record = registry.get("h")
    assert record is not None
    assert record.registered_at == 1.0
    registry.heartbeat("h", HeartbeatReport(0, 0.0, True), now=3.0)
    assert record.last_heartbeat_at == 3.0
    assert registry.classify(_registration(address="10.0.0.2:8080")) is RegisterOutcome.REPLACED
    registry.unregister("h")
    assert registry.classify(_registration()) is RegisterOutcome.REPLACED
    assert registry.register(_registration(), now=4.0) is RegisterOutcome.REPLACED
    fresh = registry.get("h")
    assert fresh is not None
    assert (fresh.leaving, fresh.last_heartbeat, fresh.registered_at) == (False, None, 4.0)
    with pytest.raises(KeyError):
        registry.heartbeat("other", HeartbeatReport(0, 0.0, True), now=5.0)
    assert registry.retain(lambda r: r.name != "h") == ["h"]
    assert len(registry) == 0


def test_registry_adjacency_skips_leaving_servers() -> None:
    registry = HorizonRegistry()
    registry.register(_registration("a", coord=(0, 0, 0)), now=0)
    registry.register(_registration("b", coord=(1, 0, 0)), now=0)
    registry.register(_registration("c", coord=(0, 0, 1)), now=0)
    assert [r.name for r in registry.adjacent("a", RegionCoord(0, 0, 0))] == ["b", "c"]
    registry.unregister("b")
    assert [r.name for r in registry.adjacent("a", RegionCoord(0, 0, 0))] == ["c"]


def test_answers_match_horizon_types() -> None:
    registration = _registration("a")
    neighbour = HorizonRegistry()
    neighbour.register(_registration("b", address="[::1]:8081", coord=(0, 1, 0)), now=0)
    answer = registration_answer(registration, message="m", heartbeat_interval=30, adjacent=list(neighbour))
    assert answer == {
        "success": True,
        "server_id": "a",
        "message": "m",
        "heartbeat_interval_secs": 30,
        "adjacent_servers": [
            {"server_id": "b", "address": "[::1]:8081", "region_coord": {"x": 0, "y": 1, "z": 0}}
        ],
    }
    assert heartbeat_answer(message="ok", draining=False) == {
        "success": True,
        "message": "ok",
        "commands": [],
    }
    assert heartbeat_answer(message="m", draining=True)["commands"] == [
        {"type": "PrepareShutdown", "deadline_secs": 30}
    ]


def test_heartbeat_report_parsing() -> None:
    report = HeartbeatReport.from_json(heartbeat_body("a") | {"avg_tick_ms": 3}, server_id="a")
    assert report == HeartbeatReport(0, 0.0, True, 3.0, 0)
    minimal = {"server_id": "a", "current_connections": 2, "load": 1, "accepting_connections": False}
    assert HeartbeatReport.from_json(minimal, server_id="a") == HeartbeatReport(2, 1.0, False)
    for body, message in [
        ([], "body: expected an object"),
        (heartbeat_body("a") | {"accepting_connections": 1}, "accepting_connections: expected true or false"),
        (heartbeat_body("a") | {"current_connections": -1}, "current_connections: must be >= 0"),
        (heartbeat_body("a") | {"load": float("nan")}, "load: expected a finite number"),
    ]:
        with pytest.raises(RegistrationError, match=message):
            HeartbeatReport.from_json(body, server_id="a")


# ------------------------------------------------------------------------------------------------
# Over real sockets
# ------------------------------------------------------------------------------------------------


@asynccontextmanager
async def running_ops(runtime: Runtime) -> AsyncIterator[OpsListening]:
    async with trio.open_nursery() as nursery:
        listening: OpsListening = await nursery.start(partial(serve_ops, runtime))
        yield listening
        nursery.cancel_scope.cancel()


async def horizon_call(
    port: int, method: str, path: str, body: dict[str, Any] | None = None
) -> tuple[str, dict[str, str], bytes]:
    """One call exactly as Horizon's AtlasClient::http_request makes it: raw HTTP/1.1, read to EOF."""
    host = f"127.0.0.1:{port}"
    if body is not None:
        payload = json.dumps(body, separators=(",", ":"))
        request = (
            f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n{payload}"
        )
    else:
        request = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request.encode())
        response = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                response += chunk
    head, _, content = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status_line, headers, content


def _assert_horizon_answer(status_line: str, headers: dict[str, str], content: bytes) -> dict[str, Any]:
    assert "200" in status_line or "201" in status_line, status_line
    assert "content-length" in headers
    assert int(headers["content-length"]) == len(content)
    assert headers.get("transfer-encoding", "").lower() != "chunked"
    answer: dict[str, Any] = json.loads(content)
    return answer


async def test_horizon_replay_then_a_client_is_routed_through_atlas() -> None:
    runtime = make_runtime(servers=0)
    async with trio.open_nursery() as nursery:
        echo_port: int = await nursery.start(serve_echo_server, "127.0.0.1", 0)
        proxy: ProxyListening = await nursery.start(partial(serve_proxy, runtime, shutdown=trio.Event()))
        ops: OpsListening = await nursery.start(partial(serve_ops, runtime))

        # Registration, byte for byte as Horizon sends it.
        body = horizon_body(address=f"127.0.0.1:{echo_port}")
        status_line, headers, content = await horizon_call(ops.port, "POST", "/api/v1/servers/register", body)
        assert status_line.startswith("HTTP/1.1 201")
        answer = _assert_horizon_answer(status_line, headers, content)
        assert set(answer) == {
            "success",
            "server_id",
            "message",
            "heartbeat_interval_secs",
            "adjacent_servers",
        }
        assert (answer["success"], answer["server_id"], answer["heartbeat_interval_secs"]) == (
            True,
            "horizon-0-0-0",
            30,
        )
        assert answer["adjacent_servers"] == []

        # Its first heartbeat (tokio's interval ticks at once).
        beat = await horizon_call(ops.port, "PUT", HB_PATH, heartbeat_body())
        assert _assert_horizon_answer(*beat) == {"success": True, "message": "ok", "commands": []}

        # A client connects to Atlas and lands on the registered server.
        async with open_websocket_url(f"ws://127.0.0.1:{proxy.port}/world?player=7") as ws:
            await ws.send_message("hello through atlas")
            with trio.fail_after(5):
                assert await ws.get_message() == "hello through atlas"
            async with httpx.AsyncClient(base_url=ops.url) as http:
                clients = (await http.get("/api/v1/clients")).json()
                assert [c["server"] for c in clients] == ["horizon-0-0-0"]
                assert (await http.get("/api/v1/servers/horizon-0-0-0")).json()["connections"] == 1
                metrics = (await http.get("/metrics")).text
        families = {f.name: f for f in text_string_to_metric_families(metrics)}
        assert families["atlas_connections_accepted"].samples[0].value == 1
        relayed = {s.labels["direction"]: s.value for s in families["atlas_messages_relayed"].samples}
        assert relayed == {"client_to_server": 1, "server_to_client": 1}
        per_server = {s.labels["server"]: s.value for s in families["atlas_client_connections"].samples}
        assert per_server == {"horizon-0-0-0": 1}

        # Unregister, as Horizon does on shutdown: no body, no token.
        status_line, headers, content = await horizon_call(
            ops.port, "DELETE", "/api/v1/servers/horizon-0-0-0"
        )
        assert "202" in status_line
        assert "content-length" in headers
        with trio.fail_after(5):
            await runtime.clients.wait_empty()
        assert "horizon-0-0-0" not in runtime.pool  # removed once its last client left
        beat = await horizon_call(ops.port, "PUT", HB_PATH, heartbeat_body())
        assert "404" in beat[0]
        nursery.cancel_scope.cancel()


async def test_metrics_counters_move_with_traffic() -> None:
    runtime = make_runtime(servers=0)
    async with trio.open_nursery() as nursery:
        echo_port: int = await nursery.start(serve_echo_server, "127.0.0.1", 0)
        proxy: ProxyListening = await nursery.start(partial(serve_proxy, runtime, shutdown=trio.Event()))
        ops: OpsListening = await nursery.start(partial(serve_ops, runtime))
        async with httpx.AsyncClient(base_url=ops.url) as http:
            added = await http.post(
                "/api/v1/servers", json={"name": "echo", "url": f"ws://127.0.0.1:{echo_port}"}
            )
            assert added.status_code == 201

            async def scrape() -> dict[str, float]:
                text = (await http.get("/metrics")).text
                values = {}
                for family in text_string_to_metric_families(text):
                    for sample in family.samples:
                        label = sample.labels.get("direction", "")
                        values[f"{sample.name}{'/' + label if label else ''}"] = sample.value
                return values

            before = await scrape()
            for _ in range(2):
                async with open_websocket_url(f"ws://127.0.0.1:{proxy.port}/") as ws:
                    for i in range(3):
                        await ws.send_message(f"m{i}")
                        assert await ws.get_message() == f"m{i}"
            with trio.fail_after(5):
                await runtime.clients.wait_empty()
            after = await scrape()
        nursery.cancel_scope.cancel()
    assert before["atlas_connections_accepted_total"] == 0
    assert after["atlas_connections_accepted_total"] == 2
    assert after["atlas_messages_relayed_total/client_to_server"] >= 6
    assert after["atlas_messages_relayed_total/server_to_client"] >= 6
    assert (
        after["atlas_bytes_relayed_total/client_to_server"]
        > before["atlas_bytes_relayed_total/client_to_server"]
    )


async def test_serve_ops_refuses_a_public_address_without_token() -> None:
    runtime = make_runtime(listen="0.0.0.0:0")
    with pytest.raises(StartupError) as info:
        await serve_ops(runtime)
    assert str(info.value) == "admin.listen: 0.0.0.0:0 is not loopback: set [admin] token"


async def test_serve_ops_on_a_public_address_with_a_token() -> None:
    runtime = make_runtime(listen="0.0.0.0:0", token=TOKEN)
    async with running_ops(runtime) as ops:
        async with httpx.AsyncClient() as http:
            response = await http.get(f"http://127.0.0.1:{ops.port}/api/v1/servers")
            assert response.status_code == 401
            response = await http.get(
                f"http://127.0.0.1:{ops.port}/api/v1/servers", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            assert response.status_code == 200


async def test_serve_ops_reports_a_busy_port_in_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        runtime = make_runtime(listen=f"127.0.0.1:{port}")
        with pytest.raises(StartupError) as info:
            await serve_ops(runtime)
    message = str(info.value)
    assert message.startswith(f"admin.listen: cannot listen on 127.0.0.1:{port}: ")
    assert "\n" not in message


async def test_serve_ops_stops_promptly_when_cancelled() -> None:
    runtime = make_runtime()
    async with trio.open_nursery() as nursery:
        ops: OpsListening = await nursery.start(partial(serve_ops, runtime))
        # An idle keep-alive connection must not hold the stop up.
        idle = await trio.open_tcp_stream("127.0.0.1", ops.port)
        await idle.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200" in await idle.receive_some()
        started = time.monotonic()
        nursery.cancel_scope.cancel()
    elapsed = time.monotonic() - started
    await idle.aclose()
    assert elapsed < STOP_TIMEOUT
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", ops.port)


async def test_content_length_on_every_answer() -> None:
    runtime = make_runtime()
    async with running_ops(runtime) as ops:
        for method, path, body in [
            ("GET", "/health", None),
            ("GET", "/metrics", None),
            ("GET", "/api/v1/servers", None),
            ("GET", "/nowhere", None),
            ("POST", "/api/v1/servers/register", {"name": "x"}),
            ("PUT", "/api/v1/servers/nobody/heartbeat", heartbeat_body("nobody")),
        ]:
            status_line, headers, content = await horizon_call(ops.port, method, path, body)
            assert int(headers["content-length"]) == len(content), (path, status_line)
            assert "transfer-encoding" not in headers


def _parse_iso(text: str) -> float:
    import datetime

    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_views_do_not_leak_internal_records() -> None:
    # Every answer is plain JSON: dumps and loads round-trip.
    runtime = make_runtime()
    add_session(runtime, "gs-1")
    with api(runtime) as client:
        client.post("/api/v1/servers/register", json=horizon_body())
        for path in ("/api/v1/servers", "/api/v1/clients", "/api/v1/status"):
            body = client.get(path).json()
            assert json.loads(json.dumps(body)) == body


def test_frozen_records() -> None:
    registration = _registration()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        registration.capacity = 5  # type: ignore[misc]


def test_dashboard_is_a_static_page_over_the_admin_api() -> None:
    runtime = make_runtime(token=TOKEN)
    app = create_app(runtime)
    with TestClient(app, backend="trio") as client:
        response = client.get("/dashboard")  # open: the page holds no data, its API calls need the token
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        page = response.text
        assert client.get("/api/v1/status").status_code == 401  # what the page reads stays guarded
    # Every API path the page calls exists in the app, with the method it uses.
    calls = set(re.findall(r'call\("(/[a-z/]+)"', page)) | set(re.findall(r"act\(`(/[a-z]+)/", page))
    assert calls == {"/status", "/servers", "/transfers", "/clients"}
    paths = {getattr(route, "path", "") for route in app.routes}
    for path in ("/status", "/servers", "/transfers", "/clients"):
        assert f"/api/v1{path}" in paths
    assert {"/api/v1/servers/{name}/drain", "/api/v1/clients/{client_id}/transfer"} <= paths
    # Nothing from the API is written as markup.
    assert "innerHTML" not in page


def test_dashboard_script_is_valid_javascript(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    page = importlib.resources.files("atlas.ops").joinpath("dashboard.html").read_text()
    script = page.split("<script>", 1)[1].split("</script>", 1)[0]
    (tmp_path / "dashboard.js").write_text(script)
    command = [node, "--check", str(tmp_path / "dashboard.js")]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
