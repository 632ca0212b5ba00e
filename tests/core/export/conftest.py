"""Every export test runs torch on one thread."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """On shared CPUs two spinning OpenMP threads run calibration 3-5x slower than one, and a
    two-step training 10x (test_int_checkpoint's, on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
