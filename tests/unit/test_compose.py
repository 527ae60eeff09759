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


def test_cluster_profile_is_three_clustered_nodes_the_engine_can_use():
    """R-SCALE-1/2: `docker compose --profile cluster up` adds two RabbitMQ nodes that join the
    first by classic_config peer discovery (the mechanism devtools/rabbit_cluster.py runs for real
    in T-REL-3), all with the same Erlang cookie; the engine waits for them and reads its
    multi-node URL from RABBITMQ_CLUSTER_URL."""
    services = COMPOSE["services"]
    nodes = {name: svc for name, svc in services.items() if name.startswith("rabbitmq")}
    assert sorted(nodes) == ["rabbitmq", "rabbitmq-2", "rabbitmq-3"]
    assert "profiles" not in nodes["rabbitmq"], "the first node is the default single node"
    hostnames = set()
    for name, svc in nodes.items():
        assert svc["hostname"] == name
        hostnames.add(svc["hostname"])
        assert svc["image"] == nodes["rabbitmq"]["image"], f"{name} runs another RabbitMQ version"
        assert svc["environment"]["RABBITMQ_ERLANG_COOKIE"].startswith("${RABBITMQ_ERLANG_COOKIE:?")
        if name != "rabbitmq":
            assert svc["profiles"] == ["cluster"]
            assert svc["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
            data = [v for v in svc["volumes"] if v.endswith(":/var/lib/rabbitmq")]
            assert len(data) == 1 and data[0].split(":")[0] != "mqdata", f"{name} shares a data volume"
            mount = next(v for v in svc["volumes"] if "cluster.conf" in v)
            assert (ROOT / mount.split(":")[0]).is_file() and mount.split(":")[1].startswith("/etc/rabbitmq/conf.d/")

    conf = (ROOT / "rabbitmq" / "cluster.conf").read_text()
    peers = set(re.findall(r"^cluster_formation\.classic_config\.nodes\.\d+ = rabbit@(\S+)$", conf, re.M))
    assert peers == hostnames
    assert "cluster_formation.peer_discovery_backend = classic_config" in conf
    devtools = (ROOT / "devtools" / "rabbit_cluster.py").read_text()
    assert "cluster_formation.peer_discovery_backend = classic_config" in devtools

    for name in ("worker", "scheduler", "inbound"):
        deps = services[name]["depends_on"]
        assert deps["rabbitmq-2"] == {"condition": "service_healthy", "required": False}
        assert deps["rabbitmq-3"] == {"condition": "service_healthy", "required": False}
    url = services["worker"]["environment"]["RABBITMQ_URL"]
    assert url.startswith("${RABBITMQ_CLUSTER_URL:-amqp://") and "@rabbitmq:5672/%2F" in url
    example = re.search(r"^# RABBITMQ_CLUSTER_URL=(\S+)$", ENV_EXAMPLE, re.M)
    assert example and [u.split("@")[1].split("/")[0] for u in example.group(1).split(";")] == [
        "rabbitmq:5672",
        "rabbitmq-2:5672",
        "rabbitmq-3:5672",
    ]
    assert "--profile cluster" in README
