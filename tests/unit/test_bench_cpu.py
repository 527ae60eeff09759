"""bench/common.py's CPU meter: the CPU each process group spent between two snapshots of /proc,
so T-PERF-1 prints where a message's CPU goes (workers, PostgreSQL, RabbitMQ, sandbox) for the
pipeline and the reference in the same run."""

from __future__ import annotations

import os
import time

from bench import common


def test_cpu_between_sums_each_group_and_counts_new_processes_from_zero():
    before = {1: ("postgres", 1.0), 2: ("workers", 5.0), 3: ("workers", 2.0)}
    after = {1: ("postgres", 1.5), 2: ("workers", 6.0), 3: ("workers", 2.25), 4: ("sandbox", 0.5)}
    got = common.cpu_between(before, after)
    assert got["postgres"] == 0.5
    assert got["workers"] == 1.25
    assert got["sandbox"] == 0.5  # started inside the window: all its CPU is the window's
    assert got["rabbitmq"] == 0.0 and set(got) == set(common.CPU_GROUPS)


def test_the_snapshot_sees_this_process_burn_cpu():
    me = os.getpid()
    before = common.cpu_snapshot()
    assert before[me][0] == "other"  # a python process that is no worker, sandbox or service
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    spent = common.cpu_between(before, common.cpu_snapshot())["other"]
    assert spent >= 0.2
