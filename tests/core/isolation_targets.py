"""Functions that ``tests/core/test_isolation.py`` runs in isolated children: each misbehaves as
a parser on hostile input can."""

from __future__ import annotations

import ctypes
import os
import time

from core.errors import InputError


def echo(value: object) -> object:
    return {"echo": value, "pid": os.getpid()}


def refuse(code: str) -> None:
    raise InputError(code, "refused by the target", status_code=413)


def allocate(nbytes: int) -> int:
    block = bytearray(nbytes)  # touches every page: RSS would grow by nbytes
    return len(block)


def spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def segfault(_: object) -> None:
    ctypes.string_at(0)  # reads address 0: SIGSEGV, as a crashing native parser would


def fail(_: object) -> None:
    raise KeyError("a bug, not an input error")
