#!/usr/bin/env bash
# GPU measurements of the prefill work (issue: varlen paged prefill kernel, profiled KV pool,
# fast mixed steps), for a lent GPU machine. STEPS picks what runs (a call's time limit):
#   tests      the prefill kernel's GPU tests and the profiled-pool tests
#   attention  bench/prefill_attention.py --sweep: the kernel alone against SDPA / the old path
#   micro      bench/engine.py micro, 8B: prefill 1k/8k/32k and 2k after 6k/30k cached, floors
#   w4         bench/engine.py offline W4 (1000 lognormal prompts), 8B, engine defaults and 256
#   long       bench/serve.py, 8B, 2 workers, 40 x 8,000-token prompts at 1.5 req/s, both modes
# Usage: bench/gpu_prefill.sh OUT_DIR
set -uo pipefail
out=${1:?usage: bench/gpu_prefill.sh OUT_DIR}
steps=${STEPS:-tests attention micro}
shapes=${SHAPES_DIR:-/tmp/tandem-shapes}
cd "$(dirname "$0")/.."
mkdir -p "$out"
if [[ " $steps " == *" tests "* ]]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_triton_attention.py \
    tests/gpu/test_cuda_engine.py -k "prefill or profile or pool" 2>&1 | tail -n 15 | tee "$out/gpu_tests.txt"
fi
if [[ " $steps " == *" attention "* ]]; then
  timeout 200 python3 bench/prefill_attention.py --sweep --out-dir "$out" 2>&1 | grep -v "^  " | tail -n 12
fi
if [[ " $steps " == *" micro "* ]]; then
  timeout 300 python3 bench/engine.py --device cuda --shapes llama-3.1-8b --batches 1 --contexts 1024 \
    --loop-batches --prefill 1024 8192 32768 --prefill-after 6144:2048 30720:2048 \
    --models-dir "$shapes" --out-dir "$out" 2>&1 | tail -n 12
fi
if [[ " $steps " == *" w4 "* ]]; then
  timeout 280 python3 bench/engine.py --device cuda --section offline --workload w4 --num-requests 1000 \
    --shapes llama-3.1-8b --hf-modes --models-dir "$shapes" --out-dir "$out/defaults" 2>&1 | grep -v "^Loading" | tail -n 12
  if [[ -z "${W4_DEFAULTS_ONLY:-}" ]]; then
    timeout 280 python3 bench/engine.py --device cuda --section offline --workload w4 --num-requests 1000 \
      --shapes llama-3.1-8b --hf-modes --max-num-seqs 256 --max-num-batched-tokens 8192 \
      --models-dir "$shapes" --out-dir "$out/seqs256" 2>&1 | grep -v "^Loading" | tail -n 6
  fi
fi
if [[ " $steps " == *" long "* ]]; then
  model=$(python3 - "$shapes" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "bench")
from shapes import shape_dir
print(shape_dir("llama-3.1-8b", Path(sys.argv[1])))
PY
)
  timeout 560 python3 bench/serve.py --device cuda --model "$model" --workers 2 \
    --worker-args "--load-format dummy --max-num-seqs 128" --num-kv-blocks 8192 \
    --input-len 8000 --output-len 64 --num-prompts 40 --rate 1.5 --out-dir "$out/long" 2>&1 | tail -n 10
fi
