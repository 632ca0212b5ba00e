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
gets the exclusive lock without waiting: never under a running job.

Jobs read rows through ``PixelView``: indexing returns uint8 CPU tensors; mapped pages count in
the process's resident memory once touched, so the view drops them (``MADV_DONTNEED``: they stay
in the kernel's page cache) whenever the bytes read since the last drop pass a page budget. A
job's resident memory therefore does not grow with the number of images.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import mmap
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from core.errors import DataImportError
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
DEFAULT_PAGE_BUDGET = 256 * 2**20

# --- reading -------------------------------------------------------------------------------


class PageBudget:
    """Drops a read-only map's pages from this process once ``limit`` bytes were read from it."""

    def __init__(self, mapped: mmap.mmap, limit: int) -> None:
        self._mapped, self._limit = mapped, limit
        self._read = 0
        self._lock = threading.Lock()
        self.drops = 0

    def charge(self, nbytes: int) -> None:
        with self._lock:
            self._read += nbytes
            if self._read > self._limit:
                # Only this process's page-table entries go; the pages stay in the page cache,
                # and a later read maps them again. Safe while another thread reads the map.
                self._mapped.madvise(mmap.MADV_DONTNEED)
                self._read = 0
                self.drops += 1


class PixelView:
    """Rows of a uint8 ``[N, 3, H, W]`` array (a mapped store, or a tensor's memory), optionally
    through an index: ``ImageSet.split`` and ``subset`` make views, never copies.

    ``view[i]``, ``view[a:b]`` and ``view[indices]`` read rows into a new uint8 CPU tensor;
    further indices apply to that tensor (``view[:, 0, 0, 0]``). ``len``, ``shape``, ``dtype``
    and ``device`` are those of the tensor the whole view would read into.
    """

    dtype = torch.uint8
    device = torch.device("cpu")

    def __init__(
        self,
        array: np.ndarray,
        rows: np.ndarray | None = None,
        pages: PageBudget | None = None,
        owner: object = None,
    ) -> None:
        self._array, self._rows, self._pages = array, rows, pages
        self._owner = owner  # keeps the store's shared lock (and the map) alive with the view

    @classmethod
    def of_tensor(cls, pixels: Tensor) -> PixelView:
        """A view over an in-memory uint8 ``[N, 3, H, W]`` CPU tensor, sharing its memory."""
        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.device.type != "cpu":
            raise ValueError(f"expected a uint8 [N, C, H, W] CPU tensor, got {pixels.dtype}")
        return cls(pixels.contiguous().numpy(), owner=pixels)

    def __len__(self) -> int:
        return len(self._array) if self._rows is None else len(self._rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self._array.shape[1:]))

    @property
    def page_budget(self) -> PageBudget | None:
        return self._pages

    def subset(self, indices: Tensor | np.ndarray | Sequence[int]) -> PixelView:
        """The view of rows ``indices`` of this one (no pixels are read)."""
        return PixelView(self._array, self._source_rows(indices), self._pages, self._owner)

    def __getitem__(self, key: Any) -> Tensor:
        rest: tuple[Any, ...] = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        single = isinstance(key, int | np.integer) or (isinstance(key, Tensor) and key.dim() == 0)
        if single:
            index = int(key)
            if not -len(self) <= index < len(self):
                raise IndexError(f"row {index} of a view of {len(self)}")
            rows = self.read([index % len(self)])[0]
        else:
            rows = self.read(key)
            rest = (slice(None), *rest) if rest else ()
        return rows[rest] if rest else rows

    def read(self, key: Any, out: Tensor | None = None) -> Tensor:
        """Rows ``key`` (a slice, or indices) as a uint8 tensor ``[len(key), 3, H, W]``, into
        ``out`` when given (a pinned buffer, say)."""
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if self._rows is None and step == 1:  # one contiguous read
                source = self._array[start : max(start, stop)]
                return self._copy(source, out)
            key = np.arange(start, stop, step)
        return self._copy_rows(self._source_rows(key), out)

    def _source_rows(self, key: Any) -> np.ndarray:
        """Row numbers of the underlying array for this view's rows ``key``."""
        if isinstance(key, slice):
            key = np.arange(*key.indices(len(self)))
        indices = key.numpy() if isinstance(key, Tensor) else np.asarray(key)
        if indices.dtype == np.bool_:
            indices = np.flatnonzero(indices)
        indices = indices.astype(np.int64, copy=False).reshape(-1)
        if len(indices) and (indices.min() < -len(self) or indices.max() >= len(self)):
            raise IndexError(f"rows out of range for a view of {len(self)}")
        indices = indices % max(len(self), 1)
        return indices if self._rows is None else self._rows[indices]

    def _copy_rows(self, rows: np.ndarray, out: Tensor | None) -> Tensor:
        target = self._target(len(rows), out)
        np.take(self._array, rows, axis=0, out=target.numpy())
        self._charge(target)
        return target

    def _copy(self, source: np.ndarray, out: Tensor | None) -> Tensor:
        target = self._target(len(source), out)
        target.numpy()[...] = source
        self._charge(target)
        return target

    def _target(self, count: int, out: Tensor | None) -> Tensor:
        shape = (count, *self._array.shape[1:])
        if out is None:
            return torch.empty(shape, dtype=torch.uint8)
        if tuple(out.shape) != shape or out.dtype != torch.uint8:
            raise ValueError(f"out must be uint8 {shape}, got {out.dtype} {tuple(out.shape)}")
        return out

    def _charge(self, rows: Tensor) -> None:
        if self._pages is not None:
            self._pages.charge(rows.numel())


Pixels = Tensor | PixelView  # what the trainer, metrics and calibration index


def select(pixels: Pixels, indices: Tensor) -> Pixels:
    """Rows ``indices`` of ``pixels``: a view of a ``PixelView``, a copy of a tensor's."""
    return pixels.subset(indices) if isinstance(pixels, PixelView) else pixels[indices]


class Prefetcher:
    """Batches of ``pixels`` for ``batches`` (each (epoch, indices)), read ``depth`` steps ahead
    by a background thread while the caller computes: yields (epoch, indices, rows).

    Only reads happen on the thread, in ``batches``' order; the caller's random streams
    (augmentation) stay on its own thread, so results do not depend on the thread's timing.
    With ``pin``, rows are read into pinned memory (CUDA's caching host allocator reuses those
    buffers once their copies to the GPU are done), so ``.to(cuda, non_blocking=True)`` is a
    real asynchronous copy.
    """

    def __init__(
        self,
        pixels: Pixels,
        batches: Iterable[tuple[int, Tensor]],
        *,
        depth: int = 2,
        pin: bool = False,
    ) -> None:
        self._ready: queue.Queue[tuple[int, Tensor, Tensor] | BaseException | None] = queue.Queue(
            depth
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._fill, args=(pixels, iter(batches), pin), name="prefetch", daemon=True
        )
        self._thread.start()

    def _fill(self, pixels: Pixels, batches: Iterator[tuple[int, Tensor]], pin: bool) -> None:
        try:
            for epoch, indices in batches:
                if self._stop.is_set():
                    return
                if not self._put((epoch, indices, _read_rows(pixels, indices, pin))):
                    return
            self._put(None)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            self._put(exc)

    def _put(self, item: tuple[int, Tensor, Tensor] | BaseException | None) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> tuple[int, Tensor, Tensor]:
        item = self._ready.get()
        if item is None:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the thread (it finishes the read it is in) and drop what it read ahead."""
        self._stop.set()
        self._thread.join()

    def __del__(self) -> None:
        self._stop.set()


def _read_rows(pixels: Pixels, indices: Tensor, pin: bool) -> Tensor:
    if isinstance(pixels, PixelView):
        out = None
        if pin:
            shape = (len(indices), *pixels.shape[1:])
            out = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        return pixels.read(indices, out)
    rows = pixels[indices]
    return rows.pin_memory() if pin and rows.device.type == "cpu" else rows


# --- the store ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredImages:
    """An archive's images as a ``PixelView``, and the labels the job's class names give them."""

    pixels: PixelView
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
    page_budget: int = DEFAULT_PAGE_BUDGET,
) -> StoredImages:
    """The images of ``archive_path`` at ``size`` = (H, W), decoded once per (``sha256``, size).

    ``store_dir`` None decodes into a private temporary store, deleted once the view is gone.
    ``max_pixels``: the dataset's disk budget in pixels (``check_pixel_budget``), shared with
    ``images_before`` images of the same job. ``processes`` caps the decode workers.
    """
    decode_args = (class_names, limits, max_pixels, images_before, processes)
    if store_dir is None:
        private = Path(tempfile.mkdtemp(prefix="sqakd-store-"))
        try:
            header = _decode(archive_path, size, private, None, *decode_args)
            view = _map(private, header, page_budget, lock=None)
        finally:
            shutil.rmtree(private, ignore_errors=True)  # the map keeps the file until unmapped
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
                view = _map(folder, header, page_budget, lock=lock)
                break
            except _Retry:
                lock.close()  # housekeeping deleted the store meanwhile: start again
            except BaseException:
                lock.close()
                raise
    labels, names = header.labels(class_names)
    return StoredImages(view, labels, names, decoded)


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


class _Mapping:
    """A store's read-only map and the shared lock held for as long as a view uses it."""

    def __init__(self, mapped: mmap.mmap, lock: _Lock | None) -> None:
        self.mapped, self.lock = mapped, lock


def _map(folder: Path, header: _Header, page_budget: int, lock: _Lock | None) -> PixelView:
    with (folder / PIXELS).open("rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ)
    shape = (header.images, 3, header.height, header.width)
    array = np.frombuffer(mapped, dtype=np.uint8).reshape(shape)
    return PixelView(array, None, PageBudget(mapped, page_budget), _Mapping(mapped, lock))


# --- housekeeping ---------------------------------------------------------------------------


def delete_unused_stores(store_dir: Path, unused_seconds: float, now: float | None = None) -> int:
    """Delete the stores not opened for ``unused_seconds`` (and half-decoded ones as old) that
    no job holds; returns how many went."""
    if not store_dir.is_dir():
        return 0
    now = time.time() if now is None else now
    deleted = 0
    for folder in store_dir.iterdir():
        try:
            fd = os.open(folder / LOCK, os.O_RDWR)
        except (FileNotFoundError, NotADirectoryError):
            continue
        lock = _Lock(fd)
        try:
            lock.set(fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue  # a job reads or decodes it
        try:
            used = max(p.stat().st_mtime for p in folder.iterdir())
            if _still_there(folder, fd) and now - used > unused_seconds:
                shutil.rmtree(folder)
                deleted += 1
        except FileNotFoundError:
            pass
        finally:
            lock.close()
    return deleted
