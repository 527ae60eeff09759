"""Operator CLI (SPEC R-OPS-1): ``python cli.py COMMAND ...``; ``--help`` lists the commands."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import peewee
from rich.text import Text

from campaign import capacity, health, inboxes, planner, runs
from campaign.db import db, init_db
from campaign.errors import ConfigError, EngineError
from campaign.inbound.triage import INTENTS
from campaign.logs import configure_logging
from campaign.ops import conversation, dead_letters, monitor, report
from campaign.ops.configfile import ConfigFileError, apply_file
from campaign.ops.leads_import import import_file
from campaign.ops.triage_view import TriageSummary
from campaign.settings import Settings, get_settings, redact_url
from devtools import demo
from models.schema import LATEST, current_version, migrate

if TYPE_CHECKING:
    from rich.console import RenderableType

log = logging.getLogger("cli")

Handler = Callable[[argparse.Namespace, Settings], int]
#: adds a sub-command's arguments to its parser; what it returns (``add_argument``'s Action) is ignored
ArgsAdder = Callable[[argparse.ArgumentParser], object]
_COMMANDS: dict[str, tuple[Handler, ArgsAdder, str]] = {}


def command(name: str, help: str, args: ArgsAdder = lambda p: None) -> Callable[[Handler], Handler]:
    """Register ``func`` as the handler of sub-command ``name``."""

    def register(func: Handler) -> Handler:
        _COMMANDS[name] = (func, args, help)
        return func

    return register


@command(
    "init-db",
    "create or upgrade the schema (idempotent)",
    lambda p: p.add_argument("--target", type=int, default=None, help="stop at this schema version"),
)
def cmd_init_db(args: argparse.Namespace, settings: Settings) -> int:

    with db.connection_context():
        applied = migrate(db, args.target)
        version = current_version(db)
    if applied:
        print(f"schema upgraded to version {version} (applied {', '.join(map(str, applied))})")
    else:
        print(f"schema already at version {version} (latest {LATEST}); nothing to do")
    return 0


# --------------------------------------------------------------------------------------------
# configuration and leads
# --------------------------------------------------------------------------------------------


@command(
    "apply",
    "apply a TOML file of workspaces, columns, inboxes and campaigns (idempotent)",
    lambda p: p.add_argument("file", help="the TOML file (format: SPEC §4.8, example: examples/acme.toml)"),
)
def cmd_apply(args: argparse.Namespace, settings: Settings) -> int:

    try:
        with db.connection_context():
            summary = apply_file(args.file)
    except ConfigFileError as exc:
        for line in exc.errors:
            print(f"error: {line}", file=sys.stderr)
        print("nothing was applied", file=sys.stderr)
        return 2
    for line in summary.lines():
        print(line)
    return 0


def _import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="CSV with a header: name,phone[,extra columns...]")
    p.add_argument("--workspace", required=True, help="workspace name")
    p.add_argument("--column", required=True, help="column new leads go into")
    p.add_argument("--region", default="BR", help="default phone region for numbers without +country (default BR)")


@command(
    "import-leads",
    "import leads from CSV (exit 1 when some rows were rejected, 2 when nothing was imported)",
    _import_args,
)
def cmd_import_leads(args: argparse.Namespace, settings: Settings) -> int:

    with db.connection_context():
        report = import_file(args.file, workspace=args.workspace, column=args.column, region=args.region)
    print(
        f"{report.imported} lead(s) imported into {args.workspace}/{args.column}: {report.inserted} new, "
        f"{report.updated} updated, {report.unchanged} unchanged; {len(report.errors)} row(s) rejected"
    )
    for err in report.errors:
        print(f"rejected {err}")
    return 1 if report.errors else 0


# --------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------


@command(
    "run-now",
    "plan today's run of a campaign now (manual run)",
    lambda p: p.add_argument("campaign", help="WORKSPACE/CAMPAIGN, e.g. acme/first-touch"),
)
def cmd_run_now(args: argparse.Namespace, settings: Settings) -> int:

    with db.connection_context():
        config_id = planner.find_config(args.campaign)
        run = planner.plan_run(config_id, manual=True)
        if run is None:
            row = db.execute_sql(
                """SELECT id, status, run_date FROM campaign_runs WHERE config_id = %s
                                    ORDER BY run_date DESC, id DESC LIMIT 1""",
                (config_id,),
            ).fetchone()
            raise planner.PlanError(
                f"campaign {args.campaign} already has run {row[0]} for {row[2]} ({row[1]}); "
                "one run per campaign and day"
                if row
                else f"campaign {args.campaign} could not be planned"
            )
        first_last = db.execute_sql(
            "SELECT min(scheduled_at), max(scheduled_at) FROM campaign_messages WHERE run_id = %s", (run.id,)
        ).fetchone()
    if run.status == "failed":
        print(f"error: run {run.id} of {args.campaign} failed: {run.failure_reason}", file=sys.stderr)
        return 2
    when = f", from {first_last[0]:%Y-%m-%d %H:%M:%S} to {first_last[1]:%H:%M:%S} UTC" if first_last[0] else ""
    print(
        f"run {run.id} of {args.campaign} planned for {run.run_date}: {run.leads_total} message(s){when}; "
        f"overflow {run.leads_overflow}; status {run.status}"
    )
    if run.excluded_too_recent or run.excluded_replied or run.excluded_opted_out:
        print(
            f"  excluded from the source column: too recent {run.excluded_too_recent} · "
            f"replied {run.excluded_replied} · opted out {run.excluded_opted_out}"
        )
    return 0


def _run_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=int, help="run id (see `status`)")


@command(
    "pause",
    "pause a running run (in-flight messages finish; nothing new starts); on a run the engine "
    "paused by itself, the pause becomes yours: only `resume` ends it",
    _run_arg,
)
def cmd_pause(args: argparse.Namespace, settings: Settings) -> int:

    with db.connection_context():
        was = runs.pause_run(args.run)
    if was:
        print(
            f"run {args.run} paused (manual): it was paused automatically ({was}); it no longer resumes by "
            "itself, only with `resume`"
        )
    else:
        print(f"run {args.run} paused")
    return 0


@command("resume", "resume a paused run (overdue messages are re-planned into the remaining window)", _run_arg)
def cmd_resume(args: argparse.Namespace, settings: Settings) -> int:

    with db.connection_context():
        result = runs.resume_run(args.run)
    print(
        f"run {args.run} resumed: {result['replanned']} message(s) re-planned, "
        f"{result['skipped']} skipped (window closed)"
    )
    return 0


@command("cancel", "cancel a run (pending messages skipped 'cancelled'; in-flight ones finish)", _run_arg)
def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:

    with db.connection_context():
        skipped = runs.cancel_run(args.run)
    print(f"run {args.run} cancelled: {skipped} pending message(s) skipped")
    return 0


# --------------------------------------------------------------------------------------------
# inboxes (R-FAIL-6)
# --------------------------------------------------------------------------------------------


def _inbox_args(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, help_text in (
        (
            "enable",
            "enable an inbox: failures reset, throttled/restricted back to healthy, its runs paused "
            "inbox_disabled / inbox_restricted resume",
        ),
        ("disable", "disable an inbox: its running runs pause (inbox_disabled) until it is enabled"),
    ):
        a = actions.add_parser(action, help=help_text, description=help_text)
        a.add_argument("name", help="the inbox name of [workspaces.W.inboxes.NAME], or W/NAME")
        a.add_argument("--workspace", default=None, help="its workspace, when the name exists in several")
        a.add_argument(
            "--reason",
            required=action == "disable",
            default=None,
            help="why (kept on the inbox and in campaign_events)" + (" (optional)" if action == "enable" else ""),
        )


def _run_ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids)) if ids else "none"


@command("inbox", "enable or disable an inbox by name (logged with who and why)", _inbox_args)
def cmd_inbox(args: argparse.Namespace, settings: Settings) -> int:

    with db.connection_context():
        if args.action == "disable":
            change = inboxes.disable_inbox(args.name, workspace=args.workspace, reason=args.reason)
        else:
            change = inboxes.enable_inbox(args.name, workspace=args.workspace, reason=args.reason)
    label = change.inbox.label
    if not change.changed:
        print(f"inbox {label}: {change.note}")
    elif args.action == "disable":
        print(
            f"inbox {label} disabled by {change.by}: {change.reason}; runs paused (inbox_disabled): "
            f"{_run_ids(change.paused)}"
        )
    else:
        print(
            f"inbox {label} enabled by {change.by} (consecutive failures reset to 0"
            + (f"; {change.health_was} -> healthy" if change.health_was else "")
            + f"); runs resumed: {_run_ids(change.resumed)}"
        )
    return 0


INBOX_COLUMNS = (
    "inbox",
    "instance",
    "state",
    "connection",
    "cap today",
    "sent 24 h",
    "reply ratio 7 d",
    "assigned/sent/failed/moved-away",
    "failures",
    "reason",
)


def inbox_rows(
    rows: Sequence[inboxes.InboxRow], ratios: dict[int, health.ReplyRatio], work: dict[int, str] | None = None
) -> list[tuple[str, ...]]:
    """The cells of the inbox table (R-HEALTH-4), one tuple per inbox in :data:`INBOX_COLUMNS` order;
    ``work``: per inbox, over the runs in progress of its pools (R-POOL-4)."""
    out: list[tuple[str, ...]] = []
    for r in rows:
        connection = r.connection_state + (
            f" since {r.disconnected_since:%Y-%m-%d %H:%M} UTC" if r.disconnected_since else ""
        )
        cap = "-" if r.max_per_day is None else str(r.effective_per_day)
        if r.max_per_day is not None and r.effective_per_day != r.max_per_day:
            cap += f" (of {r.max_per_day})"
        out.append(
            (
                r.label,
                r.instance_name,
                r.state,
                connection,
                cap,
                str(r.sent_today),
                ratios.get(r.id, health.ReplyRatio(0, 0)).text(),
                (work or {}).get(r.id, "-"),
                str(r.consecutive_failures),
                r.reason or "-",
            )
        )
    return out


def inbox_table(rows: Sequence[inboxes.InboxRow], ratios: dict[int, health.ReplyRatio]) -> RenderableType:
    """The inboxes section of ``status``: the same cells as ``inboxes``."""
    from rich.table import Table

    t = Table(title=f"inboxes ({len(rows)})", title_justify="left")
    for col in INBOX_COLUMNS:
        t.add_column(col, overflow="fold")
    styles = {"throttled": "yellow", "restricted": "red", "disabled": "red"}
    for cells, r in zip(inbox_rows(rows, ratios, _inbox_work()), rows):
        t.add_row(*(_plain(c) for c in cells), style=styles.get(r.state, ""))
    return t


@command(
    "inboxes",
    "list the inboxes: state (healthy/throttled/restricted/disabled), connection, cap today, sent, "
    "reply ratio, work in runs in progress, consecutive send failures, reason",
    lambda p: p.add_argument("--workspace", default=None, help="only this workspace's inboxes"),
)
def cmd_inboxes(args: argparse.Namespace, settings: Settings) -> int:

    with db.connection_context():
        rows = inboxes.list_inboxes(args.workspace)
        ratios = health.reply_ratios([r.id for r in rows])
        work = _inbox_work()
    if not rows:
        print("no inbox (apply a TOML file first)")
        return 0
    table = [INBOX_COLUMNS, *inbox_rows(rows, ratios, work)]
    widths = [max(len(row[i]) for row in table) for i in range(len(INBOX_COLUMNS) - 1)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return 0


def _inbox_work() -> dict[int, str]:
    """Per inbox, over the runs in progress of every pool it is in (R-POOL-4): assigned/sent/failed/moved away."""
    active = [r[0] for r in db.execute_sql("SELECT id FROM campaign_runs WHERE status IN ('running', 'paused')")]
    totals: dict[int, list[int]] = {}
    for m in monitor.pool_members(active):
        t = totals.setdefault(m.inbox_id, [0, 0, 0, 0])
        for k, v in enumerate((m.assigned, m.sent, m.failed, m.moved_away)):
            t[k] += v
    return {i: "/".join(map(str, t)) for i, t in totals.items()}


# --------------------------------------------------------------------------------------------
# watching
# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# repairs: dead letters (R-OPS-2) and in-doubt messages (R-FAIL-4)
# --------------------------------------------------------------------------------------------


def _dead_letters_args(p: argparse.ArgumentParser) -> None:

    dead_letters.add_arguments(p)


@command(
    "dead-letters",
    "list, requeue or purge the pipeline's dead letters (.XQ + PostgreSQL; same as scripts/reprocess_dead_letters.py)",
    _dead_letters_args,
)
def cmd_dead_letters(args: argparse.Namespace, settings: Settings) -> int:

    return dead_letters.run(args, settings)


def _resolve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("message", type=int, help="id of the in_doubt campaign message (see `status`)")
    verdict = p.add_mutually_exclusive_group(required=True)
    verdict.add_argument(
        "--sent", action="store_true", help="the in-doubt part(s) reached the lead: count them sent, send what is left"
    )
    verdict.add_argument("--resend", action="store_true", help="they did not: send the in-doubt part(s) again")


@command("resolve", "settle an in_doubt message: --sent (it reached the lead) or --resend", _resolve_args)
def cmd_resolve(args: argparse.Namespace, settings: Settings) -> int:

    return dead_letters.resolve(args.message, "sent" if args.sent else "resend", settings)


def _status_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, help="refresh interval in seconds (default 2)")
    p.add_argument("--no-queues", action="store_true", help="do not ask RabbitMQ for queue depths")


def _bar(run: monitor.RunStatus, width: int = 24) -> Text:
    """A stacked bar: sent / skipped / failed / in doubt of total."""

    text = Text()
    total = max(run.total, 1)
    used = 0
    for count, char, style in (
        (run.sent, "█", "green"),
        (run.skipped, "█", "yellow"),
        (run.failed, "█", "red"),
        (run.in_doubt, "█", "magenta"),
    ):
        n = round(width * count / total)
        n = min(n, width - used)
        text.append(char * n, style=style)
        used += n
    text.append("░" * (width - used), style="grey50")
    text.append(f" {run.progress:4.0%}")
    return text


def _plain(value: object) -> Text:
    """A table cell from data (provider errors, names, queue names): rich ``Text`` is never parsed
    as markup, so "[/x] is not a valid model ID" prints as it is instead of raising MarkupError,
    and "[bold]" or "[link=...]" in an error text is shown, not obeyed."""

    return Text("-" if value is None else str(value))


def _listening(heard: monitor.Listening, now: dt.datetime) -> list[RenderableType]:
    """The listening section (R-IN): what leads and strangers wrote, and what could not be used."""
    from rich.table import Table

    t = Table(title="listening (inbound messages)", title_justify="left")
    t.add_column("")
    t.add_column("last 24 h", justify="right")
    t.add_column("total", justify="right")
    for label, recent, total, style in (
        ("replies from leads (opt-outs included)", heard.replies_24h, heard.replies_total, ""),
        ("  opt-outs", heard.opt_outs_24h, heard.opt_outs_total, "yellow" if heard.opt_outs_24h else ""),
        ("from unknown numbers (no lead)", heard.unknown_24h, heard.unknown_total, ""),
        (
            "unusable events (recorded, acked)",
            heard.unusable_24h,
            heard.unusable_total,
            "red" if heard.unusable_24h else "",
        ),
    ):
        t.add_row(Text(label, style=style), Text(str(recent), style=style), Text(str(total)))
    if heard.last_at is None:
        last = Text("no inbound message event yet", style="grey50")
    else:
        ago = max((now - heard.last_at).total_seconds(), 0.0)
        last = Text(
            f"last inbound message event {heard.last_at.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} UTC ({_ago(ago)} ago)"
        )
    return [t, last]


def _triage(recent: TriageSummary, total: TriageSummary) -> RenderableType:
    """The reply triage section (R-IN-5): replies per intent, the keyword fallbacks (E-37), what is
    pending, and triage's tokens and cost, apart from generation's."""
    from rich.table import Table

    t = Table(title="reply triage (AI, R-IN-5)", title_justify="left")
    t.add_column("")
    t.add_column("last 24 h", justify="right")
    t.add_column("total", justify="right")
    for intent in INTENTS:
        t.add_row(intent, str(recent.intents.get(intent, 0)), str(total.intents.get(intent, 0)))
    keyword_style = "yellow" if recent.by_keywords else ""
    t.add_row(
        Text("  of them by the keyword rules (LLM failed)", style=keyword_style),
        Text(str(recent.by_keywords), style=keyword_style),
        str(total.by_keywords),
    )
    t.add_row("pending", str(recent.pending), str(total.pending))
    t.add_row("triage tokens (not in generation's)", f"{recent.total_tokens:,}", f"{total.total_tokens:,}")
    t.add_row("triage cost (OpenRouter credits)", _cost(recent.cost), _cost(total.cost))
    return t


def _cost(cost: float | None) -> str:
    return "-" if cost is None else f"{cost:.4f}"


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def _members_table(members: list[monitor.MemberStatus]) -> RenderableType:
    """One line per inbox of the pool of each run in progress (R-POOL-4)."""
    from rich.table import Table

    t = Table(title="sender pools of the runs in progress", title_justify="left")
    for col in ("run", "inbox", "state", "assigned", "sent", "failed", "moved away"):
        t.add_column(col, justify="left" if col in ("inbox", "state") else "right")
    for m in members:
        t.add_row(
            str(m.run_id),
            _plain(m.inbox),
            Text(m.state, style="" if m.state == "ok" else "yellow"),
            str(m.assigned),
            str(m.sent),
            str(m.failed),
            str(m.moved_away),
        )
    return t


def _inbox_days(days: list[capacity.InboxDay]) -> RenderableType:
    """Per inbox, its capacity in sends: caps (warm-up day), used, planned, left (issue 22, R-HEALTH-1)."""
    from rich.table import Table

    t = Table(title="inbox capacity (sends; caps count every part)", title_justify="left")
    for col in ("inbox", "cap today", "warm-up", "hour: used/cap", "used 24h", "planned", "left"):
        t.add_column(col, justify="left" if col in ("inbox", "warm-up") else "right", overflow="fold")

    def cap(v: int | None) -> str:
        return "-" if v is None else str(v)

    for d in days:
        warm = f"day {d.warmup_day} of {d.warmup.days}" if d.warmup and d.warmup_day is not None else "-"
        if d.warmup and d.warmup_day is not None and d.warmup_day >= d.warmup.days:
            warm = "done"
        left = d.left
        t.add_row(
            _plain(d.label),
            cap(d.day_cap),
            warm,
            f"{d.used_hour}/{cap(d.hour_cap)}",
            str(d.used_day),
            str(d.planned),
            Text("-" if left is None else str(left), style="red" if left is not None and left < 0 else ""),
        )
    return t


def render_status(snap: monitor.StatusSnapshot) -> RenderableType:
    """The rich renderable of a status snapshot; every value from outside goes in as plain Text."""
    from rich.console import Group
    from rich.table import Table

    parts: list = [Text(f"campaign engine status at {snap.taken_at:%Y-%m-%d %H:%M:%S} UTC", style="bold")]
    runs = Table(title=f"runs in progress ({len(snap.runs)})", title_justify="left", expand=False)
    numeric = ("run", "sent", "skipped", "failed", "in doubt", "total", "pending", "in flight", "overflow")
    for col in (
        "run",
        "campaign",
        "date",
        "status",
        "sent/skipped/failed/in doubt",
        "sent",
        "skipped",
        "failed",
        "in doubt",
        "total",
        "pending",
        "in flight",
        "overflow",
        "excluded recent/replied/opted out",
        "next due (UTC)",
    ):
        runs.add_column(col, justify="right" if col in numeric else "left", overflow="fold")
    for r in snap.runs:
        status = r.status + (f" ({r.pause_reason})" if r.pause_reason else "")
        runs.add_row(
            str(r.id),
            _plain(r.campaign),
            str(r.run_date),
            Text(status, style="yellow" if r.pause_reason else ""),
            _bar(r),
            str(r.sent),
            str(r.skipped),
            str(r.failed),
            str(r.in_doubt),
            str(r.total),
            str(r.pending),
            str(r.in_flight),
            str(r.overflow),
            "/".join(str(r.excluded.get(k, 0)) for k in ("too_recent", "replied", "opted_out")),
            f"{r.next_at:%H:%M:%S}" if r.next_at else "-",
        )
    parts.append(runs if snap.runs else Text("no run in progress"))
    if snap.members:
        parts.append(_members_table(snap.members))
    if snap.capacity_days:
        parts.append(_inbox_days(snap.capacity_days))

    if snap.queues or snap.queue_error:
        queues = Table(title="queues (ready messages)", title_justify="left")
        for col in ("queue", "ready", ".DQ (delayed)", ".XQ (dead)"):
            queues.add_column(col, justify="left" if col == "queue" else "right")
        bases = [q for q in snap.queues if not q.endswith((".DQ", ".XQ"))]

        def fmt(v: object) -> str:
            return "?" if v is None else str(v)

        for q in bases:
            queues.add_row(
                _plain(q), fmt(snap.queues.get(q)), fmt(snap.queues.get(f"{q}.DQ")), fmt(snap.queues.get(f"{q}.XQ"))
            )
        parts.append(queues)
        if snap.queue_error:
            parts.append(Text(snap.queue_error, style="red"))

    for title, lines in (
        ("in doubt (resolve with `resolve`)", snap.in_doubt),
        ("failed (runs in progress)", snap.failed),
    ):
        if lines:
            t = Table(title=f"{title}: {len(lines)}", title_justify="left")
            for col in ("message", "run", "campaign", "lead", "phone", "error"):
                t.add_column(col, overflow="fold")
            for m in lines:
                t.add_row(
                    str(m.id),
                    str(m.run_id),
                    _plain(m.campaign),
                    str(m.lead_id or "-"),
                    _plain(m.phone),
                    _plain((m.error or "")[:120]),
                )
            parts.append(t)

    if snap.listening is not None:
        parts += _listening(snap.listening, snap.taken_at)
    if snap.triage is not None:
        parts.append(_triage(*snap.triage))
    if snap.inboxes:
        parts.append(inbox_table(snap.inboxes, snap.reply_ratios))

    if snap.alerts:
        parts.append(Text("alerts:", style="bold red"))
        parts += [Text(f"  ! {a.kind}: {a.text}", style="red") for a in snap.alerts]
    else:
        parts.append(Text("no alerts", style="green"))
    return Group(*parts)


@command(
    "status",
    "runs in progress, queue depths, in-doubt and failed messages, replies / opt-outs / unknown senders, alerts",
    _status_args,
)
def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from rich.console import Console
    from rich.live import Live

    if not 0.2 <= args.interval <= 3600:
        raise ConfigError(f"--interval {args.interval} must be between 0.2 and 3600 seconds")

    def snapshot() -> monitor.StatusSnapshot:
        with db.connection_context():
            return monitor.status_snapshot(settings, with_queues=not args.no_queues)

    probe = Console()
    console = probe if probe.is_terminal else Console(width=220)  # piped: never truncate the table
    if not args.watch:
        console.print(render_status(snapshot()))
        return 0
    try:
        with Live(render_status(snapshot()), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(args.interval)
                live.update(render_status(snapshot()))
    except KeyboardInterrupt:
        return 0


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=int, help="run id (see `status`)")
    p.add_argument(
        "--picture",
        default=None,
        metavar="PATH",
        help="where to write the picture, .png or .svg (default reports/run-<id>.png)",
    )
    p.add_argument("--no-picture", action="store_true", help="print the text summary only")


@command(
    "report",
    "a run's summary (outcomes by reason, timings, tokens, per inbox) and a picture of its sends",
    _report_args,
)
def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    if args.no_picture and args.picture:
        print("error: --picture and --no-picture contradict each other; give one", file=sys.stderr)
        return 2
    picture = Path(args.picture or f"reports/run-{args.run}.png")
    if not args.no_picture and picture.suffix.lower() not in report.PICTURE_SUFFIXES:
        # checked before reading anything: a typo costs nothing
        print(
            f"error: --picture {picture}: unsupported suffix {picture.suffix or '(none)'!r}; use .png or .svg",
            file=sys.stderr,
        )
        return 2
    with db.connection_context():
        rep = report.build_report(args.run)
    print(report.render_text(rep), end="")
    if not args.no_picture:
        try:
            written = report.render_picture(rep, picture)
        except OSError as exc:
            print(f"error: cannot write the picture {picture}: {exc}", file=sys.stderr)
            return 2
        print(f"picture: {written}")
    return 0


def _conversation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "lead",
        help="a lead id (42, or id:42) or its phone in any format import-leads accepts (+55 11 98765-4321)",
    )
    p.add_argument("--workspace", default=None, help="the lead's workspace, when the phone is a lead in several")
    p.add_argument(
        "--limit",
        type=int,
        default=conversation.DEFAULT_LIMIT,
        help=f"show the latest N messages (default {conversation.DEFAULT_LIMIT})",
    )
    p.add_argument("--region", default="BR", help="phone region for numbers without +country (default BR)")


@command(
    "conversation",
    "a lead (column, opt-out, last reply) and its conversation on every inbox, in time order (UTC)",
    _conversation_args,
)
def cmd_conversation(args: argparse.Namespace, settings: Settings) -> int:

    with db.connection_context():
        lead = conversation.find_lead(args.lead, workspace=args.workspace, region=args.region)
        conv = conversation.load_conversation(lead, limit=args.limit)
    print(conversation.render_text(conv), end="")
    return 0


@command(
    "verify",
    "check every run's counters against its message rows, every message against its parts, "
    "and that finished runs are closed (exit 1 on any finding)",
)
def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:

    with db.connection_context():
        runs = db.execute_sql("SELECT count(*) FROM campaign_runs").fetchone()[0]
        findings = monitor.verify()
    if not findings:
        print(
            f"ok: the counters of all {runs} run(s) match their message rows; every message agrees with its "
            "parts; every finished run is closed"
        )
        return 0
    for m in findings:
        print(f"{'MISMATCH' if isinstance(m, monitor.Mismatch) else 'INCONSISTENT'} {m}")
    print(f"{len(findings)} finding(s) in {len({m.run_id for m in findings})} of {runs} run(s)")
    return 1


# --------------------------------------------------------------------------------------------
# demo (issue 8)
# --------------------------------------------------------------------------------------------


def _demo_args(p: argparse.ArgumentParser) -> None:

    demo.add_arguments(p)


@command(
    "demo",
    "run the whole engine end to end on this machine (sandbox providers; real services when they "
    "answer, else embedded PostgreSQL + StubBroker)",
    _demo_args,
)
def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:

    return demo.run_from_args(args, verbose=args.verbose)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered sub-command."""
    parser = argparse.ArgumentParser(prog="cli.py", description="Campaign engine operator CLI")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, add_args, help_text) in _COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, bind the database, run the command; errors print one clear line."""
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
        configure_logging(settings, level="DEBUG" if args.verbose else None)
        init_db(settings, max_connections=4, application_name="campaign-cli")
        return _COMMANDS[args.command][0](args, settings)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (peewee.OperationalError, peewee.InterfaceError) as exc:  # database down or unreachable
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: database unavailable ({redact_url(get_settings().database_url)}): {first}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
