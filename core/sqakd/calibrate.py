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

Step 2 does what re-estimating BatchNorm statistics does for a quantized network with
BatchNorm; uploaded ONNX models usually have it folded into the convolutions, and without the
correction a 2-bit student starts at chance and recovers slowly. At 8 bits the fit is ~identity.
"""

from __future__ import annotations

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

SEARCH_IMAGES = 64  # the range search runs the layer ~50 times: a sub-batch keeps it quick
MAX_GAIN = 4.0  # a per-channel correction outside [1/4, 4] means the fit is noise


@torch.no_grad()
def calibrate(student: nn.Module, teacher: nn.Module, batch: Tensor) -> None:
    """Fit every quantizer of ``student`` (prepared from ``teacher``) on one input ``batch``."""
    layers = dict(quant_layers(student))
    reference = _layer_outputs(teacher, list(layers), batch)
    fitted: set[int] = set()  # a shared input quantizer is fitted by its first reader only

    def fit_ranges(name: str, layer: QuantModule, args: tuple[Tensor, ...]) -> None:
        x, target = args[0][:SEARCH_IMAGES], reference[name][:SEARCH_IMAGES]

        def output_error() -> Tensor:
            return _fit_residual(type(layer).forward(layer, x), target)  # no hooks re-entered

        layer.weight_quantizer.enabled = False
        if id(layer.act_quantizer) not in fitted:
            fitted.add(id(layer.act_quantizer))
            layer.act_quantizer.fit_range(
                _max_abs(x), signed=bool(x.min() < 0), error=lambda: output_error().sum().view(1)
            )
        layer.weight_quantizer.enabled = True
        per_channel = layer.weight_quantizer.channels is not None
        layer.weight_quantizer.fit_range(
            _max_abs(layer.weight, per_channel),
            signed=True,
            error=lambda: output_error() if per_channel else output_error().sum().view(1),
        )

    def match_teacher(name: str, layer: QuantModule, output: Tensor) -> Tensor:
        gain, shift = _channel_fit(output, reference[name])
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


def _channel_moments(output: Tensor, target: Tensor) -> tuple[Tensor, ...]:
    """Per channel (dim 1): means of output and target, variance of output, covariance."""
    y = output.transpose(0, 1).reshape(output.shape[1], -1).float()
    t = target.transpose(0, 1).reshape(target.shape[1], -1).float()
    y_mean, t_mean = y.mean(1), t.mean(1)
    y_centered, t_centered = y - y_mean[:, None], t - t_mean[:, None]
    return (
        y_mean,
        t_mean,
        y_centered.pow(2).mean(1),
        (y_centered * t_centered).mean(1),
        t_centered.pow(2).mean(1),
    )


def _channel_fit(output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per channel (dim 1) ``gain, shift`` minimising ``|gain * output + shift - target|^2``."""
    y_mean, t_mean, variance, covariance, _ = _channel_moments(output, target)
    gain = torch.where(
        variance > 1e-12, covariance / variance.clamp_min(1e-12), torch.ones_like(variance)
    )
    gain = gain.clamp(1 / MAX_GAIN, MAX_GAIN)
    return gain, t_mean - gain * y_mean


def _fit_residual(output: Tensor, target: Tensor) -> Tensor:
    """Per channel: the squared error left after the best ``gain, shift`` (unclamped)."""
    _, _, variance, covariance, target_variance = _channel_moments(output, target)
    return target_variance - covariance.pow(2) / variance.clamp_min(1e-12)
