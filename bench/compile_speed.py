"""``compile_model`` on this machine's CPU: the SQAKD step eager against torch.compile.

EWGS W4A4 on the paper's BN ResNet-20 (random weights; speed does not depend on them), batch
256, random uint8 images, the teacher from ``inference_teacher``, EWGS's delta fixed. Each
variant takes 3 warm-up steps (the compiled one compiles there), then ``--steps`` timed ones.

    python -m bench.compile_speed    # about 3 minutes; writes BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from bench.report import machine, table, write_section
from bench.speed_vs_paper import BATCH, THREADS, ResNet20
from core.inputs.images import normalize
from core.sqakd.calibrate import calibrate
from core.sqakd.modules import QuantSpec, prepare
from core.sqakd.teacher import inference_teacher
from core.sqakd.trainer import TrainConfig, train

WARMUP = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    teacher = ResNet20().eval()
    pixels = torch.randint(0, 256, (BATCH * 4, 3, 32, 32), dtype=torch.uint8)
    spec = QuantSpec(method="ewgs", weight_bits=4, activation_bits=4)
    rows = []
    for compiled in (False, True):
        student = prepare(teacher, spec).to(memory_format=torch.channels_last)
        calibrate(student, teacher, normalize(pixels[:BATCH], (0.5,) * 3, (0.25,) * 3))
        config = TrainConfig(
            steps=args.steps, batch_size=BATCH, compile_model=compiled, ewgs_delta=0.2
        )
        frozen = inference_teacher(teacher)
        started = time.perf_counter()
        train(frozen, student, pixels, replace(config, steps=WARMUP))
        warmup = time.perf_counter() - started
        stats = train(frozen, student, pixels, config)
        rows.append([compiled, stats.images_per_second, warmup])
        print(rows[-1], flush=True)
    eager = rows[0][1]
    body = (
        f"The SQAKD step with and without `compile_model` (torch.compile of the student, torch "
        f"{torch.__version__}): EWGS W4A4, BN ResNet-20, batch {BATCH}, {THREADS} threads, "
        f"random weights and uint8 images, EWGS delta fixed; {WARMUP} warm-up steps (the "
        f"compilation among them), then {args.steps} timed steps.\n\n"
        + table(
            ["student", "images/s", "vs eager", "warm-up s"],
            [
                ["compiled" if c else "eager", f"{ips:.1f}", f"{ips / eager:.2f}x", f"{w:.1f}"]
                for c, ips, w in rows
            ],
        )
    )
    write_section(
        "compile-speed", body, command="python -m bench.compile_speed", machine_text=machine()
    )


if __name__ == "__main__":
    main()
