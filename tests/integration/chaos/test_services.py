"""chaos/services.py against the real PostgreSQL: the injector's view of the engine.

``mid_send_worker_pids`` is how the fault suite kills a worker exactly while a part is in its HTTP
call (T-REL-1 "kill -9 mid-send"): it must recognise the send step's claim however it reaches
PostgreSQL (since issue 20, a prepared statement: ``EXECUTE ce_send_claim_…``).
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import pipeline
from campaign.db import db, prepared_name
from campaign.settings import get_settings
from chaos.services import Services
from tests.integration.pipeline_helpers import fast_settings, make_world, to_sending


def _no_wait(wait: float) -> None:
    raise AssertionError(f"the inbox's slot was free, yet the step was told to wait {wait:.2f}s")


def test_a_worker_in_the_http_call_of_a_send_is_seen_mid_send(clean_db, sb, llm, evo):
    settings = fast_settings()
    w = make_world()
    m1, m2 = w.add_leads(2)
    to_sending(m1.id, settings, llm)
    to_sending(m2.id, settings, llm)
    db.execute_sql("UPDATE inboxes SET connection_state = 'open', state_checked_at = now()")
    services = Services(urlsplit(get_settings().database_url).path.lstrip("/"))
    seen: list[set[int]] = []
    try:
        # before any send: nobody is mid-send
        assert os.getpid() not in services.mid_send_worker_pids()
        for m in (m1, m2):  # the first prepares the claim on this connection, the second only executes it
            assert pipeline.send_step(
                m.id, settings, evo, pace=_no_wait, on_http=lambda: seen.append(services.mid_send_worker_pids())
            ).sent
        assert os.getpid() not in services.mid_send_worker_pids()  # the sends were recorded since
    finally:
        services.close()
    assert prepared_name(pipeline._SEND_CLAIM_SQL), "the send claim is not a prepared statement"
    assert all(os.getpid() in pids for pids in seen), seen
    assert len(seen) == 2
