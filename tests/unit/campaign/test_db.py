"""campaign.db without a server: the URL -> psycopg2 arguments (the embedded PostgreSQL listens on a socket)."""

from __future__ import annotations

from campaign.db import connect_kwargs


def test_connect_kwargs_understands_a_socket_directory():
    """The embedded PostgreSQL listens on a Unix socket only: libpq's ``?host=/dir`` form must reach psycopg2."""
    kw = connect_kwargs("postgresql://postgres@/campaign_demo?host=/srv/pg/run")
    assert (kw["host"], kw["database"], kw["user"], kw["port"]) == ("/srv/pg/run", "campaign_demo", "postgres", 5432)
    assert connect_kwargs("postgresql://u:p@db.example:6543/x")["host"] == "db.example"
