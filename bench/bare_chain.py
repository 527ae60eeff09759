"""The reference of T-PERF-1: a bare Dramatiq 4-hop chain (``dramatiq bench.bare_chain``).

Per message: 6 single-row commits to PostgreSQL and 3 HTTP posts to the sandbox, in 4 actors run
one after the other, on the same RabbitMQ (publisher confirms on, like the engine), the same
PostgreSQL and the same sandbox as the engine. No engine code: one psycopg2 connection per
worker thread (autocommit), one keep-alive httpx client per process, Dramatiq's default
middleware. This is what the SPEC calls "a bare Dramatiq 4-hop chain doing 6 single-row commits
and 3 HTTP posts per message".

    hop 1 bare_generate : commit (claim) + POST chat/completions + commit (text)
    hop 2 bare_split    : POST chat/completions (json) + commit (parts)
    hop 3 bare_send     : commit (sending) + POST sendText + commit (sent)
    hop 4 bare_finalize : commit (done)

Environment: DATABASE_URL, RABBITMQ_URL, BENCH_SANDBOX_URL, BENCH_CHAT_KEY, BENCH_EVOLUTION_KEY.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import dramatiq
import httpx
import psycopg2
from dramatiq.brokers.rabbitmq import RabbitmqBroker

TABLE_SQL = """CREATE TABLE IF NOT EXISTS bench_bare (
    id bigserial PRIMARY KEY,
    status text NOT NULL DEFAULT 'queued',
    phone text NOT NULL,
    text text,
    parts jsonb,
    key_id text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    done_at timestamptz)"""

broker = RabbitmqBroker(url=os.environ["RABBITMQ_URL"], confirm_delivery=True)
dramatiq.set_broker(broker)

_local = threading.local()
_http_lock = threading.Lock()
_http: httpx.Client | None = None
OPTIONS: dict[str, Any] = dict(max_retries=3, min_backoff=100, max_backoff=1000, time_limit=60_000)


def _db() -> psycopg2.extensions.connection:
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = psycopg2.connect(os.environ["DATABASE_URL"])
        conn.autocommit = True
        _local.conn = conn
    return conn


def _commit(sql: str, params: tuple) -> tuple | None:
    with _db().cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone() if cur.description else None


def _client() -> httpx.Client:
    global _http
    with _http_lock:
        if _http is None:
            _http = httpx.Client(base_url=os.environ["BENCH_SANDBOX_URL"], timeout=30.0, trust_env=False)
        return _http


def _chat(content: str, json_mode: bool) -> str:
    body: dict[str, Any] = {
        "model": "bench/model",
        "max_tokens": 400,
        "temperature": 0.7,
        "messages": [
            {"role": "system", "content": "Write a short friendly WhatsApp message."},
            {"role": "user", "content": content},
        ],
    }
    if json_mode:
        body["response_format"] = {"type": "json_object"}
        body["messages"][0]["content"] = 'Split into at most 2 parts. Answer {"messages": [...]}'
    r = _client().post(
        "/api/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {os.environ['BENCH_CHAT_KEY']}"}
    )
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


@dramatiq.actor(queue_name="bench.bare.generate", **OPTIONS)
def bare_generate(row_id: int) -> None:
    """Hop 1: claim, write the text."""
    if (
        _commit(
            "UPDATE bench_bare SET status = 'generating', updated_at = now() WHERE id = %s AND status = 'queued' "
            "RETURNING phone",
            (row_id,),
        )
        is None
    ):
        return
    text = _chat(f"<lead>\nname: Ana {row_id}\ncompany: Comercial Atlântico\ncity: Recife\n</lead>", False)
    _commit("UPDATE bench_bare SET status = 'splitting', text = %s, updated_at = now() WHERE id = %s", (text, row_id))
    bare_split.send(row_id)


@dramatiq.actor(queue_name="bench.bare.split", **OPTIONS)
def bare_split(row_id: int) -> None:
    """Hop 2: split the text."""
    parts = _chat("Olá! Tudo bem? Vi que você está na Comercial Atlântico. Como estão as coisas em Recife?", True)
    _commit(
        "UPDATE bench_bare SET status = 'sending', parts = %s, updated_at = now() WHERE id = %s "
        "AND status = 'splitting'",
        (json.dumps({"raw": parts}), row_id),
    )
    bare_send.send(row_id)


@dramatiq.actor(queue_name="bench.bare.send", **OPTIONS)
def bare_send(row_id: int) -> None:
    """Hop 3: mark sending, send, record."""
    row = _commit(
        "UPDATE bench_bare SET status = 'sending_part', updated_at = now() WHERE id = %s "
        "AND status = 'sending' RETURNING phone",
        (row_id,),
    )
    if row is None:
        return
    r = _client().post(
        "/message/sendText/bench-bare",
        json={"number": row[0], "text": f"bench part {row_id}"},
        headers={"apikey": os.environ["BENCH_EVOLUTION_KEY"]},
    )
    r.raise_for_status()
    _commit(
        "UPDATE bench_bare SET status = 'sent_part', key_id = %s, updated_at = now() WHERE id = %s",
        (r.json()["key"]["id"], row_id),
    )
    bare_finalize.send(row_id)


@dramatiq.actor(queue_name="bench.bare.finalize", **OPTIONS)
def bare_finalize(row_id: int) -> None:
    """Hop 4: done."""
    _commit(
        "UPDATE bench_bare SET status = 'done', done_at = clock_timestamp(), updated_at = now() "
        "WHERE id = %s AND status = 'sent_part'",
        (row_id,),
    )
