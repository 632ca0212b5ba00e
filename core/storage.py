"""Local artifact store under ``data_dir``: streamed, hashed, size-capped writes and job folders.

Layout (every path the database stores is relative to ``data_dir``)::

    uploads/<job id>/        files of a request still being received and validated
    jobs/<job id>/inputs/    the job's accepted uploads (moved here in one rename)
    jobs/<job id>/work/      the pipeline's working directory (checkpoints, exports)
    jobs/<job id>/artifacts/ the files clients download
    resources/<id>/          a stored model or dataset (POST /v1/models, /v1/datasets), moved
                             here in one rename once validated; the jobs made from it name
                             this file (their *_path) and keep no copy

An upload is never held in memory: it goes to disk chunk by chunk while its sha256 is computed
and its size checked against a cap; a write that passes the cap deletes what it wrote.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from core.errors import InputError, TooLargeError

CHUNK_BYTES = 1024 * 1024
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


@dataclass(frozen=True)
class StoredFile:
    path: Path  # absolute
    size: int
    sha256: str


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def check_name(name: str) -> str:
    """A file name safe to join under a directory: no separators, no dot-dot, no hidden files."""
    if not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise InputError("invalid_name", f"{name!r} is not a valid file name")
    return name


class CappedWriter:
    """Writes chunks to ``path``, hashing them and refusing to pass ``max_bytes``.

    The file is created exclusively; ``abort`` (called automatically when the cap is passed)
    closes and deletes it, so a refused upload leaves nothing behind.
    """

    def __init__(self, path: Path, max_bytes: int, *, label: str) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.label = label
        self.size = 0
        self._hash = hashlib.sha256()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO | None = path.open("xb")

    def write(self, chunk: bytes) -> None:
        assert self._file is not None, "write after close"
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self.abort()
            raise TooLargeError(
                "upload_too_large",
                f"{self.label} is larger than the limit of {human_bytes(self.max_bytes)}",
            )
        self._hash.update(chunk)
        self._file.write(chunk)

    def close(self) -> StoredFile:
        assert self._file is not None, "close after close"
        self._file.close()
        self._file = None
        return StoredFile(self.path, self.size, self._hash.hexdigest())

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)


def save_fileobj(fileobj: BinaryIO, path: Path, max_bytes: int, *, label: str) -> StoredFile:
    """Stream a readable binary file object to ``path``; see ``CappedWriter``."""
    writer = CappedWriter(path, max_bytes, label=label)
    try:
        while chunk := fileobj.read(CHUNK_BYTES):
            writer.write(chunk)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


async def save_chunks(
    chunks: AsyncIterable[bytes], path: Path, max_bytes: int, *, label: str
) -> StoredFile:
    """Stream an async iterator of byte chunks to ``path``; see ``CappedWriter``."""
    writer = CappedWriter(path, max_bytes, label=label)
    try:
        async for chunk in chunks:
            writer.write(chunk)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def hash_file(path: Path) -> StoredFile:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return StoredFile(path, size, digest.hexdigest())


class Storage:
    """Paths under one data directory. Cheap to build; holds no open files."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir

    # Relative <-> absolute: the DB keeps paths relative to the data directory.
    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def absolute(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"{relative!r} points outside the data directory")
        return path

    @property
    def uploads_dir(self) -> Path:
        return self.root / "uploads"

    def new_upload_dir(self) -> Path:
        """A fresh staging folder for one request's files."""
        path = self.uploads_dir / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / check_name(job_id)

    def inputs_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "inputs"

    def work_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "work"

    def artifact_path(self, job_id: str, name: str) -> Path:
        return self.job_dir(job_id) / "artifacts" / check_name(name)

    def adopt_upload(self, upload_dir: Path, job_id: str) -> Path:
        """Move a validated request's staging folder to the job's inputs, in one rename."""
        target = self.inputs_dir(job_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        upload_dir.rename(target)
        return target

    @property
    def resources_dir(self) -> Path:
        return self.root / "resources"

    def resource_dir(self, resource_id: str) -> Path:
        return self.resources_dir / check_name(resource_id)

    def adopt_resource(self, upload_dir: Path, resource_id: str) -> Path:
        """Move a validated upload's staging folder to the resource's folder, in one rename."""
        target = self.resource_dir(resource_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        upload_dir.rename(target)
        return target

    def remove_resource_files(self, resource_id: str) -> None:
        self.remove_tree(self.resource_dir(resource_id))

    def store_artifact(self, job_id: str, name: str, source: Path) -> StoredFile:
        """Hash ``source`` and move it to the job's artifacts (a rename on the same disk)."""
        target = self.artifact_path(job_id, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        hashed = hash_file(source)
        # os.replace is atomic: a reader sees the old file or the whole new one.
        try:
            os.replace(source, target)
        except OSError:  # another filesystem: copy, then swap in atomically
            partial = target.with_name(target.name + ".part")
            shutil.copyfile(source, partial)
            os.replace(partial, target)
        return StoredFile(target, hashed.size, hashed.sha256)

    @staticmethod
    def remove_tree(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def remove_job_files(self, job_id: str) -> None:
        self.remove_tree(self.job_dir(job_id))

    def is_writable(self) -> bool:
        """True if a file can be created under the data directory (readiness check)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError:
            return False
        return True
