"""Job event logs on the real databases: numbering, lease ownership, stage timing."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from core import engines, events, jobs
from core.db import migrate, session_factory
from core.events import EventType
from core.models import Job, utcnow
from core.settings import Settings
from tests.core.test_engines import config_with_targets
from tests.factories import make_job

LEASE_S = 60


def later(seconds: float) -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=seconds)


@pytest.fixture(params=["sqlite", "postgresql"])
def any_session(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Session]:
    """A session on each database the service runs on (PostgreSQL locks with FOR UPDATE)."""
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
        settings = Settings(data_dir=settings.data_dir, database_url=url)
        migrate(settings)
    with session_factory(settings)() as session:
        yield session


def logged(session: Session, job_id: str) -> list[tuple[int, str, dict[str, Any]]]:
    session.commit()  # a fresh snapshot
    items, _ = events.list_events(session, job_id, limit=1000)
    return [(event.id, event.type, event.data) for event in items]


def test_ids_are_gapless_and_a_reader_misses_none_under_concurrent_writers_on_postgresql(
    tmp_path: Path, postgres_url: str, redis_db: str
) -> None:
    settings = Settings(data_dir=tmp_path, database_url=postgres_url, broker_url=redis_db)
    migrate(settings)
    new_session = session_factory(settings)
    with new_session() as session:
        job_id = make_job(session).id
    per_writer, writers = 150, 2
    start = threading.Barrier(writers + 1)
    failures: list[BaseException] = []

    def write(writer: int) -> None:
        try:
            with new_session() as session:
                start.wait()
                for index in range(per_writer):
                    events.record(session, job_id, EventType.PROGRESS, {"w": writer, "i": index})
                    if index % 3 == 0:  # some transactions record two events
                        events.record(session, job_id, EventType.METRICS, {"w": writer})
                    session.commit()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    seen: list[int] = []
    reads = 0
    with new_session() as reader:
        start.wait()
        while True:
            writing = any(thread.is_alive() for thread in threads)
            items, _ = events.list_events(reader, job_id, after=seen[-1] if seen else 0)
            reader.commit()  # each read in a transaction of its own, as the API's
            seen.extend(event.id for event in items)
            reads += 1
            assert seen == list(range(1, len(seen) + 1)), "the reader skipped an id"
            if not writing and not items:
                break
    for thread in threads:
        thread.join()

    assert not failures, failures
    expected = writers * (per_writer + len(range(0, per_writer, 3)))
    assert seen == list(range(1, expected + 1))
    assert reads > 10, "the reader must have read while the writers wrote"
    with new_session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.last_event_id == expected


def test_a_write_that_lost_its_lease_records_nothing(any_session: Session) -> None:
    session = any_session
    job = make_job(session)
    assert jobs.claim_job(session, job.id, "worker-1", LEASE_S)
    assert jobs.report_stage(session, job.id, "worker-1", "validating", LEASE_S)
    # worker-1 stalls past its lease; worker-2 takes the job over.
    assert jobs.claim_job(session, job.id, "worker-2", LEASE_S, now=later(LEASE_S + 1))
    before = logged(session, job.id)

    lost = [
        jobs.report_stage(session, job.id, "worker-1", "training", LEASE_S, previous_seconds=2),
        jobs.report_progress(session, job.id, "worker-1", {"step": 9}, LEASE_S, event=True),
        jobs.report_metrics(session, job.id, "worker-1", {"step": 9, "loss": 0.1}),
        jobs.report_warning(session, job.id, "worker-1", "labels_mismatch", "late"),
        jobs.fail(session, job.id, "worker-1", "internal_error", "late", last_stage_seconds=3),
        jobs.cancel(session, job.id, "worker-1"),
        jobs.succeed(session, job.id, "worker-1", {}),
    ]

    assert lost == [False] * len(lost)
    assert logged(session, job.id) == before
    assert [data for _, kind, data in before if kind == "status"][-1] == {
        "status": "running",
        "attempt": 2,
    }
    row = session.get(Job, job.id, populate_existing=True)
    assert row is not None
    assert (row.status, row.stage, row.progress, row.latest_metrics, row.stage_seconds) == (
        "running",
        None,
        None,
        None,
        {},
    )


def test_stage_seconds_add_up_across_attempts_and_tell_the_story(any_session: Session) -> None:
    session = any_session
    job = make_job(session)
    # make_job writes no queued event (jobs.add_job does): this log starts at the claim.
    assert jobs.claim_job(session, job.id, "w1", LEASE_S)
    assert jobs.report_stage(session, job.id, "w1", "validating", LEASE_S)
    assert jobs.report_stage(session, job.id, "w1", "calibrating", LEASE_S, previous_seconds=1.24)
    # w1 dies in calibrating (its seconds there are lost); the sweep requeues, w2 resumes.
    assert jobs.requeue_expired(session, now=later(LEASE_S + 1)) == [job.id]
    assert jobs.claim_job(session, job.id, "w2", LEASE_S)
    assert jobs.report_stage(session, job.id, "w2", "validating", LEASE_S)
    assert jobs.report_stage(session, job.id, "w2", "calibrating", LEASE_S, previous_seconds=0.5)
    assert jobs.report_stage(session, job.id, "w2", "training", LEASE_S, previous_seconds=2.04)
    assert jobs.report_progress(session, job.id, "w2", {"step": 5}, LEASE_S)  # row only
    assert jobs.report_progress(session, job.id, "w2", {"step": 9}, LEASE_S, event=True)
    assert jobs.succeed(session, job.id, "w2", {"agreement": 1.0}, last_stage_seconds=3.0)

    row = session.get(Job, job.id, populate_existing=True)
    assert row is not None
    stage_seconds = {"validating": 1.7, "calibrating": 2.0, "training": 3.0}
    assert row.stage_seconds == stage_seconds
    assert logged(session, job.id) == [
        (1, "status", {"status": "running", "attempt": 1}),
        (2, "stage", {"stage": "validating", "previous": None, "previous_seconds": None}),
        (3, "stage", {"stage": "calibrating", "previous": "validating", "previous_seconds": 1.2}),
        (4, "status", {"status": "queued", "reason": "worker_lost"}),
        (5, "status", {"status": "running", "attempt": 2}),
        (6, "stage", {"stage": "validating", "previous": None, "previous_seconds": None}),
        (7, "stage", {"stage": "calibrating", "previous": "validating", "previous_seconds": 0.5}),
        (8, "stage", {"stage": "training", "previous": "calibrating", "previous_seconds": 2.0}),
        (9, "progress", {"step": 9}),
        (10, "status", {"status": "succeeded", "stage_seconds": stage_seconds}),
    ]


def test_failures_cancels_and_lost_workers_are_events(session: Session) -> None:
    failing, queued, hopeless = make_job(session), make_job(session), make_job(session)
    assert jobs.claim_job(session, failing.id, "w", LEASE_S)
    assert jobs.report_stage(session, failing.id, "w", "training", LEASE_S)
    hopeless_claim = {"status": "running", "lease_owner": "gone", "lease_expires_at": later(-1)}
    session.execute(
        update(Job)
        .where(Job.id == hopeless.id)
        .values(**hopeless_claim, attempts=jobs.MAX_ATTEMPTS)
    )
    session.commit()

    assert jobs.fail(session, failing.id, "w", "bad_input", "no images", last_stage_seconds=0.3)
    jobs.request_cancel(session, "local", queued.id)
    jobs.request_cancel(session, "local", queued.id)  # repeated: nothing more happens
    assert jobs.requeue_expired(session) == []

    error = {"code": "bad_input", "message": "no images"}
    assert logged(session, failing.id)[-2:] == [
        (3, "error", error),
        (4, "status", {"status": "failed", "error": error, "stage_seconds": {"training": 0.3}}),
    ]
    assert logged(session, queued.id) == [(1, "status", {"status": "canceled"})]
    lost = logged(session, hopeless.id)
    assert [kind for _, kind, _ in lost] == ["error", "status"]
    assert lost[1][2]["status"] == "failed" and lost[1][2]["error"]["code"] == "worker_lost"


def test_engine_builds_are_events_of_their_job(session: Session, settings: Settings) -> None:
    job = make_job(session, status="succeeded", config=config_with_targets("x86-sm90"))
    (build,) = engines.create_builds(session, job)
    claimed = engines.claim_build(session, build.id, "builder")
    assert claimed is not None
    assert engines.claim_build(session, build.id, "another") is None  # no event for a miss
    engines.finish_build(
        session, build.id, "builder", claimed.lease_token, error=("build_failed", "no GPU")
    )

    change = {"build_id": build.id, "target": "x86-sm90"}
    assert logged(session, job.id) == [
        (1, "engine", change | {"status": "waiting"}),
        (2, "engine", change | {"status": "building"}),
        (
            3,
            "engine",
            change | {"status": "failed", "error": {"code": "build_failed", "message": "no GPU"}},
        ),
    ]
