# The README's two commands are `make run` and `make test`; both set up .venv themselves.
.PHONY: setup run test test-fast protos bench bench-kv bench-serve

VENV := .venv
PY := $(VENV)/bin/python

setup:
	@scripts/bootstrap.sh

run: setup
	$(VENV)/bin/tandem up $(ARGS)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not integration"

protos: setup
	$(PY) scripts/gen_protos.py

bench: setup
	$(PY) bench/offline.py

bench-kv: setup
	$(PY) bench/kv_transfer.py $(ARGS)

bench-serve: setup
	$(PY) bench/serve.py $(ARGS)
