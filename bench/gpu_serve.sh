#!/usr/bin/env bash
# GPU measurements of the serving path, in one go (for a lent GPU machine; a few minutes):
#   1. the GPU tests (pytest tests/gpu);
#   2. W4 with fixed lengths (215 in / 198 out, 1000 prompts, all at once) through the router,
#      one colocated worker, against the offline engine on the same requests in the same run,
#      for the Llama-3.1-8B and Llama-3.2-1B shapes (random weights), with a py-spy profile of
#      every process during the 8B run.
# Usage: bench/gpu_serve.sh OUT_DIR   (JSON records and profiles land there; a table per run)
#   SHAPES="llama-3.2-1b" runs one shape; SKIP_TESTS=1 skips step 1 (to fit a call's time limit).
set -uo pipefail
out=${1:?usage: bench/gpu_serve.sh OUT_DIR}
shapes=${SHAPES_DIR:-/tmp/tandem-shapes}
cd "$(dirname "$0")/.."
mkdir -p "$out"
python3 - "$shapes" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "bench")
from shapes import shape_dir
for name in ("llama-3.1-8b", "llama-3.2-1b"):
    print(shape_dir(name, Path(sys.argv[1])))
PY
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -n 3 | tee "$out/gpu_tests.txt"
fi
for shape in ${SHAPES:-llama-3.1-8b llama-3.2-1b}; do
  profile=()
  if [ "$shape" = llama-3.1-8b ]; then profile=(--profile-dir "$out/profile-$shape"); fi
  timeout 420 python3 bench/serve.py --device cuda --model "$shapes/$shape" --modes colocated \
    --workers 1 --worker-args "--load-format dummy --max-num-seqs 1024" \
    --input-len 215 --output-len 198 --num-prompts 1000 --rate inf --offline \
    --out-dir "$out" "${profile[@]}" 2>&1 | tail -n 30
done
