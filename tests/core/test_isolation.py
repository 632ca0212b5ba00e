"""core.isolation: children under memory, CPU and wall-clock limits, answering in JSON."""

from __future__ import annotations

import os
import time

import pytest

from core.errors import InputError
from core.intake import PRELOAD
from core.isolation import ChildLimits, LimitExceeded, run_isolated

TARGETS = "tests.core.isolation_targets"
LIMITS = ChildLimits(memory_bytes=2 * 2**30, cpu_seconds=2, wall_seconds=20)


def run(function: str, argument: object, limits: ChildLimits = LIMITS) -> object:
    # The validation preload: the forkserver is shared with the API tests in this process.
    return run_isolated(TARGETS, function, argument, limits, what="the test", preload=PRELOAD)


def test_answers_in_a_child_process() -> None:
    answer = run("echo", [1, "two"])

    assert isinstance(answer, dict)
    assert answer["echo"] == [1, "two"]
    assert answer["pid"] != os.getpid()


def test_an_input_error_keeps_its_code_and_status() -> None:
    with pytest.raises(InputError) as raised:
        run("refuse", "nope")

    assert (raised.value.code, raised.value.status_code) == ("nope", 413)


def test_memory_past_the_budget_is_refused_and_costs_the_parent_nothing() -> None:
    with pytest.raises(LimitExceeded) as raised:
        run("allocate", 3 * 2**30)

    assert (raised.value.code, raised.value.status_code) == ("validation_memory_limit", 413)
    assert "2.0 GiB" in raised.value.message


def test_cpu_time_past_the_budget_is_refused() -> None:
    started = time.monotonic()
    with pytest.raises(LimitExceeded) as raised:
        run("spin", 30.0, ChildLimits(memory_bytes=2 * 2**30, cpu_seconds=1, wall_seconds=20))

    assert raised.value.code == "validation_cpu_limit"
    assert time.monotonic() - started < 10


def test_wall_time_past_the_budget_kills_the_child() -> None:
    started = time.monotonic()
    with pytest.raises(LimitExceeded) as raised:
        run("sleep", 60.0, ChildLimits(memory_bytes=2 * 2**30, cpu_seconds=5, wall_seconds=1))

    assert raised.value.code == "validation_timeout"
    assert time.monotonic() - started < 10


def test_a_native_crash_is_an_answer_not_a_dead_parent() -> None:
    with pytest.raises(LimitExceeded) as raised:
        run("segfault", None)

    assert raised.value.code == "validation_crashed"
    assert "SIGSEGV" in raised.value.message
    assert run("echo", "still here")["echo"] == "still here"  # type: ignore[index]


def test_an_unexpected_exception_is_named_without_its_details() -> None:
    with pytest.raises(LimitExceeded) as raised:
        run("fail", None)

    assert raised.value.code == "validation_crashed"
    assert "KeyError" in raised.value.message
