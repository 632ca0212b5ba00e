"""A real job's training speed against the paper's training step, on this machine's CPU.

Issue 16, point 4(a): ``metrics.train.images_per_second`` of a job submitted over HTTP, EWGS
W4A4 on the CIFAR-10 ResNet-20 fixture at batch 256, at least 1.5x the paper's training step
(a checkout of github.com/kaiqi123/SQAKD, imported as ``bench.speed_vs_paper`` does), measured
side by side in one run:

1. the paper's step (with its data pipeline, and without) and ours (the TensorRT-compatible
   fixture, the student a job trains) from ``bench.speed_vs_paper``, one step of each in turn;
2. the real service (``scripts.serve``, on a fresh data directory and port), the fixture's ONNX
   teacher and ``--images`` CIFAR-10 training JPEGs (zipped in a temp dir) uploaded with the SDK,
   the job submitted (the inference speed test off), waited for;
3. the steps of 1. again: the load of the shared cores before and after the job.

    python -m bench.job_speed --sqakd-checkout /work/SQAKD    # writes BENCHMARKS.md

The section adds the job's per-phase profile: its stage seconds, and what its training loop spent
around the steps (``TrainStats``: Hessian estimates, probes, checkpoints, progress writes).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from sqakd_client import Client

from bench.cifar import SHARED, TEACHER_ONNX, cifar_zip, teacher_preprocessing
from bench.report import cpu_kind, machine, table, write_section
from bench.speed_vs_paper import (
    OURS_TENSORRT,
    PAPER_DATA,
    PAPER_MODEL,
    PHASES,
    THREADS,
    WARMUP,
    Impl,
    PhaseClock,
    build,
)
from core.config import JobConfig
from scripts.demo import running_service

BATCH = 256
JOB_TIMEOUT_S = 3 * 3600
ROWS = (PAPER_DATA, PAPER_MODEL, OURS_TENSORRT)
GOAL = 1.5


def job_config(epochs: int) -> dict[str, Any]:
    """The issue's job: EWGS W4A4 at batch 256, otherwise the defaults (Hessian deltas every
    epoch, probes, checkpoints, the TensorRT-compatible student), without the speed test."""
    return {
        "method": "ewgs",
        "weight_bits": 4,
        "activation_bits": 4,
        "batch_size": BATCH,
        "epochs": epochs,
        "preprocessing": teacher_preprocessing(),
        "export": {"speed": False},
    }


def step_rounds(
    impls: dict[str, Impl], clock: PhaseClock, rounds: int, into: dict[str, list[Any]]
) -> None:
    """``rounds`` steps of every row in turn: (images/s, phase ms) each, appended to ``into``."""
    for round_ in range(rounds):
        for name, impl in impls.items():
            into.setdefault(name, []).append(clock.step(impl))
        print(f"round {round_ + 1}", {name: round(into[name][-1][0], 1) for name in impls})


def run_job(data: Path, epochs: int, workdir: Path) -> dict[str, Any]:
    """The job through the real service; its metrics, stage seconds and wall seconds."""
    with running_service(workdir / "service", workdir / "service.log") as service:
        service.wait_ready()
        with Client(url=service.url) as client:
            started = time.monotonic()
            job = client.jobs.create(model=TEACHER_ONNX, data=data, config=job_config(epochs))
            print(f"job {job.id} submitted")
            job.wait(timeout=JOB_TIMEOUT_S)
            if job.status != "succeeded":
                raise RuntimeError(f"job {job.status}: {job.error}; see {service.log}")
            return {
                "metrics": job.metrics,
                "stage_seconds": job.stage_seconds,
                "wall_seconds": time.monotonic() - started,
            }


def report(steps: dict[str, list[Any]], job: dict[str, Any], images: int, epochs: int) -> str:
    train = job["metrics"]["train"]
    speed = {name: [s for s, _ in runs] for name, runs in steps.items()}
    median = {name: statistics.median(values) for name, values in speed.items()}
    job_speed = train["images_per_second"]
    around = {
        "EWGS Hessian estimates": train["hessian_seconds"],
        "probes (training curve)": train["probe_seconds"],
        "checkpoints": train["checkpoint_seconds"],
        "progress and curve writes (on_step, on_metrics)": train["report_seconds"],
    }
    steps_seconds = train["seconds"] - sum(around.values())
    images_trained = job_speed * train["seconds"]
    loop_rows = [
        ["training steps", f"{steps_seconds:.1f}", f"{steps_seconds / train['seconds']:.1%}"]
    ]
    loop_rows += [[part, f"{s:.2f}", f"{s / train['seconds']:.1%}"] for part, s in around.items()]
    stage_rows = [[stage, f"{s:.1f}"] for stage, s in job["stage_seconds"].items()]
    ours = OURS_TENSORRT
    phase_ms = [
        [phase, *(f"{statistics.median(p[phase] for _, p in steps[name]):.0f}" for name in ROWS)]
        for phase in PHASES
    ]
    rows = [
        ["job: metrics.train.images_per_second", f"{job_speed:.1f}",
         f"{job_speed / median[PAPER_DATA]:.2f}x", f"{job_speed / median[PAPER_MODEL]:.2f}x"],
        ["job: its training steps alone", f"{images_trained / steps_seconds:.1f}",
         f"{images_trained / steps_seconds / median[PAPER_DATA]:.2f}x",
         f"{images_trained / steps_seconds / median[PAPER_MODEL]:.2f}x"],
    ]  # fmt: skip
    rows += [
        [f"step: {name}", f"{median[name]:.1f}", f"{median[name] / median[PAPER_DATA]:.2f}x",
         f"{median[name] / median[PAPER_MODEL]:.2f}x"]
        for name in ROWS
    ]  # fmt: skip
    ratio = job_speed / median[PAPER_DATA]
    met = "met" if ratio >= GOAL else "**not met**"
    every = JobConfig().ewgs_delta_every
    return f"""\
A real job against the paper's training step: EWGS W4A4, the CIFAR-10 ResNet-20 fixture
(`{TEACHER_ONNX.relative_to(SHARED.parent)}`), batch {BATCH}, on {images:,} CIFAR-10 training
JPEGs ({train["steps"]} steps, {epochs} epoch(s) of the 90% not held out), submitted over HTTP
to the real service (`scripts.serve`: Celery worker process, SQLite, bundled Redis) with the SDK;
the job's defaults otherwise (Hessian deltas at the start and every {every} epochs, probes,
checkpoints, the
TensorRT-compatible student), its inference speed test off. In the same run, before and after
the job, the steps of `bench.speed_vs_paper` (its rows, {THREADS} torch threads, one step of
each in turn, {len(speed[PAPER_DATA])} rounds after {WARMUP} warm-up steps; images/s the median
step). The job's images/s is `metrics.train.images_per_second`: every image it trained on over
the whole training loop, its first steps and everything around its steps included.

{table(["what", "images/s", "vs paper step + data", "vs paper model step"], rows)}

**The job trains at {ratio:.2f}x the paper's step** (with its data pipeline): the goal of
{GOAL}x is {met}. Job wall time {job["wall_seconds"]:.0f} s from submission to result.

The job's training loop ({train["seconds"]:.1f} s, from `metrics.train`):

{table(["part", "seconds", "share"], loop_rows)}

The job's stages (`stage_seconds`):

{table(["stage", "seconds"], stage_rows)}

Median ms per step by phase in the bench's steps (`bench.speed_vs_paper`'s hooks; *ours* is
the student the job trains, its "other" the data: index, crop and flip, normalise):

{table(["phase", *ROWS], phase_ms)}

The figures come from shared cores unless the machine line says otherwise: rerun on quiet ones
before quoting them. Row *{ours}* is our step alone; the difference between it and the job's
steps is what the worker process itself costs (its threads, priority and neighbours)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sqakd-checkout", type=Path, required=True)
    parser.add_argument("--images", type=int, default=10_000, help="CIFAR-10 training JPEGs")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6, help="step rounds before and after")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory(prefix="job-speed-") as tmp:
        workdir = Path(tmp)
        data = cifar_zip(
            SHARED / "data" / "cifar10" / "train", args.images // 10, workdir / "train.zip"
        )
        impls = {name: build(args.sqakd_checkout, workdir, name)[name] for name in ROWS}
        clock = PhaseClock()
        for impl in impls.values():
            impl.run(WARMUP)
            clock.watch(impl)
        steps: dict[str, list[Any]] = {}
        step_rounds(impls, clock, args.rounds, steps)
        job = run_job(data, args.epochs, workdir)
        print("job:", {k: v for k, v in job["metrics"]["train"].items() if k != "ewgs_deltas"})
        step_rounds(impls, clock, args.rounds, steps)
    command = f"python -m bench.job_speed --sqakd-checkout {args.sqakd_checkout}"
    if (args.images, args.epochs, args.rounds) != (10_000, 3, 6):
        command += f" --images {args.images} --epochs {args.epochs} --rounds {args.rounds}"
    write_section(
        f"job-speed-{cpu_kind()}",
        report(steps, job, args.images, args.epochs),
        command=command,
        machine_text=machine(),
    )


if __name__ == "__main__":
    main()
