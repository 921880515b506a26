"""Settings: names, seed aliases, validation messages, and the docs table."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from comzy.core.settings import ServerSettings, explain_validation_error

ROOT = Path(__file__).resolve().parent.parent


def test_seed_names_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PORT", "9001")
    monkeypatch.setenv("WS_PORT", "9002")
    monkeypatch.setenv("ADMIN_WS_PORT", "9003")
    monkeypatch.setenv("BASE_DOMAIN", "Example.TEST.")
    settings = ServerSettings(_env_file=None)
    assert (settings.http_port, settings.ws_port, settings.admin_port) == (9001, 9002, 9003)
    assert settings.base_domain == "example.test"
    assert settings.url_for("abc") == "http://abc.example.test:9001"


def test_canonical_name_wins_over_seed_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMZY_HTTP_PORT", "9100")
    monkeypatch.setenv("HTTP_PORT", "9001")
    assert ServerSettings(_env_file=None).http_port == 9100


def test_public_url_template_and_tls_scheme(tmp_path: Path) -> None:
    settings = ServerSettings(_env_file=None, public_url="https://{alias}.example.com")
    assert settings.url_for("x1") == "https://x1.example.com"
    tls = ServerSettings(_env_file=None, http_port=443, ssl_cert_path=tmp_path / "c", ssl_key_path=tmp_path / "k")
    assert tls.url_for("x1") == "https://x1.localhost"


@pytest.mark.parametrize(
    ("env", "value", "named"),
    [
        ("COMZY_HTTP_PORT", "abc", "COMZY_HTTP_PORT"),
        ("HTTP_PORT", "99999", "HTTP_PORT"),
        ("COMZY_PUBLIC_URL", "https://example.com", "COMZY_PUBLIC_URL"),
        ("COMZY_RESERVED_ALIASES", "www,Bad_Name", "COMZY_RESERVED_ALIASES"),
        ("COMZY_STREAM_WINDOW", "10", "COMZY_STREAM_WINDOW"),
        ("COMZY_ALLOW_PUNYCODE_ALIASES", "maybe", "COMZY_ALLOW_PUNYCODE_ALIASES"),
    ],
)
def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, env: str, value: str, named: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError) as info:
        ServerSettings(_env_file=None)
    message = explain_validation_error(ServerSettings, info.value)
    # The variable that was set, not another name of the same setting (HTTP_PORT is not COMZY_HTTP_PORT).
    assert message.startswith(f"invalid setting: {named}={value!r}: "), message


def test_a_plugin_setting_is_named_by_the_variable_that_was_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic names a setting by its first alias whichever one held the value; the message must not."""
    from comzy.plugins.auth_token import AuthTokenSettings

    for variable in ("MAX_ALIASES_PER_USER", "COMZY_AUTH_MAX_ALIASES_PER_USER"):
        monkeypatch.setenv(variable, "0")
        with pytest.raises(ValidationError) as info:
            AuthTokenSettings(_env_file=None)
        assert explain_validation_error(AuthTokenSettings, info.value) == (
            f"invalid setting: {variable}='0': Input should be greater than or equal to 1")
        monkeypatch.delenv(variable)


def test_every_setting_is_documented() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for name, field in ServerSettings.model_fields.items():
        canonical = field.validation_alias.choices[0]  # type: ignore[union-attr]
        assert f"`{canonical}`" in doc, f"{canonical} ({name}) is missing from docs/configuration.md"


def test_punycode_aliases_are_refused_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServerSettings(_env_file=None).allow_punycode_aliases is False
    monkeypatch.setenv("COMZY_ALLOW_PUNYCODE_ALIASES", "true")
    assert ServerSettings(_env_file=None).allow_punycode_aliases is True


def test_a_bad_secret_is_named_but_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plugin's secret that fails its own rule: the message reaches stderr, logs and
    `comzy-server plugins --json`, so it names the variable and hides the value."""
    class KeySettings(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="COMZY_KEYED_")
        api_key: SecretStr | None = Field(None, min_length=16)

    monkeypatch.setenv("COMZY_KEYED_API_KEY", "hunter2")
    with pytest.raises(ValidationError) as info:
        KeySettings(_env_file=None)
    message = explain_validation_error(KeySettings, info.value)
    assert message.startswith("invalid setting: COMZY_KEYED_API_KEY=***: ") and "hunter2" not in message
