"""Disk housekeeping: inputs past their retention, files that belong to no request or job, and
dataset stores (``core.inputs.store``) no job opened for ``dataset_store_days``.

Run at the API's startup and then every ``maintenance_interval_seconds`` (``api.main``). Every
step is idempotent, so several API processes may run it at once.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from core.jobs import FINISHED
from core.models import Job, Resource, utcnow
from core.settings import Settings
from core.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class HousekeepingReport:
    inputs_deleted: int = 0
    orphan_uploads: int = 0
    orphan_job_dirs: int = 0
    orphan_resource_dirs: int = 0
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
    storage = Storage(settings.data_dir)
    ids = list(
        session.scalars(
            select(Job.id).where(
                Job.status.in_(FINISHED), Job.finished_at < cutoff, Job.inputs_deleted_at.is_(None)
            )
        )
    )
    for job_id in ids:
        storage.remove_tree(storage.inputs_dir(job_id))
        storage.remove_tree(storage.work_dir(job_id))
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids)).values(inputs_deleted_at=now))
        session.commit()
    return len(ids)


def _untouched_for(path: Path, seconds: float, now: float) -> bool:
    """True when nothing in ``path`` (a folder, one level deep) changed for ``seconds``."""
    try:
        stamps = [path.stat().st_mtime, *(child.stat().st_mtime for child in path.iterdir())]
    except FileNotFoundError:
        return False  # went away meanwhile
    return now - max(stamps) > seconds


def delete_orphans(session: Session, settings: Settings) -> tuple[int, int, int]:
    """Remove upload folders that no request is writing any more (the API died mid-upload),
    and job and resource folders without a row (a crash between the files and their row).
    Returns the three counts.

    A folder counts only once untouched for ``orphan_upload_seconds``: an upload still arriving
    writes into its folder, and a row is committed a moment after its folder is made.
    """
    storage = Storage(settings.data_dir)
    now = time.time()
    uploads = 0
    if storage.uploads_dir.is_dir():
        for folder in storage.uploads_dir.iterdir():
            if _untouched_for(folder, settings.orphan_upload_seconds, now):
                storage.remove_tree(folder)
                uploads += 1
    job_dirs = _delete_rowless(session, storage.root / "jobs", Job.id, settings, now)
    resource_dirs = _delete_rowless(session, storage.resources_dir, Resource.id, settings, now)
    return uploads, job_dirs, resource_dirs


def _delete_rowless(
    session: Session, root: Path, ids: InstrumentedAttribute[str], settings: Settings, now: float
) -> int:
    """Remove the folders under ``root`` named by no row's ``ids`` column; returns how many."""
    if not root.is_dir():
        return 0
    folders = {folder.name: folder for folder in root.iterdir()}
    known = set(session.scalars(select(ids).where(ids.in_(list(folders)))))
    removed = 0
    for name, folder in folders.items():
        if name not in known and _untouched_for(folder, settings.orphan_upload_seconds, now):
            Storage.remove_tree(folder)
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
    (report.orphan_uploads, report.orphan_job_dirs, report.orphan_resource_dirs) = delete_orphans(
        session, settings
    )
    if report != HousekeepingReport():
        log.info("housekeeping: %s", report)
    return report
