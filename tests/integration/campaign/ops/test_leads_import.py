"""``import-leads``: CSV rows -> leads, E.164 phones, line-numbered rejects, bulk upsert (R-OPS-1, E-18, T-SEC-1)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from campaign.db import db
from campaign.ops.leads_import import LeadImportError, import_bytes, import_file, import_text
from models import Lead
from tests import ROOT
from tests.integration import factories as f


@pytest.fixture
def acme(clean_db):
    ws, cols = f.workspace("acme")
    return ws, cols


def leads_by_phone() -> dict[str, Lead]:
    return {lead.phone: lead for lead in Lead.select()}


def test_example_csv(acme):
    ws, cols = acme
    report = import_file(ROOT / "examples" / "leads.csv", workspace="acme", column="New")
    assert (report.inserted, report.updated, report.unchanged) == (17, 0, 0)
    assert [(e.line, e.reason) for e in report.errors] == [
        (19, "missing phone"),
        (20, "invalid phone '12345': not a valid number for its country"),
        (21, "duplicate phone +5511912345601 (first seen on line 2)"),
        (22, "missing name"),
    ]
    leads = leads_by_phone()
    assert len(leads) == 17
    ana = leads["+5511912345601"]
    assert ana.name == "Ana Souza" and ana.column_id == cols["New"].id and ana.workspace_id == ws.id
    assert ana.custom_fields == {"company": "Padaria Central", "city": "São Paulo"}
    assert leads["+12125550117"].name == "Renata Carvalho"  # +country kept
    assert leads["+5521912345605"].custom_fields == {"city": "Niterói"}  # empty cells are not fields


def test_reimport_updates_instead_of_duplicating(acme):
    ws, cols = acme
    import_text("name,phone,city\nAna,+5511912345601,Recife\nBia,11912345602,Natal\n", workspace="acme", column="New")
    ana = Lead.get(phone="+5511912345601")
    ana.column = cols["Contacted"]  # progressed meanwhile: a re-import must not pull it back into New
    ana.custom_fields = {"city": "Recife", "score": "9"}
    ana.save()
    orphan = Lead.get(phone="+5511912345602")
    orphan.column = None  # its column was deleted
    orphan.save()
    report = import_text(
        "name,phone,city\nAna Maria,(11) 91234-5601,Olinda\nBia,11912345602,Natal\nCaio,11912345603,\n",
        workspace="acme",
        column="New",
    )
    assert (report.inserted, report.updated, report.unchanged, report.errors) == (1, 2, 0, [])
    assert Lead.select().count() == 3
    ana = Lead.get(phone="+5511912345601")
    assert ana.name == "Ana Maria" and ana.column_id == cols["Contacted"].id
    assert ana.custom_fields == {"city": "Olinda", "score": "9"}  # merged, file wins
    assert Lead.get(phone="+5511912345602").column_id == cols["New"].id
    again = import_text("name,phone,city\nAna Maria,(11) 91234-5601,Olinda\n", workspace="acme", column="New")
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 1)


def test_one_bulk_upsert_for_many_rows(acme):
    rows = "\n".join(f"Lead {i},+55219{i:08d}" for i in range(1, 501))
    with f.recorded_sql() as seen:
        report = import_text("name,phone\n" + rows, workspace="acme", column="New")
    assert report.inserted == 500
    assert len([s for s in seen if "INSERT INTO leads" in s]) == 1


def test_same_phone_in_another_workspace_is_another_lead(acme):
    f.workspace("other")
    import_text("name,phone\nAna,+5511912345601\n", workspace="acme", column="New")
    import_text("name,phone\nAna B,+5511912345601\n", workspace="other", column="New")
    assert sorted(lead.name for lead in Lead.select()) == ["Ana", "Ana B"]


def test_line_numbers_count_multiline_fields_and_blank_lines(acme):
    text = (
        "name,phone,notes\n"
        'Ana,+5511912345601,"two\nlines"\n'
        "\n"
        "Bad,999,x\n"
        "Extra,+5511912345602,a,b\n"
        "Zé,+5511912345603,ok\n"
    )
    report = import_text(text, workspace="acme", column="New")
    assert [(e.line, e.reason.split(":")[0]) for e in report.errors] == [
        (5, "invalid phone '999'"),
        (6, "has 4 fields, the header has 3"),
    ]
    assert report.inserted == 2
    assert Lead.get(phone="+5511912345601").custom_fields == {"notes": "two\nlines"}


def test_region_option(acme):
    report = import_text("name,phone\nJo,(212) 555-0117\n", workspace="acme", column="New", region="us")
    assert report.inserted == 1 and Lead.get().phone == "+12125550117"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary data"),
        ("name,phone\nJosé,+5511912345601\n".encode("latin-1"), "not UTF-8 text (byte 0xe9"),
        (b"", "empty file"),
        (b"Ana,+5511912345601\n", "the header must have 'name' and 'phone' columns (missing name, phone"),
        (b"name,telefone\nAna,+5511912345601\n", "missing phone"),
        (b"name,phone,name\nAna,+5511912345601,x\n", "header column 'name' appears twice"),
        (b'"name,phone\nAna,+5511912345601\n', "line 1: unreadable CSV header"),
    ],
)
def test_broken_files_import_nothing(acme, content, message):
    f.lead(acme[0], acme[1]["New"], phone="+5511999999999")
    with pytest.raises(LeadImportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_bytes(content, workspace="acme", column="New")
    assert Lead.select().count() == 1


def test_damaged_rows_are_reported_by_line_and_good_rows_import(acme):
    """Issue 23 item 6 (R-OPS-1): a stray quote, an unterminated quote or a cell over the field
    limit used to reject the whole file; now that row is reported by its line and the rest import."""
    text = (
        "name,phone,notes\n"
        'Ana,+5511912345601,"two\nlines"\n'  # 2-3: a legit multi-line cell
        '"Bia"x,+5511912345602,stray\n'  # 4: stray quote
        "Caio,+5511912345603,ok\n"  # 5
        'Duda,"+5511912345604,unterminated\n'  # 6: a quote never closed
        "Edu,+5511912345605,ok\n"  # 7
        f"Fabi,+5511912345606,{'x' * 150_000}\n"  # 8: past the csv module's own limit
        f"Gil,+5511912345607,{'y' * 10_001}\n"  # 9: past MAX_FIELD_LENGTH
        "Hugo,+5511912345608,ok\n"  # 10
        '"Ivo,+5511912345609,last one, never closed'
    )  # 11: quote open at the end
    report = import_text(text, workspace="acme", column="New")
    assert [(e.line, e.reason.split(" (")[0].split(":")[0]) for e in report.errors] == [
        (4, "stray quote"),
        (6, "a field is longer than 10000 characters"),
        (8, "a field is longer than 10000 characters"),
        (9, "a field is longer than 10000 characters"),
        (11, "a quoted field is never closed"),
    ]
    assert sorted(leads_by_phone()) == ["+5511912345601", "+5511912345603", "+5511912345605", "+5511912345608"]
    assert Lead.get(phone="+5511912345601").custom_fields == {"notes": "two\nlines"}


_PLAIN = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters='",'), min_size=1, max_size=12
).filter(str.strip)
_DAMAGE = {
    "stray quote": lambda name, phone: f'"{name}"x,{phone},x',
    "never closed": lambda name, phone: f'"{name},{phone},x',
    "over the limit": lambda name, phone: f"{name},{phone}," + "z" * 10_001,
}


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.tuples(st.sampled_from([None, *_DAMAGE]), _PLAIN, _PLAIN), min_size=1, max_size=25),
    crlf=st.booleans(),
)
def test_fuzzed_rows_good_ones_import_bad_ones_are_reported_by_line(acme, rows, crlf):
    """Issue 23 item 6 (R-OPS-1, T-SEC-1), as a property: in any mix of good and damaged rows,
    exactly the damaged rows are reported, each by its own line, and every good row imports."""
    lines, good, bad_lines = ["name,phone,note"], set(), []
    for i, (damage, name, note) in enumerate(rows):
        phone = f"+5511912345{i:03d}"
        if damage is None:
            lines.append(f"{name},{phone},{note}")
            good.add(phone)
        else:
            lines.append(_DAMAGE[damage](name, phone))
            bad_lines.append(i + 2)
    text = ("\r\n" if crlf else "\n").join(lines) + "\n"
    report = import_text(text, workspace="acme", column="New")
    assert [e.line for e in report.errors] == bad_lines, report.errors
    assert report.imported == len(good)
    assert good <= set(leads_by_phone())


@pytest.mark.parametrize(
    "workspace, column, region, message",
    [
        ("nope", "New", "BR", "workspace 'nope' does not exist"),
        ("acme", "Nope", "BR", "column 'Nope' is not a column of workspace 'acme' (columns: New, Contacted, Replied)"),
        ("acme", "New", "XX", "--region 'XX' is not a phone region code"),
    ],
)
def test_bad_target(acme, workspace, column, region, message):
    with pytest.raises(LeadImportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_text("name,phone\nAna,+5511912345601\n", workspace=workspace, column=column, region=region)
    assert Lead.select().count() == 0


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=400),
        st.text(max_size=400).map(lambda t: ("name,phone,x\n" + t).encode("utf-8")),
        st.lists(st.tuples(st.text(max_size=10), st.text("0123456789+() -", max_size=16)), max_size=20).map(
            lambda rows: ("name,phone\n" + "\n".join(f'"{a.replace(chr(34), "")}",{b}' for a, b in rows)).encode(
                "utf-8"
            )
        ),
    )
)
def test_fuzzed_csv_gives_clear_errors_and_loses_nothing(acme, raw):
    """T-SEC-1: any bytes -> a LeadImportError or a report; the existing lead is never lost or damaged."""
    ws, cols = acme
    keep = Lead.get_or_none(phone="+5511900000001") or f.lead(ws, cols["New"], name="Keep", phone="+5511900000001")
    try:
        report = import_bytes(raw, workspace="acme", column="New")
    except LeadImportError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
    else:
        assert report.imported + len(report.errors) >= 0
        assert all(e.line >= 2 for e in report.errors)
    survivor = Lead.get_by_id(keep.id)
    assert survivor.phone == "+5511900000001" and survivor.column_id == cols["New"].id
    assert not db.in_transaction()
