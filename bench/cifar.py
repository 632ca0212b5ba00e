"""The CIFAR-10 data and teacher in ``../shared`` as a user would upload them."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TEACHER_ONNX = SHARED / "fixtures" / "resnet20_cifar10.onnx"
TEACHER_META = SHARED / "fixtures" / "resnet20_cifar10.json"


def cifar_zip(split_dir: Path, per_class: int, path: Path) -> Path:
    """The first ``per_class`` JPEGs of every class folder of ``split_dir``, zipped."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for class_dir in sorted(split_dir.iterdir()):
            for image in sorted(class_dir.iterdir())[:per_class]:
                archive.write(image, f"{class_dir.name}/{image.name}")
    return path


def teacher_preprocessing(meta_path: Path = TEACHER_META) -> dict[str, Any]:
    meta = json.loads(meta_path.read_text())
    return {"input_size": meta["input"][1:], "mean": meta["mean"], "std": meta["std"]}
