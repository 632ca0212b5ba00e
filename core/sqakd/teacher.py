"""The teacher as SQAKD runs it: frozen, forward only, BatchNorm folded into its convolutions.

A job runs the teacher's forward on every training batch and never trains it, so its eval-mode
BatchNorm layers are an affine map that can be folded into the convolution (or linear layer)
before it: the same logits up to float rounding, one pass over each activation fewer. On this
machine's CPU the BN ResNet-20 teacher's forward went from 174 ms to 96 ms at batch 256.

On a CPU it also runs a batch in chunks of about ``CHUNK_PIXELS`` input pixels: a chunk's
activations stay in the processor's caches between layers, where a whole batch's go out to
memory and back. The folded CIFAR-10 ResNet-20 at batch 256 took 212 ms whole and 142 ms in
chunks of 64 images; a ResNet-18 at 224 px, batch 64: 1,559 ms whole, 1,449 ms in chunks of 4.
An eval-mode vision model computes each image on its own, so the logits are the same up to
float rounding (the convolutions may pick other kernels for a smaller batch).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor, nn
from torch.fx.experimental.optimization import fuse

log = logging.getLogger(__name__)

CHUNK_PIXELS = 64 * 32 * 32  # input pixels per chunk on a CPU: 64 images of 32 x 32
MIN_CHUNK = 4  # images: fewer would leave a convolution too little work per call


def inference_teacher(teacher: nn.Module) -> nn.Module:
    """A frozen eval-mode copy of ``teacher`` for forward passes, channels_last as our batches
    are, BatchNorm folded where ``torch.fx`` can trace the model; ``teacher`` is left as it was.

    A model that ``torch.fx`` cannot trace (data-dependent control flow, say) is returned as a
    frozen copy without folding: slower, never wrong.
    """
    frozen = copy.deepcopy(teacher).eval()
    try:
        frozen = fuse(frozen, inplace=True)
    except Exception as exc:  # tracing is best-effort: any failure means "run it unfolded"
        log.info("teacher kept unfolded: torch.fx cannot trace it (%s)", exc)
    return ChunkedForward(frozen.requires_grad_(False).to(memory_format=torch.channels_last)).eval()


class ChunkedForward(nn.Module):
    """``model``'s forward, on a CPU in chunks of about ``CHUNK_PIXELS`` input pixels (at least
    ``MIN_CHUNK`` images); on a GPU the whole batch at once, which suits it best."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dim() != 4:
            return self.model(x)
        chunk = max(MIN_CHUNK, CHUNK_PIXELS // (x.shape[2] * x.shape[3]))
        if len(x) <= chunk:
            return self.model(x)
        return torch.cat([self.model(part) for part in x.split(chunk)])
