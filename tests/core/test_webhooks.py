"""core.webhooks: signatures (checked by the standardwebhooks package), target checks, the
retry schedule, which messages an event makes, and the claim of an attempt."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from collections.abc import Iterator

import pytest
import standardwebhooks
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import events, webhooks
from core.db import session_factory
from core.errors import InputError
from core.models import WebhookAttempt, WebhookMessage, utcnow
from core.settings import Settings
from tests.core import test_events
from tests.factories import make_job
from tests.utils import SettingsFactory

any_session = test_events.any_session  # the fixture: a session on SQLite, then PostgreSQL
KEYED = {"key-of-tenant-a-0123456789abcdef": "tenant-a"}
PUBLIC_URL = "http://93.184.216.34/hooks"  # a literal: resolves without a network

# (address, refused without settings, refused in keyless mode, refused with private allowed)
ADDRESSES = [
    ("93.184.216.34", False, False, False),
    ("2606:2800:220:1:248:1893:25c8:1946", False, False, False),
    ("127.0.0.1", True, False, True),
    ("127.8.9.10", True, False, True),
    ("::1", True, False, True),
    ("::ffff:127.0.0.1", True, False, True),
    ("10.1.2.3", True, True, False),
    ("172.16.0.1", True, True, False),
    ("192.168.1.1", True, True, False),
    ("100.64.0.1", True, True, False),  # carrier-grade NAT
    ("fd00::1", True, True, False),
    ("::ffff:10.0.0.1", True, True, False),
    ("169.254.169.254", True, True, True),  # cloud metadata: link-local, its own setting
    ("fe80::1", True, True, True),
    ("0.0.0.0", True, True, True),
    ("::", True, True, True),
    ("224.0.0.1", True, True, True),
    ("ff02::1", True, True, True),
    ("240.0.0.1", True, True, True),
]


@pytest.fixture
def dispatched() -> Iterator[list[str]]:
    """Message ids handed to this process's dispatcher after commits."""
    seen: list[str] = []
    webhooks.set_dispatcher(seen.extend)
    yield seen
    webhooks.set_dispatcher(None)


def test_signature_verifies_with_the_standardwebhooks_package() -> None:
    secret = webhooks.new_secret()
    assert secret.startswith("whsec_") and len(secret) == len("whsec_") + 32  # 24 bytes
    body = webhooks.message_body("job.succeeded", "job-1", utcnow()).encode()
    now = int(utcnow().timestamp())

    headers = webhooks.signed_headers([secret], "msg_1", body, now)

    payload = standardwebhooks.Webhook(secret).verify(body, headers)
    assert payload["type"] == "job.succeeded" and payload["data"] == {"id": "job-1"}
    assert payload["timestamp"].endswith("Z")
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(webhooks.new_secret()).verify(body, headers)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(body + b" ", headers)


def test_a_rotated_out_secret_signs_beside_the_new_one_until_its_grace_ends(
    session: Session, settings: Settings
) -> None:
    """Receivers verify with either secret while they switch; after the grace, or with none,
    only the new one signs (Standard Webhooks: space-separated signatures, any may verify)."""
    hook, _ = webhooks.create_webhook(session, settings, "local", PUBLIC_URL, ["job.succeeded"])
    first = hook.secret
    body = webhooks.message_body("job.succeeded", "job-1", utcnow()).encode()
    now = utcnow()

    webhooks.rotate_secret(session, "local", hook.id, grace_seconds=3600)

    assert webhooks.signing_secrets(hook, now) == [hook.secret, first] and hook.secret != first
    stamp = int(now.timestamp())
    headers = webhooks.signed_headers(webhooks.signing_secrets(hook, now), "msg_1", body, stamp)
    assert len(headers["webhook-signature"].split()) == 2
    for secret in (first, hook.secret):
        assert standardwebhooks.Webhook(secret).verify(body, headers)["data"] == {"id": "job-1"}
    assert webhooks.signing_secrets(hook, now + dt.timedelta(seconds=3601)) == [hook.secret]

    second = hook.secret
    webhooks.rotate_secret(session, "local", hook.id, grace_seconds=0)  # a leaked secret

    assert webhooks.signing_secrets(hook, now) == [hook.secret] and hook.secret != second
    assert hook.previous_secret is None and hook.previous_secret_expires_at is None


@pytest.mark.parametrize(("address", "default", "keyless", "private"), ADDRESSES)
def test_target_addresses(address: str, default: bool, keyless: bool, private: bool) -> None:
    ip = ipaddress.ip_address(address)
    keyed = Settings(api_keys=KEYED)
    assert (webhooks.address_refusal(ip, keyed) is not None) == default
    assert (webhooks.address_refusal(ip, Settings()) is not None) == keyless
    allow_private = Settings(api_keys=KEYED, webhook_allow_private=True)
    assert (webhooks.address_refusal(ip, allow_private) is not None) == private
    allow_link_local = Settings(api_keys=KEYED, webhook_allow_link_local=True)
    refused_link_local = webhooks.address_refusal(ip, allow_link_local) is not None
    assert refused_link_local == (default and not ip.is_link_local)


def test_names_are_resolved_and_every_address_checked() -> None:
    keyed = Settings(api_keys=KEYED)
    with pytest.raises(webhooks.WebhookTargetForbidden, match="'localhost' resolves to"):
        webhooks.resolve_target("http://localhost:9/hook", keyed)
    target = webhooks.resolve_target("http://localhost:9/hook", Settings())
    assert target.addresses and all(ipaddress.ip_address(a).is_loopback for a in target.addresses)
    explicit = Settings(api_keys=KEYED, webhook_allow_loopback=True)
    assert webhooks.resolve_target("https://[::1]/hook", explicit).addresses == ["::1"]
    assert webhooks.resolve_target(PUBLIC_URL, keyed).addresses == ["93.184.216.34"]
    for url in ("ftp://93.184.216.34/", "http://user:pw@93.184.216.34/", "/relative", "x" * 2001):
        with pytest.raises(InputError) as refused:
            webhooks.resolve_target(url, keyed)
        assert refused.value.code == "invalid_webhook_url", url


def test_retry_schedule_is_standard_webhooks_and_about_a_day() -> None:
    settings = Settings()
    delays = [webhooks.retry_delay(settings, attempt) for attempt in range(1, 9)]
    assert delays == [5, 300, 1800, 7200, 18000, 36000, 36000, None]
    assert 24 * 3600 < sum(d for d in delays if d) < 28 * 3600
    fast = Settings(webhook_retry_schedule_seconds=[0.2, 0.5])
    assert [webhooks.retry_delay(fast, n) for n in (1, 2, 3)] == [0.2, 0.5, None]


def test_announce_filters_by_type_and_tenant_and_dispatches_after_commit(
    any_session: Session, settings: Settings, dispatched: list[str]
) -> None:
    session = any_session
    on_success, _ = webhooks.create_webhook(
        session, settings, "local", PUBLIC_URL, ["job.succeeded"]
    )
    on_cancel, _ = webhooks.create_webhook(
        session, settings, "local", PUBLIC_URL, ["job.canceled", "job.failed"]
    )
    webhooks.create_webhook(session, settings, "other", PUBLIC_URL, ["job.canceled"])
    job = make_job(session)

    # A final status in the job's log announces it (core.events.record).
    events.record(session, job.id, events.EventType.STATUS, {"status": "canceled"})
    events.record(session, job.id, events.EventType.STATUS, {"status": "running"})
    assert dispatched == []  # nothing leaves before the commit
    session.commit()

    (message,) = session.scalars(select(WebhookMessage)).all()
    assert (message.webhook_id, message.type, message.status) == (
        on_cancel.id,
        "job.canceled",
        "pending",
    )
    assert message.id.startswith("msg_") and dispatched == [message.id]
    assert json.loads(message.body)["data"] == {"id": job.id}
    assert on_success.id != message.webhook_id

    # A rolled back announcement is neither kept nor dispatched.
    webhooks.announce(session, "local", "job.succeeded", job.id)
    session.rollback()
    session.commit()
    assert dispatched == [message.id]


def test_engine_outcomes_are_announced_with_the_build_id(
    session: Session, settings: Settings, dispatched: list[str]
) -> None:
    webhooks.create_webhook(session, settings, "local", PUBLIC_URL, ["engine.failed"])
    job = make_job(session)
    for status in ("building", "succeeded", "failed"):
        data = {"build_id": f"build-{status}", "target": "x86-sm90", "status": status}
        events.record(session, job.id, events.EventType.ENGINE, data)
    session.commit()
    (message,) = session.scalars(select(WebhookMessage)).all()
    assert json.loads(message.body)["data"] == {"id": "build-failed"}


def test_an_attempt_is_claimed_once_and_only_when_due(
    any_session: Session, settings: Settings
) -> None:
    session = any_session
    webhooks.create_webhook(session, settings, "local", PUBLIC_URL, ["job.failed"])
    webhooks.announce(session, "local", "job.failed", "job-1")
    session.commit()
    message = session.scalars(select(WebhookMessage)).one()
    now = utcnow()

    first = webhooks.claim_attempt(session, settings, message.id, now)
    assert first is not None and first[1] == 1
    # The same run delivered twice: the second finds the attempt taken (and not due).
    assert webhooks.claim_attempt(session, settings, message.id, now) is None
    later = now + dt.timedelta(seconds=3 * settings.webhook_timeout_seconds)
    second = webhooks.claim_attempt(session, settings, message.id, later)
    assert second is not None and second[1] == 2
    assert webhooks.overdue_message_ids(session, now=later) == []
    assert webhooks.overdue_message_ids(session, now=later + dt.timedelta(minutes=2)) == [
        message.id
    ]


def test_delivery_checks_the_target_again(make_settings: SettingsFactory) -> None:
    """Created while loopback was allowed; refused at delivery: no request, a failed attempt."""
    settings = make_settings(webhook_retry_schedule_seconds=[60])
    keyed = settings.model_copy(update={"api_keys": KEYED})

    with session_factory(settings)() as session:
        webhook, _ = webhooks.create_webhook(
            session, settings, "local", "http://127.0.0.1:9/hook", ["job.failed"]
        )
        webhooks.announce(session, "local", "job.failed", "job-1")
        session.commit()
        message = session.scalars(select(WebhookMessage)).one()

        assert webhooks.deliver(session, keyed, message.id) == 60
        assert webhooks.deliver(session, keyed, message.id) is None  # not due yet

        attempt = session.scalars(select(WebhookAttempt)).one()
        assert (attempt.webhook_id, attempt.attempt, attempt.status_code) == (webhook.id, 1, None)
        assert attempt.error is not None and "webhook_target_forbidden" in attempt.error
        session.refresh(message)
        assert (message.status, message.attempts) == ("pending", 1)
