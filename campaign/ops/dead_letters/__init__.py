"""Dead letters of the pipeline: list, requeue, purge (SPEC R-OPS-2, R-FAIL-3).

A pipeline step whose retries are exhausted leaves two traces: the Dramatiq message in its
queue's ``.XQ`` (RabbitMQ drops it after 7 days) and a ``dead_letters`` row in PostgreSQL
(written by ``actors.middleware.DeadLetters``, kept forever). This package joins the two by
Dramatiq message id, so a dead letter whose XQ copy expired is still listed and requeueable.

The XQs are browsed without losing anything: every message is fetched with ``basic_get`` and
NOT acknowledged (RabbitMQ hides it from other consumers meanwhile); only the copies of dead
letters that were requeued or purged are acknowledged, everything else goes back to its queue
(``basic_nack(requeue=True)``) when the browser closes, also on a crash (closing a channel
requeues what it holds).

``--requeue``, per dead letter, in this order:

1. ONE transaction: the campaign message goes back to the step that failed
   (``repairs.requeue_dead_step``: status, parts, attempts, run counters, run reopened or
   resumed) and the row becomes ``requeued``; or, if the message moved on since, nothing
   changes and the row becomes ``resolved`` with a note;
2. after the commit, the step's actor message is published (publisher confirms);
3. then the XQ copy is acknowledged (removed).

A crash between 1 and 2 leaves the message in an in-flight status with no Dramatiq message:
the scheduler's recovery sweep re-enqueues it after ``LEASE_SECONDS`` (it covers queued,
splitting and sending alike). A crash between 2 and 3 leaves a stale XQ copy: the next run
sees its row is no longer ``dead`` and just removes it. So running ``--requeue`` twice sends
nothing twice.

The package: ``xq`` (the RabbitMQ side), ``store`` (the PostgreSQL side, and the join of the two),
``actions`` (requeue, purge, resolve) and ``command`` (arguments, output, ``run``, ``main``).
"""

from campaign.errors import DeadLetterUsageError
from campaign.ops.dead_letters.actions import (
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    REQUEUE_ACTOR_OF,
    Outcome,
    Publisher,
    describe_repair,
    purge,
    requeue,
    resolve,
)
from campaign.ops.dead_letters.command import (
    add_arguments,
    check_args,
    format_age,
    main,
    parse_duration,
    print_table,
    run,
)
from campaign.ops.dead_letters.store import Item, Row, collect, load_rows, select
from campaign.ops.dead_letters.xq import BROWSE_LIMIT, KNOWN_ACTORS, XqBrowser, XqMessage, decode_xq

__all__ = [
    "DeadLetterUsageError",
    "XqMessage",
    "Item",
    "XqBrowser",
    "add_arguments",
    "parse_duration",
    "collect",
    "select",
    "requeue",
    "purge",
    "run",
    "KNOWN_ACTORS",
    # also reached as dead_letters.<name> by the CLI, the script, pyproject's console script and the tests
    "BROWSE_LIMIT",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "EXIT_USAGE",
    "REQUEUE_ACTOR_OF",
    "Outcome",
    "Publisher",
    "Row",
    "check_args",
    "decode_xq",
    "describe_repair",
    "format_age",
    "load_rows",
    "main",
    "print_table",
    "resolve",
]
