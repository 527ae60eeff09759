"""docker-compose.yml and .env.example are the operator's interface (SPEC §4.7): checked here, since
no Docker engine runs in CI."""

from __future__ import annotations

import dataclasses
import re

import yaml

from campaign.settings import Settings
from tests import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
ENV_EXAMPLE = (ROOT / ".env.example").read_text()
README = (ROOT / "README.md").read_text()


def _env_names() -> set[str]:
    return {m.group(1) for m in re.finditer(r"^([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE, re.M)}


def test_every_setting_is_in_env_example_and_readme():
    """SPEC §4.7: `.env.example` lists every variable; the README's settings table too."""
    names = {f.metadata["env"] for f in dataclasses.fields(Settings)}
    missing_env = sorted(names - _env_names())
    missing_readme = sorted(n for n in names if f"`{n}`" not in README)
    assert not missing_env, f".env.example lacks {missing_env}"
    assert not missing_readme, f"README's settings table lacks {missing_readme}"


def test_every_process_the_operator_runs_is_a_compose_service():
    """scheduler, workers, webhook, inbound consumer: each a service whose entry file exists."""
    services = COMPOSE["services"]
    commands = {name: svc.get("command") for name, svc in services.items()}
    for entry in ("scheduler.py", "webhook.py", "inbound.py"):
        assert any(cmd and entry in cmd for cmd in commands.values()), f"no compose service runs {entry}"
        assert (ROOT / entry).is_file()
    assert any(cmd and cmd[:2] == ["dramatiq", "actors"] for cmd in commands.values())


def test_the_inbound_consumer_gets_the_events_broker():
    """R-IN-1: the inbound service is told where Evolution publishes (it refuses to start without)."""
    env = COMPOSE["services"]["inbound"]["environment"]
    assert "EVOLUTION_EVENTS_RABBITMQ_URL" in env and "rabbitmq:5672" in env["EVOLUTION_EVENTS_RABBITMQ_URL"]
    assert env["DATABASE_URL"].startswith("postgresql://")


def test_compose_variables_are_documented():
    """Every ${VAR} compose reads from .env is listed in .env.example."""
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", text))
    assert not sorted(used - _env_names()), f"compose reads undocumented {sorted(used - _env_names())}"
