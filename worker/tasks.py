"""Celery tasks: turn a queued job into one ``core.pipeline.run_quantization`` call.

The task takes only the job id and re-reads everything from the database. It first claims the
job's lease (core.jobs.claim_job); a delivery that cannot claim (the job finished, was
canceled, or runs under a live lease elsewhere) is dropped, which makes redelivery harmless.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core import engines, jobs, sweeps
from core.config import JobConfig
from core.db import session_scope
from core.errors import InputError
from core.export.tensorrt_engine import TensorRTUnavailable, build_engine
from core.housekeeping import delete_unused_dataset_stores
from core.models import Job, utcnow
from core.pipeline import CHECKPOINT, JobCanceled, JobInputs, run_quantization
from core.settings import Settings, get_settings
from core.storage import Storage, StoredObject, open_storage
from worker.app import (
    BUILD_ENGINE_TASK,
    TRAIN_TASK,
    TRAIN_TIME_LIMIT_S,
    app,
    enqueue_engine_build,
)

log = logging.getLogger(__name__)

ENGINE_RENEW_SECONDS = engines.ENGINE_LEASE_SECONDS / 4  # an engine build's heartbeat

CLAIM_RETRY_S = 5


class DbReporter:
    """``core.pipeline.Reporter`` that writes to the job row, and owns the lease while it does.

    Progress is written at most every ``progress_interval`` seconds (the latest value wins;
    ``flush`` writes the last one), and becomes an event of the job's log at most every
    ``settings.progress_event_seconds`` (the last one before a stage change or the end always
    does); the cancel flag is read at most every ``cancel_interval`` seconds: a training loop
    may call both per step, thousands of times a minute. Every write renews the lease; a write
    that finds the lease gone makes ``should_stop`` say True. Each stage is timed on ``clock``
    (monotonic): its seconds go with the next stage's write, the last stage's with the end.

    ``background``: progress, curve points, warnings and cancel polls go to one thread of their
    own, in order, so that training never waits for the database (a curve point cost a step
    ~3 ms of CPU and up to tens of ms of waiting, on SQLite, and a job of up to 200 steps
    writes one every step); ``stage``, ``flush`` and ``close`` return once everything before
    them is written. ``close`` also stops the thread.
    """

    def __init__(
        self,
        settings: Settings,
        job_id: str,
        owner: str,
        *,
        progress_interval: float = 0.5,
        cancel_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        deadline: dt.datetime | None = None,
        background: bool = False,
    ) -> None:
        self.settings = settings
        self.job_id = job_id
        self.owner = owner
        # The tenant's job-duration quota (settings.max_job_seconds), from the first start.
        self.deadline = deadline
        self.out_of_time = False
        self.progress_interval = progress_interval
        self.cancel_interval = cancel_interval
        self.clock = clock
        self.lease_lost = threading.Event()
        self._pending: dict[str, Any] | None = None
        self._unannounced: dict[str, Any] | None = None  # written to the row, not an event yet
        self._last_write = -float("inf")
        self._last_event = -float("inf")
        self._stage: str | None = None
        self._stage_started = 0.0
        self._last_poll = -float("inf")
        self._cancel_requested = False
        self._tasks: queue.Queue[Callable[[], None] | None] | None = None
        self._writer: threading.Thread | None = None
        if background:
            self._tasks = queue.Queue()
            self._writer = threading.Thread(
                target=self._run_tasks, name=f"reporter {job_id}", daemon=True
            )
            self._writer.start()

    def _run_tasks(self) -> None:
        assert self._tasks is not None
        while (task := self._tasks.get()) is not None:
            try:
                task()
            except Exception:  # the thread must outlive any one write
                log.exception("job %s: reporter write failed", self.job_id)
            finally:
                self._tasks.task_done()
        self._tasks.task_done()

    def _submit(self, task: Callable[[], None], *, wait: bool = False) -> None:
        """Run ``task`` now, or queue it for the background thread (``wait``: until done)."""
        if self._tasks is None:
            task()
            return
        self._tasks.put(task)
        if wait:
            self._tasks.join()

    def _write(self, write: Callable[[Any], bool], *, wait: bool = False) -> None:
        def task() -> None:
            # A database hiccup must not fail a job hours into training: log it, carry on, and
            # let the heartbeat keep the lease.
            try:
                with session_scope(self.settings) as session:
                    if not write(session):
                        self.lease_lost.set()
            except SQLAlchemyError:
                log.warning("job %s: progress write failed", self.job_id, exc_info=True)

        self._submit(task, wait=wait)

    def stage(self, stage: str) -> None:
        self.flush()
        log.info("job %s: stage %s", self.job_id, stage)
        previous_seconds = self.stage_seconds()
        self._stage, self._stage_started = stage, self.clock()
        self._write(
            lambda s: jobs.report_stage(
                s,
                self.job_id,
                self.owner,
                stage,
                self.settings.lease_seconds,
                previous_seconds=previous_seconds,
            ),
            wait=True,
        )

    def stage_seconds(self) -> float | None:
        """Seconds in the current stage so far; None before the first stage."""
        return None if self._stage is None else self.clock() - self._stage_started

    def progress(self, progress: dict[str, Any]) -> None:
        self._pending = dict(progress)
        if self.clock() - self._last_write >= self.progress_interval:
            self._write_progress(final=False)

    def flush(self) -> None:
        """Write the latest progress not written yet, as an event too: called when a stage ends
        and when the job does, so the log always holds a stage's last progress. Returns once
        every write before it is done."""
        self._write_progress(final=True)
        self._submit(lambda: None, wait=True)

    def close(self) -> None:
        """``flush``, then stop the background thread (if any)."""
        self.flush()
        if self._writer is not None and self._tasks is not None:
            self._tasks.put(None)
            self._writer.join()
            self._writer = None

    def _write_progress(self, *, final: bool) -> None:
        progress = self._pending or (self._unannounced if final else None)
        if progress is None:
            return
        now = self.clock()
        event = final or now - self._last_event >= self.settings.progress_event_seconds
        self._pending = None
        self._unannounced = None if event else progress
        self._last_write = now
        if event:
            self._last_event = now
        self._write(
            lambda s: jobs.report_progress(
                s, self.job_id, self.owner, progress, self.settings.lease_seconds, event=event
            )
        )

    def metrics(self, point: dict[str, Any]) -> None:
        self._write(lambda s: jobs.report_metrics(s, self.job_id, self.owner, point))

    def warning(self, code: str, message: str) -> None:
        self._write(lambda s: jobs.report_warning(s, self.job_id, self.owner, code, message))

    def should_stop(self) -> bool:
        if self.lease_lost.is_set() or self.out_of_time:
            return True
        if self.clock() - self._last_poll >= self.cancel_interval:
            self._last_poll = self.clock()
            if self.deadline is not None and utcnow() >= self.deadline:
                self.out_of_time = True
                return True
            self._submit(self._poll_cancel)  # in the background: the answer counts next time
        return self._cancel_requested

    def _poll_cancel(self) -> None:
        try:
            with session_scope(self.settings) as session:
                self._cancel_requested = jobs.is_cancel_requested(session, self.job_id)
        except SQLAlchemyError:
            log.warning("job %s: cancel poll failed", self.job_id, exc_info=True)


@contextmanager
def every(interval: float, work: Callable[[], bool | None], name: str) -> Iterator[None]:
    """Call ``work`` from a thread every ``interval`` seconds while the block runs, until it
    returns False; the thread is stopped and joined when the block ends."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            if work() is False:
                return

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def lease_heartbeat(
    settings: Settings,
    what: str,
    renew: Callable[[Session], bool],
    interval: float,
    lease_lost: threading.Event,
) -> Iterator[None]:
    """Call ``renew`` from a thread every ``interval`` seconds while the block runs, so that a
    long step without other writes keeps its lease. A renewal that finds the lease gone (False)
    sets ``lease_lost`` and stops; ``what`` names the leased thing in the log."""

    def beat() -> bool:
        try:
            with session_scope(settings) as session:
                if not renew(session):
                    lease_lost.set()
                    return False
        except SQLAlchemyError:
            log.warning("%s: heartbeat failed", what, exc_info=True)
        return True

    with every(interval, beat, f"heartbeat {what}"):
        yield


@contextmanager
def heartbeat(
    settings: Settings, job_id: str, owner: str, lease_lost: threading.Event
) -> Iterator[None]:
    """Renew a job's lease from a thread, so that a long step without progress keeps the job."""

    def renew(session: Session) -> bool:
        return jobs.renew_lease(session, job_id, owner, settings.lease_seconds)

    with lease_heartbeat(settings, f"job {job_id}", renew, settings.lease_seconds / 4, lease_lost):
        yield


@contextmanager
def mirrored_checkpoint(storage: Storage, job_id: str, interval: float) -> Iterator[None]:
    """From a thread, copy the job's checkpoint to the store whenever it changed (looked at
    every ``interval`` seconds), so that a worker elsewhere resumes from it if this one dies.
    A failed copy is logged and tried again; a local store needs no copy (the call is free)."""
    checkpoint = storage.work_dir(job_id) / CHECKPOINT
    mirrored: tuple[int, int] | None = None  # the version copied last

    def mirror() -> None:
        nonlocal mirrored
        try:
            stat = checkpoint.stat()
            version = (stat.st_ino, stat.st_mtime_ns)  # the trainer swaps in a new file
            if version != mirrored:
                storage.mirror_work_file(job_id, checkpoint)
                mirrored = version
        except FileNotFoundError:  # none yet, or replaced just now: next time
            pass
        except Exception:  # noqa: BLE001 - boto3 raises many types; training goes on
            log.warning("job %s: checkpoint not mirrored", job_id, exc_info=True)

    with every(interval, mirror, f"checkpoint {job_id}"):
        yield


def run_claimed_job(settings: Settings, job: Job, owner: str) -> None:
    """Run a job whose lease ``owner`` holds, and record how it ended."""
    storage = open_storage(settings)
    started_at = job.started_at or utcnow()
    deadline = started_at + dt.timedelta(seconds=settings.max_job_seconds)
    reporter = DbReporter(settings, job.id, owner, deadline=deadline, background=True)
    stored: list[StoredObject] = []
    metrics: dict[str, Any] = {}
    error: tuple[str, str] | None = None  # (code, message)
    canceled = False
    try:
        with heartbeat(settings, job.id, owner, reporter.lease_lost):
            # A job another worker started resumes from the checkpoint it mirrored.
            storage.restore_work_file(job.id, CHECKPOINT)
            # This machine's dataset stores: the API's housekeeping may run on another one.
            delete_unused_dataset_stores(settings)
            # Files on this machine: a bucket's are fetched to the cache once per content.
            inputs = JobInputs(
                model_path=storage.local_file(job.model_path, job.model_sha256),
                data_path=storage.local_file(job.data_path, job.data_sha256),
                eval_data_path=(
                    storage.local_file(job.eval_data_path, job.eval_data_sha256)
                    if job.eval_data_path and job.eval_data_sha256
                    else None
                ),
                data_sha256=job.data_sha256,  # names its dataset store: no hashing again
                eval_data_sha256=job.eval_data_sha256,
            )
            config = JobConfig.model_validate(job.config)
            with mirrored_checkpoint(storage, job.id, settings.lease_seconds / 4):
                result = run_quantization(inputs, config, storage.work_dir(job.id), reporter)
            stored = [
                storage.store_artifact(job.id, name, path)
                for name, path in result.artifacts.items()
            ]
            metrics = result.metrics
    except JobCanceled:
        if reporter.out_of_time:
            error = (
                "time_limit_exceeded",
                f"the job ran past its limit of {settings.max_job_seconds} s (MAX_JOB_SECONDS)",
            )
        else:
            canceled = True
    except InputError as exc:
        error = (exc.code, exc.message)
    except SoftTimeLimitExceeded:
        error = ("time_limit_exceeded", f"the job ran past {TRAIN_TIME_LIMIT_S // 3600} hours")
    except Exception as exc:
        log.exception("job %s: failed", job.id)
        # The message names the kind of failure only; paths and tracebacks stay in the log.
        message = f"the job failed unexpectedly ({type(exc).__name__}); see the worker log"
        error = ("internal_error", message)

    reporter.close()  # every write done (the last progress too), while the job still runs
    if reporter.lease_lost.is_set():
        log.warning("job %s: lease lost to another worker; leaving the job alone", job.id)
        return
    last_stage_seconds = reporter.stage_seconds()
    with session_scope(settings) as session:
        if canceled:
            log.info("job %s: canceled", job.id)
            jobs.cancel(session, job.id, owner, last_stage_seconds=last_stage_seconds)
        elif error is not None:
            log.info("job %s: failed: %s: %s", job.id, *error)
            jobs.fail(session, job.id, owner, *error, last_stage_seconds=last_stage_seconds)
        else:
            for file in stored:
                jobs.record_artifact(session, job.id, file)
            if jobs.succeed(session, job.id, owner, metrics, last_stage_seconds=last_stage_seconds):
                log.info("job %s: succeeded", job.id)
                announce_engine_builds(settings, session, job.id)
        sweeps.finish_sweep_of(session, settings, job.sweep_id)  # was it its sweep's last?
    if not canceled and error is None:  # only an unfinished job resumes from its checkpoint
        (storage.work_dir(job.id) / CHECKPOINT).unlink(missing_ok=True)
    storage.discard_work_dir(job.id)


def announce_engine_builds(settings: Settings, session: Session, job_id: str) -> None:
    """A waiting build per TensorRT target of the job, each sent to its target's queue.

    A broker that is down leaves the builds waiting: device agents still find them over REST,
    and the job's own result stands.
    """
    job = session.get(Job, job_id, populate_existing=True)
    for build in engines.create_builds(session, job):
        queue = engines.engine_queue(build.target)
        try:
            enqueue_engine_build(settings, build.id, queue)
        except Exception:  # noqa: BLE001 - kombu raises many types; the build stays waiting
            log.warning("job %s: engine build %s not announced on %s", job_id, build.id, queue)
        log.info("job %s: engine build %s waits on %s", job_id, build.id, queue)


def build_claimed_engine(settings: Settings, claim: engines.Claim, builder: str) -> None:
    """Build the engine of a build ``builder`` holds (its ``claim``), renewing the lease while it
    builds; store it with its report as the job's artifacts, and record how it ended. Nothing
    is stored for a failed build, nor for one whose lease was lost."""
    build, lease_token = claim.build, claim.lease_token
    storage = open_storage(settings)
    plan_name, _ = engines.artifact_names(build.target)
    with session_scope(settings) as session:
        source = engines.source_artifact(session, build.job_id)
        source_file = (source.path, source.sha256) if source is not None else None
    work_dir = storage.work_dir(build.job_id)
    work_dir.mkdir(parents=True, exist_ok=True)
    # A folder of this attempt alone: what a crashed attempt left never meets the next one.
    attempt_dir = Path(tempfile.mkdtemp(prefix=f"engine-{build.target}-", dir=work_dir))
    lease_lost = threading.Event()
    error: tuple[str, str] | None = None
    report: dict[str, Any] | None = None

    def renew(session: Session) -> bool:
        return engines.renew_build_lease(session, build.id, builder, lease_token) is not None

    try:
        with lease_heartbeat(
            settings, f"engine build {build.id}", renew, ENGINE_RENEW_SECONDS, lease_lost
        ):
            try:
                if source_file is None:
                    raise FileNotFoundError("the job has no model_qdq.onnx (export.onnx was off)")
                report = build_engine(storage.local_file(*source_file), attempt_dir / plan_name)
            except TensorRTUnavailable as exc:
                error = ("tensorrt_unavailable", f"this engine worker cannot build: {exc}")
            except Exception as exc:
                log.exception("engine build %s: failed", build.id)
                error = ("build_failed", f"{type(exc).__name__}: {str(exc)[:500]}")
        if lease_lost.is_set():
            raise engines.EngineBuildNotClaimed(build.id)
        with session_scope(settings) as session:
            if error is None:
                assert report is not None
                plan = attempt_dir / plan_name
                engines.store_result(session, settings, build, builder, lease_token, plan, report)
            else:
                engines.finish_build(session, build.id, builder, lease_token, error=error)
    except engines.EngineBuildNotClaimed:
        log.warning("engine build %s: lease lost to another builder; nothing stored", build.id)
        return
    finally:
        Storage.remove_tree(attempt_dir)
    log.info("engine build %s (%s): %s", build.id, build.target, error or "succeeded")


@app.task(bind=True, name=BUILD_ENGINE_TASK, time_limit=3 * 3600)
def build_engine_task(self: Task, build_id: str) -> None:
    """Build one engine on the target this worker runs on (it consumes that target's queue)."""
    settings = get_settings()
    builder = f"{self.request.hostname}/{os.getpid()}/{self.request.id}"
    with session_scope(settings) as session:
        claim = engines.claim_build(session, build_id, builder)
    if claim is None:
        log.info("engine build %s: not claimable (built, or taken by another builder)", build_id)
        return
    build_claimed_engine(settings, claim, builder)


@app.task(
    bind=True,
    name=TRAIN_TASK,
    time_limit=TRAIN_TIME_LIMIT_S,
    soft_time_limit=TRAIN_TIME_LIMIT_S - 600,
)
def train_job(self: Task, job_id: str) -> None:
    settings = get_settings()
    owner = f"{self.request.hostname}/{os.getpid()}/{self.request.id}"
    try:
        with session_scope(settings) as session:
            job = jobs.claim_job(session, job_id, owner, settings.lease_seconds)
    except SQLAlchemyError as exc:
        # The database is away: try again later instead of acknowledging the job away (the
        # API's sweep would re-send it too, but only after a lease).
        log.warning("job %s: claim failed (%s); retrying", job_id, type(exc).__name__)
        raise self.retry(exc=exc, countdown=CLAIM_RETRY_S, max_retries=None) from exc
    if job is None:
        log.info("job %s: not claimable (finished, canceled or leased): delivery dropped", job_id)
        return
    log.info("job %s: claimed by %s (attempt %d)", job_id, owner, job.attempts)
    run_claimed_job(settings, job, owner)
