"""The API's one error shape: ``{"error": {"type", "message", "expected", "fix"}}`` with the right HTTP status.

:class:`ApiError` is raised by request handling; :func:`from_input_error` turns the library's
:class:`~medvlm.errors.InputError` (which already says what was expected and how to fix it) into one, choosing
the status: 413 for an image over the pixel limit, 422 otherwise. Messages never contain file names sent by a
client (the server never passes them to the loader) nor DICOM tag values.
"""

from __future__ import annotations

from typing import Any

from medvlm.errors import InputError

__all__ = ["ApiError", "error_payload", "from_input_error"]


class ApiError(Exception):
    """An error answered as JSON with ``status`` (an HTTP status code) and ``kind`` (``error.type``)."""

    def __init__(self, status: int, kind: str, message: str, *, expected: str = "", fix: str = "",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = int(status)
        self.kind = kind
        self.message = message
        self.expected = expected
        self.fix = fix
        self.headers = headers or {}

    def payload(self) -> dict[str, Any]:
        return error_payload(self.kind, self.message, self.expected, self.fix)


def error_payload(kind: str, message: str, expected: str = "", fix: str = "") -> dict[str, Any]:
    """The JSON body of every error response."""
    return {"error": {"type": kind, "message": message, "expected": expected, "fix": fix}}


def from_input_error(exc: InputError, *, status: int | None = None) -> ApiError:
    """An :class:`ApiError` carrying ``exc``'s message, expectation and fix; 413 for the pixel limit, else 422."""
    expected = str(getattr(exc, "expected", "") or "")
    if status is None:
        status = 413 if "(max_pixels)" in expected else 422
    kind = "image_too_large" if status == 413 else "invalid_input"
    return ApiError(status, kind, str(exc), expected=expected, fix=str(getattr(exc, "fix", "") or ""))
