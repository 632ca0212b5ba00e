"""Webhooks (``/v1/webhooks``): URLs the service POSTs signed events to."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence

from .resources import ApiObject, field

if TYPE_CHECKING:
    from .client import Client


class Webhook(ApiObject):
    """A registered URL and its event types. ``secret`` (``whsec_...``) is set only on the
    object ``create`` or ``rotate_secret`` returned: the service shows it once."""

    url: str = field("url")
    events: List[str] = field("events")
    secret: Optional[str] = field("secret", "The signing secret; None except after create.")
    previous_secret_expires_at: Optional[str] = field(
        "previous_secret_expires_at",
        "Until then (ISO 8601) the secret before the last rotation signs deliveries too.",
    )
    _collection = "/v1/webhooks"

    def rotate_secret(self, grace_seconds: Optional[int] = None) -> Webhook:
        """A new secret (in ``.secret``). The old one signs deliveries too for
        ``grace_seconds`` (the service's default: a day) so that the receiver can switch
        without refusing one; ``grace_seconds=0`` revokes it at once."""
        body = None if grace_seconds is None else {"grace_seconds": grace_seconds}
        # Not retried: a lost answer would leave a secret nobody has seen.
        answer = self._client._transport.request(
            "POST", f"{self._path}/rotate-secret", retry=False, json=body
        )
        self.data = answer.json()
        return self

    def deliveries(self, page_size: int = 50) -> Iterator[Dict[str, Any]]:
        """Every delivery attempt, newest first: ``message_id``, ``event_type``, ``attempt``,
        ``status_code`` (None: no answer), ``error``, ``duration_ms``."""
        return self._client._transport.pages(f"{self._path}/deliveries", {"limit": page_size})


class Webhooks:
    """``client.webhooks``."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def create(self, url: str, events: Sequence[str]) -> Webhook:
        """Register ``url`` for ``events`` (job.succeeded, job.failed, job.canceled,
        sweep.completed, engine.succeeded, engine.failed); keep the returned ``.secret``."""
        body = {"url": url, "events": list(events)}
        answer = self._client._transport.request("POST", "/v1/webhooks", json=body, create=True)
        return Webhook(self._client, answer.json())

    def get(self, webhook_id: str) -> Webhook:
        answer = self._client._transport.request("GET", f"/v1/webhooks/{webhook_id}")
        return Webhook(self._client, answer.json())

    def list(self, page_size: int = 50) -> Iterator[Webhook]:
        for item in self._client._transport.pages("/v1/webhooks", {"limit": page_size}):
            yield Webhook(self._client, item)

    def delete(self, webhook_id: str) -> None:
        self._client._transport.request("DELETE", f"/v1/webhooks/{webhook_id}")
