"""Wake-ups for the API's event streams: one Redis subscription per process, not a poll each.

Workers publish a job's id on ``sqakd:job-events:<job id>`` after each commit that recorded
events (``core.events``). ``EventWakeups`` holds ONE pattern subscription to those channels per
API process and sets the ``asyncio.Event`` of every stream that follows that job; the stream
then reads the database, which stays the only source of truth (a message carries nothing).

Redis away: the subscriber logs once and reconnects with backoff, and the streams still re-read
the database on their heartbeat. After a (re)connection every stream is woken once, since a
message may have been missed meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from core.events import CHANNEL_PREFIX, redis_url

log = logging.getLogger(__name__)

RECONNECT_FIRST_S = 0.5
RECONNECT_MAX_S = 10.0
HEALTH_CHECK_S = 30  # a Redis that vanished without a word is noticed within this


class EventWakeups:
    """The followers of each job, woken by one Redis pub/sub connection of this process."""

    def __init__(self, broker_url: str) -> None:
        self._url = redis_url(broker_url)
        self._followers: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self.subscribed = False  # True while the subscription is live

    @contextmanager
    def follow(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever ``job_id`` may have new events; clear it before each read.

        Starts the subscriber on first use (an app run without its lifespan, in tests)."""
        self.start()
        wake = asyncio.Event()
        self._followers.setdefault(job_id, set()).add(wake)
        try:
            yield wake
        finally:
            followers = self._followers.get(job_id, set())
            followers.discard(wake)
            if not followers:
                self._followers.pop(job_id, None)

    def start(self) -> None:
        """Start the subscriber in the running loop, unless it runs there (or there is no
        Redis). A task of another loop is dead: TestClient runs each request in a loop of its
        own when used without ``with``."""
        if self._url is None:
            return
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done() and self._task.get_loop() is loop:
            return
        self._task = loop.create_task(self._subscribe_forever())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None or task.get_loop() is not asyncio.get_running_loop():
            return
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task

    def _wake(self, job_id: str | None = None) -> None:
        """Wake the followers of ``job_id``, or of every job."""
        groups = self._followers.values() if job_id is None else [self._followers.get(job_id, ())]
        for followers in groups:
            for wake in followers:
                wake.set()

    async def _subscribe_forever(self) -> None:
        assert self._url is not None
        delay = RECONNECT_FIRST_S
        logged = False
        while True:
            client = aioredis.Redis.from_url(
                self._url, health_check_interval=HEALTH_CHECK_S, socket_connect_timeout=5
            )
            try:
                async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.psubscribe(CHANNEL_PREFIX + "*")
                    self.subscribed = True
                    if logged:
                        log.info("event wake-ups: subscribed to Redis again")
                    delay, logged = RECONNECT_FIRST_S, False
                    self._wake()  # whatever was published while we were away
                    async for message in pubsub.listen():
                        if message["type"] == "pmessage":
                            channel = message["channel"]
                            if isinstance(channel, bytes):
                                channel = channel.decode()
                            self._wake(channel.removeprefix(CHANNEL_PREFIX))
            except (RedisError, OSError) as exc:
                if not logged:
                    log.warning(
                        "event wake-ups: Redis unavailable (%s); event streams re-read the "
                        "database on their heartbeat until it is back",
                        exc,
                    )
                    logged = True
            finally:
                self.subscribed = False
                with suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)
