"""A job on 1 and on N training processes (DistributedDataParallel): speed and the same curve.

EWGS W4A4 on the CIFAR-10 ResNet-20 fixture, run through the job pipeline (``run_quantization``)
as a worker runs it, once per process count, with the same global batch: ``metrics.train``'s
images/s, the training stage's seconds, and the largest relative difference of each run's
training curve (loss points) from the 1-process run's. On a CUDA worker the processes are the
GPUs (NCCL); on a CPU worker they are gloo processes that share its cores, so the CPU rows show
the overhead of the processes, not a speed-up.

    python -m bench.ddp --processes 1 2            # a CPU worker: 2 gloo processes
    python -m bench.ddp --processes 1 2 4 8        # an 8-GPU worker

Writes section ``ddp-<cpu|cuda>`` of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.cifar import SHARED, TEACHER_ONNX, cifar_zip, teacher_preprocessing
from bench.report import machine, table, write_section
from core.config import JobConfig
from core.pipeline import JobInputs, SilentReporter, run_quantization
from core.settings import get_settings

CIFAR_TRAIN = SHARED / "data" / "cifar10" / "train"
POINT_TOLERANCE = 1e-4  # relative, as tests/core/sqakd/test_distributed.py's LOSS_RTOL


class StageClock(SilentReporter):
    """Records the curve like ``SilentReporter``, and each stage's start."""

    def __init__(self) -> None:
        super().__init__()
        self.started: dict[str, float] = {}

    def stage(self, stage: str) -> None:
        super().stage(stage)
        self.started[stage] = time.perf_counter()


def run_job(data: Path, processes: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    os.environ["TRAIN_DEVICES"] = str(processes)  # the worker allows this many
    get_settings.cache_clear()
    config = JobConfig.model_validate(
        {
            "method": "ewgs",
            "weight_bits": 4,
            "activation_bits": 4,
            "batch_size": args.batch,
            "steps": args.steps,
            "devices": processes,
            "preprocessing": teacher_preprocessing(),
            "export": {"onnx": False},
        }
    )
    reporter = StageClock()
    result = run_quantization(JobInputs(TEACHER_ONNX, data), config, work, reporter)
    train = result.metrics["train"]
    return {
        "processes": train["processes"],
        "images_per_second": train["images_per_second"],
        "training_seconds": reporter.started["evaluating"] - reporter.started["training"],
        "losses": [point["loss"] for point in reporter.points],
        "agreement": result.metrics["agreement"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--per-class", type=int, default=200, help="training JPEGs per class")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if args.processes[0] != 1:
        parser.error("the first run is the 1-process reference: --processes 1 ...")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        data = cifar_zip(CIFAR_TRAIN, args.per_class, Path(folder) / "train.zip")
        runs = [
            run_job(data, count, args, Path(folder) / f"job-{count}") for count in args.processes
        ]
    reference = runs[0]
    for run in runs:
        differences = [
            abs(a - b) / abs(b) for a, b in zip(run["losses"], reference["losses"], strict=True)
        ]
        difference = max(differences)
        within = next(
            (i for i, d in enumerate(differences) if d > POINT_TOLERANCE), len(differences)
        )
        rows.append(
            [
                run["processes"],
                f"{run['images_per_second']:.3g}",
                f"{run['images_per_second'] / reference['images_per_second']:.2f}x",
                f"{run['training_seconds']:.1f}",
                f"{difference:.1e}",
                f"{within} of {len(differences)}",
                f"{run['agreement']:.4f}",
            ]
        )
        print(rows[-1], flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    body = (
        f"EWGS W4A4 ResNet-20 job, {args.per_class * 10} CIFAR-10 training images (10% held "
        f"out), global batch {args.batch}, {args.steps} steps, the same seed; one job per row "
        "through `run_quantization`. *curve difference*: the largest relative difference of a "
        "loss point from the 1-process job's. On a CPU the processes share its cores (threads "
        "split among them). The curves agree to float rounding until a rounding difference "
        "moves one weight or activation across a quantization level; from there on a 4-bit "
        "student's curve wanders off as any other run's would, and the students end as good "
        "(*agreement*: top-1 agreement with the teacher on the held-out images). The exact "
        "match over whole runs is tested on a tiny CNN (`tests/core/sqakd/test_distributed.py`)."
        "\n\n"
        + table(
            [
                "processes",
                "train images/s",
                "vs 1 process",
                "training stage s",
                "curve difference",
                f"first points within {POINT_TOLERANCE:g}",
                "agreement",
            ],
            rows,
        )
    )
    command = "python -m bench.ddp " + " ".join(sys.argv[1:])
    write_section(f"ddp-{device}", body, command=command, machine_text=_machine())


def _machine() -> str:
    if not torch.cuda.is_available():
        return machine()
    name = torch.cuda.get_device_name()
    return f"{torch.cuda.device_count()} x {name}, {os.cpu_count()} CPUs"


if __name__ == "__main__":
    main()
