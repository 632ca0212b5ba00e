"""Training curves: loss and rates every few steps, probes of the student against the teacher on
a fixed subset of the evaluation images, the EWGS cap warning, through resumes and the pipeline."""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from core.config import JobConfig
from core.pipeline import JobInputs, SilentReporter, run_quantization
from core.sqakd.hessian import ewgs_quantizers, max_delta
from core.sqakd.metrics import compare, predict
from core.sqakd.trainer import (
    EWGS_DELTA_CAPPED,
    PROBE_MAX_IMAGES,
    PROBE_MIN_IMAGES,
    PROBE_POINTS,
    Checkpointer,
    Probe,
    TrainConfig,
    TrainingCanceled,
    TrainingCurve,
    choose_probe,
    curve_steps,
    load_checkpoint,
    make_optimizer,
    probe_size,
    save_checkpoint,
    train,
)
from tests.core.sqakd.test_trainer import (
    MEAN,
    METHODS,
    STD,
    config,
    make_student,
    make_teacher,
    uint8_images,
)
from tests.factories import VALID_CONFIG, export_tiny_cnn, image_zip

TRAIN_IMAGES, EVAL_IMAGES, BATCH, STEPS = 32, 24, 4, 40  # 8 steps an epoch, a probe every 2


class BatchNormDropoutNet(nn.Module):
    """BatchNorm (running statistics train in train mode) and dropout (torch's global RNG): what
    an eval-mode probe could disturb if it were careless."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        return self.fc(self.drop(h.mean(dim=(2, 3))))


@dataclass
class Job:
    model: nn.Module  # the float model the student is a quantized copy of
    pixels: Tensor
    eval_pixels: Tensor
    method: str
    cfg: TrainConfig
    teacher: nn.Module = field(init=False)  # the model it distills (``model`` unless replaced)

    def __post_init__(self) -> None:
        self.teacher = self.model

    def student(self) -> nn.Module:
        """The calibrated student, and the global RNG as a job leaves it, the same every time."""
        torch.manual_seed(7)
        return make_student(self.model, self.method, self.pixels, bits=4)

    def probe(self) -> Probe:
        teacher_logits = predict(self.teacher, self.eval_pixels, MEAN, STD)
        return choose_probe(self.eval_pixels, teacher_logits, self.cfg)

    def train(self, student: nn.Module, **kwargs: Any) -> list[dict[str, Any]]:
        """The curve points of ``train``, with probes unless ``probe=None`` is given."""
        points: list[dict[str, Any]] = []
        kwargs.setdefault("probe", self.probe())
        train(self.teacher, student, self.pixels, self.cfg, on_metrics=points.append, **kwargs)
        return points


def make_job(model: nn.Module | None = None, method: str = "lsq", **cfg: Any) -> Job:
    return Job(
        model or make_teacher(),
        uint8_images(TRAIN_IMAGES),
        uint8_images(EVAL_IMAGES),
        method,
        config(**{"steps": STEPS, "batch_size": BATCH, **cfg}),
    )


def probed(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in points if "probe" in p]


# --- where the points fall, how big the probe is ---------------------------------------------


@pytest.mark.parametrize("total", [1, 7, 20, 39, 200, 403, 10_000])
def test_curve_steps(total: int) -> None:
    every, probes = curve_steps(total)
    assert every == max(1, total // 200)
    assert max(probes) == total and min(probes) >= 1
    assert len(probes) == min(total, PROBE_POINTS)  # every step of a job shorter than 20
    gaps = [b - a for a, b in zip(sorted(probes), sorted(probes)[1:], strict=False)]
    assert not gaps or max(gaps) - min(gaps) <= 1  # evenly spaced


def test_probe_size_grows_with_the_job_within_bounds() -> None:
    assert probe_size(64) == PROBE_MIN_IMAGES
    sizes = [probe_size(images) for images in (10_000, 50_000, 200_000, 10**7)]
    assert sizes == sorted(sizes) and sizes[-1] == PROBE_MAX_IMAGES
    assert PROBE_MIN_IMAGES < probe_size(50_000) < PROBE_MAX_IMAGES


def test_the_probe_is_a_fixed_subset_of_the_eval_images_with_their_teacher_rows() -> None:
    pixels = uint8_images(200)
    logits = torch.randn(200, 10)
    cfg = config(steps=10_000, batch_size=64, seed=3)  # 640,000 images: the cap
    probe = choose_probe(pixels, logits, cfg)
    assert len(probe) == 200  # no more than there are
    small = config(steps=50, batch_size=64, seed=3)
    first, again = choose_probe(pixels, logits, small), choose_probe(pixels, logits, small)
    assert len(first) == probe_size(50 * 64) == PROBE_MIN_IMAGES
    assert torch.equal(first.pixels, again.pixels)  # the same subset every run (and resume)
    rows = [next(i for i in range(200) if torch.equal(pixels[i], p)) for p in first.pixels]
    assert rows == sorted(rows) and len(set(rows)) == len(rows)
    assert torch.equal(first.teacher_logits, logits[rows])  # the rows already computed
    other = choose_probe(pixels, logits, config(steps=50, batch_size=64, seed=4))
    assert not torch.equal(other.pixels, first.pixels)  # chosen by the job's seed


# --- the points ------------------------------------------------------------------------------


def test_a_short_job_reports_loss_rates_and_at_least_20_probes() -> None:
    job = make_job()
    student, probe = job.student(), job.probe()
    points = job.train(student, probe=probe)

    assert [p["step"] for p in points] == list(range(1, STEPS + 1))  # every step of a short job
    assert [p["epoch"] for p in points] == [
        (s - 1) // (TRAIN_IMAGES // BATCH) + 1 for s in range(1, STEPS + 1)
    ]
    for point in points:
        assert math.isfinite(point["loss"]) and point["loss"] >= 0
        assert point["lr"].keys() == {"weights", "quantizer"}  # the TinyCNN has no others
        assert all(rate > 0 for rate in point["lr"].values())
    assert points[0]["lr"]["weights"] > points[-1]["lr"]["weights"]  # the cosine schedule
    with_probe = probed(points)
    assert len(with_probe) == PROBE_POINTS
    assert [p["step"] for p in with_probe] == list(range(2, STEPS + 1, 2))
    for point in with_probe:
        found = point["probe"]
        assert found["images"] == len(probe) == PROBE_MIN_IMAGES
        assert 0 <= found["agreement"] <= 1 and math.isfinite(found["kl"]) and found["kl"] >= 0
    # The last probe is the trained student's agreement and KL on those images.
    final = compare(probe.teacher_logits, predict(student, probe.pixels, MEAN, STD), None)
    assert with_probe[-1]["probe"] == {
        "agreement": final["agreement"],
        "kl": final["kl"],
        "images": len(probe),
    }
    assert student.training  # put back in train mode


def test_the_loss_of_a_point_is_the_mean_since_the_last_point() -> None:
    """A longer job: a point every 2 steps, the probe steps, the last step (the curve alone;
    ``train`` feeds it every step's loss)."""
    job = make_job()
    cfg = config(steps=403, batch_size=BATCH)
    student = job.student()
    points: list[dict[str, Any]] = []
    curve = TrainingCurve(cfg, make_optimizer(student, cfg), None, points.append)
    losses = [float(step % 7) for step in range(1, 404)]
    for step, loss in enumerate(losses, 1):
        curve.add(step, 1, loss, {"weights": 0.1}, student)

    every, probe_steps = curve_steps(403)
    steps = [p["step"] for p in points]
    assert every == 2 and steps == sorted({*range(2, 404, 2), *probe_steps, 403})
    assert not probed(points)  # no probe given
    previous = 0
    for point in points:
        since = losses[previous : point["step"]]
        assert point["loss"] == sum(since) / len(since)
        previous = point["step"]


@pytest.mark.parametrize("method", METHODS)
def test_probes_do_not_change_the_trained_student(method: str) -> None:
    """Bit for bit on the CPU, with BatchNorm and dropout in the student (and EWGS's Hessian)."""
    job = make_job(BatchNormDropoutNet().eval(), method, steps=PROBE_POINTS)  # probes each step
    students, rng_states = [], []
    for probe in (job.probe(), None):
        student = job.student()
        points = job.train(student, probe=probe)
        assert len(probed(points)) == (PROBE_POINTS if probe is not None else 0)
        students.append(student.state_dict())
        rng_states.append(torch.get_rng_state())
    with_probes, without = students
    assert with_probes.keys() == without.keys()
    assert any("running_mean" in key for key in with_probes)  # BatchNorm kept in the student
    for key in with_probes:
        assert torch.equal(with_probes[key], without[key]), key
    assert torch.equal(*rng_states)


def test_a_resumed_job_continues_its_curve(tmp_path: Path) -> None:
    job = make_job()
    whole = job.train(job.student())

    path = tmp_path / "checkpoint.pt"
    checkpointer = Checkpointer(path, every=5)
    stop_at = 17
    first: list[dict[str, Any]] = []
    with pytest.raises(TrainingCanceled, match="step 17 of 40"):
        train(
            job.teacher,
            job.student(),
            job.pixels,
            job.cfg,
            on_metrics=first.append,
            probe=job.probe(),
            checkpointer=checkpointer,
            should_stop=lambda: len(first) >= stop_at,  # a point every step here
        )
    rest = job.train(job.student(), checkpointer=checkpointer, resume_from=path)
    assert first + rest == whole  # same steps, losses and probes, none missing or repeated
    assert len(probed(first)) + len(probed(rest)) == PROBE_POINTS


def test_a_checkpoint_from_before_the_curves_resumes_with_named_rates(tmp_path: Path) -> None:
    """Checkpoints written before this release have unnamed optimizer groups and no warning
    flag; restoring one replaces the optimizer's groups, but the rates keep their names."""
    job = make_job()
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(TrainingCanceled):
        train(
            job.teacher,
            job.student(),
            job.pixels,
            job.cfg,
            checkpointer=Checkpointer(path, every=5),
            should_stop=iter([False] * 10 + [True]).__next__,
        )
    saved = load_checkpoint(path)
    del saved["ewgs_capped_warned"]
    for group in saved["optimizer"]["param_groups"]:
        del group["name"]
    save_checkpoint(path, saved)

    rest = job.train(job.student(), resume_from=path)
    assert [p["step"] for p in rest] == list(range(11, STEPS + 1))
    assert all(p["lr"].keys() == {"weights", "quantizer"} for p in rest)


# --- EWGS's cap --------------------------------------------------------------------------------


def twin_job() -> tuple[Job, nn.Module]:
    """An EWGS student distilled from a near copy of itself: near the loss's minimum, where the
    Hessian estimate of delta exceeds the cap (``max_delta``)."""
    job = make_job(method="ewgs", steps=17)  # estimates at steps 0, 8 and 16
    student = job.student()
    twin = copy.deepcopy(student).eval().requires_grad_(False)
    noise = torch.randn(twin.fc.bias.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        twin.fc.bias.add_(1e-3 * noise)
    job.teacher = twin
    return job, student


def test_a_capped_ewgs_delta_is_warned_once_per_job(tmp_path: Path) -> None:
    job, student = twin_job()
    warnings: list[tuple[str, str]] = []
    path = tmp_path / "checkpoint.pt"
    job.train(
        student,
        probe=None,
        checkpointer=Checkpointer(path, every=5),
        on_warning=lambda code, message: warnings.append((code, message)),
    )
    assert [code for code, _ in warnings] == [EWGS_DELTA_CAPPED]  # estimated 3 times: once
    message = warnings[0][1]
    assert message.startswith("EWGS delta hit its cap at step 0 for ")
    named = dict(re.findall(r"([\w.]+) \(cap ([\d.]+)\)", message))
    quantizers = ewgs_quantizers(student)
    assert named and all(float(cap) == max_delta(quantizers[name]) for name, cap in named.items())

    # Resumed after the warning: the checkpoint remembers it was given.
    again: list[tuple[str, str]] = []
    assert load_checkpoint(path)["ewgs_capped_warned"] is True
    job.train(
        job.student(),
        probe=None,
        resume_from=path,
        on_warning=lambda code, message: again.append((code, message)),
    )
    assert again == []


def test_an_uncapped_ewgs_job_warns_nothing() -> None:
    job = make_job(method="ewgs", steps=9)  # estimates at steps 0 and 8
    warnings: list[tuple[str, str]] = []
    student = job.student()
    job.train(
        student, probe=None, on_warning=lambda code, message: warnings.append((code, message))
    )
    assert all(q.delta < max_delta(q) for q in ewgs_quantizers(student).values())
    assert warnings == []


# --- through the pipeline ------------------------------------------------------------------------


def test_the_pipeline_reports_the_curve(tmp_path: Path) -> None:
    config = JobConfig.model_validate(
        {
            **{k: v for k, v in VALID_CONFIG.items() if k != "epochs"},
            "steps": 20,
            "export": {"onnx": False},
        }
    )
    inputs = JobInputs(export_tiny_cnn(tmp_path / "teacher.onnx"), image_zip(tmp_path / "i.zip"))
    reporter = SilentReporter()
    result = run_quantization(inputs, config, tmp_path / "work", reporter)

    points = reporter.points
    assert [p["step"] for p in points] == list(range(1, 21))
    assert len(probed(points)) == PROBE_POINTS
    eval_images = result.metrics["eval_images"]
    assert {p["probe"]["images"] for p in probed(points)} == {min(PROBE_MIN_IMAGES, eval_images)}
    assert result.metrics["train"]["probe_points"] == PROBE_POINTS
    assert result.metrics["train"]["probe_seconds"] > 0
    if eval_images <= PROBE_MIN_IMAGES:  # the probe is every eval image: the final metrics
        assert points[-1]["probe"]["agreement"] == result.metrics["agreement"]
        assert points[-1]["probe"]["kl"] == result.metrics["kl"]
