"""/v1/engine-builds: the REST path of TensorRT engine builds, for device agents.

A device that cannot run our stack (a Jetson Nano on JetPack 4.6: Python 3.6) or sits behind
NAT runs ``worker/device_agent.py``, which claims the builds of its target here, downloads
``model_qdq.onnx`` from the job's artifacts, builds and times the engine on the device and
uploads it. The rows are the ones Celery engine workers claim from ``engine.<target>`` queues
(``core.engines``): whichever builder claims first builds.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Response, UploadFile, status
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from api.schemas import (
    EngineClaim,
    EngineClaimed,
    EngineFailure,
    EnginePublic,
    error_responses,
)
from core import engines, jobs
from core.errors import InputError
from core.storage import save_fileobj

router = APIRouter(prefix="/v1/engine-builds", tags=["engines"])

ERRORS = error_responses(
    status.HTTP_401_UNAUTHORIZED,
    status.HTTP_404_NOT_FOUND,
    status.HTTP_409_CONFLICT,
    status.HTTP_413_CONTENT_TOO_LARGE,
    status.HTTP_422_UNPROCESSABLE_CONTENT,
)
REPORT_MAX_BYTES = 64 * 1024


def _agent_name(claim: EngineClaim) -> str:
    """The builder name kept on the row: the agent's own name and TensorRT version."""
    return f"agent:{claim.agent}" + (
        f" (TensorRT {claim.tensorrt_version})" if claim.tensorrt_version else ""
    )


@router.post(
    "/claim",
    response_model=EngineClaimed,
    responses={204: {"description": "no build waits for this target"}, **ERRORS},
)
def claim(body: EngineClaim, session: SessionDep, tenant: TenantDep) -> EngineClaimed | Response:
    build = engines.claim_next(session, tenant, body.target, _agent_name(body))
    if build is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    return EngineClaimed(
        build=EnginePublic.from_row(build),
        model_url=f"/v1/jobs/{build.job_id}/artifacts/model_qdq.onnx",
        lease_seconds=engines.ENGINE_LEASE_SECONDS,
    )


def _parse_report(text: str) -> dict[str, Any]:
    if len(text.encode()) > REPORT_MAX_BYTES:
        raise InputError("invalid_report", f"report is larger than {REPORT_MAX_BYTES} bytes")
    try:
        report = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError("invalid_report", f"report is not JSON: {exc}") from exc
    if not isinstance(report, dict):
        raise InputError("invalid_report", "report must be a JSON object")
    return report


@router.post("/{build_id}/result", response_model=EnginePublic, responses=ERRORS)
async def upload_result(
    build_id: str,
    engine: Annotated[UploadFile, File(description="the serialized TensorRT engine (plan)")],
    report: Annotated[str, Form(description="engine-<target>.json: provenance and timings")],
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    tenant: TenantDep,
) -> EnginePublic:
    build = engines.get_build(session, tenant, build_id)
    parsed = _parse_report(report)
    plan_name, report_name = engines.artifact_names(build.target)
    workdir = storage.work_dir(build.job_id) / f"engine-{build.target}"
    workdir.mkdir(parents=True, exist_ok=True)
    # Capped like a model upload; the agent's name must hold the claim before anything stays.
    await run_in_threadpool(
        save_fileobj,
        engine.file,
        workdir / plan_name,
        settings.max_model_bytes,
        label="engine",
    )
    if build.status != engines.EngineStatus.BUILDING:
        (workdir / plan_name).unlink(missing_ok=True)
        raise engines.EngineBuildNotClaimed(build_id)
    (workdir / report_name).write_text(json.dumps(parsed, indent=2))
    for name in (plan_name, report_name):
        stored = storage.store_artifact(build.job_id, name, workdir / name)
        jobs.record_artifact(session, settings, build.job_id, stored)
    finished = engines.finish_build(session, build_id, build.builder or "", report=parsed)
    return EnginePublic.from_row(finished)


@router.post("/{build_id}/failure", response_model=EnginePublic, responses=ERRORS)
def report_failure(
    build_id: str, body: EngineFailure, session: SessionDep, tenant: TenantDep
) -> EnginePublic:
    build = engines.get_build(session, tenant, build_id)
    if build.status != engines.EngineStatus.BUILDING:
        raise engines.EngineBuildNotClaimed(build_id)
    finished = engines.finish_build(
        session, build_id, build.builder or "", error=(body.code, body.message)
    )
    return EnginePublic.from_row(finished)
