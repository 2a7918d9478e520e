# The README's two commands are `make run` and `make test`; both set up .venv themselves.
.PHONY: setup run lint test test-fast protos bench bench-kv bench-serve bench-engine loadtest

VENV := .venv
PY := $(VENV)/bin/python
# pytest-xdist workers (CI has 2 cores); each test file runs whole on one worker, so a module's
# cluster of service processes starts once.
JOBS ?= 2
PYTEST := $(PY) -m pytest -q -n $(JOBS) --dist loadfile

setup:
	@scripts/bootstrap.sh

run: setup
	$(VENV)/bin/tandem up $(ARGS)

# Style (ruff: pycodestyle, pyflakes, isort, bugbear, pyupgrade, formatting) and the import
# contracts in pyproject.toml (layers only import downwards).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test: setup lint
	$(PYTEST)

# The pre-commit loop: lint and the tests that start no processes and take under a few seconds.
test-fast: setup lint
	$(PYTEST) -m "not slow and not integration"

protos: setup
	$(PY) scripts/gen_protos.py

bench: setup
	$(PY) bench/offline.py

bench-kv: setup
	$(PY) bench/kv_transfer.py $(ARGS)

bench-serve: setup
	$(PY) bench/serve.py $(ARGS)

bench-engine: setup
	$(PY) bench/engine.py $(ARGS)

# Load-test a running router (starts nothing): make loadtest URL=http://host:8000 [GRPC=host:port]
#   [USERS=16 SPAWN=4 DURATION=2m OUT=loadtest-results ARGS="--workload shared-prefix --max-tokens 128"]
# GRPC (the router's gRPC address, which `tandem up` prints) turns the SDK user on. No bootstrap:
# locust runs in .venv when there is one, else in the active virtualenv, else in a small
# .venv-loadtest of its own (HTTP users only), and is installed there only when missing.
USERS ?= 16
SPAWN ?= 4
DURATION ?= 2m
OUT ?= loadtest-results
LOADTEST_PY ?= $(firstword $(wildcard $(PY)) $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV)/bin/python) .venv-loadtest/bin/python)
loadtest:
	@test -n "$(URL)" || { echo "usage: make loadtest URL=http://router:8000 [GRPC=host:port] [USERS= DURATION= ARGS=]"; exit 2; }
	@test -x $(LOADTEST_PY) || [ $(LOADTEST_PY) != .venv-loadtest/bin/python ] || python3 -m venv .venv-loadtest
	@$(LOADTEST_PY) -c "import locust" 2>/dev/null || \
		$(LOADTEST_PY) -m pip install -q --disable-pip-version-check "locust>=2.40"
	@mkdir -p $(OUT)
	$(LOADTEST_PY) -m locust -f loadtest/locustfile.py --headless -H $(URL) $(if $(GRPC),--grpc-target $(GRPC)) \
		-u $(USERS) -r $(SPAWN) -t $(DURATION) --stop-timeout 120 --csv $(OUT)/locust \
		--jsonl $(OUT)/requests.jsonl $(ARGS)
