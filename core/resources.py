"""Models and datasets uploaded once (``/v1/models``, ``/v1/datasets``), and jobs made from them.

A resource is validated once, in the isolated child (``core.intake.inspect_isolated``), and
stored under ``resources/<id>/`` (``core.storage``). The same bytes from the same tenant are one
resource: a second upload returns the first. A dataset may also be registered from object
storage by URL (``register_dataset_from_url``), then stored the same way. Jobs made from
resources (``POST /v1/jobs`` as JSON, sweeps) name the resources' files in their ``*_path``
columns and copy nothing; a resource cannot be deleted while a queued or running job uses it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, exists, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core import bucket_import
from core.bucket_import import URL_MAX_CHARS
from core.errors import InputError, NotFound
from core.inputs.archive import check_class_folders
from core.inputs.budget import check_pixel_budget
from core.intake import with_input_size
from core.jobs import (
    ACTIVE,
    JobStatus,
    Metadata,
    check_quota,
    check_storage_quota,
    commit_new_job,
    find_by_idempotency_key,
    validate_config,
    validate_metadata,
)
from core.models import Job, Resource, utcnow
from core.pages import Page, newest_first
from core.settings import Settings
from core.storage import S3Storage, StoredFile, check_name, open_storage

Kind = Literal["model", "dataset"]
MAX_FILENAME_CHARS = 255  # resources.filename


class ResourceInUse(InputError):
    status_code = 409

    def __init__(self, kind: str, resource_id: str) -> None:
        super().__init__(
            "resource_in_use",
            f"{kind} {resource_id!r} is used by a queued or running job: cancel those jobs "
            "(or wait for them to finish) and delete it then",
        )


# ---------------------------------------------------------------------------------------------
# Storing


def display_name(filename: str | None) -> str | None:
    """The client's file name, for display only: its last path component, printable
    characters only (PostgreSQL refuses NUL in text), clipped."""
    if not filename:
        return None
    name = filename.replace("\\", "/").rpartition("/")[2]
    return "".join(char for char in name if char.isprintable())[:MAX_FILENAME_CHARS] or None


def find_by_sha256(session: Session, tenant: str, kind: Kind, sha256: str) -> Resource | None:
    return session.scalar(
        select(Resource).where(
            Resource.tenant == tenant, Resource.kind == kind, Resource.sha256 == sha256
        )
    )


def store_resource(
    session: Session,
    settings: Settings,
    tenant: str,
    kind: Kind,
    upload_dir: Path,
    file: StoredFile,
    filename: str | None,
    inspect: Callable[[Path], dict[str, Any]],
    adopt: Callable[[Path, str], str] | None = None,
) -> tuple[Resource, bool]:
    """Validate an uploaded file with ``inspect`` and store it; returns (resource, created).

    The same bytes already stored for this tenant return that resource (created False) without
    validating again. On any error, and for a duplicate, ``upload_dir`` is deleted; a stored
    file is moved to ``resources/<id>/`` by ``adopt`` (default ``Storage.adopt``), as jobs
    adopt their uploads.
    """
    storage = open_storage(settings)
    adopt = adopt or storage.adopt
    adopted: str | None = None  # the resource's key
    committed = False
    try:
        if existing := find_by_sha256(session, tenant, kind, file.sha256):
            return existing, False
        session.commit()  # no connection held while validating (seconds to minutes)
        info = inspect(file.path)
        check_storage_quota(session, settings, tenant, incoming_bytes=file.size)
        resource_id = str(uuid.uuid4())
        adopted = adopt(upload_dir, storage.resource_key(resource_id))
        resource = Resource(
            id=resource_id,
            tenant=tenant,
            kind=kind,
            filename=display_name(filename),
            path=f"{adopted}/{file.path.name}",
            sha256=file.sha256,
            size=file.size,
            info=info,
            created_at=utcnow(),
        )
        session.add(resource)
        try:
            session.commit()
        except IntegrityError:
            # A concurrent upload of the same bytes won the race: theirs is the resource.
            session.rollback()
            if existing := find_by_sha256(session, tenant, kind, file.sha256):
                return existing, False
            raise
        committed = True
        return resource, True
    finally:
        storage.remove_tree(upload_dir)
        if adopted is not None and not committed:
            storage.remove(adopted)


class DatasetFromUrl(BaseModel):
    """``POST /v1/datasets`` as JSON: an archive already in object storage
    (``core.bucket_import``)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"url": "s3://datasets/incoming/imagenet-train.tar", "name": "imagenet"}]
        },
    )

    url: str = Field(
        max_length=URL_MAX_CHARS,
        description="s3://bucket/key of a zip or tar archive, where the operator allows "
        "(STORAGE_IMPORT_BUCKETS; default: the service's bucket).",
    )
    name: str | None = Field(
        None,
        max_length=MAX_FILENAME_CHARS,
        description="A name to display; default: the key's last part.",
    )


def register_dataset_from_url(
    session: Session,
    settings: Settings,
    tenant: str,
    request: DatasetFromUrl,
    stored_name: Callable[[str], str],
    inspect: Callable[[Path], dict[str, Any]],
) -> tuple[Resource, bool]:
    """Store the dataset at ``request.url`` as ``store_resource`` stores an upload; returns
    (resource, created). The object is downloaded to a staging file named
    ``stored_name(key)``, validated there, and copied into the bucket's ``resources/<id>/``
    server-side (see ``core.bucket_import``); its info records the URL (``source_url``)."""
    storage = open_storage(settings)
    if not isinstance(storage, S3Storage):
        raise InputError(
            "url_datasets_need_s3",
            "this service keeps its files in a local directory, not in object storage "
            "(STORAGE_URL), so it registers no URLs: upload the archive as multipart/form-data "
            "(field file)",
        )
    source = bucket_import.locate(storage, settings, tenant, request.url)
    check_storage_quota(session, settings, tenant, incoming_bytes=source.size)
    session.commit()  # no connection held while downloading
    upload_dir = storage.new_upload_dir()
    try:
        target = upload_dir / check_name(stored_name(source.url.key))
        file = bucket_import.download(storage, source, target)
    except BaseException:
        storage.remove_tree(upload_dir)
        raise

    def copy_source(_: Path, key: str) -> str:
        bucket_import.copy_into(storage, source, f"{key}/{target.name}")
        return key

    return store_resource(
        session,
        settings,
        tenant,
        "dataset",
        upload_dir,
        file,
        request.name or source.url.key.rpartition("/")[2],
        lambda path: inspect(path) | {"source_url": str(source.url)},
        adopt=copy_source,
    )


# ---------------------------------------------------------------------------------------------
# Reading and deleting


def get_resource(session: Session, tenant: str, kind: Kind, resource_id: str) -> Resource:
    """The tenant's model or dataset; another tenant's is as unknown as a missing one."""
    resource = session.scalar(
        select(Resource).where(
            Resource.id == resource_id, Resource.tenant == tenant, Resource.kind == kind
        )
    )
    if resource is None:
        raise NotFound(kind, resource_id)
    return resource


def list_resources(
    session: Session, tenant: str, kind: Kind, *, limit: int = 20, cursor: str | None = None
) -> Page[Resource]:
    """The tenant's models or datasets, newest first (see ``core.pages``)."""
    query = select(Resource).where(Resource.tenant == tenant, Resource.kind == kind)
    return newest_first(session, query, Resource, limit=limit, cursor=cursor)


def _uses(resource_id: str) -> Any:
    return or_(
        Job.model_id == resource_id, Job.data_id == resource_id, Job.eval_data_id == resource_id
    )


def delete_resource(
    session: Session, settings: Settings, tenant: str, kind: Kind, resource_id: str
) -> None:
    """Delete a model or dataset, row and files; 409 while a queued or running job uses it.

    Jobs that used it keep their rows and artifacts; their inputs are gone, which
    ``inputs_deleted_at`` records (and the foreign keys set their ``*_id`` to null).
    """
    get_resource(session, tenant, kind, resource_id)  # 404 for unknown and foreign ones
    # Lock the row (PostgreSQL; SQLite serialises writers): a job inserted meanwhile either
    # committed before this lock, and is seen below, or waits on it and then fails its
    # foreign key (core.resources.submit_job answers that with a 404).
    session.scalar(select(Resource.id).where(Resource.id == resource_id).with_for_update())
    # Before the row goes: its foreign keys then set the jobs' *_id to null.
    session.execute(
        update(Job)
        .where(_uses(resource_id), Job.inputs_deleted_at.is_(None), Job.status.not_in(ACTIVE))
        .values(inputs_deleted_at=utcnow())
    )
    in_use = exists().where(_uses(resource_id), Job.status.in_(ACTIVE))
    deleted = session.execute(
        delete(Resource).where(Resource.id == resource_id, Resource.tenant == tenant, ~in_use)
    )
    if deleted.rowcount == 0:  # type: ignore[attr-defined]
        session.rollback()
        raise ResourceInUse(kind, resource_id)
    session.commit()
    open_storage(settings).remove_resource_files(resource_id)


# ---------------------------------------------------------------------------------------------
# Jobs from stored resources


class ResourceJobRequest(BaseModel):
    """``POST /v1/jobs`` as JSON: a job from a stored model and dataset."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model_id": "5b0e7c1a-2f4d-4c7e-9a51-0d6f3b8e2c11",
                    "data_id": "9c3f1e20-7a6b-4d85-b1e2-4f0a6c9d8e73",
                    "eval_data_id": None,
                    "config": {"weight_bits": 4, "activation_bits": 4, "epochs": 3},
                    "metadata": {"experiment": "w4a4-baseline"},
                }
            ]
        },
    )

    model_id: str = Field(max_length=36, description="A stored model (POST /v1/models).")
    data_id: str = Field(max_length=36, description="A stored dataset (POST /v1/datasets).")
    eval_data_id: str | None = Field(
        None, max_length=36, description="A stored dataset labelled by class folders, for top-1."
    )
    config: dict[str, Any] = Field(
        default_factory=dict, description="The job config (see README, Job config)."
    )
    metadata: Metadata | None = None


def _image_count(resource: Resource) -> int:
    return int(resource.info.get("image_count", 0))


def prepare_job(
    session: Session,
    settings: Settings,
    tenant: str,
    *,
    model_id: str,
    data_id: str,
    eval_data_id: str | None,
    config: dict[str, Any],
    metadata: dict[str, str] | None = None,
    sweep_id: str | None = None,
    idempotency_key: str | None = None,
) -> Job:
    """A new queued Job from stored resources, validated, NOT added to the session (no quota
    check).

    What the upload path checks in its isolated child is checked here from what the resources'
    validation stored: the config, the input size (filled in from a static model), labels of
    the evaluation data, and the pixel budget. 404 for a resource the tenant does not have.
    """
    model = get_resource(session, tenant, "model", model_id)
    data = get_resource(session, tenant, "dataset", data_id)
    eval_data = (
        get_resource(session, tenant, "dataset", eval_data_id) if eval_data_id is not None else None
    )
    job_config = with_input_size(validate_config(config), model.info["input_shape"])
    if eval_data is not None and not eval_data.info.get("class_names"):
        raise InputError(
            "eval_data_unlabeled",
            f"dataset {eval_data.id!r} is not labelled: eval_data needs its images in class "
            "folders (one folder per label)",
        )
    # class_names label the evaluation images: eval_data's, or else the data's held-out part.
    labelled = eval_data if eval_data is not None else data
    folders = labelled.info.get("class_folders")  # absent from datasets stored before it was
    if job_config.class_names is not None and folders is not None:
        check_class_folders(folders, job_config.class_names)
    image_count = _image_count(data) + (_image_count(eval_data) if eval_data is not None else 0)
    assert job_config.preprocessing.input_size is not None  # filled in above
    check_pixel_budget(
        image_count, job_config.preprocessing.input_size, settings.max_dataset_pixels
    )
    job = Job(
        id=str(uuid.uuid4()),
        tenant=tenant,
        idempotency_key=idempotency_key,
        status=JobStatus.QUEUED,
        config=job_config.model_dump(mode="json"),
        model_id=model.id,
        model_path=model.path,
        model_sha256=model.sha256,
        model_size=model.size,
        data_id=data.id,
        data_path=data.path,
        data_sha256=data.sha256,
        data_size=data.size,
        sweep_id=sweep_id,
        user_metadata=validate_metadata(metadata or {}),
        cancel_requested=False,
        attempts=0,
        enqueued_at=utcnow(),
    )
    if eval_data is not None:
        job.eval_data_id = eval_data.id
        job.eval_data_path = eval_data.path
        job.eval_data_sha256 = eval_data.sha256
        job.eval_data_size = eval_data.size
    return job


def submit_job(
    session: Session,
    settings: Settings,
    tenant: str,
    request: ResourceJobRequest,
    idempotency_key: str | None,
) -> tuple[Job, bool]:
    """Quota, ``prepare_job``, ``core.jobs.add_job`` and commit; returns (job, created).

    An ``idempotency_key`` that names an existing job returns it (created False). The caller
    enqueues the job after this returns, as for a multipart job.
    """
    if idempotency_key is not None and (
        existing := find_by_idempotency_key(session, tenant, idempotency_key)
    ):
        return existing, False
    check_quota(session, settings, tenant, incoming_bytes=0)
    job = prepare_job(
        session,
        settings,
        tenant,
        model_id=request.model_id,
        data_id=request.data_id,
        eval_data_id=request.eval_data_id,
        config=request.config,
        metadata=request.metadata,
        idempotency_key=idempotency_key,
    )
    try:
        return commit_new_job(session, job)
    except IntegrityError:
        # Not an idempotency race: a resource was deleted between its check and the insert.
        for kind, resource_id in (
            ("model", request.model_id),
            ("dataset", request.data_id),
            ("dataset", request.eval_data_id),
        ):
            if resource_id is not None:
                get_resource(session, tenant, kind, resource_id)  # type: ignore[arg-type]
        raise
