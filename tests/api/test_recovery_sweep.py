"""api.main.sweep: queued jobs whose broker message is gone are sent again, others are not."""

from __future__ import annotations

import datetime as dt

import redis
from sqlalchemy.orm import Session

from api.main import sweep
from core.db import session_factory
from core.models import Job, utcnow
from core.settings import Settings
from tests.factories import make_job
from tests.utils import SettingsFactory
from worker.app import enqueue_train, job_ids_in_broker


def queued_messages(settings: Settings) -> list[bytes]:
    client = redis.Redis.from_url(settings.celery_broker_url)
    try:
        return list(client.lrange(settings.train_queue, 0, -1))
    finally:
        client.close()


def times_sent(settings: Settings, job_id: str) -> int:
    return sum(job_id.encode() in message for message in queued_messages(settings))


def test_lost_messages_are_sent_again_after_a_lease(
    make_settings: SettingsFactory, redis_db: str, queue_name: str
) -> None:
    settings = make_settings(broker_url=redis_db, train_queue=queue_name, lease_seconds=60)
    long_ago = utcnow() - dt.timedelta(seconds=600)
    with session_factory(settings)() as session:
        lost = make_job(session, enqueued_at=long_ago)  # sent long ago, no message left
        waiting = make_job(session, enqueued_at=long_ago)  # sent long ago, still in the queue
        just_sent = make_job(session, enqueued_at=utcnow())  # its message may be on its way
        finished = make_job(session, status="succeeded", enqueued_at=long_ago)
    enqueue_train(settings, waiting.id)
    in_broker = job_ids_in_broker(settings)
    assert in_broker is not None and waiting.id in in_broker and lost.id not in in_broker

    sweep(settings, include_queued=False)

    assert times_sent(settings, lost.id) == 1
    assert times_sent(settings, waiting.id) == 1  # not duplicated
    assert times_sent(settings, just_sent.id) == 0
    assert times_sent(settings, finished.id) == 0
    with session_factory(settings)() as session:
        resent = session.get(Job, lost.id)
        assert resent is not None and resent.enqueued_at is not None
        assert resent.enqueued_at > long_ago

    # Sent again a moment ago: the next sweep leaves it alone even if the message went again.
    redis.Redis.from_url(redis_db).delete(queue_name)
    sweep(settings, include_queued=False)
    assert times_sent(settings, lost.id) == 0


def test_startup_sends_every_queued_job(
    make_settings: SettingsFactory, session: Session, redis_db: str, queue_name: str
) -> None:
    settings = make_settings(broker_url=redis_db, train_queue=queue_name)
    with session_factory(settings)() as session:
        job = make_job(session, enqueued_at=utcnow())

    sweep(settings, include_queued=True)

    assert times_sent(settings, job.id) == 1
