"""Data scale: a job's peak memory and speed at 2,000 and at 20,000 images of 224 px, and the
decode throughput per core.

Jobs: the same small CNN teacher (``ScaleNet``: three strided convolutions, 224 px input,
exported to ONNX as a user would upload it), trained by the real pipeline
(``core.pipeline.run_quantization``: decode into the dataset store, calibration, ``--steps``
training steps, evaluation, ONNX export and parity) on ``--images`` generated 224 px JPEGs, one
fresh subprocess per job so that each peak RSS is its own, with the same evaluation archive
(``--eval-images``) for both. Reported per job: the job process's peak RSS (``ru_maxrss``),
``metrics.train.images_per_second``, and the store's decode time.
Goal (issue 16): peak RSS and images/s of the larger job within 10% of the smaller one's.
Compare jobs of at least 256 training images: calibration fits on min(images, 256)
(``core.engine.CALIBRATION_IMAGES``), and its activations at 224 px are a large part of the peak.

Decode throughput: images per second of one process (``core.inputs.decode.decode_image``, CPU
time), with and without JPEG draft mode, for 224 px from 500x375 and 1024x768 JPEGs, and for
the CIFAR-10 32 px JPEGs of ``../shared/data/cifar10`` at 32 px.

The model is deliberately tiny, so that the data path (store reads, augmentation,
normalisation) is a large share of each step: where it is slow, images/s shows it.

    python -m bench.data_scale                           # ~15 minutes on 2 quiet cores
    python -m bench.data_scale --images 200 2000 --steps 10 --no-write   # a quick check
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from bench.cifar import SHARED
from bench.report import publish, table

SECTION = "data-scale"
SIZE = 224
GOAL = 0.10  # relative difference of peak RSS and of images/s


class ScaleNet(nn.Module):
    """A small CNN at 224 px: 16, 32, 64 channels, each convolution with stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def export_teacher(path: Path) -> Path:
    torch.manual_seed(0)
    torch.onnx.export(
        ScaleNet().eval(),
        (torch.randn(2, 3, SIZE, SIZE),),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim.DYNAMIC}},
        external_data=False,
    )
    return path


def photo_like(seed: int, width: int, height: int) -> np.ndarray:
    """RGB pixels with smooth shapes and some texture: compress like a photo (tens of KB)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32)
    for _ in range(4):
        cx, cy, radius = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, width)
        colour = rng.uniform(0, 255, 3)
        weight = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * radius**2))[..., None]
        image = image * (1 - weight) + colour * weight
    image += rng.normal(0, 12, image.shape)
    return image.clip(0, 255).astype(np.uint8)


def jpegs(count: int, width: int, height: int, seed: int = 0) -> Iterator[bytes]:
    """``count`` distinct photo-like JPEGs: 32 base images, each shifted by its own offset (a
    base image per file would take longer to make than the job takes to run)."""
    bases = [photo_like(seed + i, width, height) for i in range(min(count, 32))]
    for i in range(count):
        shifted = np.roll(bases[i % len(bases)], shift=(i // len(bases)) % width, axis=1)
        buffer = io.BytesIO()
        Image.fromarray(shifted).save(buffer, "JPEG", quality=90)
        yield buffer.getvalue()


def jpeg_zip(path: Path, count: int, width: int, height: int, seed: int = 0) -> Path:
    """``count`` photo-like JPEGs in 10 class folders, zipped (stored), made once."""
    if path.exists():
        return path
    partial = path.with_suffix(".partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as archive:
        for i, data in enumerate(jpegs(count, width, height, seed)):
            archive.writestr(f"{i % 10}/{i:07d}.jpg", data)
    partial.rename(path)
    return path


# --- one job, in its own process -------------------------------------------------------------


def run_job(teacher: Path, data: Path, eval_data: Path, steps: int, workdir: Path) -> dict:
    """In the child: one job through the pipeline; its figures as a dict."""
    from core.config import JobConfig
    from core.pipeline import JobInputs, SilentReporter, run_quantization

    config = JobConfig.model_validate(
        {
            "weight_bits": 4,
            "activation_bits": 4,
            "method": "lsq",
            "steps": steps,
            "batch_size": 64,
            "preprocessing": {"input_size": [SIZE, SIZE]},
            "export": {"speed": False},
        }
    )
    started = time.perf_counter()
    result = run_quantization(
        JobInputs(teacher, data, eval_data), config, workdir, SilentReporter()
    )
    return {
        "seconds": time.perf_counter() - started,
        "images_per_second": result.metrics["train"]["images_per_second"],
        "train_images": result.metrics["train_images"],
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def job_in_subprocess(teacher: Path, data: Path, eval_data: Path, steps: int, root: Path) -> dict:
    """``run_job`` in a fresh interpreter with a fresh data dir (so the store is decoded), and
    the store's decode time from its log line."""
    data_dir = Path(tempfile.mkdtemp(dir=root, prefix="job-"))
    job = json.dumps([str(teacher), str(data), str(eval_data), steps, str(data_dir)])
    command = [sys.executable, "-m", "bench.data_scale", "--job", job]
    env = {**os.environ, "SQAKD_DATA_DIR": str(data_dir)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"job on {data.name} failed:\n{done.stderr[-4000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    decodes = [line for line in done.stderr.splitlines() if "decoded " in line]
    figures["decode_log"] = decodes
    return figures


# --- decode throughput ----------------------------------------------------------------------


def decode_rate(files: list[bytes], size: tuple[int, int], draft: bool) -> float:
    """Images per CPU second of one process decoding ``files`` at ``size`` = (W, H)."""
    from core.inputs.decode import decode_image

    decode_image(files[0], size, draft=draft)  # warm up
    started = time.process_time()
    for data in files:
        decode_image(data, size, draft=draft)
    return len(files) / (time.process_time() - started)


def decode_rows(count: int) -> list[list[Any]]:
    rows = []
    for width, height in ((500, 375), (1024, 768)):
        files = list(jpegs(count, width, height))
        kib = sum(map(len, files)) / len(files) / 1024
        for draft in (False, True):
            rate = decode_rate(files, (SIZE, SIZE), draft)
            source = f"{width}x{height} JPEG ({kib:.0f} KiB)"
            rows.append([source, f"{SIZE}x{SIZE}", "yes" if draft else "no", f"{rate:.0f}"])
    cifar = sorted((SHARED / "data" / "cifar10" / "train").glob("*/*.jpg"))[: count * 4]
    if cifar:
        files = [path.read_bytes() for path in cifar]
        kib = sum(map(len, files)) / len(files) / 1024
        rate = decode_rate(files, (32, 32), True)
        rows.append([f"CIFAR-10 32x32 JPEG ({kib:.1f} KiB)", "32x32", "n/a", f"{rate:.0f}"])
    return rows


# --- the report ------------------------------------------------------------------------------


def mib(value: float) -> str:
    return f"{value / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs=2, default=[2000, 20_000])
    parser.add_argument("--eval-images", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--decode-images", type=int, default=200)
    parser.add_argument(
        "--rounds", type=int, default=2, help="jobs per size, the sizes taking turns"
    )
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "data-scale")
    parser.add_argument("--no-write", action="store_true", help="print, leave BENCHMARKS.md")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # the child's half
    args = parser.parse_args()
    if args.job:
        import logging

        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        teacher, data, eval_data, steps, workdir = json.loads(args.job)
        figures = run_job(Path(teacher), Path(data), Path(eval_data), steps, Path(workdir))
        print(json.dumps(figures))
        return

    root = args.work_dir
    root.mkdir(parents=True, exist_ok=True)
    teacher = export_teacher(root / "scalenet.onnx")
    eval_data = jpeg_zip(root / f"eval-{args.eval_images}.zip", args.eval_images, 500, 375, 10**8)
    archives = {
        count: jpeg_zip(root / f"train-{count}.zip", count, 500, 375) for count in args.images
    }
    jobs = []
    for _ in range(args.rounds):  # this machine's speed drifts: the sizes take turns
        for count, data in archives.items():
            print(f"job on {count} images ...", flush=True)
            jobs.append((count, job_in_subprocess(teacher, data, eval_data, args.steps, root)))
            print(json.dumps(jobs[-1][1]), flush=True)
    decode = decode_rows(args.decode_images)

    small, large = args.images
    median = {
        (count, figure): statistics.median(job[figure] for size, job in jobs if size == count)
        for count in args.images
        for figure in ("peak_rss", "images_per_second")
    }
    rss_change = median[large, "peak_rss"] / median[small, "peak_rss"] - 1
    speed_change = median[large, "images_per_second"] / median[small, "images_per_second"] - 1
    met = abs(rss_change) <= GOAL and abs(speed_change) <= GOAL
    body = "\n\n".join(
        [
            "A small CNN at 224 px (`bench.data_scale.ScaleNet`), LSQ W4A4, batch 64, "
            f"{args.steps} training steps, through `core.pipeline.run_quantization` in a fresh "
            f"process per job, on generated 500x375 JPEGs resized to 224x224, with the same "
            f"{args.eval_images} evaluation images; {args.rounds} job(s) per size, the sizes "
            "taking turns, compared by their medians. Peak RSS: the job process (`ru_maxrss`); "
            "the decode workers are separate processes (each holds a chunk of files, 4 MiB "
            "at most, and one decoded image).",
            table(
                [
                    "images",
                    "store",
                    "job peak RSS (MiB)",
                    "train images/s",
                    "job seconds",
                    "decode",
                ],
                [
                    [
                        f"{count:,}",
                        f"{mib(count * 3 * SIZE * SIZE)} MiB",
                        mib(job["peak_rss"]),
                        f"{job['images_per_second']:.1f}",
                        f"{job['seconds']:.0f}",
                        "; ".join(
                            line.split("decoded ", 1)[1].split(" into ")[0]
                            for line in job["decode_log"]
                        ),
                    ]
                    for count, job in jobs
                ],
            ),  # fmt: skip
            f"{large:,} against {small:,} images (medians): peak RSS {rss_change:+.1%}, images/s "
            f"{speed_change:+.1%} (goal: both within ±{GOAL:.0%}): "
            f"**{'met' if met else 'missed'}**.",
            "Decode throughput, one process (images per CPU second, `core.inputs.decode."
            "decode_image`); draft mode applies where the JPEG is at least twice the target "
            "size both ways (500x375 is not: 375 < 448):",
            table(["source", "to", "draft mode", "images/s/core"], decode),
        ]
    )
    publish(SECTION, body, module="bench.data_scale", write=not args.no_write)


if __name__ == "__main__":
    main()
