"""Disk housekeeping: inputs past their retention, files that belong to no request, job,
resource or sweep, and dataset stores (``core.inputs.store``) no job opened for
``dataset_store_days``.

Run at the API's startup and then every ``maintenance_interval_seconds`` (``api.main``). Every
step is idempotent, so several API processes may run it at once.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from core.db import id_batches
from core.jobs import FINISHED
from core.models import Job, Resource, Sweep, utcnow
from core.settings import Settings
from core.storage import LocalStorage, Storage, open_storage

log = logging.getLogger(__name__)


@dataclass
class HousekeepingReport:
    inputs_deleted: int = 0
    orphan_uploads: int = 0
    orphan_job_dirs: int = 0
    orphan_resource_dirs: int = 0
    orphan_sweep_dirs: int = 0
    dataset_stores_deleted: int = 0


def delete_expired_inputs(
    session: Session, settings: Settings, *, now: dt.datetime | None = None
) -> int:
    """Delete the uploaded inputs and work folder of jobs finished over the retention ago.

    The row, its metrics and its artifacts stay; ``inputs_deleted_at`` records the deletion.
    Only the job's own folders go: a job made from stored models and datasets names their files
    under ``resources/``, which stay for as long as the resources do.
    """
    if settings.input_retention_days is None:
        return 0
    now = now or utcnow()
    cutoff = now - dt.timedelta(days=settings.input_retention_days)
    storage = open_storage(settings)
    ids = list(
        session.scalars(
            select(Job.id).where(
                Job.status.in_(FINISHED), Job.finished_at < cutoff, Job.inputs_deleted_at.is_(None)
            )
        )
    )
    for batch in id_batches(ids):
        for job_id in batch:
            storage.remove(storage.inputs_key(job_id))
            storage.remove(storage.work_key(job_id))
        session.execute(update(Job).where(Job.id.in_(batch)).values(inputs_deleted_at=now))
        session.commit()
    return len(ids)


def delete_orphans(session: Session, settings: Settings) -> tuple[int, int, int, int]:
    """Remove upload folders that no request is writing any more (the API died mid-upload),
    and job, resource and sweep folders without a row (a crash between the files and their
    row, either way round). Returns the four counts.

    A folder counts only once untouched for ``orphan_upload_seconds``: an upload still arriving
    writes into its folder, and a row is committed a moment after its folder is made.
    """
    now = time.time()
    # Staging folders are this machine's own, whatever the store.
    staging = LocalStorage(settings.data_dir)
    uploads = _delete_untouched(staging, staging.relative(staging.uploads_dir), None, settings, now)
    storage = open_storage(settings)
    job_dirs = _delete_rowless(session, storage, storage.JOBS, Job.id, settings, now)
    resource_dirs = _delete_rowless(session, storage, storage.RESOURCES, Resource.id, settings, now)
    sweep_dirs = _delete_rowless(session, storage, storage.SWEEPS, Sweep.id, settings, now)
    return uploads, job_dirs, resource_dirs, sweep_dirs


def _delete_rowless(
    session: Session,
    storage: Storage,
    key: str,
    ids: InstrumentedAttribute[str],
    settings: Settings,
    now: float,
) -> int:
    """Remove the folders under ``key`` named by no row's ``ids`` column; returns how many."""
    names = sorted(storage.folder_names(key))
    known: set[str] = set()
    for batch in id_batches(names):
        known.update(session.scalars(select(ids).where(ids.in_(batch))))
    return _delete_untouched(storage, key, set(names) - known, settings, now)


def _delete_untouched(
    storage: Storage, key: str, names: set[str] | None, settings: Settings, now: float
) -> int:
    """Remove the folders ``names`` under ``key`` (None: all of them) in which nothing changed
    for ``orphan_upload_seconds``; returns how many."""
    removed = 0
    for name in storage.folder_names(key) if names is None else names:
        changed = storage.last_change(f"{key}/{name}")
        if changed is not None and now - changed > settings.orphan_upload_seconds:
            storage.remove(f"{key}/{name}")
            removed += 1
    return removed


def delete_unused_dataset_stores(settings: Settings) -> int:
    """Decoded datasets no job opened for ``dataset_store_days`` (a job reading one keeps it);
    a later job decodes its dataset again."""
    if settings.dataset_store_days is None:
        return 0
    # Imported here: the store reads with torch, which the API imports only when it must.
    from core.inputs.store import delete_unused_stores

    return delete_unused_stores(settings.dataset_stores, settings.dataset_store_days * 86400)


def run_housekeeping(session: Session, settings: Settings) -> HousekeepingReport:
    report = HousekeepingReport(
        inputs_deleted=delete_expired_inputs(session, settings),
        dataset_stores_deleted=delete_unused_dataset_stores(settings),
    )
    (
        report.orphan_uploads,
        report.orphan_job_dirs,
        report.orphan_resource_dirs,
        report.orphan_sweep_dirs,
    ) = delete_orphans(session, settings)
    if report != HousekeepingReport():
        log.info("housekeeping: %s", report)
    return report
