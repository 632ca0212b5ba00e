"""/v1/engine-builds: the REST path of TensorRT engine builds, for device agents.

A device that cannot run our stack (a Jetson Nano on JetPack 4.6: Python 3.6) or sits behind
NAT runs ``worker/device_agent.py``, which claims the builds of its target here, downloads
``model_qdq.onnx`` from the job's artifacts, builds and times the engine on the device and
uploads it. The rows are the ones Celery engine workers claim from ``engine.<target>`` queues
(``core.engines``): whichever builder claims first builds.

A claim's answer carries a secret ``lease_token``. The agent sends it as ``X-Lease-Token`` to
renew its lease while it builds (``POST /{id}/lease``) and with its result or failure; it is
checked from the headers, before any of the body is read. The routes declare no body for
FastAPI to buffer: ``api.uploads`` streams the engine to disk under a cap and reads JSON under
a small one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response, status
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, TenantDep
from api.schemas import (
    EngineClaim,
    EngineClaimed,
    EngineFailure,
    EngineLease,
    EnginePublic,
    ErrorBody,
    error_responses,
)
from api.uploads import FormField, disk_full_is_507, receive_form, receive_json
from core import engines
from core.errors import InputError
from core.models import EngineBuild
from core.settings import Settings
from core.storage import Storage

router = APIRouter(prefix="/v1/engine-builds", tags=["engines"])

ERRORS = error_responses(
    status.HTTP_400_BAD_REQUEST,
    status.HTTP_401_UNAUTHORIZED,
    status.HTTP_404_NOT_FOUND,
    status.HTTP_409_CONFLICT,
    status.HTTP_413_CONTENT_TOO_LARGE,
    status.HTTP_422_UNPROCESSABLE_CONTENT,
)
REPORT_MAX_BYTES = 64 * 1024
REPORT_MAX_DEPTH = 32  # how deep the report's JSON may nest; provenance and timings need 3
RESULT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["engine", "report"],
                    "properties": {
                        "engine": {
                            "type": "string",
                            "format": "binary",
                            "description": "the serialized TensorRT engine (plan)",
                        },
                        "report": {
                            "type": "string",
                            "description": "engine-<target>.json: provenance and timings (JSON)",
                        },
                    },
                }
            }
        },
    }
}

LeaseToken = Annotated[
    str | None,
    Header(alias="X-Lease-Token", description="the lease_token of the build's claim"),
]


@dataclass(frozen=True)
class HeldBuild:
    """A build whose claim the caller showed it holds."""

    build: EngineBuild
    builder: str
    lease_token: str


def get_held_build(
    build_id: str, session: SessionDep, tenant: TenantDep, lease_token: LeaseToken = None
) -> HeldBuild:
    """The build, if ``X-Lease-Token`` is its claim's: from the path and headers alone, so
    before the route reads a byte of the body (404: no such build of the tenant; 409: not
    held under this token)."""
    build = engines.held_build(session, tenant, build_id, lease_token)
    assert build.builder is not None and lease_token is not None  # a held build has both
    session.commit()  # no connection held while the body arrives (an engine over a slow link)
    return HeldBuild(build, build.builder, lease_token)


HeldBuildDep = Annotated[HeldBuild, Depends(get_held_build)]


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI of a JSON body that the route reads itself (``api.uploads.receive_json``)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _agent_name(claim: EngineClaim) -> str:
    """The builder name kept on the row: the agent's own name and TensorRT version."""
    return f"agent:{claim.agent}" + (
        f" (TensorRT {claim.tensorrt_version})" if claim.tensorrt_version else ""
    )


@router.post(
    "/claim",
    response_model=EngineClaimed,
    responses={204: {"description": "no build waits for this target"}, **ERRORS},
    openapi_extra=_json_body(EngineClaim),
)
async def claim(
    request: Request, session: SessionDep, tenant: TenantDep
) -> EngineClaimed | Response:
    """Take the oldest waiting build of a target; its answer holds the claim's lease token."""
    body = await receive_json(request, EngineClaim)
    claim = await run_in_threadpool(
        engines.claim_next, session, tenant, body.target, _agent_name(body)
    )
    if claim is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    return EngineClaimed(
        build=EnginePublic.from_row(claim.build),
        model_url=f"/v1/jobs/{claim.build.job_id}/artifacts/model_qdq.onnx",
        lease_seconds=engines.ENGINE_LEASE_SECONDS,
        lease_token=claim.lease_token,
    )


@router.post("/{build_id}/lease", response_model=EngineLease, responses=ERRORS)
def renew_lease(held: HeldBuildDep, session: SessionDep) -> EngineLease:
    """Keep a build while it is being built: renew well within ``lease_seconds``, or another
    builder may take it."""
    expires_at = engines.renew_build_lease(session, held.build.id, held.builder, held.lease_token)
    if expires_at is None:  # finished, or taken, since the check a moment ago
        raise engines.EngineBuildNotClaimed(held.build.id)
    return EngineLease(
        build_id=held.build.id,
        lease_seconds=engines.ENGINE_LEASE_SECONDS,
        lease_expires_at=expires_at,
    )


def _nesting(value: Any) -> int:
    """How deep lists and objects nest in ``value`` (0 for a scalar), without recursing."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in item)
    return deepest


def parse_report(raw: bytes) -> dict[str, Any]:
    """The ``report`` field: a JSON object, nested at most ``REPORT_MAX_DEPTH`` deep (deeper
    JSON would overflow a recursive parser or serializer somewhere on its way to the row)."""
    try:
        report = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise InputError("invalid_report", f"report is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise InputError("invalid_report", "report is nested too deeply") from exc
    if not isinstance(report, dict):
        raise InputError("invalid_report", "report must be a JSON object")
    if _nesting(report) > REPORT_MAX_DEPTH:
        raise InputError(
            "invalid_report", f"report is nested more than {REPORT_MAX_DEPTH} levels deep"
        )
    return report


def _result_form(settings: Settings) -> tuple[FormField, ...]:
    # Capped like a model upload; stored under a name of our own in the request's staging folder.
    return (
        FormField("engine", settings.max_model_bytes, lambda _: "engine.plan"),
        FormField("report", REPORT_MAX_BYTES),
    )


@router.post(
    "/{build_id}/result",
    response_model=EnginePublic,
    responses={507: {"model": ErrorBody}, **ERRORS},
    openapi_extra=RESULT_BODY,
)
async def upload_result(
    held: HeldBuildDep, request: Request, session: SessionDep, settings: SettingsDep
) -> EnginePublic:
    """Upload the engine (file field ``engine``) and its report (text field ``report``, JSON);
    both become the job's ``engine-<target>.*`` artifacts."""
    form = await receive_form(request, _result_form(settings), settings)
    try:
        report = parse_report(form.texts["report"])
        with disk_full_is_507():
            finished = await run_in_threadpool(
                engines.store_result,
                session,
                settings,
                held.build,
                held.builder,
                held.lease_token,
                form.files["engine"].path,
                report,
            )
    finally:
        Storage.remove_tree(form.directory)  # what was not stored: nothing stays behind
    return EnginePublic.from_row(finished)


@router.post(
    "/{build_id}/failure",
    response_model=EnginePublic,
    responses=ERRORS,
    openapi_extra=_json_body(EngineFailure),
)
async def report_failure(held: HeldBuildDep, request: Request, session: SessionDep) -> EnginePublic:
    """Report that the build failed (code, message); nothing is stored."""
    body = await receive_json(request, EngineFailure)
    finished = await run_in_threadpool(
        engines.finish_build,
        session,
        held.build.id,
        held.builder,
        held.lease_token,
        error=(body.code, body.message),
    )
    return EnginePublic.from_row(finished)
