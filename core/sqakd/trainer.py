"""The SQAKD training loop: a frozen teacher, a quantized student, the KL loss, no labels.

Reads top to bottom: config, schedule, batches, checkpoints, the loop. Data arrives decoded once
as a uint8 tensor ``[N, 3, H, W]``; augmentation and normalisation run on tensors, so no image
is decoded per epoch.

Resuming is exact: a checkpoint holds everything the remaining steps depend on (the student's
state dict, optimizer and schedule state, the augmentation generator and torch's global RNG),
and the batch order is a pure function of (seed, step), so a run stopped at step k and resumed
from its checkpoint ends bit-identical (on CPU) to a run that never stopped.
"""

from __future__ import annotations

import math
import os
import resource
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.inputs.images import augment, normalize
from core.sqakd.distill import distillation_loss
from core.sqakd.hessian import (
    HUTCHINSON_BATCHES,
    HUTCHINSON_IMAGES,
    estimate_ewgs_deltas,
    ewgs_quantizers,
    set_ewgs_deltas,
)
from core.sqakd.modules import quant_layers, quantizers


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int
    batch_size: int
    lr: float = 0.01
    quantizer_lr: float = 0.01
    lr_unit: str = "step"  # "step": rates in units of each layer's weight step; or "absolute"
    weight_decay: float = 0.0
    temperature: float = 4.0
    # EWGS quantizers only: "hessian" estimates each quantizer's delta (Hutchinson) at the start
    # and every ``ewgs_delta_every`` epochs; a number fixes it.
    ewgs_delta: str | float = "hessian"
    ewgs_delta_every: int = 1
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    augment: bool = True
    amp: bool = False  # bf16 autocast on CUDA; measured slower than fp32 at 32 px (BENCHMARKS.md)
    compile_model: bool = False  # the student's training forward through torch.compile
    seed: int = 0
    # Benchmarks only: the label-based QAT baseline is distill_weight=0, label_weight=1.
    # SQAKD itself is distill_weight=1, label_weight=0 (no labels).
    distill_weight: float = 1.0
    label_weight: float = 0.0


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
    seconds: float  # of this call: a resumed run counts from its checkpoint
    images_per_second: float
    final_loss: float
    peak_memory_bytes: int  # CUDA: peak allocated in training; CPU: the process's peak RSS
    resumed_from_step: int = 0
    ewgs_deltas: dict[str, float] = field(default_factory=dict)  # EWGS: delta per quantizer


@dataclass(frozen=True)
class Checkpointer:
    """Where ``train`` saves its state: every ``every`` steps, when stopped, and at the end."""

    path: Path
    every: int = 200

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"checkpoint every {self.every} steps: must be at least 1")


CHECKPOINT_VERSION = 1


class TrainingCanceled(Exception):
    """``should_stop`` returned True; the student keeps the steps it took."""


def peak_rss_bytes() -> int:
    """The process's peak resident memory (a worker process runs one job, then exits)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def steps_per_epoch(images: int, batch_size: int) -> int:
    """Full batches only (a ragged last batch skews the loss), but at least one step."""
    return max(images // batch_size, 1)


def cosine_factor(step: int, total_steps: int) -> float:
    """Learning-rate multiplier at ``step``: cosine from 1 down to 0 over the job."""
    return 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))


def batch_indices(
    images: int, batch_size: int, seed: int, start: int = 0
) -> Iterator[tuple[int, Tensor]]:
    """(epoch, indices) of steps ``start, start + 1, ...`` forever.

    Each epoch is a fresh permutation seeded by (seed, epoch), so the batch of any step follows
    from (seed, step) alone and a resumed run needs no data-loader state.
    """
    per_epoch = steps_per_epoch(images, batch_size)
    size = min(batch_size, images)
    epoch, first = divmod(start, per_epoch)
    while True:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(images, generator=generator)
        for i in range(first, per_epoch):
            yield epoch, order[i * size : (i + 1) * size]
        epoch, first = epoch + 1, 0


def make_optimizer(student: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam with one group per quantized layer's weights and one per quantizer.

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
        grouped.update(id(p) for p in weights)
    for quantizer in quantizers(student):  # the layers' and the residual additions'
        unit = quantizer.range_lr_unit() if by_step else 1.0
        groups.append(
            {
                "params": list(quantizer.parameters()),
                "lr": cfg.quantizer_lr * unit,
                "weight_decay": 0.0,
            }
        )
        grouped.update(id(p) for p in quantizer.parameters())
    others = [p for p in student.parameters() if id(p) not in grouped]
    if others:  # e.g. PReLU slopes: the typical step of the model's layers
        typical_step = sum(steps) / len(steps) if steps else 1.0
        groups.append(
            {"params": others, "lr": cfg.lr * typical_step, "weight_decay": cfg.weight_decay}
        )
    return torch.optim.Adam(groups)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically: a temp file beside ``path``, fsync, then one rename.

    A reader (or a worker that died mid-write) sees the old checkpoint or the new one, never a
    torn file. The temp name is unique, so two writers of one job cannot clobber each other's.
    """
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with temp.open("wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's state on the CPU, read with ``weights_only``: tensors and plain types only,
    never unpickled code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def train(
    teacher: nn.Module,
    student: nn.Module,
    pixels: Tensor,
    cfg: TrainConfig,
    *,
    on_step: Callable[[TrainProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpointer: Checkpointer | None = None,
    resume_from: Path | None = None,
    labels: Tensor | None = None,
) -> TrainStats:
    """Distill ``teacher`` into ``student`` for ``cfg.steps`` steps on unlabeled ``pixels``.

    ``labels`` (one class index per image) are read only when ``cfg.label_weight`` is set: the
    cross-entropy baseline that benchmarks compare SQAKD with.

    ``resume_from`` continues a run from its checkpoint: ``student`` must be built as the
    interrupted run built it (same teacher, ``prepare`` and ``calibrate``), and ``cfg`` and
    ``pixels`` must be the same; the steps still to take then give identical results.
    """
    if cfg.label_weight and (labels is None or len(labels) != len(pixels)):
        raise ValueError("label_weight needs one label per image")
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

    def training_loss(
        student_logits: Tensor, teacher_logits: Tensor | None, indices: Tensor
    ) -> Tensor:
        loss = student_logits.new_zeros(())
        if teacher_logits is not None:
            loss = cfg.distill_weight * distillation_loss(
                student_logits, teacher_logits, cfg.temperature
            )
        if cfg.label_weight:
            targets = labels[indices].to(device)  # type: ignore[index]
            loss = loss + cfg.label_weight * F.cross_entropy(student_logits.float(), targets)
        return loss

    def batch(indices: Tensor, augmented: bool) -> tuple[Tensor, Tensor | None]:
        """(student input, teacher logits) of the images at ``indices``; no teacher logits
        for the label-only baseline."""
        images = pixels[indices]
        if augmented:
            images = augment(images, augment_rng)
        inputs = normalize(images.to(device, non_blocking=True), cfg.mean, cfg.std)
        if not cfg.distill_weight:
            return inputs, None
        with autocast, torch.inference_mode():
            teacher_logits = teacher(inputs)
        return inputs, teacher_logits.clone()  # a normal tensor, usable by autograd

    # Compiled, the student's forward and backward run as fused kernels (a C++ compiler on
    # CPU, Triton on CUDA); the first steps pay the compilation. Parameters stay shared, so
    # checkpoints and the Hessian estimate use ``student`` itself.
    forward = torch.compile(student) if cfg.compile_model else student

    ewgs = ewgs_quantizers(student)
    ewgs_deltas: dict[str, float] = {}
    if ewgs and cfg.ewgs_delta != "hessian":
        set_ewgs_deltas(student, float(cfg.ewgs_delta))
    hessian_every = cfg.ewgs_delta_every * steps_per_epoch(len(pixels), cfg.batch_size)

    def estimate_deltas(step: int) -> dict[str, float]:
        """EWGS deltas from the Hessian on (the first images of) the next batches of the data
        order (no augmentation, own generator: the run's RNG streams stay untouched, so
        resuming stays exact)."""
        upcoming = batch_indices(len(pixels), cfg.batch_size, cfg.seed, step)
        chosen = [next(upcoming)[1][:HUTCHINSON_IMAGES] for _ in range(HUTCHINSON_BATCHES)]
        samples = ((*batch(indices, False), indices) for indices in chosen)
        return estimate_ewgs_deltas(
            student,
            ((inputs, (logits, indices)) for inputs, logits, indices in samples),
            lambda output, target: training_loss(output, *target),
            torch.Generator().manual_seed(cfg.seed * 1_000_003 + step),
        )

    loss_value, start = float("nan"), 0
    if resume_from is not None:
        saved = load_checkpoint(resume_from)
        _check_resumable(saved, cfg, len(pixels))
        _restore(saved, student, optimizer, schedule, augment_rng)
        start, loss_value = saved["step"], saved["loss"]
    last_saved = start

    def checkpoint(step: int, *, stopping: bool = False) -> None:
        """Save the state after ``step`` steps: every ``checkpointer.every``, last, or stopping."""
        nonlocal last_saved
        if checkpointer is None or step == last_saved:
            return
        if stopping or step % checkpointer.every == 0 or step == cfg.steps:
            run = {"step": step, "config": asdict(cfg), "images": len(pixels), "loss": loss_value}
            save_checkpoint(
                checkpointer.path, run | _snapshot(student, optimizer, schedule, augment_rng)
            )
            last_saved = step

    started = time.perf_counter()
    images_seen = 0
    batches = batch_indices(len(pixels), cfg.batch_size, cfg.seed, start)
    for step in range(start, cfg.steps):
        if should_stop is not None and should_stop():
            checkpoint(step, stopping=True)
            raise TrainingCanceled(f"stopped at step {step} of {cfg.steps}")
        epoch, indices = next(batches)
        if ewgs and cfg.ewgs_delta == "hessian" and step % hessian_every == 0:
            ewgs_deltas = estimate_deltas(step)
        inputs, teacher_logits = batch(indices, cfg.augment)
        with autocast:
            student_logits = forward(inputs)
        loss = training_loss(student_logits, teacher_logits, indices)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()

        images_seen += len(indices)
        loss_value = loss.item()
        checkpoint(step + 1)
        elapsed = time.perf_counter() - started
        if on_step is not None:
            on_step(
                TrainProgress(
                    step=step + 1,
                    total_steps=cfg.steps,
                    epoch=epoch + 1,
                    epochs=epochs,
                    loss=loss_value,
                    eta_seconds=elapsed / (step + 1 - start) * (cfg.steps - step - 1),
                    images_per_second=images_seen / elapsed,
                )
            )

    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    return TrainStats(
        steps=cfg.steps,
        seconds=seconds,
        images_per_second=images_seen / seconds if seconds > 0 else 0.0,
        final_loss=loss_value,
        peak_memory_bytes=peak,
        resumed_from_step=start,
        ewgs_deltas=ewgs_deltas or {name: q.delta.item() for name, q in ewgs.items()},
    )


def _snapshot(
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    augment_rng: torch.Generator,
) -> dict[str, Any]:
    """Everything the remaining steps depend on besides (config, data, step): state dicts and
    RNG states, all tensors and plain types so that ``weights_only`` loads them."""
    device = next(student.parameters()).device
    return {
        "version": CHECKPOINT_VERSION,
        "student": student.state_dict(),  # quantizer ranges and calibration's biases included
        "optimizer": optimizer.state_dict(),  # Adam moments, step counts, rates
        "schedule": schedule.state_dict(),
        "augment_rng": augment_rng.get_state(),
        "torch_rng": torch.get_rng_state(),  # dropout, if the student has any
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def _restore(
    saved: dict[str, Any],
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    augment_rng: torch.Generator,
) -> None:
    """Load a ``_snapshot`` back (in place: the optimizer keeps its Parameters)."""
    device = next(student.parameters()).device
    student.load_state_dict(saved["student"])
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    augment_rng.set_state(saved["augment_rng"])
    torch.set_rng_state(saved["torch_rng"])
    if device.type == "cuda" and saved["cuda_rng"] is not None:
        torch.cuda.set_rng_state(saved["cuda_rng"], device)


def _check_resumable(saved: dict[str, Any], cfg: TrainConfig, images: int) -> None:
    """Refuse, before anything is loaded, a checkpoint of another run or release."""
    if saved.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint version {saved.get('version')!r}, not {CHECKPOINT_VERSION}")
    changed = sorted(k for k, v in asdict(cfg).items() if saved["config"].get(k) != v)
    if changed:
        raise ValueError(f"checkpoint of another config: {', '.join(changed)} differ")
    if saved["images"] != images:
        raise ValueError(f"checkpoint of another data set: {saved['images']} images, not {images}")
    if not 0 <= saved["step"] <= cfg.steps:
        raise ValueError(f"checkpoint at step {saved['step']}, outside 0..{cfg.steps}")
