"""Engine builds: the config that asks for them, and their states in the database."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest
from pydantic import ValidationError
from sqlalchemy.orm import Session

from core import engines
from core.config import JobConfig
from core.errors import NotFound
from core.models import EngineBuild, utcnow
from core.settings import Settings
from tests.factories import VALID_CONFIG, make_job
from worker.tasks import lease_heartbeat

TARGETS = ("jetson-orin-nano", "x86-sm90")


def config_with_targets(*targets: str) -> dict:
    return VALID_CONFIG | {"export": {"tensorrt_targets": list(targets)}}


def test_asking_for_targets_turns_on_the_tensorrt_student() -> None:
    config = JobConfig.model_validate(config_with_targets(*TARGETS))
    assert config.export.tensorrt and config.export.tensorrt_targets == TARGETS
    assert not JobConfig().export.tensorrt_targets


@pytest.mark.parametrize(
    ("export", "tensorrt"),
    [
        ({}, True),  # the default exports ONNX, so it trains the TensorRT-compatible student
        ({"onnx": False}, False),
        ({"onnx": False, "tensorrt_targets": ["a"]}, True),
        ({"tensorrt": False}, False),  # the papers' grids, asked for
        ({"onnx": False, "tensorrt": True}, True),
    ],
)
def test_the_tensorrt_student_follows_onnx_export_unless_set(export: dict, tensorrt: bool) -> None:
    config = JobConfig.model_validate(VALID_CONFIG | {"export": export})
    assert config.export.tensorrt is tensorrt
    assert JobConfig.model_validate(config.model_dump(mode="json")) == config


@pytest.mark.parametrize(
    ("export", "message"),
    [
        ({"tensorrt_targets": ["Jetson Nano"]}, "lowercase letters"),
        ({"tensorrt_targets": ["a", "a"]}, "each target once"),
        ({"tensorrt_targets": ["a"], "tensorrt": False}, "need the TensorRT-compatible"),
        ({"tensorrt_targets": [f"t{i}" for i in range(9)]}, "at most 8"),
    ],
)
def test_bad_targets_are_refused(export: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        JobConfig.model_validate(VALID_CONFIG | {"export": export})


def test_a_succeeded_job_gets_one_waiting_build_per_target(session: Session) -> None:
    job = make_job(session, status="succeeded", config=config_with_targets(*TARGETS))
    builds = engines.create_builds(session, job)
    assert sorted(b.target for b in builds) == sorted(TARGETS)
    assert {b.status for b in builds} == {"waiting"}
    session.refresh(job)
    assert engines.create_builds(session, job) == []  # none twice
    assert engines.engine_queue("x86-sm90") == "engine.x86-sm90"


def waiting_build(session: Session, target: str = "x86-sm90") -> EngineBuild:
    job = make_job(session, status="succeeded", config=config_with_targets(target))
    (build,) = engines.create_builds(session, job)
    return build


def test_claim_build_fail_and_reclaim_after_the_lease(session: Session) -> None:
    build = waiting_build(session)
    claimed = engines.claim_build(session, build.id, "worker-a")
    assert claimed is not None
    assert (claimed.build.status, claimed.build.builder) == ("building", "worker-a")
    token_a = claimed.lease_token
    assert engines.claim_build(session, build.id, "worker-b") is None  # held
    later = utcnow() + dt.timedelta(seconds=engines.ENGINE_LEASE_SECONDS + 1)
    retaken = engines.claim_build(session, build.id, "worker-b", now=later)
    assert retaken is not None and retaken.build.builder == "worker-b"  # worker-a died
    token_b = retaken.lease_token
    assert token_b != token_a  # a new claim, a new secret
    with pytest.raises(engines.EngineBuildNotClaimed):
        engines.finish_build(session, build.id, "worker-a", token_a, error=("build_failed", "late"))
    with pytest.raises(engines.EngineBuildNotClaimed):  # worker-a's token under b's name
        engines.finish_build(session, build.id, "worker-b", token_a, error=("build_failed", "x"))
    failed = engines.finish_build(
        session, build.id, "worker-b", token_b, error=("build_failed", "boom")
    )
    assert failed.status == "failed" and failed.error == {"code": "build_failed", "message": "boom"}
    assert failed.lease_token_sha256 is None  # the token dies with the claim
    assert engines.claim_build(session, build.id, "worker-c") is None  # finished


def test_a_claim_is_bound_to_its_builder_and_token(session: Session) -> None:
    build = waiting_build(session)
    claimed = engines.claim_build(session, build.id, "agent:nano")
    assert claimed is not None
    token = claimed.lease_token
    assert len(token) >= 40  # 32 random bytes
    # The row keeps its sha256 alone: a reader of the database has nothing to present.
    assert claimed.build.lease_token_sha256 == engines.token_sha256(token) != token
    for builder, wrong_token in (("agent:nano", "not-the-token"), ("agent:other", token)):
        assert engines.renew_build_lease(session, build.id, builder, wrong_token) is None
        with pytest.raises(engines.EngineBuildNotClaimed):
            engines.finish_build(session, build.id, builder, wrong_token, report={"x": 1})
    for presented in (None, "", "not-the-token", token + "x"):
        with pytest.raises(engines.EngineBuildNotClaimed):
            engines.held_build(session, "local", build.id, presented)
    with pytest.raises(NotFound):  # another tenant's build, even with its token
        engines.held_build(session, "other", build.id, token)
    assert engines.held_build(session, "local", build.id, token).id == build.id
    row = session.get(EngineBuild, build.id, populate_existing=True)
    assert row is not None and (row.status, row.report) == ("building", None)  # untouched


def test_renewing_extends_the_lease_until_the_claim_is_over(session: Session) -> None:
    build = waiting_build(session)
    claimed = engines.claim_build(session, build.id, "agent:nano")
    assert claimed is not None
    first_expiry = claimed.build.lease_expires_at
    assert first_expiry is not None
    later = utcnow() + dt.timedelta(seconds=engines.ENGINE_LEASE_SECONDS - 10)
    renewed = engines.renew_build_lease(
        session, build.id, "agent:nano", claimed.lease_token, now=later
    )
    assert renewed == later + dt.timedelta(seconds=engines.ENGINE_LEASE_SECONDS)
    row = session.get(EngineBuild, build.id, populate_existing=True)
    assert row is not None and row.lease_expires_at == renewed and renewed > first_expiry
    # Where the first lease would have run out, the renewed one holds the build.
    expired_before = first_expiry + dt.timedelta(seconds=1)
    assert engines.claim_build(session, build.id, "agent:b", now=expired_before) is None
    engines.finish_build(session, build.id, "agent:nano", claimed.lease_token, report={})
    assert engines.renew_build_lease(session, build.id, "agent:nano", claimed.lease_token) is None


def test_the_engine_workers_heartbeat_renews_and_notices_a_lost_lease(
    session: Session, settings: Settings
) -> None:
    """worker.tasks.lease_heartbeat with the engine worker's renewal, at a short interval."""
    build = waiting_build(session)
    claimed = engines.claim_build(session, build.id, "worker-a")
    assert claimed is not None
    token, first_expiry = claimed.lease_token, claimed.build.lease_expires_at
    renewals: list[bool] = []

    def renew(heartbeat_session: Session) -> bool:
        renewed = engines.renew_build_lease(heartbeat_session, build.id, "worker-a", token)
        renewals.append(renewed is not None)
        return renewed is not None

    lease_lost = threading.Event()
    with lease_heartbeat(settings, f"engine build {build.id}", renew, 0.05, lease_lost):
        deadline = time.monotonic() + 10
        while len(renewals) < 2:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.02)
        row = session.get(EngineBuild, build.id, populate_existing=True)
        assert row is not None and row.lease_expires_at is not None
        assert first_expiry is not None and row.lease_expires_at > first_expiry
        # The lease runs out anyway (a stalled builder) and another builder takes the build.
        later = utcnow() + dt.timedelta(seconds=2 * engines.ENGINE_LEASE_SECONDS)
        assert engines.claim_build(session, build.id, "worker-b", now=later) is not None
        assert lease_lost.wait(10), "the heartbeat did not notice"
    assert renewals[-1] is False and lease_lost.is_set()


def test_claim_next_serves_the_tenant_and_target_asked_for(session: Session) -> None:
    mine = make_job(session, status="succeeded", config=config_with_targets(*TARGETS))
    theirs = make_job(
        session, tenant="other", status="succeeded", config=config_with_targets(*TARGETS)
    )
    engines.create_builds(session, mine)
    engines.create_builds(session, theirs)
    claim = engines.claim_next(session, "local", "x86-sm90", "agent:a")
    assert claim is not None
    build = claim.build
    assert build.job_id == mine.id and build.target == "x86-sm90"
    assert engines.claim_next(session, "local", "x86-sm90", "agent:b") is None  # taken
    assert engines.claim_next(session, "local", "unknown-target", "agent:b") is None
    with pytest.raises(NotFound):
        engines.get_build(session, "other", build.id)
    done = engines.finish_build(
        session, build.id, "agent:a", claim.lease_token, report={"device_name": "GPU"}
    )
    assert done.status == "succeeded" and done.report == {"device_name": "GPU"}
