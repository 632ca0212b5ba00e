"""run_claimed_job: how a job's end is recorded (the successful run is in tests/test_e2e.py)."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

from sqlalchemy.orm import Session

from core import jobs
from core.db import session_factory
from core.models import Job, utcnow
from core.settings import Settings
from core.storage import LocalStorage
from tests.factories import make_job
from tests.utils import SettingsFactory
from worker.tasks import run_claimed_job


def claimed_job_with_files(session: Session, settings: Settings, model: bytes, data: Path) -> Job:
    job = make_job(session)
    storage = LocalStorage(settings.data_dir)
    inputs = storage.inputs_dir(job.id)
    inputs.mkdir(parents=True)
    (inputs / "model.onnx").write_bytes(model)
    (inputs / "data.zip").write_bytes(data.read_bytes())
    job.model_path = storage.relative(inputs / "model.onnx")
    job.data_path = storage.relative(inputs / "data.zip")
    session.commit()
    claimed = jobs.claim_job(session, job.id, "me", settings.lease_seconds)
    assert claimed is not None
    return claimed


def test_input_error_fails_the_job_with_its_code(
    settings: Settings, session: Session, image_archive: Path
) -> None:
    """A model that went bad after upload: the pipeline's InputError reaches the row as is."""
    job = claimed_job_with_files(session, settings, b"garbage", image_archive)

    run_claimed_job(settings, job, "me")

    row = session.get(Job, job.id, populate_existing=True)
    assert row is not None
    assert row.status == "failed"
    assert row.error is not None and row.error["code"] == "invalid_model"
    assert (row.lease_owner, row.lease_expires_at) == (None, None)
    assert row.finished_at is not None


def test_unexpected_error_is_internal_error_without_internals(
    settings: Settings, session: Session, onnx_model: Path, image_archive: Path
) -> None:
    job = claimed_job_with_files(session, settings, onnx_model.read_bytes(), image_archive)
    # A config the pipeline cannot work with, written behind the API's back.
    job.config = {"no": "such config"}
    session.commit()

    run_claimed_job(settings, job, "me")

    row = session.get(Job, job.id, populate_existing=True)
    assert row is not None and row.status == "failed" and row.error is not None
    assert row.error["code"] == "internal_error"
    assert "ValidationError" in row.error["message"]
    assert str(settings.data_dir) not in row.error["message"]


def test_a_worker_deletes_its_own_unused_dataset_stores_before_a_job(
    settings: Settings, session: Session, image_archive: Path
) -> None:
    """A worker's stores are on its own disk: it applies DATASET_STORE_DAYS there itself, since
    the API's housekeeping may run on another machine."""
    unused = settings.dataset_stores / "old-store"
    unused.mkdir(parents=True)
    (unused / "lock").touch()
    (unused / "pixels.u8").write_bytes(b"\0" * 64)
    assert settings.dataset_store_days is not None
    long_ago = time.time() - (settings.dataset_store_days + 1) * 86400
    for path in [*unused.iterdir(), unused]:
        os.utime(path, (long_ago, long_ago))
    job = claimed_job_with_files(session, settings, b"garbage", image_archive)

    run_claimed_job(settings, job, "me")

    assert not unused.exists()


def test_a_job_that_lost_its_lease_is_left_alone(
    settings: Settings, session: Session, image_archive: Path
) -> None:
    job = claimed_job_with_files(session, settings, b"garbage", image_archive)

    run_claimed_job(settings, job, "someone-else")

    row = session.get(Job, job.id, populate_existing=True)
    assert row is not None and (row.status, row.lease_owner) == ("running", "me")


def test_a_job_past_its_duration_quota_fails_with_time_limit_exceeded(
    make_settings: SettingsFactory, onnx_model: Path, image_archive: Path
) -> None:
    settings = make_settings(max_job_seconds=60)
    with session_factory(settings)() as session:
        job = claimed_job_with_files(session, settings, onnx_model.read_bytes(), image_archive)
        # It started (a first attempt, say) longer ago than the tenant's quota allows.
        job.started_at = utcnow() - dt.timedelta(seconds=61)
        session.commit()

        run_claimed_job(settings, job, "me")

        row = session.get(Job, job.id, populate_existing=True)
        assert row is not None and row.status == "failed" and row.error is not None
        assert row.error["code"] == "time_limit_exceeded"
        assert "60 s" in row.error["message"]
        assert row.artifacts == []
