"""CUDA check of the SQAKD engine: the quantizers on CUDA against the CPU, training speed in
float32 and bf16 autocast, eager and ``torch.compile``, a job end to end, and TensorRT's presence.

Run on a machine with an NVIDIA GPU (not part of the test suite, which runs on CPU):

    python bench/cuda_check.py --out cuda_check.json

Training rows: a torchvision ResNet-18 (LSQ W4A4) and the paper's CIFAR ResNet-20 (EWGS W4A4,
BatchNorm), random weights (speed does not depend on them), batch 256 at 32x32, channels_last,
the teacher from ``inference_teacher``; EWGS's delta is fixed so that rows time steps alone.
Then ``core.pipeline.run_quantization`` on a small generated image archive, and with
``--fixture`` W8A8 and W4A4 jobs on the CIFAR-10 teacher (made here by ``--write-fixture DIR``:
the device machine has no ``../shared``).
"""

from __future__ import annotations

import argparse
import ctypes.util
import io
import itertools
import json
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image

from bench.speed_vs_paper import ResNet20
from core.sqakd.calibrate import calibrate
from core.sqakd.modules import QuantSpec, prepare
from core.sqakd.quantizers import QUANTIZERS, create_quantizer
from core.sqakd.teacher import inference_teacher
from core.sqakd.trainer import TrainConfig, train

BATCH = 256
PAPER_MODEL = "CIFAR ResNet-20 (BN)"
MODELS = {  # name: (model, method)
    "torchvision ResNet-18": (lambda: torchvision.models.resnet18(num_classes=10), "lsq"),
    PAPER_MODEL: (ResNet20, "ewgs"),
}


def teacher_model(name: str, device: torch.device) -> torch.nn.Module:
    model = MODELS[name][0]()
    model.train()
    with torch.no_grad():  # BatchNorm statistics from data, so logits are not degenerate
        for _ in range(4):
            model(torch.randn(64, 3, 32, 32))
    return model.eval().to(device)


def quantizer_parity(device: torch.device) -> list[dict[str, Any]]:
    """Each method's activation and weight quantizer, forward and all gradients, on CUDA (tensor
    operands) against the CPU (float operands) on the same inputs."""
    rows = []
    for method in sorted(QUANTIZERS):
        for weight in (False, True):
            x = torch.randn(64, 16, 8, 8) * 2
            cpu = create_quantizer(method, 4, weight=weight, channels=64 if weight else None)
            cpu.calibrate(x, signed=weight)
            if method == "ewgs":
                cpu.delta.fill_(0.2)  # the EWGS term on: its default 0 is a straight-through
            gpu = create_quantizer(method, 4, weight=weight, channels=64 if weight else None)
            gpu.load_state_dict(cpu.state_dict())
            gpu.signed = cpu.signed
            gpu.to(device)
            outputs, grads = [], []
            for quantizer, inputs in ((cpu, x.clone()), (gpu, x.to(device))):
                inputs.requires_grad_(True)
                out = quantizer(inputs)
                out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).to(out.device))
                outputs.append(out.detach().cpu())
                grads.append([inputs.grad.cpu()] + [p.grad.cpu() for p in quantizer.parameters()])
            rows.append(
                {
                    "method": method,
                    "tensor": "weights" if weight else "activations",
                    "max_output_diff": (outputs[0] - outputs[1]).abs().max().item(),
                    "max_grad_diff": max(
                        (a - b).abs().max().item() for a, b in zip(*grads, strict=True)
                    ),
                }
            )
    return rows


def training_speed(
    name: str, amp: bool, compiled: bool, steps: int, device: torch.device
) -> dict[str, Any]:
    teacher = teacher_model(name, device)
    method = MODELS[name][1]
    pixels = torch.randint(0, 256, (BATCH * 4, 3, 32, 32), dtype=torch.uint8, device=device)
    spec = QuantSpec(method=method, weight_bits=4, activation_bits=4)
    student = prepare(teacher, spec).to(memory_format=torch.channels_last)
    calibrate(student, teacher, pixels[:256].float() / 255)
    frozen = inference_teacher(teacher)
    config = TrainConfig(
        steps=steps, batch_size=BATCH, amp=amp, compile_model=compiled, ewgs_delta=0.2
    )
    started = time.perf_counter()
    train(frozen, student, pixels, replace(config, steps=3))  # warm-up (and compilation)
    if device.type == "cuda":
        torch.cuda.synchronize()
    warmup = time.perf_counter() - started
    stats = train(frozen, student, pixels, config)
    return {
        "model": f"{name}, {method} W4A4",
        "precision": "bf16 autocast" if amp else "float32",
        "compiled": compiled,
        "batch": BATCH,
        "steps": steps,
        "warmup_seconds": round(warmup, 1),
        "images_per_second": round(stats.images_per_second, 1),
        "peak_memory_mib": round((stats.peak_memory_bytes or 0) / 2**20, 1),
    }


def image_zip(path: Path, per_class: int, side: int = 32, image_format: str = "PNG") -> Path:
    """Four class folders of ``per_class`` random ``side`` x ``side`` images each."""
    rng = np.random.default_rng(0)
    suffix = image_format.lower()
    with zipfile.ZipFile(path, "w") as archive:
        for label in range(4):
            for index in range(per_class):
                pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                pixels[..., label % 3] //= 4  # a class tint, so the folders differ
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format=image_format)
                archive.writestr(f"class{label}/{index:04d}.{suffix}", buffer.getvalue())
    return path


def run_job(
    model_path: Path,
    data: Path,
    eval_data: Path | None,
    job: dict[str, Any],
    workdir: Path,
    reporter: Any = None,
) -> dict[str, Any]:
    """``core.pipeline.run_quantization`` as a worker runs it (training on this device), with
    what the job's metrics say about it; ``reporter``: a ``SilentReporter`` (the default) or
    one that does more with the stages."""
    from core.config import JobConfig
    from core.pipeline import JobInputs, SilentReporter, run_quantization

    reporter = reporter or SilentReporter()
    started = time.perf_counter()
    result = run_quantization(
        JobInputs(model_path, data, eval_data), JobConfig.model_validate(job), workdir, reporter
    )
    metrics = result.metrics
    return {
        "job": {k: v for k, v in job.items() if k != "preprocessing"},
        "seconds": round(time.perf_counter() - started, 1),
        "stages": reporter.stages,
        "agreement": metrics["agreement"],
        "calibrated_agreement": metrics["calibrated"]["agreement"],
        "student_top1": metrics["student_top1"],
        "teacher_top1": metrics["teacher_top1"],
        "train_images_per_second": round(metrics["train"]["images_per_second"], 1),
        "train": metrics["train"],
        "train_images": metrics["train_images"],
        "eval_images": metrics["eval_images"],
        "onnx_parity": metrics["onnx_parity"],
        "tensorrt_rule_violations": metrics["tensorrt_rules"]["violation_count"],
        "artifacts": sorted(result.artifacts),
    }


def job_end_to_end(teacher: torch.nn.Module, workdir: Path) -> dict[str, Any]:
    """A job on a random-weight ResNet-18 and generated images (no data files needed)."""
    model_path = workdir / "teacher.onnx"
    cpu_teacher = teacher.cpu().to(memory_format=torch.contiguous_format)
    torch.onnx.export(
        cpu_teacher,
        torch.randn(1, 3, 32, 32),
        model_path,
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}},
    )
    job = {
        "weight_bits": 4,
        "activation_bits": 4,
        "method": "lsq",
        "epochs": 2,
        "batch_size": 128,
        "export": {"speed": False},
        "preprocessing": {"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3},
    }
    return run_job(model_path, image_zip(workdir / "data.zip", 512), None, job, workdir / "job")


def write_fixture_folder(
    folder: Path, train_per_class: int = 100, test_per_class: int = 100
) -> None:
    """The inputs ``fixture_jobs`` reads, from ``../shared`` (run where it exists): about 3 MB,
    small enough to travel to a device machine beside the project."""
    from bench.cifar import TEACHER_ONNX, cifar_zip, teacher_preprocessing
    from bench.quality import DATA

    folder.mkdir(parents=True, exist_ok=True)
    cifar_zip(DATA / "train", train_per_class, folder / "train.zip")
    cifar_zip(DATA / "test", test_per_class, folder / "test.zip")
    shutil.copyfile(TEACHER_ONNX, folder / "teacher.onnx")
    (folder / "preprocessing.json").write_text(json.dumps(teacher_preprocessing()))


def fixture_jobs(folder: Path, workdir: Path) -> list[dict[str, Any]]:
    """W8A8 and W4A4 LSQ jobs on the CIFAR-10 teacher: ``folder`` holds teacher.onnx,
    train.zip, test.zip and preprocessing.json (``bench.cifar``; the device gets no
    ``../shared``). Parity is what issue 4 asks of every job, here of students trained on CUDA."""
    preprocessing = json.loads((folder / "preprocessing.json").read_text())
    rows = []
    for bits in (8, 4):
        job = {
            "weight_bits": bits,
            "activation_bits": bits,
            "method": "lsq",
            "epochs": 2,
            "batch_size": 64,
            "export": {"speed": False},
            "preprocessing": preprocessing,
        }
        rows.append(
            run_job(
                folder / "teacher.onnx",
                folder / "train.zip",
                folder / "test.zip",
                job,
                workdir / f"w{bits}a{bits}",
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def tensorrt_presence() -> dict[str, Any]:
    """TensorRT's Python API, ``trtexec`` and ``libnvinfer``: whatever of them the machine has."""
    try:
        import tensorrt  # type: ignore[import-not-found]

        version: str | None = str(tensorrt.__version__)
    except ImportError:
        version = None
    return {
        "python_api": version,
        "trtexec": shutil.which("trtexec"),
        "libnvinfer": ctypes.util.find_library("nvinfer"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("cuda_check.json"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument(
        "--fixture", type=Path, help="a folder of CIFAR-10 job inputs (see fixture_jobs)"
    )
    parser.add_argument(
        "--write-fixture", type=Path, help="only write that folder from ../shared, then exit"
    )
    args = parser.parse_args()
    if args.write_fixture is not None:
        write_fixture_folder(args.write_fixture)
        return
    device = torch.device(args.device)
    report: dict[str, Any] = {
        "command": " ".join(["PYTHONPATH=. python3 bench/cuda_check.py", *sys.argv[1:]]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "tensorrt": tensorrt_presence(),
        "quantizers": quantizer_parity(device),
        "training": [],
    }
    print(json.dumps(report, indent=2), flush=True)
    # torch.compile rows on the paper's model only: each costs its compilation (a minute or so)
    rows = list(itertools.product(MODELS, (False, True), (False,)))
    rows += [] if args.no_compile else [(PAPER_MODEL, amp, True) for amp in (False, True)]
    for name, amp, compiled in rows:
        try:
            row = training_speed(name, amp, compiled, args.steps, device)
        except Exception as exc:  # a failed row is a finding; the others still run
            row = {"model": name, "precision": amp, "compiled": compiled, "error": repr(exc)[:300]}
        report["training"].append(row)
        print(json.dumps(row), flush=True)
        args.out.write_text(json.dumps(report, indent=2))  # what ran so far, if time runs out
    with tempfile.TemporaryDirectory() as tmp:
        report["job"] = job_end_to_end(teacher_model("torchvision ResNet-18", device), Path(tmp))
        args.out.write_text(json.dumps(report, indent=2))
        print(json.dumps(report["job"], indent=2), flush=True)
        if args.fixture is not None:
            report["fixture_jobs"] = fixture_jobs(args.fixture, Path(tmp))
            args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
