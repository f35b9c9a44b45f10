"""Admission checks at the handshake: the Origin allow-list (``[proxy] allowed_origins``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from atlas.config import AuthConfig, Config, ProxyConfig
from atlas.errors import ConfigError, HandshakeError
from atlas.proxy.admission import IpLimiter, check_origin, origin_set
from atlas.proxy.handshake import UpgradeRequest
from atlas.runtime import Runtime
from atlas.supervisor import AtlasStarted, serve_atlas
from tests.test_auth import raw_upgrade, recording_backend, token
from tests.test_proxy_e2e import EPHEMERAL_ADMIN, _config
from tests.wsclient import open_ws, until


def config_errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        Config.from_toml(text, source="atlas.toml")
    return list(info.value.errors)


def upgrade(headers: Sequence[tuple[bytes, bytes]] = ()) -> UpgradeRequest:
    return UpgradeRequest(
        target=b"/", key=b"dGhlIHNhbXBsZSBub25jZQ==", subprotocols=(), headers=((b"host", b"a"), *headers)
    )


def forbidden(request: UpgradeRequest, allowed: frozenset[bytes]) -> str:
    with pytest.raises(HandshakeError) as info:
        check_origin(request, allowed)
    assert info.value.status == 403
    return info.value.reason


# --------------------------------------------------------------------------------------------------
# Configuration and the check itself
# --------------------------------------------------------------------------------------------------


def test_allowed_origins_default_to_any() -> None:
    assert Config.from_toml("").proxy.allowed_origins == ()
    assert Runtime.from_config(Config()).origins is None


def test_allowed_origins_must_be_origins() -> None:
    origins = '["https://play.example", "https://play.example/", "play.example", "null"]'
    text = f"[proxy]\nallowed_origins = {origins}\n"
    reason = "not an origin (scheme://host[:port], no path or trailing /), got"
    assert config_errors(text) == [
        f"proxy.allowed_origins[1]: {reason} 'https://play.example/'",
        f"proxy.allowed_origins[2]: {reason} 'play.example'",
        f"proxy.allowed_origins[3]: {reason} 'null'",
    ]
    assert config_errors('[proxy]\nallowed_origins = "https://play.example"\n') == [
        "proxy.allowed_origins: expected an array, got 'https://play.example'"
    ]
    config = Config.from_toml(
        '[proxy]\nallowed_origins = ["HTTPS://Play.Example:8443", "http://[::1]:8080"]\n'
    )
    assert Runtime.from_config(config).origins == frozenset(
        {b"https://play.example:8443", b"http://[::1]:8080"}
    )


def test_origin_must_be_listed() -> None:
    allowed = origin_set(["https://play.example", "http://localhost:8080"])
    assert allowed is not None
    check_origin(upgrade([(b"origin", b"https://play.example")]), allowed)
    check_origin(upgrade([(b"origin", b"http://localhost:8080")]), allowed)
    assert forbidden(upgrade([(b"origin", b"https://evil.example")]), allowed) == "origin not allowed"
    assert forbidden(upgrade([(b"origin", b"http://play.example")]), allowed) == "origin not allowed"
    assert forbidden(upgrade([(b"origin", b"https://play.example:443")]), allowed) == "origin not allowed"
    assert forbidden(upgrade([(b"origin", b"https://play.example.evil")]), allowed) == "origin not allowed"
    assert forbidden(upgrade([(b"origin", b"null")]), allowed) == "origin not allowed"
    assert forbidden(upgrade(), allowed) == "an Origin header is required"
    two = [(b"origin", b"https://play.example"), (b"origin", b"https://play.example")]
    assert forbidden(upgrade(two), allowed) == "origin not allowed"


@given(
    st.sampled_from(["https://play.example", "http://localhost:8080", "app://Game.Client"]),
    st.lists(st.booleans(), min_size=32, max_size=32),
)
def test_scheme_and_host_compare_case_insensitively(origin: str, upper: list[bool]) -> None:
    flipped = "".join(c.upper() if up else c.lower() for c, up in zip(origin, upper, strict=False))
    allowed = origin_set([origin])
    assert allowed is not None
    check_origin(upgrade([(b"origin", flipped.encode())]), allowed)
    allowed_flipped = origin_set([flipped])
    assert allowed_flipped is not None
    check_origin(upgrade([(b"origin", origin.encode())]), allowed_flipped)


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------


@asynccontextmanager
async def atlas_on(config: Config) -> AsyncIterator[AtlasStarted]:
    async with trio.open_nursery() as nursery:
        started: AtlasStarted = await nursery.start(
            lambda task_status: serve_atlas(config, task_status=task_status)
        )
        yield started
        nursery.cancel_scope.cancel()


async def test_origin_allow_list_end_to_end(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="atlas.proxy")
    async with recording_backend() as (port, seen):
        config = attrs.evolve(
            _config([port]),
            admin=EPHEMERAL_ADMIN,
            proxy=ProxyConfig(listen="127.0.0.1:0", allowed_origins=("https://play.example",)),
        )
        async with atlas_on(config) as atlas:
            url = f"ws://127.0.0.1:{atlas.proxy.port}/"
            async with open_ws(url, extra_headers=[(b"origin", b"HTTPS://PLAY.example")]) as ws:
                with trio.fail_after(10):
                    assert await ws.get_message() == "/"
            answers = [
                await raw_upgrade(atlas.proxy.port, b"/", [(b"origin", b"https://evil.example")]),
                await raw_upgrade(atlas.proxy.port, b"/"),
            ]
    assert len(seen) == 1
    for answer, reason in zip(answers, (b"origin not allowed", b"an Origin header is required"), strict=True):
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 403 ")
        assert body == reason + b"\n"
    refusals = [r for r in caplog.records if getattr(r, "event", None) == "refused"]
    assert [getattr(r, "status", None) for r in refusals] == [403, 403]


async def test_no_allow_list_accepts_any_origin_and_none() -> None:
    async with recording_backend() as (port, seen):
        config = attrs.evolve(_config([port]), admin=EPHEMERAL_ADMIN)
        async with atlas_on(config) as atlas:
            url = f"ws://127.0.0.1:{atlas.proxy.port}/"
            for headers in ([(b"origin", b"https://anything.example")], []):
                async with open_ws(url, extra_headers=headers) as ws:
                    with trio.fail_after(10):
                        assert await ws.get_message() == "/"
    assert len(seen) == 2


# --------------------------------------------------------------------------------------------------
# Connections per IP address
# --------------------------------------------------------------------------------------------------


def test_max_connections_per_ip_is_checked() -> None:
    assert Config.from_toml("").proxy.max_connections_per_ip == 0
    assert Runtime.from_config(Config()).ip_limiter is None
    assert config_errors("[proxy]\nmax_connections_per_ip = -1\n") == [
        "proxy.max_connections_per_ip: must be >= 0, got -1"
    ]
    assert config_errors("[proxy]\nmax_connections_per_ip = 1.5\n") == [
        "proxy.max_connections_per_ip: expected an integer, got 1.5"
    ]
    limiter = Runtime.from_config(Config.from_toml("[proxy]\nmax_connections_per_ip = 3\n")).ip_limiter
    assert limiter is not None
    assert limiter.limit == 3


def test_ip_limiter_counts_per_address() -> None:
    limiter = IpLimiter(2)
    assert [limiter.acquire("10.0.0.1") for _ in range(3)] == [True, True, False]
    assert limiter.acquire("10.0.0.2")
    assert (limiter.count("10.0.0.1"), limiter.count("10.0.0.2"), len(limiter)) == (3, 1, 2)
    limiter.release("10.0.0.1")
    limiter.release("10.0.0.1")
    assert limiter.acquire("10.0.0.1")  # two open again: within the limit
    with pytest.raises(ValueError, match="limit must be >= 1, got 0"):
        IpLimiter(0)


@given(
    st.integers(1, 4),
    st.lists(st.tuples(st.booleans(), st.sampled_from(["a", "b", "c"])), max_size=60),
)
def test_ip_limiter_matches_a_model(limit: int, steps: list[tuple[bool, str]]) -> None:
    limiter = IpLimiter(limit)
    model: dict[str, int] = {}
    for opening, ip in steps:
        if opening:
            model[ip] = model.get(ip, 0) + 1
            assert limiter.acquire(ip) == (model[ip] <= limit)
        elif model.get(ip):
            model[ip] -= 1
            limiter.release(ip)
        assert limiter.count(ip) == model.get(ip, 0)
    assert len(limiter) == sum(1 for count in model.values() if count)
    for ip, count in model.items():
        for _ in range(count):
            limiter.release(ip)
    assert len(limiter) == 0


async def test_per_ip_limit_end_to_end(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="atlas.proxy")
    async with recording_backend() as (port, seen):
        config = attrs.evolve(
            _config([port]),
            admin=EPHEMERAL_ADMIN,
            proxy=ProxyConfig(listen="127.0.0.1:0", max_connections_per_ip=2, retry_after=9),
        )
        async with atlas_on(config) as atlas:
            limiter = atlas.runtime.ip_limiter
            assert limiter is not None
            url = f"ws://127.0.0.1:{atlas.proxy.port}/"
            async with open_ws(url) as first:
                async with open_ws(url) as second:
                    with trio.fail_after(10):
                        assert await first.get_message() == "/"
                        assert await second.get_message() == "/"
                    refused = await raw_upgrade(atlas.proxy.port, b"/")
                    await until(lambda: limiter.count("127.0.0.1") == 2)  # the refused one is released
                await until(lambda: limiter.count("127.0.0.1") == 1)
                async with open_ws(url) as third:
                    with trio.fail_after(10):
                        assert await third.get_message() == "/"
            await until(lambda: len(limiter) == 0)
    assert len(seen) == 3
    head, _, body = refused.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 429 ")
    assert b"\r\nretry-after: 9\r\n" in head + b"\r\n"
    assert body == b"too many connections from your address\n"
    refusals = [r for r in caplog.records if getattr(r, "event", None) == "refused"]
    assert [getattr(r, "status", None) for r in refusals] == [429]


async def test_per_ip_count_is_released_on_every_failed_handshake() -> None:
    async with recording_backend() as (port, seen):
        config = attrs.evolve(
            _config([port]),
            admin=EPHEMERAL_ADMIN,
            proxy=ProxyConfig(listen="127.0.0.1:0", max_connections_per_ip=1, handshake_timeout=0.3),
            auth=AuthConfig(enabled=True, secret="s" * 32),
        )
        async with atlas_on(config) as atlas:
            limiter = atlas.runtime.ip_limiter
            assert limiter is not None
            proxy_port = atlas.proxy.port

            async def released() -> None:
                await until(lambda: len(limiter) == 0)

            # Not a WebSocket request: 426.
            stream = await trio.open_tcp_stream("127.0.0.1", proxy_port)
            async with stream:
                await stream.send_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
                with trio.fail_after(10):
                    assert (await stream.receive_some()).startswith(b"HTTP/1.1 426 ")
            await released()
            # No token: 401.
            assert (await raw_upgrade(proxy_port, b"/")).startswith(b"HTTP/1.1 401 ")
            await released()
            # Silent until the handshake timeout: closed without an answer.
            stream = await trio.open_tcp_stream("127.0.0.1", proxy_port)
            async with stream:
                with trio.fail_after(10):
                    assert await stream.receive_some() == b""
            await released()
            # Gone before sending anything.
            await (await trio.open_tcp_stream("127.0.0.1", proxy_port)).aclose()
            await released()
            # A session that ends.
            url = f"ws://127.0.0.1:{proxy_port}/?token={token()}"
            async with open_ws(url) as ws:
                with trio.fail_after(10):
                    assert await ws.get_message() == "/"
                assert limiter.count("127.0.0.1") == 1
            await released()
            async with open_ws(url) as ws:
                with trio.fail_after(10):
                    assert await ws.get_message() == "/"
    assert len(seen) == 2
