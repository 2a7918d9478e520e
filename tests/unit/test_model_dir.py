"""Model directories: every missing piece or unsupported option is a clear error; shards load."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem.api.errors import ModelLoadError
from tandem.engine import LLM, SamplingParams
from tandem.model_dir import load_model_config, weight_files
from tandem.model_gen import ModelGenOptions, generate_model_dir
from tandem.tokenizer import Tokenizer


@pytest.fixture
def model_copy(llama_dir, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(llama_dir, dst)
    return dst


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_directory_and_files(tmp_path, model_copy):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_config(tmp_path / "nope")
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        Tokenizer(model_copy)
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        weight_files(model_copy)
    (model_copy / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model_config(model_copy)


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            dict(architectures=["GPT2LMHeadModel"]),
            "unsupported architecture \\['GPT2LMHeadModel'\\]",
        ),
        (dict(hidden_size=None), "missing the field 'hidden_size'"),
        (
            dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}),
            "rope type 'yarn' is not supported",
        ),
        (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    ],
)
def test_bad_configs(model_copy, changes, message):
    edit_config(model_copy, **changes)
    with pytest.raises(ModelLoadError, match=message):
        load_model_config(model_copy)


def test_legacy_rope_fields_parse_like_rope_parameters(tiny_model, tmp_path):
    src = tiny_model("llama-tied-rope3")
    dst = tmp_path / "legacy"
    shutil.copytree(src, dst)
    params = json.loads((src / "config.json").read_text())["rope_parameters"]
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    scaling["type"] = scaling.pop("rope_type")
    edit_config(dst, rope_parameters=None, rope_theta=params["rope_theta"], rope_scaling=scaling)
    assert load_model_config(dst).rope == load_model_config(src).rope
    assert load_model_config(dst).rope.rope_type == "llama3"


def test_missing_wrong_and_unexpected_weights(model_copy):
    path = model_copy / "model.safetensors"
    tensors = load_file(path)
    missing = dict(tensors)
    del missing["model.layers.1.self_attn.k_proj.weight"]
    save_file(missing, path)
    with pytest.raises(
        ModelLoadError, match="missing weights: model.layers.1.self_attn.k_proj.weight"
    ):
        LLM(model_copy, num_kv_blocks=8)
    wrong = dict(tensors)
    wrong["model.norm.weight"] = torch.ones(3)
    save_file(wrong, path)
    with pytest.raises(ModelLoadError, match="'model.norm.weight' has shape \\(3,\\)"):
        LLM(model_copy, num_kv_blocks=8)
    extra = dict(tensors)
    extra["model.layers.0.mystery.weight"] = torch.ones(3)
    save_file(extra, path)
    with pytest.raises(ModelLoadError, match="unexpected weight 'model.layers.0.mystery.weight'"):
        LLM(model_copy, num_kv_blocks=8)


def test_sharded_checkpoint_loads_like_a_single_file(llama_dir, tmp_path):
    sharded = generate_model_dir(
        ModelGenOptions(arch="llama", out=tmp_path / "sharded", max_shard_size="100KB")
    )
    files = weight_files(sharded)
    assert len(files) > 2 and (sharded / "model.safetensors.index.json").is_file()
    params = SamplingParams(temperature=0, max_tokens=12)
    a = LLM(sharded, num_kv_blocks=16).generate(["sharded weights"], params)[0].outputs[0].token_ids
    b = (
        LLM(llama_dir, num_kv_blocks=16)
        .generate(["sharded weights"], params)[0]
        .outputs[0]
        .token_ids
    )
    assert a == b
    files[1].unlink()
    with pytest.raises(ModelLoadError, match="missing weight shard"):
        weight_files(sharded)


def test_max_model_len_beyond_the_model_is_refused(llama_dir):
    with pytest.raises(ModelLoadError, match="exceeds the model's max_position_embeddings"):
        LLM(llama_dir, max_model_len=10**6, num_kv_blocks=8)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_float32(llama_dir, dtype):
    p = SamplingParams(temperature=0, max_tokens=4, logprobs=0)
    ref = LLM(llama_dir, num_kv_blocks=16).generate(["half precision"], p)[0].outputs[0]
    half = LLM(llama_dir, num_kv_blocks=16, dtype=dtype)
    assert half.engine.runner.kv_cache.tensor.dtype == getattr(torch, dtype)
    out = half.generate(["half precision"], p)[0].outputs[0]
    assert out.token_ids[0] == ref.token_ids[0]
    assert abs(out.logprobs[0].logprob - ref.logprobs[0].logprob) < 0.1


def write_generation_config(path, **fields):
    (path / "generation_config.json").write_text(json.dumps(fields))


def greedy(model_dir, prompt="generation config", max_tokens=20):
    llm = LLM(model_dir, num_kv_blocks=16)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens))[0]
    return llm, out.outputs[0]


def test_without_generation_config_eos_comes_from_config_json(model_copy):
    (model_copy / "generation_config.json").unlink()
    config_eos = json.loads((model_copy / "config.json").read_text())["eos_token_id"]
    assert load_model_config(model_copy).eos_token_ids == (config_eos,)
    llm, base = greedy(model_copy)
    assert llm.engine.eos_token_ids == (config_eos,)
    # A token the model emits becomes the stop token once config.json names it as EOS.
    k = next(i for i, t in enumerate(base.token_ids) if i and t not in base.token_ids[:i])
    edit_config(model_copy, eos_token_id=base.token_ids[k])
    out = greedy(model_copy)[1]
    assert (out.token_ids, out.finish_reason) == (base.token_ids[: k + 1], "stop")
    # Neither file names an EOS: the tokenizer's EOS token is the last resort.
    edit_config(model_copy, eos_token_id=None)
    llm = LLM(model_copy, num_kv_blocks=16)
    assert load_model_config(model_copy).eos_token_ids == ()
    assert llm.engine.eos_token_ids == (llm.tokenizer.eos_token_id,) == (config_eos,)


def test_generation_config_eos_list_is_honoured_over_config_json(model_copy):
    config_eos = json.loads((model_copy / "config.json").read_text())["eos_token_id"]
    write_generation_config(model_copy, eos_token_id=[config_eos])
    base = greedy(model_copy)[1]
    tokens = base.token_ids
    k = next(i for i, t in enumerate(tokens) if i and t not in tokens[:i] and t != config_eos)
    extra = base.token_ids[k]
    # `extra` is an EOS id in generation_config.json only: generation stops on it.
    write_generation_config(model_copy, eos_token_id=[config_eos, extra])
    assert load_model_config(model_copy).eos_token_ids == (config_eos, extra)
    llm, out = greedy(model_copy)
    assert llm.engine.eos_token_ids == (config_eos, extra)
    assert (out.token_ids, out.finish_reason) == (base.token_ids[: k + 1], "stop")
    # As in transformers, generation_config.json wins: config.json naming `extra` does not stop.
    edit_config(model_copy, eos_token_id=extra)
    write_generation_config(model_copy, eos_token_id=config_eos)
    assert load_model_config(model_copy).eos_token_ids == (config_eos,)
    assert greedy(model_copy)[1].token_ids == base.token_ids
    # A generation_config.json without eos_token_id falls back to config.json.
    write_generation_config(model_copy, bos_token_id=0)
    assert load_model_config(model_copy).eos_token_ids == (extra,)
