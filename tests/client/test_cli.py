"""The ``sqakd`` command line as a person runs it: a real subprocess against the real service
(``live_service``), keyed through ``SQAKD_URL`` and ``SQAKD_API_KEY``.

Three tiny jobs in all (one waited quantize, a two-job sweep) plus one canceled before it
trains; every other check reuses them or fails before a job exists.
"""

from __future__ import annotations

import hashlib
import json
import re
import select
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.factories import png_bytes, zip_archive
from tests.live_service import TINY_CONFIG, LiveService, TinyInputs

CLI = [sys.executable, "-m", "sqakd_client.cli"]
JOB_TIMEOUT_S = 180
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def cli_env(service: LiveService, api_key: str | None = None) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "SQAKD_URL": service.url,
        "SQAKD_API_KEY": api_key or service.api_key,
    }


def sqakd(
    service: LiveService, *args: str | Path, api_key: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(str, args)],
        env=cli_env(service, api_key),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )


def api(service: LiveService, path: str, method: str = "GET") -> Any:
    headers = {"Authorization": f"Bearer {service.api_key}"}
    response = httpx.request(method, f"{service.url}{path}", headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()


def items(service: LiveService, collection: str) -> list[dict[str, Any]]:
    """Every page of ``/v1/<collection>``."""
    found, cursor = [], ""
    while True:
        page = api(service, f"/v1/{collection}?limit=100{cursor}")
        found += page["items"]
        if not page.get("next_cursor"):
            return found
        cursor = f"&cursor={page['next_cursor']}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_config() -> str:
    return json.dumps(TINY_CONFIG)


def job_id_in(text: str) -> str:
    found = re.search(rf"job ({UUID})", text)
    assert found, text
    return found.group(1)


def sweep_rows(text: str) -> list[str]:
    """The table's job rows: an optional front star, then the label."""
    return [line for line in text.splitlines() if re.match(r"\s*\*?\s*W(8A8|4A4) lsq ", line)]


@pytest.fixture(scope="module")
def suite_tag() -> str:
    """A metadata value only this module's jobs carry (the service is shared)."""
    return f"cli-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def waited(
    live_service: LiveService,
    tiny_inputs: TinyInputs,
    suite_tag: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], str, Path]:
    """``sqakd quantize ... --wait -o DIR``: the run, its job id, its directory."""
    directory = tmp_path_factory.mktemp("cli") / "results"
    run = sqakd(
        live_service,
        "quantize", tiny_inputs.model, tiny_inputs.data,
        "--eval", tiny_inputs.eval_data,
        "--bits", "4", "--activation-bits", "8",  # the flag wins over --bits and --config
        "--config", tiny_config(),
        "--metadata", f"suite={suite_tag}",
        "--wait", "-o", directory,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    return run, job_id_in(run.stdout), directory


def test_quantize_waits_shows_the_metrics_and_downloads_every_artifact(
    live_service: LiveService, waited: tuple[subprocess.CompletedProcess[str], str, Path]
) -> None:
    run, job_id, directory = waited
    for shown in (
        "teacher/student agreement",
        "KL(teacher || student)",
        "student top-1",
        "size fp32 -> packed",
        "KiB",
        "ONNX parity",
        "TensorRT rules",
        "images/s",
    ):
        assert shown in run.stdout, run.stdout
    items = api(live_service, f"/v1/jobs/{job_id}/artifacts")["items"]
    assert {item["name"] for item in items} >= {"model_qdq.onnx", "metrics.json"}
    for item in items:
        assert sha256(directory / item["name"]) == item["sha256"]
        assert item["name"] in run.stdout
    assert str(directory.resolve()) in run.stdout

    job = json.loads(sqakd(live_service, "jobs", "get", job_id, "--json").stdout)
    assert job["status"] == "succeeded"
    assert job["config"]["weight_bits"] == 4 and job["config"]["activation_bits"] == 8
    assert job["config"]["steps"] == TINY_CONFIG["steps"]


def test_jobs_list_filters_by_metadata_in_a_table_and_as_json(
    live_service: LiveService, waited: tuple[Any, str, Path], suite_tag: str
) -> None:
    job_id = waited[1]
    table = sqakd(live_service, "jobs", "list", "--metadata", f"suite={suite_tag}")
    assert table.returncode == 0 and job_id in table.stdout and "succeeded" in table.stdout
    listed = json.loads(
        sqakd(live_service, "jobs", "list", "--metadata", f"suite={suite_tag}", "--json").stdout
    )
    assert [job["id"] for job in listed] == [job_id]


def test_events_print_one_line_each_and_resume_after_an_id(
    live_service: LiveService, waited: tuple[Any, str, Path]
) -> None:
    job_id = waited[1]
    run = sqakd(live_service, "jobs", "events", job_id)
    assert run.returncode == 0
    lines = run.stdout.splitlines()
    ids = [int(line.split()[0]) for line in lines]
    assert ids == list(range(1, len(ids) + 1))
    assert re.search(r"\bstatus\s+succeeded\b", lines[-1]), lines[-1]
    resumed = json.loads(
        sqakd(live_service, "jobs", "events", job_id, "--after", "3", "--json").stdout
    )
    assert [event["id"] for event in resumed] == ids[3:]
    followed = sqakd(live_service, "jobs", "events", job_id, "-f", "--after", str(len(ids) - 1))
    assert followed.stdout.splitlines() == lines[-1:]  # a final job: its stream ends at once


def test_download_into_a_fresh_directory(
    live_service: LiveService, waited: tuple[Any, str, Path], tmp_path: Path
) -> None:
    job_id = waited[1]
    names = ["metrics.json", "model_qdq.onnx"]
    run = sqakd(live_service, "download", job_id, "-o", tmp_path / "fresh",
                "--name", names[0], "--name", names[1], "--json")  # fmt: skip
    assert run.returncode == 0, run.stderr
    document = json.loads(run.stdout)
    assert sorted(path.name for path in (tmp_path / "fresh").iterdir()) == names
    artifacts = {
        item["name"]: item for item in api(live_service, f"/v1/jobs/{job_id}")["artifacts"]
    }
    for file in document["files"]:
        assert sha256(Path(file["path"])) == artifacts[file["name"]]["sha256"] == file["sha256"]


def test_sweep_waits_and_prints_its_pareto_table(
    live_service: LiveService, waited: tuple[Any, str, Path]
) -> None:
    inputs = api(live_service, f"/v1/jobs/{waited[1]}")["inputs"]  # stored ids: no upload
    config = json.dumps({**TINY_CONFIG, "weight_bits": 2, "activation_bits": 2})  # the grid wins
    run = sqakd(live_service, "sweep", inputs["model"]["id"], inputs["data"]["id"],
                "--eval", inputs["eval_data"]["id"], "--bits", "8,4", "--method", "lsq",
                "--config", config, "--wait")  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    rows = sweep_rows(run.stdout)
    assert len(rows) == 2 and all("succeeded" in row and "KiB" in row for row in rows), rows
    assert any(row.lstrip().startswith("*") for row in rows)
    assert sum("<- recommended" in row for row in rows) == 1
    sweep_id = re.search(rf"sweep ({UUID})", run.stdout).group(1)
    again = sqakd(live_service, "sweeps", "get", sweep_id)
    assert sweep_rows(again.stdout) == rows


def test_a_waited_job_canceled_from_another_command_exits_1(
    live_service: LiveService, tiny_inputs: TinyInputs
) -> None:
    # --steps wins over --config's: a job long enough to be canceled before it ends
    args = ["quantize", tiny_inputs.model, tiny_inputs.data, "--config", tiny_config()]
    waiting = subprocess.Popen(
        [*CLI, *map(str, args), "--steps", "100000", "--wait"],
        env=cli_env(live_service),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    job_id = ""
    follower: subprocess.Popen[str] | None = None
    try:
        assert waiting.stdout is not None
        job_id = job_id_in(waiting.stdout.readline())
        # Followed as JSON Lines: the first event comes while the job runs, not at its end.
        follower = subprocess.Popen(
            [*CLI, "jobs", "events", job_id, "-f", "--json"],
            env=cli_env(live_service),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert follower.stdout is not None
        readable, _, _ = select.select([follower.stdout], [], [], JOB_TIMEOUT_S)
        assert readable, "no event line while the job ran"
        first = json.loads(follower.stdout.readline())
        cancel = sqakd(live_service, "jobs", "cancel", job_id)
        assert cancel.returncode == 0 and job_id in cancel.stdout
        stdout, stderr = waiting.communicate(timeout=JOB_TIMEOUT_S)
        followed = follower.stdout.read()  # to the end of the stream, past what readline buffered
        follower.wait(timeout=JOB_TIMEOUT_S)
    finally:
        waiting.kill()
        if follower is not None:
            follower.kill()
        if job_id:  # whatever happened, free the shared worker
            api(live_service, f"/v1/jobs/{job_id}/cancel", method="POST")
    rest = [json.loads(line) for line in followed.splitlines()]
    assert first["id"] == 1 and [event["id"] for event in rest] == list(range(2, len(rest) + 2))
    assert (rest[-1]["type"], rest[-1]["data"]["status"]) == ("status", "canceled")
    assert waiting.returncode == 1, stdout + stderr
    assert "status   canceled" in stdout
    assert f"error: job_canceled: job {job_id} ended canceled" in stderr
    assert sqakd(live_service, "jobs", "delete", job_id).returncode == 0
    gone = sqakd(live_service, "jobs", "get", job_id)
    assert gone.returncode == 1 and "error: job_not_found:" in gone.stderr


def test_a_bad_key_exits_1_with_unauthorized(live_service: LiveService) -> None:
    run = sqakd(live_service, "jobs", "list", "--json", api_key="not-the-key")
    assert run.returncode == 1
    assert "error: unauthorized:" in run.stderr
    assert json.loads(run.stdout)["error"]["code"] == "unauthorized"
    assert json.loads(run.stdout)["error"]["status"] == 401


def test_a_bad_config_exits_1_with_the_apis_code(
    live_service: LiveService, waited: tuple[Any, str, Path]
) -> None:
    inputs = api(live_service, f"/v1/jobs/{waited[1]}")["inputs"]
    run = sqakd(live_service, "quantize", inputs["model"]["id"], inputs["data"]["id"],
                "--bits", "99")  # fmt: skip
    assert run.returncode == 1
    assert "error: invalid_config:" in run.stderr and "weight_bits" in run.stderr
    assert run.stdout == ""


def test_a_missing_file_exits_1_before_any_upload(
    live_service: LiveService, tiny_inputs: TinyInputs, tmp_path: Path
) -> None:
    # DATA exists and was never stored (its one image has a name no other test uses)
    fresh_data = zip_archive(tmp_path / "fresh.zip", {f"cats/{uuid.uuid4()}.png": png_bytes(1)})
    run = sqakd(live_service, "quantize", tiny_inputs.model, fresh_data,
                "--eval", tmp_path / "missing.zip", "--bits", "4")  # fmt: skip
    assert run.returncode == 1
    assert "error: file_not_found:" in run.stderr and "missing.zip" in run.stderr
    assert sha256(fresh_data) not in {
        dataset["sha256"] for dataset in items(live_service, "datasets")
    }


def test_usage_errors_exit_2(live_service: LiveService) -> None:
    assert sqakd(live_service, "quantize").returncode == 2
    run = sqakd(live_service, "jobs", "list", "--config", "{")
    assert run.returncode == 2
    bad_json = sqakd(live_service, "sweep", "m", "d", "--bits", "8,4", "--config", "{")
    assert bad_json.returncode == 2 and "not valid JSON" in bad_json.stderr
