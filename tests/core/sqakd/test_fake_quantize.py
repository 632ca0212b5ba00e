"""The hand-written ``fake_quantize`` op against the same formula composed from autograd ops."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from core.sqakd import quantizers
from core.sqakd.quantizers import SCRATCH_MIN_NUMEL, fake_quantize


class _ScaledRound(torch.autograd.Function):
    """Reference EWGS rounding: backward ``g * (1 + delta * sign(g) * (n - round(n)))``."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, n: Tensor, delta: float) -> Tensor:
        ctx.save_for_backward(n - n.round())
        ctx.delta = delta
        return n.round()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: Tensor) -> tuple[Tensor, None]:
        (residual,) = ctx.saved_tensors
        return g * (1 + ctx.delta * g.sign() * residual), None


def reference(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, delta: float, clip: bool
) -> Tensor:
    """The formula as autograd ops: LSQ/EWGS (straight-through or scaled rounding of the
    clamped code) or, with ``clip``, PACT's clip-then-round with the gradient of the clip."""
    if clip:
        lower, upper = (qmin - zero_point) * scale, (qmax - zero_point) * scale
        clipped = torch.where(x >= upper, upper, torch.where(x < lower, lower, x))
        codes = (x / scale).detach().clamp(qmin - zero_point, qmax - zero_point).round()
        value = codes * scale.detach()
        return value.detach() + (clipped - clipped.detach())
    codes = (x / scale + zero_point).clamp(qmin, qmax)
    return (_ScaledRound.apply(codes, delta) - zero_point) * scale


def run(fn: object, x: Tensor, scale: Tensor, zero_point: Tensor, g: Tensor) -> list[Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in (x, scale, zero_point)]
    out = fn(*leaves)  # type: ignore[operator]
    (out * g).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]  # type: ignore[misc]


CASES = {  # shape, parameter shape, qmin, qmax, channels_last
    "per-tensor unsigned 4 bit": ((8, 6, 5, 5), (), 0, 15, False),
    "per-tensor unsigned 4 bit, channels_last": ((8, 6, 5, 5), (), 0, 15, True),
    "per-tensor signed 3 bit": ((8, 6, 5, 5), (), -4, 3, False),
    "per-channel 2 bit": ((6, 3, 3, 3), (6, 1, 1, 1), -2, 1, False),
    "per-channel 2 bit, channels_last": ((6, 3, 3, 3), (6, 1, 1, 1), -2, 1, True),
    "linear 8 bit": ((16, 40), (), -128, 127, False),
}
RULES = {  # delta, clip: what the methods use (PACT/STE clip without EWGS's delta)
    "lsq": (0.0, False),
    "ewgs": (0.3, False),
    "pact": (0.0, True),
}


@pytest.mark.parametrize("operands", ["numbers", "tensors"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case", CASES)
def test_fake_quantize_matches_the_autograd_formula(
    case: str, rule: str, operands: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``operands="tensors"`` runs the CUDA code path on the CPU: one-element scales, zero
    points and deltas stay tensors (on CUDA, a Python number would cost a device sync)."""
    if operands == "tensors":
        monkeypatch.setattr(quantizers, "_scalar", lambda t: t)
    shape, param_shape, qmin, qmax, channels_last = CASES[case]
    delta, clip = RULES[rule]
    generator = torch.Generator().manual_seed(0)
    scale = torch.rand(param_shape, generator=generator) * 0.2 + 0.05
    zero_point = torch.randint(0, 2, param_shape, generator=generator).float() * (qmin < 0)
    # inputs reach past both ends of the range, and never sit on a rounding tie or a bound
    x = (torch.rand(shape, generator=generator) * 1.4 - 0.7) * (qmax - qmin) * scale.max()
    codes = x / scale
    x = torch.where((codes - codes.floor() - 0.5).abs() < 1e-3, x + 0.01 * scale, x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape, generator=generator)
    delta_tensor = torch.tensor(delta) if delta else None

    got = run(
        lambda x_, s, z: fake_quantize(x_, s, z, qmin, qmax, delta=delta_tensor, clip=clip),
        x,
        scale,
        zero_point,
        g,
    )
    want = run(
        lambda x_, s, z: reference(x_, s, z, qmin, qmax, delta, clip), x, scale, zero_point, g
    )
    names = ["output", "input grad", "scale grad", "zero point grad"]
    for name, a, b in zip(names, got, want, strict=True):
        if name == "zero point grad" and clip:
            continue  # PACT's range is its clip; the reference's zero point is not a parameter
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def test_fake_quantize_output_is_quantize_linear_then_dequantize_linear() -> None:
    """Bit-exact with ONNX's QuantizeLinear/DequantizeLinear: saturate(round(x / s) + z)."""
    x = torch.randn(4, 8, 7, 7) * 3
    scale, zero_point = torch.tensor(0.037), torch.tensor(3.0)
    out = fake_quantize(x, scale, zero_point, -8, 7)
    codes = (x / scale).round().add(zero_point).clamp(-8, 7)
    assert torch.equal(out, (codes - zero_point) * scale)


def test_fake_quantize_is_twice_differentiable_in_its_input_gradient() -> None:
    """create_graph (Hessian-vector products) sees the input gradient as a function of g."""
    x = torch.randn(32, requires_grad=True)
    scale, zero_point, delta = torch.tensor(0.1), torch.tensor(0.0), torch.tensor(0.5)
    out = fake_quantize(x, scale, zero_point, -8, 7, delta=delta)
    g = torch.randn(32, requires_grad=True)
    (gx,) = torch.autograd.grad(out, x, g, create_graph=True)
    (d_gx_d_g,) = torch.autograd.grad(gx.sum(), g)
    codes = x.detach() / scale
    inside = (codes >= -8) & (codes <= 7)
    residual = codes.clamp(-8, 7) - codes.clamp(-8, 7).round()
    expected = inside * (1 + delta * g.detach().sign() * residual)
    torch.testing.assert_close(d_gx_d_g, expected.float())


def test_reused_temporaries_give_the_same_gradients_call_after_call() -> None:
    """Activation-sized inputs take the backward's temporaries from a pool (``_Scratch``):
    consecutive backwards, of this shape and of others in between, must not see each other's
    values."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 16, 64, 64), (4, 32, 64, 64), (4, 16, 64, 64)]
    assert all(torch.Size(shape).numel() >= SCRATCH_MIN_NUMEL for shape in shapes)
    scale, zero_point, delta = torch.tensor(0.1), torch.tensor(2.0), 0.3
    for shape in shapes * 2:
        x = torch.randn(shape, generator=generator).contiguous(memory_format=torch.channels_last)
        g = torch.randn(shape, generator=generator)
        got = run(
            lambda x_, s, z: fake_quantize(x_, s, z, 0, 15, delta=torch.tensor(delta)),
            x,
            scale,
            zero_point,
            g,
        )
        want = run(
            lambda x_, s, z: reference(x_, s, z, 0, 15, delta, False), x, scale, zero_point, g
        )
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
