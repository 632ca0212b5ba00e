"""The job config: every choice a user can make about one quantization job, validated.

It is stored on the job row as JSON (``JobConfig.model_dump(mode="json")``) and read back with
``JobConfig.model_validate``; ``version`` lets later releases migrate old rows.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.errors import ModelImportError

TARGET_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # a TensorRT target: the queue engine.<it>
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Image sides a job trains at, in pixels: preprocessing.input_size and a model's static input
# size alike. The upper bound also bounds importing a model before anything is allocated: its
# verification batch is 2 x 3 x H x W float32 (24 MiB at 1024 x 1024).
MIN_INPUT_SIDE = 8
MAX_INPUT_SIDE = 1024

Method = Literal["lsq", "ewgs", "pact", "dorefa", "ste"]
"""Quantizer families this release trains with (see ``core.sqakd.quantizers.QUANTIZERS``):
learnable step (lsq), learnable interval (ewgs), learnable activation clip with DoReFa weights
(pact), tanh-normalised weights and calibrated clips (dorefa), plain straight-through (ste)."""


def input_size_in_range(size: Sequence[int]) -> bool:
    """Whether every side of an [H, W] size lies in ``MIN_INPUT_SIDE..MAX_INPUT_SIDE``."""
    return all(MIN_INPUT_SIDE <= side <= MAX_INPUT_SIDE for side in size)


def model_input_size(
    input_shape: Sequence[int | str | None], input_size: Sequence[int] | None
) -> tuple[int, int]:
    """The [H, W] a job feeds a model of ``input_shape`` ([N, 3, H, W]; a dynamic dimension is
    None or its symbolic name): ``preprocessing.input_size`` where given, else the model's own.

    Refuses an input_size that contradicts a static side, and a dynamic side without one: on
    upload (``core.inputs.onnx_model``) and for stored models (``core.resources``) alike.
    """
    channels = input_shape[1]
    height, width = (side if isinstance(side, int) else None for side in input_shape[2:4])
    if input_size is not None and any(
        static is not None and static != wanted
        for static, wanted in zip((height, width), input_size, strict=True)
    ):
        raise ModelImportError(
            "input_shape_mismatch",
            f"model input is {channels}x{height or '?'}x{width or '?'} but "
            f"preprocessing.input_size is {list(input_size)}",
        )
    if input_size is not None:
        return int(input_size[0]), int(input_size[1])
    if height is None or width is None:
        raise ModelImportError(
            "unsupported_model",
            f"model input has a dynamic size ({channels}x{height or '?'}x{width or '?'}); "
            "set preprocessing.input_size to [H, W]",
        )
    return height, width


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Preprocessing(_Strict):
    """How pixels become the model's input: RGB, resize, /255, then (x - mean) / std."""

    input_size: tuple[int, int] | None = Field(
        None, description="[H, W]; default: the model's own static input size."
    )
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    augment: bool = Field(True, description="Random crop (padding 1/8 of the side) and h-flip.")

    @field_validator("input_size")
    @classmethod
    def _positive_size(cls, size: tuple[int, int] | None) -> tuple[int, int] | None:
        if size is not None and not input_size_in_range(size):
            raise ValueError(
                f"input_size sides must lie in {MIN_INPUT_SIDE}..{MAX_INPUT_SIDE} pixels"
            )
        return size

    @field_validator("std")
    @classmethod
    def _positive_std(cls, std: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(value <= 0 for value in std):
            raise ValueError("std values must be positive")
        return std


ExportTarget = Literal["tensorrt", "cpu"]
"""Where the student will run: its grids and its files are laid out for it (``ExportConfig``)."""


class ExportConfig(_Strict):
    """What a job exports, and for which target the student's grids are trained.

    ``target`` is the choice a user makes; ``tensorrt`` is the older, finer switch within the
    TensorRT target (false: the papers' grids). ``grids`` derives the student's layout from the
    two, in this one place: "tensorrt", "cpu" or "papers".
    """

    target: ExportTarget = Field(
        "tensorrt",
        description="Where the student will run. tensorrt: int8 grids with zero point 0 "
        "(TensorRT's only INT8 form; see tensorrt) and model_qdq.onnx checked against "
        "TensorRT's rules. cpu: ONNX Runtime's and OpenVINO's x86 layout: 256-level 8-bit "
        "grids (unsigned activations uint8 from zero, signed ones and weights int8 with zero "
        "point 0, weights per channel), both inputs of every residual addition and the input "
        "of every average pooling quantized at 8 bits; no TensorRT check or engines. Either "
        "way model_qdq_cpu.onnx is the file to run on a CPU.",
    )
    onnx: bool = Field(True, description="Write model_qdq.onnx (QuantizeLinear/DequantizeLinear).")
    speed: bool = Field(
        True,
        description="Time model_qdq.onnx and model_qdq_cpu.onnx against the uploaded float "
        "model under OpenVINO and ONNX Runtime on the worker's CPU at batch 1 and 32 "
        "(metrics.inference, whose int8_pays says whether int8 beats the float model under "
        "OpenVINO; a few seconds).",
    )
    tensorrt: bool = Field(
        True,
        description="Target tensorrt only: train a TensorRT-compatible student: every grid fits "
        "int8 with zero point 0 (8-bit unsigned activations keep 0..127, EWGS's 8-bit zero "
        "point is pinned; grids below 8 bits are the same either way), and both inputs of "
        "every residual addition are quantized at 8 bits, where TensorRT expects Q/DQ. "
        "Defaults to onnx: the exported model_qdq.onnx then follows TensorRT's rules; false "
        "trains the papers' grids. With target cpu it is false (true is an error).",
    )
    tensorrt_targets: tuple[str, ...] = Field(
        (),
        max_length=8,
        description="TensorRT engines to build from model_qdq.onnx, one per target (for example "
        "jetson-orin-nano, x86-sm90): each is built by an engine worker or device agent serving "
        "the queue engine.<target>. Asking for one turns on tensorrt; target tensorrt only.",
    )

    @field_validator("tensorrt_targets")
    @classmethod
    def _target_names(cls, targets: tuple[str, ...]) -> tuple[str, ...]:
        for target in targets:
            if not TARGET_NAME.fullmatch(target):
                raise ValueError(
                    f"target {target!r}: lowercase letters, digits and '-', 1 to 63 characters"
                )
        if len(set(targets)) != len(targets):
            raise ValueError("each target once")
        return targets

    @model_validator(mode="before")
    @classmethod
    def _tensorrt_follows_target_onnx_and_targets(cls, data: Any) -> Any:
        """An unset ``tensorrt`` follows ``onnx`` (issue 4: the TensorRT-compatible student
        whenever an ONNX export or a TensorRT target is asked for); engines require it. Target
        cpu trains the CPU's grids instead: ``tensorrt`` is false, engines are refused."""
        if not isinstance(data, dict):
            return data
        if data.get("target") == "cpu":
            if data.get("tensorrt_targets"):
                raise ValueError(
                    "tensorrt_targets build TensorRT engines, which need target 'tensorrt'; "
                    "target 'cpu' trains grids for CPUs: drop one of them"
                )
            if data.get("tensorrt") is True:
                raise ValueError(
                    "tensorrt: true trains TensorRT's grids and target 'cpu' the CPU's: "
                    "set target 'tensorrt', or leave tensorrt out"
                )
            return {**data, "tensorrt": False}
        if data.get("tensorrt_targets"):
            if data.get("tensorrt") is False:
                raise ValueError("tensorrt_targets need the TensorRT-compatible student (tensorrt)")
            return {**data, "tensorrt": True}
        if "tensorrt" not in data:
            return {**data, "tensorrt": data.get("onnx", True)}
        return data

    @property
    def grids(self) -> Literal["tensorrt", "cpu", "papers"]:
        """The student's grid layout: the CPU's for target cpu; TensorRT's for target tensorrt
        with ``tensorrt`` (the default); else the papers' (``core.engine.quant_spec``)."""
        if self.target == "cpu":
            return "cpu"
        return "tensorrt" if self.tensorrt else "papers"


MAX_DEVICES = 64  # training processes of one job (GPUs of one worker)
# Most classes a job can name (`JobConfig.class_names`, numbered class folders); each name's length.
MAX_CLASSES = 100_000
MAX_EVAL_IMAGES = 100_000  # held-out images: evaluation runs three times over them
MAX_CLASS_NAME_CHARS = 200


class JobConfig(_Strict):
    """One job's settings. Defaults suit a short job (minutes, not the paper's 1,200 epochs)."""

    version: Literal[1] = 1
    weight_bits: int = Field(4, ge=1, le=8)
    activation_bits: int = Field(4, ge=1, le=8)
    method: Method = "lsq"
    per_channel: bool = Field(True, description="One weight scale per output channel.")
    first_last_bits: int | None = Field(
        8, ge=1, le=8, description="Bits of the first conv and last linear; null: the job's bits."
    )
    layer_bits: dict[str, int] = Field(
        default_factory=dict,
        max_length=100,
        description="Bits (weights and activations) of the layers whose name matches a pattern, "
        'e.g. {"layer1.*": 8}: fnmatch patterns over the names in quant_config.json; applied '
        "after first_last_bits, later patterns win. A pattern that matches no layer is an error.",
    )
    ewgs_delta: Literal["hessian"] | float = Field(
        "hessian",
        description="method ewgs only: the gradient-scaling strength delta of every quantizer. "
        "hessian: estimated per quantizer from the Hessian trace (Hutchinson) as the EWGS paper "
        "does, at the start of training and every ewgs_delta_every epochs; a number: fixed "
        "(0 makes EWGS a plain straight-through estimator).",
    )
    ewgs_delta_every: int = Field(
        10,
        ge=1,
        le=1000,
        description="method ewgs only: epochs between Hessian estimates (10: the EWGS code's "
        "update_every; an estimate costs about three training steps).",
    )
    epochs: int | None = Field(None, ge=1, le=1000, description="Default 1 unless steps is set.")
    steps: int | None = Field(None, ge=1, le=1_000_000, description="Overrides epochs.")
    batch_size: int = Field(64, ge=1, le=4096)
    temperature: float = Field(4.0, gt=0, le=100)
    lr: float = Field(
        0.01, gt=0, le=10.0, description="Adam learning rate of layer weights (unit: lr_unit)."
    )
    quantizer_lr: float = Field(
        0.01, gt=0, le=10.0, description="Adam learning rate of quantizer ranges (unit: lr_unit)."
    )
    lr_unit: Literal["step", "absolute"] = Field(
        "step",
        description="step: rates are multiples of each layer's weight quantization step, so one "
        "default suits every bit-width; absolute: plain rates (the paper: 1e-3 and 1e-5).",
    )
    weight_decay: float = Field(0.0, ge=0, le=1.0)
    amp: bool = Field(
        False,
        description="CUDA only: bf16 autocast for the convolutions (quantizers stay float32). "
        "Off by default: at 32 px on an H100 it trained slower than float32 (BENCHMARKS.md).",
    )
    compile_model: bool = Field(
        False,
        description="Run the student's training forward and backward through torch.compile: "
        "fused kernels after a compilation of tens of seconds; needs a C++ compiler on CPU "
        "workers, Triton on CUDA.",
    )
    devices: int | None = Field(
        None,
        ge=1,
        le=MAX_DEVICES,
        description="Training processes, one per GPU (DistributedDataParallel; gloo processes "
        "on a CPU worker), each training on its share of every batch: the result is one "
        "process's up to float rounding. Default: the worker's TRAIN_DEVICES (every GPU; one "
        "process on a CPU worker). Never more than the worker allows, nor than batch_size.",
    )
    checkpoint_every: int = Field(
        200,
        ge=1,
        le=1_000_000,
        description="Training steps between resumable checkpoints (student, optimizer, "
        "schedule, RNG); a job restarted after its worker died resumes from the last one. "
        "Does not change the result.",
    )
    eval_fraction: float = Field(
        0.1, gt=0, lt=1, description="Held-out share of the upload used for evaluation only."
    )
    max_eval_images: int = Field(
        10_000,
        ge=1,
        le=MAX_EVAL_IMAGES,
        description="At most this many held-out images (eval_fraction of a large upload would "
        "be evaluated three times and its logits kept in memory); the rest are trained on.",
    )
    class_names: tuple[str, ...] | None = Field(
        None,
        max_length=MAX_CLASSES,
        description="The model's classes in output order: a class folder of the labelled images "
        "is the output at its index here (a folder not listed is an error). Default: folders "
        "that are all numbers are those outputs (folder 7 is output 7), other folders sorted.",
    )
    preprocessing: Preprocessing = Preprocessing()
    export: ExportConfig = ExportConfig()
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @field_validator("layer_bits")
    @classmethod
    def _valid_layer_bits(cls, layer_bits: dict[str, int]) -> dict[str, int]:
        for pattern, bits in layer_bits.items():
            if not 1 <= len(pattern) <= 200:
                raise ValueError("layer_bits patterns must be 1..200 characters")
            if not 1 <= bits <= 8:
                raise ValueError(f"layer_bits[{pattern!r}] = {bits}: bits must lie in 1..8")
        return layer_bits

    @field_validator("class_names")
    @classmethod
    def _valid_class_names(cls, names: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if names is None:
            return None
        if any(not 1 <= len(name) <= MAX_CLASS_NAME_CHARS for name in names):
            raise ValueError(f"class_names must be 1..{MAX_CLASS_NAME_CHARS} characters each")
        if len(set(names)) != len(names):
            raise ValueError("class_names must name each class once")
        return names

    @field_validator("ewgs_delta")
    @classmethod
    def _valid_delta(cls, delta: str | float) -> str | float:
        if isinstance(delta, float) and not 0 <= delta <= 10:
            raise ValueError("a fixed ewgs_delta must lie in 0..10")
        return delta

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        if self.epochs is not None and self.steps is not None:
            raise ValueError("give epochs or steps, not both")
        fields = type(self).model_fields
        ewgs_only = [
            name
            for name in ("ewgs_delta", "ewgs_delta_every")
            if getattr(self, name) != fields[name].default
        ]
        if ewgs_only and self.method != "ewgs":
            raise ValueError(f"{', '.join(sorted(ewgs_only))} apply to method 'ewgs' only")
        if self.devices is not None and self.devices > self.batch_size:
            raise ValueError(
                f"devices ({self.devices}) cannot exceed batch_size ({self.batch_size}): each "
                "process trains on at least one image of every batch"
            )
        return self

    @property
    def epoch_budget(self) -> int:
        return self.epochs if self.epochs is not None else 1
