"""Engine builds through the real service: routing by target queue, and the waiting state.

The production configuration (PostgreSQL, the machine's Redis) runs a job that asks for two
TensorRT targets. A real Celery engine worker, started here, consumes one target's queue only:
it claims that build and, since this machine has no TensorRT, records it failed with
``tensorrt_unavailable``, writing no file. The other target has no worker: its build waits,
its message sits in its own queue, and nothing is written for it, until a device agent's
requests claim it over REST: only its lease token renews, completes or fails it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from core.engines import engine_queue
from tests.factories import VALID_CONFIG, post_job
from tests.production_service import Service
from tests.test_e2e import wait_for_job
from tests.utils import REDIS_TEST_DB, REDIS_URL, REPO_ROOT

pytestmark = pytest.mark.e2e
ENGINE_TIMEOUT_S = 120


@pytest.fixture
def targets() -> Iterator[tuple[str, str]]:
    """Two targets of this test only (the machine's Redis is shared); their queues deleted."""
    suffix = uuid.uuid4().hex[:8]
    served, unserved = f"served-{suffix}", f"unserved-{suffix}"
    yield served, unserved
    client = redis.Redis.from_url(f"{REDIS_URL}/{REDIS_TEST_DB}")
    for target in (served, unserved):
        keys = list(client.scan_iter(f"*{engine_queue(target)}*"))
        if keys:
            client.delete(*keys)
    client.close()


def engine_worker(
    service: Service, env: dict[str, str], target: str, log: Path
) -> subprocess.Popen:
    """``celery worker -Q engine.<target>``, as an engine worker on that device runs it."""
    argv = [
        sys.executable, "-m", "celery", "-A", "worker.app", "worker",
        "--queues", engine_queue(target),
        "--hostname", f"engine-{target}@%h",
        "--pool", "solo", "--without-mingle", "--without-gossip", "--loglevel", "INFO",
    ]  # fmt: skip
    process_env = os.environ | env | {"SQAKD_DATA_DIR": str(service.data_dir)}
    with log.open("wb") as output:
        return subprocess.Popen(
            argv, cwd=REPO_ROOT, env=process_env, stdout=output, stderr=subprocess.STDOUT
        )


def test_engine_builds_go_to_their_target_queue_and_wait_for_a_worker(
    production_service: Service,
    production_env: dict[str, str],
    targets: tuple[str, str],
    onnx_model: Path,
    image_archive: Path,
    tmp_path: Path,
) -> None:
    service, env = production_service, production_env
    served, unserved = targets
    log = tmp_path / "engine-worker.log"
    worker = engine_worker(service, env, served, log)
    try:
        with httpx.Client(base_url=service.url, timeout=60) as api:
            config = VALID_CONFIG | {
                "export": {"tensorrt_targets": [served, unserved], "speed": False}
            }
            response = post_job(api, model=onnx_model, data=image_archive, config=config)
            assert response.status_code == 202, response.text
            job, _ = wait_for_job(api, service, response.json()["id"])
            assert job["status"] == "succeeded", job["error"]
            assert job["config"]["export"]["tensorrt"] is True

            deadline = time.monotonic() + ENGINE_TIMEOUT_S
            while True:
                job = api.get(f"/v1/jobs/{job['id']}").json()
                by_target = {engine["target"]: engine for engine in job["engines"]}
                if by_target[served]["status"] in ("succeeded", "failed"):
                    break
                assert worker.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)

    built = by_target[served]
    assert built["status"] == "failed", built
    assert built["error"]["code"] == "tensorrt_unavailable"
    assert built["builder"].startswith(f"engine-{served}@")  # the worker on that queue took it
    waiting = by_target[unserved]
    assert waiting["status"] == "waiting" and waiting["builder"] is None
    assert waiting["queue"] == f"engine.{unserved}"
    assert not [a for a in job["artifacts"] if a["name"].startswith("engine-")]  # no placeholder
    broker = redis.Redis.from_url(env["BROKER_URL"])
    try:
        assert broker.llen(engine_queue(unserved)) == 1  # its message waits in its own queue
        assert broker.llen(engine_queue(served)) == 0
    finally:
        broker.close()
    # The engine worker built in a folder of its own attempt, and removed it.
    work_dir = service.data_dir / "jobs" / job["id"] / "work"
    assert not list(work_dir.glob(f"engine-{served}*")), list(work_dir.iterdir())

    # A device agent's requests take the waiting build, bound to the claim's lease token.
    with httpx.Client(base_url=service.url, timeout=60) as api:
        claim = api.post("/v1/engine-builds/claim", json={"target": unserved, "agent": "e2e"})
        assert claim.status_code == 200, claim.text
        build_id, token = claim.json()["build"]["id"], claim.json()["lease_token"]
        result = f"/v1/engine-builds/{build_id}/result"
        files = {"engine": ("engine.plan", b"PLAN", "application/octet-stream")}
        report = {"report": json.dumps({"device_name": "e2e"})}
        spoofed = api.post(result, files=files, data=report, headers={"X-Lease-Token": "guess"})
        assert spoofed.status_code == 409, spoofed.text
        renewed = api.post(f"/v1/engine-builds/{build_id}/lease", headers={"X-Lease-Token": token})
        assert renewed.status_code == 200, renewed.text
        uploaded = api.post(result, files=files, data=report, headers={"X-Lease-Token": token})
        assert uploaded.status_code == 200, uploaded.text
        job = api.get(f"/v1/jobs/{job['id']}").json()
        plan = api.get(f"/v1/jobs/{job['id']}/artifacts/engine-{unserved}.plan")
    assert {engine["target"]: engine["status"] for engine in job["engines"]} == {
        served: "failed",
        unserved: "succeeded",
    }
    assert plan.content == b"PLAN"
