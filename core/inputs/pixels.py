"""Rows of decoded images as uint8 tensors: ``PixelView`` over a dataset store (or a tensor),
and the ``Prefetcher`` that reads the next training batches while a step computes."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from core.inputs.store import StoreFile


class RowSource(Protocol):
    """Rows of a uint8 ``[N, 3, H, W]`` array, read into a caller's buffer."""

    shape: tuple[int, ...]

    def read_rows(self, rows: np.ndarray, out: np.ndarray) -> None: ...

    def read_range(self, first: int, stop: int, out: np.ndarray) -> None: ...


class ArrayRows:
    """A ``RowSource`` over an array in memory (a tensor's, shared)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape = array, array.shape

    def read_rows(self, rows: np.ndarray, out: np.ndarray) -> None:
        np.take(self.array, rows, axis=0, out=out)

    def read_range(self, first: int, stop: int, out: np.ndarray) -> None:
        out[...] = self.array[first:stop]


class PixelView:
    """Rows of uint8 ``[N, 3, H, W]`` images (a dataset store's ``StoreFile``, or a tensor),
    optionally through an index: ``ImageSet.split`` and ``subset`` make views, never copies.

    ``view[i]``, ``view[a:b]`` and ``view[indices]`` read rows into a new uint8 CPU tensor;
    further indices apply to that tensor (``view[:, 0, 0, 0]``). ``len``, ``shape``, ``dtype``
    and ``device`` are those of the tensor the whole view would read into.
    """

    dtype = torch.uint8
    device = torch.device("cpu")

    def __init__(self, source: RowSource | StoreFile, rows: np.ndarray | None = None) -> None:
        self.source, self._rows = source, rows

    @classmethod
    def of_tensor(cls, pixels: Tensor) -> PixelView:
        """A view over an in-memory uint8 ``[N, 3, H, W]`` CPU tensor, sharing its memory."""
        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.device.type != "cpu":
            raise ValueError(f"expected a uint8 [N, C, H, W] CPU tensor, got {pixels.dtype}")
        return cls(ArrayRows(pixels.contiguous().numpy()))

    def __len__(self) -> int:
        return self.source.shape[0] if self._rows is None else len(self._rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.source.shape[1:]))

    def subset(self, indices: Tensor | np.ndarray | Sequence[int]) -> PixelView:
        """The view of rows ``indices`` of this one (no pixels are read)."""
        return PixelView(self.source, self._source_rows(indices))

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
        if isinstance(key, slice) and self._rows is None and key.step in (None, 1):
            first, stop, _ = key.indices(len(self))
            target = self._target(max(stop - first, 0), out)
            self.source.read_range(first, first + len(target), target.numpy())
            return target
        rows = self._source_rows(key)
        target = self._target(len(rows), out)
        self.source.read_rows(rows, target.numpy())
        return target

    def _source_rows(self, key: Any) -> np.ndarray:
        """Row numbers of the source for this view's rows ``key``."""
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

    def _target(self, count: int, out: Tensor | None) -> Tensor:
        shape = (count, *self.source.shape[1:])
        if out is None:
            return torch.empty(shape, dtype=torch.uint8)
        if tuple(out.shape) != shape or out.dtype != torch.uint8:
            raise ValueError(f"out must be uint8 {shape}, got {out.dtype} {tuple(out.shape)}")
        return out


Pixels = Tensor | PixelView  # what the trainer, metrics and calibration index


def select(pixels: Pixels, indices: Tensor) -> Pixels:
    """Rows ``indices`` of ``pixels``: a view of a ``PixelView``, a copy of a tensor's."""
    return pixels.subset(indices) if isinstance(pixels, PixelView) else pixels[indices]


_Queue = queue.Queue[tuple[int, Tensor, Tensor] | BaseException | None]


class Prefetcher:
    """Batches of ``pixels`` for ``batches`` (each (epoch, indices)), read ``depth`` steps ahead
    by a background thread while the caller computes: yields (epoch, indices, rows), the rows
    of ``indices[shard]`` (a training process's share of each batch; all of it by default).

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
        shard: slice = slice(None),
    ) -> None:
        self._ready: _Queue = queue.Queue(depth)
        self._stop = threading.Event()
        # The thread holds no reference to this object: once the caller drops it (a loop left
        # by an exception, say), ``__del__`` stops the thread.
        self._thread = threading.Thread(
            target=_prefetch,
            args=(pixels, iter(batches), shard, pin, self._ready, self._stop),
            name="prefetch",
            daemon=True,
        )
        self._thread.start()

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


def _prefetch(
    pixels: Pixels,
    batches: Iterator[tuple[int, Tensor]],
    shard: slice,
    pin: bool,
    ready: _Queue,
    stop: threading.Event,
) -> None:
    """The prefetch thread: read each batch's rows into ``ready``; None at the end."""

    def put(item: tuple[int, Tensor, Tensor] | BaseException | None) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for epoch, indices in batches:
            if stop.is_set() or not put((epoch, indices, _read_rows(pixels, indices[shard], pin))):
                return
        put(None)
    except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
        put(exc)


def _read_rows(pixels: Pixels, indices: Tensor, pin: bool) -> Tensor:
    if isinstance(pixels, PixelView):
        out = None
        if pin:
            shape = (len(indices), *pixels.shape[1:])
            out = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        return pixels.read(indices, out)
    rows = pixels[indices]
    return rows.pin_memory() if pin and rows.device.type == "cpu" else rows
