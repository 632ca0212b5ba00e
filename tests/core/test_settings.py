"""Settings: API keys of at least 32 characters, and no keyless start beyond loopback."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.settings import MIN_API_KEY_LENGTH, Settings

LONG_KEY = "k" * MIN_API_KEY_LENGTH


def test_a_short_key_is_refused_naming_its_tenant_not_the_key() -> None:
    short_key = "s3cret-but-short"
    with pytest.raises(ValidationError) as refused:
        Settings(api_keys={LONG_KEY: "team-a", short_key: "team-b"})
    message = str(refused.value)
    assert "'team-b'" in message and "shorter than 32 characters" in message
    assert "team-a" not in message
    assert short_key not in message and LONG_KEY not in message


def test_a_short_key_from_the_environment_never_reaches_the_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("API_KEYS", '{"hunter2": "team-b"}')
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert "'team-b'" in str(refused.value)
    assert "hunter2" not in str(refused.value)


def test_keys_of_32_characters_are_accepted() -> None:
    settings = Settings(api_keys={LONG_KEY: "team-a"}, host="0.0.0.0")
    assert settings.auth_required
    settings.check_exposure()  # keys: any address


@pytest.mark.parametrize("api_keys", [None, "{}"])
def test_keyless_is_refused_beyond_loopback(
    monkeypatch: pytest.MonkeyPatch, api_keys: str | None
) -> None:
    """No API_KEYS, or API_KEYS='{}' (the same: no key at all), on 0.0.0.0."""
    if api_keys is None:
        monkeypatch.delenv("API_KEYS", raising=False)
    else:
        monkeypatch.setenv("API_KEYS", api_keys)
    monkeypatch.setenv("HOST", "0.0.0.0")
    settings = Settings()
    assert not settings.auth_required
    with pytest.raises(ValueError, match="API_KEYS must be set to listen on '0.0.0.0'"):
        settings.check_exposure()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_keyless_is_allowed_on_loopback(host: str) -> None:
    Settings(host=host).check_exposure()
