"""Build and time a TensorRT engine from ``model_qdq.onnx`` on this machine's NVIDIA GPU.

Explicit quantization: the file's Q/DQ pairs set every int8 scale, so no calibrator runs;
``INT8`` lets TensorRT use the int8 kernels Q/DQ call for and ``FP16`` is the fallback for the
layers between them. A dynamic batch dimension (ours) gets a profile of 1 to ``max_batch``
images, tuned for ``opt_batch``; a fixed one is kept. Works with TensorRT 8 and 10. TensorRT is
imported here only, so that machines without it (this project's CI, CPU workers) never need it;
``TensorRTUnavailable`` says so.

Engines run only on the TensorRT version and GPU family that built them: the report records
both, with the JetPack/L4T release on a Jetson.
"""

from __future__ import annotations

import platform
import re
import time
from pathlib import Path
from typing import Any

NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")  # present on Jetson (L4T) only
TIMED_RUNS = 50


class TensorRTUnavailable(RuntimeError):
    """This machine has no TensorRT Python API or no CUDA device."""


def l4t_release(text: str) -> str | None:
    """``32.7.1`` from ``# R32 (release), REVISION: 7.1, GCID: ...`` (/etc/nv_tegra_release)."""
    match = re.search(r"R(\d+) \(release\), REVISION: ([\d.]+)", text)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def build_engine(
    onnx_path: Path, plan_path: Path, *, max_batch: int = 32, opt_batch: int = 1
) -> dict[str, Any]:
    """Write the serialized engine to ``plan_path``; return its provenance and timings (the
    content of ``engine-<target>.json``)."""
    try:
        import tensorrt as trt
        import torch
    except ImportError as exc:
        raise TensorRTUnavailable(f"TensorRT's Python API is not installed: {exc}") from exc
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("no CUDA device")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Explicit batch, which the ONNX parser needs: a flag up to TensorRT 8, the only mode in 10.
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    network = builder.create_network(0 if explicit is None else 1 << int(explicit))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    flags = ["INT8", "FP16"]
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    model_input = network.get_input(0)
    batch_dim, *sample = tuple(model_input.shape)
    sample_shape = tuple(sample)
    batches = (1, 32) if batch_dim == -1 else (batch_dim,)
    if batch_dim == -1:  # a dynamic batch needs a profile; a fixed one must not get one
        profile = builder.create_optimization_profile()
        profile.set_shape(
            model_input.name,
            (1, *sample_shape),
            (opt_batch, *sample_shape),
            (max_batch, *sample_shape),
        )
        config.add_optimization_profile(profile)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - started
    if serialized is None:
        raise RuntimeError("TensorRT could not build an engine from the network")
    plan_path.write_bytes(bytes(serialized))

    device = torch.cuda.get_device_properties(0)
    tegra = NV_TEGRA_RELEASE.read_text() if NV_TEGRA_RELEASE.exists() else ""
    return {
        "tensorrt_version": trt.__version__,
        "device_name": device.name,
        "compute_capability": f"{device.major}.{device.minor}",
        "l4t": l4t_release(tegra),
        "machine": platform.machine(),
        "precision": "int8+fp16",
        "build_flags": flags,
        "builder": "tensorrt-python",
        "batch": ({"min": 1, "opt": opt_batch, "max": max_batch} if batch_dim == -1 else batch_dim),
        "build_seconds": build_seconds,
        "timings": _time_engine(
            trt, torch, bytes(serialized), model_input.name, sample_shape, batches
        ),
    }


def _time_engine(
    trt: Any,
    torch: Any,
    plan: bytes,
    input_name: str,
    sample_shape: tuple[int, ...],
    batches: tuple[int, ...],
) -> dict[str, float]:
    """Milliseconds per batch at each of ``batches``: the median of ``TIMED_RUNS``
    CUDA-event-timed runs, on torch-allocated device buffers."""
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    timings = {}
    for batch in batches:
        context.set_input_shape(input_name, (batch, *sample_shape))
        buffers = {}
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            shape = tuple(context.get_tensor_shape(name))
            buffers[name] = torch.zeros(shape, dtype=torch.float32, device="cuda")
            context.set_tensor_address(name, buffers[name].data_ptr())
        runs = []
        for _ in range(TIMED_RUNS + 5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            context.execute_async_v3(stream.cuda_stream)
            end.record(stream)
            end.synchronize()
            runs.append(start.elapsed_time(end))
        timings[f"batch_{batch}_ms"] = sorted(runs[5:])[TIMED_RUNS // 2]
    return timings
