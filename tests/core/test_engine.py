"""core.engine: SQAKD from Python, and the job config choices it carries to the engine."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor

from core.config import JobConfig
from core.engine import RESIDUAL_BITS, calibrated_student, quant_spec, quantize, train_config
from core.errors import InputError
from core.sqakd.hessian import ewgs_quantizers
from core.sqakd.modules import quant_layers
from tests.core.sqakd.nets import TinyCNN

PREPROCESSING = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "augment": False}


def images(count: int, low: int = 0, high: int = 256, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (count, 3, 16, 16), generator=generator, dtype=torch.uint8)


def config(**fields: object) -> JobConfig:
    return JobConfig.model_validate({"preprocessing": PREPROCESSING, **fields})


def test_quantize_returns_a_trained_student_with_the_configs_choices() -> None:
    teacher = TinyCNN().eval()
    job = config(
        method="ewgs",
        weight_bits=2,
        activation_bits=3,
        layer_bits={"conv2": 6},
        steps=3,
        batch_size=16,
    )
    result = quantize(teacher, images(64), job)

    bits = {
        name: (layer.weight_quantizer.bits, layer.act_quantizer.bits)
        for name, layer in quant_layers(result.student)
    }
    assert bits == {"conv1": (8, 8), "conv2": (6, 6), "conv3": (2, 3), "fc": (8, 8)}
    assert result.spec.layer_bits == {"conv2": 6}
    assert result.stats.steps == 3 and not result.student.training
    deltas = {name: q.delta.item() for name, q in ewgs_quantizers(result.student).items()}
    assert result.stats.ewgs_deltas == deltas and any(deltas.values())  # estimated, not 0


def test_train_config_carries_every_training_choice() -> None:
    job = config(
        method="ewgs",
        epochs=3,
        batch_size=10,
        lr=0.5,
        quantizer_lr=0.25,
        lr_unit="absolute",
        weight_decay=1e-4,
        temperature=2.0,
        ewgs_delta=0.125,
        ewgs_delta_every=2,
        amp=True,
        compile_model=True,
        seed=7,
    )
    train = train_config(job, images=95)
    assert (train.steps, train.batch_size) == (3 * 9, 10)  # full batches only
    assert (train.lr, train.quantizer_lr, train.lr_unit) == (0.5, 0.25, "absolute")
    assert (train.weight_decay, train.temperature, train.seed) == (1e-4, 2.0, 7)
    assert (train.ewgs_delta, train.ewgs_delta_every) == (0.125, 2)
    assert train.amp and train.compile_model
    assert (train.mean, train.std, train.augment) == ((0.5,) * 3, (0.25,) * 3, False)
    assert train_config(config(steps=11), images=95).steps == 11


def test_calibration_sees_a_sample_of_the_data_not_its_first_images() -> None:
    """Uploads come in class-folder order: 256 bright images first, then 256 dark ones. Ranges
    fitted on the first images alone would be unsigned and clip every dark image to zero."""
    pixels = torch.cat([images(256, 200, 256), images(256, 0, 40, seed=1)])
    student, _ = calibrated_student(TinyCNN().eval(), pixels, config())
    first = dict(quant_layers(student))["conv1"].act_quantizer.grid()
    bottom = (first.scale * (first.qmin - first.zero_point)).item()
    dark_input = (40 / 255 - 0.5) / 0.25  # the normalised value of a pixel at 40
    assert bottom < dark_input


def test_a_layer_pattern_that_matches_nothing_fails_the_job_with_its_layers() -> None:
    with pytest.raises(InputError) as caught:
        calibrated_student(TinyCNN().eval(), images(32), config(layer_bits={"layer1.*": 8}))
    assert caught.value.code == "unknown_layer"
    assert "'layer1.*' matches no layer; layers: conv1, conv2, conv3, fc" in caught.value.message


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"layer_bits": {"conv1": 9}}, "bits must lie in 1..8"),
        ({"layer_bits": {"": 4}}, "1..200 characters"),
        ({"method": "lsq", "ewgs_delta": 0.1}, "apply to method 'ewgs' only"),
        ({"method": "pact", "ewgs_delta_every": 3}, "apply to method 'ewgs' only"),
        ({"method": "ewgs", "ewgs_delta": 11.0}, "0..10"),
        ({"method": "ewgs", "ewgs_delta": "newton"}, "ewgs_delta"),
        (
            {"export": {"target": "cpu", "tensorrt_targets": ["x86-sm90"]}},
            "tensorrt_targets build TensorRT engines, which need target 'tensorrt'",
        ),
        ({"export": {"target": "cpu", "tensorrt": True}}, "set target 'tensorrt', or leave"),
        ({"export": {"target": "arm"}}, "'tensorrt' or 'cpu'"),
    ],
)
def test_job_config_refuses_bad_engine_choices(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        JobConfig.model_validate(fields)


@pytest.mark.parametrize(
    ("export", "grids", "int8_grids", "uint8_grids", "residual_bits"),
    [
        ({}, "tensorrt", True, False, RESIDUAL_BITS),  # the default target, as before it
        ({"tensorrt": False}, "papers", False, False, None),  # the older spelling still works
        ({"target": "cpu"}, "cpu", False, True, RESIDUAL_BITS),
        ({"target": "cpu", "tensorrt": False, "onnx": False}, "cpu", False, True, RESIDUAL_BITS),
    ],
)
def test_the_export_target_lays_out_the_students_grids(
    export: dict[str, object],
    grids: str,
    int8_grids: bool,
    uint8_grids: bool,
    residual_bits: int | None,
) -> None:
    job = config(export=export)
    spec = quant_spec(job)
    assert job.export.grids == grids and job.export.tensorrt is int8_grids
    assert (spec.int8_grids, spec.uint8_grids, spec.residual_bits) == (
        int8_grids,
        uint8_grids,
        residual_bits,
    )


def test_job_config_round_trips_through_its_stored_json() -> None:
    for job in (
        JobConfig(),
        JobConfig(method="ewgs", ewgs_delta=0.0, ewgs_delta_every=4, layer_bits={"fc": 6}),
        JobConfig.model_validate({"export": {"target": "cpu"}}),
    ):
        assert JobConfig.model_validate(job.model_dump(mode="json")) == job
