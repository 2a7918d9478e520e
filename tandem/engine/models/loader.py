"""Loading safetensors checkpoints into ``DecoderLM``, shard by shard, with clear errors.

transformers' separate q/k/v and gate/up matrices are copied into the fused parameters; every
parameter must be filled exactly once, and unknown tensors are refused, so a checkpoint that
does not match the config fails loudly instead of generating garbage.
"""

import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open

from tandem.api.errors import ModelLoadError
from tandem.engine.attention import AttentionBackend
from tandem.engine.models.llama import DecoderLM
from tandem.engine.models.rope import inverse_frequencies
from tandem.model_dir import ModelConfig, weight_files

logger = logging.getLogger(__name__)

# (checkpoint part, fused parameter, shard index)
_FUSED = (
    (".self_attn.q_proj.", ".self_attn.qkv_proj.", 0),
    (".self_attn.k_proj.", ".self_attn.qkv_proj.", 1),
    (".self_attn.v_proj.", ".self_attn.qkv_proj.", 2),
    (".mlp.gate_proj.", ".mlp.gate_up_proj.", 0),
    (".mlp.up_proj.", ".mlp.gate_up_proj.", 1),
)
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def _shard_rows(config: ModelConfig, fused_name: str, shard: int) -> slice:
    if ".qkv_proj." in fused_name:
        q = config.num_heads * config.head_dim
        kv = config.num_kv_heads * config.head_dim
        bounds = (0, q, q + kv, q + 2 * kv)
    else:
        i = config.intermediate_size
        bounds = (0, i, 2 * i)
    return slice(bounds[shard], bounds[shard + 1])


DUMMY_SEED = 0
"""Seed of ``load_format="dummy"`` weights: processes on the same kind of device draw the same
ones."""


def load_model(
    model_dir: str | Path,
    config: ModelConfig,
    backend: AttentionBackend,
    *,
    device: torch.device,
    dtype: torch.dtype,
    dummy: bool = False,
) -> DecoderLM:
    """Build the model on ``device`` in ``dtype`` and fill it from the directory's safetensors.

    ``dummy``: random weights instead (``load_format="dummy"``): benchmarks of a real model's shape
    need only its config.json; speed does not depend on the weights' values.
    """
    with torch.device("meta"):
        model = DecoderLM(config, backend).to(dtype)  # cast on meta: no float32 copy on the GPU
    model = model.to_empty(device=device)
    # Buffers were created on meta (and cast): recompute rope's float32 frequencies for real.
    inv_freq = inverse_frequencies(config.head_dim, config.rope).to(device)
    for module in model.modules():
        if hasattr(module, "inv_freq"):
            module.inv_freq = inv_freq
    params = dict(model.named_parameters())
    if dummy:
        generator = torch.Generator(device=device).manual_seed(DUMMY_SEED)
        for name, p in params.items():
            if name.endswith("norm.weight"):
                p.data.fill_(1.0)
            else:
                p.data.normal_(0.0, 0.02, generator=generator)
        return model.eval()
    expected = {
        (name, None) for name in params if ".qkv_proj." not in name and ".gate_up_proj." not in name
    }
    for name in params:
        if ".qkv_proj." in name:
            expected |= {(name, s) for s in range(3)}
        elif ".gate_up_proj." in name:
            expected |= {(name, s) for s in range(2)}
    loaded: set[tuple[str, int | None]] = set()
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                target = _load_tensor(model, params, config, key, f.get_tensor(key))
                if target is not None:
                    loaded.add(target)
    missing = expected - loaded
    if missing:
        names = sorted(_checkpoint_name(n, s) for n, s in missing)
        raise ModelLoadError(
            f"{model_dir} is missing weights: "
            f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
        )
    return model.eval()


def _load_tensor(
    model, params, config, key: str, tensor: torch.Tensor
) -> tuple[str, int | None] | None:
    if _IGNORED.search(key):
        return None
    if key == "lm_head.weight" and config.tie_word_embeddings:
        return None  # some tied checkpoints still store the head; it equals the embedding
    for part, fused, shard in _FUSED:
        if part in key:
            name = key.replace(part, fused)
            param = params.get(name)
            if param is None:
                break
            rows = _shard_rows(config, name, shard)
            _copy(param.data[rows], tensor, key)
            return (name, shard)
    param = params.get(key)
    if param is None:
        raise ModelLoadError(
            f"unexpected weight {key!r} for a {config.architecture} with this config"
        )
    _copy(param.data, tensor, key)
    return (key, None)


def _copy(dst: torch.Tensor, src: torch.Tensor, key: str) -> None:
    if dst.shape != src.shape:
        raise ModelLoadError(
            f"weight {key!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}"
        )
    dst.copy_(src)


def _checkpoint_name(name: str, shard: int | None) -> str:
    if shard is None:
        return name
    for part, fused, s in _FUSED:
        if fused in name and s == shard:
            return name.replace(fused, part)
    return name
