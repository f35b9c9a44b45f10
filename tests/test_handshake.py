"""Tests for the opening handshakes on both sides of the proxy, over in-memory streams.

wsproto plays the client (its h11-based handshake builds the requests and checks the answers) and a
fake backend answers Atlas's own upgrade request with good and bad responses.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable, Sequence

import h11
import pytest
import trio
from trio.testing import memory_stream_pair, wait_all_tasks_blocked
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, RejectConnection, Request, TextMessage
from wsproto.utilities import generate_accept_token

from atlas.errors import HandshakeError
from atlas.proxy.frames import OP_BINARY, OP_TEXT, FrameScanner, build_frame
from atlas.proxy.handshake import (
    BackendHandshake,
    UpgradeRequest,
    _client_handshake,
    accept_response,
    backend_request_headers,
    encode_request,
    receive_upgrade,
    reject_response,
)

KEY = base64.b64encode(b"0123456789abcdef")


def raw_request(
    *,
    method: str = "GET",
    target: str = "/play?room=7",
    version: str = "1.1",
    headers: Sequence[tuple[str, str]] | None = None,
    drop: Sequence[str] = (),
) -> bytes:
    """A hand-written upgrade request; ``headers`` replaces same-named defaults, ``drop`` removes."""
    base = {
        "host": "game.example",
        "upgrade": "websocket",
        "connection": "Upgrade",
        "sec-websocket-version": "13",
        "sec-websocket-key": KEY.decode(),
    }
    for name, value in headers or ():
        base[name] = value
    lines = [f"{method} {target} HTTP/{version}"]
    lines += [f"{name}: {value}" for name, value in base.items() if name not in drop]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def receive(raw: bytes, *, eof: bool = False) -> tuple[UpgradeRequest, bytes]:
    """Run :func:`receive_upgrade` on ``raw`` sent by a client (which then closes, if ``eof``)."""
    client, server = memory_stream_pair()
    await client.send_all(raw)
    if eof:
        await client.aclose()
    return await receive_upgrade(server)


# -- receive_upgrade -------------------------------------------------------------------------------


async def test_valid_request_from_wsproto_is_parsed() -> None:
    ws = WSConnection(ConnectionType.CLIENT)
    raw = ws.send(
        Request(
            host="game.example",
            target="/play?room=7&name=a%20b",
            subprotocols=["game.v2", "Chat"],
            extra_headers=[(b"origin", b"https://game.example")],
        )
    )

    request, trailing = await receive(raw)

    assert request.target == b"/play?room=7&name=a%20b"
    assert request.subprotocols == ("game.v2", "Chat")
    assert len(base64.b64decode(request.key)) == 16
    assert request.header(b"origin") == b"https://game.example"
    assert request.header(b"host") == b"game.example"
    assert request.header(b"x-missing") is None
    assert trailing == b""


async def test_header_tokens_are_case_insensitive_and_lists() -> None:
    raw = raw_request(
        headers=[
            ("upgrade", "WebSocket"),
            ("connection", "keep-alive, UPGRADE"),
            ("sec-websocket-protocol", " a ,, b"),
        ]
    )
    request, _trailing = await receive(raw)
    assert request.key == KEY
    assert request.subprotocols == ("a", "b")


async def test_repeated_headers_are_joined() -> None:
    raw = raw_request().replace(
        b"\r\n\r\n", b"\r\nsec-websocket-protocol: one\r\nsec-websocket-protocol: two\r\n\r\n"
    )
    request, _trailing = await receive(raw)
    assert request.subprotocols == ("one", "two")
    assert request.header(b"sec-websocket-protocol") == b"one, two"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        pytest.param(raw_request(method="POST"), 405, id="post"),
        pytest.param(raw_request(version="1.0"), 400, id="http-1.0"),
        pytest.param(raw_request(drop=["upgrade"]), 426, id="no-upgrade"),
        pytest.param(raw_request(headers=[("upgrade", "h2c")]), 426, id="upgrade-h2c"),
        pytest.param(raw_request(drop=["connection"]), 400, id="no-connection"),
        pytest.param(raw_request(headers=[("connection", "keep-alive")]), 400, id="connection-keep"),
        pytest.param(raw_request(headers=[("sec-websocket-version", "8")]), 426, id="version-8"),
        pytest.param(raw_request(drop=["sec-websocket-version"]), 426, id="no-version"),
        pytest.param(raw_request(drop=["sec-websocket-key"]), 400, id="no-key"),
        pytest.param(raw_request(headers=[("sec-websocket-key", "abc")]), 400, id="short-key"),
        pytest.param(
            raw_request(headers=[("sec-websocket-key", base64.b64encode(bytes(15)).decode())]),
            400,
            id="15-byte-key",
        ),
        pytest.param(
            raw_request(headers=[("sec-websocket-key", "!!!!notbase64!!!!!!!!!==")]),
            400,
            id="non-base64-key",
        ),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, id="tls-hello"),
        pytest.param(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400, id="bad-header"),
        pytest.param(b"HELLO\r\n\r\n", 400, id="garbage"),
    ],
)
async def test_invalid_request_is_refused_with_status(raw: bytes, status: int) -> None:
    with pytest.raises(HandshakeError) as info:
        await receive(raw)
    assert info.value.status == status


async def test_oversized_headers_are_refused_with_431() -> None:
    raw = b"GET / HTTP/1.1\r\nx-big: " + b"a" * (40 * 1024)
    with pytest.raises(HandshakeError) as info:
        await receive(raw)
    assert info.value.status == 431


@pytest.mark.parametrize("sent", [b"", b"GET /play HTTP/1.1\r\nhost: x\r\n"])
async def test_client_closing_before_a_full_request_gives_status_0(sent: bytes) -> None:
    with pytest.raises(HandshakeError) as info:
        await receive(sent, eof=True)
    assert info.value.status == 0


async def test_client_broken_stream_gives_status_0() -> None:
    client, server = memory_stream_pair()
    await client.send_all(b"GET / HT")
    await server.aclose()  # our side closed under us: ClosedResourceError from receive_some
    with pytest.raises(HandshakeError) as info:
        await receive_upgrade(server)
    assert info.value.status == 0


async def test_request_arriving_in_pieces_is_reassembled() -> None:
    client, server = memory_stream_pair()
    raw = raw_request()
    async with trio.open_nursery() as nursery:

        async def dribble() -> None:
            for i in range(len(raw)):
                await client.send_all(raw[i : i + 1])
                await wait_all_tasks_blocked()

        nursery.start_soon(dribble)
        request, _trailing = await receive_upgrade(server)
    assert request.target == b"/play?room=7"


# -- accept_response -------------------------------------------------------------------------------


async def test_accept_response_completes_a_wsproto_client_handshake() -> None:
    ws = WSConnection(ConnectionType.CLIENT)
    raw = ws.send(Request(host="game.example", target="/", subprotocols=["game.v1", "game.v2"]))
    request, trailing = await receive(raw)

    data = accept_response(request, subprotocol="game.v2", extra_headers=[(b"x-atlas-node", b"n1")])

    assert trailing == b""
    ws.receive_data(data)
    (event,) = list(ws.events())
    assert isinstance(event, AcceptConnection)
    assert event.subprotocol == "game.v2"
    assert (b"x-atlas-node", b"n1") in event.extra_headers
    # And the accept token is the RFC one, checked independently.
    client = h11.Connection(h11.CLIENT)
    upgrade = [(b"host", b"x"), (b"upgrade", b"websocket"), (b"connection", b"upgrade")]
    client.send(h11.Request(method=b"GET", target=b"/", headers=upgrade))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    response = client.next_event()
    assert isinstance(response, h11.InformationalResponse)
    assert response.status_code == 101
    headers = dict(response.headers)
    assert headers[b"sec-websocket-accept"] == generate_accept_token(request.key)
    assert headers[b"upgrade"].lower() == b"websocket"
    assert headers[b"connection"].lower() == b"upgrade"
    assert b"sec-websocket-extensions" not in headers


async def test_accept_response_without_subprotocol_sends_none() -> None:
    ws = WSConnection(ConnectionType.CLIENT)
    request, _trailing = await receive(ws.send(Request(host="h", target="/")))
    data = accept_response(request, subprotocol=None)
    assert b"sec-websocket-protocol" not in data.lower()
    ws.receive_data(data)
    (event,) = list(ws.events())
    assert isinstance(event, AcceptConnection)
    assert event.subprotocol is None


async def test_bytes_sent_right_after_the_request_are_handed_back() -> None:
    ws = WSConnection(ConnectionType.CLIENT)
    raw = ws.send(Request(host="h", target="/"))
    frames = build_frame(OP_TEXT, b"early", mask=True) + build_frame(OP_BINARY, b"\x00" * 300, mask=True)

    request, trailing = await receive(raw + frames)
    data = accept_response(request, subprotocol=None)

    assert trailing == frames
    assert data.startswith(b"HTTP/1.1 101 ")
    ws.receive_data(data)
    assert isinstance(next(ws.events()), AcceptConnection)


# -- reject_response -------------------------------------------------------------------------------


def parse_rejection(data: bytes) -> tuple[h11.Response, bytes]:
    """Parse ``data`` as the answer to a GET, as an HTTP client would; check the message is complete."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    response = client.next_event()
    assert isinstance(response, h11.Response)
    body = b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        else:
            assert isinstance(event, h11.EndOfMessage)
            break
    # Nothing after the message, and the server will close.
    assert client.trailing_data == (b"", False)
    assert client.their_state is h11.MUST_CLOSE
    return response, body


@pytest.mark.parametrize("retry_after", [None, 30])
async def test_reject_response_without_a_parsed_request(retry_after: int | None) -> None:
    data = reject_response(503, "no backend available", retry_after=retry_after)

    response, body = parse_rejection(data)

    assert response.status_code == 503
    assert body == b"no backend available\n"
    headers = dict(response.headers)
    assert headers[b"content-length"] == str(len(body)).encode()
    assert headers[b"connection"] == b"close"
    assert headers[b"content-type"].startswith(b"text/plain")
    if retry_after is None:
        assert b"retry-after" not in headers
    else:
        assert headers[b"retry-after"] == b"30"


async def test_reject_response_answers_a_parsed_request() -> None:
    ws = WSConnection(ConnectionType.CLIENT)
    await receive(ws.send(Request(host="h", target="/")))

    data = reject_response(503, "all game servers are full\n", retry_after=5)

    # wsproto, the client that sent the request, sees a rejection.
    ws.receive_data(data)
    event = next(ws.events())
    assert isinstance(event, RejectConnection)
    assert event.status_code == 503
    response, body = parse_rejection(data)
    assert body == b"all game servers are full\n"
    assert dict(response.headers)[b"retry-after"] == b"5"


async def test_reject_426_names_the_supported_version() -> None:
    response, _body = parse_rejection(reject_response(426, "upgrade required"))
    headers = dict(response.headers)
    assert response.status_code == 426
    assert headers[b"upgrade"] == b"websocket"
    assert headers[b"sec-websocket-version"] == b"13"


# -- backend_request_headers -----------------------------------------------------------------------


def upgrade_request(headers: Sequence[tuple[bytes, bytes]]) -> UpgradeRequest:
    return UpgradeRequest(target=b"/play", key=KEY, subprotocols=(), headers=tuple(headers))


CLIENT_HEADERS = [
    (b"host", b"play.example.com"),
    (b"upgrade", b"websocket"),
    (b"connection", b"Upgrade, keep-alive"),
    (b"keep-alive", b"timeout=5"),
    (b"te", b"trailers"),
    (b"proxy-authorization", b"Basic c2VjcmV0"),
    (b"sec-websocket-version", b"13"),
    (b"sec-websocket-key", KEY),
    (b"sec-websocket-extensions", b"permessage-deflate"),
    (b"sec-websocket-protocol", b"game.v2, chat"),
    (b"origin", b"https://play.example.com"),
    (b"cookie", b"session=abc"),
    (b"authorization", b"Bearer t0k3n"),
    (b"x-forwarded-for", b"203.0.113.7"),
    (b"x-custom", b"do not forward"),
]


def test_backend_request_headers_forward_and_add_the_right_ones() -> None:
    headers = backend_request_headers(
        upgrade_request(CLIENT_HEADERS),
        host="10.0.0.5",
        port=9000,
        secure=False,
        client_ip="198.51.100.2",
        client_id="c-42",
        client_secure=True,
    )
    names = [name for name, _value in headers]
    found = dict(headers)

    for name in (b"origin", b"cookie", b"authorization", b"sec-websocket-protocol"):
        assert found[name] == dict(CLIENT_HEADERS)[name]
    assert found[b"x-forwarded-for"] == b"203.0.113.7, 198.51.100.2"
    assert found[b"x-forwarded-proto"] == b"https"
    assert found[b"x-forwarded-host"] == b"play.example.com"
    assert found[b"x-atlas-client-id"] == b"c-42"
    assert found[b"host"] == b"10.0.0.5:9000"
    # Atlas's own upgrade headers, once each, with a fresh key.
    assert found[b"upgrade"] == b"websocket"
    assert found[b"connection"] == b"Upgrade"
    assert found[b"sec-websocket-version"] == b"13"
    assert found[b"sec-websocket-key"] != KEY
    assert len(base64.b64decode(found[b"sec-websocket-key"])) == 16
    for name in set(names):
        assert names.count(name) == 1, name
    # Hop-by-hop, extension and unknown headers stay behind.
    for name in (b"keep-alive", b"te", b"proxy-authorization", b"sec-websocket-extensions", b"x-custom"):
        assert name not in found


def test_backend_request_headers_start_x_forwarded_for_and_say_http() -> None:
    headers = backend_request_headers(
        upgrade_request([(b"host", b"h")]),
        host="gs.internal",
        port=80,
        secure=False,
        client_ip="198.51.100.2",
        client_id="c-1",
        client_secure=False,
        extra=[(b"x-atlas-transfer", b"1")],
    )
    found = dict(headers)
    assert found[b"x-forwarded-for"] == b"198.51.100.2"
    assert found[b"x-forwarded-proto"] == b"http"
    assert found[b"host"] == b"gs.internal"
    assert found[b"x-atlas-transfer"] == b"1"
    assert b"origin" not in found


@pytest.mark.parametrize(
    ("host", "port", "secure", "expected"),
    [
        ("::1", 9000, False, b"[::1]:9000"),
        ("::1", 443, True, b"[::1]"),
        ("gs.example", 443, True, b"gs.example"),
        ("gs.example", 80, True, b"gs.example:80"),
    ],
)
def test_backend_host_header(host: str, port: int, secure: bool, expected: bytes) -> None:
    headers = backend_request_headers(
        upgrade_request([]),
        host=host,
        port=port,
        secure=secure,
        client_ip="127.0.0.1",
        client_id="c",
        client_secure=False,
    )
    assert dict(headers)[b"host"] == expected
    assert b"x-forwarded-host" not in dict(headers)


# -- Atlas's handshake with a backend --------------------------------------------------------------


def atlas_headers() -> list[tuple[bytes, bytes]]:
    return backend_request_headers(
        upgrade_request([(b"host", b"play.example"), (b"sec-websocket-protocol", b"game.v2, chat")]),
        host="127.0.0.1",
        port=9000,
        secure=False,
        client_ip="198.51.100.2",
        client_id="c-7",
        client_secure=False,
    )


async def read_request(stream: trio.abc.Stream) -> tuple[h11.Request, bytes]:
    """Read Atlas's request as a backend would; return it and its raw bytes."""
    conn = h11.Connection(h11.SERVER)
    raw = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Request):
            return event, raw
        assert event is h11.NEED_DATA
        data = bytes(await stream.receive_some())
        raw += data
        conn.receive_data(data)


Backend = Callable[[trio.abc.Stream], Awaitable[None]]


async def handshake_with(backend: Backend) -> BackendHandshake | HandshakeError:
    """Run ``_client_handshake`` against ``backend``; return its result or the HandshakeError."""
    headers = atlas_headers()
    atlas_side, backend_side = memory_stream_pair()
    result: BackendHandshake | HandshakeError
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backend, backend_side)
        try:
            result = await _client_handshake(
                atlas_side, encode_request(b"/play?room=7", headers), dict(headers)[b"sec-websocket-key"]
            )
        except HandshakeError as exc:
            result = exc
    return result


async def test_backend_101_with_trailing_frames() -> None:
    seen: list[h11.Request] = []
    frames = b""

    async def backend(stream: trio.abc.Stream) -> None:
        nonlocal frames
        ws = WSConnection(ConnectionType.SERVER)
        request, raw = await read_request(stream)
        seen.append(request)
        ws.receive_data(raw)
        event = next(ws.events())
        assert isinstance(event, Request)
        assert event.subprotocols == ["game.v2", "chat"]
        accept = ws.send(AcceptConnection(subprotocol="chat", extra_headers=[(b"x-gs", b"7")]))
        frames = ws.send(TextMessage(data="welcome")) + ws.send(BytesMessage(data=b"\x01\x02"))
        await stream.send_all(accept + frames)

    result = await handshake_with(backend)

    assert isinstance(result, BackendHandshake), result
    assert result.subprotocol == "chat"
    assert result.trailing == frames
    assert (b"x-gs", b"7") in result.headers
    # The trailing bytes are whole frames a backend-side scanner accepts.
    scanner = FrameScanner(masked=False, max_message_size=1 << 20)
    assert scanner.feed(result.trailing) == frames
    assert scanner.messages == 2
    (request,) = seen
    assert request.target == b"/play?room=7"
    sent = dict(request.headers)
    assert sent[b"x-atlas-client-id"] == b"c-7"
    assert sent[b"x-forwarded-for"] == b"198.51.100.2"


def raw_backend(answer: Callable[[bytes], bytes], *, close: bool = False) -> Backend:
    """A backend that reads the request and sends ``answer(key)`` (then closes, if ``close``)."""

    async def backend(stream: trio.abc.Stream) -> None:
        request, _raw = await read_request(stream)
        key = dict(request.headers)[b"sec-websocket-key"]
        await stream.send_all(answer(key))
        if close:
            await stream.aclose()

    return backend


def response_101(key: bytes, *extra: bytes) -> bytes:
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + generate_accept_token(key),
        *extra,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def test_backend_101_written_by_hand_is_accepted_with_its_frames() -> None:
    frame = build_frame(OP_TEXT, b"hi", mask=False)
    result = await handshake_with(raw_backend(lambda key: response_101(key) + frame))
    assert isinstance(result, BackendHandshake), result
    assert result.trailing == frame
    assert result.subprotocol is None


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(lambda key: b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", id="403"),
        pytest.param(lambda key: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", id="200"),
        pytest.param(
            lambda key: (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + base64.b64encode(b"x" * 20) + b"\r\n\r\n"
            ),
            id="wrong-accept",
        ),
        pytest.param(
            lambda key: (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            ),
            id="no-accept",
        ),
        pytest.param(
            lambda key: response_101(key, b"Sec-WebSocket-Extensions: permessage-deflate"),
            id="extension",
        ),
        pytest.param(lambda key: b"SSH-2.0-OpenSSH_9.6\r\n\r\n", id="garbage"),
    ],
)
async def test_bad_backend_answer_gives_502(answer: Callable[[bytes], bytes]) -> None:
    result = await handshake_with(raw_backend(answer))
    assert isinstance(result, HandshakeError)
    assert result.status == 502


@pytest.mark.parametrize("partial", [b"", b"HTTP/1.1 101 Switching"])
async def test_backend_closing_during_the_handshake_gives_502(partial: bytes) -> None:
    result = await handshake_with(raw_backend(lambda key: partial, close=True))
    assert isinstance(result, HandshakeError)
    assert result.status == 502
