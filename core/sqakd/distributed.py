"""One training run on several processes: one per GPU (NCCL), or several on the CPU (gloo).

The calling process is rank 0. ``launch`` starts ranks 1..N-1 as fresh Python processes (not
multiprocessing children: a Celery prefork child is daemonic and may not have any), each of
which imports an entry function by name and calls it with a JSON argument and its
``Rendezvous``: nothing is pickled. Every rank builds its own model and data the same way (a
job's import and calibration are deterministic), then calls ``Rendezvous.join`` right before
training and hands the ``Group`` to ``train``, which:

- computes the same global batch indices on every rank, and trains each rank on its rows of the
  batch (``Group.shard``), augmented with the random numbers the whole batch draws;
- weights each rank's loss by its share of the batch (``Group.loss_weight``), so that the
  gradients DistributedDataParallel averages are those of the global batch's mean loss;
- reports the ranks' mean loss (``Group.mean``) and follows rank 0's stop decision
  (``Group.decide``).

Rank 0 alone reports, probes, checkpoints, evaluates and exports; every rank resumes from rank
0's checkpoint. Ranks 1..N-1 die with the process that launched them (``PR_SET_PDEATHSIG``),
and a rank that fails before training fails rank 0's ``join`` at once.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # every rank of a job runs on its worker's machine
# How long a rank waits for the others: to join (they import and calibrate at their own pace)
# and in any one collective (a rank that died leaves NCCL's peers waiting this long).
TIMEOUT = dt.timedelta(minutes=30)
EXIT_SECONDS = 60.0  # for ranks 1..N-1 to exit once training is done
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class Group:
    """This process's place among the ``size`` ranks of a training run (``ONE_PROCESS``: alone,
    no collectives)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where collectives run: NCCL's on this rank's GPU, gloo's on the CPU."""
        if dist.is_initialized() and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def shard(self, batch: int) -> slice:
        """This rank's rows of a global batch of ``batch`` images: contiguous, sizes within one
        of each other, in rank order."""
        if batch < self.size:
            raise ValueError(f"a batch of {batch} images cannot feed {self.size} processes")
        return slice(self.rank * batch // self.size, (self.rank + 1) * batch // self.size)

    def loss_weight(self, batch: int) -> float:
        """What this rank's mean loss over its shard is multiplied by: the gradients DDP
        averages over the ranks, and the ranks' ``mean`` of the weighted losses, are then
        those of the mean over the global batch, even where the shards differ in size."""
        rows = self.shard(batch)
        return self.size * (rows.stop - rows.start) / batch

    def mean(self, value: Tensor) -> float:
        """The ranks' mean of a one-element ``value``."""
        if self.size == 1:
            return value.item()
        total = value.detach().reshape(1).to(self.device, torch.float64)
        dist.all_reduce(total)
        return total.item() / self.size

    def from_main(self, value: float) -> float:
        """Rank 0's ``value``, on every rank."""
        if self.size == 1:
            return value
        shared = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(shared, 0)
        return shared.item()

    def decide(self, flag: bool) -> bool:
        """Rank 0's ``flag`` (whether to stop, say), on every rank."""
        return bool(self.from_main(float(bool(flag))))

    def copy_main(self, module: nn.Module) -> None:
        """Give ``module`` rank 0's parameters and buffers (the same calibration on GPUs whose
        kernels round differently, before learning rates are derived from it)."""
        if self.size == 1:
            return
        with torch.no_grad():
            for tensor in module.state_dict().values():
                moved = tensor.to(self.device)
                dist.broadcast(moved, 0)
                tensor.copy_(moved)

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` under DistributedDataParallel (itself when alone).

        Every parameter of a quantized student gets a gradient each step, so DDP need not look
        for unused ones (a costly graph walk). Buffers (EWGS deltas, quantizer clips) follow
        rank 0's at each forward, DDP's default.
        """
        if self.size == 1:
            return module
        device = next(module.parameters()).device
        return DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )


ONE_PROCESS = Group()


class _MeanGradient(torch.autograd.Function):
    """The identity, whose backward replaces the gradient by the ranks' mean of it."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad / dist.get_world_size()


def mean_gradient(x: Tensor) -> Tensor:
    """``x``, whose gradient in a multi-process training step is the ranks' mean: the gradient
    of the global batch, for a backward that transforms it non-linearly before DDP averages
    the results. EWGS's weight quantizer does (``1 + delta * sign(g) * residual`` of the whole
    batch's ``g``): averaged after that scaling, the ranks' weight gradients would differ from
    one process's. SyncBatchNorm all-reduces inside the backward in the same way. Outside such
    a step (one process, no autograd), ``x`` itself."""
    if not (torch.is_grad_enabled() and dist.is_initialized() and dist.get_world_size() > 1):
        return x
    return _MeanGradient.apply(x)


@dataclass
class Rendezvous:
    """How rank ``rank`` of ``size`` meets the others: a TCP store on rank 0's ``port``."""

    rank: int
    size: int
    port: int = 0
    store: dist.TCPStore | None = None
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)  # rank 0's

    def join(self) -> Group:
        """Wait for every rank, form the process group, and return this rank's ``Group``.

        Rank 0 watches ranks 1..N-1 while it waits: one that exited (a bad input, an import
        error) is reported at once, not after ``TIMEOUT``.
        """
        if self.size == 1:
            return ONE_PROCESS
        if self.store is None:
            self.store = dist.TCPStore(HOST, self.port, self.size, False, TIMEOUT)
        self.store.set(f"ready/{self.rank}", "1")
        if self.rank == 0:
            self._wait_for_ranks()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(
            backend,
            store=dist.PrefixStore("group", self.store),
            rank=self.rank,
            world_size=self.size,
            timeout=TIMEOUT,
        )
        return Group(self.rank, self.size)

    def _wait_for_ranks(self) -> None:
        assert self.store is not None
        keys = [f"ready/{rank}" for rank in range(self.size)]
        deadline = time.monotonic() + TIMEOUT.total_seconds()
        while not self.store.check(keys):
            for rank, child in enumerate(self.children, start=1):
                if child.poll() is not None:
                    raise RuntimeError(f"training rank {rank} exited with {child.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"training ranks not ready after {TIMEOUT}")
            time.sleep(0.05)


def world_size(requested: int | None, worker_limit: int | None, batch_size: int) -> int:
    """Processes for a job's training: ``requested`` (the job's ``devices``), else the
    worker's ``worker_limit``, else every GPU (one process on a CPU worker); never more than
    the worker allows, its GPUs, or the images of a batch."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    limit = worker_limit or max(gpus, 1)
    if gpus:
        limit = min(limit, gpus)
    return max(1, min(requested or limit, limit, batch_size))


@contextmanager
def launch(size: int, entry: str, argument: Any) -> Iterator[Rendezvous]:
    """Start ranks 1..``size``-1 running ``entry`` ("module:function") with ``argument`` (JSON)
    and their ``Rendezvous``; yield rank 0's, this process's.

    The CPU threads are shared out among the ranks. On leaving, the process group goes; the
    ranks are waited for after a normal exit, and killed after an exception: rank 0 holds
    everything that is kept.
    """
    if size == 1:
        yield Rendezvous(0, 1)
        return
    store = dist.TCPStore(HOST, 0, size, True, TIMEOUT, wait_for_workers=False)
    threads = max(1, _cpus() // size)
    rendezvous = Rendezvous(0, size, store.port, store)
    spec = {"entry": entry, "argument": argument, "size": size, "port": store.port}
    spec |= {"threads": threads, "parent": os.getpid()}
    environment = os.environ | {"PYTHONPATH": _import_path()}
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rank in range(1, size):
            argv = [sys.executable, "-m", __name__, json.dumps(spec | {"rank": rank})]
            rendezvous.children.append(subprocess.Popen(argv, env=environment))
        yield rendezvous
        _leave()
        _wait(rendezvous.children)
    finally:
        _leave()
        for child in rendezvous.children:
            if child.poll() is None:
                child.kill()
            child.wait()
        torch.set_num_threads(threads_before)


def _wait(children: list[subprocess.Popen[bytes]]) -> None:
    """Let ranks 1..N-1 exit after training. Rank 0 took part in every step's collectives, so
    its student is whole whatever they do now: a rank that fails or hangs here is logged (and
    killed), not the job's failure."""
    deadline = time.monotonic() + EXIT_SECONDS
    for rank, child in enumerate(children, start=1):
        try:
            code = child.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            log.warning("training rank %d still running %g s after training", rank, EXIT_SECONDS)
            continue
        if code != 0:
            log.warning("training rank %d exited with %d after training", rank, code)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _cpus() -> int:
    affinity = getattr(os, "sched_getaffinity", None)  # a container's share; Linux only
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def _import_path() -> str:
    """PYTHONPATH for the ranks: this project first, so that ``core`` and the entry import as
    they do here, whatever the worker's current directory."""
    root = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when the process that launched it dies (Linux); a
    parent already gone means exit now."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        sys.exit("training rank: the launching process is gone")


def _rank_main(spec: dict[str, Any]) -> None:
    """A rank 1..N-1: its GPU and threads, then the entry with its ``Rendezvous``."""
    _die_with_parent(spec["parent"])
    torch.set_num_threads(spec["threads"])
    rank = spec["rank"]
    if torch.cuda.is_available():
        torch.cuda.set_device(rank)
    module, name = spec["entry"].split(":")
    entry: Callable[[Any, Rendezvous], None] = getattr(importlib.import_module(module), name)
    try:
        entry(spec["argument"], Rendezvous(rank, spec["size"], spec["port"]))
    finally:
        _leave()


if __name__ == "__main__":
    from core.sqakd import distributed  # this file as the module everyone else imports

    logging.basicConfig(level=logging.INFO)
    distributed._rank_main(json.loads(sys.argv[1]))
