"""SQAKD from Python, without the service: a float teacher in, a calibrated, distilled student out.

    from core.config import JobConfig
    from core.engine import quantize

    result = quantize(teacher, pixels, JobConfig(weight_bits=4, activation_bits=4))
    result.student  # fake-quantized nn.Module; result.stats: steps, images/s, peak memory

``pixels`` are unlabeled images, decoded once: a uint8 tensor ``[N, 3, H, W]``, or a
``PixelView`` of a dataset store (``core.inputs.images.load_image_archive``). The job
pipeline (``core.pipeline``) is these same two steps, ``calibrated_student`` then ``train``
with ``train_config``, with file import, evaluation and export around them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.config import JobConfig
from core.errors import InputError
from core.inputs.images import normalize
from core.inputs.pixels import Pixels
from core.sqakd.calibrate import calibrate
from core.sqakd.modules import QuantSpec, UnknownLayerError, prepare
from core.sqakd.teacher import inference_teacher
from core.sqakd.trainer import TrainConfig, TrainStats, steps_per_epoch, train

CALIBRATION_IMAGES = 256  # ranges from one batch: enough for a stable fit, still quick
# Residual additions' inputs, quantized for TensorRT's and the CPU's grids: 8 bits, so that the
# runtime fuses each addition into the integer convolution before it (int8, TensorRT's only
# integer type; the CPU's uint8 from zero or int8)
RESIDUAL_BITS = 8
# Average poolings' inputs, quantized for the CPU's grids only: 8 bits, as ONNX Runtime's PTQ
# quantizes them, so that OpenVINO runs the block before a pooling with an integer output
POOL_BITS = 8


@dataclass
class Quantized:
    student: nn.Module
    spec: QuantSpec
    stats: TrainStats


def quant_spec(config: JobConfig) -> QuantSpec:
    """The student's quantization, its grids laid out for ``config.export.grids``."""
    grids = config.export.grids
    return QuantSpec(
        method=config.method,
        weight_bits=config.weight_bits,
        activation_bits=config.activation_bits,
        per_channel=config.per_channel,
        first_last_bits=config.first_last_bits,
        layer_bits=dict(config.layer_bits),
        int8_grids=grids == "tensorrt",
        uint8_grids=grids == "cpu",
        residual_bits=None if grids == "papers" else RESIDUAL_BITS,
        pool_bits=POOL_BITS if grids == "cpu" else None,
    )


def train_config(config: JobConfig, images: int) -> TrainConfig:
    """The trainer's settings for ``config`` on ``images`` training images."""
    steps = config.steps or config.epoch_budget * steps_per_epoch(images, config.batch_size)
    prep = config.preprocessing
    return TrainConfig(
        steps=steps,
        batch_size=config.batch_size,
        lr=config.lr,
        quantizer_lr=config.quantizer_lr,
        lr_unit=config.lr_unit,
        weight_decay=config.weight_decay,
        temperature=config.temperature,
        ewgs_delta=config.ewgs_delta,
        ewgs_delta_every=config.ewgs_delta_every,
        amp=config.amp,
        compile_model=config.compile_model,
        mean=prep.mean,
        std=prep.std,
        augment=prep.augment,
        seed=config.seed,
    )


def calibrated_student(
    teacher: nn.Module, pixels: Pixels, config: JobConfig, spec: QuantSpec | None = None
) -> tuple[nn.Module, QuantSpec]:
    """The quantized copy of ``teacher``, its ranges fitted on a seeded sample of ``pixels``.
    ``spec`` replaces ``quant_spec(config)``: layouts that benchmarks compare and jobs do not
    offer.

    A sample, not the first images: uploads arrive in archive order, often one class folder
    after another, and ranges fitted on one class misjudge the others. Deterministic for the
    same inputs: a resumed job rebuilds the same student.
    """
    spec = spec or quant_spec(config)
    try:
        student = prepare(teacher, spec).to(memory_format=torch.channels_last)  # as batches are
    except UnknownLayerError as exc:
        raise InputError("unknown_layer", str(exc)) from exc
    device = next(teacher.parameters()).device
    sample = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(config.seed))
    calibration = pixels[sample[:CALIBRATION_IMAGES]].to(device)
    prep = config.preprocessing
    calibrate(student, teacher, normalize(calibration, prep.mean, prep.std))
    return student, spec


def quantize(teacher: nn.Module, pixels: Pixels, config: JobConfig | None = None) -> Quantized:
    """Calibrate and distill a student of ``teacher`` on unlabeled uint8 ``pixels``;
    ``teacher`` itself is not changed."""
    config = config or JobConfig()
    torch.manual_seed(config.seed)
    student, spec = calibrated_student(teacher, pixels, config)
    stats = train(inference_teacher(teacher), student, pixels, train_config(config, len(pixels)))
    return Quantized(student=student.eval(), spec=spec, stats=stats)
