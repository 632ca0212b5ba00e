"""model_int.safetensors: codes at their bit-width; a loader with bit-identical outputs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from core.export.int_checkpoint import (
    container_bits,
    load_int_student,
    pack,
    read_manifest,
    save_int_checkpoint,
    unpack,
)
from core.inputs.images import normalize
from core.sqakd.calibrate import calibrate
from core.sqakd.modules import QuantSpec, prepare, quant_layers, quant_pools
from core.sqakd.quantizers import QUANTIZERS
from core.sqakd.trainer import TrainConfig, train
from tests.core.sqakd.nets import MixedNet, TinyCNN
from tests.core.sqakd.test_trainer import MEAN, STD, uint8_images

METHODS = sorted(QUANTIZERS)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_and_unpack_round_trip(bits: int) -> None:
    count = 1001  # not a whole number of bytes at any width
    codes = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(count * container_bits(bits) / 8)
    assert torch.equal(unpack(packed, bits, count), codes)


def test_pack_puts_the_first_code_in_the_lowest_bits() -> None:
    assert pack(torch.tensor([1, 0, 3, 2]), 2).tolist() == [1 | 0 << 2 | 3 << 4 | 2 << 6]
    assert pack(torch.tensor([1, 1, 0, 1, 0, 0, 0, 0, 1]), 1).tolist() == [0b1011, 1]


def trained_student(
    teacher: nn.Module,
    method: str,
    bits: int,
    *,
    per_channel: bool = True,
    int8_grids: bool = False,
    uint8_grids: bool = False,
    residual_bits: int | None = None,
    pool_bits: int | None = None,
) -> tuple[nn.Module, QuantSpec]:
    """Prepared, calibrated and trained two steps, so every range has moved off calibration."""
    spec = QuantSpec(
        method=method,
        weight_bits=bits,
        activation_bits=bits,
        per_channel=per_channel,
        first_last_bits=None,
        layer_bits={"fc*": 8},
        int8_grids=int8_grids,
        uint8_grids=uint8_grids,
        residual_bits=residual_bits,
        pool_bits=pool_bits,
    )
    pixels = uint8_images(32)
    student = prepare(teacher, spec)
    calibrate(student, teacher, normalize(pixels, MEAN, STD))
    train(teacher, student, pixels, TrainConfig(steps=2, batch_size=16, mean=MEAN, std=STD))
    return student.eval(), spec


@pytest.mark.parametrize(
    ("bits", "int8"), [(1, False), (2, False), (3, False), (4, False), (8, False), (8, True)]
)
@pytest.mark.parametrize("method", METHODS)
def test_loaded_student_gives_bit_identical_outputs(
    method: str, bits: int, int8: bool, tmp_path: Path
) -> None:
    """Every method and width; at 8 bits also the TensorRT-compatible (int8) grids."""
    torch.manual_seed(0)
    teacher = MixedNet().eval()  # depthwise, grouped, linear layers, a PReLU
    student, spec = trained_student(teacher, method, bits, int8_grids=int8)
    path = tmp_path / "model_int.safetensors"
    save_int_checkpoint(student, spec, path)

    loaded = load_int_student(path, teacher)
    inputs = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), student(inputs))
        for (name, original), (_, rebuilt) in zip(
            quant_layers(student), quant_layers(loaded), strict=True
        ):
            assert torch.equal(rebuilt.quantized_weight(), original.quantized_weight()), name


@pytest.mark.parametrize("method", METHODS)
def test_quantized_residual_adds_round_trip(method: str, tmp_path: Path) -> None:
    """A TensorRT-compatible student (``export.tensorrt``): its residual add's input quantizers,
    ranges and signs, come back with the layers."""
    torch.manual_seed(0)
    teacher = TinyCNN().eval()
    student, spec = trained_student(teacher, method, 4, int8_grids=True, residual_bits=8)
    path = tmp_path / "model_int.safetensors"
    save_int_checkpoint(student, spec, path)

    loaded = load_int_student(path, teacher)
    assert read_manifest(path)["residual_adds"] == {"residual_add": [False, True]}
    inputs = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), student(inputs))


@pytest.mark.parametrize("method", METHODS)
def test_cpu_grids_round_trip(method: str, tmp_path: Path) -> None:
    """The CPU's grids (``export.target: cpu``: quantized residual additions and pooling
    input): every input quantizer, ranges and signs, comes back with the layers, and so do the
    outputs, bit for bit."""
    torch.manual_seed(0)
    teacher = TinyCNN().eval()
    student, spec = trained_student(
        teacher, method, 8, uint8_grids=True, residual_bits=8, pool_bits=8
    )
    path = tmp_path / "model_int.safetensors"
    save_int_checkpoint(student, spec, path)

    loaded = load_int_student(path, teacher)
    manifest = read_manifest(path)
    assert manifest["quant_spec"]["uint8_grids"] and manifest["quant_spec"]["pool_bits"] == 8
    # TinyCNN pools the residual sum, which is signed
    assert manifest["pools"] == {"pool": [True]}
    ((_, pool),), ((_, loaded_pool),) = list(quant_pools(student)), list(quant_pools(loaded))
    original, rebuilt = pool.input_quantizers[0], loaded_pool.input_quantizers[0]
    assert rebuilt.signed == original.signed
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in original.state_dict().items())
    inputs = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), student(inputs))


def test_codes_take_their_bit_width_in_the_file(tmp_path: Path) -> None:
    teacher = TinyCNN().eval()
    student, spec = trained_student(teacher, "lsq", 2, per_channel=False)
    path = tmp_path / "model_int.safetensors"
    save_int_checkpoint(student, spec, path)

    manifest = read_manifest(path)
    with safe_open(str(path), framework="pt") as file:
        for name, layer in quant_layers(student):
            codes = file.get_tensor(f"{name}.weight.codes")
            bits = manifest["layers"][name]["weight_bits"]
            assert bits == (8 if name == "fc" else 2)
            assert codes.numel() == math.ceil(layer.weight.numel() * bits / 8)
            # no float copy of a quantized weight (safe_open has keys(), not __contains__)
            assert f"{name}.weight" not in file.keys()  # noqa: SIM118
    float_bytes = sum(layer.weight.numel() * 4 for _, layer in quant_layers(student))
    code_bytes = sum(
        math.ceil(layer.weight.numel() * layer.weight_quantizer.bits / 8)
        for _, layer in quant_layers(student)
    )
    assert code_bytes < float_bytes / 10
    assert manifest["quant_spec"] == spec.to_dict()


def test_a_file_without_the_manifest_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="not a sqakd-int/1 checkpoint"):
        load_int_student(path, TinyCNN())
