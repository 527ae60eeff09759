"""Engine middleware: a database connection per message, and (with the pipeline) dead-letter
recording and rate limits. Hooks are no-ops unless overridden (dramatiq's Middleware base)."""
from __future__ import annotations

import logging

import dramatiq
from dramatiq.middleware import Middleware

from db import db, init_db
from settings import Settings

log = logging.getLogger(__name__)


class DbConnection(Middleware):
    """Bind the database once per process; check a pooled connection out per message.

    The pool replaces a connection that broke (``pg_terminate_backend``, server restart), so
    a worker heals after E-16 instead of failing every later message on a dead socket.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        init_db(self.settings)

    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.Message) -> None:
        init_db(self.settings)
        db.connect(reuse_if_open=True)

    def after_process_message(self, broker: dramatiq.Broker, message: dramatiq.Message, *,
                              result: object = None, exception: BaseException | None = None) -> None:
        self._release()

    def after_skip_message(self, broker: dramatiq.Broker, message: dramatiq.Message) -> None:
        self._release()

    @staticmethod
    def _release() -> None:
        if db.obj is None or db.is_closed():
            return
        try:
            if db.in_transaction():  # an actor left a transaction open: never leak it to the pool
                db.rollback()
        except Exception:  # the connection is broken: the pool discards it on close
            log.debug("rollback on release failed", exc_info=True)
        db.close()


def engine_middleware(settings: Settings) -> list[Middleware]:
    """The engine's own middleware, in order."""
    return [DbConnection(settings)]
