"""Quantizers: one forward shape, different learnable parameters and backward rules.

Every quantizer maps a tensor onto ``2**bits`` evenly spaced levels and back to floats
("fake quantization"), so the student trains in float while seeing exactly the values the
low-bit model will compute with. They differ in what they learn:

- ``lsq``  (Esser et al. 2020): a step size ``s``, gradient scaled by ``1/sqrt(numel * qmax)``.
- ``ewgs`` (Lee et al. 2021): a lower and an upper bound; the rounding's backward scales each
  element's gradient by ``1 + delta * sign(g) * (x - round(x))``.

New schemes plug in with ``@register_quantizer("name")``; ``create_quantizer`` is the one factory.
Each quantizer can describe its integer grid (``grid()``) so exporters need no per-method code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

QUANTIZERS: dict[str, type[Quantizer]] = {}


def register_quantizer(name: str) -> Callable[[type[Quantizer]], type[Quantizer]]:
    def add(cls: type[Quantizer]) -> type[Quantizer]:
        QUANTIZERS[name] = cls
        cls.method = name
        return cls

    return add


def create_quantizer(
    method: str, bits: int, *, weight: bool, channels: int | None = None
) -> Quantizer:
    """A quantizer of ``method``; ``channels`` makes it per output channel (weights only)."""
    if method not in QUANTIZERS:
        raise ValueError(f"unknown quantization method {method!r}; known: {sorted(QUANTIZERS)}")
    return QUANTIZERS[method](bits, weight=weight, channels=channels)


def round_ste(x: Tensor) -> Tensor:
    """Round with an identity gradient (straight-through estimator)."""
    return x + (x.round() - x).detach()


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """Identity forward; multiplies the gradient by ``factor`` (LSQ's step-size gradient scale)."""
    return x * factor + (x - x * factor).detach()


@dataclass(frozen=True)
class IntGrid:
    """The integer lattice a quantizer's output lies on: ``value = (q - zero_point) * scale``.

    ``q`` runs over ``qmin..qmax`` in steps of ``stride`` (2 for grids of odd integers, such as
    1-bit signed weights {-1, +1}). ``scale`` and ``zero_point`` are per channel (dim 0) when
    the quantizer is per channel, else scalars.
    """

    scale: Tensor
    zero_point: Tensor
    qmin: int
    qmax: int
    stride: int = 1


class Quantizer(nn.Module):
    """Fake-quantizes to ``2**bits`` levels. Signed or unsigned is set by ``calibrate``."""

    method: str = ""

    def __init__(self, bits: int, *, weight: bool, channels: int | None = None) -> None:
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must lie in 1..8, got {bits}")
        self.bits = bits
        self.for_weights = weight
        self.channels = channels
        self.signed = True
        self.enabled = True  # calibration runs the student with quantizers off

    @property
    def levels(self) -> int:
        return 2**self.bits

    def param_shape(self, x: Tensor) -> tuple[int, ...]:
        """Shape of a per-channel parameter broadcast against ``x`` (channels on dim 0)."""
        return (-1,) + (1,) * (x.dim() - 1) if self.channels else ()

    def reduce_dims(self, x: Tensor) -> tuple[int, ...]:
        return tuple(range(1, x.dim())) if self.channels else tuple(range(x.dim()))

    def forward(self, x: Tensor) -> Tensor:
        return self.quantize(x) if self.enabled else x

    def quantize(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def calibrate(self, x: Tensor, *, signed: bool) -> None:
        """Initial parameters from a sample of the tensor this quantizer will see."""
        raise NotImplementedError

    def grid(self) -> IntGrid:
        raise NotImplementedError

    def rescale_(self, gain: Tensor) -> None:
        """Multiply the represented range by ``gain`` (per channel): same codes, scaled values."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, per_channel={bool(self.channels)}"


def mse_best_clip(x: Tensor, bits: int, signed: bool, reduce_dims: tuple[int, ...]) -> Tensor:
    """The clip value (per channel if ``reduce_dims`` keeps dim 0) minimising quantization MSE.

    A calibrated range decides where a short job starts: max-abs clipping wastes levels on
    outliers and, at 2 bits, leaves a student near chance; a grid search over fractions of the
    max is cheap and lands close to the optimum.
    """
    x = x.detach().float()
    max_abs = x.abs().amax(dim=reduce_dims, keepdim=True).clamp_min(1e-8)
    best_err: Tensor | None = None
    best_clip = max_abs
    levels = 2**bits
    for fraction in torch.linspace(0.05, 1.0, 40).tolist():
        clip = max_abs * fraction
        if signed:
            qmax = max(levels // 2 - 1, 0)
            offset = 0.5 if qmax == 0 else 0.0  # 1 bit signed: levels {-1/2, +1/2} * step
            step = clip / (qmax + offset) if qmax + offset > 0 else clip
            q = ((x / step - offset).round().clamp(-(levels // 2), qmax) + offset) * step
        else:
            step = clip / (levels - 1)
            q = (x / step).round().clamp(0, levels - 1) * step
        err = (q - x).pow(2).mean(dim=reduce_dims, keepdim=True)
        if best_err is None:
            best_err, best_clip = err, clip
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_clip = torch.where(better, clip, best_clip)
    return best_clip


@register_quantizer("lsq")
class LSQQuantizer(Quantizer):
    """Learned Step Size Quantization: ``round(clamp(x / s, qmin, qmax)) * s`` with learnable s."""

    def __init__(self, bits: int, *, weight: bool, channels: int | None = None) -> None:
        super().__init__(bits, weight=weight, channels=channels)
        self.step = nn.Parameter(torch.ones(channels or 1))

    def int_range(self) -> tuple[int, int, float]:
        """(qmin, qmax, offset): levels are ``(k + offset) * step`` for k in qmin..qmax."""
        if not self.signed:
            return 0, self.levels - 1, 0.0
        if self.bits == 1:
            return -1, 0, 0.5  # {-s/2, +s/2}: a 1-bit signed grid has no zero
        return -(self.levels // 2), self.levels // 2 - 1, 0.0

    def quantize(self, x: Tensor) -> Tensor:
        qmin, qmax, offset = self.int_range()
        # LSQ's N: elements sharing one step (a weight tensor or channel; one sample's features)
        per_scale = x.numel() if self.for_weights and not self.channels else x[0].numel()
        step = scale_grad(self.step, 1.0 / math.sqrt(per_scale * max(qmax, 1)))
        step = step.view(self.param_shape(x)) if self.channels else step.squeeze()
        q = round_ste((x / step - offset).clamp(qmin, qmax))
        return (q + offset) * step

    def calibrate(self, x: Tensor, *, signed: bool) -> None:
        self.signed = signed
        qmin, qmax, offset = self.int_range()
        clip = mse_best_clip(x, self.bits, signed, self.reduce_dims(x))
        with torch.no_grad():
            self.step.copy_((clip / (qmax + offset)).reshape(-1).expand_as(self.step))

    def rescale_(self, gain: Tensor) -> None:
        with torch.no_grad():
            self.step.mul_(gain.reshape(-1).expand_as(self.step))

    def grid(self) -> IntGrid:
        qmin, qmax, offset = self.int_range()
        step = self.step.detach().abs()
        if offset:  # odd-integer grid: (k + 1/2) * s == (2k + 1) * s/2
            return IntGrid(step / 2, torch.zeros_like(step), 2 * qmin + 1, 2 * qmax + 1, stride=2)
        return IntGrid(step, torch.zeros_like(step), qmin, qmax)


class _EWGSRound(torch.autograd.Function):
    """Rounding whose backward scales each gradient by ``1 + delta * sign(g) * (x - round(x))``."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, delta: float) -> Tensor:
        rounded = x.round()
        ctx.save_for_backward(x - rounded)
        ctx.delta = delta
        return rounded

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        (residual,) = ctx.saved_tensors
        return grad * (1 + ctx.delta * grad.sign() * residual), None


@register_quantizer("ewgs")
class EWGSQuantizer(Quantizer):
    """EWGS: normalise to a learnable [lower, upper] interval, round to 2**bits - 1 steps, rescale.

    ``delta`` is the gradient-scaling strength (the EWGS paper derives it from the Hessian trace;
    this release uses a fixed value, 1e-3 as the EWGS code initialises it).
    """

    def __init__(
        self, bits: int, *, weight: bool, channels: int | None = None, delta: float = 1e-3
    ) -> None:
        super().__init__(bits, weight=weight, channels=channels)
        self.lower = nn.Parameter(torch.zeros(channels or 1))
        self.upper = nn.Parameter(torch.ones(channels or 1))
        self.delta = delta

    def quantize(self, x: Tensor) -> Tensor:
        shape = self.param_shape(x)
        lower = self.lower.view(shape) if self.channels else self.lower.squeeze()
        upper = self.upper.view(shape) if self.channels else self.upper.squeeze()
        width = (upper - lower).clamp_min(1e-8)
        steps = self.levels - 1
        normalised = ((x - lower) / width).clamp(0, 1) * steps
        return _EWGSRound.apply(normalised, self.delta) / steps * width + lower

    def calibrate(self, x: Tensor, *, signed: bool) -> None:
        self.signed = signed
        clip = mse_best_clip(x, self.bits, signed, self.reduce_dims(x)).reshape(-1)
        with torch.no_grad():
            self.upper.copy_(clip.expand_as(self.upper))
            self.lower.copy_((-clip if signed else torch.zeros_like(clip)).expand_as(self.lower))

    def rescale_(self, gain: Tensor) -> None:
        with torch.no_grad():
            self.lower.mul_(gain.reshape(-1).expand_as(self.lower))
            self.upper.mul_(gain.reshape(-1).expand_as(self.upper))

    def grid(self) -> IntGrid:
        """Levels ``lower + k * step``; the zero point is rounded onto the integer lattice."""
        step = ((self.upper - self.lower).detach().clamp_min(1e-8)) / (self.levels - 1)
        zero_point = (-self.lower.detach() / step).round()
        return IntGrid(step, zero_point, 0, self.levels - 1)
