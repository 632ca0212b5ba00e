"""bench.gpu_speed's section and clocks, from figures a run gathers (the run itself needs a GPU
and the paper's checkout; ``--device cpu --tiny`` is its dry run)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bench.gpu_speed import FULL, PAPER, StepClock, section, stage_seconds, time_stages
from core.pipeline import SilentReporter


def gathered(ours: float) -> dict[str, Any]:
    return {
        "torch": "2.11.0+cu130",
        "environment": {"device": "NVIDIA H100", "cuda": "13.0", "python": "3.12", "cpus": 16},
        "sizes": {"side": 224, "batch": 128, "images": 256, "warmup": 3, "steps": 20},
        "ewgs_delta": 0.2,
        "rows": [
            {
                "name": PAPER,
                "images_per_second": 1000.0,
                "peak_memory_mib": 9000,
                "warmup_seconds": 1,
            },
            {"name": "ours: float32", "images_per_second": ours, "peak_memory_mib": 5000},
            {
                "name": "ours: float32, bf16 frozen teacher",
                "images_per_second": 1500.0,
                "bf16_teacher_error": {
                    "agreement": 0.99,
                    "kl": 1e-5,
                    "max_logit_diff": 0.05,
                    "logit_std": 1.0,
                },
            },
            {"name": "ours: bf16 autocast (amp)", "error": "RuntimeError: a | b"},
            {"name": "ours: float32, torch.compile", "skipped": "50 s of the budget left"},
        ],
        "job": {
            "job": {"batch_size": 128},
            "train_images": 460,
            "eval_images": 52,
            "train_images_per_second": 900.0,
            "train_peak_memory_mib": 4000,
            "train": {"steps": 3, "seconds": 3.5, "hessian_seconds": 1.5},
            "stage_seconds": {"validating": 2.0, "training": 4.5},
        },
    }


@pytest.mark.parametrize(("ours", "verdict"), [(2500.0, "met"), (1900.0, "**not met**")])
def test_rows_are_compared_with_the_paper_step(ours: float, verdict: str) -> None:
    text = section(gathered(ours))
    assert f"| ours: float32 | {ours:,.1f} | {ours / 1000:.2f}x | 5,000 | - |  |" in text
    assert f"at **{ours / 1000:.2f}x** the paper's images/s: the goal of 2x is {verdict}." in text
    assert "| ours: bf16 autocast (amp) | - | - | - | - | RuntimeError: a / b |" in text
    assert "| ours: float32, torch.compile | - | - | - | - | 50 s of the budget left |" in text
    assert "3 training steps in 3.50 s (900.0 images/s), 1.50 s of them the Hessian" in text
    assert "agreement 0.9900, KL 1e-05, largest logit difference 0.05" in text
    assert "| training | 4.50 |" in text and "| total | 6.50 |" in text


def test_step_clock_times_the_steps_after_the_warmup() -> None:
    clock = StepClock(torch.device("cpu"))
    clock.times = [0.0, 5.0, 5.5, 6.0, 7.0] + [7.0 + 0.5 * i for i in range(1, 20)]
    row = clock.row(FULL)  # 3 warm-up steps end at 6.0; the 20 timed steps take 0.5 s but one
    assert row["warmup_seconds"] == 6.0 and row["timed_steps"] == 20
    assert row["images_per_second"] == 256.0  # 128 images in the median 0.5 s
    assert "stopped" not in row
    clock.times = clock.times[:10]
    assert clock.row(FULL)["stopped"] == "budget ran out after 9 steps"


def test_each_stage_lasts_until_the_next() -> None:
    reporter = SilentReporter()
    marks = time_stages(reporter)
    for stage in ("validating", "training"):
        reporter.stage(stage)
    assert reporter.stages == ["validating", "training"] and len(marks) == 2
    assert stage_seconds(reporter.stages, [10.0, 12.5], 20.0) == {
        "validating": 2.5,
        "training": 7.5,
    }
