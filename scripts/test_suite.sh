#!/usr/bin/env bash
# make test: the whole suite in two parts, so that it fits CI's budget on a 2-core machine.
#
#   1. every other test on TEST_WORKERS processes (pytest-xdist, default 2, --dist load: each test
#      where a process is free, each process in collection order); each process has its own
#      database, vhost and sandbox (tests/integration/conftest.py names them after its pid), and
#      most of the time is spent waiting on services, workers and sandboxes;
#   2. the tests marked `exclusive` or `in_order`, in one process, nothing beside them: the chaos
#      CI variant stops the machine's RabbitMQ (rabbitmqctl stop_app), T-REL-3 starts a 3-node
#      cluster, and an `in_order` module's last tests read what its earlier ones left (xdist
#      would split it; its --dist loadgroup is no way out: it keeps one of several tests that
#      share a node id, as schemathesis' do).
#
# Usage: scripts/test_suite.sh PYTHON [PYTEST_ARGS...]; both parts get the same arguments, then
# their own -n and -m (select with -k or paths; a part that selects nothing is no failure, unless
# neither selects anything). TEST_WORKERS=0 runs the whole suite in one process, in one part.
set -u
py=$1
shift
workers=${TEST_WORKERS:-2}

if [ "$workers" = 0 ]; then
    exec "$py" -m pytest "$@"
fi

"$py" -m pytest "$@" -n "$workers" -m "not exclusive and not in_order"
parallel=$?
echo
echo "== the tests marked 'exclusive' or 'in_order', in one process, alone"
"$py" -m pytest "$@" -n 0 -m "exclusive or in_order"
alone=$?

# 5: no test selected (e.g. PYTEST_ARGS names unit tests only): fine for one part, not for both
if [ "$parallel" = 5 ] && [ "$alone" = 5 ]; then
    exit 5
fi
for rc in "$parallel" "$alone"; do
    if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then
        exit "$rc"
    fi
done
exit 0
