"""Loading safetensors checkpoints into ``DecoderLM``, shard by shard, with clear errors.

transformers' separate q/k/v and gate/up matrices are copied into the fused parameters; every
parameter must be filled exactly once, and unknown tensors are refused, so a checkpoint that
does not match the config fails loudly instead of generating garbage.

Under tensor parallelism (``tp`` of more than one rank) each rank reads only its slices of each
checkpoint tensor (``safe_open(...).get_slice``): the rows of its q heads, kv heads and
intermediate columns of q/k/v and gate/up, the matching input columns of ``o_proj`` and
``down_proj``; biases of the row-parallel layers, norms, the embedding and the LM head whole.
Dummy weights are drawn at full (one-device) shape in the same order and sliced, so a dummy
model at any TP size is the same model.
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
from tandem.engine.parallel import Shard, TPGroup, shard_for_config
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


# (checkpoint part, dimension split over ranks, what is split) -- anything else is replicated
_SPLIT = (
    (".self_attn.q_proj.", 0, "q"),
    (".self_attn.k_proj.", 0, "kv"),
    (".self_attn.v_proj.", 0, "kv"),
    (".mlp.gate_proj.", 0, "mlp"),
    (".mlp.up_proj.", 0, "mlp"),
    (".self_attn.o_proj.weight", 1, "q"),
    (".mlp.down_proj.weight", 1, "mlp"),
)


def _fused_bounds(config: ModelConfig, shard: Shard, fused_name: str) -> tuple[int, ...]:
    """Row offsets of the parts of a fused parameter as this rank holds it."""
    if ".qkv_proj." in fused_name:
        q = shard.num_heads * config.head_dim
        kv = shard.num_kv_heads * config.head_dim
        return (0, q, q + kv, q + 2 * kv)
    i = shard.intermediate_size
    return (0, i, 2 * i)


def _shard_rows(config: ModelConfig, shard: Shard, fused_name: str, part: int) -> slice:
    bounds = _fused_bounds(config, shard, fused_name)
    return slice(bounds[part], bounds[part + 1])


def _rank_part(config: ModelConfig, shard: Shard, key: str) -> tuple[int, slice, int] | None:
    """``(dim, slice, full size along dim)`` of this rank's part of checkpoint tensor ``key``;
    None: the rank holds it whole."""
    if shard.tp_size == 1:
        return None
    for part, dim, what in _SPLIT:
        if part in key:
            if what == "mlp":
                owned, unit, full = shard.intermediate, 1, config.intermediate_size
            else:
                owned = shard.q_heads if what == "q" else shard.kv_heads
                heads = config.num_heads if what == "q" else config.num_kv_heads
                unit, full = config.head_dim, heads * config.head_dim
            return dim, slice(owned.start * unit, owned.stop * unit), full
    return None


def _read(f, key: str, config: ModelConfig, shard: Shard) -> torch.Tensor:
    """Checkpoint tensor ``key`` (its rank's slice only, read as a slice, under TP)."""
    part = _rank_part(config, shard, key)
    if part is None:
        return f.get_tensor(key)
    dim, rows, full = part
    sliced = f.get_slice(key)
    shape = tuple(sliced.get_shape())
    if len(shape) <= dim or shape[dim] != full:
        raise ModelLoadError(
            f"weight {key!r} has shape {shape}, expected size {full} along dimension {dim}"
        )
    return sliced[rows] if dim == 0 else sliced[:, rows]


def _local_of_full(config: ModelConfig, shard: Shard, name: str, full: torch.Tensor):
    """This rank's part of a full (one-device) parameter ``name``."""
    for fused, parts in ((".self_attn.qkv_proj.", _FUSED[:3]), (".mlp.gate_up_proj.", _FUSED[3:])):
        if fused in name:
            bounds = _fused_bounds(config, shard_for_config(config, 1, 0), name)
            pieces = []
            for ckpt, _, i in parts:
                piece = full[bounds[i] : bounds[i + 1]]
                _, rows, _ = _rank_part(config, shard, name.replace(fused, ckpt))
                pieces.append(piece[rows])
            return torch.cat(pieces)
    part = _rank_part(config, shard, name)
    if part is None:
        return full
    dim, rows, _ = part
    return full[rows] if dim == 0 else full[:, rows]


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
    tp: TPGroup | None = None,
) -> DecoderLM:
    """Build the model on ``device`` in ``dtype`` and fill it from the directory's safetensors.

    ``dummy``: random weights instead (``load_format="dummy"``): benchmarks of a real model's shape
    need only its config.json; speed does not depend on the weights' values.
    ``tp``: this process's tensor-parallel group; the model holds (and reads) the rank's shard.
    """
    with torch.device("meta"):
        # cast on meta: no float32 copy on the GPU
        model = DecoderLM(config, backend, tp).to(dtype)
    shard = model.shard
    model = model.to_empty(device=device)
    # Buffers were created on meta (and cast): recompute rope's float32 frequencies for real.
    inv_freq = inverse_frequencies(config.head_dim, config.rope).to(device)
    for module in model.modules():
        if hasattr(module, "inv_freq"):
            module.inv_freq = inv_freq
    params = dict(model.named_parameters())
    if dummy:
        generator = torch.Generator(device=device).manual_seed(DUMMY_SEED)
        if shard.tp_size > 1:
            with torch.device("meta"):
                full_shapes = {n: p.shape for n, p in DecoderLM(config, backend).named_parameters()}
        for name, p in params.items():
            if name.endswith("norm.weight"):
                p.data.fill_(1.0)
            elif shard.tp_size == 1:
                p.data.normal_(0.0, 0.02, generator=generator)
            else:  # the one-device draw, sliced: the same model at every TP size
                full = torch.empty(full_shapes[name], dtype=p.dtype, device=device)
                full.normal_(0.0, 0.02, generator=generator)
                p.data.copy_(_local_of_full(config, shard, name, full))
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
                if _IGNORED.search(key):
                    continue
                tensor = _read(f, key, config, shard)
                target = _load_tensor(params, config, shard, key, tensor)
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
    params, config: ModelConfig, shard: Shard, key: str, tensor: torch.Tensor
) -> tuple[str, int | None] | None:
    if key == "lm_head.weight" and config.tie_word_embeddings:
        return None  # some tied checkpoints still store the head; it equals the embedding
    for part, fused, part_index in _FUSED:
        if part in key:
            name = key.replace(part, fused)
            param = params.get(name)
            if param is None:
                break
            rows = _shard_rows(config, shard, name, part_index)
            _copy(param.data[rows], tensor, key)
            return (name, part_index)
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
