"""An archive's images, decoded once into the dataset store; normalise and augment batches.

Decoding is the slow part of a small-image pipeline, so it happens once per (dataset, input
size), in worker processes, into an on-disk store that later jobs reuse (``core.inputs.store``).
Jobs read rows of it as uint8 tensors through a ``PixelView``; training then only indexes,
augments and normalises tensors, on whatever device they live on.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
import torch.nn.functional as F
from PIL import Image

from core.errors import DataImportError
from core.inputs.archive import DEFAULT_LIMITS, ArchiveLimits
from core.inputs.budget import check_pixel_budget
from core.inputs.decode import MAX_IMAGE_PIXELS, PIL_FORMATS
from core.inputs.pixels import Pixels, PixelView
from core.inputs.store import open_store

__all__ = ["MAX_IMAGE_PIXELS", "ImageSet", "check_pixel_budget", "load_image_archive"]

# Enough of a file for PIL to find its size: past a JPEG's EXIF and ICC segments.
HEADER_BYTES = 2**20


@dataclass
class ImageSet:
    pixels: Pixels  # uint8 [N, 3, H, W], RGB: a view of the dataset store, or a tensor
    labels: torch.Tensor | None  # int64 [N], index into class_names; None if unlabelled
    class_names: list[str] | None

    def __len__(self) -> int:
        return len(self.pixels)

    def split(
        self, held_out_fraction: float, seed: int, max_held_out: int | None = None
    ) -> tuple[ImageSet, ImageSet]:
        """(train, held_out) from a seeded permutation; each keeps at least one image, and
        the held-out part at most ``max_held_out``.

        Both parts keep the set's order, so the held-out part is reported in a stable order.
        """
        if not 0 < held_out_fraction < 1:
            raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
        count = len(self)
        if count < 2:
            raise DataImportError(
                "too_few_images", f"need at least 2 images to hold some out, got {count}"
            )
        held_out = round(count * held_out_fraction)
        if max_held_out is not None:
            held_out = min(held_out, max_held_out)
        held_out = min(max(held_out, 1), count - 1)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
        train_indices = order[held_out:].sort().values
        held_out_indices = order[:held_out].sort().values
        return self.subset(train_indices), self.subset(held_out_indices)

    def subset(self, indices: torch.Tensor) -> ImageSet:
        """The images at ``indices``: a view of the same pixels, never a copy of them."""
        labels = None if self.labels is None else self.labels[indices]
        pixels = self.pixels
        if isinstance(pixels, torch.Tensor):
            pixels = PixelView.of_tensor(pixels)
        return ImageSet(pixels.subset(indices), labels, self.class_names)


def image_size(stream: IO[bytes]) -> tuple[int, int] | None:
    """(width, height) from the first ``HEADER_BYTES`` of an image file, without decoding its
    pixels; None when those bytes are not a JPEG, PNG or WebP header."""
    head = stream.read(HEADER_BYTES)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(head), formats=PIL_FORMATS) as image:
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
    store_dir: Path | None = None,
    sha256: str | None = None,
    decode_processes: int | None = None,
    max_store_bytes: int | None = None,
) -> ImageSet:
    """Every image of the archive (sorted by path), RGB, resized to `size` = (H, W).

    `max_images` keeps the first images in that order. Labels come from class folders (see
    `core.inputs.archive`); they are None when the archive has none. `max_pixels` is the
    dataset's disk budget in pixels (see `check_pixel_budget`), shared with the `images_before`
    images of the same dataset loaded earlier (the training archive, when this is eval_data).
    `class_names`: the model's outputs in order, which class folders map to (default: see
    `core.inputs.archive._class_names`).

    The pixels are a view of the dataset store under `store_dir`, decoded there once per
    (`sha256` of the archive, `size`) and reused; without `store_dir`, of a private store
    deleted with the view. `decode_processes` caps the decode workers; `max_store_bytes` is
    what all stores of `store_dir` may keep (see `core.inputs.store.make_room`).
    """
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive (H, W), got {size}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    stored = open_store(
        path,
        size,
        store_dir=store_dir,
        sha256=sha256,
        class_names=class_names,
        limits=limits,
        max_pixels=max_pixels,
        images_before=images_before,
        processes=decode_processes,
        max_store_bytes=max_store_bytes,
    )
    pixels = PixelView(stored.file)
    count = len(pixels) if max_images is None else min(max_images, len(pixels))
    if count < len(pixels):
        pixels = pixels.subset(range(count))
    labels = None
    if stored.labels is not None:
        labels = torch.tensor(stored.labels[:count], dtype=torch.int64)
    return ImageSet(pixels, labels, stored.class_names)


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
