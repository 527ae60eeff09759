# The two commands a new user runs: `make demo` and `make test` (see README.md).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo venv services clean chaos bench

venv: $(STAMP)

$(STAMP): requirements.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11+ needed; set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

services: venv
	@scripts/ensure_services.sh > $(VENV)/services.env

# The whole suite on real PostgreSQL + RabbitMQ: each run makes its own database and vhost.
test: services
	set -a; . ./$(VENV)/services.env; set +a; $(PY) -m pytest $(PYTEST_ARGS)

demo: services
	@echo "make demo arrives with issue 8 (the end-to-end demo); for now: make test"; exit 1

clean:
	rm -rf $(VENV) .pytest_cache
