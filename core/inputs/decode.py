"""Decode image files to RGB rows of a dataset store, in worker processes; torch-free.

The store (``core.inputs.store``) is one file of ``N`` rows of ``3 x H x W`` uint8 pixels.
Worker processes decode chunks of an archive's files and ``pwrite`` each row straight into that
file: decoding is CPU-bound Python plus C (PIL holds the GIL for its per-file work, so threads
contend), and processes scale with cores. A worker runs this module (``python -m``), which
imports no torch, so it starts in a fraction of a second.

Nothing a worker sends back is unpickled: it answers with JSON (like ``core.isolation``), so a
decoder exploit in a worker cannot hand the job process code to run. What the job sends to a
worker is its own framing (a JSON list of names and lengths) and raw file bytes.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import DataImportError

# Only the formats we advertise: PIL would otherwise also parse EPS, PSD and friends, and a file
# named .jpg that is really a PNG still decodes.
PIL_FORMATS = ("JPEG", "PNG", "WEBP")

# A small PNG or WebP can claim an enormous canvas; refuse before allocating it.
MAX_IMAGE_PIXELS = 64 * 2**20

# Decode tasks: about 32 images or 4 MiB of files each; two in flight per worker keep it busy.
CHUNK_IMAGES = 32
CHUNK_BYTES = 4 * 2**20
_IN_FLIGHT = 2

# A worker process pays off from this many images on (starting one costs ~0.3 s).
IMAGES_PER_PROCESS = 256


def decode_image(data: bytes, size: tuple[int, int], *, draft: bool = True) -> np.ndarray:
    """RGB ``[H, W, 3]`` uint8 at ``size`` = (W, H), PIL's order.

    A JPEG at least twice as large as ``size`` both ways is first decoded at a reduced scale by
    the JPEG decoder itself (``Image.draft``: 1/2, 1/4 or 1/8 in the DCT, several times
    cheaper), never below ``size``; the exact resize then does the rest. EXIF orientation is not
    applied, like torchvision's ImageFolder, so pixels match what the teacher was most likely
    trained on.
    """
    with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as image:
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"{image.width}x{image.height} pixels is over {MAX_IMAGE_PIXELS}")
        if draft and image.format == "JPEG" and _shrinks_by_two(image.size, size):
            image.draft("RGB", size)
        rgb = _to_rgb(image)
    if rgb.size != size:
        # PIL's bilinear widens its kernel when shrinking: bilinear with antialias.
        rgb = rgb.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(rgb)


def _shrinks_by_two(source: tuple[int, int], target: tuple[int, int]) -> bool:
    return source[0] >= 2 * target[0] and source[1] >= 2 * target[1]


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB, alpha dropped."""
    if image.mode.startswith("I;16"):  # 16-bit grayscale PNG: PIL's convert would clip, not scale
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # what PIL asks for palette transparency
    return image.convert("RGB")


@dataclass(frozen=True)
class RowFile:
    """Where rows go: ``path``, rows of ``height x width`` RGB, channel-first."""

    path: str
    height: int
    width: int

    @property
    def row_bytes(self) -> int:
        return 3 * self.height * self.width


Chunk = list[tuple[int, str, bytes]]  # (row, archive member, file bytes)


def write_rows(fd: int, rows: RowFile, chunk: Chunk) -> None:
    """Decode each file of ``chunk`` into its row of the open store file ``fd``."""
    size = (rows.width, rows.height)
    for row, member, data in chunk:
        try:
            array = decode_image(data, size)
        # Decoders fail on hostile input in many ways (OSError, SyntaxError, ValueError, ...).
        except Exception as exc:
            raise DataImportError(
                "bad_image", f"archive entry {member!r} is not a readable JPEG, PNG or WebP: {exc}"
            ) from exc
        channels_first = np.ascontiguousarray(array.transpose(2, 0, 1))
        os.pwrite(fd, channels_first.data, row * rows.row_bytes)


def decode_into(rows: RowFile, chunks: Iterable[Chunk], processes: int) -> None:
    """Decode every chunk into ``rows.path`` with ``processes`` workers (1: in this process).

    Raises the first ``bad_image`` (or a ``decoder_crashed``) error; the file is then partly
    written, which the caller, who publishes it only on success, discards.
    """
    if processes <= 1:
        fd = os.open(rows.path, os.O_WRONLY)
        try:
            for chunk in chunks:
                write_rows(fd, rows, chunk)
        finally:
            os.close(fd)
        return
    with _Workers(rows, processes) as workers:
        for chunk in chunks:
            workers.submit(chunk)
        workers.finish()


class _Workers:
    """``processes`` decode workers, each fed chunks over its own socket.

    Fresh interpreters (``python -m core.inputs.decode``), not ``multiprocessing`` children: a
    job runs in a Celery prefork worker, a daemonic process, which ``multiprocessing`` forbids
    to have children; and a fork would copy the job's threads (heartbeat, prefetch) mid-state.
    """

    def __init__(self, rows: RowFile, processes: int) -> None:
        self._connections: list[Connection] = []
        self._processes: list[subprocess.Popen[bytes]] = []
        self._pending: dict[Connection, deque[int]] = {}
        root = Path(__file__).resolve().parents[2]  # the folder of ``core``: the same code
        try:
            for _ in range(processes):
                ours, theirs = socket.socketpair()
                command = [sys.executable, "-m", "core.inputs.decode", str(theirs.fileno()),
                           rows.path, str(rows.height), str(rows.width)]  # fmt: skip
                with theirs:
                    process = subprocess.Popen(command, cwd=root, pass_fds=[theirs.fileno()])
                connection = Connection(ours.detach())
                self._processes.append(process)
                self._connections.append(connection)
                self._pending[connection] = deque()
        except BaseException:
            self.__exit__()
            raise

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        for connection in self._connections:
            connection.close()  # EOF: a worker between chunks exits
        for process in self._processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()  # stopped mid-chunk by an error elsewhere
                process.wait()

    def submit(self, chunk: Chunk) -> None:
        """Send ``chunk`` to the least busy worker, first waiting for one with room."""
        while min(len(p) for p in self._pending.values()) >= _IN_FLIGHT:
            self._collect()
        connection = min(self._connections, key=lambda c: len(self._pending[c]))
        framing = [[row, member, len(data)] for row, member, data in chunk]
        connection.send_bytes(json.dumps(framing).encode())
        connection.send_bytes(b"".join(data for _, _, data in chunk))
        self._pending[connection].append(len(chunk))

    def finish(self) -> None:
        while any(self._pending.values()):
            self._collect()

    def _collect(self) -> None:
        busy = [connection for connection, pending in self._pending.items() if pending]
        for connection in wait(busy):
            try:
                answer = json.loads(connection.recv_bytes(64 * 1024))
            except (EOFError, OSError, ValueError) as exc:
                raise DataImportError(
                    "decoder_crashed",
                    "a decode worker died on this archive's images (out of memory, or a file "
                    "that crashes the image decoder)",
                ) from exc
            if "error" in answer:
                raise DataImportError("bad_image", str(answer["error"]))
            self._pending[connection].popleft()


def _worker(connection: Connection, rows: RowFile) -> None:
    """In a worker: decode the chunks that arrive into ``rows.path`` until the socket closes."""
    fd = os.open(rows.path, os.O_WRONLY)
    try:
        while True:
            try:
                framing = json.loads(connection.recv_bytes())
                data = connection.recv_bytes()
            except EOFError:
                return
            chunk, offset = [], 0
            for row, member, length in framing:
                chunk.append((int(row), str(member), data[offset : offset + length]))
                offset += length
            try:
                write_rows(fd, rows, chunk)
                answer: dict[str, object] = {"rows": len(chunk)}
            except DataImportError as exc:
                answer = {"error": exc.message}
            connection.send_bytes(json.dumps(answer).encode())
    finally:
        os.close(fd)


def chunked(files: Iterable[tuple[int, str, bytes]]) -> Iterator[Chunk]:
    """Group (row, member, bytes) into chunks of ``CHUNK_IMAGES`` files or ``CHUNK_BYTES``."""
    chunk: Chunk = []
    chunk_bytes = 0
    for item in files:
        chunk.append(item)
        chunk_bytes += len(item[2])
        if len(chunk) == CHUNK_IMAGES or chunk_bytes >= CHUNK_BYTES:
            yield chunk
            chunk, chunk_bytes = [], 0
    if chunk:
        yield chunk


def worker_count(images: int, limit: int | None) -> int:
    """Worker processes for ``images``: one per ``IMAGES_PER_PROCESS``, within the CPUs we may
    use (a container's share) and ``limit``."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux only
    cpus = len(affinity(0)) if affinity else os.cpu_count() or 1
    return max(1, min(cpus, limit or cpus, images // IMAGES_PER_PROCESS))


if __name__ == "__main__":  # a decode worker: socket fd, store file, height, width
    _worker(Connection(int(sys.argv[1])), RowFile(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
