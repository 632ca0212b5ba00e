"""A job's event log: JSON pages, and Server-Sent Events followed live with resume.

The service numbers a job's events 1, 2, 3, ... and resumes a stream after the id sent as
``Last-Event-ID``; the stream ends once the job is final. ``follow`` reconnects after a cut
connection from the last event it delivered, so nothing is lost or repeated.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional

import httpx

from ._http import Transport, backoff_seconds
from .errors import ConnectionFailed, WaitTimeout

FINAL_JOB_STATUSES = ("succeeded", "failed", "canceled")
PAGE_LIMIT = 500  # the API's largest page
QUIET_STREAM_S = 60.0  # four of the service's keep-alives missed: the connection is dead


@dataclass(frozen=True)
class Event:
    """One entry of a job's event log: ``type`` is ``status``, ``stage``, ``progress``,
    ``metrics``, ``warning``, ``error`` or ``engine`` (README, Following a job)."""

    id: int
    type: str
    data: Dict[str, Any]
    created_at: str

    @classmethod
    def from_json(cls, item: Dict[str, Any]) -> Event:
        return cls(int(item["id"]), str(item["type"]), item.get("data") or {}, item["created_at"])

    @property
    def is_final_status(self) -> bool:
        return self.type == "status" and self.data.get("status") in FINAL_JOB_STATUSES


@dataclass
class SseMessage:
    id: Optional[str]
    event: str
    data: str


def parse_sse(lines: Iterable[str]) -> Iterator[SseMessage]:
    """Messages of a Server-Sent Events stream, given its lines (without line ends). A
    message ends at a blank line: one cut before its blank line is never yielded."""
    event_id: Optional[str] = None
    event = "message"
    data: List[str] = []
    for line in lines:
        if not line:
            if data:
                yield SseMessage(event_id, event, "\n".join(data))
            event_id, event, data = None, "message", []
            continue
        if line.startswith(":"):
            continue  # a comment: the server's keep-alive
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id":
            event_id = value


def events_path(job_id: str) -> str:
    return f"/v1/jobs/{job_id}/events"


def read_pages(transport: Transport, job_id: str, after: int) -> Iterator[Event]:
    """Every event after ``after`` from the JSON pages, oldest first, then stop."""
    while True:
        page = transport.request(
            "GET", events_path(job_id), params={"after": after, "limit": PAGE_LIMIT}
        ).json()
        for item in page["items"]:
            event = Event.from_json(item)
            after = event.id
            yield event
        if not page["has_more"]:
            return


def follow(
    transport: Transport, job_id: str, after: int, deadline: Optional[float] = None
) -> Iterator[Event]:
    """Every event after ``after`` as it happens, until the job is final. A cut connection is
    resumed with ``Last-Event-ID``; ``transport.retries`` cuts in a row without a new event
    raise ``ConnectionFailed``. ``deadline`` (``time.monotonic()``): ``WaitTimeout`` after it."""
    last = after
    failures = 0
    final_seen = False
    while True:
        delivered = False
        headers = {"Accept": "text/event-stream"}
        if last:
            headers["Last-Event-ID"] = str(last)
        try:
            with transport.stream(
                "GET",
                events_path(job_id),
                params={"after": last},
                headers=headers,
                timeout=_stream_timeout(transport, deadline),
            ) as response:
                for message in parse_sse(_lines_until(response.iter_lines(), deadline)):
                    event = Event.from_json(json.loads(message.data))
                    if event.id <= last:
                        continue  # never twice, whatever a server or proxy replays
                    last, delivered = event.id, True
                    final_seen = final_seen or event.is_final_status
                    yield event
            # The service ends a stream once the job is final: unless the final status came
            # through, ask (a proxy may have ended it, or ``after`` was past that event).
            if final_seen or _job_is_final(transport, job_id):
                return
            cut: Exception = ConnectionFailed("the event stream ended before the job was final")
        except httpx.TransportError as exc:  # a cut connection, or silence past the deadline
            cut = exc
        _check_deadline(deadline)
        failures = 0 if delivered else failures + 1
        if failures > transport.retries:
            raise ConnectionFailed(
                f"event stream of job {job_id} cut {failures} times without a new event "
                f"(last: {last}): {str(cut) or type(cut).__name__}"
            )
        time.sleep(backoff_seconds(failures))


def _job_is_final(transport: Transport, job_id: str) -> bool:
    status = transport.request("GET", f"/v1/jobs/{job_id}").json()["status"]
    return status in FINAL_JOB_STATUSES


def _lines_until(lines: Iterable[str], deadline: Optional[float]) -> Iterator[str]:
    for line in lines:
        _check_deadline(deadline)
        yield line


def _check_deadline(deadline: Optional[float]) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise WaitTimeout("the job was not final before the timeout")


def _stream_timeout(transport: Transport, deadline: Optional[float]) -> httpx.Timeout:
    """The client's timeouts, with reads that wait out the service's keep-alives (every 15 s)
    and give up by the deadline, if any."""
    timeout = transport.http.timeout
    read = None if timeout.read is None else max(timeout.read, QUIET_STREAM_S)
    if deadline is not None:
        left = max(0.1, deadline - time.monotonic() + 0.1)
        read = left if read is None else min(read, left)
    return httpx.Timeout(connect=timeout.connect, read=read, write=timeout.write, pool=timeout.pool)
