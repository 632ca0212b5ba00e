"""The webhook delivery task: one attempt per run (core.webhooks.deliver), the next one
scheduled with a countdown.

Runs on ``settings.webhook_queue`` in a worker of its own (``--pool threads``): a delivery
waits on the network, never behind a training job. The task takes only the message id;
``deliver`` claims the attempt with a conditional UPDATE, so a duplicate or early run (a
redelivered message, the API's maintenance sending a lost one again) sends nothing.
"""

from __future__ import annotations

from celery import Task, shared_task

from core import webhooks
from core.db import session_scope
from core.settings import get_settings
from worker.app import DELIVER_WEBHOOK_TASK, enqueue_webhook_deliveries

DELIVER_TIME_LIMIT_S = 120  # a guard: an attempt's own HTTP timeouts end it much sooner


# Shared: registered on every app, worker.app's and worker.webhook_app's (which has no torch).
@shared_task(name=DELIVER_WEBHOOK_TASK, bind=True, acks_late=True, time_limit=DELIVER_TIME_LIMIT_S)
def deliver_webhook(self: Task, message_id: str) -> None:
    settings = get_settings()
    with session_scope(settings) as session:
        retry_in = webhooks.deliver(session, settings, message_id)
    if retry_in is not None:
        # A lost countdown message is sent again by the API's maintenance loop.
        enqueue_webhook_deliveries(settings, [message_id], countdown=retry_in)
