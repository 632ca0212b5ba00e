"""How fast an exported model runs on this machine's CPU: OpenVINO and ONNX Runtime latency.

TensorRT cannot run without an NVIDIA GPU, so the CPU stand-in is OpenVINO, which, like
TensorRT, turns well-placed QuantizeLinear/DequantizeLinear pairs into integer kernels: the
speed of ``model_qdq.onnx`` under OpenVINO shows whether its int8 layout really runs as int8.
``openvino_layers`` says which precision each compiled convolution runs in. ONNX Runtime's CPU
int8 kernels are often slower than its float ones; they are reported, not optimised for.

Latency: the best of ``ROUNDS`` timed windows of back-to-back inferences on one request (the
minimum filters out other work on shared cores), in milliseconds per batch.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import openvino as ov

ROUNDS = 5
WARMUP_RUNS = 10
LAYER_TYPES = ("Convolution", "FullyConnected", "MatMul")
INT8_PRECISIONS = ("u8", "i8")


def _best_window_ms(run: Callable[[], Any], seconds: float) -> float:
    for _ in range(WARMUP_RUNS):
        run()
    best = float("inf")
    for _ in range(ROUNDS):
        runs, started = 0, time.perf_counter()
        while True:
            run()
            runs += 1
            elapsed = time.perf_counter() - started
            if elapsed >= seconds / ROUNDS:
                break
        best = min(best, 1000 * elapsed / runs)
    return best


def _openvino_model(
    path: Path, input_shape: tuple[int, ...], batch: int, threads: int, precision: str | None
) -> ov.CompiledModel:
    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape([batch, *input_shape])
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    return core.compile_model(model, "CPU", config)


def openvino_latency(
    path: Path,
    input_shape: tuple[int, ...],
    batch: int,
    *,
    threads: int,
    seconds: float = 2.0,
    precision: str | None = None,
) -> float:
    """Milliseconds per batch of ``path`` under OpenVINO on the CPU. ``precision`` ("f32",
    "bf16"): the inference precision hint; None, OpenVINO's default, which is bf16 for float
    layers on CPUs with bf16 instructions."""
    request = _openvino_model(path, input_shape, batch, threads, precision).create_infer_request()
    x = np.random.default_rng(0).standard_normal((batch, *input_shape), np.float32)
    return _best_window_ms(lambda: request.infer({0: x}), seconds)


def openvino_layers(
    path: Path, input_shape: tuple[int, ...], *, precision: str | None = None
) -> dict[str, int]:
    """The compiled model's layers (convolutions, fully connected) by the precision they run in:
    {"u8": 21, "bf16": 1, ...}. An int8 layout runs every quantized layer in u8/i8."""
    compiled = _openvino_model(path, input_shape, 1, 1, precision)
    counts: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in LAYER_TYPES:
            counts[info["runtimePrecision"].astype(str)] += 1
    return dict(counts)


def onnxruntime_latency(
    path: Path, input_shape: tuple[int, ...], batch: int, *, threads: int, seconds: float = 2.0
) -> float:
    """Milliseconds per batch of ``path`` under ONNX Runtime's CPU provider, default rewrites."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, *input_shape), np.float32)
    return _best_window_ms(lambda: session.run(None, {name: x}), seconds)


def int8_speed(
    models: dict[str, Path],
    input_shape: tuple[int, ...],
    *,
    batches: tuple[int, ...] = (1, 32),
    threads: int = 2,
    seconds: float = 1.0,
) -> dict[str, Any]:
    """A job's ``metrics.inference``: each of ``models`` ({"float": the upload, "qdq": ...})
    under OpenVINO and ONNX Runtime, milliseconds per batch, with each model's speed-up over
    "float" and (OpenVINO) the precision each of its layers runs in.

    {"threads": 2, "batches": [1, 32], "openvino": {"float_ms": {"1": .., "32": ..},
    "qdq_ms": {..}, "qdq_speedup": {..}, "qdq_layers": {"u8": 21, ...}, ...},
    "onnxruntime": {the same but layers}}
    """
    result: dict[str, Any] = {"threads": threads, "batches": list(batches)}
    latencies: dict[str, Callable[[Path, int], float]] = {
        "openvino": lambda path, batch: openvino_latency(
            path, input_shape, batch, threads=threads, seconds=seconds
        ),
        "onnxruntime": lambda path, batch: onnxruntime_latency(
            path, input_shape, batch, threads=threads, seconds=seconds
        ),
    }
    for runtime, latency in latencies.items():
        timings = {
            name: {str(b): latency(path, b) for b in batches} for name, path in models.items()
        }
        result[runtime] = {f"{name}_ms": ms for name, ms in timings.items()}
        for name, ms in timings.items():
            if name != "float":
                result[runtime][f"{name}_speedup"] = {b: timings["float"][b] / ms[b] for b in ms}
    for name, path in models.items():
        if name != "float":
            result["openvino"][f"{name}_layers"] = openvino_layers(path, input_shape)
    return result
