"""Run report (SPEC R-OPS-1 ``report RUN``): what one run did, as text and as a picture.

``build_report`` reads everything in six queries inside one REPEATABLE READ, READ ONLY
transaction, so a run still being worked on gives a self-consistent snapshot (the counters,
the rows and the sends are of the same instant). ``render_text`` is for a terminal,
``render_picture`` writes a PNG or SVG: sends over time per inbox against the planned times,
the leads' replies and opt-outs on the same axis, and the outcome breakdown.

A lead "replied" to this run when it wrote on the message's inbox at or after the message's
first part went out (``conversation_messages`` direction ``in``); it "opted out" when its
``opted_out_at`` is at or after that send (R-IN-2..4). Both come with the message rows, in the
same query: no query per message.

Matplotlib is only imported by ``render_picture`` and only through its object-oriented
``Figure`` API (no pyplot): no global backend is selected, nothing is shared with other code,
and the text report stays fast and dependency-light.

The package: ``build`` (the queries and the ``RunReport`` dataclasses), ``text``
(``render_text``) and ``picture`` (``render_picture``).
"""

from campaign.errors import RunNotFound
from campaign.ops.report.build import Dist, InboxReport, InboxSeries, RunReport, build_report
from campaign.ops.report.picture import PICTURE_SUFFIXES, render_picture
from campaign.ops.report.text import render_text

__all__ = [
    "RunReport",
    "Dist",
    "InboxReport",
    "InboxSeries",
    "RunNotFound",
    "build_report",
    "render_text",
    "render_picture",
    "PICTURE_SUFFIXES",
]
