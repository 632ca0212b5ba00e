"""The SQAKD loss: the student matches the frozen teacher's softened outputs, no labels."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``KL(softmax(t/T) || softmax(s/T)) * T**2``, averaged over the batch.

    The ``T**2`` keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015).
    """
    student_log_p = F.log_softmax(student_logits.flatten(1).float() / temperature, dim=1)
    teacher_log_p = F.log_softmax(teacher_logits.detach().flatten(1).float() / temperature, dim=1)
    kl = F.kl_div(student_log_p, teacher_log_p, log_target=True, reduction="batchmean")
    return kl * temperature**2
