"""How good and how small the student is: agreement with the teacher, KL, top-1, sizes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.inputs.images import normalize
from core.inputs.pixels import Pixels
from core.sqakd.modules import quant_layers, quantizers


@torch.inference_mode()
def predict(
    model: nn.Module,
    pixels: Pixels,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
) -> Tensor:
    """Logits ``[N, classes]`` (float32, CPU) of ``model`` in eval mode on uint8 ``pixels``,
    read ``batch_size`` rows at a time (a store's view is never read whole)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        outputs = [
            model(normalize(pixels[i : i + batch_size].to(device), mean, std))
            .flatten(1)
            .float()
            .cpu()
            for i in range(0, len(pixels), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(outputs)


def compare(
    teacher_logits: Tensor, student_logits: Tensor, labels: Tensor | None
) -> dict[str, float | None]:
    """Top-1 agreement and KL(teacher || student) at T=1; top-1 of both when labels exist."""
    agreement = (teacher_logits.argmax(1) == student_logits.argmax(1)).float().mean().item()
    kl = F.kl_div(
        F.log_softmax(student_logits, 1),
        F.log_softmax(teacher_logits, 1),
        log_target=True,
        reduction="batchmean",
    ).item()
    result: dict[str, float | None] = {
        "agreement": agreement,
        "kl": kl,
        "teacher_top1": None,
        "student_top1": None,
    }
    if labels is not None:
        result["teacher_top1"] = (teacher_logits.argmax(1) == labels).float().mean().item()
        result["student_top1"] = (student_logits.argmax(1) == labels).float().mean().item()
    return result


def model_sizes(student: nn.Module) -> dict[str, int]:
    """Bytes of the float model and of the packed low-bit one.

    Packed: each quantized weight at its bit-width (bit-packed), one float32 scale and zero
    point per weight channel and per activation quantizer; every other tensor (biases, ...)
    stays float32.
    """
    layers = [layer for _, layer in quant_layers(student)]
    quantizer_params = {id(p) for q in quantizers(student) for p in q.parameters()}
    quantized_weights = {id(layer.weight) for layer in layers}
    float_params = [p for p in student.parameters() if id(p) not in quantizer_params]
    packed = sum(
        math.ceil(layer.weight.numel() * layer.weight_quantizer.bits / 8)
        + 8 * (layer.weight_quantizer.channels or 1)  # weight grids
        for layer in layers
    )
    packed += 8 * sum(1 for q in quantizers(student) if not q.for_weights)  # activation grids
    packed += sum(p.numel() * 4 for p in float_params if id(p) not in quantized_weights)
    return {"fp32_bytes": sum(p.numel() * 4 for p in float_params), "packed_bytes": packed}
