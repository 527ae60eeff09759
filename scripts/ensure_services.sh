#!/usr/bin/env bash
# Find PostgreSQL and RabbitMQ for the tests/demo: use them if they answer; start the local
# ones if installed but stopped; else use docker compose if a Docker engine answers; else stop
# with an error naming what is missing. Prints KEY=VALUE lines for the caller to export.
set -euo pipefail

PG_HOST=${PGHOST_TEST:-127.0.0.1}
PG_PORT=${PGPORT_TEST:-5432}
MQ_HOST=${MQHOST_TEST:-127.0.0.1}
MQ_PORT=${MQPORT_TEST:-5672}
PY=${PYTHON:-.venv/bin/python}

port_open() { "$PY" - "$1" "$2" <<'PY'
import socket, sys
s = socket.socket(); s.settimeout(1)
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); print("open")
except OSError:
    pass
PY
}

wait_port() { # host port name seconds
  for _ in $(seq 1 "$4"); do [ -n "$(port_open "$1" "$2")" ] && return 0; sleep 1; done
  echo "error: $3 did not come up on $1:$2 within $4 s" >&2; return 1
}

docker_ok() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }

rabbitmqctl_cmd="rabbitmqctl"
if [ -z "$(port_open "$PG_HOST" "$PG_PORT")" ]; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    echo "starting the local PostgreSQL" >&2
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start >&2 || true
    wait_port "$PG_HOST" "$PG_PORT" PostgreSQL 30
  elif docker_ok; then
    echo "starting PostgreSQL with docker compose" >&2
    docker compose up -d --wait postgres >&2
  else
    echo "error: PostgreSQL is not reachable on $PG_HOST:$PG_PORT, no local PostgreSQL is installed and no Docker engine answers. Install PostgreSQL >= 15 or Docker, or set TEST_POSTGRES_URL." >&2
    exit 1
  fi
fi
if [ -z "$(port_open "$MQ_HOST" "$MQ_PORT")" ]; then
  if command -v rabbitmq-server >/dev/null 2>&1; then
    echo "starting the local RabbitMQ" >&2
    rabbitmq-server -detached >&2 || true
    wait_port "$MQ_HOST" "$MQ_PORT" RabbitMQ 60
  elif docker_ok; then
    echo "starting RabbitMQ with docker compose" >&2
    docker compose up -d --wait rabbitmq >&2
    rabbitmqctl_cmd="docker compose exec -T rabbitmq rabbitmqctl"
  else
    echo "error: RabbitMQ is not reachable on $MQ_HOST:$MQ_PORT, no local RabbitMQ is installed and no Docker engine answers. Install RabbitMQ or Docker, or set TEST_RABBITMQ_URL." >&2
    exit 1
  fi
elif ! command -v rabbitmqctl >/dev/null 2>&1; then
  if docker_ok && docker compose ps rabbitmq >/dev/null 2>&1; then
    rabbitmqctl_cmd="docker compose exec -T rabbitmq rabbitmqctl"
  else
    echo "error: RabbitMQ answers but rabbitmqctl is missing: the tests need it to create their own vhost" >&2
    exit 1
  fi
fi
# rabbitmqctl needs the node to be fully booted, not just the port open
for _ in $(seq 1 60); do $rabbitmqctl_cmd await_startup >/dev/null 2>&1 && break; sleep 1; done
echo "RABBITMQCTL='$rabbitmqctl_cmd'"
