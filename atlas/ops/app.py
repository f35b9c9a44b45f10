"""The ops HTTP application: health, Prometheus metrics, the JSON admin API and Horizon registration.

`create_app` builds a Starlette app over one `Runtime`; `atlas.ops.server.serve_ops` serves it with
hypercorn. Every endpoint and its JSON is documented in ``docs/admin-api.md``.

Access rules:

* ``GET /health`` is always open (load balancers and orchestrators probe it), and so is
  ``GET /dashboard``, a static page that reads the admin API from the browser (with the token, if one is
  set: the page asks for it);
* every other endpoint needs ``Authorization: Bearer <[admin] token>`` when a token is set;
* the Horizon endpoints (register, heartbeat, and ``DELETE`` of a *registered* server) are open when
  ``[admin] allow_registration`` is on, because Horizon sends no token, and answer 404 when it is off.

Every error, including unknown paths, wrong methods and crashes, is JSON:
``{"error": "<one line>", "status": <code>}`` with that status code.
"""

from __future__ import annotations

import functools
import hmac
import http
import importlib.resources
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from atlas.control.coordinator import TransferRefused
from atlas.control.lifecycle import TransferReason
from atlas.ops._errors import ApiError
from atlas.ops._servers import Membership
from atlas.ops._views import client_view, server_view, status_view, transfer_view
from atlas.ops.horizon import (
    HorizonRegistry,
    RegisterOutcome,
    Registration,
    RegistrationError,
    heartbeat_answer,
    registration_answer,
)
from atlas.proxy.frames import CloseCode
from atlas.skim import frame_to_sse

if TYPE_CHECKING:
    from atlas.runtime import Runtime

__all__ = ["MAX_BODY_SIZE", "create_app"]

#: Largest request body accepted, in bytes (answered with 413 beyond).
MAX_BODY_SIZE: Final = 64 * 1024

#: Close codes an operator may use to close a client (besides the private range 4000-4999).
_OPERATOR_CLOSE_CODES: Final = frozenset(
    {
        CloseCode.NORMAL,
        CloseCode.GOING_AWAY,
        CloseCode.POLICY_VIOLATION,
        CloseCode.INTERNAL_ERROR,
        CloseCode.SERVICE_RESTART,
        CloseCode.TRY_AGAIN_LATER,
    }
)
_MAX_REASON_BYTES: Final = 123  # a Close frame's payload is at most 125 bytes, 2 of them the code
#: Seconds an admin transfer call may wait beyond ``[transfer] timeout`` plus ``[proxy] close_timeout``
#: (the coordinator ends every transfer within those; this only bounds the wait if it did not).
_TRANSFER_GRACE: Final = 5.0

Endpoint = Callable[[Request], Awaitable[Response]]


def create_app(runtime: Runtime, *, registry: HorizonRegistry | None = None) -> Starlette:
    """The ops application for ``runtime`` (``[admin]`` settings from ``runtime.config.admin``).

    ``registry`` holds the Horizon registrations (a new, empty one by default); the app keeps it on
    ``app.state.registry``.
    """
    api = _Api(runtime, registry if registry is not None else HorizonRegistry())
    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/dashboard", _dashboard, methods=["GET"]),
        Route("/metrics", api.admin(api.metrics), methods=["GET"]),
        Route("/api/v1/status", api.admin(api.status), methods=["GET"]),
        Route("/api/v1/servers", api.admin(api.list_servers), methods=["GET"]),
        Route("/api/v1/servers", api.admin(api.add_server), methods=["POST"]),
        Route("/api/v1/servers/register", api.registration(api.register), methods=["POST"]),
        Route("/api/v1/servers/{name}", api.admin(api.get_server), methods=["GET"]),
        Route("/api/v1/servers/{name}", api.remove_server, methods=["DELETE"]),
        Route("/api/v1/servers/{name}/drain", api.admin(api.drain_server), methods=["POST"]),
        Route("/api/v1/servers/{name}/heartbeat", api.registration(api.heartbeat), methods=["PUT"]),
        Route("/api/v1/clients", api.admin(api.list_clients), methods=["GET"]),
        Route("/api/v1/clients/{client_id}", api.admin(api.get_client), methods=["GET"]),
        Route("/api/v1/clients/{client_id}", api.admin(api.close_client), methods=["DELETE"]),
        Route("/api/v1/clients/{client_id}/transfer", api.admin(api.transfer_client), methods=["POST"]),
        Route("/api/v1/clients/{client_id}/tap", api.admin(api.tap_client), methods=["GET"]),
        Route("/api/v1/transfers", api.admin(api.list_transfers), methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            Exception: _crash,
        },
    )
    app.state.registry = api.membership.registry
    return app


@functools.cache
def _dashboard_page() -> str:
    return importlib.resources.files("atlas.ops").joinpath("dashboard.html").read_text(encoding="utf-8")


async def _dashboard(_request: Request) -> Response:
    """The live dashboard: one static page; its data comes from the admin API, read by the browser."""
    return HTMLResponse(
        _dashboard_page(),
        headers={
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
            "style-src 'unsafe-inline'; frame-ancestors 'none'",
            "Cache-Control": "no-store",
        },
    )


def _error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


async def _api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error_response(exc.status, exc.message, exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    # Starlette's own refusals: unknown path (404), wrong method (405, with its Allow header).
    assert isinstance(exc, HTTPException)
    phrase = http.HTTPStatus(exc.status_code).phrase
    message = exc.detail if exc.detail != phrase else f"{phrase.lower()}: {request.method} {request.url.path}"
    return _error_response(exc.status_code, message, dict(exc.headers) if exc.headers else None)


async def _crash(_request: Request, _exc: Exception) -> Response:
    # Starlette re-raises the exception after this answer, so the server logs its traceback.
    return _error_response(500, "internal error")


class _Api:
    """The endpoints, over one runtime and its registry of registered servers."""

    def __init__(self, runtime: Runtime, registry: HorizonRegistry) -> None:
        self.runtime = runtime
        self.membership = Membership(runtime, registry)
        admin = runtime.config.admin
        self._token = admin.token.encode("utf-8")
        self._allow_registration = admin.allow_registration
        self._heartbeat_interval = admin.heartbeat_interval
        self._started = time.monotonic()
        self._started_at = time.time()

    # -- access --------------------------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        if not self._token:
            return True
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Constant time, so the token cannot be guessed byte by byte from response times.
        return hmac.compare_digest(credentials.strip().encode("utf-8"), self._token)

    def _require_token(self, request: Request) -> None:
        if not self._authorized(request):
            has_header = "authorization" in request.headers
            reason = "invalid bearer token" if has_header else "missing bearer token"
            raise ApiError(401, reason, headers={"WWW-Authenticate": 'Bearer realm="atlas"'})

    def admin(self, endpoint: Endpoint) -> Endpoint:
        """``endpoint`` behind the bearer token (when one is configured)."""

        async def guarded(request: Request) -> Response:
            self._require_token(request)
            return await endpoint(request)

        return guarded

    def registration(self, endpoint: Endpoint) -> Endpoint:
        """``endpoint`` open to Horizon servers, or 404 when registration is off."""

        async def gated(request: Request) -> Response:
            if not self._allow_registration:
                raise ApiError(404, "server registration is disabled ([admin] allow_registration)")
            return await endpoint(request)

        return gated

    # -- open ----------------------------------------------------------------------------------------

    async def health(self, _request: Request) -> Response:
        """200 while Atlas accepts clients, 503 once it drains."""
        if self.runtime.accepting:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "draining"}, status_code=503)

    # -- metrics and status --------------------------------------------------------------------------

    async def metrics(self, _request: Request) -> Response:
        """Prometheus text exposition of Atlas's registry."""
        return Response(generate_latest(self.runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def status(self, _request: Request) -> Response:
        """Version, uptime, clients and servers at a glance."""
        uptime = time.monotonic() - self._started
        return JSONResponse(status_view(self.runtime, uptime=uptime, started_at=self._started_at))

    # -- servers -------------------------------------------------------------------------------------

    def _server(self, name: str) -> dict[str, Any]:
        membership = self.membership
        return server_view(membership.backend(name), membership.record(name))

    async def list_servers(self, _request: Request) -> Response:
        """Every backend in the pool, in the order they were added."""
        membership = self.membership
        membership.sync()
        registry = membership.registry
        return JSONResponse([server_view(b, registry.get(b.name)) for b in self.runtime.pool])

    async def get_server(self, request: Request) -> Response:
        """One backend."""
        return JSONResponse(self._server(request.path_params["name"]))

    async def add_server(self, request: Request) -> Response:
        """Add a backend (201), validated like a ``[[servers]]`` entry; 409 if the name is taken."""
        body = await _json_object(request)
        backend = self.membership.add(body)
        return JSONResponse(
            self._server(backend.name),
            status_code=201,
            headers={"Location": f"/api/v1/servers/{backend.name}"},
        )

    async def drain_server(self, request: Request) -> Response:
        """Stop sending new clients to a backend; it keeps those it has."""
        backend = self.membership.drain(request.path_params["name"])
        return JSONResponse(self._server(backend.name))

    async def remove_server(self, request: Request) -> Response:
        """Drain a backend and remove it once empty (202); Horizon's unregister call too.

        Open without a token only for a registered server, and only while registration is allowed.
        """
        name: str = request.path_params["name"]
        membership = self.membership
        record = membership.record(name)
        if not (self._allow_registration and record is not None):
            self._require_token(request)
        backend = membership.remove(name)
        view = server_view(backend, record)
        view["removed"] = self.runtime.pool.get(name) is not backend
        return JSONResponse(view, status_code=202)

    # -- Horizon -------------------------------------------------------------------------------------

    async def register(self, request: Request) -> Response:
        """Horizon's registration: 201 for a new server, 200 for an update or a replacement."""
        body = await _json_object(request)
        peer = request.client.host if request.client is not None else None
        try:
            registration = Registration.from_json(body, peer_host=peer)
        except RegistrationError as exc:
            raise ApiError(400, str(exc)) from None
        registered = self.membership.register(registration)
        messages = {
            RegisterOutcome.CREATED: f"registered {registration.name} at {registration.url}",
            RegisterOutcome.UPDATED: f"registration of {registration.name} updated",
            RegisterOutcome.REPLACED: f"{registration.name} re-registered at {registration.url}",
        }
        answer = registration_answer(
            registration,
            message=messages[registered.outcome],
            heartbeat_interval=self._heartbeat_interval,
            adjacent=registered.adjacent,
        )
        status = 201 if registered.outcome is RegisterOutcome.CREATED else 200
        return JSONResponse(answer, status_code=status)

    async def heartbeat(self, request: Request) -> Response:
        """Horizon's heartbeat: recorded; a draining server is told to prepare its shutdown."""
        name: str = request.path_params["name"]
        if self.membership.record(name) is None:
            raise ApiError(404, f"no registered server named {name!r}")
        body = await _json_object(request)
        try:
            draining = self.membership.heartbeat(name, body)
        except RegistrationError as exc:
            raise ApiError(400, str(exc)) from None
        message = "draining: prepare to shut down" if draining else "ok"
        return JSONResponse(heartbeat_answer(message=message, draining=draining))

    # -- clients -------------------------------------------------------------------------------------

    def _session_view(self, client_id: str) -> dict[str, Any]:
        session = self.runtime.clients.get(client_id)
        if session is None:
            raise ApiError(404, f"no client with id {client_id!r}")
        return client_view(session)

    async def list_clients(self, _request: Request) -> Response:
        """Every live client session."""
        return JSONResponse([client_view(s) for s in self.runtime.clients])

    async def get_client(self, request: Request) -> Response:
        """One client session."""
        return JSONResponse(self._session_view(request.path_params["client_id"]))

    async def tap_client(self, request: Request) -> Response:
        """Stream a client's skimmed messages as server-sent events until it leaves (the live tap)."""
        client_id: str = request.path_params["client_id"]
        dispatcher = self.runtime.skim
        if dispatcher is None:
            raise ApiError(503, "skimming is off ([skim] enabled = false)")
        if self.runtime.clients.get(client_id) is None:
            raise ApiError(404, f"no client with id {client_id!r}")

        async def events() -> AsyncIterator[bytes]:
            yield b": tapping " + client_id.encode() + b"\n\n"
            with dispatcher.subscribe(client_id) as frames:
                async for frame in frames:
                    yield frame_to_sse(frame)

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )

    async def close_client(self, request: Request) -> Response:
        """Close a client with a code and reason (JSON body or query); 202, it closes shortly."""
        client_id: str = request.path_params["client_id"]
        session = self.runtime.clients.get(client_id)
        if session is None:
            raise ApiError(404, f"no client with id {client_id!r}")
        options: dict[str, Any] = dict(request.query_params)
        if "code" in options:
            text = options["code"]
            if not (text.isascii() and text.isdigit()):
                raise ApiError(400, f"code: expected an integer, got {text!r}")
            options["code"] = int(text)
        options.update(await _json_object(request, required=False))
        code, reason = _close_options(options)
        session.close(code, reason)
        answer = {"id": client_id, "closing": True, "code": code, "reason": reason}
        return JSONResponse(answer, status_code=202)

    # -- transfers -----------------------------------------------------------------------------------

    async def transfer_client(self, request: Request) -> Response:
        """Move a client to another server and answer with the outcome once it is known.

        200 with the outcome when committed; 409 with the outcome (plus ``error`` and ``status``) when
        rolled back, or with just the reason when refused before it started; 404 for an unknown
        client; 503 when the transfer coordinator is not running.
        """
        client_id: str = request.path_params["client_id"]
        target, reason = _transfer_options(await _json_object(request))
        runtime = self.runtime
        transfers = runtime.transfers
        if transfers is None:
            raise ApiError(503, "transfers are not running")
        if runtime.clients.get(client_id) is None:
            raise ApiError(404, f"no client with id {client_id!r}")
        limit = runtime.config.transfer.timeout + runtime.proxy.close_timeout + _TRANSFER_GRACE
        # No checkpoint between the lookup above and the request (transfer() checks before it awaits).
        with trio.move_on_after(limit):
            try:
                outcome = await transfers.transfer(client_id, target, reason)
            except TransferRefused as exc:
                raise ApiError(409, str(exc)) from None
            answer = outcome.to_json()
            if outcome.committed:
                return JSONResponse(answer)
            answer.update(error=f"transfer rolled back: {outcome.failure}", status=409)
            return JSONResponse(answer, status_code=409)
        raise ApiError(504, f"the transfer of client {client_id} did not end within {limit:g} s")

    async def list_transfers(self, _request: Request) -> Response:
        """The transfers under way (none when the coordinator is not running)."""
        transfers = self.runtime.transfers
        records = list(transfers.active.values()) if transfers is not None else []
        return JSONResponse([transfer_view(record) for record in records])


def _transfer_options(body: dict[str, Any]) -> tuple[str, TransferReason]:
    unknown = sorted(set(body) - {"to", "reason"})
    if unknown:
        raise ApiError(400, f"{unknown[0]}: unknown field")
    if "to" not in body:
        raise ApiError(400, "to: missing required field")
    target = body["to"]
    if not isinstance(target, str) or not target:
        raise ApiError(400, "to: expected a server name")
    reason = body.get("reason", TransferReason.ADMIN.value)
    if not isinstance(reason, str):
        raise ApiError(400, "reason: expected a string")
    try:
        return target, TransferReason(reason)
    except ValueError:
        choices = ", ".join(r.value for r in TransferReason)
        raise ApiError(400, f"reason: must be one of {choices}, got {reason!r}") from None


def _close_options(options: dict[str, Any]) -> tuple[int, str]:
    unknown = sorted(set(options) - {"code", "reason"})
    if unknown:
        raise ApiError(400, f"{unknown[0]}: unknown field")
    code = options.get("code", CloseCode.NORMAL)
    if isinstance(code, bool) or not isinstance(code, int):
        raise ApiError(400, "code: expected an integer")
    if code not in _OPERATOR_CLOSE_CODES and not 4000 <= code <= 4999:
        raise ApiError(400, f"code: must be 1000, 1001, 1008, 1011, 1012, 1013 or 4000-4999, got {code}")
    reason = options.get("reason", "")
    if not isinstance(reason, str):
        raise ApiError(400, "reason: expected a string")
    if len(reason.encode("utf-8")) > _MAX_REASON_BYTES:
        raise ApiError(400, f"reason: at most {_MAX_REASON_BYTES} bytes of UTF-8")
    return int(code), reason


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_SIZE:
        raise ApiError(413, f"request body larger than {MAX_BODY_SIZE} bytes")
    chunks = bytearray()
    async for chunk in request.stream():
        chunks += chunk
        if len(chunks) > MAX_BODY_SIZE:
            raise ApiError(413, f"request body larger than {MAX_BODY_SIZE} bytes")
    return bytes(chunks)


async def _json_object(request: Request, *, required: bool = True) -> dict[str, Any]:
    """The request body as a JSON object; an empty body is ``{}`` unless ``required``."""
    raw = await _read_body(request)
    if not raw.strip():
        if required:
            raise ApiError(400, "expected a JSON object body")
        return {}
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"invalid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "expected a JSON object body")
    return value
