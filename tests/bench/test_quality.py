"""bench.quality end to end on a few hundred CIFAR-10 images: every run stored, then resumed.

One row (LSQ W4A4) and two seeds, two training steps per run on 128 images, scored on 100 test
images: the results file must hold the teacher and, per seed, the calibrated student, SQAKD and
the baseline; the BENCHMARKS.md section must show their means as partial, and a second
invocation must train nothing (unless the budget changed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench.quality
import bench.report


@pytest.mark.slow
def test_quality_benchmark_stores_every_run_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cifar_benchmarks: Path
) -> None:
    results = tmp_path / "quality.json"
    args = [
        *("--epochs", "1", "--train-images", "128", "--test-images", "100"),
        *("--rows", "lsq:4", "--seeds", "0,1", "--results", str(results)),
        *("--cache-dir", str(tmp_path / "cache"), "--threads", "1"),
    ]

    bench.quality.main(args)

    runs = json.loads(results.read_text())["runs"]
    modes = sorted(run["settings"]["mode"] for run in runs)
    assert modes == ["calibrated"] * 2 + ["ce"] * 2 + ["sqakd"] * 2 + ["teacher"]
    trained = [run for run in runs if run["settings"]["mode"] in ("sqakd", "ce")]
    assert sorted(run["settings"]["config"]["seed"] for run in trained) == [0, 0, 1, 1]
    for run in runs:
        assert 0.0 <= run["top1"] <= 1.0
        assert run["settings"]["test_images"] == 100
        if run["settings"]["mode"] in ("sqakd", "ce"):
            assert run["settings"]["config"]["method"] == "lsq"
            assert run["steps"] == 2  # 128 images, batch 64, one epoch
            assert run["settings"]["train_images"] == 128
    by_mode = {run["settings"]["mode"]: run for run in runs}
    assert by_mode["sqakd"]["final_loss"] != by_mode["ce"]["final_loss"]  # KL vs cross-entropy
    section = cifar_benchmarks.read_text()
    assert "**Partial: 4 of 28 runs finished" in section
    top1 = {
        mode: [100 * run["top1"] for run in runs if run["settings"]["mode"] == mode]
        for mode in ("sqakd", "ce")
    }
    mean_difference = (sum(top1["sqakd"]) - sum(top1["ce"])) / 2
    assert f"| {mean_difference:+.2f} |" in section  # the row's SQAKD - CE: a mean over seeds
    assert "| lsq | W4A4 |" in section and "| ste | W4A4 | - |" in section
    assert "W4A4 within 1.5 points of the teacher: " in section

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a stored run was trained again")

    monkeypatch.setattr(bench.quality, "train", no_training)
    cifar_benchmarks.write_text("untouched")
    bench.quality.main([*args, "--no-write"])
    assert json.loads(results.read_text())["runs"] == runs
    assert cifar_benchmarks.read_text() == "untouched"
    with pytest.raises(AssertionError, match="trained again"):  # another budget: not reused
        bench.quality.main([*args, "--no-write", "--epochs", "2"])
