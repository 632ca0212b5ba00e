"""The rank entry of the distributed-training tests: a tiny teacher and student, trained.

Every rank builds the same teacher, images and calibrated student from the argument (as a job's
ranks do from its inputs), then trains with its ``Group``; rank 0 writes the per-step losses and
the final student to ``argument["out"]``. Run as a module, it is a whole run's rank 0 in a
process of its own, one that a test can kill.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from core.sqakd.distributed import Rendezvous, launch
from core.sqakd.trainer import Checkpointer, TrainProgress, train
from tests.core.sqakd.test_trainer import config, make_student, make_teacher, uint8_images

ENTRY = f"{__name__}:train_tiny"


def train_tiny(argument: dict[str, Any], rendezvous: Rendezvous) -> None:
    """``argument``: method, steps, batch, images, checkpoint (path), every; optionally resume
    (bool), out (rank 0's results, a path stem), pause_at (a step after which rank 0 writes
    ``pause_marker`` and waits to be killed)."""
    torch.manual_seed(0)
    teacher = make_teacher()
    pixels = uint8_images(argument["images"])
    student = make_student(teacher, argument["method"], pixels, bits=argument.get("bits", 4))
    group = rendezvous.join()
    checkpoint = Path(argument["checkpoint"])
    losses: list[float] = []

    def on_step(progress: TrainProgress) -> None:
        losses.append(progress.loss)
        if progress.step == argument.get("pause_at"):
            children = [child.pid for child in rendezvous.children]
            Path(argument["pause_marker"]).write_text(json.dumps(children))
            time.sleep(600)

    train(
        teacher,
        student,
        pixels,
        config(steps=argument["steps"], batch_size=argument["batch"]),
        on_step=on_step if group.main else None,
        checkpointer=Checkpointer(checkpoint, argument["every"]) if group.main else None,
        resume_from=checkpoint if argument.get("resume") else None,
        group=group,
    )
    if group.main:
        out = Path(argument["out"])
        out.with_suffix(".json").write_text(json.dumps(losses))
        save_file(student.state_dict(), out.with_suffix(".safetensors"))


def run(size: int, argument: dict[str, Any]) -> None:
    """A whole run of ``size`` processes, this one rank 0."""
    with launch(size, ENTRY, argument) as rendezvous:
        train_tiny(argument, rendezvous)


if __name__ == "__main__":
    from tests.core.sqakd import distributed_targets  # ENTRY names that module, not __main__

    distributed_targets.run(int(sys.argv[1]), json.loads(sys.argv[2]))
