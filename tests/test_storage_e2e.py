"""End to end on object storage: the API and Celery workers, each a process with a data
directory of its own, share only PostgreSQL, Redis and an S3 bucket (moto's server).

One test, in two parts that share the API's start: a multipart job that a worker on another
data directory runs, then, with that worker stopped, a job from stored resources (the dataset
registered from the bucket by URL) that a second worker on a fresh, empty data directory runs.
Deleting the jobs and the dataset empties the bucket of them.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.db import migrate
from core.settings import Settings
from scripts.serve import api_argv, worker_argv
from tests.factories import post_job
from tests.fault_services import API_KEY, TENANT, Process, stack_env
from tests.live_service import TINY_CONFIG
from tests.object_storage import bucket_keys
from tests.utils import free_port, wait_ready

pytestmark = pytest.mark.e2e

JOB_TIMEOUT_S = 240
START_TIMEOUT_S = 90


def wait_for_job(api: httpx.Client, job_id: str, logs: list[Process]) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (job := api.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
        tails = "\n".join(f"=== {p.name} ===\n{p.log_tail()}" for p in logs)
        assert time.monotonic() < deadline, f"job still {job['status']}:\n{tails}"
        time.sleep(0.2)
    return job


def downloaded(api: httpx.Client, job: dict[str, Any]) -> dict[str, bytes]:
    """Every artifact of the job, checked against its recorded size and sha256."""
    files = {}
    for artifact in job["artifacts"]:
        response = api.get(f"/v1/jobs/{job['id']}/artifacts/{artifact['name']}")
        assert response.status_code == 200, response.text
        assert hashlib.sha256(response.content).hexdigest() == artifact["sha256"]
        assert len(response.content) == artifact["size"]
        files[artifact["name"]] = response.content
    return files


def test_workers_share_only_database_broker_and_bucket(
    tmp_path: Path,
    postgres_url: str,
    redis_db: str,
    queue_name: str,
    s3_env: dict[str, str],
    s3_client: Any,
    bucket: str,
    onnx_model: Path,
    image_archive: Path,
) -> None:
    settings = Settings(
        data_dir=tmp_path / "api",
        database_url=postgres_url,
        broker_url=redis_db,
        api_keys={API_KEY: TENANT},
        train_queue=queue_name,
        port=free_port(),
    )
    migrate(settings)
    (tmp_path / "tmp").mkdir()
    env = stack_env(settings) | s3_env

    def worker(name: str) -> Process:
        own = env | {"SQAKD_DATA_DIR": str(tmp_path / name)}
        return Process(name, worker_argv(settings), own, tmp_path / f"{name}.log")

    api_process = Process("api", api_argv(settings), env, tmp_path / "api.log")
    processes = [api_process]
    try:
        assert api_process.popen is not None
        wait_ready(
            f"http://127.0.0.1:{settings.port}",
            api_process.popen,
            START_TIMEOUT_S,
            api_process.log_tail,
        )
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{settings.port}",
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=60,
        )

        # 1. A multipart job: its uploads go to the bucket, a worker elsewhere runs it.
        processes.append(worker("worker-1"))
        submitted = post_job(api, model=onnx_model, data=image_archive, config=TINY_CONFIG)
        assert submitted.status_code == 202, submitted.text
        first = wait_for_job(api, submitted.json()["id"], processes)

        assert first["status"] == "succeeded", f"{first['error']}\n{processes[1].log_tail()}"
        files = downloaded(api, first)
        assert "model_qdq.onnx" in files
        job_keys = bucket_keys(s3_client, bucket, f"service/jobs/{first['id']}/")
        assert {key.split("/", 3)[3] for key in job_keys} == {
            "inputs/model.onnx",
            "inputs/data.zip",
            *(f"artifacts/{name}" for name in files),
        }
        # The API kept nothing on its disk; the worker, its cached inputs and no work folder.
        assert not (settings.data_dir / "jobs").exists()
        assert not any((settings.data_dir / "uploads").iterdir())
        data_sha256 = hashlib.sha256(image_archive.read_bytes()).hexdigest()
        worker_1 = tmp_path / "worker-1"
        assert (worker_1 / "cache" / "objects" / data_sha256 / "data.zip").is_file()
        assert not (worker_1 / "jobs" / first["id"]).exists()

        # 2. A second worker on an empty data directory runs a job from stored resources.
        processes.pop().stop()
        processes.append(worker("worker-2"))
        stored = api.post("/v1/models", files={"file": (onnx_model.name, onnx_model.read_bytes())})
        assert stored.status_code == 201, stored.text
        ids = {"models": stored.json()["id"]}
        # The dataset from the bucket by URL: never sent through the API, copied in server-side.
        s3_client.upload_file(str(image_archive), bucket, "incoming/images.zip")
        stored = api.post("/v1/datasets", json={"url": f"s3://{bucket}/incoming/images.zip"})
        assert stored.status_code == 201, stored.text
        assert stored.json()["sha256"] == data_sha256
        ids["datasets"] = stored.json()["id"]
        body = {"model_id": ids["models"], "data_id": ids["datasets"], "config": TINY_CONFIG}
        submitted = api.post("/v1/jobs", json=body)
        assert submitted.status_code == 202, submitted.text
        second = wait_for_job(api, submitted.json()["id"], processes)

        assert second["status"] == "succeeded", f"{second['error']}\n{processes[1].log_tail()}"
        assert downloaded(api, second).keys() == files.keys()
        cache = tmp_path / "worker-2" / "cache" / "objects"
        assert [file.name for file in (cache / data_sha256).iterdir()] == ["data.zip"]

        # Deletion reaches the bucket.
        for job in (first, second):
            assert api.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert api.delete(f"/v1/datasets/{ids['datasets']}").status_code == 204
        model_keys = bucket_keys(s3_client, bucket, f"service/resources/{ids['models']}/")
        assert model_keys and bucket_keys(s3_client, bucket) == model_keys | {"incoming/images.zip"}
    finally:
        for process in reversed(processes):
            process.stop()
