"""Quality and size metrics: agreement, KL and top-1 on hand-made logits; batched predict; sizes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from core.inputs.images import normalize
from core.sqakd.metrics import compare, model_sizes, predict
from core.sqakd.modules import QuantSpec, prepare
from core.sqakd.quantizers import QUANTIZERS
from tests.core.sqakd.nets import TinyCNN

METHODS = sorted(QUANTIZERS)

TEACHER = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
STUDENT = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 2.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
# argmax: teacher 0, 1, 0, 2; student 0, 2, 1, 2


def kl_by_hand(teacher: list[float], student: list[float]) -> float:
    def softmax(row: list[float]) -> list[float]:
        exps = [math.exp(v) for v in row]
        return [e / sum(exps) for e in exps]

    p, q = softmax(teacher), softmax(student)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def test_compare_with_labels() -> None:
    result = compare(TEACHER, STUDENT, torch.tensor([0, 2, 1, 2]))
    assert result["agreement"] == 0.5
    expected_kl = (
        sum(kl_by_hand(t, s) for t, s in zip(TEACHER.tolist(), STUDENT.tolist(), strict=True)) / 4
    )
    assert result["kl"] == pytest.approx(expected_kl, rel=1e-5)
    assert result["teacher_top1"] == 0.5  # right on images 0 and 3
    assert result["student_top1"] == 1.0


def test_compare_without_labels() -> None:
    result = compare(TEACHER, STUDENT, None)
    assert set(result) == {"agreement", "kl", "teacher_top1", "student_top1"}
    assert result["teacher_top1"] is None and result["student_top1"] is None
    assert result["agreement"] == 0.5


def test_compare_identical_logits() -> None:
    result = compare(TEACHER, TEACHER.clone(), torch.tensor([0, 1, 0, 2]))
    assert result["agreement"] == 1.0
    assert abs(result["kl"]) < 1e-6
    assert result["teacher_top1"] == result["student_top1"] == 1.0


def test_compare_kl_is_teacher_to_student() -> None:
    forward = compare(TEACHER[:1], STUDENT[:1], None)["kl"]
    assert forward == pytest.approx(kl_by_hand(TEACHER[0].tolist(), STUDENT[0].tolist()), rel=1e-5)
    assert forward != pytest.approx(kl_by_hand(STUDENT[0].tolist(), TEACHER[0].tolist()), rel=1e-3)


class ModeRecorder(nn.Module):
    """TinyCNN with dropout (so train mode would change the output) that records its mode."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyCNN(classes=5)
        self.dropout = nn.Dropout(0.5)
        self.modes: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.modes.append(self.training)
        return self.dropout(self.net(x)).view(len(x), 5, 1, 1)  # flattened by predict


MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


@pytest.mark.parametrize("training", [True, False])
def test_predict_in_batches_equals_one_batch_and_restores_mode(training: bool) -> None:
    model = ModeRecorder().train(training)
    pixels = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    batched = predict(model, pixels, MEAN, STD, batch_size=3)
    assert model.modes == [False] * 4  # 3 + 3 + 3 + 1 images, every batch in eval mode
    assert model.training is training
    whole = predict(model, pixels, MEAN, STD, batch_size=256)
    assert batched.shape == (10, 5) and batched.dtype == torch.float32
    assert batched.device.type == "cpu"
    torch.testing.assert_close(batched, whole, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        direct = model.eval()(normalize(pixels, MEAN, STD)).flatten(1)
    torch.testing.assert_close(whole, direct)


def test_predict_restores_mode_on_error() -> None:
    model = ModeRecorder().train()
    with pytest.raises(ValueError):
        predict(model, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), (0.5,), (0.5,))
    assert model.training


class ConvLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)  # weight 216, bias 8
        self.fc = nn.Linear(8, 4)  # weight 32, bias 4

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("per_channel", "bits", "packed"),
    [
        # weights at 4 bits: ceil(216 / 2) + ceil(32 / 2) = 124; biases 12 * 4 = 48;
        # grids: 8 bytes (scale, zero point) per weight channel + 8 per activation quantizer
        (True, 4, 108 + 16 + 48 + 8 * (8 + 4) + 8 * 2),  # 284
        (False, 4, 108 + 16 + 48 + 8 * 2 + 8 * 2),  # 204
        (True, 3, 81 + 12 + 48 + 8 * (8 + 4) + 8 * 2),  # ceil(648 / 8), 96 / 8
        (True, 1, 27 + 4 + 48 + 8 * (8 + 4) + 8 * 2),
    ],
    ids=["w4-per-channel", "w4-per-tensor", "w3", "w1"],
)
def test_model_sizes(method: str, per_channel: bool, bits: int, packed: int) -> None:
    student = prepare(
        ConvLinear(),
        QuantSpec(
            method=method,
            weight_bits=bits,
            activation_bits=8,
            per_channel=per_channel,
            first_last_bits=None,
        ),
    )
    assert model_sizes(student) == {"fp32_bytes": 4 * (216 + 8 + 32 + 4), "packed_bytes": packed}


def test_model_sizes_keeps_other_parameters_in_float() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.Linear(8, 4, bias=False))
    student = prepare(model, QuantSpec(method=METHODS[0], weight_bits=8, activation_bits=8))
    fp32 = 4 * (216 + 8 + 8 + 32)
    packed = 216 + 32 + 4 * (8 + 8) + 8 * (8 + 4) + 8 * 2  # PReLU slopes and the bias stay float
    assert model_sizes(student) == {"fp32_bytes": fp32, "packed_bytes": packed}
