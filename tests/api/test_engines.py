"""The device agents' REST path of engine builds, and engines in GET /v1/jobs/{id}."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.openapi.models import OpenAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from core import engines
from core.db import session_factory
from core.models import EngineBuild
from core.settings import Settings
from core.storage import LocalStorage
from tests.core.test_engines import config_with_targets
from tests.factories import VALID_CONFIG, make_job, post_job
from tests.fixtures_paths import unavailable
from tests.utils import SettingsFactory, make_client

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
PLAN = b"serialized engine bytes"


def succeeded_job(session: Session, *targets: str, tenant: str = "local") -> str:
    job = make_job(session, tenant=tenant, status="succeeded", config=config_with_targets(*targets))
    engines.create_builds(session, job)
    return job.id


def claim(client: TestClient, target: str, agent: str = "nano-01") -> dict[str, Any]:
    body = {"target": target, "agent": agent, "tensorrt_version": "8.2.1", "device": {}}
    response = client.post("/v1/engine-builds/claim", json=body)
    assert response.status_code in (200, 204), response.text
    return response.json() if response.status_code == 200 else {}


def lease(claimed: dict[str, Any]) -> dict[str, str]:
    return {"X-Lease-Token": claimed["lease_token"]}


def upload(
    client: TestClient,
    build_id: str,
    headers: dict[str, str],
    plan: bytes = PLAN,
    report: str = json.dumps(REPORT),
) -> Any:
    return client.post(
        f"/v1/engine-builds/{build_id}/result",
        files={"engine": ("engine.plan", plan, "application/octet-stream")},
        data={"report": report},
        headers=headers,
    )


def assert_error(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.text


def nothing_stored(settings: Settings, job_id: str) -> None:
    """No engine artifact of the job, and no staged upload left behind."""
    storage = LocalStorage(settings.data_dir)
    assert not storage.artifact_path(job_id, "engine-jetson-nano.plan").exists()
    assert not storage.artifact_path(job_id, "engine-jetson-nano.json").exists()
    uploads = storage.uploads_dir
    assert not uploads.exists() or not any(uploads.iterdir()), list(uploads.iterdir())


def build_row(settings: Settings, build_id: str) -> EngineBuild:
    with session_factory(settings)() as session:
        build = session.get(EngineBuild, build_id)
        assert build is not None
        return build


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
    assert len(claimed["lease_token"]) >= 40  # the claim's secret
    assert "lease_token" not in claimed["build"]  # never in a build's public view
    assert claim(client, "jetson-nano") == {}  # one builder per build

    build_id = claimed["build"]["id"]
    response = upload(client, build_id, lease(claimed))
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded" and response.json()["report"] == REPORT
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["engines"][0]["status"] == "succeeded"
    names = {a["name"] for a in job["artifacts"]}
    assert {"engine-jetson-nano.plan", "engine-jetson-nano.json"} <= names
    assert client.get(f"/v1/jobs/{job_id}/artifacts/engine-jetson-nano.plan").content == PLAN
    stored = client.get(f"/v1/jobs/{job_id}/artifacts/engine-jetson-nano.json").json()
    assert stored == REPORT
    # a second upload for a finished build is refused, even with its (spent) token
    again = upload(client, build_id, lease(claimed), plan=b"other", report="{}")
    assert_error(again, 409, "engine_build_not_claimed")
    plan_path = LocalStorage(settings.data_dir).artifact_path(job_id, "engine-jetson-nano.plan")
    assert plan_path.read_bytes() == PLAN
    assert not any(LocalStorage(settings.data_dir).uploads_dir.iterdir())


def test_an_agent_reports_a_failed_build(client: TestClient, session: Session) -> None:
    job_id = succeeded_job(session, "jetson-nano")
    claimed = claim(client, "jetson-nano")
    build_id = claimed["build"]["id"]
    bad_report = upload(client, build_id, lease(claimed), plan=b"x", report="not json")
    assert_error(bad_report, 422, "invalid_report")
    response = client.post(
        f"/v1/engine-builds/{build_id}/failure",
        json={"code": "build_failed", "message": "trtexec: unsupported layer"},
        headers=lease(claimed),
    )
    assert response.status_code == 200
    engine = client.get(f"/v1/jobs/{job_id}").json()["engines"][0]
    assert engine["status"] == "failed"
    assert engine["error"] == {"code": "build_failed", "message": "trtexec: unsupported layer"}


def test_another_tenants_builds_are_invisible(client: TestClient, session: Session) -> None:
    succeeded_job(session, "jetson-nano", tenant="someone-else")
    assert claim(client, "jetson-nano") == {}
    missing = client.post(
        "/v1/engine-builds/no-such-build/failure",
        json={"message": "x"},
        headers={"X-Lease-Token": "anything"},
    )
    assert_error(missing, 404, "engine_build_not_found")
    bad_target = client.post("/v1/engine-builds/claim", json={"target": "Not A Target"})
    assert bad_target.status_code == 422


def test_only_the_claimant_can_finish_a_build_and_nothing_else_is_stored(
    client: TestClient, session: Session, settings: Settings
) -> None:
    """Another builder (a second agent of the tenant, after the first one's lease expired, or
    one that never claimed) gets 409 for results, failures and renewals: no file is stored,
    none is left in staging, and the build's provenance stays the claimant's."""
    job_id = succeeded_job(session, "jetson-nano")
    first = claim(client, "jetson-nano", agent="nano-01")
    build_id = first["build"]["id"]
    # The first agent's lease runs out; a second agent takes the build under a new token.
    with session_factory(settings)() as expiring:
        row = expiring.get(EngineBuild, build_id)
        assert row is not None and row.lease_expires_at is not None
        row.lease_expires_at = row.lease_expires_at - dt.timedelta(days=1)
        expiring.commit()
    second = claim(client, "jetson-nano", agent="nano-02")
    assert second["build"]["id"] == build_id and second["lease_token"] != first["lease_token"]

    for headers in (lease(first), {"X-Lease-Token": "guessed"}, {}):
        assert_error(upload(client, build_id, headers), 409, "engine_build_not_claimed")
        failure = client.post(
            f"/v1/engine-builds/{build_id}/failure", json={"message": "spoof"}, headers=headers
        )
        assert_error(failure, 409, "engine_build_not_claimed")
        renewal = client.post(f"/v1/engine-builds/{build_id}/lease", headers=headers)
        assert_error(renewal, 409, "engine_build_not_claimed")
        nothing_stored(settings, job_id)
    row = build_row(settings, build_id)
    assert (row.status, row.builder, row.report) == (
        "building",
        "agent:nano-02 (TensorRT 8.2.1)",
        None,
    )

    assert upload(client, build_id, lease(second)).status_code == 200
    assert build_row(settings, build_id).status == "succeeded"


def test_renewing_extends_the_lease(
    client: TestClient, session: Session, settings: Settings
) -> None:
    succeeded_job(session, "jetson-nano")
    claimed = claim(client, "jetson-nano")
    build_id = claimed["build"]["id"]
    first_expiry = build_row(settings, build_id).lease_expires_at
    assert first_expiry is not None

    renewed = client.post(f"/v1/engine-builds/{build_id}/lease", headers=lease(claimed))

    assert renewed.status_code == 200, renewed.text
    answer = renewed.json()
    assert answer["build_id"] == build_id
    assert answer["lease_seconds"] == engines.ENGINE_LEASE_SECONDS
    expiry = build_row(settings, build_id).lease_expires_at
    assert expiry is not None and expiry > first_expiry
    assert dt.datetime.fromisoformat(answer["lease_expires_at"]) == expiry


def test_a_leftover_partial_file_does_not_break_a_later_upload(
    client: TestClient, session: Session, settings: Settings
) -> None:
    """What a crash (or a dropped connection) leaves of an upload: a later upload succeeds."""
    job_id = succeeded_job(session, "jetson-nano")
    claimed = claim(client, "jetson-nano")
    build_id = claimed["build"]["id"]
    storage = LocalStorage(settings.data_dir)
    # Where the old code wrote the engine, exclusively, before checking the claim.
    leftover = storage.work_dir(job_id) / "engine-jetson-nano" / "engine-jetson-nano.plan"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half an engine")
    # A body that ends inside the engine: 400, and its staged part is gone at once.
    boundary = "b0undary"
    truncated = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="engine"; filename="e.plan"\r\n\r\n'
    ).encode() + b"x" * 10_000
    cut = client.post(
        f"/v1/engine-builds/{build_id}/result",
        content=truncated,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"} | lease(claimed),
    )
    assert_error(cut, 400, "invalid_multipart")
    nothing_stored(settings, job_id)

    response = upload(client, build_id, lease(claimed))

    assert response.status_code == 200, response.text
    assert storage.artifact_path(job_id, "engine-jetson-nano.plan").read_bytes() == PLAN
    assert not any(storage.uploads_dir.iterdir())


def nested(depth: int) -> str:
    """A JSON object nested ``depth`` levels deep, 2 bytes a level (under the 64 KiB caps)."""
    return '{"a": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


@pytest.mark.parametrize("depth", [33, 5_000, 30_000])
def test_a_deeply_nested_report_is_a_422(
    client: TestClient, session: Session, settings: Settings, depth: int
) -> None:
    """Past the report's depth limit, and past Python's recursion limit (a RecursionError in
    json.loads, a 500, before)."""
    job_id = succeeded_job(session, "jetson-nano")
    claimed = claim(client, "jetson-nano")
    report = upload(client, claimed["build"]["id"], lease(claimed), report=nested(depth))
    assert_error(report, 422, "invalid_report")
    assert "nested" in report.json()["error"]["message"]
    nothing_stored(settings, job_id)


@pytest.mark.parametrize("depth", [5_000, 30_000])
def test_a_deeply_nested_claim_is_a_422(client: TestClient, depth: int) -> None:
    body = f'{{"target": "jetson-nano", "device": {nested(depth)}}}'
    response = client.post(
        "/v1/engine-builds/claim", content=body, headers={"Content-Type": "application/json"}
    )
    assert_error(response, 422, "invalid_request")


def test_json_bodies_are_capped_before_parsing(client: TestClient, session: Session) -> None:
    succeeded_job(session, "jetson-nano")
    big = {"target": "jetson-nano", "device": {"note": "x" * 100_000}}
    assert_error(client.post("/v1/engine-builds/claim", json=big), 413, "upload_too_large")
    claimed = claim(client, "jetson-nano")  # the build still waited
    failure = client.post(
        f"/v1/engine-builds/{claimed['build']['id']}/failure",
        json={"message": "x" * 100_000},
        headers=lease(claimed),
    )
    assert_error(failure, 413, "upload_too_large")


@pytest.mark.parametrize("length", [71, 300])
def test_a_multipart_boundary_over_70_characters_is_a_400(
    client: TestClient, session: Session, settings: Settings, length: int
) -> None:
    """RFC 2046 allows 70; python-multipart raised past 256, which was a 500. Both multipart
    routes share the parser."""
    succeeded_job(session, "jetson-nano")
    claimed = claim(client, "jetson-nano")
    boundary = "b" * length
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="report"\r\n\r\n{{}}\r\n'
        f"--{boundary}--\r\n"
    ).encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    for path, extra in (
        (f"/v1/engine-builds/{claimed['build']['id']}/result", lease(claimed)),
        ("/v1/jobs", {}),
    ):
        response = client.post(path, content=body, headers=headers | extra)
        assert_error(response, 400, "invalid_multipart")
        assert "70" in response.json()["error"]["message"]
    assert not any(LocalStorage(settings.data_dir).uploads_dir.glob("*"))


@pytest.fixture
def full_disk(make_settings: SettingsFactory, tmp_path: Path) -> Iterator[Settings]:
    """Settings whose data directory is a 256 KiB tmpfs (the database lies elsewhere)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(data_dir)]
    mounted = subprocess.run(mount, capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        unavailable(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield make_settings(database_url=f"sqlite:///{tmp_path / 'sqakd.db'}")
    finally:
        subprocess.run(["umount", "--lazy", str(data_dir)], check=True)


def test_a_full_disk_is_a_507_and_the_upload_is_removed(
    full_disk: Settings, onnx_model: Path
) -> None:
    client = make_client(full_disk)
    with session_factory(full_disk)() as session:
        succeeded_job(session, "jetson-nano")
    claimed = claim(client, "jetson-nano")
    storage = LocalStorage(full_disk.data_dir)

    engine = upload(client, claimed["build"]["id"], lease(claimed), plan=bytes(1024 * 1024))

    assert_error(engine, 507, "insufficient_storage")
    assert not any(storage.uploads_dir.iterdir())
    assert build_row(full_disk, claimed["build"]["id"]).status == "building"  # may retry
    job = post_job(client, model=onnx_model, data=bytes(1024 * 1024), config=VALID_CONFIG)
    assert_error(job, 507, "insufficient_storage")
    assert not any(storage.uploads_dir.iterdir())
    # The disk is empty again: a small upload fits.
    assert upload(client, claimed["build"]["id"], lease(claimed)).status_code == 200


def test_the_openapi_schema_is_valid_and_documents_the_lease(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    OpenAPI.model_validate(spec)  # FastAPI's own model of an OpenAPI document
    paths = spec["paths"]
    for route in ("lease", "result", "failure"):
        operation = paths[f"/v1/engine-builds/{{build_id}}/{route}"]["post"]
        assert "X-Lease-Token" in {parameter["name"] for parameter in operation["parameters"]}
    claimed = paths["/v1/engine-builds/claim"]["post"]
    assert "target" in claimed["requestBody"]["content"]["application/json"]["schema"]["required"]
    result = paths["/v1/engine-builds/{build_id}/result"]["post"]["requestBody"]["content"]
    assert set(result["multipart/form-data"]["schema"]["properties"]) == {"engine", "report"}
    assert "lease_token" in spec["components"]["schemas"]["EngineClaimed"]["properties"]
