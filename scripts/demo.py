"""The service end to end on this machine, in under a minute: ``python -m scripts.demo``.

Starts the service on its embedded defaults (``scripts.serve``), makes a small data set and a
full-precision teacher without downloading anything (scikit-learn's bundled 8x8 digits, upscaled
to 16x16 RGB PNGs; a small CNN trained on them in seconds), then does what a user does, with
the SDK (``sqakd_client``, in ``client/``): submits a 4-bit SQAKD job, follows its progress,
downloads every artifact with its sha256 checked, and runs the quantized ``model_qdq.onnx`` with
ONNX Runtime on the held-out digits. Everything lands in ``demo-output/``; the service stops
when the demo ends, however it ends.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sqakd_client import ApiError, Client, Job
from torch import nn

from core.inputs.images import normalize
from core.settings import Settings
from scripts.serve import REPO_ROOT, _die_with_parent

DEMO_DIR = REPO_ROOT / "demo-output"
INPUT_SIZE = (16, 16)  # (H, W)
HELD_OUT_FRACTION = 0.2
SEED = 0
TEACHER_EPOCHS = 12
READY_TIMEOUT_S = 90.0
JOB_TIMEOUT_S = 600.0


class DemoError(Exception):
    """Something the demo cannot go on from; its message is printed and the demo exits 1."""


# Data -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Digits:
    images: np.ndarray  # uint8 [N, H, W, 3], RGB
    labels: np.ndarray  # int64 [N], the digit shown

    def __len__(self) -> int:
        return len(self.labels)

    def as_input(self, mean: list[float], std: list[float]) -> torch.Tensor:
        """float32 [N, 3, H, W], preprocessed exactly as the service does (core.inputs.images)."""
        return normalize(torch.from_numpy(self.images).permute(0, 3, 1, 2), mean, std)


def load_digits_rgb(size: tuple[int, int] = INPUT_SIZE) -> Digits:
    """scikit-learn's 1,797 bundled digits (8x8, 17 gray levels) as uint8 RGB at ``size``."""
    bunch = load_digits()
    gray = np.round(bunch.images * (255 / 16)).astype(np.uint8)
    resized = np.stack(
        [np.asarray(Image.fromarray(image).resize(size[::-1], Image.Resampling.BILINEAR))
         for image in gray]
    )  # fmt: skip
    return Digits(np.repeat(resized[..., None], 3, axis=-1), bunch.target.astype(np.int64))


def split_digits(digits: Digits, held_out_fraction: float, seed: int) -> tuple[Digits, Digits]:
    """(train, held_out), stratified so that every digit appears in both."""
    train_idx, held_out_idx = train_test_split(
        np.arange(len(digits)),
        test_size=held_out_fraction,
        random_state=seed,
        stratify=digits.labels,
    )
    return (
        Digits(digits.images[train_idx], digits.labels[train_idx]),
        Digits(digits.images[held_out_idx], digits.labels[held_out_idx]),
    )


def write_image_zip(path: Path, digits: Digits) -> Path:
    """PNGs in one folder per class, ``0/`` ... ``9/``: the layout the service reads labels from."""
    partial = path.with_name(path.name + ".partial")  # an interrupted run leaves no short zip
    with zipfile.ZipFile(partial, "w") as archive:
        for index, (image, label) in enumerate(zip(digits.images, digits.labels, strict=True)):
            png = io.BytesIO()
            Image.fromarray(image, "RGB").save(png, format="PNG")
            archive.writestr(f"{label}/{index:04d}.png", png.getvalue())
    return partial.replace(path)


def channel_stats(digits: Digits) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the pixels scaled to [0, 1]: the job's ``preprocessing``."""
    pixels = digits.images.reshape(-1, 3).astype(np.float64) / 255
    return np.round(pixels.mean(0), 4).tolist(), np.round(pixels.std(0), 4).tolist()


# Teacher ----------------------------------------------------------------------------------------


class DigitsCNN(nn.Module):
    """Three Conv-BatchNorm-ReLU blocks, global average pooling and a linear classifier."""

    def __init__(self, classes: int = 10, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels = 3
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            blocks += [
                nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def train_teacher(
    train: Digits, mean: list[float], std: list[float], epochs: int = TEACHER_EPOCHS
) -> DigitsCNN:
    """Plain supervised training (Adam, one-cycle schedule, cross-entropy): seconds on a CPU."""
    threads = torch.get_num_threads()
    # One thread: fastest for a network this small, and it leaves a core to the service, which
    # starts meanwhile (two threads on two busy cores were 20x slower here).
    torch.set_num_threads(1)
    try:
        return _fit(train, mean, std, epochs)
    finally:
        torch.set_num_threads(threads)


def _fit(train: Digits, mean: list[float], std: list[float], epochs: int) -> DigitsCNN:
    torch.manual_seed(SEED)
    model = DigitsCNN()
    inputs, labels = train.as_input(mean, std), torch.from_numpy(train.labels)
    batch_size = 64
    steps_per_epoch = -(-len(train) // batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=1e-2, total_steps=epochs * steps_per_epoch
    )
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(train)).split(batch_size):
            loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.inference_mode()
def top1(model: nn.Module, digits: Digits, mean: list[float], std: list[float]) -> float:
    predictions = model.eval()(digits.as_input(mean, std)).argmax(1)
    return (predictions == torch.from_numpy(digits.labels)).float().mean().item()


def export_onnx(model: nn.Module, path: Path) -> Path:
    """The legacy exporter, input ``input`` [batch, 3, H, W]: the service needs a dynamic batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy exporter": chosen here
        torch.onnx.export(
            model.eval(),
            (torch.zeros(2, 3, *INPUT_SIZE),),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


@dataclass(frozen=True)
class DemoInputs:
    """What a user brings: an FP model, training images (SQAKD ignores their class folders),
    and labeled evaluation images."""

    model: Path
    data: Path
    eval_data: Path
    held_out: Digits
    mean: list[float]
    std: list[float]
    teacher_top1: float


def make_inputs(directory: Path) -> DemoInputs:
    """Digits split into train/held-out zips, and a teacher trained on train, as ONNX."""
    directory.mkdir(parents=True, exist_ok=True)
    train, held_out = split_digits(load_digits_rgb(), HELD_OUT_FRACTION, SEED)
    mean, std = channel_stats(train)
    started = time.monotonic()
    teacher = train_teacher(train, mean, std)
    train_seconds = time.monotonic() - started
    inputs = DemoInputs(
        model=export_onnx(teacher, directory / "teacher.onnx"),
        data=write_image_zip(directory / "train.zip", train),
        eval_data=write_image_zip(directory / "eval.zip", held_out),
        held_out=held_out,
        mean=mean,
        std=std,
        teacher_top1=top1(teacher, held_out, mean, std),
    )
    parameters = sum(p.numel() for p in teacher.parameters())
    print(
        f"data:    {len(train)} training and {len(held_out)} held-out digits, "
        f"{INPUT_SIZE[0]}x{INPUT_SIZE[1]} RGB PNGs in class folders"
    )
    print(
        f"teacher: {type(teacher).__name__}, {parameters:,} parameters, trained in "
        f"{train_seconds:.1f} s, held-out top-1 {inputs.teacher_top1:.1%}"
    )
    return inputs


def job_config(inputs: DemoInputs) -> dict[str, Any]:
    """A short 4-bit LSQ job (the fields and their defaults: core/config.py)."""
    return {
        "weight_bits": 4,
        "activation_bits": 4,
        "method": "lsq",
        "epochs": 3,
        "batch_size": 64,
        "preprocessing": {"input_size": list(INPUT_SIZE), "mean": inputs.mean, "std": inputs.std},
    }


# The service ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def embedded_env() -> dict[str, str]:
    """This environment less every service setting, so that the embedded defaults apply."""
    names = set()
    for name, field in Settings.model_fields.items():
        aliases = getattr(field.validation_alias, "choices", [])
        names |= {name, *(a for a in aliases if isinstance(a, str))}
    setting_names = {name.lower() for name in names}
    return {key: value for key, value in os.environ.items() if key.lower() not in setting_names}


@dataclass
class Service:
    url: str
    launcher: subprocess.Popen[bytes]
    log: Path

    def check_alive(self) -> None:
        if (code := self.launcher.poll()) is not None:
            raise DemoError(f"the service exited with code {code}; see {self.log}")

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the service was not ready after {timeout_s:.0f} s; see {self.log}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM: the launcher stops API, worker and broker in order; SIGKILL if it hangs."""
        if self.launcher.poll() is None:
            self.launcher.send_signal(signal.SIGTERM)
        try:
            self.launcher.wait(30)
        except subprocess.TimeoutExpired:
            self.launcher.kill()
            self.launcher.wait()


@contextmanager
def running_service(data_dir: Path, log: Path) -> Iterator[Service]:
    """``python -m scripts.serve`` on a free port and a fresh data directory, stopped on exit.

    Not ready on entry (call ``wait_ready``), so that the caller can work while it starts.
    """
    shutil.rmtree(data_dir, ignore_errors=True)
    port = free_port()
    with log.open("wb") as output:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "scripts.serve",
             "--port", str(port), "--data-dir", str(data_dir)],
            cwd=REPO_ROOT,
            env=embedded_env(),
            stdout=output,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C reaches only the demo, which then stops the launcher,
            # which stops its processes in order. And it stops if the demo dies.
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )  # fmt: skip
    service = Service(f"http://127.0.0.1:{port}", launcher, log)
    try:
        yield service
    finally:
        service.stop()
        print(f"service stopped (its log: {relative(log)})")


# Results ----------------------------------------------------------------------------------------


def onnx_top1(model: Path, digits: Digits, mean: list[float], std: list[float]) -> float:
    """Top-1 of an ONNX classifier under ONNX Runtime (CPU)."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    (logits,) = session.run(None, {model_input.name: digits.as_input(mean, std).numpy()})
    return float((logits.argmax(1) == digits.labels).mean())


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def kib(size: int) -> str:
    return f"{size / 1024:,.1f} KiB"


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")


def print_metrics(metrics: dict[str, Any], qdq_top1: float) -> None:
    """The job's metrics (core/pipeline.py) next to our own run of model_qdq.onnx."""
    parity = metrics.get("onnx_parity") or {}
    fp32, packed = metrics["fp32_bytes"], metrics["packed_bytes"]
    print_table([
        ("teacher/student agreement", percent(metrics["agreement"])),
        ("KL(teacher || student)", f"{metrics['kl']:.4f}"),
        ("teacher top-1", percent(metrics["teacher_top1"])),
        ("student top-1 (fake-quant, PyTorch)", percent(metrics["student_top1"])),
        ("student top-1 (model_qdq.onnx, here)", percent(qdq_top1)),
        ("size fp32 -> packed", f"{kib(fp32)} -> {kib(packed)} ({fp32 / packed:.1f}x smaller)"),
        ("training speed", f"{metrics['train']['images_per_second']:,.0f} images/s"),
        ("ONNX parity (argmax agreement)", percent(parity.get("top1_agreement"))),
        ("ONNX parity (max |logit diff|)", f"{parity.get('max_abs_diff', float('nan')):.2g}"),
    ])  # fmt: skip


def relative(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def quantize(url: str, inputs: DemoInputs, config: dict[str, Any], output: Path) -> Job:
    """What a user of the SDK writes: upload, create, wait with a progress bar, download."""
    with Client(url=url) as client:
        job = client.jobs.create(
            model=inputs.model, data=inputs.data, eval_data=inputs.eval_data, config=config
        )
        print(f"job:     {job.id} {job.status}; config {json.dumps(config)}")
        job.wait(progress=True, timeout=JOB_TIMEOUT_S)
        if job.status != "succeeded":
            error = job.error or {"code": job.status, "message": "no error recorded"}
            raise DemoError(f"job {job.status}: {error['code']}: {error['message']}")
        artifacts = job.download(output / job.id)
        print(f"job:     succeeded; {len(artifacts)} artifacts downloaded, sha256 checked")
        return job


def run_demo(output: Path = DEMO_DIR) -> int:
    """The whole demo; returns the exit code."""
    output.mkdir(parents=True, exist_ok=True)
    with running_service(output / "var", output / "service.log") as service:
        print(f"service: starting on {service.url} (embedded: SQLite, bundled redis, 1 worker)")
        inputs = make_inputs(output / "inputs")  # while the service starts
        service.wait_ready()
        print(f"service: ready ({service.url}/readyz)")
        try:
            job = quantize(service.url, inputs, job_config(inputs), output)
        except ApiError as exc:
            service.check_alive()  # a dead service says so, with its log
            raise DemoError(str(exc)) from exc
    results = output / job.id
    qdq_top1 = onnx_top1(results / "model_qdq.onnx", inputs.held_out, inputs.mean, inputs.std)
    print(f"\nmetrics ({job.metrics['eval_images']} held-out digits, W4A4 LSQ):")
    print_metrics(job.metrics, qdq_top1)
    print(f"\nfiles in {relative(results)}/:")
    files = sorted(results.iterdir())
    print_table([(path.name, f"{path.stat().st_size:,} bytes") for path in files])
    print(f"inputs (teacher.onnx, train.zip, eval.zip) in {relative(output / 'inputs')}/")
    return 0


def main() -> int:
    started = time.monotonic()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as on Ctrl-C
    try:
        code = run_demo()
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    print(f"demo {'done' if code == 0 else 'failed'} in {time.monotonic() - started:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
