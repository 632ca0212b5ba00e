"""Quality: SQAKD (no labels) against the label-based QAT baseline on the CIFAR-10 teacher.

For each row (method, bits) two students start from the same calibrated copy of the ResNet-20
teacher in ``../shared/fixtures`` and train for the same budget on the CIFAR-10 training images:
SQAKD, exactly as a job with that ``JobConfig`` trains (KL to the teacher, no labels), and the
cross-entropy baseline (labels only, everything else identical). Both are scored by top-1 on the
test images. Goals: SQAKD at least as good as the baseline in every row, and every W4A4 SQAKD
student within 1.5 points of the teacher.

Every finished run is stored in a JSON results file, keyed by its full settings, and skipped
when the command runs again: an interrupted benchmark resumes where it stopped, and a changed
budget or default never mixes with old results. The BENCHMARKS.md section is rewritten after
every run, marked partial until all runs are there.

    python -m bench.quality    # 3 seeds: about 50 minutes on 2 quiet cores; writes BENCHMARKS.md
    python -m bench.quality --train-images 2000 --test-images 1000 --epochs 1 \
        --rows lsq:4 --seeds 0 --no-write    # a trial: a few minutes, BENCHMARKS.md untouched
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, get_args

import torch
from torch import Tensor, nn

from bench.cifar import SHARED, TEACHER_ONNX, cifar_zip, teacher_preprocessing
from bench.report import machine, table, write_section
from core.config import JobConfig, Method
from core.engine import calibrated_student, train_config
from core.inputs.images import ImageSet, load_image_archive
from core.inputs.onnx_model import load_onnx_model
from core.sqakd.metrics import compare, predict
from core.sqakd.teacher import inference_teacher
from core.sqakd.trainer import (
    TrainProgress,
    TrainStats,
    load_checkpoint,
    save_checkpoint,
    train,
)

# Epochs of every run, chosen so that the 14 runs fit 90 minutes on this machine's 2 CPU cores
# with room to spare. Measured beforehand with 2 torch threads on quiet cores, 31-step trials on
# 2,000 images (fused fake_quantize op): 160 ms per step for PACT, DoReFa and STE, 220 for LSQ,
# 260 for EWGS (its Hessian estimates included), CE runs a little less (no teacher forward);
# 6-7 s to evaluate 10,000 test images, about 5 s to calibrate, 20 s to decode the data once.
# One epoch (781 steps per run): about 42 minutes in all; two: about 80, too close to 90 once
# other work shares the cores (steps then ran 2-3x slower). On shared cores, --threads 1 slows
# down more gracefully.
EPOCHS = 1
# Seeds per row. Two W4A4 quantizers that differ only in their activations' range gradient
# (PACT with its range nearly frozen, and DoReFa) scored 0.3-0.4 points apart with one seed, in
# opposite directions for SQAKD and CE, and float-order changes alone moved one row by 0.35:
# single runs cannot rank W4A4 rows, whose gaps are smaller than that. Each seed changes the
# calibration sample, data order and augmentation.
SEEDS = (0, 1, 2)
BUDGET_NOTE = (
    "the 42 runs of three seeds at one epoch took 48.6 minutes on 2 quiet CPU cores (63 to "
    "103 ms per step of 64 images, 3 s per evaluation), so three seeds fit 90 minutes with room "
    "for slower cores; two epochs would fit fewer seeds, and single runs cannot rank the W4A4 "
    "rows (see SEEDS)"
)
ROWS: list[tuple[Method, int]] = [  # (method, weight and activation bits)
    ("ewgs", 2),
    ("ewgs", 4),
    ("lsq", 2),
    ("lsq", 4),
    ("pact", 4),
    ("dorefa", 4),
    ("ste", 4),
]
MODES = ("sqakd", "ce")  # SQAKD (KL to the teacher, no labels); cross-entropy on labels only
W4_GOAL_POINTS = 1.5  # W4A4 SQAKD students within this many top-1 points of the teacher
DATA = SHARED / "data" / "cifar10"
CACHE_DIR = Path.home() / ".cache" / "sqakd-bench"
DATA_SEED = 0  # the order of the training and test images (see cifar_split)
SECTION = "quality"
STUDENT = {  # by export.tensorrt
    True: "the TensorRT-compatible student (`export.tensorrt`: 8-bit grids inside int8, both "
    "inputs of each residual addition quantized)",
    False: "the papers' grids (`export.tensorrt: false`)",
}


# --- data and teacher ---


def cifar_split(split: str, images: int, cache_dir: Path) -> ImageSet:
    """``images`` labelled CIFAR-10 images of ``split`` in a fixed random order.

    The first ``ceil(images / 10)`` JPEGs of every class folder (as ``cifar_zip`` picks them),
    decoded once through the upload path (``load_image_archive``) and cached as tensors; then a
    seeded shuffle, so that a ``--train-images`` subset holds every class.
    """
    split_dir = DATA / split
    per_class = math.ceil(images / len(list(split_dir.iterdir())))
    cache = cache_dir / f"cifar10-{split}-{per_class}-per-class.pt"
    if cache.exists():
        saved = load_checkpoint(cache)
        data = ImageSet(saved["pixels"], saved["labels"], saved["class_names"])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            data = load_image_archive(
                cifar_zip(split_dir, per_class, Path(tmp) / f"{split}.zip"), input_size()
            )
        cache_dir.mkdir(parents=True, exist_ok=True)
        # The trainer's atomic save and weights_only load: tensors, strings, nothing unpickled.
        save_checkpoint(
            cache,
            {"pixels": data.pixels[:], "labels": data.labels, "class_names": data.class_names},
        )
    if len(data) < images:
        raise SystemExit(f"{split}: {images} images asked for, {len(data)} there")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(DATA_SEED))
    chosen = data.subset(order[:images])
    return ImageSet(chosen.pixels[:], chosen.labels, chosen.class_names)  # small: a tensor


def input_size() -> tuple[int, int]:
    height, width = teacher_preprocessing()["input_size"]
    return height, width


def load_teacher() -> nn.Module:
    """The ONNX teacher as a job imports it."""
    return load_onnx_model(TEACHER_ONNX, input_size=input_size()).module


def job_config(method: Method, bits: int, epochs: int, seed: int = 0) -> JobConfig:
    """JobConfig defaults but for method, bits, epochs, seed and the teacher's preprocessing."""
    return JobConfig.model_validate(
        {
            "method": method,
            "weight_bits": bits,
            "activation_bits": bits,
            "epochs": epochs,
            "seed": seed,
            "preprocessing": teacher_preprocessing(),
        }
    )


# --- results, resumable ---


class Results:
    """Finished runs in a JSON file, each under its full settings; rewritten atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runs: list[dict[str, Any]] = (
            json.loads(path.read_text())["runs"] if path.exists() else []
        )

    def get(self, settings: dict[str, Any]) -> dict[str, Any] | None:
        return next((run for run in self.runs if run["settings"] == settings), None)

    def put(self, settings: dict[str, Any], result: dict[str, Any]) -> None:
        self.runs = [run for run in self.runs if run["settings"] != settings]
        self.runs.append({"settings": settings, **result})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(f".{self.path.name}.tmp")
        temp.write_text(json.dumps({"runs": self.runs}, indent=1))
        os.replace(temp, self.path)


@dataclass(frozen=True)
class Budget:
    """What a result depends on besides method, bits and mode."""

    epochs: int
    train_images: int
    test_images: int
    seeds: tuple[int, ...] = SEEDS  # job seeds: calibration sample, data order, augmentation

    def settings(self, mode: str, config: JobConfig | None = None) -> dict[str, Any]:
        """A run's key: mode, data, and (trained or calibrated runs) the whole job config."""
        key: dict[str, Any] = {"mode": mode, "test_images": self.test_images, "seed": DATA_SEED}
        if config is not None:
            key |= {"train_images": self.train_images, "config": config.model_dump(mode="json")}
        return key

    def command(self) -> str:
        defaults = {
            "--train-images": 50_000,
            "--test-images": 10_000,
            "--seeds": ",".join(map(str, SEEDS)),
        }
        given = {
            "--train-images": self.train_images,
            "--test-images": self.test_images,
            "--seeds": ",".join(map(str, self.seeds)),
        }
        extra = "".join(
            f" {flag} {value}" for flag, value in given.items() if value != defaults[flag]
        )
        return f"python -m bench.quality --epochs {self.epochs}{extra}"


# --- runs ---


@dataclass
class Bench:
    """What every run shares: the teacher, the data, its logits on the test images, the store."""

    teacher: nn.Module
    train_set: ImageSet
    test_set: ImageSet
    teacher_logits: Tensor
    budget: Budget
    results: Results
    on_result: Callable[[], None]

    def score(self, model: nn.Module) -> dict[str, Any]:
        """Top-1 on the test images, agreement with the teacher and KL, and how long it took."""
        started = time.perf_counter()
        prep = teacher_preprocessing()
        metrics = compare(
            self.teacher_logits,
            predict(model, self.test_set.pixels, prep["mean"], prep["std"]),
            self.test_set.labels,
        )
        return {
            "top1": metrics["student_top1"],
            "agreement": metrics["agreement"],
            "kl": metrics["kl"],
            "eval_seconds": time.perf_counter() - started,
        }

    def calibrated(self, config: JobConfig, name: str) -> tuple[nn.Module, Tensor]:
        """The calibrated student a job with ``config`` trains, and torch's RNG state after it.

        Seeded as ``core.engine.quantize`` seeds; its score is stored once per row.
        """
        started = time.perf_counter()
        torch.manual_seed(config.seed)
        student = calibrated_student(self.teacher, self.train_set.pixels, config)[0]
        rng_state = torch.get_rng_state()
        key = self.budget.settings("calibrated", config)
        if self.results.get(key) is None:
            scored = self.score(student)
            self.record(key, scored | {"wall_seconds": time.perf_counter() - started}, name)
        return student, rng_state

    def row(self, method: Method, bits: int, seed: int) -> None:
        """SQAKD and the baseline from copies of one calibrated student, each unless stored.

        Each run starts from the calibrated student and RNG state as a job's training does, so
        it is what a fresh job would train, without calibrating twice.
        """
        config = job_config(method, bits, self.budget.epochs, seed)
        name = f"{method} W{bits}A{bits} seed {seed}"
        calibrated: tuple[nn.Module, Tensor] | None = None
        for mode in MODES:
            key = self.budget.settings(mode, config)
            if self.results.get(key) is not None:
                print(f"{name} {mode}: stored, skipped", flush=True)
                continue
            calibrated = calibrated or self.calibrated(config, f"{name} calibrated")
            started = time.perf_counter()
            student = copy.deepcopy(calibrated[0])
            torch.set_rng_state(calibrated[1])
            cfg = train_config(config, len(self.train_set))
            labels = None
            if mode == "ce":
                cfg = replace(cfg, distill_weight=0.0, label_weight=1.0)
                labels = self.train_set.labels
            stats = train(
                inference_teacher(self.teacher),  # as a job runs it
                student,
                self.train_set.pixels,
                cfg,
                labels=labels,
                on_step=progress_printer(f"{name} {mode}"),
            )
            scored = self.score(student)
            self.record(
                key,
                scored | train_summary(stats) | {"wall_seconds": time.perf_counter() - started},
                f"{name} {mode}",
            )

    def record(self, key: dict[str, Any], result: dict[str, Any], name: str) -> None:
        stamped = result | {"threads": torch.get_num_threads(), "finished": now()}
        self.results.put(key, stamped)
        described = ", ".join(
            f"{field} {value:.4g}" for field, value in result.items() if isinstance(value, float)
        )
        print(f"{name}: {described}", flush=True)
        self.on_result()


def train_summary(stats: TrainStats) -> dict[str, Any]:
    return {
        "steps": stats.steps,
        "train_seconds": stats.seconds,
        "ms_per_step": 1000 * stats.seconds / stats.steps,
        "images_per_second": stats.images_per_second,
        "final_loss": stats.final_loss,
        "ewgs_deltas": stats.ewgs_deltas,  # EWGS only: what the Hessian estimate chose
    }


def progress_printer(name: str) -> Callable[[TrainProgress], None]:
    """Print about ten progress lines per run: a 90-minute benchmark should show it is alive."""

    def on_step(progress: TrainProgress) -> None:
        every = max(progress.total_steps // 10, 1)
        if progress.step % every == 0 or progress.step == progress.total_steps:
            print(
                f"  {name}: step {progress.step}/{progress.total_steps}, loss "
                f"{progress.loss:.4f}, {progress.images_per_second:.0f} images/s, "
                f"ETA {progress.eta_seconds:.0f} s",
                flush=True,
            )

    return on_step


def now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


# --- the BENCHMARKS.md section ---


def points(value: float) -> str:
    return f"{100 * value:+.2f}"


def section(results: Results, budget: Budget) -> tuple[str, bool]:
    """The body from the stored runs of ``budget``, and whether all of them are there. Each
    row shows means over the seeds whose SQAKD and CE runs both finished."""
    teacher = results.get(budget.settings("teacher"))
    teacher_top1 = teacher["top1"] if teacher else None
    rows, finished, wall = [], 0, teacher["eval_seconds"] if teacher else 0.0
    beats_ce: dict[str, bool] = {}
    near_teacher: dict[str, bool] = {}
    for method, bits in ROWS:
        name = f"{method} W{bits}A{bits}"
        runs = []  # (calibrated, sqakd, ce) per seed
        for seed in budget.seeds:
            config = job_config(method, bits, budget.epochs, seed)
            run = tuple(results.get(budget.settings(m, config)) for m in ("calibrated", *MODES))
            finished += sum(r is not None for r in run[1:])
            wall += sum(r["wall_seconds"] for r in run if r is not None)
            runs.append(run)
        pairs = [run for run in runs if run[1] and run[2]]
        calibrated = [run[0]["top1"] for run in runs if run[0]]
        sqakd = statistics.mean(run[1]["top1"] for run in pairs) if pairs else None
        ce = statistics.mean(run[2]["top1"] for run in pairs) if pairs else None
        if sqakd is not None and ce is not None:
            beats_ce[name] = sqakd >= ce
            if teacher_top1 is not None and bits == 4:
                near_teacher[name] = 100 * (teacher_top1 - sqakd) <= W4_GOAL_POINTS
        rows.append(
            [
                method,
                f"W{bits}A{bits}",
                f"{100 * statistics.mean(calibrated):.2f}" if calibrated else "-",
                *(f"{100 * v:.2f}" if v is not None else "-" for v in (sqakd, ce)),
                points(sqakd - ce) if sqakd is not None and ce is not None else "-",
                " / ".join(points(run[1]["top1"] - run[2]["top1"]) for run in pairs) or "-",
                points(teacher_top1 - sqakd) if sqakd is not None and teacher_top1 else "-",
                " / ".join(
                    f"{statistics.mean(run[i]['train_seconds'] for run in pairs) / 60:.1f}"
                    for i in (1, 2)
                )
                if pairs
                else "-",
            ]
        )
    total = len(ROWS) * len(MODES) * len(budget.seeds)
    complete = finished == total and teacher is not None
    steps = train_config(job_config(*ROWS[0], budget.epochs), budget.train_images).steps
    defaults = JobConfig()
    why = f"Why this budget: {BUDGET_NOTE}. " if budget == Budget(EPOCHS, 50_000, 10_000) else ""
    seeds = ", ".join(map(str, budget.seeds))
    head = (
        f"**Partial: {finished} of {total} runs finished; rerun the command to resume.**\n\n"
        if not complete
        else ""
    )
    teacher_text = f"{100 * teacher_top1:.2f}" if teacher_top1 is not None else "-"
    body = (
        f"{head}Students of the CIFAR-10 ResNet-20 teacher in `../shared/fixtures` (top-1 "
        f"{teacher_text} on these {budget.test_images:,} test images), each pair from the same "
        "calibrated student: SQAKD as a job trains it (KL to the teacher at T="
        f"{defaults.temperature:g}, no labels) and the QAT baseline (cross-entropy on the labels "
        "only), everything else identical, for each job seed "
        f"({seeds}: the calibration sample, data order and augmentation). Top-1 in percent on "
        "the test images, the mean over the seeds; differences in points, also per seed; train "
        "minutes SQAKD / CE, per run.\n\n"
        + table(
            [
                "method",
                "W/A bits",
                "calibrated top-1",
                "SQAKD top-1",
                "CE top-1",
                "SQAKD - CE",
                "per seed",
                "teacher - SQAKD",
                "train min",
            ],
            rows,
        )
        + "\n\n"
        + f"Goals: SQAKD at least as good as the label-based baseline in every row: "
        f"{verdict(beats_ce, len(ROWS))}; W4A4 within {W4_GOAL_POINTS} points of the teacher: "
        f"{verdict(near_teacher, sum(bits == 4 for _, bits in ROWS))}.\n\n"
        f"Budget: {budget.epochs} epoch{'s' if budget.epochs > 1 else ''} of "
        f"{budget.train_images:,} training images (labels read by the baseline only), batch "
        f"{defaults.batch_size}, {steps:,} steps per run; every other setting the JobConfig "
        f"default (lr {defaults.lr:g} and quantizer lr {defaults.quantizer_lr:g} in units of the "
        f"weight step, cosine schedule, crop and flip, per-channel weights, first and last layer "
        f"at {defaults.first_last_bits} bits, EWGS delta {defaults.ewgs_delta}, "
        f"{STUDENT[defaults.export.tensorrt]}). "
        f"{why}"
        f"Wall time: {wall / 60:.1f} minutes (teacher evaluation, "
        "calibration and its evaluation per row, training and evaluation per run; decoding and "
        "loading excluded)."
    )
    return body, complete


def verdict(holds: dict[str, bool], rows: int) -> str:
    """Whether a goal holds in the ``rows`` rows it covers, from whatever is finished."""
    failing = [name for name, ok in holds.items() if not ok]
    if failing:
        return f"**fails** in {', '.join(failing)}"
    if not holds:
        return "no results yet"
    return f"holds in {len(holds)} of {rows} rows" + (" so far" if len(holds) < rows else "")


# --- command line ---


def parse_rows(text: str) -> list[tuple[Method, int]]:
    """``ewgs:2,lsq:4`` -> [("ewgs", 2), ("lsq", 4)], each one of ROWS."""
    rows = []
    for item in text.split(","):
        method, _, bits = item.strip().partition(":")
        row = (method, int(bits)) if bits.isdigit() and method in get_args(Method) else None
        if row not in ROWS:
            choices = ",".join(f"{m}:{b}" for m, b in ROWS)
            raise argparse.ArgumentTypeError(f"unknown row {item!r}; rows: {choices}")
        rows.append(row)
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.quality", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"default {EPOCHS}")
    parser.add_argument("--train-images", type=int, default=50_000)
    parser.add_argument("--test-images", type=int, default=10_000)
    parser.add_argument("--rows", type=parse_rows, default=ROWS, help="e.g. ewgs:2,lsq:4")
    parser.add_argument(
        "--seeds",
        type=lambda text: tuple(int(seed) for seed in text.split(",")),
        default=SEEDS,
        help=f"job seeds, e.g. 0,1 (default {','.join(map(str, SEEDS))})",
    )
    parser.add_argument("--results", type=Path, default=CACHE_DIR / "quality.json")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="decoded images")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads; 1 on cores shared with other work"
    )
    parser.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    budget = Budget(args.epochs, args.train_images, args.test_images, args.seeds)
    results = Results(args.results)

    def write() -> None:
        if not args.no_write:
            body, _ = section(results, budget)
            write_section(
                SECTION,
                body,
                command=budget.command(),
                machine_text=f"{machine()}, torch threads: {args.threads}",
            )

    started = time.perf_counter()
    train_set = cifar_split("train", args.train_images, args.cache_dir)
    test_set = cifar_split("test", args.test_images, args.cache_dir)
    teacher = load_teacher()
    print(f"data and teacher: {time.perf_counter() - started:.1f} s", flush=True)
    started = time.perf_counter()
    prep = teacher_preprocessing()
    teacher_logits = predict(teacher, test_set.pixels, prep["mean"], prep["std"])
    teacher_key = budget.settings("teacher")
    if results.get(teacher_key) is None:
        top1 = (teacher_logits.argmax(1) == test_set.labels).float().mean().item()
        results.put(teacher_key, {"top1": top1, "eval_seconds": time.perf_counter() - started})
    print(f"teacher top-1 {results.get(teacher_key)['top1']:.4f}", flush=True)  # type: ignore[index]
    bench = Bench(teacher, train_set, test_set, teacher_logits, budget, results, write)
    for seed in budget.seeds:
        for method, bits in args.rows:
            bench.row(method, bits, seed)
    write()


if __name__ == "__main__":
    main()
