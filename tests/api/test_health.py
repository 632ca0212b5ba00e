"""/healthz, /readyz, /metrics, and JSON errors for what no route handles."""

from __future__ import annotations

import httpx
from sqlalchemy.orm import Session

from core.settings import Settings
from tests.factories import make_job
from tests.utils import SettingsFactory, make_client


def test_healthz(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_ok(make_settings: SettingsFactory, redis_db: str) -> None:
    response = make_client(make_settings(broker_url=redis_db)).get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


def test_readyz_503_without_broker(client: httpx.Client) -> None:
    # The embedded broker's socket does not exist: no launcher started redis for this test.
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["broker"].startswith("failed")


def test_readyz_503_without_schema(make_settings: SettingsFactory) -> None:
    settings = Settings(data_dir=make_settings().data_dir.parent / "unmigrated")
    assert make_client(settings).get("/readyz").json()["checks"]["database"].startswith("failed")


def test_metrics_counts_jobs_by_status(client: httpx.Client, session: Session) -> None:
    make_job(session)
    make_job(session, status="failed")
    make_job(session, status="failed")
    text = client.get("/metrics").text
    assert 'sqakd_jobs{status="queued"} 1.0' in text
    assert 'sqakd_jobs{status="failed"} 2.0' in text
    assert 'sqakd_jobs{status="succeeded"} 0.0' in text


def test_unknown_route_and_method_are_json(client: httpx.Client) -> None:
    missing = client.get("/v2/nothing")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
    wrong = client.delete("/v1/jobs")
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (405, "method_not_allowed")


def test_unexpected_error_is_a_json_500_without_internals(make_settings: SettingsFactory) -> None:
    # No migrations ran on this database: the query fails inside the route.
    settings = Settings(data_dir=make_settings().data_dir.parent / "unmigrated")
    response = make_client(settings).get("/v1/jobs")
    assert response.status_code == 500
    assert response.json() == {
        "error": {"code": "internal_error", "message": "internal server error"}
    }
