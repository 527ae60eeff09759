"""Settings: read once from the environment, validated, secrets never shown (SPEC §4.7, R-DISP-5)."""

from __future__ import annotations

import pytest

from campaign.errors import ConfigError
from campaign.settings import Settings, redact_url


def test_reads_interface_names():
    s = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://u:pw@db:5432/x",
            "RABBITMQ_URL": "amqp://u:pw@mq:5672/v",
            "OPENROUTER_BASE_URL": "http://sandbox:8765/api/v1/",
            "OPENROUTER_API_KEY": "sk-or-secret",
            "EVOLUTION_API_URL": "http://evo:8080",
            "EVOLUTION_API_KEY": "evo-secret",
            "WEBHOOK_SECRET": "hook-secret",
            "DISPATCH_BATCH_SIZE": "500",
        }
    )
    assert s.database_url == "postgresql://u:pw@db:5432/x"
    assert s.openrouter_base_url == "http://sandbox:8765/api/v1"  # trailing slash dropped
    assert s.openrouter_api_key == "sk-or-secret"
    assert s.dispatch_batch_size == 500


def test_defaults_without_environment():
    s = Settings.from_env({})
    assert s.openrouter_base_url == "https://openrouter.ai/api/v1"
    assert s.max_attempts == 5 and s.min_backoff_seconds == 2.0 and s.max_backoff_seconds == 300.0


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"DISPATCH_BATCH_SIZE": "0"}, "DISPATCH_BATCH_SIZE=0 is out of range 1..1000"),
        ({"DISPATCH_BATCH_SIZE": "5000"}, "DISPATCH_BATCH_SIZE=5000 is out of range"),
        ({"DISPATCH_BATCH_SIZE": "lots"}, "DISPATCH_BATCH_SIZE='lots' is not an integer"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"CAMPAIGN_BROKER": "redis"}, "CAMPAIGN_BROKER='redis' must be one of"),
        ({"MIN_BACKOFF_SECONDS": "10", "MAX_BACKOFF_SECONDS": "5"}, "MIN_BACKOFF_SECONDS must not exceed"),
    ],
)
def test_invalid_values_are_clear_startup_errors(env, needle):
    with pytest.raises(ConfigError) as exc:
        Settings.from_env(env)
    assert needle in str(exc.value)


def test_secrets_never_in_repr():
    s = Settings.from_env(
        {
            "OPENROUTER_API_KEY": "sk-or-topsecret",
            "EVOLUTION_API_KEY": "evo-topsecret",
            "WEBHOOK_SECRET": "hook-topsecret",
            "RABBITMQ_URL": "amqp://admin:mqpass@mq:5672/v",
            "DATABASE_URL": "postgresql://app:dbpass@db/x",
        }
    )
    text = repr(s) + str(s.describe())
    for secret in ("topsecret", "mqpass", "dbpass"):
        assert secret not in text
    assert "amqp://admin:***@mq:5672/v" in text


def test_bad_url_error_hides_password():
    with pytest.raises(ConfigError) as exc:
        Settings.from_env({"RABBITMQ_URL": "http://admin:hunter2@mq/"})
    assert "hunter2" not in str(exc.value)


def test_redact_url_keeps_urls_without_password():
    assert redact_url("http://sandbox:8765/api") == "http://sandbox:8765/api"
