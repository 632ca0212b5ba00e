"""OpenVINO and ONNX Runtime timing of exported models, and OpenVINO's int8 layout of ours."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from core.export.onnx_qdq import export_qdq_onnx, write_cpu_variant
from core.export.runtime_speed import (
    int8_slower_batches,
    int8_speed,
    int8_speed_in_child,
    openvino_layers,
)
from core.inputs.onnx_model import load_onnx_model
from core.pipeline import _inference_speed, int8_warnings
from core.sqakd.calibrate import calibrate
from core.sqakd.modules import QuantSpec, prepare
from tests.fixtures_paths import shared_path

INPUT_SHAPE = (3, 32, 32)


@pytest.fixture(scope="module")
def fixture_onnx() -> Path:
    return shared_path("fixtures", "resnet20_cifar10.onnx")


def export(teacher: nn.Module, path: Path, **spec: object) -> Path:
    student = prepare(teacher, QuantSpec(method="lsq", weight_bits=8, activation_bits=8, **spec))  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(0)  # one calibration: the layers it gives are fixed
    calibrate(student, teacher, torch.randn(16, *INPUT_SHAPE, generator=generator))
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


def test_the_cpu_layout_runs_every_layer_as_uint8_in_openvino(
    fixture_onnx: Path, tmp_path: Path
) -> None:
    """The CPU's grids (``export.target: cpu``): every convolution and the classifier read
    uint8 activations, so OpenVINO runs all 22 layers in u8 kernels, the first one included
    (TensorRT's layout runs it in i8: its input, the image, is signed)."""
    teacher = load_onnx_model(fixture_onnx).module
    qdq = export(teacher, tmp_path / "model_qdq.onnx", uint8_grids=True, residual_bits=8)
    cpu = tmp_path / "model_qdq_cpu.onnx"
    write_cpu_variant(qdq, cpu)
    assert openvino_layers(cpu, INPUT_SHAPE, precision="f32") == {"u8": 22}


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
    assert isinstance(speed["int8_pays"], bool)


def test_a_worker_times_in_a_child_process_that_answers_in_json(fixture_onnx: Path) -> None:
    """What a job runs (OpenVINO in the Celery pool process crashed it as it exited)."""
    speed = int8_speed_in_child({"float": fixture_onnx}, INPUT_SHAPE, threads=1, seconds=0.05)
    assert (speed["threads"], speed["batches"]) == (1, [1, 32])
    for runtime in ("openvino", "onnxruntime"):
        assert set(speed[runtime]["float_ms"]) == {"1", "32"}
        assert all(ms > 0 for ms in speed[runtime]["float_ms"].values())


def test_a_model_the_runtimes_cannot_run_is_reported_not_failed(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    result = _inference_speed({"float": broken, "qdq": broken}, INPUT_SHAPE)
    assert set(result) == {"error"} and "broken.onnx" in result["error"]  # the child's words


def inference(openvino: dict[str, dict[str, float]]) -> dict[str, object]:
    """An ``int8_speed`` result with these OpenVINO speed-ups over the float model."""
    return {"threads": 2, "batches": [1, 32], "openvino": openvino, "onnxruntime": {}}


def test_int8_pays_when_the_faster_int8_file_beats_float_at_every_batch_size() -> None:
    """Either file may be the faster one; ONNX Runtime's int8 kernels do not count."""
    paying = inference(
        {"qdq_speedup": {"1": 0.9, "32": 1.4}, "qdq_cpu_speedup": {"1": 1.1, "32": 1.3}}
    )
    assert int8_slower_batches(paying) == {} and int8_warnings(paying) == []
    slower = inference(
        {"qdq_speedup": {"1": 0.95, "32": 1.06}, "qdq_cpu_speedup": {"1": 0.98, "32": 1.08}}
    )
    assert int8_slower_batches(slower) == {"1": 0.98}
    (warning,) = int8_warnings(slower)
    assert warning["code"] == "int8_slower_than_float"
    assert "0.98x the float model's speed at batch 1" in warning["message"]
    assert "batch 32" not in warning["message"]
    assert int8_warnings({"error": "fixed batch"}) == []  # not measured: nothing to say
