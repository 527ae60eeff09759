"""campaign.ops.cli without a database: ``status`` renders data as data (issue 23 item 3, R-OPS-1)."""

from __future__ import annotations

import datetime as dt
import io

from hypothesis import example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from campaign.ops import cli, monitor


def _render(snap) -> str:
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=2000, color_system=None, force_terminal=False).print(cli.render_status(snap))
    return out.getvalue()


def _snapshot(text: str) -> monitor.StatusSnapshot:
    now = dt.datetime(2026, 11, 22, 10, 0, tzinfo=dt.UTC)
    run = monitor.RunStatus(7, f"acme/{text}", now.date(), "running", None, False, 3, 1, 0, 1, 0, 0, 0, 2, 0, None, now)
    line = monitor.MessageLine(12, 7, f"acme/{text}", 5, text, "failed", f"PermanentError: {text}", now)
    return monitor.StatusSnapshot(
        now,
        [run],
        {text: 1, f"{text}.DQ": 0, f"{text}.XQ": 2},
        None,
        [line],
        [line],
        [monitor.Alert("dead_letters", text)],
    )


_MARKUP = st.text(st.sampled_from("[]/=:@#\\ ablinkcoredt_-."), min_size=1, max_size=40) | st.text(
    st.characters(min_codepoint=33, max_codepoint=0x24F, blacklist_categories=("Cc", "Cf", "Zs")),
    min_size=1,
    max_size=40,
)


@hsettings(max_examples=200, deadline=None)
@given(text=_MARKUP)
@example(text="[/x] is not a valid model ID")
@example(text="[bold]boom[/bold] [link=http://evil.example]click[/link]")
@example(text="[/]")
def test_status_shows_provider_and_data_text_verbatim(text):
    """Issue 23 item 3 (R-OPS-1): a provider error "[/x] is not a valid model ID" made `status`
    exit 1 with MarkupError, and "[bold]" or "[link=...]" in any error text was silently rewritten.
    Every value from outside (errors, names, phones, queue names, alerts) is now plain text."""
    rendered = _render(_snapshot(text))
    for shown in (f"PermanentError: {text}"[:120], f"acme/{text}", f"! dead_letters: {text}"):
        assert shown in rendered, (shown, rendered)
