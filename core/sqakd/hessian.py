"""EWGS's ``delta`` from the Hessian trace, estimated with Hutchinson's method.

The EWGS paper sets each quantizer's gradient-scaling strength from the curvature of the loss
at the quantizer's output ``x_q`` (in its normalised units, the [0, 1] interval cut into
``2**bits - 1`` steps)::

    delta = (Tr(H) / N) / (3 * std(g))

with ``H`` and ``g`` the Hessian and gradient of the training loss with respect to ``x_q``
(``N`` elements), averaged over a few batches and clipped at 0 (and, here, at ``max_delta``).
``Tr(H)`` comes from Hutchinson's estimator ``E[v^T H v]`` over random +-1 probes ``v``.

One Hessian-vector product serves every quantizer at once: each quantizer's output gets its
own probe, and ``grad(sum_i g_i . v_i)`` at output ``i`` is ``H_ii v_i`` plus cross terms
``H_ij v_j`` whose contribution ``v_i^T H_ij v_j`` has mean 0 over independent probes. So a
batch costs one forward, one backward and one double backward, whatever the layer count (the
EWGS code runs one double backward per quantizer).

Our quantizers output ``y = lower + width * x_q``: in ``y``'s units ``g_q = width * g_y`` and
``H_q = W H_y W``, so the probe applied at ``y`` is ``width * v``.

The estimate runs the student in eval mode (BatchNorm statistics stay as they are) with its own
random generator, so it changes nothing but the deltas, and a resumed run repeats it exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from core.sqakd.modules import quant_layers
from core.sqakd.quantizers import EWGSQuantizer

HUTCHINSON_BATCHES = 3  # as the EWGS code: a few batches, averaged
# Images of a batch that the estimate uses: Tr(H) / N and std(g) are means over elements, which
# a part of a large batch estimates as well; the double backward costs ~5 training steps.
HUTCHINSON_IMAGES = 64


def ewgs_quantizers(student: nn.Module) -> dict[str, EWGSQuantizer]:
    """The student's EWGS quantizers by name (``layer.weight_quantizer``, ...)."""
    found = {}
    for name, layer in quant_layers(student):
        for kind in ("weight_quantizer", "act_quantizer"):
            quantizer = getattr(layer, kind)
            if isinstance(quantizer, EWGSQuantizer) and quantizer not in found.values():
                found[f"{name}.{kind}"] = quantizer  # a shared one under its first reader
    return found


def set_ewgs_deltas(student: nn.Module, delta: float) -> None:
    for quantizer in ewgs_quantizers(student).values():
        quantizer.delta.fill_(delta)


def estimate_ewgs_deltas(
    student: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    generator: torch.Generator,
) -> dict[str, float]:
    """Set every EWGS quantizer's ``delta`` from the Hessian trace; returns them by name.

    ``batches`` yields (student input, target) and ``loss_fn(student_output, target)`` is the
    training loss (SQAKD: the KL divergence to the teacher's logits).
    """
    quantizers = ewgs_quantizers(student)
    if not quantizers:
        return {}
    outputs: dict[str, Tensor] = {}

    def keep_output(name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(_module: nn.Module, _args: tuple[Tensor, ...], output: Tensor) -> None:
            outputs[name] = output

        return hook

    hooks = [q.register_forward_hook(keep_output(name)) for name, q in quantizers.items()]
    was_training = student.training
    student.eval()
    totals = dict.fromkeys(quantizers, 0.0)
    batch_count = 0
    try:
        for inputs, target in batches:
            outputs.clear()
            loss = loss_fn(student(inputs), target)
            grads = torch.autograd.grad(
                loss, list(outputs.values()), create_graph=True, allow_unused=True
            )
            reached = [
                (name, value, grad)
                for (name, value), grad in zip(outputs.items(), grads, strict=True)
                if grad is not None
            ]
            widths = [_width(quantizers[name], value) for name, value, _ in reached]
            probes = [
                _rademacher(value, generator) * width
                for (_, value, _), width in zip(reached, widths, strict=True)
            ]
            dot = sum(
                (grad * probe).sum() for (_, _, grad), probe in zip(reached, probes, strict=True)
            )
            products = torch.autograd.grad(dot, [value for _, value, _ in reached])
            for (name, _, grad), probe, width, product in zip(
                reached, probes, widths, products, strict=True
            ):
                trace = (probe * product).sum().item()
                spread = (grad.detach() * width).std().item()
                if spread > 0:
                    totals[name] += trace / grad.numel() / (3.0 * spread)
            batch_count += 1
    finally:
        for hook in hooks:
            hook.remove()
        student.train(was_training)
    for name, quantizer in quantizers.items():
        mean = totals[name] / max(batch_count, 1)
        quantizer.delta.fill_(min(max(mean, 0.0), max_delta(quantizer)))
    return {name: quantizer.delta.item() for name, quantizer in quantizers.items()}


def max_delta(quantizer: EWGSQuantizer) -> float:
    """The largest delta that never flips a gradient's sign: the residual ``x_n - x_q`` reaches
    half a step, ``1 / (2 * steps)`` (``steps = 2**bits - 1`` but for int8 unsigned grids), so
    ``1 + delta * sign(g) * residual`` stays in [0, 2] up to ``delta = 2 * steps``. (The EWGS
    paper clips at 0 only; on small or freshly calibrated models the estimate can exceed this
    bound.)"""
    return 2.0 * quantizer.steps


def _width(quantizer: EWGSQuantizer, output: Tensor) -> Tensor:
    """The quantizer's interval width (per channel, shaped to broadcast against ``output``)."""
    grid = quantizer.grid()
    width = (grid.scale * (grid.qmax - grid.qmin)).to(output.device)
    return width.view(quantizer.param_shape(output)) if quantizer.channels else width.squeeze()


def _rademacher(like: Tensor, generator: torch.Generator) -> Tensor:
    """Random +-1 entries shaped like ``like``, from ``generator`` (on the CPU: reproducible)."""
    signs = torch.randint(0, 2, like.shape, generator=generator, dtype=like.dtype) * 2 - 1
    return signs.to(like.device)
