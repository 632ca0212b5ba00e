"""Decode an image archive once into one uint8 tensor; normalise and augment batches as tensors.

Decoding is the slow part of a small-image pipeline, so it happens once per job, in threads (PIL
releases the GIL while decoding and resizing). Training then only indexes, augments and
normalises tensors, on whatever device they live on.
"""

from __future__ import annotations

import io
import os
import warnings
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from core.errors import DataImportError
from core.inputs.archive import DEFAULT_LIMITS, ArchiveLimits, open_image_archive
from core.inputs.budget import check_pixel_budget

# Only the formats we advertise: PIL would otherwise also parse EPS, PSD and friends, and a file
# named .jpg that is really a PNG still decodes.
_PIL_FORMATS = ("JPEG", "PNG", "WEBP")

# Decode threads only pay off when decoding outlasts PIL's per-file Python work (header parsing),
# which holds the GIL. Measured on 16 cores: 2,000 32x32 JPEGs (1 KB each) load fastest with one
# decode thread (0.27 s; 16 threads: 0.64 s, contending for the GIL); 30-55 KB JPEGs with 8.
_BYTES_PER_THREAD = 4 * 2**10
_MAX_THREADS = 8

# Decode tasks: about 30 small images or 4 MiB of files each.
_CHUNK_IMAGES = 32
_CHUNK_BYTES = 4 * 2**20

# Enough of a file for PIL to find its size: past a JPEG's EXIF and ICC segments.
HEADER_BYTES = 2**20

# A small PNG or WebP can claim an enormous canvas; refuse before allocating it.
MAX_IMAGE_PIXELS = 64 * 2**20


@dataclass
class ImageSet:
    pixels: torch.Tensor  # uint8 [N, 3, H, W], RGB
    labels: torch.Tensor | None  # int64 [N], index into class_names; None if unlabelled
    class_names: list[str] | None

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def split(self, held_out_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
        """(train, held_out) from a seeded permutation; each keeps at least one image.

        Both parts keep the set's order, so the held-out part is reported in a stable order.
        """
        if not 0 < held_out_fraction < 1:
            raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
        count = len(self)
        if count < 2:
            raise DataImportError(
                "too_few_images", f"need at least 2 images to hold some out, got {count}"
            )
        held_out = min(max(round(count * held_out_fraction), 1), count - 1)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
        train_indices = order[held_out:].sort().values
        held_out_indices = order[:held_out].sort().values
        return self.subset(train_indices), self.subset(held_out_indices)

    def subset(self, indices: torch.Tensor) -> ImageSet:
        labels = None if self.labels is None else self.labels[indices]
        return ImageSet(self.pixels[indices], labels, self.class_names)


def image_size(stream: IO[bytes]) -> tuple[int, int] | None:
    """(width, height) from the first ``HEADER_BYTES`` of an image file, without decoding its
    pixels; None when those bytes are not a JPEG, PNG or WebP header."""
    head = stream.read(HEADER_BYTES)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(head), formats=_PIL_FORMATS) as image:
                width, height = image.size
                return width, height
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def load_image_archive(
    path: Path,
    size: tuple[int, int],
    limits: ArchiveLimits = DEFAULT_LIMITS,
    *,
    max_images: int | None = None,
    max_pixels: int | None = None,
    images_before: int = 0,
    class_names: Sequence[str] | None = None,
) -> ImageSet:
    """Every image of the archive (sorted by path), RGB, resized to `size` = (H, W).

    `max_images` keeps the first images in that order. Labels come from class folders (see
    `core.inputs.archive`); they are None when the archive has none. `max_pixels` is the
    dataset's pixel budget (see `check_pixel_budget`), shared with the `images_before` images
    of the same dataset loaded earlier (the training archive, when this is eval_data).
    `class_names`: the model's outputs in order, which class folders map to (default: see
    `core.inputs.archive._class_names`).
    """
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive (H, W), got {size}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    with open_image_archive(path, limits, class_names) as archive:
        members = archive.members[:max_images]
        if max_pixels is not None:
            # Again on the worker: the job may have been accepted under a larger budget.
            check_pixel_budget(images_before + len(members), size, max_pixels)
        position = {member: i for i, member in enumerate(members)}
        pixels = torch.empty((len(members), 3, height, width), dtype=torch.uint8)
        threads = _decode_threads(archive.summary.total_bytes / archive.summary.image_count)
        # Reading stays on this thread (archives are sequential). Decodes go to the pool in chunks,
        # because one task per small image costs more than its decode; a bounded queue keeps the
        # threads busy without holding every compressed file in memory at once.
        with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
            pending: deque[Future[None]] = deque()
            chunk: list[tuple[int, str, bytes]] = []
            chunk_bytes = 0
            for member, stream in archive.stream(position):
                data = stream.read()
                chunk.append((position[member], member, data))
                chunk_bytes += len(data)
                if len(chunk) == _CHUNK_IMAGES or chunk_bytes >= _CHUNK_BYTES:
                    pending.append(pool.submit(_decode_chunk, pixels, chunk))
                    chunk, chunk_bytes = [], 0
                if len(pending) > 2 * threads:
                    pending.popleft().result()
            if chunk:
                pending.append(pool.submit(_decode_chunk, pixels, chunk))
            for future in pending:
                future.result()
        labels = None
        if archive.labels is not None:
            labels = torch.tensor(archive.labels[: len(members)], dtype=torch.int64)
        return ImageSet(pixels, labels, archive.summary.class_names)


def _decode_threads(mean_file_bytes: float) -> int:
    """One thread per `_BYTES_PER_THREAD` of the average file, within the CPUs we may use."""
    affinity = getattr(os, "sched_getaffinity", None)  # a container's share; Linux only
    cpus = len(affinity(0)) if affinity else os.cpu_count() or 1
    return max(1, min(cpus, _MAX_THREADS, int(mean_file_bytes // _BYTES_PER_THREAD)))


def _decode_chunk(pixels: torch.Tensor, chunk: list[tuple[int, str, bytes]]) -> None:
    """Decode each (index, member, data) into ``pixels[index]``."""
    size = (pixels.shape[3], pixels.shape[2])
    for index, member, data in chunk:
        try:
            array = _decode(data, size)
        # Decoders fail on hostile input in many ways (OSError, SyntaxError, ValueError, ...).
        except Exception as exc:
            raise DataImportError(
                "bad_image", f"archive entry {member!r} is not a readable JPEG, PNG or WebP: {exc}"
            ) from exc
        pixels[index].copy_(torch.from_numpy(array).permute(2, 0, 1))


def _decode(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """RGB [H, W, 3] uint8 at `size` = (W, H), PIL's order.

    EXIF orientation is not applied, like torchvision's ImageFolder, so pixels match what the
    teacher was most likely trained on.
    """
    with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as image:
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"{image.width}x{image.height} pixels is over {MAX_IMAGE_PIXELS}")
        rgb = _to_rgb(image)
    if rgb.size != size:
        # PIL's bilinear widens its kernel when shrinking: bilinear with antialias.
        rgb = rgb.resize(size, Image.Resampling.BILINEAR)
    return np.array(rgb)  # a writable copy: torch.from_numpy warns on read-only arrays


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB, alpha dropped."""
    if image.mode.startswith("I;16"):  # 16-bit grayscale PNG: PIL's convert would clip, not scale
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # what PIL asks for palette transparency
    return image.convert("RGB")


def normalize(
    batch_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """float32 ``(x / 255 - mean) / std`` per channel, channels_last (faster convolutions)."""
    _check_batch(batch_uint8)
    channels = batch_uint8.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need {channels} values, got {len(mean)} and {len(std)}")
    shape = (1, channels, 1, 1)
    device = batch_uint8.device
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(shape)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(shape)
    x = batch_uint8.to(dtype=torch.float32, memory_format=torch.channels_last)
    return x.div_(255).sub_(mean_t).div_(std_t)  # in place keeps channels_last


def augment(
    batch_uint8: torch.Tensor,
    generator: torch.Generator,
    shard: slice | None = None,
    whole: int = 0,
) -> torch.Tensor:
    """Random crop of the zero-padded image, then random horizontal flip: the paper's recipe.

    Padding is max(1, H // 8) pixels on every side (4 for CIFAR's 32). One gather does the whole
    batch. Random numbers come from `generator`, on its own device, so a generator in a given
    state always gives the same batch. A `shard` of a larger batch of `whole` images (a training
    process's rows of it) draws the random numbers of all `whole` images, so it is augmented
    exactly as the whole batch would augment those rows.
    """
    _check_batch(batch_uint8)
    count, channels, height, width = batch_uint8.shape
    shard, drawn = (slice(None), count) if shard is None else (shard, whole)
    pad = max(1, height // 8)
    device = batch_uint8.device
    offsets = torch.randint(
        0, 2 * pad + 1, (2, drawn), generator=generator, device=generator.device
    )
    flips = torch.randint(0, 2, (drawn, 1), generator=generator, device=generator.device)
    top, left = offsets[:, shard].to(device)
    flip = flips[shard].to(device).bool()

    rows = top[:, None] + torch.arange(height, device=device)  # [N, H] into the padded image
    columns = torch.arange(width, device=device)
    columns = left[:, None] + torch.where(flip, columns.flip(0), columns)  # [N, W]
    padded = F.pad(batch_uint8, (pad, pad, pad, pad))
    return padded[
        torch.arange(count, device=device)[:, None, None, None],
        torch.arange(channels, device=device)[None, :, None, None],
        rows[:, None, :, None],
        columns[:, None, None, :],
    ]


def _check_batch(batch: torch.Tensor) -> None:
    if batch.dtype != torch.uint8 or batch.dim() != 4:
        raise ValueError(
            f"expected a uint8 [N, C, H, W] batch, got {batch.dtype} {tuple(batch.shape)}"
        )
