"""Sweeps: one ordinary job per configuration of a grid, over the same stored model and data,
and what compares them once they are final: a table with its Pareto front
(``core.sweep_table``) and a report (``core.sweep_report``).

A grid's tied keys advance together (``weight_bits`` and ``activation_bits`` by default, so
``[8, 4, 2]`` means W8A8, W4A4 and W2A2); the other keys form the cartesian product. Each
configuration is the sweep's ``base_config`` deep-merged with its values, and becomes a job
through ``core.resources.prepare_job`` and ``core.jobs.add_job``, like any job made from stored
resources.

A sweep completes when its last job is final: whoever finishes that job (the worker, a cancel,
the API's recovery loop for jobs that ended any other way) renders ``report.html`` and
``pareto.svg`` under ``<data_dir>/sweeps/<id>/artifacts/``. The claim is one conditional UPDATE
(``completed_at IS NULL``) that holds the row until the files are in place and the commit
lands, so two processes finishing at once store the report once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core import idempotency, jobs, webhooks
from core.errors import InputError, NotFound
from core.jobs import ACTIVE, JobStatus
from core.models import Job, Resource, Sweep, utcnow
from core.pages import Page, newest_first
from core.resources import prepare_job
from core.settings import Settings
from core.storage import open_storage
from core.sweep_report import render_html, render_svg
from core.sweep_table import SweepView, sweep_table

log = logging.getLogger(__name__)

DEFAULT_TIE = ("weight_bits", "activation_bits")
REPORT_FILES = ("report.html", "pareto.svg")


class SweepArtifactNotFound(InputError):
    status_code = 404

    def __init__(self, sweep_id: str, name: str) -> None:
        super().__init__(
            "artifact_not_found",
            f"sweep {sweep_id!r} has no artifact {name!r} (the report is stored once every job "
            "of the sweep is final)",
        )


class SweepRunning(InputError):
    status_code = 409

    def __init__(self, sweep_id: str) -> None:
        super().__init__(
            "sweep_running",
            f"a job of sweep {sweep_id!r} is running: cancel the sweep "
            f"(POST /v1/sweeps/{sweep_id}/cancel) and delete it once its jobs have stopped",
        )


def invalid_sweep(message: str) -> InputError:
    return InputError("invalid_sweep", message)


# ---------------------------------------------------------------------------------------------
# Configurations


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override``'s values; nested objects merge key by key, the rest replace."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def nested(path: str, value: Any) -> dict[str, Any]:
    """``"preprocessing.augment", False`` -> ``{"preprocessing": {"augment": False}}``."""
    head, _, rest = path.partition(".")
    return {head: nested(rest, value) if rest else value}


def grid_points(
    grid: Mapping[str, Sequence[Any]], tie: Sequence[str] | None, max_jobs: int
) -> list[dict[str, Any]]:
    """Each point of ``grid`` as ``{key: value}``, in grid order (the first key varies slowest).

    ``tie``: keys that advance together (equal lengths); None ties whichever of
    ``DEFAULT_TIE`` the grid has. More than ``max_jobs`` points is refused before any is made.
    """
    if not grid:
        raise invalid_sweep("grid is empty: give at least one key with a list of values")
    for key, values in grid.items():
        if not key or any(not part for part in key.split(".")):
            raise invalid_sweep(f"grid key {key!r} is not a config field name")
        if not isinstance(values, Sequence) or isinstance(values, str) or not values:
            raise invalid_sweep(f"grid.{key} must be a non-empty list of values")
    if tie is None:
        tied = [key for key in DEFAULT_TIE if key in grid]
    else:
        missing = [key for key in tie if key not in grid]
        if missing:
            raise invalid_sweep(f"tie names {', '.join(missing)}, which the grid does not have")
        tied = list(dict.fromkeys(tie))
    lengths = {key: len(grid[key]) for key in tied}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{key} has {n}" for key, n in lengths.items())
        raise invalid_sweep(f"tied keys need lists of one length: {described}")
    # One axis per untied key, one for the tied group, at its first key's place.
    axes: list[list[dict[str, Any]]] = []
    for key in grid:
        if key in tied:
            if key == tied[0]:
                columns = zip(*(grid[k] for k in tied), strict=True)  # lengths checked above
                axes.append([dict(zip(tied, values, strict=True)) for values in columns])
        else:
            axes.append([{key: value} for value in grid[key]])
    count = math.prod(len(axis) for axis in axes)
    check_size(count, max_jobs)
    return [
        {key: value for part in combination for key, value in part.items()}
        for combination in itertools.product(*axes)
    ]


def check_size(count: int, max_jobs: int) -> None:
    if count > max_jobs:
        raise InputError(
            "sweep_too_large",
            f"the sweep has {count} configurations; at most {max_jobs} (MAX_SWEEP_JOBS) run "
            "as one sweep",
        )


def expand(
    base_config: Mapping[str, Any],
    *,
    grid: Mapping[str, Sequence[Any]] | None,
    tie: Sequence[str] | None,
    configs: Sequence[Mapping[str, Any]] | None,
    max_jobs: int,
) -> list[dict[str, Any]]:
    """The job config of each configuration: ``base_config`` deep-merged with a grid point
    (dotted keys reach into nested fields) or with one of ``configs``."""
    if (grid is None) == (configs is None):
        raise invalid_sweep("give either grid or configs, not both and not neither")
    if configs is not None:
        if not configs:
            raise invalid_sweep("configs is empty: give at least one configuration")
        if tie is not None:
            raise invalid_sweep("tie applies to a grid only")
        check_size(len(configs), max_jobs)
        overrides = [dict(config) for config in configs]
    else:
        assert grid is not None
        overrides = [
            deep_merge({}, _nested_all(point)) for point in grid_points(grid, tie, max_jobs)
        ]
    merged = [deep_merge(base_config, override) for override in overrides]
    seen: dict[str, int] = {}
    for index, config in enumerate(merged):
        key = json.dumps(config, sort_keys=True, default=str)
        if key in seen:
            raise invalid_sweep(
                f"configurations {seen[key] + 1} and {index + 1} are the same job config"
            )
        seen[key] = index
    return merged


def _nested_all(point: Mapping[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for key, value in point.items():
        merged = deep_merge(merged, nested(key, value))
    return merged


# ---------------------------------------------------------------------------------------------
# Creating, reading, canceling, deleting


def describe(sweep: Sweep) -> SweepView:
    return SweepView(sweep, sweep_table(sweep))


def create_sweep(
    session: Session,
    settings: Settings,
    tenant: str,
    *,
    model_id: str,
    data_id: str,
    eval_data_id: str | None,
    base_config: Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]] | None = None,
    tie: Sequence[str] | None = None,
    configs: Sequence[Mapping[str, Any]] | None = None,
    metadata: Mapping[str, str] | None = None,
    idempotency_key: str | None = None,
) -> tuple[Sweep, bool]:
    """A sweep and its queued jobs, committed together: (sweep, True); the caller enqueues
    ``sweep.jobs``.

    Every configuration is validated (``prepare_job``: 404 for a resource the tenant does not
    have, 422 for a bad config, naming the configuration), then the tenant's quotas checked
    for all of them (429, 413), before anything is written. An ``idempotency_key`` the tenant
    already made a sweep with returns that sweep, (sweep, False), and makes no job.
    """
    if idempotency_key is not None and (
        existing := idempotency.find(session, Sweep, tenant, idempotency_key)
    ):
        return get_sweep(session, tenant, existing.id), False
    configurations = expand(
        base_config, grid=grid, tie=tie, configs=configs, max_jobs=settings.max_sweep_jobs
    )
    metadata = jobs.validate_metadata(metadata or {})
    if "sweep_id" not in metadata and len(metadata) >= jobs.MAX_METADATA_KEYS:
        raise InputError(
            "invalid_metadata",
            f"a sweep's metadata holds at most {jobs.MAX_METADATA_KEYS - 1} keys: each of its "
            "jobs gets sweep_id as well",
        )
    sweep_id = str(uuid.uuid4())
    job_metadata = {**metadata, "sweep_id": sweep_id}
    prepared = []
    for index, config in enumerate(configurations):
        try:
            job = prepare_job(
                session,
                settings,
                tenant,
                model_id=model_id,
                data_id=data_id,
                eval_data_id=eval_data_id,
                config=config,
                metadata=job_metadata,
                sweep_id=sweep_id,
            )
        except InputError as exc:
            if exc.status_code == 404:
                raise
            where = f"configuration {index + 1} of {len(configurations)}"
            raise InputError(
                exc.code, f"{where}: {exc.message}", status_code=exc.status_code
            ) from exc
        prepared.append(job)
    # Its resources are stored (no new input bytes): what it adds is its jobs' artifacts.
    jobs.check_quota(session, settings, tenant, incoming_bytes=0, new_jobs=len(prepared))
    request: dict[str, Any] = {"base_config": dict(base_config)}
    if grid is not None:
        request |= {"grid": dict(grid), "tie": list(tie) if tie is not None else None}
    else:
        request["configs"] = [dict(config) for config in configs or []]
    sweep = Sweep(
        id=sweep_id,
        tenant=tenant,
        idempotency_key=idempotency_key,
        model_id=model_id,
        data_id=data_id,
        eval_data_id=eval_data_id,
        request=request,
        user_metadata=metadata,
        cancel_requested=False,
        artifacts=[],
    )

    def add_with_jobs(session: Session, row: Sweep) -> None:
        session.add(row)
        session.flush()  # the jobs' sweep_id must name a row
        for job in prepared:
            jobs.add_job(session, job)

    sweep, created = idempotency.commit_new(session, sweep, add_with_jobs)
    return get_sweep(session, tenant, sweep.id), created


def get_sweep(session: Session, tenant: str, sweep_id: str) -> Sweep:
    """The tenant's sweep with its jobs, fresh; another tenant's is as unknown as none."""
    sweep = session.scalar(
        select(Sweep)
        .where(Sweep.id == sweep_id, Sweep.tenant == tenant)
        .execution_options(populate_existing=True)
    )
    if sweep is None:
        raise NotFound("sweep", sweep_id)
    return sweep


def list_sweeps(
    session: Session, tenant: str, *, limit: int = 20, cursor: str | None = None
) -> Page[Sweep]:
    """The tenant's sweeps, newest first (``core.pages``)."""
    query = select(Sweep).where(Sweep.tenant == tenant)
    return newest_first(session, query, Sweep, limit=limit, cursor=cursor)


def cancel_sweep(session: Session, settings: Settings, tenant: str, sweep_id: str) -> Sweep:
    """Cancel every unfinished job of the sweep (queued ones at once, running ones at their
    next step); the sweep completes, with a report of what finished, when the last stops."""
    sweep = get_sweep(session, tenant, sweep_id)
    if sweep.completed_at is not None:  # as with a finished job: nothing changes
        return sweep
    session.execute(update(Sweep).where(Sweep.id == sweep.id).values(cancel_requested=True))
    session.commit()
    for job_id in [job.id for job in sweep.jobs if job.status in ACTIVE]:
        jobs.request_cancel(session, tenant, job_id)
    finish_sweep_of(session, settings, sweep_id)
    return get_sweep(session, tenant, sweep_id)


def delete_sweep(session: Session, settings: Settings, tenant: str, sweep_id: str) -> None:
    """Delete the sweep, its jobs (with their files) and its report; 409 while a job runs."""
    sweep = get_sweep(session, tenant, sweep_id)
    if any(job.status == JobStatus.RUNNING for job in sweep.jobs):
        raise SweepRunning(sweep_id)
    for job_id in [job.id for job in sweep.jobs]:
        try:
            jobs.delete_job(session, settings, tenant, job_id)
        except jobs.JobRunning as exc:  # started since the check above
            raise SweepRunning(sweep_id) from exc
        except NotFound:  # deleted meanwhile
            pass
    session.delete(get_sweep(session, tenant, sweep_id))
    session.commit()
    storage = open_storage(settings)
    storage.remove(storage.sweep_key(sweep_id))


def get_artifact(
    session: Session, settings: Settings, tenant: str, sweep_id: str, name: str
) -> tuple[str, dict[str, Any]]:
    """The storage key of one report artifact, and its record (name, size, sha256)."""
    sweep = get_sweep(session, tenant, sweep_id)
    for artifact in sweep.artifacts or []:
        if artifact["name"] == name:
            return open_storage(settings).sweep_artifact_key(sweep.id, name), artifact
    raise SweepArtifactNotFound(sweep_id, name)


# ---------------------------------------------------------------------------------------------
# Completion


def input_names(session: Session, sweep: Sweep) -> dict[str, str | None]:
    """The client's file names of the sweep's model and data, for the report's title."""
    ids = {"model": sweep.model_id, "data": sweep.data_id, "eval_data": sweep.eval_data_id}
    names: dict[str, str | None] = {}
    for role, resource_id in ids.items():
        resource = session.get(Resource, resource_id) if resource_id else None
        names[role] = resource.filename if resource is not None else None
    return names


def complete_if_final(session: Session, settings: Settings, sweep_id: str) -> bool:
    """Store the sweep's report and mark it complete if all its jobs are final; True if this
    call did. Safe to call any number of times, from any number of processes at once."""
    sweep = session.get(Sweep, sweep_id, populate_existing=True)
    if sweep is None or sweep.completed_at is not None:
        return False
    session.refresh(sweep, ["jobs"])
    view = SweepView(sweep, sweep_table(sweep), input_names(session, sweep))
    if not view.table.final:
        return False
    now = utcnow()
    svg = render_svg(view.table)
    contents = {"pareto.svg": svg, "report.html": render_html(view, svg, generated_at=now)}
    encoded = {name: text.encode() for name, text in contents.items()}
    records = [
        {
            "name": name,
            "size": len(content),
            "sha256": hashlib.sha256(content).hexdigest(),
            "created_at": now.isoformat(),
        }
        for name, content in encoded.items()
    ]
    # The claim: the row stays locked until the commit, so a second claimant waits, then finds
    # completed_at set and writes nothing.
    claimed = session.execute(
        update(Sweep)
        .where(Sweep.id == sweep_id, Sweep.completed_at.is_(None))
        .values(completed_at=now, artifacts=records)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return False
    try:
        storage = open_storage(settings)
        for name, content in encoded.items():
            storage.put_bytes(storage.sweep_artifact_key(sweep_id, name), content)
        webhooks.announce(session, sweep.tenant, "sweep.completed", sweep_id)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    log.info("sweep %s: completed, report stored", sweep_id)
    return True


def finish_sweep_of(session: Session, settings: Settings, sweep_id: str | None) -> None:
    """For whoever just made a job final: complete the job's sweep if that was its last job.
    A failure is logged, not raised: the job's own outcome stands, and the API's recovery loop
    (``complete_finished``) tries again."""
    if sweep_id is None:
        return
    try:
        complete_if_final(session, settings, sweep_id)
    except Exception:
        session.rollback()
        log.exception("sweep %s: report not stored; retried later", sweep_id)


def complete_finished(session: Session, settings: Settings) -> int:
    """Complete every sweep whose jobs are all final but has no report yet: those whose last
    job ended outside a worker's hands (lost worker, deletion, a crash before the hook ran)."""
    open_ids = list(session.scalars(select(Sweep.id).where(Sweep.completed_at.is_(None))))
    busy = set(
        session.scalars(
            select(Job.sweep_id).where(Job.sweep_id.in_(open_ids), Job.status.in_(ACTIVE))
        )
    )
    done = 0
    for sweep_id in open_ids:
        if sweep_id not in busy:
            try:
                done += complete_if_final(session, settings, sweep_id)
            except Exception:
                log.exception("sweep %s: report not stored; retried later", sweep_id)
    return done
