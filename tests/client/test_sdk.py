"""The Python SDK (client/sqakd_client) against the real service of tests/live_service.py:
uploads, jobs from paths and from ids, waiting with a bar, events paged and followed, downloads,
a sweep, webhooks, each error path, and, through tests/cutting_proxy.py, a cut event stream, a
cut download and a create whose answer was lost, each resumed or retried by the SDK.

One job trained from local files serves most tests (module fixture); a second, made through
the proxy, is canceled; a sweep trains two more.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import standardwebhooks
from sqakd_client import (
    Client,
    ConnectionFailed,
    Dataset,
    Event,
    InvalidRequest,
    Job,
    Model,
    NotFound,
    Unauthorized,
    WaitTimeout,
    WebhookVerificationError,
    verify_webhook,
)

from tests.cutting_proxy import CuttingProxy
from tests.live_service import TINY_CONFIG, LiveService, TinyInputs
from tests.utils import free_port

SUITE = f"sdk-{uuid.uuid4().hex[:8]}"  # this module's jobs, by metadata
WAIT_S = 120
# Reachable by DNS-free resolution and public, as webhook targets must be with API keys; the
# hook listens for engine builds only, which no job here asks for: nothing is ever sent.
PUBLIC_HOOK_URL = "https://93.184.215.14/hooks/sqakd"


@dataclass(frozen=True)
class Stored:
    model: Model
    data: Dataset
    eval_data: Dataset


@dataclass(frozen=True)
class FinishedJob:
    job: Job
    seen: list[Event]  # by wait's on_event
    stdout: str
    stderr: str


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def client(live_service: LiveService) -> Iterator[Client]:
    with Client(live_service.url, live_service.api_key, timeout=30) as client:
        yield client


@pytest.fixture
def proxy(live_service: LiveService) -> Iterator[CuttingProxy]:
    with CuttingProxy(live_service.url) as proxy:
        yield proxy


@pytest.fixture
def proxied(proxy: CuttingProxy, live_service: LiveService) -> Iterator[Client]:
    with Client(proxy.url, live_service.api_key, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def stored(client: Client, tiny_inputs: TinyInputs) -> Stored:
    return Stored(
        client.models.upload(tiny_inputs.model),
        client.datasets.upload(tiny_inputs.data),
        client.datasets.upload(tiny_inputs.eval_data, progress=True),
    )


@pytest.fixture(scope="module")
def finished(client: Client, tiny_inputs: TinyInputs, stored: Stored) -> FinishedJob:
    """A job created from local paths and waited for with the bar; stdout and stderr kept."""
    seen: list[Event] = []
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        job = client.jobs.create(
            model=tiny_inputs.model,
            data=str(tiny_inputs.data),
            eval_data=tiny_inputs.eval_data,
            config=TINY_CONFIG,
            metadata={"suite": SUITE, "case": "paths"},
            progress=True,
        )
        job.wait(progress=True, timeout=WAIT_S, on_event=seen.append)
    return FinishedJob(job, seen, stdout.getvalue(), stderr.getvalue())


def test_uploads_are_stored_once_by_content(
    client: Client, tiny_inputs: TinyInputs, stored: Stored
) -> None:
    again = client.models.upload(str(tiny_inputs.model))
    assert again.id == stored.model.id and again.sha256 == sha256_of(tiny_inputs.model)
    assert again.size == tiny_inputs.model.stat().st_size
    assert again.info["input_shape"][1] == 3
    assert client.datasets.upload(tiny_inputs.data).id == stored.data.id
    assert stored.eval_data.info["class_names"] == list(tiny_inputs.class_names)
    assert client.models.get(stored.model.id).sha256 == stored.model.sha256
    assert stored.data in list(client.datasets.list(page_size=1))


def test_a_job_from_paths_waits_to_success_with_a_bar_on_stderr(
    finished: FinishedJob, stored: Stored
) -> None:
    job = finished.job
    assert job.status == "succeeded", job.error
    assert job.is_final and job.metrics["agreement"] is not None
    # The paths were uploaded once more, and found stored: the job names the same resources.
    assert job.data["inputs"]["model"]["id"] == stored.model.id
    assert job.data["inputs"]["eval_data"]["id"] == stored.eval_data.id
    assert finished.stdout == ""
    assert "succeeded" in finished.stderr and "12/12" in finished.stderr
    ids = [event.id for event in finished.seen]
    assert ids == list(range(1, len(ids) + 1))
    assert finished.seen[-1].type == "status" and finished.seen[-1].data["status"] == "succeeded"


def test_events_paged_and_followed_from_an_id(finished: FinishedJob) -> None:
    paged = list(finished.job.events())
    assert [event.id for event in paged] == [event.id for event in finished.seen]
    assert {"status", "stage", "progress", "metrics"} <= {event.type for event in paged}
    followed = list(finished.job.events(follow=True, after=5))
    assert followed == paged[5:]
    assert list(finished.job.events(follow=True, after=paged[-1].id)) == []  # ends, final


def test_a_cut_event_stream_resumes_with_last_event_id(
    finished: FinishedJob, proxy: CuttingProxy, proxied: Client
) -> None:
    events_path = f"/v1/jobs/{finished.job.id}/events"
    proxy.cut_next("GET", events_path, after_bytes=2000)
    followed = list(proxied.jobs.get(finished.job.id).events(follow=True))
    assert followed == list(finished.job.events())  # every event once, in order
    streams = [r for r in proxy.requests if r.target.startswith(events_path)]
    assert proxy.cuts == 1 and len(streams) == 2
    resumed_after = int(streams[1].headers["last-event-id"])
    assert 0 < resumed_after < len(followed)
    assert streams[1].target == f"{events_path}?after={resumed_after}"


def test_download_checks_sha256_and_resumes_a_cut_with_range(
    finished: FinishedJob, proxy: CuttingProxy, proxied: Client, tmp_path: Path
) -> None:
    artifacts = {item["name"]: item for item in finished.job.artifacts}
    largest = max(artifacts.values(), key=lambda item: item["size"])
    path = f"/v1/jobs/{finished.job.id}/artifacts/{largest['name']}"
    proxy.cut_next("GET", path, after_bytes=1024 + largest["size"] // 2)
    files = proxied.jobs.get(finished.job.id).download(tmp_path, progress=True)
    assert sorted(file.name for file in files) == sorted(artifacts)
    for file in files:
        assert sha256_of(file) == artifacts[file.name]["sha256"]
    assert not list(tmp_path.glob("*.part"))
    tries = [r for r in proxy.requests if r.target == path]
    assert proxy.cuts == 1 and len(tries) == 2 and "range" not in tries[0].headers
    have = int(tries[1].headers["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < have < largest["size"]
    # Everything is there and right: a second call fetches nothing but the listing.
    before = len(proxy.requests)
    proxied.jobs.get(finished.job.id).download(tmp_path, names=[largest["name"]])
    assert [r.target for r in proxy.requests[before:]] == [
        f"/v1/jobs/{finished.job.id}",
        f"/v1/jobs/{finished.job.id}/artifacts",
    ]


def test_a_create_whose_answer_was_lost_is_retried_into_one_job(
    finished: FinishedJob, stored: Stored, proxy: CuttingProxy, proxied: Client, client: Client
) -> None:
    proxy.swallow_next("POST", "/v1/jobs")
    job = proxied.jobs.create(
        model=stored.model,
        data=stored.data.id,
        config=TINY_CONFIG,
        metadata={"suite": SUITE, "case": "retried"},
        steps=100_000,  # canceled long before it could finish
    )
    posts = [r for r in proxy.requests if r.method == "POST" and r.target == "/v1/jobs"]
    assert proxy.cuts == 1 and len(posts) == 2
    assert posts[0].headers["idempotency-key"] == posts[1].headers["idempotency-key"]
    mine = list(client.jobs.list(metadata={"suite": SUITE, "case": "retried"}))
    assert [j.id for j in mine] == [job.id]
    assert job.config["steps"] == 100_000 and job.data["inputs"]["data"]["id"] == stored.data.id

    with pytest.raises(WaitTimeout):
        job.wait(timeout=0.5)
    assert job.cancel().data["cancel_requested"]
    assert job.wait(timeout=WAIT_S).status == "canceled"
    # Both of this module's jobs, a page at a time; by status too.
    paged = [j.id for j in client.jobs.list(metadata={"suite": SUITE}, page_size=1)]
    assert paged == [job.id, finished.job.id]  # newest first
    assert [j.id for j in client.jobs.list(status=["canceled"], metadata={"suite": SUITE})] == [
        job.id
    ]
    job.delete()
    with pytest.raises(NotFound) as missing:
        client.jobs.get(job.id)
    assert missing.value.code == "job_not_found" and missing.value.status_code == 404


def test_errors_are_typed_with_the_api_code(
    live_service: LiveService, client: Client, stored: Stored, proxy: CuttingProxy, proxied: Client
) -> None:
    with (
        Client(live_service.url, api_key="not-the-key") as stranger,
        pytest.raises(Unauthorized) as refused,
    ):
        stranger.jobs.get(str(uuid.uuid4()))
    assert refused.value.code == "unauthorized" and refused.value.status_code == 401
    assert str(refused.value).startswith("unauthorized: ") and "(HTTP 401)" in str(refused.value)

    with pytest.raises(InvalidRequest) as invalid:
        client.jobs.create(model=stored.model, data=stored.data, weight_bits=99)
    assert invalid.value.code == "invalid_config" and "weight_bits" in invalid.value.message

    for missing_file in ("no/such/teacher.onnx", Path("missing.zip")):
        with pytest.raises(FileNotFoundError):
            proxied.jobs.create(model=missing_file, data=stored.data)
    assert proxy.requests == []  # refused before any request

    with pytest.raises(NotFound) as unknown:
        client.sweeps.get(str(uuid.uuid4()))
    assert unknown.value.code == "sweep_not_found"

    started = time.monotonic()
    with (
        Client(f"http://127.0.0.1:{free_port()}", retries=1) as nowhere,
        pytest.raises(ConnectionFailed) as unreachable,
    ):
        nowhere.jobs.get("x")
    assert unreachable.value.code == "connection_failed" and time.monotonic() - started < 5


def test_a_sweep_runs_to_its_pareto_table(
    client: Client, stored: Stored, finished: FinishedJob, tmp_path: Path
) -> None:
    sweep = client.sweeps.create(
        model=stored.model,
        data=stored.data,
        eval_data=stored.eval_data,
        grid={"weight_bits": [8, 4], "activation_bits": [8, 4]},
        base_config=TINY_CONFIG,
        metadata={"suite": SUITE, "case": "sweep"},
    )
    assert sweep.wait(timeout=WAIT_S, poll_interval=0.5) is sweep
    assert sweep.status == "completed" and sweep.counts["succeeded"] == 2
    title, header, *rows = sweep.table().splitlines()
    assert title.startswith(f"sweep {sweep.id}: completed (2 succeeded)")
    assert header.split()[:4] == ["config", "status", "agreement", "top-1"]
    assert [row.lstrip("* ").split()[0] for row in rows] == ["W8A8", "W4A4"]
    assert all("succeeded" in row and "KiB" in row for row in rows)
    assert sum(row.endswith("<- recommended") for row in rows) == 1
    assert {job.sweep_id for job in sweep.jobs()} == {sweep.id}
    files = sweep.download(tmp_path)
    assert {file.name for file in files} == {"report.html", "pareto.svg"}
    listed = {item["name"]: item["sha256"] for item in sweep.artifacts}
    assert all(sha256_of(file) == listed[file.name] for file in files)


def test_webhooks_and_their_signature_check(client: Client) -> None:
    hook = client.webhooks.create(PUBLIC_HOOK_URL, ["engine.failed"])
    try:
        assert hook.secret.startswith("whsec_") and hook.events == ["engine.failed"]
        assert client.webhooks.get(hook.id).secret is None  # shown once
        assert hook in list(client.webhooks.list())
        first = hook.secret
        assert hook.rotate_secret().secret not in (None, first)
        assert hook.previous_secret_expires_at is not None  # the first still signs, for a day
        assert hook.rotate_secret(grace_seconds=0).previous_secret_expires_at is None
        assert list(hook.deliveries()) == []
    finally:
        hook.delete()
    with pytest.raises(NotFound):
        client.webhooks.get(hook.id)

    # A delivery signed by the Standard Webhooks library itself, as the service signs them.
    signer = standardwebhooks.Webhook(hook.secret)
    body = b'{"type": "job.succeeded", "data": {"id": "j1"}}'
    now = int(time.time())
    headers = {
        "Webhook-Id": "msg_1",
        "webhook-timestamp": str(now),
        "webhook-signature": signer.sign("msg_1", _utc(now), body),
    }
    assert verify_webhook(hook.secret, body, headers) == {
        "type": "job.succeeded",
        "data": {"id": "j1"},
    }
    assert verify_webhook(hook.secret, body.decode(), headers)["data"]["id"] == "j1"
    stale = {**headers, "webhook-timestamp": str(now - 600)}
    stale["webhook-signature"] = signer.sign("msg_1", _utc(now - 600), body)
    for secret, sent, sent_headers in (
        (hook.secret, body.replace(b"j1", b"j2"), headers),  # tampered body
        (first, body, headers),  # the rotated-away secret
        (hook.secret, body, stale),  # a replay, 10 minutes late
        (hook.secret, body, {"webhook-id": "msg_1"}),  # not signed at all
    ):
        with pytest.raises(WebhookVerificationError):
            verify_webhook(secret, sent, sent_headers)


def _utc(timestamp: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, tz=dt.UTC)
