"""The artifact store: a local directory (the embedded default) or an S3-compatible bucket.

Stored objects have keys, which the database keeps (a job's ``*_path``, an artifact's ``path``)::

    jobs/<job id>/inputs/<file>     the job's accepted uploads
    jobs/<job id>/artifacts/<name>  the files clients download
    resources/<id>/<file>           a stored model or dataset (POST /v1/models, /v1/datasets);
                                    the jobs made from it name this key and keep no copy
    sweeps/<id>/artifacts/<name>    a sweep's report

``LocalStorage`` keeps object ``k`` at ``<data_dir>/k`` (keys are the paths relative to
``data_dir`` that the database always held); ``S3Storage`` at ``s3://bucket/prefix/k``
(``STORAGE_URL``). ``open_storage`` picks one from the settings. Either way these folders are
local to the machine, under its own ``data_dir``::

    uploads/<request id>/           files of a request still being received and validated
    jobs/<job id>/work/             the pipeline's working directory (checkpoints, exports)
    cache/objects/<sha256>/<file>   S3 only: a worker's copies of inputs, fetched once per
                                    content and reused by later jobs

An upload is never held in memory: it goes to disk chunk by chunk while its sha256 is computed
and its size checked against a cap; a write that passes the cap deletes what it wrote. Accepted
uploads and artifacts are then moved into the store (a rename, or an upload to the bucket).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from core.errors import InputError, TooLargeError
from core.settings import Settings

CHUNK_BYTES = 1024 * 1024
MTIME_METADATA = "saved-ns"  # a mirrored work file's object metadata: its mtime, in ns
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


@dataclass(frozen=True)
class StoredObject:
    """An object put into the store, with what the database records of it."""

    key: str
    size: int
    sha256: str

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Storage(ABC):
    """Objects by key (local directory or bucket), and this machine's folders under ``data_dir``.

    Cheap to build (``open_storage``); holds no open files.
    """

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir

    # -- keys ------------------------------------------------------------------------------------

    JOBS, RESOURCES, SWEEPS = "jobs", "resources", "sweeps"  # the top folders of objects

    @staticmethod
    def job_key(job_id: str) -> str:
        return f"{Storage.JOBS}/{check_name(job_id)}"

    def inputs_key(self, job_id: str) -> str:
        return f"{self.job_key(job_id)}/inputs"

    def artifact_key(self, job_id: str, name: str) -> str:
        return f"{self.job_key(job_id)}/artifacts/{check_name(name)}"

    @staticmethod
    def resource_key(resource_id: str) -> str:
        return f"{Storage.RESOURCES}/{check_name(resource_id)}"

    @staticmethod
    def sweep_key(sweep_id: str) -> str:
        return f"{Storage.SWEEPS}/{check_name(sweep_id)}"

    def sweep_artifact_key(self, sweep_id: str, name: str) -> str:
        return f"{self.sweep_key(sweep_id)}/artifacts/{check_name(name)}"

    # -- this machine's folders ------------------------------------------------------------------

    @property
    def uploads_dir(self) -> Path:
        return self.root / "uploads"

    def new_upload_dir(self) -> Path:
        """A fresh staging folder for one request's files."""
        path = self.uploads_dir / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def work_key(self, job_id: str) -> str:
        return f"{self.job_key(job_id)}/work"

    def work_dir(self, job_id: str) -> Path:
        return self.root / self.work_key(job_id)

    @staticmethod
    def remove_tree(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    # -- objects ---------------------------------------------------------------------------------

    @abstractmethod
    def adopt(self, folder: Path, key: str) -> str:
        """Move every file of a validated upload's staging ``folder`` to ``key/<its name>``;
        returns ``key``. The folder is gone afterwards; on failure nothing is left under key."""

    @abstractmethod
    def put_file(self, key: str, source: Path) -> None:
        """Move the file ``source`` to ``key``: readers see the old object or the whole new one."""

    @abstractmethod
    def put_bytes(self, key: str, content: bytes) -> None:
        """Store ``content`` at ``key``, as ``put_file``."""

    @abstractmethod
    def local_file(self, key: str, sha256: str) -> Path:
        """A file on this machine with the bytes of ``key``, whose content is ``sha256``: the
        stored file itself, or a cached copy. ``FileNotFoundError`` if there is no such object."""

    @abstractmethod
    def file_path(self, key: str) -> Path | None:
        """Where the object lies as a file on this machine, if the store is a local directory."""

    @abstractmethod
    def iter_bytes(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The object's bytes ``[start, end)`` in chunks; ``FileNotFoundError`` (at the call, not
        at the first chunk) if there is no such object."""

    @abstractmethod
    def presigned_url(self, key: str, *, filename: str, media_type: str) -> str | None:
        """A URL that lets its holder download the object for a while without our API; None if
        the store has no such URLs."""

    @abstractmethod
    def remove(self, key: str) -> None:
        """Delete every object under the folder ``key``; nothing there is fine."""

    @abstractmethod
    def folder_names(self, key: str) -> set[str]:
        """Names of the folders (and files) right under ``key``."""

    @abstractmethod
    def last_change(self, key: str) -> float | None:
        """When anything under the folder ``key`` last changed (epoch seconds); None if empty."""

    @abstractmethod
    def is_writable(self) -> bool:
        """True if uploads can be staged and objects stored (readiness check)."""

    @abstractmethod
    def discard_work_dir(self, job_id: str) -> None:
        """Called by a worker once a job has ended on this machine."""

    @abstractmethod
    def mirror_work_file(self, job_id: str, path: Path) -> None:
        """Keep a copy of the work file ``path`` (a checkpoint) where any worker finds it."""

    @abstractmethod
    def restore_work_file(self, job_id: str, name: str) -> None:
        """Put the mirrored work file ``name`` in this machine's work folder where the mirror
        is newer than this machine's copy or it has none (a job that another worker started
        resumes from its checkpoint)."""

    # -- built on the above ----------------------------------------------------------------------

    def store_artifact(self, job_id: str, name: str, source: Path) -> StoredObject:
        """Hash ``source`` and move it to the job's artifacts."""
        hashed = hash_file(source)
        key = self.artifact_key(job_id, name)
        self.put_file(key, source)
        return StoredObject(key, hashed.size, hashed.sha256)

    def remove_job_files(self, job_id: str) -> None:
        """A job's inputs, artifacts and (on this machine) work folder."""
        self.remove(self.job_key(job_id))
        self.remove_tree(self.work_dir(job_id))

    def remove_resource_files(self, resource_id: str) -> None:
        self.remove(self.resource_key(resource_id))

    def _local_writable(self) -> bool:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError:
            return False
        return True


class LocalStorage(Storage):
    """Objects as files under ``data_dir``: the key is the path relative to it."""

    def absolute(self, key: str) -> Path:
        """The file (or folder) of ``key``."""
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"{key!r} points outside the data directory")
        return path

    def relative(self, path: Path) -> str:
        """The key of a file under the data directory."""
        return path.relative_to(self.root).as_posix()

    # The folders and files of the layout's keys, for tools that look at the directory.
    def job_dir(self, job_id: str) -> Path:
        return self.absolute(self.job_key(job_id))

    def inputs_dir(self, job_id: str) -> Path:
        return self.absolute(self.inputs_key(job_id))

    def artifact_path(self, job_id: str, name: str) -> Path:
        return self.absolute(self.artifact_key(job_id, name))

    def resource_dir(self, resource_id: str) -> Path:
        return self.absolute(self.resource_key(resource_id))

    def adopt(self, folder: Path, key: str) -> str:
        # One rename: the folder appears whole or not at all.
        target = self.absolute(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        folder.rename(target)
        return key

    def put_file(self, key: str, source: Path) -> None:
        target = self.absolute(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # os.replace is atomic: a reader sees the old file or the whole new one.
        try:
            os.replace(source, target)
        except OSError:  # another filesystem: copy, then swap in atomically
            partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
            try:
                shutil.copyfile(source, partial)
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
            source.unlink()

    def put_bytes(self, key: str, content: bytes) -> None:
        target = self.absolute(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        try:
            partial.write_bytes(content)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)

    def local_file(self, key: str, sha256: str) -> Path:
        path = self.absolute(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        return path

    def file_path(self, key: str) -> Path | None:
        return self.absolute(key)

    def iter_bytes(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        file = self.absolute(key).open("rb")

        def chunks() -> Iterator[bytes]:
            with file:
                file.seek(start)
                left = None if end is None else end - start
                while left is None or left > 0:
                    chunk = file.read(CHUNK_BYTES if left is None else min(CHUNK_BYTES, left))
                    if not chunk:
                        return
                    if left is not None:
                        left -= len(chunk)
                    yield chunk

        return chunks()

    def presigned_url(self, key: str, *, filename: str, media_type: str) -> str | None:
        return None

    def remove(self, key: str) -> None:
        self.remove_tree(self.absolute(key))

    def folder_names(self, key: str) -> set[str]:
        folder = self.absolute(key)
        return {child.name for child in folder.iterdir()} if folder.is_dir() else set()

    def last_change(self, key: str) -> float | None:
        # One level deep: uploads and artifacts are files right under their folders, and the
        # folders of a job change when their files do.
        path = self.absolute(key)
        try:
            return max([path.stat().st_mtime, *(child.stat().st_mtime for child in path.iterdir())])
        except FileNotFoundError:
            return None

    def is_writable(self) -> bool:
        return self._local_writable()

    def discard_work_dir(self, job_id: str) -> None:
        """Kept: the job's work folder lies with its other files and goes with them (deletion,
        or housekeeping once the inputs' retention has passed)."""

    # The work folder is the store's own: every worker on this directory sees it already.
    def mirror_work_file(self, job_id: str, path: Path) -> None:
        pass

    def restore_work_file(self, job_id: str, name: str) -> None:
        pass


class S3Storage(Storage):
    """Objects in an S3-compatible bucket under ``prefix``; uploads are staged, and inputs
    cached and worked on, in this machine's ``data_dir``.

    Files go up and down through boto3's transfer manager: in parts of ``multipart_bytes``,
    several at once, from ``multipart_bytes`` on.
    """

    def __init__(
        self,
        data_dir: Path,
        bucket: str,
        prefix: str,
        client: Any,
        *,
        multipart_bytes: int = 64 * 1024 * 1024,
        presign_seconds: int = 300,
        cache_seconds: float = 7 * 24 * 3600,
    ) -> None:
        super().__init__(data_dir)
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.client = client
        self.presign_seconds = presign_seconds
        self.cache_seconds = cache_seconds
        self.transfer = TransferConfig(
            multipart_threshold=multipart_bytes, multipart_chunksize=multipart_bytes
        )

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache" / "objects"

    def _key(self, key: str) -> str:
        # Keys come from our own layout (check_name'd parts); refuse anything that could climb.
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"{key!r} is not a storage key")
        return self.prefix + key

    def _objects(self, key: str, **options: Any) -> Iterator[dict[str, Any]]:
        """The pages of a listing under the folder ``key``."""
        paginator = self.client.get_paginator("list_objects_v2")
        yield from paginator.paginate(Bucket=self.bucket, Prefix=f"{self._key(key)}/", **options)

    def adopt(self, folder: Path, key: str) -> str:
        try:
            for file in sorted(folder.iterdir()):
                self.put_file(f"{key}/{check_name(file.name)}", file)
        except BaseException:
            self.remove(key)
            raise
        self.remove_tree(folder)
        return key

    def put_file(self, key: str, source: Path) -> None:
        # S3 makes an object visible only once complete: atomic, multipart or not.
        self.client.upload_file(str(source), self.bucket, self._key(key), Config=self.transfer)
        source.unlink()

    def put_bytes(self, key: str, content: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=content)

    def local_file(self, key: str, sha256: str) -> Path:
        """A cached copy under ``cache/objects/<sha256>/``: fetched once per content (and file
        name), checked against ``sha256``, and reused by every later job that names it. Each
        fetch first deletes the copies no job used for ``cache_seconds``."""
        if not _SHA256.fullmatch(sha256):
            raise ValueError(f"{sha256!r} is not a sha256")
        target = self.cache_dir / sha256 / check_name(key.rsplit("/", 1)[-1])
        try:
            os.utime(target)  # used now: the last to be evicted
            return target
        except FileNotFoundError:
            pass
        self._evict_unused()
        target.parent.mkdir(parents=True, exist_ok=True)
        # A name of this fetch alone: two workers on one data directory may fetch at once.
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        try:
            try:
                self.client.download_file(
                    self.bucket, self._key(key), str(partial), Config=self.transfer
                )
            except ClientError as exc:
                if _missing(exc):
                    raise FileNotFoundError(key) from exc
                raise
            fetched = hash_file(partial)
            if fetched.sha256 != sha256:
                raise ValueError(f"{key!r} holds sha256 {fetched.sha256}, not {sha256}")
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target

    def _evict_unused(self) -> None:
        # By age, not size: a copy a running job reads was used at its start, less than
        # MAX_JOB_SECONDS ago, which STORAGE_CACHE_DAYS must exceed (core.settings).
        cutoff = time.time() - self.cache_seconds
        for file in self.cache_dir.glob("*/*"):
            with suppress(FileNotFoundError):  # another worker on this directory was quicker
                if file.stat().st_mtime < cutoff:
                    file.unlink()
                    with suppress(OSError):  # not empty: another copy of that content is used
                        file.parent.rmdir()

    def file_path(self, key: str) -> Path | None:
        return None

    def iter_bytes(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        options: dict[str, Any] = {}
        if start or end is not None:
            options["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key), **options)["Body"]
        except ClientError as exc:
            if _missing(exc):
                raise FileNotFoundError(key) from exc
            raise

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK_BYTES)
            finally:
                body.close()

        return chunks()

    def presigned_url(self, key: str, *, filename: str, media_type: str) -> str | None:
        return str(
            self.client.generate_presigned_url(
                "get_object",
                Params={
                    "Bucket": self.bucket,
                    "Key": self._key(key),
                    "ResponseContentDisposition": f'attachment; filename="{check_name(filename)}"',
                    "ResponseContentType": media_type,
                },
                ExpiresIn=self.presign_seconds,
            )
        )

    def remove(self, key: str) -> None:
        for page in self._objects(key):
            # A page holds at most 1,000 keys, as many as one DeleteObjects takes.
            if keys := [{"Key": item["Key"]} for item in page.get("Contents", [])]:
                self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True}
                )

    def folder_names(self, key: str) -> set[str]:
        start = len(self._key(key)) + 1
        names: set[str] = set()
        for page in self._objects(key, Delimiter="/"):
            names.update(
                entry["Prefix"][start:].rstrip("/") for entry in page.get("CommonPrefixes", [])
            )
            names.update(item["Key"][start:] for item in page.get("Contents", []))
        return names

    def last_change(self, key: str) -> float | None:
        stamps = [
            item["LastModified"].timestamp()
            for page in self._objects(key)
            for item in page.get("Contents", [])
        ]
        return max(stamps, default=None)

    def is_writable(self) -> bool:
        if not self._local_writable():
            return False
        probe = f".probe-{uuid.uuid4().hex}"
        try:
            self.put_bytes(probe, b"ok")
            self.client.delete_object(Bucket=self.bucket, Key=self._key(probe))
        except (BotoCoreError, ClientError):
            return False
        return True

    def discard_work_dir(self, job_id: str) -> None:
        """Workers of a bucket may run on any machine, whose folders nobody else cleans: a
        job's local folder (its work folder alone) goes once the job has ended, and so does
        its mirrored checkpoint; its inputs stay cached."""
        self.remove_tree(self.root / self.job_key(job_id))
        self.remove(self.work_key(job_id))

    def mirror_work_file(self, job_id: str, path: Path) -> None:
        # A hard link pins this version: the upload reads its parts by name, and the trainer
        # replaces the file (os.replace) whenever it saves a new checkpoint.
        snapshot = path.with_name(f".{path.name}.{uuid.uuid4().hex}.mirror")
        os.link(path, snapshot)
        try:
            key = f"{self.work_key(job_id)}/{check_name(path.name)}"
            written = {MTIME_METADATA: str(snapshot.stat().st_mtime_ns)}  # when it was saved
            self.client.upload_file(
                str(snapshot),
                self.bucket,
                self._key(key),
                ExtraArgs={"Metadata": written},
                Config=self.transfer,
            )
        finally:
            snapshot.unlink()

    def restore_work_file(self, job_id: str, name: str) -> None:
        """The mirror, unless this machine's copy was saved as late or later: a job that went
        from this worker to another and back resumes from where the other one got to."""
        target = self.work_dir(job_id) / check_name(name)
        key = self._key(f"{self.work_key(job_id)}/{name}")
        try:
            mirrored = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _missing(exc):
                return
            raise
        saved = int(mirrored.get("Metadata", {}).get(MTIME_METADATA, 0))
        if target.exists() and target.stat().st_mtime_ns >= saved:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        try:
            self.client.download_file(self.bucket, key, str(partial), Config=self.transfer)
            os.replace(partial, target)
        except ClientError as exc:
            if not _missing(exc):  # removed since: the job ended meanwhile
                raise
        finally:
            partial.unlink(missing_ok=True)


def _missing(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


@lru_cache(maxsize=8)
def _s3_client(endpoint_url: str | None) -> Any:
    """One client per endpoint and process (thread-safe; building one costs ~50 ms). Region and
    credentials come from boto3's usual sources (AWS_* variables, config files, roles)."""
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=endpoint_url,
        config=BotoConfig(signature_version="s3v4", retries={"mode": "standard"}),
    )


def open_storage(settings: Settings) -> Storage:
    """The store the settings name: ``STORAGE_URL``'s bucket, or else the data directory."""
    if settings.storage_url is None:
        return LocalStorage(settings.data_dir)
    bucket, prefix = settings.storage_bucket
    return S3Storage(
        settings.data_dir,
        bucket,
        prefix,
        _s3_client(settings.storage_endpoint_url),
        multipart_bytes=settings.storage_multipart_bytes,
        presign_seconds=settings.storage_presign_seconds,
        cache_seconds=settings.storage_cache_days * 24 * 3600,
    )
