"""campaign.enqueue: steps are published by NAME through the engine's broker, never another one."""

from __future__ import annotations

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker

from campaign import enqueue, steps


@pytest.fixture
def broker():
    saved = dramatiq.get_broker()
    stub = StubBroker()
    try:
        yield stub
    finally:
        dramatiq.set_broker(saved)


def test_enqueue_refuses_a_broker_the_engine_did_not_set_up(broker):
    """dramatiq's implicit default broker (localhost, vhost "/", no confirms) would lose the message."""
    dramatiq.set_broker(broker)
    with pytest.raises(enqueue.BrokerNotSetUp):
        enqueue.enqueue(steps.GENERATE, (1,))


def test_each_step_goes_to_its_queue_by_name_with_its_arguments(broker):
    broker.campaign_engine = True
    dramatiq.set_broker(broker)
    for step in steps.STEPS:
        broker.declare_queue(step.queue)
        enqueue.enqueue(step, step.args(7, 3))
    enqueue.enqueue(steps.SEND_PART, (8, 3), delay_s=2.5)
    for step in steps.STEPS:
        (message,) = [dramatiq.Message.decode(m) for m in broker.queues[step.queue].queue]
        assert (message.actor_name, message.args) == (step.actor, step.args(7, 3))
    (delayed,) = [dramatiq.Message.decode(m) for m in broker.queues["campaign.send.DQ"].queue]
    assert delayed.args == (8, 3) and delayed.options["eta"] > 0
