"""api/dashboard.py: the page and its static files are public, carry a strict CSP and the
right content types; everything under /v1 still needs the key; keyless mode serves the page
to localhost only. (tests/dashboard/ drives the page itself in Chromium.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from starlette.applications import Starlette

from api.auth import ApiKeyAuth
from api.dashboard import STATIC_DIR
from core.settings import Settings
from tests.utils import SettingsFactory, make_client

KEY = "key-of-the-dashboard-test-000001"  # 32 characters, the shortest allowed
CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
JS_FILES = sorted(STATIC_DIR.rglob("*.js"))
# Our modules only: the vendored library is minified code we do not edit.
OWN_JS = [path for path in JS_FILES if "vendor" not in path.parts]


@pytest.fixture
def keyed(make_settings: SettingsFactory) -> TestClient:
    return make_client(make_settings(api_keys={KEY: "acme"}))


def csp_directives(header: str) -> dict[str, list[str]]:
    directives = (part.split() for part in header.split(";") if part.strip())
    return {name: values for name, *values in directives}


def assert_locked_down(headers: dict[str, str] | object) -> None:
    policy = csp_directives(headers["content-security-policy"])  # type: ignore[index]
    assert policy["default-src"] == ["'none'"]
    assert policy["script-src"] == ["'self'"]  # no inline script, no eval, no CDN
    assert policy["connect-src"] == ["'self'"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert "'unsafe-inline'" not in policy["style-src"]
    assert headers["x-content-type-options"] == "nosniff"  # type: ignore[index]


def test_the_page_is_public_and_v1_still_needs_the_key(keyed: TestClient) -> None:
    page = keyed.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert_locked_down(page.headers)
    assert '<script src="ui/js/main.js" type="module">' in page.text

    for path in ("/v1/jobs", "/v1/sweeps", "/uix", "/ui"):
        response = keyed.get(path)
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "unauthorized"
    assert keyed.get("/v1/jobs", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_every_file_the_page_names_is_served_without_a_key(keyed: TestClient) -> None:
    """index.html's scripts, styles and icon, and every module any script imports."""
    page = keyed.get("/").text
    names = set(re.findall(r'(?:src|href)="(ui/[^"]+)"', page))
    for script in JS_FILES:
        for imported in re.findall(r'from "(\.[^"]+)"', script.read_text()):
            names.add((script.parent / imported).resolve().relative_to(STATIC_DIR).as_posix())
    names = {name.removeprefix("ui/") for name in names}
    assert {"js/main.js", "js/pages/job.js", "vendor/uPlot-1.6.32.iife.min.js"} <= names
    for name in sorted(names):
        response = keyed.get(f"/ui/{name}")
        assert response.status_code == 200, name
        expected = CONTENT_TYPES[Path(name).suffix]
        assert response.headers["content-type"].split(";")[0] == expected, name
        assert_locked_down(response.headers)


def test_the_static_prefix_reaches_nothing_else(keyed: TestClient) -> None:
    missing = keyed.get("/ui/js/nothing-here.js")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    # Out of the static folder, towards the API or the source: StaticFiles refuses it.
    for path in ("/ui/%2e%2e/v1/jobs", "/ui/%2e%2e/dashboard.py"):
        response = keyed.get(path)
        assert response.status_code == 404, path
        assert "items" not in response.text and "StaticFiles" not in response.text


def test_the_dashboard_stays_out_of_the_openapi_schema(keyed: TestClient) -> None:
    paths = keyed.get("/openapi.json").json()["paths"]
    assert "/" not in paths
    assert not [path for path in paths if path.startswith("/ui")]


def test_keyless_mode_serves_the_page_to_localhost_only(settings: Settings) -> None:
    client = make_client(settings)  # no API keys
    assert client.get("/", headers={"Host": "localhost:8000"}).status_code == 200
    assert client.get("/ui/js/main.js", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    foreign = client.get("/", headers={"Host": "evil.example"})
    assert foreign.status_code == 403
    assert foreign.json()["error"]["code"] == "host_not_allowed"


def test_a_public_prefix_must_end_with_a_slash() -> None:
    with pytest.raises(ValueError, match="end with '/'"):
        ApiKeyAuth(Starlette(), public_prefixes=["/ui"])


@pytest.mark.parametrize("script", OWN_JS, ids=lambda path: path.relative_to(STATIC_DIR).as_posix())
def test_no_script_writes_markup(script: Path) -> None:
    """User strings (metadata, file names, labels, errors) reach the DOM as text only."""
    source = script.read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in source, f"{script.name} uses {sink}"
