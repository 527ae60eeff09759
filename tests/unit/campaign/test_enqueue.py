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


def test_enqueue_many_in_parallel_publishes_each_once_from_several_threads(broker, monkeypatch):
    """The dispatcher's publishes go out several at a time (each confirm is a round trip), each
    message exactly once."""
    import threading
    import time

    seen: list[tuple[tuple, str]] = []
    lock = threading.Lock()

    def slow_enqueue(step, args, *, delay_s=None):
        time.sleep(0.01)  # a confirm's round trip
        with lock:
            seen.append((tuple(args), threading.current_thread().name))

    monkeypatch.setattr(enqueue, "enqueue", slow_enqueue)
    assert enqueue.enqueue_many(steps.GENERATE, ((i,) for i in range(40)), parallel=True) == 40
    assert sorted(a for a, _ in seen) == [(i,) for i in range(40)]
    assert len({t for _, t in seen}) > 1, "the publishes did not overlap"
    seen.clear()
    enqueue.enqueue_many(steps.GENERATE, ((i,) for i in range(5)))
    assert {t for _, t in seen} == {threading.current_thread().name}  # one after the other by default


def test_a_failed_publish_stops_the_batch_and_is_raised_once_the_ones_in_flight_ended(broker, monkeypatch):
    """A publish refused (RabbitMQ away: each one retries for seconds) stops the batch, as one after
    the other did: the rest is not published, the publishes in flight end, then the dispatcher gets
    the error (and returns the batch to pending)."""
    import threading
    import time

    done: list[int] = []
    running = [0]
    lock = threading.Lock()

    def enqueue_or_fail(step, args, *, delay_s=None):
        with lock:
            running[0] += 1
        try:
            if args == (3,):
                raise RuntimeError("publish nacked")
            time.sleep(0.02)
            with lock:
                done.append(args[0])
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(enqueue, "enqueue", enqueue_or_fail)
    with pytest.raises(RuntimeError, match="nacked"):
        enqueue.enqueue_many(steps.GENERATE, ((i,) for i in range(40)), parallel=True)
    assert running[0] == 0, "the error was raised while publishes were still in flight"
    assert len(done) < 20, f"{len(done)} of 39 published after the failure: the batch did not stop"
