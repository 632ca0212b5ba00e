"""Issue 2, point 10: SQAKD really trains, on real data, through the same pipeline a job runs.

The CIFAR-10 ResNet-20 teacher from ``../shared/fixtures`` (uploaded as ONNX) is distilled into
low-bit students on 2,000 unlabeled training images; agreement with the teacher is measured on
1,000 test images. The test prints the agreement right after calibration and after training.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from bench.cifar import cifar_zip, teacher_preprocessing
from core.config import JobConfig
from core.pipeline import JobInputs, SilentReporter, run_quantization
from tests.fixtures_paths import shared_path


class RecordingReporter(SilentReporter):
    def __init__(self) -> None:
        super().__init__()
        self.progress_updates: list[dict[str, Any]] = []

    def progress(self, progress: dict[str, Any]) -> None:
        self.progress_updates.append(progress)


@pytest.fixture(scope="module")
def cifar_job_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[JobInputs, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("cifar")
    inputs = JobInputs(
        model_path=shared_path("fixtures", "resnet20_cifar10.onnx"),
        data_path=cifar_zip(shared_path("data", "cifar10", "train"), 200, tmp / "train.zip"),
        eval_data_path=cifar_zip(shared_path("data", "cifar10", "test"), 100, tmp / "test.zip"),
    )
    return inputs, teacher_preprocessing(shared_path("fixtures", "resnet20_cifar10.json"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("job", "floor"),
    [
        # 8 bits: calibration alone is close to the teacher; the steps check that training
        # keeps it there (a third of an epoch: the epochs-to-steps count has tests of its own).
        ({"weight_bits": 8, "activation_bits": 8, "method": "lsq", "steps": 10}, 0.97),
        ({"weight_bits": 2, "activation_bits": 2, "method": "lsq", "steps": 80}, 0.70),
        (
            {
                "weight_bits": 4,
                "activation_bits": 4,
                "method": "ewgs",
                "steps": 20,  # at 10 its agreement varied from 0.928 to 0.939 between runs
            },
            0.93,
        ),
    ],
    ids=["W8A8-lsq-10-steps", "W2A2-lsq-80-steps", "W4A4-ewgs-20-steps"],
)
def test_sqakd_students_agree_with_the_cifar10_teacher(
    cifar_job_inputs: tuple[JobInputs, dict[str, Any]],
    tmp_path: Path,
    job: dict[str, Any],
    floor: float,
) -> None:
    inputs, preprocessing = cifar_job_inputs
    # No CPU speed timing: tests/core/export/test_runtime_speed.py covers it, in a fraction
    # of the seconds it takes per job here.
    config = JobConfig.model_validate(
        {**job, "batch_size": 64, "preprocessing": preprocessing, "export": {"speed": False}}
    )
    reporter = RecordingReporter()

    result = run_quantization(inputs, config, tmp_path, reporter)

    metrics = result.metrics
    calibrated = metrics["calibrated"]["agreement"]
    print(
        f"\nW{job['weight_bits']}A{job['activation_bits']}: agreement after calibration "
        f"{calibrated:.3f}, after {metrics['train']['steps']} steps {metrics['agreement']:.3f}; "
        f"student top-1 {metrics['student_top1']:.3f} (teacher {metrics['teacher_top1']:.3f})"
    )
    assert metrics["eval_images"] == 1000 and metrics["train_images"] == 2000
    assert metrics["train"]["steps"] == job["steps"]
    assert metrics["agreement"] >= floor
    assert metrics["teacher_top1"] > 0.85  # the labels of test/ really are used for top-1
    # Training, not calibration alone, got it there: 0.735 -> 0.793 in 80 steps on an AVX2 CPU;
    # 40 steps gained only 0.008 to 0.020 there, from run to run.
    if job["weight_bits"] == 2:
        assert metrics["agreement"] > calibrated + 0.01
    assert reporter.stages == ["validating", "calibrating", "training", "evaluating", "exporting"]
    assert len(reporter.progress_updates) == metrics["train"]["steps"]
    # Issue 4, point 3: the exported model computes what the student does, on every
    # evaluation image. Both compute in float32 in a different order, and a value that lands
    # on a rounding boundary in one takes the neighbouring code: a rate, not a constant. At
    # W4A4 it stays under 0.1% (0.00-0.01% over 10,000 images, `python -m bench.parity`); the
    # fine 8-bit grids catch more boundaries, and W8A8 students disagree on 0.04-0.12% of
    # images, seed by seed (2 of 1,000 in one run of this test), so 0.2% is its bound here.
    # A wrong export disagrees on whole percents.
    parity = metrics["onnx_parity"]
    print(f"ONNX Runtime vs PyTorch: {parity}")
    assert parity["images"] == 1000
    assert parity["top1_agreement"] >= {8: 0.998, 4: 0.999, 2: 0.99}[job["weight_bits"]]
    # The largest logit difference is recorded; one rounding flip in an early 2-bit layer moves
    # an image's logits by a point or two (measured 0.6-1.8), so the mean shows soundness.
    assert math.isfinite(parity["max_abs_diff"]) and parity["max_abs_diff"] >= 0
    assert parity["mean_abs_diff"] < 0.05  # measured 0.0004-0.007
    # The default student is TensorRT-compatible: its file follows every rule (issue 4, point 2)
    assert metrics["tensorrt_rules"]["follows_rules"], metrics["tensorrt_rules"]
