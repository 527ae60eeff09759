"""The report as plain text for a terminal: ``render_text``."""

from __future__ import annotations

import datetime as dt
from typing import Any

from campaign.ops.report.build import UTC, RunReport


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f} ms" if v < 1000 else f"{v / 1000:.2f} s"


def _fmt_s(v: float | None) -> str:
    """Seconds for humans: 0.8 s, 45.3 s, 12m05s, 3h02m; negative values keep their sign (early)."""
    if v is None:
        return "-"
    sign, a = ("-" if v < 0 else ""), abs(v)
    if a < 60:
        return f"{sign}{a:.1f} s"
    if a < 3600:
        return f"{sign}{int(a // 60)}m{int(a % 60):02d}s"
    return f"{sign}{int(a // 3600)}h{int(a % 3600 // 60):02d}m"


def _table(headers: list[str], rows: list[list[str]], indent: str = "  ", left: int = 1) -> list[str]:
    """Aligned columns: the first ``left`` ones left-aligned (text), the others right-aligned (numbers)."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    out = []
    for row in [headers, *rows]:
        cells = [str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        out.append((indent + "  ".join(cells)).rstrip())
    return out


def _local(rep: RunReport, t: dt.datetime | None, fmt: str = "%H:%M:%S") -> str:
    if t is None:
        return "-"
    local = t.astimezone(rep.zone)
    day = "" if local.date() == rep.run_date else f"{local:%m-%d} "
    return f"{day}{local:{fmt}}"


def _ids(ids: list[int], limit: int = 20) -> str:
    shown = ", ".join(map(str, ids[:limit]))
    return shown + (f" … (+{len(ids) - limit} more)" if len(ids) > limit else "")


def render_text(rep: RunReport) -> str:
    """A compact plain-text summary of the report for a terminal (aligned columns, no colour codes)."""
    status = rep.status_text
    lines = [
        f"run {rep.run_id} · {rep.label} · {rep.run_date:%Y-%m-%d (%a)} · {status}"
        + (" · manual" if rep.manual else "")
    ]
    if rep.failure_reason:
        lines.append(f"  failure: {rep.failure_reason}")
    wstart, wend = rep.window_start_minute, rep.window_end_minute
    window = f"{wstart // 60:02d}:{wstart % 60:02d}–{wend // 60:02d}:{wend % 60:02d}"
    utc = ""
    if rep.window_open and rep.window_close:
        same_day = rep.window_open.date() == rep.window_close.date()
        fmt = "%H:%M" if same_day else "%m-%d %H:%M"
        utc = f" ({rep.window_open.astimezone(UTC):{fmt}}–{rep.window_close.astimezone(UTC):{fmt}} UTC)"
    lines.append(f"  timezone {rep.timezone} · window {window} local{utc}")
    lines.append(
        f"  planned {_local(rep, rep.planned_start)} → {_local(rep, rep.planned_end)} · "
        f"started {_local(rep, rep.started_at)} · "
        f"{'finished ' + _local(rep, rep.finished_at) if rep.finished_at else 'not finished'} · "
        f"duration {_fmt_s(rep.duration.total_seconds()) if rep.duration else '-'}"
        + (" so far" if rep.duration and not rep.finished_at else "")
    )
    extra = [f"overflow {rep.overflow} (eligible leads not planned today)"]
    if rep.invalid_phones:
        extra.append(f"{rep.invalid_phones} lead(s) with an invalid phone not planned")
    lines.append("  " + " · ".join(extra))
    if rep.excluded_text:
        lines.append(f"  {rep.excluded_text} (counted when it was planned)")
    lines.append(f"  report taken {rep.generated_at.astimezone(rep.zone):%Y-%m-%d %H:%M:%S} ({rep.timezone})")

    def pct(n: int) -> str:
        return f"{n / rep.total:.1%}" if rep.total else "-"

    lines += ["", "counters"]
    lines += _table(
        ["", "messages", "share"],
        [
            ["total", str(rep.total), ""],
            ["processed", str(rep.processed), pct(rep.processed)],
            ["  sent", str(rep.sent), pct(rep.sent)],
            ["  failed", str(rep.failed), pct(rep.failed)],
            ["  skipped", str(rep.skipped), pct(rep.skipped)],
            ["  in doubt", str(rep.in_doubt), pct(rep.in_doubt)],
            ["not yet processed", str(rep.pending), pct(rep.pending)],
            ["  waiting (pending)", str(rep.waiting), ""],
            ["  in flight", str(rep.in_flight), ""],
        ],
    )
    if rep.row_mismatches:
        lines.append(
            "  WARNING counters disagree with the message rows (run `verify`): " + "; ".join(rep.row_mismatches)
        )

    reasons = [["failed", r, str(n)] for r, n in rep.failed_by_reason.items()] + [
        ["skipped", r, str(n)] for r, n in rep.skipped_by_reason.items()
    ]
    if reasons or rep.in_doubt_ids:
        lines += ["", "outcomes by reason"]
        if reasons:
            lines += _table(["outcome", "reason", "messages"], reasons, left=2)
        if rep.failed_ids:
            lines.append(f"  failed message ids: {_ids(rep.failed_ids)}")
        if rep.in_doubt_ids:
            lines.append(
                f"  in doubt message ids (resolve each with `resolve ID --sent|--resend`): {_ids(rep.in_doubt_ids)}"
            )

    lines += ["", "replies (leads who wrote after their message's first part went out)"]

    def of_messaged(n: int) -> str:
        return f"{n / rep.messaged:.1%}" if rep.messaged else "-"

    lines += _table(
        ["", "leads", "of messaged"],
        [
            ["messaged (first part sent)", str(rep.messaged), ""],
            ["replied", str(rep.replied), of_messaged(rep.replied)],
            ["opted out", str(rep.opted_out), of_messaged(rep.opted_out)],
        ],
    )

    if not rep.triage.empty:
        lines += _triage_lines(rep)

    lines += ["", "timings"]

    def trow(name: str, d: Any, f: Any) -> list[str]:
        return [name, str(d.n), f(d.p50), f(d.p95), f(d.p99), f(d.max)]

    lines += _table(
        ["", "n", "p50", "p95", "p99", "max"],
        [
            trow("generation", rep.generation_ms, _fmt_ms),
            trow("split", rep.split_ms, _fmt_ms),
            trow("send", rep.send_ms, _fmt_ms),
            trow("lateness (1st part sent - planned)", rep.lateness_s, _fmt_s),
        ],
    )
    mean = f"{rep.tokens_mean:.1f}" if rep.tokens_mean is not None else "-"
    lines.append(
        f"  tokens: {rep.tokens_total:,} total · {mean} per generated message "
        f"({rep.tokens_messages} with a token count)"
    )

    lines += ["", "inboxes"]
    if rep.inboxes:
        lines += _table(
            [
                "inbox",
                "messages",
                "sent",
                "parts sent",
                "failed",
                "in doubt",
                "min gap",
                "median gap",
                "configured gap",
                "replied",
                "opted out",
            ],
            [
                [
                    i.name + (" (disabled)" if i.disabled else ""),
                    str(i.messages),
                    str(i.messages_sent),
                    str(i.parts_sent),
                    str(i.failed),
                    str(i.in_doubt),
                    _fmt_s(i.gap_min_s),
                    _fmt_s(i.gap_median_s),
                    _fmt_s(i.min_gap_seconds),
                    str(i.replied),
                    str(i.opted_out),
                ]
                for i in rep.inboxes
            ],
        )
        lines.append(
            "  gaps: between this run's consecutive part sends (sent_at) per inbox; pacing spaces send "
            "starts, so HTTP latency can shave a little off"
        )
        lines.append(
            "  replied / opted out: this run's leads who wrote to that inbox / opted out after their "
            "message's first part went out"
        )
    else:
        lines.append("  (no inbox: nothing planned)")
    return "\n".join(lines) + "\n"


def _triage_lines(rep: RunReport) -> list[str]:
    """The replies' AI triage (R-IN-5): per intent, keyword fallbacks (E-37), pending, and triage's
    tokens and cost, apart from the generation tokens below."""
    t = rep.triage
    lines = ["", "reply triage (AI, R-IN-5)"]
    lines += _table(["intent", "replies"], [[intent, str(n)] for intent, n in t.intents.items()] or [["-", "0"]])
    lines.append(
        f"  {t.settled} triaged ({t.by_keywords} by the keyword rules after an LLM failure) · {t.pending} pending"
    )
    cost = f"{t.cost:.4f} credits" if t.cost is not None else "not reported"
    lines.append(
        f"  triage tokens: {t.total_tokens:,} ({t.prompt_tokens:,} prompt + {t.completion_tokens:,} completion) "
        f"in {t.calls} call(s) · cost {cost} · not counted in the generation tokens"
    )
    return lines
