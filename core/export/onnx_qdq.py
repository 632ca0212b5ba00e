"""ONNX export of a fake-quantized student as QuantizeLinear/DequantizeLinear (QDQ), and its parity.

How: on a deep copy of the student, every quantized layer is swapped for an export-only stand-in
(``_qdq_layer``) built from the quantizers' integer grids (``Quantizer.grid()``), so this file
needs no per-method code, and so is every quantized residual addition (``_QDQAdd``). Their
forwards use ``torch.fake_quantize_per_*_affine``, which the exporter writes as QuantizeLinear ->
DequantizeLinear; everything else (plain adds, pooling, BatchNorm, onnx2torch modules) is
exported exactly as the float model would be. One pass over the
ONNX graph then folds each weight's QuantizeLinear (whose input is a constant) into an integer
initializer, so the file stores the integer weights followed by a DequantizeLinear.

Why not export the float model and insert Q/DQ into its graph afterwards: that needs a map from
PyTorch layers to ONNX nodes, which only the exporter's naming gives, and the eval-mode exporter
folds BatchNorm into the convolutions, so the weights in the graph are no longer the quantized ones.

Exactness (the ONNX model equals the student up to float summation order):
- Every method (lsq, ewgs, pact, dorefa, ste), 2..8 bits, signed or unsigned: exact, because each
  quantizer keeps its levels on an integer grid with an integer zero point (EWGS snaps its lower
  bound to a whole number of steps; DoReFa's odd codes fit int8 up to 7 bits and use -127..127
  at 8). Weights are int8 (uint8 for an unsigned 8-bit weight grid); activations are int8 with
  zero point 0, their codes shifted by the grid's zero point, preceded by a Clip to the b-bit
  range when the grid is narrower than int8; only 256-level grids that do not fit int8 that way
  (unsigned 8 bits) keep uint8 or a zero point, unless trained on TensorRT-compatible grids
  (``QuantSpec.int8_grids``). The CPU's grids (``QuantSpec.uint8_grids``) are uint8 from zero
  when unsigned (0..255 at 8 bits: the type's whole range, so no Clip) and int8 with zero point
  0 when signed, and ``write_cpu_variant`` turns the narrower unsigned ones into uint8 too.
  A student with ``QuantSpec.residual_bits`` quantizes both inputs
  of its residual additions, and so does the file. A BatchNorm that alone reads a quantized
  convolution is folded into it (``_fold_batchnorm``), as TensorRT wants.
- Not exact: 1-bit signed activations (levels +-s: a QuantizeLinear cannot skip the 0 between
  them; 1-bit weights are exact).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from core.export import tensorrt_rules
from core.sqakd.modules import QuantConv2d, QuantModule, QuantOp, quant_layers, quant_ops
from core.sqakd.quantizers import IntGrid

# ONNX Runtime (>= 1.20) rewrites each float Conv/Gemm bias next to Q/DQ into int32 at scale
# activation_scale * weight_scale. The student adds its bias in float, and rounding the bias
# moves conv outputs across the next quantizer's rounding boundaries: at W4A4 on ResNet-20 the
# logits then differ by ~0.1 on average instead of ~1e-4. Parity is about the file, so that one
# rewrite is off by default; all other ORT optimizations (int8 kernels included) stay on.
FILE_SEMANTICS = ("WeightBiasQuantization",)
MIN_OPSET = 13  # per-channel (axis) QuantizeLinear/DequantizeLinear
MAX_REPORTED = 20  # violations listed in a job's metrics; the count says how many in all
_INT8 = (-128, 127)
_UINT8 = (0, 255)


@dataclass(frozen=True)
class _QParams:
    """One QuantizeLinear/DequantizeLinear pair: ONNX integer type range and parameters.

    Per tensor, scale and zero point are Python numbers, so tracing records them as constants.
    """

    scale: Tensor | float  # float32 [C] per channel (axis 0)
    zero_point: Tensor | int  # int32 [C] per channel
    type_range: tuple[int, int]  # _INT8 or _UINT8
    clip: tuple[float, float] | None = None  # float range of the b-bit grid, when < 8 bits

    def fake_quantize(self, x: Tensor) -> Tensor:
        if self.clip is not None:
            x = x.clamp(*self.clip)  # exports as Clip: QuantizeLinear saturates at 8 bits only
        if isinstance(self.scale, Tensor) and isinstance(self.zero_point, Tensor):
            return torch.fake_quantize_per_channel_affine(
                x, self.scale, self.zero_point, 0, *self.type_range
            )
        return torch.fake_quantize_per_tensor_affine(
            x, float(self.scale), int(self.zero_point), *self.type_range
        )


def _weight_qparams(grid: IntGrid, per_channel: bool) -> _QParams:
    """Symmetric int8 (zero point 0) wherever the integer values fit, uint8 for unsigned 8 bits."""
    unsigned_8bit = bool((grid.zero_point == 0).all()) and grid.qmin >= 0 and grid.qmax > 127
    type_range = _UINT8 if unsigned_8bit else _INT8
    scale = grid.scale.detach().float().reshape(-1)
    if per_channel:
        return _QParams(scale, torch.zeros_like(scale, dtype=torch.int32), type_range)
    return _QParams(float(scale[0]), 0, type_range)


def _activation_qparams(grid: IntGrid) -> _QParams:
    """int8 with zero point 0 (TensorRT's only INT8 form) wherever the grid's codes, shifted by
    its zero point, fit in -128..127: every grid below 8 bits. 256-level grids that do not
    (unsigned 8 bits) keep uint8 or their zero point. Clip when the grid is narrower than the
    type: QuantizeLinear saturates at the type's range only."""
    scale = float(grid.scale.detach().float().reshape(-1)[0])
    zero_point = int(grid.zero_point.detach().reshape(-1)[0].round())
    low, high = grid.qmin - zero_point, grid.qmax - zero_point  # the real codes, zero at 0
    if _INT8[0] <= low and high <= _INT8[1]:
        type_range, zero_point = _INT8, 0
    else:
        type_range = _UINT8 if grid.qmin >= 0 else _INT8
        zero_point = min(max(zero_point, type_range[0]), type_range[1])
        low, high = grid.qmin - zero_point, grid.qmax - zero_point
    clip = None
    if (low, high) != (type_range[0] - zero_point, type_range[1] - zero_point):
        clip = (low * scale, high * scale)
    return _QParams(scale, zero_point, type_range, clip)


class _FakeQuant(nn.Module):
    """``_QParams.fake_quantize`` as a module: an activation stage, or a weight parametrization."""

    def __init__(self, qparams: _QParams) -> None:
        super().__init__()
        self.qparams = qparams

    def forward(self, x: Tensor) -> Tensor:
        return self.qparams.fake_quantize(x)


def _qdq_layer(layer: QuantModule, batchnorm: nn.BatchNorm2d | None = None) -> nn.Module | None:
    """Export-only stand-in for a quantized layer: input fake-quant, then the float layer whose
    weight is parametrized by a fake-quant (works for any layer type, unlike a per-type forward).

    The weight holds the student's quantized weight, so the exported QuantizeLinear of it
    reproduces the student's integers exactly and can be folded into an initializer. With the
    ``batchnorm`` that reads the layer's output, that BatchNorm is folded in, or None is
    returned where it cannot be (``_fold_batchnorm``).
    """
    w_quantizer, a_quantizer = layer.weight_quantizer, layer.act_quantizer
    grid = w_quantizer.grid()
    weight_qparams = _weight_qparams(grid, bool(w_quantizer.channels))
    with torch.no_grad():
        quantized = layer.quantized_weight()
    float_layer = layer.to_float()  # a deep copy's: free to overwrite
    if batchnorm is not None:
        folded = _fold_batchnorm(batchnorm, quantized, float_layer.bias, weight_qparams, grid)
        if folded is None:
            return None
        quantized, bias, weight_qparams = folded
        float_layer.bias = nn.Parameter(bias, requires_grad=False)
    float_layer.weight = nn.Parameter(quantized, requires_grad=False)
    parametrize.register_parametrization(float_layer, "weight", _FakeQuant(weight_qparams))
    return nn.Sequential(_FakeQuant(_activation_qparams(a_quantizer.grid())), float_layer)


@torch.no_grad()
def _fold_batchnorm(
    batchnorm: nn.BatchNorm2d, weight: Tensor, bias: Tensor | None, qparams: _QParams, grid: IntGrid
) -> tuple[Tensor, Tensor, _QParams] | None:
    """Weight, bias and per-channel weight Q/DQ of the convolution followed by ``batchnorm``.

    BatchNorm scales each output channel by ``gain``: the folded weight keeps its integer codes
    with each channel's scale times ``|gain|`` (exact: TensorRT's per-channel scales). A
    negative gain negates that channel's codes, which must stay on the grid's range (a b-bit
    grid's -2**(b-1) has no positive twin); otherwise the BatchNorm stays unfolded.
    """
    channels = weight.shape[0]
    gain = torch.rsqrt(batchnorm.running_var.float() + batchnorm.eps)
    if batchnorm.weight is not None:
        gain = gain * batchnorm.weight.float()
    shift = -batchnorm.running_mean.float() * gain
    if batchnorm.bias is not None:
        shift = shift + batchnorm.bias.float()
    view = (-1,) + (1,) * (weight.dim() - 1)
    scale = torch.as_tensor(qparams.scale, dtype=torch.float32).expand(channels)
    codes = torch.round(weight / scale.view(view))
    zero_point = grid.zero_point.float().reshape(-1).expand(channels)
    low, high = (grid.qmin - zero_point).view(view), (grid.qmax - zero_point).view(view)
    negated = torch.where(gain.view(view) < 0, -codes, codes)
    if bool(((negated < low) | (negated > high)).any()):
        return None
    folded_scale = (scale * gain.abs()).contiguous()
    folded_bias = (bias.float() if bias is not None else torch.zeros(channels)) * gain + shift
    folded = _QParams(folded_scale, torch.zeros(channels, dtype=torch.int32), qparams.type_range)
    return weight * gain.view(view), folded_bias, folded


class _QuantLeafTracer(fx.Tracer):
    """Traces a student without entering its quantized layers, additions and poolings."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, QuantModule | QuantOp) or super().is_leaf_module(
            module, qualified_name
        )


def _conv_batchnorm_pairs(model: nn.Module) -> dict[str, str]:
    """Quantized convolution -> the eval-mode BatchNorm2d that alone reads its output."""
    try:
        graph = (
            model.graph if isinstance(model, fx.GraphModule) else _QuantLeafTracer().trace(model)
        )
    except Exception:  # noqa: BLE001 - untraceable: nothing folded, the checker says so
        return {}
    modules = dict(model.named_modules())
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), QuantConv2d):
            continue
        users = list(node.users)
        if (
            len(users) == 1
            and users[0].op == "call_module"
            and users[0].args[:1] == (node,)
            and isinstance(modules.get(users[0].target), nn.BatchNorm2d)
        ):
            pairs[str(node.target)] = str(users[0].target)
    return pairs


class _QDQOp(nn.Module):
    """Export-only stand-in for a ``QuantOp`` (a residual addition, a pooling): each input
    fake-quantized, then the op in float."""

    def __init__(self, op: QuantOp) -> None:
        super().__init__()
        self.inputs = nn.ModuleList(
            _FakeQuant(_activation_qparams(q.grid())) for q in op.input_quantizers
        )  # type: ignore[operator]
        self.float_op = op.float_op

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.float_op(
            *(quantize(x) for quantize, x in zip(self.inputs, inputs, strict=True))
        )


def export_qdq_onnx(
    student: nn.Module, input_shape: tuple[int, int, int], path: Path, *, opset: int = 17
) -> None:
    """Writes an ONNX model with QuantizeLinear/DequantizeLinear around every quantized layer's
    weight and input activation and the inputs of every ``QuantOp``; dynamic batch dim; input
    named "input", output "logits"."""
    if opset < MIN_OPSET:
        raise ValueError(f"QDQ export needs opset >= {MIN_OPSET} (per-channel), got {opset}")
    model = copy.deepcopy(student).cpu().float().eval()
    layers = list(quant_layers(model))
    if not layers:
        raise ValueError("the model has no quantized layers; prepare() it first")
    batchnorms = _conv_batchnorm_pairs(model)
    for name, layer in layers:
        stand_in = None
        if name in batchnorms:
            stand_in = _qdq_layer(layer, model.get_submodule(batchnorms[name]))  # type: ignore[arg-type]
            if stand_in is not None:
                model.set_submodule(batchnorms[name], nn.Identity())  # folded into the stand-in
        model.set_submodule(name, _qdq_layer(layer) if stand_in is None else stand_in)
    for name, op in list(quant_ops(model)):
        model.set_submodule(name, _QDQOp(op))
    # The TorchScript exporter (deprecated, present in torch <= 2.14): torch.export, under the
    # dynamo exporter, has no fake-tensor kernel for fake_quantize (..._cachemask) in torch 2.14.
    # TorchScript also writes the opset asked for and is fast; its deprecation warnings are noise.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based export"
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, *input_shape),),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    onnx_model = onnx.load(str(path))
    _fold_constant_quantize(onnx_model.graph)
    onnx.checker.check_model(onnx_model, full_check=True)
    onnx.save(onnx_model, str(path))


def write_cpu_variant(qdq_path: Path, path: Path) -> int:
    """``model_qdq_cpu.onnx``: ``qdq_path`` with every non-negative int8 activation as uint8.

    TensorRT takes int8 Q/DQ only, and ``model_qdq.onnx`` follows it. x86 CPUs' int8 kernels
    (VNNI) multiply unsigned by signed bytes: a signed activation costs OpenVINO a shift and a
    compensation term, about 15% per convolution here (BENCHMARKS.md, int8-speed-*). An
    activation that a ``Clip`` at 0 or more feeds (every unsigned grid exported as int8) has the
    same codes in uint8 with zero point 0, so the values, and parity, are unchanged. A ReLU whose
    readers clamp at 0 anyway (such a Clip, a uint8 quantization with zero point 0) is dropped:
    OpenVINO merges those into the convolution's quantization, and every op it fuses into a
    convolution costs per output value (``_drop_redundant_relus``). Returns the number of
    activations changed.
    """
    model = onnx.load(str(qdq_path))
    graph = model.graph
    constants = tensorrt_rules.constant_arrays(graph)
    producer = {name: node for node in graph.node for name in node.output}
    dequantizers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            dequantizers.setdefault(node.input[0], []).append(node)
    uint8_zero = "uint8_zero_point"
    changed = 0
    for node in graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        clip = producer.get(node.input[0])
        if clip is None or clip.op_type != "Clip":
            continue
        zero_point = constants.get(node.input[2]) if len(node.input) > 2 else None
        low = constants.get(clip.input[1]) if len(clip.input) > 1 else None
        if zero_point is None or zero_point.dtype != np.int8 or zero_point.any():
            continue
        if low is None or float(low) < 0:
            continue
        for quantizer in (node, *dequantizers.get(node.output[0], [])):
            quantizer.input[2] = uint8_zero
        changed += 1
    graph.initializer.append(numpy_helper.from_array(np.array(0, np.uint8), uint8_zero))
    _drop_redundant_relus(graph, constants)
    _prune(graph)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return changed


def _drop_redundant_relus(graph: onnx.GraphProto, constants: dict[str, np.ndarray]) -> None:
    """Drops each ReLU whose every reader clamps at 0 anyway: a Clip with a lower bound >= 0
    (Clip(Relu(x)) = Clip(x)), or a QuantizeLinear to uint8 with zero point 0, which saturates
    a negative value to code 0, that is to 0. The readers read x instead, and ``_prune`` drops
    the ReLU. One with any other reader stays, so that x keeps a single reader."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {output.name for output in graph.output}
    for relu in [node for node in graph.node if node.op_type == "Relu"]:
        users = readers.get(relu.output[0], [])
        if not users or relu.output[0] in outputs:
            continue
        if all(_clamps_at_zero(user, relu.output[0], constants) for user in users):
            for user in users:
                user.input[0] = relu.input[0]


def _clamps_at_zero(node: onnx.NodeProto, name: str, constants: dict[str, np.ndarray]) -> bool:
    """``node`` maps every negative value of its data input ``name`` as it maps 0."""
    if node.input[0] != name or name in node.input[1:]:
        return False
    bound = constants.get(node.input[1]) if len(node.input) > 1 else None
    if node.op_type == "Clip":
        return bound is not None and bound.size == 1 and float(bound) >= 0
    if node.op_type == "QuantizeLinear" and len(node.input) > 2:
        zero_point = constants.get(node.input[2])
        return zero_point is not None and zero_point.dtype == np.uint8 and not zero_point.any()
    return False


def tensorrt_report(student: nn.Module, path: Path) -> dict[str, Any]:
    """``core.export.tensorrt_rules.check`` of the exported file, with each layer's bits:
    {"follows_rules": bool, "violation_count": n, "violations": the first ``MAX_REPORTED``}."""
    model = onnx.load(str(path))
    violations = tensorrt_rules.check(model, layer_bits_by_node(student, model))
    return {
        "follows_rules": not violations,
        "violation_count": len(violations),
        "violations": [v.as_dict() for v in violations[:MAX_REPORTED]],
    }


def layer_bits_by_node(student: nn.Module, model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """(weight bits, activation bits) of each exported quantized layer, by ONNX node name.

    The exporter names a node after its module path, and ``_qdq_layer`` puts each quantized
    layer at ``<name>.1``: ``/layer1/layer1.0/conv1/layer1.0.conv1.1/Conv`` is ``layer1.0.conv1``.
    """
    bits = {
        f"{name}.1": (layer.weight_quantizer.bits, layer.act_quantizer.bits)
        for name, layer in quant_layers(student)
    }
    scopes = {node.name: node.name.split("/")[-2:][0] for node in model.graph.node}
    return {node: bits[scope] for node, scope in scopes.items() if scope in bits}


def _fold_constant_quantize(graph: onnx.GraphProto) -> None:
    """Replace QuantizeLinear of a constant (the weights) by its integer result, as initializer.

    Uses QuantizeLinear's definition: saturate(round_half_even(x / scale) + zero_point).
    """
    constants = tensorrt_rules.constant_arrays(graph)
    kept = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or not all(name in constants for name in node.input):
            kept.append(node)
            continue
        x, scale, zero_point = (constants[name] for name in node.input)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1:  # per channel: broadcast along ``axis``
            shape = [1] * x.ndim
            shape[axis] = -1
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        info = np.iinfo(zero_point.dtype)
        q = np.rint(x.astype(np.float32) / scale) + zero_point.astype(np.float32)
        q = np.clip(q, info.min, info.max).astype(zero_point.dtype)
        graph.initializer.append(numpy_helper.from_array(q, node.output[0]))
    del graph.node[:]
    graph.node.extend(kept)
    _prune(graph)


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers nothing reads any more (the float weights, once folded)."""
    while True:
        used = {name for node in graph.node for name in node.input}
        used |= {value.name for value in graph.output}
        dead = [node for node in graph.node if not any(name in used for name in node.output)]
        for node in dead:
            graph.node.remove(node)
        if not dead:
            break
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)


def onnx_parity(
    student: nn.Module,
    onnx_path: Path,
    batches: Iterable[Tensor],
    *,
    disabled_optimizers: Sequence[str] = FILE_SEMANTICS,
) -> dict[str, float]:
    """Runs both on float input batches: {"top1_agreement": fraction of equal argmax,
    "max_abs_diff": largest logit difference, "mean_abs_diff": mean one, "images": n}.

    The mean tells a sound export (most logits equal to ~1e-6, an occasional rounding flip at a
    grid boundary) from a wrong one better than the max, which one such flip sets.
    By default this measures the file's own semantics (see ``FILE_SEMANTICS``); pass
    ``disabled_optimizers=()`` for what ONNX Runtime computes with its default rewrites.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1  # a check on a few batches: stay out of training's way
    session = ort.InferenceSession(
        str(onnx_path),
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(disabled_optimizers),
    )
    input_name = session.get_inputs()[0].name
    was_training = student.training
    device = next(student.parameters()).device
    student.eval()
    agree, images, max_abs_diff, sum_abs_diff, logits = 0, 0, 0.0, 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                expected = student(batch.to(device)).detach().cpu().float().numpy()
                (actual,) = session.run(None, {input_name: batch.detach().cpu().float().numpy()})
                diff = np.abs(expected - actual)
                agree += int((expected.argmax(-1) == actual.argmax(-1)).sum())
                images += len(batch)
                max_abs_diff = max(max_abs_diff, float(diff.max()))
                sum_abs_diff, logits = sum_abs_diff + float(diff.sum()), logits + diff.size
    finally:
        student.train(was_training)
    nan = float("nan")
    return {
        "top1_agreement": agree / images if images else nan,
        "max_abs_diff": max_abs_diff,
        "mean_abs_diff": sum_abs_diff / logits if logits else nan,
        "images": images,
    }
