"""A small synchronous client of the admin API (what ``atlas status``, ``servers``, ... use).

Every failure is an `AdminError` whose message is one line fit for a terminal: an unreachable
server, a refused token, or the API's own ``{"error": ...}`` message.
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import quote

import httpx

__all__ = ["DEFAULT_ADMIN_URL", "TRANSFER_TIMEOUT", "AdminClient", "AdminError", "AdminUnreachableError"]

#: Where the ops server listens by default (``[admin] listen``).
DEFAULT_ADMIN_URL: Final = "http://127.0.0.1:9001"

#: Seconds to wait for the answer to a transfer call: it comes when the transfer ended, and Atlas
#: bounds that by ``[transfer] timeout`` plus a few seconds.
TRANSFER_TIMEOUT: Final = 60.0


class AdminError(Exception):
    """The admin API could not be used; ``str()`` is one line, ``status`` the HTTP status if any."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AdminUnreachableError(AdminError):
    """Nothing answered at the admin URL (refused, timed out, unknown host)."""


def _segment(value: str) -> str:
    return quote(value, safe="")


class AdminClient:
    """Calls to one ops server. Use it as a context manager, or call `close`.

    ``token`` is sent as ``Authorization: Bearer <token>``; ``transport`` is for tests.
    """

    def __init__(
        self,
        url: str = DEFAULT_ADMIN_URL,
        *,
        token: str | None = None,
        timeout: float = 5.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._timeout = timeout
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            self._http = httpx.Client(
                base_url=self.url, headers=headers, timeout=timeout, transport=transport
            )
        except (httpx.InvalidURL, ValueError) as exc:
            raise AdminError(f"invalid admin URL {url!r}: {exc}") from None

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- the calls -----------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /health`` (answers even while draining, with ``"status": "draining"``)."""
        result: dict[str, Any] = self._call("GET", "/health", accept={200, 503})
        return result

    def status(self) -> dict[str, Any]:
        """``GET /api/v1/status``."""
        result: dict[str, Any] = self._call("GET", "/api/v1/status")
        return result

    def servers(self) -> list[dict[str, Any]]:
        """``GET /api/v1/servers``."""
        result: list[dict[str, Any]] = self._call("GET", "/api/v1/servers")
        return result

    def server(self, name: str) -> dict[str, Any]:
        """``GET /api/v1/servers/{name}``."""
        result: dict[str, Any] = self._call("GET", f"/api/v1/servers/{_segment(name)}")
        return result

    def add_server(
        self,
        name: str,
        url: str,
        *,
        capacity: int | None = None,
        weight: int | None = None,
        tags: list[str] | None = None,
    ) -> dict[str, Any]:
        """``POST /api/v1/servers``."""
        body: dict[str, Any] = {"name": name, "url": url}
        optional = {"capacity": capacity, "weight": weight, "tags": tags}
        body.update({key: value for key, value in optional.items() if value is not None})
        result: dict[str, Any] = self._call("POST", "/api/v1/servers", json=body)
        return result

    def drain(self, name: str) -> dict[str, Any]:
        """``POST /api/v1/servers/{name}/drain``."""
        result: dict[str, Any] = self._call("POST", f"/api/v1/servers/{_segment(name)}/drain")
        return result

    def remove_server(self, name: str) -> dict[str, Any]:
        """``DELETE /api/v1/servers/{name}``: drain, then removed once empty."""
        result: dict[str, Any] = self._call("DELETE", f"/api/v1/servers/{_segment(name)}")
        return result

    def clients(self) -> list[dict[str, Any]]:
        """``GET /api/v1/clients``."""
        result: list[dict[str, Any]] = self._call("GET", "/api/v1/clients")
        return result

    def client(self, client_id: str) -> dict[str, Any]:
        """``GET /api/v1/clients/{id}``."""
        result: dict[str, Any] = self._call("GET", f"/api/v1/clients/{_segment(client_id)}")
        return result

    def close_client(self, client_id: str, *, code: int = 1000, reason: str = "") -> dict[str, Any]:
        """``DELETE /api/v1/clients/{id}`` with a close code and reason."""
        result: dict[str, Any] = self._call(
            "DELETE", f"/api/v1/clients/{_segment(client_id)}", json={"code": code, "reason": reason}
        )
        return result

    def transfer(self, client_id: str, server: str, *, reason: str = "admin") -> dict[str, Any]:
        """``POST /api/v1/clients/{id}/transfer``: move a client and return the outcome.

        A transfer that ran and rolled back is an outcome too (``"outcome": "rolled_back"``, HTTP 409),
        returned like a committed one; a refusal (already moving, unknown server, ...) is an `AdminError`.
        """
        path = f"/api/v1/clients/{_segment(client_id)}/transfer"
        body = {"to": server, "reason": reason}
        timeout = max(self._timeout, TRANSFER_TIMEOUT)
        response = self._request("POST", path, json=body, accept={200, 409}, timeout=timeout)
        answer = _json(response, self.url, path)
        if response.status_code == 409 and not (isinstance(answer, dict) and "outcome" in answer):
            raise AdminError(f"{_error_message(response)} (HTTP 409)", status=409)
        result: dict[str, Any] = answer
        return result

    def transfers(self) -> list[dict[str, Any]]:
        """``GET /api/v1/transfers``: the transfers under way."""
        result: list[dict[str, Any]] = self._call("GET", "/api/v1/transfers")
        return result

    def metrics(self) -> str:
        """``GET /metrics``: Prometheus text."""
        return self._request("GET", "/metrics", accept={200}).text

    # -- plumbing ------------------------------------------------------------------------------------

    def _call(self, method: str, path: str, *, json: Any = None, accept: set[int] | None = None) -> Any:
        response = self._request(method, path, json=json, accept=accept)
        return _json(response, self.url, path)

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        accept: set[int] | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        try:
            if timeout is None:
                response = self._http.request(method, path, json=json)
            else:
                response = self._http.request(method, path, json=json, timeout=timeout)
        except httpx.TransportError as exc:
            reason = str(exc) or type(exc).__name__
            raise AdminUnreachableError(f"cannot reach the admin API at {self.url}: {reason}") from None
        except httpx.HTTPError as exc:  # an invalid URL and the like
            raise AdminError(f"admin API at {self.url}: {exc}") from None
        status = response.status_code
        if (accept is not None and status in accept) or (accept is None and 200 <= status < 300):
            return response
        message = _error_message(response)
        if status == 401:
            raise AdminError(
                f"the admin API at {self.url} refused the request: {message} "
                "(give --token or set ATLAS_ADMIN_TOKEN)",
                status=status,
            )
        raise AdminError(f"{message} (HTTP {status})", status=status)


def _json(response: httpx.Response, url: str, path: str) -> Any:
    try:
        return response.json()
    except ValueError:
        raise AdminError(
            f"unexpected answer from {url}{path}: HTTP {response.status_code}, not JSON",
            status=response.status_code,
        ) from None


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return response.reason_phrase or f"HTTP {response.status_code}"
