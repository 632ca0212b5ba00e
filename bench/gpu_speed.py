"""GPU speed of a 224-px ResNet-18 W4A4 job against the paper's training step (issue 16, 4(c)).

One short call on a lent GPU machine (no network, no ``../shared``, its own torch), from the
repository root, the checkout of github.com/kaiqi123/SQAKD carried beside the project as the
ignored folder ``.sqakd`` (``run``'s carry: ``[".sqakd"]``):

    python3 -m bench.gpu_speed --sqakd-checkout .sqakd --out $OUT/gpu_speed.json

then, here: ``python -m bench.gpu_speed --report gpu_speed.json`` writes the BENCHMARKS.md
section ``gpu-speed`` (``--no-write``: print it). ``--device cpu --tiny`` is a dry run of the
whole script at tiny sizes on a machine without a GPU (a minute or two).

What it measures, all at batch 128 on random 224 x 224 uint8 images held on the GPU:

- *paper*: the paper's own EWGS ``QConv`` (imported at run time from the checkout; none of its
  code is copied here) in every convolution of a torchvision-layout ResNet-18's blocks, first
  convolution and classifier float as in its models, driven by ``PaperStep`` (its
  ``train_quant.py`` loop body: ``DistillKL``, two Adam optimizers, its ``.item()`` and loss
  file per step, its per-quantizer logging in the backward) on ready float batches.
- *ours*: the job path: a random-weight torchvision ResNet-18 exported to ONNX and imported
  with ``load_onnx_model`` (BatchNorm folded), ``calibrated_student`` with the job's default
  spec for EWGS W4A4 (TensorRT's grids), the frozen teacher from ``inference_teacher``, then
  ``train`` with the job's ``train_config``; EWGS's delta fixed, so that the rows time steps
  alone (a job's Hessian estimate is in the stage times). Rows: float32; the frozen teacher in
  bf16 (weights and activations; the student float32); ``amp`` (bf16 autocast, teacher
  included); ``compile_model``, also with the bf16 teacher; ``compile_model`` with CUDA graphs
  (``mode="reduce-overhead"``).
- images/s: the median over the timed steps after the warm-up steps (each step synchronized);
  peak memory: ``torch.cuda.max_memory_allocated`` from the row's start (reset between rows).
- *job*: ``core.pipeline.run_quantization`` (``bench.cuda_check.run_job``) on an archive of
  generated 224-px JPEGs: EWGS W4A4, batch 128, 1 epoch, the job defaults else; the seconds of
  each stage, its training images/s and peak memory.

``--budget-seconds`` (360) bounds the run: a row that would not fit in what is left is recorded
as skipped, a row that runs out of it stops early; a failed row records its error. The JSON is
rewritten after every row, so what ran survives a timeout.

The device needs, besides torch and torchvision: numpy, Pillow, onnx, onnx2torch, onnxruntime,
pydantic, pydantic-settings, safetensors and openvino, all imported through ``core``; the
JSON's ``environment`` lists the versions it found. The earlier runs found all of them in the
lent machines' system Python (no venv carried): ``bench/cuda_check.py`` ran whole jobs through
``core.pipeline`` on the H100 (torch 2.11.0+cu130) and ``bench.int8_speed`` ran OpenVINO
2026.4.1 under Python 3.12 on the H200. The one runtime dependency added since, boto3 (with
botocore: ``core.storage``'s S3 backend, imported by nearly all of ``core``), is stood in for
by ``bench.bare_machine`` where absent (``environment.stubbed``).
The checkout needs only its ``CIFAR`` folder: ``mkdir -p .sqakd && cp -r /work/SQAKD/CIFAR
.sqakd/`` (``.sqakd/`` is git-ignored; about 4 MB). Give the call a ``timeout_s`` of about 420:
the budget, imports and start-up, and the JSON is on ``$OUT`` whatever happens after.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import functools
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torchvision
from torch import Tensor, nn

import bench.bare_machine  # first: before core imports boto3
from bench import calibration_speed
from bench.cuda_check import image_zip, run_job
from bench.report import table, write_section
from bench.speed_vs_paper import PaperStep, import_paper, paper_args
from core.config import JobConfig
from core.engine import calibrated_student, train_config
from core.inputs.images import normalize
from core.inputs.onnx_model import load_onnx_model
from core.pipeline import SilentReporter
from core.sqakd.metrics import compare
from core.sqakd.teacher import inference_teacher
from core.sqakd.trainer import TrainConfig, TrainingCanceled, train

SECTION = "gpu-speed"
EWGS_DELTA = 0.2  # fixed: the rows time steps, not the Hessian estimate
MODULES = (  # distributions the script and core.pipeline import: the environment's versions
    "torch", "torchvision", "numpy", "pillow", "onnx", "onnx2torch", "onnxruntime", "onnxscript",
    "pydantic", "pydantic-settings", "safetensors", "openvino", "triton",
)  # fmt: skip
PAPER = "paper: QConv ResNet-18, float32"


@dataclass(frozen=True)
class Sizes:
    side: int
    batch: int
    images: int  # resident on the device: our rows' pixels (calibration samples 256 of them)
    warmup: int  # steps before the timed ones (compilation included)
    steps: int  # timed
    job_images_per_class: int  # the job's archive: 4 class folders
    needs: dict[str, float] = field(default_factory=dict)  # seconds a row needs to start


FULL = Sizes(224, 128, 256, 3, 20, 128, {"eager": 20, "job": 60, "compile": 120})
TINY = Sizes(32, 8, 64, 1, 3, 12, {"eager": 5, "job": 10, "compile": 60})


class Budget:
    """The run's seconds: rows that would not fit are skipped, a running one stops early."""

    def __init__(self, seconds: float) -> None:
        self.ends = time.monotonic() + seconds

    def left(self) -> float:
        return self.ends - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0


class StepClock:
    """The end of every step, synchronized with the device: warm-up, then per-step images/s."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times = [time.perf_counter()]

    def tick(self, *_: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())

    def row(self, sizes: Sizes) -> dict[str, Any]:
        done = len(self.times) - 1
        warm = min(sizes.warmup, done)
        spans = [b - a for a, b in zip(self.times[warm:], self.times[warm + 1 :], strict=False)]
        row: dict[str, Any] = {
            "warmup_seconds": round(self.times[warm] - self.times[0], 2),
            "timed_steps": len(spans),
            "images_per_second": round(sizes.batch / statistics.median(spans), 1)
            if spans
            else None,
        }
        if self.device.type == "cuda":
            row["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20)
        if done < sizes.warmup + sizes.steps:
            row["stopped"] = f"budget ran out after {done} steps"
        return row


def start_row(device: torch.device) -> None:
    """Between rows: freed memory returned and the peak reset, so each row's peak is its own."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# --- ours: the job's student of an imported ResNet-18 ----------------------------------------


def resnet18_onnx(path: Path, side: int) -> Path:
    """``bench.calibration_speed.resnet18_onnx`` at ``side`` px (its BatchNorm settled)."""
    with mock.patch.object(calibration_speed, "SIDE", side):
        return calibration_speed.resnet18_onnx(path)


@dataclass
class Ours:
    teacher: nn.Module  # frozen: ``inference_teacher``
    student: nn.Module
    pixels: Tensor
    config: TrainConfig


def job_config(sizes: Sizes, **job: Any) -> JobConfig:
    """EWGS W4A4 at batch ``sizes.batch`` and ``sizes.side`` px, the job defaults else."""
    return JobConfig.model_validate(
        {"method": "ewgs", "weight_bits": 4, "activation_bits": 4, "batch_size": sizes.batch}
        | {"preprocessing": {"input_size": [sizes.side, sizes.side]}}
        | job
    )


def ours(workdir: Path, pixels: Tensor, sizes: Sizes, device: torch.device) -> Ours:
    """Import, calibrate and freeze as a job does (``core.engine``), once for every row."""
    config = job_config(sizes)
    path = resnet18_onnx(workdir / "resnet18.onnx", sizes.side)
    teacher = load_onnx_model(path, input_size=(sizes.side, sizes.side)).module.to(device)
    torch.manual_seed(config.seed)  # as run_quantization seeds before calibrating
    student, _ = calibrated_student(teacher, pixels, config)
    cfg = replace(train_config(config, len(pixels)), ewgs_delta=EWGS_DELTA)
    return Ours(inference_teacher(teacher), student, pixels, cfg)


class Bf16Teacher(nn.Module):
    """The frozen teacher with bf16 weights and activations, its logits back in float32: the
    student and its loss stay float32 (bench only; ``TrainConfig.amp`` casts both)."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = copy.deepcopy(teacher).to(torch.bfloat16)

    def forward(self, x: Tensor) -> Tensor:
        return self.teacher(x.to(torch.bfloat16)).float()


def bf16_teacher_error(teacher: nn.Module, bf16: nn.Module, inputs: Tensor) -> dict[str, float]:
    """The bf16 teacher's logits against the float32 teacher's on ``inputs``: top-1 agreement,
    KL, and the largest logit difference beside the logits' spread."""
    with torch.inference_mode():
        exact, rounded = teacher(inputs), bf16(inputs)
    found = compare(exact, rounded, None)
    return {
        "agreement": round(float(found["agreement"] or 0), 4),
        "kl": float(found["kl"] or 0),
        "max_logit_diff": (exact - rounded).abs().max().item(),
        "logit_std": exact.std().item(),
    }


def our_row(
    setup: Ours,
    sizes: Sizes,
    budget: Budget,
    device: torch.device,
    *,
    bf16_teacher: bool = False,
    compile_mode: str | None = None,
    recompile: bool = True,
    **train_options: Any,
) -> dict[str, Any]:
    """``sizes.warmup + sizes.steps`` steps of ``train`` in one call, each step timed.
    Compiled (``compile_model``), the row compiles afresh unless ``recompile`` is off: then it
    reuses the student's graphs from the row before (same student, mode and precision)."""
    teacher = Bf16Teacher(setup.teacher) if bf16_teacher else setup.teacher
    found: dict[str, Any] = {}
    if bf16_teacher:
        inputs = normalize(setup.pixels[: sizes.batch], setup.config.mean, setup.config.std)
        found["bf16_teacher_error"] = bf16_teacher_error(setup.teacher, teacher, inputs)
    cfg = replace(setup.config, steps=sizes.warmup + sizes.steps, **train_options)
    compile_ = torch.compile
    if compile_mode is not None:
        compile_ = functools.partial(torch.compile, mode=compile_mode)
    if cfg.compile_model and recompile:
        torch._dynamo.reset()  # the row compiles for itself: its warm-up says how long
    start_row(device)
    clock = StepClock(device)
    try:
        with mock.patch.object(torch, "compile", compile_):  # the trainer's torch.compile
            train(teacher, setup.student, setup.pixels, cfg, on_step=clock.tick,
                  should_stop=budget.expired)  # fmt: skip
    except TrainingCanceled:
        pass  # StepClock.row says where it stopped
    return clock.row(sizes) | found


# --- the paper's: its QConv in a torchvision ResNet-18 ----------------------------------------


class SaveDicts:
    """The ``save_dict`` and ``lambda_dict`` of the student's current forward, for its QConvs."""

    save_dict: dict[str, Any] | None = None
    lambda_dict: dict[str, Any] | None = None


class PaperConv(nn.Module):
    """One of its ``QConv``, called as its ``QBasicBlock`` calls one: with the forward's
    ``save_dict`` (layer, block and conv numbers set, so its backward logs as it does)."""

    def __init__(self, conv: nn.Module, where: tuple[int, int, int], dicts: SaveDicts) -> None:
        super().__init__()
        self.conv, self.where, self.dicts = conv, where, dicts

    def forward(self, x: Tensor) -> Tensor:
        save_dict = self.dicts.save_dict
        if save_dict:
            layer, block, conv = self.where
            save_dict |= {"layer_num": layer, "block_num": block, "conv_num": conv}
        return self.conv(x, save_dict, self.dicts.lambda_dict)


class PaperResNet(nn.Module):
    """A torchvision ResNet-18 with the forward arguments of its ResNets (``PaperStep``)."""

    def __init__(self, net: nn.Module, dicts: SaveDicts | None = None) -> None:
        super().__init__()
        self.net, self.dicts = net, dicts

    def forward(
        self,
        x: Tensor,
        save_dict: dict[str, Any] | None = None,
        lambda_dict: dict[str, Any] | None = None,
        is_feat: bool = False,
    ) -> Any:
        if self.dicts is not None:
            self.dicts.save_dict, self.dicts.lambda_dict = save_dict, lambda_dict
        out = self.net(x)
        return ([], [], out) if is_feat else out  # features: unused at its kd_beta 0


def paper_models(paper: Any) -> tuple[nn.Module, nn.Module]:
    """(teacher, student): a float torchvision ResNet-18 (BatchNorm in eval mode, as its
    teacher runs), and its copy whose block convolutions (3x3 and the 1x1 downsampling ones,
    its option B) are its ``QConv`` at W4A4 EWGS; first convolution and classifier float."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    student, dicts, args = copy.deepcopy(net), SaveDicts(), paper_args(num_classes=1000)
    for name, conv in list(student.named_modules()):
        if not (name.startswith("layer") and isinstance(conv, nn.Conv2d)):
            continue
        parts = name.split(".")  # layer1.0.conv2, layer2.0.downsample.0
        number = int(parts[2][4:]) if parts[2].startswith("conv") else 3
        quantized = paper.QConv(
            conv.in_channels, conv.out_channels, conv.kernel_size, args,
            stride=conv.stride, padding=conv.padding, bias=False,
        )  # fmt: skip
        quantized.weight.data.copy_(conv.weight.data)
        parent, child = name.rsplit(".", 1)
        where = (int(parts[0][5:]), int(parts[1]), number)
        setattr(student.get_submodule(parent), child, PaperConv(quantized, where, dicts))
    return PaperResNet(net), PaperResNet(student, dicts)


def paper_row(
    checkout: Path,
    workdir: Path,
    pixels: Tensor,
    sizes: Sizes,
    budget: Budget,
    device: torch.device,
) -> dict[str, Any]:
    """Its step on two ready float batches in turn, after its range initialization."""
    paper = import_paper(checkout)
    teacher, student = (model.to(device) for model in paper_models(paper))
    step = PaperStep(paper, workdir, (teacher, student), sizes.batch)
    prep = JobConfig().preprocessing  # the same normalization as ours (speed only)
    batches = [
        normalize(pixels[i : i + sizes.batch], prep.mean, prep.std).contiguous()
        for i in (0, sizes.batch)
    ]  # NCHW float, as its loader gives them
    labels = torch.randint(0, 1000, (sizes.batch,), device=device)
    step.init_quant_model(step.student, [(batches[0], labels)], device)
    start_row(device)
    clock = StepClock(device)
    for index in range(sizes.warmup + sizes.steps):
        if budget.expired():
            break
        step.step(batches[index % 2], labels)
        clock.tick()
    return clock.row(sizes)


# --- a whole job -------------------------------------------------------------------------------


def time_stages(reporter: Any) -> list[float]:
    """The times of ``reporter.stage`` calls from now on, in the list returned."""
    marks: list[float] = []
    stage = reporter.stage

    def timed(name: str) -> None:
        stage(name)
        marks.append(time.perf_counter())

    reporter.stage = timed
    return marks


def stage_seconds(stages: list[str], marks: list[float], ended: float) -> dict[str, float]:
    """Each stage's seconds: from its start to the next one's, the last to ``ended``."""
    ends = [*marks[1:], ended]
    return {s: round(e - b, 2) for s, b, e in zip(stages, marks, ends, strict=True)}


def job_row(workdir: Path, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """``run_quantization`` on generated JPEGs, its dataset store in ``workdir``; its training
    peak memory net of what the bench held before it."""
    from core.settings import get_settings

    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["SQAKD_DATA_DIR"] = str(workdir / "data")  # the store, not the repo's var/
    get_settings.cache_clear()
    model = resnet18_onnx(workdir / "teacher.onnx", sizes.side)
    archive = image_zip(workdir / "data.zip", sizes.job_images_per_class, sizes.side, "JPEG")
    job = job_config(sizes, epochs=1).model_dump(mode="json", exclude_unset=True)
    start_row(device)
    # what this process holds already (ours' student and teacher): not the job's
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    reporter = SilentReporter()
    marks = time_stages(reporter)
    result = run_job(model, archive, None, job, workdir / "job", reporter)
    result["stage_seconds"] = stage_seconds(reporter.stages, marks, time.perf_counter())
    peak = result["train"]["peak_memory_bytes"]
    result["train_peak_memory_mib"] = (
        round((peak - held) / 2**20) if device.type == "cuda" else None
    )
    return result


# --- the run -------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    """What ran: the device, Python and the versions of what the script imports (None: absent)."""
    versions: dict[str, str | None] = {}
    for name in MODULES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "CPU",
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "versions": versions,
        "stubbed": bench.bare_machine.STUBBED,
    }


def attempt(
    report: dict[str, Any],
    out: Path,
    name: str,
    needs: float,
    budget: Budget,
    measure: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """Run one row, or record it as skipped (not enough budget) or failed (its error)."""
    row: dict[str, Any] = {"name": name}
    if budget.left() < needs:
        row["skipped"] = f"{max(budget.left(), 0):.0f} s of the budget left, needs {needs:.0f}"
    else:
        started = time.perf_counter()
        try:
            row |= measure()
        except Exception as exc:  # a failed row is a finding; the others still run
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            row["traceback"] = traceback.format_exc()[-2000:]
        row["seconds"] = round(time.perf_counter() - started, 1)
    if name == "job":
        report["job"] = row
    else:
        report["rows"].append(row)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in row.items() if k not in ("traceback", "train")}), flush=True)
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    budget = Budget(args.budget_seconds)
    sizes = TINY if args.tiny else FULL
    device = torch.device(args.device)
    report: dict[str, Any] = {
        "command": " ".join(["python3 -m bench.gpu_speed", *sys.argv[1:]]),
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "environment": environment(device),
        "sizes": {k: v for k, v in vars(sizes).items() if k != "needs"},
        "budget_seconds": args.budget_seconds,
        "ewgs_delta": EWGS_DELTA,
        "rows": [],
        "job": None,
    }
    print(json.dumps(report, indent=2), flush=True)
    eager, compiled = sizes.needs["eager"], sizes.needs["compile"]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        torch.manual_seed(0)
        shape = (sizes.images, 3, sizes.side, sizes.side)
        pixels = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)

        def paper() -> dict[str, Any]:
            return paper_row(args.sqakd_checkout, workdir, pixels, sizes, budget, device)

        attempt(report, args.out, PAPER, eager, budget, paper)
        setup: list[Ours | Exception] = []  # built by the first row of ours that runs

        def our(**options: Any) -> Callable[[], dict[str, Any]]:
            def measure() -> dict[str, Any]:
                if not setup:
                    started = time.perf_counter()
                    try:
                        setup.append(ours(workdir, pixels, sizes, device))
                    except Exception as exc:  # every row of ours fails with it, at once
                        setup.append(exc)
                    report["our_setup_seconds"] = round(time.perf_counter() - started, 1)
                if isinstance(setup[0], Exception):
                    raise setup[0]
                return our_row(setup[0], sizes, budget, device, **options)

            return measure

        rows = [
            ("ours: float32", eager, our()),
            ("ours: float32, bf16 frozen teacher", eager, our(bf16_teacher=True)),
            ("ours: bf16 autocast (amp)", eager, our(amp=True)),
        ]
        for name, needs, measure in rows:
            attempt(report, args.out, name, needs, budget, measure)
        attempt(report, args.out, "job", sizes.needs["job"], budget,
                lambda: job_row(workdir / "job", sizes, device))  # fmt: skip
        if not args.no_compile:
            compiled_rows = [
                ("ours: float32, torch.compile", compiled, our(compile_model=True)),
                (  # the same compiled student: its graphs reused
                    "ours: float32, torch.compile, bf16 frozen teacher",
                    2 * eager,
                    our(compile_model=True, bf16_teacher=True, recompile=False),
                ),
                (
                    "ours: float32, torch.compile reduce-overhead (CUDA graphs)",
                    compiled,
                    our(compile_model=True, compile_mode="reduce-overhead"),
                ),
            ]
            for name, needs, measure in compiled_rows:
                attempt(report, args.out, name, needs, budget, measure)
    report["seconds"] = round(args.budget_seconds - budget.left(), 1)
    args.out.write_text(json.dumps(report, indent=2))
    return report


# --- the BENCHMARKS.md section -----------------------------------------------------------------


def _cell(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def section(report: dict[str, Any]) -> str:
    env = report["environment"]
    sizes = report["sizes"]
    paper = next((r for r in report["rows"] if r["name"] == PAPER), {})
    paper_speed = paper.get("images_per_second")
    rows, ratios = [], {}
    for row in report["rows"]:
        speed = row.get("images_per_second")
        ratio = speed / paper_speed if speed and paper_speed else None
        if ratio is not None and row["name"] != PAPER:
            ratios[row["name"]] = ratio
        note = row.get("skipped") or row.get("error") or row.get("stopped") or ""
        rows.append(
            [
                row["name"],
                _cell(speed),
                "-" if ratio is None else f"{ratio:.2f}x",
                _cell(row.get("peak_memory_mib"), 0),
                _cell(row.get("warmup_seconds")),
                note.replace("|", "/").replace("\n", " ")[:200],
            ]
        )
    speed_table = table(
        ["row", "images/s", "vs paper", "peak MiB", "warm-up s", "note"],
        rows,
    )
    if ratios:
        best = max(ratios, key=ratios.__getitem__)
        verdict = (
            f"Best of ours: *{best}* at **{ratios[best]:.2f}x** the paper's images/s: the goal "
            f"of 2x is {'met' if ratios[best] >= 2 else '**not met**'}."
        )
    else:
        verdict = "No ratio: the paper's row or ours did not run."
    return (
        f"On {env['device']}, torch {report['torch']} (CUDA {env['cuda']}), Python "
        f"{env['python']}, {env['cpus']} CPUs.\n\n"
        f"SQAKD training steps of a ResNet-18 at {sizes['side']} px, EWGS W4A4, batch "
        f"{sizes['batch']}, random weights and random uint8 images held on the device; "
        f"images/s is the median of {sizes['steps']} timed steps (each synchronized) after "
        f"{sizes['warmup']} warm-up step{'s' if sizes['warmup'] != 1 else ''}, whose seconds "
        f"(compilation included) are *warm-up "
        f"s*; peak MiB is `torch.cuda.max_memory_allocated` over the row (reset between rows; "
        f"ours count their {sizes['images']} resident uint8 images, the paper's its two float "
        f"batches). *paper*: the paper's EWGS `QConv` (imported from a checkout of "
        f"kaiqi123/SQAKD) in every block convolution of a torchvision-layout ResNet-18, first "
        f"convolution and classifier float, the body of its `train_quant.py` loop "
        f"(`PaperStep`: `DistillKL`, two Adam optimizers, its `.item()`, loss file and "
        f"per-quantizer backward logging) on ready float batches. *ours*: the job path "
        f"(a torchvision ResNet-18, BatchNorm settled on random images, exported to ONNX and "
        f"imported by `load_onnx_model`, BatchNorm folded; "
        f"`calibrated_student` with the default spec, TensorRT's grids; `inference_teacher`; "
        f"`train` with the job's `train_config`), EWGS delta fixed at {report['ewgs_delta']} "
        f"(the Hessian estimate is in the job below); our images are augmented and normalized "
        f"on the device in the step.\n\n{speed_table}\n\n{verdict}\n\n"
        + bf16_text(report["rows"])
        + job_text(report.get("job"))
    )


def bf16_text(rows: list[dict[str, Any]]) -> str:
    error = next((r["bf16_teacher_error"] for r in rows if "bf16_teacher_error" in r), None)
    if error is None:
        return ""
    return (
        f"The bf16 frozen teacher against the float32 one on a batch of these images: top-1 "
        f"agreement {error['agreement']:.4f}, KL {error['kl']:.2g}, largest logit difference "
        f"{error['max_logit_diff']:.3g} (the logits' standard deviation "
        f"{error['logit_std']:.3g}); random weights on noise images tie many logits, so the "
        f"agreement understates a trained teacher's.\n\n"
    )


def job_text(job: dict[str, Any] | None) -> str:
    if not job:
        return ""
    if "stage_seconds" not in job:
        reason = job.get("skipped") or job.get("error") or "no result"
        return f"The whole job did not run: {reason}\n"
    stages = table(
        ["stage", "seconds"],
        [[name, f"{seconds:.2f}"] for name, seconds in job["stage_seconds"].items()]
        + [["total", f"{sum(job['stage_seconds'].values()):.2f}"]],
    )
    train_stats = job["train"]
    peak = job.get("train_peak_memory_mib")
    return (
        f"A whole job through `core.pipeline.run_quantization` (EWGS W4A4, batch "
        f"{job['job']['batch_size']}, 1 epoch, the job defaults else, `export.speed` "
        f"included) on {job['train_images'] + job['eval_images']} generated "
        f"JPEGs ({job['train_images']} trained on, {job['eval_images']} held out), its "
        f"teacher the same ResNet-18 ONNX: {train_stats['steps']} training steps in "
        f"{train_stats['seconds']:.2f} s ({job['train_images_per_second']} images/s), "
        f"{train_stats['hessian_seconds']:.2f} s of them the Hessian estimate of the EWGS "
        f"deltas; peak training memory {_cell(peak, 0)} MiB (beyond what the bench "
        f"held).\n\n{stages}\n"
    )


def write_report(path: Path, write: bool) -> str:
    report = json.loads(path.read_text())
    body = section(report)
    env = report["environment"]
    command = f"{report['command']} && python -m bench.gpu_speed --report {path.name}"
    machine = f"{env['device']} (lent device machine), torch {report['torch']}"
    if write:
        write_section(SECTION, body, command=command, machine_text=machine)
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sqakd-checkout", type=Path, default=Path(".sqakd"))
    parser.add_argument("--out", type=Path, default=Path("gpu_speed.json"))
    parser.add_argument("--device", default="cuda", help="cpu: a dry run (with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: 32 px, batch 8")
    parser.add_argument(
        "--budget-seconds", type=float, help="the run's seconds (default 360; --tiny: 150)"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--report", type=Path, help="only render this JSON into BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="with --report: print only")
    args = parser.parse_args()
    if args.budget_seconds is None:
        args.budget_seconds = 150.0 if args.tiny else 360.0
    if args.report is not None:
        print(write_report(args.report, write=not args.no_write))
        return
    run(args)


if __name__ == "__main__":
    main()
