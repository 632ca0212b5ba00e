"""A job run again on its work dir resumes from ``checkpoint.pt`` and ends with the same student.

The worker re-runs a job whose worker died (or lost its lease) with the same work dir; these
tests stop or crash ``run_quantization`` mid-training, run it again, and compare the exported
student with that of a run that never stopped, byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load

from core.config import JobConfig
from core.pipeline import (
    CHECKPOINT,
    JobCanceled,
    JobInputs,
    JobResult,
    SilentReporter,
    run_quantization,
)
from core.settings import get_settings
from core.sqakd.trainer import load_checkpoint
from tests.core.sqakd.test_distributed import LOSS_RTOL, STATE_RTOL
from tests.factories import VALID_CONFIG, export_tiny_cnn, image_zip

STEPS, EVERY = 10, 3  # 58 training images in batches of 16: 3 steps an epoch, 4 epochs
CONFIG = JobConfig.model_validate(
    {
        **{k: v for k, v in VALID_CONFIG.items() if k != "epochs"},
        "steps": STEPS,
        "checkpoint_every": EVERY,
        "export": {"onnx": False},
    }
)


class Died(Exception):
    """The worker process died: nothing after this point runs."""


class Reporter(SilentReporter):
    """Records stages, progress and curve points; asks to stop once ``stop_after`` steps are
    done, or dies after ``die_after`` steps."""

    def __init__(self, stop_after: int | None = None, die_after: int | None = None) -> None:
        super().__init__()
        self.stop_after, self.die_after = stop_after, die_after
        self.steps: list[int] = []

    def progress(self, progress: dict[str, Any]) -> None:
        self.steps.append(progress["step"])
        if progress["step"] == self.die_after:
            raise Died

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.steps) >= self.stop_after


@dataclass
class Uninterrupted:
    inputs: JobInputs
    workdir: Path
    result: JobResult
    student: bytes
    points: list[dict[str, Any]]  # the training curve


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Uninterrupted:
    tmp = tmp_path_factory.mktemp("resume")
    inputs = JobInputs(export_tiny_cnn(tmp / "teacher.onnx"), image_zip(tmp / "images.zip"))
    reporter = Reporter()
    result = run_quantization(inputs, CONFIG, tmp / "work", reporter)
    assert reporter.steps == list(range(1, STEPS + 1))
    assert CONFIG.preprocessing.augment and result.metrics["train_images"] == 58
    return Uninterrupted(
        inputs,
        tmp / "work",
        result,
        result.artifacts["student.safetensors"].read_bytes(),
        reporter.points,
    )


def assert_same_job(run: Uninterrupted, result: JobResult, resumed_from: int) -> None:
    assert result.artifacts["student.safetensors"].read_bytes() == run.student
    metrics, expected = result.metrics, run.result.metrics
    assert metrics["calibrated"] == expected["calibrated"]  # calibration is redone, identically
    for key in ("agreement", "kl", "teacher_top1", "student_top1"):
        assert metrics[key] == expected[key], key
    assert metrics["train"]["final_loss"] == expected["train"]["final_loss"]
    assert metrics["train"]["resumed_from_step"] == resumed_from
    assert CHECKPOINT not in result.artifacts


def test_a_stopped_job_resumes_where_it_stopped(
    uninterrupted: Uninterrupted, tmp_path: Path
) -> None:
    stopping = Reporter(stop_after=5)
    with pytest.raises(JobCanceled, match="step 5 of 10"):
        run_quantization(uninterrupted.inputs, CONFIG, tmp_path, stopping)
    assert stopping.steps == [1, 2, 3, 4, 5]
    assert load_checkpoint(tmp_path / CHECKPOINT)["step"] == 5  # saved on the way out

    again = Reporter()
    result = run_quantization(uninterrupted.inputs, CONFIG, tmp_path, again)

    assert again.steps == [6, 7, 8, 9, 10]
    assert again.stages == ["validating", "calibrating", "training", "evaluating", "exporting"]
    assert_same_job(uninterrupted, result, resumed_from=5)
    # The curve goes on from the checkpoint: the same points, probes included, none repeated
    assert stopping.points + again.points == uninterrupted.points


def test_a_dead_workers_job_resumes_from_the_last_checkpoint(
    uninterrupted: Uninterrupted, tmp_path: Path
) -> None:
    with pytest.raises(Died):
        run_quantization(uninterrupted.inputs, CONFIG, tmp_path, Reporter(die_after=8))
    assert load_checkpoint(tmp_path / CHECKPOINT)["step"] == 6  # every EVERY steps

    again = Reporter()
    result = run_quantization(uninterrupted.inputs, CONFIG, tmp_path, again)

    assert again.steps == [7, 8, 9, 10]
    assert_same_job(uninterrupted, result, resumed_from=6)
    assert again.points == uninterrupted.points[6:]  # points 7 and 8 again, then on


def test_a_job_that_finished_training_does_not_train_again(uninterrupted: Uninterrupted) -> None:
    """Its worker died while evaluating or exporting: the checkpoint of the last step is kept."""
    assert load_checkpoint(uninterrupted.workdir / CHECKPOINT)["step"] == STEPS
    again = Reporter()
    result = run_quantization(uninterrupted.inputs, CONFIG, uninterrupted.workdir, again)
    assert again.steps == []
    assert_same_job(uninterrupted, result, resumed_from=STEPS)


def test_a_job_on_two_processes_stops_resumes_and_ends_as_on_one(
    uninterrupted: Uninterrupted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two gloo processes (``devices``, allowed by the worker's ``TRAIN_DEVICES``), stopped by
    rank 0's reporter, then resumed: the 1-process job's student and curve within
    ``test_distributed``'s tolerance (the same math, float sums in another order)."""
    monkeypatch.setenv("TRAIN_DEVICES", "2")
    get_settings.cache_clear()
    config = JobConfig.model_validate(CONFIG.model_dump() | {"devices": 2})
    stopping = Reporter(stop_after=5)
    with pytest.raises(JobCanceled, match="step 5 of 10"):
        run_quantization(uninterrupted.inputs, config, tmp_path, stopping)
    assert load_checkpoint(tmp_path / CHECKPOINT)["step"] == 5  # rank 0's, on the way out

    again = Reporter()
    result = run_quantization(uninterrupted.inputs, config, tmp_path, again)
    get_settings.cache_clear()

    assert again.steps == [6, 7, 8, 9, 10]
    assert result.metrics["train"]["processes"] == 2
    expected = load(uninterrupted.student)
    got = load(result.artifacts["student.safetensors"].read_bytes())
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        scale = tensor.abs().max().item() or 1.0
        torch.testing.assert_close(got[key], tensor, rtol=0, atol=STATE_RTOL * scale, msg=key)
    points = stopping.points + again.points
    assert [p["step"] for p in points] == [p["step"] for p in uninterrupted.points]
    torch.testing.assert_close(
        torch.tensor([p["loss"] for p in points]),
        torch.tensor([p["loss"] for p in uninterrupted.points]),
        rtol=LOSS_RTOL,
        atol=0,
    )
    assert result.metrics["agreement"] == pytest.approx(
        uninterrupted.result.metrics["agreement"], abs=0.05
    )
