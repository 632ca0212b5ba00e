"""Write benchmark tables into BENCHMARKS.md, each in its own marked section.

A section lies between ``<!-- <name>:start -->`` and ``<!-- <name>:end -->``; rerunning a
benchmark replaces its section and leaves the others alone.

    python -m bench.report cuda cuda_check.json   # render bench/cuda_check.py's JSON
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import sys
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


# The instruction sets that decide how fast int8 and bf16 run on an x86 CPU: the same 2-core
# machine kind has come with AVX-512 VNNI/BF16 CPUs and with AVX2-only ones.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def _cpuinfo_field(name: str) -> str:
    """The first ``name : value`` of /proc/cpuinfo ("" where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((ln.partition(":")[2].strip() for ln in lines if ln.startswith(name)), "")


def cpu_flags() -> set[str]:
    return set(_cpuinfo_field("flags").split())


def cpu_kind() -> str:
    """Vendor and int8 instruction set, "intel-amx_int8", "amd-avx2": what int8 speed and
    float summation order (oneDNN picks its kernels by them) depend on; benches whose figures
    do write one BENCHMARKS.md section per kind."""
    vendor_id = _cpuinfo_field("vendor_id") or "unknown"
    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(vendor_id, vendor_id.lower())
    flags = cpu_flags()
    kernels = ("amx_int8", "avx512_vnni", "avx_vnni")  # the int8 kernel family oneDNN picks
    return f"{vendor}-{next((f for f in kernels if f in flags), 'avx2')}"


def cpu() -> str:
    """The CPU's model name and its speed-relevant instruction sets: "AMD EPYC (avx2)"."""
    name = _cpuinfo_field("model name") or platform.processor() or "unknown CPU"
    flags = cpu_flags()
    return f"{name} ({', '.join(f for f in SPEED_FLAGS if f in flags) or 'no AVX2'})"


def machine() -> str:
    import os

    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu()}), "
        f"{platform.python_version()}, no GPU"
    )


def write_section(name: str, body: str, *, command: str, machine_text: str) -> None:
    """Replace (or append) section ``name`` with ``body``, stamped with command, machine, date."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    stamped = (
        f"{start}\n_Command: `{command}`; machine: {machine_text}; "
        f"date: {dt.date.today().isoformat()}._\n\n{body.strip()}\n{end}"
    )
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + stamped + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + stamped + "\n"
    BENCHMARKS.write_text(text)


def publish(name: str, body: str, *, module: str, write: bool = True) -> None:
    """Print ``body``; with ``write``, also into section ``name``, stamped with this run's
    command line (``python -m module`` and its arguments) and this machine."""
    print(body)
    if write:
        command = " ".join(["python -m", module, *sys.argv[1:]])
        write_section(name, body, command=command, machine_text=machine())


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def cuda_section(report: dict[str, Any]) -> str:
    speed = table(
        ["model", "precision", "torch.compile", "images/s", "peak GPU memory (MiB)", "warm-up s"],
        [
            [r["model"], r["precision"], "yes" if r["compiled"] else "no"]
            + (
                [r["images_per_second"], r["peak_memory_mib"], r["warmup_seconds"]]
                if "error" not in r
                else [f"failed: {r['error']}", "-", "-"]
            )
            for r in report["training"]
        ],
    )
    quantizers = table(
        ["method", "tensor", "max output difference", "max gradient difference"],
        [
            [q["method"], q["tensor"], f"{q['max_output_diff']:.3g}", f"{q['max_grad_diff']:.3g}"]
            for q in report["quantizers"]
        ],
    )
    job = report["job"]
    parity = job["onnx_parity"]
    trt = report["tensorrt"]
    found = {k: v for k, v in trt.items() if v}
    return (
        f"On {report['device']}, torch {report['torch']}.\n\n"
        f"Quantizers on CUDA (tensor operands) against the CPU (float operands), 4 bits, "
        f"forward and every gradient on the same inputs:\n\n{quantizers}\n\n"
        f"SQAKD training steps, W4A4, batch {report['training'][0].get('batch', 256)} at 32x32, "
        f"channels_last, teacher from `inference_teacher` under inference_mode, random "
        f"weights; EWGS's delta fixed (the Hessian estimate is timed on the CPU in "
        f"*speed-vs-paper*); warm-up: 3 steps, compilation included:\n\n{speed}\n\n"
        f"A whole job through `core.pipeline.run_quantization` on CUDA (2,048 generated "
        f"images, 2 epochs, batch 128): {job['seconds']} s, stages {', '.join(job['stages'])}; "
        f"training {job['train_images_per_second']} images/s; artifacts "
        f"{', '.join(job['artifacts'])}; ONNX Runtime vs PyTorch top-1 agreement "
        f"{parity['top1_agreement']:.3f}, max logit difference {parity['max_abs_diff']:.3g}.\n\n"
        + _fixture_jobs_text(report.get("fixture_jobs", []))
        + (f"{report['note']}\n\n" if report.get("note") else "")
        + "TensorRT: "
        + (
            ", ".join(f"{k} {v}" for k, v in found.items())
            if found
            else "none on that machine (no Python API, no `trtexec`, no `libnvinfer`), and it "
            "cannot be installed there: it reaches no package index, and the PyPI package "
            "`tensorrt-cu13-libs` is a source stub that downloads the libraries from "
            "pypi.nvidia.com at install time. No engine was built."
        )
        + "\n"
    )


def _fixture_jobs_text(jobs: list[dict[str, Any]]) -> str:
    if not jobs:
        return ""
    rows = [
        [
            f"{j['job']['method']} W{j['job']['weight_bits']}A{j['job']['activation_bits']}",
            j["seconds"],
            j["train_images_per_second"],
            f"{j['calibrated_agreement']:.3f} -> {j['agreement']:.3f}",
            f"{j['student_top1']:.3f} (teacher {j['teacher_top1']:.3f})",
            f"{j['onnx_parity']['top1_agreement']:.4f} of {j['onnx_parity']['images']}",
            f"{j['onnx_parity']['max_abs_diff']:.3g}",
            j["tensorrt_rule_violations"],
        ]
        for j in jobs
    ]
    header = [
        "job",
        "seconds",
        "train images/s",
        "agreement calibrated -> trained",
        "student top-1",
        "ONNX Runtime vs PyTorch top-1",
        "max logit difference",
        "TensorRT rule violations",
    ]
    first = jobs[0]
    return (
        f"Jobs on the CIFAR-10 ResNet-20 teacher of `../shared/fixtures`, trained on CUDA "
        f"({first['train_images']:,} training images, {first['job']['epochs']} epochs, batch "
        f"{first['job']['batch_size']}; {first['eval_images']:,} test images as eval data; "
        f"`export.speed` off): issue 4's per-job parity for students trained on a GPU worker."
        f"\n\n{table(header, rows)}\n\n"
    )


if __name__ == "__main__":
    kind, path = sys.argv[1], Path(sys.argv[2])
    if kind != "cuda":
        raise SystemExit(f"unknown report kind {kind!r}")
    report = json.loads(path.read_text())
    write_section(
        "cuda-check",
        cuda_section(report),
        command=report.get(
            "command", "PYTHONPATH=. python3 bench/cuda_check.py --out cuda_check.json"
        )
        + " && python -m bench.report cuda cuda_check.json",
        machine_text=f"{report['device']} (lent device machine), torch {report['torch']}",
    )
