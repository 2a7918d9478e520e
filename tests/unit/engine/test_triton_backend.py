"""The Triton backend's logic on CPU: its kernel runs in Triton's interpreter (TRITON_INTERPRET=1).

Compiled on a GPU, the same kernels are checked by tests/gpu/test_triton_attention.py. Each check
runs in a subprocess: Triton reads TRITON_INTERPRET when a kernel is defined.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
pytest.importorskip("triton")  # a test dependency on Linux x86_64 (CI); absent elsewhere


def run_interpreted(code: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_paged_decode_kernel_matches_the_torch_backend():
    """Fragmented block tables, block sizes 16 and 32, GQA, splits, sliding window, padding rows."""
    out = run_interpreted(
        "import kernel_check\n"
        "for case in kernel_check.CASES:\n"
        "    print(kernel_check.check_case(*case)[0])\n"
    )
    assert len(out.split()) == 5


def test_engine_on_the_triton_backend_matches_the_torch_backend(tiny_model):
    """Whole generations: prefills (flash path and cached-prefix path) and decodes through the kernel."""
    model = tiny_model("qwen3")
    out = run_interpreted(
        "import kernel_check\n"  # installs the interpreter fix-up
        "from tandem.engine import LLM, SamplingParams\n"
        f"model = {str(model)!r}\n"
        "shared = list(range(5, 40))\n"
        "prompts = [shared + [7, 8], shared + [9], list(range(50, 53)), list(range(3, 90))]\n"
        "params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)\n"
        "got = {}\n"
        "for backend in ('torch', 'triton'):\n"
        "    llm = LLM(model, attention_backend=backend, num_kv_blocks=64, max_num_batched_tokens=32, max_num_seqs=8)\n"
        "    assert llm.engine.runner.backend_name == backend\n"
        "    got[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]\n"
        "assert got['torch'] == got['triton'], got\n"
        "print('ok', got['triton'][0])\n"
    )
    assert out.startswith("ok")


def test_auto_picks_torch_on_cpu_and_an_unknown_backend_is_refused():
    from tandem.engine.attention import get_attention_backend, resolve_backend_name

    assert resolve_backend_name("auto", "cpu") == "torch"
    assert resolve_backend_name("triton", "cpu") == "triton"
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attention_backend("flash")
