"""The suite's world, made through the operator paths: a TOML config applied with
``configfile.apply_text`` and one CSV of leads per campaign imported with ``leads_import``."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

log = logging.getLogger(__name__)

CITIES = ("Recife", "Salvador", "Curitiba", "Manaus", "Belém", "Natal", "Goiânia", "Campinas")
COMPANIES = ("ACME", "Padaria Sol", "Oficina Rápida", "Loja Azul", "Clínica Vida", "Agro Norte")


@dataclass(frozen=True)
class CampaignPlan:
    """One campaign of the world: where its leads sit and how many."""

    workspace: str
    name: str
    inbox: str
    instance: str
    source_column: str
    leads: int
    split: bool
    max_parts: int = 3
    #: parts sent back to back (part gap 0): the send actor sends them in one delivery
    zero_part_gap: bool = False

    @property
    def label(self) -> str:
        """``workspace/campaign`` as the CLI names it."""
        return f"{self.workspace}/{self.name}"


@dataclass(frozen=True)
class WorldPlan:
    """Everything the suite creates before the engine starts."""

    campaigns: tuple[CampaignPlan, ...]
    toml: str
    inbox_min_gap: float

    @property
    def total_leads(self) -> int:
        """Leads over every campaign (= messages the runs should hold)."""
        return sum(c.leads for c in self.campaigns)

    @property
    def instances(self) -> list[str]:
        """Evolution instance names of every inbox."""
        return sorted({c.instance for c in self.campaigns})


def plan_world(
    rng: random.Random,
    *,
    messages: int,
    campaigns: int,
    inboxes: int,
    gap: tuple[float, float],
    part_gap: tuple[float, float],
    inbox_min_gap: float,
    tag: str,
) -> WorldPlan:
    """Lay out ``campaigns`` campaigns over ``inboxes`` inboxes in two workspaces.

    Campaigns 3, 7, ... do not split (1 part), campaigns 1, 5, ... split into at most 2 parts, the
    others into at most 3: the run has messages of 1, 2 and 3 parts. Campaigns 0, 4, ... (up
    to 3 parts) send their parts back to back (part gap 0: one send delivery carries them), the
    others at ``part_gap``.

    Campaign k uses inbox k % inboxes, so with more campaigns than inboxes some inboxes serve two
    campaigns (their pacing is shared, R-RATE-1); every campaign has its own source column.
    """
    if campaigns < 1 or inboxes < 1 or messages < campaigns:
        raise ValueError(f"need messages >= campaigns >= 1 and inboxes >= 1 (got {messages}, {campaigns}, {inboxes})")
    workspaces = [f"chaos-{tag}-a", f"chaos-{tag}-b"]
    inbox_ws = {i: workspaces[i % 2] for i in range(inboxes)}
    # campaign k lives in the workspace of its inbox
    base, extra = divmod(messages, campaigns)
    plans: list[CampaignPlan] = []
    for k in range(campaigns):
        i = k % inboxes
        ws = inbox_ws[i]
        plans.append(
            CampaignPlan(
                ws,
                f"camp-{k}",
                f"inbox-{i}",
                f"{ws}-inbox-{i}",
                f"src-{k}",
                base + (1 if k < extra else 0),
                split=(k % 4 != 3),
                max_parts=2 if k % 4 == 1 else 3,
                zero_part_gap=(k % 4 == 0),
            )
        )
    lines: list[str] = []
    for ws in workspaces:
        cols = [c.source_column for c in plans if c.workspace == ws] + ["Contacted"]
        lines.append(f"[workspaces.{ws}]")
        lines.append("columns = [" + ", ".join(f'"{c}"' for c in cols) + "]")
        lines.append("")
        for i, iws in inbox_ws.items():
            if iws != ws:
                continue
            lines += [
                f"[workspaces.{ws}.inboxes.inbox-{i}]",
                f'instance = "{ws}-inbox-{i}"',
                f"min_gap_seconds = {inbox_min_gap}",
                "",
            ]
        for c in plans:
            if c.workspace != ws:
                continue
            lines += [
                f"[workspaces.{ws}.campaigns.{c.name}]",
                f'inbox = "{c.inbox}"',
                f'source_column = "{c.source_column}"',
                'target_column = "Contacted"',
                "# no window and no weekdays: always open, so the scheduler plans it at once",
                f"daily_limit = {c.leads + 10}",
                f"gap_seconds = {{ min = {gap[0]}, max = {gap[1]} }}",
                "part_gap_seconds = "
                + ("{ min = 0, max = 0 }" if c.zero_part_gap else f"{{ min = {part_gap[0]}, max = {part_gap[1]} }}"),
                'model = "sandbox/chaos"',
                'system_prompt = "You write short, friendly first-contact WhatsApp messages in Portuguese."',
                'fallback_template = "Olá {name}, tudo bem? Aqui é da {company}."',
                f"split = {{ enabled = {'true' if c.split else 'false'}, max_parts = {c.max_parts} }}",
                "active = true",
                "",
            ]
    return WorldPlan(tuple(plans), "\n".join(lines), inbox_min_gap)


def leads_csv(rng: random.Random, plan: CampaignPlan, first_number: int) -> str:
    """CSV (name, phone, city, company) of ``plan.leads`` leads with distinct valid BR mobile numbers."""
    rows = ["name,phone,city,company"]
    for j in range(plan.leads):
        n = first_number + j
        rows.append(
            f"Lead {plan.name} {j},+55 11 9{n // 10000:04d}-{n % 10000:04d},"
            f"{rng.choice(CITIES)},{rng.choice(COMPANIES)}"
        )
    return "\n".join(rows) + "\n"


def build_world(plan: WorldPlan, rng: random.Random) -> dict[str, int]:
    """Apply the config and import every campaign's leads (the db must be bound); returns leads per campaign."""
    from campaign.ops import configfile, leads_import

    summary = configfile.apply_text(plan.toml, source="chaos.toml")
    log.info("config applied: %s", "; ".join(summary.lines()))
    imported: dict[str, int] = {}
    next_number = 10_000_000 + rng.randrange(0, 1000) * 10_000
    for c in plan.campaigns:
        report = leads_import.import_text(
            leads_csv(rng, c, next_number), workspace=c.workspace, column=c.source_column, source=f"{c.label}.csv"
        )
        if report.errors or report.imported != c.leads:
            raise RuntimeError(
                f"lead import of {c.label} imported {report.imported} of {c.leads}: "
                f"{[str(e) for e in report.errors[:3]]}"
            )
        imported[c.label] = report.imported
        next_number += c.leads
    return imported
