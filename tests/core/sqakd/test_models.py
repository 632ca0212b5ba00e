"""The engine on real architectures: torchvision ResNet-18 and MobileNetV2 (BatchNorm kept;
models with BatchNorm folded are the ONNX fixture's tests) prepare, calibrate and train."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from core.inputs.images import normalize
from core.sqakd.calibrate import calibrate
from core.sqakd.modules import QuantSpec, layer_bits, prepare, quant_layers
from core.sqakd.quantizers import QUANTIZERS
from core.sqakd.trainer import TrainConfig, train

MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
}


# Every method on MobileNetV2 (depthwise, grouped, 1x1); ResNet-18 once, to keep the suite quick.
CASES = [("mobilenet_v2", method) for method in sorted(QUANTIZERS)] + [("resnet18", "lsq")]


@pytest.mark.parametrize(("name", "method"), CASES)
def test_torchvision_models_train(name: str, method: str) -> None:
    torch.manual_seed(0)
    teacher = MODELS[name]()
    with torch.no_grad():  # BatchNorm statistics from data: a fresh model's logits are ~1e-10
        teacher.train()(torch.randn(16, 3, 32, 32))
    teacher.eval()
    pixels = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    student = prepare(teacher, QuantSpec(method=method, weight_bits=4, activation_bits=4))
    convs = [m for m in teacher.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert len(list(quant_layers(student))) == len(convs)  # depthwise and 1x1 included
    calibrate(student, teacher, normalize(pixels, (0.5,) * 3, (0.25,) * 3))
    before = {k: v.clone() for k, v in student.state_dict().items()}

    stats = train(
        teacher,
        student,
        pixels,
        TrainConfig(steps=2, batch_size=4, mean=(0.5,) * 3, std=(0.25,) * 3, augment=False),
    )

    assert torch.isfinite(torch.tensor(stats.final_loss))
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("weight") for k in changed)


def test_layer_bits_by_name_pattern_on_resnet18() -> None:
    names = [
        n
        for n, m in torchvision.models.resnet18().named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    spec = QuantSpec(
        method="lsq",
        weight_bits=4,
        activation_bits=4,
        layer_bits={"layer4.*": 2, "*downsample*": 8},
    )
    bits = layer_bits(names, spec)
    assert bits["conv1"] == (8, 8) and bits["fc"] == (8, 8)  # first and last
    assert bits["layer4.0.conv1"] == (2, 2) and bits["layer1.0.conv1"] == (4, 4)
    assert bits["layer2.0.downsample.0"] == (8, 8)
