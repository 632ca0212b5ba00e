"""OpenVINO and ONNX Runtime timing of exported models, and OpenVINO's int8 layout of ours."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from core.export.onnx_qdq import export_qdq_onnx
from core.export.runtime_speed import int8_speed, openvino_layers
from core.inputs.onnx_model import load_onnx_model
from core.pipeline import _inference_speed
from core.sqakd.calibrate import calibrate
from core.sqakd.modules import QuantSpec, prepare
from tests.core.export.test_onnx_qdq import one_torch_thread  # noqa: F401 - autouse here too
from tests.fixtures_paths import shared_path

INPUT_SHAPE = (3, 32, 32)


@pytest.fixture(scope="module")
def fixture_onnx() -> Path:
    return shared_path("fixtures", "resnet20_cifar10.onnx")


def export(teacher: nn.Module, path: Path, **spec: object) -> Path:
    student = prepare(teacher, QuantSpec(method="lsq", weight_bits=8, activation_bits=8, **spec))  # type: ignore[arg-type]
    calibrate(student, teacher, torch.randn(16, *INPUT_SHAPE))
    export_qdq_onnx(student.eval(), INPUT_SHAPE, path)
    return path


def test_the_tensorrt_layout_runs_every_layer_as_int8_in_openvino(
    fixture_onnx: Path, tmp_path: Path
) -> None:
    """One quantizer per tensor and Q/DQ on both inputs of each residual addition: OpenVINO fuses
    every convolution with its requantization into an integer kernel. Without them the block
    inputs are needed in float, and the shortcut convolutions stay float."""
    teacher = load_onnx_model(fixture_onnx).module
    tensorrt = export(teacher, tmp_path / "tensorrt.onnx", int8_grids=True, residual_bits=8)
    plain = export(teacher, tmp_path / "plain.onnx")
    assert openvino_layers(tensorrt, INPUT_SHAPE, precision="f32") == {"u8": 21, "i8": 1}
    float_layers = openvino_layers(plain, INPUT_SHAPE, precision="f32")
    assert float_layers.get("f32", 0) > 0, float_layers
    assert openvino_layers(fixture_onnx, INPUT_SHAPE, precision="f32") == {"f32": 22}


def test_int8_speed_times_every_model_in_both_runtimes(fixture_onnx: Path, tmp_path: Path) -> None:
    teacher = load_onnx_model(fixture_onnx).module
    qdq = export(teacher, tmp_path / "model_qdq.onnx", int8_grids=True, residual_bits=8)
    models = {"float": fixture_onnx, "qdq": qdq}
    speed = int8_speed(models, INPUT_SHAPE, batches=(1, 4), threads=1, seconds=0.05)
    assert speed["threads"] == 1 and speed["batches"] == [1, 4]
    for runtime in ("openvino", "onnxruntime"):
        for name in models:
            assert set(speed[runtime][f"{name}_ms"]) == {"1", "4"}
            assert all(ms > 0 for ms in speed[runtime][f"{name}_ms"].values())
        assert speed[runtime]["qdq_speedup"]["4"] == pytest.approx(
            speed[runtime]["float_ms"]["4"] / speed[runtime]["qdq_ms"]["4"]
        )
    assert speed["openvino"]["qdq_layers"] == {"u8": 21, "i8": 1}


def test_a_model_the_runtimes_cannot_run_is_reported_not_failed(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    result = _inference_speed({"float": broken, "qdq": broken}, INPUT_SHAPE)
    assert set(result) == {"error"} and result["error"]
