"""The reference of T-PERF-6: a bare pika consumer doing one single-row INSERT + commit per event.

    python -m bench.bare_inbound AMQP_URL QUEUE DATABASE_URL [--prefetch 200]

No engine code: one pika ``BlockingConnection``, one psycopg2 connection; per event it decodes the
JSON body (the engine does too), INSERTs one row (event name, key id) into ``bench_inbound_bare``,
commits, and acks that one delivery. That is the SPEC's "bare pika consumer doing one single-row
commit per event". The queue is declared like Evolution's (durable, ``x-queue-type: quorum``), so
the broker's share of the work is the engine's. Prints ``READY_LINE`` once consuming; SIGTERM
stops it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

import pika
import psycopg2

READY_LINE = "bare inbound consumer ready"
EXCHANGE = "bench.bare"
TABLE_SQL = """CREATE TABLE IF NOT EXISTS bench_inbound_bare (
    id bigserial PRIMARY KEY,
    event text NOT NULL,
    key_id text,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"""


def declare(channel: Any, queue: str) -> None:
    """The reference's exchange and its one quorum queue, bound to every routing key."""
    channel.exchange_declare(exchange=EXCHANGE, exchange_type="topic", durable=True)
    channel.queue_declare(queue=queue, durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_bind(queue=queue, exchange=EXCHANGE, routing_key="#")


def _key_id(doc: Any) -> str | None:
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, dict):
        return None
    key = data.get("key")
    value = key.get("id") if isinstance(key, dict) else data.get("keyId")
    return str(value) if value is not None else None


def main(argv: list[str] | None = None) -> int:
    """Consume until SIGTERM."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("amqp_url")
    p.add_argument("queue")
    p.add_argument("database_url")
    p.add_argument("--prefetch", type=int, default=200)
    args = p.parse_args(argv)

    pg = psycopg2.connect(args.database_url)
    with pg.cursor() as cur:
        cur.execute(TABLE_SQL)
    pg.commit()
    conn = pika.BlockingConnection(pika.URLParameters(args.amqp_url))
    channel = conn.channel()
    declare(channel, args.queue)
    channel.basic_qos(prefetch_count=args.prefetch)
    stopping = []

    def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
        doc = json.loads(body)
        with pg.cursor() as cur:
            cur.execute(
                "INSERT INTO bench_inbound_bare (event, key_id) VALUES (%s, %s)", (method.routing_key, _key_id(doc))
            )
        pg.commit()
        ch.basic_ack(delivery_tag=method.delivery_tag)

    channel.basic_consume(queue=args.queue, on_message_callback=on_message, auto_ack=False)
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    print(READY_LINE, flush=True)
    while not stopping:
        conn.process_data_events(time_limit=0.2)
    conn.close()
    pg.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
