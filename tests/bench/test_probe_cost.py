"""bench.probe_cost: a clear refusal without the shared fixtures, and a tiny run end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

import bench.probe_cost
import bench.report


def test_missing_fixtures_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "resnet20_cifar10.onnx"
    monkeypatch.setattr(bench.probe_cost, "TEACHER_ONNX", missing)
    with pytest.raises(SystemExit, match=f"missing: {missing}"):
        bench.probe_cost.main(["--no-write"])


@pytest.mark.slow
def test_a_tiny_probe_cost_run_writes_its_section(tmp_path: Path, cifar_benchmarks: Path) -> None:
    bench.probe_cost.main(
        [
            *("--train-images", "128", "--eval-images", "20", "--threads", "1"),
            *("--cache-dir", str(tmp_path / "cache")),
        ]
    )

    section = cifar_benchmarks.read_text()
    command = "python -m bench.probe_cost --train-images 128 --eval-images 20 --threads 1"
    assert f"_Command: `{command}`" in section
    assert "| 128 | 2 | 1 | without | " in section  # 2 steps of 64: a probe after each
    assert "| 2 | 16 |" in section  # probe points and images of the run with probes
    assert "Same student with and without probes, bit for bit: yes." in section
