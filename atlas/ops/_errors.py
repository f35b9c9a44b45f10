"""The one error the admin API raises on purpose: a status code and a one-line message."""

from __future__ import annotations

__all__ = ["ApiError"]


class ApiError(Exception):
    """Answered as ``{"error": message, "status": status}`` with that HTTP status."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers
