"""Intake at the archive caps: what validating a dataset of 1,000,000 images costs.

An upload's validation (``core.intake``) reads an archive's entry list, never its images, in a
child process under ``VALIDATION_MEMORY_BYTES``, ``VALIDATION_CPU_SECONDS`` and
``VALIDATION_WALL_SECONDS``. This measures ``core.inputs.archive.inspect_archive`` (what the
validation runs per archive) on a generated zip of ``--images`` tiny PNGs in class folders, in a
fresh process (its peak RSS is its own), against those limits' defaults.

    python -m bench.intake_scale        # about 2 minutes; writes BENCHMARKS.md (intake-scale)
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from PIL import Image

from bench.report import publish, table
from core.settings import Settings

SECTION = "intake-scale"


def build_zip(path: Path, images: int) -> Path:
    """``images`` 8x8 PNGs in 10 class folders, stored (the entry list is what is measured)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, "PNG")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for i in range(images):
            archive.writestr(f"class{i % 10}/img{i:07d}.png", buffer.getvalue())
    return path


def inspect_in_child(path: Path) -> dict[str, float]:
    """``inspect_archive`` of ``path`` in this module's child half: seconds and peak RSS."""
    command = [sys.executable, "-m", "bench.intake_scale", "--inspect", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def inspect(path: Path) -> dict[str, float]:
    from core.inputs.archive import inspect_archive

    wall, cpu = time.perf_counter(), time.process_time()
    summary = inspect_archive(path, class_names=None)
    return {
        "images": summary.image_count,
        "wall": time.perf_counter() - wall,
        "cpu": time.process_time() - cpu,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--no-write", action="store_true", help="print, leave BENCHMARKS.md")
    parser.add_argument("--inspect", type=Path, help=argparse.SUPPRESS)  # the child's half
    args = parser.parse_args()
    if args.inspect:
        print(json.dumps(inspect(args.inspect)))
        return
    with tempfile.TemporaryDirectory() as folder:
        path = build_zip(Path(folder) / "images.zip", args.images)
        size = path.stat().st_size
        figures = inspect_in_child(path)
    limits = Settings()
    body = (
        f"`core.inputs.archive.inspect_archive` (an upload's validation reads each archive's "
        f"entry list with it, never the images) on a zip of {figures['images']:,.0f} 8x8 PNGs "
        f"in 10 class folders ({size / 1e6:,.0f} MB), in a fresh process, against the "
        "validation child's default limits:\n\n"
        + table(
            ["", "measured", "limit"],
            [
                ["CPU seconds", f"{figures['cpu']:.1f}", str(limits.validation_cpu_seconds)],
                ["wall seconds", f"{figures['wall']:.1f}", f"{limits.validation_wall_seconds:g}"],
                [
                    "peak RSS (MiB)",
                    f"{figures['peak_rss'] / 2**20:,.0f}",
                    f"{limits.validation_memory_bytes / 2**20:,.0f} (RLIMIT_DATA)",
                ],
            ],
        )
    )
    publish(SECTION, body, module="bench.intake_scale", write=not args.no_write)


if __name__ == "__main__":
    main()
