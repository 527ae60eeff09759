"""RABBITMQ_URL naming several cluster nodes (R-SCALE-2) and RABBITMQ_QUEUE_TYPE (R-SCALE-1): parsing only."""

from __future__ import annotations

import pytest

from campaign.errors import ConfigError
from campaign.settings import Settings, amqp_parameters, amqp_urls, redact_url

THREE = "amqp://u:pw1@h1:5672/v;amqp://u:pw2@h2:5673/v?heartbeat=10;amqps://u:pw3@h3/v"


def test_one_url_is_one_node():
    assert amqp_urls("amqp://u:pw@mq:5672/v") == ["amqp://u:pw@mq:5672/v"]


def test_semicolons_separate_nodes_in_order():
    s = Settings.from_env({"RABBITMQ_URL": THREE, "EVOLUTION_EVENTS_RABBITMQ_URL": THREE})
    assert amqp_urls(s.rabbitmq_url) == [
        "amqp://u:pw1@h1:5672/v",
        "amqp://u:pw2@h2:5673/v?heartbeat=10",
        "amqps://u:pw3@h3/v",
    ]
    assert amqp_urls(s.evolution_events_rabbitmq_url) == amqp_urls(s.rabbitmq_url)


def test_spaces_around_nodes_are_dropped():
    s = Settings.from_env({"RABBITMQ_URL": " amqp://h1/v ; amqp://h2/v "})
    assert s.rabbitmq_url == "amqp://h1/v;amqp://h2/v"


def test_pika_parameters_one_per_node_with_overrides():
    params = amqp_parameters(THREE, connection_attempts=1, socket_timeout=3.0)
    assert [(p.host, p.port, p.virtual_host) for p in params] == [
        ("h1", 5672, "v"),
        ("h2", 5673, "v"),
        ("h3", 5671, "v"),
    ]
    assert [p.connection_attempts for p in params] == [1, 1, 1] and params[0].socket_timeout == 3.0
    assert params[1].heartbeat == 10  # each node keeps its own query string
    assert params[2].ssl_options is not None


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("amqp://u:secret@h1/v;http://u:secret@h2/v", "node 2 of 2"),
        ("amqp://u:secret@h1/v;;amqp://u:secret@h2/v", "empty node"),
        ("amqp://u:secret@h1/v;", "empty node"),
        ("h1,h2", "must be an amqp/amqps URL"),
    ],
)
def test_bad_node_lists_are_clear_errors_without_passwords(raw, needle):
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"RABBITMQ_URL": raw})
    assert needle in str(err.value) and "RABBITMQ_URL" in str(err.value)
    assert "secret" not in str(err.value)


def test_every_node_password_is_redacted():
    text = redact_url(THREE) + repr(Settings.from_env({"RABBITMQ_URL": THREE}))
    assert "pw1" not in text and "pw2" not in text and "pw3" not in text
    assert "amqp://u:***@h2:5673/v?heartbeat=10" in text


def test_queue_type_defaults_to_classic_and_is_validated():
    assert Settings.from_env({}).rabbitmq_queue_type == "classic"
    assert Settings.from_env({"RABBITMQ_QUEUE_TYPE": "quorum"}).rabbitmq_queue_type == "quorum"
    with pytest.raises(ConfigError, match="RABBITMQ_QUEUE_TYPE='stream' must be one of classic, quorum"):
        Settings.from_env({"RABBITMQ_QUEUE_TYPE": "stream"})


def test_broker_gets_every_node():
    """The engine's broker connects through all nodes (pika tries them in order on each connect)."""
    from actors.broker import EngineRabbitmqBroker, build_broker

    broker = build_broker(Settings(rabbitmq_url=THREE, rabbitmq_queue_type="quorum"))
    assert isinstance(broker, EngineRabbitmqBroker)
    assert [p.host for p in broker.parameters] == ["h1", "h2", "h3"]
    assert broker.queue_type == "quorum" and broker.confirm_delivery
