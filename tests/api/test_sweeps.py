"""/v1/sweeps on the real app, database, Redis and files: create, read, cancel, delete, and the
report a sweep stores once its jobs are final."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.main import sweep as recovery_sweep
from core import jobs, sweeps
from core.intake import inspect_dataset, inspect_model
from core.models import Job, Sweep
from core.resources import store_resource
from core.settings import Settings
from core.storage import LocalStorage, hash_file
from scripts.serve import worker_argv
from tests.api import test_jobs
from tests.core.test_sweeps import realistic_metrics
from tests.factories import VALID_CONFIG
from tests.fault_services import Process, stack_env
from tests.utils import SettingsFactory, make_client

# Settings whose broker is the machine's Redis, on a queue no worker consumes (test_jobs').
queued_settings = test_jobs.queued_settings
queue_length = test_jobs.queue_length

BITS = {"weight_bits": [8, 4, 2], "activation_bits": [8, 4, 2]}
OTHER_KEY = "b" * 40
E2E_TIMEOUT_S = 120


def store(session: Session, settings: Settings, kind: str, source: Path, tenant: str) -> str:
    """A stored model or dataset, as POST /v1/models and /v1/datasets leave it."""
    upload_dir = LocalStorage(settings.data_dir).new_upload_dir()
    copy = Path(shutil.copy(source, upload_dir / source.name))
    inspect = inspect_model if kind == "model" else inspect_dataset
    resource, _ = store_resource(
        session,
        settings,
        tenant,
        kind,  # type: ignore[arg-type]
        upload_dir,
        hash_file(copy),
        source.name,
        lambda path: inspect(str(path)),
    )
    return resource.id


@pytest.fixture
def inputs(
    session: Session, queued_settings: Settings, onnx_model: Path, image_archive: Path
) -> dict[str, Any]:
    """A sweep request's resources: the tiny model, its images (labelled, so top-1 exists)."""
    data_id = store(session, queued_settings, "dataset", image_archive, "local")
    return {
        "model_id": store(session, queued_settings, "model", onnx_model, "local"),
        "data_id": data_id,
        "eval_data_id": data_id,
        "base_config": VALID_CONFIG | {"export": {"speed": False}},
    }


@pytest.fixture
def api(queued_settings: Settings) -> httpx.Client:
    return make_client(queued_settings)


def create(api: httpx.Client, inputs: dict[str, Any], **body: Any) -> dict[str, Any]:
    response = api.post("/v1/sweeps", json=inputs | body)
    assert response.status_code == 202, response.text
    return response.json()


def count(session: Session, table: type) -> int:
    return int(session.scalar(select(func.count()).select_from(table)) or 0)


def test_a_grid_becomes_one_queued_job_per_configuration(
    api: httpx.Client,
    session: Session,
    queued_settings: Settings,
    inputs: dict[str, Any],
) -> None:
    grid = BITS | {"method": ["lsq"]}

    sweep = create(api, inputs, grid=grid, metadata={"experiment": "bits"})

    assert sweep["status"] == "running" and sweep["completed_at"] is None
    assert sweep["counts"] == {
        "queued": 3,
        "running": 0,
        "succeeded": 0,
        "failed": 0,
        "canceled": 0,
    }
    assert [row["label"] for row in sweep["rows"]] == ["W8A8 lsq", "W4A4 lsq", "W2A2 lsq"]
    assert sweep["rows"][1]["config"] == {"weight_bits": 4, "activation_bits": 4, "method": "lsq"}
    assert not any(row["pareto"] for row in sweep["rows"]) and sweep["artifacts"] == []
    assert sweep["grid"] == grid and sweep["metadata"] == {"experiment": "bits"}
    assert queue_length(queued_settings) == 3  # each job sent after the commit
    job = api.get(f"/v1/jobs/{sweep['rows'][2]['job_id']}").json()
    assert job["sweep_id"] == sweep["id"] and job["status"] == "queued"
    assert job["metadata"] == {"experiment": "bits", "sweep_id": sweep["id"]}
    assert (job["config"]["weight_bits"], job["config"]["epochs"]) == (2, 1)
    assert job["inputs"]["model"]["id"] == inputs["model_id"]
    assert api.get(f"/v1/sweeps/{sweep['id']}").json() == sweep


def test_explicit_configs_merge_over_the_base_config(
    api: httpx.Client, inputs: dict[str, Any]
) -> None:
    configs = [{"weight_bits": 8, "activation_bits": 8}, {"method": "ewgs", "epochs": 2}]

    sweep = create(api, inputs, configs=configs)

    assert [row["label"] for row in sweep["rows"]] == ["W8A8 lsq epochs=1", "W4A4 ewgs epochs=2"]


@pytest.mark.parametrize(
    ("body", "status", "code", "words"),
    [
        ({"grid": {"weight_bits": [8, 4], "activation_bits": [8]}}, 422, "invalid_sweep", "length"),
        ({"grid": {"seed": [1, 2, 3]}}, 422, "sweep_too_large", "at most 2"),
        ({"grid": {"weight_bits": [4, 9]}}, 422, "invalid_config", "configuration 2 of 2"),
        ({"grid": {"seed": [1]}, "model_id": "nope"}, 404, "model_not_found", "nope"),
        ({"grid": {"seed": [1]}, "surprise": 1}, 422, "invalid_request", "surprise"),
        ({"configs": [{"seed": 1}], "metadata": {"bad key!": "x"}}, 422, "invalid_request", ""),
    ],
)
def test_a_bad_sweep_is_refused_and_creates_nothing(
    make_settings: SettingsFactory,
    session: Session,
    inputs: dict[str, Any],
    redis_db: str,
    queue_name: str,
    body: dict[str, Any],
    status: int,
    code: str,
    words: str,
) -> None:
    settings = make_settings(broker_url=redis_db, train_queue=queue_name, max_sweep_jobs=2)

    response = make_client(settings).post("/v1/sweeps", json=inputs | body)

    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert words in response.json()["error"]["message"]
    assert (count(session, Sweep), count(session, Job)) == (0, 0)


@pytest.mark.parametrize(
    ("quota", "status", "code"),
    [
        ({"max_active_jobs_per_tenant": 2}, 429, "too_many_active_jobs"),  # 3 jobs asked for
        ({"max_stored_bytes_per_tenant": 1}, 413, "storage_quota_exceeded"),
    ],
)
def test_quotas_count_every_job_of_the_sweep(
    make_settings: SettingsFactory,
    session: Session,
    inputs: dict[str, Any],
    redis_db: str,
    queue_name: str,
    quota: dict[str, int],
    status: int,
    code: str,
) -> None:
    settings = make_settings(broker_url=redis_db, train_queue=queue_name, **quota)

    response = make_client(settings).post("/v1/sweeps", json=inputs | {"grid": BITS})

    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert count(session, Job) == 0


def test_an_idempotency_key_replays_the_sweep_and_makes_no_jobs(
    api: httpx.Client, session: Session, queued_settings: Settings, inputs: dict[str, Any]
) -> None:
    key = {"Idempotency-Key": "sweep-bits"}
    first = api.post("/v1/sweeps", json=inputs | {"grid": BITS}, headers=key)
    assert first.status_code == 202, first.text
    assert api.post(f"/v1/jobs/{first.json()['rows'][0]['job_id']}/cancel").status_code == 200

    again = api.post("/v1/sweeps", json=inputs | {"grid": BITS}, headers=key)

    assert again.status_code == 200, again.text
    # The sweep as it is now: the same one, with its job canceled since.
    assert again.json() == api.get(f"/v1/sweeps/{first.json()['id']}").json()
    assert again.json()["counts"]["canceled"] == 1
    assert (count(session, Sweep), count(session, Job)) == (1, 3)
    assert queue_length(queued_settings) == 3  # each job sent once, by the first request


def test_concurrent_requests_with_one_key_make_one_sweep(
    api: httpx.Client, session: Session, queued_settings: Settings, inputs: dict[str, Any]
) -> None:
    """Four requests released at once: lookups that all miss meet at the unique constraint
    (tests/core/test_idempotency.py makes that race happen for certain, on PostgreSQL)."""
    requests = 4
    start = threading.Barrier(requests)

    def post(_: int) -> httpx.Response:
        start.wait()
        body = inputs | {"grid": BITS}
        return api.post("/v1/sweeps", json=body, headers={"Idempotency-Key": "together"})

    with ThreadPoolExecutor(requests) as pool:
        responses = list(pool.map(post, range(requests)))

    assert sorted(r.status_code for r in responses) == [200, 200, 200, 202], responses
    assert len({r.json()["id"] for r in responses}) == 1
    assert (count(session, Sweep), count(session, Job)) == (1, 3)
    assert queue_length(queued_settings) == 3


def test_a_sweep_whose_jobs_finish_stores_its_report_once(
    api: httpx.Client, session: Session, queued_settings: Settings, inputs: dict[str, Any]
) -> None:
    sweep = create(api, inputs, grid={"weight_bits": [8, 4, 2], "activation_bits": [8, 4, 2]})
    outcomes = [
        realistic_metrics(0.99, 0.95, 25_000, 0.31),
        realistic_metrics(0.98, 0.94, 14_000, 0.29),
        None,  # failed
    ]
    for row, metrics in zip(sweep["rows"], outcomes, strict=True):
        assert jobs.claim_job(session, row["job_id"], "w", 60) is not None
        if metrics is None:
            jobs.fail(session, row["job_id"], "w", "internal_error", "the job failed")
        else:
            jobs.succeed(session, row["job_id"], "w", metrics)
    # What the worker's hook does after the last job's final state:
    sweeps.finish_sweep_of(session, queued_settings, sweep["id"])

    done = api.get(f"/v1/sweeps/{sweep['id']}").json()

    assert done["status"] == "completed" and done["completed_at"] is not None
    assert done["counts"]["succeeded"] == 2 and done["counts"]["failed"] == 1
    assert done["pareto_metric"] == "student_top1"
    rows = {row["label"]: row for row in done["rows"]}
    assert rows["W4A4 lsq"] | {"job_id": None} == {
        "job_id": None,
        "label": "W4A4 lsq",
        "config": {"weight_bits": 4, "activation_bits": 4},
        "status": "succeeded",
        "agreement": 0.98,
        "student_top1": 0.94,
        "packed_bytes": 14_000,
        "int8_latency_ms": 0.29,
        "error": None,
        "pareto": True,
    }
    assert rows["W8A8 lsq"]["pareto"] and not rows["W2A2 lsq"]["pareto"]
    assert rows["W2A2 lsq"]["error"] == {"code": "internal_error", "message": "the job failed"}
    assert done["recommended_job_id"] == rows["W4A4 lsq"]["job_id"]
    for artifact in done["artifacts"]:
        download = api.get(f"/v1/sweeps/{sweep['id']}/artifacts/{artifact['name']}")
        assert download.status_code == 200
        assert hashlib.sha256(download.content).hexdigest() == artifact["sha256"]
        assert download.headers["X-Checksum-SHA256"] == artifact["sha256"]
        assert "sandbox" in download.headers["Content-Security-Policy"]
    assert {a["name"] for a in done["artifacts"]} == {"report.html", "pareto.svg"}
    report = api.get(f"/v1/sweeps/{sweep['id']}/artifacts/report.html")
    assert report.headers["content-type"].startswith("text/html")
    assert "W4A4 lsq" in report.text and "internal_error" in report.text
    # Once: a second completion (the recovery loop) changes nothing, nor does a late cancel.
    assert sweeps.complete_finished(session, queued_settings) == 0
    assert api.post(f"/v1/sweeps/{sweep['id']}/cancel").json() == done
    assert api.get(f"/v1/sweeps/{sweep['id']}").json() == done
    missing = api.get(f"/v1/sweeps/{sweep['id']}/artifacts/model_qdq.onnx")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "artifact_not_found"


def test_cancel_cancels_its_jobs_and_a_canceled_sweep_still_reports(
    api: httpx.Client, session: Session, queued_settings: Settings, inputs: dict[str, Any]
) -> None:
    sweep = create(api, inputs, grid=BITS)
    running = sweep["rows"][0]["job_id"]
    assert jobs.claim_job(session, running, "w", 60) is not None

    canceled = api.post(f"/v1/sweeps/{sweep['id']}/cancel").json()

    assert canceled["status"] == "canceled" and canceled["cancel_requested"]
    assert canceled["counts"] == {
        "queued": 0,
        "running": 1,  # stops at its next step
        "succeeded": 0,
        "failed": 0,
        "canceled": 2,
    }
    assert canceled["completed_at"] is None
    assert api.get(f"/v1/jobs/{running}").json()["cancel_requested"]
    # The worker stops the running one; its hook completes the sweep.
    assert jobs.cancel(session, running, "w")
    sweeps.finish_sweep_of(session, queued_settings, sweep["id"])
    done = api.get(f"/v1/sweeps/{sweep['id']}").json()
    assert done["status"] == "canceled" and done["completed_at"] is not None
    svg = api.get(f"/v1/sweeps/{sweep['id']}/artifacts/pareto.svg")
    assert svg.status_code == 200 and "no succeeded job to plot" in svg.text


def test_canceling_a_sweeps_last_queued_job_completes_the_sweep(
    api: httpx.Client, inputs: dict[str, Any]
) -> None:
    sweep = create(api, inputs, configs=[{"seed": 1}])

    api.post(f"/v1/jobs/{sweep['rows'][0]['job_id']}/cancel")

    done = api.get(f"/v1/sweeps/{sweep['id']}").json()
    assert done["status"] == "completed" and len(done["artifacts"]) == 2


def test_delete_refuses_while_a_job_runs_then_removes_jobs_and_report(
    api: httpx.Client, session: Session, queued_settings: Settings, inputs: dict[str, Any]
) -> None:
    sweep = create(api, inputs, grid={"seed": [1, 2]})
    running = sweep["rows"][0]["job_id"]
    assert jobs.claim_job(session, running, "w", 60) is not None

    refused = api.delete(f"/v1/sweeps/{sweep['id']}")

    assert refused.status_code == 409 and refused.json()["error"]["code"] == "sweep_running"
    api.post(f"/v1/sweeps/{sweep['id']}/cancel")
    assert jobs.cancel(session, running, "w")
    sweeps.finish_sweep_of(session, queued_settings, sweep["id"])
    storage = LocalStorage(queued_settings.data_dir)
    report_dir = storage.absolute(storage.sweep_key(sweep["id"]))
    assert report_dir.is_dir()

    assert api.delete(f"/v1/sweeps/{sweep['id']}").status_code == 204

    assert api.get(f"/v1/sweeps/{sweep['id']}").status_code == 404
    assert (count(session, Sweep), count(session, Job)) == (0, 0)
    assert not report_dir.exists()
    # The stored resources stay: other jobs and sweeps may use them.
    assert api.post("/v1/sweeps", json=inputs | {"grid": {"seed": [3]}}).status_code == 202


def test_sweeps_list_newest_first_in_pages_and_belong_to_their_tenant(
    make_settings: SettingsFactory,
    session: Session,
    redis_db: str,
    queue_name: str,
    onnx_model: Path,
    image_archive: Path,
) -> None:
    settings = make_settings(
        broker_url=redis_db, train_queue=queue_name, api_keys={"a" * 40: "ana", OTHER_KEY: "bo"}
    )
    ana = make_client(settings)
    ana.headers["Authorization"] = f"Bearer {'a' * 40}"
    bo = make_client(settings)
    bo.headers["Authorization"] = f"Bearer {OTHER_KEY}"
    data_id = store(session, settings, "dataset", image_archive, "ana")
    body = {
        "model_id": store(session, settings, "model", onnx_model, "ana"),
        "data_id": data_id,
        "base_config": VALID_CONFIG,
    }
    first = create(ana, body, grid={"seed": [1]})
    second = create(ana, body, grid={"seed": [2]})

    page = ana.get("/v1/sweeps", params={"limit": 1}).json()
    rest = ana.get("/v1/sweeps", params={"limit": 1, "cursor": page["next_cursor"]}).json()

    assert [s["id"] for s in page["items"] + rest["items"]] == [second["id"], first["id"]]
    assert rest["next_cursor"] is None
    assert bo.get("/v1/sweeps").json()["items"] == []
    for request in (
        bo.get(f"/v1/sweeps/{first['id']}"),
        bo.post(f"/v1/sweeps/{first['id']}/cancel"),
        bo.delete(f"/v1/sweeps/{first['id']}"),
    ):
        assert request.status_code == 404 and request.json()["error"]["code"] == "sweep_not_found"
    # Bo cannot sweep Ana's resources either.
    assert bo.post("/v1/sweeps", json=body | {"grid": {"seed": [1]}}).status_code == 404


def test_a_broker_that_is_down_leaves_the_jobs_queued_for_the_recovery_loop(
    make_settings: SettingsFactory, session: Session, inputs: dict[str, Any]
) -> None:
    down = make_settings(broker_url="redis://127.0.0.1:1/0")  # nothing listens on port 1

    response = make_client(down).post("/v1/sweeps", json=inputs | {"grid": {"seed": [1, 2]}})

    assert response.status_code == 202, response.text
    assert [row["status"] for row in response.json()["rows"]] == ["queued", "queued"]
    assert jobs.queued_job_ids(session) == [row["job_id"] for row in response.json()["rows"]]


@pytest.fixture
def real_worker(queued_settings: Settings, tmp_path: Path) -> Iterator[Process]:
    """A Celery worker process on the test's queue, as ``make serve`` starts it; it boots
    (seconds: torch) while the next fixtures run."""
    worker = Process(
        "worker", worker_argv(queued_settings), stack_env(queued_settings), tmp_path / "worker.log"
    )
    try:
        yield worker
    finally:
        worker.stop()


@pytest.mark.e2e
def test_a_real_worker_runs_a_sweep_to_its_report(
    real_worker: Process, api: httpx.Client, inputs: dict[str, Any]
) -> None:
    """The worker trains both configurations; its own hook stores the report when the last
    job ends (this app runs no recovery loop)."""
    base = {k: v for k, v in inputs["base_config"].items() if k != "epochs"} | {"steps": 2}
    sweep = create(api, inputs | {"base_config": base}, grid={"weight_bits": [8, 4]})
    deadline = time.monotonic() + E2E_TIMEOUT_S
    while (done := api.get(f"/v1/sweeps/{sweep['id']}").json())["completed_at"] is None:
        assert time.monotonic() < deadline, f"{done['counts']}\n{real_worker.log_tail()}"
        time.sleep(0.2)

    assert done["status"] == "completed", real_worker.log_tail()
    assert [row["status"] for row in done["rows"]] == ["succeeded", "succeeded"]
    assert [row["label"] for row in done["rows"]] == ["W8A4 lsq", "W4A4 lsq"]
    assert all(row["packed_bytes"] and row["student_top1"] is not None for row in done["rows"])
    assert done["rows"][0]["packed_bytes"] > done["rows"][1]["packed_bytes"]
    assert any(row["pareto"] for row in done["rows"])
    report = api.get(f"/v1/sweeps/{sweep['id']}/artifacts/report.html")
    recorded = {a["name"]: a["sha256"] for a in done["artifacts"]}
    assert hashlib.sha256(report.content).hexdigest() == recorded["report.html"]
    assert sweep["id"] in report.text and "W4A4 lsq" in report.text


def test_the_api_recovery_loop_completes_a_sweep_whose_last_job_ended_elsewhere(
    api: httpx.Client, session: Session, queued_settings: Settings, inputs: dict[str, Any]
) -> None:
    sweep = create(api, inputs, grid={"seed": [1]})
    job_id = sweep["rows"][0]["job_id"]
    assert jobs.claim_job(session, job_id, "w", 60) is not None
    assert jobs.fail(session, job_id, "w", "worker_lost", "the worker died")  # no hook ran

    recovery_sweep(queued_settings, include_queued=False)

    done = api.get(f"/v1/sweeps/{sweep['id']}").json()
    assert done["completed_at"] is not None and len(done["artifacts"]) == 2
