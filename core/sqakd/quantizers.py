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
CLIP_FRACTIONS = torch.logspace(-1.7, 0, 24).tolist()  # 0.02 .. 1 of the largest magnitude


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
        # Rounding onto 256 levels needs float32: bf16 has 8 significant bits.
        return self.quantize(x.float()) if self.enabled else x

    def quantize(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def set_range(self, clip: Tensor) -> None:
        """Represent ``[-clip, clip]`` (signed) or ``[0, clip]``; ``clip`` per channel or [1]."""
        raise NotImplementedError

    @torch.no_grad()
    def fit_range(self, max_abs: Tensor, *, signed: bool, error: Callable[[], Tensor]) -> None:
        """Set the range, per channel, to the clip fraction of ``max_abs`` with the least error.

        Where the range starts decides what a short job can reach: max-abs clipping wastes
        levels on outliers, and at 2 bits leaves a student near chance. ``error()`` scores the
        current range (one value per channel, or one in all).
        """
        self.signed = signed
        best_error, best_clip = None, max_abs
        for fraction in CLIP_FRACTIONS:
            clip = max_abs * fraction
            self.set_range(clip)
            candidate = error()
            if best_error is None:
                best_error, best_clip = candidate, clip
            else:
                better = candidate < best_error
                best_error = torch.where(better, candidate, best_error)
                best_clip = torch.where(better, clip, best_clip)
        self.set_range(best_clip)

    def calibrate(self, x: Tensor, *, signed: bool) -> None:
        """Fit the range to a sample of the tensor this quantizer will see (least MSE)."""
        dims = self.reduce_dims(x)
        x = x.detach().float()
        max_abs = x.abs().amax(dim=dims).reshape(-1).clamp_min(1e-8)
        self.fit_range(
            max_abs,
            signed=signed,
            error=lambda: (self.quantize(x) - x).pow(2).mean(dim=dims).reshape(-1),
        )

    def grid(self) -> IntGrid:
        raise NotImplementedError

    def rescale_(self, gain: Tensor) -> None:
        """Multiply the represented range by ``gain`` (per channel): same codes, scaled values."""
        raise NotImplementedError

    def range_lr_unit(self) -> float:
        """How far a learning rate of 1 may move this quantizer's parameters in one update.

        Chosen so that ``quantizer_lr`` moves the range by about that many quantization steps
        whatever the method: a bound moves by ``lr`` steps; a step size by ``lr / qmax`` of
        itself, which moves the largest level by ``lr`` steps.
        """
        grid = self.grid()
        return (grid.scale * grid.stride).mean().item()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, per_channel={bool(self.channels)}"


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

    def set_range(self, clip: Tensor) -> None:
        _, qmax, offset = self.int_range()
        with torch.no_grad():
            self.step.copy_((clip / (qmax + offset)).expand_as(self.step))

    def range_lr_unit(self) -> float:
        _, qmax, offset = self.int_range()
        return self.step.detach().abs().mean().item() / max(qmax + offset, 1.0)

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

    @property
    def symmetric_binary(self) -> bool:
        return self.signed and self.bits == 1

    def quantize(self, x: Tensor) -> Tensor:
        shape = self.param_shape(x)
        lower = self.lower.view(shape) if self.channels else self.lower.squeeze()
        upper = self.upper.view(shape) if self.channels else self.upper.squeeze()
        steps = self.levels - 1
        if self.symmetric_binary:
            lower = -upper  # 1 bit signed: {-u, +u}, a grid with no zero level
        else:
            # Snap the lower bound to a whole number of steps below zero, so that zero is a
            # level (an integer zero point): only then does the grid export exactly to int8.
            step = (upper - lower).clamp_min(1e-8) / steps
            lower = -round_ste(-lower / step) * step
            upper = lower + step * steps  # the snapped grid keeps its step
        width = (upper - lower).clamp_min(1e-8)
        normalised = ((x - lower) / width).clamp(0, 1) * steps
        return _EWGSRound.apply(normalised, self.delta) / steps * width + lower

    def set_range(self, clip: Tensor) -> None:
        """Signed: ``[-clip, clip - step]``, so the zero point starts on a whole step."""
        half = self.levels // 2
        upper = clip if not self.signed or self.symmetric_binary else clip * (half - 1) / half
        with torch.no_grad():
            self.upper.copy_(upper.expand_as(self.upper))
            self.lower.copy_(
                (-clip if self.signed else torch.zeros_like(clip)).expand_as(self.lower)
            )

    def rescale_(self, gain: Tensor) -> None:
        with torch.no_grad():
            self.lower.mul_(gain.reshape(-1).expand_as(self.lower))
            self.upper.mul_(gain.reshape(-1).expand_as(self.upper))

    def grid(self) -> IntGrid:
        """Levels ``lower + k * step`` with ``lower`` snapped as in ``quantize``."""
        upper = self.upper.detach().clone()  # a snapshot: training goes on changing upper
        if self.symmetric_binary:
            return IntGrid(upper, torch.zeros_like(upper), -1, 1, stride=2)
        step = (upper - self.lower.detach()).clamp_min(1e-8) / (self.levels - 1)
        zero_point = (-self.lower.detach() / step).round()
        return IntGrid(step, zero_point, 0, self.levels - 1)
