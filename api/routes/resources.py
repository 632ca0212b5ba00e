"""Models and datasets uploaded once: /v1/models, /v1/datasets (create, read, list, delete).

Both kinds have the same four routes, made by ``_add_routes``: an upload streams, hashes, caps
and is validated in the isolated child exactly as a job's upload is (``core.intake``). A
dataset may instead be registered from object storage by URL (``core.bucket_import``).
"""

# No ``from __future__ import annotations``: the routes' annotations name ``IdParam``, made per
# kind inside ``_add_routes``, which FastAPI could not resolve from strings.

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response, status
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, TenantDep
from api.schemas import ErrorBody, ResourceList, ResourcePublic, error_responses
from api.uploads import (
    declared_body_bytes,
    disk_full_is_507,
    receive_form,
    receive_json,
    resource_form,
)
from api.validation import ValidationGate
from core import jobs, resources
from core.intake import inspect_isolated
from core.models import Resource
from core.resources import Kind
from core.settings import Settings
from core.storage import Storage

router = APIRouter()

ERRORS = error_responses(
    status.HTTP_401_UNAUTHORIZED, status.HTTP_404_NOT_FOUND, status.HTTP_422_UNPROCESSABLE_CONTENT
)


def _sends_json(request: Request) -> bool:
    media_type = request.headers.get("content-type", "").partition(";")[0]
    return media_type.strip().lower() == "application/json"


async def _upload(
    kind: Kind,
    request: Request,
    session: Session,
    settings: Settings,
    tenant: str,
    gate: ValidationGate,
) -> tuple[Resource, bool]:
    """A multipart upload (field ``file``), streamed, validated and stored."""
    await run_in_threadpool(
        jobs.check_storage_quota,
        session,
        settings,
        tenant,
        incoming_bytes=declared_body_bytes(request),
    )
    await run_in_threadpool(session.commit)  # no connection held while the body arrives
    form = await receive_form(request, resource_form(kind, settings), settings)
    try:
        return await gate.run(
            lambda: resources.store_resource(
                session,
                settings,
                tenant,
                kind,
                form.directory,
                form.files["file"],
                form.filenames.get("file"),
                lambda path: inspect_isolated(kind, path, settings),
            )
        )
    except BaseException:
        Storage.remove_tree(form.directory)  # store_resource removes it too, if called
        raise


async def _register_from_url(
    request: Request,
    session: Session,
    settings: Settings,
    tenant: str,
    gate: ValidationGate,
) -> tuple[Resource, bool]:
    """A dataset from object storage (JSON ``{"url": ...}``): fetched, validated and copied in
    a gate's thread (minutes for large archives; never on the event loop)."""
    body = await receive_json(request, resources.DatasetFromUrl)
    stored_as = resource_form("dataset", settings)[0].stored_as  # data.zip, data.tar.gz, ...
    assert stored_as is not None  # a file field
    with disk_full_is_507():
        return await gate.run(
            lambda: resources.register_dataset_from_url(
                session,
                settings,
                tenant,
                body,
                stored_as,
                lambda path: inspect_isolated("dataset", path, settings),
            )
        )


def _add_routes(kind: Kind, plural: str, accepts: str, *, from_url: bool = False) -> None:
    prefix = f"/v1/{plural}"
    IdParam = Annotated[str, Path(alias=f"{kind}_id")]  # /v1/models/{model_id}, ...
    bodies: dict[str, Any] = {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {"type": "string", "format": "binary", "description": accepts}
                },
            }
        }
    }
    description = (
        f"Upload {accepts} once (multipart field `file`); jobs then name it by id. "
        "It streams to disk, is hashed, capped and validated in a child process with memory, "
        "CPU and time limits, as a job's upload is; the answer (201) holds what validation "
        f"found. The same bytes from the same tenant answer 200 with the stored {kind}."
    )
    if from_url:
        bodies["application/json"] = {"schema": resources.DatasetFromUrl.model_json_schema()}
        description += (
            ' Or, with STORAGE_URL set, send JSON `{"url": "s3://bucket/key"}` to register '
            "an archive already in object storage, where the operator allows "
            "(STORAGE_IMPORT_BUCKETS): it is checked against the same caps, validated the same "
            "way, and copied server-side into the service's storage (`info.source_url` says "
            "whence). Refused with 422 `url_datasets_need_s3`, `invalid_url`, "
            "`url_not_allowed`, `object_not_found` or `object_unreadable`, 413 "
            "`upload_too_large`, 409 `source_changed`."
        )

    @router.post(
        prefix,
        name=f"create_{kind}",
        tags=[plural],
        status_code=status.HTTP_201_CREATED,
        response_model=ResourcePublic,
        responses={
            200: {"model": ResourcePublic, "description": f"the same bytes: the stored {kind}"},
            413: {"model": ErrorBody},
            415: {"model": ErrorBody},
            429: {"model": ErrorBody, "description": "the validation line is full"},
            507: {"model": ErrorBody},
            **(error_responses(status.HTTP_409_CONFLICT, 503) if from_url else {}),
            **ERRORS,
        },
        openapi_extra={"requestBody": {"required": True, "content": bodies}},
        summary=f"Store a {kind}",
        description=description,
    )
    async def create(
        request: Request,
        response: Response,
        session: SessionDep,
        settings: SettingsDep,
        tenant: TenantDep,
    ) -> ResourcePublic:
        gate: ValidationGate = request.app.state.validation_gate
        gate.check_room()
        if from_url and _sends_json(request):
            stored = _register_from_url(request, session, settings, tenant, gate)
        else:
            stored = _upload(kind, request, session, settings, tenant, gate)
        resource, created = await stored
        if not created:
            response.status_code = status.HTTP_200_OK
        return ResourcePublic.model_validate(resource)

    @router.get(
        prefix,
        name=f"list_{plural}",
        tags=[plural],
        response_model=ResourceList,
        responses=ERRORS,
        summary=f"List {plural}",
        description=f"The caller's {plural}, newest first; pass `next_cursor` back as `cursor`.",
    )
    def list_all(
        session: SessionDep,
        tenant: TenantDep,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        cursor: Annotated[str | None, Query(max_length=500)] = None,
    ) -> ResourceList:
        page = resources.list_resources(session, tenant, kind, limit=limit, cursor=cursor)
        return ResourceList(
            items=[ResourcePublic.model_validate(r) for r in page.items],
            next_cursor=page.next_cursor,
        )

    @router.get(
        f"{prefix}/{{{kind}_id}}",
        name=f"get_{kind}",
        tags=[plural],
        response_model=ResourcePublic,
        responses=ERRORS,
        summary=f"Read a {kind}",
    )
    def get_one(resource_id: IdParam, session: SessionDep, tenant: TenantDep) -> ResourcePublic:
        return ResourcePublic.model_validate(
            resources.get_resource(session, tenant, kind, resource_id)
        )

    @router.delete(
        f"{prefix}/{{{kind}_id}}",
        name=f"delete_{kind}",
        tags=[plural],
        status_code=status.HTTP_204_NO_CONTENT,
        response_class=Response,
        responses=error_responses(status.HTTP_409_CONFLICT) | ERRORS,
        summary=f"Delete a {kind}",
        description=f"Delete the {kind} and its file (204). While a queued or running job uses "
        "it: 409 `resource_in_use`. Finished jobs that used it keep their results.",
    )
    def delete_one(
        resource_id: IdParam, session: SessionDep, settings: SettingsDep, tenant: TenantDep
    ) -> None:
        resources.delete_resource(session, settings, tenant, kind, resource_id)


_add_routes("model", "models", "an ONNX model: one float32 input [N, 3, H, W], dynamic batch")
_add_routes(
    "dataset", "datasets", "an image archive: zip, tar, tar.gz, tar.bz2 or tar.xz", from_url=True
)
