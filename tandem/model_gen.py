"""Tiny model generator: a real-architecture model directory with random weights, offline.

Tests and ``tandem up`` use it because nothing may be downloaded from a model hub. The weights
come from ``transformers``' own model classes (``save_pretrained``), so the directory is
byte-for-byte what a Hugging Face checkpoint looks like; the byte-level BPE tokenizer is trained
in about a second with ``tokenizers`` on text that ships inside this package (the Apache-2.0
licence text in ``tandem/assets/``, fixed so that a given seed gives the same model in every
version).
"""

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

CHAT_TEMPLATE = (
    # ChatML; with tools, a system message listing them and calls as Hermes/Qwen 2.5 write them
    # (<tool_call>{"name": ..., "arguments": ...}</tool_call>), so tool requests and histories
    # render as they do for real models. Without tools it renders plain ChatML.
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call functions. Their signatures:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nReturn each call as <tool_call>\\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call>'
    "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{%- for call in message.tool_calls or [] %}"
    "{%- if message['content'] or not loop.first %}{{- '\\n' }}{%- endif %}"
    '{{- \'<tool_call>\\n{"name": "\' + call.function.name + \'", "arguments": \' }}'
    "{{- call.function.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

Arch = Literal["llama", "mistral", "qwen2", "qwen3"]


class ModelGenOptions(BaseModel):
    """Write a small model directory with random weights and a freshly trained tokenizer."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    arch: Arch = "llama"
    """Architecture (transformers model class family)."""
    out: Path
    """Directory to write (created; existing files are overwritten)."""
    layers: int = Field(2, gt=0)
    """Number of decoder layers."""
    hidden: int = Field(64, gt=0)
    """Hidden size."""
    heads: int = Field(4, gt=0)
    """Attention (query) heads."""
    kv_heads: int = Field(2, gt=0)
    """Key/value heads (grouped-query attention when fewer than heads)."""
    head_dim: int | None = Field(None, gt=0)
    """Per-head size; default hidden/heads (qwen3 defaults to twice that, as its configs decouple
    them)."""
    intermediate: int = Field(128, gt=0)
    """MLP intermediate size."""
    vocab: int = Field(1024, ge=300)
    """Target vocabulary size of the trained tokenizer."""
    max_position: int = Field(2048, gt=0)
    """max_position_embeddings (the model's context length)."""
    tie_embeddings: bool = False
    """Share the input embedding and the LM head."""
    rope_scaling: Literal["none", "llama3"] = "none"
    """Rope scaling to configure (llama3 uses a small original context so it takes effect)."""
    sliding_window: int | None = Field(None, gt=0)
    """Sliding attention window for every layer (mistral, qwen2, qwen3)."""
    init_std: float = Field(0.1, gt=0)
    """Standard deviation of the random weights (larger than HF's 0.02 so logits are well apart)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype the weights are saved in."""
    max_shard_size: str | None = None
    """Split the weights into shards of this size (e.g. "200KB"), written with an index file."""
    seed: int = 0
    """Seed of the random weights."""


CORPUS = Path(__file__).resolve().parent / "assets" / "tokenizer_corpus.txt"


def _corpus() -> list[str]:
    """Training text for the tokenizer, one paragraph per item."""
    return [p for p in CORPUS.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def train_tokenizer(vocab_size: int):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def _hf_config(opts: ModelGenOptions, vocab_size: int, token_ids: dict[str, int]):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    head_dim = opts.head_dim or (
        2 * opts.hidden // opts.heads if opts.arch == "qwen3" else opts.hidden // opts.heads
    )
    common = dict(
        vocab_size=vocab_size,
        hidden_size=opts.hidden,
        intermediate_size=opts.intermediate,
        num_hidden_layers=opts.layers,
        num_attention_heads=opts.heads,
        num_key_value_heads=opts.kv_heads,
        head_dim=head_dim,
        max_position_embeddings=opts.max_position,
        tie_word_embeddings=opts.tie_embeddings,
        initializer_range=opts.init_std,
        rms_norm_eps=1e-6,
        bos_token_id=token_ids["<|endoftext|>"],
        eos_token_id=token_ids["<|im_end|>"],
        pad_token_id=token_ids["<|endoftext|>"],
    )
    if opts.arch == "llama":
        if opts.sliding_window:
            raise ValueError("llama has no sliding window; use mistral, qwen2 or qwen3")
        rope = None
        if opts.rope_scaling == "llama3":
            rope = {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 10000.0,
            }
        return LlamaConfig(**common, rope_scaling=rope)
    if opts.rope_scaling != "none":
        raise ValueError("rope_scaling llama3 applies to the llama architecture only")
    if opts.arch == "mistral":
        return MistralConfig(**common, sliding_window=opts.sliding_window)
    window = dict(
        use_sliding_window=opts.sliding_window is not None,
        sliding_window=opts.sliding_window,
        max_window_layers=0,
    )
    if opts.arch == "qwen2":
        return Qwen2Config(**common, **window)
    return Qwen3Config(**common, **window)


def generate_model_dir(opts: ModelGenOptions) -> Path:
    """Write the model directory described by ``opts`` and return its path."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(opts.vocab)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = _hf_config(opts, len(tokenizer), ids)
    dtype = getattr(torch, opts.dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _randomize_norms(model, opts.seed)
    model = model.to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )
    save_kwargs = {"max_shard_size": opts.max_shard_size} if opts.max_shard_size else {}
    model.save_pretrained(out, **save_kwargs)
    tokenizer.save_pretrained(out)
    logger.info(
        "wrote a tiny %s model (%d parameters) to %s", opts.arch, model.num_parameters(), out
    )
    return out


def _randomize_norms(model, seed: int) -> None:
    """Give RMSNorm weights and biases random values so that a loader that drops them fails tests.

    HF initialises norm weights to ones and biases to zeros, which would hide such a bug.
    """
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))


DEFAULT_MODEL_DIR = Path(".tandem/models/tiny-llama")
"""Where ``tandem up`` and ``tandem generate`` keep the tiny model they use without --model."""


def ensure_default_model(path: Path = DEFAULT_MODEL_DIR) -> Path:
    """The generated tiny model used when no --model is given (created on first use).

    Written to a temporary directory and renamed into place, so two ``tandem up`` started side
    by side never load a half-written directory.
    """
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            generate_model_dir(
                ModelGenOptions(arch="llama", out=staging, layers=4, hidden=128, intermediate=256)
            )
            staging.rename(path)
        except OSError:
            if not (path / "config.json").is_file():
                raise  # not another process's complete directory in the way: a real failure
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already if the rename won
    return path
