# The two commands a new user runs: `make demo` and `make test` (see README.md).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test test-unit test-quorum lint typecheck demo venv services clean chaos bench

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11+ needed; set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	# the project itself, editable: its packages import from anywhere (scripts/, bench/), no sys.path edits
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# ruff check (pyflakes, pycodestyle, isort, bugbear, complexity <= 20 ...) + ruff format --check
lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# mypy with check_untyped_defs everywhere, disallow_untyped_defs for campaign.* (pyproject.toml)
typecheck: venv
	$(PY) -m mypy

# Prometheus's promtool for the monitoring tests (check rules/config, the alert rules' unit
# tests): from PATH, else unpacked from Debian's `prometheus` package (nothing installed)
PROMTOOL := $(VENV)/bin/promtool
$(PROMTOOL): | $(STAMP)
	scripts/promtool.sh $@

# the tests that need no service (seconds)
test-unit: venv $(PROMTOOL)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

services: venv
	@scripts/ensure_services.sh > $(VENV)/services.env

# The whole suite on real PostgreSQL + RabbitMQ: each run makes its own database and vhost.
# scripts/test_suite.sh: TEST_WORKERS processes (pytest-xdist, each its own database and vhost),
# then the tests marked `exclusive` or `in_order` in one process, alone (the chaos CI variant
# restarts the machine's RabbitMQ; test_webhook.py's last tests read what its earlier ones left);
# TEST_WORKERS=0: one process, as plain pytest.
TEST_WORKERS ?= 2
test: services $(PROMTOOL)
	set -a; . ./$(VENV)/services.env; set +a; TEST_WORKERS=$(TEST_WORKERS) scripts/test_suite.sh $(PY) $(PYTEST_ARGS)

# The whole engine end to end: real services when DATABASE_URL / RABBITMQ_URL answer (its own
# database and vhost), else embedded PostgreSQL (pgserver) + StubBroker. Never starts services.
demo: venv
	$(PY) demo.py $(DEMO_ARGS)

# The same suite with every engine queue a quorum queue (R-SCALE-1): what a RabbitMQ cluster runs.
# Its own target (it doubles the time of `make test`); the cluster itself is T-REL-3 in the suite.
test-quorum: services $(PROMTOOL)
	set -a; . ./$(VENV)/services.env; set +a; RABBITMQ_QUEUE_TYPE=quorum TEST_WORKERS=$(TEST_WORKERS) \
	  scripts/test_suite.sh $(PY) $(PYTEST_ARGS)

# SPEC §7 benchmarks (T-PERF-1..6) and the webhook under hostile load (issue 23), one after the
# other, each on its own database + vhost (+ sandbox + workers where it needs them); each prints
# its figures, its reference and PASS/MISS. `make bench QUICK=1` runs the
# small variants (minutes, not an hour); BENCH=... picks some (e.g. BENCH="pipeline scale");
# BENCH_ARGS go to every script. Exit status non-zero when any target is missed.
BENCH ?= pipeline latency ontime scale memory webhook inbound pool
bench: services
	@set -a; . ./$(VENV)/services.env; set +a; rc=0; \
	for b in $(BENCH); do \
	  echo; $(PY) bench/bench_$$b.py $(if $(QUICK),--quick) $(BENCH_ARGS) || rc=1; \
	done; exit $$rc

# SPEC T-REL-1 fault-injection suite: >= 2,000 messages on real services while workers are
# killed, RabbitMQ restarts and worker connections are terminated; its own database + vhost.
# Prints the seed and the replay command; CHAOS_ARGS="--seed N --keep" replays and keeps the
# database for forensics, "--ci" is the small variant tests/integration/chaos/test_run.py runs.
chaos: services
	set -a; . ./$(VENV)/services.env; set +a; $(PY) scripts/fault_suite.py $(CHAOS_ARGS)

clean:  # the venv and everything the demo, reports and tests leave in the checkout
	rm -rf $(VENV) .pytest_cache .demo demo-output reports
