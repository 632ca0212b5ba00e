"""Training on 2 gloo processes against 1 process with the same global batch, and resuming a
2-process run whose rank 0 was killed.

Tolerance: every step's loss within ``LOSS_RTOL`` = 1e-4 (relative), every tensor of the final
student within ``STATE_RTOL`` = 1e-3 of its largest magnitude. The math is the same; the float
sums are not: each process reduces its shard of the batch (the loss mean, the weight gradients'
sums over images), then DDP sums the processes' results, so the two runs differ in the last
bits from the first step on (measured over 8 steps, 2-bit students of the tiny CNN: losses
within 2.4e-6 for LSQ and PACT, 4.6e-7 for EWGS; students within 2e-5). Mistakes are far
larger: EWGS's weight gradients scaled per process before DDP's averaging were 9e-2 off by
step 8. The batch is odd (shards of 7 and 8 images), so each shard's loss weight matters.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from core.sqakd.distributed import Group, Rendezvous, world_size
from core.sqakd.trainer import load_checkpoint
from tests.core.sqakd import distributed_targets

LOSS_RTOL, STATE_RTOL = 1e-4, 1e-3
# 45 images in batches of 15: 3 steps an epoch; EWGS re-estimates its deltas each epoch.
RUN = {"method": "ewgs", "bits": 2, "images": 45, "batch": 15, "steps": 6, "every": 2}
KILLED_AT = 4  # rank 0 dies after this step, once its checkpoint is written


@pytest.mark.parametrize("batch", [3, 7, 15, 256])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_shards_split_each_batch_in_order_and_weights_make_the_global_mean(
    size: int, batch: int
) -> None:
    groups = [Group(rank, size) for rank in range(size)]
    rows = [group.shard(batch) for group in groups]
    assert [i for part in rows for i in range(batch)[part]] == list(range(batch))
    sizes = [len(range(batch)[part]) for part in rows]
    assert max(sizes) - min(sizes) <= 1
    # The ranks' mean of (shard mean x weight) is the batch mean, whatever the shard sizes.
    values = torch.arange(batch, dtype=torch.float64) ** 2
    means = [
        values[part].mean() * group.loss_weight(batch)
        for group, part in zip(groups, rows, strict=True)
    ]
    assert sum(means) / size == pytest.approx(values.mean().item())


def test_a_batch_smaller_than_the_group_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot feed 3 processes"):
        Group(0, 3).shard(2)


@pytest.mark.parametrize(
    ("requested", "worker", "batch", "expected"),
    [(None, None, 64, 1), (2, None, 64, 1), (None, 4, 64, 4), (2, 4, 64, 2), (None, 4, 3, 3)],
)
def test_world_size_on_a_cpu_worker(
    monkeypatch: pytest.MonkeyPatch,
    requested: int | None,
    worker: int | None,
    batch: int,
    expected: int,
) -> None:
    """One process unless the worker allows more; the job asks for at most that."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert world_size(requested, worker, batch) == expected


@pytest.mark.parametrize(
    ("requested", "worker", "expected"),
    [(None, None, 8), (2, None, 2), (None, 4, 4), (None, 16, 8)],
)
def test_world_size_on_a_gpu_worker(
    monkeypatch: pytest.MonkeyPatch, requested: int | None, worker: int | None, expected: int
) -> None:
    """Every GPU by default, never more processes than GPUs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert world_size(requested, worker, 256) == expected


@dataclass
class Result:
    losses: list[float]
    student: dict[str, Tensor]


def run(tmp: Path, name: str, processes: int, **extra: Any) -> Result:
    """A run of ``RUN`` on ``processes`` processes, this one rank 0; its losses and student."""
    argument = RUN | {"checkpoint": str(tmp / f"{name}.pt"), "out": str(tmp / name)} | extra
    if processes == 1:
        distributed_targets.train_tiny(argument, Rendezvous(0, 1))
    else:
        distributed_targets.run(processes, argument)
    losses = json.loads((tmp / f"{name}.json").read_text())
    return Result(losses, load_file(tmp / f"{name}.safetensors"))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Result:
    return run(tmp_path_factory.mktemp("ddp"), "two", 2)


def assert_close_students(got: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        scale = tensor.abs().max().item() or 1.0
        torch.testing.assert_close(got[key], tensor, rtol=0, atol=STATE_RTOL * scale, msg=key)


def test_two_processes_train_as_one_with_the_same_global_batch(
    tmp_path: Path, two_processes: Result
) -> None:
    one = run(tmp_path, "one", 1)
    assert len(one.losses) == len(two_processes.losses) == RUN["steps"]
    torch.testing.assert_close(
        torch.tensor(two_processes.losses), torch.tensor(one.losses), rtol=LOSS_RTOL, atol=0
    )
    assert_close_students(two_processes.student, one.student)


def _dead(pid: int) -> bool:
    """Gone, or a zombie that nobody reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_run_whose_rank_0_was_killed_resumes_from_its_checkpoint(
    tmp_path: Path, two_processes: Result
) -> None:
    marker = tmp_path / "paused"
    argument = RUN | {
        "checkpoint": str(tmp_path / "killed.pt"),
        "out": str(tmp_path / "killed"),
        "pause_at": KILLED_AT,
        "pause_marker": str(marker),
    }
    rank_0 = subprocess.Popen(
        [sys.executable, "-m", distributed_targets.__name__, "2", json.dumps(argument)],
        env=os.environ | {"PYTHONPATH": str(Path.cwd())},
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert rank_0.poll() is None and time.monotonic() < deadline, "no pause"
            time.sleep(0.1)
    finally:
        rank_0.send_signal(signal.SIGKILL)
        rank_0.wait()
    [rank_1] = json.loads(marker.read_text())
    deadline = time.monotonic() + 10
    while not _dead(rank_1):  # the kernel kills it with its parent (PR_SET_PDEATHSIG)
        assert time.monotonic() < deadline, "rank 1 outlived rank 0"
        time.sleep(0.1)
    assert load_checkpoint(tmp_path / "killed.pt")["step"] == KILLED_AT

    # On 2 processes, every rank loading rank 0's checkpoint: the uninterrupted run's
    # remaining steps, bit for bit. On 1 process (a worker with fewer GPUs): the same within
    # the tolerance, since the checkpoint holds the whole run's state, not a process's.
    shutil.copy(tmp_path / "killed.pt", tmp_path / "moved.pt")
    resumed = run(tmp_path, "killed", 2, resume=True)
    assert resumed.losses == two_processes.losses[KILLED_AT:]
    for key, tensor in two_processes.student.items():
        assert torch.equal(resumed.student[key], tensor), key
    moved = run(tmp_path, "moved", 1, resume=True)
    torch.testing.assert_close(
        torch.tensor(moved.losses),
        torch.tensor(two_processes.losses[KILLED_AT:]),
        rtol=LOSS_RTOL,
        atol=0,
    )
    assert_close_students(moved.student, two_processes.student)
