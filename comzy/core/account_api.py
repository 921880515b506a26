"""The account API's shared vocabulary: its paths, its error codes and its one error document.

The account API is what ``comzy login``, ``comzy status`` and ``comzy aliases`` call, as plain
HTTP on the agent listener (docs/agent_api.md is its reference). The core answers
``GET /api/v1/status``; a plugin that keeps user accounts (auth_token, or any third-party one)
serves the rest through the ``agent_routes`` hook. The server's side and the stock agent both
import this module, so they agree on names without either knowing the other's code.

Every error answer, whoever sends it, is ``{"error": {"code": CODE, "message": TEXT}}`` with the
HTTP status that goes with the code. Clients decide what to do by the status and the code, and
show the message as it is: the wording may change, the codes do not.
"""

from __future__ import annotations

import enum
from typing import Any

#: The server's software and protocol (built into the core).
STATUS_PATH = "/api/v1/status"
#: Who the bearer token belongs to, and the aliases they own.
ME_PATH = "/api/v1/me"
#: The aliases the bearer token's user owns; ``DELETE ALIASES_PATH/NAME`` releases one.
ALIASES_PATH = "/api/v1/aliases"


class ErrorCode(enum.StrEnum):
    """The error codes of the account API, each with its HTTP status."""

    BAD_REQUEST = "bad_request"  #: 400: the request is not one the API can read
    UNAUTHORIZED = "unauthorized"  #: 401: no token, or one the server does not accept
    NOT_FOUND = "not_found"  #: 404: the path is served, the thing it names is not there
    NO_API = "no_api"  #: 404: nothing on this server serves the path (no accounts plugin)
    METHOD_NOT_ALLOWED = "method_not_allowed"  #: 405
    TOO_LARGE = "too_large"  #: 413: the request body is over 64 KiB
    THROTTLED = "throttled"  #: 429: too many failures from this address; see Retry-After
    INTERNAL = "internal"  #: 500: the server failed; its log says why
    UNAVAILABLE = "unavailable"  #: 503: try again later (a database down, a plugin too slow)

    @property
    def status(self) -> int:
        """The HTTP status that goes with this code."""
        return _STATUS[self]


_STATUS = {
    ErrorCode.BAD_REQUEST: 400, ErrorCode.UNAUTHORIZED: 401, ErrorCode.NOT_FOUND: 404, ErrorCode.NO_API: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405, ErrorCode.TOO_LARGE: 413, ErrorCode.THROTTLED: 429,
    ErrorCode.INTERNAL: 500, ErrorCode.UNAVAILABLE: 503,
}


def error_document(code: ErrorCode, message: str) -> dict[str, Any]:
    """The body of an error answer: ``{"error": {"code": ..., "message": ...}}``."""
    return {"error": {"code": str(code), "message": message}}


def read_error(document: Any) -> tuple[str, str] | None:
    """``(code, message)`` of an error answer's body, or None when it holds no error.

    A server of an earlier Comzy answered ``{"error": "message"}``: its code reads as ``""``.
    """
    if not isinstance(document, dict) or "error" not in document:
        return None
    error = document["error"]
    if isinstance(error, dict):
        return str(error.get("code") or ""), str(error.get("message") or "")
    return "", str(error)
