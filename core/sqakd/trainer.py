"""The SQAKD training loop: a frozen teacher, a quantized student, the KL loss, no labels.

Reads top to bottom: config, schedule, batches, training curves, checkpoints, the loop. Data
arrives decoded once as uint8 ``[N, 3, H, W]`` rows (a tensor, or a view of the dataset store
read a few batches ahead by ``core.inputs.pixels.Prefetcher``); augmentation and normalisation
run on tensors, so no image is decoded per epoch.

Resuming is exact: a checkpoint holds everything the remaining steps depend on (the student's
state dict, optimizer and schedule state, the augmentation generator and torch's global RNG),
and the batch order is a pure function of (seed, step), so a run stopped at step k and resumed
from its checkpoint ends bit-identical (on CPU) to a run that never stopped.
"""

from __future__ import annotations

import itertools
import math
import os
import resource
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.inputs.images import augment, normalize
from core.inputs.pixels import Pixels, Prefetcher
from core.sqakd.distill import distillation_loss
from core.sqakd.distributed import ONE_PROCESS, Group
from core.sqakd.hessian import (
    HUTCHINSON_BATCHES,
    HUTCHINSON_IMAGES,
    estimate_ewgs_deltas,
    ewgs_quantizers,
    max_delta,
    set_ewgs_deltas,
)
from core.sqakd.metrics import compare, predict
from core.sqakd.modules import quant_layers, quantizers

_T = TypeVar("_T")


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
    # and every ``ewgs_delta_every`` epochs (10: as the EWGS code's ``update_every``); a number
    # fixes it.
    ewgs_delta: str | float = "hessian"
    ewgs_delta_every: int = 10
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
    probe_points: int = 0  # curve points with a probe, in this call
    probe_seconds: float = 0.0  # the probes' own time, part of ``seconds``
    # Other parts of ``seconds`` besides the steps (``Stopwatch``): the EWGS Hessian estimates,
    # checkpoint writes, and the ``on_step`` and ``on_metrics`` callbacks (progress writes)
    hessian_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    report_seconds: float = 0.0
    processes: int = 1  # that trained, each on its share of every batch (``distributed``)


@dataclass(frozen=True)
class Checkpointer:
    """Where ``train`` saves its state: every ``every`` steps, when stopped, and at the end."""

    path: Path
    every: int = 200

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"checkpoint every {self.every} steps: must be at least 1")


CHECKPOINT_VERSION = 1

EWGS_DELTA_CAPPED = "ewgs_delta_capped"  # the warning ``on_warning`` gets, once per job


class TrainingCanceled(Exception):
    """``should_stop`` returned True; the student keeps the steps it took."""


class Stopwatch:
    """Seconds spent in named parts of the training loop: what a job spends around its steps."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def timing(self, part: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - started

    def timed(self, part: str, call: Callable[[_T], None]) -> Callable[[_T], None]:
        """``call``, its time counted under ``part``."""

        def timed_call(argument: _T) -> None:
            with self.timing(part):
                call(argument)

        return timed_call


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
    """Adam with one group per quantized layer's weights and one per quantizer, each named by
    its kind (``name``: "weights", "quantizer", or "other" for the rest): the curves' rates.

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
        groups.append(
            {
                "params": weights,
                "lr": cfg.lr * step,
                "weight_decay": cfg.weight_decay,
                "name": "weights",
            }
        )
        grouped.update(id(p) for p in weights)
    for quantizer in quantizers(student):  # the layers' and the residual additions'
        unit = quantizer.range_lr_unit() if by_step else 1.0
        groups.append(
            {
                "params": list(quantizer.parameters()),
                "lr": cfg.quantizer_lr * unit,
                "weight_decay": 0.0,
                "name": "quantizer",
            }
        )
        grouped.update(id(p) for p in quantizer.parameters())
    others = [p for p in student.parameters() if id(p) not in grouped]
    if others:  # e.g. PReLU slopes: the typical step of the model's layers
        typical_step = sum(steps) / len(steps) if steps else 1.0
        groups.append(
            {
                "params": others,
                "lr": cfg.lr * typical_step,
                "weight_decay": cfg.weight_decay,
                "name": "other",
            }
        )
    return torch.optim.Adam(groups)


# --- training curves ---------------------------------------------------------------------

CURVE_POINTS = 200  # about this many loss-and-rates points a job (``on_metrics``)
PROBE_POINTS = 20  # of them with a probe: the student against the teacher on ``Probe``
# Probe images per image the job trains on, and the bounds: the probes' share of the training
# time stays under 3% (``probe_size``; measured in BENCHMARKS.md, section probe-cost).
PROBE_FRACTION = 1 / 500
PROBE_MIN_IMAGES, PROBE_MAX_IMAGES = 16, 512


@dataclass(frozen=True)
class Probe:
    """A fixed subset of the evaluation images (uint8) and the teacher's logits on them."""

    pixels: Tensor
    teacher_logits: Tensor

    def __len__(self) -> int:
        return len(self.pixels)


def probe_size(images_trained: int) -> int:
    """Probe images for a job that trains on ``images_trained`` images (steps x batch).

    A step costs a teacher forward and a student forward and backward on its batch; measured on
    the CPU (ResNet-20, 32 px), an image trained on costs about five probe images (an eval-mode
    student forward without autograd), and a probe call a fixed ~12 ms more (every weight is
    fake-quantized once per call, about 14 images' worth). So ``PROBE_POINTS`` probes of P
    images cost about 20 (P + 14) / (5 ``images_trained``) of the training: P =
    ``images_trained`` / 500 makes that 0.8% plus the fixed part; the floor of 16 keeps the
    agreement meaningful (in 1/16 steps) and costs over 3% only in jobs that train on fewer
    than ~4,000 images (a minute of CPU); the cap bounds a long job's probe to a second or so.
    """
    return min(max(round(images_trained * PROBE_FRACTION), PROBE_MIN_IMAGES), PROBE_MAX_IMAGES)


def choose_probe(pixels: Pixels, teacher_logits: Tensor, cfg: TrainConfig) -> Probe:
    """The probe subset of evaluation ``pixels``: ``probe_size`` images drawn once by
    ``cfg.seed`` (the same for a resumed job), in their original order, with the rows of
    ``teacher_logits`` (the teacher's logits on ``pixels``, computed once) that belong to them."""
    count = min(probe_size(cfg.steps * cfg.batch_size), len(pixels))
    order = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(cfg.seed))
    chosen = order[:count].sort().values
    return Probe(pixels[chosen], teacher_logits[chosen])


def curve_steps(total_steps: int) -> tuple[int, set[int]]:
    """(every, probe steps): a point every ``every`` steps and at the last one, and a probe at
    steps ceil(k * total / PROBE_POINTS), k = 1..PROBE_POINTS (every step of a shorter job)."""
    every = max(1, total_steps // CURVE_POINTS)
    probes = {math.ceil(k * total_steps / PROBE_POINTS) for k in range(1, PROBE_POINTS + 1)}
    return every, probes


class TrainingCurve:
    """The training curve ``train`` reports through ``on_metrics``.

    Each point: ``step``, ``epoch``, ``loss`` (the mean over the steps since the last point),
    ``lr`` (per optimizer group name, the mean rate of its groups in the step just taken; with
    ``lr_unit="step"`` each layer's rate is its own multiple of that); probe points add
    ``probe``: ``agreement`` and ``kl`` of the student against the teacher on the probe images,
    and ``images``.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        optimizer: torch.optim.Optimizer,
        probe: Probe | None,
        on_metrics: Callable[[dict[str, Any]], None],
    ) -> None:
        self.cfg, self.probe, self.on_metrics = cfg, probe, on_metrics
        # Names as make_optimizer gave them: a restored optimizer takes the checkpoint's groups
        self.group_names = [group.get("name", "other") for group in optimizer.param_groups]
        self.every, self.probe_at = curve_steps(cfg.steps)
        self.loss_sum, self.loss_steps = 0.0, 0
        self.probes, self.probe_seconds = 0, 0.0

    def due(self, step: int) -> bool:
        """A point after ``step`` steps?"""
        return step % self.every == 0 or step == self.cfg.steps or step in self.probe_at

    def rates(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        by_name: dict[str, list[float]] = {}
        for name, group in zip(self.group_names, optimizer.param_groups, strict=True):
            by_name.setdefault(name, []).append(group["lr"])
        return {name: sum(rates) / len(rates) for name, rates in by_name.items()}

    def add(
        self, step: int, epoch: int, loss: float, rates: dict[str, float], student: nn.Module
    ) -> None:
        """Count ``loss``; report a point if one is due after ``step`` steps."""
        self.loss_sum += loss
        self.loss_steps += 1
        if not self.due(step):
            return
        point: dict[str, Any] = {
            "step": step,
            "epoch": epoch,
            "loss": self.loss_sum / self.loss_steps,
            "lr": rates,
        }
        self.loss_sum, self.loss_steps = 0.0, 0
        if self.probe is not None and step in self.probe_at:
            point["probe"] = self.measure(student)
        self.on_metrics(point)

    def measure(self, student: nn.Module) -> dict[str, Any]:
        """The student against the teacher on the probe images: in eval mode under inference
        mode (``predict``), so nothing it holds changes (BatchNorm statistics, quantizer
        ranges, RNG streams) and it goes back to train mode: a run with probes trains the same
        student as one without."""
        assert self.probe is not None
        started = time.perf_counter()
        logits = predict(student, self.probe.pixels, self.cfg.mean, self.cfg.std)
        found = compare(self.probe.teacher_logits, logits, None)
        self.probe_seconds += time.perf_counter() - started
        self.probes += 1
        return {"agreement": found["agreement"], "kl": found["kl"], "images": len(self.probe)}


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
    pixels: Pixels,
    cfg: TrainConfig,
    *,
    on_step: Callable[[TrainProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpointer: Checkpointer | None = None,
    resume_from: Path | None = None,
    labels: Tensor | None = None,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
    probe: Probe | None = None,
    on_warning: Callable[[str, str], None] | None = None,
    group: Group = ONE_PROCESS,
) -> TrainStats:
    """Distill ``teacher`` into ``student`` for ``cfg.steps`` steps on unlabeled ``pixels``.

    ``labels`` (one class index per image) are read only when ``cfg.label_weight`` is set: the
    cross-entropy baseline that benchmarks compare SQAKD with.

    ``on_metrics`` gets the training curve (``TrainingCurve``): about ``CURVE_POINTS`` points, and
    ``PROBE_POINTS`` of them measured on ``probe`` (``choose_probe``) when one is given.
    ``on_warning(code, message)`` hears, once per job, that an EWGS delta hit its cap.

    ``resume_from`` continues a run from its checkpoint: ``student`` must be built as the
    interrupted run built it (same teacher, ``prepare`` and ``calibrate``), and ``cfg`` and
    ``pixels`` must be the same; the steps still to take then give identical results.

    ``group`` trains on several processes (``core.sqakd.distributed``): every rank calls
    ``train`` with the same arguments but the hooks and the checkpointer, which only rank 0
    passes; each trains on its shard of every batch, and all resume from rank 0's checkpoint.
    """
    if cfg.label_weight and (labels is None or len(labels) != len(pixels)):
        raise ValueError("label_weight needs one label per image")
    device = next(student.parameters()).device
    teacher.eval().requires_grad_(False)
    student.train()
    group.copy_main(student)
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
    stopwatch = Stopwatch()
    if on_step is not None:
        on_step = stopwatch.timed("report", on_step)
    if on_metrics is not None:
        on_metrics = stopwatch.timed("report", on_metrics)

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

    def batch(
        indices: Tensor, augmented: bool, shard: slice = slice(None), rows: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """(student input, teacher logits) of the images at ``indices[shard]`` (a rank's shard
        of the batch ``indices``, augmented as the whole batch augments those rows; ``rows``:
        their pixels when read ahead); no teacher logits for the label-only baseline."""
        images = (pixels[indices[shard]] if rows is None else rows).to(device, non_blocking=True)
        if augmented:  # on the device; its random numbers from augment_rng, as before
            images = augment(images, augment_rng, shard, len(indices))
        inputs = normalize(images, cfg.mean, cfg.std)
        if not cfg.distill_weight:
            return inputs, None
        with autocast, torch.inference_mode():
            teacher_logits = teacher(inputs)
        return inputs, teacher_logits.clone()  # a normal tensor, usable by autograd

    # Compiled, the student's forward and backward run as fused kernels (a C++ compiler on
    # CPU, Triton on CUDA); the first steps pay the compilation. Parameters stay shared, so
    # checkpoints and the Hessian estimate use ``student`` itself. Under DDP (several
    # processes) the backward averages the processes' gradients.
    forward = group.wrap(student)
    forward = torch.compile(forward) if cfg.compile_model else forward

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

    curve = None if on_metrics is None else TrainingCurve(cfg, optimizer, probe, on_metrics)
    loss_value, start, capped_warned = float("nan"), 0, False
    if resume_from is not None:
        saved = load_checkpoint(resume_from)
        _check_resumable(saved, cfg, len(pixels))
        _restore(saved, student, optimizer, schedule, augment_rng)
        start, loss_value = saved["step"], saved["loss"]
        capped_warned = saved.get("ewgs_capped_warned", False)
    if group.from_main(start) != start:  # a checkpoint written between the ranks' reads
        raise RuntimeError(f"rank {group.rank} resumes at step {start}, rank 0 elsewhere")
    last_saved = start

    def warn_if_capped(step: int) -> None:
        """Tell ``on_warning``, once per job (the checkpoint remembers), that deltas hit their
        cap: the Hessian asked for more gradient scaling than keeps every gradient's sign."""
        nonlocal capped_warned
        capped = {name: max_delta(q) for name, q in ewgs.items() if q.delta.item() >= max_delta(q)}
        if on_warning is None or capped_warned or not capped:
            return
        capped_warned = True
        on_warning(EWGS_DELTA_CAPPED, _capped_message(capped, step))

    def checkpoint(step: int, *, stopping: bool = False) -> None:
        """Save the state after ``step`` steps: every ``checkpointer.every``, last, or stopping."""
        nonlocal last_saved
        if checkpointer is None or step == last_saved:
            return
        if stopping or step % checkpointer.every == 0 or step == cfg.steps:
            run = {
                "step": step,
                "config": asdict(cfg),
                "images": len(pixels),
                "loss": loss_value,
                "ewgs_capped_warned": capped_warned,
            }
            with stopwatch.timing("checkpoint"):
                save_checkpoint(
                    checkpointer.path, run | _snapshot(student, optimizer, schedule, augment_rng)
                )
            last_saved = step

    started = time.perf_counter()
    images_seen = 0
    # The rows of the next batches are read while this one computes; pinned for a CUDA copy.
    order = batch_indices(len(pixels), cfg.batch_size, cfg.seed, start)
    shard = group.shard(min(cfg.batch_size, len(pixels)))  # every batch has this many images
    batches = Prefetcher(
        pixels,
        itertools.islice(order, cfg.steps - start),
        pin=device.type == "cuda",
        shard=shard,
    )
    for step in range(start, cfg.steps):
        if group.decide(should_stop is not None and should_stop()):  # rank 0's call
            checkpoint(step, stopping=True)
            raise TrainingCanceled(f"stopped at step {step} of {cfg.steps}")
        epoch, indices, rows = next(batches)
        if ewgs and cfg.ewgs_delta == "hessian" and step % hessian_every == 0:
            with stopwatch.timing("hessian"):
                ewgs_deltas = estimate_deltas(step)  # the same on every rank: same batch, student
            warn_if_capped(step)
        inputs, teacher_logits = batch(indices, cfg.augment, shard, rows)
        with autocast:
            student_logits = forward(inputs)
        loss = training_loss(student_logits, teacher_logits, indices[shard])
        loss = loss * group.loss_weight(len(indices))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # the rates this step used, before the schedule moves them on
        rates = curve.rates(optimizer) if curve is not None and curve.due(step + 1) else {}
        schedule.step()

        images_seen += len(indices)
        loss_value = group.mean(loss)
        if curve is not None:  # before the checkpoint: a crash repeats points, never skips
            curve.add(step + 1, epoch + 1, loss_value, rates, student)
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

    batches.close()
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
        probe_points=0 if curve is None else curve.probes,
        probe_seconds=0.0 if curve is None else curve.probe_seconds,
        hessian_seconds=stopwatch.seconds["hessian"],
        checkpoint_seconds=stopwatch.seconds["checkpoint"],
        report_seconds=stopwatch.seconds["report"],  # the probes are counted apart
        processes=group.size,
    )


def _capped_message(capped: dict[str, float], step: int) -> str:
    """The ``ewgs_delta_capped`` warning: which quantizers, at which cap, from which step."""
    shown = [f"{name} (cap {cap:g})" for name, cap in list(capped.items())[:8]]
    more = f" and {len(capped) - len(shown)} more" if len(capped) > len(shown) else ""
    return (
        f"EWGS delta hit its cap at step {step} for {', '.join(shown)}{more}: the Hessian "
        "estimate asked for stronger gradient scaling than keeps each gradient's sign "
        "(2 x the quantizer's steps), so these quantizers train with the cap. Common near a "
        "minimum (a student already close to its teacher); a fixed ewgs_delta avoids it."
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
