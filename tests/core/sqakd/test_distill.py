"""The SQAKD loss: KL(softmax(t/T) || softmax(s/T)) * T^2, batch mean, student-only gradient."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from core.sqakd.distill import distillation_loss


def test_hand_computed_two_class_case() -> None:
    # T = 4, teacher logits [4 ln 3, 0] -> p_t = [3/4, 1/4]; student [0, 0] -> p_s = [1/2, 1/2]
    teacher = torch.tensor([[4 * math.log(3.0), 0.0]])
    student = torch.zeros(1, 2)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # 0.130812...
    assert distillation_loss(student, teacher, 4.0).item() == pytest.approx(kl * 16, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0, 0.5])
def test_matches_the_formula(temperature: float) -> None:
    student, teacher = 3 * torch.randn(5, 7), 3 * torch.randn(5, 7)
    p_t = torch.softmax(teacher.double() / temperature, 1)
    log_p_s = torch.log_softmax(student.double() / temperature, 1)
    per_row = (p_t * (p_t.log() - log_p_s)).sum(1)
    expected = per_row.mean().item() * temperature**2  # mean over the batch, not the elements
    assert distillation_loss(student, teacher, temperature).item() == pytest.approx(
        expected, rel=1e-5
    )


def test_is_a_batch_mean() -> None:
    student, teacher = torch.randn(1, 10), torch.randn(1, 10)
    single = distillation_loss(student, teacher, 4.0)
    repeated = distillation_loss(student.repeat(6, 1), teacher.repeat(6, 1), 4.0)
    assert repeated.item() == pytest.approx(single.item(), rel=1e-6)


def test_zero_when_equal_and_positive_otherwise() -> None:
    logits = 5 * torch.randn(8, 10)
    assert distillation_loss(logits, logits.clone(), 4.0).abs().item() < 1e-6
    assert distillation_loss(logits + 3.0, logits, 4.0).abs().item() < 1e-5  # shift-invariant
    assert distillation_loss(torch.randn(8, 10), logits, 4.0).item() > 0


def test_accepts_spatial_logits_and_half_precision() -> None:
    student, teacher = torch.randn(3, 10), torch.randn(3, 10)
    flat = distillation_loss(student, teacher, 2.0)
    spatial = distillation_loss(student.view(3, 10, 1, 1), teacher.view(3, 10, 1, 1), 2.0)
    assert spatial.item() == pytest.approx(flat.item(), rel=1e-6)
    half = distillation_loss(student.half(), teacher.half(), 2.0)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(flat.item(), rel=1e-2)


def test_gradient_reaches_the_student_from_a_frozen_teacher() -> None:
    student, teacher = nn.Linear(6, 4), nn.Linear(6, 4).requires_grad_(False)
    x = torch.randn(5, 6)
    with torch.inference_mode():  # as the trainer computes the teacher's logits
        teacher_logits = teacher(x)
    distillation_loss(student(x), teacher_logits.clone(), 4.0).backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert student.bias.grad is not None
    assert teacher.weight.grad is None and teacher.bias.grad is None


def test_gradient_flows_only_to_the_student() -> None:
    student, teacher = nn.Linear(6, 4), nn.Linear(6, 4)
    x = torch.randn(5, 6)
    distillation_loss(student(x), teacher(x), 4.0).backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert teacher.weight.grad is None and teacher.bias.grad is None


def test_gradient_matches_softmax_difference() -> None:
    # d/ds of KL * T^2 averaged over N rows = T * (softmax(s/T) - softmax(t/T)) / N
    temperature = 4.0
    student = torch.randn(3, 5, requires_grad=True)
    teacher = torch.randn(3, 5)
    distillation_loss(student, teacher, temperature).backward()
    expected = (
        temperature
        * (
            torch.softmax(student.detach() / temperature, 1)
            - torch.softmax(teacher / temperature, 1)
        )
        / 3
    )
    torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-7)
