# The README's two commands are `make run` and `make test`; both set up .venv themselves.
.PHONY: setup run test test-fast bench lint

VENV := .venv
PY := $(VENV)/bin/python

setup:
	@scripts/bootstrap.sh

run: setup
	$(VENV)/bin/tandem generate

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not integration"

bench: setup
	$(PY) bench/offline.py
