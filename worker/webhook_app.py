"""The Celery app of webhook workers: ``celery -A worker.webhook_app worker -Q webhooks``.

The same broker and configuration as ``worker.app``, with only the delivery task: a webhook
worker never imports torch (about 100 MB instead of 800 MB).
"""

from __future__ import annotations

from worker.app import create_celery_app

app = create_celery_app(include=("worker.webhook_tasks",))
