"""worker/device_agent.py: Python 3.6 and stdlib only (it runs on JetPack 4.6), its parsers,
its multipart encoder, and claim-download-build-upload rounds against the real API (uvicorn,
SQLite, an API key), with a stand-in for NVIDIA's trtexec binary, which this machine lacks."""

from __future__ import annotations

import ast
import email.parser
import email.policy
import json
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from api.main import create_app
from core import engines, jobs
from core.db import session_factory
from core.models import Job
from core.settings import Settings
from core.storage import LocalStorage
from tests.factories import VALID_CONFIG, make_job
from tests.utils import SettingsFactory, served_by_uvicorn
from worker import device_agent

AGENT = Path(device_agent.__file__)
# What Python 3.6's standard library has and the agent may use, plus JetPack's TensorRT.
PY36_STDLIB = {
    "argparse", "base64", "collections", "contextlib", "email", "errno", "functools",
    "hashlib", "http", "io", "itertools", "json", "logging", "os", "platform", "re", "shutil",
    "signal", "socket", "ssl", "subprocess", "sys", "tempfile", "textwrap", "threading", "time",
    "traceback", "typing", "urllib", "uuid",
}  # fmt: skip
LAZY_ONLY = {"tensorrt"}  # imported inside functions: machines without it still run the agent

TRTEXEC_82 = """\
&&&& RUNNING TensorRT.trtexec [TensorRT v8201] # trtexec --onnx=model.onnx --int8 --fp16
[01/10/2024-10:00:00] [I] === Device Information ===
[01/10/2024-10:00:00] [I] Selected Device: NVIDIA Tegra X1
[01/10/2024-10:00:00] [I] Compute Capability: 5.3
[01/10/2024-10:00:01] [I] TensorRT version: 8.2.1
[01/10/2024-10:03:00] [I] === Performance summary ===
[01/10/2024-10:03:00] [I] Throughput: 512.3 qps
[01/10/2024-10:03:00] [I] Latency: min = 1.9 ms, max = 3.1 ms, mean = 2.05 ms, median = 2.0 ms
[01/10/2024-10:03:00] [I] GPU Compute Time: min = 1.70 ms, max = 2.95 ms, mean = 1.8125 ms, \
median = 1.80 ms, percentile(99%) = 2.70 ms
&&&& PASSED TensorRT.trtexec [TensorRT v8201] # trtexec --onnx=model.onnx --int8 --fp16
"""
TRTEXEC_10 = """\
&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec --onnx=model.onnx
[I] GPU Compute Time: min = 0.1 ms, max = 0.2 ms, mean = 0.123 ms, median = 0.12 ms
"""
NV_TEGRA_RELEASE = (
    "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64, "
    "DATE: Sat Feb 19 17:05:08 UTC 2022\n"
)


def agent_tree() -> ast.Module:
    return ast.parse(AGENT.read_text(), feature_version=(3, 6))


def test_the_agent_parses_as_python_3_6() -> None:
    # Rejects what 3.6 lacks: walrus, f"{x=}", positional-only and parenthesized with, match.
    agent_tree()


def test_the_agent_imports_only_the_py36_stdlib_and_tensorrt_lazily() -> None:
    tree = agent_tree()
    imported: dict[str, bool] = {}  # top-level module -> imported at module level
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "the agent is one file: no relative imports"
            names = [node.module or ""]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            imported[top] = imported.get(top, False) or node in tree.body
    assert set(imported) <= PY36_STDLIB | LAZY_ONLY, set(imported) - PY36_STDLIB - LAZY_ONLY
    assert not any(imported[name] for name in LAZY_ONLY & set(imported))
    assert "tensorrt" in imported


def test_the_agent_uses_nothing_newer_than_python_3_6() -> None:
    tree = agent_tree()
    source = AGENT.read_text()
    assert "from __future__ import annotations" not in source
    assert "dataclasses" not in source
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):  # subprocess.run(capture_output=, text=) are 3.7+
            assert not {kw.arg for kw in node.keywords} & {"capture_output", "text"}
        if isinstance(node, ast.Attribute):  # str methods of 3.9
            assert node.attr not in {"removeprefix", "removesuffix"}


def test_trtexec_output_gives_version_device_and_mean_gpu_time() -> None:
    assert device_agent.parse_trtexec_output(TRTEXEC_82) == {
        "tensorrt_version": "8.2.1",
        "device_name": "NVIDIA Tegra X1",
        "compute_capability": "5.3",
        "gpu_compute_mean_ms": 1.8125,  # not the end-to-end latency's mean
    }
    newer = device_agent.parse_trtexec_output(TRTEXEC_10)
    assert newer["tensorrt_version"] == "10.3.0"
    assert newer["gpu_compute_mean_ms"] == 0.123
    assert newer["device_name"] is None
    help_only = device_agent.parse_trtexec_output("[I] TensorRT version: 8601\n")
    assert help_only["tensorrt_version"] == "8.6.1"
    assert help_only["gpu_compute_mean_ms"] is None


def test_nv_tegra_release_gives_the_l4t_release() -> None:
    assert device_agent.parse_nv_tegra_release(NV_TEGRA_RELEASE) == "32.7.1"
    assert device_agent.parse_nv_tegra_release("# R35 (release), REVISION: 3.1, GCID: 1") == (
        "35.3.1"
    )
    assert device_agent.parse_nv_tegra_release("") is None
    assert device_agent.JETPACK_BY_L4T["32.7.1"] == "4.6.1"


def test_profile_flags_span_batch_1_to_max_batch() -> None:
    assert device_agent.profile_flags("input:4x3x224x224", 32) == [
        "--minShapes=input:1x3x224x224",
        "--optShapes=input:4x3x224x224",
        "--maxShapes=input:32x3x224x224",
    ]


def test_a_failure_message_keeps_the_last_whole_lines() -> None:
    text = "\n".join(f"line {index}" for index in range(1000))
    kept = device_agent.tail(text, 100)
    assert len(kept) <= 100
    assert kept.endswith("line 999")
    assert kept.startswith("line ")


def read_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """{field name: (filename, content)} of a multipart/form-data body, read by email.parser."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    assert message.is_multipart()
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        fields[name] = (part.get_filename(), part.get_payload(decode=True))
    return fields


def test_the_multipart_body_reads_back_with_both_fields_intact() -> None:
    report = json.dumps({"device_name": "NVIDIA Jetson Nano Developer Kit", "note": "é"})
    engine = bytes(range(256)) * 3 + b"\r\n--not-a-boundary\r\n\x00"
    content_type, body = device_agent.encode_multipart(
        {"report": report}, {"engine": ("engine.plan", engine)}
    )
    fields = read_multipart(content_type, body)
    assert set(fields) == {"report", "engine"}
    assert fields["engine"] == ("engine.plan", engine)
    assert json.loads(fields["report"][1].decode("utf-8")) == json.loads(report)


AGENT_KEY = "key-of-the-acme-jetson-agent-001"  # 32 characters: the shortest allowed


@pytest.fixture
def real_api(make_settings: SettingsFactory, tmp_path: Path) -> Iterator[tuple[str, Settings]]:
    """The real app (SQLite, ``AGENT_KEY`` for tenant ``acme``) served by uvicorn on a free port,
    with one succeeded job whose ``jetson-nano`` engine waits and whose model_qdq.onnx exists."""
    settings = make_settings(api_keys={AGENT_KEY: "acme"})
    with session_factory(settings)() as session:
        config = VALID_CONFIG | {"export": {"tensorrt_targets": ["jetson-nano"]}}
        job = make_job(session, tenant="acme", status="succeeded", config=config)
        engines.create_builds(session, job)
        source = tmp_path / "model_qdq.onnx"
        source.write_bytes(b"onnx bytes of the job")
        stored = LocalStorage(settings.data_dir).store_artifact(job.id, "model_qdq.onnx", source)
        jobs.record_artifact(session, job.id, stored)
    with served_by_uvicorn(create_app(settings, sweeper=False)) as port:
        yield f"http://127.0.0.1:{port}", settings


def job_of(settings: Settings) -> dict[str, Any]:
    with session_factory(settings)() as session:
        job = session.scalars(select(Job)).one()
        (build,) = job.engines
        return {
            "build": {
                "status": build.status,
                "report": build.report,
                "error": build.error,
                "lease_expires_at": build.lease_expires_at,
            },
            "artifacts": {
                a.name: LocalStorage(settings.data_dir).absolute(a.path) for a in job.artifacts
            },
        }


def fake_trtexec(
    folder: Path,
    exit_code: int = 0,
    copy_onnx_to: Path | None = None,
    wait_for: Path | None = None,
) -> Path:
    """A stand-in for NVIDIA's trtexec binary (not ours; absent here): prints TRTEXEC_82's
    lines, writes the --saveEngine file, and copies the --onnx file where the test looks.
    With ``wait_for``, it builds until that file appears, as slowly as the test wants."""
    script = folder / "trtexec"
    script.write_text(
        f"#!{sys.executable}\n"
        "import os, shutil, sys, time\n"
        "building = any(arg.startswith('--saveEngine=') for arg in sys.argv)\n"  # not --help
        f"while building and {str(wait_for)!r} != 'None' "
        f"and not os.path.exists({str(wait_for)!r}):\n"
        "    time.sleep(0.05)\n"
        f"sys.stdout.write({TRTEXEC_82!r})\n"
        "for arg in sys.argv[1:]:\n"
        "    if arg.startswith('--saveEngine='):\n"
        "        open(arg.split('=', 1)[1], 'wb').write(b'PLAN')\n"
        f"    if arg.startswith('--onnx=') and {str(copy_onnx_to)!r} != 'None':\n"
        f"        shutil.copy(arg.split('=', 1)[1], {str(copy_onnx_to)!r})\n"
        f"sys.exit({exit_code})\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def agent_args(url: str, trtexec: Path) -> list[str]:
    return ["--url", url, "--target", "jetson-nano", "--api-key", AGENT_KEY, "--once",
            "--builder", "trtexec", "--trtexec", str(trtexec)]  # fmt: skip


def test_one_round_claims_downloads_builds_and_uploads(
    real_api: tuple[str, Settings], tmp_path: Path
) -> None:
    """Against the real API: the claim, the download of the job's model_qdq.onnx (trtexec is
    handed that file), the upload of plan and report, both stored as the job's artifacts."""
    url, settings = real_api
    seen = tmp_path / "onnx-seen-by-trtexec"
    assert device_agent.main(agent_args(url, fake_trtexec(tmp_path, copy_onnx_to=seen))) == 0

    assert seen.read_bytes() == b"onnx bytes of the job"
    job = job_of(settings)
    assert job["build"]["status"] == "succeeded", job
    report = job["build"]["report"]
    assert report["builder"] == "trtexec" and report["precision"] == "int8+fp16"
    assert report["build_flags"] == ["--int8", "--fp16"]
    assert report["timings"]["gpu_compute_mean_ms"] == 1.8125
    assert report["tensorrt_version"] == "8.2.1"
    assert report["device_name"]  # this machine's GPU, or trtexec's "Selected Device"
    assert job["artifacts"]["engine-jetson-nano.plan"].read_bytes() == b"PLAN"
    stored = json.loads(job["artifacts"]["engine-jetson-nano.json"].read_text())
    assert stored == report


def test_a_failed_build_is_reported_and_nothing_waits_is_quiet(
    real_api: tuple[str, Settings], tmp_path: Path
) -> None:
    url, settings = real_api
    args = agent_args(url, fake_trtexec(tmp_path, exit_code=1))
    assert device_agent.main(args) == 0
    assert device_agent.main(args) == 0  # 204: nothing waits

    job = job_of(settings)
    assert job["build"]["status"] == "failed"
    error = job["build"]["error"]
    assert error["code"] == "build_failed"
    assert "trtexec exited with 1" in error["message"]
    assert "GPU Compute Time" in error["message"]  # the end of trtexec's output
    assert len(error["message"]) <= 2000
    assert not [name for name in job["artifacts"] if name.startswith("engine-")]


def test_a_wrong_key_claims_nothing(real_api: tuple[str, Settings], tmp_path: Path) -> None:
    url, settings = real_api
    args = agent_args(url, fake_trtexec(tmp_path))
    args[args.index(AGENT_KEY)] = "not-a-key"
    assert device_agent.main(args) == 1  # 401, reported as an error of this round
    assert job_of(settings)["build"]["status"] == "waiting"


def test_the_agent_renews_its_lease_while_it_builds(
    real_api: tuple[str, Settings], tmp_path: Path
) -> None:
    """A slow build (minutes on a Jetson Nano; here until the test says so): the agent renews
    the build's lease with its token meanwhile, then uploads under the same claim."""
    url, settings = real_api
    release = tmp_path / "release-the-build"
    args = agent_args(url, fake_trtexec(tmp_path, wait_for=release)) + ["--renew-seconds", "0.1"]
    exit_codes: list[int] = []
    agent = threading.Thread(target=lambda: exit_codes.append(device_agent.main(args)))
    agent.start()
    try:
        deadline = time.monotonic() + 30
        while (build := job_of(settings)["build"])["status"] != "building":
            assert time.monotonic() < deadline, build
            time.sleep(0.02)
        first_expiry = build["lease_expires_at"]
        renewed_expiry = first_expiry
        while renewed_expiry <= first_expiry:  # the lease moves on while trtexec still runs
            assert time.monotonic() < deadline, "the lease was not renewed"
            time.sleep(0.05)
            renewed_expiry = job_of(settings)["build"]["lease_expires_at"]
    finally:
        release.touch()
        agent.join(30)
    assert exit_codes == [0]
    job = job_of(settings)
    assert job["build"]["status"] == "succeeded", job
    assert job["artifacts"]["engine-jetson-nano.plan"].read_bytes() == b"PLAN"
