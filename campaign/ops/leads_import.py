"""``import-leads FILE.csv --workspace W --column C [--region BR]`` (SPEC R-OPS-1, §4.8, E-18).

The CSV has a header ``name,phone`` (any order, case-insensitive) and any extra columns, kept as
custom fields. Phones are normalised to E.164 with ``phonenumbers`` (numbers without a ``+``
country code use ``region``, default BR).

* A problem with the FILE (not UTF-8, binary garbage, no header, no name/phone column,
  duplicate header names, unknown workspace or column) is one clear error: nothing is written.
* A problem with a ROW (missing name or phone, invalid phone, wrong field count, the same phone
  twice in the file, and CSV damage inside it: a stray quote, a quote never closed, a cell over
  ``MAX_FIELD_LENGTH``) is reported with its line number; every good row is still imported. After
  damage, reading starts again on the next physical line, so one bad row costs that row only.
* All good rows go in with one bulk upsert (``INSERT ... ON CONFLICT (workspace_id, phone)
  DO UPDATE``). Re-importing a phone that already exists in the workspace updates that lead:
  its name, and its custom fields merged (file values win; empty cells never erase a value).
  It is NOT moved to ``--column``: the lead may have progressed (been messaged and moved on), and
  moving it back into a campaign's source column would message it again. Only a lead without
  a column (its column was deleted) is placed in ``--column``. ``opted_out`` is never touched.
* Header cells left empty (a trailing comma from a spreadsheet) are ignored.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import phonenumbers

from campaign.db import db
from campaign.errors import (
    LeadImportError,
)

log = logging.getLogger(__name__)

__all__ = [
    "LeadImportError",
    "ImportReport",
    "RowError",
    "import_file",
    "import_bytes",
    "import_text",
    "normalise_phone",
    "DEFAULT_REGION",
    "MAX_FIELD_LENGTH",
]

DEFAULT_REGION = "BR"
MAX_FIELD_LENGTH = 10_000  # a cell longer than this is a broken file, not a lead


@dataclass(frozen=True)
class RowError:
    """One rejected row: its line number in the file and why."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class ImportReport:
    """What an import did."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    errors: list[RowError] = field(default_factory=list)

    @property
    def imported(self) -> int:
        """Good rows (inserted + updated + unchanged)."""
        return self.inserted + self.updated + self.unchanged


def normalise_phone(raw: str, region: str = DEFAULT_REGION) -> str:
    """E.164 form of ``raw``; ValueError with the reason when it is not a valid phone number."""
    text = raw.strip()
    if not text:
        raise ValueError("missing phone")
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException as exc:
        reason = str(exc).split(") ", 1)[-1].rstrip(".")  # "(1) The string supplied ..." -> the text
        raise ValueError(f"invalid phone {text!r}: {reason}") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError(f"invalid phone {text!r}: not a valid number for its country")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _decode(raw: bytes, source: str) -> str:
    if b"\x00" in raw:
        raise LeadImportError(f"{source}: binary data (NUL bytes), not a CSV text file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LeadImportError(
            f"{source}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save the file as UTF-8"
        ) from None


def _resolve(workspace: str, column: str) -> tuple[int, int]:
    row = db.execute_sql("SELECT id FROM workspaces WHERE name = %s", (workspace,)).fetchone()
    if row is None:
        raise LeadImportError(f"workspace {workspace!r} does not exist (apply a config that defines it first)")
    ws_id = row[0]
    row = db.execute_sql("SELECT id FROM columns WHERE workspace_id = %s AND name = %s", (ws_id, column)).fetchone()
    if row is None:
        names = [
            r[0]
            for r in db.execute_sql("SELECT name FROM columns WHERE workspace_id = %s ORDER BY position, id", (ws_id,))
        ]
        raise LeadImportError(
            f"column {column!r} is not a column of workspace {workspace!r} (columns: {', '.join(names) or 'none'})"
        )
    return ws_id, row[0]


class _Lines:
    """The file's physical lines for ``csv.reader``, with the index of the next one to read.

    Knowing where a record started is what lets the import report a damaged row by its line and
    start reading again on the line after it (``csv`` itself would carry an open quote to EOF).
    """

    def __init__(self, lines: list[str], pos: int = 0) -> None:
        self.lines = lines
        self.pos = pos

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self.pos >= len(self.lines):
            raise StopIteration
        self.pos += 1
        return self.lines[self.pos - 1]


def _damage(exc: csv.Error, lines_read: int) -> str:
    """A row error's reason for what ``csv`` (strict) found wrong in it."""
    text = str(exc)
    if "field limit" in text:
        reason = f"a field is longer than {MAX_FIELD_LENGTH} characters"
        return reason + (" (a quote that is never closed?)" if lines_read > 1 else "")
    if "unexpected end of data" in text:
        return "a quoted field is never closed (unterminated quote)"
    if "expected after" in text:
        return (
            "stray quote: a quoted field must end with '\"' followed by ',' or the end of the line "
            '(write a quote inside a quoted field as "")'
        )
    return f"unreadable CSV row: {text}"


def _parse(text: str, source: str, region: str) -> tuple[list[tuple[str, str, dict]], list[RowError]]:
    """Good rows ``(name, e164, custom_fields)`` and row errors; LeadImportError for a broken file."""
    # the limit is one cell and the state global to the csv module: a cell past it is one row's error
    csv.field_size_limit(MAX_FIELD_LENGTH * 10)
    # newline="": lines split at \r\n, \n and \r exactly as csv.reader sees them, endings kept
    feed = _Lines(io.StringIO(text, newline="").readlines())
    reader = csv.reader(feed, strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise LeadImportError(f"{source}: line 1: unreadable CSV header: {exc}") from None
    if header is None or not any(h.strip() for h in header):
        raise LeadImportError(f"{source}: empty file: the first line must be a header with name and phone")
    names = [h.strip().lower() if h.strip().lower() in ("name", "phone") else h.strip() for h in header]
    seen: set[str] = set()
    for h in names:
        if h and h in seen:
            raise LeadImportError(f"{source}: line 1: header column {h!r} appears twice")
        seen.add(h)
    missing = [c for c in ("name", "phone") if c not in names]
    if missing:
        raise LeadImportError(
            f"{source}: line 1: the header must have 'name' and 'phone' columns "
            f"(missing {', '.join(missing)}; found {', '.join(repr(h) for h in header[:10])})"
        )
    i_name, i_phone = names.index("name"), names.index("phone")
    extras = [(i, h) for i, h in enumerate(names) if h and i not in (i_name, i_phone)]

    rows: list[tuple[str, str, dict]] = []
    errors: list[RowError] = []
    first_line: dict[str, int] = {}
    while True:
        begin = feed.pos
        start = begin + 1  # the record's first line, 1-based
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            errors.append(RowError(start, _damage(exc, feed.pos - begin)))
            feed.pos = begin + 1  # the damaged row's first line is lost, nothing after it
            reader = csv.reader(feed, strict=True)
            continue
        if not record or all(not c.strip() for c in record):
            continue  # blank line
        if len(record) != len(header):
            errors.append(RowError(start, f"has {len(record)} fields, the header has {len(header)}"))
            if feed.pos - begin > 1:
                # a record over several lines with the wrong field count is a quote gone wrong, not
                # a multi-line cell: the lines it swallowed are read again as rows of their own
                feed.pos = begin + 1
                reader = csv.reader(feed, strict=True)
            continue
        if any(len(c) > MAX_FIELD_LENGTH for c in record):
            errors.append(RowError(start, f"a field is longer than {MAX_FIELD_LENGTH} characters"))
            continue
        name = record[i_name].strip()
        if not name:
            errors.append(RowError(start, "missing name"))
            continue
        try:
            phone = normalise_phone(record[i_phone], region)
        except ValueError as exc:
            errors.append(RowError(start, str(exc)))
            continue
        if phone in first_line:
            errors.append(RowError(start, f"duplicate phone {phone} (first seen on line {first_line[phone]})"))
            continue
        first_line[phone] = start
        custom = {h: record[i].strip() for i, h in extras if record[i].strip()}
        rows.append((name, phone, custom))
    return rows, errors


_UPSERT = """
    INSERT INTO leads AS l (workspace_id, column_id, name, phone, custom_fields)
    SELECT %s, %s, t.name, t.phone, t.custom::jsonb
      FROM unnest(%s::text[], %s::text[], %s::text[]) AS t(name, phone, custom)
    ON CONFLICT (workspace_id, phone) DO UPDATE
       SET name = EXCLUDED.name,
           custom_fields = l.custom_fields || EXCLUDED.custom_fields,
           column_id = COALESCE(l.column_id, EXCLUDED.column_id)
     WHERE l.name IS DISTINCT FROM EXCLUDED.name
        OR NOT (l.custom_fields @> EXCLUDED.custom_fields)
        OR l.column_id IS NULL
    RETURNING (xmax = 0) AS inserted"""


def import_text(
    text: str, *, workspace: str, column: str, region: str = DEFAULT_REGION, source: str = "<text>"
) -> ImportReport:
    """Import CSV text into ``column`` of ``workspace``: one bulk upsert of the good rows."""
    region = region.upper()
    if region not in phonenumbers.SUPPORTED_REGIONS:
        raise LeadImportError(f"--region {region!r} is not a phone region code (e.g. BR, US, PT)")
    rows, errors = _parse(text, source, region)
    report = ImportReport(errors=errors)
    with db.atomic():
        ws_id, col_id = _resolve(workspace, column)
        if rows:
            result = db.execute_sql(
                _UPSERT,
                (
                    ws_id,
                    col_id,
                    [r[0] for r in rows],
                    [r[1] for r in rows],
                    [json.dumps(r[2], ensure_ascii=False) for r in rows],
                ),
            ).fetchall()
            report.inserted = sum(1 for r in result if r[0])
            report.updated = len(result) - report.inserted
            report.unchanged = len(rows) - len(result)
    log.info(
        "imported %s into %s/%s: %s inserted, %s updated, %s unchanged, %s rows rejected",
        source,
        workspace,
        column,
        report.inserted,
        report.updated,
        report.unchanged,
        len(errors),
    )
    return report


def import_bytes(
    raw: bytes, *, workspace: str, column: str, region: str = DEFAULT_REGION, source: str = "<bytes>"
) -> ImportReport:
    """Decode (UTF-8, BOM allowed) and :func:`import_text`."""
    return import_text(_decode(raw, source), workspace=workspace, column=column, region=region, source=source)


def import_file(path: str | Path, *, workspace: str, column: str, region: str = DEFAULT_REGION) -> ImportReport:
    """Import a CSV file (see the module docstring for the rules)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise LeadImportError(f"{p}: cannot read: {exc.strerror or exc}") from None
    return import_bytes(raw, workspace=workspace, column=column, region=region, source=str(p))
