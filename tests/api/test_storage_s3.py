"""The API on a bucket (STORAGE_URL, moto's server): downloads are streamed from it (with Range)
or redirected to it, and housekeeping reaches it. Uploads, deletion: tests/test_storage_e2e.py."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqakd_client import Client
from sqlalchemy.orm import Session

from api.main import create_app
from core import housekeeping, jobs
from core.db import session_factory
from core.housekeeping import run_housekeeping
from core.models import utcnow
from core.settings import Settings
from core.storage import open_storage
from tests.factories import make_job
from tests.object_storage import bucket_keys
from tests.utils import SettingsFactory, make_client, served_by_uvicorn
from worker.device_agent import Server

CONTENT = bytes(range(256)) * 40


@pytest.fixture
def s3_settings(make_settings: SettingsFactory, bucket: str, moto_endpoint: str) -> Settings:
    return make_settings(storage_url=f"s3://{bucket}/svc", storage_endpoint_url=moto_endpoint)


def stored_artifact(settings: Settings, session: Session, tmp_path: Path) -> str:
    """A succeeded job with one artifact (``CONTENT``) in the bucket; its download URL."""
    job = make_job(session, status="succeeded")
    source = tmp_path / "student.safetensors"
    source.write_bytes(CONTENT)
    jobs.record_artifact(
        session, job.id, open_storage(settings).store_artifact(job.id, source.name, source)
    )
    return f"/v1/jobs/{job.id}/artifacts/student.safetensors"


SIZE = len(CONTENT)


@pytest.mark.parametrize(
    ("headers", "status", "span"),
    [
        ({}, 200, (0, SIZE)),
        ({"Range": "bytes=100-199"}, 206, (100, 200)),
        ({"Range": "bytes=-100"}, 206, (SIZE - 100, SIZE)),
        ({"Range": "bytes=10000-"}, 206, (10000, SIZE)),
        ({"Range": "bytes=0-1,5-6"}, 200, (0, SIZE)),  # several ranges: the whole file
        ({"Range": "bytes=0-9", "If-Range": '"another version"'}, 200, (0, SIZE)),
        ({"Range": f"bytes={SIZE}-"}, 416, None),
    ],
)
def test_downloads_stream_from_the_bucket_with_ranges(
    s3_settings: Settings,
    session: Session,
    tmp_path: Path,
    headers: dict[str, str],
    status: int,
    span: tuple[int, int] | None,
) -> None:
    url = stored_artifact(s3_settings, session, tmp_path)

    response = make_client(s3_settings).get(url, headers=headers)

    assert response.status_code == status
    if span is None:
        assert response.headers["content-range"] == f"bytes */{SIZE}"
        return
    start, end = span
    assert response.content == CONTENT[start:end]
    assert response.headers["x-checksum-sha256"] == hashlib.sha256(CONTENT).hexdigest()
    assert response.headers["content-length"] == str(end - start)
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["content-disposition"] == 'attachment; filename="student.safetensors"'
    if status == 206:
        assert response.headers["content-range"] == f"bytes {start}-{end - 1}/{SIZE}"


def test_downloads_redirect_to_a_presigned_url_when_set(
    make_settings: SettingsFactory, bucket: str, moto_endpoint: str, tmp_path: Path
) -> None:
    settings = make_settings(
        storage_url=f"s3://{bucket}/svc",
        storage_endpoint_url=moto_endpoint,
        storage_download_redirect=True,
    )
    with session_factory(settings)() as session:
        url = stored_artifact(settings, session, tmp_path)

    response = make_client(settings).get(url, follow_redirects=False)

    assert response.status_code == 307
    assert response.headers["x-checksum-sha256"] == hashlib.sha256(CONTENT).hexdigest()
    location = response.headers["location"]
    assert location.startswith(moto_endpoint) and "Signature" in location
    assert httpx.get(location).content == CONTENT  # no API key, no API


def test_housekeeping_cleans_the_bucket(
    make_settings: SettingsFactory,
    bucket: str,
    moto_endpoint: str,
    s3_client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings(
        storage_url=f"s3://{bucket}/svc",
        storage_endpoint_url=moto_endpoint,
        input_retention_days=7,
        orphan_upload_seconds=600,
    )
    storage = open_storage(settings)
    with session_factory(settings)() as session:
        old = make_job(session, status="succeeded", finished_at=utcnow() - dt.timedelta(days=8))
        for key in (storage.inputs_key(old.id), "jobs/orphan/inputs", "resources/orphan"):
            staging = storage.new_upload_dir()
            (staging / "data.zip").write_bytes(b"zip")
            storage.adopt(staging, key)
        storage.put_bytes(storage.artifact_key(old.id, "metrics.json"), b"{}")

        # Right after the files were written: only the expired inputs go.
        report = run_housekeeping(session, settings)
        assert (report.inputs_deleted, report.orphan_job_dirs, report.orphan_resource_dirs) == (
            1,
            0,
            0,
        )
        # An hour later, the folders of no row have been untouched long enough.
        later = time.time() + 3600
        monkeypatch.setattr(housekeeping.time, "time", lambda: later)
        report = run_housekeeping(session, settings)
        assert (report.orphan_job_dirs, report.orphan_resource_dirs) == (1, 1)

    assert bucket_keys(s3_client, bucket) == {f"svc/jobs/{old.id}/artifacts/metrics.json"}


def test_the_client_and_the_device_agent_follow_the_redirect(
    make_settings: SettingsFactory, bucket: str, moto_endpoint: str, tmp_path: Path
) -> None:
    """Both clients download through the 307. (That they do not hand the API key to the bucket
    is httpx's rule for other origins and urllib's unredirected header: moto would not tell.)"""
    key = secrets.token_urlsafe(32)
    settings = make_settings(
        storage_url=f"s3://{bucket}/svc",
        storage_endpoint_url=moto_endpoint,
        storage_download_redirect=True,
        api_keys={key: "acme"},
    )
    with session_factory(settings)() as session:
        job = make_job(session, tenant="acme", status="succeeded")
        source = tmp_path / "model_qdq.onnx"
        source.write_bytes(CONTENT)
        stored = open_storage(settings).store_artifact(job.id, source.name, source)
        jobs.record_artifact(session, job.id, stored)

    with served_by_uvicorn(create_app(settings, sweeper=False), lifespan="off") as port:
        url = f"http://127.0.0.1:{port}"
        with Client(url, api_key=key) as client:
            (sdk_file,) = client.jobs.get(job.id).download(tmp_path / "sdk")
        agent_file = tmp_path / "agent.onnx"
        Server(url, key).download(f"/v1/jobs/{job.id}/artifacts/model_qdq.onnx", agent_file)

    assert sdk_file.read_bytes() == CONTENT and agent_file.read_bytes() == CONTENT
