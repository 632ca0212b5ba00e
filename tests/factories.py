"""Test data made on the spot: a tiny ONNX classifier, image archives, job rows."""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image
from sqlalchemy.orm import Session
from torch import nn

from core.models import Job

INPUT_SIZE = (16, 16)
CLASSES = ("cats", "dogs")

# The job config the examples use, at a size that trains in seconds on a CPU.
VALID_CONFIG: dict[str, Any] = {
    "weight_bits": 4,
    "activation_bits": 4,
    "method": "lsq",
    "epochs": 1,
    "batch_size": 16,
    "preprocessing": {
        "input_size": list(INPUT_SIZE),
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    },
}


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(16 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def export_tiny_cnn(path: Path) -> Path:
    """A randomly initialised teacher, exported to ONNX with input Nx3x16x16 (dynamic batch)."""
    torch.manual_seed(0)
    model = TinyCNN().eval()
    example = torch.randn(2, 3, *INPUT_SIZE)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim.DYNAMIC}},
        external_data=False,  # one self-contained file, as the API requires
    )
    return path


def png_bytes(seed: int, size: tuple[int, int] = INPUT_SIZE) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[0], size[1], 3), generator=generator, dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy(), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def zip_archive(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    return path


def image_zip(path: Path, per_class: int = 32) -> Path:
    """``per_class`` PNGs in each of the CLASSES folders (64 images by default)."""
    entries = {
        f"{label}/{index:03d}.png": png_bytes(seed=1000 * label_index + index)
        for label_index, label in enumerate(CLASSES)
        for index in range(per_class)
    }
    return zip_archive(path, entries)


def make_job(session: Session, tenant: str = "local", **values: Any) -> Job:
    """A job row as submit_job would write it (files need not exist for state tests)."""
    fields: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "tenant": tenant,
        "status": "queued",
        "config": VALID_CONFIG,
        "model_path": "jobs/x/inputs/model.onnx",
        "model_sha256": "0" * 64,
        "model_size": 1,
        "data_path": "jobs/x/inputs/data.zip",
        "data_sha256": "0" * 64,
        "data_size": 1,
        "cancel_requested": False,
        "attempts": 0,
    } | values
    job = Job(**fields)
    session.add(job)
    session.commit()
    return job


def post_job(
    client: httpx.Client,
    *,
    model: Path | bytes | None,
    data: Path | bytes | None,
    config: dict[str, Any] | str | None = VALID_CONFIG,
    eval_data: Path | bytes | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """``POST /v1/jobs`` as multipart, the way a client script would; None leaves a field out."""
    files: dict[str, tuple[str, bytes, str]] = {}
    for field, content, filename in (
        ("model", model, "teacher.onnx"),
        ("data", data, "images.zip"),
        ("eval_data", eval_data, "eval.zip"),
    ):
        if content is not None:
            raw = content.read_bytes() if isinstance(content, Path) else content
            files[field] = (filename, raw, "application/octet-stream")
    form = {}
    if config is not None:
        form["config"] = config if isinstance(config, str) else json.dumps(config)
    return client.post("/v1/jobs", files=files, data=form, headers=headers)
