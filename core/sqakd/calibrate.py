"""Initial quantizer ranges from data, so training starts from a sensible student.

Layer by layer, in the order the student runs them:

1. the activation quantizer's range is searched on the input the layer really receives (the
   output of the already-quantized layers before it), then the weight quantizer's range per
   channel, each scored by how well the layer's output can still match the teacher's output
   of that layer (the residual after the best per-channel scale and shift), not by how close
   the quantized tensor is to the float one: what matters is the output;
2. the layer's output is matched to the teacher's output of the same layer with one scale and
   one shift per output channel (least squares), folded into the weight grid and the bias;
3. each residual addition's own input quantizers (``QuantAdd``) take the least-MSE range of
   the inputs they receive; a pooling's input quantizer (``QuantPool``) the range with the
   least error of the pooled output.

An input quantizer shared by several readers (``share_input_quantizers``) is fitted by the
first of them.

What it costs: one teacher forward (every layer's output kept), one student forward, and per
layer two range searches of ~11 layer forwards each on a sub-batch (``SEARCH_*``), scored from
per-channel moments against target statistics computed once per layer. For a ResNet-18 at
224 px it should cost less than one training epoch of 1,000 images: ``bench/calibration_speed.py``.

Step 2 does what re-estimating BatchNorm statistics does for a quantized network with
BatchNorm; uploaded ONNX models usually have it folded into the convolutions, and without the
correction a 2-bit student starts at chance and recovers slowly. At 8 bits the fit is ~identity.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

from core.sqakd.modules import (
    QuantAdd,
    QuantModule,
    QuantPool,
    quant_layers,
    quant_pools,
    residual_adds,
)
from core.sqakd.quantizers import Quantizer

# The range search runs the layer ~11 times per quantizer (``Quantizer.fit_range``) on a
# sub-batch: up to SEARCH_IMAGES images, fewer where each holds many output positions (a 224-px
# network's early layers), but never fewer than MIN_SEARCH_IMAGES, so that several images' content
# is seen. SEARCH_POSITIONS is what 64 images of a 32-px network's largest maps hold: such
# networks (the CIFAR-10 fixture) search on 64 images in every layer.
SEARCH_IMAGES = 64
SEARCH_POSITIONS = 64 * 32 * 32
MIN_SEARCH_IMAGES = 16
MAX_GAIN = 4.0  # a per-channel correction outside [1/4, 4] means the fit is noise


@torch.no_grad()
def calibrate(student: nn.Module, teacher: nn.Module, batch: Tensor) -> None:
    """Fit every quantizer of ``student`` (prepared from ``teacher``) on one input ``batch``."""
    layers = dict(quant_layers(student))
    reference = _layer_outputs(teacher, list(layers), batch)
    fitted: set[int] = set()  # a shared input quantizer is fitted by its first reader only

    def fit_ranges(name: str, layer: QuantModule, args: tuple[Tensor, ...]) -> None:
        images = _search_images(reference[name])
        x, target = args[0][:images], ChannelTarget(reference[name][:images])
        act, weights = layer.act_quantizer, layer.weight_quantizer

        def output_error(x: Tensor) -> Tensor:
            return target.residual(type(layer).forward(layer, x))  # no hooks re-entered

        weights.enabled = False
        if id(act) not in fitted:
            fitted.add(id(act))
            act.fit_range(
                _max_abs(x), signed=bool(x.min() < 0), error=lambda: output_error(x).sum().view(1)
            )
        weights.enabled = True
        quantized = act(x)  # fixed while the weight grid is searched: quantized once
        per_channel = weights.channels is not None
        act.enabled = False
        try:
            weights.fit_range(
                _max_abs(layer.weight, per_channel),
                signed=True,
                error=lambda: (
                    output_error(quantized)
                    if per_channel
                    else output_error(quantized).sum().view(1)
                ),
            )
        finally:
            act.enabled = True

    def match_teacher(name: str, layer: QuantModule, output: Tensor) -> Tensor:
        gain, shift = ChannelTarget(reference[name]).fit(output)
        layer.scale_output_(gain, shift)
        view = (1, -1) + (1,) * (output.dim() - 2)
        return output * gain.view(view) + shift.view(view)

    def fit_residual_ranges(add: QuantAdd, args: tuple[Tensor, ...]) -> None:
        for quantizer, x in zip(add.input_quantizers, args, strict=True):
            if id(quantizer) not in fitted:
                fitted.add(id(quantizer))
                quantizer.calibrate(x, signed=bool(x.min() < 0))  # type: ignore[operator]

    def fit_pool_range(pool: QuantPool, args: tuple[Tensor, ...]) -> None:
        quantizer = cast(Quantizer, pool.input_quantizers[0])
        if id(quantizer) in fitted:
            return
        fitted.add(id(quantizer))
        x = args[0][:SEARCH_IMAGES]
        target = pool.float_op(x)

        def pooled_error() -> Tensor:  # averaging cancels rounding noise, not clipping
            return (pool.float_op(quantizer.quantize(x)) - target).pow(2).sum().view(1)

        quantizer.fit_range(_max_abs(x), signed=bool(args[0].min() < 0), error=pooled_error)

    hooks = [
        add.register_forward_pre_hook(lambda m, args: fit_residual_ranges(m, args))
        for _, add in residual_adds(student)
    ]
    hooks += [
        pool.register_forward_pre_hook(lambda m, args: fit_pool_range(m, args))
        for _, pool in quant_pools(student)
    ]
    for name, layer in layers.items():
        hooks.append(
            layer.register_forward_pre_hook(lambda m, args, name=name: fit_ranges(name, m, args))
        )
        hooks.append(
            layer.register_forward_hook(
                lambda m, _args, out, name=name: match_teacher(name, m, out)
            )
        )
    was_training = student.training
    try:
        student.eval()
        student(batch)
    finally:
        for hook in hooks:
            hook.remove()
        student.train(was_training)


def _layer_outputs(teacher: nn.Module, names: list[str], batch: Tensor) -> dict[str, Tensor]:
    outputs: dict[str, Tensor] = {}
    hooks = [
        teacher.get_submodule(name).register_forward_hook(
            lambda _m, _args, out, name=name: outputs.__setitem__(name, out)
        )
        for name in names
    ]
    was_training = teacher.training
    try:
        teacher.eval()
        teacher(batch)
    finally:
        for hook in hooks:
            hook.remove()
        teacher.train(was_training)
    return outputs


def _max_abs(tensor: Tensor, per_channel: bool = False) -> Tensor:
    dims = tuple(range(1, tensor.dim())) if per_channel else tuple(range(tensor.dim()))
    return tensor.detach().abs().amax(dim=dims).reshape(-1).float().clamp_min(1e-8)


def _search_images(output: Tensor) -> int:
    """Images of the range search of the layer whose output is like ``output`` (``SEARCH_*``)."""
    positions = math.prod(output.shape[2:])  # per image and channel: 1 for a linear layer
    wanted = math.ceil(SEARCH_POSITIONS / positions)
    return max(MIN_SEARCH_IMAGES, min(SEARCH_IMAGES, wanted))


def _positions(output: Tensor) -> Tensor:
    """``output`` as ``[positions, channels]`` (channels on dim 1), float32: a view, no copy, of
    a channels_last activation, whose per-channel reductions then run over the outer dim."""
    return output.movedim(1, -1).reshape(-1, output.shape[1]).float()


class ChannelTarget:
    """A layer's teacher output, per channel (dim 1): what the student layer's output is scored
    against and fitted to. Its statistics are computed once, whatever the outputs compared."""

    def __init__(self, target: Tensor) -> None:
        flat = _positions(target)
        self.variance, self.mean = torch.var_mean(flat, dim=0, correction=0)
        self.centered = flat - self.mean

    def _moments(self, output: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per channel: the output's mean, its variance and its covariance with the target."""
        flat = _positions(output)
        variance, mean = torch.var_mean(flat, dim=0, correction=0)
        # E[(y - mean) * (t - t_mean)] = E[y * (t - t_mean)]: the target is centered already
        return mean, variance, (flat * self.centered).mean(0)

    def fit(self, output: Tensor) -> tuple[Tensor, Tensor]:
        """Per channel ``gain, shift`` minimising ``|gain * output + shift - target|^2``."""
        mean, variance, covariance = self._moments(output)
        gain = torch.where(
            variance > 1e-12, covariance / variance.clamp_min(1e-12), torch.ones_like(variance)
        )
        gain = gain.clamp(1 / MAX_GAIN, MAX_GAIN)
        return gain, self.mean - gain * mean

    def residual(self, output: Tensor) -> Tensor:
        """Per channel: the squared error left after the best ``gain, shift`` (unclamped)."""
        _, variance, covariance = self._moments(output)
        return self.variance - covariance.pow(2) / variance.clamp_min(1e-12)
