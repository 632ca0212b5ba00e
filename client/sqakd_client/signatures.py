"""The check a webhook receiver makes: Standard Webhooks signatures (standardwebhooks.com).

The service signs ``{webhook-id}.{webhook-timestamp}.{body}`` with HMAC-SHA256, keyed by the
base64-decoded part of the secret after ``whsec_``, and sends ``webhook-signature: v1,<base64>``
(several space-separated signatures may come: one matching is enough).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from typing import Any, Dict, Mapping, Union

SECRET_PREFIX = "whsec_"


class WebhookVerificationError(ValueError):
    """The delivery is not signed with this secret, or is too old (a replay), or malformed."""


def verify_webhook(
    secret: str,
    body: Union[bytes, str],
    headers: Mapping[str, str],
    tolerance_seconds: float = 300,
) -> Dict[str, Any]:
    """The delivery's JSON body, once its signature and timestamp check out; else
    ``WebhookVerificationError``. ``body``: the request's raw bytes, as received; ``headers``:
    any mapping (names in any case)."""
    lowered = {name.lower(): value for name, value in headers.items()}
    try:
        message_id = lowered["webhook-id"]
        timestamp = lowered["webhook-timestamp"]
        signatures = lowered["webhook-signature"]
    except KeyError as missing:
        raise WebhookVerificationError(f"missing header {missing}") from None
    try:
        sent = int(timestamp)
    except ValueError:
        raise WebhookVerificationError(f"webhook-timestamp {timestamp!r} is no number") from None
    if abs(time.time() - sent) > tolerance_seconds:
        raise WebhookVerificationError(
            f"webhook-timestamp {sent} is more than {tolerance_seconds} s from now"
        )
    encoded = secret[len(SECRET_PREFIX) :] if secret.startswith(SECRET_PREFIX) else secret
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise WebhookVerificationError("the secret is not whsec_<base64>") from None
    payload = body.encode() if isinstance(body, str) else bytes(body)
    signed = f"{message_id}.{timestamp}.".encode() + payload
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    for candidate in signatures.split():
        version, _, signature = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(signature, expected):
            return json.loads(payload)
    raise WebhookVerificationError("no v1 signature matches the body with this secret")
