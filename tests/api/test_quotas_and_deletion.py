"""Per-tenant quotas, DELETE /v1/jobs/{id}, retention and the orphan sweep, on the real app."""

from __future__ import annotations

import datetime as dt
import os
import time
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.main import create_app
from core.db import session_factory
from core.housekeeping import run_housekeeping
from core.models import Artifact, Job, Sweep, utcnow
from core.settings import Settings
from core.storage import LocalStorage
from tests.factories import make_job, post_job
from tests.utils import SettingsFactory, make_client


def job_files(storage: LocalStorage, job_id: str) -> list[Path]:
    """A job's folders as the worker leaves them: inputs, work and an artifact."""
    files = [
        storage.inputs_dir(job_id) / "model.onnx",
        storage.work_dir(job_id) / "checkpoint.pt",
        storage.artifact_path(job_id, "metrics.json"),
    ]
    for file in files:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(b"x" * 100)
    return files


def nothing_left(settings: Settings) -> bool:
    storage = LocalStorage(settings.data_dir)
    folders = [storage.uploads_dir, storage.root / "jobs"]
    return not any(folder.is_dir() and any(folder.iterdir()) for folder in folders)


@pytest.mark.parametrize("status", ["queued", "succeeded", "failed", "canceled"])
def test_delete_removes_row_and_every_file(
    settings: Settings, session: Session, status: str
) -> None:
    job = make_job(session, status=status)
    files = job_files(LocalStorage(settings.data_dir), job.id)

    response = make_client(settings).delete(f"/v1/jobs/{job.id}")

    assert response.status_code == 204, response.text
    assert session.get(Job, job.id, populate_existing=True) is None
    assert not any(file.exists() for file in files)
    assert not LocalStorage(settings.data_dir).job_dir(job.id).exists()
    assert make_client(settings).get(f"/v1/jobs/{job.id}").status_code == 404


def test_delete_of_a_running_job_answers_409_and_keeps_it(
    settings: Settings, session: Session
) -> None:
    job = make_job(session, status="running", lease_owner="w", lease_expires_at=utcnow())
    files = job_files(LocalStorage(settings.data_dir), job.id)

    response = make_client(settings).delete(f"/v1/jobs/{job.id}")

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "job_running"
    assert all(file.exists() for file in files)


def test_delete_of_another_tenants_job_is_404(settings: Settings, session: Session) -> None:
    job = make_job(session, tenant="someone-else", status="succeeded")

    response = make_client(settings).delete(f"/v1/jobs/{job.id}")

    assert response.status_code == 404
    assert session.get(Job, job.id) is not None


def test_active_jobs_quota_answers_429_with_retry_after(
    make_settings: SettingsFactory, onnx_model: Path, image_archive: Path
) -> None:
    settings = make_settings(max_active_jobs_per_tenant=2)
    with session_factory(settings)() as session:
        make_job(session, status="queued")
        make_job(session, status="running")
        make_job(session, status="succeeded")  # finished jobs do not count

    response = post_job(make_client(settings), model=onnx_model, data=image_archive)

    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "too_many_active_jobs"
    assert int(response.headers["Retry-After"]) > 0
    assert not any(LocalStorage(settings.data_dir).uploads_dir.glob("*"))


def test_stored_bytes_quota_answers_413_before_the_body_is_read(
    make_settings: SettingsFactory, onnx_model: Path, image_archive: Path
) -> None:
    settings = make_settings(max_stored_bytes_per_tenant=10_000)
    with session_factory(settings)() as session:
        job = make_job(session, status="succeeded", model_size=4_000, data_size=4_000)
        session.add(Artifact(job_id=job.id, name="a", path="p", size=1_000, sha256="0" * 64))
        session.commit()

    response = post_job(make_client(settings), model=onnx_model, data=image_archive)

    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "storage_quota_exceeded"
    assert "stores 8.8 KiB" in response.json()["error"]["message"]  # 9,000 bytes
    assert not LocalStorage(settings.data_dir).uploads_dir.exists() or nothing_left(settings)


def test_deleting_frees_the_quota(
    make_settings: SettingsFactory, onnx_model: Path, image_archive: Path
) -> None:
    settings = make_settings(max_active_jobs_per_tenant=1)
    with session_factory(settings)() as session:
        job = make_job(session, status="queued")
    client = make_client(settings)
    assert post_job(client, model=onnx_model, data=image_archive).status_code == 429

    assert client.delete(f"/v1/jobs/{job.id}").status_code == 204

    # The next refusal is no longer the quota (this app has no broker: 503, and nothing kept).
    response = post_job(client, model=onnx_model, data=image_archive)
    assert response.json()["error"]["code"] != "too_many_active_jobs"


def age(path: Path, seconds: float) -> None:
    """Make a folder and its files look untouched for ``seconds``."""
    stamp = time.time() - seconds
    for item in [path, *path.rglob("*")]:
        os.utime(item, (stamp, stamp))


def test_retention_deletes_inputs_and_work_of_old_finished_jobs_only(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings(input_retention_days=7)
    storage = LocalStorage(settings.data_dir)
    now = utcnow()
    with session_factory(settings)() as session:
        old = make_job(session, status="succeeded", finished_at=now - dt.timedelta(days=8))
        recent = make_job(session, status="failed", finished_at=now - dt.timedelta(days=6))
        running = make_job(session, status="running")
        files = {job.id: job_files(storage, job.id) for job in (old, recent, running)}

        report = run_housekeeping(session, settings)

        assert report.inputs_deleted == 1
        inputs, work, artifact = files[old.id]
        assert not inputs.exists() and not work.exists()
        assert artifact.exists()  # the results stay until the job is deleted
        assert session.get(Job, old.id, populate_existing=True).inputs_deleted_at is not None
        assert all(file.exists() for file in files[recent.id] + files[running.id])
        # Deleted inputs no longer count against the storage quota; a second run does nothing.
        assert run_housekeeping(session, settings).inputs_deleted == 0


def test_orphan_sweep_removes_stale_uploads_and_jobless_folders_only(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings(orphan_upload_seconds=600)
    storage = LocalStorage(settings.data_dir)
    stale_upload, fresh_upload = storage.new_upload_dir(), storage.new_upload_dir()
    for folder in (stale_upload, fresh_upload):
        (folder / "data.zip").write_bytes(b"partial")
    age(stale_upload, 3600)
    with session_factory(settings)() as session:
        kept = make_job(session, status="succeeded")
        job_files(storage, kept.id)
        age(storage.job_dir(kept.id), 3600)
        orphan = storage.job_dir("d1b0e0c4-0000-4000-8000-000000000000")
        (orphan / "inputs").mkdir(parents=True)
        age(orphan, 3600)
        young_orphan = storage.job_dir("d1b0e0c4-0000-4000-8000-000000000001")
        young_orphan.mkdir(parents=True)

        report = run_housekeeping(session, settings)

        assert (report.orphan_uploads, report.orphan_job_dirs) == (1, 1)
        assert not stale_upload.exists() and fresh_upload.exists()
        assert not orphan.exists() and young_orphan.exists()
        assert storage.job_dir(kept.id).exists()
        assert session.scalars(select(Job.id)).all() == [kept.id]


def test_orphan_sweep_removes_rowless_sweep_folders_and_survives_more_folders_than_a_query_binds(
    make_settings: SettingsFactory, postgres_url: str
) -> None:
    """PostgreSQL binds at most 65,535 parameters a query: a service with more job folders than
    that must still find which have rows. Sweep folders without a row go like job folders."""
    settings = make_settings(database_url=postgres_url, orphan_upload_seconds=600)
    storage = LocalStorage(settings.data_dir)
    jobs_root = storage.root / storage.JOBS
    jobs_root.mkdir(parents=True)
    for index in range(66_000):  # young: looked up, never deleted
        (jobs_root / f"{index:08d}-0000-4000-8000-000000000000").mkdir()
    with session_factory(settings)() as session:
        kept = make_job(session, status="succeeded")
        job_files(storage, kept.id)
        orphan = storage.job_dir("d1b0e0c4-0000-4000-8000-000000000000")
        orphan.mkdir()
        sweep = Sweep(id=str(uuid.uuid4()), tenant="local", request={}, user_metadata={},
                      cancel_requested=False, artifacts=[])  # fmt: skip
        session.add(sweep)
        session.commit()
        sweep_dirs = [storage.root / storage.sweep_key(i) for i in (sweep.id, str(uuid.uuid4()))]
        for folder in [*sweep_dirs, storage.job_dir(kept.id), orphan]:
            (folder / "artifacts").mkdir(parents=True, exist_ok=True)
            age(folder, 3600)

        report = run_housekeeping(session, settings)

    assert (report.orphan_job_dirs, report.orphan_sweep_dirs) == (1, 1)
    assert not orphan.exists() and storage.job_dir(kept.id).exists()
    assert sweep_dirs[0].exists() and not sweep_dirs[1].exists()
    assert len(list(jobs_root.iterdir())) == 66_001


def test_a_full_validation_line_answers_429_before_the_body_is_read(
    make_settings: SettingsFactory, onnx_model: Path, image_archive: Path
) -> None:
    settings = make_settings(validation_concurrency=1, validation_queue=0)
    app = create_app(settings, sweeper=False)
    gate = app.state.validation_gate
    gate._admitted = 1  # one upload is being validated: the line has no room

    response = post_job(TestClient(app, base_url="http://localhost"), model=onnx_model,
                        data=image_archive)  # fmt: skip

    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "validation_busy"
    assert int(response.headers["Retry-After"]) > 0
    assert not LocalStorage(settings.data_dir).uploads_dir.exists()  # not a byte was stored


def test_an_unreachable_database_is_a_503_not_a_500(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", database_url="postgresql://nobody@127.0.0.1:1/none"
    )

    response = make_client(settings).get("/v1/jobs")

    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "database_unavailable"
    assert "Retry-After" in response.headers
