"""Structured logs on a full run (SPEC R-OPS-6, T-SEC-1): real worker processes, the scheduler and the CLI
on real services; every step line carries its ids and no line carries a secret. Redaction and
formatting themselves: tests/unit/campaign/test_logs.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from urllib.parse import urlsplit, urlunsplit

from campaign.db import db
from campaign.settings import get_settings
from devtools.services import purge_queues, sandbox_env, start_worker, stop_worker
from tests import ROOT
from tests.integration import factories as f
from tests.integration.pipeline_helpers import assert_counters_match, make_world
from tests.integration.workers import wait_for


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username or 'postgres'}:{password}@{parts.hostname}:{parts.port or 5432}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


STEP_LINE = re.compile(r"logger=steps .*msg=\"step (done|retry|failed)")


def test_full_run_logs_have_ids_and_never_a_secret(clean_db, tmp_path):
    import actors
    from sandbox.testing import SandboxProcess

    chat_key = f"sk-or-v1-{uuid.uuid4().hex}"
    evo_key = f"evo-{uuid.uuid4().hex}"
    hook_secret = f"whsec-{uuid.uuid4().hex}"
    # trust auth ignores the password, so it can be planted in the URL and looked for afterwards
    db_password = f"dbpw-{uuid.uuid4().hex[:12]}"
    settings = get_settings()
    faults = {
        "chat": {"rate_429": 0.2, "retry_after": 0.1},
        "send": {"rate_500": 0.15},
        "invalid_numbers": ["5511900000099"],
    }
    w = make_world("logs", n_inboxes=2, split=True, max_parts=3)
    w.add_leads(10, inbox=w.inboxes[0])
    w.add_leads(10, inbox=w.inboxes[1])
    bad = f.lead(w.ws, w.cols["New"], phone="+5511900000099")
    f.message(w.run, bad)
    db.execute_sql("UPDATE campaign_runs SET leads_total = leads_total + 1 WHERE id = %s", (w.run.id,))

    queues = tuple(sorted(actors.broker.get_declared_queues()))
    purge_queues(settings.rabbitmq_url, queues)
    worker_log, sched_log = tmp_path / "worker.log", tmp_path / "scheduler.log"
    with SandboxProcess(seed=11, chat_key=chat_key, evolution_key=evo_key, faults=faults) as sb:
        env = {
            **sandbox_env(sb),  # the secret keys above: the logs must never show them
            "WEBHOOK_SECRET": hook_secret,
            "DATABASE_URL": _with_password(settings.database_url, db_password),
            "MIN_BACKOFF_SECONDS": "0.05",
            "MAX_BACKOFF_SECONDS": "1",
            "MAX_ATTEMPTS": "6",
            "LEASE_SECONDS": "5",
            "SEND_TIMEOUT_SECONDS": "2",
            "DISPATCH_INTERVAL_SECONDS": "0.5",
            "LOG_LEVEL": "DEBUG",
        }
        worker = start_worker(processes=2, threads=4, extra_env=env, log_path=worker_log)
        sched = subprocess.Popen(
            [sys.executable, "scheduler.py"],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=open(sched_log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for(
                lambda: (
                    db.execute_sql("SELECT status FROM campaign_runs WHERE id = %s", (w.run.id,)).fetchone()[0]
                    == "completed"
                ),
                timeout=90,
                interval=0.3,
                message="the run to complete",
            )
            cli = subprocess.run(
                [sys.executable, "cli.py", "-v", "status"],
                cwd=ROOT,
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert cli.returncode == 0, cli.stderr
        finally:
            stop_worker(sched)
            stop_worker(worker)
            purge_queues(settings.rabbitmq_url, queues)
        summary = sb.summary()
    assert summary["duplicate_sends"] == 0 and summary["early_retries"] == 0
    assert summary["faults"], "the faults were meant to fire"

    assert_counters_match(w.run.id)
    text = worker_log.read_text() + sched_log.read_text() + cli.stdout + cli.stderr
    for secret in (chat_key, evo_key, hook_secret, db_password):
        assert secret not in text, f"a secret leaked into the logs: {secret[:8]}..."

    step_lines = [line for line in worker_log.read_text().splitlines() if STEP_LINE.search(line)]
    # 21 messages: at least a generate delivery each (which splits and, the inbox free, sends too)
    assert len(step_lines) >= 21, worker_log.read_text()[-3000:]
    for line in step_lines:
        assert re.search(r" actor=(generate|split|send_part) ", line), line
        assert re.search(r" message=\d+ ", line), line
        assert re.search(rf" run={w.run.id} ", line), line
    assert any("outcome=retry" in line for line in step_lines), "the injected faults should show as retries"
    assert "was skipped" not in worker_log.read_text()
