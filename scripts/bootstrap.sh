#!/usr/bin/env bash
# Creates .venv and installs Tandem with its test dependencies. Idempotent: re-running after a
# dependency change only installs what is missing.
#
# torch is pinned to the CPU build that lies on this workplace's disk (TANDEM_TORCH_SPEC to
# override): an unpinned `torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TANDEM_TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.tandem-installed
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
  touch "$stamp"
fi
# buf (the protobuf linter, a Go binary shipped in an npm package) for the proto lint test.
BUF_VERSION=1.75.0
if [ ! -x .tools/node_modules/.bin/buf ] || ! .tools/node_modules/.bin/buf --version 2>/dev/null | grep -qx "$BUF_VERSION"; then
  mkdir -p .tools
  npm install --silent --no-audit --no-fund --prefix .tools "@bufbuild/buf@$BUF_VERSION" >/dev/null
fi
