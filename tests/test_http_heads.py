"""The lean HTTP head parsers of atlas.proxy.handshake against h11, the parser they replaced.

h11 is the reference: for any bytes, delivered in any pieces, the new client-side parser must reach the
same outcome as the h11-based code it replaced (the same request, headers and early bytes, or a refusal
with the same status, or a wait for more bytes), and the backend-side parser must accept exactly the
responses h11 accepted, with the same status, headers and trailing bytes.
"""

from __future__ import annotations

import base64
import binascii
import itertools
from collections.abc import Sequence

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlas.errors import HandshakeError
from atlas.proxy.handshake import (
    accept_response,
    accept_token,
    backend_request,
    backend_request_headers,
    backend_target,
    client_request_part,
    encode_request,
    parse_response_head,
    parse_upgrade,
    reject_response,
)

KEY = base64.b64encode(b"0123456789abcdef")
Outcome = tuple[object, ...]

# -- the reference: the h11-based code that parsed both sides before ----------------------------------


def _tokens(value: bytes | None) -> list[bytes]:
    if not value:
        return []
    return [token.strip().lower() for token in value.split(b",") if token.strip()]


def _reference_upgrade(request: h11.Request) -> Outcome:
    """The RFC 6455 checks as the h11-based code made them; ``("ok", ...)`` or ``("refused", status)``."""
    headers = tuple((bytes(name), bytes(value)) for name, value in request.headers)

    def header(name: bytes) -> bytes | None:
        values = [value for key, value in headers if key == name]
        return b", ".join(values) if values else None

    if request.method != b"GET":
        return ("refused", 405)
    if request.http_version != b"1.1":
        return ("refused", 400)
    if b"websocket" not in _tokens(header(b"upgrade")):
        return ("refused", 426)
    if b"upgrade" not in _tokens(header(b"connection")):
        return ("refused", 400)
    if header(b"sec-websocket-version") != b"13":
        return ("refused", 426)
    key = header(b"sec-websocket-key") or b""
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return ("refused", 400)
    except (ValueError, binascii.Error):
        return ("refused", 400)
    offered = header(b"sec-websocket-protocol") or b""
    protocols = tuple(t.strip().decode("ascii", "replace") for t in offered.split(b",") if t.strip())
    return ("ok", bytes(request.target), key, protocols, headers)


def reference_request(chunks: Sequence[bytes]) -> Outcome:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    pieces = list(chunks)
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            return ("refused", exc.error_status_hint)
        if isinstance(event, h11.Request):
            outcome = _reference_upgrade(event)
            if outcome[0] == "ok":
                outcome = (*outcome, bytes(conn.trailing_data[0]))
            return outcome
        assert event is h11.NEED_DATA
        if not pieces:
            return ("more",)
        conn.receive_data(pieces.pop(0))


def new_request(chunks: Sequence[bytes]) -> Outcome:
    data = b""
    for chunk in chunks:
        data += chunk
        try:
            found = parse_upgrade(data)
        except HandshakeError as exc:
            return ("refused", exc.status)
        if found is not None:
            request, trailing = found
            return ("ok", request.target, request.key, request.subprotocols, request.headers, trailing)
    return ("more",)


def reference_response(chunks: Sequence[bytes]) -> Outcome:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=16 * 1024)
    upgrade = [(b"host", b"gs"), (b"upgrade", b"websocket"), (b"connection", b"Upgrade")]
    conn.send(h11.Request(method=b"GET", target=b"/", headers=upgrade))
    conn.send(h11.EndOfMessage())
    pieces = list(chunks)
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.InformationalResponse | h11.Response):
                headers = tuple((bytes(k), bytes(v)) for k, v in event.headers)
                return ("ok", event.status_code, headers, bytes(conn.trailing_data[0]))
            assert event is h11.NEED_DATA
            if not pieces:
                return ("more",)
            conn.receive_data(pieces.pop(0))
    except h11.ProtocolError:
        return ("bad",)


def new_response(chunks: Sequence[bytes]) -> Outcome:
    data = b""
    for chunk in chunks:
        data += chunk
        try:
            found = parse_response_head(data)
        except HandshakeError as exc:
            assert exc.status == 502
            return ("bad",)
        if found is not None:
            status, headers, end = found
            return ("ok", status, headers, data[end:])
    return ("more",)


# -- generated heads: mostly valid upgrades with plausible damage ---------------------------------------

_GOOD_NAMES = [
    b"Host",
    b"Upgrade",
    b"Connection",
    b"Sec-WebSocket-Version",
    b"Sec-WebSocket-Key",
    b"Sec-WebSocket-Protocol",
    b"Sec-WebSocket-Extensions",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Origin",
    b"X-Forwarded-For",
    b"x-custom",
]
_BAD_NAMES = [b"Bad Name", b"", b"x:y", b"\xff", b"X-A "]
_GOOD_VALUES = [
    b"websocket",
    b"WebSocket, h2c",
    b"Upgrade",
    b"keep-alive, upgrade",
    b"13",
    b"8",
    KEY,
    b"abc",
    b"game.v2, chat",
    b" a ,, b ",
    b"0",
    b"3",
    b"3, 3",
    b"3, 4",
    b"1" * 21,
    b"chunked",
    b"CHUNKED",
    b"gzip",
    b"",
    b"  padded\t",
    b"inner  space",
    b"obs\x80text\xff",
    b"http://x",
]
_BAD_VALUES = [b"ctl\x01char", b"nul\x00byte", b"cr\rin", b"-1"]
_GOOD_SEPARATORS = [b"\r\n", b"\n"]
_BAD_SEPARATORS = [b"\r\r\n", b" \r\n", b"\r"]


def rarely(draw: st.DrawFn, good: Sequence[bytes], bad: Sequence[bytes]) -> bytes:
    """A good choice most of the time, a bad one about one time in twenty."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.sampled_from(bad))
    return draw(st.sampled_from(good))


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    method = rarely(draw, [b"GET"], [b"POST", b"HEAD", b"G(T", b"", b"get"])
    target = rarely(draw, [b"/", b"/play?room=7", b"*", b"/a%20b"], [b"/sp ace", b"/\x7f", b""])
    version = rarely(draw, [b"1.1"], [b"1.0", b"2.0", b"1.x", b"11"])
    lines = [b"%s %s HTTP/%s" % (method, target, version)]
    base = [
        (b"Host", b"game.example"),
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Version", b"13"),
        (b"Sec-WebSocket-Key", KEY),
    ]
    headers = [pair for pair in base if draw(st.integers(0, 15)) > 0]
    for _ in range(draw(st.integers(0, 4))):
        pair = (rarely(draw, _GOOD_NAMES, _BAD_NAMES), rarely(draw, _GOOD_VALUES, _BAD_VALUES))
        headers.insert(draw(st.integers(0, len(headers))), pair)
    for name, value in headers:
        case = draw(st.sampled_from(["keep", "lower", "upper"]))
        cased = name.lower() if case == "lower" else name.upper() if case == "upper" else name
        lines.append(b"%s:%s%s" % (cased, draw(st.sampled_from([b" ", b"", b"\t", b"  "])), value))
    if draw(st.integers(0, 5)) == 0:
        lines.insert(draw(st.integers(1, len(lines))), draw(st.sampled_from([b" folded", b"\tmore", b"  "])))
    if draw(st.integers(0, 15)) == 0:
        lines.insert(0, b"")
    separators = [rarely(draw, _GOOD_SEPARATORS, _BAD_SEPARATORS) for _ in lines]
    head = b"".join(line + sep for line, sep in zip(lines, separators, strict=True))
    head += rarely(draw, _GOOD_SEPARATORS, [b""])
    return head + draw(st.sampled_from([b"", b"\x81\x85abcd", b"GET / HTTP/1.1\r\n\r\n"]))


@st.composite
def mutated(draw: st.DrawFn, heads: st.SearchStrategy[bytes]) -> bytes:
    data = bytearray(draw(heads))
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=3))
    return bytes(data)


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if data[a:b]]  # no empty piece: that is EOF


_SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(st.data())
def test_request_parser_agrees_with_h11(data: st.DataObject) -> None:
    raw = data.draw(st.one_of(request_heads(), request_heads(), mutated(request_heads())))
    chunks = data.draw(split(raw))
    assert new_request(chunks) == reference_request(chunks)


@_SETTINGS
@given(st.data())
def test_request_parser_agrees_with_h11_on_any_bytes(data: st.DataObject) -> None:
    raw = data.draw(st.binary(max_size=64))
    chunks = data.draw(split(raw))
    assert new_request(chunks) == reference_request(chunks)


@st.composite
def response_heads(draw: st.DrawFn) -> bytes:
    status = rarely(draw, [b"101", b"101", b"200", b"100", b"403"], [b"099", b"1010", b"abc"])
    reason = rarely(draw, [b" Switching Protocols", b"", b" ", b" ok\tfine"], [b" \x01bad", b"  \x7f"])
    version = rarely(draw, [b"1.1", b"1.0"], [b"x", b"1.10"])
    lines = [b"HTTP/%s %s%s" % (version, status, reason)]
    base = [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"), (b"Sec-WebSocket-Accept", b"x=")]
    headers = [pair for pair in base if draw(st.integers(0, 9)) > 0]
    for _ in range(draw(st.integers(0, 3))):
        pair = (rarely(draw, _GOOD_NAMES, _BAD_NAMES), rarely(draw, _GOOD_VALUES, _BAD_VALUES))
        headers.insert(draw(st.integers(0, len(headers))), pair)
    lines += [b"%s: %s" % pair for pair in headers]
    if draw(st.integers(0, 5)) == 0:
        lines.insert(draw(st.integers(1, len(lines))), b" folded")
    separators = [rarely(draw, _GOOD_SEPARATORS, _BAD_SEPARATORS) for _ in lines]
    head = b"".join(line + sep for line, sep in zip(lines, separators, strict=True))
    head += rarely(draw, _GOOD_SEPARATORS, [b""])
    return head + draw(st.sampled_from([b"", b"\x81\x02hi"]))


@_SETTINGS
@given(st.data())
def test_response_parser_agrees_with_h11(data: st.DataObject) -> None:
    raw = data.draw(st.one_of(response_heads(), mutated(response_heads()), st.binary(max_size=48)))
    chunks = data.draw(split(raw))
    assert new_response(chunks) == reference_response(chunks)


# -- edges h11 drew the line at, named ------------------------------------------------------------------

_UPGRADE = (
    b"GET /p HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + KEY + b"\r\n"
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(_UPGRADE + b"\r\n", "ok", id="crlf"),
        pytest.param(_UPGRADE.replace(b"\r\n", b"\n") + b"\n", "ok", id="bare-lf"),
        pytest.param(_UPGRADE + b"X-A: 1\r\n  2\r\n\r\n", "ok", id="obs-fold"),
        pytest.param(_UPGRADE + b"Content-Length: 3\r\n\r\nabc", "ok", id="body-is-early-bytes"),
        pytest.param(_UPGRADE + b"Host: h2\r\n\r\n", 400, id="two-hosts"),
        pytest.param(_UPGRADE + b"Transfer-Encoding: gzip\r\n\r\n", 501, id="gzip"),
        pytest.param(_UPGRADE + b"Content-Length: 1, 2\r\n\r\n", 400, id="conflicting-length"),
        pytest.param(_UPGRADE + b"X-A : 1\r\n\r\n", 400, id="space-before-colon"),
        pytest.param(b"\r\n" + _UPGRADE + b"\r\n", 400, id="leading-empty-line"),
        pytest.param(_UPGRADE.replace(b"Host: h\r\n", b"") + b"\r\n", 400, id="no-host"),
        pytest.param(b" GET", 400, id="obviously-not-a-request-line"),
        pytest.param(b"GET / HTTP/1.1\r\nx-big: " + b"a" * (20 * 1024), 431, id="too-long"),
    ],
)
def test_request_edges(raw: bytes, expected: str | int) -> None:
    outcome = new_request([raw])
    assert outcome == reference_request([raw])
    assert outcome[0] == "ok" if expected == "ok" else outcome == ("refused", expected)


def test_a_complete_head_over_16_kib_in_one_piece_is_parsed_as_h11_did() -> None:
    raw = _UPGRADE + b"X-Big: " + b"a" * (17 * 1024) + b"\r\n\r\n"
    assert new_request([raw])[0] == "ok"
    assert new_request([raw[:100], raw[100:]]) == reference_request([raw[:100], raw[100:]])
    pieces = [raw[: 16 * 1024 + 1], raw[16 * 1024 + 1 :]]
    assert new_request(pieces) == reference_request(pieces) == ("refused", 431)


# -- what Atlas writes: byte for byte what h11 wrote ---------------------------------------------------


def h11_server_for(raw: bytes) -> h11.Connection:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    assert isinstance(conn.next_event(), h11.Request)
    return conn


@pytest.mark.parametrize("subprotocol", [None, "game.v2"])
@pytest.mark.parametrize("extra", [(), ((b"x-atlas-node", b"n1"),)])
def test_accept_response_is_what_h11_wrote(
    subprotocol: str | None, extra: tuple[tuple[bytes, bytes], ...]
) -> None:
    found = parse_upgrade(_UPGRADE + b"\r\n")
    assert found is not None
    request, _trailing = found
    headers = [
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", accept_token(request.key)),
    ]
    if subprotocol is not None:
        headers.append((b"sec-websocket-protocol", subprotocol.encode()))
    headers.extend(extra)
    expected = h11_server_for(_UPGRADE + b"\r\n").send(
        h11.InformationalResponse(status_code=101, headers=headers)
    )
    assert accept_response(request, subprotocol=subprotocol, extra_headers=extra) == expected


def test_accept_token_is_the_rfc_example() -> None:
    # RFC 6455 section 1.3.
    assert accept_token(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize(
    ("status", "retry_after"), [(503, 5), (503, None), (426, None), (400, None), (502, None)]
)
def test_reject_response_is_what_h11_wrote(status: int, retry_after: int | None) -> None:
    body = b"no game server answered\n"
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        (b"server", b"atlas"),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    if status == 426:
        headers.extend([(b"upgrade", b"websocket"), (b"sec-websocket-version", b"13")])
    conn = h11_server_for(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    expected = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    expected += conn.send(h11.Data(data=body)) or b""
    assert reject_response(status, "no game server answered", retry_after=retry_after) == expected


def test_backend_request_is_what_h11_wrote_for_the_same_headers() -> None:
    forwarded = (
        b"Origin: https://game.example\r\nX-Forwarded-For: 203.0.113.7\r\nSec-WebSocket-Protocol: a, b\r\n"
    )
    found = parse_upgrade(_UPGRADE + forwarded + b"\r\n")
    assert found is not None
    request, _trailing = found
    target = backend_target("/game?build=42", request.target)
    for port, secure, extra in [(9000, False, ()), (443, True, ((b"x-atlas-transfer", b"t-1"),))]:
        data, key = backend_request(
            target,
            host="10.0.0.5",
            port=port,
            secure=secure,
            client_part=client_request_part(request, "198.51.100.2", "c-42"),
            extra=extra,
        )
        headers = backend_request_headers(
            request,
            host="10.0.0.5",
            port=port,
            secure=secure,
            client_ip="198.51.100.2",
            client_id="c-42",
            client_secure=False,
            extra=extra,
        )
        headers = [(name, key if name == b"sec-websocket-key" else value) for name, value in headers]
        conn = h11.Connection(h11.CLIENT)
        expected = conn.send(h11.Request(method=b"GET", target=target, headers=headers))
        assert data == expected
        assert encode_request(target, headers) == expected
        assert len(base64.b64decode(key)) == 16


def test_fresh_keys_differ() -> None:
    found = parse_upgrade(_UPGRADE + b"\r\n")
    assert found is not None
    part = client_request_part(found[0], "127.0.0.1", "c")
    keys = {backend_request(b"/", host="h", port=80, secure=False, client_part=part)[1] for _ in range(100)}
    assert len(keys) == 100


@pytest.mark.parametrize(
    ("target", "extra"),
    [(b"/with space", ()), (b"/", ((b"x-atlas-transfer", b"bad\r\nvalue"),)), (b"/", ((b"bad name", b"v"),))],
)
def test_a_request_that_cannot_be_written_is_a_502(
    target: bytes, extra: tuple[tuple[bytes, bytes], ...]
) -> None:
    with pytest.raises(HandshakeError) as info:
        backend_request(target, host="h", port=80, secure=False, client_part=b"", extra=extra)
    assert info.value.status == 502
