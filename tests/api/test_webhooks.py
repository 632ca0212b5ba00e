"""/v1/webhooks on the real app and database: the secret shown once, rotation, deletion, the
deliveries log, bad input and other tenants."""

from __future__ import annotations

import datetime as dt

import httpx
import pytest
import redis
import standardwebhooks
from sqlalchemy import select

from api.main import redispatch_webhooks
from core import webhooks
from core.db import session_factory
from core.models import WebhookAttempt, WebhookMessage, utcnow
from core.settings import Settings
from tests.api.test_auth import KEY_OF_A, KEY_OF_B, KEYS, bearer
from tests.utils import SettingsFactory, make_client

PUBLIC_URL = "http://93.184.216.34/hooks"  # a literal: resolves without a network
EVENTS = ["job.succeeded", "job.failed"]


@pytest.fixture
def keyed(make_settings: SettingsFactory) -> Settings:
    return make_settings(api_keys=KEYS)


@pytest.fixture
def keyed_client(keyed: Settings) -> httpx.Client:
    return make_client(keyed)


def create(client: httpx.Client, url: str = PUBLIC_URL, **kwargs: object) -> httpx.Response:
    return client.post("/v1/webhooks", json={"url": url, "events": EVENTS}, **kwargs)  # type: ignore[arg-type]


def test_secret_is_shown_on_creation_and_rotation_only(client: httpx.Client) -> None:
    created = create(client)
    assert created.status_code == 201, created.text
    webhook = created.json()
    assert webhook["url"] == PUBLIC_URL and webhook["events"] == EVENTS
    secret = webhook["secret"]
    assert secret.startswith("whsec_")
    standardwebhooks.Webhook(secret)  # a key the reference implementation accepts
    path = f"/v1/webhooks/{webhook['id']}"

    fetched = client.get(path).json()
    assert "secret" not in fetched and fetched["id"] == webhook["id"]
    listed = client.get("/v1/webhooks").json()
    assert [w["id"] for w in listed["items"]] == [webhook["id"]]
    assert "secret" not in listed["items"][0] and listed["next_cursor"] is None

    rotated = client.post(f"{path}/rotate-secret")
    assert rotated.status_code == 200
    assert rotated.json()["secret"].startswith("whsec_") and rotated.json()["secret"] != secret
    # The old secret signs too for a day, unless the rotation says otherwise.
    grace_ends = dt.datetime.fromisoformat(rotated.json()["previous_secret_expires_at"])
    assert abs(grace_ends - utcnow() - dt.timedelta(days=1)) < dt.timedelta(minutes=1)
    shown = client.get(path).json()["previous_secret_expires_at"]
    assert dt.datetime.fromisoformat(shown) == grace_ends
    revoked = client.post(f"{path}/rotate-secret", json={"grace_seconds": 0})
    assert revoked.status_code == 200 and revoked.json()["previous_secret_expires_at"] is None
    for grace in (-1, 7 * 86400 + 1):
        refused = client.post(f"{path}/rotate-secret", json={"grace_seconds": grace})
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_request"

    changed = client.patch(path, json={"events": ["job.canceled"]})
    assert changed.status_code == 200 and changed.json()["events"] == ["job.canceled"]

    assert client.delete(path).status_code == 204
    assert client.get(path).status_code == 404
    assert client.delete(path).json()["error"]["code"] == "webhook_not_found"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"url": PUBLIC_URL, "events": ["job.exploded"]}, "invalid_request"),
        ({"url": PUBLIC_URL, "events": []}, "invalid_request"),
        ({"url": PUBLIC_URL}, "invalid_request"),
        ({"url": "ftp://93.184.216.34/x", "events": EVENTS}, "invalid_webhook_url"),
        ({"url": "not a url", "events": EVENTS}, "invalid_webhook_url"),
        ({"url": "http://10.0.0.5/hook", "events": EVENTS}, "webhook_target_forbidden"),
        ({"url": "http://169.254.169.254/", "events": EVENTS}, "webhook_target_forbidden"),
        ({"url": "http://[::ffff:192.168.0.1]/", "events": EVENTS}, "webhook_target_forbidden"),
    ],
)
def test_bad_webhooks_are_422(client: httpx.Client, body: dict[str, object], code: str) -> None:
    response = client.post("/v1/webhooks", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == code


def test_loopback_is_allowed_keyless_and_refused_with_keys(
    client: httpx.Client, keyed_client: httpx.Client
) -> None:
    assert create(client, "http://127.0.0.1:8123/hook").status_code == 201
    refused = create(keyed_client, "http://localhost:8123/hook", headers=bearer(KEY_OF_A))
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "webhook_target_forbidden"


def test_other_tenants_webhooks_are_404(keyed_client: httpx.Client) -> None:
    webhook = create(keyed_client, headers=bearer(KEY_OF_B)).json()
    path = f"/v1/webhooks/{webhook['id']}"
    as_a = bearer(KEY_OF_A)
    for method, url in (
        ("GET", path),
        ("PATCH", path),
        ("DELETE", path),
        ("POST", f"{path}/rotate-secret"),
        ("GET", f"{path}/deliveries"),
    ):
        kwargs = {"json": {"events": ["job.failed"]}} if method == "PATCH" else {}
        response = keyed_client.request(method, url, headers=as_a, **kwargs)  # type: ignore[arg-type]
        assert response.status_code == 404, (method, url)
        assert response.json()["error"]["code"] == "webhook_not_found"
    assert keyed_client.get("/v1/webhooks", headers=as_a).json()["items"] == []
    assert keyed_client.get(path, headers=bearer(KEY_OF_B)).status_code == 200


def test_an_idempotency_key_replays_the_webhook_with_its_secret(
    keyed_client: httpx.Client,
) -> None:
    as_a = bearer(KEY_OF_A) | {"Idempotency-Key": "hook-1"}
    first = create(keyed_client, headers=as_a)
    assert first.status_code == 201, first.text

    again = create(keyed_client, headers=as_a)
    # Another tenant's key of the same name is its own.
    other = create(keyed_client, headers=bearer(KEY_OF_B) | {"Idempotency-Key": "hook-1"})

    # The first answer may never have arrived: the replay shows the secret too.
    assert again.status_code == 200 and again.json() == first.json()
    assert again.json()["secret"].startswith("whsec_")
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    listed = keyed_client.get("/v1/webhooks", headers=bearer(KEY_OF_A)).json()["items"]
    assert [w["id"] for w in listed] == [first.json()["id"]]
    too_long = create(keyed_client, headers=bearer(KEY_OF_A) | {"Idempotency-Key": "k" * 201})
    assert too_long.status_code == 422, too_long.text


def test_deliveries_newest_first_in_pages(client: httpx.Client, settings: Settings) -> None:
    webhook = create(client).json()
    with session_factory(settings)() as session:
        webhooks.announce(session, "local", "job.failed", "job-1")
        session.commit()
        message = session.scalars(select(WebhookMessage)).one()
        for attempt, status_code in enumerate((500, 502, 200), start=1):
            session.add(
                WebhookAttempt(
                    webhook_id=webhook["id"],
                    message_id=message.id,
                    attempt=attempt,
                    status_code=status_code,
                    error=None if status_code == 200 else f"HTTP {status_code}",
                    duration_ms=5,
                    created_at=utcnow(),
                )
            )
        session.commit()
    path = f"/v1/webhooks/{webhook['id']}/deliveries"

    first = client.get(path, params={"limit": 2}).json()
    rest = client.get(path, params={"limit": 2, "cursor": first["next_cursor"]}).json()

    items = first["items"] + rest["items"]
    assert [(d["attempt"], d["status_code"]) for d in items] == [(3, 200), (2, 502), (1, 500)]
    assert {d["message_id"] for d in items} == {message.id}
    assert {d["event_type"] for d in items} == {"job.failed"} and rest["next_cursor"] is None
    bad = client.get(path, params={"cursor": "not-a-cursor"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_cursor"


def test_openapi_documents_the_signature_and_errors(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    create_op = paths["/v1/webhooks"]["post"]
    assert "webhook-signature" in create_op["description"]
    assert {"200", "201", "404", "422"} <= set(create_op["responses"])
    assert "Idempotency-Key" in create_op["description"]
    assert "idempotency-key" in {p["name"] for p in create_op["parameters"]}
    assert "/v1/webhooks/{webhook_id}/deliveries" in paths


def test_maintenance_sends_long_overdue_messages_again(
    make_settings: SettingsFactory, redis_db: str, queue_name: str
) -> None:
    """A message whose delivery task the broker lost is sent again; one on its way is not."""
    settings = make_settings(broker_url=redis_db, webhook_queue=queue_name)
    webhooks.set_dispatcher(None)  # the broker sees only what the maintenance sends
    with session_factory(settings)() as session:
        webhooks.create_webhook(session, settings, "local", PUBLIC_URL, ["job.failed"])
        for job_id in ("job-lost", "job-recent"):
            webhooks.announce(session, "local", "job.failed", job_id)
        session.commit()
        lost, recent = sorted(
            session.scalars(select(WebhookMessage)), key=lambda m: "job-lost" not in m.body
        )
        lost.next_attempt_at = utcnow() - 2 * webhooks.REDISPATCH_AFTER
        session.commit()

    redispatch_webhooks(settings)

    client = redis.Redis.from_url(redis_db)
    try:
        sent = client.lrange(queue_name, 0, -1)
    finally:
        client.close()
    assert len(sent) == 1 and lost.id.encode() in sent[0] and recent.id.encode() not in sent[0]
