"""What an upload must pass before a job exists: config, model and archives, read as the worker
will read them.

This is the expensive, parser-heavy part of accepting a job (ONNX parsing, conversion, ONNX
Runtime runs, archive walks), so the API never runs it in its own process:
``core.isolation.run_isolated`` runs ``validate_upload`` in a child with memory, CPU-time and
wall-clock limits. Importing this module imports torch and onnx; the isolation forkserver
preloads it, so each child starts warm.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from core.config import JobConfig
from core.errors import InputError
from core.inputs.archive import inspect_archive
from core.inputs.images import check_pixel_budget
from core.inputs.onnx_model import load_onnx_model
from core.jobs import parse_config

log = logging.getLogger(__name__)


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
    config = parse_config(upload.config_text)
    model = load_onnx_model(upload.model, input_size=config.preprocessing.input_size)
    if config.preprocessing.input_size is None:
        height, width = model.input_shape[2], model.input_shape[3]
        if height is None or width is None:
            raise InputError(
                "input_size_required",
                "the model's input height/width are dynamic: set config.preprocessing.input_size",
            )
        raw = config.model_dump(mode="json")
        raw["preprocessing"]["input_size"] = [height, width]
        config = parse_config(json.dumps(raw))
    data = inspect_archive(upload.data)
    log.info("data archive: %s images (%s)", data.image_count, data.format)
    image_count = data.image_count
    if upload.eval_data is not None:
        eval_data = inspect_archive(upload.eval_data)
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


def validated_config(raw: dict[str, object]) -> JobConfig:
    """The config ``validate_upload`` returned, as the model the job row stores."""
    return JobConfig.model_validate(raw)
