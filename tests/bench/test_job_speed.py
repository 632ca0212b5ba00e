"""bench.job_speed's section: the job's ratio to the paper's step and its verdict, its loop's
parts, from the figures a run gathers (the run itself needs the paper's checkout and minutes)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.job_speed import ROWS, report
from bench.speed_vs_paper import OURS_TENSORRT, PAPER_DATA, PAPER_MODEL, PHASES


def gathered(job_images_per_second: float) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    speeds = {
        PAPER_DATA: [100.0, 110.0, 90.0],
        PAPER_MODEL: [120.0] * 3,
        OURS_TENSORRT: [170.0] * 3,
    }
    steps = {name: [(s, dict.fromkeys(PHASES, 10.0)) for s in speeds[name]] for name in ROWS}
    train = {
        "steps": 70,
        "seconds": 100.0,
        "images_per_second": job_images_per_second,
        "hessian_seconds": 6.0,
        "probe_seconds": 2.0,
        "checkpoint_seconds": 0.5,
        "report_seconds": 1.5,
    }
    job = {
        "metrics": {"train": train},
        "stage_seconds": {"validating": 3.0, "training": 101.0},
        "wall_seconds": 120.0,
    }
    return steps, job


@pytest.mark.parametrize(("job_speed", "verdict"), [(160.0, "met"), (140.0, "**not met**")])
def test_the_job_is_compared_with_the_median_paper_step(job_speed: float, verdict: str) -> None:
    steps, job = gathered(job_speed)
    text = report(steps, job, images=20_000, epochs=1)
    ratio = job_speed / 100.0  # the median of the paper's step with its data
    assert f"**The job trains at {ratio:.2f}x the paper's step**" in text
    assert f"the goal of\n1.5x is {verdict}." in text
    # its steps alone: the images of 100 s at the job's speed in the 90 s left by the other parts
    assert f"| job: its training steps alone | {job_speed * 100 / 90:.1f} |" in text
    assert "| training steps | 90.0 | 90.0% |" in text
    assert "| EWGS Hessian estimates | 6.00 | 6.0% |" in text
