"""What an upload must pass before a job exists: config, model and archives, read as the worker
will read them.

This is the expensive, parser-heavy part of accepting a job (ONNX parsing, conversion, ONNX
Runtime runs, archive walks), so the API never runs it in its own process:
``core.isolation.run_isolated`` runs ``validate_upload`` in a child with memory, CPU-time and
wall-clock limits. ``validate_isolated`` is that call; it imports nothing heavy in the caller,
while the forkserver preloads the parsers (``PRELOAD``), so each child starts warm.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from core.config import JobConfig
from core.errors import InputError
from core.isolation import ChildLimits, run_isolated
from core.jobs import JobUpload, parse_config
from core.settings import Settings

log = logging.getLogger(__name__)

PRELOAD = ("core.intake", "core.inputs.onnx_model", "core.inputs.archive", "core.inputs.images")
"""What the validation forkserver imports once (torch, onnx, onnxruntime come with them)."""


@dataclass(frozen=True)
class UploadPaths:
    """The files of one upload, as plain paths: what crosses into the validating child."""

    config_text: str
    model: Path
    data: Path
    eval_data: Path | None = None
    # Settings.max_dataset_pixels, passed rather than read in the child: the API's settings may
    # not be the environment's. Keyword-only and required, so that no caller forgets it.
    max_dataset_pixels: int = field(kw_only=True)


def validate_upload(upload: UploadPaths) -> dict[str, object]:
    """Check an upload; return its job config as JSON, with a default input size filled in."""
    from core.inputs.archive import inspect_archive  # heavy: imported in the child only
    from core.inputs.images import check_pixel_budget
    from core.inputs.onnx_model import load_onnx_model

    config = parse_config(upload.config_text)
    model = load_onnx_model(upload.model, input_size=config.preprocessing.input_size)
    if config.preprocessing.input_size is None:
        # load_onnx_model refused a dynamic height or width without an input_size.
        height, width = model.input_shape[2], model.input_shape[3]
        raw = config.model_dump(mode="json")
        raw["preprocessing"]["input_size"] = [height, width]
        config = parse_config(json.dumps(raw))
    # class_names label the evaluation images: eval_data's, or else the data's held-out part.
    class_names = config.class_names
    data = inspect_archive(
        upload.data, class_names=class_names if upload.eval_data is None else None
    )
    log.info("data archive: %s images (%s)", data.image_count, data.format)
    image_count = data.image_count
    if upload.eval_data is not None:
        eval_data = inspect_archive(upload.eval_data, class_names=class_names)
        if not eval_data.class_names:
            raise InputError(
                "eval_data_unlabeled",
                "eval_data needs its images in class folders (one folder per label)",
            )
        image_count += eval_data.image_count
    assert config.preprocessing.input_size is not None  # filled in above
    # From the archives' entry lists alone, before any image is decoded; the worker, which
    # decodes them all into one tensor, checks the same budget again before allocating it.
    check_pixel_budget(image_count, config.preprocessing.input_size, upload.max_dataset_pixels)
    return config.model_dump(mode="json")


def validation_limits(settings: Settings) -> ChildLimits:
    return ChildLimits(
        memory_bytes=settings.validation_memory_bytes,
        cpu_seconds=settings.validation_cpu_seconds,
        wall_seconds=settings.validation_wall_seconds,
    )


def validate_isolated(upload: JobUpload, settings: Settings) -> JobConfig:
    """``validate_upload`` in a child process under the settings' limits (blocks; see
    ``core.isolation.run_isolated``)."""
    paths = UploadPaths(
        config_text=upload.config_text,
        model=upload.model.path,
        data=upload.data.path,
        eval_data=upload.eval_data.path if upload.eval_data is not None else None,
        max_dataset_pixels=settings.max_dataset_pixels,
    )
    raw = run_isolated(
        "core.intake",
        "validate_upload",
        paths,
        validation_limits(settings),
        what="the upload's validation",
        preload=PRELOAD,
    )
    return JobConfig.model_validate(raw)
