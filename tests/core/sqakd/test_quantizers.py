"""Quantizers: outputs on the declared integer grid, hand-computed backward rules, range fitting."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import Tensor

from core.sqakd.quantizers import (
    CLIP_FRACTIONS,
    QUANTIZERS,
    DoReFaQuantizer,
    EWGSQuantizer,
    IntGrid,
    LSQQuantizer,
    PACTQuantizer,
    Quantizer,
    STEQuantizer,
    create_quantizer,
    one_pass,
)

METHODS = sorted(QUANTIZERS)
ALL_BITS = list(range(1, 9))
CHANNELS = 4
# (weight, per_channel): per-channel grids exist for weights only
KINDS = {
    "weight-per-channel": (True, True),
    "weight-per-tensor": (True, False),
    "activation": (False, False),
}


def make(method: str, bits: int, kind: str) -> Quantizer:
    weight, per_channel = KINDS[kind]
    return create_quantizer(method, bits, weight=weight, channels=CHANNELS if per_channel else None)


def sample(kind: str) -> Tensor:
    """A weight [out, in, k, k] or an activation [batch, C, H, W], channels of different sizes."""
    spread = torch.tensor([0.05, 0.3, 1.0, 4.0]).view(-1, 1, 1, 1)
    if KINDS[kind][0]:
        return torch.randn(CHANNELS, 3, 3, 3) * spread
    return torch.randn(2, CHANNELS, 5, 5) * spread.view(1, -1, 1, 1)


def per_channel_view(values: Tensor, q: Quantizer, like: Tensor) -> Tensor:
    return values.view((-1,) + (1,) * (like.dim() - 1)) if q.channels else values.reshape(())


def grid_codes(q: Quantizer, out: Tensor) -> Tensor:
    """The (float) integer codes of ``out`` on ``q.grid()``: ``out / scale + zero_point``."""
    grid = q.grid()
    scale = per_channel_view(grid.scale, q, out)
    zero_point = per_channel_view(grid.zero_point, q, out)
    return out / scale + zero_point


def assert_on_grid(q: Quantizer, out: Tensor) -> None:
    grid = q.grid()
    codes = grid_codes(q, out.detach())
    rounded = codes.round()
    worst = (codes - rounded).abs().max().item()
    assert worst < 1e-3, f"output is {worst:.3f} of a step off the grid {grid}"
    assert rounded.min() >= grid.qmin and rounded.max() <= grid.qmax
    assert ((rounded - grid.qmin) % grid.stride == 0).all(), "codes off the grid's stride"
    assert (grid.qmax - grid.qmin) // grid.stride + 1 == grid_levels(q)


def grid_levels(q: Quantizer) -> int:
    """2**bits; DoReFa's signed 8-bit weight grid is -127..127 (its -255..255 misses int8)."""
    dorefa_weight = isinstance(q, DoReFaQuantizer) and q.for_weights and q.signed
    return 2**q.bits - 1 if dorefa_weight and q.bits == 8 else 2**q.bits


def distinct_levels(q: Quantizer, out: Tensor) -> list[int]:
    rows = out.detach().reshape(out.shape[0], -1) if q.channels else out.detach().reshape(1, -1)
    return [row.unique().numel() for row in rows]


# --- the forward: every output on the grid the exporters read -------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("method", METHODS)
def test_forward_lies_on_grid(method: str, bits: int, signed: bool, kind: str) -> None:
    q = make(method, bits, kind)
    x = sample(kind)
    q.calibrate(x, signed=signed)
    assert q.signed is signed
    out = q(x)
    assert out.shape == x.shape
    assert_on_grid(q, out)
    assert all(2 <= n <= 2**bits for n in distinct_levels(q, out))


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("method", METHODS)
def test_full_range_input_hits_every_level(method: str, bits: int, signed: bool) -> None:
    q = create_quantizer(method, bits, weight=False)
    q.signed = signed
    q.set_range(torch.tensor([1.0]))
    out = q(torch.linspace(-4, 4, 4001))
    assert out.unique().numel() == 2**bits
    assert_on_grid(q, out)
    if not signed:
        assert out.min().item() == 0.0


def _nudge_like_training(q: Quantizer) -> None:
    """Move every range parameter by ~0.3 of a step, independently, as optimizer steps do."""
    step = q.grid().scale
    with torch.no_grad():
        for parameter in q.parameters():
            parameter.add_(0.3 * step * torch.randn_like(parameter))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("method", METHODS)
def test_forward_lies_on_grid_after_training_moves_the_range(
    method: str, bits: int, signed: bool, kind: str
) -> None:
    q = make(method, bits, kind)
    x = sample(kind)
    q.calibrate(x, signed=signed)
    _nudge_like_training(q)
    assert_on_grid(q, q(x))


def test_ewgs_levels_are_the_grid_levels_for_a_learned_interval() -> None:
    """[-1, 1] at 2 bits: grid() says step 2/3, zero point 2; the forward must agree."""
    q = EWGSQuantizer(2, weight=True)
    with torch.no_grad():
        q.lower.fill_(-1.0)
        q.upper.fill_(1.0)
    levels = q(torch.linspace(-2, 2, 401)).detach().unique()
    grid = q.grid()
    expected = (torch.arange(grid.qmin, grid.qmax + 1) - grid.zero_point) * grid.scale
    assert expected.abs().min() == 0
    torch.testing.assert_close(levels, expected)


def test_disabled_quantizer_is_identity() -> None:
    for method in METHODS:
        q = create_quantizer(method, 2, weight=True)
        q.enabled = False
        x = torch.randn(10)
        assert q(x) is x


# --- a quantizer shared by several readers of one tensor -------------------------------------


def test_the_readers_of_one_tensor_share_one_quantized_output_within_a_pass() -> None:
    q = create_quantizer("lsq", 4, weight=False)
    q.calibrate(torch.rand(64), signed=False)
    x = torch.rand(64, requires_grad=True)
    with one_pass():
        first = q(x)
        assert q(x) is first  # the second reader: no second pass over x
        assert q(x.clone()) is not first  # another tensor, even with the same values
        with torch.no_grad():
            assert q(x).grad_fn is None  # grad mode is part of what an output depends on
        again = q(x)
        with torch.no_grad():
            x.mul_(0.5)  # the input itself changed in place
        assert q(x) is not again
    assert q(x) is not q(x)  # outside a pass: after an optimizer step or a backward, say
    with one_pass(), torch.inference_mode():
        frozen = torch.rand(64)
        assert q(frozen) is not q(frozen)  # no version counter: never reused


def test_ewgs_scales_the_readers_summed_gradient_of_a_shared_tensor() -> None:
    """Two readers of one quantized tensor: one backward of their summed gradient, as for the
    tensor the exported graph quantizes once; EWGS's ``|g|`` is of that sum."""
    q = EWGSQuantizer(2, weight=False, delta=0.5)
    q.set_range(torch.tensor([1.0]))
    x = torch.tensor([-0.8, -0.35, 0.1, 0.4], requires_grad=True)
    reader_a, reader_b = torch.tensor([1.0, -2.0, 0.5, -1.0]), torch.tensor([-3.0, 1.0, 1.0, 2.0])
    with one_pass():
        read_by_a, read_by_b = q(x), q(x)
    assert read_by_a is read_by_b
    (read_by_a * reader_a + read_by_b * reader_b).sum().backward()
    shared_grad = x.grad.clone()
    x.grad = None
    (q(x) * (reader_a + reader_b)).sum().backward()
    assert torch.equal(shared_grad, x.grad)
    x.grad = None
    (q(x) * reader_a + q(x) * reader_b).sum().backward()  # two quantizer calls, no pass
    assert not torch.equal(shared_grad, x.grad)  # |g_a| + |g_b|, not |g_a + g_b|


# --- LSQ backward --------------------------------------------------------------------------

# s = 0.5, 3 bits signed: q in -4..3. x / s = [0.6, -1.4, 2.4, 10, -6, 0.2]
LSQ_X = [0.3, -0.7, 1.2, 5.0, -3.0, 0.1]
LSQ_INSIDE = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
# round(x/s) - x/s inside; qmax = 3 above, qmin = -4 below
LSQ_STEP_TERMS = [0.4, 0.4, -0.4, 3.0, -4.0, -0.2]


def test_lsq_backward_per_tensor_weight() -> None:
    q = LSQQuantizer(3, weight=True)
    q.set_range(torch.tensor([1.5]))  # step = clip / qmax = 0.5
    assert q.step.item() == 0.5
    x = torch.tensor(LSQ_X).view(2, 3).requires_grad_()
    upstream = torch.tensor([1.0, 2.0, -1.0, 0.5, 1.0, 3.0]).view(2, 3)
    out = q(x)
    assert out.detach().flatten().tolist() == [0.5, -0.5, 1.0, 1.5, -2.0, 0.0]
    (out * upstream).sum().backward()
    assert x.grad.flatten().tolist() == (upstream.flatten() * torch.tensor(LSQ_INSIDE)).tolist()
    # N = numel of the weight tensor (6), Qp = 3
    expected = sum(g * t for g, t in zip(upstream.flatten().tolist(), LSQ_STEP_TERMS, strict=True))
    assert q.step.grad.item() == pytest.approx(expected / math.sqrt(6 * 3), rel=1e-5)


def test_lsq_backward_per_channel_weight() -> None:
    q = LSQQuantizer(3, weight=True, channels=2)
    with torch.no_grad():
        q.step.copy_(torch.tensor([0.5, 0.25]))
    # channel 0: x / 0.5 = [0.6, -1.4, 2.4]; channel 1: x / 0.25 = [12, -16, 0.8]
    x = torch.tensor([[0.3, -0.7, 1.2], [3.0, -4.0, 0.2]], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 1.0]]
    scale = 1 / math.sqrt(3 * 3)  # N = numel of one channel
    channel0 = 0.4 + 0.4 - 0.4
    channel1 = 3.0 - 4.0 + (1 - 0.8)
    assert q.step.grad.tolist() == pytest.approx([channel0 * scale, channel1 * scale], rel=1e-5)


def test_lsq_backward_activation_uses_one_sample() -> None:
    q = LSQQuantizer(3, weight=False)
    q.set_range(torch.tensor([1.5]))
    x = torch.tensor(LSQ_X).view(2, 3).requires_grad_()  # 2 samples of 3 features
    q(x).sum().backward()
    assert x.grad.flatten().tolist() == LSQ_INSIDE
    assert q.step.grad.item() == pytest.approx(sum(LSQ_STEP_TERMS) / math.sqrt(3 * 3), rel=1e-5)


def test_lsq_backward_unsigned() -> None:
    q = LSQQuantizer(2, weight=False)
    q.signed = False  # q in 0..3
    q.set_range(torch.tensor([3.0]))  # step 1
    x = torch.tensor([[0.3, 1.6, 2.2, 5.0, -1.0]], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]]
    terms = (0 - 0.3) + (2 - 1.6) + (2 - 2.2) + 3 + 0
    assert q.step.grad.item() == pytest.approx(terms / math.sqrt(5 * 3), rel=1e-5)


# --- EWGS backward -------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [True, False], ids=["weight", "activation"])
def test_ewgs_backward_scales_gradient_by_rounding_residual(weight: bool) -> None:
    q = EWGSQuantizer(2, weight=weight, delta=0.5)
    q.set_range(torch.tensor([1.0]))  # signed: [-1, 0.5], levels -1, -0.5, 0, 0.5
    assert (q.lower.item(), q.upper.item()) == (-1.0, 0.5)
    # normalised input n = (x + 1) / 1.5 * 3 = [0.4, 1.3, 2.2, 2.8, (3.8), (-1)]
    x = torch.tensor([-0.8, -0.35, 0.1, 0.4, 0.9, -1.5], requires_grad=True)
    upstream = torch.tensor([1.0, -2.0, 0.5, -1.0, 1.0, 1.0])
    out = q(x)
    assert out.detach().tolist() == pytest.approx([-1.0, -0.5, 0.0, 0.5, 0.5, -1.0], abs=1e-6)
    (out * upstream).sum().backward()
    # g * (1 + delta * sign(g) * (x_n - x_q)), zero where clamped, in the paper's units:
    # x_n = n / 3 normalised to [0, 1], x_q = round(n) / 3 its level
    expected = [
        1.0 * (1 + 0.5 * 0.4 / 3),
        -2.0 * (1 - 0.5 * 0.3 / 3),
        0.5 * (1 + 0.5 * 0.2 / 3),
        -1.0 * (1 - 0.5 * -0.2 / 3),
        0.0,
        0.0,
    ]
    assert x.grad.tolist() == pytest.approx(expected, abs=1e-5)


def test_ewgs_with_zero_delta_is_straight_through() -> None:
    q = EWGSQuantizer(3, weight=True, delta=0.0)
    q.set_range(torch.tensor([1.0]))
    x = torch.tensor([-0.9, -0.33, 0.12, 0.61, 2.0], requires_grad=True)
    (q(x) * torch.tensor([1.0, -3.0, 2.0, 0.5, 1.0])).sum().backward()
    assert x.grad.tolist() == pytest.approx([1.0, -3.0, 2.0, 0.5, 0.0])


# --- PACT backward --------------------------------------------------------------------------


def test_pact_gradient_reaches_alpha_only_where_x_reaches_alpha() -> None:
    q = PACTQuantizer(2, weight=False)
    q.signed = False  # q in 0..3
    q.set_range(torch.tensor([3.0]))  # alpha 3, step 1
    assert q.alpha.item() == 3.0
    x = torch.tensor([-1.0, 0.0, 0.4, 1.6, 2.9, 3.0, 4.5], requires_grad=True)
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    out = q(x)
    assert out.detach().tolist() == [0.0, 0.0, 0.0, 2.0, 3.0, 3.0, 3.0]
    (out * upstream).sum().backward()
    # straight through inside [0, alpha), zero outside; d y / d alpha = 1 where x >= alpha
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0]
    assert q.alpha.grad.tolist() == [6.0 + 7.0]


def test_pact_signed_gradient_reaches_alpha_at_both_bounds() -> None:
    q = PACTQuantizer(2, weight=False)  # signed: q in -2..1, levels -2a, -a, 0, a
    q.set_range(torch.tensor([1.0]))
    x = torch.tensor([-3.0, -2.0, -0.6, 0.4, 1.0, 1.5], requires_grad=True)
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    out = q(x)
    assert out.detach().tolist() == [-2.0, -2.0, -1.0, 0.0, 1.0, 1.0]
    (out * upstream).sum().backward()
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0, 0.0]
    # the lower bound is -2 * alpha: d y / d alpha = -2 below it, 1 at alpha and above
    assert q.alpha.grad.tolist() == [-2.0 * 1.0 + 5.0 + 6.0]


def test_pact_signed_1_bit_is_symmetric() -> None:
    q = PACTQuantizer(1, weight=False)
    q.set_range(torch.tensor([1.5]))  # {-1.5, +1.5}
    x = torch.tensor([-2.0, -0.3, 0.2, 1.5, 3.0], requires_grad=True)
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    out = q(x)
    assert out.detach().tolist() == [-1.5, -1.5, 1.5, 1.5, 1.5]
    (out * upstream).sum().backward()
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 0.0, 0.0]
    assert q.alpha.grad.tolist() == [-1.0 + 4.0 + 5.0]  # -1 below -alpha, 1 from alpha up


def test_pact_weights_are_dorefa_weights() -> None:
    w = torch.randn(CHANNELS, 3, 3, 3)
    pact = PACTQuantizer(3, weight=True, channels=CHANNELS)
    dorefa = DoReFaQuantizer(3, weight=True, channels=CHANNELS)
    for q in (pact, dorefa):
        q.calibrate(w, signed=True)
    assert list(pact.parameters()) == []
    assert torch.equal(pact(w), dorefa(w))


# --- STE backward --------------------------------------------------------------------------


def test_ste_is_identity_inside_the_range_and_zero_outside() -> None:
    q = STEQuantizer(3, weight=True)
    q.set_range(torch.tensor([1.5]))  # signed: step 0.5, q in -4..3, range [-2, 1.5]
    x = torch.tensor(LSQ_X + [1.5, -2.0], requires_grad=True)
    upstream = torch.tensor([1.0, 2.0, -1.0, 0.5, 1.0, 3.0, 4.0, 5.0])
    out = q(x)
    assert out.detach().tolist() == [0.5, -0.5, 1.0, 1.5, -2.0, 0.0, 1.5, -2.0]
    (out * upstream).sum().backward()
    # inside [-2, 1.5): the upstream gradient unchanged; outside (5.0, -3.0, the top 1.5): zero
    assert x.grad.tolist() == [1.0, 2.0, -1.0, 0.0, 0.0, 3.0, 0.0, 5.0]
    assert list(q.parameters()) == []


def test_ste_unsigned_per_channel() -> None:
    q = STEQuantizer(2, weight=True, channels=2)
    q.signed = False  # q in 0..3
    q.set_range(torch.tensor([3.0, 0.75]))  # steps 1 and 0.25
    x = torch.tensor([[-1.0, 0.3, 1.6, 2.2, 5.0], [-0.1, 0.1, 0.4, 0.7, 0.8]], requires_grad=True)
    out = q(x)
    assert out.detach().tolist() == [[0.0, 0.0, 2.0, 2.0, 3.0], [0.0, 0.0, 0.5, 0.75, 0.75]]
    out.sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0, 0.0]]


# --- DoReFa --------------------------------------------------------------------------------

DOREFA_W = [[0.5, -0.25, 0.05, -1.0], [2.0, 0.1, -0.6, 0.3]]


def dorefa_formula(w: Tensor, scale: Tensor, bits: int) -> Tensor:
    """DoReFa's weight quantizer as the paper writes it, times ``scale``, per row."""
    n = 2**bits - 1
    t = torch.tanh(w / scale)
    t = t / t.abs().amax(dim=1, keepdim=True)
    return scale * (2 * torch.round((t + 1) / 2 * n) / n - 1)


def test_dorefa_weight_forward_is_the_hand_formula() -> None:
    q = DoReFaQuantizer(2, weight=True, channels=2)
    q.set_range(torch.tensor([1.0, 0.5]))
    w = torch.tensor(DOREFA_W)
    out = q(w)
    # row 0: tanh(w) / tanh(1) = [0.607, -0.322, 0.066, -1] -> round((t + 1) * 3 / 2) = [2, 1, 2, 0]
    # row 1: tanh(w / 0.5) / tanh(4) = [1, 0.198, -0.834, 0.537] -> [3, 2, 0, 2]
    # levels 2q/3 - 1 times the scale
    expected = torch.tensor([[1 / 3, -1 / 3, 1 / 3, -1.0], [0.5, 0.5 / 3, -0.5, 0.5 / 3]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, dorefa_formula(w, torch.tensor([[1.0], [0.5]]), 2))
    assert grid_codes(q, out).round().tolist() == [[1, -1, 1, -3], [3, 1, -3, 1]]  # odd integers


def test_dorefa_weight_gradient_goes_straight_through_the_rounding() -> None:
    q = DoReFaQuantizer(3, weight=True, channels=2)
    scale = torch.tensor([1.0, 0.5])
    q.set_range(scale)
    w = torch.tensor(DOREFA_W, requires_grad=True)
    upstream = torch.tensor([[1.0, -2.0, 0.5, 3.0], [-1.0, 2.0, 1.5, -0.5]])
    (q(w) * upstream).sum().backward()
    plain = torch.tensor(DOREFA_W, requires_grad=True)
    t = torch.tanh(plain / scale.view(-1, 1))
    ((t / t.abs().amax(dim=1, keepdim=True)) * scale.view(-1, 1) * upstream).sum().backward()
    torch.testing.assert_close(w.grad, plain.grad)
    assert list(q.parameters()) == []


def test_dorefa_8_bit_weights_fall_back_to_a_symmetric_int8_grid() -> None:
    q = DoReFaQuantizer(8, weight=True)
    q.set_range(torch.tensor([2.0]))
    w = torch.randn(64, 9)
    out = q(w)
    grid = q.grid()
    assert (grid.qmin, grid.qmax, grid.stride) == (-127, 127, 1)
    t = torch.tanh(w / 2.0)
    t = t / t.abs().max()
    torch.testing.assert_close(out, torch.round(t * 127) * (2.0 / 127))
    assert out.abs().max().item() == pytest.approx(2.0)


def test_dorefa_activations_are_ste_activations() -> None:
    x = torch.randn(4, 3, 5, 5)
    for signed in (True, False):
        dorefa, ste = DoReFaQuantizer(3, weight=False), STEQuantizer(3, weight=False)
        for q in (dorefa, ste):
            q.calibrate(x, signed=signed)
        assert torch.equal(dorefa(x), ste(x))


# which quantizers learn their range: (weights, activations)
LEARNS_RANGE = {
    "lsq": (True, True),
    "ewgs": (True, True),
    "pact": (False, True),
    "dorefa": (False, False),
    "ste": (False, False),
}


@pytest.mark.parametrize("kind", ["weight-per-channel", "activation"])
@pytest.mark.parametrize("method", METHODS)
def test_range_parameters_receive_gradients(method: str, kind: str) -> None:
    q = make(method, 4, kind)
    x = sample(kind).requires_grad_()
    q.calibrate(x, signed=True)
    (q(x) * torch.randn_like(x)).sum().backward()
    grads = [p.grad for p in q.parameters()]
    assert bool(grads) == LEARNS_RANGE[method][0 if KINDS[kind][0] else 1]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert x.grad is not None and x.grad.abs().sum() > 0


# --- rescale_, fit_range / calibrate -------------------------------------------------------


@pytest.mark.parametrize("kind", ["weight-per-channel", "weight-per-tensor"])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("method", METHODS)
def test_rescale_scales_values_and_keeps_codes(
    method: str, bits: int, signed: bool, kind: str
) -> None:
    q = make(method, bits, kind)
    x = sample(kind)
    q.calibrate(x, signed=signed)
    before, grid = q(x).detach(), _snapshot(q.grid())
    codes = grid_codes(q, before).round()
    # powers of two: every division and product scales exactly, so codes must match exactly
    gain = torch.tensor([0.5, 2.0, 4.0, 0.25]) if q.channels else torch.tensor([2.0])
    q.rescale_(gain)
    view = per_channel_view(gain, q, x) if q.channels else gain.reshape(())
    after = q(x * view).detach()
    assert torch.equal(after, before * view)
    rescaled = q.grid()
    assert torch.equal(rescaled.scale, grid.scale * gain)
    assert torch.equal(rescaled.zero_point, grid.zero_point)
    assert (rescaled.qmin, rescaled.qmax, rescaled.stride) == (grid.qmin, grid.qmax, grid.stride)
    assert torch.equal(grid_codes(q, after).round(), codes)


@pytest.mark.parametrize("method", METHODS)
def test_rescale_with_any_positive_gain_scales_values(method: str) -> None:
    q = create_quantizer(method, 4, weight=True, channels=CHANNELS)
    x = sample("weight-per-channel")
    q.calibrate(x, signed=True)
    before = q(x).detach()
    gain = torch.tensor([0.7, 1.3, 2.9, 0.45])
    q.rescale_(gain)
    view = gain.view(-1, 1, 1, 1)
    torch.testing.assert_close(q(x * view).detach(), before * view, rtol=1e-5, atol=1e-6)


def _snapshot(grid: IntGrid) -> IntGrid:
    return replace(grid, scale=grid.scale.clone(), zero_point=grid.zero_point.clone())


@pytest.mark.parametrize(
    "method",
    METHODS,
)
def test_grid_is_a_snapshot(method: str) -> None:
    for bits in (4, 1):
        q = create_quantizer(method, bits, weight=True, channels=CHANNELS)
        q.calibrate(sample("weight-per-channel"), signed=True)
        grid = q.grid()
        scale, zero_point = grid.scale.clone(), grid.zero_point.clone()
        q.rescale_(torch.full((CHANNELS,), 2.0))
        assert torch.equal(grid.scale, scale), f"{bits}-bit grid changed with the quantizer"
        assert torch.equal(grid.zero_point, zero_point)


def _mse(q: Quantizer, x: Tensor) -> Tensor:
    dims = tuple(range(1, x.dim())) if q.channels else tuple(range(x.dim()))
    return (q(x).detach() - x).pow(2).mean(dim=dims).reshape(-1)


def _heavy_tailed(kind: str) -> Tensor:
    """Laplace samples, channels of different sizes: max-abs clipping wastes levels on the tail."""
    spread = torch.tensor([0.05, 0.3, 1.0, 4.0])
    laplace = torch.distributions.Laplace(0.0, 1.0)
    if KINDS[kind][0]:
        return laplace.sample((CHANNELS, 16, 3, 3)) * spread.view(-1, 1, 1, 1)
    return laplace.sample((2, CHANNELS, 6, 6)) * spread.view(1, -1, 1, 1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("method", METHODS)
def test_calibrate_is_no_worse_than_max_abs(method: str, bits: int, kind: str) -> None:
    x = _heavy_tailed(kind)
    signed = True
    fitted = make(method, bits, kind)
    fitted.calibrate(x, signed=signed)
    max_abs = make(method, bits, kind)
    max_abs.signed = signed
    dims = tuple(range(1, x.dim())) if max_abs.channels else tuple(range(x.dim()))
    max_abs.set_range(x.abs().amax(dim=dims).reshape(-1))
    fitted_mse, max_abs_mse = _mse(fitted, x), _mse(max_abs, x)
    assert (fitted_mse <= max_abs_mse * (1 + 1e-5)).all()
    if bits == 2:  # at 2 bits the search must find a clearly tighter clip (measured <= 0.71)
        assert (fitted_mse < 0.9 * max_abs_mse).all()


@pytest.mark.parametrize("method", METHODS)
def test_fit_range_picks_least_error_per_channel(method: str) -> None:
    x = _heavy_tailed("weight-per-channel")
    q = create_quantizer(method, 3, weight=True, channels=CHANNELS)
    max_abs = x.abs().amax(dim=(1, 2, 3))
    q.fit_range(max_abs, signed=True, error=lambda: _mse(q, x))
    chosen = _mse(q, x)
    for fraction in CLIP_FRACTIONS:
        other = create_quantizer(method, 3, weight=True, channels=CHANNELS)
        other.set_range(max_abs * fraction)
        assert (chosen <= _mse(other, x) * (1 + 1e-5)).all()


@pytest.mark.parametrize("method", METHODS)
def test_unsigned_calibration_clamps_negatives_to_zero(method: str) -> None:
    q = create_quantizer(method, 4, weight=False)
    x = torch.relu(torch.randn(4, 8, 6, 6))
    q.calibrate(x, signed=False)
    out = q(torch.cat([x, -x]))
    assert out.min().item() == 0.0
    assert_on_grid(q, out)


# --- factory -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_create_quantizer_builds_registered_class(method: str) -> None:
    q = create_quantizer(method, 3, weight=True, channels=5)
    assert type(q) is QUANTIZERS[method]
    assert q.method == method
    assert (q.bits, q.channels, q.for_weights, q.levels) == (3, 5, True, 8)
    assert all(p.shape == (5,) for p in q.parameters())


def test_registry_holds_the_release_methods() -> None:
    assert set(QUANTIZERS) == {"lsq", "ewgs", "pact", "dorefa", "ste"}


def test_create_quantizer_rejects_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown quantization method"):
        create_quantizer("nope", 4, weight=True)


@pytest.mark.parametrize("bits", [0, 9, -1])
@pytest.mark.parametrize("method", METHODS)
def test_create_quantizer_rejects_bits_outside_1_to_8(method: str, bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        create_quantizer(method, bits, weight=False)


def test_lsq_step_pushed_past_zero_keeps_its_grid() -> None:
    """An update can take a channel's step below zero: the grid is |step|'s, not its mirror."""
    q = LSQQuantizer(2, weight=True, channels=2)  # signed: q in -2..1
    with torch.no_grad():
        q.step.copy_(torch.tensor([0.5, -0.25]))
    w = torch.tensor([[-1.2, 0.4, 0.9], [-0.6, 0.1, 0.3]])
    out = q(w)
    assert out.tolist() == [[-1.0, 0.5, 0.5], [-0.5, 0.0, 0.25]]
    assert_on_grid(q, out)


def _int8_codes(quantizer: Quantizer, x: Tensor) -> Tensor:
    """The quantizer's output on ``x`` as codes of its grid shifted by the zero point: what an
    int8 QuantizeLinear with zero point 0 would have to store."""
    grid = quantizer.grid()
    shape = (-1,) + (1,) * (x.dim() - 1) if quantizer.channels else ()
    with torch.no_grad():
        codes = quantizer(x) / grid.scale.reshape(shape)
    torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)  # on the grid
    return codes.round()


@pytest.mark.parametrize("method", sorted(QUANTIZERS))
@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("signed", [False, True])
def test_int8_grids_fit_int8_with_zero_point_0_at_8_bits(
    method: str, weight: bool, signed: bool
) -> None:
    """The TensorRT-compatible variant: 8-bit grids whose codes, shifted by the zero point, lie
    in -128..127; the papers' grids do not (unsigned 0..255, EWGS's free zero point)."""
    x = torch.randn(16, 8, 4, 4) * 2
    x = x if signed else x.abs()
    channels = 16 if weight else None
    spans = {}
    for int8 in (False, True):
        quantizer = create_quantizer(method, 8, weight=weight, channels=channels, int8=int8)
        quantizer.calibrate(x, signed=signed)
        grid = quantizer.grid()
        shifted = torch.tensor([grid.qmin, grid.qmax]) - grid.zero_point.reshape(-1, 1)
        spans[int8] = (int(shifted.min()), int(shifted.max()))
        codes = _int8_codes(quantizer, x)
        assert spans[int8][0] <= codes.min() and codes.max() <= spans[int8][1]
    assert spans[True][0] >= -128 and spans[True][1] <= 127
    if not signed:
        assert spans[False][1] == 255  # what the variant exists for


@pytest.mark.parametrize("method", sorted(QUANTIZERS))
def test_int8_grids_change_nothing_below_8_bits(method: str) -> None:
    x = torch.randn(16, 8, 4, 4).abs()
    outputs = []
    for int8 in (False, True):
        quantizer = create_quantizer(method, 4, weight=False, int8=int8)
        quantizer.calibrate(x, signed=False)
        outputs.append(quantizer(x))
    assert torch.equal(*outputs)


@pytest.mark.parametrize("method", sorted(QUANTIZERS))
@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("signed", [False, True])
def test_uint8_grids_span_their_type_from_zero_at_8_bits(
    method: str, weight: bool, signed: bool
) -> None:
    """The CPU's variant: an 8-bit grid, shifted by its zero point, is uint8's 0..255 when
    unsigned and lies in int8's -128..127 when signed, also after training moved EWGS's lower
    bound (here by a tenth of the range, below zero), whose zero point the papers' grid
    follows."""
    x = torch.randn(16, 8, 4, 4) * 2
    x = x if signed else x.abs()
    channels = 16 if weight else None
    quantizer = create_quantizer(method, 8, weight=weight, channels=channels, uint8=True)
    quantizer.calibrate(x, signed=signed)
    if isinstance(quantizer, EWGSQuantizer):
        with torch.no_grad():
            quantizer.lower.sub_(0.1 * (quantizer.upper - quantizer.lower))
    grid = quantizer.grid()
    shifted = torch.tensor([grid.qmin, grid.qmax]) - grid.zero_point.reshape(-1, 1)
    codes = _int8_codes(quantizer, x)
    assert shifted.min() <= codes.min() and codes.max() <= shifted.max()
    if signed:
        assert shifted.min() >= -128 and shifted.max() <= 127
    else:
        assert shifted.min() == 0 and shifted.max() == 255


def test_ewgs_uint8_grids_pin_unsigned_zero_points_at_every_width() -> None:
    """Unsigned activations start at zero below 8 bits too (a 4-bit grid's codes 0..15), so
    the CPU file stores them as uint8 from zero; the papers' grid follows the lower bound."""
    x = torch.rand(64, 8)
    zero_points = {}
    for uint8 in (False, True):
        quantizer = create_quantizer("ewgs", 4, weight=False, uint8=uint8)
        quantizer.calibrate(x, signed=False)
        with torch.no_grad():
            quantizer.lower.fill_(-0.24)
            quantizer.upper.fill_(0.96)
        zero_points[uint8] = quantizer.grid().zero_point.item()
        _int8_codes(quantizer, x)  # the output is on that grid
    assert zero_points == {False: 3.0, True: 0.0}  # 0.24 below zero in steps of 1.2 / 15


def test_int8_and_uint8_grids_exclude_each_other() -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        create_quantizer("lsq", 8, weight=False, int8=True, uint8=True)
