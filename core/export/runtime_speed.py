"""How fast an exported model runs on this machine's CPU: OpenVINO and ONNX Runtime latency.

TensorRT cannot run without an NVIDIA GPU, so the CPU stand-in is OpenVINO, which, like
TensorRT, turns well-placed QuantizeLinear/DequantizeLinear pairs into integer kernels: the
speed of ``model_qdq.onnx`` under OpenVINO shows whether its int8 layout really runs as int8.
``openvino_layers`` says which precision each compiled convolution runs in. ONNX Runtime's CPU
int8 kernels are often slower than its float ones; they are reported, not optimised for.

Latency: the best of ``ROUNDS`` timed windows of back-to-back inferences on one request (the
minimum filters out other work on shared cores), in milliseconds per batch; models compared
with each other take turns (``best_window_ms``).

Whether int8 pays (``int8_pays``): the fastest int8 file under OpenVINO against the float model,
at each batch size. It need not: a small, depthwise-heavy model (a MobileNetV3 at 224 px ran
W4A4 at 0.98x and 1.08x of its float model here) spends its time outside the convolutions
that int8 speeds up, and pays for the quantization steps between them.

A worker times a job's files with ``int8_speed_in_child``: in a fresh interpreter, since
OpenVINO's threads crashed the forked Celery pool process that ran them (SIGSEGV as it exited,
after every job), and away from the worker's own torch threads.
"""

from __future__ import annotations

import json
import subprocess
import sys
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


def best_window_ms(runs: dict[str, Callable[[], Any]], seconds: float) -> dict[str, float]:
    """Milliseconds per call of each of ``runs``: the best of ``ROUNDS`` windows each. The
    runs take turns, one window each per round, so that a slow spell on shared cores falls on
    all of them rather than on whichever ran then."""
    for run in runs.values():
        for _ in range(WARMUP_RUNS):
            run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(ROUNDS):
        for name, run in runs.items():
            calls, started = 0, time.perf_counter()
            while True:
                run()
                calls += 1
                elapsed = time.perf_counter() - started
                if elapsed >= seconds / ROUNDS:
                    break
            best[name] = min(best[name], 1000 * elapsed / calls)
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


def _random_batch(input_shape: tuple[int, ...], batch: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, *input_shape), np.float32)


def openvino_runner(
    path: Path,
    input_shape: tuple[int, ...],
    batch: int,
    *,
    threads: int,
    precision: str | None = None,
) -> Callable[[], Any]:
    """One inference of ``path`` under OpenVINO on the CPU, on a fixed random batch.
    ``precision`` ("f32", "bf16"): the inference precision hint; None, OpenVINO's default,
    which is bf16 for float layers on CPUs with bf16 instructions."""
    request = _openvino_model(path, input_shape, batch, threads, precision).create_infer_request()
    x = _random_batch(input_shape, batch)
    return lambda: request.infer({0: x})


def onnxruntime_runner(
    path: Path, input_shape: tuple[int, ...], batch: int, *, threads: int
) -> Callable[[], Any]:
    """One inference of ``path`` under ONNX Runtime's CPU provider, default rewrites."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = _random_batch(input_shape, batch)
    return lambda: session.run(None, {name: x})


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
    "onnxruntime": {the same but layers}, "int8_pays": true}

    ``int8_pays``: under OpenVINO some int8 file beats "float" at every batch size
    (``int8_slower_batches`` names the others).
    """
    result: dict[str, Any] = {"threads": threads, "batches": list(batches)}
    runners: dict[str, Callable[[Path, int], Callable[[], Any]]] = {
        "openvino": lambda path, batch: openvino_runner(path, input_shape, batch, threads=threads),
        "onnxruntime": lambda path, batch: onnxruntime_runner(
            path, input_shape, batch, threads=threads
        ),
    }
    for runtime, runner in runners.items():
        timings: dict[str, dict[str, float]] = {name: {} for name in models}
        for batch in batches:  # the models take turns within a batch size
            runs = {name: runner(path, batch) for name, path in models.items()}
            for name, ms in best_window_ms(runs, seconds).items():
                timings[name][str(batch)] = ms
        result[runtime] = {f"{name}_ms": ms for name, ms in timings.items()}
        for name, ms in timings.items():
            if name != "float":
                result[runtime][f"{name}_speedup"] = {b: timings["float"][b] / ms[b] for b in ms}
    for name, path in models.items():
        if name != "float":
            result["openvino"][f"{name}_layers"] = openvino_layers(path, input_shape)
    if len(models) > 1:
        result["int8_pays"] = not int8_slower_batches(result)
    return result


def int8_slower_batches(inference: dict[str, Any]) -> dict[str, float]:
    """The batch sizes at which no int8 file of ``int8_speed``'s result runs faster than the
    float model under OpenVINO, each with the best int8 speed-up there: {"1": 0.98}. OpenVINO,
    not ONNX Runtime, because its int8 kernels are the CPU stand-in for a deployment's."""
    openvino = inference["openvino"]
    speedups = [times for key, times in openvino.items() if key.endswith("_speedup")]
    best = {batch: max(times[batch] for times in speedups) for batch in speedups[0]}
    return {batch: speedup for batch, speedup in best.items() if speedup <= 1.0}


def int8_speed_in_child(
    models: dict[str, Path],
    input_shape: tuple[int, ...],
    *,
    threads: int,
    seconds: float,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """``int8_speed`` run by ``python -m core.export.runtime_speed`` (JSON in, JSON out);
    ``RuntimeError`` with the child's last error line if it fails."""
    request = {
        "models": {name: str(path) for name, path in models.items()},
        "input_shape": list(input_shape),
        "threads": threads,
        "seconds": seconds,
    }
    child = subprocess.run(
        [sys.executable, "-m", __name__],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if child.returncode != 0:
        lines = child.stderr.strip().splitlines() or [f"exit status {child.returncode}"]
        raise RuntimeError(lines[-1])
    return json.loads(child.stdout)


def _main() -> None:
    request = json.load(sys.stdin)
    result = int8_speed(
        {name: Path(path) for name, path in request["models"].items()},
        tuple(request["input_shape"]),
        threads=request["threads"],
        seconds=request["seconds"],
    )
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    _main()
