"""``model_int.safetensors``: a student's weights at their bit-width, and the loader that rebuilds
the fake-quant student from them, bit for bit.

Per quantized layer ``{name}``:

- ``{name}.weight.codes``: uint8, each weight's index on its grid, ``(q - qmin) / stride`` in
  ``0 .. 2**b - 1``, row-major, bit-packed: 8, 4 or 2 codes a byte at 1, 2 and 4 bits (3 bits
  in 4-bit nibbles), one a byte from 5 to 8 bits; the last byte zero-padded.
- ``{name}.weight.scale`` and ``.zero_point``: float32, one per output channel (or one), so a
  weight is ``(qmin + stride * index - zero_point) * scale``.
- ``{name}.bias`` if the layer has one (calibration may add one), float32.

Everything else in the student's state dict (activation quantizers' parameters, BatchNorm, any
other module) is stored as it is, and the safetensors metadata ``manifest`` (JSON) holds the
quantization spec and, per layer, its bits, grid and whether its input grid is signed, and per
quantized residual addition (``residual_adds``) and pooling (``pools``) whether each of its
input grids is.

``load_int_student(path, teacher)`` prepares a student of ``teacher`` with the manifest's spec,
loads that state, and sets each weight to its dequantized codes with the weight quantizer
switched off: the weights are already on their grid. Its outputs equal the trained student's
bit for bit: the dequantization is the same arithmetic as the quantizers' forward.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from core.sqakd.modules import (
    QuantModule,
    QuantOp,
    QuantSpec,
    prepare,
    quant_layers,
    quant_pools,
    residual_adds,
)
from core.sqakd.quantizers import IntGrid

FORMAT = "sqakd-int/1"


def container_bits(bits: int) -> int:
    """Bits a code takes in the file: 1, 2, 4 or 8 (3 bits go in 4, 5..7 in 8)."""
    return next(width for width in (1, 2, 4, 8) if width >= bits)


def pack(indices: Tensor, bits: int) -> Tensor:
    """Codes in ``0 .. 2**bits - 1`` as uint8, ``8 // container_bits(bits)`` codes a byte,
    the first code in the lowest bits."""
    width = container_bits(bits)
    flat = indices.reshape(-1).to(torch.uint8)
    if width == 8:
        return flat.clone()
    per_byte = 8 // width
    padded = torch.zeros(math.ceil(flat.numel() / per_byte) * per_byte, dtype=torch.uint8)
    padded[: flat.numel()] = flat
    groups = padded.view(-1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.uint8) * width
    return (groups << shifts).sum(dim=1, dtype=torch.uint8)


def unpack(packed: Tensor, bits: int, count: int) -> Tensor:
    """``pack``'s inverse: the first ``count`` codes, as int64."""
    width = container_bits(bits)
    if width == 8:
        return packed[:count].long()
    per_byte = 8 // width
    shifts = torch.arange(per_byte, dtype=torch.uint8) * width
    codes = (packed.view(-1, 1) >> shifts) & (2**width - 1)
    return codes.reshape(-1)[:count].long()


def weight_codes(layer: QuantModule) -> tuple[Tensor, IntGrid]:
    """The layer's quantized weight as grid indices ``(q - qmin) / stride``, and the grid."""
    grid = layer.weight_quantizer.grid()
    with torch.no_grad():
        quantized = layer.quantized_weight().detach().cpu()
    shape = (-1,) + (1,) * (quantized.dim() - 1) if grid.scale.numel() > 1 else ()
    scale = grid.scale.detach().cpu().float().reshape(shape)
    zero_point = grid.zero_point.detach().cpu().float().reshape(shape)
    q = (quantized / scale).round() + zero_point
    indices = ((q - grid.qmin) / grid.stride).round().long()
    if indices.min() < 0 or indices.max() >= 2**layer.weight_quantizer.bits:
        raise ValueError("a weight lies off its quantizer's grid")
    return indices, grid


def dequantize(indices: Tensor, grid: IntGrid, shape: torch.Size) -> Tensor:
    """The weight the quantizer computes for these codes: ``(q - zero_point) * scale``."""
    view = (-1,) + (1,) * (len(shape) - 1) if grid.scale.numel() > 1 else ()
    q = (indices * grid.stride + grid.qmin).float().reshape(shape)
    return (q - grid.zero_point.float().reshape(view)) * grid.scale.float().reshape(view)


def state_tensors(module: nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` as separate contiguous CPU tensors, as safetensors stores them:
    it refuses tensors that share memory, and a shared input quantizer's parameters appear under
    each reader's name (``share_input_quantizers``)."""
    return {
        key: value.detach().cpu().clone(memory_format=torch.contiguous_format)
        for key, value in module.state_dict().items()
    }


def save_int_checkpoint(student: nn.Module, spec: QuantSpec, path: Path) -> None:
    """Write ``student`` (prepared with ``spec``, trained) as ``model_int.safetensors``."""
    tensors: dict[str, Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    skipped: set[str] = set()
    for name, layer in quant_layers(student):
        indices, grid = weight_codes(layer)
        bits = layer.weight_quantizer.bits
        tensors[f"{name}.weight.codes"] = pack(indices, bits)
        tensors[f"{name}.weight.scale"] = grid.scale.detach().cpu().float().reshape(-1)
        tensors[f"{name}.weight.zero_point"] = grid.zero_point.detach().cpu().float().reshape(-1)
        layers[name] = {
            "weight_bits": bits,
            "activation_bits": layer.act_quantizer.bits,
            "weight_shape": list(layer.weight.shape),
            "qmin": grid.qmin,
            "qmax": grid.qmax,
            "stride": grid.stride,
            "container_bits": container_bits(bits),
            "activation_signed": layer.act_quantizer.signed,
            "has_bias": layer.bias is not None,
        }
        skipped.add(f"{name}.weight")
        skipped.update(
            f"{name}.weight_quantizer.{key}" for key in layer.weight_quantizer.state_dict()
        )
    tensors |= {key: value for key, value in state_tensors(student).items() if key not in skipped}
    manifest = {
        "format": FORMAT,
        "quant_spec": spec.to_dict(),
        "layers": layers,
        # each input quantizer's ranges are in the tensors, signed here
        "residual_adds": _input_signs(residual_adds(student)),
        "pools": _input_signs(quant_pools(student)),
    }
    save_file(tensors, str(path), metadata={"manifest": json.dumps(manifest)})


def _input_signs(ops: Iterable[tuple[str, QuantOp]]) -> dict[str, list[bool]]:
    return {name: [quantizer.signed for quantizer in op.input_quantizers] for name, op in ops}


def read_manifest(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as file:
        manifest = json.loads((file.metadata() or {}).get("manifest", "{}"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path.name} is not a {FORMAT} checkpoint")
    return manifest


def load_int_student(path: Path, teacher: nn.Module) -> nn.Module:
    """The fake-quant student stored in ``path``, rebuilt on ``teacher`` (the float model it
    was prepared from), in eval mode."""
    manifest = read_manifest(path)
    student = prepare(teacher, QuantSpec(**manifest["quant_spec"]))
    state: dict[str, Tensor] = {}
    with safe_open(str(path), framework="pt") as file:
        stored = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    for name, layer in quant_layers(student):
        info = manifest["layers"][name]
        grid = IntGrid(
            stored.pop(f"{name}.weight.scale"),
            stored.pop(f"{name}.weight.zero_point"),
            info["qmin"],
            info["qmax"],
            info["stride"],
        )
        codes = unpack(
            stored.pop(f"{name}.weight.codes"), info["weight_bits"], layer.weight.numel()
        )
        with torch.no_grad():
            layer.weight.copy_(dequantize(codes, grid, layer.weight.shape))
        layer.weight_quantizer.enabled = False  # the weight is on its grid already
        layer.act_quantizer.signed = info["activation_signed"]
        if info["has_bias"] and layer.bias is None:  # added by calibration
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]))
        state.update({f"{name}.weight": layer.weight.detach()})
        state.update(
            {
                f"{name}.weight_quantizer.{k}": v
                for k, v in layer.weight_quantizer.state_dict().items()
            }
        )
    for key, ops in (("residual_adds", residual_adds(student)), ("pools", quant_pools(student))):
        for name, op in ops:  # an older file: no "pools", and no pool_bits to ask for them
            for quantizer, signed in zip(op.input_quantizers, manifest[key][name], strict=True):
                quantizer.signed = signed
    student.load_state_dict(state | stored, strict=True)
    return student.eval()
