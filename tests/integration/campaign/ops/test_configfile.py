"""``apply`` of the operator's TOML (SPEC §4.8, R-OPS-1, R-PLAN-5, E-20, T-SEC-1 fuzzing)."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from campaign.db import db
from campaign.ops import configfile
from campaign.ops.configfile import ConcurrentChangeError, ConfigFileError, apply_file, apply_text
from models import CampaignConfig, Column, Inbox, Workspace
from tests import ROOT

EXAMPLE = (ROOT / "examples" / "acme.toml").read_text()
CAMPAIGN = "workspaces.acme.campaigns.first-touch"


def snapshot() -> list:
    """Every row the apply may touch, with versions and updated_at (to prove 'nothing changed')."""
    out = []
    for table in ("workspaces", "columns", "inboxes", "campaign_configs"):
        out.append(db.execute_sql(f"SELECT to_jsonb(t) FROM {table} t ORDER BY id").fetchall())
    out.append(
        db.execute_sql("SELECT to_jsonb(t) FROM campaign_config_inboxes t ORDER BY config_id, position").fetchall()
    )
    return out


def test_example_applies_with_every_value(clean_db):
    summary = apply_file(ROOT / "examples" / "acme.toml")
    assert summary.created == {
        "workspace": ["acme"],
        "column": ["acme/New", "acme/Contacted", "acme/Replied"],
        "inbox": ["acme/sales-1"],
        "campaign": ["acme/first-touch"],
    }
    ws = Workspace.get(name="acme")
    assert [(c.name, c.position) for c in Column.select().where(Column.workspace == ws).order_by(Column.position)] == [
        ("New", 0),
        ("Contacted", 1),
        ("Replied", 2),
    ]
    ibx = Inbox.get(name="sales-1")
    assert (ibx.instance_name, ibx.max_per_hour, ibx.max_per_day, ibx.min_gap_seconds) == ("acme-sales-1", 60, 300, 1.0)
    c = CampaignConfig.get(name="first-touch")
    assert c.inbox_id == ibx.id and c.source_column.name == "New" and c.target_column.name == "Contacted"
    assert sorted(c.weekdays) == [0, 1, 2, 3, 4]
    assert (c.window_start_minute, c.window_end_minute, c.timezone) == (540, 1080, "America/Sao_Paulo")
    assert (c.daily_limit, c.gap_min_seconds, c.gap_max_seconds) == (200, 60.0, 180.0)
    assert (c.part_gap_min_seconds, c.part_gap_max_seconds) == (1.0, 4.0)
    assert c.model == "openai/gpt-4o-mini" and c.fallback_template == "Olá {name}, tudo bem?"
    assert (c.split_enabled, c.max_parts, c.active, c.version) == (True, 3, True, 1)


def test_apply_twice_changes_nothing(clean_db):
    apply_text(EXAMPLE)
    before = snapshot()
    summary = apply_text(EXAMPLE)
    assert not summary.changed and "nothing changed" in summary.lines()
    assert snapshot() == before  # versions and updated_at included


def test_changed_campaign_is_updated_in_place_with_version_bump(clean_db):
    apply_text(EXAMPLE)
    cid = CampaignConfig.get(name="first-touch").id
    summary = apply_text(
        EXAMPLE.replace("daily_limit = 200", "daily_limit = 250").replace(
            'window = { start = "09:00", end = "18:00" }', ""
        )
    )
    assert summary.updated == {"campaign": ["acme/first-touch (version 2)"]}
    c = CampaignConfig.get_by_id(cid)
    assert (c.daily_limit, c.version, c.window_start_minute, c.window_end_minute) == (250, 2, 0, 1440)
    assert CampaignConfig.select().count() == 1


def test_optimistic_lock_conflict_applies_nothing(clean_db, monkeypatch):
    apply_text(EXAMPLE)
    before = snapshot()
    real = db.obj.execute_sql

    def racing(sql, params=None, *a, **kw):
        if sql.lstrip().startswith("UPDATE campaign_configs SET"):  # someone else bumps the version first
            real("UPDATE campaign_configs SET version = version + 1")
        return real(sql, params, *a, **kw)

    monkeypatch.setattr(db.obj, "execute_sql", racing)
    changed = EXAMPLE.replace("daily_limit = 200", "daily_limit = 10").replace(
        '"New", "Contacted", "Replied"', '"New", "Contacted", "Replied", "Won"'
    )
    with pytest.raises(ConcurrentChangeError, match=rf"{CAMPAIGN}: campaign acme/first-touch was changed"):
        apply_text(changed)
    monkeypatch.undo()
    assert snapshot() == before  # the new column was rolled back too


def test_columns_absent_from_the_file_are_kept_and_reported(clean_db):
    apply_text(EXAMPLE)
    ws = Workspace.get(name="acme")
    Column.create(workspace=ws, name="Archive", position=9)
    summary = apply_text(EXAMPLE.replace('"New", "Contacted", "Replied"', '"Replied", "New", "Contacted"'))
    assert Column.select().where(Column.workspace == ws).count() == 4
    assert summary.kept == {"column": ["acme/Archive"]}
    assert any("never deleted" in line for line in summary.lines())
    assert {c.name: c.position for c in Column.select()} == {"Replied": 0, "New": 1, "Contacted": 2, "Archive": 9}


def _edit(old: str, new: str):
    def f(text: str) -> str:
        assert old in text, old
        return text.replace(old, new)

    return f


OTHER_WS = """
[workspaces.other]
columns = ["Inbox", "Done"]
[workspaces.other.inboxes.other-inbox]
instance = "other-1"
"""

BROKEN = [
    (_edit("daily_limit = 200", "daily_limt = 200"), f"{CAMPAIGN}.daily_limt: unknown key"),
    (_edit("daily_limit = 200", 'daily_limit = "200"'), f"{CAMPAIGN}.daily_limit: must be an integer"),
    (_edit("daily_limit = 200", "daily_limit = true"), f"{CAMPAIGN}.daily_limit: must be an integer"),
    (_edit("daily_limit = 200", "daily_limit = 0"), f"{CAMPAIGN}.daily_limit: 0 is out of range"),
    (_edit('start = "09:00"', 'start = "9am"'), f"{CAMPAIGN}.window.start: '9am' is not a time"),
    (_edit('start = "09:00"', 'start = "25:00"'), f"{CAMPAIGN}.window.start: '25:00' is not a time of day"),
    (_edit('end = "18:00"', 'end = "08:00"'), f"{CAMPAIGN}.window.end: 08:00 must be after start"),
    (_edit('"America/Sao_Paulo"', '"Mars/Olympus"'), f"{CAMPAIGN}.timezone: 'Mars/Olympus' is not an IANA"),
    (_edit("min = 60, max = 180", "min = 200, max = 100"), f"{CAMPAIGN}.gap_seconds: min (200) must not exceed"),
    (_edit("min = 60, max = 180", "min = nan, max = 100"), f"{CAMPAIGN}.gap_seconds.min: nan is out of range"),
    (_edit('"mon", "tue"', '"mon", "funday"'), f"{CAMPAIGN}.weekdays[1]: 'funday' is not a weekday"),
    (_edit('"mon", "tue"', '"mon", "mon"'), f"{CAMPAIGN}.weekdays[1]: 'mon' is listed twice"),
    (_edit("max_parts = 3", "max_parts = 11"), f"{CAMPAIGN}.split.max_parts: 11 is out of range 1..10"),
    (_edit('inbox = "sales-1"', 'inbox = "sales-9"'), f"{CAMPAIGN}.inbox: 'sales-9' is not an inbox of workspace"),
    (_edit('source_column = "New"', 'source_column = "Nope"'), f"{CAMPAIGN}.source_column: 'Nope' is not a column"),
    (_edit('target_column = "Contacted"', 'target_column = "New"'), f"{CAMPAIGN}.target_column: must differ"),
    (_edit('model = "openai/gpt-4o-mini"\n', ""), f"{CAMPAIGN}.model: is required"),
    (
        _edit('fallback_template = "Olá {name}, tudo bem?"', 'fallback_template = "Olá {name"'),
        f"{CAMPAIGN}.fallback_template: bad template",
    ),
    # issue 23 item 5: accepted, then rendered as "Olá {name!r} {} {name:>10}"
    (
        _edit('fallback_template = "Olá {name}, tudo bem?"', 'fallback_template = "Olá {name!r}"'),
        f"{CAMPAIGN}.fallback_template: bad template: placeholder {{name!r}}: conversions",
    ),
    (
        _edit('fallback_template = "Olá {name}, tudo bem?"', 'fallback_template = "Olá {name:>10}"'),
        f"{CAMPAIGN}.fallback_template: bad template: placeholder {{name:>10}}: format specs",
    ),
    (_edit("max_per_hour = 60", "max_per_hour = -1"), "workspaces.acme.inboxes.sales-1.max_per_hour: -1 is out"),
    (_edit("[workspaces.acme]", "[workspaces.acme]\ncolour = 1"), "workspaces.acme.colour: unknown key"),
    # issue 23 item 4: each of these used to reach PostgreSQL and come back as a traceback or a
    # database message naming no key
    (
        _edit("max_per_hour = 60", "max_per_hour = 2147483648"),
        "workspaces.acme.inboxes.sales-1.max_per_hour: 2147483648 is out of range 1..2147483647",
    ),
    (
        _edit("max_per_day = 300", "max_per_day = 9223372036854775807"),
        "workspaces.acme.inboxes.sales-1.max_per_day: 9223372036854775807 is out of range",
    ),
    (
        _edit('model = "openai/gpt-4o-mini"', 'model = "openai/\\u0000gpt"'),
        f"{CAMPAIGN}.model: contains a NUL character",
    ),
    (_edit('"New", "Contacted"', '"New\\u0000", "New", "Contacted"'), "workspaces.acme.columns[0]: contains a NUL"),
    (
        _edit(
            "[workspaces.acme.inboxes.sales-1]",
            '[workspaces.acme.inboxes."sales\\u0000"]\ninstance = "x"\n[workspaces.acme.inboxes.sales-1]',
        ),
        'workspaces.acme.inboxes."sales\\u0000": contains a NUL character',
    ),
    (
        _edit("[workspaces.acme.campaigns.first-touch]", '[workspaces.acme.campaigns."first-touch\\n"]'),
        "workspaces.acme.campaigns.\"first-touch\\n\": 'first-touch\\n' is not a valid campaign name",
    ),
    (
        _edit("[workspaces.acme]", '[workspaces."acme\\n"]\n[workspaces.acme]'),
        "workspaces.\"acme\\n\": 'acme\\n' is not a valid workspace name",
    ),
    (_edit('end = "18:00"', 'end = "18:00\\n"'), f"{CAMPAIGN}.window.end: '18:00\\n' is not a time"),
    (_edit('end = "18:00"', 'end = "١٨:٠٠"'), f"{CAMPAIGN}.window.end: '١٨:٠٠' is not a time"),
    (_edit("[workspaces.acme]", "[workspaces.acme]\ncolour = " + "[" * 5000 + "]" * 5000), "nested too deeply"),
    (
        _edit("active = true", "active = " + "[" * 20 + "]" * 20),
        f"{CAMPAIGN}.active" + "[0]" * 12 + ": nested more than 16 levels deep",
    ),
    # issue 23 item 8: host-specific zone names: hosts could disagree on the window
    (_edit('"America/Sao_Paulo"', '"localtime"'), f"{CAMPAIGN}.timezone: 'localtime' is not an IANA timezone"),
    (_edit('"America/Sao_Paulo"', '"posixrules"'), f"{CAMPAIGN}.timezone: 'posixrules' is not an IANA timezone"),
    (_edit('"America/Sao_Paulo"', '"Factory"'), f"{CAMPAIGN}.timezone: 'Factory' is not an IANA timezone"),
    (
        _edit("[workspaces.acme]", '[workspaces."acme corp"]\n[workspaces.acme]'),
        "workspaces.\"acme corp\": 'acme corp' is not a valid workspace name",
    ),
    (_edit("active = true", "active = 1"), f"{CAMPAIGN}.active: must be true or false"),
    # a follow-up's keys (R-SEQ-1/2)
    (
        _edit("active = true", "active = true\nmin_days_in_column = -1"),
        f"{CAMPAIGN}.min_days_in_column: -1 is out of range 0..3650",
    ),
    (
        _edit("active = true", "active = true\nmin_days_in_column = 1.5"),
        f"{CAMPAIGN}.min_days_in_column: must be an integer",
    ),
    (_edit("active = true", "active = true\nhistory = 51"), f"{CAMPAIGN}.history: 51 is out of range 0..50"),
    (_edit("active = true", 'active = true\nhistory = "6"'), f"{CAMPAIGN}.history: must be an integer"),
    (_edit("daily_limit = 200", "daily_limit = = 200"), "invalid TOML"),
    # E-20: naming an inbox / column that only exists in another workspace
    (
        lambda t: t.replace('inbox = "sales-1"', 'inbox = "other-inbox"') + OTHER_WS,
        f"{CAMPAIGN}.inbox: 'other-inbox' is not an inbox of workspace 'acme' (it belongs to workspace 'other'",
    ),
    (
        lambda t: t.replace('target_column = "Contacted"', 'target_column = "Done"') + OTHER_WS,
        f"{CAMPAIGN}.target_column: 'Done' is not a column of workspace 'acme' (it belongs to workspace 'other'",
    ),
    (_edit('inbox = "sales-1"', 'inbox = "sales-1"\ninboxes = ["sales-1"]'), f"{CAMPAIGN}: give either inbox"),
    (_edit('inbox = "sales-1"', ""), f"{CAMPAIGN}.inbox: is required"),
    (_edit('inbox = "sales-1"', "inboxes = []"), f"{CAMPAIGN}.inboxes: must be a non-empty list"),
    (_edit('inbox = "sales-1"', 'inboxes = "sales-1"'), f"{CAMPAIGN}.inboxes: must be a non-empty list"),
    (_edit('inbox = "sales-1"', 'inboxes = ["sales-1", 7]'), f"{CAMPAIGN}.inboxes[1]: must be a string"),
    (
        _edit('inbox = "sales-1"', 'inboxes = ["sales-1", "sales-1"]'),
        f"{CAMPAIGN}.inboxes[1]: 'sales-1' is already in the pool (inboxes[0])",
    ),
    (
        _edit('inbox = "sales-1"', 'inboxes = ["sales-1", "sales-9"]'),
        f"{CAMPAIGN}.inboxes[1]: 'sales-9' is not an inbox of workspace 'acme'",
    ),
    (
        lambda t: t.replace('inbox = "sales-1"', 'inboxes = ["sales-1", "other-inbox"]') + OTHER_WS,
        f"{CAMPAIGN}.inboxes[1]: 'other-inbox' is not an inbox of workspace 'acme' (it belongs to workspace "
        "'other': cross-workspace references are not allowed)",
    ),
    (
        lambda t: t + OTHER_WS.replace('"other-1"', '"acme-sales-1"'),
        "workspaces.other.inboxes.other-inbox.instance: instance 'acme-sales-1' is already used by inbox acme/sales-1",
    ),
]


@pytest.mark.parametrize(
    "mutate, message", BROKEN, ids=[m.split(": ")[0].split(".")[-1] + f"-{i}" for i, (_, m) in enumerate(BROKEN)]
)
def test_broken_file_changes_nothing_and_names_the_key(clean_db, mutate, message):
    apply_text(EXAMPLE.replace("daily_limit = 200", "daily_limit = 150"))  # an existing state to keep
    before = snapshot()
    with pytest.raises(ConfigFileError) as info:
        apply_text(mutate(EXAMPLE) + '\n[workspaces.newcomer]\ncolumns = ["A"]\n')
    assert any(message in e for e in info.value.errors), info.value.errors
    assert message.split(":")[0] in str(info.value) or len(info.value.errors) > 1
    assert snapshot() == before  # the valid newcomer workspace was not written either


def test_inboxes_can_swap_instances_in_one_file(clean_db):
    """Issue 23 item 4: swapping (or rotating) two inboxes' instances in one file was refused by
    the UNIQUE instance with a database message naming no key."""
    three = EXAMPLE + "".join(f'\n[workspaces.acme.inboxes.sales-{n}]\ninstance = "acme-sales-{n}"\n' for n in (2, 3))
    apply_text(three)
    swapped = (
        three.replace('"acme-sales-1"', '"tmp-a"')
        .replace('"acme-sales-2"', '"acme-sales-1"')
        .replace('"tmp-a"', '"acme-sales-2"')
    )
    summary = apply_text(swapped)
    assert sorted(summary.updated["inbox"]) == ["acme/sales-1", "acme/sales-2"]
    assert {i.name: i.instance_name for i in Inbox.select()} == {
        "sales-1": "acme-sales-2",
        "sales-2": "acme-sales-1",
        "sales-3": "acme-sales-3",
    }
    rotated = (
        three.replace('"acme-sales-1"', '"x1"')
        .replace('"acme-sales-2"', '"x2"')
        .replace('"acme-sales-3"', '"x3"')
        .replace('"x1"', '"acme-sales-2"')
        .replace('"x2"', '"acme-sales-3"')
        .replace('"x3"', '"acme-sales-1"')
    )
    apply_text(rotated)
    assert {i.name: i.instance_name for i in Inbox.select()} == {
        "sales-1": "acme-sales-2",
        "sales-2": "acme-sales-3",
        "sales-3": "acme-sales-1",
    }
    assert not apply_text(rotated).changed
    # a real clash is still named by key path, and nothing moves
    before = snapshot()
    with pytest.raises(ConfigFileError) as info:
        apply_text(rotated.replace('instance = "acme-sales-3"', 'instance = "acme-sales-2"'))
    assert (
        "workspaces.acme.inboxes.sales-2.instance: instance 'acme-sales-2' is already used by inbox "
        "acme/sales-1" in info.value.errors
    )
    assert snapshot() == before


def test_every_error_is_reported_at_once(clean_db):
    text = EXAMPLE.replace("daily_limit = 200", "daily_limit = 0").replace('"America/Sao_Paulo"', '"X/Y"')
    with pytest.raises(ConfigFileError) as info:
        apply_text(text)
    assert len(info.value.errors) == 2 and "(and 1 more error)" in str(info.value)


def test_unreadable_files(clean_db, tmp_path):
    binary = tmp_path / "x.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigFileError, match="not UTF-8 text"):
        apply_file(binary)
    with pytest.raises(ConfigFileError, match="cannot read"):
        apply_file(tmp_path / "missing.toml")
    with pytest.raises(ConfigFileError, match=r"^title: unknown key \(allowed: workspaces\) \(and 1 more error\)"):
        apply_text("title = 'x'")
    with pytest.raises(ConfigFileError, match=r"^workspaces: is required$"):
        apply_text("")


_value = st.one_of(
    st.integers(-5, 2000),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.booleans(),
    st.lists(st.text(max_size=5), max_size=3),
)


@hsettings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_toml_never_crashes(clean_db, data):
    """T-SEC-1: garbage or randomly damaged files give a ConfigFileError (or apply cleanly), nothing else."""
    kind = data.draw(st.sampled_from(["text", "line", "value"]))
    if kind == "text":
        text = data.draw(st.text(max_size=300))
    else:
        lines = EXAMPLE.splitlines()
        i = data.draw(st.integers(0, len(lines) - 1))
        if kind == "line":
            del lines[i]
        elif "=" in lines[i] and not lines[i].lstrip().startswith("#"):
            key = lines[i].split("=", 1)[0]
            v = data.draw(_value)
            lines[i] = key + "= " + (repr(v).replace("'", '"') if not isinstance(v, bool) else str(v).lower())
        text = "\n".join(lines)
    with contextlib.suppress(ConfigFileError):
        apply_text(text)
    with db.atomic():  # a rolled-back apply never leaves the connection in a broken transaction
        db.execute_sql("SELECT 1")


def _toml(value) -> str:
    """A TOML value (JSON's string escapes are TOML's; DEL must be escaped too)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return (
            "nan"
            if value != value
            else ("inf" if value == float("inf") else "-inf" if value == float("-inf") else repr(value))
        )
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)} = {_toml(v)}" for k, v in value.items()) + "}"
    return str(value)  # int, date, time


_TEXT = st.text(st.characters(blacklist_categories=["Cs"]), max_size=20)
_SCALAR = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-3, 3000),
    st.integers(2**31 - 3, 2**31 + 3),
    st.floats(),
    _TEXT,
    st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "x\n",
            "America/Sao_Paulo",
            "localtime",
            "Factory",
            "09:00",
            "24:00",
            "sales-1",
            "New",
            "mon",
            "{name!r}",
            "{{x}}",
            "a" * 300,
        ]
    ),
    st.booleans(),
    st.dates(),
    st.times(),
)
_VALUE = st.recursive(
    _SCALAR,
    lambda v: (
        st.lists(v, max_size=3)
        | st.dictionaries(
            st.sampled_from(["min", "max", "start", "end", "enabled", "max_parts", "x"]) | _TEXT, v, max_size=3
        )
    ),
    max_leaves=6,
)
_KEYS = (
    [(CAMPAIGN, k) for k in sorted(configfile._CAMPAIGN_KEYS)]
    + [("workspaces.acme.inboxes.sales-1", k) for k in sorted(configfile._INBOX_KEYS)]
    + [("workspaces.acme", "columns")]
)


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(_KEYS), value=_VALUE)
@example(key=("workspaces.acme.inboxes.sales-1", "max_per_hour"), value=2147483648)
@example(key=(CAMPAIGN, "system_prompt"), value="be nice\x00")
def test_any_toml_value_is_refused_by_key_path_or_applied(clean_db, key, value):
    """Issue 23 item 4 (T-SEC-1, R-OPS-1), as a property: whatever value a key gets, apply either
    writes it or refuses it with an error naming a key path; PostgreSQL never has to refuse it
    (its messages name no key) and nothing else escapes."""
    table, name = key
    header = "[" + table + "]"
    lines = (
        [ln for ln in EXAMPLE.splitlines() if not ln.startswith(name + " ")]
        if table != "workspaces.acme"
        else [ln for ln in EXAMPLE.splitlines() if not ln.startswith("columns ")]
    )
    text = "\n".join(lines).replace(header, f"{header}\n{name} = {_toml(value)}", 1)
    try:
        apply_text(text)
    except ConfigFileError as exc:
        for error in exc.errors:
            assert "rejected by the database" not in error, error
            assert error.startswith(("workspaces", "<text>: invalid TOML")), error
    with db.atomic():
        db.execute_sql("SELECT 1")


def test_parse_only_needs_no_database():
    specs = configfile.parse_text(EXAMPLE)
    assert specs[0].campaigns[0].weekdays == (0, 1, 2, 3, 4)
    assert specs[0].campaigns[0].path == CAMPAIGN


POOL_INBOX = """
[workspaces.acme.inboxes.sales-2]
instance = "acme-sales-2"
"""


def _pool_of(name: str) -> list[str]:
    rows = db.execute_sql(
        """SELECT i.name FROM campaign_config_inboxes p JOIN inboxes i ON i.id = p.inbox_id
             JOIN campaign_configs c ON c.id = p.config_id WHERE c.name = %s ORDER BY p.position""",
        (name,),
    ).fetchall()
    return [r[0] for r in rows]


def test_campaign_with_a_pool_of_inboxes(clean_db):
    """R-POOL-1: ``inboxes = [...]`` makes the pool, in order; applying the same file twice changes nothing."""
    text = EXAMPLE.replace('inbox = "sales-1"', 'inboxes = ["sales-2", "sales-1"]') + POOL_INBOX
    apply_text(text)
    assert _pool_of("first-touch") == ["sales-2", "sales-1"]
    cfg = CampaignConfig.get(name="first-touch")
    assert cfg.inbox.name == "sales-2" and cfg.version == 1  # the first member is the config's inbox
    before = snapshot()
    summary = apply_text(text)
    assert snapshot() == before
    assert summary.unchanged["campaign"] == ["acme/first-touch"]
    # reordering the pool is a change of the campaign (version + 1); back to one inbox, a pool of one
    apply_text(EXAMPLE.replace('inbox = "sales-1"', 'inboxes = ["sales-1", "sales-2"]') + POOL_INBOX)
    assert _pool_of("first-touch") == ["sales-1", "sales-2"]
    assert CampaignConfig.get(name="first-touch").version == 2
    apply_text(EXAMPLE + POOL_INBOX)
    assert _pool_of("first-touch") == ["sales-1"]
    assert CampaignConfig.get(name="first-touch").version == 3


def test_follow_up_keys_are_applied_and_default_to_no_wait_and_no_history(clean_db):
    """R-SEQ-1/2: ``min_days_in_column`` and ``history`` are stored; omitted, they are 0 (a first touch);
    changing one is a change of the campaign (version + 1)."""
    apply_text(EXAMPLE)
    c = CampaignConfig.get(name="first-touch")
    assert (c.min_days_in_column, c.history, c.skip_if_replied) == (0, 0, True)
    follow = EXAMPLE.replace(
        "active = true", "active = true\nmin_days_in_column = 3\nhistory = 6\nskip_if_replied = false"
    )
    summary = apply_text(follow)
    assert summary.updated["campaign"] == ["acme/first-touch (version 2)"]
    c = CampaignConfig.get(name="first-touch")
    assert (c.min_days_in_column, c.history, c.skip_if_replied) == (3, 6, False)
    assert apply_text(follow).changed is False
