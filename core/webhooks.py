"""Webhooks in the Standard Webhooks form (https://www.standardwebhooks.com/).

A tenant registers a URL and the event types it wants (``EVENT_TYPES``). ``announce`` turns an
event into one ``WebhookMessage`` per subscribed webhook, in the caller's transaction; after
the commit the message ids go to the process's dispatcher (``set_dispatcher``: the API and the
workers register one that sends a Celery task per message, as core/ imports no Celery). Each
task run is one attempt (``deliver``): claim the message, sign, POST, record a
``WebhookAttempt``; a failure is retried after ``retry_delay``, for about a day by default.

Every attempt carries ``webhook-id`` (the message id, the same on every retry),
``webhook-timestamp`` (Unix seconds of this attempt) and ``webhook-signature``:
``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` keyed by the base64-decoded part of
the webhook's ``whsec_`` secret. Rotating the secret makes a new one that signs every later
attempt, retries of earlier messages too; the old one signs them as well for a grace period (a
day by default, as Svix does), a second signature in the same header, so that receivers can
switch secrets without refusing a delivery. A grace of 0 revokes the old secret at once.

Targets: only http(s) URLs whose host resolves to public addresses, unless the settings allow
loopback (``webhook_allow_loopback``; by default exactly in the keyless embedded mode) or
private networks (``webhook_allow_private``) or link-local ones (``webhook_allow_link_local``;
cloud metadata answers at 169.254.169.254). Unspecified, multicast and reserved addresses are
always refused. The check runs when a webhook
is created and again before each attempt, which connects only to an address that passed it
(DNS may answer differently the second time).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
from sqlalchemy import delete, event, select, update
from sqlalchemy.orm import Session

from core import idempotency
from core.errors import InputError, NotFound
from core.models import Webhook, WebhookAttempt, WebhookMessage, utcnow
from core.pages import Page, newest_first
from core.settings import Settings

log = logging.getLogger(__name__)

EVENT_TYPES = (
    "job.succeeded",
    "job.failed",
    "job.canceled",
    "sweep.completed",
    "engine.succeeded",
    "engine.failed",
)
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 24
MESSAGE_PREFIX = "msg_"
ROTATION_GRACE_SECONDS = 24 * 3600  # how long a rotated-out secret still signs, by default
MAX_ROTATION_GRACE_SECONDS = 7 * 24 * 3600
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
URL_MAX_CHARS = 2000  # the column's size
SNIPPET_BYTES = 200  # of a receiver's answer to a failed attempt, kept as the attempt's error
REDISPATCH_AFTER = dt.timedelta(seconds=60)
"""A pending message this overdue lost its broker message: the API's maintenance sends it again."""

_PENDING_DISPATCH = "sqakd.webhooks.pending"  # Session.info key: ids of uncommitted messages

Dispatcher = Callable[[Sequence[str]], None]
_dispatcher: Dispatcher | None = None


def set_dispatcher(dispatcher: Dispatcher | None) -> None:
    """Who sends committed messages to delivery (a Celery task per id) in this process.

    Without one, messages wait for the API's maintenance loop (``overdue_message_ids``)."""
    global _dispatcher
    _dispatcher = dispatcher


class WebhookTargetForbidden(InputError):
    """The URL's host resolves to an address the settings do not let deliveries reach."""

    def __init__(self, message: str) -> None:
        super().__init__("webhook_target_forbidden", message)


# ---------------------------------------------------------------------------------------------
# Secrets and signatures


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """``webhook-signature``: ``v1,`` and the base64 HMAC-SHA256 of ``id.timestamp.body``."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def signed_headers(
    secrets: Sequence[str], message_id: str, body: bytes, timestamp: int
) -> dict[str, str]:
    """The Standard Webhooks headers, with one signature per secret, space-separated: a
    receiver accepts the message when any of them verifies with its secret."""
    return {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(s, message_id, timestamp, body) for s in secrets),
    }


def signing_secrets(webhook: Webhook, now: dt.datetime) -> list[str]:
    """The webhook's secret, and the one before its last rotation while that one's grace lasts."""
    expires = webhook.previous_secret_expires_at
    if webhook.previous_secret is None or expires is None or expires <= now:
        return [webhook.secret]
    return [webhook.secret, webhook.previous_secret]


# ---------------------------------------------------------------------------------------------
# Targets

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def address_refusal(address: IPAddress, settings: Settings) -> str | None:
    """Why deliveries may not go to ``address`` under these settings; None if they may."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if address.is_loopback:
        allowed = settings.webhook_loopback_allowed
        return None if allowed else "a loopback address (setting WEBHOOK_ALLOW_LOOPBACK)"
    if address.is_link_local:
        allowed = settings.webhook_allow_link_local
        return None if allowed else "a link-local address (setting WEBHOOK_ALLOW_LINK_LOCAL)"
    if address.is_unspecified or address.is_multicast or address.is_reserved:
        return "an unspecified, multicast or reserved address"
    if address.is_global:
        return None
    # RFC 1918, unique-local IPv6, carrier-grade NAT, documentation ranges, ...
    return None if settings.webhook_allow_private else "a private address (WEBHOOK_ALLOW_PRIVATE)"


@dataclass(frozen=True)
class Target:
    url: httpx.URL
    addresses: list[str]  # each one passed ``address_refusal``, in the resolver's order


def parse_url(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise InputError("invalid_webhook_url", f"not a URL: {exc}") from None
    if len(url) > URL_MAX_CHARS:
        raise InputError("invalid_webhook_url", f"a URL of at most {URL_MAX_CHARS} characters")
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InputError("invalid_webhook_url", "an http:// or https:// URL with a host")
    if parsed.userinfo:
        raise InputError("invalid_webhook_url", "a URL without user name or password")
    return parsed


def resolve_target(url: str, settings: Settings) -> Target:
    """The URL's addresses; raises unless there is one and every one may be reached."""
    parsed = parse_url(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parsed.host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as exc:  # gaierror is an OSError
        raise InputError(
            "webhook_target_unresolvable", f"cannot resolve {parsed.host!r}: {exc}"
        ) from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        refusal = address_refusal(ipaddress.ip_address(address), settings)
        if refusal is not None:
            raise WebhookTargetForbidden(
                f"{parsed.host!r} resolves to {address}, {refusal}: deliveries may not go there"
            )
    return Target(parsed, addresses)


def post_pinned(
    target: Target, headers: dict[str, str], body: bytes, timeout_s: float
) -> tuple[int, bytes]:
    """POST to the target at one of its checked addresses: (status code, start of the body).

    The request goes to the address itself (the URL's host replaced by it), with the URL's own
    ``Host`` header and, for https, its name as TLS SNI and certificate name (httpcore's
    ``sni_hostname``): the connection cannot reach an address that was not checked, whatever
    DNS answers meanwhile. No redirect is followed, no proxy from the environment is used.
    An address that refuses the connection (nothing sent yet) passes the turn to the next.
    """
    host_header = target.url.netloc.decode("ascii")
    with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
        for index, address in enumerate(target.addresses):
            request = client.build_request(
                "POST",
                target.url.copy_with(host=address),
                headers=headers | {"host": host_header},
                content=body,
                extensions={"sni_hostname": target.url.host},
            )
            try:
                response = client.send(request, stream=True)
            except httpx.ConnectError:
                if index == len(target.addresses) - 1:
                    raise
                continue
            try:
                snippet = b""
                for chunk in response.iter_bytes():
                    snippet += chunk
                    if len(snippet) >= SNIPPET_BYTES:
                        break
                return response.status_code, snippet[:SNIPPET_BYTES]
            finally:
                response.close()
    raise httpx.ConnectError("no address to connect to")


# ---------------------------------------------------------------------------------------------
# Webhooks of a tenant


def check_events(event_types: Sequence[str]) -> list[str]:
    unknown = sorted(set(event_types) - set(EVENT_TYPES))
    if unknown:
        raise InputError(
            "unknown_event_type", f"unknown event types {unknown}; known: {list(EVENT_TYPES)}"
        )
    if not event_types:
        raise InputError("invalid_request", "events: name at least one event type")
    return list(dict.fromkeys(event_types))


def create_webhook(
    session: Session,
    settings: Settings,
    tenant: str,
    url: str,
    event_types: Sequence[str],
    idempotency_key: str | None = None,
) -> tuple[Webhook, bool]:
    """A new webhook, (webhook, True); the API shows its ``secret`` in this answer only.

    An ``idempotency_key`` the tenant already made a webhook with returns that webhook,
    (webhook, False), secret included: the caller whose first answer was lost has not seen it.
    """
    if idempotency_key is not None and (
        existing := idempotency.find(session, Webhook, tenant, idempotency_key)
    ):
        return existing, False
    events = check_events(event_types)
    resolve_target(url, settings)
    webhook = Webhook(
        id=str(uuid.uuid4()),
        tenant=tenant,
        idempotency_key=idempotency_key,
        url=url,
        events=events,
        secret=new_secret(),
    )
    return idempotency.commit_new(session, webhook)


def get_webhook(session: Session, tenant: str, webhook_id: str) -> Webhook:
    """The tenant's webhook; another tenant's is as unknown as a missing one."""
    webhook = session.scalar(
        select(Webhook).where(Webhook.id == webhook_id, Webhook.tenant == tenant)
    )
    if webhook is None:
        raise NotFound("webhook", webhook_id)
    return webhook


def list_webhooks(
    session: Session, tenant: str, *, limit: int = 20, cursor: str | None = None
) -> Page[Webhook]:
    query = select(Webhook).where(Webhook.tenant == tenant)
    return newest_first(session, query, Webhook, limit=limit, cursor=cursor)


def update_webhook(
    session: Session,
    settings: Settings,
    tenant: str,
    webhook_id: str,
    *,
    url: str | None = None,
    event_types: Sequence[str] | None = None,
) -> Webhook:
    webhook = get_webhook(session, tenant, webhook_id)
    if event_types is not None:
        webhook.events = check_events(event_types)
    if url is not None:
        resolve_target(url, settings)
        webhook.url = url
    session.commit()
    return webhook


def rotate_secret(
    session: Session, tenant: str, webhook_id: str, grace_seconds: int = ROTATION_GRACE_SECONDS
) -> Webhook:
    """A new secret, which signs every attempt from now on (retries of older messages too).
    For ``grace_seconds`` the old secret signs them as well, so that receivers can move to the
    new one without refusing a delivery; 0 revokes it at once (a leaked secret)."""
    webhook = get_webhook(session, tenant, webhook_id)
    if grace_seconds > 0:
        webhook.previous_secret = webhook.secret
        webhook.previous_secret_expires_at = utcnow() + dt.timedelta(seconds=grace_seconds)
    else:
        webhook.previous_secret = webhook.previous_secret_expires_at = None
    webhook.secret = new_secret()
    session.commit()
    return webhook


def delete_webhook(session: Session, tenant: str, webhook_id: str) -> None:
    """The webhook, its messages and its attempts (a pending delivery then finds nothing)."""
    get_webhook(session, tenant, webhook_id)
    # Explicit, not only ON DELETE CASCADE: SQLite enforces it only with foreign_keys on.
    session.execute(delete(WebhookAttempt).where(WebhookAttempt.webhook_id == webhook_id))
    session.execute(delete(WebhookMessage).where(WebhookMessage.webhook_id == webhook_id))
    session.execute(delete(Webhook).where(Webhook.id == webhook_id))
    session.commit()


@dataclass(frozen=True)
class Delivery:
    """One attempt of the deliveries log, with its message's event type."""

    attempt: WebhookAttempt
    event_type: str


def list_deliveries(
    session: Session, tenant: str, webhook_id: str, *, limit: int = 20, cursor: str | None = None
) -> Page[Delivery]:
    """The webhook's attempts, newest first."""
    get_webhook(session, tenant, webhook_id)
    query = select(WebhookAttempt).where(WebhookAttempt.webhook_id == webhook_id)
    page = newest_first(session, query, WebhookAttempt, limit=limit, cursor=cursor)
    message_ids = {attempt.message_id for attempt in page.items}
    query_types = select(WebhookMessage.id, WebhookMessage.type).where(
        WebhookMessage.id.in_(message_ids)
    )
    types = {message_id: event_type for message_id, event_type in session.execute(query_types)}
    items = [Delivery(attempt, types.get(attempt.message_id, "")) for attempt in page.items]
    return Page(items=items, next_cursor=page.next_cursor)


# ---------------------------------------------------------------------------------------------
# Messages


def message_body(event_type: str, object_id: str, when: dt.datetime) -> str:
    """The thin payload: what happened to which object, and when; clients GET the rest."""
    timestamp = when.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    payload = {"type": event_type, "timestamp": timestamp, "data": {"id": object_id}}
    return json.dumps(payload, separators=(",", ":"))


def announce(session: Session, tenant: str, event_type: str, object_id: str) -> None:
    """Queue a message of ``event_type`` about ``object_id`` for each of the tenant's webhooks
    that subscribed to it, in the session's transaction (the caller commits); they are sent
    after the commit."""
    assert event_type in EVENT_TYPES, event_type
    webhooks = session.scalars(select(Webhook).where(Webhook.tenant == tenant)).all()
    now = utcnow()
    for webhook in webhooks:
        if event_type not in webhook.events:
            continue
        message = WebhookMessage(
            id=MESSAGE_PREFIX + uuid.uuid4().hex,
            webhook_id=webhook.id,
            type=event_type,
            body=message_body(event_type, object_id, now),
            status=PENDING,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
        session.add(message)
        session.info.setdefault(_PENDING_DISPATCH, set()).add(message.id)


@event.listens_for(Session, "after_commit")
def _dispatch_committed(session: Session) -> None:
    message_ids = session.info.pop(_PENDING_DISPATCH, None)
    if not message_ids or _dispatcher is None:
        return
    try:
        _dispatcher(sorted(message_ids))
    except Exception as exc:  # the messages are committed: the maintenance loop sends them
        log.warning("webhook messages not dispatched (%s); the maintenance loop will", exc)


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    session.info.pop(_PENDING_DISPATCH, None)


def overdue_message_ids(session: Session, *, now: dt.datetime | None = None) -> list[str]:
    """Pending messages due more than ``REDISPATCH_AFTER`` ago: their task was lost (a broker
    restart, a worker killed mid-attempt). Sending one again is harmless (``claim_attempt``)."""
    cutoff = (now or utcnow()) - REDISPATCH_AFTER
    return list(
        session.scalars(
            select(WebhookMessage.id).where(
                WebhookMessage.status == PENDING, WebhookMessage.next_attempt_at < cutoff
            )
        )
    )


# ---------------------------------------------------------------------------------------------
# Delivery


def retry_delay(settings: Settings, attempts_made: int) -> float | None:
    """Seconds from a failed attempt to the next one; None after the last (then ``failed``).

    The default schedule is Standard Webhooks': 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h after
    the first attempt, eight attempts over about 27 hours."""
    schedule = settings.webhook_retry_schedule_seconds
    return schedule[attempts_made - 1] if attempts_made <= len(schedule) else None


def claim_attempt(
    session: Session, settings: Settings, message_id: str, now: dt.datetime
) -> tuple[WebhookMessage, int] | None:
    """Take the message's next attempt: (message, attempt number), or None when it is not due
    (a duplicate or early task), no longer pending, or another run took it first.

    One conditional UPDATE (pending, the attempt count read, due): of two runs of the same
    attempt only one matches. The claim moves ``next_attempt_at`` past the attempt's timeout,
    so the maintenance loop does not send it again while it is under way.
    """
    message = session.get(WebhookMessage, message_id, populate_existing=True)
    if message is None or message.status != PENDING or message.next_attempt_at is None:
        return None
    attempts = message.attempts
    in_flight = now + dt.timedelta(seconds=2 * settings.webhook_timeout_seconds)
    claimed = session.execute(
        update(WebhookMessage)
        .where(
            WebhookMessage.id == message_id,
            WebhookMessage.status == PENDING,
            WebhookMessage.attempts == attempts,
            WebhookMessage.next_attempt_at <= now,
        )
        .values(attempts=attempts + 1, next_attempt_at=in_flight)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        return None
    return message, attempts + 1


def deliver(session: Session, settings: Settings, message_id: str) -> float | None:
    """Make the message's next attempt, if it is due: seconds until the one after, or None
    (delivered, failed for good, or nothing to do)."""
    claim = claim_attempt(session, settings, message_id, utcnow())
    if claim is None:
        return None
    message, attempt = claim
    webhook = session.get(Webhook, message.webhook_id)
    if webhook is None:  # deleted meanwhile, with its messages
        return None
    body = message.body.encode()
    secrets_now = signing_secrets(webhook, utcnow())
    headers = signed_headers(secrets_now, message.id, body, int(time.time()))
    status_code: int | None = None
    error: str | None = None
    started = time.monotonic()
    try:
        target = resolve_target(webhook.url, settings)
        status_code, snippet = post_pinned(target, headers, body, settings.webhook_timeout_seconds)
        if not 200 <= status_code < 300:
            error = f"HTTP {status_code}: {snippet.decode(errors='replace')}"
    except InputError as exc:  # the URL resolves elsewhere now, or not at all
        error = f"{exc.code}: {exc.message}"
    except Exception as exc:  # recorded and retried: an attempt always ends in a row
        error = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, httpx.HTTPError):
            log.exception("webhook %s: %s attempt %d", webhook.id, message.id, attempt)
    duration_ms = round((time.monotonic() - started) * 1000)
    session.add(
        WebhookAttempt(
            webhook_id=webhook.id,
            message_id=message.id,
            attempt=attempt,
            status_code=status_code,
            error=error[:500] if error else None,
            duration_ms=duration_ms,
            created_at=utcnow(),
        )
    )
    delay = None if error is None else retry_delay(settings, attempt)
    if error is None:
        values: dict[str, object] = {"status": DELIVERED, "next_attempt_at": None}
    elif delay is None:
        values = {"status": FAILED, "next_attempt_at": None}
    else:
        values = {"next_attempt_at": utcnow() + dt.timedelta(seconds=delay)}
    session.execute(
        update(WebhookMessage)
        .where(WebhookMessage.id == message.id, WebhookMessage.attempts == attempt)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    log.info("webhook %s: %s attempt %d: %s", webhook.id, message.id, attempt, error or "ok")
    return delay
