"""WebSocket opening handshakes on both sides of the proxy, with h11 doing all HTTP parsing.

Client side: :func:`receive_upgrade` reads the client's HTTP/1.1 upgrade request and checks it against RFC
6455 section 4.2.1; :func:`accept_response` and :func:`reject_response` write the answer. Backend side:
:func:`open_backend` connects to a backend, sends Atlas's own upgrade request (the client's path, query,
subprotocol offer and selected headers, plus ``X-Forwarded-*`` and ``X-Atlas-Client-Id``), and checks the
101 answer. Compression is never negotiated: frames are forwarded verbatim, so both hops must agree on
extensions, and the only choice that survives a later switch of backend is none (docs/architecture.md).

Every function here reads at most a bounded number of header bytes; timeouts are the caller's
(``handshake_timeout`` around the whole exchange, ``connect_timeout`` per backend attempt).
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import socket
import ssl
from collections.abc import Sequence

import attrs
import h11
import trio
from wsproto.utilities import generate_accept_token, generate_nonce

from atlas.errors import HandshakeError

__all__ = [
    "BackendHandshake",
    "UpgradeRequest",
    "accept_response",
    "backend_target",
    "open_backend",
    "receive_upgrade",
    "reject_response",
]

_MAX_HEADER_BYTES = 16 * 1024
_RECEIVE_SIZE = 16 * 1024
#: Client request headers passed on to the backend unchanged.
_FORWARDED_HEADERS = (
    b"origin",
    b"cookie",
    b"authorization",
    b"user-agent",
    b"accept-language",
    b"sec-websocket-protocol",
)
_SERVER = b"atlas"


@attrs.frozen
class UpgradeRequest:
    """A validated WebSocket upgrade request from a client."""

    target: bytes
    """Path and query, exactly as the client sent them."""
    key: bytes
    """The client's ``Sec-WebSocket-Key``."""
    subprotocols: tuple[str, ...]
    """The offered subprotocols, in the client's order."""
    headers: tuple[tuple[bytes, bytes], ...]
    """All request headers, names lower-cased (h11's normalisation)."""

    def header(self, name: bytes) -> bytes | None:
        """The value of header ``name`` (lower-case), repeated values joined with ``, ``."""
        values = [value for key, value in self.headers if key == name]
        return b", ".join(values) if values else None


def _tokens(value: bytes | None) -> list[bytes]:
    if not value:
        return []
    return [token.strip().lower() for token in value.split(b",") if token.strip()]


def _parse_upgrade(request: h11.Request) -> UpgradeRequest:
    """Check an h11 request against RFC 6455 section 4.2.1."""
    headers = tuple((bytes(name), bytes(value)) for name, value in request.headers)
    found = UpgradeRequest(target=bytes(request.target), key=b"", subprotocols=(), headers=headers)
    if request.method != b"GET":
        raise HandshakeError(405, "WebSocket upgrade must use GET")
    if request.http_version != b"1.1":
        raise HandshakeError(400, "WebSocket upgrade needs HTTP/1.1")
    if b"websocket" not in _tokens(found.header(b"upgrade")):
        raise HandshakeError(426, "this is a WebSocket endpoint: send an Upgrade: websocket request")
    if b"upgrade" not in _tokens(found.header(b"connection")):
        raise HandshakeError(400, "missing Connection: Upgrade")
    if found.header(b"sec-websocket-version") != b"13":
        raise HandshakeError(426, "unsupported Sec-WebSocket-Version (13 is supported)")
    key = found.header(b"sec-websocket-key") or b""
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except (ValueError, binascii.Error):
        raise HandshakeError(400, "invalid Sec-WebSocket-Key") from None
    offered = found.header(b"sec-websocket-protocol")
    subprotocols = tuple(token.decode("ascii", "replace") for token in _tokens_raw(offered))
    return attrs.evolve(found, key=key, subprotocols=subprotocols)


def _tokens_raw(value: bytes | None) -> list[bytes]:
    if not value:
        return []
    return [token.strip() for token in value.split(b",") if token.strip()]


async def receive_upgrade(stream: trio.abc.Stream) -> tuple[UpgradeRequest, h11.Connection]:
    """Read and validate a client's upgrade request.

    Returns the request and the h11 connection to answer it with. Raises :class:`HandshakeError` with
    the HTTP status to answer when the request is not a valid upgrade, and with status 0 when the
    client went away (nothing to answer).
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADER_BYTES)
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise HandshakeError(exc.error_status_hint, f"bad HTTP request: {exc}") from None
        if isinstance(event, h11.Request):
            return _parse_upgrade(event), conn
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise HandshakeError(0, f"client went away: {exc}") from None
            if not data:
                raise HandshakeError(0, "client closed before sending a request")
            conn.receive_data(bytes(data))
            continue
        raise HandshakeError(0, "client closed before sending a request")


def accept_response(
    conn: h11.Connection,
    request: UpgradeRequest,
    *,
    subprotocol: str | None,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
) -> tuple[bytes, bytes]:
    """The 101 answer to ``request``; returns ``(bytes to send, bytes the client already sent after it)``."""
    headers = [
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", generate_accept_token(request.key)),
    ]
    if subprotocol is not None:
        headers.append((b"sec-websocket-protocol", subprotocol.encode("ascii")))
    headers.extend(extra_headers)
    data = conn.send(h11.InformationalResponse(status_code=101, headers=headers))
    assert data is not None
    trailing, _closed = conn.trailing_data
    return data, bytes(trailing)


def reject_response(
    conn: h11.Connection | None,
    status: int,
    message: str,
    *,
    retry_after: int | None = None,
) -> bytes:
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
    if status == 426:
        headers.extend([(b"upgrade", b"websocket"), (b"sec-websocket-version", b"13")])
    if conn is None or conn.our_state is not h11.SEND_RESPONSE:
        # The request could not be parsed (or never came): answer through a fresh connection object
        # in the right state so h11 still does the formatting.
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        conn.next_event()
    out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    out += conn.send(h11.Data(data=body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    return out


@attrs.frozen
class BackendHandshake:
    """The outcome of a successful backend handshake."""

    stream: trio.abc.Stream
    subprotocol: str | None
    trailing: bytes
    """Frame bytes the backend sent right behind its 101 response."""
    headers: tuple[tuple[bytes, bytes], ...]
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
    default_port = 443 if secure else 80
    host_header = host if port == default_port else f"{host}:{port}"
    if ":" in host and not host.startswith("["):
        host_header = f"[{host}]" if port == default_port else f"[{host}]:{port}"
    headers = [
        (b"host", host_header.encode("idna")),
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-version", b"13"),
        (b"sec-websocket-key", generate_nonce()),
    ]
    for name, value in request.headers:
        if name in _FORWARDED_HEADERS:
            headers.append((name, value))
    prior = request.header(b"x-forwarded-for")
    forwarded_for = f"{prior.decode('latin-1')}, {client_ip}" if prior else client_ip
    original_host = request.header(b"host")
    headers.append((b"x-forwarded-for", forwarded_for.encode("latin-1")))
    headers.append((b"x-forwarded-proto", b"https" if client_secure else b"http"))
    if original_host:
        headers.append((b"x-forwarded-host", original_host))
    headers.append((b"x-atlas-client-id", client_id.encode("ascii")))
    headers.extend(extra)
    return headers


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

    Raises :class:`HandshakeError` (status 502) when the backend cannot be reached or refuses; the
    caller bounds the whole call with its connect timeout. The stream is closed on any failure.
    """
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
        key = dict(headers)[b"sec-websocket-key"]
        result = await _client_handshake(stream, target, headers, key)
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


async def _connect(host: str, port: int) -> trio.SocketStream:
    """A TCP connection to ``host``; a numeric address is connected to directly.

    ``trio.open_tcp_stream`` resolves names and races the addresses (happy eyeballs) in a nursery of its
    own: worth it for a name, pure overhead for an IP address, and backends are mostly given as one.
    """
    family = _numeric_family(host)
    if family is None:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def _client_handshake(
    stream: trio.abc.Stream, target: bytes, headers: list[tuple[bytes, bytes]], key: bytes
) -> BackendHandshake:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEADER_BYTES)
    try:
        data = conn.send(h11.Request(method=b"GET", target=target, headers=headers)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                chunk = await stream.receive_some(_RECEIVE_SIZE)
                conn.receive_data(bytes(chunk))
                if not chunk:
                    raise HandshakeError(502, "backend closed during the handshake")
                continue
            if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                break
            if isinstance(event, h11.Response | h11.InformationalResponse):
                raise HandshakeError(502, f"backend refused the upgrade with HTTP {event.status_code}")
            raise HandshakeError(502, "backend closed during the handshake")
    except h11.ProtocolError as exc:
        raise HandshakeError(502, f"backend sent a bad HTTP response: {exc}") from None
    except (trio.BrokenResourceError, ssl.SSLError) as exc:
        raise HandshakeError(502, f"backend connection failed: {exc}") from None
    response_headers = tuple((bytes(k), bytes(v)) for k, v in event.headers)
    found = dict(response_headers)
    if found.get(b"sec-websocket-accept") != generate_accept_token(key):
        raise HandshakeError(502, "backend sent a wrong Sec-WebSocket-Accept")
    if found.get(b"sec-websocket-extensions"):
        raise HandshakeError(502, "backend accepted an extension Atlas did not offer")
    protocol = found.get(b"sec-websocket-protocol")
    trailing, _closed = conn.trailing_data
    return BackendHandshake(
        stream=stream,
        subprotocol=protocol.decode("ascii", "replace") if protocol else None,
        trailing=bytes(trailing),
        headers=response_headers,
    )
