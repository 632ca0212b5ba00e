"""GET /v1/jobs/{id}/events: JSON pages, and Server-Sent Events from a real uvicorn, woken over
the machine's Redis while another thread changes the job through core.jobs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.orm import Session

from api.main import create_app
from core import events, jobs
from core.db import session_factory
from core.models import Job
from core.pipeline import STAGES
from core.settings import Settings
from tests.api.test_auth import KEY_OF_A, KEY_OF_B, KEYS, bearer
from tests.factories import make_job
from tests.utils import SettingsFactory, make_client, served_by_uvicorn, sse_messages

LEASE_S = 60
SSE = {"Accept": "text/event-stream"}


def queued_job(session: Session, tenant: str = "local") -> Job:
    """A job as POST /v1/jobs leaves it: queued, and its log says so."""
    job = make_job(session, tenant=tenant)
    events.record(session, job.id, events.EventType.STATUS, {"status": jobs.JobStatus.QUEUED})
    session.commit()
    return job


def run_job(settings: Settings, job_id: str, *, quiet_s: float = 0.0) -> None:
    """What a worker records, without the training: claim, ``quiet_s`` of silence, each stage,
    a progress event, success."""
    with session_factory(settings)() as session:
        assert jobs.claim_job(session, job_id, "worker", LEASE_S)
        time.sleep(quiet_s)
        for index, stage in enumerate(STAGES):
            previous_seconds = 0.1 if index else None
            assert jobs.report_stage(
                session, job_id, "worker", stage, LEASE_S, previous_seconds=previous_seconds
            )
            if stage == "training":
                progress = {"step": 8, "total_steps": 8}
                assert jobs.report_progress(
                    session, job_id, "worker", progress, LEASE_S, event=True
                )
        assert jobs.succeed(session, job_id, "worker", {}, last_stage_seconds=0.1)


@contextmanager
def in_thread(target: object, *args: object, **kwargs: object) -> Iterator[None]:
    thread = threading.Thread(target=target, args=args, kwargs=kwargs)  # type: ignore[arg-type]
    thread.start()
    try:
        yield
    finally:
        thread.join(30)


@pytest.fixture
def live_settings(make_settings: SettingsFactory, redis_db: str) -> Settings:
    """The machine's Redis as the broker (its pub/sub wakes the streams); a quick heartbeat."""
    return make_settings(broker_url=redis_db, sse_heartbeat_seconds=0.2)


def test_json_pages_follow_after_and_limit(live_settings: Settings) -> None:
    with session_factory(live_settings)() as session:
        job_id = queued_job(session).id
    run_job(live_settings, job_id)  # queued, running, 5 stages, progress, succeeded: 9
    client = make_client(live_settings)

    first = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 4})
    rest = client.get(f"/v1/jobs/{job_id}/events", params={"after": 4, "limit": 500})
    beyond = client.get(f"/v1/jobs/{job_id}/events", params={"after": 9})

    assert first.status_code == 200, first.text
    page = first.json()
    assert [item["id"] for item in page["items"]] == [1, 2, 3, 4]
    assert page["has_more"] is True and page["job_status"] == "succeeded"
    assert page["items"][1] == {
        "id": 2,
        "type": "status",
        "data": {"status": "running", "attempt": 1},
        "created_at": page["items"][1]["created_at"],
    }
    assert page["items"][3]["data"] == {
        "stage": "calibrating",
        "previous": "validating",
        "previous_seconds": 0.1,
    }
    items = rest.json()["items"]
    assert [item["id"] for item in items] == [5, 6, 7, 8, 9] and not rest.json()["has_more"]
    assert [item["type"] for item in items] == ["stage", "progress", "stage", "stage", "status"]
    assert items[-1]["data"]["status"] == "succeeded"
    assert beyond.json() == {"items": [], "has_more": False, "job_status": "succeeded"}
    for bad in ({"limit": 0}, {"limit": 501}, {"after": -1}):
        response = client.get(f"/v1/jobs/{job_id}/events", params=bad)
        assert response.status_code == 422, bad
        assert response.json()["error"]["code"] == "invalid_request"


def test_another_tenants_job_is_404_as_json_and_as_a_stream(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings(api_keys=KEYS)
    with session_factory(settings)() as session:
        job_id = queued_job(session, tenant="tenant-b").id
    client = make_client(settings)

    for accept in ({}, SSE):
        response = client.get(f"/v1/jobs/{job_id}/events", headers=bearer(KEY_OF_A) | accept)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "job_not_found"
    own = client.get(f"/v1/jobs/{job_id}/events", headers=bearer(KEY_OF_B))
    assert [item["data"] for item in own.json()["items"]] == [{"status": "queued"}]


def events_url(port: int, job_id: str) -> str:
    return f"http://127.0.0.1:{port}/v1/jobs/{job_id}/events"


@contextmanager
def served(settings: Settings) -> Iterator[tuple[FastAPI, int]]:
    """The app on a real uvicorn, without its lifespan: the Redis subscriber starts with the
    first stream (as in an app run without it), and shutdown does not wait for the upload
    validation's forkserver."""
    app = create_app(settings, sweeper=False)
    with served_by_uvicorn(app, lifespan="off") as port:
        yield app, port


def test_a_stream_sends_each_event_heartbeats_while_quiet_and_ends_with_the_job(
    live_settings: Settings,
) -> None:
    with session_factory(live_settings)() as session:
        job_id = queued_job(session).id
    with served(live_settings) as (_, port), httpx.Client(timeout=10) as client:
        url = events_url(port, job_id)
        with (
            client.stream("GET", url, headers=SSE) as response,
            in_thread(run_job, live_settings, job_id, quiet_s=1.0),
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            received = list(sse_messages(response.iter_lines()))  # ends when the job does
        # A reconnect that names the last event it saw gets the rest only, then the end.
        resumed = client.get(url, headers=SSE | {"Last-Event-ID": "7"})

    heartbeats = [message for message in received if message.comment is not None]
    sent = [message for message in received if message.comment is None]
    # The second of quiet after the claim, at 0.2 s a heartbeat: a few comments.
    assert len(heartbeats) >= 3 and {m.comment for m in heartbeats} == {"keep-alive"}
    assert [message.id for message in sent] == [str(i) for i in range(1, 10)]
    for message in sent:
        assert message.data is not None
        body = json.loads(message.data)
        assert body.keys() == {"id", "type", "data", "created_at"}
        assert (str(body["id"]), body["type"]) == (message.id, message.event)
    assert [message.event for message in sent][:3] == ["status", "status", "stage"]
    assert json.loads(sent[-1].data or "")["data"]["status"] == "succeeded"
    assert [m.id for m in sse_messages(resumed.text.splitlines())] == ["8", "9"]


def test_followers_are_woken_over_redis_not_by_polling(
    make_settings: SettingsFactory, redis_db: str
) -> None:
    # A 30 s heartbeat: a stream that re-read the database on a timer would see nothing for
    # 30 s; only the Redis message can bring the claim's event within a second.
    settings = make_settings(broker_url=redis_db, sse_heartbeat_seconds=30)
    with session_factory(settings)() as session:
        job_id = queued_job(session).id
    with (
        served(settings) as (app, port),
        httpx.stream("GET", events_url(port, job_id), headers=SSE, timeout=10) as response,
    ):
        messages = sse_messages(response.iter_lines())
        assert next(messages).event == "status"  # queued
        deadline = time.monotonic() + 10
        while not app.state.event_wakeups.subscribed:
            assert time.monotonic() < deadline, "the subscriber never subscribed"
            time.sleep(0.02)
        time.sleep(0.3)  # the stream's re-reads are over: it now waits for a wake-up

        with session_factory(settings)() as session:
            claimed_at = time.monotonic()
            assert jobs.claim_job(session, job_id, "worker", LEASE_S)
        running = next(messages)
        latency = time.monotonic() - claimed_at

        assert (running.event, running.id) == ("status", "2")
        assert latency < 1.0, f"the event took {latency:.2f} s"
        with session_factory(settings)() as session:
            assert jobs.cancel(session, job_id, "worker")
        assert [m.event for m in messages] == ["status"]  # canceled: the stream ends


def test_without_redis_streams_re_read_the_database_on_their_heartbeat(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings(broker_url="redis://127.0.0.1:1/0", sse_heartbeat_seconds=0.2)
    with session_factory(settings)() as session:
        job_id = queued_job(session).id
    with (
        served(settings) as (app, port),
        httpx.stream("GET", events_url(port, job_id), headers=SSE, timeout=10) as response,
        in_thread(run_job, settings, job_id),
    ):
        sent = [m.id for m in sse_messages(response.iter_lines()) if m.comment is None]

    assert sent == [str(i) for i in range(1, 10)]
    assert not app.state.event_wakeups.subscribed
