"""CUDA check of the SQAKD engine: bf16 autocast vs float32, channels_last, a job end to end.

Run on a machine with an NVIDIA GPU (not part of the test suite, which runs on CPU):

    python bench/cuda_check.py --out cuda_check.json

It trains a quantized torchvision ResNet-18 (random weights; speed does not depend on them) for a
few steps in each precision, then runs ``core.pipeline.run_quantization`` on a small generated
image archive, and reports images/s, peak GPU memory, and whether TensorRT is importable.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image

from core.sqakd.calibrate import calibrate
from core.sqakd.modules import QuantSpec, prepare
from core.sqakd.trainer import TrainConfig, train


def teacher_model(device: torch.device) -> torch.nn.Module:
    model = torchvision.models.resnet18(num_classes=10)
    model.train()
    with torch.no_grad():  # BatchNorm statistics from data, so logits are not degenerate
        for _ in range(4):
            model(torch.randn(64, 3, 32, 32))
    return model.eval().to(device).to(memory_format=torch.channels_last)


def training_speed(teacher: torch.nn.Module, amp: bool, steps: int, batch: int) -> dict[str, Any]:
    device = next(teacher.parameters()).device
    pixels = torch.randint(0, 256, (batch * 4, 3, 32, 32), dtype=torch.uint8, device=device)
    student = prepare(teacher, QuantSpec(method="lsq", weight_bits=4, activation_bits=4))
    calibrate(student, teacher, pixels[:256].float() / 255)
    config = TrainConfig(steps=steps, batch_size=batch, amp=amp, augment=True)
    train(teacher, student, pixels, TrainConfig(steps=3, batch_size=batch, amp=amp))  # warm-up
    torch.cuda.synchronize()
    stats = train(teacher, student, pixels, config)
    return {
        "precision": "bf16 autocast" if amp else "float32",
        "batch": batch,
        "steps": steps,
        "images_per_second": round(stats.images_per_second, 1),
        "peak_memory_mib": round((stats.peak_memory_bytes or 0) / 2**20, 1),
    }


def image_zip(path: Path, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as archive:
        for label in range(4):
            for index in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                pixels[..., label % 3] //= 4  # a class tint, so the folders differ
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="PNG")
                archive.writestr(f"class{label}/{index:04d}.png", buffer.getvalue())
    return path


def job_end_to_end(teacher: torch.nn.Module, workdir: Path) -> dict[str, Any]:
    from core.config import JobConfig
    from core.pipeline import JobInputs, run_quantization

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

    class Reporter:
        stages: list[str] = []

        def stage(self, stage: str) -> None:
            self.stages.append(stage)

        def progress(self, progress: dict[str, Any]) -> None:
            pass

        def should_stop(self) -> bool:
            return False

    config = JobConfig.model_validate(
        {
            "weight_bits": 4,
            "activation_bits": 4,
            "method": "lsq",
            "epochs": 2,
            "batch_size": 128,
            "preprocessing": {"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3},
        }
    )
    reporter = Reporter()
    started = time.perf_counter()
    result = run_quantization(
        JobInputs(model_path, image_zip(workdir / "data.zip", 512)),
        config,
        workdir / "job",
        reporter,
    )
    metrics = result.metrics
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "stages": reporter.stages,
        "agreement": metrics["agreement"],
        "calibrated_agreement": metrics["calibrated"]["agreement"],
        "train_images_per_second": round(metrics["train"]["images_per_second"], 1),
        "onnx_parity": metrics["onnx_parity"],
        "artifacts": sorted(result.artifacts),
    }


def tensorrt_version() -> str | None:
    try:
        import tensorrt  # type: ignore[import-not-found]
    except ImportError:
        return None
    return str(tensorrt.__version__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("cuda_check.json"))
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    device = torch.device("cuda")
    teacher = teacher_model(device)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "tensorrt": tensorrt_version(),
        "training": [
            training_speed(teacher, amp, args.steps, batch)
            for batch in (256,)
            for amp in (False, True)
        ],
    }
    with tempfile.TemporaryDirectory() as tmp:
        report["job"] = job_end_to_end(teacher, Path(tmp))
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
