"""The dead-letter command: its arguments, its table / JSON output, ``run`` and the script's ``main``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from collections.abc import Sequence

import peewee

from campaign.db import db, init_db
from campaign.errors import ConfigError, DeadLetterUsageError
from campaign.logs import TextSink, configure_logging
from campaign.ops.dead_letters.actions import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, Outcome, Publisher, purge, requeue
from campaign.ops.dead_letters.store import Item, collect, select
from campaign.ops.dead_letters.xq import KNOWN_ACTORS, UTC, XqBrowser
from campaign.settings import Settings, get_settings, redact_url
from campaign.steps import QUEUES as PIPELINE_QUEUES

# --------------------------------------------------------------------------------------------
# arguments

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> dt.timedelta:
    """'30m', '2h', '7d', '1h30m', '45s', '2w' -> timedelta; anything else is an argparse error."""
    raw = text.strip().lower()
    pos, seconds = 0, 0.0
    for m in _DURATION_PART.finditer(raw):
        if m.start() != pos:
            break
        seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if not raw or pos != len(raw):
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use a number and a unit s/m/h/d/w, e.g. 30m, 2h, 7d, 1h30m"
        )
    return dt.timedelta(seconds=seconds)


def _queue_arg(text: str) -> str:
    name = text.strip()
    if name.endswith(".XQ"):
        name = name[:-3]
    if name in PIPELINE_QUEUES:
        return name
    short = {q.rsplit(".", 1)[-1]: q for q in PIPELINE_QUEUES}
    if name in short:
        return short[name]
    raise argparse.ArgumentTypeError(
        f"unknown queue {text!r}: one of {', '.join(PIPELINE_QUEUES)} (with or without .XQ)"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the dead-letter command (shared by the script and ``cli.py dead-letters``)."""
    p.add_argument(
        "--queue",
        type=_queue_arg,
        action="append",
        help=f"only this pipeline queue ({', '.join(PIPELINE_QUEUES)}); repeatable",
    )
    p.add_argument("--actor", choices=KNOWN_ACTORS, action="append", help="only this actor; repeatable")
    p.add_argument("--run", type=int, action="append", help="only dead letters of this run id; repeatable")
    p.add_argument(
        "--older-than",
        type=parse_duration,
        metavar="DURATION",
        help="only those dead for at least this long (30m, 2h, 7d)",
    )
    p.add_argument(
        "--newer-than", type=parse_duration, metavar="DURATION", help="only those dead for less than this long"
    )
    p.add_argument(
        "--id",
        action="append",
        metavar="ID",
        help="a dead letter id, a Dramatiq message id, or the raw-... key of an undecodable XQ message; repeatable",
    )
    p.add_argument(
        "--all", action="store_true", help="also list dead letters already requeued, purged or resolved (history)"
    )
    action = p.add_mutually_exclusive_group()
    action.add_argument(
        "--requeue",
        action="store_true",
        help="put each selected campaign message back at the step that failed and re-publish it",
    )
    action.add_argument(
        "--purge",
        action="store_true",
        help="drop the XQ copies and mark the rows purged (campaign messages stay failed)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="with --requeue/--purge: print exactly what would change, change nothing"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")


# --------------------------------------------------------------------------------------------
# output


def format_age(delta: dt.timedelta | None) -> str:
    """Compact age: 45s, 12m, 3h05m, 2d04h."""
    if delta is None:
        return "?"
    s = max(0, int(delta.total_seconds()))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


_COLUMNS = ("ID", "QUEUE", "ACTOR", "MESSAGE", "RUN", "AGE", "WHERE", "DL STATUS", "MSG STATUS", "ERROR / NOTE")


def _cells(item: Item, now: dt.datetime) -> list[str]:
    age = format_age(now - item.dead_at) if item.dead_at else "?"
    note = item.error if item.row is None or not item.row.note else f"{item.error} | {item.row.note}"
    return [
        item.label,
        item.queue,
        item.actor or "?",
        str(item.campaign_message_id or "-"),
        str(item.run_id or "-"),
        age,
        item.where,
        item.row.status if item.row else "-",
        item.message_status or "-",
        note,
    ]


def _as_json(item: Item, now: dt.datetime, outcome: Outcome | None = None) -> dict:
    d = {
        "id": item.row.id if item.row else None,
        "key": item.key,
        "queue": item.queue,
        "actor": item.actor,
        "campaign_message_id": item.campaign_message_id,
        "run_id": item.run_id,
        "age_seconds": round((now - item.dead_at).total_seconds(), 1) if item.dead_at else None,
        "where": item.where,
        "xq_copies": len(item.xq),
        "status": item.row.status if item.row else None,
        "message_status": item.message_status,
        "error": item.error,
        "problem": item.problem,
        "note": item.row.note if item.row else None,
    }
    if outcome is not None:
        d.update(action=outcome.action, ok=outcome.ok, result=outcome.text)
    return d


def print_table(items: list[Item], now: dt.datetime, out: TextSink, width: int = 200) -> None:
    """A plain fixed-width table (piped output stays greppable)."""
    rows = [_cells(i, now) for i in items]
    widths = [max([len(c)] + [len(r[n]) for r in rows]) for n, c in enumerate(_COLUMNS[:-1])]
    for cells in [list(_COLUMNS)] + rows:
        line = "  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + cells[-1]
        out.write(line[:width].rstrip() + "\n")


# --------------------------------------------------------------------------------------------
# the command


def check_args(args: argparse.Namespace) -> None:
    """Cross-option checks argparse cannot express (DeadLetterUsageError -> exit 2)."""
    if args.dry_run and not (args.requeue or args.purge):
        raise DeadLetterUsageError("--dry-run goes with --requeue or --purge (listing never changes anything)")
    if args.older_than is not None and args.newer_than is not None and args.older_than >= args.newer_than:
        raise DeadLetterUsageError(
            f"--older-than {args.older_than} and --newer-than {args.newer_than} select nothing "
            "(older-than must be shorter than newer-than)"
        )
    if args.run and any(r <= 0 for r in args.run):
        raise DeadLetterUsageError("--run takes a positive run id")


def run(
    args: argparse.Namespace, settings: Settings, *, out: TextSink | None = None, publish: Publisher | None = None
) -> int:
    """List / requeue / purge as ``args`` say; returns the exit code (0 ok, 1 partial, 2 usage)."""
    out = out or sys.stdout
    check_args(args)
    acting = args.requeue or args.purge
    now = dt.datetime.now(UTC)
    opened = XqBrowser(settings)
    browser: XqBrowser | None = opened  # None once it turned out unusable: nothing to close
    warnings: list[str] = []
    try:
        try:
            opened.open()
            xq = opened.browse(PIPELINE_QUEUES)
            warnings += opened.truncated
        except ConfigError as exc:
            if acting and not args.dry_run:
                # never half-act: a requeue must publish, a purge must ack
                print(f"error: {exc}; nothing was changed", file=sys.stderr)
                return EXIT_PARTIAL
            warnings.append(f"{exc}: XQ copies not shown, only the PostgreSQL records")
            browser, xq = None, []
        with db.connection_context():
            items = collect(xq, include_resolved=args.all, wanted=args.id or ())
            selected, unmatched = select(items, args, now)
            outcomes: list[Outcome] | None = None
            if args.requeue:
                outcomes = requeue(selected, settings, browser, dry_run=args.dry_run, publish=publish)
            elif args.purge:
                outcomes = purge(selected, settings, browser, dry_run=args.dry_run)
        _report(selected, outcomes, args, now, out)
    finally:
        if browser is not None:
            browser.close()
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    for value in unmatched:
        print(
            f"error: --id {value}: no such dead letter (use --all to include requeued/purged/resolved ones)",
            file=sys.stderr,
        )
    failed = [o for o in outcomes or [] if not o.ok]
    return EXIT_PARTIAL if failed or unmatched or warnings else EXIT_OK


def _report(
    selected: list[Item], outcomes: list[Outcome] | None, args: argparse.Namespace, now: dt.datetime, out: TextSink
) -> None:
    if args.json:
        by_item = {id(o.item): o for o in outcomes or []}
        for item in selected:
            out.write(json.dumps(_as_json(item, now, by_item.get(id(item))), default=str) + "\n")
        return
    if not selected:
        out.write("no dead letters" + (" match the filters" if _filtered(args) else "") + "\n")
        return
    print_table(selected, now, out)
    if outcomes is None:
        out.write(
            f"{len(selected)} dead letter(s); where: XQ = only in RabbitMQ, DB = only in PostgreSQL "
            "(XQ copy expired or removed), both\n"
        )
        return
    verb = "would be " if args.dry_run else ""
    out.write("\nDRY RUN: nothing was changed, neither in PostgreSQL nor in RabbitMQ\n" if args.dry_run else "\n")
    for o in outcomes:
        action = (
            o.action
            if not args.dry_run
            else {
                "requeued": "would requeue",
                "resolved": "would resolve",
                "purged": "would purge",
                "stale": "would drop stale copy",
                "skipped": "would skip",
                "error": "error",
            }[o.action]
        )
        out.write(f"{o.item.label}: {action}: {o.text}\n")
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.action] = counts.get(o.action, 0) + 1
    out.write(
        f"{len(outcomes)} dead letter(s) {verb}handled: "
        + ", ".join(f"{n} {a}" for a, n in sorted(counts.items()))
        + "\n"
    )


def _filtered(args: argparse.Namespace) -> bool:
    return bool(args.queue or args.actor or args.run or args.id or args.older_than or args.newer_than)


def main(argv: Sequence[str] | None = None, *, prog: str = "reprocess_dead_letters.py") -> int:
    """Script entry point: parse, set up logging and the database, run; exit codes 0/1/2."""

    parser = argparse.ArgumentParser(
        prog=prog, description="List, requeue or purge the dead letters of the campaign pipeline (SPEC R-OPS-2)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = get_settings()
        configure_logging(settings, level="DEBUG" if args.verbose else None)
        init_db(settings, max_connections=2, application_name="reprocess-dead-letters")
        return run(args, settings)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (peewee.OperationalError, peewee.InterfaceError) as exc:  # database down: nothing was changed
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"error: database unavailable ({redact_url(get_settings().database_url)}): {first}", file=sys.stderr)
        return EXIT_PARTIAL
