"""One quantization job from uploaded files to artifacts, free of HTTP, queues and databases.

The worker calls ``run_quantization`` with a ``Reporter`` that writes progress to the job row;
tests and scripts can pass any object with the same methods.

Training saves ``checkpoint.pt`` in the work dir every ``checkpoint_every`` steps, when stopped
and when done. A job run again on the same work dir (its worker died or lost its lease) redoes
the cheap, deterministic part (import, calibration: same student, same ``calibrated`` metrics)
and resumes training from that checkpoint, ending with the student of a run that never stopped.

A job that trains on several processes (``config.devices``, the worker's ``TRAIN_DEVICES``)
starts them first (``train_rank``): each imports and calibrates as this process does, at the
same time, and trains on its share of every batch; this process, rank 0, does everything else.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from core.config import JobConfig
from core.engine import calibrated_student, train_config
from core.export.int_checkpoint import save_int_checkpoint, state_tensors
from core.export.onnx_qdq import (
    export_qdq_onnx,
    onnx_parity,
    tensorrt_report,
    write_cpu_variant,
)
from core.export.runtime_speed import int8_slower_batches, int8_speed_in_child
from core.inputs.images import ImageSet, load_image_archive, normalize
from core.inputs.onnx_model import ImportedModel, load_onnx_model
from core.settings import get_settings
from core.sqakd import distributed
from core.sqakd.metrics import compare, model_sizes, predict
from core.sqakd.modules import describe_layers
from core.sqakd.teacher import inference_teacher
from core.sqakd.trainer import Checkpointer, TrainingCanceled, choose_probe, train
from core.storage import hash_file

log = logging.getLogger(__name__)

PARITY_IMAGES = 10_000  # ONNX-vs-PyTorch parity on the evaluation images, up to this many
CHECKPOINT = "checkpoint.pt"  # in the work dir; not an artifact
TRAIN_RANK = f"{__name__}:train_rank"  # the entry of training ranks 1..N-1

STAGES = ("validating", "calibrating", "training", "evaluating", "exporting")


@dataclass(frozen=True)
class JobInputs:
    model_path: Path
    data_path: Path
    eval_data_path: Path | None = None
    # The archives' sha256 (the job row has them), which name their dataset stores; computed
    # from the files when not given.
    data_sha256: str | None = None
    eval_data_sha256: str | None = None


@dataclass
class JobResult:
    metrics: dict[str, Any]
    artifacts: dict[str, Path] = field(default_factory=dict)  # artifact name -> file in workdir


class JobCanceled(Exception):
    """Raised when ``Reporter.should_stop`` asked the job to stop."""


class Reporter(Protocol):
    def stage(self, stage: str) -> None:
        """The job entered ``stage`` (one of ``STAGES``)."""

    def progress(self, progress: dict[str, Any]) -> None:
        """Training progress: step, total_steps, epoch(s), loss, eta_seconds, images_per_second."""

    def metrics(self, point: dict[str, Any]) -> None:
        """A training-curve point: step, loss and learning rates; agreement and KL on probes."""

    def warning(self, code: str, message: str) -> None:
        """Something the user should know that does not fail the job."""

    def should_stop(self) -> bool:
        """True once the user canceled the job."""


class SilentReporter:
    """A ``Reporter`` for scripts and tests: records stages, curve points and warnings, drops
    progress, never stops."""

    def __init__(self) -> None:
        self.stages: list[str] = []
        self.points: list[dict[str, Any]] = []
        self.warnings: list[tuple[str, str]] = []

    def stage(self, stage: str) -> None:
        self.stages.append(stage)

    def progress(self, progress: dict[str, Any]) -> None:
        pass

    def metrics(self, point: dict[str, Any]) -> None:
        self.points.append(point)

    def warning(self, code: str, message: str) -> None:
        self.warnings.append((code, message))

    def should_stop(self) -> bool:
        return False


def run_quantization(
    inputs: JobInputs, config: JobConfig, workdir: Path, reporter: Reporter
) -> JobResult:
    """Import, calibrate, distill, evaluate and export; raises InputError for bad uploads."""
    workdir.mkdir(parents=True, exist_ok=True)
    prep = config.preprocessing
    checkpoint = workdir / CHECKPOINT
    resume = checkpoint.exists()  # decided once, for every rank
    if resume:
        log.info("resuming training from %s", checkpoint)
    processes = distributed.world_size(
        config.devices, get_settings().train_devices, config.batch_size
    )
    rank_job = {
        "inputs": {name: str(path) if path else None for name, path in asdict(inputs).items()},
        "config": config.model_dump(mode="json"),
        "workdir": str(workdir),
        "resume": resume,
    }
    with distributed.launch(processes, TRAIN_RANK, rank_job) as rendezvous:
        reporter.stage("validating")
        job = _load(inputs, config)
        teacher_logits = predict(job.frozen_teacher, job.eval_set.pixels, prep.mean, prep.std)

        reporter.stage("calibrating")
        student, spec = calibrated_student(job.teacher, job.train_set.pixels, config)
        calibrated = compare(
            teacher_logits, predict(student, job.eval_set.pixels, prep.mean, prep.std), job.labels
        )

        reporter.stage("training")
        train_cfg = train_config(config, len(job.train_set))
        try:
            stats = train(
                job.frozen_teacher,
                student,
                job.train_set.pixels,
                train_cfg,
                on_step=lambda p: reporter.progress(asdict(p)),
                should_stop=reporter.should_stop,
                checkpointer=Checkpointer(checkpoint, config.checkpoint_every),
                resume_from=checkpoint if resume else None,
                on_metrics=reporter.metrics,
                # the curve's probes: evaluation images, with the teacher's logits from above
                probe=choose_probe(job.eval_set.pixels, teacher_logits, train_cfg),
                on_warning=reporter.warning,
                group=rendezvous.join(),
            )
        except TrainingCanceled as stop:
            raise JobCanceled(str(stop)) from stop
    reporter.stage("evaluating")
    student.eval()
    metrics: dict[str, Any] = {
        **compare(
            teacher_logits, predict(student, job.eval_set.pixels, prep.mean, prep.std), job.labels
        ),
        "calibrated": calibrated,
        "eval_images": len(job.eval_set),
        "eval_source": "eval_data" if inputs.eval_data_path is not None else "held_out",
        "train_images": len(job.train_set),
        **model_sizes(student),
        "train": asdict(stats),
    }
    classes = 0 if job.labels is None else int(job.labels.unique().numel())
    metrics["warnings"] = label_warnings(
        metrics["teacher_top1"], metrics["agreement"], classes, len(job.eval_set)
    )
    for warning in metrics["warnings"]:
        log.warning("%s: %s", warning["code"], warning["message"])
        reporter.warning(warning["code"], warning["message"])

    reporter.stage("exporting")
    student = student.cpu()
    artifacts = {
        "student.safetensors": workdir / "student.safetensors",
        "quant_config.json": workdir / "quant_config.json",
        "metrics.json": workdir / "metrics.json",
    }
    save_file(state_tensors(student), artifacts["student.safetensors"])
    int_checkpoint = artifacts["model_int.safetensors"] = workdir / "model_int.safetensors"
    save_int_checkpoint(student, spec, int_checkpoint)
    metrics["int_checkpoint_bytes"] = int_checkpoint.stat().st_size
    quant_config = {
        "job_config": config.model_dump(mode="json"),
        "quant_spec": spec.to_dict(),
        "input": {"name": job.imported.input_name, "shape": [3, *job.input_size]},
        "layers": describe_layers(student),
    }
    artifacts["quant_config.json"].write_text(json.dumps(quant_config, indent=2))
    if config.export.onnx:
        onnx_path = artifacts["model_qdq.onnx"] = workdir / "model_qdq.onnx"
        export_qdq_onnx(student, (3, *job.input_size), onnx_path)
        eval_inputs = (  # in batches: the evaluation images are never all in memory
            normalize(job.eval_set.pixels[i : i + 64], prep.mean, prep.std)
            for i in range(0, min(len(job.eval_set), PARITY_IMAGES), 64)
        )
        metrics["onnx_parity"] = onnx_parity(student, onnx_path, eval_inputs)
        if config.export.target == "tensorrt":  # the CPU's grids are not TensorRT's
            metrics["tensorrt_rules"] = tensorrt_report(student, onnx_path)
        cpu_path = artifacts["model_qdq_cpu.onnx"] = workdir / "model_qdq_cpu.onnx"
        write_cpu_variant(onnx_path, cpu_path)
        if config.export.speed:
            models = {"float": inputs.model_path, "qdq": onnx_path, "qdq_cpu": cpu_path}
            metrics["inference"] = _inference_speed(models, (3, *job.input_size))
            for warning in int8_warnings(metrics["inference"]):
                reporter.warning(warning["code"], warning["message"])
                metrics["warnings"].append(warning)
    artifacts["metrics.json"].write_text(json.dumps(metrics, indent=2))
    return JobResult(metrics=metrics, artifacts=artifacts)


@dataclass
class _Loaded:
    """A job's model and images as every training rank loads them."""

    imported: ImportedModel
    input_size: tuple[int, int]
    train_set: ImageSet
    eval_set: ImageSet
    labels: Tensor | None  # of eval_set, where they can index the model's outputs
    teacher: nn.Module  # on the training device
    frozen_teacher: nn.Module  # forward passes only: BatchNorm folded


def _load(inputs: JobInputs, config: JobConfig) -> _Loaded:
    """The validating stage: the model, and the images split into training and evaluation."""
    torch.manual_seed(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # a rank's own GPU
    prep = config.preprocessing
    imported = load_onnx_model(inputs.model_path, input_size=prep.input_size)
    input_size = prep.input_size or (imported.input_shape[2], imported.input_shape[3])
    settings = get_settings()
    # Decoded once per (archive, input size) into the dataset store, which later jobs reuse.
    load = functools.partial(
        load_image_archive,
        store_dir=settings.dataset_stores,
        max_pixels=settings.max_dataset_pixels,  # data and eval_data share it
        decode_processes=settings.decode_processes,
        max_store_bytes=settings.dataset_store_max_bytes,
    )
    # The job's class order applies where labels are evaluated: to data only when it is split.
    data_classes = config.class_names if inputs.eval_data_path is None else None
    data = load(
        inputs.data_path,
        input_size,
        class_names=data_classes,
        sha256=inputs.data_sha256 or hash_file(inputs.data_path).sha256,
    )
    if inputs.eval_data_path is not None:
        train_set = data
        eval_set = load(
            inputs.eval_data_path,
            input_size,
            images_before=len(data),
            class_names=config.class_names,
            sha256=inputs.eval_data_sha256 or hash_file(inputs.eval_data_path).sha256,
        )
    else:
        train_set, eval_set = data.split(config.eval_fraction, config.seed, config.max_eval_images)
    teacher = imported.module.to(device)
    return _Loaded(
        imported,
        input_size,
        train_set,
        eval_set,
        _usable_labels(eval_set, imported.num_outputs),
        teacher,
        inference_teacher(teacher),
    )


def train_rank(job: dict[str, Any], rendezvous: distributed.Rendezvous) -> None:
    """Training rank 1..N-1 of a job (``distributed.launch``): the model and images loaded, the
    student calibrated as rank 0 does (deterministic), then its share of training. Rank 0
    reports, checkpoints and exports; this rank stops when rank 0 does."""
    paths = job["inputs"]
    inputs = JobInputs(
        Path(paths["model_path"]),
        Path(paths["data_path"]),
        Path(paths["eval_data_path"]) if paths["eval_data_path"] else None,
        paths["data_sha256"],
        paths["eval_data_sha256"],
    )
    config = JobConfig.model_validate(job["config"])
    loaded = _load(inputs, config)
    student, _ = calibrated_student(loaded.teacher, loaded.train_set.pixels, config)
    try:
        train(
            loaded.frozen_teacher,
            student,
            loaded.train_set.pixels,
            train_config(config, len(loaded.train_set)),
            resume_from=Path(job["workdir"]) / CHECKPOINT if job["resume"] else None,
            group=rendezvous.join(),
        )
    except TrainingCanceled:
        log.info("training rank %d: stopped with rank 0", rendezvous.rank)


def _inference_speed(models: dict[str, Path], input_shape: tuple[int, ...]) -> dict[str, Any]:
    """``runtime_speed.int8_speed`` on the worker's CPU threads, in a child process; a model
    OpenVINO or ONNX Runtime cannot run at these batch sizes (a fixed batch dimension, say) is
    reported, not failed: the job's other results stand."""
    try:
        return int8_speed_in_child(
            models, input_shape, threads=torch.get_num_threads(), seconds=0.5
        )
    except Exception as exc:  # noqa: BLE001 - each runtime has its own error types
        log.warning("inference speed not measured: %s", exc)
        return {"error": str(exc).splitlines()[0][:300]}


# A labels warning needs this many labelled images, and a student that follows its teacher.
LABELS_CHECK_MIN_IMAGES = 50
LABELS_CHECK_MIN_AGREEMENT = 0.5


def label_warnings(
    teacher_top1: float | None, agreement: float, classes: int, eval_images: int
) -> list[dict[str, str]]:
    """A ``labels_mismatch`` warning when the labels probably do not follow the model's outputs.

    The uploaded teacher scores near chance on the labelled images: under twice chance for the
    ``classes`` labels present (under chance itself with two, where twice chance is perfection),
    on at least ``LABELS_CHECK_MIN_IMAGES`` images, while the student agrees with it on at least
    ``LABELS_CHECK_MIN_AGREEMENT`` of them (so the teacher does predict something consistent).
    A model someone wants quantized is rarely that bad; class folders mapped to the wrong
    outputs are, and would otherwise pass without a word.
    """
    if teacher_top1 is None or classes < 2 or eval_images < LABELS_CHECK_MIN_IMAGES:
        return []
    near_chance = 2 / classes if classes > 2 else 1 / classes
    if teacher_top1 >= near_chance or agreement < LABELS_CHECK_MIN_AGREEMENT:
        return []
    message = (
        f"the teacher's top-1 on the {eval_images} labelled images is {teacher_top1:.1%}, "
        f"near chance for {classes} classes, while the student agrees with it on "
        f"{agreement:.1%}: the class folders probably do not map to the model's outputs. "
        "Folders named 0, 1, ... map to those outputs, other folders in sorted order; set "
        "class_names in the job config to the model's output order."
    )
    return [{"code": "labels_mismatch", "message": message}]


def int8_warnings(inference: dict[str, Any]) -> list[dict[str, str]]:
    """An ``int8_slower_than_float`` warning when, under OpenVINO on the worker's CPU, no int8
    file beats the uploaded float model at some batch size (``metrics.inference.int8_pays``
    is false): on this CPU the model is better deployed in float."""
    if "openvino" not in inference:  # not measured (``_inference_speed``'s error)
        return []
    slower = int8_slower_batches(inference)
    if not slower:
        return []
    at = " and ".join(
        f"{speedup:.2f}x the float model's speed at batch {batch}"
        for batch, speedup in slower.items()
    )
    message = (
        "int8 does not pay for this model on the worker's CPU: under OpenVINO the faster of "
        f"model_qdq.onnx and model_qdq_cpu.onnx runs at {at}. On a CPU like this one, deploy "
        "the float model; the int8 files are for runtimes whose int8 kernels do pay for it "
        "(TensorRT on a GPU, say)."
    )
    return [{"code": "int8_slower_than_float", "message": message}]


def _usable_labels(images: ImageSet, num_outputs: int | None) -> Tensor | None:
    """Class-folder labels, if they can index the model's outputs (evaluation only)."""
    if images.labels is None or images.class_names is None:
        return None
    if num_outputs is not None and len(images.class_names) > num_outputs:
        return None
    return images.labels
