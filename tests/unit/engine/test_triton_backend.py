"""The Triton kernels' logic on CPU: the paged decode and prefill kernels and the fused kernels
(``fused_ops``) run in Triton's interpreter (TRITON_INTERPRET=1).

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
sys.path.insert(0, str(HERE))
import prefill_check  # noqa: E402


def run_interpreted(code: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow  # Triton's interpreter, in a new process
def test_paged_decode_kernel_matches_the_torch_backend():
    """Fragmented block tables, block sizes 16 and 32, GQA, splits, sliding window, padding rows."""
    out = run_interpreted(
        "import kernel_check\n"
        "for case in kernel_check.CASES:\n"
        "    print(kernel_check.check_case(*case)[0])\n"
    )
    assert len(out.split()) == 5


@pytest.mark.slow  # Triton's interpreter, in a new process
def test_paged_prefill_kernel_matches_the_torch_backend():
    """Mixed steps (decodes, then chunks after cached context) in one launch: shuffled pages,
    block sizes 16 and 32, GQA 1/3/4/8, sliding windows, chunks starting inside a block."""
    out = run_interpreted(
        "import kernel_check, prefill_check\n"  # kernel_check installs the interpreter fix-up
        "for case in prefill_check.CASES:\n"
        "    print(prefill_check.check_case(*case))\n"
    )
    assert len(out.split()) == 6


@pytest.mark.slow  # Triton's interpreter, in a new process
def test_engine_on_the_triton_backend_matches_the_torch_backend(tiny_model):
    """Whole generations: prefills (flash path and cached-prefix path) and decodes through the
    kernel."""
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
        "    llm = LLM(model, attention_backend=backend, num_kv_blocks=64, "
        "max_num_batched_tokens=32, max_num_seqs=8)\n"
        "    assert llm.engine.runner.backend_name == backend\n"
        "    got[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]\n"
        "assert got['torch'] == got['triton'], got\n"
        "print('ok', got['triton'][0])\n"
    )
    assert out.startswith("ok")


@pytest.mark.slow  # Triton's interpreter, in a new process
def test_fused_kernels_match_the_reference_ops():
    """add_rms_norm and rotary_and_store in float32 and float16 (the interpreter's bfloat16 casts
    truncate): strided rows, fragmented slots, block sizes 16 and 32, padding rows, untouched
    slots."""
    out = run_interpreted(
        "import torch, fused_check\n"
        "for dtype in (torch.float32, torch.float16):\n"
        "    for case in fused_check.NORM_CASES:\n"
        "        fused_check.check_add_rms_norm(*case, dtype=dtype)\n"
        "    for case in fused_check.ROTARY_CASES:\n"
        "        fused_check.check_rotary_and_store(*case, dtype=dtype)\n"
        "print('ok')\n"
    )
    assert out.split() == ["ok"]


@pytest.mark.slow  # Triton's interpreter, in a new process
def test_model_on_the_fused_kernels_tracks_the_unfused_model(tiny_model):
    """float16 generations with the fused kernels forced on (CPU tensors, interpreted) against the
    model's reference ops: the residual-stream plumbing, q/k norm before the fused rotary, and
    both backends attending over the K/V that rotary_and_store wrote (``kv_stored``)."""
    model = tiny_model("qwen3")
    out = run_interpreted(
        "import kernel_check, torch\n"  # installs the interpreter fix-up (the paged-decode kernel)
        "import tandem.engine.models.llama as llama\n"
        "from tandem.engine import LLM, SamplingParams\n"
        "from tandem.engine.models import fused_ops\n"
        f"model = {str(model)!r}\n"
        "shared = list(range(5, 40))\n"
        "prompts = [shared + [7, 8], shared + [9], list(range(50, 53)), list(range(3, 90))]\n"
        "params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)\n"
        "kw = dict(dtype='float16', num_kv_blocks=64, max_num_batched_tokens=32, max_num_seqs=8)\n"
        "want = LLM(model, attention_backend='torch', **kw).generate(prompts, params)\n"
        "calls = []\n"
        "def fused(x):\n"
        "    calls.append(x.shape)\n"
        "    return fused_ops if x.dtype == torch.float16 else None\n"
        "llama._fused_ops = fused\n"
        "for backend in ('torch', 'triton'):\n"
        "    got = LLM(model, attention_backend=backend, **kw).generate(prompts, params)\n"
        "    for a, b in zip(got, want):\n"
        "        x, y = a.outputs[0], b.outputs[0]\n"
        "        same = next((i for i, (s, t) in enumerate(zip(x.token_ids, y.token_ids)) "
        "if s != t), 6)\n"
        # fp16 rounding may split a near-tie
        "        assert same >= 4, (backend, x.token_ids, y.token_ids)\n"
        "        for p, q in zip(x.logprobs[:same], y.logprobs[:same]):\n"
        "            assert abs(p.logprob - q.logprob) < 0.02, (backend, p.logprob, q.logprob)\n"
        "assert calls\n"
        "print('ok')\n"
    )
    assert out.split() == ["ok"]


@pytest.mark.parametrize("name", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_a_backend_does_not_store_kv_the_caller_stored(name):
    """``kv_stored=True`` (rotary_and_store wrote the slots): no store, the same attention."""
    if name == "torch":
        prefill_check.check_kv_stored(name)
    else:  # Triton's kernels: interpreted, in a new process
        out = run_interpreted(
            f"import kernel_check, prefill_check\nprefill_check.check_kv_stored({name!r})\n"
            "print('ok')\n"
        )
        assert out.split() == ["ok"]


def test_auto_picks_torch_on_cpu_and_an_unknown_backend_is_refused():
    from tandem.engine.attention import get_attention_backend, resolve_backend_name

    assert resolve_backend_name("auto", "cpu") == "torch"
    assert resolve_backend_name("triton", "cpu") == "triton"
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attention_backend("flash")
