"""The distillation loop: schedule, batches, optimizer groups, and short runs on a tiny CNN."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import Tensor, nn

from core.inputs.images import normalize
from core.sqakd.calibrate import calibrate
from core.sqakd.distill import distillation_loss
from core.sqakd.modules import QuantSpec, prepare, quant_layers
from core.sqakd.quantizers import QUANTIZERS
from core.sqakd.trainer import (
    Checkpointer,
    TrainConfig,
    TrainingCanceled,
    TrainProgress,
    TrainStats,
    batch_indices,
    cosine_factor,
    load_checkpoint,
    make_optimizer,
    save_checkpoint,
    steps_per_epoch,
    train,
)
from tests.core.sqakd.nets import MixedNet, TinyCNN, normalised_images

METHODS = sorted(QUANTIZERS)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
IMAGES, BATCH, STEPS = 64, 32, 20


def uint8_images(count: int) -> Tensor:
    """Random uint8 images whose normalised form is ``normalised_images``."""
    pixels = normalised_images(count) * STD[0] * 255 + MEAN[0] * 255
    return pixels.round().clamp(0, 255).to(torch.uint8)


def make_teacher() -> nn.Module:
    teacher = TinyCNN()
    with torch.no_grad():
        teacher.fc.weight.mul_(10)  # logits that differ enough for the KL to matter
    return teacher.eval()


def make_student(
    teacher: nn.Module, method: str, pixels: Tensor, bits: int = 2, **spec: Any
) -> nn.Module:
    student = prepare(
        teacher, QuantSpec(method=method, weight_bits=bits, activation_bits=bits, **spec)
    )
    calibrate(student, teacher, normalize(pixels, MEAN, STD))
    return student


@torch.no_grad()
def eval_loss(student: nn.Module, teacher: nn.Module, pixels: Tensor) -> float:
    x = normalize(pixels, MEAN, STD)
    was_training = student.training
    student.eval()
    loss = distillation_loss(student(x), teacher(x), 4.0).item()
    student.train(was_training)
    return loss


def config(**overrides: object) -> TrainConfig:
    values: dict[str, object] = {"steps": STEPS, "batch_size": BATCH, "mean": MEAN, "std": STD}
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


# --- schedule and batches ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("images", "batch", "expected"),
    [(100, 32, 3), (64, 32, 2), (64, 64, 1), (10, 32, 1), (1, 1, 1)],
)
def test_steps_per_epoch(images: int, batch: int, expected: int) -> None:
    assert steps_per_epoch(images, batch) == expected


def test_cosine_factor() -> None:
    assert cosine_factor(0, 100) == 1.0
    assert cosine_factor(100, 100) == pytest.approx(0.0, abs=1e-12)
    assert cosine_factor(50, 100) == pytest.approx(0.5)
    assert cosine_factor(25, 100) == pytest.approx(0.5 + 0.5 * 2**-0.5)
    factors = [cosine_factor(step, 37) for step in range(38)]
    assert all(a > b for a, b in zip(factors, factors[1:], strict=False))
    assert cosine_factor(0, 0) == 1.0  # no division by zero for an empty job


def take(images: int, batch: int, seed: int, count: int) -> list[tuple[int, Tensor]]:
    generator = batch_indices(images, batch, seed)
    return [next(generator) for _ in range(count)]


def test_batch_indices_are_deterministic_per_seed() -> None:
    first, again, other = take(20, 4, 3, 12), take(20, 4, 3, 12), take(20, 4, 4, 12)
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, other, strict=True))


def test_batch_indices_cover_each_epoch_without_repetition() -> None:
    batches = take(12, 4, 0, 9)  # three epochs of three batches
    assert [epoch for epoch, _ in batches] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    orders = []
    for epoch in range(3):
        indices = torch.cat([i for e, i in batches if e == epoch])
        assert sorted(indices.tolist()) == list(range(12))
        assert all(len(i) == 4 for e, i in batches if e == epoch)
        orders.append(indices.tolist())
    assert orders[0] != orders[1] != orders[2]  # a fresh permutation each epoch


@pytest.mark.parametrize("start", [0, 1, 4, 5, 11])
def test_batch_indices_from_a_step_continue_the_same_sequence(start: int) -> None:
    whole = take(20, 8, 3, 14)  # 2 steps per epoch: starts mid-epoch and on an epoch boundary
    batches = batch_indices(20, 8, 3, start)
    tail = [next(batches) for _ in range(14 - start)]
    assert [e for e, _ in tail] == [e for e, _ in whole[start:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(tail, whole[start:], strict=True))


def test_batch_indices_drop_the_ragged_batch_and_handle_small_sets() -> None:
    epoch_batches = [i for e, i in take(10, 4, 0, 4) if e == 0]
    assert [len(i) for i in epoch_batches] == [4, 4]
    assert len(set(torch.cat(epoch_batches).tolist())) == 8
    (epoch, indices), (next_epoch, _) = take(5, 8, 0, 2)
    assert (epoch, next_epoch) == (0, 1)
    assert sorted(indices.tolist()) == list(range(5))


# --- optimizer groups ----------------------------------------------------------------------


def mixed_student(method: str) -> nn.Module:
    teacher = MixedNet()
    student = prepare(teacher, QuantSpec(method=method, weight_bits=4, activation_bits=4))
    calibrate(student, teacher, torch.randn(8, 3, 8, 8))
    return student


def group_of(optimizer: torch.optim.Optimizer, parameter: nn.Parameter) -> dict:
    (group,) = [g for g in optimizer.param_groups if any(p is parameter for p in g["params"])]
    return group


def weight_step(layer: nn.Module) -> float:
    grid = layer.weight_quantizer.grid()
    return (grid.scale * grid.stride).mean().item()


def assert_each_parameter_in_one_group(
    student: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    counts = Counter(id(p) for g in optimizer.param_groups for p in g["params"])
    assert set(counts) == {id(p) for p in student.parameters()}
    assert set(counts.values()) == {1}


@pytest.mark.parametrize("method", METHODS)
def test_make_optimizer_step_unit(method: str) -> None:
    student = mixed_student(method)
    cfg = TrainConfig(steps=1, batch_size=1, lr=0.02, quantizer_lr=0.005, weight_decay=1e-4)
    optimizer = make_optimizer(student, cfg)
    assert isinstance(optimizer, torch.optim.Adam)
    assert_each_parameter_in_one_group(student, optimizer)
    steps = []
    for name, layer in quant_layers(student):
        step = weight_step(layer)
        steps.append(step)
        weights = group_of(optimizer, layer.weight)
        assert weights["lr"] == pytest.approx(0.02 * step), name
        assert weights["weight_decay"] == 1e-4
        if layer.bias is not None:
            assert group_of(optimizer, layer.bias) is weights
        for q in (layer.weight_quantizer, layer.act_quantizer):
            for p in q.parameters():
                ranges = group_of(optimizer, p)
                # quantizer_lr of the quantizer's own step per update (range ends: test below)
                assert ranges["lr"] == pytest.approx(0.005 * q.range_lr_unit()), name
                assert ranges["lr"] > 0 and ranges["weight_decay"] == 0.0
    # the PReLU slope: the typical step of the model's layers
    others = group_of(optimizer, student.block[1].weight)
    assert others["lr"] == pytest.approx(0.02 * sum(steps) / len(steps))
    assert len(set(steps)) > 1  # layers really get different rates


@pytest.mark.parametrize("method", METHODS)
def test_make_optimizer_absolute_unit(method: str) -> None:
    student = mixed_student(method)
    cfg = TrainConfig(steps=1, batch_size=1, lr=1e-3, quantizer_lr=1e-5, lr_unit="absolute")
    optimizer = make_optimizer(student, cfg)
    assert_each_parameter_in_one_group(student, optimizer)
    for _, layer in quant_layers(student):
        assert group_of(optimizer, layer.weight)["lr"] == 1e-3
        for p in [*layer.weight_quantizer.parameters(), *layer.act_quantizer.parameters()]:
            assert group_of(optimizer, p)["lr"] == 1e-5
    assert group_of(optimizer, student.block[1].weight)["lr"] == 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_residual_add_quantizers_train_at_the_quantizer_rate(method: str) -> None:
    teacher = TinyCNN()
    spec = QuantSpec(method=method, weight_bits=4, activation_bits=4, residual_bits=8)
    student = prepare(teacher, spec)
    calibrate(student, teacher, normalised_images(16))
    cfg = TrainConfig(steps=1, batch_size=1, lr=0.02, quantizer_lr=0.005)
    optimizer = make_optimizer(student, cfg)
    assert_each_parameter_in_one_group(student, optimizer)
    for quantizer in student.get_submodule("residual_add").input_quantizers:
        for p in quantizer.parameters():
            assert group_of(optimizer, p)["lr"] == pytest.approx(0.005 * quantizer.range_lr_unit())


@dataclass
class Update:
    student: nn.Module
    before: dict[str, Tensor]  # the state_dict before the update
    top_levels: dict[str, Tensor]  # each layer's highest weight level (per channel) before it


def top_level(layer: nn.Module) -> Tensor:
    grid = layer.weight_quantizer.grid()
    return ((grid.qmax - grid.zero_point) * grid.scale).clone()


def one_update(method: str, bits: int, cfg: TrainConfig) -> Update:
    teacher = TinyCNN()
    x = normalised_images(16)
    student = prepare(teacher, QuantSpec(method=method, weight_bits=bits, activation_bits=bits))
    calibrate(student, teacher, x)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    tops = {name: top_level(layer) for name, layer in quant_layers(student)}
    optimizer = make_optimizer(student, cfg)
    distillation_loss(student(x), teacher(x).detach() * 10, 4.0).backward()
    optimizer.step()  # Adam's first update moves each parameter by lr * sign(grad)
    return Update(student, before, tops)


@pytest.mark.parametrize("method", METHODS)
def test_one_update_moves_weights_by_lr_steps(method: str) -> None:
    update = one_update(method, 4, TrainConfig(steps=1, batch_size=1, lr=0.1, quantizer_lr=0.0))
    for name, layer in quant_layers(update.student):
        moved = (layer.weight.detach() - update.before[f"{name}.weight"]).abs()
        assert moved.max().item() == pytest.approx(0.1 * weight_step(layer), rel=1e-3), name


@pytest.mark.parametrize(
    "method",
    METHODS,
)
def test_one_update_moves_weight_ranges_by_about_quantizer_lr_steps(method: str) -> None:
    """As for the weights, ``lr_unit="step"`` means a range end moves ~quantizer_lr of a step."""
    update = one_update(method, 8, TrainConfig(steps=1, batch_size=1, lr=0.0, quantizer_lr=0.1))
    for name, layer in quant_layers(update.student):
        moved = (top_level(layer) - update.top_levels[name]).abs() / weight_step(layer)
        assert moved.max() <= 3 * 0.1, f"{name}: the clip moved {moved.max():.2f} steps"


# --- training runs -------------------------------------------------------------------------


@dataclass
class Run:
    teacher_before: dict[str, Tensor]
    teacher: nn.Module
    student: nn.Module
    loss_before: float
    loss_after: float
    progress: list[TrainProgress]
    stats: TrainStats


@pytest.fixture(scope="module", params=METHODS)
def run(request: pytest.FixtureRequest) -> Run:
    """A W2A2 student, 20 steps of 32 of 64 images; over 6 seeds the loss fell to 0.55-0.85x
    of its start for both methods."""
    torch.manual_seed(0)
    teacher, pixels = make_teacher(), uint8_images(IMAGES)
    student = make_student(teacher, request.param, pixels)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    loss_before = eval_loss(student, teacher, pixels)
    progress: list[TrainProgress] = []
    stats = train(
        teacher, student, pixels, config(augment=False, quantizer_lr=1e-3), on_step=progress.append
    )
    return Run(
        teacher_before,
        teacher,
        student,
        loss_before,
        eval_loss(student, teacher, pixels),
        progress,
        stats,
    )


def test_train_lowers_the_distillation_loss(run: Run) -> None:
    assert run.loss_after < 0.95 * run.loss_before


def test_train_keeps_the_teacher_frozen(run: Run) -> None:
    for key, value in run.teacher.state_dict().items():
        assert torch.equal(value, run.teacher_before[key]), key
    assert all(p.grad is None and not p.requires_grad for p in run.teacher.parameters())
    assert not run.teacher.training
    assert run.student.training
    assert all(p.grad is not None for p in run.student.parameters())


def test_train_reports_every_step(run: Run) -> None:
    progress = run.progress
    assert [p.step for p in progress] == list(range(1, STEPS + 1))
    per_epoch = steps_per_epoch(IMAGES, BATCH)
    assert [p.epoch for p in progress] == [i // per_epoch + 1 for i in range(STEPS)]
    for p in progress:
        assert p.total_steps == STEPS and p.epochs == STEPS // per_epoch
        assert p.eta_seconds >= 0 and p.images_per_second > 0
        assert p.loss > 0
    assert progress[-1].eta_seconds == 0
    assert run.stats.steps == STEPS
    assert run.stats.final_loss == progress[-1].loss
    assert run.stats.seconds > 0 and run.stats.images_per_second > 0
    assert run.stats.peak_memory_bytes > 10 * 2**20  # CPU: the process peak RSS


def test_train_raises_when_stopped() -> None:
    teacher, pixels = make_teacher(), uint8_images(16)
    student = prepare(teacher, QuantSpec(method=METHODS[0], weight_bits=4, activation_bits=4))
    calls: list[int] = []
    progress: list[TrainProgress] = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(TrainingCanceled, match="step 3 of 20"):
        train(
            teacher,
            student,
            pixels,
            config(batch_size=8),
            on_step=progress.append,
            should_stop=should_stop,
        )
    assert [p.step for p in progress] == [1, 2, 3]


def test_train_times_what_it_does_around_its_steps(tmp_path: Path) -> None:
    """Hessian estimates, checkpoint writes and the callbacks each get their own seconds, part of
    ``seconds``; a part the run does not do costs nothing."""
    teacher, pixels = make_teacher(), uint8_images(32)
    pause = 0.01

    def slow_report(_: object) -> None:
        time.sleep(pause)

    student = make_student(teacher, "ewgs", pixels)
    cfg = config(steps=4, batch_size=8, ewgs_delta_every=1)  # 4 steps per epoch: one estimate
    stats = train(
        teacher,
        student,
        pixels,
        cfg,
        on_step=slow_report,
        on_metrics=slow_report,
        checkpointer=Checkpointer(tmp_path / "checkpoint.pt", every=2),
    )
    assert stats.report_seconds >= 2 * cfg.steps * pause  # a progress and a curve point a step
    assert stats.hessian_seconds > 0 and stats.checkpoint_seconds > 0
    parts = stats.report_seconds + stats.hessian_seconds + stats.checkpoint_seconds
    assert parts + stats.probe_seconds < stats.seconds

    fixed = train(teacher, make_student(teacher, "ewgs", pixels), pixels, config(
        steps=2, batch_size=8, ewgs_delta=0.5
    ))  # fmt: skip
    assert (fixed.hessian_seconds, fixed.checkpoint_seconds, fixed.report_seconds) == (0, 0, 0)


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_gives_bit_identical_students(method: str) -> None:
    teacher, pixels = make_teacher(), uint8_images(32)
    students = []
    for seed in (5, 5, 6):
        torch.manual_seed(123)  # same start; only cfg.seed differs
        student = make_student(teacher, method, pixels, bits=4)
        train(teacher, student, pixels, config(steps=6, batch_size=8, seed=seed))  # augmenting
        students.append(student.state_dict())
    first, again, other = students
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_config_is_frozen() -> None:
    cfg = config()
    with pytest.raises(AttributeError):
        cfg.steps = 5  # type: ignore[misc]
    assert replace(cfg, steps=5).steps == 5


# --- checkpoints and resume ----------------------------------------------------------------

RESUME_IMAGES, RESUME_BATCH, RESUME_STEPS, EVERY = 40, 16, 7, 2  # 2 steps an epoch, 4 epochs


class DropoutNet(nn.Module):
    """A first conv without bias (calibration adds one) and dropout (torch's global RNG)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(self.drop(h.mean(dim=(2, 3))))


@dataclass
class Job:
    teacher: nn.Module
    pixels: Tensor
    method: str

    def student(self) -> nn.Module:
        """The student as a job builds it, and the global RNG as a job leaves it, every time."""
        torch.manual_seed(7)
        return make_student(self.teacher, self.method, self.pixels, bits=4)

    def train(self, student: nn.Module, path: Path, **kwargs: Any) -> TrainStats:
        cfg = config(steps=RESUME_STEPS, batch_size=RESUME_BATCH)  # augmenting
        assert cfg.augment
        return train(
            self.teacher,
            student,
            self.pixels,
            cfg,
            checkpointer=Checkpointer(path, EVERY),
            **kwargs,
        )


def make_job(method: str) -> Job:
    teacher = DropoutNet().eval()
    with torch.no_grad():
        teacher.fc.weight.mul_(10)
    return Job(teacher, uint8_images(RESUME_IMAGES), method)


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Equal nested dicts/lists of tensors and plain values; tensors bit for bit."""
    assert type(a) is type(b), where
    if isinstance(a, Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


class Crash(Exception):
    """The worker died: no chance to save."""


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("interruption", ["stopped", "crashed"])
def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(
    tmp_path: Path, method: str, interruption: str
) -> None:
    job = make_job(method)
    whole = job.student()
    saved_steps: list[int | None] = []
    whole_path = tmp_path / "whole.pt"

    def record(p: TrainProgress) -> None:
        saved_steps.append(load_checkpoint(whole_path)["step"] if whole_path.exists() else None)

    job.train(whole, whole_path, on_step=record)
    assert saved_steps == [None, 2, 2, 4, 4, 6, 7]  # every EVERY steps, and the last one

    # The same run, interrupted during step 4 (epoch 2): by should_stop, which saves first, or
    # by a crash after step 3, which leaves the checkpoint of step 2.
    path = tmp_path / "resumed.pt"
    first = job.student()
    if interruption == "stopped":
        calls: list[int] = []
        with pytest.raises(TrainingCanceled, match="step 3 of 7"):
            job.train(first, path, should_stop=lambda: len(calls) >= 3 or calls.append(1))
        start = 3
    else:

        def crash(p: TrainProgress) -> None:
            if p.step == 3:
                raise Crash

        with pytest.raises(Crash):
            job.train(first, path, on_step=crash)
        start = 2
    assert load_checkpoint(path)["step"] == start

    resumed = job.student()  # rebuilt as the first run built it: prepare + calibrate
    torch.manual_seed(1234)  # another process: the global RNG (dropout) is anywhere
    progress: list[TrainProgress] = []
    stats = job.train(resumed, path, resume_from=path, on_step=progress.append)

    assert [p.step for p in progress] == list(range(start + 1, RESUME_STEPS + 1))
    assert [p.epoch for p in progress] == [s // 2 + 1 for s in range(start, RESUME_STEPS)]
    assert stats.resumed_from_step == start and stats.steps == RESUME_STEPS
    expected, got = whole.state_dict(), resumed.state_dict()
    assert "conv1.bias" in got  # added by calibration, restored by the checkpoint
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    # The final checkpoints hold the same optimizer, schedule and RNG states, bit for bit.
    assert_identical(load_checkpoint(whole_path), load_checkpoint(path))


def test_global_rng_is_part_of_the_checkpoint(tmp_path: Path) -> None:
    """Without restoring torch's RNG, dropout would draw other masks after a resume."""
    job = make_job(METHODS[0])
    path = tmp_path / "c.pt"
    job.train(job.student(), path, on_step=lambda p: None)
    saved = load_checkpoint(path)
    torch.manual_seed(1234)
    assert not torch.equal(torch.get_rng_state(), saved["torch_rng"])
    with pytest.raises(Crash):
        job.train(job.student(), tmp_path / "d.pt", on_step=lambda p: p.step < 3 or _raise())
    student = job.student()
    torch.manual_seed(1234)
    job.train(student, tmp_path / "d.pt", resume_from=tmp_path / "d.pt")
    assert torch.equal(torch.get_rng_state(), saved["torch_rng"])


def _raise() -> None:
    raise Crash


def test_a_checkpoint_is_tensors_and_plain_types(tmp_path: Path) -> None:
    job = make_job("lsq")
    path = tmp_path / "checkpoint.pt"
    job.train(job.student(), path)
    saved = torch.load(path, weights_only=True)  # no unpickling of code
    assert saved.keys() == {
        "version",
        "step",
        "config",
        "images",
        "loss",
        "ewgs_capped_warned",
        "student",
        "optimizer",
        "schedule",
        "augment_rng",
        "torch_rng",
        "cuda_rng",
    }
    assert saved["step"] == RESUME_STEPS and saved["images"] == RESUME_IMAGES
    assert saved["config"]["steps"] == RESUME_STEPS and saved["config"]["augment"] is True
    assert "conv1.bias" in saved["student"]  # added by calibration
    assert "fc.act_quantizer.step" in saved["student"]
    assert saved["optimizer"]["state"]  # Adam moments
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left


def test_resuming_from_the_final_checkpoint_takes_no_step(tmp_path: Path) -> None:
    job = make_job("lsq")
    path = tmp_path / "checkpoint.pt"
    whole = job.student()
    stats = job.train(whole, path)
    again = job.student()
    progress: list[TrainProgress] = []
    resumed = job.train(again, path, resume_from=path, on_step=progress.append)
    assert progress == [] and resumed.resumed_from_step == RESUME_STEPS
    assert resumed.final_loss == stats.final_loss
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in whole.state_dict().items())


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path: Path) -> None:
    job = make_job("lsq")
    path = tmp_path / "checkpoint.pt"
    job.train(job.student(), path)
    student = job.student()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(ValueError, match="lr, steps differ"):
        train(job.teacher, student, job.pixels, config(steps=9, lr=0.5), resume_from=path)
    with pytest.raises(ValueError, match="40 images, not 39"):
        cfg = config(steps=RESUME_STEPS, batch_size=RESUME_BATCH)
        train(job.teacher, student, job.pixels[:39], cfg, resume_from=path)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())  # untouched


def test_save_checkpoint_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises for a lambda
        save_checkpoint(path, {"step": 2, "bad": lambda: 0})
    assert load_checkpoint(path) == {"step": 1}  # the old checkpoint, whole
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_checkpointer_needs_a_positive_interval(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Checkpointer(tmp_path / "c.pt", every=0)


# --- the label-based baseline (benchmarks only) --------------------------------------------


def test_label_baseline_learns_the_labels_not_the_teacher() -> None:
    """distill_weight=0, label_weight=1 is plain QAT with cross-entropy: the student learns
    labels the teacher disagrees with, which SQAKD (no labels) never sees."""
    torch.manual_seed(0)
    teacher, pixels = make_teacher(), uint8_images(32)
    with torch.no_grad():
        labels = (teacher(normalize(pixels, MEAN, STD)).argmax(1) + 1) % 10  # never the teacher's
    student = make_student(teacher, "lsq", pixels, bits=8)
    baseline = config(
        steps=60, augment=False, distill_weight=0.0, label_weight=1.0, lr_unit="absolute", lr=0.01
    )
    train(teacher, student, pixels, baseline, labels=labels)
    with torch.no_grad():
        student.eval()
        predicted = student(normalize(pixels, MEAN, STD)).argmax(1)
    assert (predicted == labels).float().mean() > 0.5


def test_label_weight_without_labels_is_refused() -> None:
    teacher, pixels = make_teacher(), uint8_images(8)
    student = make_student(teacher, "lsq", pixels)
    with pytest.raises(ValueError, match="one label per image"):
        train(teacher, student, pixels, config(steps=1, label_weight=1.0))


# EWGS (its own backward) and LSQ on TensorRT's grids with quantized residual additions (the
# forward hooks): plain LSQ adds no path of its own and 15 s to the suite.
@pytest.mark.parametrize(
    ("method", "spec"),
    [("ewgs", {}), ("lsq", {"int8_grids": True, "residual_bits": 8})],
    ids=["ewgs", "lsq-tensorrt"],
)
def test_a_compiled_student_trains_like_the_eager_one(method: str, spec: dict[str, Any]) -> None:
    """``compile_model`` changes kernels, not maths: the same steps give close students. The
    whole student is one graph: a graph break per quantizer (an ``.item()``, the scratch pool)
    made the compiled step slower than the eager one. The TensorRT-compatible student's forward
    hooks (one pass per forward) stay out of the graph."""
    teacher, pixels = make_teacher(), uint8_images(32)
    students = []
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for compiled in (False, True):
        torch.manual_seed(0)
        student = make_student(teacher, method, pixels, bits=4, **spec)
        cfg = config(steps=3, batch_size=16, compile_model=compiled, ewgs_delta=0.2)
        train(teacher, student, pixels, cfg)
        students.append(student.state_dict())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    eager, compiled_state = students
    for key in eager:
        torch.testing.assert_close(compiled_state[key], eager[key], rtol=1e-3, atol=1e-4)
