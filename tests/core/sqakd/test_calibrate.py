"""Calibration: ranges and per-channel corrections from one batch, layer by layer."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from core.sqakd.calibrate import ChannelTarget, calibrate
from core.sqakd.modules import QuantSpec, prepare, quant_layers, quantizers
from core.sqakd.quantizers import CLIP_FRACTIONS, QUANTIZERS, Quantizer, create_quantizer
from tests.core.sqakd.nets import TinyCNN, normalised_images

METHODS = sorted(QUANTIZERS)


@pytest.fixture
def teacher() -> nn.Module:
    return TinyCNN().eval()


def calibrated(
    teacher: nn.Module, method: str, bits: int, first_last_bits: int | None = 8
) -> nn.Module:
    spec = QuantSpec(
        method=method, weight_bits=bits, activation_bits=bits, first_last_bits=first_last_bits
    )
    student = prepare(teacher, spec)
    calibrate(student, teacher, normalised_images(64))
    return student


def lowest_level(q: Quantizer) -> float:
    grid = q.grid()
    return ((grid.qmin - grid.zero_point) * grid.scale).min().item()


def set_max_abs_ranges(student: nn.Module, batch: Tensor) -> None:
    """The naive start: per-tensor max-abs clips of each layer's float input and weight."""
    inputs: dict[str, Tensor] = {}
    layers = dict(quant_layers(student))
    hooks = [
        layer.register_forward_pre_hook(
            lambda _m, args, name=name: inputs.__setitem__(name, args[0])
        )
        for name, layer in layers.items()
    ]
    for q in quantizers(student):
        q.enabled = False
    with torch.no_grad():
        student(batch)
    for hook in hooks:
        hook.remove()
    for q in quantizers(student):
        q.enabled = True
    for name, layer in layers.items():
        x = inputs[name]
        layer.act_quantizer.signed = bool(x.min() < 0)
        layer.act_quantizer.set_range(x.abs().max().reshape(1))
        layer.weight_quantizer.signed = True
        layer.weight_quantizer.set_range(layer.weight.detach().abs().max().reshape(1))


@pytest.mark.parametrize("method", METHODS)
def test_w8a8_student_matches_teacher(teacher: nn.Module, method: str) -> None:
    student = calibrated(teacher, method, 8)
    test = normalised_images(32)
    with torch.no_grad():
        expected, got = teacher(test), student(test)
    error = (got - expected).norm()
    assert error / expected.norm() < 0.02  # measured ~0.95%
    # and relative to how much the logits vary between images, not just to their offset
    assert error / (expected - expected.mean(0)).norm() < 0.05  # measured ~2%


@pytest.mark.parametrize("method", METHODS)
def test_activation_signedness_follows_the_data(teacher: nn.Module, method: str) -> None:
    student = calibrated(teacher, method, 4)
    layers = dict(quant_layers(student))
    first = layers["conv1"].act_quantizer  # the normalised image: signed
    assert first.signed and lowest_level(first) < 0
    for name in ("conv2", "conv3"):  # after a ReLU: unsigned, lowest level exactly zero
        q = layers[name].act_quantizer
        assert not q.signed, name
        assert lowest_level(q) == 0.0, name
    for _, layer in quant_layers(student):
        assert layer.weight_quantizer.signed


@pytest.mark.parametrize("method", METHODS)
def test_w2a2_calibration_beats_max_abs_ranges(teacher: nn.Module, method: str) -> None:
    student = calibrated(teacher, method, 2, first_last_bits=None)
    naive = prepare(
        teacher, QuantSpec(method=method, weight_bits=2, activation_bits=2, first_last_bits=None)
    )
    set_max_abs_ranges(naive, normalised_images(64))
    test = normalised_images(32)
    with torch.no_grad():
        expected = teacher(test)
        calibrated_mse = (student(test) - expected).pow(2).mean()
        naive_mse = (naive(test) - expected).pow(2).mean()
    # over 8 seeds: 0.07-0.31x (lsq), 0.21-0.64x (ewgs)
    assert calibrated_mse < 0.75 * naive_mse


@pytest.mark.parametrize("method", METHODS)
def test_calibrate_leaves_teacher_mode_and_hooks_as_they_were(
    teacher: nn.Module, method: str
) -> None:
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = prepare(teacher, QuantSpec(method=method, weight_bits=4, activation_bits=4))
    student.train()
    teacher.train()
    calibrate(student, teacher, normalised_images(16))
    assert student.training and teacher.training
    for module in [*student.modules(), *teacher.modules()]:
        assert not module._forward_hooks and not module._forward_pre_hooks
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(q.enabled for q in quantizers(student))


@pytest.mark.parametrize("method", METHODS)
def test_calibrated_outputs_lie_on_the_grids(teacher: nn.Module, method: str) -> None:
    student = calibrated(teacher, method, 3)
    for name, layer in quant_layers(student):
        q = layer.weight_quantizer
        grid = q.grid()
        view = (-1,) + (1,) * (layer.weight.dim() - 1)
        weight = layer.quantized_weight().detach()
        codes = weight / grid.scale.view(view) + grid.zero_point.view(view)
        assert (codes - codes.round()).abs().max() < 1e-3, name
        assert codes.round().min() >= grid.qmin and codes.round().max() <= grid.qmax, name


@pytest.mark.parametrize("method", METHODS)
def test_residual_add_inputs_get_ranges_and_signs_from_the_data(
    teacher: nn.Module, method: str
) -> None:
    """TinyCNN adds a ReLU output (unsigned) and a convolution's output (signed); at 8 bits on
    int8 grids both stay close (in MSE) to what they quantize."""
    spec = QuantSpec(
        method=method, weight_bits=8, activation_bits=8, int8_grids=True, residual_bits=8
    )
    student = prepare(teacher, spec)
    add = student.get_submodule("residual_add")
    seen: list[tuple[Tensor, ...]] = []
    add.register_forward_pre_hook(lambda _m, args: seen.append(args))
    calibrate(student, teacher, normalised_images(64))
    relu_output, conv_output = seen[-1]
    relu_quantizer, conv_quantizer = add.input_quantizers
    assert (relu_quantizer.signed, conv_quantizer.signed) == (False, True)
    with torch.no_grad():
        for quantizer, x in ((relu_quantizer, relu_output), (conv_quantizer, conv_output)):
            error = (quantizer(x) - x).pow(2).mean() / x.pow(2).mean()
            assert error < 1e-3, (method, error)  # least-MSE ranges clip a few outliers


def test_calibration_is_deterministic(teacher: nn.Module) -> None:
    """A resumed job rebuilds its student by calibrating again: it must be the same student."""
    batch = normalised_images(16)
    spec = QuantSpec(method="lsq", weight_bits=4, activation_bits=4, residual_bits=8)
    first, second = prepare(teacher, spec), prepare(teacher, spec)
    calibrate(first, teacher, batch)
    calibrate(second, teacher, batch)
    for (key, value), other in zip(
        first.state_dict().items(), second.state_dict().values(), strict=True
    ):
        assert torch.equal(value, other), key


@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_target_is_the_least_squares_fit(channels_last: bool) -> None:
    """Per channel, ``fit`` is the least-squares ``gain, shift`` and ``residual`` its error."""
    generator = torch.Generator().manual_seed(0)
    output = torch.randn(6, 3, 5, 5, generator=generator) * torch.tensor([0.5, 1.0, 2.0]).view(
        1, 3, 1, 1
    )
    target = 1.5 * output + 0.3 + 0.2 * torch.randn(output.shape, generator=generator)
    if channels_last:
        output = output.to(memory_format=torch.channels_last)
        target = target.to(memory_format=torch.channels_last)
    fitted = ChannelTarget(target)
    gain, shift = fitted.fit(output)
    residual = fitted.residual(output)
    for c in range(3):
        y, t = output[:, c].reshape(-1, 1), target[:, c].reshape(-1)
        design = torch.cat([y, torch.ones_like(y)], dim=1).double()
        solution = torch.linalg.lstsq(design, t.double()[:, None]).solution[:, 0]
        error = (design @ solution - t.double()).pow(2).mean()
        assert gain[c].item() == pytest.approx(solution[0].item(), rel=1e-4)
        assert shift[c].item() == pytest.approx(solution[1].item(), abs=1e-4)
        assert residual[c].item() == pytest.approx(error.item(), rel=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_range_search_finds_each_channels_single_minimum(method: str) -> None:
    """Coarse to fine, the search scores 11 of the 24 clip fractions and, where the error has
    one minimum over them, picks it for each channel: here at both ends, on and between the
    coarse fractions. (Activation quantizers: DoReFa's weights search clip and knee together.)"""
    best = torch.tensor([0, 1, 5, 6, 11, 17, 20, 22, 23])
    max_abs = torch.linspace(0.5, 4.0, len(best))
    fractions = torch.tensor(CLIP_FRACTIONS)

    def quantizer() -> Quantizer:
        q = create_quantizer(method, 4, weight=False, channels=len(best))
        q.signed = True
        return q

    full = quantizer()
    full.set_range(max_abs)  # every grid's step is proportional to the clip
    q, calls = quantizer(), []

    def fraction() -> Tensor:
        return q.grid().scale / full.grid().scale

    def error() -> Tensor:
        calls.append(fraction())
        return (fraction().log() - fractions[best].log()).pow(2)

    q.fit_range(max_abs, signed=True, error=error)
    assert len(calls) == 11
    torch.testing.assert_close(fraction(), fractions[best])
