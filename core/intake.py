"""What an upload must pass before a job exists: config, model and archives, read as the worker
will read them.

This is the expensive, parser-heavy part of accepting a job (ONNX parsing, conversion, ONNX
Runtime runs, archive walks), so the API never runs it in its own process:
``core.isolation.run_isolated`` runs ``validate_upload`` in a child with memory, CPU-time and
wall-clock limits. ``validate_isolated`` is that call; it imports nothing heavy in the caller,
while the forkserver preloads the parsers (``PRELOAD``), so each child starts warm.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import JobConfig, model_input_size
from core.errors import InputError
from core.inputs.budget import check_pixel_budget
from core.isolation import ChildLimits, run_isolated
from core.jobs import JobUpload, parse_config
from core.settings import Settings

log = logging.getLogger(__name__)

PRELOAD = ("core.intake", "core.inputs.onnx_model", "core.inputs.archive", "core.inputs.images")
"""What the validation forkserver imports once (torch, onnx, onnxruntime come with them)."""

DYNAMIC_SIDE_CHECKED = 224
"""Height or width at which a stored model with a dynamic one is verified (ImageNet's)."""
SIZE_SAMPLE = 1000
"""Images of a stored dataset whose headers are read for the sizes it reports."""
MAX_SIZES_REPORTED = 10


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
    from core.inputs.onnx_model import load_onnx_model

    config = parse_config(upload.config_text)
    model = load_onnx_model(upload.model, input_size=config.preprocessing.input_size)
    config = with_input_size(config, model.input_shape)
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


def with_input_size(config: JobConfig, input_shape: Sequence[int | str | None]) -> JobConfig:
    """``config`` with ``preprocessing.input_size`` filled in from a model of ``input_shape``
    (see ``core.config.model_input_size``: a dynamic model needs it given)."""
    size = model_input_size(input_shape, config.preprocessing.input_size)
    if config.preprocessing.input_size is not None:
        return config
    raw = config.model_dump(mode="json")
    raw["preprocessing"]["input_size"] = list(size)
    return JobConfig.model_validate(raw)


def inspect_model(path: str) -> dict[str, Any]:
    """What a stored model offers (``POST /v1/models``): imported and verified against ONNX
    Runtime as a job's model is. A dynamic height or width is verified at
    ``DYNAMIC_SIDE_CHECKED`` pixels; a job states its own size, and its worker verifies the
    model again at that size."""
    from core.inputs.onnx_model import load_onnx_model  # heavy: the child only

    model = load_onnx_model(Path(path), dynamic_side=DYNAMIC_SIDE_CHECKED)
    return {
        "input_name": model.input_name,
        "input_shape": list(model.input_shape),
        "num_outputs": model.num_outputs,
        "opset": model.opset,
        "parameters": sum(parameter.numel() for parameter in model.module.parameters()),
    }


def inspect_dataset(path: str) -> dict[str, Any]:
    """What a stored dataset holds (``POST /v1/datasets``): the archive checked as a job's data
    is, plus the image sizes seen in an evenly spread sample of ``SIZE_SAMPLE`` images, read from
    their headers alone (nothing is decoded)."""
    from core.inputs.archive import open_image_archive  # heavy: the child only
    from core.inputs.images import image_size

    with open_image_archive(Path(path)) as archive:
        summary = archive.summary
        step = max(1, -(-len(archive.members) // SIZE_SAMPLE))  # ceiling division
        sample = archive.members[::step]
        sizes: Counter[tuple[int, int]] = Counter()
        unreadable = 0
        for _, stream in archive.stream(sample):
            size = image_size(stream)
            if size is None:
                unreadable += 1
            else:
                sizes[size] += 1
    formats = Counter(member.rpartition(".")[2].lower() for member in archive.members)
    return {
        "archive_format": summary.format,
        "image_count": summary.image_count,
        "image_bytes": summary.total_bytes,
        "class_names": summary.class_names,
        "class_folders": summary.class_folders,  # checked against a job's class_names
        "formats": dict(formats.most_common()),
        "image_sizes": [
            {"width": width, "height": height, "count": count}
            for (width, height), count in sizes.most_common(MAX_SIZES_REPORTED)
        ],
        "images_sampled": len(sample),
        "unreadable_in_sample": unreadable,
    }


def inspect_isolated(kind: str, path: Path, settings: Settings) -> dict[str, Any]:
    """``inspect_model`` or ``inspect_dataset`` (``kind``: model, dataset) in a child process
    under the settings' limits, as ``validate_isolated`` runs a job's upload."""
    function = {"model": "inspect_model", "dataset": "inspect_dataset"}[kind]
    info: dict[str, Any] = run_isolated(
        "core.intake",
        function,
        str(path),
        validation_limits(settings),
        what=f"the {kind}'s validation",
        preload=PRELOAD,
    )
    return info


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
