"""``load_format="dummy"``: random weights of a model's shape, the same in every process.

Benchmarks run real shapes without checkpoints; a prefill pod and a decode pod must then hold the
same weights (and say so in their fingerprints), or every KV transfer between them is refused.
"""

import json
import shutil

from tandem.engine import LLM, SamplingParams


def test_dummy_engines_agree_on_weights_and_fingerprint(llama_dir, tmp_path):
    shape_only = tmp_path / "shape"
    shape_only.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama_dir / name, shape_only / name)  # no safetensors at all
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9], list(range(3, 40))]
    first, second = (LLM(shape_only, load_format="dummy", num_kv_blocks=64) for _ in range(2))
    assert first.engine.fingerprint == second.engine.fingerprint
    outputs = [
        [o.outputs[0].token_ids for o in llm.generate(prompts, params)] for llm in (first, second)
    ]
    assert outputs[0] == outputs[1]
    real = LLM(llama_dir, num_kv_blocks=64)
    assert real.engine.fingerprint.digest() != first.engine.fingerprint.digest()
    # Another shape whose KV layout is the same (only the MLP width differs) is another model.
    config = json.loads((shape_only / "config.json").read_text())
    other = tmp_path / "other-shape"
    shutil.copytree(shape_only, other)
    (other / "config.json").write_text(
        json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2})
    )
    wider = LLM(other, load_format="dummy", num_kv_blocks=64)
    assert wider.engine.fingerprint.digest() != first.engine.fingerprint.digest()
