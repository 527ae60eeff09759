"""The report as a picture (PNG or SVG, matplotlib's ``Figure`` API, no pyplot): ``render_picture``."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from campaign.ops.report.build import InboxSeries, RunReport
from campaign.ops.report.text import _fmt_s

if TYPE_CHECKING:  # matplotlib is imported by render_picture only (see the package docstring)
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes

log = logging.getLogger(__name__)

PICTURE_SUFFIXES = (".png", ".svg")
#: planned times drawn as hollow markers up to this many per inbox (beyond, the step line says it all)
MARKERS_UP_TO = 40

_OUTCOME_COLOURS = {
    "sent": "#2e7d32",
    "failed": "#c62828",
    "skipped": "#ef8f00",
    "in doubt": "#8e24aa",
    "not yet processed": "#9e9e9e",
}


def _outcomes(rep: RunReport) -> list[tuple[str, int, str]]:
    """(label, count, colour) of every non-empty outcome; the counts sum to the run's total."""
    rows = [("sent", rep.sent, _OUTCOME_COLOURS["sent"])]
    rows += [(f"failed: {_short(r)}", n, _OUTCOME_COLOURS["failed"]) for r, n in rep.failed_by_reason.items()]
    rows += [(f"skipped: {_short(r)}", n, _OUTCOME_COLOURS["skipped"]) for r, n in rep.skipped_by_reason.items()]
    rows += [
        ("in doubt", rep.in_doubt, _OUTCOME_COLOURS["in doubt"]),
        ("not yet processed", rep.pending, _OUTCOME_COLOURS["not yet processed"]),
    ]
    return [r for r in rows if r[1] > 0]


#: the replies' triage intents, drawn under the message outcomes (R-IN-5)
_INTENT_COLOUR = "#1565c0"


def _intents(rep: RunReport) -> list[tuple[str, int, str]]:
    """(label, count, colour) of every triaged intent of the run's replies, and what is pending."""
    rows = [(f"reply: {intent}", n, _INTENT_COLOUR) for intent, n in rep.triage.intents.items()]
    if rep.triage.pending:
        rows.append(("reply: triage pending", rep.triage.pending, "#90caf9"))
    return rows


def _short(text: str, limit: int = 26) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _time_range(rep: RunReport) -> tuple[dt.datetime, dt.datetime] | None:
    times = [t for s in rep.series for p in s.planned for t in p if t is not None]
    times += [t for s in rep.series for t in s.part_sends]
    times += [t for s in rep.series for t, _ in (*s.replies, *s.opt_outs)]
    if not times:
        return None
    lo, hi = min(times), max(times)
    near = max(hi - lo, dt.timedelta(minutes=10))
    if rep.active and lo - near <= rep.generated_at <= hi + near:
        # show "now" when it is near the run (a run days stale would squash the plan into a sliver)
        lo, hi = min(lo, rep.generated_at), max(hi, rep.generated_at)
    pad = max((hi - lo) * 0.03, dt.timedelta(seconds=20))
    return lo - pad, hi + pad


def _draw_sends(ax: Axes, rep: RunReport) -> None:
    from matplotlib import dates as mdates
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    zone = rep.zone
    ax.set_title("sends over time per inbox against the planned times", loc="left", fontsize=11)
    span = _time_range(rep)
    if span is None:
        ax.text(
            0.5,
            0.5,
            "no messages planned in this run" + (f"\n(overflow {rep.overflow})" if rep.overflow else ""),
            ha="center",
            va="center",
            transform=ax.transAxes,
            fontsize=12,
            color="#555555",
        )
        ax.set_xticks([])
        ax.set_yticks([])
        return
    lo, hi = span
    colours = _palette(len(rep.series))
    ymax = 1
    for s, colour in zip(rep.series, colours):
        planned = sorted(t for t, _ in s.planned)
        firsts = sorted(f for _, f in s.planned if f is not None)
        ymax = max(ymax, len(planned))
        if planned:
            # cumulative planned: a step up at each scheduled time, from 0 at the start of the axis
            ax.step(
                [lo, *planned, hi],  # type: ignore[arg-type]  # datetime x: matplotlib#27140
                [*range(len(planned) + 1), len(planned)],
                where="post",
                color=colour,
                linestyle="--",
                linewidth=1.2,
                alpha=0.85,
            )
            if len(planned) <= MARKERS_UP_TO:
                ax.plot(
                    planned,  # type: ignore[arg-type]  # datetime x: matplotlib#27140
                    range(1, len(planned) + 1),
                    linestyle="none",
                    marker="o",
                    markersize=5,
                    markerfacecolor="none",
                    markeredgecolor=colour,
                    alpha=0.85,
                )
        if firsts:
            end = hi if rep.active else max(firsts[-1], s.part_sends[-1] if s.part_sends else firsts[-1])
            ax.step(
                [lo, *firsts, end],  # type: ignore[arg-type]  # datetime x: matplotlib#27140
                [0, *range(1, len(firsts) + 1), len(firsts)],
                where="post",
                color=colour,
                linewidth=2.2,
            )
        if s.part_sends:
            # each part sits at the height of the messages started by then: bubbles of one message line up
            ys = [_count_le(firsts, t) for t in s.part_sends]
            ax.plot(s.part_sends, ys, linestyle="none", marker="o", markersize=3.2, color=colour, alpha=0.9)  # type: ignore[arg-type]  # datetime x: matplotlib#27140
        _draw_listening(ax, s, firsts, colour)
    shaded = False
    if rep.window_open and rep.window_close:
        a, b = max(rep.window_open, lo), min(rep.window_close, hi)
        if a < b:
            ax.axvspan(a, b, color="#4caf50", alpha=0.06, zorder=0)  # type: ignore[arg-type]  # datetime x: matplotlib#27140
            shaded = True
        for edge, what in ((rep.window_open, "window opens"), (rep.window_close, "window closes")):
            if lo <= edge <= hi:
                ax.axvline(edge, color="#4caf50", linewidth=1, linestyle=":")  # type: ignore[arg-type]  # datetime x: matplotlib#27140
                ax.text(
                    edge,  # type: ignore[arg-type]  # datetime x: matplotlib#27140
                    1.0,
                    f" {what}",
                    transform=ax.get_xaxis_transform(),
                    fontsize=8,
                    color="#2e7d32",
                    va="top",
                )
    if rep.active and lo <= rep.generated_at <= hi:
        ax.axvline(rep.generated_at, color="#555555", linewidth=1)  # type: ignore[arg-type]  # datetime x: matplotlib#27140
        ax.text(rep.generated_at, 0.02, " now", transform=ax.get_xaxis_transform(), fontsize=8, color="#555555")  # type: ignore[arg-type]  # datetime x: matplotlib#27140
    if not any(s.part_sends for s in rep.series):
        ax.text(
            0.98, 0.96, "no part sent yet", transform=ax.transAxes, fontsize=10, color="#555555", va="top", ha="right"
        )

    ax.set_xlim(lo, hi)  # type: ignore[arg-type]  # datetime x: matplotlib#27140
    ax.set_ylim(0, ymax * 1.08 + 0.5)
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(tz=zone, minticks=4, maxticks=9))
    length = hi - lo
    fmt = (
        "%H:%M:%S"
        if length <= dt.timedelta(minutes=10)
        else "%H:%M"
        if length <= dt.timedelta(hours=30)
        else "%m-%d %H:%M"
    )
    ax.xaxis.set_major_formatter(mdates.DateFormatter(fmt, tz=zone))
    first_day, last_day = lo.astimezone(zone).date(), hi.astimezone(zone).date()
    days = f"{first_day:%Y-%m-%d}" + (f" to {last_day:%Y-%m-%d}" if last_day != first_day else "")
    ax.set_xlabel(f"local time, {rep.timezone} ({days})")
    ax.set_ylabel("messages (cumulative)")
    y_locator = ax.yaxis.get_major_locator()
    if isinstance(y_locator, MaxNLocator):  # the default AutoLocator is one
        y_locator.set_params(integer=True)
    ax.grid(True, color="#e0e0e0", linewidth=0.6)
    ax.set_axisbelow(True)

    handles: list[Artist] = [Line2D([], [], color=c, linewidth=2.2, label=s.name) for s, c in zip(rep.series, colours)]
    handles += [
        Line2D(
            [], [], color="#444444", linestyle="--", marker="o", markerfacecolor="none", label="planned (scheduled_at)"
        ),
        Line2D([], [], color="#444444", linewidth=2.2, label="sent (first part)"),
        Line2D([], [], color="#444444", linestyle="none", marker="o", markersize=3.2, label="each part sent"),
    ]
    if any(s.replies for s in rep.series):
        handles.append(
            Line2D([], [], linestyle="none", markerfacecolor="#bdbdbd", label="lead replied", **_REPLY_MARKER)
        )
    if any(s.opt_outs for s in rep.series):
        handles.append(Line2D([], [], linestyle="none", label="lead opted out", **_OPT_OUT_MARKER))
    if shaded:
        from matplotlib.patches import Patch

        handles.append(Patch(facecolor="#4caf50", alpha=0.15, label="send window"))
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(0.0, -0.14),
        ncol=min(4, len(handles)),
        fontsize=8.5,
        frameon=False,
    )


#: a reply: a star in the inbox's colour; an opt-out: a red cross drawn over it (distinct in grey print too)
_REPLY_MARKER: dict[str, Any] = {"marker": "*", "markersize": 11, "markeredgecolor": "#212121", "markeredgewidth": 0.6}
_OPT_OUT_MARKER: dict[str, Any] = {
    "marker": "X",
    "markersize": 9,
    "color": "#c62828",
    "markeredgecolor": "#212121",
    "markeredgewidth": 0.6,
}


def _draw_listening(ax: Axes, s: InboxSeries, firsts: list[dt.datetime], colour: Any) -> None:
    """The leads' replies and opt-outs on the inbox's time axis, at the height of the message they answer.

    Each group carries an SVG id (``replies-<inbox id>``, ``opt-outs-<inbox id>``): one marker per lead.
    A reply's time has whole seconds (WhatsApp's timestamp): one from the second of the send is
    drawn at the send, never before the message it answers.
    """
    if s.replies:
        ax.plot(
            [max(t, sent) for t, sent in s.replies],  # type: ignore[arg-type]  # datetime x: matplotlib#27140
            [_count_le(firsts, sent) for _, sent in s.replies],
            linestyle="none",
            markerfacecolor=colour,
            zorder=4,
            gid=f"replies-{s.inbox_id}",
            **_REPLY_MARKER,
        )
    if s.opt_outs:
        ax.plot(
            [max(t, sent) for t, sent in s.opt_outs],  # type: ignore[arg-type]  # datetime x: matplotlib#27140
            [_count_le(firsts, sent) for _, sent in s.opt_outs],
            linestyle="none",
            zorder=5,
            gid=f"opt-outs-{s.inbox_id}",
            **_OPT_OUT_MARKER,
        )


def _count_le(sorted_times: list[dt.datetime], t: dt.datetime) -> int:
    import bisect

    return bisect.bisect_right(sorted_times, t)


def _palette(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _draw_outcomes(ax: Axes, rep: RunReport) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(f"outcomes of {rep.total} message{'s' if rep.total != 1 else ''}", loc="left", fontsize=11)
    outcomes = _outcomes(rep)
    rows = outcomes + _intents(rep)
    if not rows:
        ax.text(0.5, 0.5, "nothing planned", ha="center", va="center", transform=ax.transAxes, color="#555555")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    labels = [r[0] for r in rows]
    counts = [r[1] for r in rows]
    ys = range(len(rows))
    ax.barh(ys, counts, color=[r[2] for r in rows], height=0.65)
    ax.set_yticks(list(ys), labels=labels, fontsize=9)
    ax.set_ylim(max(len(rows), 5) - 0.5, -0.5)  # top down, and one bar never fills the panel
    top = max(counts)
    for y, n in zip(ys, counts):
        share = f"  ({n / rep.total:.0%})" if rep.total and y < len(outcomes) else ""  # intents: replies, not messages
        ax.text(n + top * 0.02, y, f"{n}{share}", va="center", fontsize=9)
    ax.set_xlim(0, top * 1.35)
    ax.set_xlabel("messages" + (" · replies (blue: their triaged intent)" if len(rows) > len(outcomes) else ""))
    x_locator = ax.xaxis.get_major_locator()
    if isinstance(x_locator, MaxNLocator):  # the default AutoLocator is one
        x_locator.set_params(integer=True)
    ax.grid(True, axis="x", color="#e0e0e0", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def render_picture(rep: RunReport, path: str | Path) -> Path:
    """Write the report's picture (PNG or SVG by the suffix of ``path``) and return its path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in PICTURE_SUFFIXES:
        raise ValueError(f"picture {str(path)!r}: unsupported suffix {suffix or '(none)'!r}; use .png or .svg")
    from matplotlib.figure import Figure
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    fig = Figure(figsize=(14, 6.2), dpi=110, layout="constrained")
    grid = fig.add_gridspec(1, 2, width_ratios=[2.4, 1])
    status = rep.status_text
    title = f"{rep.label} · run {rep.run_id} · {rep.run_date:%a %Y-%m-%d} · {status}"
    fig.suptitle(title, x=0.01, ha="left", fontsize=14, fontweight="bold")
    dur = rep.duration
    fig.text(
        0.01,
        0.925,
        (
            f"sent {rep.sent} · failed {rep.failed} · skipped {rep.skipped} · "
            f"in doubt {rep.in_doubt} · not yet processed {rep.pending} · of {rep.total} · "
            f"overflow {rep.overflow} · replied {rep.replied} · opted out {rep.opted_out}"
            + (f" · duration {_fmt_s(dur.total_seconds())}{'' if rep.finished_at else ' so far'}" if dur else "")
        ),
        fontsize=10,
        color="#444444",
        ha="left",
        va="top",
    )
    layout = fig.get_layout_engine()
    assert isinstance(layout, ConstrainedLayoutEngine)  # layout="constrained" above
    layout.set(rect=(0, 0, 1, 0.91))
    _draw_sends(fig.add_subplot(grid[0, 0]), rep)
    _draw_outcomes(fig.add_subplot(grid[0, 1]), rep)

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = (
        {"Title": title, "Description": f"campaign run report of run {rep.run_id}"}
        if suffix == ".svg"
        else {"Title": title, "Software": "campaign engine report.py"}
    )
    # Write next to the target and rename: a reader never sees half a picture.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format=suffix[1:], metadata=meta)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for every operator
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    log.info("report run=%s: picture written to %s", rep.run_id, path)
    return path
