"""Static check of a QDQ ONNX model against TensorRT's explicit-quantization rules.

TensorRT builds INT8 kernels from an ONNX graph's QuantizeLinear/DequantizeLinear (Q/DQ) pairs
only where they sit as it expects; elsewhere it falls back to float or refuses the model. The
rules checked here, each a ``Violation.rule`` name:

- ``opset``: opset 13 or later (per-channel Q/DQ with ``axis``).
- ``int8``: every Q/DQ is signed int8 with zero point 0 (TensorRT supports symmetric INT8 only).
- ``pair``: a QuantizeLinear feeds DequantizeLinear nodes with the same scale and zero point.
- ``weight_scale``: a weight's DequantizeLinear (constant int8 input) has one scale, or one per
  output channel on the output-channel axis (axis 0 for Conv and transposed Gemm weights).
- ``activation_scale``: an activation's Q/DQ has one scale (per tensor).
- ``batchnorm``: no BatchNormalization left (folded into the convolutions).
- ``layer_input``: each Conv, ConvTranspose, Gemm and MatMul reads its input and its weight
  through DequantizeLinear (Q/DQ on every quantized layer's inputs).
- ``residual_add``: each Add of two computed tensors reads both through DequantizeLinear, as
  NVIDIA's QAT guidance places Q/DQ on residual connections so that the addition fuses into the
  convolution before it.
- ``weight_grid``: with ``layer_bits`` given (layer node name -> weight bits, activation
  bits), the int8 weights of a layer quantized below 8 bits lie in its b-bit range
  ``-2**(b-1)..2**(b-1)-1`` or, for DoReFa-style odd grids, ``-(2**b-1)..2**b-1``; and
  (``activation_clip``) an input quantized below 8 bits is clipped to its range before its
  QuantizeLinear, which saturates at int8's range only.

``check`` returns every violation found (empty: the model follows the rules).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

MIN_OPSET = 13
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class Violation:
    rule: str
    node: str  # the node's name, or its first output where it has no name
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "node": self.node, "message": self.message}


def constant_arrays(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every tensor of ``graph`` known without running it: initializers, Constant nodes, and
    Identity of those (the exporter shares equal constants that way), by name."""
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:  # topological order: an Identity comes after what it copies
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in constants:
            constants[node.output[0]] = constants[node.input[0]]
    return constants


class _Graph:
    """Lookups over one graph: constants by name, the node producing each tensor."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.constants = constant_arrays(graph)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers[name].append(node)

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def dequantized(self, name: str) -> onnx.NodeProto | None:
        """The DequantizeLinear that produces ``name``, if one does."""
        node = self.producer.get(name)
        return node if node is not None and node.op_type == "DequantizeLinear" else None


def _label(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _qparams(g: _Graph, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(scale, zero point or None) of a Q/DQ node, or None if they are not constants."""
    if not g.is_constant(node.input[1]):
        return None
    zero = g.constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return g.constants[node.input[1]], zero


def _check_qdq(g: _Graph, node: onnx.NodeProto, out: list[Violation]) -> None:
    params = _qparams(g, node)
    if params is None:
        out.append(Violation("int8", _label(node), "scale is not a constant"))
        return
    scale, zero = params
    if zero is None or zero.dtype != np.int8:
        dtype = "none (uint8)" if zero is None else str(zero.dtype)
        out.append(Violation("int8", _label(node), f"zero point type {dtype}, not int8"))
    elif np.any(zero != 0):
        out.append(Violation("int8", _label(node), "zero point is not 0 (asymmetric)"))
    weight = node.op_type == "DequantizeLinear" and g.is_constant(node.input[0])
    if not weight and scale.size != 1:
        out.append(
            Violation("activation_scale", _label(node), f"{scale.size} scales, not one per tensor")
        )
    if weight and scale.size != 1:
        values = g.constants[node.input[0]]
        axis = _axis(node) % values.ndim
        layer = next(iter(g.consumers[node.output[0]]), None)
        expected = _output_channel_axis(layer, values.ndim)
        if axis != expected or scale.size != values.shape[axis]:
            out.append(
                Violation(
                    "weight_scale",
                    _label(node),
                    f"per-channel scales on axis {axis} ({scale.size} of them); the output "
                    f"channels are axis {expected} ({values.shape[expected]})",
                )
            )


def _output_channel_axis(layer: onnx.NodeProto | None, ndim: int) -> int:
    if layer is None or layer.op_type == "Conv":
        return 0
    if layer.op_type == "ConvTranspose":
        return 1
    if layer.op_type == "Gemm":
        trans_b = next((a.i for a in layer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return ndim - 1  # MatMul: [in, out]


def _check_pairs(g: _Graph, node: onnx.NodeProto, out: list[Violation]) -> None:
    params = _qparams(g, node)
    for consumer in g.consumers[node.output[0]]:
        if consumer.op_type != "DequantizeLinear":
            out.append(
                Violation("pair", _label(node), f"feeds {consumer.op_type}, not DequantizeLinear")
            )
            continue
        other = _qparams(g, consumer)
        same = (
            params is not None
            and other is not None
            and all(
                (a is None and b is None)
                or (a is not None and b is not None and np.array_equal(a, b))
                for a, b in zip(params, other, strict=True)
            )
        )
        if not same:
            out.append(
                Violation("pair", _label(consumer), "scale or zero point differs from its Q's")
            )


def _check_layer_inputs(
    g: _Graph, node: onnx.NodeProto, bits: tuple[int, int] | None, out: list[Violation]
) -> None:
    data, weight = node.input[0], node.input[1]
    for role, name in (("input", data), ("weight", weight)):
        if g.dequantized(name) is None:
            out.append(
                Violation("layer_input", _label(node), f"its {role} is not read through a DQ")
            )
    if bits is None:
        return
    weight_bits, activation_bits = bits
    _check_weight_grid(g, node, weight_bits, out)
    data_dq = g.dequantized(data)
    quantize = g.producer.get(data_dq.input[0]) if data_dq is not None else None
    if activation_bits < 8 and quantize is not None and quantize.op_type == "QuantizeLinear":
        source = g.producer.get(quantize.input[0])
        if source is None or source.op_type != "Clip":
            out.append(
                Violation(
                    "activation_clip",
                    _label(node),
                    f"a {activation_bits}-bit input is not clipped to its range before "
                    "QuantizeLinear",
                )
            )


def _check_weight_grid(g: _Graph, node: onnx.NodeProto, bits: int, out: list[Violation]) -> None:
    weight_dq = g.dequantized(node.input[1])
    if bits < 8 and weight_dq is not None and g.is_constant(weight_dq.input[0]):
        values = g.constants[weight_dq.input[0]].astype(np.int32)
        half, odd = 2 ** (bits - 1), 2**bits - 1
        plain = values.min() >= -half and values.max() <= half - 1
        odd_grid = bool(np.all(values % 2 != 0)) and np.abs(values).max() <= odd
        if not (plain or odd_grid):
            out.append(
                Violation(
                    "weight_grid",
                    _label(node),
                    f"int8 weights span {values.min()}..{values.max()}, off the {bits}-bit grid",
                )
            )


def _all_dequantized_or_bias(g: _Graph, add: onnx.NodeProto) -> bool:
    """An Add with a constant input adds a bias; one of two computed tensors is a residual
    connection, whose inputs must both come through DequantizeLinear."""
    if any(g.is_constant(name) for name in add.input):
        return True
    return all(g.dequantized(name) is not None for name in add.input)


def check(
    model: onnx.ModelProto, layer_bits: dict[str, tuple[int, int]] | None = None
) -> list[Violation]:
    """Every violation of the rules in this module's docstring; ``layer_bits`` maps a layer
    node's name to its (weight, activation) bits where the grid checks should run."""
    out: list[Violation] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        out.append(Violation("opset", "model", f"opset {opset}; per-channel Q/DQ needs 13+"))
    g = _Graph(model.graph)
    for node in model.graph.node:
        if node.op_type in QDQ_OPS:
            _check_qdq(g, node, out)
        if node.op_type == "QuantizeLinear":
            _check_pairs(g, node, out)
        elif node.op_type == "BatchNormalization":
            out.append(Violation("batchnorm", _label(node), "BatchNormalization is not folded"))
        elif node.op_type in LAYER_OPS:
            _check_layer_inputs(g, node, (layer_bits or {}).get(node.name), out)
        elif node.op_type == "Add" and not _all_dequantized_or_bias(g, node):
            out.append(
                Violation("residual_add", _label(node), "an input of the addition is not a DQ")
            )
    return out
