"""The API under load: pollers at fixed rates while a real job trains, then the same with
hostile uploads being validated. Writes the ``api-load`` section of BENCHMARKS.md.

    python -m bench.api_load                       # 60 s per window, 50, 200 and 1,000 req/s
    python -m bench.api_load --seconds 10 --no-write
    python -m bench.api_load --api-processes 2     # API_PROCESSES=2: its own section

It starts the whole service with ``python -m scripts.serve`` (embedded defaults: SQLite, the
bundled Redis, one worker) on a fresh data directory, submits a CIFAR-10 ResNet-20 job from
``../shared`` that trains for the whole run, and polls ``GET /v1/jobs/{id}`` open-loop: each
request is due at a fixed time, and its latency counts from then, so a stalled server cannot
hide its stall by slowing the pollers down. In the hostile windows, 20 uploads stay in flight:
each a model whose verification runs two 1024x1024 convolution passes in ONNX Runtime and in
torch (seconds of CPU) with an archive of 20,000 one-pixel PNGs whose decoded size passes the
pixel budget. Each is validated in a child process and refused with a 4xx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from onnx import TensorProto, helper, numpy_helper

from bench.cifar import SHARED, cifar_zip, teacher_preprocessing
from bench.report import machine, table, write_section
from tests.hostile_inputs import png_flood

REPO = Path(__file__).resolve().parents[1]
TEACHER = SHARED / "fixtures" / "resnet20_cifar10.onnx"
CIFAR_TRAIN = SHARED / "data" / "cifar10" / "train"
HOSTILE_IN_FLIGHT = 20
POLL_CONNECTIONS = 64
DRAIN_SECONDS = 10.0
HOSTILE_PIXEL_BUDGET = 10**10  # MAX_DATASET_PIXELS of the service under load


def slow_model() -> bytes:
    """A valid classifier whose verification is expensive: 3->32->32 channel 3x3 convolutions
    over a static 1024x1024 input (two batches of two, in ONNX Runtime and in torch)."""
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w3"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 1024, 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        [weight("w1", 32, 3, 3, 3), weight("w2", 32, 32, 3, 3), weight("w3", 10, 32)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@dataclass
class Window:
    rate: int
    hostile: bool
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    hostile_answers: Counter[str] = field(default_factory=Counter)
    hostile_seconds: list[float] = field(default_factory=list)

    def row(self) -> list[object]:
        ordered = sorted(self.latencies_ms)

        def p(q: float) -> str:  # "-": nothing was answered in the window
            if not ordered:
                return "-"
            return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))]:.1f}"

        errors = sum(n for status, n in self.statuses.items() if status != "200")
        hostile = (
            f"{sum(self.hostile_answers.values())} answered "
            f"({', '.join(f'{c}: {n}' for c, n in sorted(self.hostile_answers.items()))}), "
            f"median {statistics.median(self.hostile_seconds):.1f} s"
            if self.hostile_seconds
            else "none"
        )
        return [
            self.rate,
            f"{len(ordered) / self.seconds:.0f}",
            HOSTILE_IN_FLIGHT if self.hostile else 0,
            len(ordered),
            p(0.5),
            p(0.99),
            p(1.0),
            errors,
            hostile,
        ]


class RawPoller:
    """GET over a pool of keep-alive HTTP/1.1 connections, parsed by hand: a poller that costs
    tens of microseconds per request, so the pollers measure the server, not httpx."""

    def __init__(self, host: str, port: int, path: str, connections: int) -> None:
        self.host, self.port = host, port
        self.request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
        self.idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = (
            asyncio.Queue()
        )
        for _ in range(connections):
            self.idle.put_nowait(None)  # opened on first use
        self.writers: list[asyncio.StreamWriter] = []

    def close(self) -> None:
        """Drop every connection: the server stops working on what is still queued on them."""
        for writer in self.writers:
            writer.close()

    async def get(self) -> str:
        """One request; its status code, or the name of the error."""
        connection = await self.idle.get()
        try:
            if connection is None:
                connection = await asyncio.open_connection(self.host, self.port)
                self.writers.append(connection[1])
            reader, writer = connection
            writer.write(self.request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            return head.split(b" ", 2)[1].decode()
        except (OSError, asyncio.IncompleteReadError, StopIteration) as exc:
            connection = None
            return type(exc).__name__
        finally:
            self.idle.put_nowait(connection)


async def poll(url: str, path: str, window: Window) -> None:
    """Open loop: request i is due at start + i / rate; latency counts from its due time."""
    address = httpx.URL(url)
    poller = RawPoller(address.host, address.port or 80, path, POLL_CONNECTIONS)
    start = time.monotonic()
    total = int(window.rate * window.seconds)

    async def one(due: float) -> None:
        window.statuses[await poller.get()] += 1
        window.latencies_ms.append((time.monotonic() - due) * 1000)

    tasks = []
    for i in range(total):
        due = start + i / window.rate
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        tasks.append(asyncio.create_task(one(due)))
    # A saturated server would take minutes to drain the backlog: what is not answered within
    # DRAIN_SECONDS of the window's end counts as an error ("unanswered"), without a latency.
    _, unanswered = await asyncio.wait(tasks, timeout=DRAIN_SECONDS)
    for task in unanswered:
        task.cancel()
    window.statuses["unanswered"] += len(unanswered)
    poller.close()


def hostile_uploads(url: str, model: bytes, data: bytes, stop: Any, answers: Path) -> None:
    """In a process of its own (so that its multipart encoding never delays the pollers): keep
    HOSTILE_IN_FLIGHT uploads going until ``stop`` is set; append each answer and its seconds
    to ``answers`` as a JSON line (a file survives the process being killed)."""

    def record(answer: str, seconds: float) -> None:
        with answers.open("a") as file:
            file.write(json.dumps([answer, seconds]) + "\n")

    async def one(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = await client.post(
                    "/v1/jobs",
                    files={"model": ("m.onnx", model), "data": ("d.zip", data)},
                    data={"config": json.dumps({"steps": 1})},
                )
                body = response.json()
                error = body.get("error") if isinstance(body, dict) else None
                code = error["code"] if isinstance(error, dict) else "accepted"
                record(f"{response.status_code} {code}", time.monotonic() - started)
            except httpx.HTTPError as exc:
                record(type(exc).__name__, time.monotonic() - started)

    async def run() -> None:
        limits = httpx.Limits(max_connections=HOSTILE_IN_FLIGHT)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
            await asyncio.gather(*(one(client) for _ in range(HOSTILE_IN_FLIGHT)))

    asyncio.run(run())


def run_window(
    url: str, job_id: str, window: Window, hostile: tuple[bytes, bytes], work: Path
) -> None:
    context = mp.get_context("spawn")
    stop = context.Event()
    answers = work / f"hostile-{window.rate}.jsonl"
    uploader = None
    if window.hostile:
        uploader = context.Process(target=hostile_uploads, args=(url, *hostile, stop, answers))
        uploader.start()
        time.sleep(10)  # let the uploads arrive and reach validation before measuring
    asyncio.run(poll(url, f"/v1/jobs/{job_id}", window))
    if uploader is not None:
        stop.set()
        uploader.kill()  # uploads still in flight are cut off: the API removes their files
        uploader.join()
        for line in answers.read_text().splitlines() if answers.exists() else []:
            answer, seconds = json.loads(line)
            window.hostile_answers[answer] += 1
            window.hostile_seconds.append(seconds)


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process, MiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    kib = lambda name: int(fields[name].split()[0]) / 1024  # noqa: E731
    return kib("VmRSS"), kib("VmHWM")


def children(pid: int) -> list[int]:
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]


def api_pids(launcher: subprocess.Popen[bytes], processes: int) -> list[int]:
    """The API's server processes: uvicorn itself, or with several the ones it spawned."""
    for child in children(launcher.pid):
        if b"uvicorn" in Path(f"/proc/{child}/cmdline").read_bytes():
            if processes == 1:
                return [child]
            return [
                server
                for server in children(child)
                if b"spawn_main" in Path(f"/proc/{server}/cmdline").read_bytes()
            ]
    raise RuntimeError("no uvicorn child")


def total_rss_mib(pids: list[int]) -> tuple[float, float]:
    """(current, peak) resident memory of the processes together, MiB."""
    both = [rss_mib(pid) for pid in pids]
    return sum(rss for rss, _ in both), sum(peak for _, peak in both)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rates", default="50,200,1000")
    parser.add_argument("--api-processes", type=int, default=1, help="API_PROCESSES")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rates = [int(rate) for rate in args.rates.split(",")]

    work = Path(tempfile.mkdtemp(prefix="api-load-"))
    port = 18000 + os.getpid() % 1000
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEYS", "DATABASE_URL")}
    env["API_PROCESSES"] = str(args.api_processes)
    # The flood is refused by the pixel budget it passes: the default budget (a 200 GB store)
    # would admit its 20,000 x 1024 x 1024 pixels.
    env["MAX_DATASET_PIXELS"] = str(HOSTILE_PIXEL_BUDGET)
    log = (work / "serve.log").open("wb")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "scripts.serve", "--port", str(port), "--data-dir", str(work)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or launcher.poll() is not None:
                raise RuntimeError(f"service did not start; see {work / 'serve.log'}")
            time.sleep(0.3)
        pids = api_pids(launcher, args.api_processes)
        data = cifar_zip(CIFAR_TRAIN, 100, work / "cifar.zip")
        config = {"steps": 1_000_000, "batch_size": 64, "export": {"speed": False}}
        config["preprocessing"] = teacher_preprocessing()
        with TEACHER.open("rb") as model_file, data.open("rb") as data_file:
            response = httpx.post(
                f"{url}/v1/jobs",
                files={"model": model_file, "data": data_file},
                data={"config": json.dumps(config)},
                timeout=300,
            )
        response.raise_for_status()
        job_id = response.json()["id"]
        while httpx.get(f"{url}/v1/jobs/{job_id}").json()["stage"] != "training":
            time.sleep(0.5)
        hostile = (slow_model(), png_flood(20_000))
        rss_before = total_rss_mib(pids)
        windows = [
            Window(rate, hostile_on, args.seconds) for hostile_on in (False, True) for rate in rates
        ]
        for window in windows:
            run_window(url, job_id, window, hostile, work)
            print(window.row(), flush=True)
        rss_after = total_rss_mib(pids)
        job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
        httpx.post(f"{url}/v1/jobs/{job_id}/cancel")
    finally:
        launcher.terminate()
        launcher.wait(60)
    steps = (job.get("progress") or {}).get("step")
    body = "\n\n".join(
        [
            f"`GET /v1/jobs/{{id}}` polled open-loop for {args.seconds:g} s per window (latency "
            "counts from each request's due time) while a CIFAR-10 ResNet-20 job trains in the "
            f"same service (`make serve`'s embedded defaults, one worker, "
            f"{args.api_processes} API process(es); {job['status']}, "
            f"{job['stage']}, step {steps} at the end). Hostile windows keep "
            f"{HOSTILE_IN_FLIGHT} uploads in flight, each validated in a child process (a "
            "model whose verification costs seconds of CPU, with 20,000 one-pixel PNGs past "
            f"the pixel budget, MAX_DATASET_PIXELS={HOSTILE_PIXEL_BUDGET:.0e} here) and refused. "
            "Pollers, API, worker and validators share the "
            "machine's cores. Errors are requests not answered within 10 s of the window's end "
            "(a saturated server's backlog). A hostile upload refused with 429 before its body "
            "is read is closed under the client, which sees a ReadError and retries at once.",
            table(
                [
                    "target req/s",
                    "answered req/s",
                    "hostile uploads in flight",
                    "requests",
                    "p50 ms",
                    "p99 ms",
                    "max ms",
                    "errors",
                    "hostile uploads",
                ],
                [window.row() for window in windows],
            ),
            f"API processes' RSS together: {rss_before[0]:.0f} MiB before the windows, "
            f"{rss_after[0]:.0f} MiB after (peak {rss_after[1]:.0f} MiB).",
        ]
    )
    print(body)
    if not args.no_write:
        name, command = "api-load", "python -m bench.api_load"
        if args.api_processes > 1:
            name += f"-{args.api_processes}-processes"
        command += f" --seconds {args.seconds:g} --api-processes {args.api_processes}"
        write_section(name, body, command=command, machine_text=machine())


if __name__ == "__main__":
    main()
