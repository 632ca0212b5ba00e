"""Run parser-heavy work on untrusted input in a child process, under hard limits.

A hostile upload can make a parser allocate without bound, spin for minutes, or crash in native
code. In a child process each of those costs only the child: it gets an address-space budget
(``RLIMIT_DATA``: heap and private mappings, not the shared libraries torch maps), a CPU-time
budget (``RLIMIT_CPU``: the kernel sends SIGXCPU) and a wall-clock deadline (the parent kills
it). Children fork from a forkserver that has already imported the target's module, so each
starts in milliseconds instead of the seconds that importing torch takes.

The child answers with JSON only: nothing it sends is unpickled by the parent, so even a child
a parser exploit took over cannot hand the parent code to run.
"""

from __future__ import annotations

import importlib
import json
import logging
import multiprocessing as mp
import os
import resource
import signal
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from core.errors import InputError
from core.storage import human_bytes

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 1024 * 1024
CHILD_NICENESS = 10
_ERROR_STATUSES = range(400, 500)


@dataclass(frozen=True)
class ChildLimits:
    memory_bytes: int
    cpu_seconds: int
    wall_seconds: float


class LimitExceeded(InputError):
    """The input made its validation pass one of the child's limits."""


@dataclass(frozen=True)
class _Call:
    module: str
    function: str
    argument: Any


_context_lock = threading.Lock()
_preloaded: tuple[str, ...] | None = None


def _context(preload: tuple[str, ...]) -> mp.context.ForkServerContext:
    """The forkserver context; its server imports ``preload`` once (the first caller's)."""
    global _preloaded
    context = mp.get_context("forkserver")
    with _context_lock:
        if _preloaded is None:
            context.set_forkserver_preload(list(preload))
            _preloaded = preload
    return context


def warm_up(preload: tuple[str, ...]) -> None:
    """Start the forkserver now (it imports ``preload``), so the first request does not wait."""
    from multiprocessing import forkserver

    _context(preload)
    forkserver.ensure_running()


def shut_down() -> None:
    """Stop the forkserver and remove its socket folder (``pymp-*`` in the temp directory).

    Python does both at a normal exit, but servers often end by a signal they re-raise
    (uvicorn does), which skips that: call this from the server's own shutdown. A later
    ``run_isolated`` starts a new server. Uses multiprocessing's private ``_stop`` and its
    temp-dir finalizer, both stable since Python 3.8.
    """
    from multiprocessing import forkserver, util

    # _stop waits for the server to exit, which it does only once its preload (torch: seconds)
    # is imported: an API stopped soon after it started would wait that long. Nothing of the
    # server is worth waiting for at shutdown; a validation it already forked runs on alone.
    if (pid := forkserver._forkserver._forkserver_pid) is not None:  # type: ignore[attr-defined]
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    forkserver._forkserver._stop()  # type: ignore[attr-defined]
    for finalizer in list(util._finalizer_registry.values()):  # type: ignore[attr-defined]
        if getattr(finalizer, "_callback", None) is util._remove_temp_dir:  # type: ignore[attr-defined]
            finalizer()  # removes the folder and forgets it, as at exit


def _child(connection: Connection, call: _Call, limits: ChildLimits) -> None:
    """In the child: apply the limits, run the call, answer ``{"ok": ...}`` or ``{"error": }``."""
    # Background work: the API's own requests go first when the CPUs are busy.
    os.nice(CHILD_NICENESS)
    resource.setrlimit(resource.RLIMIT_DATA, (limits.memory_bytes, limits.memory_bytes))
    cpu = max(1, limits.cpu_seconds)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    try:
        module = importlib.import_module(call.module)
        function: Callable[[Any], Any] = getattr(module, call.function)
        answer: dict[str, Any] = {"ok": function(call.argument)}
    except InputError as exc:
        answer = {"error": {**exc.as_dict(), "status": exc.status_code}}
    except MemoryError:
        answer = {"error": {"code": "memory"}}
    except Exception as exc:  # noqa: BLE001 - any failure on hostile input is the input's
        # Native allocators report exhaustion in their own words (torch, onnxruntime, protobuf).
        text = str(exc).lower()
        if any(word in text for word in ("allocate memory", "bad_alloc", "out of memory")):
            answer = {"error": {"code": "memory"}}
        else:
            log.exception("isolated %s.%s failed", call.module, call.function)
            answer = {"error": {"code": "crash", "message": type(exc).__name__}}
    connection.send_bytes(json.dumps(answer).encode())
    connection.close()


def run_isolated(
    module: str,
    function: str,
    argument: Any,
    limits: ChildLimits,
    *,
    what: str,
    preload: tuple[str, ...] = (),
) -> Any:
    """``module.function(argument)`` in a fresh child under ``limits``; its JSON-able result.

    The child's ``InputError`` is raised here with its code and status. Passing a limit, or a
    crash, raises ``LimitExceeded`` naming it; ``what`` ("the upload's validation") says whose.
    ``preload`` names the modules the forkserver imports for every child (heavy ones: torch).
    Blocks the calling thread until the child is done (run it in a worker thread).
    """
    context = _context(preload or (module,))
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(
        target=_child, args=(sender, _Call(module, function, argument), limits), daemon=True
    )
    started = time.monotonic()
    process.start()
    sender.close()  # the child holds the only write end: EOF once it exits
    try:
        ready = wait([receiver, process.sentinel], timeout=limits.wall_seconds)
        answer = None
        if receiver in ready or receiver.poll():
            try:
                answer = json.loads(receiver.recv_bytes(MAX_ANSWER_BYTES))
            except (EOFError, OSError, ValueError):
                answer = None
        if not ready:
            raise LimitExceeded(
                "validation_timeout",
                f"{what} took longer than {limits.wall_seconds:g} s of wall-clock time",
            )
    finally:
        if process.is_alive():
            process.kill()  # SIGKILL; a child that exits meanwhile is no error
        process.join()
        receiver.close()
    log.info("%s: child ran %.2f s, exit %s", what, time.monotonic() - started, process.exitcode)
    if answer is None:
        raise _death(process.exitcode, limits, what)
    if "ok" in answer:
        return answer["ok"]
    return _raise(answer["error"], limits, what)


def _raise(error: dict[str, Any], limits: ChildLimits, what: str) -> Any:
    if error.get("code") == "memory":
        raise _memory_error(limits, what)
    if error.get("code") == "crash":
        raise LimitExceeded(
            "validation_crashed", f"{what} failed on this input ({error.get('message')})"
        )
    status = error.get("status")
    raise InputError(
        str(error.get("code")),
        str(error.get("message")),
        status_code=status if status in _ERROR_STATUSES else 422,
    )


def _memory_error(limits: ChildLimits, what: str) -> LimitExceeded:
    return LimitExceeded(
        "validation_memory_limit",
        f"{what} needed more than its memory budget of {human_bytes(limits.memory_bytes)}",
        status_code=413,
    )


def _death(exitcode: int | None, limits: ChildLimits, what: str) -> LimitExceeded:
    """Why a child died without answering."""
    if exitcode == -signal.SIGXCPU:
        return LimitExceeded(
            "validation_cpu_limit", f"{what} used more than {limits.cpu_seconds} s of CPU time"
        )
    # The OOM killer, or a C++ std::bad_alloc's abort (the CPU limit warns with SIGXCPU first).
    if exitcode in (-signal.SIGKILL, -signal.SIGABRT):
        return _memory_error(limits, what)
    name = signal.Signals(-exitcode).name if exitcode is not None and exitcode < 0 else exitcode
    return LimitExceeded("validation_crashed", f"{what} crashed on this input (exit {name})")
