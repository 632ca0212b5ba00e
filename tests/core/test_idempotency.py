"""core.idempotency on PostgreSQL: a create whose key lookup missed, because another request
with the same key had not committed yet, returns that request's row when the unique
constraint refuses its own."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core import idempotency, sweeps, webhooks
from core.db import migrate, session_factory
from core.models import Job, Sweep, Webhook
from core.settings import Settings
from tests.api.test_sweeps import store
from tests.factories import VALID_CONFIG

KEY = "the-same-key"
Create = Callable[[Session], tuple[Sweep | Webhook, bool]]


@pytest.fixture
def pg_settings(tmp_path: Path, postgres_url: str) -> Settings:
    settings = Settings(data_dir=tmp_path / "data", database_url=postgres_url)
    migrate(settings)
    return settings


def webhook_creator(settings: Settings, onnx_model: Path, image_archive: Path) -> Create:
    return lambda session: webhooks.create_webhook(
        session, settings, "local", "http://93.184.216.34/hooks", ["job.failed"], KEY
    )


def sweep_creator(settings: Settings, onnx_model: Path, image_archive: Path) -> Create:
    with session_factory(settings)() as session:
        model_id = store(session, settings, "model", onnx_model, "local")
        data_id = store(session, settings, "dataset", image_archive, "local")
    return lambda session: sweeps.create_sweep(
        session,
        settings,
        "local",
        model_id=model_id,
        data_id=data_id,
        eval_data_id=None,
        base_config=VALID_CONFIG,
        grid={"weight_bits": [8, 4]},
        idempotency_key=KEY,
    )


def count(session: Session, table: type) -> int:
    return int(session.scalar(select(func.count()).select_from(table)) or 0)


@pytest.mark.parametrize(
    ("table", "creator"),
    [
        pytest.param(Webhook, webhook_creator, id="webhook"),
        pytest.param(Sweep, sweep_creator, id="sweep"),
    ],
)
def test_the_loser_of_a_race_for_a_key_returns_the_winners_row(
    pg_settings: Settings,
    onnx_model: Path,
    image_archive: Path,
    table: type[Sweep] | type[Webhook],
    creator: Callable[[Settings, Path, Path], Create],
) -> None:
    create = creator(pg_settings, onnx_model, image_archive)
    with session_factory(pg_settings)() as loser, session_factory(pg_settings)() as winner:
        # The loser's transaction sees the database as it was before the winner's commit, as
        # a request whose lookup ran first does: its lookup misses, its insert collides.
        loser.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        assert idempotency.find(loser, table, "local", KEY) is None
        won, won_created = create(winner)
        assert idempotency.find(loser, table, "local", KEY) is None

        lost, lost_created = create(loser)

        assert (won_created, lost_created) == (True, False)
        assert lost.id == won.id
        assert count(winner, table) == 1
        assert count(winner, Job) == (2 if table is Sweep else 0)  # the winner's jobs only
