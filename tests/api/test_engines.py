"""The device agents' REST path of engine builds, and engines in GET /v1/jobs/{id}."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from core import engines
from core.settings import Settings
from core.storage import Storage
from tests.core.test_engines import config_with_targets
from tests.factories import make_job

REPORT = {
    "tensorrt_version": "8.2.1",
    "device_name": "NVIDIA Tegra X1",
    "compute_capability": "5.3",
    "l4t": "32.7.1",
    "precision": "int8+fp16",
    "build_flags": ["INT8", "FP16"],
    "builder": "trtexec",
    "timings": {"gpu_compute_mean_ms": 3.2},
}


def succeeded_job(session: Session, *targets: str, tenant: str = "local") -> str:
    job = make_job(session, tenant=tenant, status="succeeded", config=config_with_targets(*targets))
    engines.create_builds(session, job)
    return job.id


def claim(client: TestClient, target: str) -> dict:
    body = {"target": target, "agent": "nano-01", "tensorrt_version": "8.2.1", "device": {}}
    response = client.post("/v1/engine-builds/claim", json=body)
    assert response.status_code in (200, 204), response.text
    return response.json() if response.status_code == 200 else {}


def test_a_waiting_engine_shows_its_queue_and_no_file(client: TestClient, session: Session) -> None:
    job_id = succeeded_job(session, "jetson-nano")
    job = client.get(f"/v1/jobs/{job_id}").json()
    (engine,) = job["engines"]
    assert engine["target"] == "jetson-nano" and engine["status"] == "waiting"
    assert engine["queue"] == "engine.jetson-nano" and engine["builder"] is None
    assert not any(a["name"].startswith("engine-") for a in job["artifacts"])


def test_an_agent_claims_builds_and_uploads_the_engine(
    client: TestClient, session: Session, settings: Settings
) -> None:
    job_id = succeeded_job(session, "jetson-nano")
    assert claim(client, "x86-sm90") == {}  # 204: nothing waits for that target
    claimed = claim(client, "jetson-nano")
    assert claimed["build"]["status"] == "building"
    assert claimed["build"]["builder"] == "agent:nano-01 (TensorRT 8.2.1)"
    assert claimed["model_url"] == f"/v1/jobs/{job_id}/artifacts/model_qdq.onnx"
    assert claim(client, "jetson-nano") == {}  # one builder per build

    build_id = claimed["build"]["id"]
    plan = b"serialized engine bytes"
    response = client.post(
        f"/v1/engine-builds/{build_id}/result",
        files={"engine": ("engine.plan", plan, "application/octet-stream")},
        data={"report": json.dumps(REPORT)},
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded" and response.json()["report"] == REPORT
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["engines"][0]["status"] == "succeeded"
    names = {a["name"] for a in job["artifacts"]}
    assert {"engine-jetson-nano.plan", "engine-jetson-nano.json"} <= names
    assert client.get(f"/v1/jobs/{job_id}/artifacts/engine-jetson-nano.plan").content == plan
    stored = client.get(f"/v1/jobs/{job_id}/artifacts/engine-jetson-nano.json").json()
    assert stored == REPORT
    # a second upload for a finished build is refused, and nothing of it stays
    again = client.post(
        f"/v1/engine-builds/{build_id}/result",
        files={"engine": ("engine.plan", b"other", "application/octet-stream")},
        data={"report": "{}"},
    )
    assert again.status_code == 409 and again.json()["error"]["code"] == "engine_build_not_claimed"
    plan_path = Storage(settings.data_dir).artifact_path(job_id, "engine-jetson-nano.plan")
    assert plan_path.read_bytes() == plan


def test_an_agent_reports_a_failed_build(client: TestClient, session: Session) -> None:
    job_id = succeeded_job(session, "jetson-nano")
    build_id = claim(client, "jetson-nano")["build"]["id"]
    bad_report = client.post(
        f"/v1/engine-builds/{build_id}/result",
        files={"engine": ("engine.plan", b"x", "application/octet-stream")},
        data={"report": "not json"},
    )
    assert bad_report.status_code == 422 and bad_report.json()["error"]["code"] == "invalid_report"
    response = client.post(
        f"/v1/engine-builds/{build_id}/failure",
        json={"code": "build_failed", "message": "trtexec: unsupported layer"},
    )
    assert response.status_code == 200
    engine = client.get(f"/v1/jobs/{job_id}").json()["engines"][0]
    assert engine["status"] == "failed"
    assert engine["error"] == {"code": "build_failed", "message": "trtexec: unsupported layer"}


def test_another_tenants_builds_are_invisible(client: TestClient, session: Session) -> None:
    succeeded_job(session, "jetson-nano", tenant="someone-else")
    assert claim(client, "jetson-nano") == {}
    missing = client.post("/v1/engine-builds/no-such-build/failure", json={"message": "x"})
    assert (
        missing.status_code == 404 and missing.json()["error"]["code"] == "engine_build_not_found"
    )
    bad_target = client.post("/v1/engine-builds/claim", json={"target": "Not A Target"})
    assert bad_target.status_code == 422
