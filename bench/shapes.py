"""Real models' shapes as model directories: config.json and a tokenizer, weights optional.

Nothing is downloaded: the configs below are the published architectures' numbers, the
tokenizer is trained on text in the repo. ``load_format="dummy"`` runs the engine on such a
directory with random weights; ``with_weights=True`` also writes random weights with
transformers (for comparisons with Hugging Face on the same weights).
"""

from pathlib import Path

SHAPES = {
    "llama-3.2-1b": dict(
        arch="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "llama-3.1-8b": dict(
        arch="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "qwen3-0.6b": dict(
        arch="qwen3",
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
    ),
    # A few-MB stand-in with the same code paths, for trying the benchmarks on CPU.
    "tiny": dict(
        arch="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=1024,
        tie_word_embeddings=True,
        max_position_embeddings=65536,
        rope_theta=10000.0,
    ),
}


def hf_config(name: str, eos_token_id: int, bos_token_id: int):
    from transformers import LlamaConfig, Qwen3Config

    fields = dict(SHAPES[name])
    arch = fields.pop("arch")
    rope = fields.pop("rope_scaling", None)
    theta = fields.pop("rope_theta")
    cls = LlamaConfig if arch == "llama" else Qwen3Config
    config = cls(
        **fields,
        rms_norm_eps=1e-5,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=bos_token_id,
        torch_dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM" if arch == "llama" else "Qwen3ForCausalLM"]
    config.rope_theta = theta
    if rope is not None:
        config.rope_scaling = {**rope, "rope_theta": theta}
    if hasattr(config, "rope_parameters"):  # transformers 5.x keeps rope settings here
        config.rope_parameters = {**(rope or {"rope_type": "default"}), "rope_theta": theta}
    return config


def shape_dir(name: str, out: Path, *, with_weights: bool = False, device: str = "cpu") -> Path:
    """Write the directory for shape ``name`` under ``out`` (reused if already there)."""
    import torch

    from tandem.model_gen import SPECIAL_TOKENS, train_tokenizer

    path = out / (name + ("-weights" if with_weights else ""))
    if (path / "config.json").exists() and (not with_weights or any(path.glob("*.safetensors"))):
        return path
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(1024)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = hf_config(name, eos_token_id=ids["<|im_end|>"], bos_token_id=ids["<|endoftext|>"])
    # Every id the model can sample decodes to text, as with a real tokenizer: otherwise most
    # streamed tokens would carry no text, and serving benchmarks (which time chunks with text,
    # as vLLM's does) would see a few bursts instead of one chunk per token.
    tokenizer.add_tokens([f"<t{i}>" for i in range(len(tokenizer), config.vocab_size)])
    if with_weights:
        from transformers import AutoModelForCausalLM

        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(path)
        del model
    else:
        config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
