"""Initial quantizer ranges from data, so training starts from a sensible student.

Layer by layer, in the order the student runs them:

1. the activation quantizer is fitted to the input the layer really receives (the output of the
   already-quantized layers before it) and the weight quantizer to the weight (MSE-best clip);
2. the layer's output is matched to the teacher's output of the same layer with one scale and
   one shift per output channel (least squares), folded into the weight grid and the bias.

Step 2 does what re-estimating BatchNorm statistics does for a quantized network with
BatchNorm; uploaded ONNX models usually have it folded into the convolutions, and without the
correction a 2-bit student starts at chance and recovers slowly. At 8 bits the fit is ~identity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from core.sqakd.modules import QuantModule, quant_layers

MAX_GAIN = 4.0  # a per-channel correction outside [1/4, 4] means the fit is noise


@torch.no_grad()
def calibrate(student: nn.Module, teacher: nn.Module, batch: Tensor) -> None:
    """Fit every quantizer of ``student`` (prepared from ``teacher``) on one input ``batch``."""
    layers = dict(quant_layers(student))
    reference = _layer_outputs(teacher, list(layers), batch)

    def fit_input(layer: QuantModule, args: tuple[Tensor, ...]) -> None:
        layer.weight_quantizer.calibrate(layer.weight, signed=True)
        layer.act_quantizer.calibrate(args[0], signed=bool(args[0].min() < 0))

    def match_teacher(name: str, layer: QuantModule, output: Tensor) -> Tensor:
        gain, shift = _channel_fit(output, reference[name])
        layer.scale_output_(gain, shift)
        view = (1, -1) + (1,) * (output.dim() - 2)
        return output * gain.view(view) + shift.view(view)

    hooks = []
    for name, layer in layers.items():
        hooks.append(layer.register_forward_pre_hook(lambda m, args: fit_input(m, args)))
        hooks.append(layer.register_forward_hook(
            lambda m, _args, out, name=name: match_teacher(name, m, out)))
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
            lambda _m, _args, out, name=name: outputs.__setitem__(name, out))
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


def _channel_fit(output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per channel (dim 1) ``gain, shift`` minimising ``|gain * output + shift - target|^2``."""
    y = output.transpose(0, 1).reshape(output.shape[1], -1).float()
    t = target.transpose(0, 1).reshape(target.shape[1], -1).float()
    y_mean, t_mean = y.mean(1), t.mean(1)
    y_centered = y - y_mean[:, None]
    variance = y_centered.pow(2).mean(1)
    covariance = (y_centered * (t - t_mean[:, None])).mean(1)
    gain = torch.where(variance > 1e-12, covariance / variance.clamp_min(1e-12), torch.ones_like(variance))
    gain = gain.clamp(1 / MAX_GAIN, MAX_GAIN)
    return gain, t_mean - gain * y_mean
