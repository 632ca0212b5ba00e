"""At most ``validation_concurrency`` upload validations at once, and a bounded line for the rest.

Each validation runs in a child process (``core.intake.validate_isolated``); here a thread waits
for it, holding one token of this gate's own limiter, never one of the thread pool that every
sync route shares. Requests beyond the line are refused with 429 at once instead of queueing
without bound behind slow, hostile uploads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio

from core.errors import QuotaExceeded
from core.settings import Settings

T = TypeVar("T")
RETRY_AFTER_S = 10


class ValidationGate:
    def __init__(self, settings: Settings) -> None:
        self.concurrency = settings.validation_concurrency
        self.queue = settings.validation_queue
        self._limiter: anyio.CapacityLimiter | None = None  # made inside the event loop
        self._admitted = 0  # running or waiting

    def check_room(self) -> None:
        """429 when the line is full: also called before an upload's body is read, so that a
        client retrying in a loop costs the API its headers, not its bytes."""
        if self._admitted >= self.concurrency + self.queue:
            raise QuotaExceeded(
                "validation_busy",
                f"{self._admitted} uploads are being validated or waiting; try again shortly",
                headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"},
            )

    async def run(self, function: Callable[[], T]) -> T:
        """``function()`` in a thread once a slot is free; 429 when the line is full."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.concurrency)
        self.check_room()
        self._admitted += 1
        try:
            return await anyio.to_thread.run_sync(function, limiter=self._limiter)
        finally:
            self._admitted -= 1
