"""/v1/webhooks: signed deliveries of job, sweep and engine events (Standard Webhooks)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal, get_args

from fastapi import APIRouter, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field

from api.deps import SessionDep, SettingsDep, TenantDep
from api.schemas import IdempotencyKey, error_responses
from core import webhooks
from core.models import Webhook

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

ERRORS = error_responses(
    status.HTTP_401_UNAUTHORIZED, status.HTTP_404_NOT_FOUND, status.HTTP_422_UNPROCESSABLE_CONTENT
)

EventType = Literal[
    "job.succeeded",
    "job.failed",
    "job.canceled",
    "sweep.completed",
    "engine.succeeded",
    "engine.failed",
]
assert set(get_args(EventType)) == set(webhooks.EVENT_TYPES)

WEBHOOK_EXAMPLE = {
    "id": "5b0e4c1e-2f43-4d7e-9a3c-1f2b8f0f5a11",
    "url": "https://example.com/hooks/sqakd",
    "events": ["job.succeeded", "job.failed"],
    "created_at": "2026-12-06T09:00:00Z",
    "updated_at": "2026-12-06T09:00:00Z",
}
SECRET_EXAMPLE = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SIGNATURE_SCHEME = """

Each delivery is a `POST` of `{"type", "timestamp", "data": {"id"}}` (then `GET` the object)
with the Standard Webhooks headers (https://www.standardwebhooks.com/): `webhook-id` (the
message id, the same on every retry: deduplicate on it), `webhook-timestamp` (Unix seconds of
this attempt) and `webhook-signature`: `v1,` followed by the base64 HMAC-SHA256 of
`{webhook-id}.{webhook-timestamp}.{body}`, keyed by the base64-decoded part of the secret after
`whsec_`. Any Standard Webhooks library verifies it, e.g. Python's
`standardwebhooks.Webhook(secret).verify(body, headers)`. A 2xx answer within 10 s is a
delivery; anything else is retried (by default) 5 s, 5 min, 30 min, 2 h, 5 h, 10 h and 10 h
later, then given up. Targets must resolve to public addresses (loopback is allowed in the
keyless local mode; see the `WEBHOOK_ALLOW_*` settings): else `422 webhook_target_forbidden`."""


class WebhookCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"url": WEBHOOK_EXAMPLE["url"], "events": WEBHOOK_EXAMPLE["events"]}]
        },
    )

    url: str = Field(max_length=webhooks.URL_MAX_CHARS, description="an http(s) URL")
    events: list[EventType] = Field(min_length=1, description="the event types to deliver")


class WebhookUpdate(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"events": ["job.succeeded"]}]}
    )

    url: str | None = Field(None, max_length=webhooks.URL_MAX_CHARS)
    events: list[EventType] | None = Field(None, min_length=1)


class WebhookPublic(BaseModel):
    model_config = ConfigDict(
        from_attributes=True, json_schema_extra={"examples": [WEBHOOK_EXAMPLE]}
    )

    id: str
    url: str
    events: list[str]
    created_at: dt.datetime
    updated_at: dt.datetime
    previous_secret_expires_at: dt.datetime | None = Field(
        None,
        description="until then the secret before the last rotation also signs each delivery; "
        "null: only the current one does",
    )


class WebhookWithSecret(WebhookPublic):
    """A webhook with its signing secret: only in the answers to creation and rotation."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [WEBHOOK_EXAMPLE | {"secret": SECRET_EXAMPLE}]}
    )

    secret: str = Field(description="whsec_<base64 key>: keep it; it is not shown again")


class SecretRotation(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"grace_seconds": 0}]}
    )

    grace_seconds: int = Field(
        webhooks.ROTATION_GRACE_SECONDS,
        ge=0,
        le=webhooks.MAX_ROTATION_GRACE_SECONDS,
        description="how long the old secret still signs deliveries, beside the new one (default "
        "a day); 0 revokes it at once, as for a leaked secret",
    )


class WebhookList(BaseModel):
    items: list[WebhookPublic]
    next_cursor: str | None


class DeliveryPublic(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": 42,
                    "message_id": "msg_6f1c0b9e2d4a4f7e8c3b5a1d0e9f8a7b",
                    "event_type": "job.succeeded",
                    "attempt": 2,
                    "status_code": 200,
                    "error": None,
                    "duration_ms": 87,
                    "created_at": "2026-12-06T09:00:05Z",
                }
            ]
        }
    )

    id: int
    message_id: str = Field(description="the webhook-id header of the delivery")
    event_type: str
    attempt: int = Field(description="1 for the first try of the message, then 2, 3, ...")
    status_code: int | None = Field(description="the receiver's HTTP status; null: no answer")
    error: str | None = Field(description="why the attempt failed (the start of the answer)")
    duration_ms: int
    created_at: dt.datetime

    @classmethod
    def from_delivery(cls, delivery: webhooks.Delivery) -> DeliveryPublic:
        attempt = delivery.attempt
        return cls(
            id=attempt.id,
            message_id=attempt.message_id,
            event_type=delivery.event_type,
            attempt=attempt.attempt,
            status_code=attempt.status_code,
            error=attempt.error,
            duration_ms=attempt.duration_ms,
            created_at=attempt.created_at,
        )


class DeliveryList(BaseModel):
    items: list[DeliveryPublic]
    next_cursor: str | None


Limit = Annotated[int, Query(ge=1, le=100)]
Cursor = Annotated[str | None, Query(max_length=500)]


def _with_secret(webhook: Webhook) -> WebhookWithSecret:
    return WebhookWithSecret.model_validate(webhook, from_attributes=True)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=WebhookWithSecret,
    responses={
        200: {
            "model": WebhookWithSecret,
            "description": "Idempotency-Key replay: the original webhook, with its secret",
        },
        **ERRORS,
    },
    description="Register a URL for events; the answer holds its secret, shown only here. "
    "A retry with the same `Idempotency-Key` (from the same tenant) answers 200 with the "
    "webhook the first request made, its current secret included (the first answer may never "
    "have arrived), and registers nothing new." + SIGNATURE_SCHEME,
)
def create_webhook(
    body: WebhookCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    idempotency_key: IdempotencyKey = None,
) -> WebhookWithSecret:
    webhook, created = webhooks.create_webhook(
        session, settings, tenant, body.url, list(body.events), idempotency_key
    )
    if not created:
        response.status_code = status.HTTP_200_OK
    return _with_secret(webhook)


@router.get("", response_model=WebhookList, responses=ERRORS)
def list_webhooks(
    session: SessionDep, tenant: TenantDep, limit: Limit = 20, cursor: Cursor = None
) -> WebhookList:
    """Your webhooks, newest first (without their secrets)."""
    page = webhooks.list_webhooks(session, tenant, limit=limit, cursor=cursor)
    return WebhookList(
        items=[WebhookPublic.model_validate(w) for w in page.items], next_cursor=page.next_cursor
    )


@router.get("/{webhook_id}", response_model=WebhookPublic, responses=ERRORS)
def get_webhook(webhook_id: str, session: SessionDep, tenant: TenantDep) -> WebhookPublic:
    return WebhookPublic.model_validate(webhooks.get_webhook(session, tenant, webhook_id))


@router.patch("/{webhook_id}", response_model=WebhookPublic, responses=ERRORS)
def update_webhook(
    webhook_id: str,
    body: WebhookUpdate,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
) -> WebhookPublic:
    """Change the URL (checked as at creation) or the event types; messages already made keep
    their attempts, which go to the URL of the moment."""
    webhook = webhooks.update_webhook(
        session,
        settings,
        tenant,
        webhook_id,
        url=body.url,
        event_types=None if body.events is None else list(body.events),
    )
    return WebhookPublic.model_validate(webhook)


@router.delete(
    "/{webhook_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=ERRORS,
)
def delete_webhook(webhook_id: str, session: SessionDep, tenant: TenantDep) -> None:
    """Delete the webhook with its pending messages and its deliveries log."""
    webhooks.delete_webhook(session, tenant, webhook_id)


@router.post("/{webhook_id}/rotate-secret", response_model=WebhookWithSecret, responses=ERRORS)
def rotate_secret(
    webhook_id: str,
    session: SessionDep,
    tenant: TenantDep,
    body: SecretRotation | None = None,
) -> WebhookWithSecret:
    """A new secret, returned once, which signs every later attempt (retries of earlier
    messages included). The old one signs them too until `previous_secret_expires_at` (a day
    by default; the body's `grace_seconds`), a second `v1,` signature in `webhook-signature`,
    so that receivers can switch secrets without refusing a delivery; `grace_seconds: 0`
    revokes it at once."""
    grace = (body or SecretRotation()).grace_seconds
    return _with_secret(webhooks.rotate_secret(session, tenant, webhook_id, grace))


@router.get("/{webhook_id}/deliveries", response_model=DeliveryList, responses=ERRORS)
def list_deliveries(
    webhook_id: str,
    session: SessionDep,
    tenant: TenantDep,
    limit: Limit = 20,
    cursor: Cursor = None,
) -> DeliveryList:
    """Every delivery attempt, newest first: its message, attempt number, the receiver's
    status code (null when it did not answer), the error and how long it took."""
    page = webhooks.list_deliveries(session, tenant, webhook_id, limit=limit, cursor=cursor)
    return DeliveryList(
        items=[DeliveryPublic.from_delivery(d) for d in page.items], next_cursor=page.next_cursor
    )
