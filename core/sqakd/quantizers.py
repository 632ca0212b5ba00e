"""Quantizers: one forward shape, different learnable parameters and backward rules.

Every quantizer maps a tensor onto ``2**bits`` evenly spaced levels and back to floats
("fake quantization"), so the student trains in float while seeing exactly the values the
low-bit model will compute with. They differ in what they learn:

- ``lsq``  (Esser et al. 2020): a step size ``s``, gradient scaled by ``1/sqrt(numel * qmax)``.
- ``ewgs`` (Lee et al. 2021): a lower and an upper bound; the rounding's backward scales each
  element's gradient by ``1 + delta * sign(g) * (x - round(x))``.
- ``pact`` (Choi et al. 2018): an activation clip ``alpha``, reached by the gradient only where
  ``x >= alpha``; weights as ``dorefa``.
- ``dorefa`` (Zhou et al. 2016): nothing; weights ``tanh``-normalised onto a symmetric grid,
  activations clipped to their calibrated range, straight-through rounding.
- ``ste``: nothing (the baseline): a calibrated range, straight-through rounding.

New schemes plug in with ``@register_quantizer("name")``; ``create_quantizer`` is the one factory.
Each quantizer can describe its integer grid (``grid()``) so exporters need no per-method code.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from core.sqakd.distributed import mean_gradient

QUANTIZERS: dict[str, type[Quantizer]] = {}
CLIP_FRACTIONS = torch.logspace(-1.7, 0, 24).tolist()  # 0.02 .. 1 of the largest magnitude
SEARCH_STRIDES = (6, 3, 1)  # fit_range: every 6th fraction, then +-3, then +-1 and +-2
INT8_MAX = 127
MIN_STEP = 1e-8  # a learnt step or range is kept at least this large


def register_quantizer(name: str) -> Callable[[type[Quantizer]], type[Quantizer]]:
    def add(cls: type[Quantizer]) -> type[Quantizer]:
        QUANTIZERS[name] = cls
        cls.method = name
        return cls

    return add


def create_quantizer(
    method: str,
    bits: int,
    *,
    weight: bool,
    channels: int | None = None,
    int8: bool = False,
    uint8: bool = False,
) -> Quantizer:
    """A quantizer of ``method``; ``channels`` makes it per output channel (weights only);
    ``int8`` keeps its grid inside int8 with zero point 0 (``Quantizer.int8``, TensorRT's
    grids), ``uint8`` makes each 8-bit grid its type's whole range (``Quantizer.uint8``, the
    CPU's grids)."""
    if method not in QUANTIZERS:
        raise ValueError(f"unknown quantization method {method!r}; known: {sorted(QUANTIZERS)}")
    if int8 and uint8:
        raise ValueError("int8 (TensorRT's grids) and uint8 (the CPU's grids) exclude each other")
    quantizer = QUANTIZERS[method](bits, weight=weight, channels=channels)
    quantizer.int8 = int8
    quantizer.uint8 = uint8
    return quantizer


def round_ste(x: Tensor) -> Tensor:
    """Round with an identity gradient (straight-through estimator)."""
    return x + (x.round() - x).detach()


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """Identity forward, bit for bit; multiplies the gradient by ``factor`` (LSQ's step-size
    gradient scale). Exact, so that the step the forward uses is the step ``grid()`` exports."""
    scaled = x * factor
    return x.detach() + (scaled - scaled.detach())


def _scalar(t: Tensor) -> Tensor | float:
    """A one-element CPU tensor as a Python number: CPU kernels with scalar operands run ~3x
    faster than with broadcast tensors. CUDA tensors stay tensors (no device sync), and so does
    everything under torch.compile (``.item()`` would break its graph at every quantizer)."""
    if torch.compiler.is_compiling():
        return t
    return t.item() if t.numel() == 1 and t.device.type == "cpu" else t


def _sum(values: Tensor, shape: torch.Size, weights: Tensor | None = None) -> Tensor:
    """``(values * weights)`` summed down to ``shape`` (a parameter's broadcast shape)."""
    if weights is None:
        return values.sum_to_size(shape)
    if (
        shape.numel() == 1
        and values.stride() == weights.stride()
        and values.is_contiguous(memory_format=_memory_format(values))
    ):  # one pass, no temporary: the dot product of the two buffers as laid out
        flat = (values.numel(),), (1,)
        return torch.dot(values.as_strided(*flat), weights.as_strided(*flat)).reshape(shape)
    return (values * weights).sum_to_size(shape)


def _memory_format(t: Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )


def _inside(g: Tensor, v: Tensor, lo: Tensor | float, hi: Tensor | float, clip: bool) -> Tensor:
    """``g`` where ``lo <= v <= hi`` (``lo <= v < hi`` when ``clip``), else 0."""
    if isinstance(lo, float) and isinstance(hi, float):
        # hardtanh_backward keeps lo < v < hi in one pass: widen each end by one float32 ulp
        below = float(np.nextafter(np.float32(lo), np.float32(-np.inf)))
        above = hi if clip else float(np.nextafter(np.float32(hi), np.float32(np.inf)))
        return torch.ops.aten.hardtanh_backward(g, v, below, above)
    return g * ((v >= lo) & ((v < hi) if clip else (v <= hi)))


class _Scratch(threading.local):
    """Activation-sized temporaries of ``_FakeQuantize.backward``, kept between calls (CPU).

    The backward's temporaries never leave it, so each call can reuse the memory of the last
    one with the same layout. A fresh tensor of this size costs its page faults on every call
    (the C allocator hands large blocks back to the OS), about as much as its arithmetic:
    reusing them made the EWGS backward about 1.7x faster here. Bounded to ``SCRATCH_BYTES``,
    most recently used layouts first; tensors smaller than ``SCRATCH_MIN_NUMEL`` (weights) are
    allocated as usual. One pool per thread, so concurrent trainings never share buffers.
    """

    def __init__(self) -> None:
        self.buffers: OrderedDict[tuple[Any, ...], list[Tensor]] = OrderedDict()

    def take(self, like: Tensor, count: int) -> list[Tensor | None]:
        """``count`` uninitialised tensors with the size, strides and dtype of ``like``, or
        ``None`` (allocate as usual: ``_out``) on CUDA, for small tensors, and under
        torch.compile (which plans memory itself and cannot trace the pool or ``out=``)."""
        if (
            like.device.type != "cpu"
            or like.numel() < SCRATCH_MIN_NUMEL
            or torch.compiler.is_compiling()
        ):
            return [None] * count
        key = (like.shape, like.stride(), like.dtype)
        buffers = self.buffers.pop(key, [])
        buffers += [torch.empty_like(like) for _ in range(count - len(buffers))]
        self.buffers[key] = buffers
        while sum(t.nbytes for group in self.buffers.values() for t in group) > SCRATCH_BYTES:
            self.buffers.popitem(last=False)
        return buffers[:count]


def _out(buffer: Tensor | None) -> dict[str, Tensor]:
    """``out=buffer`` for an op, or nothing: a new tensor."""
    return {} if buffer is None else {"out": buffer}


SCRATCH_BYTES = 256 * 2**20
SCRATCH_MIN_NUMEL = 2**18
_scratch = _Scratch()


class _FakeQuantize(torch.autograd.Function):
    """``y = s * clamp(round(x / s), qmin - z, qmax - z)``: the grid ``(q - z) * s``, q in
    ``qmin..qmax``, exactly as ONNX QuantizeLinear/DequantizeLinear compute it, as one op.

    Forward and backward are written out by hand so that a quantizer costs one new tensor
    forward and one backward, plus three reused temporaries (``_Scratch``); composed from
    autograd ops the same formula made about thirty new tensors, and on a CPU every fresh
    activation-sized tensor pays its page faults. The backward covers every
    method here: the input's gradient is straight through inside the range and zero outside,
    scaled by EWGS's ``1 + delta * sign(g) * (v - round(v))`` when ``delta`` is given (code
    units); the scale's and zero point's gradients are those of the formula with
    straight-through rounding (LSQ's step gradient) or, when ``clip``, only those of the
    clipped elements (PACT: the range moves only where the input reaches it; ``v == hi``
    counts as clipped). ``scale`` and ``zero_point`` broadcast against ``x``.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        scale: Tensor,
        zero_point: Tensor,
        qmin: int,
        qmax: int,
        delta: Tensor | None,
        clip: bool,
    ) -> Tensor:
        s, z = _scalar(scale), _scalar(zero_point)
        ctx.save_for_backward(x, scale, zero_point, delta)
        ctx.grid = qmin, qmax, clip
        return x.div(s).clamp_(qmin - z, qmax - z).round_().mul_(s)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: Tensor) -> tuple[Tensor | None, ...]:
        # With c = clamp(x / s, lo, hi) and gx the input gradient (EWGS's term included):
        #   d L / d s = sum(g * round(c)) - sum(gx * c)   (with clip: sum(g * c) - sum(gx * c))
        #   d L / d z = s * (sum(gx) - sum(g))
        # Grouped so that each is two dot products of buffers the input gradient needs anyway.
        x, scale, zero_point, delta = ctx.saved_tensors
        qmin, qmax, clip = ctx.grid
        s, z = _scalar(scale), _scalar(zero_point)
        lo, hi = qmin - z, qmax - z
        shape, (needs_scale, needs_zero) = scale.shape, ctx.needs_input_grad[1:3]
        create_graph = torch.is_grad_enabled()  # Hessian estimates differentiate gx in g
        with torch.no_grad():
            # Temporaries: reused memory, except where autograd keeps them (create_graph)
            codes, rounded, scaled = [None] * 3 if create_graph else _scratch.take(x, 3)
            codes = torch.div(x, s, **_out(codes))
            gx = _inside(g, codes, lo, hi, clip)  # straight through inside the range
            if delta is None and not (needs_scale or needs_zero or create_graph):
                return gx, None, None, None, None, None, None
            codes.clamp_(lo, hi)
            if not clip:
                rounded = torch.round(codes, **_out(rounded))
            g_scale = _sum(g, shape, codes if clip else rounded) if needs_scale else None
            if delta is not None:
                residual = torch.sub(codes, rounded, **_out(rounded))  # 0 outside the range
                if create_graph:
                    mask = gx != 0
                else:
                    magnitude = torch.abs(g, **_out(scaled))
                    strength = _scalar(delta)
                    if isinstance(strength, float):  # gx += delta * |g| * residual
                        gx.addcmul_(magnitude, residual, value=strength)
                    else:  # a CUDA tensor: no device sync for a Python number
                        gx.addcmul_(magnitude.mul_(strength), residual)
        if create_graph:
            gx = g * mask + delta * g.abs() * residual if delta is not None else g * (gx != 0)
            return gx, None, None, None, None, None, None
        with torch.no_grad():
            if g_scale is not None:
                g_scale = g_scale - _sum(gx, shape, codes)
            g_zero = (_sum(gx, shape) - _sum(g, shape)) * scale if needs_zero else None
        return gx, g_scale, g_zero, None, None, None, None


def fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    *,
    delta: Tensor | None = None,
    clip: bool = False,
) -> Tensor:
    """``x`` on the grid ``(q - zero_point) * scale``, q in ``qmin..qmax`` (``_FakeQuantize``).

    ``zero_point`` must hold whole numbers. ``delta`` (EWGS) and ``clip`` (PACT) exclude each
    other: no method combines them.
    """
    if delta is not None and clip:
        raise ValueError("fake_quantize: delta (EWGS) and clip (PACT) do not combine")
    return _FakeQuantize.apply(x, scale, zero_point, qmin, qmax, delta, clip)


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


class _Pass(threading.local):
    """The forward pass under way in this thread, if any (``one_pass``)."""

    token: object | None = None


_pass = _Pass()


@contextlib.contextmanager
def one_pass() -> Iterator[None]:
    """One forward pass: inside it, a quantizer called again with the same unchanged tensor
    returns its first output (``Quantizer.forward``). Outside any pass, never: a later call may
    follow an optimizer step or a backward that freed the first output's graph."""
    outer, _pass.token = _pass.token, object()
    try:
        yield
    finally:
        _pass.token = outer


def passes_of(model: nn.Module) -> None:
    """Make each forward of ``model`` one pass (``one_pass``), with forward hooks."""
    model.register_forward_pre_hook(_begin_pass)
    model.register_forward_hook(_end_pass, always_call=True)


_open_passes = threading.local()  # this thread's passes begun by hooks, innermost last


def _begin_pass(module: nn.Module, args: Any) -> None:
    if torch.compiler.is_compiling():  # a compiled forward reuses nothing (_reuse_state)
        return
    opened = one_pass()
    opened.__enter__()
    _open_passes.__dict__.setdefault("stack", []).append(opened)


def _end_pass(module: nn.Module, args: Any, output: Any) -> None:
    if torch.compiler.is_compiling():
        return
    _open_passes.stack.pop().__exit__(None, None, None)


def _reuse_state(x: Tensor) -> tuple[Any, ...] | None:
    """What a quantizer's output in this pass depends on besides its parameters (fixed within a
    pass), or None: do not reuse (no pass; torch.compile, which traces neither weak references
    nor version counters; an inference-mode tensor, which has no version counter)."""
    if _pass.token is None or torch.compiler.is_compiling() or x.is_inference():
        return None
    return (_pass.token, x._version, torch.is_grad_enabled())


class Quantizer(nn.Module):
    """Fake-quantizes to ``2**bits`` levels. Signed or unsigned is set by ``calibrate``."""

    method: str = ""
    # The TensorRT-compatible variant: every grid, shifted by its zero point, inside int8's
    # -128..127, since TensorRT takes INT8 with zero point 0 only. Below 8 bits every grid
    # already is; at 8 bits unsigned grids keep 0..127 (one bit of resolution less) and EWGS's
    # zero point is pinned to 128 (signed) so that its 256 codes are int8's.
    int8: bool = False
    # The CPU variant (``export.target: cpu``): every grid in its integer type with zero point
    # 0, at 8 bits the type's whole range, which x86 int8 kernels fold into their saturation:
    # unsigned grids 0..2**bits - 1 from zero (uint8), signed ones inside int8. The papers'
    # grids already are, but for EWGS's free zero point: pinned to 0 (unsigned) or as ``int8``
    # pins it (signed: 128 at 8 bits).
    uint8: bool = False

    def __init__(self, bits: int, *, weight: bool, channels: int | None = None) -> None:
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must lie in 1..8, got {bits}")
        self.bits = bits
        self.for_weights = weight
        self.channels = channels
        self.signed = True
        self.enabled = True  # calibration runs the student with quantizers off
        # forward: this pass's last input and output (weakly: never kept alive) and its state
        self._last: tuple[weakref.ref[Tensor], tuple[Any, ...], weakref.ref[Tensor]] | None = None

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def unsigned_top(self) -> int:
        """The largest code of an unsigned grid: ``2**bits - 1``, or 127 with ``int8``."""
        return min(self.levels - 1, INT8_MAX) if self.int8 else self.levels - 1

    def param_shape(self, x: Tensor) -> tuple[int, ...]:
        """Shape of a per-channel parameter broadcast against ``x`` (channels on dim 0)."""
        return (-1,) + (1,) * (x.dim() - 1) if self.channels else ()

    def reduce_dims(self, x: Tensor) -> tuple[int, ...]:
        return tuple(range(1, x.dim())) if self.channels else tuple(range(x.dim()))

    def forward(self, x: Tensor) -> Tensor:
        """``x`` fake-quantized; within one forward pass of a model (``one_pass``), the same
        output object again for the same unchanged input.

        A quantizer shared by the readers of one tensor (``share_input_quantizers``: a block's
        first convolution, its shortcut and its residual addition) is called once per reader
        with that tensor. The first call's output serves them all, as the exported graph
        quantizes the tensor once: the other calls cost nothing, and the one backward sees the
        readers' summed gradient, the gradient of the quantized tensor that EWGS's rule scales.
        """
        if not self.enabled:
            return x
        state = _reuse_state(x)
        if state is not None and self._last is not None:
            last_input, last_state, last_output = self._last
            # The input's identity by reference: an id can be a new tensor's once freed
            if last_state == state and last_input() is x and (reused := last_output()) is not None:
                return reused
        # Rounding onto 256 levels needs float32: bf16 has 8 significant bits.
        out = self.quantize(x.float())
        self._last = None if state is None else (weakref.ref(x), state, weakref.ref(out))
        return out

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

        The error falls and then rises with the fraction (clipping against rounding), so the
        search runs coarse to fine (``SEARCH_STRIDES``), around each channel's best so far:
        11 of the 24 fractions scored, and the same choice as scoring all of them wherever the
        error has one minimum over them (ties: the smallest fraction).
        """
        self.signed = signed
        clips = torch.stack([max_abs * fraction for fraction in CLIP_FRACTIONS])
        errors = torch.full_like(clips, math.inf)
        last = len(CLIP_FRACTIONS) - 1

        def score(index: Tensor) -> None:  # one candidate per channel
            self.set_range(clips.gather(0, index[None])[0])
            errors.scatter_(0, index[None], error().nan_to_num(math.inf).expand_as(index)[None])

        for start in sorted({*range(0, last, SEARCH_STRIDES[0]), last}):
            score(torch.full_like(max_abs, start, dtype=torch.long))
        for wider, stride in itertools.pairwise(SEARCH_STRIDES):
            best = errors.argmin(0)  # the first of equals
            for offset in range(stride, wider, stride):
                score((best - offset).clamp_min(0))
                score((best + offset).clamp_max(last))
        self.set_range(clips.gather(0, errors.argmin(0)[None])[0])

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
            return 0, self.unsigned_top, 0.0
        if self.bits == 1:
            return -1, 0, 0.5  # {-s/2, +s/2}: a 1-bit signed grid has no zero
        return -(self.levels // 2), self.levels // 2 - 1, 0.0

    def quantize(self, x: Tensor) -> Tensor:
        qmin, qmax, offset = self.int_range()
        # LSQ's N: elements sharing one step (a weight tensor or channel; one sample's features)
        per_scale = x.numel() if self.for_weights and not self.channels else x[0].numel()
        # |step|: an update past zero must not mirror the grid (as grid() reads it)
        step = scale_grad(self.step, 1.0 / math.sqrt(per_scale * max(qmax, 1)))
        step = step.abs().clamp_min(MIN_STEP)
        step = step.view(self.param_shape(x)) if self.channels else step.squeeze()
        if offset:  # 1 bit signed, {-s/2, +s/2}: off the integer grid of fake_quantize
            q = round_ste((x / step - offset).clamp(qmin, qmax))
            return (q + offset) * step
        return fake_quantize(x, step, torch.zeros_like(step), qmin, qmax)

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
        step = self.step.detach().abs().clamp_min(MIN_STEP)
        if offset:  # odd-integer grid: (k + 1/2) * s == (2k + 1) * s/2
            return IntGrid(step / 2, torch.zeros_like(step), 2 * qmin + 1, 2 * qmax + 1, stride=2)
        return IntGrid(step, torch.zeros_like(step), qmin, qmax)


class _EWGSRound(torch.autograd.Function):
    """Rounding whose backward scales each gradient by ``1 + delta * sign(g) * (x - round(x))``;
    the 1-bit symmetric EWGS grid, which ``fake_quantize``'s integer grid cannot express."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, delta: Tensor) -> Tensor:
        rounded = x.round()
        ctx.save_for_backward(x - rounded, delta)
        return rounded

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        residual, delta = ctx.saved_tensors
        return grad * (1 + delta * grad.sign() * residual), None


@register_quantizer("ewgs")
class EWGSQuantizer(Quantizer):
    """EWGS: normalise to a learnable [lower, upper] interval, round to 2**bits - 1 steps, rescale.

    The rounding's backward scales each gradient by ``1 + delta * sign(g) * (x_n - x_q)``, with
    ``x_n`` the input normalised to [0, 1] and ``x_q`` its rounding to the levels (the paper's
    units). ``delta`` is a buffer: ``core.sqakd.hessian.estimate_ewgs_deltas`` sets it from the
    Hessian trace as the EWGS paper does; until then it is 0 (straight through), the default of
    the paper's SQAKD code.
    """

    def __init__(
        self, bits: int, *, weight: bool, channels: int | None = None, delta: float = 0.0
    ) -> None:
        super().__init__(bits, weight=weight, channels=channels)
        self.lower = nn.Parameter(torch.zeros(channels or 1))
        self.upper = nn.Parameter(torch.ones(channels or 1))
        self.register_buffer("delta", torch.tensor(float(delta)))

    @property
    def symmetric_binary(self) -> bool:
        return self.signed and self.bits == 1

    @property
    def steps(self) -> int:
        """Steps between the lower and upper bound: ``2**bits - 1``, 127 for int8 unsigned."""
        return self.levels - 1 if self.signed else self.unsigned_top

    def zero_point(self, lower: Tensor, step: Tensor) -> Tensor:
        """The lower bound snapped to a whole number of steps below zero, so that zero is a
        level (only then does the grid export exactly to int8); with ``int8`` also kept where
        the codes shifted by it fit -128..127 (pinned to 128 for 8-bit signed grids); with
        ``uint8`` the same for signed grids and 0 for unsigned ones (codes from zero)."""
        zero_point = round_ste(-lower / step)
        if self.uint8 and not self.signed:
            return torch.zeros_like(zero_point)
        if self.int8 or self.uint8:
            zero_point = zero_point.clamp(self.steps - INT8_MAX, INT8_MAX + 1)
        return zero_point

    def quantize(self, x: Tensor) -> Tensor:
        shape = self.param_shape(x)
        lower = self.lower.view(shape) if self.channels else self.lower.squeeze()
        upper = self.upper.view(shape) if self.channels else self.upper.squeeze()
        steps = self.steps
        if self.symmetric_binary:  # 1 bit signed: {-u, +u}, a grid with no zero level
            lower = -upper
            width = (upper - lower).clamp_min(MIN_STEP)
            normalised = ((x - lower) / width).clamp(0, 1) * steps
            rounded = _EWGSRound.apply(normalised, self.delta / steps)
            return self._global_gradient(rounded / steps * width + lower)
        step = (upper - lower).clamp_min(MIN_STEP) / steps
        zero_point = self.zero_point(lower, step)
        # delta / steps: the residual in code units is steps times the paper's x_n - x_q
        return self._global_gradient(
            fake_quantize(x, step, zero_point, 0, steps, delta=self.delta / steps)
        )

    def _global_gradient(self, out: Tensor) -> Tensor:
        """Weights: the scaling's ``sign(g)`` is that of the whole batch's gradient, also when
        several processes each train on a shard (``distributed.mean_gradient``). Activations'
        gradients are per image: each process has its own images' whole gradient."""
        return mean_gradient(out) if self.for_weights else out

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
        step = (upper - self.lower.detach()).clamp_min(MIN_STEP) / self.steps
        return IntGrid(step, self.zero_point(self.lower.detach(), step).detach(), 0, self.steps)


# --- fixed and clipped ranges: ste, dorefa, pact ----------------------------------------------


def snap(codes: Tensor, qmin: int, qmax: int, stride: int) -> Tensor:
    """The nearest integer of ``qmin..qmax`` (step ``stride``) to each of ``codes``."""
    return ((codes - qmin) / stride).round().clamp(0, (qmax - qmin) // stride) * stride + qmin


def straight_through(value: Tensor, surrogate: Tensor) -> Tensor:
    """Exactly ``value`` forward; the gradient of ``surrogate`` backward."""
    return value.detach() + (surrogate - surrogate.detach())


def clip_range(x: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """``clamp(x, lower, upper)`` whose gradient reaches ``x`` inside ``[lower, upper)``, the upper
    bound where ``x >= upper`` and the lower bound where ``x < lower`` (PACT's rule)."""
    return torch.where(x >= upper, upper, torch.where(x < lower, lower, x))


def uniform_codes(bits: int, signed: bool, unsigned_top: int) -> tuple[int, int, int]:
    """(qmin, qmax, stride) of the plain uniform grid, zero point 0 throughout.

    Unsigned ``0..unsigned_top`` (``2**b - 1``, or 127 for int8); signed
    ``-2**(b-1)..2**(b-1) - 1`` (zero is a level, one level more below it than above, as LSQ);
    signed 1 bit ``{-1, +1}``.
    """
    if not signed:
        return 0, unsigned_top, 1
    if bits == 1:
        return -1, 1, 2
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, 1


@register_quantizer("ste")
class STEQuantizer(Quantizer):
    """The plain uniform quantizer (the baseline): a fixed range, straight-through rounding.

    ``clip`` (a buffer, one per channel) is set by calibration and never learnt. Levels are
    ``k * step`` with ``step = clip / qmax`` (``uniform_codes``): ``[0, clip]`` unsigned,
    ``[-clip - step, clip]`` signed, ``{-clip, +clip}`` at 1 bit signed. The gradient of the
    input is 1 inside the range and 0 outside; there is nothing to learn.
    """

    def __init__(self, bits: int, *, weight: bool, channels: int | None = None) -> None:
        super().__init__(bits, weight=weight, channels=channels)
        self.register_buffer("clip", torch.ones(channels or 1))

    def codes(self) -> tuple[int, int, int]:
        """(qmin, qmax, stride) of the integer grid; levels are ``q * range / qmax``."""
        return uniform_codes(self.bits, self.signed, self.unsigned_top)

    def stored_range(self) -> Tensor:
        """The tensor that holds the top of the range (per channel); ``set_range`` writes it."""
        return self.clip

    def range_value(self) -> Tensor:
        """The top of the range (per channel) that the forward and ``grid()`` use."""
        return self.stored_range()

    def per_channel(self, value: Tensor, x: Tensor) -> Tensor:
        return value.view(self.param_shape(x)) if self.channels else value.squeeze()

    def quantize(self, x: Tensor) -> Tensor:
        qmin, qmax, stride = self.codes()
        upper = self.per_channel(self.range_value(), x)
        step = upper / qmax
        if stride == 1:
            return fake_quantize(x, step, torch.zeros_like(step), qmin, qmax, clip=True)
        clipped = clip_range(x, qmin * step, upper)
        codes = snap(clipped.detach() / step.detach(), qmin, qmax, stride)
        return straight_through(codes * step.detach(), clipped)

    def set_range(self, clip: Tensor) -> None:
        stored = self.stored_range()
        with torch.no_grad():
            stored.copy_(clip.expand_as(stored))

    def rescale_(self, gain: Tensor) -> None:
        stored = self.stored_range()
        with torch.no_grad():
            stored.mul_(gain.reshape(-1).expand_as(stored))

    def grid(self) -> IntGrid:
        qmin, qmax, stride = self.codes()
        step = self.range_value().detach() / qmax  # a new tensor: a snapshot
        return IntGrid(step, torch.zeros_like(step), qmin, qmax, stride)


KNEES = (1.0, 1.5, 2.0, 3.0, 5.0, 10.0)  # DoReFa's weak tanh warps: knee at these x max|w|


@register_quantizer("dorefa")
class DoReFaQuantizer(STEQuantizer):
    """DoReFa-Net: tanh-normalised weights on a symmetric grid; activations as ``ste``.

    Weights: ``t = tanh(w / r) / max|tanh(w / r)|`` (the max per output channel when per channel)
    lies in [-1, 1] and is rounded to DoReFa's ``2q/n - 1``, ``n = 2**b - 1``: the odd integers
    ``-n..n`` (stride 2) times ``clip / n``. ``clip``, the top level, gives the quantized weight
    the float model's magnitude (uploaded models have BatchNorm folded into their weights, which
    an unscaled [-1, 1] would undo). At 8 bits ``-255..255`` does not fit in int8: the grid is
    ``-127..127`` times ``clip / 127`` (255 levels, symmetric, exact in int8). Rounding is
    straight through; the gradient reaches ``w`` through tanh and the max. Nothing is learnt.

    The tanh unit ``r = knee * clip``: DoReFa applies tanh to raw weights of a network trained
    from scratch (|w| mostly << 1); folded weights have any size, so ``w`` is measured against
    its own range, and scaling weights and ``clip`` together (``rescale_``) keeps every code.
    Calibration chooses, per channel, among ``clip`` = the usual fractions of max|w| with
    ``knee`` 1 (tanh soft-clips the weights at ``clip``: what 2 bits need) and knees at
    ``KNEES`` x max|w| with ``clip = r tanh(max|w| / r)`` (a weak warp that keeps small weights'
    size: what 8 bits need; a knee at max|w| alone bends weights by up to 24%). Both are
    buffers. Unsigned weight grids (never chosen by calibration) use ``max(w, 0)`` on ``0..n``.
    """

    def __init__(self, bits: int, *, weight: bool, channels: int | None = None) -> None:
        super().__init__(bits, weight=weight, channels=channels)
        if weight:
            self.register_buffer("knee", torch.ones(channels or 1))

    def codes(self) -> tuple[int, int, int]:
        if not self.for_weights:
            return uniform_codes(self.bits, self.signed, self.unsigned_top)
        top = 2**self.bits - 1
        if not self.signed:
            return 0, self.unsigned_top, 1
        if self.bits == 8:
            return -127, 127, 1
        return -top, top, 2

    def quantize(self, x: Tensor) -> Tensor:
        if not self.for_weights:
            return super().quantize(x)
        qmin, qmax, stride = self.codes()
        top = self.per_channel(self.clip, x)
        t = torch.tanh(
            (x if self.signed else x.clamp_min(0)) / (self.per_channel(self.knee, x) * top)
        )
        t = t / t.abs().amax(dim=self.reduce_dims(x), keepdim=True).clamp_min(1e-12)
        codes = snap(t.detach() * qmax, qmin, qmax, stride)
        return straight_through(codes * (top / qmax), t * top)

    @torch.no_grad()
    def fit_range(self, max_abs: Tensor, *, signed: bool, error: Callable[[], Tensor]) -> None:
        """Weights: the least-error ``(clip, knee)`` per channel (class docstring)."""
        if not self.for_weights:
            super().fit_range(max_abs, signed=signed, error=error)
            return
        self.signed = signed
        candidates = [(max_abs * fraction, 1.0) for fraction in CLIP_FRACTIONS]
        candidates += [(max_abs * k * math.tanh(1 / k), 1 / math.tanh(1 / k)) for k in KNEES]
        errors, clips, knees = [], [], []
        for clip, knee in candidates:
            clips.append(clip)
            knees.append(torch.full_like(clip, knee))
            self.set_range(clip)
            self.knee.copy_(knees[-1].expand_as(self.knee))
            errors.append(error())
        best = torch.stack(errors).argmin(dim=0, keepdim=True)  # the first of equals, per channel
        self.set_range(torch.stack(clips).gather(0, best)[0])
        self.knee.copy_(torch.stack(knees).gather(0, best)[0].expand_as(self.knee))


@register_quantizer("pact")
class PACTQuantizer(DoReFaQuantizer):
    """PACT: activations clipped to a learnable ``alpha``; weights as ``dorefa``.

    Unsigned: ``clamp(x, 0, alpha)`` rounded to ``2**b - 1`` steps of ``alpha / (2**b - 1)``.
    The gradient reaches ``alpha`` only where ``x >= alpha`` (d y / d alpha = 1), ``x`` only
    inside ``[0, alpha)`` (straight through). Signed (the input can be negative): zero must be a
    level for an exact int8 export, so the ``2**b`` levels are ``[-alpha - step, alpha]``
    (``step = alpha / qmax``, ``uniform_codes``) and ``alpha`` also gets the lower bound's
    gradient, ``-(1 + 1 / qmax)``, where ``x`` lies below it; 1 bit: ``{-alpha, +alpha}``,
    gradient -1 below ``-alpha`` and 1 from ``alpha`` up.
    """

    def __init__(self, bits: int, *, weight: bool, channels: int | None = None) -> None:
        super().__init__(bits, weight=weight, channels=channels)
        if not weight:
            del self.clip
            self.alpha = nn.Parameter(torch.ones(channels or 1))

    def stored_range(self) -> Tensor:
        return self.clip if self.for_weights else self.alpha

    def range_value(self) -> Tensor:
        if self.for_weights:
            return self.clip
        return self.alpha.abs().clamp_min(MIN_STEP)  # an update past zero must not flip the grid
