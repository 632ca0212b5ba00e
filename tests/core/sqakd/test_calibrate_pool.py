"""Calibration of a pooling's input quantizer (``QuantPool``): its range is chosen by the error
of the pooled output, which averages rounding away but not clipping."""

from __future__ import annotations

import torch

from core.sqakd.calibrate import calibrate
from core.sqakd.modules import QuantSpec, prepare, quant_pools
from core.sqakd.quantizers import CLIP_FRACTIONS
from tests.core.sqakd.nets import TinyCNN, normalised_images


def test_the_pooling_input_range_is_the_least_error_of_the_pooled_output() -> None:
    teacher = TinyCNN().eval()
    spec = QuantSpec(method="lsq", weight_bits=4, activation_bits=4, pool_bits=8)
    student = prepare(teacher, spec)
    inputs: list[torch.Tensor] = []
    ((_, pool),) = quant_pools(student)
    pool.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    calibrate(student, teacher, normalised_images(32))
    (quantizer,) = pool.input_quantizers
    (x,) = inputs
    assert quantizer.signed == bool(x.min() < 0)  # the residual sum: signed

    def pooled_error() -> float:
        with torch.no_grad():
            return float((pool.float_op(quantizer.quantize(x)) - pool.float_op(x)).pow(2).sum())

    fitted = pooled_error()
    max_abs = x.abs().amax().reshape(1)
    errors = []
    for fraction in CLIP_FRACTIONS:
        quantizer.set_range(max_abs * fraction)
        errors.append(pooled_error())
    assert fitted == min(errors)
    # the input's own least-MSE range (``Quantizer.calibrate``) pools worse here
    quantizer.calibrate(x, signed=quantizer.signed)
    assert pooled_error() > fitted
