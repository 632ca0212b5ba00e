"""API keys: no key, a wrong key, and one tenant's key on another tenant's job."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy.orm import Session

from core.db import session_factory
from core.settings import Settings
from tests.factories import make_job
from tests.utils import SettingsFactory, make_client

# 32 characters each: shorter keys are refused (core.settings.MIN_API_KEY_LENGTH).
KEY_OF_A = "key-of-tenant-a-0123456789abcdef"
KEY_OF_B = "key-of-tenant-b-0123456789abcdef"
KEYS = {KEY_OF_A: "tenant-a", KEY_OF_B: "tenant-b"}


@pytest.fixture
def keyed(make_settings: SettingsFactory) -> Settings:
    return make_settings(api_keys=KEYS)


@pytest.fixture
def keyed_client(keyed: Settings) -> httpx.Client:
    return make_client(keyed)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("headers", [{}, bearer("wrong"), {"Authorization": "Basic a2V5"}])
def test_without_a_valid_key_401(keyed_client: httpx.Client, headers: dict[str, str]) -> None:
    for path in ("/v1/jobs", "/v1/jobs/some-id"):
        response = keyed_client.get(path, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"


def test_tenant_sees_only_its_jobs(keyed: Settings, keyed_client: httpx.Client) -> None:
    with session_factory(keyed)() as session:
        job_of_b = make_job(session, tenant="tenant-b")

    as_a, as_b = bearer(KEY_OF_A), bearer(KEY_OF_B)
    for method, path in (
        ("GET", f"/v1/jobs/{job_of_b.id}"),
        ("POST", f"/v1/jobs/{job_of_b.id}/cancel"),
        ("GET", f"/v1/jobs/{job_of_b.id}/artifacts"),
    ):
        response = keyed_client.request(method, path, headers=as_a)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "job_not_found"
    assert keyed_client.get("/v1/jobs", headers=as_a).json()["items"] == []
    assert keyed_client.get(f"/v1/jobs/{job_of_b.id}", headers=as_b).status_code == 200
    assert keyed_client.get(f"/v1/jobs/{job_of_b.id}", headers=as_b).json()["status"] == "queued"


def test_embedded_mode_needs_no_key(client: httpx.Client, session: Session) -> None:
    job = make_job(session, tenant="local")
    assert client.get(f"/v1/jobs/{job.id}").status_code == 200


def test_probes_need_no_key(keyed_client: httpx.Client) -> None:
    assert keyed_client.get("/healthz").status_code == 200
    assert keyed_client.get("/metrics").status_code == 200
