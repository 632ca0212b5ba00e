"""core.sqakd.teacher: the frozen teacher a job runs, BatchNorm folded, same logits."""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn

from core.sqakd.teacher import CHUNK_PIXELS, MIN_CHUNK, inference_teacher
from tests.core.sqakd.nets import normalised_images


def batchnorm_layers(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def with_running_statistics(model: nn.Module, images: Tensor) -> nn.Module:
    """BatchNorm statistics from data, so folding them changes real numbers."""
    model.train()
    with torch.no_grad():
        for batch in images.split(8):
            model(batch)
    return model.eval()


def test_resnet18_batchnorm_folds_away_with_the_same_logits() -> None:
    images = normalised_images(24, size=32)
    teacher = with_running_statistics(torchvision.models.resnet18(num_classes=10), images)
    before = {name: value.clone() for name, value in teacher.state_dict().items()}

    frozen = inference_teacher(teacher)

    assert batchnorm_layers(teacher) == 20 and batchnorm_layers(frozen) == 0
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not frozen.training
    with torch.inference_mode():
        torch.testing.assert_close(frozen(images), teacher(images), atol=1e-4, rtol=1e-4)
    # the caller's teacher is untouched: same modules, values and trainability
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.requires_grad for p in teacher.parameters())


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn(self.conv(x))
        return h.relu() if h.mean() > 0 else h


def test_an_untraceable_teacher_runs_unfolded_and_frozen() -> None:
    images = normalised_images(8)
    teacher = with_running_statistics(Untraceable(), images)

    frozen = inference_teacher(teacher)

    assert frozen is not teacher and batchnorm_layers(frozen) == 1
    assert not any(p.requires_grad for p in frozen.parameters())
    with torch.inference_mode():
        torch.testing.assert_close(frozen(images), teacher(images))


def test_a_cpu_batch_runs_in_chunks_of_about_chunk_pixels_with_the_same_logits() -> None:
    """64 images of 32 x 32 per call (``CHUNK_PIXELS``), at least ``MIN_CHUNK`` at 224 px."""
    teacher = torchvision.models.resnet18(num_classes=10).eval()
    frozen = inference_teacher(teacher)
    batches: list[int] = []
    frozen.model.register_forward_pre_hook(lambda _m, args: batches.append(len(args[0])))
    for size, count, expected in [(32, 150, [64, 64, 22]), (224, 9, [4, 4, 1]), (32, 10, [10])]:
        images = normalised_images(count, size=size)
        batches.clear()
        with torch.inference_mode():
            torch.testing.assert_close(frozen(images), teacher(images), atol=1e-4, rtol=1e-4)
        assert batches == expected
    assert CHUNK_PIXELS == 64 * 32 * 32 and MIN_CHUNK == 4
