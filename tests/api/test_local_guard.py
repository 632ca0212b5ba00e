"""Keyless mode answers only a localhost Host and Origin; with API keys the guard is off."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy.orm import Session

from core.settings import Settings
from tests.factories import make_job
from tests.utils import SettingsFactory, make_client

KEY = "key-of-the-guard-test-0123456789"  # 32 characters, the shortest allowed
# What a DNS-rebinding page sends (its own name, now resolving to 127.0.0.1), and look-alikes.
FOREIGN_HOSTS = [
    "evil.example",
    "evil.example:8000",
    "localhost.evil.example",
    "127.0.0.1.evil.example:8000",
    "192.168.1.20:8000",
    "0.0.0.0:8000",
    "localhost:8000@evil.example",
    "",
]
LOCAL_HOSTS = ["localhost", "localhost:8000", "LOCALHOST:1", "127.0.0.1", "127.0.0.1:8000",
               "[::1]", "[::1]:8000"]  # fmt: skip
# What a page on another site sends with its fetch() or form POST.
FOREIGN_ORIGINS = [
    "https://evil.example",
    "http://localhost.evil.example",
    "http://127.0.0.1.evil.example:8000",
    "null",  # sandboxed iframes, file:// pages
    "http://localhost:8000/",
    "ftp://localhost",
]
LOCAL_ORIGINS = ["http://localhost:8000", "https://localhost", "http://127.0.0.1:8000",
                 "http://[::1]:3000"]  # fmt: skip


def error_code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


@pytest.mark.parametrize("host", FOREIGN_HOSTS)
def test_keyless_refuses_a_foreign_host(client: httpx.Client, host: str) -> None:
    for method, path in (("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/healthz")):
        response = client.request(method, path, headers={"Host": host})
        assert response.status_code == 403, (method, path)
        assert error_code(response) == "host_not_allowed"


@pytest.mark.parametrize("host", LOCAL_HOSTS)
def test_keyless_answers_localhost(client: httpx.Client, host: str) -> None:
    assert client.get("/v1/jobs", headers={"Host": host}).status_code == 200
    assert client.get("/healthz", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("origin", FOREIGN_ORIGINS)
def test_keyless_refuses_a_foreign_origin(
    client: httpx.Client, session: Session, origin: str
) -> None:
    job = make_job(session)
    # A cross-site POST that needs no CORS preflight: refused before the route runs.
    response = client.post(
        "/v1/jobs",
        files={"model": ("teacher.onnx", b"x"), "data": ("images.zip", b"x")},
        headers={"Origin": origin, "Host": "127.0.0.1:8000"},
    )
    assert response.status_code == 403
    assert error_code(response) == "origin_not_allowed"
    for path in (f"/v1/jobs/{job.id}", f"/v1/jobs/{job.id}/artifacts"):
        response = client.get(path, headers={"Origin": origin})
        assert response.status_code == 403, path
        assert error_code(response) == "origin_not_allowed"
    # Nothing was created by the refused POST.
    assert [item["id"] for item in client.get("/v1/jobs").json()["items"]] == [job.id]


@pytest.mark.parametrize("origin", LOCAL_ORIGINS)
def test_keyless_answers_a_local_origin(client: httpx.Client, origin: str) -> None:
    assert client.get("/v1/jobs", headers={"Origin": origin}).status_code == 200


@pytest.fixture
def keyed(make_settings: SettingsFactory) -> Settings:
    return make_settings(api_keys={KEY: "tenant-a"})


def test_with_keys_the_guard_is_off(keyed: Settings) -> None:
    """Keys protect instead: any Host or Origin with a key, none without (behind a proxy)."""
    client = make_client(keyed)
    foreign = {"Host": "api.example.com", "Origin": "https://dashboard.example.com"}
    response = client.get("/v1/jobs", headers=foreign | {"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200
    response = client.get("/v1/jobs", headers=foreign)
    assert response.status_code == 401
    assert error_code(response) == "unauthorized"
    assert client.get("/healthz", headers=foreign).status_code == 200
