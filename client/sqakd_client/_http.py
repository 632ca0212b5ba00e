"""The transport: one httpx client with the base URL and the key, retries with backoff, and the
API's errors as typed exceptions.

Idempotent requests and creates are retried on connection errors, 429 and 503 (honouring
``Retry-After``); a create carries an ``Idempotency-Key``, the same on each of its tries, so
that a retry of a request the server did handle returns the first object instead of a second.
"""

from __future__ import annotations

import email.utils
import random
import time
import uuid
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Mapping, Optional

import httpx

from ._version import __version__
from .errors import ConnectionFailed, error_from_response

RETRY_STATUSES = (429, 503)
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 8.0
# A longer Retry-After (a full job quota says 60 s) is the caller's to wait for, not a hidden
# minutes-long sleep inside one call: the error is raised at once.
RETRY_AFTER_MAX_S = 30.0


def backoff_seconds(attempt: int) -> float:
    """Exponential backoff with jitter: 0.25..0.5 s after the first failure, then twice as
    long each time, at most ``BACKOFF_MAX_S``."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2**attempt)
    return random.uniform(ceiling / 2, ceiling)


def retry_after_seconds(response: httpx.Response) -> Optional[float]:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date), if the answer has one."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Transport:
    """HTTP to one service: ``request`` for JSON answers, ``stream`` for bodies read as they
    come (event streams, downloads). Non-2xx answers raise the ``ApiError`` of their status."""

    def __init__(self, url: str, api_key: Optional[str], timeout: float, retries: int) -> None:
        self.url = url.rstrip("/")
        self.retries = retries
        headers = {"User-Agent": f"sqakd-client/{__version__}", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # Redirects: a download may answer 307 to a presigned URL of the service's bucket
        # (STORAGE_DOWNLOAD_REDIRECT); httpx does not send the API key to another origin.
        self.http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, follow_redirects=True
        )

    def close(self) -> None:
        self.http.close()

    def request(
        self, method: str, path: str, *, retry: bool = True, create: bool = False, **kwargs: Any
    ) -> httpx.Response:
        """The answer, read whole. ``retry``: the request may be sent again (idempotent, or
        made so by ``create``, which adds an Idempotency-Key). ``kwargs`` go to httpx
        (``json``, ``params``, ``files``, ``headers``, ``timeout``)."""
        return self._send(method, path, retry=retry, create=create, stream=False, **kwargs)

    @contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A 2xx answer whose body is read by the caller (``iter_bytes``, ``iter_lines``);
        opening it is retried as ``request`` does, a connection cut later is the caller's."""
        response = self._send(method, path, retry=True, create=False, stream=True, **kwargs)
        try:
            yield response
        finally:
            response.close()

    def _send(
        self,
        method: str,
        path: str,
        *,
        retry: bool,
        create: bool,
        stream: bool,
        headers: Optional[Mapping[str, str]] = None,
        **kwargs: Any,
    ) -> httpx.Response:
        headers = dict(headers or {})
        if create:
            headers["Idempotency-Key"] = str(uuid.uuid4())
        attempt = 0
        while True:
            # Built anew each try: httpx rewinds a multipart upload's file when it sends it.
            request = self.http.build_request(method, path, headers=headers, **kwargs)
            try:
                response = self.http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if not retry or attempt >= self.retries:
                    raise ConnectionFailed(
                        f"{method} {request.url}: {str(exc) or type(exc).__name__}"
                    ) from exc
                time.sleep(backoff_seconds(attempt))
                attempt += 1
                continue
            if response.is_success:
                return response
            response.read()
            response.close()
            wait = self._retry_wait(response, attempt) if retry else None
            if wait is None:
                raise error_from_response(response)
            time.sleep(wait)
            attempt += 1

    def _retry_wait(self, response: httpx.Response, attempt: int) -> Optional[float]:
        """Seconds to wait before trying again after this error answer; None: raise it."""
        if response.status_code not in RETRY_STATUSES or attempt >= self.retries:
            return None
        retry_after = retry_after_seconds(response)
        if retry_after is None:
            return backoff_seconds(attempt)
        return retry_after if retry_after <= RETRY_AFTER_MAX_S else None

    def pages(self, path: str, params: Optional[Dict[str, Any]] = None) -> Iterator[Any]:
        """Every item of a cursor-paged list (``{items, next_cursor}``), page after page."""
        params = dict(params or {})
        while True:
            page = self.request("GET", path, params=params).json()
            yield from page["items"]
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]
