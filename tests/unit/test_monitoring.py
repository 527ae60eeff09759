"""R-OBS-2: the monitoring profile's files (Prometheus scrape config, alert rules, Grafana
provisioning and dashboard) parse and name only metrics the code defines; no service needed.

Compose cannot run here, so these files are checked the way Prometheus and Grafana would read them
(YAML / JSON) and against the code: a renamed metric breaks this test, not a silent dashboard.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import dramatiq.middleware.prometheus as dramatiq_prometheus
import pytest
import yaml

from campaign import metrics
from campaign.errors import ConfigError
from campaign.settings import Settings

ROOT = Path(__file__).resolve().parents[2]  # the repository
MON = ROOT / "monitoring"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())

#: PromQL words that look like metric names but are not
PROMQL_WORDS = {"sum", "max", "min", "by", "rate", "delta", "time", "absent", "or", "and", "histogram_quantile"}


def _dramatiq_names() -> set[str]:
    """The sample names Dramatiq's Prometheus middleware exports (read from its source)."""
    source = Path(dramatiq_prometheus.__file__).read_text()
    names: set[str] = set()
    for kind, name in re.findall(r"prom\.(Counter|Gauge|Histogram)\(\s*\"(dramatiq_[a-z_]+)\"", source):
        if kind == "Counter":
            names.add(name if name.endswith("_total") else name + "_total")
        elif kind == "Histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


KNOWN = metrics.metric_names() | _dramatiq_names() | {"up"}


def _metric_refs(expr: str) -> set[str]:
    return {
        w
        for w in re.findall(r"\b[a-z_][a-z0-9_]*\b(?=\s*[{\[)\s]|$)", expr)
        if w.startswith(("campaign_", "dramatiq_"))
    }


def _rules() -> list[dict]:
    doc = yaml.safe_load((MON / "prometheus/rules/campaign.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    doc = json.loads((MON / "grafana/dashboards/campaign-engine.json").read_text())
    return [t["expr"] for p in doc["panels"] for t in p["targets"]]


def test_dramatiq_middleware_metrics_are_found():
    """The check below is only as good as this list: Dramatiq's counters and histogram are read."""
    assert {"dramatiq_messages_total", "dramatiq_message_duration_milliseconds_bucket"} <= _dramatiq_names()


def test_every_alert_rule_names_defined_metrics_and_covers_r_ops_4():
    """R-OBS-2: one Prometheus rule per R-OPS-4 alert, each on metrics the code exports."""
    rules = _rules()
    covered = {r["labels"].get("r_ops_4") for r in rules}
    assert set(metrics.ALERT_KINDS) <= covered, f"R-OPS-4 alerts without a rule: {set(metrics.ALERT_KINDS) - covered}"
    for rule in rules:
        refs = _metric_refs(rule["expr"])
        assert refs, f"rule {rule['alert']} names no engine metric: {rule['expr']}"
        assert refs <= KNOWN, f"rule {rule['alert']} names unknown metrics {sorted(refs - KNOWN)}"
        assert rule["annotations"]["summary"]


def test_every_dashboard_query_names_defined_metrics():
    """R-OBS-2: the provisioned dashboard's panels (throughput, outcomes, in doubt, dead letters,
    queue depths, per-inbox pacing and health, replies) query metrics that exist."""
    exprs = _dashboard_exprs()
    assert len(exprs) >= 10
    for expr in exprs:
        refs = _metric_refs(expr)
        assert refs and refs <= KNOWN, f"dashboard query {expr!r} names unknown metrics {sorted(refs - KNOWN)}"
    used = set().union(*map(_metric_refs, exprs))
    for needed in ("campaign_messages", "campaign_message_parts", "campaign_dead_letters", "campaign_queue_messages"):
        assert needed in used
    assert {"campaign_inbox_parts_sent_last_hour", "campaign_inbox_connection_state", "campaign_inbound_events"} <= used


def test_a_misspelt_metric_is_caught():
    """The name check can fail: a query naming a metric nobody exports is refused."""
    assert not _metric_refs("sum(campaign_mesages)") <= KNOWN


def test_prometheus_scrapes_every_engine_process_and_loads_the_rules():
    doc = yaml.safe_load((MON / "prometheus/prometheus.yml").read_text())
    assert doc["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    targets = {c["job_name"]: (sd["names"], sd["port"]) for c in doc["scrape_configs"] for sd in c["dns_sd_configs"]}
    env = COMPOSE["x-engine"]["environment"]
    port = int(env["METRICS_PORT"])
    assert targets == {
        "scheduler": (["scheduler"], port),
        "webhook": (["webhook"], port),
        "inbound": (["inbound"], port),
        "worker": (["worker"], int(env["dramatiq_prom_port"])),
    }
    for job in targets:
        assert job in COMPOSE["services"], f"scrape job {job} has no compose service"


def test_the_monitoring_profile_mounts_the_files():
    """`docker compose --profile monitoring up` adds Prometheus and Grafana with the repo's files."""
    services = COMPOSE["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for volume in services[name]["volumes"]:
            host = volume.split(":")[0]
            if host.startswith("./"):
                assert (ROOT / host).exists(), f"{name} mounts missing {host}"
    provider = yaml.safe_load((MON / "grafana/provisioning/dashboards/campaign.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    source = yaml.safe_load((MON / "grafana/provisioning/datasources/prometheus.yml").read_text())
    dash = json.loads((MON / "grafana/dashboards/campaign-engine.json").read_text())
    uid = source["datasources"][0]["uid"]
    assert all(p["datasource"]["uid"] == uid for p in dash["panels"])


def test_readme_documents_every_metric():
    """Every campaign_* metric and its labels appear in the README's Metrics section."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Metrics") :]
    missing = sorted(n for n in metrics.metric_names() if f"`{n}`" not in section)
    assert not missing, f"README's Metrics section lacks {missing}"


def test_metrics_port_is_validated():
    """R-OBS-1 / §4.7: a bad METRICS_PORT names the variable; unset means no metrics server."""
    assert Settings.from_env({}).metrics_port is None
    assert Settings.from_env({"METRICS_PORT": "9300"}).metrics_port == 9300
    with pytest.raises(ConfigError, match="METRICS_PORT"):
        Settings.from_env({"METRICS_PORT": "70000"})


def test_workers_do_not_import_prometheus_client_before_boot():
    """Dramatiq's middleware picks multiprocess mode when prometheus_client is first imported, after
    process boot: importing the actors (what a worker does first) must not import it earlier."""
    code = "import sys, actors; print('prometheus_client' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "BROKER": "stub"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip().splitlines()[-1:] == ["False"], out.stderr[-2000:]


PROMTOOL = ROOT / ".venv" / "bin" / "promtool"


def _promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    assert PROMTOOL.exists(), f"{PROMTOOL} is missing: `make test` puts it there (scripts/promtool.sh)"
    return subprocess.run([str(PROMTOOL), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_rules_and_the_scrape_config(tmp_path):
    """Prometheus's own checker reads the rules and the config exactly as the server would."""
    done = _promtool("check", "rules", str(MON / "prometheus" / "rules" / "campaign.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    # the config names its rules by their path inside the container: point it at the repository's
    config = (MON / "prometheus" / "prometheus.yml").read_text()
    assert "/etc/prometheus/rules/*.yml" in config
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "campaign.yml").write_text((MON / "prometheus" / "rules" / "campaign.yml").read_text())
    (tmp_path / "prometheus.yml").write_text(config.replace("/etc/prometheus/rules/", f"{tmp_path}/rules/"))
    done = _promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout + done.stderr


def test_each_alert_fires_on_its_series_after_its_for_and_not_before():
    """promtool's rule unit tests (monitoring/prometheus/tests/rules_test.yml): every alert of
    the rules file is exercised, with its labels and rendered annotations."""
    tests = yaml.safe_load((MON / "prometheus" / "tests" / "rules_test.yml").read_text())
    rules = yaml.safe_load((MON / "prometheus" / "rules" / "campaign.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    fired = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"] if case.get("exp_alerts")}
    assert fired == alerts, f"alerts without a firing test: {sorted(alerts - fired)}"
    assert sorted(p.name for p in (MON / "prometheus" / "rules").iterdir()) == ["campaign.yml"]  # all loaded
    done = _promtool("test", "rules", "rules_test.yml", cwd=MON / "prometheus" / "tests")
    assert done.returncode == 0, done.stdout + done.stderr
