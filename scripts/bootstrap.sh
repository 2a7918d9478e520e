#!/usr/bin/env bash
# Creates .venv and installs Tandem with its test dependencies. Idempotent: re-running after a
# dependency change only installs what is missing.
#
# torch is pinned to its CPU build; unpinned, or pinned without the CPU index, PyPI's Linux
# x86_64 wheel is the multi-GB CUDA build. Where PyTorch's CPU wheel index answers within 3 s
# it is added to pip's indexes; on Linux x86_64 the +cpu build is asked for by name, elsewhere
# the plain pin lets pip take a +cpu wheel when the index has one (a local label sorts after
# the plain version) and the platform's default wheel otherwise (macOS: a CPU build). Where the
# index does not answer (no internet: a local wheel mirror configured in pip.conf), the plain
# pin resolves to whatever pip's indexes hold, again preferring 2.13.0+cpu over 2.13.0, and a
# warning says when that was the CUDA build. TANDEM_TORCH_CPU_INDEX replaces PyTorch's CPU
# index (a mirror of it); TANDEM_TORCH_SPEC replaces the requirement and skips the probe (pip's
# own configuration then decides where it comes from).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
TORCH_CPU_INDEX=${TANDEM_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
stamp=.venv/.tandem-installed

# Whether PyTorch's CPU index answers quickly (curl, else Python; either gives up after 3 s).
cpu_index_reachable() {
  if command -v curl >/dev/null 2>&1; then
    curl -fsS -m 3 -r 0-0 -o /dev/null "$TORCH_CPU_INDEX/torch/" 2>/dev/null
  else
    "$PYTHON" - "$TORCH_CPU_INDEX/torch/" >/dev/null 2>&1 <<'EOF'
import sys, urllib.request
urllib.request.urlopen(urllib.request.Request(sys.argv[1], headers={"Range": "bytes=0-0"}), timeout=3)
EOF
  fi
}

install_torch() {
  local pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
  if [ -n "${TANDEM_TORCH_SPEC:-}" ]; then
    "${pip[@]}" "$TANDEM_TORCH_SPEC"
  elif cpu_index_reachable; then
    local spec="torch==$TORCH_VERSION"
    if [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ]; then
      spec="torch==$TORCH_VERSION+cpu"
    fi
    "${pip[@]}" --extra-index-url "$TORCH_CPU_INDEX" "$spec"
  else
    "${pip[@]}" "torch==$TORCH_VERSION"
    local got
    got=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("torch"))')
    if [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ] && [[ "$got" != *+cpu ]]; then
      echo "bootstrap: $TORCH_CPU_INDEX did not answer, so pip's indexes gave torch $got, the" \
        "CUDA build; for the CPU build set TANDEM_TORCH_CPU_INDEX to a mirror of that index, remove" \
        ".venv and run this again" >&2
    fi
  fi
}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  install_torch
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
  touch "$stamp"
fi
# buf (the protobuf linter, a Go binary shipped in an npm package) for the proto lint test.
BUF_VERSION=1.75.0
if [ ! -x .tools/node_modules/.bin/buf ] || ! .tools/node_modules/.bin/buf --version 2>/dev/null | grep -qx "$BUF_VERSION"; then
  mkdir -p .tools
  npm install --silent --no-audit --no-fund --prefix .tools "@bufbuild/buf@$BUF_VERSION" >/dev/null
fi
