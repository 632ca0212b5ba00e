"""Errors that are the caller's fault: each carries a stable code, a message and an HTTP status.

The API turns them into ``{"error": {"code": ..., "message": ...}}`` with their status; a worker
that meets one marks the job ``failed`` with the same code and message.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad input from the user: a 4xx, never a 500."""

    status_code: int = 422

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers  # HTTP headers of the answer, e.g. Retry-After with a 429
        if status_code is not None:
            self.status_code = status_code

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class NotFound(InputError):
    """404 ``<what>_not_found`` (``job_not_found``, ``engine_build_not_found``, ...): unknown, or
    another tenant's, which is as unknown."""

    status_code = 404

    def __init__(self, what: str, item_id: str) -> None:
        super().__init__(f"{what.replace(' ', '_')}_not_found", f"no {what} {item_id!r}")


class ModelImportError(InputError):
    """The uploaded model cannot be read, converted or verified."""


class DataImportError(InputError):
    """The uploaded data archive is unsafe, unreadable or holds no images."""


class TooLargeError(InputError):
    status_code = 413


class QuotaExceeded(InputError):
    """The tenant is at one of its quotas (core.settings: max_active_jobs_per_tenant, ...)."""

    status_code = 429
