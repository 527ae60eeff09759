"""chaos/services.py against the real PostgreSQL: the injector's view of the engine.

``mid_send_worker_pids`` is how the fault suite kills a worker exactly while a part is in its HTTP
call (T-REL-1 "kill -9 mid-send"): it must recognise the send step's claim however it reaches
PostgreSQL (since issue 20, a prepared statement: ``EXECUTE ce_send_claim_…``).
"""

from __future__ import annotations

import os
import time
from typing import Any, cast
from urllib.parse import urlsplit

import pipeline
from campaign.db import db, prepared_name
from campaign.settings import get_settings
from chaos.services import Services
from tests.integration.pipeline_helpers import claim, fast_settings, make_world, no_wait, to_sending


def test_a_worker_in_the_http_call_of_a_send_is_seen_mid_send(clean_db, sb, llm, evo):
    """Seen mid-send during the HTTP call of a part it claimed; NOT while its claim statement claimed
    nothing and it polls connectionState (the inbox's state unknown): a kill then is no kill mid-send."""
    settings = fast_settings()
    w = make_world()
    m1, m2 = w.add_leads(2)
    to_sending(m1.id, settings, llm)
    to_sending(m2.id, settings, llm)
    services = Services(urlsplit(get_settings().database_url).path.lstrip("/"))
    during_probe: list[set[int]] = []
    during_send: list[set[int]] = []

    class Watched:
        def connection_state(self, instance: str) -> str:
            during_probe.append(services.mid_send_worker_pids())
            return evo.connection_state(instance)

        def send_text(self, *args: Any, **kwargs: Any) -> Any:
            during_send.append(services.mid_send_worker_pids())
            return evo.send_text(*args, **kwargs)

    try:
        assert os.getpid() not in services.mid_send_worker_pids()  # before any send
        for m in (m1, m2):  # the first polls the unknown state, then claims; the second claims at once
            assert pipeline.send_step(m.id, settings, cast(Any, Watched()), pace=no_wait).sent
        assert os.getpid() not in services.mid_send_worker_pids()  # the sends were recorded since
    finally:
        services.close()
    assert prepared_name(pipeline._SEND_CLAIM_SQL), "the send claim is not a prepared statement"
    assert len(during_probe) == 1 and os.getpid() not in during_probe[0], during_probe
    assert len(during_send) == 2 and all(os.getpid() in pids for pids in during_send), during_send


def test_a_worker_sending_the_first_part_its_generate_delivery_claimed_is_seen_mid_send(clean_db, sb, llm, evo):
    """The generate delivery's record of the text and parts claims the first part `sending` itself
    (issue 20): a worker in that part's HTTP call is mid-send too."""
    settings = fast_settings()
    w = make_world()
    (m,) = w.add_leads(1)
    claim(m.id)
    services, watched, during_send = _watching_sends(w.inboxes[0].id, evo)

    try:
        first = pipeline.generate_then_split(m.id, settings, llm, claim_first_until=time.monotonic() + 60)
        assert isinstance(first, pipeline.FirstSend), first
        assert pipeline.send_claimed(first, settings, watched).sent
        assert os.getpid() not in services.mid_send_worker_pids()  # the send was recorded since
    finally:
        services.close()
    assert len(during_send) == 1 and os.getpid() in during_send[0], during_send


def test_a_worker_sending_a_part_claimed_with_the_record_of_the_one_before_is_seen_mid_send(clean_db, sb, llm, evo):
    """A zero-gap part is claimed by the statement recording the part before it (issue 20): a worker
    in that part's HTTP call is mid-send; in the first part's, after the plain claim, too."""
    settings = fast_settings()
    w = make_world(split=True, max_parts=2, part_gap_min_seconds=0, part_gap_max_seconds=0)
    (m,) = w.add_leads(1)
    to_sending(m.id, settings, llm)
    db.execute_sql("DELETE FROM message_parts WHERE message_id = %s", (m.id,))
    for i in range(2):
        db.execute_sql(
            "INSERT INTO message_parts (message_id, inbox_id, idx, text) VALUES (%s, %s, %s, %s)",
            (m.id, w.inboxes[0].id, i, f"parte {i + 1}"),
        )
    services, watched, during_send = _watching_sends(w.inboxes[0].id, evo)

    try:
        first = pipeline.send_step(m.id, settings, watched, pace=no_wait, defer_record=True)
        assert first.unrecorded is not None, "the first part's record was not left for the next claim"
        second = pipeline.send_step(m.id, settings, watched, pace=no_wait, prev=first.unrecorded)
        assert second.sent and second.next_delay is None
    finally:
        services.close()
    assert len(during_send) == 2 and all(os.getpid() in pids for pids in during_send), during_send


def _watching_sends(inbox_id: int, evo: Any) -> tuple[Services, Any, list[set[int]]]:
    """The inbox known open; a gateway that notes, at each send, which workers the injector sees mid-send."""
    db.execute_sql("UPDATE inboxes SET connection_state = 'open', state_checked_at = now() WHERE id = %s", (inbox_id,))
    services = Services(urlsplit(get_settings().database_url).path.lstrip("/"))
    during_send: list[set[int]] = []

    class Watched:
        def send_text(self, *args: Any, **kwargs: Any) -> Any:
            during_send.append(services.mid_send_worker_pids())
            return evo.send_text(*args, **kwargs)

    return services, cast(Any, Watched()), during_send
