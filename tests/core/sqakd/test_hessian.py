"""EWGS delta from the Hessian trace: exact on a diagonal Hessian, free of side effects, used by
the trainer."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from core.sqakd.hessian import estimate_ewgs_deltas, ewgs_quantizers, max_delta
from core.sqakd.modules import QuantLinear, QuantSpec, prepare, quant_layers
from core.sqakd.trainer import TrainConfig, train
from tests.core.sqakd.nets import MixedNet
from tests.core.sqakd.test_trainer import make_student, make_teacher, uint8_images

FEATURES = 6


def half_squared_norm(output: Tensor, _target: object) -> Tensor:
    return output.pow(2).sum() / 2


def diagonal_student() -> nn.Module:
    """One EWGS linear layer whose quantized weight is diagonal: the Hessian of
    ``|W_q y|^2 / 2`` with respect to its quantized input ``y`` is ``W_q^T W_q``, diagonal."""
    teacher = nn.Sequential(nn.Linear(FEATURES, FEATURES, bias=False))
    with torch.no_grad():
        teacher[0].weight.copy_(torch.diag(torch.linspace(0.5, 2.0, FEATURES)))
    spec = QuantSpec(method="ewgs", weight_bits=8, activation_bits=4, first_last_bits=None)
    student = prepare(teacher, spec)
    layer = student[0]
    layer.weight_quantizer.calibrate(layer.weight, signed=True)
    layer.act_quantizer.calibrate(torch.randn(64, FEATURES), signed=True)
    return student


def test_delta_is_the_mean_hessian_diagonal_over_three_gradient_deviations() -> None:
    student = diagonal_student()
    layer: QuantLinear = student[0]
    # One probe per batch is exact for a diagonal Hessian, but the same product also carries
    # the cross terms between the input's and the weight's probes, zero only on average: many
    # batches (two inputs, each 200 times) bring the estimate within a few percent.
    inputs = [torch.randn(16, FEATURES, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
    deltas = estimate_ewgs_deltas(
        student,
        ((x, None) for x in inputs * 200),
        half_squared_norm,
        torch.Generator().manual_seed(0),
    )

    # By hand, in the quantizer's normalised units (y = lower + width * x_q):
    # H_q = width^2 * diag(W_q^T W_q) for every sample, g_q = width * (W_q y) W_q.
    grid = layer.act_quantizer.grid()
    width = (grid.scale * (grid.qmax - grid.qmin)).item()
    weight = layer.quantized_weight().detach()
    assert torch.count_nonzero(weight - torch.diag(torch.diagonal(weight))) == 0
    expected = 0.0
    for x in inputs:
        y = layer.act_quantizer(x).detach()
        hessian_diagonal = (weight.T @ weight).diagonal().expand_as(y) * width**2
        g = width * (y @ weight.T) @ weight
        expected += (hessian_diagonal.mean() / (3 * g.std())).item()
    expected /= len(inputs)
    assert deltas["0.act_quantizer"] == pytest.approx(expected, rel=0.03)
    assert layer.act_quantizer.delta.item() == pytest.approx(deltas["0.act_quantizer"])
    assert deltas["0.weight_quantizer"] >= 0


def test_delta_is_capped_where_it_would_flip_gradient_signs() -> None:
    """Near a minimum the gradient is tiny beside the curvature and the estimate explodes."""
    student = diagonal_student()

    def near_its_minimum(output: Tensor, _target: object) -> Tensor:
        return (output - output.detach() + 1e-6).pow(2).sum() / 2

    deltas = estimate_ewgs_deltas(
        student, [(torch.randn(16, FEATURES), None)], near_its_minimum, torch.Generator()
    )
    assert deltas["0.act_quantizer"] == max_delta(student[0].act_quantizer) == 2 * 15


def test_the_estimate_changes_nothing_but_the_deltas() -> None:
    teacher = MixedNet().eval()
    student = prepare(teacher, QuantSpec(method="ewgs", weight_bits=4, activation_bits=4))
    student.train()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    inputs = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        target = teacher(inputs)
    rng = torch.get_rng_state()
    deltas = estimate_ewgs_deltas(
        student,
        [(inputs, target)],
        lambda out, tgt: (out - tgt).pow(2).mean(),
        torch.Generator().manual_seed(0),
    )
    assert set(deltas) == set(ewgs_quantizers(student)) and len(deltas) == 2 * len(
        list(quant_layers(student))
    )
    assert student.training and torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in student.parameters())
    after = student.state_dict()
    for key, value in before.items():
        if not key.endswith(".delta"):
            assert torch.equal(value, after[key]), key


def test_trainer_estimates_or_fixes_delta() -> None:
    teacher = make_teacher()
    pixels = uint8_images(64)
    config = TrainConfig(steps=2, batch_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)

    estimated = make_student(teacher, "ewgs", pixels)
    stats = train(teacher, estimated, pixels, config)
    found = {name: q.delta.item() for name, q in ewgs_quantizers(estimated).items()}
    assert stats.ewgs_deltas == found and set(found.values()) != {0.0}
    quantizers = ewgs_quantizers(estimated)
    assert all(0 <= found[name] <= max_delta(q) for name, q in quantizers.items())

    fixed = make_student(teacher, "ewgs", pixels)
    stats = train(teacher, fixed, pixels, TrainConfig(**{**vars(config), "ewgs_delta": 0.25}))
    assert set(stats.ewgs_deltas.values()) == {0.25}

    other = make_student(teacher, "lsq", pixels)
    assert train(teacher, other, pixels, config).ewgs_deltas == {}
