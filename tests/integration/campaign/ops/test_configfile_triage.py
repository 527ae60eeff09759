"""``apply`` of a campaign's ``triage`` table (SPEC R-IN-5, §4.8, E-20): validated with the key path
of what is wrong, written with its intent -> column map, idempotent, updated in place."""

from __future__ import annotations

import pytest

from campaign.db import db
from campaign.ops.configfile import ConfigFileError, apply_text
from models import CampaignConfig, CampaignTriageColumn

BASE = """
[workspaces.acme]
columns = ["New", "Contacted", "Replied", "Lost", "Hot"]

[workspaces.acme.inboxes.sales-1]
instance = "acme-sales-1"

[workspaces.other]
columns = ["Elsewhere"]

[workspaces.acme.campaigns.first-touch]
inbox = "sales-1"
source_column = "New"
target_column = "Contacted"
reply_column = "Replied"
daily_limit = 10
gap_seconds = { min = 1, max = 2 }
model = "openai/gpt-4o-mini"
system_prompt = "Be brief."
"""
PATH = "workspaces.acme.campaigns.first-touch.triage"


def _apply(triage: str):
    return apply_text(BASE + f"triage = {triage}\n")


def _mapping() -> dict[str, str]:
    rows = CampaignTriageColumn.select().join(CampaignConfig).where(CampaignConfig.name == "first-touch")
    return {r.intent: r.column.name for r in rows}


def test_triage_applies_with_its_columns_and_is_idempotent(clean_db):
    """R-IN-5: enabled, model and the intent -> column map are written; the same file twice changes
    nothing; a changed map updates the campaign in place (version + 1)."""
    triage = '{ enabled = true, model = "openai/gpt-4o", columns = { interested = "Hot", not_interested = "Lost" } }'
    _apply(triage)
    c = CampaignConfig.get(name="first-touch")
    assert (c.triage_enabled, c.triage_model, c.version) == (True, "openai/gpt-4o", 1)
    assert _mapping() == {"interested": "Hot", "not_interested": "Lost"}
    again = _apply(triage)
    assert again.unchanged.get("campaign") == ["acme/first-touch"]
    changed = _apply('{ enabled = true, columns = { opt_out = "Lost" } }')
    assert changed.updated.get("campaign") == ["acme/first-touch (version 2)"]
    c = CampaignConfig.get(name="first-touch")
    assert (c.triage_enabled, c.triage_model) == (True, None)
    assert _mapping() == {"opt_out": "Lost"}
    _apply("{ enabled = false }")
    assert not CampaignConfig.get(name="first-touch").triage_enabled and _mapping() == {}


def test_a_campaign_without_triage_has_it_off(clean_db):
    apply_text(BASE)
    assert not CampaignConfig.get(name="first-touch").triage_enabled


@pytest.mark.parametrize(
    ("triage", "error"),
    [
        ("{ columns = {} }", f"{PATH}.enabled: is required"),
        ('{ enabled = "yes" }', f"{PATH}.enabled: must be true or false, got a string"),
        ('{ enabled = true, colour = "red" }', f"{PATH}.colour: unknown key (allowed: columns, enabled, model)"),
        (
            '{ enabled = true, columns = { maybe = "Hot" } }',
            f"{PATH}.columns.maybe: unknown intent 'maybe' (one of: interested, not_interested, opt_out, question, "
            "out_of_office, other)",
        ),
        (
            "{ enabled = true, columns = { interested = 3 } }",
            f"{PATH}.columns.interested: must be a string, got an integer",
        ),
        (
            '{ enabled = true, columns = ["Hot"] }',
            f'{PATH}.columns: must be a table of intent = "Column", got an array',
        ),
        ('{ enabled = true, model = "" }', f"{PATH}.model: must not be empty"),
        ("true", f"{PATH}: must be a table, got a boolean"),
        (
            '{ enabled = true, columns = { question = "Nowhere" } }',
            f"{PATH}.columns.question: 'Nowhere' is not a column of workspace 'acme'",
        ),
        (
            '{ enabled = true, columns = { question = "Elsewhere" } }',
            f"{PATH}.columns.question: 'Elsewhere' is not a column of workspace 'acme' (it belongs to workspace "
            "'other': cross-workspace references are not allowed)",
        ),
    ],
)
def test_bad_triage_is_refused_naming_the_key(clean_db, triage, error):
    """§4.8 / E-20: every mistake names its key path; nothing is written."""
    with pytest.raises(ConfigFileError) as info:
        _apply(triage)
    assert error in info.value.errors, info.value.errors
    assert db.execute_sql("SELECT count(*) FROM campaign_configs").fetchone() == (0,)


def test_the_schema_refuses_a_column_of_another_workspace(clean_db):
    """E-20 in PostgreSQL itself: a triage column of another workspace cannot be written."""
    import peewee

    apply_text(BASE + 'triage = { enabled = true, columns = { interested = "Hot" } }\n')
    other = db.execute_sql(
        "SELECT c.id FROM columns c JOIN workspaces w ON w.id = c.workspace_id WHERE w.name = 'other'"
    ).fetchone()[0]
    with pytest.raises(peewee.IntegrityError), db.atomic():
        db.execute_sql("UPDATE campaign_triage_columns SET column_id = %s", (other,))
