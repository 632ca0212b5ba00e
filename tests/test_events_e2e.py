"""End to end: a real job followed over Server-Sent Events from queued to succeeded.

The real launcher (API + Celery worker) on PostgreSQL and the machine's Redis (the session's
tests.production_service, PROGRESS_EVENT_SECONDS=0.5): the client drops
its connection mid-training, reconnects with Last-Event-ID, and must see every event exactly
once, in order, the same ones the JSON pages list.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.pipeline import STAGES
from tests.factories import VALID_CONFIG, post_job
from tests.production_service import Service
from tests.utils import sse_messages

pytestmark = pytest.mark.e2e

# Enough steps that training lasts seconds, each with a curve point (an event); no speed
# measurement after it.
CONFIG = VALID_CONFIG | {"epochs": None, "steps": 40, "export": {"speed": False}}
SSE = {"Accept": "text/event-stream"}


def follow(client: httpx.Client, url: str, headers: dict[str, str]) -> Iterator[dict[str, Any]]:
    """The events of a stream, as their JSON, until it ends or the caller stops."""
    with client.stream("GET", url, headers=SSE | headers) as response:
        assert response.status_code == 200, response.read()
        for message in sse_messages(response.iter_lines()):
            if message.comment is None:
                assert message.data is not None
                event = json.loads(message.data)
                assert (str(event["id"]), event["type"]) == (message.id, message.event)
                yield event


def test_a_job_followed_over_sse_with_a_reconnect_mid_training(
    production_service: Service, onnx_model: Path, image_archive: Path
) -> None:
    # The session's service (tests.production_service): a progress event every half second.
    service = production_service
    with httpx.Client(base_url=service.url, timeout=60) as api:
        submitted = post_job(api, model=onnx_model, data=image_archive, config=CONFIG)
        assert submitted.status_code == 202, submitted.text
        url = f"/v1/jobs/{submitted.json()['id']}/events"

        before: list[dict[str, Any]] = []
        stage = None
        for event in follow(api, url, {}):
            before.append(event)
            if event["type"] == "stage":
                stage = event["data"]["stage"]
            if stage == "training" and event["type"] in ("progress", "metrics"):
                break  # the connection drops here, mid-training
        assert stage == "training", f"the stream ended before training:\n{service.log_tail()}"
        after = list(follow(api, url, {"Last-Event-ID": str(before[-1]["id"])}))
        listed = api.get(url, params={"limit": 500}).json()
        job = api.get(f"/v1/jobs/{submitted.json()['id']}").json()

    seen = before + after
    assert [event["id"] for event in seen] == list(range(1, len(seen) + 1))
    assert {"status", "stage", "progress"} <= {event["type"] for event in seen}
    assert seen[0]["data"] == {"status": "queued"}
    assert seen[-1]["type"] == "status" and seen[-1]["data"]["status"] == "succeeded", (
        service.log_tail()
    )
    # The client dropped mid-training: training's later points and its end came after.
    resumed_types = [event["type"] for event in after]
    end_of_training = resumed_types.index("stage")
    assert after[end_of_training]["data"]["previous"] == "training"
    assert "metrics" in resumed_types[:end_of_training]
    assert not listed["has_more"] and listed["job_status"] == "succeeded"
    assert [(e["id"], e["type"]) for e in listed["items"]] == [(e["id"], e["type"]) for e in seen]
    # Where the time went: each stage's seconds, on the job as in its last event.
    stage_seconds = seen[-1]["data"]["stage_seconds"]
    assert list(stage_seconds) == list(STAGES) and stage_seconds["training"] > 0
    assert job["stage_seconds"] == stage_seconds
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
