"""The dataset budget: pure arithmetic, importable where torch must not be (the API)."""

from __future__ import annotations

from core.errors import TooLargeError
from core.storage import human_bytes


def check_pixel_budget(image_count: int, size: tuple[int, int], budget: int) -> None:
    """Refuse a dataset whose decoded store, N x H x W pixels of 3 bytes on disk (see
    ``core.inputs.store``), exceeds ``budget`` pixels.

    Tiny files can stand for any number of pixels (80,000 one-colour PNGs zip to 12 MB and
    decode to 234 GiB at 1024 x 1024), so the image count and input size are checked before
    anything is decoded: by the API on upload (``core.intake``, ``core.resources``) and by the
    worker before it allocates the store.
    """
    height, width = size
    pixels = image_count * height * width
    if pixels > budget:
        raise TooLargeError(
            "pixel_budget_exceeded",
            f"{image_count:,} images at input_size {height}x{width} are {pixels:,} pixels "
            f"({human_bytes(3 * pixels)} decoded on disk), over the budget of {budget:,} pixels "
            "per job (MAX_DATASET_PIXELS): upload fewer images or choose a smaller input_size",
        )
