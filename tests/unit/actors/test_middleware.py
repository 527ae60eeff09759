"""actors.middleware without services: the options each middleware declares, RateLimits' decisions
(run, wait in the thread, re-enqueue with a delay, fail closed) for a per-minute budget and for a
send step's refused inbox slot,
DeadLetters ignoring what is not a dead campaign step, and the order of the engine's middleware.

The shared pacing state (campaign.ratelimit, PostgreSQL) is replaced by scripted grants here; its
behaviour on the real database, and the middleware under connection loss, are in
tests/integration/actors/test_middleware.py.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import dramatiq
import pytest
from dramatiq.broker import MessageProxy
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import SkipMessage

from campaign import ratelimit
from campaign.settings import Settings
from campaign.steps import MAX_BROKER_DELAY_SECONDS

SETTINGS = Settings.from_env({})


@pytest.fixture(scope="module")
def mw() -> types.ModuleType:
    """actors.middleware, imported when the tests run, not when they are collected: importing the
    ``actors`` package builds the engine's broker from the environment, which in ``make test`` is
    the integration run's own vhost only once its session fixture has made it."""
    from actors import middleware

    return middleware


class _Broker:
    """What RateLimits asks of a broker: the actor's options, and enqueue (recorded)."""

    def __init__(self, rate_limit: str | None) -> None:
        self.options = {} if rate_limit is None else {"rate_limit": rate_limit}
        self.enqueued: list[tuple[dramatiq.Message, int | None]] = []

    def get_actor(self, name: str) -> types.SimpleNamespace:
        return types.SimpleNamespace(options=self.options)

    def enqueue(self, message: dramatiq.Message, delay: int | None = None) -> None:
        self.enqueued.append((message, delay))


def _message(actor: str = "send_part", args: tuple = (41, 7)) -> MessageProxy:
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name="campaign.send", actor_name=actor, args=args, kwargs={}, options={}
    )
    return MessageProxy(message)


def _noop() -> None:
    """An actor's body (never run here)."""


def _script(monkeypatch: pytest.MonkeyPatch, name: str, grants: list[ratelimit.Grant]) -> list[tuple]:
    """Replace ratelimit.<name> by a function handing out ``grants`` in turn; returns its calls."""
    calls: list[tuple] = []

    def fake(*args: object) -> ratelimit.Grant:
        calls.append(args)
        return grants[min(len(calls), len(grants)) - 1]

    monkeypatch.setattr(ratelimit, name, fake)
    return calls


# --------------------------------------------------------------------------------------------
# declared actor options


def test_actor_options_are_declared_by_the_middleware_that_reads_them(mw):
    """dramatiq refuses an actor option no middleware declares: campaign_step and rate_limit are ours."""
    broker = StubBroker(middleware=[mw.DeadLetters(SETTINGS), mw.RateLimits(SETTINGS)])
    step = dramatiq.actor(actor_name="step", broker=broker, campaign_step=True, rate_limit="inbox")(_noop)
    assert step.options == {"campaign_step": True, "rate_limit": "inbox"}
    bare = StubBroker(middleware=[])
    with pytest.raises(ValueError, match="campaign_step"):
        dramatiq.actor(actor_name="step", broker=bare, campaign_step=True)(_noop)


# --------------------------------------------------------------------------------------------
# RateLimits


def test_an_actor_without_rate_limit_runs_and_asks_for_nothing(mw, monkeypatch):
    calls = _script(monkeypatch, "acquire_minute", [ratelimit.Grant("k", "T")])
    limiter, broker = mw.RateLimits(SETTINGS), _Broker(None)
    limiter.before_process_message(broker, _message())
    assert calls == [] and broker.enqueued == []


def test_an_inbox_paced_actor_runs_at_once_its_step_takes_the_slot(mw, monkeypatch):
    """T-PERF-7: no round trip before a send: its step takes the inbox's slot in its claim statement."""
    calls = _script(monkeypatch, "acquire_inbox", [ratelimit.Grant("inbox:7", "T")])
    minute = _script(monkeypatch, "acquire_minute", [ratelimit.Grant("k", "T")])
    broker = _Broker("inbox")
    mw.RateLimits(SETTINGS).before_process_message(broker, _message(args=(41, 7)))
    assert calls == [] and minute == [] and broker.enqueued == []


def test_a_refused_slot_with_a_short_wait_is_waited_in_the_thread(mw, monkeypatch):
    """R-RATE-3: the step's slot refused for less than IN_THREAD_WAIT_SECONDS: sleep, then the step tries again."""
    slept: list[float] = []
    monkeypatch.setattr(mw.time, "sleep", slept.append)
    limiter, broker = mw.RateLimits(SETTINGS), _Broker("inbox")
    limiter.before_process_message(broker, _message(args=(41, 7)))
    limiter.slot_refused(0.05)
    assert slept == [0.05] and broker.enqueued == []


def test_a_refused_slot_with_a_longer_wait_defers_the_delivery(mw, monkeypatch):
    """R-RATE-1: a delayed copy of the send (same message), then SkipMessage: never dropped, no retry spent.
    (Its row's hand-off deadline moving is checked on PostgreSQL: tests/integration/actors/test_middleware.py.)"""
    monkeypatch.setattr(mw, "db", types.SimpleNamespace(execute_sql=lambda *a, **k: None))
    limiter, broker, message = mw.RateLimits(SETTINGS), _Broker("inbox"), _message(args=(41, 7))
    limiter.before_process_message(broker, message)
    with pytest.raises(SkipMessage, match="rate limited for 2.00s"):
        limiter.slot_refused(mw.IN_THREAD_WAIT_SECONDS + 1.5)
    ((copy, delay),) = broker.enqueued
    assert delay == 2001 and (copy.message_id, copy.args) == (message.message_id, (41, 7))


def test_the_in_thread_budget_is_per_delivery(mw, monkeypatch):
    """Short waits add up: once IN_THREAD_WAIT_SECONDS of this delivery are spent, the next refusal defers."""
    clock = [100.0]
    monkeypatch.setattr(mw.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(mw.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    monkeypatch.setattr(mw, "db", types.SimpleNamespace(execute_sql=lambda *a, **k: None))
    limiter, broker = mw.RateLimits(SETTINGS), _Broker("inbox")
    limiter.before_process_message(broker, _message(args=(41, 7)))
    limiter.slot_refused(0.3)
    with pytest.raises(SkipMessage):
        limiter.slot_refused(0.3)
    assert len(broker.enqueued) == 1


def test_a_refused_slot_outside_a_paced_delivery_only_sleeps(mw, monkeypatch):
    """A direct call (a tool, a test) has no delivery to defer: it waits at most IN_THREAD_WAIT_SECONDS."""
    slept: list[float] = []
    monkeypatch.setattr(mw.time, "sleep", slept.append)
    mw.RateLimits(SETTINGS).slot_refused(30.0)
    assert slept == [mw.IN_THREAD_WAIT_SECONDS]


def test_a_short_wait_is_spent_in_the_thread_not_in_the_delay_queue(mw, monkeypatch):
    """R-RATE-3: a wait within IN_THREAD_WAIT_SECONDS polls again instead of a broker round trip."""
    key = ratelimit.openrouter_key(SETTINGS.openrouter_api_key)
    calls = _script(monkeypatch, "acquire_minute", [ratelimit.Grant(key, None, wait=0.05), ratelimit.Grant(key, "T")])
    broker = _Broker("openrouter")
    mw.RateLimits(SETTINGS).before_process_message(broker, _message("generate", args=()))
    assert len(calls) == 2 and calls[0] == (key, SETTINGS.openrouter_requests_per_minute)
    assert broker.enqueued == []


def test_a_longer_wait_re_enqueues_a_copy_with_that_delay_and_skips_the_message(mw, monkeypatch):
    """R-RATE-1: the message is never dropped and spends no retry: a delayed copy, then SkipMessage."""
    _script(monkeypatch, "acquire_minute", [ratelimit.Grant("k", None, wait=mw.IN_THREAD_WAIT_SECONDS + 1.5)])
    broker, message = _Broker("openrouter"), _message("generate", args=())
    with pytest.raises(SkipMessage, match="rate limited for 2.00s"):
        mw.RateLimits(SETTINGS).before_process_message(broker, message)
    ((copy, delay),) = broker.enqueued
    assert delay == 2001  # the wait, in ms, plus one so that it is never zero
    assert (copy.message_id, copy.actor_name, copy.args) == (message.message_id, "generate", ())  # the same message


def test_a_wait_longer_than_the_broker_should_hold_is_capped_in_the_delay_queue(mw, monkeypatch):
    """R-DISP-2: RabbitMQ holds a delayed copy for MAX_BROKER_DELAY_SECONDS at most."""
    _script(monkeypatch, "acquire_minute", [ratelimit.Grant("k", None, wait=MAX_BROKER_DELAY_SECONDS * 3)])
    broker = _Broker("openrouter")
    with pytest.raises(SkipMessage):
        mw.RateLimits(SETTINGS).before_process_message(broker, _message("generate", args=()))
    assert [delay for _, delay in broker.enqueued] == [MAX_BROKER_DELAY_SECONDS * 1000 + 1]


def test_a_failing_pacing_check_fails_closed_and_names_the_cause(mw, monkeypatch):
    """dramatiq logs and ignores anything but a MiddlewareError from a before-hook: the actor would
    then run unpaced. The check's failure must stop the message instead."""

    def broken(*args: object) -> ratelimit.Grant:
        raise OSError("database unreachable")

    monkeypatch.setattr(ratelimit, "acquire_minute", broken)
    with pytest.raises(mw.RateLimitUnavailable, match="rate limit check failed: OSError: database unreachable"):
        mw.RateLimits(SETTINGS).before_process_message(_Broker("openrouter"), _message("generate", args=()))


def test_an_unknown_rate_limit_option_is_refused_with_the_actor_named(mw):
    with pytest.raises(mw.RateLimitUnavailable, match="unknown rate_limit option 'per_hour' on actor send_part"):
        mw.RateLimits(SETTINGS).before_process_message(_Broker("per_hour"), _message())


def test_a_delivery_is_forgotten_after_its_message(mw, monkeypatch):
    """The next message of the thread must not be deferred as if it were the last one."""
    slept: list[float] = []
    monkeypatch.setattr(mw.time, "sleep", slept.append)
    limiter, broker, message = mw.RateLimits(SETTINGS), _Broker("inbox"), _message(args=(41, 7))
    limiter.before_process_message(broker, message)
    limiter.after_process_message(broker, message)
    limiter.slot_refused(30.0)  # no delivery any more: a bounded sleep, no copy
    assert broker.enqueued == [] and slept == [mw.IN_THREAD_WAIT_SECONDS]


# --------------------------------------------------------------------------------------------
# DeadLetters and DbConnection


def test_dead_letters_ignores_successes_retries_and_actors_that_are_not_steps(mw, monkeypatch, caplog):
    """Only a campaign step that failed for good is recorded; nothing else reaches the database."""

    def no_database(*args: object, **kwargs: object) -> None:
        raise AssertionError("DeadLetters touched the database")

    monkeypatch.setattr(mw.outcomes, "fail_exhausted", no_database)
    monkeypatch.setattr(mw.db, "obj", None)  # any statement would fail and be logged at ERROR
    dead = mw.DeadLetters(SETTINGS)
    broker = StubBroker(middleware=[dead])
    dramatiq.actor(actor_name="ping", broker=broker)(_noop)
    failed = _message("ping")
    failed.fail()
    retrying = _message("ping")
    with caplog.at_level(logging.ERROR):
        dead.after_process_message(broker, _message("ping"), result=None, exception=None)
        dead.after_process_message(broker, retrying, exception=RuntimeError("retry later"))
        dead.after_process_message(broker, failed, exception=RuntimeError("boom"))  # not a campaign step
        dead.after_process_message(broker, _message("gone"), exception=RuntimeError("x"))  # no such actor
    assert caplog.records == []


def test_db_connection_release_without_a_bound_database_is_a_no_op(mw, monkeypatch):
    monkeypatch.setattr(mw.db, "obj", None)
    mw.DbConnection(SETTINGS).after_skip_message(StubBroker(middleware=[]), _message())


# --------------------------------------------------------------------------------------------
# the engine's list


def test_engine_middleware_order_and_lookup(mw):
    """StepLog binds the context first, DbConnection's connection serves the others, DeadLetters runs
    before dramatiq's Retries decide; RateLimits is last before the actor (actors.broker)."""
    before, after = mw.engine_middleware(SETTINGS)
    assert [type(m) for m in before] == [mw.StepLog, mw.DbConnection, mw.DeadLetters]
    assert [type(m) for m in after] == [mw.RateLimits]
    broker = StubBroker(middleware=[*before, *after])
    assert mw.current_rate_limits(broker) is after[0]
    assert mw.current_rate_limits(StubBroker(middleware=[])) is None
