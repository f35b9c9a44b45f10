"""WebSocket opening handshakes on both sides of the proxy, with a lean HTTP/1.1 head parser.

Client side: :func:`receive_upgrade` reads the client's HTTP/1.1 upgrade request and checks it against RFC
6455 section 4.2.1; :func:`accept_response` and :func:`reject_response` write the answer. Backend side:
:func:`open_backend` connects to a backend, sends Atlas's own upgrade request (the client's path, query,
subprotocol offer and selected headers, plus ``X-Forwarded-*`` and ``X-Atlas-Client-Id``), and checks the
101 answer. Compression is never negotiated: frames are forwarded verbatim, so both hops must agree on
extensions, and the only choice that survives a later switch of backend is none (docs/architecture.md).

HTTP parsing
------------
Only message *heads* are ever parsed here (a request line or a status line, then header fields up to the
empty line); whatever follows belongs to the WebSocket. :func:`parse_request_head` and
:func:`parse_response_head` are pure functions over the bytes received so far. They apply h11's rules
(which parsed both sides before, and which the tests use as the reference, byte for byte): the same
ABNF regular expressions (RFC 9110/9112 tokens, field values, request targets), lines ended by CRLF or a
bare LF, obsolete line folding joined with a space, Content-Length and Transfer-Encoding validated,
exactly one Host in an HTTP/1.1 request; errors answered 400 (501 for a transfer coding other than
chunked), and 431 once more than 16 KiB arrived without the end of the head. The request Atlas sends and
the responses it writes are built directly from bytes that were validated when they came in (or once,
for what comes from the configuration).

Every function here reads at most a bounded number of header bytes; timeouts are the caller's
(``handshake_timeout`` around the whole exchange, ``connect_timeout`` per backend attempt).
"""

from __future__ import annotations

import base64
import binascii
import errno
import functools
import hashlib
import ipaddress
import os
import random
import re
import socket
import ssl
from collections.abc import Sequence

import attrs
import trio

from atlas.errors import HandshakeError
from atlas.proxy import reactor

__all__ = [
    "BackendHandshake",
    "UpgradeRequest",
    "accept_response",
    "accept_token",
    "backend_request",
    "backend_target",
    "open_backend",
    "parse_request_head",
    "parse_response_head",
    "receive_upgrade",
    "reject_response",
]

_MAX_HEADER_BYTES = 16 * 1024
_RECEIVE_SIZE = 16 * 1024
#: Client request headers passed on to the backend unchanged.
_FORWARDED_HEADERS = frozenset(
    (
        b"origin",
        b"cookie",
        b"authorization",
        b"user-agent",
        b"accept-language",
        b"sec-websocket-protocol",
    )
)
_SERVER = b"atlas"
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# -- HTTP/1.1 heads: h11's grammar (h11/_abnf.py), compiled once --------------------------------------

_OWS = rb"[ \t]*"
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_VCHAR = rb"[\x21-\x7e]"
_FIELD_VCHAR = rb"[^\x00\s]"
_FIELD_CONTENT = _FIELD_VCHAR + rb"+(?:[ \t]+" + _FIELD_VCHAR + rb"+)*"
_HEADER_FIELD = re.compile(
    rb"(?P<name>" + _TOKEN + rb"):" + _OWS + rb"(?P<value>(?:" + _FIELD_CONTENT + rb")?)" + _OWS
)
_REQUEST_LINE = re.compile(
    rb"(?P<method>" + _TOKEN + rb") (?P<target>" + _VCHAR + rb"+) HTTP/(?P<version>[0-9]\.[0-9])"
)
_STATUS_LINE = re.compile(
    rb"HTTP/(?P<version>[0-9]\.[0-9]) (?P<status>[0-9]{3})(?: (?:[ \t]|" + _FIELD_VCHAR + rb")*)?"
)
_HEADER_NAME = re.compile(_TOKEN)
_HEADER_VALUE = re.compile(rb"(?:" + _FIELD_CONTENT + rb")?")
_TARGET = re.compile(_VCHAR + rb"+")
_CONTENT_LENGTH = re.compile(rb"[0-9]+")
_CONTENT_LENGTH_MAX_DIGITS = 20
_BLANK_LINE = re.compile(rb"\n\r?\n")
_FOLD = re.compile(rb"[ \t]+")

Headers = tuple[tuple[bytes, bytes], ...]


def _head_lines(data: bytes) -> tuple[list[bytes], int] | None:
    r"""The lines of the head at the start of ``data`` and where it ends, or None if it is incomplete.

    h11's ``ReceiveBuffer.maybe_extract_lines``: the head ends at the first empty line (``\n\n`` or
    ``\n\r\n``); lines end with ``\n``, a ``\r`` before it dropped. An empty first line gives no lines.
    """
    if data[:1] == b"\n":
        return [], 1
    if data[:2] == b"\r\n":
        return [], 2
    match = _BLANK_LINE.search(data)
    if match is None:
        return None
    end = match.end()
    lines = data[:end].split(b"\n")
    del lines[-2:]
    return [line[:-1] if line[-1:] == b"\r" else line for line in lines], end


def _incomplete(data: bytes, what: str) -> None:
    """Refuse a head that cannot become valid, or that grew too long, before its end arrived."""
    if data and data[0] < 0x21:
        raise HandshakeError(400, f"bad HTTP {what}: illegal {what} line")
    if len(data) > _MAX_HEADER_BYTES:
        raise HandshakeError(431, f"bad HTTP {what}: Receive buffer too long")


_FRAMING = frozenset((b"content-length", b"transfer-encoding"))


def _header_fields(lines: list[bytes], what: str) -> list[tuple[bytes, bytes]]:
    """Parse and validate header lines (``lines[1:]`` of a head) into ``(lower-case name, value)``.

    In h11's order: continuation lines joined, every line checked, then the framing headers.
    """
    if any(line[:1] in (b" ", b"\t") for line in lines):
        lines = _unfold(lines, what)
    fields: list[tuple[bytes, bytes]] = []
    framing = False
    match_field = _HEADER_FIELD.fullmatch
    for line in lines[1:]:
        match = match_field(line)
        if match is None:
            raise HandshakeError(400, f"bad HTTP {what}: illegal header line: {line!r}")
        name, value = match.groups()
        name = name.lower()
        if name in _FRAMING:
            framing = True
        fields.append((name, value))
    return _check_framing(fields, what) if framing else fields


def _unfold(lines: list[bytes], what: str) -> list[bytes]:
    """``lines`` with each continuation line (obsolete line folding) joined to the one before, by a space."""
    folded = lines[:1]
    for line in lines[1:]:
        match = _FOLD.match(line)
        if match is None:
            folded.append(line)
        elif len(folded) == 1:
            raise HandshakeError(400, f"bad HTTP {what}: continuation line at start of headers")
        else:
            folded[-1] += b" " + line[match.end() :]
    return folded


def _check_framing(fields: list[tuple[bytes, bytes]], what: str) -> list[tuple[bytes, bytes]]:
    """Content-Length and Transfer-Encoding checked and normalised as h11 did.

    A repeated equal Content-Length is kept once.
    """
    content_length: bytes | None = None
    chunked = False
    checked: list[tuple[bytes, bytes]] = []
    for name, raw in fields:
        value = raw
        if name == b"content-length":
            lengths = {length.strip() for length in raw.split(b",")}
            if len(lengths) != 1:
                raise HandshakeError(400, f"bad HTTP {what}: conflicting Content-Length headers")
            value = lengths.pop()
            if _CONTENT_LENGTH.fullmatch(value) is None or len(value) > _CONTENT_LENGTH_MAX_DIGITS:
                raise HandshakeError(400, f"bad HTTP {what}: bad Content-Length")
            if content_length is None:
                content_length = value
            elif content_length != value:
                raise HandshakeError(400, f"bad HTTP {what}: conflicting Content-Length headers")
            else:
                continue
        elif name == b"transfer-encoding":
            if chunked:
                raise HandshakeError(501, f"bad HTTP {what}: multiple Transfer-Encoding headers")
            value = raw.lower()
            if value != b"chunked":
                raise HandshakeError(501, f"bad HTTP {what}: Only Transfer-Encoding: chunked is supported")
            chunked = True
        checked.append((name, value))
    return checked


@attrs.frozen
class RequestHead:
    """A syntactically valid HTTP request head."""

    method: bytes
    target: bytes
    version: bytes
    headers: Headers
    """Header fields in order, names lower-cased."""


def parse_request_head(data: bytes) -> tuple[RequestHead, int] | None:
    """The request head at the start of ``data`` and its length, or None while it is incomplete.

    Raises :class:`HandshakeError` with the status to answer (400, 431, 501).
    """
    found = _head_lines(data)
    if found is None:
        _incomplete(data, "request")
        return None
    lines, end = found
    if not lines:
        raise HandshakeError(400, "bad HTTP request: no request line received")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise HandshakeError(400, f"bad HTTP request: illegal request line: {lines[0]!r}")
    version = match["version"]
    headers = tuple(_header_fields(lines, "request"))
    hosts = sum(1 for name, _value in headers if name == b"host")
    if hosts == 0 and version == b"1.1":
        raise HandshakeError(400, "bad HTTP request: Missing mandatory Host: header")
    if hosts > 1:
        raise HandshakeError(400, "bad HTTP request: Found multiple Host: headers")
    return RequestHead(match["method"], match["target"], version, headers), end


def parse_response_head(data: bytes) -> tuple[int, Headers, int] | None:
    """``(status, headers, length)`` of the response head at the start of ``data``; None if incomplete.

    Raises :class:`HandshakeError` 502 when it is not valid HTTP.
    """
    try:
        found = _head_lines(data)
        if found is None:
            _incomplete(data, "response")
            return None
        lines, end = found
        if not lines:
            raise HandshakeError(400, "bad HTTP response: no response line received")
        match = _STATUS_LINE.fullmatch(lines[0])
        if match is None:
            raise HandshakeError(400, f"bad HTTP response: illegal status line: {lines[0]!r}")
        status = int(match["status"])
        if status < 100:
            raise HandshakeError(400, f"bad HTTP response: status code {status} out of range")
        return status, tuple(_header_fields(lines, "response")), end
    except HandshakeError as exc:
        raise HandshakeError(502, f"backend sent a {exc.reason}") from None


def _check_header(name: bytes, value: bytes) -> None:
    if _HEADER_NAME.fullmatch(name) is None or _HEADER_VALUE.fullmatch(value) is None:
        raise ValueError(f"illegal header {name!r}: {value!r}")


def _check_target(target: bytes) -> None:
    if _TARGET.fullmatch(target) is None:
        raise ValueError(f"illegal request target {target!r}")


def _encode_headers(headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """Header lines (validated) for a head Atlas writes."""
    for name, value in headers:
        _check_header(name, value)
    return b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers)


def accept_token(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for ``key`` (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())


def _nonce() -> bytes:
    """A fresh ``Sec-WebSocket-Key``: 16 random bytes, base64. Not a secret: no system call is spent."""
    return base64.b64encode(random.getrandbits(128).to_bytes(16, "big"))


@attrs.frozen
class UpgradeRequest:
    """A validated WebSocket upgrade request from a client."""

    target: bytes
    """Path and query, exactly as the client sent them."""
    key: bytes
    """The client's ``Sec-WebSocket-Key``."""
    subprotocols: tuple[str, ...]
    """The offered subprotocols, in the client's order."""
    headers: Headers
    """All request headers, names lower-cased."""
    player_id: str | None = None
    """The player id of the client's verified token (``[auth]``), forwarded as ``X-Atlas-Player-Id``."""

    def header(self, name: bytes) -> bytes | None:
        """The value of header ``name`` (lower-case), repeated values joined with ``, ``."""
        values = [value for key, value in self.headers if key == name]
        if not values:
            return None
        return values[0] if len(values) == 1 else b", ".join(values)


def _tokens(value: bytes | None) -> list[bytes]:
    if not value:
        return []
    return [token.strip().lower() for token in value.split(b",") if token.strip()]


def check_upgrade(head: RequestHead) -> UpgradeRequest:
    """Check a request head against RFC 6455 section 4.2.1; raise :class:`HandshakeError` if it fails."""
    # Each header's value, repeated ones joined with ", " (UpgradeRequest.header), in one pass.
    joined: dict[bytes, bytes] = {}
    for name, value in head.headers:
        joined[name] = joined[name] + b", " + value if name in joined else value
    if head.method != b"GET":
        raise HandshakeError(405, "WebSocket upgrade must use GET")
    if head.version != b"1.1":
        raise HandshakeError(400, "WebSocket upgrade needs HTTP/1.1")
    if b"websocket" not in _tokens(joined.get(b"upgrade")):
        raise HandshakeError(426, "this is a WebSocket endpoint: send an Upgrade: websocket request")
    if b"upgrade" not in _tokens(joined.get(b"connection")):
        raise HandshakeError(400, "missing Connection: Upgrade")
    if joined.get(b"sec-websocket-version") != b"13":
        raise HandshakeError(426, "unsupported Sec-WebSocket-Version (13 is supported)")
    key = joined.get(b"sec-websocket-key") or b""
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except (ValueError, binascii.Error):
        raise HandshakeError(400, "invalid Sec-WebSocket-Key") from None
    offered = joined.get(b"sec-websocket-protocol")
    subprotocols = tuple(token.decode("ascii", "replace") for token in _tokens_raw(offered))
    return UpgradeRequest(target=head.target, key=key, subprotocols=subprotocols, headers=head.headers)


def _tokens_raw(value: bytes | None) -> list[bytes]:
    if not value:
        return []
    return [token.strip() for token in value.split(b",") if token.strip()]


def parse_upgrade(data: bytes) -> tuple[UpgradeRequest, bytes] | None:
    """The upgrade request at the start of ``data`` and the bytes after it; None while incomplete.

    Raises :class:`HandshakeError` with the HTTP status to answer.
    """
    found = parse_request_head(data)
    if found is None:
        return None
    head, end = found
    return check_upgrade(head), data[end:]


async def receive_upgrade(stream: trio.abc.Stream) -> tuple[UpgradeRequest, bytes]:
    """Read and validate a client's upgrade request.

    Returns the request and the bytes the client sent right behind it (frames, already). Raises
    :class:`HandshakeError` with the HTTP status to answer when the request is not a valid upgrade, and
    with status 0 when the client went away (nothing to answer).
    """
    data = b""
    while True:
        try:
            chunk = await reactor.receive_some(stream, _RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise HandshakeError(0, f"client went away: {exc}") from None
        if not chunk:
            raise HandshakeError(0, "client closed before sending a request")
        data = data + chunk if data else bytes(chunk)
        found = parse_upgrade(data)
        if found is not None:
            return found


def accept_response(
    request: UpgradeRequest,
    *,
    subprotocol: str | None,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
) -> bytes:
    """The 101 answer to ``request``."""
    protocol = b""
    if subprotocol is not None:
        protocol = b"sec-websocket-protocol: %s\r\n" % subprotocol.encode("ascii")
        _check_header(b"sec-websocket-protocol", protocol[24:-2])
    return b"".join(
        (
            b"HTTP/1.1 101 \r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: ",
            accept_token(request.key),
            b"\r\n",
            protocol,
            _encode_headers(extra_headers) if extra_headers else b"",
            b"\r\n",
        )
    )


def reject_response(status: int, message: str, *, retry_after: int | None = None) -> bytes:
    """A complete HTTP error response with a one-line body and ``Connection: close``."""
    body = (message.rstrip("\n") + "\n").encode("utf-8")
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        (b"server", _SERVER),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if status == 426:
        headers.extend([(b"upgrade", b"websocket"), (b"sec-websocket-version", b"13")])
    return b"HTTP/1.1 %d \r\n%s\r\n%s" % (status, _encode_headers(headers), body)


@attrs.frozen
class BackendHandshake:
    """The outcome of a successful backend handshake."""

    stream: trio.abc.Stream
    subprotocol: str | None
    trailing: bytes
    """Frame bytes the backend sent right behind its 101 response."""
    headers: Headers
    """The backend's 101 response headers."""


def backend_request_headers(
    request: UpgradeRequest,
    *,
    host: str,
    port: int,
    secure: bool,
    client_ip: str,
    client_id: str,
    client_secure: bool,
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> list[tuple[bytes, bytes]]:
    """The headers of Atlas's upgrade request to a backend, derived from the client's request."""
    headers = [
        (b"host", _host_header(host, port, secure)),
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-version", b"13"),
        (b"sec-websocket-key", _nonce()),
    ]
    headers.extend(_client_headers(request, client_ip, client_id, client_secure))
    headers.extend(extra)
    return headers


def _host_header(host: str, port: int, secure: bool) -> bytes:
    default_port = 443 if secure else 80
    host_header = host if port == default_port else f"{host}:{port}"
    if ":" in host and not host.startswith("["):
        host_header = f"[{host}]" if port == default_port else f"[{host}]:{port}"
    return host_header.encode("idna")


def _client_headers(
    request: UpgradeRequest, client_ip: str, client_id: str, client_secure: bool
) -> list[tuple[bytes, bytes]]:
    """The headers of a backend request that come from the client: forwarded ones, then added ones."""
    headers = [(name, value) for name, value in request.headers if name in _FORWARDED_HEADERS]
    prior = request.header(b"x-forwarded-for")
    forwarded_for = f"{prior.decode('latin-1')}, {client_ip}" if prior else client_ip
    original_host = request.header(b"host")
    headers.append((b"x-forwarded-for", forwarded_for.encode("latin-1")))
    headers.append((b"x-forwarded-proto", b"https" if client_secure else b"http"))
    if original_host:
        headers.append((b"x-forwarded-host", original_host))
    headers.append((b"x-atlas-client-id", client_id.encode("ascii")))
    if request.player_id is not None:
        # Only a verified id: a client's own X-Atlas-Player-Id is not among the forwarded headers.
        headers.append((b"x-atlas-player-id", request.player_id.encode("utf-8")))
    return headers


@functools.lru_cache(maxsize=1024)
def _request_prefix(host: str, port: int, secure: bool) -> bytes:
    """The header lines of every request to one backend that precede the key (built once)."""
    return _encode_headers(
        [
            (b"host", _host_header(host, port, secure)),
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-version", b"13"),
        ]
    )


def client_request_part(
    request: UpgradeRequest, client_ip: str, client_id: str, *, client_secure: bool = False
) -> bytes:
    """The header lines one client's every backend request ends with (built once per client)."""
    return _encode_headers(_client_headers(request, client_ip, client_id, client_secure))


def backend_request(
    target: bytes,
    *,
    host: str,
    port: int,
    secure: bool,
    client_part: bytes,
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> tuple[bytes, bytes]:
    """Atlas's upgrade request to a backend and its key: what :func:`backend_request_headers` lists.

    ``client_part``: :func:`client_request_part` of the client.
    """
    try:
        _check_target(target)
        extra_lines = _encode_headers(extra) if extra else b""
    except ValueError as exc:
        raise HandshakeError(502, f"cannot build the upgrade request: {exc}") from None
    key = _nonce()
    data = b"".join(
        (
            b"GET ",
            target,
            b" HTTP/1.1\r\n",
            _request_prefix(host, port, secure),
            b"sec-websocket-key: ",
            key,
            b"\r\n",
            client_part,
            extra_lines,
            b"\r\n",
        )
    )
    return data, key


def encode_request(target: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """A GET request head with ``headers``; raises :class:`HandshakeError` 502 if one is not valid."""
    try:
        _check_target(target)
        return b"GET %s HTTP/1.1\r\n%s\r\n" % (target, _encode_headers(headers))
    except ValueError as exc:
        raise HandshakeError(502, f"cannot build the upgrade request: {exc}") from None


def backend_target(base: str, client_target: bytes) -> bytes:
    """The request target for a backend: its URL's path as a prefix of the client's, queries merged.

    ``ws://h/game?build=42`` and a client's ``/room?a=1`` give ``/game/room?build=42&a=1``; a backend
    path of ``/`` passes the client's target unchanged. Health probes place their path the same way.
    """
    if base in ("", "/"):
        return client_target
    base_path, _, base_query = base.encode("utf-8").partition(b"?")
    client_path, _, client_query = client_target.partition(b"?")
    path = base_path.rstrip(b"/") + client_path if client_path != b"/" else base_path
    query = b"&".join(part for part in (base_query, client_query) if part)
    return path + b"?" + query if query else path


async def open_backend(
    host: str,
    port: int,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> BackendHandshake:
    """Connect to a backend and complete Atlas's upgrade handshake with it.

    ``headers`` must hold a ``sec-websocket-key``. Raises :class:`HandshakeError` (status 502) when the
    backend cannot be reached or refuses; the caller bounds the whole call with its connect timeout.
    The stream is closed on any failure.
    """
    key = dict(headers)[b"sec-websocket-key"]
    return await open_backend_request(
        host, port, encode_request(target, headers), key, ssl_context=ssl_context
    )


async def open_backend_request(
    host: str, port: int, request: bytes, key: bytes, *, ssl_context: ssl.SSLContext | None = None
) -> BackendHandshake:
    """:func:`open_backend` with the request already built (:func:`backend_request`)."""
    try:
        tcp = await _connect(host, port)
    except OSError as exc:
        raise HandshakeError(502, f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    stream: trio.abc.Stream = tcp
    try:
        if ssl_context is not None:
            ssl_stream = trio.SSLStream(tcp, ssl_context, server_hostname=host)
            stream = ssl_stream
            try:
                await ssl_stream.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError) as exc:
                raise HandshakeError(502, f"TLS handshake with {host}:{port} failed: {exc}") from None
        result = await _client_handshake(stream, request, key)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return result


@functools.lru_cache(maxsize=256)
def _numeric_family(host: str) -> int | None:
    """The address family of a numeric ``host``; None for a name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


def _connected(sock: socket.socket) -> bool:
    """Whether a connect still reported in progress is in fact complete (the socket has a peer)."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


async def _connect(host: str, port: int) -> trio.SocketStream:
    """A TCP connection to ``host``; a numeric address is connected to directly.

    ``trio.open_tcp_stream`` resolves names and races the addresses (happy eyeballs) in a nursery of its
    own: worth it for a name, pure overhead for an IP address, and backends are mostly given as one.
    The direct path is a non-blocking ``connect`` and, unless the connection is up already when the
    call returns (as on loopback, where the kernel completes it within the call), one wait for the
    socket to become writable: no resolver call, no thread.
    """
    family = _numeric_family(host)
    if family is None:
        return await trio.open_tcp_stream(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        error = sock.connect_ex((host, port))
        if error == errno.EINPROGRESS:
            if _connected(sock):
                error = 0
            else:
                await trio.lowlevel.wait_writable(sock)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def _client_handshake(stream: trio.abc.Stream, request: bytes, key: bytes) -> BackendHandshake:
    try:
        await reactor.send_all(stream, request)
        data = b""
        while True:
            chunk = await reactor.receive_some(stream, _RECEIVE_SIZE)
            if not chunk:
                raise HandshakeError(502, "backend closed during the handshake")
            data = data + chunk if data else bytes(chunk)
            found = parse_response_head(data)
            if found is not None:
                break
    except (trio.BrokenResourceError, ssl.SSLError) as exc:
        raise HandshakeError(502, f"backend connection failed: {exc}") from None
    status, response_headers, end = found
    if status != 101:
        raise HandshakeError(502, f"backend refused the upgrade with HTTP {status}")
    found_headers = dict(response_headers)
    if found_headers.get(b"sec-websocket-accept") != accept_token(key):
        raise HandshakeError(502, "backend sent a wrong Sec-WebSocket-Accept")
    if found_headers.get(b"sec-websocket-extensions"):
        raise HandshakeError(502, "backend accepted an extension Atlas did not offer")
    protocol = found_headers.get(b"sec-websocket-protocol")
    return BackendHandshake(
        stream=stream,
        subprotocol=protocol.decode("ascii", "replace") if protocol else None,
        trailing=data[end:],
        headers=response_headers,
    )
