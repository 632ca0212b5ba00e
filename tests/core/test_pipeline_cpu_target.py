"""A job with ``export.target: cpu``: the CPU's grids, both ONNX files exact, no TensorRT check,
and ``metrics.inference`` saying plainly whether int8 pays on the worker's CPU."""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from core.config import JobConfig
from core.export import tensorrt_rules
from core.pipeline import JobInputs, SilentReporter, run_quantization
from tests.factories import VALID_CONFIG, export_tiny_cnn, image_zip


def test_a_cpu_target_job(tmp_path: Path) -> None:
    inputs = JobInputs(export_tiny_cnn(tmp_path / "teacher.onnx"), image_zip(tmp_path / "d.zip"))
    settings = {k: v for k, v in VALID_CONFIG.items() if k != "epochs"}
    config = JobConfig.model_validate(
        {
            **settings,
            "weight_bits": 8,
            "activation_bits": 8,
            "steps": 2,
            "export": {"target": "cpu"},
        }
    )
    reporter = SilentReporter()
    result = run_quantization(inputs, config, tmp_path / "work", reporter)
    metrics = result.metrics

    spec = json.loads(result.artifacts["quant_config.json"].read_text())["quant_spec"]
    assert spec["uint8_grids"] and not spec["int8_grids"] and spec["residual_bits"] == 8
    assert "tensorrt_rules" not in metrics  # TensorRT's rules do not apply to the CPU's grids
    assert metrics["onnx_parity"]["top1_agreement"] >= 0.97, metrics["onnx_parity"]
    graph = onnx.load(str(result.artifacts["model_qdq_cpu.onnx"])).graph
    constants = tensorrt_rules.constant_arrays(graph)
    zero_points = [constants[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"]
    assert {str(z.dtype) for z in zero_points} == {"uint8", "int8"}
    assert not any(z.any() for z in zero_points)  # every activation quantized from zero
    assert not any(n.op_type == "Clip" for n in graph.node)  # 256 levels: none needs a Clip

    inference = metrics["inference"]
    slower = [w for w in metrics["warnings"] if w["code"] == "int8_slower_than_float"]
    assert isinstance(inference["int8_pays"], bool)
    assert len(slower) == (0 if inference["int8_pays"] else 1), (inference, metrics["warnings"])
    assert [(code, message) for code, message in reporter.warnings] == [
        (w["code"], w["message"]) for w in metrics["warnings"]
    ]
    stored = json.loads(result.artifacts["metrics.json"].read_text())
    assert stored["warnings"] == metrics["warnings"]
