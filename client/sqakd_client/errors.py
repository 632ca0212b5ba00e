"""Typed errors: one class per HTTP status of the API's answers, each with the API's ``code``.

Every error of the SDK is an ``ApiError`` with a machine-readable ``code``, so that a caller
(the CLI) can print ``exc.code`` whatever went wrong. Errors found on this side of the wire
(the service unreachable, a wait that timed out, a download with the wrong checksum) have
``status_code`` 0.
"""

from __future__ import annotations

from typing import Dict, Optional, Type

import httpx


class ApiError(Exception):
    """A non-2xx answer of the API (or, with ``status_code`` 0, a failure on this side)."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        response: Optional[httpx.Response] = None,
    ) -> None:
        super().__init__(code, message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.response = response

    def __str__(self) -> str:
        where = f" (HTTP {self.status_code})" if self.status_code else ""
        return f"{self.code}: {self.message}{where}"


class BadRequest(ApiError):
    pass


class Unauthorized(ApiError):
    pass


class Forbidden(ApiError):
    pass


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


class PayloadTooLarge(ApiError):
    pass


class InvalidRequest(ApiError):
    """422: the request was understood and refused, e.g. ``invalid_config``."""


class RateLimited(ApiError):
    """429: a quota or the validation line is full; ``Retry-After`` says when to come back."""


class ServiceUnavailable(ApiError):
    pass


class ConnectionFailed(ApiError):
    """The service could not be reached (or the connection broke) after every retry."""

    def __init__(self, message: str) -> None:
        super().__init__(0, "connection_failed", message)


class WaitTimeout(ApiError, TimeoutError):
    """``wait(timeout=...)`` ran out before the job or sweep was final."""

    def __init__(self, message: str) -> None:
        super().__init__(0, "wait_timeout", message)


class ChecksumMismatch(ApiError):
    """A downloaded file's SHA-256 is not the one the API listed (the file was removed)."""

    def __init__(self, message: str) -> None:
        super().__init__(0, "checksum_mismatch", message)


ERRORS_BY_STATUS: Dict[int, Type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: InvalidRequest,
    429: RateLimited,
    503: ServiceUnavailable,
}


def error_from_response(response: httpx.Response) -> ApiError:
    """The typed error of a non-2xx answer, from its ``{"error": {"code", "message"}}`` body
    (or, for a body of another shape, say a proxy's page, the status and the body's start)."""
    code, message = f"http_{response.status_code}", response.text[:300].strip()
    try:
        detail = response.json()["error"]
        code, message = str(detail["code"]), str(detail["message"])
    except (ValueError, KeyError, TypeError):
        pass
    error_class = ERRORS_BY_STATUS.get(response.status_code, ApiError)
    return error_class(response.status_code, code, message or response.reason_phrase, response)
