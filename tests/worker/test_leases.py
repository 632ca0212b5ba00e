"""Job leases on the real database: who may run a job, and when."""

from __future__ import annotations

import datetime as dt

from sqlalchemy.orm import Session

from core import jobs
from core.models import Job, utcnow
from tests.factories import make_job

LEASE_S = 60


def later(seconds: float) -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=seconds)


def test_queued_job_is_claimed_once(session: Session) -> None:
    job = make_job(session)

    claimed = jobs.claim_job(session, job.id, "worker-1", LEASE_S)
    again = jobs.claim_job(session, job.id, "worker-2", LEASE_S)

    assert claimed is not None
    assert (claimed.status, claimed.lease_owner, claimed.attempts) == ("running", "worker-1", 1)
    assert claimed.lease_expires_at is not None and claimed.lease_expires_at > utcnow()
    assert claimed.started_at is not None
    assert again is None


def test_expired_lease_can_be_taken_over(session: Session) -> None:
    job = make_job(session)
    jobs.claim_job(session, job.id, "worker-1", LEASE_S)

    assert jobs.claim_job(session, job.id, "worker-2", LEASE_S, now=later(LEASE_S - 1)) is None
    taken = jobs.claim_job(session, job.id, "worker-2", LEASE_S, now=later(LEASE_S + 1))

    assert taken is not None and (taken.lease_owner, taken.attempts) == ("worker-2", 2)
    # The first worker lost the job: its writes no longer land.
    assert not jobs.renew_lease(session, job.id, "worker-1", LEASE_S)
    assert not jobs.report_progress(session, job.id, "worker-1", {"step": 9}, LEASE_S)
    assert not jobs.succeed(session, job.id, "worker-1", {})
    assert jobs.report_progress(session, job.id, "worker-2", {"step": 1}, LEASE_S)


def test_finished_jobs_are_never_claimable(session: Session) -> None:
    job = make_job(session)
    jobs.claim_job(session, job.id, "worker-1", LEASE_S)
    assert jobs.succeed(session, job.id, "worker-1", {"agreement": 1.0})
    canceled = make_job(session, status="canceled")
    failed = make_job(session, status="failed")

    for finished in (job, canceled, failed):
        assert jobs.claim_job(session, finished.id, "w", LEASE_S, now=later(10 * LEASE_S)) is None
    done = session.get(Job, job.id, populate_existing=True)
    assert done is not None
    assert (done.status, done.lease_owner, done.metrics) == ("succeeded", None, {"agreement": 1.0})


def test_progress_renews_the_lease(session: Session) -> None:
    job = make_job(session)
    claimed = jobs.claim_job(session, job.id, "worker-1", 5)
    assert claimed is not None and claimed.lease_expires_at is not None
    first_expiry = claimed.lease_expires_at

    assert jobs.report_progress(
        session, job.id, "worker-1", {"step": 1, "loss": float("nan")}, LEASE_S
    )

    row = session.get(Job, job.id, populate_existing=True)
    assert row is not None and row.lease_expires_at is not None
    assert row.lease_expires_at > first_expiry
    assert row.progress == {"step": 1, "loss": None}  # NaN is not JSON


def test_requeue_expired_and_give_up_after_max_attempts(session: Session) -> None:
    alive = make_job(session)
    jobs.claim_job(session, alive.id, "w", LEASE_S)
    dead = make_job(session, status="running", lease_owner="gone", lease_expires_at=later(-1))
    hopeless = make_job(
        session,
        status="running",
        lease_owner="gone",
        lease_expires_at=later(-1),
        attempts=jobs.MAX_ATTEMPTS,
    )

    assert jobs.requeue_expired(session) == [dead.id]

    rows = {j.id: j for j in session.query(Job).populate_existing()}
    assert rows[alive.id].status == "running"
    assert (rows[dead.id].status, rows[dead.id].lease_owner) == ("queued", None)
    assert rows[hopeless.id].status == "failed"
    assert rows[hopeless.id].error == {
        "code": "worker_lost",
        "message": f"the worker running this job stopped {jobs.MAX_ATTEMPTS} times",
    }
