"""Fixtures of the benchmark tests: the shared CIFAR-10 files, and a BENCHMARKS.md of their own."""

from __future__ import annotations

from pathlib import Path

import pytest

import bench.report
from tests.fixtures_paths import shared_path


@pytest.fixture
def cifar_benchmarks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A BENCHMARKS.md in ``tmp_path`` that bench scripts write instead of the repository's,
    once the CIFAR-10 teacher and images they read are known to be there (fails in CI if not)."""
    shared_path("fixtures", "resnet20_cifar10.onnx")
    shared_path("data", "cifar10", "train")
    shared_path("data", "cifar10", "test")
    benchmarks = tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(bench.report, "BENCHMARKS", benchmarks)
    return benchmarks
