"""Active health probes: one attempt to reach a backend, bounded by a timeout, closing what it opened.

Three kinds (``[health] probe``):

* ``websocket``: TCP connect (+ TLS for ``wss://``), Atlas's own upgrade request with
  ``X-Atlas-Health-Check: 1``, a 101 with the right ``Sec-WebSocket-Accept``, then a masked Close 1000
  and a short, bounded wait for the backend to close;
* ``http``: ``GET path`` (``http://`` for ``ws://`` backends, ``https://`` for ``wss://``); any 2xx or
  3xx status is healthy, redirects are not followed;
* ``tcp``: a TCP connect, closed at once.

`run_probe` never raises for a failing backend: it returns a `ProbeReport` whose result is a success,
a failure (with the reason) or a timeout. Library exceptions stop here.
"""

from __future__ import annotations

import enum
import ssl
from typing import TYPE_CHECKING

import attrs
import httpx
import trio
from wsproto.utilities import generate_nonce

from atlas.config import ProbeKind
from atlas.errors import AtlasError, HandshakeError
from atlas.proxy.frames import CloseCode, build_close
from atlas.proxy.handshake import backend_target, open_backend

if TYPE_CHECKING:
    from atlas.pool import Backend

__all__ = ["HEALTH_CHECK_HEADER", "ProbeReport", "ProbeResult", "probe_headers", "probe_target", "run_probe"]

#: The header every probe carries, so a backend can tell probes from players (and not log them).
HEALTH_CHECK_HEADER: tuple[bytes, bytes] = (b"x-atlas-health-check", b"1")
_USER_AGENT = b"atlas-health-check"
_RECEIVE_SIZE = 4096


class ProbeResult(enum.Enum):
    """How one probe ended; the values are the ``result`` label of ``atlas_health_checks_total``."""

    SUCCESS = "success"
    FAILURE = "failure"
    TIMEOUT = "timeout"


@attrs.frozen
class ProbeReport:
    """The outcome of one probe."""

    result: ProbeResult
    #: Why it failed ("" on success).
    detail: str = ""


class _ProbeFailed(AtlasError):
    """A probe reached a verdict of failure; the message is the reason."""


def _host_header(backend: Backend) -> bytes:
    host = f"[{backend.host}]" if ":" in backend.host else backend.host
    default_port = 443 if backend.secure else 80
    # Backend.from_url only lets ASCII hosts through, so plain ASCII is the IDNA form as well.
    return (host if backend.port == default_port else f"{host}:{backend.port}").encode("ascii")


def probe_headers(backend: Backend) -> list[tuple[bytes, bytes]]:
    """The headers of the ``websocket`` probe's upgrade request to ``backend``.

    ``Host``, ``Upgrade``, ``Connection``, ``Sec-WebSocket-Version``, a fresh ``Sec-WebSocket-Key``,
    a ``User-Agent`` and `HEALTH_CHECK_HEADER`. Nothing a client would send (no ``X-Forwarded-*``,
    no client id): a probe is not a player.
    """
    return [
        (b"host", _host_header(backend)),
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-version", b"13"),
        (b"sec-websocket-key", generate_nonce()),
        (b"user-agent", _USER_AGENT),
        HEALTH_CHECK_HEADER,
    ]


def probe_target(backend: Backend, path: str) -> bytes:
    """The request target of the ``websocket`` probe: ``path`` under the backend URL's own path.

    The proxy's rule for a client's path (:func:`atlas.proxy.handshake.backend_target`), so the probe
    reaches what a client asking for ``path`` would.
    """
    return backend_target(backend.path, path.encode("utf-8"))


async def _probe_websocket(
    backend: Backend, path: str, ssl_context: ssl.SSLContext | None, close_timeout: float
) -> None:
    try:
        shake = await open_backend(
            backend.host,
            backend.port,
            probe_target(backend, path),
            probe_headers(backend),
            ssl_context=ssl_context,
        )
    except HandshakeError as exc:
        raise _ProbeFailed(exc.reason) from None
    except (trio.BrokenResourceError, OSError) as exc:  # a TLS handshake failure surfaces as these
        raise _ProbeFailed(f"connection failed: {exc}") from None
    # The handshake succeeded: that is the verdict. Closing politely is bounded and shielded, so
    # neither a backend that ignores the Close nor the probe's own timeout can turn it into a failure.
    try:
        with trio.move_on_after(close_timeout, shield=True):
            await shake.stream.send_all(build_close(CloseCode.NORMAL, "health check", mask=True))
            # A server closes TCP after answering the Close (RFC 6455 7.1.1): read until then.
            while await shake.stream.receive_some(_RECEIVE_SIZE):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # gone while closing: the handshake already answered the question
    finally:
        await trio.aclose_forcefully(shake.stream)


async def _probe_http(backend: Backend, path: str, ssl_context: ssl.SSLContext | None) -> None:
    scheme = "https" if backend.secure else "http"
    url = f"{scheme}://{_host_header(backend).decode('ascii')}{path}"
    headers = {
        "user-agent": _USER_AGENT.decode(),
        HEALTH_CHECK_HEADER[0].decode(): HEALTH_CHECK_HEADER[1].decode(),
    }
    # verify: the backends' TLS context; for plain http it is never used, and passing False spares
    # httpx building (and loading a trust store into) a context of its own on every probe. No httpx
    # timeout: run_probe's cancel scope is the one deadline, so a slow answer is always a "timeout".
    verify: ssl.SSLContext | bool = ssl_context if ssl_context is not None else False
    try:
        async with httpx.AsyncClient(
            verify=verify, trust_env=False, follow_redirects=False, timeout=None
        ) as client:
            response = await client.get(url, headers=headers)
    except httpx.HTTPError as exc:
        raise _ProbeFailed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None
    if not 200 <= response.status_code < 400:
        raise _ProbeFailed(f"HTTP {response.status_code}")


async def _probe_tcp(backend: Backend) -> None:
    try:
        stream = await trio.open_tcp_stream(backend.host, backend.port)
    except OSError as exc:
        raise _ProbeFailed(f"cannot connect: {exc.strerror or exc}") from None
    await trio.aclose_forcefully(stream)


async def run_probe(
    kind: ProbeKind,
    backend: Backend,
    *,
    path: str = "/",
    time_limit: float,
    ssl_context: ssl.SSLContext | None = None,
) -> ProbeReport:
    """Probe ``backend`` once with the ``kind`` probe, within ``time_limit`` seconds.

    ``path`` is the request path of the ``websocket`` and ``http`` probes; ``ssl_context`` is used
    for ``wss://`` backends (pass None for ``ws://`` ones). A ``websocket`` probe that completed its
    handshake may spend up to ``time_limit`` more seconds closing politely; that never changes its result.
    Never raises for a failing backend; cancellation passes through, with everything closed.
    """
    with trio.move_on_after(time_limit) as scope:
        try:
            if kind == "websocket":
                await _probe_websocket(backend, path, ssl_context, close_timeout=time_limit)
            elif kind == "http":
                await _probe_http(backend, path, ssl_context)
            else:
                await _probe_tcp(backend)
        except _ProbeFailed as exc:
            return ProbeReport(ProbeResult.FAILURE, str(exc))
    if scope.cancelled_caught:
        return ProbeReport(ProbeResult.TIMEOUT, f"no answer within {time_limit:g} s")
    return ProbeReport(ProbeResult.SUCCESS)
