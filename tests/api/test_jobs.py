"""POST/GET/cancel /v1/jobs and artifact downloads, on the real app, database and Redis."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core import jobs
from core.models import Job
from core.settings import Settings
from core.storage import LocalStorage
from tests.factories import VALID_CONFIG, make_job, post_job
from tests.utils import SettingsFactory, make_client

PRIVATE_FIELDS = ("path", "lease_owner", "lease_expires_at", "tenant", "idempotency_key")


@pytest.fixture
def queued_settings(make_settings: SettingsFactory, redis_db: str, queue_name: str) -> Settings:
    """Settings whose broker is the machine's Redis, on a queue no worker consumes."""
    return make_settings(broker_url=redis_db, train_queue=queue_name)


def queue_length(settings: Settings) -> int:
    client = redis.Redis.from_url(settings.celery_broker_url)
    try:
        return int(client.llen(settings.train_queue))
    finally:
        client.close()


def assert_public(body: dict[str, Any]) -> None:
    text = json.dumps(body)
    for private in PRIVATE_FIELDS:
        assert f'"{private}"' not in text, private


def test_submit_stores_inputs_and_enqueues_after_commit(
    queued_settings: Settings, onnx_model: Path, image_archive: Path
) -> None:
    client = make_client(queued_settings)
    config = VALID_CONFIG | {"preprocessing": VALID_CONFIG["preprocessing"] | {"input_size": None}}

    response = post_job(client, model=onnx_model, data=image_archive, config=config)

    assert response.status_code == 202, response.text
    job = response.json()
    assert_public(job)
    assert job["status"] == "queued" and job["stage"] is None and job["artifacts"] == []
    # input_size came from the model's static input.
    assert job["config"]["preprocessing"]["input_size"] == [16, 16]
    assert job["inputs"]["model"] == {
        "size": onnx_model.stat().st_size,
        "sha256": hashlib.sha256(onnx_model.read_bytes()).hexdigest(),
        "id": None,  # uploaded with the job, not a stored model
    }
    assert queue_length(queued_settings) == 1
    storage = LocalStorage(queued_settings.data_dir)
    assert (storage.inputs_dir(job["id"]) / "model.onnx").read_bytes() == onnx_model.read_bytes()
    assert not any(storage.uploads_dir.iterdir())
    assert client.get(f"/v1/jobs/{job['id']}").json() == job


def test_idempotency_key_returns_the_original_job(
    queued_settings: Settings, session: Session, onnx_model: Path, image_archive: Path
) -> None:
    client = make_client(queued_settings)
    headers = {"Idempotency-Key": "upload-42"}

    first = post_job(client, model=onnx_model, data=image_archive, headers=headers)
    again = post_job(client, model=onnx_model, data=image_archive, headers=headers)

    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"]
    assert session.scalar(select(func.count()).select_from(Job)) == 1
    assert queue_length(queued_settings) == 1
    assert not any(LocalStorage(queued_settings.data_dir).uploads_dir.iterdir())


def test_broker_down_answers_503_and_a_retry_with_the_same_key_submits_anew(
    make_settings: SettingsFactory,
    session: Session,
    redis_db: str,
    queue_name: str,
    onnx_model: Path,
    image_archive: Path,
) -> None:
    down = make_settings(broker_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    headers = {"Idempotency-Key": "retry-me"}

    response = post_job(make_client(down), model=onnx_model, data=image_archive, headers=headers)

    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "broker_unavailable"
    # Nothing is kept of a job the queue refused: no row, no files.
    assert session.scalar(select(func.count()).select_from(Job)) == 0
    storage = LocalStorage(down.data_dir)
    assert not any(storage.uploads_dir.iterdir())
    assert not (storage.root / "jobs").exists() or not any((storage.root / "jobs").iterdir())

    # The broker is back (same data directory and database): the retry is a new job.
    up = make_settings(broker_url=redis_db, train_queue=queue_name)
    again = post_job(make_client(up), model=onnx_model, data=image_archive, headers=headers)

    assert again.status_code == 202, again.text
    assert again.json()["status"] == "queued"
    assert queue_length(up) == 1


def test_cancel_queued_job_at_once(client: httpx.Client, session: Session) -> None:
    job = make_job(session)

    response = client.post(f"/v1/jobs/{job.id}/cancel")

    assert response.status_code == 200
    assert response.json()["status"] == "canceled"
    assert response.json()["finished_at"] is not None
    # Repeating is harmless: a finished job stays as it is.
    assert client.post(f"/v1/jobs/{job.id}/cancel").json()["status"] == "canceled"


def test_cancel_running_job_flags_it(client: httpx.Client, session: Session) -> None:
    job = make_job(session, status="running", lease_owner="w1")

    body = client.post(f"/v1/jobs/{job.id}/cancel").json()

    assert (body["status"], body["cancel_requested"]) == ("running", True)
    assert jobs.is_cancel_requested(session, job.id)


def test_unknown_job_is_404(client: httpx.Client) -> None:
    for method, path in (
        ("GET", "/v1/jobs/nope"),
        ("POST", "/v1/jobs/nope/cancel"),
        ("GET", "/v1/jobs/nope/artifacts"),
        ("GET", "/v1/jobs/nope/artifacts/metrics.json"),
    ):
        response = client.request(method, path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "job_not_found"


def test_list_pages_newest_first(client: httpx.Client, session: Session) -> None:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    created = [make_job(session, created_at=start + dt.timedelta(minutes=i)).id for i in range(5)]
    # Same timestamp: the id breaks the tie, so no job is skipped or repeated.
    created += [make_job(session, created_at=start + dt.timedelta(minutes=9)).id for _ in range(2)]
    make_job(session, tenant="someone-else")

    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/jobs", params=params).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break

    expected = sorted(created[5:], reverse=True) + created[4::-1]
    assert seen == expected


def test_invalid_cursor_and_limit(client: httpx.Client) -> None:
    bad_cursor = client.get("/v1/jobs", params={"cursor": "bm90IGpzb24"})
    assert (bad_cursor.status_code, bad_cursor.json()["error"]["code"]) == (422, "invalid_cursor")
    bad_limit = client.get("/v1/jobs", params={"limit": 1000})
    assert bad_limit.status_code == 422
    assert "query.limit" in bad_limit.json()["error"]["message"]


def test_artifact_download_with_checksum_and_range(
    client: httpx.Client, settings: Settings, session: Session, tmp_path: Path
) -> None:
    job = make_job(session, status="running", lease_owner="w1")
    content = bytes(range(256)) * 40
    source = tmp_path / "student.safetensors"
    source.write_bytes(content)
    stored = LocalStorage(settings.data_dir).store_artifact(job.id, source.name, source)
    jobs.record_artifact(session, job.id, stored)
    digest = hashlib.sha256(content).hexdigest()

    listed = client.get(f"/v1/jobs/{job.id}/artifacts").json()["items"]
    assert [(a["name"], a["size"], a["sha256"]) for a in listed] == [
        ("student.safetensors", len(content), digest)
    ]
    url = f"/v1/jobs/{job.id}/artifacts/student.safetensors"
    full = client.get(url)
    assert full.status_code == 200 and full.content == content
    assert full.headers["x-checksum-sha256"] == digest
    assert full.headers["digest"].startswith("sha-256=")
    part = client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.content == content[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(content)}"
    missing = client.get(f"/v1/jobs/{job.id}/artifacts/model_qdq.onnx")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "artifact_not_found")
