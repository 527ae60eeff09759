"""``apply FILE.toml``: workspaces, columns, inboxes and campaign configs from the operator's TOML (SPEC §4.8).

Rules:

* Everything is validated before anything is written (types, unknown keys, "HH:MM" times,
  IANA timezone names, gap bounds, weekday names, references by name inside the SAME workspace,
  E-20, and what PostgreSQL itself would refuse: integers past its ``integer`` range, NUL
  characters, nesting deeper than ``MAX_DEPTH``); every error names its key path
  (``workspaces.acme.campaigns.first-touch.inbox: ...``), so the database never has to.
* Then one transaction writes it all (nothing half-applied), under an advisory lock so two
  concurrent applies queue instead of interleaving.
* Applying the same file twice changes nothing: a row is written only when a value differs, so
  ``version`` and ``updated_at`` stay put. A changed campaign is updated in place with an
  optimistic lock (``UPDATE ... WHERE version = expected``, version + 1).
* Two inboxes may swap (or rotate) their instances in one file: the inboxes whose instance
  changes get a placeholder first, so the UNIQUE instance never sees a half-applied state.
* Nothing is deleted: columns, inboxes and campaigns absent from the file are kept (the summary
  lists them), because rows of leads and runs hang on them. Columns listed in the file get
  ``position`` = their index in the list.
* Omitted optional campaign keys take their documented default (the file is the truth for a
  campaign it names): weekdays every day, window 00:00-24:00 ("always open", R-PLAN-5),
  timezone UTC, part_gap_seconds 1.0-4.0, no fallback template, split off (max_parts 1; with
  ``split.enabled = true`` max_parts defaults to 3), active true, skip_if_replied true,
  min_days_in_column 0 (no wait), history 0 (no conversation in the prompt).
* A campaign names exactly one of ``inbox = "NAME"`` or a sender pool ``inboxes = ["A", "B"]``
  (R-POOL-1): every member an inbox of the campaign's own workspace (E-20, errors name
  ``...inboxes[1]``), no member twice; the first one is ``campaign_configs.inbox_id``.
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib.resources
import json
import logging
import math
import re
import tomllib
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import peewee

from campaign import capacity, leadtext, optout
from campaign.db import db
from campaign.errors import ConcurrentChangeError, ConfigError, ConfigFileError  # noqa: F401  (re-exported: the names callers know)
from campaign.sequence import HISTORY_MAX
from models.schema import TRIAGE_INTENTS

log = logging.getLogger(__name__)

__all__ = [
    "ConfigFileError",
    "ConcurrentChangeError",
    "ApplySummary",
    "WorkspaceSpec",
    "InboxSpec",
    "CampaignSpec",
    "parse_text",
    "apply_text",
    "apply_file",
    "WEEKDAYS",
]

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index = PostgreSQL weekdays value, 0 = Monday
# \Z, not $: '$' also matches before a final newline, so "acme\n" passed here and failed the
# schema's CHECK with a database message naming no key
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # workspaces and campaigns (CHECK in schema)
_TIME_RE = re.compile(r"([0-9]{2}):([0-9]{2})\Z")  # [0-9]: \d takes any script's digits
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
PG_INT_MAX = 2**31 - 1  # PostgreSQL ``integer``: every integer column this file writes
MAX_DEPTH = 16  # tables and arrays; the format needs 6 (workspaces.W.campaigns.C.window.start)
APPLY_LOCK_KEY = 0x61706C79  # "aply": serialises concurrent applies


@dataclass(frozen=True)
class InboxSpec:
    """One ``[workspaces.W.inboxes.NAME]`` table."""

    name: str
    instance: str
    max_per_hour: int | None
    max_per_day: int | None
    min_gap_seconds: float
    path: str
    warmup: capacity.Warmup | None = None  # R-HEALTH-1: warmup = { start_per_day, days }


@dataclass(frozen=True)
class CampaignSpec:
    """One ``[workspaces.W.campaigns.NAME]`` table, with defaults filled in."""

    name: str
    inbox: str
    source_column: str
    target_column: str
    weekdays: tuple[int, ...]
    window_start_minute: int
    window_end_minute: int
    timezone: str
    daily_limit: int
    gap_min_seconds: float
    gap_max_seconds: float
    part_gap_min_seconds: float
    part_gap_max_seconds: float
    model: str
    system_prompt: str
    fallback_template: str | None
    split_enabled: bool
    max_parts: int
    active: bool
    path: str
    reply_column: str | None = None  # a lead who answers goes here (R-IN-3)
    skip_if_replied: bool = True
    inboxes: tuple[str, ...] = ()  # the sender pool (R-POOL-1), ``inbox`` first; () means (inbox,)
    triage: TriageSpec | None = None  # AI reply triage (R-IN-5); None: off
    min_days_in_column: int = 0  # a follow-up waits this many local days in its source column (R-SEQ-1)
    history: int = 0  # conversation messages carried into the prompt (R-SEQ-2)

    @property
    def pool(self) -> tuple[str, ...]:
        """The campaign's inboxes in order: ``inboxes = [...]``, or the one ``inbox``."""
        return self.inboxes or (self.inbox,)

    @property
    def pool_key(self) -> str:
        """The TOML key that names the campaign's inboxes (for error paths)."""
        return "inboxes" if self.inboxes else "inbox"


@dataclass(frozen=True)
class TriageSpec:
    """A campaign's ``triage = { enabled, model?, columns = { intent = "Column" } }`` (R-IN-5)."""

    enabled: bool
    model: str | None
    columns: tuple[tuple[str, str], ...]  # (intent, column name), sorted by intent


@dataclass(frozen=True)
class WorkspaceSpec:
    """One ``[workspaces.NAME]`` table."""

    name: str
    columns: tuple[str, ...] | None
    inboxes: tuple[InboxSpec, ...]
    campaigns: tuple[CampaignSpec, ...]
    path: str
    opt_out_phrases: tuple[str, ...] | None = None  # None: the built-in pt/en/es list (R-IN-4)
    opt_out_reply: str | None = None  # sent once to a lead who opts out


@dataclass
class ApplySummary:
    """What an apply did, by kind (workspace, column, inbox, campaign)."""

    created: dict[str, list[str]] = field(default_factory=dict)
    updated: dict[str, list[str]] = field(default_factory=dict)
    unchanged: dict[str, list[str]] = field(default_factory=dict)
    kept: dict[str, list[str]] = field(default_factory=dict)  # in the database, not in the file: untouched
    warnings: list[str] = field(default_factory=list)  # applied, but worth a look (issue 22: gaps vs caps)

    def add(self, outcome: str, kind: str, name: str) -> None:
        """Record ``name`` of ``kind`` under ``outcome`` (created/updated/unchanged/kept)."""
        getattr(self, outcome).setdefault(kind, []).append(name)

    @property
    def changed(self) -> bool:
        """Whether anything was written."""
        return any(self.created.values()) or any(self.updated.values())

    def lines(self) -> list[str]:
        """Human-readable summary, one line per kind plus notes."""
        out = []
        for kind in ("workspace", "column", "inbox", "campaign"):
            c, u, n = (len(d.get(kind, [])) for d in (self.created, self.updated, self.unchanged))
            if c or u or n:
                detail = "; ".join(
                    f"{label} {', '.join(d[kind])}"
                    for label, d in (("created", self.created), ("updated", self.updated))
                    if d.get(kind)
                )
                out.append(
                    f"{_PLURAL[kind]}: {c} created, {u} updated, {n} unchanged" + (f" ({detail})" if detail else "")
                )
        for kind, names in self.kept.items():
            out.append(
                f"note: {len(names)} {kind}(s) not in the file kept as they are (never deleted): " + ", ".join(names)
            )
        if not self.changed:
            out.append("nothing changed")
        out.extend(f"warning: {w}" for w in self.warnings)
        return out


# --------------------------------------------------------------------------------------------
# validation (pure: no database)
# --------------------------------------------------------------------------------------------


def _key(name: str) -> str:
    # a quoted TOML key; JSON's escapes are TOML's, and control characters come out visible
    return name if _BARE_KEY.match(name) else json.dumps(name, ensure_ascii=False)


def _path(*parts: str) -> str:
    return ".".join(_key(p) for p in parts)


class _Checker:
    """Collects every error with its key path instead of stopping at the first."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def err(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def table(
        self, value: Any, path: str, allowed: AbstractSet[str], required: AbstractSet[str] = frozenset()
    ) -> dict | None:
        if not isinstance(value, dict):
            self.err(path, f"must be a table, got {_type(value)}")
            return None
        for k in sorted(set(value) - allowed):
            self.err(f"{path}.{_key(k)}" if path else _key(k), f"unknown key (allowed: {', '.join(sorted(allowed))})")
        for k in sorted(required - set(value)):
            self.err(f"{path}.{_key(k)}" if path else _key(k), "is required")
        return value

    def string(
        self, value: Any, path: str, *, max_len: int = 100_000, pattern: re.Pattern | None = None, what: str = ""
    ) -> str | None:
        if not isinstance(value, str):
            self.err(path, f"must be a string, got {_type(value)}")
            return None
        if not value.strip():
            self.err(path, "must not be empty")
            return None
        if len(value) > max_len:
            self.err(path, f"is longer than {max_len} characters")
            return None
        if "\x00" in value:
            self.err(path, "contains a NUL character (U+0000), which PostgreSQL cannot store")
            return None
        if pattern is not None and not pattern.match(value):
            self.err(path, f"{value!r} is not a valid {what or 'name'}")
            return None
        return value

    def integer(self, value: Any, path: str, lo: int, hi: int = PG_INT_MAX) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.err(path, f"must be an integer, got {_type(value)}")
            return None
        if not lo <= value <= hi:
            self.err(path, f"{value} is out of range {lo}..{hi}")
            return None
        return value

    def number(self, value: Any, path: str, lo: float = 0.0, hi: float = 86_400.0) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.err(path, f"must be a number, got {_type(value)}")
            return None
        if not math.isfinite(value) or not lo <= value <= hi:
            self.err(path, f"{value} is out of range {lo:g}..{hi:g}")
            return None
        return float(value)

    def boolean(self, value: Any, path: str) -> bool | None:
        if not isinstance(value, bool):
            self.err(path, f"must be true or false, got {_type(value)}")
            return None
        return value

    def hhmm(self, value: Any, path: str, *, allow_24: bool) -> int | None:
        if isinstance(value, dt.time) and not isinstance(value, dt.datetime):
            if value.second or value.microsecond or value.tzinfo:
                self.err(path, 'must be a time "HH:MM" (no seconds, no offset)')
                return None
            return value.hour * 60 + value.minute
        if not isinstance(value, str):
            self.err(path, f'must be a time "HH:MM", got {_type(value)}')
            return None
        m = _TIME_RE.match(value)
        if m is None:
            self.err(path, f'{value!r} is not a time "HH:MM"')
            return None
        hours, minutes = int(m.group(1)), int(m.group(2))
        total = hours * 60 + minutes
        if minutes > 59 or hours > 24 or total > 1440 or (total == 1440 and not allow_24):
            self.err(path, f"{value!r} is not a time of day (00:00..23:59{', or 24:00 as an end' if allow_24 else ''})")
            return None
        return total


def _type(value: Any) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
        dt.datetime: "a date-time",
        dt.date: "a date",
        dt.time: "a time",
    }
    return names.get(type(value), type(value).__name__)


_WS_KEYS = {"columns", "inboxes", "campaigns", "opt_out_phrases", "opt_out_reply"}
_INBOX_KEYS = {"instance", "max_per_hour", "max_per_day", "min_gap_seconds", "warmup"}
_CAMPAIGN_KEYS = {
    "inbox",
    "inboxes",
    "source_column",
    "target_column",
    "weekdays",
    "window",
    "timezone",
    "daily_limit",
    "gap_seconds",
    "part_gap_seconds",
    "model",
    "system_prompt",
    "fallback_template",
    "split",
    "active",
    "reply_column",
    "skip_if_replied",
    "triage",
    "min_days_in_column",
    "history",
}
#: ``min_days_in_column`` is at most this (ten years; the schema's check)
MAX_MIN_DAYS = 3650
#: a sender pool holds at most this many inboxes (the schema's position check)
MAX_POOL = 100
_CAMPAIGN_REQUIRED = {"source_column", "target_column", "daily_limit", "gap_seconds", "model", "system_prompt"}


def _inbox(ck: _Checker, name: str, raw: Any, path: str) -> InboxSpec | None:
    if ck.string(name, path, max_len=100) is None:
        return None
    t = ck.table(raw, path, _INBOX_KEYS, {"instance"})
    if t is None:
        return None
    n = len(ck.errors)
    instance = ck.string(t.get("instance"), f"{path}.instance", max_len=200) if "instance" in t else None
    per_hour = ck.integer(t["max_per_hour"], f"{path}.max_per_hour", 1) if "max_per_hour" in t else None
    per_day = ck.integer(t["max_per_day"], f"{path}.max_per_day", 1) if "max_per_day" in t else None
    gap = ck.number(t["min_gap_seconds"], f"{path}.min_gap_seconds", 0, 3600) if "min_gap_seconds" in t else 1.0
    warmup = _warmup(ck, t["warmup"], f"{path}.warmup", per_day, "max_per_day" in t) if "warmup" in t else None
    if len(ck.errors) > n or instance is None or gap is None:
        return None
    return InboxSpec(name, instance, per_hour, per_day, gap, path, warmup)


def _warmup(ck: _Checker, raw: Any, path: str, per_day: int | None, has_per_day: bool) -> capacity.Warmup | None:
    """``warmup = { start_per_day = 20, days = 14 }`` (R-HEALTH-1): a ramp up to ``max_per_day``."""
    t = ck.table(raw, path, {"start_per_day", "days"}, {"start_per_day", "days"})
    if t is None or "start_per_day" not in t or "days" not in t:
        return None
    start = ck.integer(t["start_per_day"], f"{path}.start_per_day", 1)
    days = ck.integer(t["days"], f"{path}.days", 1, 3650)
    if start is None or days is None:
        return None
    if not has_per_day:
        ck.err(path, "needs max_per_day on the inbox: the ramp grows from start_per_day to max_per_day")
        return None
    if per_day is not None and start > per_day:
        ck.err(f"{path}.start_per_day", f"{start} must not exceed max_per_day ({per_day})")
        return None
    return capacity.Warmup(start, days)


def _bounds(ck: _Checker, raw: Any, path: str, default: tuple[float, float] | None) -> tuple[float, float] | None:
    if raw is None:
        return default
    t = ck.table(raw, path, {"min", "max"}, {"min", "max"})
    if t is None or "min" not in t or "max" not in t:
        return None
    lo = ck.number(t["min"], f"{path}.min")
    hi = ck.number(t["max"], f"{path}.max")
    if lo is None or hi is None:
        return None
    if lo > hi:
        ck.err(path, f"min ({lo:g}) must not exceed max ({hi:g})")
        return None
    return lo, hi


def _campaign(ck: _Checker, name: str, raw: Any, path: str) -> CampaignSpec | None:
    n = len(ck.errors)
    ck.string(name, path, max_len=64, pattern=_NAME_RE, what="campaign name (letters, digits, _ . -)")
    t = ck.table(raw, path, _CAMPAIGN_KEYS, _CAMPAIGN_REQUIRED)
    if t is None:
        return None
    get = t.get
    pool = _pool(ck, t, path)
    inbox = pool[0] if pool else None
    source = ck.string(get("source_column"), f"{path}.source_column", max_len=100) if "source_column" in t else None
    target = ck.string(get("target_column"), f"{path}.target_column", max_len=100) if "target_column" in t else None
    if source is not None and target is not None and source == target:
        ck.err(f"{path}.target_column", f"must differ from source_column ({source!r})")

    weekdays = _weekdays(ck, t, path)
    start, end = _window(ck, t, path)
    timezone = _timezone(ck, t, path)

    daily_limit = ck.integer(get("daily_limit"), f"{path}.daily_limit", 1, 1_000_000) if "daily_limit" in t else None
    gaps = _bounds(ck, get("gap_seconds"), f"{path}.gap_seconds", None) if "gap_seconds" in t else None
    part_gaps = _bounds(ck, get("part_gap_seconds"), f"{path}.part_gap_seconds", (1.0, 4.0))
    model = ck.string(get("model"), f"{path}.model", max_len=200) if "model" in t else None
    prompt = ck.string(get("system_prompt"), f"{path}.system_prompt") if "system_prompt" in t else None

    fallback = None
    if "fallback_template" in t:
        fallback = ck.string(t["fallback_template"], f"{path}.fallback_template", max_len=4000)
        if fallback is not None:
            try:  # rendered by the pipeline's own renderer: what passes here renders as written
                leadtext.check_template(fallback)
            except leadtext.TemplateError as exc:
                ck.err(f"{path}.fallback_template", f"bad template: {exc}")

    split_enabled, max_parts = _split(ck, t, path)
    active = True
    if "active" in t:
        a = ck.boolean(t["active"], f"{path}.active")
        active = True if a is None else a
    reply = ck.string(get("reply_column"), f"{path}.reply_column", max_len=100) if "reply_column" in t else None
    if reply is not None and reply == source:
        ck.err(f"{path}.reply_column", f"must differ from source_column ({source!r})")
    skip_if_replied = True
    if "skip_if_replied" in t:
        b = ck.boolean(t["skip_if_replied"], f"{path}.skip_if_replied")
        skip_if_replied = True if b is None else b
    triage = _triage(ck, t["triage"], f"{path}.triage") if "triage" in t else None
    min_days: int | None = 0
    if "min_days_in_column" in t:
        min_days = ck.integer(t["min_days_in_column"], f"{path}.min_days_in_column", 0, MAX_MIN_DAYS)
    history = ck.integer(t["history"], f"{path}.history", 0, HISTORY_MAX) if "history" in t else 0

    if (
        len(ck.errors) > n
        or inbox is None
        or source is None
        or target is None
        or weekdays is None
        or daily_limit is None
        or gaps is None
        or part_gaps is None
        or model is None
        or prompt is None
    ):
        return None
    return CampaignSpec(
        name,
        inbox,
        source,
        target,
        weekdays,
        start,
        end,
        timezone,
        daily_limit,
        gaps[0],
        gaps[1],
        part_gaps[0],
        part_gaps[1],
        model,
        prompt,
        fallback,
        split_enabled,
        max_parts,
        active,
        path,
        reply,
        skip_if_replied,
        pool if "inboxes" in t and pool else (),
        triage,
        min_days or 0,
        history or 0,
    )


def _triage(ck: _Checker, raw: Any, path: str) -> TriageSpec | None:
    """``triage = { enabled = true, model = "...", columns = { interested = "Column", ... } }``:
    ``enabled`` required; ``columns`` keys among the six intents (R-IN-5), values column names
    (checked against the workspace with the other references)."""
    t = ck.table(raw, path, {"enabled", "model", "columns"}, {"enabled"})
    if t is None:
        return None
    n = len(ck.errors)
    enabled = ck.boolean(t["enabled"], f"{path}.enabled") if "enabled" in t else None
    model = ck.string(t["model"], f"{path}.model", max_len=200) if "model" in t else None
    columns: list[tuple[str, str]] = []
    if "columns" in t:
        cols = t["columns"]
        if not isinstance(cols, dict):
            ck.err(f"{path}.columns", f'must be a table of intent = "Column", got {_type(cols)}')
        else:
            for intent, column in cols.items():
                key = f"{path}.columns.{_key(str(intent))}"
                if intent not in TRIAGE_INTENTS:
                    ck.err(key, f"unknown intent {intent!r} (one of: {', '.join(TRIAGE_INTENTS)})")
                    continue
                name = ck.string(column, key, max_len=100)
                if name is not None:
                    columns.append((intent, name))
    if len(ck.errors) > n or enabled is None:
        return None
    return TriageSpec(enabled, model, tuple(sorted(columns)))


def _pool(ck: _Checker, t: dict, path: str) -> tuple[str, ...] | None:
    """The campaign's inboxes (R-POOL-1): exactly one of ``inbox = "NAME"`` or ``inboxes = [...]``."""
    if "inbox" in t and "inboxes" in t:
        ck.err(path, 'give either inbox = "NAME" or inboxes = ["NAME", ...], not both')
        return None
    if "inbox" in t:
        one = ck.string(t["inbox"], f"{path}.inbox", max_len=100)
        return (one,) if one is not None else None
    if "inboxes" not in t:
        ck.err(f"{path}.inbox", 'is required (inbox = "NAME", or a pool: inboxes = ["NAME", ...])')
        return None
    raw = t["inboxes"]
    if not isinstance(raw, list) or not raw:
        ck.err(f"{path}.inboxes", f"must be a non-empty list of inbox names, got {_type(raw)}")
        return None
    if len(raw) > MAX_POOL:
        ck.err(f"{path}.inboxes", f"has {len(raw)} inboxes; a pool holds at most {MAX_POOL}")
        return None
    names: list[str] = []
    ok = True
    for i, item in enumerate(raw):
        name = ck.string(item, f"{path}.inboxes[{i}]", max_len=100)
        if name is None:
            ok = False
        elif name in names:
            ck.err(f"{path}.inboxes[{i}]", f"{name!r} is already in the pool (inboxes[{names.index(name)}])")
            ok = False
        else:
            names.append(name)
    return tuple(names) if ok else None


def _weekdays(ck: _Checker, t: dict, path: str) -> tuple[int, ...] | None:
    """The campaign's weekdays (every day when omitted); None after an error."""
    weekdays: tuple[int, ...] | None = tuple(range(7))
    if "weekdays" in t:
        raw_days = t["weekdays"]
        if not isinstance(raw_days, list) or not raw_days:
            ck.err(f"{path}.weekdays", f"must be a non-empty array of {', '.join(WEEKDAYS)}")
            weekdays = None
        else:
            days: list[int] = []
            for i, d in enumerate(raw_days):
                key = d.strip().lower() if isinstance(d, str) else None
                idx = WEEKDAYS.index(key) if key in WEEKDAYS else _FULL_DAYS.index(key) if key in _FULL_DAYS else None
                if idx is None:
                    ck.err(f"{path}.weekdays[{i}]", f"{d!r} is not a weekday ({', '.join(WEEKDAYS)})")
                elif idx in days:
                    ck.err(f"{path}.weekdays[{i}]", f"{d!r} is listed twice")
                else:
                    days.append(idx)
            weekdays = tuple(sorted(set(days)))
    return weekdays


def _window(ck: _Checker, t: dict, path: str) -> tuple[int, int]:
    """The daily window in minutes (always open when omitted)."""
    start, end = 0, 1440
    if "window" in t:
        w = ck.table(t["window"], f"{path}.window", {"start", "end"}, {"start", "end"})
        s = ck.hhmm(w["start"], f"{path}.window.start", allow_24=False) if w and "start" in w else None
        e = ck.hhmm(w["end"], f"{path}.window.end", allow_24=True) if w and "end" in w else None
        if w is not None and s is not None and e is not None:
            if e <= s:
                ck.err(
                    f"{path}.window.end",
                    f"{w['end']} must be after start {w['start']} (a window cannot cross midnight)",
                )
            start, end = s, e
    return start, end


def _timezone(ck: _Checker, t: dict, path: str) -> str:
    """An IANA zone name (UTC when omitted)."""
    timezone = "UTC"
    if "timezone" in t:
        tz = ck.string(t["timezone"], f"{path}.timezone", max_len=100)
        if tz is not None:
            try:
                if tz not in _iana_zones():
                    raise ZoneInfoNotFoundError(tz)
                ZoneInfo(tz)
                timezone = tz
            except (ZoneInfoNotFoundError, ValueError):
                ck.err(
                    f"{path}.timezone",
                    f"{tz!r} is not an IANA timezone (e.g. America/Sao_Paulo; host "
                    "names like 'localtime' are refused: hosts would disagree)",
                )
    return timezone


def _split(ck: _Checker, t: dict, path: str) -> tuple[bool, int]:
    """Whether to split and into how many parts at most."""
    split_enabled, max_parts = False, 1
    if "split" in t:
        sp = ck.table(t["split"], f"{path}.split", {"enabled", "max_parts"}, {"enabled"})
        if sp is not None and "enabled" in sp:
            en = ck.boolean(sp["enabled"], f"{path}.split.enabled")
            split_enabled = bool(en)
            max_parts = 3 if split_enabled else 1
            if "max_parts" in sp:
                mp = ck.integer(sp["max_parts"], f"{path}.split.max_parts", 1, 10)
                max_parts = mp if mp is not None else max_parts
    return split_enabled, max_parts


@functools.cache
def _iana_zones() -> frozenset[str]:
    """IANA zone names, from the pinned ``tzdata`` package's list (the one zoneinfo's
    ``available_timezones`` reads), so every host accepts the same names. The system's zoneinfo
    directory also answers to ``localtime``, ``posixrules`` and ``Factory``, which mean "whatever
    this host is set to" or "no zone": two hosts would disagree on a campaign's window."""
    with importlib.resources.files("tzdata").joinpath("zones").open("r", encoding="utf-8") as f:
        return frozenset(line.strip() for line in f if line.strip()) - {"Factory"}


_PLURAL = {"workspace": "workspaces", "column": "columns", "inbox": "inboxes", "campaign": "campaigns"}
_FULL_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def _workspace(ck: _Checker, name: str, raw: Any) -> WorkspaceSpec | None:
    path = _path("workspaces", name)
    ck.string(name, path, max_len=64, pattern=_NAME_RE, what="workspace name (letters, digits, _ . -)")
    t = ck.table(raw, path, _WS_KEYS)
    if t is None:
        return None
    columns: tuple[str, ...] | None = None
    if "columns" in t:
        cols = t["columns"]
        if not isinstance(cols, list):
            ck.err(f"{path}.columns", f"must be an array of column names, got {_type(cols)}")
        else:
            seen: list[str] = []
            for i, c in enumerate(cols):
                c = ck.string(c, f"{path}.columns[{i}]", max_len=100)
                if c is None:
                    continue
                if c in seen:
                    ck.err(f"{path}.columns[{i}]", f"column {c!r} is listed twice")
                    continue
                seen.append(c)
            columns = tuple(seen)
    inboxes: list[InboxSpec] = []
    if "inboxes" in t:
        tbl = ck.table(t["inboxes"], f"{path}.inboxes", set(t["inboxes"]) if isinstance(t["inboxes"], dict) else set())
        for iname, iraw in (tbl or {}).items():
            inbox = _inbox(ck, iname, iraw, _path("workspaces", name, "inboxes", iname))
            if inbox is not None:
                inboxes.append(inbox)
    phrases: tuple[str, ...] | None = None
    if "opt_out_phrases" in t:
        raw_phrases = t["opt_out_phrases"]
        if not isinstance(raw_phrases, list) or not raw_phrases:
            ck.err(f"{path}.opt_out_phrases", f"must be a non-empty array of phrases, got {_type(raw_phrases)}")
        else:
            kept: list[str] = []
            for i, phrase in enumerate(raw_phrases):
                text = ck.string(phrase, f"{path}.opt_out_phrases[{i}]", max_len=80)
                if text is None:
                    continue
                if not optout.normalise(text):
                    ck.err(f"{path}.opt_out_phrases[{i}]", "has no letters or digits (it could never match)")
                    continue
                kept.append(text)
            phrases = tuple(kept)
    opt_out_reply = (
        ck.string(t["opt_out_reply"], f"{path}.opt_out_reply", max_len=1000) if "opt_out_reply" in t else None
    )
    campaigns: list[CampaignSpec] = []
    if "campaigns" in t:
        tbl = ck.table(
            t["campaigns"], f"{path}.campaigns", set(t["campaigns"]) if isinstance(t["campaigns"], dict) else set()
        )
        for cname, craw in (tbl or {}).items():
            campaign = _campaign(ck, cname, craw, _path("workspaces", name, "campaigns", cname))
            if campaign is not None:
                campaigns.append(campaign)
    return WorkspaceSpec(name, columns, tuple(inboxes), tuple(campaigns), path, phrases, opt_out_reply)


def _too_deep(data: dict) -> str | None:
    """The key path of the first value nested deeper than MAX_DEPTH (iterative: no recursion)."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            return path
        if isinstance(value, dict):
            stack += [(v, f"{path}.{_key(str(k))}" if path else _key(str(k)), depth + 1) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    return None


def parse_text(text: str, source: str = "<text>") -> list[WorkspaceSpec]:
    """Parse and validate TOML text (no database); ConfigFileError lists every problem by key path."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError([f"{source}: invalid TOML: {exc}"]) from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ConfigFileError(
            [
                f"{source}: invalid TOML: arrays or tables nested too deeply "
                f"(more than {MAX_DEPTH} levels are never needed)"
            ]
        ) from None
    deep = _too_deep(data)
    if deep is not None:
        raise ConfigFileError([f"{deep}: nested more than {MAX_DEPTH} levels deep"])
    ck = _Checker()
    top = ck.table(data, "", {"workspaces"}, {"workspaces"})
    specs: list[WorkspaceSpec] = []
    if top is not None and "workspaces" in top:
        wss = top["workspaces"]
        if not isinstance(wss, dict) or not wss:
            ck.err("workspaces", "must be a table with at least one [workspaces.NAME]")
        else:
            for name, raw in wss.items():
                spec = _workspace(ck, name, raw)
                if spec is not None:
                    specs.append(spec)
    if ck.errors:
        raise ConfigFileError(ck.errors)
    return specs


# --------------------------------------------------------------------------------------------
# references and writes (one transaction)
# --------------------------------------------------------------------------------------------

_CAMPAIGN_COLUMNS = (
    "inbox_id",
    "source_column_id",
    "target_column_id",
    "weekdays",
    "window_start_minute",
    "window_end_minute",
    "timezone",
    "daily_limit",
    "gap_min_seconds",
    "gap_max_seconds",
    "part_gap_min_seconds",
    "part_gap_max_seconds",
    "model",
    "system_prompt",
    "fallback_template",
    "split_enabled",
    "max_parts",
    "active",
    "reply_column_id",
    "skip_if_replied",
    "triage_enabled",
    "triage_model",
    "min_days_in_column",
    "history",
)


def _campaign_values(
    c: CampaignSpec, inbox_id: int, source_id: int, target_id: int, reply_id: int | None = None
) -> tuple:
    return (
        inbox_id,
        source_id,
        target_id,
        list(c.weekdays),
        c.window_start_minute,
        c.window_end_minute,
        c.timezone,
        c.daily_limit,
        c.gap_min_seconds,
        c.gap_max_seconds,
        c.part_gap_min_seconds,
        c.part_gap_max_seconds,
        c.model,
        c.system_prompt,
        c.fallback_template,
        c.split_enabled,
        c.max_parts,
        c.active,
        reply_id,
        c.skip_if_replied,
        bool(c.triage and c.triage.enabled),
        c.triage.model if c.triage else None,
        c.min_days_in_column,
        c.history,
    )


def _normalise(values: tuple) -> tuple:
    return tuple(sorted(int(x) for x in v) if isinstance(v, list) else v for v in values)


def _check_references(specs: list[WorkspaceSpec]) -> list[str]:
    """Database-side validation (same-workspace names, unique instances): errors by key path."""
    errors: list[str] = []
    existing_inboxes = db.execute_sql(
        "SELECT w.name, i.name, i.instance_name FROM inboxes i JOIN workspaces w ON w.id = i.workspace_id"
    ).fetchall()
    existing_columns = db.execute_sql(
        "SELECT w.name, c.name FROM columns c JOIN workspaces w ON w.id = c.workspace_id"
    ).fetchall()
    inboxes_by_ws: dict[str, set[str]] = {}
    for ws, name, _ in existing_inboxes:
        inboxes_by_ws.setdefault(ws, set()).add(name)
    columns_by_ws: dict[str, set[str]] = {}
    for ws, name in existing_columns:
        columns_by_ws.setdefault(ws, set()).add(name)
    errors += _instance_clashes(specs, existing_inboxes)

    def elsewhere(kind: str, name: str, this_ws: str) -> str:
        """Why a name is unknown here: it may exist in another workspace (E-20)."""
        found = set()
        for ws, names in (inboxes_by_ws if kind == "inbox" else columns_by_ws).items():
            if name in names:
                found.add(ws)
        for s in specs:
            if name in ({i.name for i in s.inboxes} if kind == "inbox" else set(s.columns or ())):
                found.add(s.name)
        found.discard(this_ws)
        if not found:
            return ""
        return (
            f" (it belongs to workspace {', '.join(repr(w) for w in sorted(found))}: "
            "cross-workspace references are not allowed)"
        )

    for s in specs:
        inbox_names = inboxes_by_ws.get(s.name, set()) | {i.name for i in s.inboxes}
        column_names = columns_by_ws.get(s.name, set()) | set(s.columns or ())
        for c in s.campaigns:
            for i, member in enumerate(c.pool):
                if member not in inbox_names:
                    key = f"inboxes[{i}]" if c.inboxes else "inbox"
                    errors.append(
                        f"{c.path}.{key}: {member!r} is not an inbox of workspace {s.name!r}"
                        + elsewhere("inbox", member, s.name)
                    )
            for key, col in (
                ("source_column", c.source_column),
                ("target_column", c.target_column),
                ("reply_column", c.reply_column),
                *((f"triage.columns.{intent}", name) for intent, name in (c.triage.columns if c.triage else ())),
            ):
                if col is not None and col not in column_names:
                    errors.append(
                        f"{c.path}.{key}: {col!r} is not a column of workspace {s.name!r}"
                        + elsewhere("column", col, s.name)
                    )
    return errors


def _instance_clashes(specs: list[WorkspaceSpec], existing_inboxes: list[tuple]) -> list[str]:
    """The instance of every inbox after this apply must be unique across all workspaces."""
    errors: list[str] = []
    final_instance: dict[tuple[str, str], str] = {(ws, n): inst for ws, n, inst in existing_inboxes}
    file_paths: dict[tuple[str, str], str] = {}
    for s in specs:
        for i in s.inboxes:
            final_instance[(s.name, i.name)] = i.instance
            file_paths[(s.name, i.name)] = i.path
    owners: dict[str, list[tuple[str, str]]] = {}
    for key, inst in final_instance.items():
        owners.setdefault(inst, []).append(key)
    for inst, keys in owners.items():
        if len(keys) > 1:
            for key in keys:
                if key in file_paths:
                    others = ", ".join(f"{w}/{n}" for w, n in keys if (w, n) != key)
                    errors.append(f"{file_paths[key]}.instance: instance {inst!r} is already used by inbox {others}")
    return errors


def _free_moving_instances(specs: list[WorkspaceSpec]) -> None:
    """Give every inbox whose instance changes a unique placeholder first, in one statement.

    Two inboxes swapping instances in one file would otherwise trip the UNIQUE instance on the
    first UPDATE. _check_references has already proved the final assignment unique.
    """
    moves = [(s.name, i.name, i.instance) for s in specs for i in s.inboxes]
    if moves:
        db.execute_sql(
            """
            UPDATE inboxes i SET instance_name = 'apply-swap-' || gen_random_uuid()
              FROM workspaces w, unnest(%s::text[], %s::text[], %s::text[]) AS f(ws, name, instance)
             WHERE w.id = i.workspace_id AND w.name = f.ws AND i.name = f.name
               AND i.instance_name <> f.instance""",
            ([m[0] for m in moves], [m[1] for m in moves], [m[2] for m in moves]),
        )


def _apply_workspace_row(s: WorkspaceSpec, summary: ApplySummary) -> int:
    """Create or update the workspace row (its opt-out settings); return its id."""
    row = db.execute_sql(
        "SELECT id, opt_out_phrases, opt_out_reply FROM workspaces WHERE name = %s", (s.name,)
    ).fetchone()
    phrases = list(s.opt_out_phrases) if s.opt_out_phrases is not None else None
    if row is None:
        ws_id = db.execute_sql(
            "INSERT INTO workspaces (name, opt_out_phrases, opt_out_reply) VALUES (%s, %s, %s) RETURNING id",
            (s.name, phrases, s.opt_out_reply),
        ).fetchone()[0]
        summary.add("created", "workspace", s.name)
    elif (row[1], row[2]) != (phrases, s.opt_out_reply):
        ws_id = row[0]
        db.execute_sql(
            "UPDATE workspaces SET opt_out_phrases = %s, opt_out_reply = %s WHERE id = %s",
            (phrases, s.opt_out_reply, ws_id),
        )
        summary.add("updated", "workspace", s.name)
    else:
        ws_id = row[0]
        summary.add("unchanged", "workspace", s.name)
    return int(ws_id)


def _apply(specs: list[WorkspaceSpec]) -> ApplySummary:
    summary = ApplySummary()
    _free_moving_instances(specs)
    for s in specs:
        ws_id = _apply_workspace_row(s, summary)

        columns = {
            name: (cid, pos)
            for cid, name, pos in db.execute_sql(
                "SELECT id, name, position FROM columns WHERE workspace_id = %s ORDER BY position, id", (ws_id,)
            )
        }
        if s.columns is not None:
            for pos, name in enumerate(s.columns):
                if name not in columns:
                    cid = db.execute_sql(
                        "INSERT INTO columns (workspace_id, name, position) VALUES (%s, %s, %s) RETURNING id",
                        (ws_id, name, pos),
                    ).fetchone()[0]
                    columns[name] = (cid, pos)
                    summary.add("created", "column", f"{s.name}/{name}")
                elif columns[name][1] != pos:
                    db.execute_sql("UPDATE columns SET position = %s WHERE id = %s", (pos, columns[name][0]))
                    columns[name] = (columns[name][0], pos)
                    summary.add("updated", "column", f"{s.name}/{name}")
                else:
                    summary.add("unchanged", "column", f"{s.name}/{name}")
            for name in columns:
                if name not in s.columns:
                    summary.add("kept", "column", f"{s.name}/{name}")

        inboxes = {
            name: (iid, (inst, ph, pd, gap, ws_start, ws_days))
            for iid, name, inst, ph, pd, gap, ws_start, ws_days in db.execute_sql(
                "SELECT id, name, instance_name, max_per_hour, max_per_day, min_gap_seconds, "
                "warmup_start_per_day, warmup_days FROM inboxes WHERE workspace_id = %s",
                (ws_id,),
            )
        }
        file_inboxes = {i.name for i in s.inboxes}
        for i in s.inboxes:
            warm = (i.warmup.start_per_day, i.warmup.days) if i.warmup else (None, None)
            values = (i.instance, i.max_per_hour, i.max_per_day, i.min_gap_seconds, *warm)
            if i.name not in inboxes:
                iid = db.execute_sql(
                    """INSERT INTO inboxes (workspace_id, name, instance_name, max_per_hour, max_per_day,
                                            min_gap_seconds, warmup_start_per_day, warmup_days)
                       VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id""",
                    (ws_id, i.name, *values),
                ).fetchone()[0]
                inboxes[i.name] = (iid, values)
                summary.add("created", "inbox", f"{s.name}/{i.name}")
            elif inboxes[i.name][1] != values:
                # first_send_at is the number's history, not configuration: a new or changed
                # warm-up keeps counting from the inbox's first send (R-HEALTH-1)
                db.execute_sql(
                    """UPDATE inboxes SET instance_name = %s, max_per_hour = %s, max_per_day = %s,
                                         min_gap_seconds = %s, warmup_start_per_day = %s, warmup_days = %s
                        WHERE id = %s""",
                    (*values, inboxes[i.name][0]),
                )
                inboxes[i.name] = (inboxes[i.name][0], values)
                summary.add("updated", "inbox", f"{s.name}/{i.name}")
            else:
                summary.add("unchanged", "inbox", f"{s.name}/{i.name}")
        for name in inboxes:
            if name not in file_inboxes and s.inboxes:
                summary.add("kept", "inbox", f"{s.name}/{name}")

        existing = {
            r[1]: (r[0], r[2], tuple(r[3:]))
            for r in db.execute_sql(
                f"SELECT id, name, version, {', '.join(_CAMPAIGN_COLUMNS)} FROM campaign_configs "
                "WHERE workspace_id = %s",
                (ws_id,),
            )
        }
        pools: dict[int, list[int]] = {
            int(cid): list(members)
            for cid, members in db.execute_sql(
                """SELECT config_id, array_agg(inbox_id ORDER BY position) FROM campaign_config_inboxes
                    WHERE workspace_id = %s GROUP BY config_id""",
                (ws_id,),
            )
        }
        triage_maps: dict[int, dict[str, int]] = {}
        for cid, intent, column_id in db.execute_sql(
            "SELECT config_id, intent, column_id FROM campaign_triage_columns WHERE workspace_id = %s", (ws_id,)
        ):
            triage_maps.setdefault(int(cid), {})[intent] = int(column_id)
        file_campaigns = {c.name for c in s.campaigns}
        for c in s.campaigns:
            summary.warnings.extend(_cap_warnings(s.name, c, {n: inboxes[n][1] for n in c.pool}))
            triage_map = {intent: columns[name][0] for intent, name in (c.triage.columns if c.triage else ())}
            pool = [inboxes[name][0] for name in c.pool]
            values = _campaign_values(
                c,
                pool[0],
                columns[c.source_column][0],
                columns[c.target_column][0],
                columns[c.reply_column][0] if c.reply_column is not None else None,
            )
            label = f"{s.name}/{c.name}"
            if c.name not in existing:
                cid = db.execute_sql(
                    f"""INSERT INTO campaign_configs (workspace_id, name, {", ".join(_CAMPAIGN_COLUMNS)})
                        VALUES (%s, %s, {", ".join(["%s"] * len(_CAMPAIGN_COLUMNS))}) RETURNING id""",
                    (ws_id, c.name, *values),
                ).fetchone()[0]
                _write_pool(cid, ws_id, pool)
                _write_triage_map(cid, ws_id, triage_map)
                summary.add("created", "campaign", label)
                continue
            cid, version, current = existing[c.name]
            if (
                _normalise(current) == _normalise(values)
                and pools.get(cid) == pool
                and triage_maps.get(cid, {}) == triage_map
            ):
                summary.add("unchanged", "campaign", label)
                continue
            cur = db.execute_sql(
                f"""UPDATE campaign_configs SET {", ".join(f"{col} = %s" for col in _CAMPAIGN_COLUMNS)},
                           version = version + 1
                     WHERE id = %s AND version = %s""",
                (*values, cid, version),
            )
            if cur.rowcount != 1:
                raise ConcurrentChangeError(
                    [
                        f"{c.path}: campaign {label} was changed by someone else while "
                        f"applying (version {version} is stale); apply the file again"
                    ]
                )
            _write_pool(cid, ws_id, pool)
            _write_triage_map(cid, ws_id, triage_map)
            summary.add("updated", "campaign", f"{label} (version {version + 1})")
        for name in existing:
            if name not in file_campaigns and s.campaigns:
                summary.add("kept", "campaign", f"{s.name}/{name}")
    return summary


def _cap_warnings(workspace: str, c: CampaignSpec, caps: dict[str, tuple]) -> list[str]:
    """Where a campaign's gaps or daily limit ask for more than its inboxes' caps allow (issue 22).

    Not an error: the planner keeps every inbox within its caps (wider gaps, overflow); the
    operator should know the campaign will send less than its file suggests. ``caps`` maps each
    pool member to its ``(instance, max_per_hour, max_per_day, min_gap, warmup start, warmup days)``.
    """
    out: list[str] = []
    label = f"{workspace}/{c.name}"
    parts = capacity.expected_parts(c.split_enabled, c.max_parts)
    per = f"{parts} sends per message (split.max_parts)" if parts > 1 else "1 send per message"
    day_caps: list[int] = []
    for name, (_inst, per_hour, per_day, *_rest) in caps.items():
        if per_hour is not None:
            floor = capacity.gap_floor_seconds(per_hour, parts)
            asked = 3600.0 / c.gap_min_seconds * parts if c.gap_min_seconds > 0 else math.inf
            if floor is None:
                out.append(
                    f"campaign {label}: inbox {name} has max_per_hour = {per_hour}, less than one message of "
                    f"{per}: nothing will be planned on it"
                )
            elif asked > per_hour:
                asked_txt = "unbounded" if math.isinf(asked) else f"{asked:,.0f}"
                out.append(
                    f"campaign {label}: gap_seconds.min = {c.gap_min_seconds:g} s asks inbox {name} for up to "
                    f"{asked_txt} sends/hour ({per}) but its max_per_hour is {per_hour}: its messages will be "
                    f"planned at least {floor:g} s apart ({per_hour // parts} per hour), the rest is overflow"
                )
        if per_day is not None:
            day_caps.append(per_day)
    if day_caps and len(day_caps) == len(caps) and c.daily_limit * parts > sum(day_caps):
        out.append(
            f"campaign {label}: daily_limit = {c.daily_limit} ({c.daily_limit * parts:,} sends, {per}) is more than "
            f"its inboxes' max_per_day allow: {sum(day_caps):,} sends a day (less while warming up); "
            "the rest is overflow"
        )
    return out


def _write_pool(config_id: int, workspace_id: int, pool: list[int]) -> None:
    """Make ``pool`` the config's inboxes in that order (R-POOL-1); its first is ``campaign_configs.inbox_id``."""
    db.execute_sql("DELETE FROM campaign_config_inboxes WHERE config_id = %s", (config_id,))
    db.execute_sql(
        """INSERT INTO campaign_config_inboxes (config_id, inbox_id, workspace_id, position)
           SELECT %s, t.inbox_id, %s, t.position - 1
             FROM unnest(%s::bigint[]) WITH ORDINALITY AS t(inbox_id, position)""",
        (config_id, workspace_id, pool),
    )


def _write_triage_map(config_id: int, workspace_id: int, mapping: dict[str, int]) -> None:
    """Make ``mapping`` (intent -> column id) the config's triage columns (R-IN-5)."""
    db.execute_sql("DELETE FROM campaign_triage_columns WHERE config_id = %s", (config_id,))
    if mapping:
        db.execute_sql(
            """INSERT INTO campaign_triage_columns (config_id, workspace_id, intent, column_id)
               SELECT %s, %s, t.intent, t.column_id FROM unnest(%s::text[], %s::bigint[]) AS t(intent, column_id)""",
            (config_id, workspace_id, list(mapping), list(mapping.values())),
        )


def apply_text(text: str, source: str = "<text>") -> ApplySummary:
    """Validate the whole TOML text, then write it in one transaction; idempotent."""
    specs = parse_text(text, source)
    try:
        with db.atomic():
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (APPLY_LOCK_KEY,))
            errors = _check_references(specs)
            if errors:
                raise ConfigFileError(errors)
            summary = _apply(specs)
    except peewee.IntegrityError as exc:  # a race or a swap the checks above could not see: nothing written
        raise ConfigFileError(
            [f"{source}: rejected by the database, nothing applied: {str(exc).splitlines()[0]}"]
        ) from None
    log.info("applied %s: %s", source, "; ".join(summary.lines()))
    return summary


def apply_file(path: str | Path) -> ApplySummary:
    """Read a TOML file (UTF-8) and :func:`apply_text` it."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigFileError([f"{p}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigFileError([f"{p}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"]) from None
    return apply_text(text, str(p))
