"""Token auth at the handshake (``[auth]``): the verifier alone, then end to end over real sockets."""

from __future__ import annotations

import base64
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from atlas.config import AuthConfig, Config, ProxyConfig, ServerConfig
from atlas.errors import ConfigError, HandshakeError, StartupError
from atlas.proxy.auth import TokenVerifier, strip_query_param
from atlas.proxy.handshake import UpgradeRequest, client_request_part, reject_response
from atlas.runtime import Runtime
from atlas.supervisor import AtlasStarted, serve_atlas
from tests.test_proxy_e2e import EPHEMERAL_ADMIN
from tests.wsclient import open_ws

SECRET = "s" * 32
HS = AuthConfig(enabled=True, algorithms=("HS256",), secret=SECRET)


def token(claims: dict[str, Any] | None = None, *, key: Any = SECRET, algorithm: str = "HS256") -> str:
    payload: dict[str, Any] = {"sub": "player-7", "exp": int(time.time()) + 60}
    payload.update(claims or {})
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, key, algorithm=algorithm)


def upgrade(target: bytes = b"/", headers: Sequence[tuple[bytes, bytes]] = ()) -> UpgradeRequest:
    return UpgradeRequest(
        target=target,
        key=b"dGhlIHNhbXBsZSBub25jZQ==",
        subprotocols=(),
        headers=((b"host", b"atlas"), *headers),
    )


def bearer(value: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", b"Bearer " + value.encode())]


def refusal(verifier: TokenVerifier, request: UpgradeRequest) -> str:
    with pytest.raises(HandshakeError) as info:
        verifier.verify(request)
    assert info.value.status == 401
    return info.value.reason


# --------------------------------------------------------------------------------------------------
# The configuration
# --------------------------------------------------------------------------------------------------


def config_errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        Config.from_toml(text, source="atlas.toml")
    return list(info.value.errors)


def test_auth_is_off_by_default() -> None:
    config = Config.from_toml("")
    assert config.auth == AuthConfig()
    assert not config.auth.enabled
    assert Runtime.from_config(config).verifier is None


def test_none_algorithm_is_refused_even_when_disabled() -> None:
    assert config_errors('[auth]\nalgorithms = ["HS256", "none"]\n') == [
        "auth.algorithms[1]: 'none' is refused: it would accept unsigned tokens"
    ]
    assert config_errors('[auth]\nalgorithms = ["NONE"]\n') == [
        "auth.algorithms[0]: 'none' is refused: it would accept unsigned tokens"
    ]


def test_algorithm_list_is_checked() -> None:
    assert config_errors("[auth]\nalgorithms = []\n") == ["auth.algorithms: must list at least one algorithm"]
    assert config_errors('[auth]\nalgorithms = ["HS257"]\n') == [
        "auth.algorithms[0]: unsupported algorithm 'HS257' (one of HS256, HS384, HS512, RS256, RS384, "
        "RS512, PS256, PS384, PS512, ES256, ES384, ES512)"
    ]
    assert config_errors('[auth]\nalgorithms = "HS256"\n') == [
        "auth.algorithms: expected an array, got 'HS256'"
    ]


def test_enabled_auth_needs_its_key() -> None:
    assert config_errors("[auth]\nenabled = true\n") == ["auth.secret: required by HS256"]
    assert config_errors('[auth]\nenabled = true\nalgorithms = ["RS256", "ES256"]\n') == [
        "auth.public_key_file: required by RS256"
    ]
    assert config_errors('[auth]\nenabled = true\nalgorithms = ["HS512"]\nsecret = "' + SECRET + '"\n') == [
        "auth.secret: must be at least 64 bytes for HS512 (RFC 7518 3.2), got 32"
    ]
    assert config_errors(
        '[auth]\nenabled = true\nalgorithms = ["HS256", "RS256"]\nsecret = "'
        + SECRET
        + '"\npublic_key_file = "k.pem"\n'
    ) == [
        "auth.algorithms: HS* and public-key algorithms cannot be mixed"
        " (a public key must not pass as a secret)"
    ]
    # A disabled table may stay incomplete (switched off for a while).
    assert not Config.from_toml('[auth]\nalgorithms = ["RS256"]\n').auth.enabled


def test_other_auth_keys_are_checked() -> None:
    assert config_errors('[auth]\nclaim = ""\nquery_param = "to ken"\nleeway = -1\n') == [
        "auth.leeway: must be >= 0, got -1.0",
        "auth.claim: must not be empty",
        "auth.query_param: must be empty or letters, digits and . _ ~ -, got 'to ken'",
    ]
    assert config_errors("[auth]\nsecret = 5\n") == ["auth.secret: expected a string, got 5"]
    assert config_errors("[auth]\nenable = true\n") == ["auth.enable: unknown key"]


def test_auth_table_round_trips() -> None:
    config = Config(auth=attrs.evolve(HS, issuer="https://id.example", audience="atlas", leeway=2.5))
    assert Config.from_toml(config.to_toml()) == config


def test_missing_public_key_file_is_a_startup_error(tmp_path: Path) -> None:
    missing = tmp_path / "absent.pem"
    config = AuthConfig(enabled=True, algorithms=("RS256",), public_key_file=str(missing))
    with pytest.raises(StartupError) as info:
        TokenVerifier.from_config(config)
    assert str(info.value) == f"auth.public_key_file: cannot read {missing}: No such file or directory"


def test_bad_public_key_file_is_a_startup_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key\n")
    config = AuthConfig(enabled=True, algorithms=("RS256",), public_key_file=str(bad))
    with pytest.raises(StartupError) as info:
        Runtime.from_config(Config(auth=config))
    assert str(info.value) == f"auth.public_key_file: {bad} holds no PEM public key"


def test_public_key_must_fit_every_algorithm(tmp_path: Path) -> None:
    pem = tmp_path / "rsa.pem"
    pem.write_bytes(public_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    config = AuthConfig(enabled=True, algorithms=("RS256", "ES256"), public_key_file=str(pem))
    with pytest.raises(StartupError) as info:
        TokenVerifier.from_config(config)
    assert str(info.value) == f"auth.public_key_file: the key in {pem} cannot verify ES256"
    p384 = tmp_path / "p384.pem"
    p384.write_bytes(public_pem(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(StartupError, match="cannot verify ES256"):
        TokenVerifier.from_config(attrs.evolve(config, algorithms=("ES256",), public_key_file=str(p384)))


def public_pem(private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --------------------------------------------------------------------------------------------------
# The verifier
# --------------------------------------------------------------------------------------------------


def test_bearer_header_gives_the_player_id() -> None:
    verifier = TokenVerifier.from_config(HS)
    verified = verifier.verify(upgrade(b"/room?a=1", bearer(token())))
    assert verified.player_id == "player-7"
    assert verified.target == b"/room?a=1"
    lower = [(b"authorization", b"bearer  " + token().encode() + b" ")]
    assert verifier.verify(upgrade(headers=lower)).player_id == "player-7"


def test_query_parameter_gives_the_player_id_and_is_stripped() -> None:
    verifier = TokenVerifier.from_config(HS)
    verified = verifier.verify(upgrade(b"/room?a=1&token=" + token().encode() + b"&b=2"))
    assert (verified.player_id, verified.target) == ("player-7", b"/room?a=1&b=2")
    assert verifier.verify(upgrade(b"/room?token=" + token().encode())).target == b"/room"
    # The header wins; the parameter is stripped all the same.
    both = upgrade(b"/?token=garbage", bearer(token({"sub": "from-header"})))
    assert (verifier.verify(both).player_id, verifier.verify(both).target) == ("from-header", b"/")
    # Another scheme in Authorization leaves the parameter as the source.
    basic = upgrade(b"/?token=" + token().encode(), [(b"authorization", b"Basic dTpw")])
    assert verifier.verify(basic).player_id == "player-7"


def test_query_parameter_can_be_switched_off() -> None:
    verifier = TokenVerifier.from_config(attrs.evolve(HS, query_param=""))
    assert refusal(verifier, upgrade(b"/?token=" + token().encode())) == "missing bearer token"
    assert verifier.verify(upgrade(b"/?token=x", bearer(token()))).target == b"/?token=x"


def test_custom_claim_and_query_parameter() -> None:
    verifier = TokenVerifier.from_config(attrs.evolve(HS, claim="pid", query_param="access_token"))
    verified = verifier.verify(upgrade(b"/?access_token=" + token({"pid": "p-1"}).encode()))
    assert (verified.player_id, verified.target) == ("p-1", b"/")
    assert refusal(verifier, upgrade(headers=bearer(token()))) == "token has no 'pid' claim"


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (upgrade(), "missing bearer token"),
        (upgrade(headers=[(b"authorization", b"Bearer ")]), "missing bearer token"),
        (upgrade(headers=[(b"authorization", b"Basic dTpw")]), "missing bearer token"),
        (upgrade(headers=bearer("not.a.jwt")), "malformed token"),
        (upgrade(headers=bearer(token({"exp": int(time.time()) - 10}))), "token expired"),
        (upgrade(headers=bearer(token({"nbf": int(time.time()) + 60}))), "token not yet valid"),
        (upgrade(headers=bearer(token(key="t" * 32))), "token signature does not verify"),
        (upgrade(headers=bearer(token(key="t" * 64, algorithm="HS512"))), "token algorithm not allowed"),
        (upgrade(headers=bearer(token({"sub": None}))), "token has no 'sub' claim"),
        (upgrade(headers=bearer(token({"sub": 7}))), "token's 'sub' claim is not a string"),
        (upgrade(headers=bearer(token({"sub": "a\r\nb"}))), "token's 'sub' claim is not a usable player id"),
        (upgrade(headers=bearer(token({"sub": "x" * 257}))), "token's 'sub' claim is not a usable player id"),
        (upgrade(headers=bearer(token({"aud": "elsewhere"}))), "token audience not accepted"),
    ],
)
def test_refusals_name_a_reason_never_the_token(request_: UpgradeRequest, reason: str) -> None:
    verifier = TokenVerifier.from_config(HS)
    said = refusal(verifier, request_)
    assert said == reason
    credentials = (request_.header(b"authorization") or b"").partition(b" ")[2]
    assert not credentials or credentials.decode() not in said


def test_unsigned_token_is_refused() -> None:
    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header, claims = part(b'{"alg":"none","typ":"JWT"}'), part(b'{"sub":"cheater"}')
    unsigned = header + "." + claims + "."
    assert (
        refusal(TokenVerifier.from_config(HS), upgrade(headers=bearer(unsigned)))
        == "token algorithm not allowed"
    )


def test_issuer_audience_and_leeway() -> None:
    verifier = TokenVerifier.from_config(attrs.evolve(HS, issuer="https://id.example", audience="atlas"))
    good = token({"iss": "https://id.example", "aud": "atlas"})
    assert verifier.verify(upgrade(headers=bearer(good))).player_id == "player-7"
    assert refusal(verifier, upgrade(headers=bearer(token({"aud": "atlas"})))) == "token has no 'iss' claim"
    wrong_iss = token({"iss": "https://evil.example", "aud": "atlas"})
    assert refusal(verifier, upgrade(headers=bearer(wrong_iss))) == "token issuer not accepted"
    wrong_aud = token({"iss": "https://id.example", "aud": "other"})
    assert refusal(verifier, upgrade(headers=bearer(wrong_aud))) == "token audience not accepted"
    just_expired = token({"exp": int(time.time()) - 5})
    assert refusal(TokenVerifier.from_config(HS), upgrade(headers=bearer(just_expired))) == "token expired"
    lenient = TokenVerifier.from_config(attrs.evolve(HS, leeway=30))
    assert lenient.verify(upgrade(headers=bearer(just_expired))).player_id == "player-7"


def test_rs256_and_es256_with_a_key_file(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_pem, ec_pem = tmp_path / "rsa.pem", tmp_path / "ec.pem"
    rsa_pem.write_bytes(public_pem(rsa_key))
    ec_pem.write_bytes(public_pem(ec_key))
    rs = TokenVerifier.from_config(
        AuthConfig(enabled=True, algorithms=("RS256", "PS256"), public_key_file=str(rsa_pem))
    )
    for algorithm in ("RS256", "PS256"):
        signed = token(key=rsa_key, algorithm=algorithm)
        assert rs.verify(upgrade(headers=bearer(signed))).player_id == "player-7"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert refusal(rs, upgrade(headers=bearer(token(key=other, algorithm="RS256")))) == (
        "token signature does not verify"
    )
    # The public key as an HMAC secret (the classic algorithm confusion) is refused.
    confused = upgrade(headers=bearer(token(key="x" * 32)))
    assert refusal(rs, confused) == "token algorithm not allowed"
    es = TokenVerifier.from_config(
        AuthConfig(enabled=True, algorithms=("ES256",), public_key_file=str(ec_pem))
    )
    assert es.verify(upgrade(headers=bearer(token(key=ec_key, algorithm="ES256")))).player_id == "player-7"


@given(
    st.lists(st.tuples(st.sampled_from(["token", "a", "tok", "token2", ""]), st.text("xyz=%", max_size=4))),
    st.sampled_from(["/", "/room", "/a/b"]),
)
def test_strip_query_param_removes_only_that_parameter(pairs: list[tuple[str, str]], path: str) -> None:
    parts = [f"{key}={value}" for key, value in pairs]
    target = (path + "?" + "&".join(parts)).encode() if parts else path.encode()
    stripped, found = strip_query_param(target, b"token")
    kept = [part for part in parts if part.partition("=")[0] != "token"]
    assert stripped == ((path + "?" + "&".join(kept)).encode() if kept else path.encode())
    assert (found is None) == (len(kept) == len(parts))
    if len(kept) == len(parts):
        assert stripped == target


def test_401_response_asks_for_a_bearer_token() -> None:
    response = reject_response(401, "missing bearer token")
    assert response.startswith(b"HTTP/1.1 401 \r\n")
    assert b"\r\nwww-authenticate: Bearer\r\n" in response
    assert response.endswith(b"\r\n\r\nmissing bearer token\n")


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------


@asynccontextmanager
async def recording_backend() -> AsyncIterator[tuple[int, list[WebSocketRequest]]]:
    """A backend that records players' upgrade requests (not health probes) and echoes path and messages."""
    seen: list[WebSocketRequest] = []

    async def handler(request: WebSocketRequest) -> None:
        if not any(name.lower() == b"x-atlas-health-check" for name, _value in request.headers):
            seen.append(request)
        ws = await request.accept()
        await ws.send_message(request.path)
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.send_message(await ws.get_message())

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        yield server.port, seen
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def atlas_with_auth(port: int, auth: AuthConfig = HS) -> AsyncIterator[AtlasStarted]:
    config = Config(
        admin=EPHEMERAL_ADMIN,
        proxy=ProxyConfig(listen="127.0.0.1:0"),
        servers=(ServerConfig(name="gs-1", url=f"ws://127.0.0.1:{port}"),),
        auth=auth,
    )
    async with trio.open_nursery() as nursery:
        started: AtlasStarted = await nursery.start(
            lambda task_status: serve_atlas(config, task_status=task_status)
        )
        yield started
        nursery.cancel_scope.cancel()


async def raw_upgrade(port: int, target: bytes, headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """Send an upgrade request and read Atlas's whole answer (a refusal: it closes after it)."""
    lines = [
        b"GET " + target + b" HTTP/1.1",
        b"host: 127.0.0.1",
        b"upgrade: websocket",
        b"connection: Upgrade",
        b"sec-websocket-version: 13",
        b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==",
        *(name + b": " + value for name, value in headers),
    ]
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"\r\n".join(lines) + b"\r\n\r\n")
        answer = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                answer += chunk
    return answer


async def test_valid_token_reaches_the_backend_as_player_id() -> None:
    async with recording_backend() as (port, seen), atlas_with_auth(port) as atlas:
        url = f"ws://127.0.0.1:{atlas.proxy.port}/world?token={token()}&room=3"
        spoof = [(b"x-atlas-player-id", b"admin"), (b"X-Atlas-Player-Id", b"root")]
        async with open_ws(url, extra_headers=spoof) as ws:
            with trio.fail_after(10):
                assert await ws.get_message() == "/world?room=3"
                await ws.send_message("hi")
                assert await ws.get_message() == "hi"
            assert atlas.ops is not None
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{atlas.ops.port}") as http:
                clients = (await http.get("/api/v1/clients")).json()
            assert [c["player"] for c in clients] == ["player-7"]
        headers = [(k.lower(), v) for k, v in seen[0].headers]
        assert [v for k, v in headers if k == b"x-atlas-player-id"] == [b"player-7"]


async def test_bearer_header_works_end_to_end() -> None:
    async with recording_backend() as (port, seen), atlas_with_auth(port) as atlas:
        url = f"ws://127.0.0.1:{atlas.proxy.port}/"
        async with open_ws(url, extra_headers=bearer(token({"sub": "p-2"}))) as ws:
            with trio.fail_after(10):
                assert await ws.get_message() == "/"
        assert dict((k.lower(), v) for k, v in seen[0].headers)[b"x-atlas-player-id"] == b"p-2"


async def test_missing_or_bad_token_gets_401_and_no_backend_is_contacted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = token(key="t" * 32)
    caplog.set_level(logging.INFO, logger="atlas.proxy")
    async with recording_backend() as (port, seen), atlas_with_auth(port) as atlas:
        missing = await raw_upgrade(atlas.proxy.port, b"/")
        forged = await raw_upgrade(atlas.proxy.port, b"/", bearer(bad))
        in_query = await raw_upgrade(atlas.proxy.port, b"/?token=" + bad.encode())
        statistics = atlas.runtime.clients.statistics()
    assert seen == []
    for answer, reason in (
        (missing, b"missing bearer token"),
        (forged, b"token signature does not verify"),
        (in_query, b"token signature does not verify"),
    ):
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401 ")
        assert b"\r\nwww-authenticate: Bearer" in head
        assert body == reason + b"\n"
    assert statistics.refused_total == 3
    refusals = [r for r in caplog.records if getattr(r, "event", None) == "refused"]
    assert [getattr(r, "status", None) for r in refusals] == [401, 401, 401]
    signature = bad.rpartition(".")[2]
    assert all(signature not in r.getMessage() and bad not in r.getMessage() for r in caplog.records)


async def test_auth_off_forwards_no_player_id_and_keeps_the_query() -> None:
    async with recording_backend() as (port, seen), atlas_with_auth(port, AuthConfig()) as atlas:
        assert atlas.runtime.verifier is None
        url = f"ws://127.0.0.1:{atlas.proxy.port}/?token=abc"
        async with open_ws(url, extra_headers=[(b"x-atlas-player-id", b"admin")]) as ws:
            with trio.fail_after(10):
                assert await ws.get_message() == "/?token=abc"
        assert b"x-atlas-player-id" not in {k.lower() for k, _v in seen[0].headers}


def test_every_backend_link_carries_the_verified_player_id_only() -> None:
    # The header lines of every link of a client (first, failover, transfer) come from its request.
    spoofed = upgrade(headers=[(b"x-atlas-player-id", b"admin")])
    assert b"x-atlas-player-id" not in client_request_part(spoofed, "10.0.0.1", "c-1")
    verified = TokenVerifier.from_config(HS).verify(
        upgrade(headers=[(b"x-atlas-player-id", b"admin"), *bearer(token())])
    )
    lines = client_request_part(verified, "10.0.0.1", "c-1").split(b"\r\n")
    assert [line for line in lines if line.startswith(b"x-atlas-player-id")] == [
        b"x-atlas-player-id: player-7"
    ]
