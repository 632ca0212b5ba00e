"""Webhooks end to end: a real Celery worker on the webhooks queue delivers a job's cancellation
to an HTTP server of this test, whose every request the standardwebhooks package verifies; a
receiver that answers 500 once gets a second, signed attempt, and the deliveries log shows both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import standardwebhooks

from core import webhooks
from core.db import session_factory
from core.settings import Settings
from tests.factories import make_job
from tests.utils import REPO_ROOT, SERVICE_ENV, SettingsFactory, make_client, stop_process

pytestmark = pytest.mark.e2e

DELIVERY_TIMEOUT_S = 30


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that keeps every request; ``/flaky`` answers 500 once,
    ``/redirect`` 302 to ``/ok``."""

    port: int = 0
    requests: list[Received] = field(default_factory=list)

    def on(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    received = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            headers = {name.lower(): value for name, value in self.headers.items()}
            received.requests.append(Received(self.path, headers, body))
            first_flaky = self.path == "/flaky" and len(received.on("/flaky")) == 1
            redirect = self.path == "/redirect"
            self.send_response(500 if first_flaky else 302 if redirect else 200)
            if redirect:
                self.send_header("Location", "/ok")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    received.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield received
    server.shutdown()
    thread.join(5)


@pytest.fixture
def webhook_settings(make_settings: SettingsFactory, redis_db: str, queue_name: str) -> Settings:
    return make_settings(
        broker_url=redis_db,
        train_queue=f"{queue_name}-train",  # nobody trains: a job stays queued
        webhook_queue=queue_name,
        webhook_retry_schedule_seconds=[0.2, 0.5],
    )


@pytest.fixture
def webhook_worker(webhook_settings: Settings, tmp_path: Path) -> Iterator[Path]:
    """``celery worker -Q <webhooks queue> --pool threads``, as scripts/serve.py starts it."""
    settings = webhook_settings
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_ENV} | {
        "SQAKD_DATA_DIR": str(settings.data_dir),
        "DATABASE_URL": settings.sqlalchemy_url,
        "BROKER_URL": settings.celery_broker_url,
        "TRAIN_QUEUE": settings.train_queue,
        "WEBHOOK_QUEUE": settings.webhook_queue,
        "WEBHOOK_RETRY_SCHEDULE_SECONDS": json.dumps(settings.webhook_retry_schedule_seconds),
    }
    argv = [
        sys.executable, "-m", "celery", "-A", "worker.webhook_app", "worker",
        "--queues", settings.webhook_queue, "--hostname", f"{settings.webhook_queue}@%h",
        "--pool", "threads", "--concurrency", "4",
        "--without-mingle", "--without-gossip", "--loglevel", "INFO",
    ]  # fmt: skip
    log = tmp_path / "webhook-worker.log"
    with log.open("wb") as output:
        worker = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        yield log
    finally:
        stop_process(worker, timeout_s=20)


def test_a_canceled_job_is_delivered_signed_and_retried(
    webhook_settings: Settings, webhook_worker: Path, receiver: Receiver
) -> None:
    client = make_client(webhook_settings)  # its app dispatches to this broker and queue
    base = f"127.0.0.1:{receiver.port}"
    steady = client.post(
        "/v1/webhooks",
        json={"url": f"http://localhost:{receiver.port}/ok", "events": ["job.canceled"]},
    ).json()
    flaky = client.post(
        "/v1/webhooks",
        json={"url": f"http://{base}/flaky", "events": ["job.succeeded", "job.canceled"]},
    ).json()
    with session_factory(webhook_settings)() as session:
        job = make_job(session)

    assert client.post(f"/v1/jobs/{job.id}/cancel").json()["status"] == "canceled"

    def deliveries(webhook: dict[str, str]) -> list[dict[str, Any]]:
        return client.get(f"/v1/webhooks/{webhook['id']}/deliveries").json()["items"]

    # Until the worker has recorded the attempts (each after its receiver answered).
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while len(deliveries(steady)) < 1 or len(deliveries(flaky)) < 2:
        assert time.monotonic() < deadline, webhook_worker.read_text(errors="replace")[-4000:]
        time.sleep(0.1)

    for received, webhook in [(r, steady) for r in receiver.on("/ok")] + [
        (r, flaky) for r in receiver.on("/flaky")
    ]:
        payload = standardwebhooks.Webhook(webhook["secret"]).verify(
            received.body, received.headers
        )
        assert payload["type"] == "job.canceled" and payload["data"] == {"id": job.id}
    (delivered,) = receiver.on("/ok")
    assert delivered.headers["host"] == f"localhost:{receiver.port}"  # the URL's, not the IP's
    first, second = receiver.on("/flaky")
    assert first.headers["webhook-id"] == second.headers["webhook-id"]  # one message, retried
    assert first.body == second.body

    log = deliveries(flaky)
    assert [(d["attempt"], d["status_code"]) for d in log] == [(2, 200), (1, 500)]
    assert log[1]["error"].startswith("HTTP 500")
    assert {d["message_id"] for d in log} == {first.headers["webhook-id"]}
    steady_log = deliveries(steady)
    assert [(d["attempt"], d["status_code"], d["event_type"]) for d in steady_log] == [
        (1, 200, "job.canceled")
    ]


def test_a_post_goes_only_to_checked_addresses_and_follows_no_redirect(
    receiver: Receiver,
) -> None:
    """127.0.0.2 refuses (the server listens on 127.0.0.1 only): the next checked address is
    tried; a 302 is an answer (a failed attempt), not a way to another URL."""
    url = httpx.URL(f"http://localhost:{receiver.port}/redirect")
    target = webhooks.Target(url, ["127.0.0.2", "127.0.0.1"])

    status_code, _ = webhooks.post_pinned(target, {"webhook-id": "msg_1"}, b"{}", 5)

    assert status_code == 302
    assert [r.path for r in receiver.requests] == ["/redirect"]
    assert receiver.requests[0].headers["host"] == f"localhost:{receiver.port}"
    with pytest.raises(httpx.ConnectError):
        webhooks.post_pinned(webhooks.Target(url, ["127.0.0.2"]), {}, b"{}", 5)
