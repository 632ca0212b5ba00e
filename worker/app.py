"""The Celery app: broker and queues from core.settings, tuned for few, long, GPU-bound tasks.

The API imports this module to enqueue by task name; it must stay free of torch and of the
tasks themselves (``include`` loads ``worker.tasks`` only in worker processes).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from celery import Celery, signals

from core import webhooks
from core.settings import Settings, get_settings

TRAIN_TASK = "worker.tasks.train_job"
BUILD_ENGINE_TASK = "worker.tasks.build_engine"
DELIVER_WEBHOOK_TASK = "worker.webhook_tasks.deliver_webhook"
"""One attempt at one webhook message, on ``settings.webhook_queue``: a worker of its own
(threads, several at once) consumes it, so deliveries never wait behind a training job."""
"""Sent to the queue ``engine.<target>`` of each build (``core.engines.engine_queue``), which
only engine workers on that target consume: ``celery -A worker.app worker -Q engine.<target>``."""

VISIBILITY_TIMEOUT_S = 3600
"""Redis transport: an unacknowledged message is handed to another worker after this long.

With ``acks_late`` a training task stays unacknowledged while it runs, and jobs may run longer
than any sensible timeout. That is safe: the redelivered copy meets the job's live lease in the
database and is dropped (see core.jobs.claim_job). A shorter timeout only wastes deliveries; a
longer one delays the recovery of messages whose worker vanished before the claim.
"""

TRAIN_TIME_LIMIT_S = 48 * 3600
"""Hard limit of one training task: generous, a guard against a hung process, not a budget."""


TASK_MODULES = ("worker.tasks", "worker.webhook_tasks")
"""What a worker process imports: every task. A webhook worker imports only its own
(``worker.webhook_app``): worker.tasks brings torch, 700 MB that a delivery never uses."""


def create_celery_app(
    settings: Settings | None = None, include: tuple[str, ...] = TASK_MODULES
) -> Celery:
    """The app for these settings' broker and queues; one per process and broker."""
    settings = settings or get_settings()
    return _create(
        settings.celery_broker_url, settings.train_queue, settings.webhook_queue, include
    )


@lru_cache(maxsize=4)
def _create(
    broker_url: str, train_queue: str, webhook_queue: str, include: tuple[str, ...]
) -> Celery:
    app = Celery("sqakd", broker=broker_url, include=list(include))
    app.conf.update(
        # IDs only, as JSON: nothing a broker peer sends is ever unpickled.
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,  # state lives in our database, not in a result backend
        # Acknowledge after the task returns, and requeue the message of a child that was
        # killed (OOM, SIGKILL): tasks are idempotent through the job lease.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a worker holds no second job it cannot start
        task_routes={
            TRAIN_TASK: {"queue": train_queue},
            DELIVER_WEBHOOK_TASK: {"queue": webhook_queue},
        },
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        # The API must answer even when the broker is down: give up publishing quickly.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
    )
    return app


def enqueue_train(settings: Settings, job_id: str) -> None:
    """Send a job to the training queue (by task name: the sender needs no torch)."""
    create_celery_app(settings).send_task(TRAIN_TASK, args=[job_id])


def enqueue_engine_build(settings: Settings, build_id: str, queue: str) -> None:
    """Announce an engine build on its target's queue."""
    create_celery_app(settings).send_task(BUILD_ENGINE_TASK, args=[build_id], queue=queue)


def enqueue_webhook_deliveries(
    settings: Settings, message_ids: Sequence[str], countdown: float | None = None
) -> None:
    """Send each webhook message to delivery, after ``countdown`` seconds if given."""
    app = create_celery_app(settings)
    for message_id in message_ids:
        app.send_task(
            DELIVER_WEBHOOK_TASK,
            args=[message_id],
            queue=settings.webhook_queue,
            countdown=countdown,
        )


def dispatch_webhooks_with(settings: Settings) -> None:
    """Make this process send committed webhook messages (core.webhooks) to these settings'
    broker: the API calls it at startup; worker processes do below."""
    webhooks.set_dispatcher(lambda message_ids: enqueue_webhook_deliveries(settings, message_ids))


@signals.worker_init.connect
def _dispatch_from_worker(**_: object) -> None:
    # Workers finish jobs and engine builds: their webhook messages leave from here.
    dispatch_webhooks_with(get_settings())


_JOB_ID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_PRIORITY_SEPARATOR = "\x06\x16"  # kombu's Redis transport: "<queue>\x06\x16<priority>"


def job_ids_in_broker(settings: Settings) -> set[str] | None:
    """Job ids that have a training message in the broker: waiting in the queue, or delivered
    and not yet acknowledged. None where the broker cannot be looked into (not Redis).

    A message can be lost between the API's send and a worker's claim: Redis persistence has a
    window, and a task whose claim hit a database error is acknowledged all the same. The
    API's sweep compares queued jobs with this set and re-sends the missing ones.
    """
    with create_celery_app(settings).connection_for_read() as connection:
        channel = connection.default_channel
        client = getattr(channel, "client", None)
        if client is None or not hasattr(client, "lrange"):
            return None
        queue = settings.train_queue
        keys = [queue, *client.scan_iter(match=f"{queue}{_PRIORITY_SEPARATOR}*")]
        messages: list[bytes] = []
        for key in keys:
            messages.extend(client.lrange(key, 0, -1))
        messages.extend(client.hvals(channel.unacked_key))
    return {match.decode() for raw in messages for match in _JOB_ID.findall(raw)}


def ping_broker(settings: Settings, timeout: float = 2.0) -> None:
    """Raise unless the broker accepts a connection within ``timeout`` seconds."""
    with create_celery_app(settings).connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)


app = create_celery_app()
