"""Engine builds: the config that asks for them, and their states in the database."""

from __future__ import annotations

import datetime as dt

import pytest
from pydantic import ValidationError
from sqlalchemy.orm import Session

from core import engines
from core.config import JobConfig
from core.models import utcnow
from tests.factories import VALID_CONFIG, make_job

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


def test_claim_build_fail_and_reclaim_after_the_lease(session: Session) -> None:
    job = make_job(session, status="succeeded", config=config_with_targets("x86-sm90"))
    (build,) = engines.create_builds(session, job)
    claimed = engines.claim_build(session, build.id, "worker-a")
    assert claimed is not None and claimed.status == "building" and claimed.builder == "worker-a"
    assert engines.claim_build(session, build.id, "worker-b") is None  # held
    later = utcnow() + dt.timedelta(seconds=engines.ENGINE_LEASE_SECONDS + 1)
    retaken = engines.claim_build(session, build.id, "worker-b", now=later)
    assert retaken is not None and retaken.builder == "worker-b"  # worker-a died
    with pytest.raises(engines.EngineBuildNotClaimed):
        engines.finish_build(session, build.id, "worker-a", error=("build_failed", "late"))
    failed = engines.finish_build(session, build.id, "worker-b", error=("build_failed", "boom"))
    assert failed.status == "failed" and failed.error == {"code": "build_failed", "message": "boom"}
    assert engines.claim_build(session, build.id, "worker-c") is None  # finished


def test_claim_next_serves_the_tenant_and_target_asked_for(session: Session) -> None:
    mine = make_job(session, status="succeeded", config=config_with_targets(*TARGETS))
    theirs = make_job(
        session, tenant="other", status="succeeded", config=config_with_targets(*TARGETS)
    )
    engines.create_builds(session, mine)
    engines.create_builds(session, theirs)
    build = engines.claim_next(session, "local", "x86-sm90", "agent:a")
    assert build is not None and build.job_id == mine.id and build.target == "x86-sm90"
    assert engines.claim_next(session, "local", "x86-sm90", "agent:b") is None  # taken
    assert engines.claim_next(session, "local", "unknown-target", "agent:b") is None
    with pytest.raises(engines.EngineBuildNotFound):
        engines.get_build(session, "other", build.id)
    done = engines.finish_build(session, build.id, "agent:a", report={"device_name": "GPU"})
    assert done.status == "succeeded" and done.report == {"device_name": "GPU"}
