"""Python SDK of the SQAKD quantization service: ``Client`` and what it returns.

>>> from sqakd_client import Client
>>> with Client() as client:  # $SQAKD_URL, $SQAKD_API_KEY
...     job = client.jobs.create(model="teacher.onnx", data="train.zip", weight_bits=4)
...     job.wait(progress=True).download("out")
"""

from __future__ import annotations

from ._version import __version__
from .client import Client
from .errors import (
    ApiError,
    BadRequest,
    ChecksumMismatch,
    Conflict,
    ConnectionFailed,
    Forbidden,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServiceUnavailable,
    Unauthorized,
    WaitTimeout,
)
from .events import Event
from .jobs import Job
from .resources import Dataset, Model
from .signatures import WebhookVerificationError, verify_webhook
from .sweeps import Sweep
from .webhooks import Webhook

__all__ = [
    "ApiError",
    "BadRequest",
    "ChecksumMismatch",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "Dataset",
    "Event",
    "Forbidden",
    "InvalidRequest",
    "Job",
    "Model",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "ServiceUnavailable",
    "Sweep",
    "Unauthorized",
    "WaitTimeout",
    "Webhook",
    "WebhookVerificationError",
    "__version__",
    "verify_webhook",
]
