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

import torch
from torch import Tensor, nn

from core.inputs.images import augment, normalize
from core.sqakd.distill import distillation_loss
from core.sqakd.modules import quantizers


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int
    batch_size: int
    lr: float = 1e-4  # the paper's 1e-3 suits 1,200 epochs; short jobs it wrecks
    quantizer_lr: float = 1e-4
    weight_decay: float = 0.0
    temperature: float = 4.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    augment: bool = True
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
        order = torch.randperm(images, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for i in range(per_epoch):
            yield epoch, order[i * size : (i + 1) * size]
        epoch += 1


def make_optimizer(student: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam with two groups: layer weights, and quantizer parameters (ranges, steps)."""
    quantizer_params = {id(p) for q in quantizers(student) for p in q.parameters()}
    weights = [p for p in student.parameters() if id(p) not in quantizer_params]
    ranges = [p for p in student.parameters() if id(p) in quantizer_params]
    return torch.optim.Adam([
        {"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": ranges, "lr": cfg.quantizer_lr, "weight_decay": 0.0},
    ])


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

        with torch.inference_mode():
            teacher_logits = teacher(inputs)
        loss = distillation_loss(student(inputs), teacher_logits.clone(), cfg.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()

        images_seen += len(indices)
        loss_value = loss.item()
        elapsed = time.perf_counter() - started
        if on_step is not None:
            on_step(TrainProgress(
                step=step + 1,
                total_steps=cfg.steps,
                epoch=epoch + 1,
                epochs=epochs,
                loss=loss_value,
                eta_seconds=elapsed / (step + 1) * (cfg.steps - step - 1),
                images_per_second=images_seen / elapsed,
            ))

    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return TrainStats(
        steps=cfg.steps,
        seconds=seconds,
        images_per_second=images_seen / seconds if seconds > 0 else 0.0,
        final_loss=loss_value,
        peak_memory_bytes=peak,
    )
