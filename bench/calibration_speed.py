"""Calibration speed: a 224-px ResNet-18's calibration against one training epoch of 1,000 images.

Issue 16, point 4(b): calibrating a ResNet-18 at 224 px must cost at most one training epoch of
1,000 images, with the calibrated agreement on the CIFAR-10 fixture unchanged (+-0.2 points).

- Speed: a torchvision ResNet-18 (random weights, BatchNorm statistics settled on random
  images, no download) is exported to ONNX and imported as a job imports it
  (``load_onnx_model``); ``--images`` CIFAR-10 training JPEGs, decoded at 224 px through the
  upload path, are the job's images. ``calibrated_student`` (the job's calibration, the
  ``JobConfig`` defaults: LSQ W4A4, TensorRT's grids) and then one training epoch of those images
  (batch 64, the default) run one after the other in this process and are timed side by side.
- Quality: the CIFAR-10 ResNet-20 teacher of ``../shared/fixtures`` calibrated as a job
  calibrates it (the defaults at W4A4 and at W8A8), its top-1 agreement with the teacher on the
  test images, against the calibration before this change (``core/sqakd/calibrate.py`` of
  commit ``BEFORE_COMMIT``, read from git, run with today's quantizers), each on the same
  ``SEEDS`` calibration samples: one sample's agreement moves by about 0.3 points with the
  sample alone, so the goal is read on the mean over the samples.

    python -m bench.calibration_speed    # about 12 minutes on 2 quiet cores; writes BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from unittest import mock

import torch
import torchvision
from torch import nn

from bench.cifar import cifar_zip
from bench.quality import CACHE_DIR, DATA, cifar_split, job_config, load_teacher
from bench.report import machine, table, write_section
from core import engine
from core.config import JobConfig
from core.engine import CALIBRATION_IMAGES, calibrated_student, train_config
from core.inputs.images import load_image_archive
from core.inputs.onnx_model import load_onnx_model
from core.sqakd.metrics import compare, predict
from core.sqakd.teacher import inference_teacher
from core.sqakd.trainer import train

SECTION = "calibration-speed"
SIDE = 224
IMAGES = 1000  # the epoch: 1,000 images
TEST_IMAGES = 10_000
CALIBRATION_TRAIN_IMAGES = 5000  # the fixture jobs' training images, the calibration sample's pool
TOLERANCE_POINTS = 0.2
# The calibration before this benchmark's change: every range searched over all 24 candidates
# on 64 images, each channel's moments against the teacher recomputed for every candidate.
BEFORE_COMMIT = "1ffc19b"
SEEDS = range(8)  # calibration samples (``JobConfig.seed``) that both calibrations are scored on


def resnet18_onnx(path: Path) -> Path:
    """A random-weight torchvision ResNet-18 at 224 px, its BatchNorm statistics settled on
    random images (O(1) activations, as a trained network has), exported to ONNX."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average: one batch sets the statistics
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 3, SIDE, SIDE))
    torch.onnx.export(
        model.eval(),
        torch.randn(1, 3, SIDE, SIDE),
        path,
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}},
    )
    return path


def resnet18_times(images: int) -> dict[str, float]:
    """Seconds of the job's calibration and of one training epoch of ``images`` images, wall
    and CPU (this process's, all threads: on shared cores the steadier measure of work)."""
    config = JobConfig.model_validate({"preprocessing": {"input_size": [SIDE, SIDE]}})
    with tempfile.TemporaryDirectory() as tmp:
        teacher = load_onnx_model(resnet18_onnx(Path(tmp) / "resnet18.onnx")).module
        per_class = -(-images // 10)
        archive = cifar_zip(DATA / "train", per_class, Path(tmp) / "train.zip")
        pixels = load_image_archive(archive, (SIDE, SIDE)).pixels[:images]
    torch.manual_seed(config.seed)  # as run_quantization seeds before calibrating
    wall, cpu = time.perf_counter(), time.process_time()
    student, _ = calibrated_student(teacher, pixels, config)
    times = {
        "calibration": time.perf_counter() - wall,
        "calibration_cpu": time.process_time() - cpu,
    }
    print(f"calibration: {times}", flush=True)
    frozen = inference_teacher(teacher)
    wall, cpu = time.perf_counter(), time.process_time()
    train(frozen, student, pixels, train_config(config, len(pixels)))
    return times | {"epoch": time.perf_counter() - wall, "epoch_cpu": time.process_time() - cpu}


def calibrate_before() -> Callable[..., None]:
    """``calibrate`` as commit ``BEFORE_COMMIT`` wrote it, loaded from git beside today's."""
    source = subprocess.run(
        ["git", "show", f"{BEFORE_COMMIT}:core/sqakd/calibrate.py"],
        cwd=Path(__file__).resolve().parent,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = types.ModuleType(f"calibrate_{BEFORE_COMMIT}")
    exec(compile(source, f"{BEFORE_COMMIT}:core/sqakd/calibrate.py", "exec"), module.__dict__)
    return module.calibrate


def fixture_agreements(test_images: int, before: bool = False) -> dict[int, list[float]]:
    """Calibrated-only top-1 agreement with the fixture teacher, W4A4 and W8A8 (defaults else),
    one per calibration sample of ``SEEDS``; ``before``: with ``BEFORE_COMMIT``'s calibration."""
    teacher = load_teacher()
    train_set = cifar_split("train", CALIBRATION_TRAIN_IMAGES, CACHE_DIR)
    test_set = cifar_split("test", test_images, CACHE_DIR)
    prep = job_config("lsq", 4, epochs=1).preprocessing  # the teacher's, whatever the bits
    teacher_logits = predict(inference_teacher(teacher), test_set.pixels, prep.mean, prep.std)
    calibration = calibrate_before() if before else engine.calibrate
    agreements: dict[int, list[float]] = {4: [], 8: []}
    with mock.patch.object(engine, "calibrate", calibration):
        for bits, seed in itertools.product(agreements, SEEDS):
            config = job_config("lsq", bits, epochs=1).model_copy(update={"seed": seed})
            student, _ = calibrated_student(teacher, train_set.pixels, config)
            logits = predict(student, test_set.pixels, prep.mean, prep.std)
            agreements[bits].append(float(compare(teacher_logits, logits, None)["agreement"]))
    return agreements


def _spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ({min(values):.4f} .. {max(values):.4f})"


def section(
    times: dict[str, float],
    agreements: dict[int, list[float]],
    befores: dict[int, list[float]],
    args: argparse.Namespace,
) -> str:
    ratio = times["calibration"] / times["epoch"]
    cpu_ratio = times["calibration_cpu"] / times["epoch_cpu"]
    speed = table(
        ["", "wall seconds", "CPU seconds"],
        [
            [
                f"calibration ({CALIBRATION_IMAGES} images)",
                f"{times['calibration']:.1f}",
                f"{times['calibration_cpu']:.1f}",
            ],
            [
                f"one training epoch ({args.images:,} images, batch 64)",
                f"{times['epoch']:.1f}",
                f"{times['epoch_cpu']:.1f}",
            ],
            ["calibration / epoch", f"{ratio:.2f}", f"{cpu_ratio:.2f}"],
        ],
    )
    rows = []
    for bits, after in agreements.items():
        before = befores[bits]
        change = 100 * (statistics.mean(after) - statistics.mean(before))
        paired = [100 * (a - b) for a, b in zip(after, before, strict=True)]
        rows.append(
            [
                f"LSQ W{bits}A{bits}",
                _spread(before),
                _spread(after),
                f"{change:+.2f}",
                f"{min(paired):+.2f} .. {max(paired):+.2f}",
                "yes" if abs(change) <= TOLERANCE_POINTS else "no",
            ]
        )
    quality = table(
        [
            "student",
            "before: mean (min .. max)",
            "after: mean (min .. max)",
            "change of the mean (points)",
            "change per sample (points)",
            f"within +-{TOLERANCE_POINTS}",
        ],
        rows,
    )
    verdict = "meets" if ratio <= 1 else "misses"
    return (
        f"A torchvision ResNet-18 at {SIDE} px (random weights, imported from ONNX as a job "
        f"imports it), the `JobConfig` defaults (LSQ W4A4, TensorRT's grids), "
        f"{args.images:,} CIFAR-10 training images decoded at {SIDE} px: the job's calibration "
        f"and then one training epoch, timed in one process with {args.threads} torch "
        f"threads (load average {os.getloadavg()[0]:.1f} at the end). Goal (issue 16, 4(b)): "
        f"calibration at most one epoch of 1,000 images: **{verdict}** "
        f"({ratio:.2f}x).\n\n{speed}\n\n"
        f"Calibrated-only top-1 agreement of the CIFAR-10 ResNet-20 fixture's students with "
        f"their teacher on {args.test_images:,} test images (calibration sample from "
        f"{CALIBRATION_TRAIN_IMAGES:,} training images, `JobConfig` defaults but the bits), "
        f"before (`core/sqakd/calibrate.py` of commit {BEFORE_COMMIT}, with today's quantizers) "
        f"and after, each over the same {len(SEEDS)} calibration samples (seeds "
        f"{SEEDS.start}..{SEEDS.stop - 1}); goal: the mean within +-{TOLERANCE_POINTS} points. "
        f"One sample's agreement moves by up to "
        f"{100 * max(max(v) - min(v) for v in befores.values()):.2f} points with the sample "
        f"alone, so a single sample cannot tell a change of 0.2 points.\n\n{quality}\n"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=IMAGES, help="training epoch's images")
    parser.add_argument("--test-images", type=int, default=TEST_IMAGES)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (a worker's)")
    parser.add_argument("--skip-speed", action="store_true", help="the agreements only")
    parser.add_argument("--no-write", action="store_true", help="print; leave BENCHMARKS.md")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    agreements = fixture_agreements(args.test_images)
    print("calibrated agreement:", agreements, flush=True)
    befores = fixture_agreements(args.test_images, before=True)
    print(f"calibrated agreement before ({BEFORE_COMMIT}):", befores, flush=True)
    if args.skip_speed:
        return
    times = resnet18_times(args.images)
    print(times, flush=True)
    body = section(times, agreements, befores, args)
    print(body)
    if not args.no_write:
        command = "python -m bench.calibration_speed"
        if argv:
            command += " " + " ".join(argv)
        write_section(SECTION, body, command=command, machine_text=machine())


if __name__ == "__main__":
    main()
