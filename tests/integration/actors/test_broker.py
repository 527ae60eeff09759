"""A real RabbitMQ round trip with publisher confirms, processed by a real dramatiq worker (issue 2)."""

from __future__ import annotations

import uuid

import pytest
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from campaign.db import db
from devtools.services import start_worker
from tests.integration.workers import wait_for


def test_broker_is_rabbitmq_with_confirms(services):
    import actors

    assert isinstance(actors.broker, RabbitmqBroker)
    assert actors.broker.confirm_delivery is True
    names = [type(m).__name__ for m in actors.broker.middleware]
    assert names.index("DbConnection") < names.index("DeadLetters") < names.index("Retries") < names.index("RateLimits")
    assert "campaign.system" in actors.broker.get_declared_queues()
    assert getattr(actors.broker, "campaign_engine", None) is True  # the one campaign.enqueue publishes through


def test_every_step_of_the_table_is_an_actor_on_its_queue(services):
    """campaign.steps is the one map: the actor of each step exists under the step's name, on its queue."""
    import actors
    from campaign import steps

    for step in steps.STEPS:
        assert actors.broker.get_actor(step.actor).queue_name == step.queue
        assert step.queue in actors.broker.get_declared_queues()


def test_actor_processed_by_real_worker_process(clean_db, tmp_path):
    from actors.system import ping

    token = f"ping-{uuid.uuid4().hex}"
    message = ping.send(token)  # published with confirms: returns once RabbitMQ has it
    assert message.queue_name == "campaign.system"

    def seen() -> bool:
        with db.connection_context():
            return (
                db.execute_sql(
                    "SELECT count(*) FROM campaign_events WHERE step = 'ping' AND text = %s", (token,)
                ).fetchone()[0]
                == 1
            )

    assert not seen()
    with start_worker(processes=1, threads=2, log_path=tmp_path / "worker.log"):
        try:
            wait_for(seen, timeout=60, message="the worker to record the ping")
        except AssertionError:
            pytest.fail("worker never processed the ping; log:\n" + (tmp_path / "worker.log").read_text())
