"""Quantized Conv2d/Linear and the swap that turns a teacher copy into a student.

``prepare`` deep-copies the teacher and replaces every ``nn.Conv2d`` / ``nn.Linear`` with a
subclass that fake-quantizes its weight and its input activation. ``QuantConv2d.from_float`` and
``to_float`` share the Parameters, so the swap is reversible and costs no copy. With
``QuantSpec.residual_bits`` it also routes every residual addition through a ``QuantAdd`` and
gives each tensor one input quantizer, whoever reads it (``share_input_quantizers``); with
``QuantSpec.pool_bits`` every average pooling reads its input through a ``QuantPool``.
"""

from __future__ import annotations

import copy
import fnmatch
import operator
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from onnx2torch.node_converters.binary_math_operations import OnnxBinaryMathOperation
from onnx2torch.node_converters.global_average_pool import (
    OnnxGlobalAveragePool,
    OnnxGlobalAveragePoolWithKnownInputShape,
)
from torch import Tensor, fx, nn

from core.sqakd.quantizers import Quantizer, create_quantizer, passes_of


@dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How to quantize a model; JSON-serialisable with ``asdict``."""

    method: str
    weight_bits: int
    activation_bits: int
    per_channel: bool = True
    first_last_bits: int | None = 8
    layer_bits: dict[str, int] = field(default_factory=dict)  # name pattern -> bits (w and a)
    int8_grids: bool = False  # TensorRT-compatible grids (``Quantizer.int8``)
    uint8_grids: bool = False  # the CPU's grids: uint8 from zero, 256 levels (``Quantizer.uint8``)
    # Bits of both inputs of every residual addition (``QuantAdd``); None: plain additions.
    residual_bits: int | None = None
    # Bits of every average pooling's input (``QuantPool``); None: pooling of float values.
    pool_bits: int | None = None

    def __post_init__(self) -> None:
        if self.int8_grids and self.uint8_grids:
            raise ValueError("int8_grids (TensorRT) and uint8_grids (CPU) exclude each other")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class QuantModule:
    """Mixin of the quantized layers: two quantizers, and the swap from and to the float layer."""

    float_cls: type[nn.Module]
    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_quantizer: Quantizer
    act_quantizer: Quantizer

    @classmethod
    def from_float(
        cls,
        layer: nn.Module,
        method: str,
        weight_bits: int,
        act_bits: int,
        per_channel: bool,
        int8: bool = False,
        uint8: bool = False,
    ) -> QuantModule:
        quant = _rebind(layer, cls)
        out_channels = quant.weight.shape[0]
        channels = out_channels if per_channel else None
        quant.weight_quantizer = create_quantizer(
            method, weight_bits, weight=True, channels=channels, int8=int8, uint8=uint8
        )
        quant.act_quantizer = create_quantizer(
            method, act_bits, weight=False, int8=int8, uint8=uint8
        )
        quant.weight_quantizer.to(quant.weight.device)  # quantizers live beside their layer
        quant.act_quantizer.to(quant.weight.device)
        return quant

    def to_float(self) -> nn.Module:
        layer = _rebind(self, self.float_cls)  # type: ignore[arg-type]
        del layer._modules["weight_quantizer"], layer._modules["act_quantizer"]
        return layer

    def quantized_weight(self) -> Tensor:
        return self.weight_quantizer(self.weight)

    @torch.no_grad()
    def scale_output_(self, gain: Tensor, shift: Tensor) -> None:
        """Make the layer compute ``gain * output + shift`` (per output channel).

        A per-channel weight grid scales with its weights, so every weight keeps its code; a
        per-tensor grid cannot, and is refitted to the scaled weights.
        """
        self.weight.mul_(gain.view((-1,) + (1,) * (self.weight.dim() - 1)))
        if self.weight_quantizer.channels:
            self.weight_quantizer.rescale_(gain)
        else:
            self.weight_quantizer.calibrate(self.weight, signed=True)
        if self.bias is None:
            self.bias = nn.Parameter(torch.zeros_like(shift))
        self.bias.mul_(gain).add_(shift)


def _rebind(layer: nn.Module, cls: type) -> Any:
    """``layer``'s state under another class, sharing its Parameters (no copy)."""
    rebound = cls.__new__(cls)
    # Own copies of every registry (parameters, modules, hooks); the Parameters stay shared.
    rebound.__dict__ = {
        k: v.copy() if isinstance(v, dict) else v for k, v in layer.__dict__.items()
    }
    return rebound


class QuantConv2d(QuantModule, nn.Conv2d):
    float_cls = nn.Conv2d

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.act_quantizer(x), self.quantized_weight(), self.bias)


class QuantLinear(QuantModule, nn.Linear):
    float_cls = nn.Linear

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.act_quantizer(x), self.quantized_weight(), self.bias)


QUANT_MODULES: dict[type[nn.Module], type[QuantModule]] = {
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
}


class QuantOp(nn.Module):
    """A float op without weights whose every input is fake-quantized first, one quantizer per
    input (``input_quantizers``): a residual addition (``QuantAdd``), a pooling (``QuantPool``).
    """

    input_quantizers: nn.ModuleList

    def float_op(self, *inputs: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, *inputs: Tensor) -> Tensor:
        quantized = (quantize(x) for quantize, x in zip(self.input_quantizers, inputs, strict=True))
        return self.float_op(*quantized)


class QuantAdd(QuantOp):
    """A residual addition whose two inputs are fake-quantized.

    NVIDIA's QAT guidance puts Q/DQ on both inputs of a residual addition, so that TensorRT
    fuses the addition into the convolution before it and runs the block in int8 (OpenVINO
    does the same on a CPU, as ONNX Runtime's PTQ models place them); the student quantizes
    them too, so that the exported model computes exactly what the student does.
    """

    def __init__(self, method: str, bits: int, *, int8: bool, uint8: bool = False) -> None:
        super().__init__()
        self.input_quantizers = nn.ModuleList(
            create_quantizer(method, bits, weight=False, int8=int8, uint8=uint8) for _ in range(2)
        )

    def float_op(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b


# Average poolings: ONNX Runtime's static PTQ quantizes the input of each (GlobalAveragePool,
# AveragePool), and so OpenVINO runs the block before it with an 8-bit output; in float, the
# CIFAR-10 ResNet-20 ran 7% slower at batch 1 under OpenVINO (AVX2, quiet cores).
POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    OnnxGlobalAveragePool,
    OnnxGlobalAveragePoolWithKnownInputShape,
)


class QuantPool(QuantOp):
    """An average pooling (one of ``POOL_MODULES``) whose input is fake-quantized: the pooled
    values are the exported model's, which averages the quantized input. ``pool`` is the
    float module itself (``convert`` puts it back)."""

    def __init__(
        self, pool: nn.Module, method: str, bits: int, *, int8: bool, uint8: bool = False
    ) -> None:
        super().__init__()
        self.pool = pool
        self.input_quantizers = nn.ModuleList(
            [create_quantizer(method, bits, weight=False, int8=int8, uint8=uint8)]
        )

    def float_op(self, x: Tensor) -> Tensor:
        return self.pool(x)


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantConv2d | QuantLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, QuantConv2d | QuantLinear):
            yield name, module


def quant_ops(model: nn.Module) -> Iterator[tuple[str, QuantOp]]:
    for name, module in model.named_modules():
        if isinstance(module, QuantOp):
            yield name, module


def residual_adds(model: nn.Module) -> Iterator[tuple[str, QuantAdd]]:
    for name, module in quant_ops(model):
        if isinstance(module, QuantAdd):
            yield name, module


def quant_pools(model: nn.Module) -> Iterator[tuple[str, QuantPool]]:
    for name, module in quant_ops(model):
        if isinstance(module, QuantPool):
            yield name, module


def quantizers(model: nn.Module) -> Iterator[Quantizer]:
    """Every quantizer once: each layer's weight and input ones, then the residual additions'
    and poolings' in module order (an input quantizer shared by several readers,
    ``share_input_quantizers``, comes once)."""
    seen: set[int] = set()
    for _, layer in quant_layers(model):
        for quantizer in (layer.weight_quantizer, layer.act_quantizer):
            if id(quantizer) not in seen:
                seen.add(id(quantizer))
                yield quantizer
    for _, op in quant_ops(model):
        for quantizer in op.input_quantizers:
            if id(quantizer) not in seen:
                seen.add(id(quantizer))
                yield quantizer  # type: ignore[misc]


def layer_bits(names: list[str], spec: QuantSpec) -> dict[str, tuple[int, int]]:
    """(weight bits, activation bits) per layer: job bits, first/last override, name patterns."""
    bits = {name: (spec.weight_bits, spec.activation_bits) for name in names}
    if spec.first_last_bits is not None and names:
        for edge in {names[0], names[-1]}:
            bits[edge] = (spec.first_last_bits, spec.first_last_bits)
    for pattern, value in spec.layer_bits.items():
        matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matched:  # a typo would otherwise quantize the layer at the job's bits, silently
            raise UnknownLayerError(pattern, names)
        for name in matched:
            bits[name] = (value, value)
    return bits


class UnknownLayerError(ValueError):
    def __init__(self, pattern: str, names: list[str]) -> None:
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        super().__init__(f"layer_bits pattern {pattern!r} matches no layer; layers: {shown}")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def prepare(teacher: nn.Module, spec: QuantSpec) -> nn.Module:
    """A student: a deep copy of ``teacher`` with every Conv2d/Linear quantized.

    The first and last of them (in module order, which is graph order for converted ONNX
    models) keep ``first_last_bits``: they hold little of the compute and much of the accuracy.
    """
    student = copy.deepcopy(teacher)
    names = [name for name, m in student.named_modules() if type(m) in QUANT_MODULES]
    if spec.residual_bits is not None:  # before the swap: fx traces through float layers only
        student = quantize_residual_adds(
            student, spec.method, spec.residual_bits, spec.int8_grids, spec.uint8_grids
        )
    for name, (w_bits, a_bits) in layer_bits(names, spec).items():
        float_layer = student.get_submodule(name)
        quant_cls = QUANT_MODULES[type(float_layer)]
        quant_layer = quant_cls.from_float(
            float_layer,
            spec.method,
            w_bits,
            a_bits,
            spec.per_channel,
            spec.int8_grids,
            spec.uint8_grids,
        )
        _set_submodule(student, name, quant_layer)  # type: ignore[arg-type]
    if spec.pool_bits is not None:
        quantize_pool_inputs(
            student, spec.method, spec.pool_bits, spec.int8_grids, spec.uint8_grids
        )
    if spec.residual_bits is not None or spec.pool_bits is not None:
        share_input_quantizers(student)
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    return student


def quantize_pool_inputs(
    model: nn.Module, method: str, bits: int, int8: bool, uint8: bool = False
) -> None:
    """Every average pooling of ``model`` (``POOL_MODULES``) becomes a ``QuantPool`` under its
    own name: a module swap, traced or not."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    for name, pool in list(model.named_modules()):
        if isinstance(pool, POOL_MODULES):
            quant_pool = QuantPool(pool, method, bits, int8=int8, uint8=uint8).to(device)
            _set_submodule(model, name, quant_pool)


def share_input_quantizers(model: nn.Module) -> None:
    """One input quantizer per tensor: the quantized layers (of equal activation bits) and the
    residual additions and poolings (``QuantOp``) that read one tensor take the quantizer of the
    first layer reading it.

    The export then quantizes each tensor once, as TensorRT's and OpenVINO's int8 fusions need:
    a block's input read by its first convolution, its shortcut convolution and its residual
    addition is quantized by the producing op, and never needed in float. So the identity input
    of a residual addition has that layer's bits; only an input no layer reads (a convolution's
    output, for example) keeps the addition's own ``residual_bits`` quantizer. Needs the fx graph
    (``quantize_residual_adds``); an untraced model keeps one quantizer per reader.
    """
    if not isinstance(model, fx.GraphModule):
        return
    for node in model.graph.nodes:
        layers: list[QuantModule] = []
        op_slots: list[tuple[QuantOp, int]] = []
        for user in node.users:
            module = model.get_submodule(str(user.target)) if user.op == "call_module" else None
            if isinstance(module, QuantModule) and user.args[:1] == (node,):
                layers.append(module)
            elif isinstance(module, QuantOp):
                inputs = user.args[: len(module.input_quantizers)]
                op_slots += [(module, i) for i, arg in enumerate(inputs) if arg is node]
        if not layers:
            continue
        shared = layers[0].act_quantizer
        for layer in layers[1:]:
            if layer.act_quantizer.bits == shared.bits:
                layer.act_quantizer = shared
        for op, slot in op_slots:
            op.input_quantizers[slot] = shared
    passes_of(model)  # so that each shared quantizer quantizes its tensor once per forward


def quantize_residual_adds(
    model: nn.Module, method: str, bits: int, int8: bool, uint8: bool = False
) -> nn.Module:
    """``model`` with every addition of two computed tensors done by a ``QuantAdd``.

    Imported ONNX models are torch.fx graphs already, their additions modules, each replaced
    under its own name; any other model is traced with torch.fx first (module names are kept)
    and each ``a + b`` becomes ``<block>.residual_add``. A model fx cannot trace (Python
    control flow on tensor values) keeps plain additions; the export's TensorRT report then
    names them.
    """
    if not isinstance(model, fx.GraphModule):
        try:
            model = fx.symbolic_trace(model)
        except Exception:  # noqa: BLE001 - fx raises many types on untraceable code
            return model
    device = next(iter(model.parameters()), torch.empty(0)).device
    for node in list(model.graph.nodes):
        if not _is_residual_add(model, node):
            continue
        add = QuantAdd(method, bits, int8=int8, uint8=uint8).to(device)
        if node.op == "call_module":
            model.set_submodule(node.target, add)
            continue
        name = _free_name(model, node)
        model.add_submodule(name, add)
        with model.graph.inserting_after(node):
            replacement = model.graph.call_module(name, tuple(node.args[:2]))
        node.replace_all_uses_with(replacement)
        model.graph.erase_node(node)
    model.recompile()
    return model


def _is_residual_add(model: fx.GraphModule, node: fx.Node) -> bool:
    """An addition of two tensors computed from the input (not a bias, not a constant)."""
    if node.op == "call_module":
        module = model.get_submodule(str(node.target))
        is_add = isinstance(module, OnnxBinaryMathOperation) and (
            module.math_op_function is torch.add and module.broadcast != 1
        )
    else:
        is_add = node.op == "call_function" and node.target in (operator.add, torch.add)
    operands = node.args[:2]
    return (
        is_add
        and len(node.args) == 2
        and not node.kwargs
        and all(
            isinstance(a, fx.Node) and a.op not in ("get_attr", "placeholder") for a in operands
        )
    )


def _free_name(model: fx.GraphModule, node: fx.Node) -> str:
    """``<innermost module>.residual_add`` (``_1``, ... when a block adds twice)."""
    stack = list(node.meta.get("nn_module_stack") or {})
    base = f"{stack[-1]}.residual_add" if stack else "residual_add"
    names = {name for name, _ in model.named_modules()}
    name, index = base, 0
    while name in names:
        index += 1
        name = f"{base}_{index}"
    return name


def convert(student: nn.Module) -> nn.Module:
    """The float model back (same Parameters): undoes ``prepare``'s swap of the layers and the
    poolings (quantized residual additions stay: they have no float module to go back to)."""
    for name, layer in list(quant_layers(student)):
        _set_submodule(student, name, layer.to_float())
    for name, pool in list(quant_pools(student)):
        _set_submodule(student, name, pool.pool)
    return student


def describe_layers(student: nn.Module) -> list[dict[str, Any]]:
    """Per-layer bits and grids, for ``quant_config.json``."""
    return [
        {
            "name": name,
            "kind": type(layer).float_cls.__name__,
            "weight_bits": layer.weight_quantizer.bits,
            "activation_bits": layer.act_quantizer.bits,
            "activation_signed": layer.act_quantizer.signed,
            "per_channel": bool(layer.weight_quantizer.channels),
        }
        for name, layer in quant_layers(student)
    ]
