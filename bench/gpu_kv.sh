#!/usr/bin/env bash
# GPU measurements of the KV data plane, in one go (for a lent GPU machine):
#   1. the GPU tests (pytest tests/gpu: the transport conformance suite with cuda-ipc among them);
#   2. bench/kv_transfer.py: each transport against its physical baseline (cuda-ipc against a
#      device-to-device copy, grpc against raw TCP), Llama-3.1-8B shape, 8,192 tokens (1 GiB);
#   3. bench/serve.py, the issue's 1B workload (2,048 in / 128 out, 192 requests at 24 req/s,
#      2 workers per mode, 24 warm-up requests each): colocated against disaggregated over the
#      default transport (auto: cuda-ipc on one GPU), then disaggregated over grpc for the
#      before/after. One run moves by +-15 %: repeat it (REPEATS=3) and judge the median ratio;
#      MPS=1 runs the modes under a private CUDA MPS daemon (bench/mps.py).
#   4. shm: bench/kv_transfer.py --transports shm on the host's CPUs (1B and 8B shapes, 1,024
#      and 8,192 tokens), with its same-run memcpy baselines.
#   (conformance: only the suite's cuda-ipc and fallback tests, when the whole of tests/gpu
#   does not fit a call.)
# Usage: bench/gpu_kv.sh OUT_DIR   STEPS="tests kv serve shm" picks steps (a call's time limit).
set -uo pipefail
out=${1:?usage: bench/gpu_kv.sh OUT_DIR}
steps=${STEPS:-tests kv serve shm}
shapes=${SHAPES_DIR:-/tmp/tandem-shapes}
cd "$(dirname "$0")/.."
mkdir -p "$out"
python3 - "$shapes" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "bench")
from shapes import shape_dir
print(shape_dir("llama-3.2-1b", Path(sys.argv[1])))
PY
if [[ " $steps " == *" tests "* ]]; then
  timeout 420 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -n 5 | tee "$out/gpu_tests.txt"
fi
if [[ " $steps " == *" conformance "* ]]; then
  TANDEM_TEST_DEVICE=cuda timeout 300 python3 -m pytest -v -p no:cacheprovider \
    tests/integration/test_kv_transports.py -k "${CONFORMANCE_K:-cuda-ipc or fallback}" 2>&1 | grep -E "PASSED|FAILED|ERROR|passed|failed|Error|differing" | tail -n 30 | tee "$out/conformance.txt"
fi
if [[ " $steps " == *" kv "* ]]; then
  timeout 240 python3 bench/kv_transfer.py --device cuda --transports cuda-ipc grpc \
    --shapes llama-3.1-8b --tokens 8192 --dtype bfloat16 --out-dir "$out" 2>&1 | tail -n 20
fi
if [[ " $steps " == *" serve "* ]]; then
  common=(--device cuda --model "$shapes/llama-3.2-1b" --num-kv-blocks 16384 --input-len 2048
          --output-len 128 --num-prompts 192 --rate 24)
  mps=()
  [[ "${MPS:-0}" == 1 ]] && mps=(--mps)
  for i in $(seq 1 "${REPEATS:-1}"); do
    timeout 300 python3 bench/serve.py "${common[@]}" ${mps[@]+"${mps[@]}"} --num-warmups 24 \
      --modes colocated disaggregated --worker-args "--load-format dummy --max-num-seqs 256" \
      --out-dir "$out/auto$i" 2>&1 | grep -v "^\[20" | tail -n 8
  done
  timeout 200 python3 bench/serve.py "${common[@]}" --modes disaggregated \
    --worker-args "--load-format dummy --max-num-seqs 256 --kv-transport grpc" \
    --out-dir "$out/grpc" 2>&1 | tail -n 6
fi
if [[ " $steps " == *" shm "* ]]; then
  timeout 200 python3 bench/kv_transfer.py --transports shm --shapes llama-3.2-1b llama-3.1-8b \
    --tokens 1024 8192 --repeats 5 --out-dir "$out/shm" 2>&1 | tail -n 14
fi
