"""The listener: accept clients, route each to a backend, and run its session until it ends.

Theory of operation
-------------------
:func:`serve_proxy` opens the listening sockets and runs the *listener nursery*: the accept loops (in a
cancel scope of their own, so accepting can stop while sessions carry on), one task per connected client,
and the idle sweeper, and the reactor that relays the plain-socket sessions (atlas.proxy.reactor). Each client
task runs :func:`handle_client`:

1. with ``[proxy] tls_cert``, the TLS handshake (``trio.SSLStream``, server side); then read the
   client's upgrade request (atlas.proxy.handshake); both within ``handshake_timeout``;
2. pick a backend with the pool's balancer and open Atlas's own WebSocket to it, trying up to
   ``connect_attempts`` distinct backends, each within ``connect_timeout``; nothing available answers
   503 with ``Retry-After``, all attempts failing answers 502;
3. answer the client's upgrade with 101 and the backend's chosen subprotocol;
4. run the :class:`~atlas.proxy.session.ClientSession` relay until either side closes.

Every failure of one client (a failed TLS handshake included) is caught in its own task and logged; the
accept loop never sees it. A TLS client's session keeps the task pumps: the reactor relays raw socket
bytes, and a TLS socket carries records only the ``SSLStream`` can read (atlas.proxy.reactor).
Shutdown (the ``shutdown`` event) stops accepting, asks every session to close with 1001, waits up to
``drain_timeout`` for them to finish, then cancels whatever is left.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import attrs
import trio

from atlas.errors import HandshakeError, StartupError
from atlas.proxy.admission import check_origin
from atlas.proxy.frames import CloseCode, FrameScanner
from atlas.proxy.handshake import (
    BackendHandshake,
    UpgradeRequest,
    accept_response,
    backend_request,
    backend_target,
    client_request_part,
    open_backend_request,
    receive_upgrade,
    reject_response,
)
from atlas.proxy.reactor import PrependedStream, RateLimiter, Reactor, close_now, send_all, serve_reactor
from atlas.proxy.session import BackendLink, ClientSession, Ending
from atlas.proxy.tap import SkimTaps
from atlas.world import Vec3

if TYPE_CHECKING:
    from atlas.pool import Backend
    from atlas.runtime import Runtime

__all__ = ["ProxyListening", "fail_over_backend", "handle_client", "serve_proxy"]

log = logging.getLogger("atlas.proxy")


@attrs.frozen
class ProxyListening:
    """Reported by :func:`serve_proxy` once it accepts: the bound ``(host, port)`` addresses."""

    addresses: tuple[tuple[str, int], ...]
    tls: bool = False
    """Whether clients connect with TLS (``wss://``)."""

    @property
    def scheme(self) -> str:
        """``wss`` with TLS, else ``ws``."""
        return "wss" if self.tls else "ws"

    @property
    def port(self) -> int:
        """The bound port (the same on every address)."""
        return self.addresses[0][1]


def _peer(stream: trio.SocketStream) -> tuple[str, str]:
    """``(ip, "ip:port")`` of the client, ``[v6]:port`` for IPv6."""
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "unknown", "unknown"
    host, port = address[0], address[1]
    text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return host, text


#: Metric label of each refusal status.
_REFUSAL_REASONS = {
    502: "backend_failed",
    503: "unavailable",
    504: "handshake_timeout",
    401: "unauthorized",
    403: "forbidden_origin",
    429: "ip_limit",
    426: "not_websocket",
    405: "bad_request",
    400: "bad_request",
    431: "bad_request",
}


#: Refusals whose answer carries ``Retry-After``.
_RETRY_LATER = frozenset((503, 429))


async def _refuse(stream: trio.abc.Stream, exc: HandshakeError, retry_after: int) -> None:
    retry = retry_after if exc.status in _RETRY_LATER else None
    data = reject_response(exc.status, exc.reason, retry_after=retry)
    with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(data)


async def _connect_backend(
    runtime: Runtime,
    request: UpgradeRequest,
    *,
    client_ip: str,
    client_id: str,
    exclude: frozenset[str] = frozenset(),
    client_secure: bool = False,
) -> tuple[Backend, BackendLink]:
    """Open a link to the best available backend, trying others within the attempt budget.

    The chosen backend is acquired in the pool (its connection count includes this client); the caller
    releases it when the client leaves. Raises :class:`HandshakeError` 503 or 502.
    """
    config = runtime.proxy
    pool = runtime.pool
    tried: set[str] = set(exclude)
    last_error = "no backend available"
    preferred = _spawn_backend(runtime) if not exclude else None
    for _ in range(config.connect_attempts):
        if preferred is not None and preferred.available and preferred.name not in tried:
            backend: Backend | None = preferred
        else:
            backend = pool.choose(exclude=tried)
        if backend is None:
            break
        tried.add(backend.name)
        pool.acquire(backend)
        try:
            link = await _open_link(
                runtime, backend, request, client_ip, client_id, client_secure=client_secure
            )
        except HandshakeError as exc:
            runtime.release(backend)
            last_error = f"{backend.name}: {exc.reason}"
            log.warning("backend %s failed for client %s: %s", backend.name, client_id, exc.reason)
            continue
        except BaseException:
            runtime.release(backend)
            raise
        return backend, link
    if tried == exclude:
        raise HandshakeError(503, "no game server can take a new player right now")
    raise HandshakeError(502, f"no game server answered ({last_error})")


def _spawn_backend(runtime: Runtime) -> Backend | None:
    """With ``[world] spawn = "region"``: the owner of the spawn point's region, if it is a backend."""
    world = runtime.config.world
    if world.spawn != "region":
        return None
    owner = runtime.world.spawn_owner(Vec3(*world.spawn_point), nearest=world.spawn_nearest)
    return runtime.pool.get(owner) if owner is not None else None


@attrs.define(eq=False)
class _Links:
    """The :class:`~atlas.proxy.session.LinkProvider` of one client: its request, its runtime."""

    runtime: Runtime
    request: UpgradeRequest
    client_ip: str
    client_id: str
    client_secure: bool = False
    """The client came over TLS: backends are told ``X-Forwarded-Proto: https``."""

    async def open_link(self, exclude: frozenset[str]) -> BackendLink:
        async def connect() -> BackendLink:
            _backend, link = await _connect_backend(
                self.runtime,
                self.request,
                client_ip=self.client_ip,
                client_id=self.client_id,
                exclude=exclude,
                client_secure=self.client_secure,
            )
            return link

        transfers = self.runtime.transfers
        if transfers is None:
            return await connect()
        # A failover runs through the transfer coordinator: its bookkeeping, its one-per-client rule.
        return await transfers.fail_over(self.client_id, ",".join(sorted(exclude)), connect)

    async def open_link_to(self, backend: Backend, *, transfer: str, subprotocol: str | None) -> BackendLink:
        if not backend.available:
            raise HandshakeError(503, f"{backend.name} cannot take a client now ({backend.state.value})")
        self.runtime.pool.acquire(backend)
        try:
            link = await _open_link(
                self.runtime,
                backend,
                self.request,
                self.client_ip,
                self.client_id,
                transfer=transfer,
                client_secure=self.client_secure,
            )
        except BaseException:
            self.runtime.release(backend)
            raise
        if link.subprotocol != subprotocol:
            await trio.aclose_forcefully(link.stream)
            self.runtime.release(backend)
            raise HandshakeError(502, f"{backend.name} chose another subprotocol ({link.subprotocol})")
        return link

    def link_closed(self, link: BackendLink) -> None:
        self.runtime.release(link.backend)
        if link.abnormal:
            self.runtime.health.abnormal_close(link.backend)

    def failed_over(self, session: ClientSession, old: BackendLink, new: BackendLink | None) -> None:
        metrics = self.runtime.metrics
        metrics.failovers.labels("moved" if new is not None else "closed").inc()
        if self.runtime.transfers is not None:
            return  # the coordinator logged it, as a transfer with reason failover
        if new is None:
            log.warning(
                "client %s lost %s and no game server can take it: closing with 1013",
                session.client_id,
                old.backend.name,
                extra={"client": session.client_id, "server": old.backend.name, "event": "failover"},
            )
            return
        log.info(
            "client %s failed over from %s to %s",
            session.client_id,
            old.backend.name,
            new.backend.name,
            extra={
                "client": session.client_id,
                "server": new.backend.name,
                "from_server": old.backend.name,
                "event": "failover",
            },
        )


def fail_over_backend(runtime: Runtime, backend: Backend) -> int:
    """Move every live client of ``backend`` elsewhere (it died or was ejected); returns how many."""
    moved = 0
    for session in runtime.clients:
        if session.link.backend is backend:
            session.fail_over()
            moved += 1
    return moved


async def _open_link(
    runtime: Runtime,
    backend: Backend,
    request: UpgradeRequest,
    client_ip: str,
    client_id: str,
    *,
    transfer: str | None = None,
    client_secure: bool = False,
) -> BackendLink:
    """Open one backend link within ``connect_timeout``; raise :class:`HandshakeError` on failure.

    A link opened for a transfer carries ``X-Atlas-Transfer``; one for a TLS client says
    ``X-Forwarded-Proto: https``. Connect and handshake outcomes are the passive health signals of the
    backend.
    """
    try:
        link = await _handshake_backend(
            runtime, backend, request, client_ip, client_id, transfer, client_secure=client_secure
        )
    except HandshakeError:
        runtime.health.connect_failed(backend)
        raise
    runtime.health.connect_succeeded(backend)
    return link


async def _handshake_backend(
    runtime: Runtime,
    backend: Backend,
    request: UpgradeRequest,
    client_ip: str,
    client_id: str,
    transfer: str | None,
    *,
    client_secure: bool,
) -> BackendLink:
    config = runtime.proxy
    data, key = backend_request(
        backend_target(backend.path, request.target),
        host=backend.host,
        port=backend.port,
        secure=backend.secure,
        client_part=client_request_part(request, client_ip, client_id, client_secure=client_secure),
        extra=[(b"x-atlas-transfer", transfer.encode("ascii"))] if transfer else (),
    )
    shake: BackendHandshake | None = None
    with trio.move_on_after(config.connect_timeout):
        shake = await open_backend_request(
            backend.host,
            backend.port,
            data,
            key,
            ssl_context=runtime.backend_ssl_context() if backend.secure else None,
        )
    if shake is None:
        raise HandshakeError(502, "connect timed out")
    if shake.subprotocol is not None and shake.subprotocol not in request.subprotocols:
        await trio.aclose_forcefully(shake.stream)
        raise HandshakeError(502, "chose a subprotocol the client did not offer")
    scanner = FrameScanner(
        masked=False,
        max_message_size=config.max_message_size,
        validate_utf8=config.validate_utf8,
    )
    stream: trio.abc.Stream = shake.stream
    if shake.trailing:
        # The backend spoke first, right behind its 101: keep those frames for the relay.
        stream = PrependedStream(shake.stream, shake.trailing)
    return BackendLink(backend=backend, stream=stream, scanner=scanner, subprotocol=shake.subprotocol)


async def handle_client(
    runtime: Runtime, stream: trio.SocketStream, taps: SkimTaps | None = None, reactor: Reactor | None = None
) -> None:
    """Serve one accepted connection from its upgrade request to its last byte.

    With a ``reactor``, the session lends its plain-socket directions to it (atlas.proxy.reactor).
    """
    taps = taps if taps is not None else SkimTaps(runtime)
    client_ip, peer = _peer(stream)
    limiter = runtime.ip_limiter
    if limiter is None:
        await _serve_client(runtime, stream, taps, reactor, client_ip, peer, over_limit=False)
        return
    # Counted from now to the end, handshake and refusal included ([proxy] max_connections_per_ip).
    within = limiter.acquire(client_ip)
    try:
        await _serve_client(runtime, stream, taps, reactor, client_ip, peer, over_limit=not within)
    finally:
        limiter.release(client_ip)


async def _serve_client(
    runtime: Runtime,
    stream: trio.SocketStream,
    taps: SkimTaps,
    reactor: Reactor | None,
    client_ip: str,
    peer: str,
    *,
    over_limit: bool,
) -> None:
    """:func:`handle_client` once the client is counted: both handshakes, then the session."""
    clients = runtime.clients
    client_id = clients.new_id()
    started = trio.current_time()
    runtime.handshaking += 1
    try:
        accepted = await _handshake(
            runtime, stream, client_id=client_id, client_ip=client_ip, peer=peer, over_limit=over_limit
        )
    finally:
        runtime.handshaking -= 1
    if accepted is None:
        return
    request, link, pending, client = accepted
    config = runtime.proxy
    session = ClientSession(
        client_id=client_id,
        peer=peer,
        client_stream=client,
        link=link,
        provider=_Links(runtime, request, client_ip, client_id, client_secure=client is not stream),
        failover=runtime.config.failover,
        max_message_size=config.max_message_size,
        validate_utf8=config.validate_utf8,
        close_timeout=config.close_timeout,
        pending=pending,
        reactor=reactor,
        player_id=request.player_id,
        rate_limit=RateLimiter(config.message_rate, config.message_burst) if config.message_rate else None,
    )
    clients.add(session)
    taps.attach(session)
    handshake = trio.current_time() - started
    runtime.metrics.accepted.inc()
    runtime.metrics.handshake_seconds.observe(handshake)
    log.info(
        "client %s connected from %s -> %s (handshake %.1f ms)",
        client_id,
        peer,
        link.backend.name,
        handshake * 1000,
        extra={"client": client_id, "peer": peer, "server": link.backend.name, "event": "connect"},
    )
    if not runtime.accepting:
        # The drain began while this client was handshaking: it must not miss its Close.
        session.close(CloseCode.GOING_AWAY, "server shutting down")
    ending: Ending | None = None
    try:
        ending = await session.run()
    finally:
        clients.discard(client_id)
        taps.detach(session)
        how = f"{ending.kind.value} {ending.code} {ending.reason}" if ending else "cancelled"
        log.info(
            "client %s disconnected from %s: %s (messages %d up / %d down)",
            client_id,
            session.link.backend.name,
            how.rstrip(),
            session.messages_up,
            session.messages_down,
            extra={"client": client_id, "server": session.link.backend.name, "event": "disconnect"},
        )


async def _handshake(
    runtime: Runtime,
    stream: trio.SocketStream,
    *,
    client_id: str,
    client_ip: str,
    peer: str,
    over_limit: bool = False,
) -> tuple[UpgradeRequest, BackendLink, bytes, trio.abc.Stream] | None:
    """All handshakes within ``handshake_timeout``: the link, the client's early bytes and stream, or None.

    With ``[proxy] tls_cert`` the client's stream is a server-side ``trio.SSLStream`` over ``stream``,
    its TLS handshake the first of the handshakes. Every refusal is answered (when there is someone to
    answer), logged and counted here; the client stream is closed on every path that returns None.
    """
    config = runtime.proxy
    clients = runtime.clients
    request: UpgradeRequest | None = None
    refusal: HandshakeError | None = None
    client: trio.abc.Stream = stream
    tls = runtime.client_ssl
    awaited = "TLS handshake" if tls is not None else "upgrade request"
    try:
        # trio.fail_after without its generator-based context manager: past the deadline the scope
        # swallows the Cancelled and the TooSlowError below is raised.
        with trio.CancelScope(deadline=trio.current_time() + config.handshake_timeout):
            if tls is not None:
                client = await _tls_handshake(stream, tls, client_id=client_id, peer=peer)
                awaited = "upgrade request"
            request, pending = await receive_upgrade(client)
            if not runtime.accepting:
                raise HandshakeError(503, "Atlas is shutting down")
            if over_limit:
                raise HandshakeError(429, "too many connections from your address")
            if runtime.origins is not None:
                check_origin(request, runtime.origins)
            if runtime.verifier is not None:
                request = runtime.verifier.verify(request)  # 401 before any backend is contacted
            # Clients still handshaking count too, or a burst could overshoot the limit.
            if len(clients) + runtime.handshaking > config.max_connections:
                raise HandshakeError(503, "too many connections")
            backend, link = await _connect_backend(
                runtime, request, client_ip=client_ip, client_id=client_id, client_secure=tls is not None
            )
            try:
                await send_all(client, accept_response(request, subprotocol=link.subprotocol))
            except BaseException:
                runtime.release(backend)
                await trio.aclose_forcefully(link.stream)
                raise
            return request, link, pending, client
        raise trio.TooSlowError
    except HandshakeError as exc:
        refusal = exc if exc.status else None
    except trio.TooSlowError:
        if request is not None:
            refusal = HandshakeError(504, "handshake timed out")
        else:
            log.info(
                "client %s from %s: no %s within %.1f s",
                client_id,
                peer,
                awaited,
                config.handshake_timeout,
                extra={"client": client_id, "peer": peer, "event": "refused", "status": 408},
            )
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    if refusal is not None:
        clients.refused_total += 1
        runtime.metrics.refused.labels(_REFUSAL_REASONS.get(refusal.status, "bad_request")).inc()
        log.info(
            "client %s from %s refused: %d %s",
            client_id,
            peer,
            refusal.status,
            refusal.reason,
            extra={"client": client_id, "peer": peer, "event": "refused", "status": refusal.status},
        )
        await _refuse(client, refusal, config.retry_after)
    if not close_now(client):
        await trio.aclose_forcefully(client)
    return None


async def _tls_handshake(
    stream: trio.SocketStream, context: ssl.SSLContext, *, client_id: str, peer: str
) -> trio.SSLStream[trio.SocketStream]:
    """The server side of a client's TLS handshake (the caller bounds it).

    A failure (plain HTTP to the TLS port, a client that does not trust the certificate, ...) is logged
    once at INFO and raised as :class:`HandshakeError` with status 0: nothing can be answered.
    ``https_compatible``: clients commonly end TLS without ``close_notify``; that is an EOF, not an error.
    """
    client = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
    try:
        await client.do_handshake()
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        cause = exc.__cause__
        reason = getattr(cause, "reason", None) or str(cause or exc) or type(exc).__name__
        log.info(
            "client %s from %s: TLS handshake failed: %s",
            client_id,
            peer,
            reason,
            extra={"client": client_id, "peer": peer, "event": "tls_failed"},
        )
        raise HandshakeError(0, "TLS handshake failed") from None
    return client


async def _sweep_idle(runtime: Runtime) -> None:
    """Close sessions that moved no byte either way for ``idle_timeout`` seconds.

    One task for all sessions, comparing activity counters between sweeps: the relay pays nothing.
    """
    timeout = runtime.proxy.idle_timeout
    if timeout <= 0:
        return
    period = min(timeout / 4, 5.0)
    last: dict[str, tuple[int, float]] = {}
    while True:
        await trio.sleep(period)
        now = trio.current_time()
        seen: dict[str, tuple[int, float]] = {}
        for session in runtime.clients:
            activity = session.activity()
            previous = last.get(session.client_id)
            since = previous[1] if previous is not None and previous[0] == activity else now
            if now - since >= timeout:
                session.close(CloseCode.GOING_AWAY, "idle timeout")
            seen[session.client_id] = (activity, since)
        last = seen


async def serve_proxy(
    runtime: Runtime,
    *,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[ProxyListening] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept and relay clients until ``shutdown`` is set, then drain and return.

    Reports :class:`ProxyListening` once the sockets accept. Raises :class:`StartupError` (one line)
    when the listen address cannot be bound.
    """
    address = runtime.proxy.listen_address
    try:
        listeners = await trio.open_tcp_listeners(address.port, host=address.host or None)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise StartupError(f"cannot listen on {address}: {reason}") from None
    bound = tuple((str(lst.socket.getsockname()[0]), int(lst.socket.getsockname()[1])) for lst in listeners)
    listening = ProxyListening(bound, tls=runtime.client_ssl is not None)

    taps = SkimTaps(runtime)

    async def guarded(stream: trio.SocketStream) -> None:
        try:
            await handle_client(runtime, stream, taps, reactor)
        except Exception:
            # One client's bug must never take the listener down.
            log.exception("unexpected error in a client session")
        finally:
            close_now(stream)

    async with trio.open_nursery() as listener_nursery:
        reactor: Reactor = await listener_nursery.start(serve_reactor)
        accept_scope = trio.CancelScope()

        async def accept_loops() -> None:
            with accept_scope:
                async with trio.open_nursery() as loops:
                    for listener in listeners:
                        loops.start_soon(_accept_clients, listener, listener_nursery, guarded)

        listener_nursery.start_soon(accept_loops)
        listener_nursery.start_soon(_sweep_idle, runtime)
        scheme = listening.scheme
        log.info("listening on %s", ", ".join(f"{scheme}://{h}:{p}" for h, p in bound))
        task_status.started(listening)
        await shutdown.wait()
        runtime.accepting = False
        accept_scope.cancel()
        await _drain(runtime)
        listener_nursery.cancel_scope.cancel()


#: Accept errors that concern one connection only (trio's list): skipped.
_SKIPPED_ACCEPT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM",
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "ENOSR",
        "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT",
        "ETIMEDOUT",
        "ECONNRESET",
    )
    if hasattr(errno, name)
)
#: Accept errors that say the process or the system is out of something: wait a moment, then go on.
_CAPACITY_ACCEPT_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS))
#: Connections accepted per wake-up at most, before the loop waits (and so yields) again.
_ACCEPT_BATCH = 64


async def _accept_clients(
    listener: trio.SocketListener,
    nursery: trio.Nursery,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
) -> None:
    """Accept connections on ``listener`` until cancelled; start ``handler(stream)`` in ``nursery`` for each.

    ``trio.serve_listeners`` without its costs per connection: each wake-up takes every connection
    waiting (up to ``_ACCEPT_BATCH``) with plain non-blocking ``accept`` calls, and the handler owns its
    stream (it closes it; no ``aclose_forcefully`` wrapper task step). Errors are treated as trio
    does: one connection's are skipped, running out of descriptors or memory is logged and retried
    after 0.1 s, anything else ends the loop. The listening socket is closed when the loop ends.
    """
    trio_socket = listener.socket
    sock = socket.socket(trio_socket.family, trio_socket.type, trio_socket.proto, fileno=trio_socket.detach())
    sock.setblocking(False)
    try:
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(_ACCEPT_BATCH):
                try:
                    conn, _address = sock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _SKIPPED_ACCEPT_ERRNOS:
                        continue
                    if exc.errno not in _CAPACITY_ACCEPT_ERRNOS:
                        raise
                    log.error(
                        "accept failed: %s (%s); retrying in 0.1 s",
                        errno.errorcode[exc.errno],
                        os.strerror(exc.errno),
                    )
                    await trio.sleep(0.1)
                    break
                nursery.start_soon(handler, trio.SocketStream(trio.socket.from_stdlib_socket(conn)))
    finally:
        trio.lowlevel.notify_closing(sock)
        sock.close()


async def _drain(runtime: Runtime) -> None:
    """Ask every session to close with 1001 and wait up to ``drain_timeout`` for them to finish."""
    sessions = list(runtime.clients)
    log.info("draining %d client(s), deadline %.1f s", len(sessions), runtime.proxy.drain_timeout)
    for session in sessions:
        session.close(CloseCode.GOING_AWAY, "server shutting down")
    with trio.move_on_after(runtime.proxy.drain_timeout):
        await runtime.clients.wait_empty()
    left = len(runtime.clients)
    if left:
        log.warning("drain deadline passed with %d client(s) left; cancelling them", left)
