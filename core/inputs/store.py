"""The dataset store: an archive decoded once per (sha256, input size) into a memory-mapped file.

Layout, under the cache directory (``Settings.dataset_store_dir``)::

    <sha256>-<H>x<W>/pixels.u8    N rows of 3 x H x W uint8 pixels (RGB, channel-first)
    <sha256>-<H>x<W>/header.json  shape, sha256, size, class folders; written last: the commit
    <sha256>-<H>x<W>/lock         flock: shared while a job reads, exclusive while one decodes

A job takes the shared lock and keeps it while it holds the store; a job that finds no valid
store takes the exclusive lock (waiting for one that is decoding), decodes in worker processes
(``core.inputs.decode``) into a temporary file, fsyncs and renames it, then writes the header
the same way. A store is valid only with a header whose version, key and file size match, so a
crashed half-decode (a temporary file, or pixels without a header) is never read; the next
decoder removes it. Housekeeping deletes stores unused for ``dataset_store_days``, only when it
gets the exclusive lock without waiting: never under a running job. A decode first makes room
for its store the same way (``make_room``): it deletes the least recently used stores no job
holds until the new one fits on the disk and under ``dataset_store_max_bytes``.

Jobs read rows (``StoreFile``, through ``core.inputs.pixels.PixelView``) with ``preadv`` into
their own buffers, not through a memory map: the kernel's page cache serves the file, and a
job's resident memory is its buffers alone, whatever the number of images. A map would count
every touched page in the job's resident memory, and on this machine's kernel (ext4, large
folios) touching one byte of a mapped file makes 2 MiB resident: a random batch of 256 rows
made 512 MiB resident, however small its rows. This module imports no torch: the API's
housekeeping deletes unused stores.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.inputs.archive import (
    DEFAULT_LIMITS,
    ArchiveLimits,
    _class_folder,
    _class_names,
    open_image_archive,
)
from core.inputs.budget import check_pixel_budget
from core.inputs.decode import RowFile, chunked, decode_into, worker_count
from core.storage import human_bytes

log = logging.getLogger(__name__)

STORE_VERSION = 1  # of the pixels (decoder, resize) and the header; another version is redecoded
PIXELS, HEADER, LOCK = "pixels.u8", "header.json", "lock"


@dataclass(frozen=True)
class StoredImages:
    """An archive's images in the store, and the labels the job's class names give them."""

    file: StoreFile  # its rows; holds the store's shared lock until closed (or collected)
    labels: list[int] | None
    class_names: list[str] | None
    decoded: bool  # this call decoded the archive (False: an existing store was reused)


@dataclass(frozen=True)
class _Header:
    version: int
    sha256: str | None  # None: a job's private store, no cache
    images: int
    height: int
    width: int
    folders: list[str]  # every image's class folder, sorted and distinct ("" at the root)
    folder_of: list[int]  # per image, its folder in ``folders``

    @property
    def row_bytes(self) -> int:
        return 3 * self.height * self.width

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.images, 3, self.height, self.width)

    def labels(
        self, class_names: Sequence[str] | None
    ) -> tuple[list[int] | None, list[str] | None]:
        """Labels and class names under the job's ``class_names``, as ``core.inputs.archive``
        maps class folders (one folder per image suffices to apply its rules)."""
        names = _class_names([f"{folder}/" for folder in self.folders], class_names)
        if names is None:
            return None, None
        index = {name: i for i, name in enumerate(names)}
        of_folder = [index[folder] for folder in self.folders]
        return [of_folder[i] for i in self.folder_of], names


def store_key(sha256: str, size: tuple[int, int]) -> str:
    if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return f"{sha256}-{size[0]}x{size[1]}"


def open_store(
    archive_path: Path,
    size: tuple[int, int],
    *,
    store_dir: Path | None,
    sha256: str | None = None,
    class_names: Sequence[str] | None = None,
    limits: ArchiveLimits = DEFAULT_LIMITS,
    max_pixels: int | None = None,
    images_before: int = 0,
    processes: int | None = None,
    max_store_bytes: int | None = None,
) -> StoredImages:
    """The images of ``archive_path`` at ``size`` = (H, W), decoded once per (``sha256``, size).

    ``store_dir`` None decodes into a private temporary store, deleted once its file is closed.
    ``max_pixels``: the dataset's disk budget in pixels (``check_pixel_budget``), shared with
    ``images_before`` images of the same job. ``processes`` caps the decode workers.
    ``max_store_bytes``: what all stores of ``store_dir`` may keep (``make_room``).
    """
    decode_args = (class_names, limits, max_pixels, images_before, processes, max_store_bytes)
    if store_dir is None:
        private = Path(tempfile.mkdtemp(prefix="sqakd-store-"))
        try:
            header = _decode(archive_path, size, private, None, *decode_args)
            file = StoreFile(private / PIXELS, header.shape, lock=None)
        finally:
            shutil.rmtree(private, ignore_errors=True)  # the open file lives on until closed
        decoded = True
    else:
        if sha256 is None:
            raise ValueError("a shared store needs the archive's sha256")
        folder = store_dir / store_key(sha256, size)
        while True:
            lock = _lock_shared(folder)
            try:
                header = _valid_header(folder, sha256, size)
                decoded = header is None
                if header is None:
                    header = _decode_locked(lock, folder, archive_path, size, sha256, decode_args)
                elif max_pixels is not None:
                    check_pixel_budget(images_before + header.images, size, max_pixels)
                os.utime(folder / HEADER)  # last used: what housekeeping goes by
                file = StoreFile(folder / PIXELS, header.shape, lock=lock)
                break
            except _Retry:
                lock.close()  # housekeeping deleted the store meanwhile: start again
            except BaseException:
                lock.close()
                raise
    labels, names = header.labels(class_names)
    return StoredImages(file, labels, names, decoded)


class _Lock:
    """An open lock file with an flock on it; closing it releases the lock."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    def set(self, operation: int) -> None:
        fcntl.flock(self.fd, operation)

    def close(self) -> None:
        self._finalizer()


def _lock_shared(folder: Path) -> _Lock:
    """The shared lock of ``folder``'s store, on the lock file that is there now.

    Housekeeping may delete the folder between our open and our flock; a lock on a deleted file
    locks nothing, so check that the path still names the locked file, else try again.
    """
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue  # deleted between mkdir and open
        lock = _Lock(fd)
        lock.set(fcntl.LOCK_SH)
        if _still_there(folder, fd):
            return lock
        lock.close()


def _still_there(folder: Path, fd: int) -> bool:
    try:
        return os.stat(folder / LOCK).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _valid_header(folder: Path, sha256: str | None, size: tuple[int, int]) -> _Header | None:
    """The store's header, if the store is complete and is the one for (sha256, size)."""
    try:
        header = _Header(**json.loads((folder / HEADER).read_text()))
        pixels_bytes = (folder / PIXELS).stat().st_size
    except (FileNotFoundError, ValueError, TypeError):
        return None
    complete = (
        header.version == STORE_VERSION
        and header.sha256 == sha256
        and (header.height, header.width) == tuple(size)
        and len(header.folder_of) == header.images
        and pixels_bytes == header.images * header.row_bytes
    )
    return header if complete else None


def _decode_locked(
    lock: _Lock,
    folder: Path,
    archive_path: Path,
    size: tuple[int, int],
    sha256: str,
    decode_args: tuple[Any, ...],
) -> _Header:
    """Decode under the exclusive lock (after whoever holds it), unless someone did meanwhile;
    returns holding the shared lock again."""
    lock.set(fcntl.LOCK_EX)  # not atomic from shared: another decoder may go first
    try:
        if not _still_there(folder, lock.fd):
            raise _Retry
        header = _valid_header(folder, sha256, size)
        if header is None:
            header = _decode(archive_path, size, folder, sha256, *decode_args)
            _fsync_dir(folder)
        return header
    finally:
        lock.set(fcntl.LOCK_SH)


class _Retry(Exception):
    pass


def _decode(
    archive_path: Path,
    size: tuple[int, int],
    folder: Path,
    sha256: str | None,
    class_names: Sequence[str] | None,
    limits: ArchiveLimits,
    max_pixels: int | None,
    images_before: int,
    processes: int | None,
    max_store_bytes: int | None,
) -> _Header:
    """Decode the archive into ``folder`` (which we hold exclusively) and publish it."""
    for stale in folder.glob("*.tmp"):  # a crashed decode's; nobody else writes here now
        stale.unlink(missing_ok=True)
    height, width = size
    started = time.perf_counter()
    with open_image_archive(archive_path, limits, class_names) as archive:
        members = archive.members
        if max_pixels is not None:
            # Again on the worker: the job may have been accepted under a larger budget.
            check_pixel_budget(images_before + len(members), size, max_pixels)
        folder_names = [_class_folder(member) for member in members]
        folders = sorted(set(folder_names))
        folder_index = {name: i for i, name in enumerate(folders)}
        header = _Header(
            version=STORE_VERSION,
            sha256=sha256,
            images=len(members),
            height=height,
            width=width,
            folders=folders,
            folder_of=[folder_index[name] for name in folder_names],
        )
        temp = folder / f"{PIXELS}.{uuid.uuid4().hex}.tmp"
        if sha256 is not None:  # a shared store: room among the others
            make_room(folder.parent, header.images * header.row_bytes, max_store_bytes, folder)
        try:
            _allocate(temp, header.images * header.row_bytes)
            row = {member: i for i, member in enumerate(members)}
            files = ((row[member], member, stream.read()) for member, stream in archive.stream())
            workers = worker_count(len(members), processes)
            decode_into(RowFile(str(temp), height, width), chunked(files), workers)
            with temp.open("rb+") as file:
                os.fsync(file.fileno())
            os.replace(temp, folder / PIXELS)
        finally:
            temp.unlink(missing_ok=True)
    _write_atomic(folder / HEADER, json.dumps(header.__dict__).encode())
    log.info(
        "decoded %d images at %dx%d in %.1f s with %d processes into %s",
        header.images,
        height,
        width,
        time.perf_counter() - started,
        workers,
        folder,
    )
    return header


def _allocate(path: Path, nbytes: int) -> None:
    """Create ``path`` with ``nbytes`` of disk reserved: a full disk fails now, not mid-decode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise OSError(
            errno.ENOSPC,
            f"no room for a dataset store of {human_bytes(nbytes)} in {path.parent}",
        ) from exc
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    temp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with temp.open("wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StoreFile:
    """The rows of a store's pixels file, ``shape`` = [N, 3, H, W], read with ``preadv``.

    Holds the file open and the store's shared ``lock`` (None: a private store) until closed or
    collected. Reads release the GIL, so a prefetch thread reads while the step computes.
    """

    def __init__(self, path: Path, shape: tuple[int, int, int, int], lock: _Lock | None) -> None:
        self.shape, self.lock = shape, lock
        self.row_bytes = shape[1] * shape[2] * shape[3]
        self._fd = os.open(path, os.O_RDONLY)
        self._finalizer = weakref.finalize(self, _close, self._fd, lock)

    def read_rows(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Rows ``rows`` (int64) into ``out`` (uint8 ``[len(rows), 3, H, W]``, C-contiguous);
        each run of consecutive rows in one read."""
        if not len(rows):
            return
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(rows)], strict=True):
            self.read_range(int(rows[start]), int(rows[start]) + int(stop - start), out[start:stop])

    def read_range(self, first: int, stop: int, out: np.ndarray) -> None:
        """Rows ``first`` to ``stop`` (exclusive) into ``out``."""
        buffer = memoryview(out).cast("B")
        offset = first * self.row_bytes
        while len(buffer):
            count = os.preadv(self._fd, [buffer], offset)
            if count == 0:
                raise OSError(f"dataset store ends before row {offset // self.row_bytes}")
            buffer, offset = buffer[count:], offset + count

    def close(self) -> None:
        self._finalizer()


def _close(fd: int, lock: _Lock | None) -> None:
    os.close(fd)
    if lock is not None:
        lock.close()


# --- room and housekeeping -----------------------------------------------------------------


def make_room(store_dir: Path, nbytes: int, max_bytes: int | None, mine: Path) -> int:
    """Delete the least recently used stores of ``store_dir`` that no job holds until a store of
    ``nbytes`` fits on the disk and, with ``max_bytes``, the stores with it fit under that;
    returns how many went. ``mine`` is the store being decoded. Stores that jobs hold stay,
    even past ``max_bytes``: the cap trims what is kept, it fails no job."""
    others = []
    for folder in store_dir.iterdir():
        if folder != mine:
            try:
                others.append((_last_used(folder), _disk_bytes(folder), folder))
            except (FileNotFoundError, NotADirectoryError, ValueError):
                continue  # deleted meanwhile, not a folder, or empty
    kept = sum(size for _, size, _ in others)
    free = shutil.disk_usage(store_dir).free
    deleted = 0
    for _, size, folder in sorted(others):
        if free >= nbytes and (max_bytes is None or kept + nbytes <= max_bytes):
            break
        if _delete_unheld(folder):
            kept, free, deleted = kept - size, free + size, deleted + 1
    if deleted:
        log.info("deleted %d unused dataset stores to make room in %s", deleted, store_dir)
    if max_bytes is not None and kept + nbytes > max_bytes:
        log.warning(
            "dataset stores in %s: %s with the new one, over the %s cap; jobs hold the rest",
            store_dir,
            human_bytes(kept + nbytes),
            human_bytes(max_bytes),
        )
    return deleted


def delete_unused_stores(store_dir: Path, unused_seconds: float, now: float | None = None) -> int:
    """Delete the stores not opened for ``unused_seconds`` (and half-decoded ones as old) that
    no job holds; returns how many went."""
    if not store_dir.is_dir():
        return 0
    now = time.time() if now is None else now

    def unused(last_used: float) -> bool:
        return now - last_used > unused_seconds

    return sum(_delete_unheld(folder, unused) for folder in store_dir.iterdir())


def _delete_unheld(folder: Path, wanted: Callable[[float], bool] | None = None) -> bool:
    """Delete ``folder``'s store if no job reads or decodes it (its lock is free) and, given
    ``wanted``, it says yes to the store's last use."""
    try:
        fd = os.open(folder / LOCK, os.O_RDWR)
    except (FileNotFoundError, NotADirectoryError):
        return False
    lock = _Lock(fd)
    try:
        lock.set(fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return False  # a job reads or decodes it
    try:
        if _still_there(folder, fd) and (wanted is None or wanted(_last_used(folder))):
            shutil.rmtree(folder)
            return True
        return False
    except FileNotFoundError:
        return False
    except OSError as exc:  # a cache left as it is: never the reason a job fails
        log.warning("could not delete the dataset store %s: %s", folder, exc)
        return False
    finally:
        lock.close()


def _last_used(folder: Path) -> float:
    """When a job last opened the store (``open_store`` touches its header) or wrote to it."""
    return max(path.stat().st_mtime for path in folder.iterdir())


def _disk_bytes(folder: Path) -> int:
    """The disk the store's files take (a decode reserves all of its file at once)."""
    return sum(path.stat().st_blocks * 512 for path in folder.iterdir())
