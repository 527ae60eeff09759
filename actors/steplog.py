"""One structured log line per pipeline step, with actor, run and message ids (SPEC R-OPS-6).

The middleware binds the log context when a message starts (actor, campaign message id, inbox,
Dramatiq id, retry number); the pipeline adds the run once it has loaded the message; the
after-hook writes the step's single summary line (outcome and duration), so every other line the
step logs in between carries the same ids.
"""

from __future__ import annotations

import logging
import threading
import time

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.middleware import Middleware

from campaign import logs
from campaign.settings import Settings

log = logging.getLogger("steps")


class _DropSkipped(logging.Filter):
    """Drops dramatiq's "Message ... was skipped." WARNING: a rate-limited message re-enqueued with a
    delay is routine pacing (R-RATE-2), and RateLimits logs its own debug line for it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.WARNING and str(record.msg).endswith("was skipped."))


class StepLog(Middleware):
    """Binds per-message log context and logs one ``step done|retry|failed`` line per step."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._local = threading.local()

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        logs.install_on_existing_handlers(self.settings)
        logging.getLogger("dramatiq.worker.WorkerThread").addFilter(_DropSkipped())

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        args = message.args or ()
        campaign_id = args[0] if args and isinstance(args[0], int) else None
        inbox_id = args[1] if len(args) > 1 and isinstance(args[1], int) else None
        self._local.token = logs.bind(
            actor=message.actor_name,
            message=campaign_id,
            inbox=inbox_id,
            dramatiq_id=message.message_id,
            retry=message.options.get("retries") or None,
        )
        self._local.started = time.monotonic()

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: object = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None:
            outcome, level = "done", logging.INFO
        elif isinstance(exception, dramatiq.Retry) or not message.failed:
            outcome, level = "retry", logging.INFO
        else:
            outcome, level = "failed", logging.ERROR
        started = getattr(self._local, "started", None)
        ms = int((time.monotonic() - started) * 1000) if started is not None else None
        logs.annotate(step=message.actor_name, outcome=outcome, ms=ms)
        if exception is None:
            log.log(level, "step %s", outcome)
        else:
            log.log(level, "step %s: %s: %s", outcome, type(exception).__name__, exception)
        self._unbind()

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        self._unbind()

    def _unbind(self) -> None:
        token = getattr(self._local, "token", None)
        if token is not None:
            logs.unbind(token)
            self._local.token = None
            self._local.started = None
