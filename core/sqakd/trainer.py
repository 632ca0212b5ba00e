"""The SQAKD training loop: a frozen teacher, a quantized student, the KL loss, no labels.

Reads top to bottom: config, schedule, batches, the loop. Data arrives decoded once as a uint8
tensor ``[N, 3, H, W]``; augmentation and normalisation run on tensors, so no image is decoded
per epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from core.inputs.images import augment, normalize
from core.sqakd.distill import distillation_loss
from core.sqakd.modules import quant_layers


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int
    batch_size: int
    lr: float = 0.01
    quantizer_lr: float = 0.01
    lr_unit: str = "step"  # "step": rates in units of each layer's weight step; or "absolute"
    weight_decay: float = 0.0
    temperature: float = 4.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    augment: bool = True
    amp: bool = False  # bf16 autocast on CUDA; measured slower than fp32 at 32 px (BENCHMARKS.md)
    seed: int = 0


@dataclass(frozen=True)
class TrainProgress:
    step: int
    total_steps: int
    epoch: int
    epochs: int
    loss: float
    eta_seconds: float
    images_per_second: float


@dataclass(frozen=True)
class TrainStats:
    steps: int
    seconds: float
    images_per_second: float
    final_loss: float
    peak_memory_bytes: int | None


class TrainingCanceled(Exception):
    """``should_stop`` returned True; the student keeps the steps it took."""


def steps_per_epoch(images: int, batch_size: int) -> int:
    """Full batches only (a ragged last batch skews the loss), but at least one step."""
    return max(images // batch_size, 1)


def cosine_factor(step: int, total_steps: int) -> float:
    """Learning-rate multiplier at ``step``: cosine from 1 down to 0 over the job."""
    return 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))


def batch_indices(images: int, batch_size: int, seed: int) -> Iterator[tuple[int, Tensor]]:
    """(epoch, indices) forever; each epoch a fresh permutation seeded by (seed, epoch)."""
    per_epoch = steps_per_epoch(images, batch_size)
    size = min(batch_size, images)
    epoch = 0
    while True:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(images, generator=generator)
        for i in range(per_epoch):
            yield epoch, order[i * size : (i + 1) * size]
        epoch += 1


def make_optimizer(student: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam with, per quantized layer, one group for its weights and one per quantizer.

    With ``lr_unit="step"`` each layer's weight learning rate is a multiple of its mean weight
    quantization step, so one update moves a weight by about ``lr`` of a step whatever the
    bit-width, and each quantizer's rate moves its range by about ``quantizer_lr`` of its own
    step (``Quantizer.range_lr_unit``). An absolute rate means a different thing at each
    bit-width: 1e-3 flips 8-bit codes every step and wrecks a calibrated W8A8 student in a short
    job (BENCHMARKS.md). ``lr_unit="absolute"`` takes plain rates (the paper: 1e-3 and 1e-5).
    """
    by_step = cfg.lr_unit == "step"
    groups: list[dict[str, Any]] = []
    grouped: set[int] = set()
    steps = []
    for _, layer in quant_layers(student):
        grid = layer.weight_quantizer.grid()
        step = (grid.scale * grid.stride).mean().item() if by_step else 1.0
        steps.append(step)
        weights = [p for p in (layer.weight, layer.bias) if p is not None]
        groups.append({"params": weights, "lr": cfg.lr * step, "weight_decay": cfg.weight_decay})
        for quantizer in (layer.weight_quantizer, layer.act_quantizer):
            unit = quantizer.range_lr_unit() if by_step else 1.0
            groups.append(
                {
                    "params": list(quantizer.parameters()),
                    "lr": cfg.quantizer_lr * unit,
                    "weight_decay": 0.0,
                }
            )
            grouped.update(id(p) for p in quantizer.parameters())
        grouped.update(id(p) for p in weights)
    others = [p for p in student.parameters() if id(p) not in grouped]
    if others:  # e.g. PReLU slopes: the typical step of the model's layers
        typical_step = sum(steps) / len(steps) if steps else 1.0
        groups.append(
            {"params": others, "lr": cfg.lr * typical_step, "weight_decay": cfg.weight_decay}
        )
    return torch.optim.Adam(groups)


def train(
    teacher: nn.Module,
    student: nn.Module,
    pixels: Tensor,
    cfg: TrainConfig,
    *,
    on_step: Callable[[TrainProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainStats:
    """Distill ``teacher`` into ``student`` for ``cfg.steps`` steps on unlabeled ``pixels``."""
    device = next(student.parameters()).device
    teacher.eval().requires_grad_(False)
    student.train()
    optimizer = make_optimizer(student, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_factor(step, cfg.steps)
    )
    augment_rng = torch.Generator(device=pixels.device).manual_seed(cfg.seed)
    epochs = math.ceil(cfg.steps / steps_per_epoch(len(pixels), cfg.batch_size))
    # bf16 autocast runs the convolutions in bf16 on CUDA; quantizers compute in float32.
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda" and cfg.amp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    started = time.perf_counter()
    images_seen = 0
    loss_value = float("nan")
    batches = batch_indices(len(pixels), cfg.batch_size, cfg.seed)
    for step in range(cfg.steps):
        if should_stop is not None and should_stop():
            raise TrainingCanceled(f"stopped at step {step} of {cfg.steps}")
        epoch, indices = next(batches)
        batch = pixels[indices]
        if cfg.augment:
            batch = augment(batch, augment_rng)
        inputs = normalize(batch.to(device, non_blocking=True), cfg.mean, cfg.std)

        with autocast:
            with torch.inference_mode():
                teacher_logits = teacher(inputs)
            student_logits = student(inputs)
        loss = distillation_loss(student_logits, teacher_logits.clone(), cfg.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()

        images_seen += len(indices)
        loss_value = loss.item()
        elapsed = time.perf_counter() - started
        if on_step is not None:
            on_step(
                TrainProgress(
                    step=step + 1,
                    total_steps=cfg.steps,
                    epoch=epoch + 1,
                    epochs=epochs,
                    loss=loss_value,
                    eta_seconds=elapsed / (step + 1) * (cfg.steps - step - 1),
                    images_per_second=images_seen / elapsed,
                )
            )

    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return TrainStats(
        steps=cfg.steps,
        seconds=seconds,
        images_per_second=images_seen / seconds if seconds > 0 else 0.0,
        final_loss=loss_value,
        peak_memory_bytes=peak,
    )
