"""DbReporter: throttled progress writes, throttled cancel polls, lease loss."""

from __future__ import annotations

from sqlalchemy.orm import Session

from core import events, jobs
from core.db import session_factory
from core.models import Job
from core.settings import Settings
from tests.factories import make_job
from tests.utils import SettingsFactory
from worker.tasks import DbReporter


class FakeClock:
    """Only time is faked: the reporter writes to the real database."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def running_job(session: Session, settings: Settings) -> Job:
    job = make_job(session)
    claimed = jobs.claim_job(session, job.id, "me", settings.lease_seconds)
    assert claimed is not None
    return claimed


def stored_progress(session: Session, job_id: str) -> dict | None:
    row = session.get(Job, job_id, populate_existing=True)
    assert row is not None
    return row.progress


def test_progress_is_throttled_and_the_last_one_flushed(
    settings: Settings, session: Session
) -> None:
    job = running_job(session, settings)
    clock = FakeClock()
    reporter = DbReporter(settings, job.id, "me", clock=clock)

    reporter.progress({"step": 1})  # first: written at once
    assert stored_progress(session, job.id) == {"step": 1}
    clock.now += 0.1
    reporter.progress({"step": 2})  # too soon: held back
    assert stored_progress(session, job.id) == {"step": 1}
    clock.now += 0.5
    reporter.progress({"step": 3})  # interval passed: written (step 2 superseded)
    assert stored_progress(session, job.id) == {"step": 3}
    clock.now += 0.1
    reporter.progress({"step": 4})
    reporter.flush()  # the last one always lands
    assert stored_progress(session, job.id) == {"step": 4}


def test_stage_writes_pending_progress_first(settings: Settings, session: Session) -> None:
    job = running_job(session, settings)
    clock = FakeClock()
    reporter = DbReporter(settings, job.id, "me", clock=clock)
    reporter.progress({"step": 1})
    reporter.progress({"step": 2})

    reporter.stage("evaluating")

    row = session.get(Job, job.id, populate_existing=True)
    assert row is not None and (row.stage, row.progress) == ("evaluating", {"step": 2})


def test_should_stop_polls_at_most_once_a_second(settings: Settings, session: Session) -> None:
    job = running_job(session, settings)
    clock = FakeClock()
    reporter = DbReporter(settings, job.id, "me", clock=clock)
    assert not reporter.should_stop()

    jobs.request_cancel(session, "local", job.id)
    clock.now += 0.5
    assert not reporter.should_stop()  # cached answer
    clock.now += 0.6
    assert reporter.should_stop()


def test_lost_lease_stops_the_job(settings: Settings, session: Session) -> None:
    job = running_job(session, settings)
    reporter = DbReporter(settings, job.id, "not-the-owner", clock=FakeClock())

    reporter.stage("training")

    assert reporter.lease_lost.is_set()
    assert reporter.should_stop()


def test_stages_are_timed_and_progress_becomes_an_event_every_few_seconds(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings(progress_event_seconds=5)
    with session_factory(settings)() as session:
        job = running_job(session, settings)
    clock = FakeClock()
    reporter = DbReporter(settings, job.id, "me", clock=clock)

    reporter.stage("calibrating")
    clock.now += 1.26
    reporter.stage("training")
    for step in range(1, 21):  # a step every 0.5 s: the row each time, an event every 5 s
        reporter.progress({"step": step})
        clock.now += 0.5
    reporter.stage("evaluating")  # the stage's last progress is always an event

    with session_factory(settings)() as session:
        items, _ = events.list_events(session, job.id)
        row = session.get(Job, job.id)
    logged = [(event.type, event.data) for event in items]
    assert logged == [
        ("status", {"status": "running", "attempt": 1}),
        ("stage", {"stage": "calibrating", "previous": None, "previous_seconds": None}),
        ("stage", {"stage": "training", "previous": "calibrating", "previous_seconds": 1.3}),
        ("progress", {"step": 1}),
        ("progress", {"step": 11}),
        ("progress", {"step": 20}),
        ("stage", {"stage": "evaluating", "previous": "training", "previous_seconds": 10.0}),
    ]
    assert row is not None and row.stage_seconds == {"calibrating": 1.3, "training": 10.0}
    assert reporter.stage_seconds() == 0.0


def test_curve_points_are_metrics_events_and_the_latest_metrics(
    settings: Settings, session: Session
) -> None:
    """Every point is written (no throttle: about 200 a job), as ``train`` reports them."""
    job = running_job(session, settings)
    reporter = DbReporter(settings, job.id, "me", clock=FakeClock())
    first = {"step": 2, "epoch": 1, "loss": 0.9, "lr": {"weights": 0.01, "quantizer": 0.01}}
    second = {
        "step": 4,
        "epoch": 1,
        "loss": 0.7,
        "lr": {"weights": 0.009, "quantizer": 0.009},
        "probe": {"agreement": 0.75, "kl": 0.12, "images": 16},
    }

    reporter.metrics(first)
    reporter.metrics(second)

    items, _ = events.list_events(session, job.id)
    assert [event.data for event in items if event.type == "metrics"] == [first, second]
    row = session.get(Job, job.id, populate_existing=True)
    assert row is not None and row.latest_metrics == second
    assert not reporter.lease_lost.is_set()


def test_in_the_background_writes_land_in_order_by_flush_and_stop_with_close(
    settings: Settings, session: Session
) -> None:
    """The worker's reporter: the training thread only queues; one thread writes, in order."""
    job = running_job(session, settings)
    clock = FakeClock()
    reporter = DbReporter(settings, job.id, "me", clock=clock, background=True)
    writer = reporter._writer
    assert writer is not None and writer.is_alive()
    points = [{"step": step, "loss": 1 / step} for step in (1, 2, 3)]
    for point in points:
        reporter.metrics(point)
        reporter.progress({"step": point["step"]})
        clock.now += 1.0
    jobs.request_cancel(session, "local", job.id)
    assert not reporter.should_stop()  # the poll is queued: its answer counts next time

    reporter.flush()
    items, _ = events.list_events(session, job.id)
    assert [e.data for e in items if e.type == "metrics"] == points
    assert stored_progress(session, job.id) == {"step": 3}
    clock.now += 0.5
    assert reporter.should_stop()
    reporter.close()
    assert not writer.is_alive()


def test_in_the_background_a_lost_lease_still_stops_the_job(
    settings: Settings, session: Session
) -> None:
    job = running_job(session, settings)
    reporter = DbReporter(settings, job.id, "not-the-owner", clock=FakeClock(), background=True)
    reporter.stage("training")  # returns once written
    assert reporter.should_stop()
    reporter.close()
