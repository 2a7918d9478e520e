"""Loading safetensors checkpoints into ``DecoderLM``, shard by shard, with clear errors.

transformers' separate q/k/v and gate/up matrices are copied into the fused parameters; every
parameter must be filled exactly once, and unknown tensors are refused, so a checkpoint that
does not match the config fails loudly instead of generating garbage.

Under tensor parallelism (``tp`` of more than one rank) each rank reads only its slices of each
checkpoint tensor (``safe_open(...).get_slice``): the rows of its q heads, kv heads and
intermediate columns of q/k/v and gate/up, the matching input columns of ``o_proj`` and
``down_proj``, its vocabulary rows of the embedding and the LM head; biases of the row-parallel
layers and the norms whole.
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
from tandem.engine.parallel.sharding import vocab_rows
from tandem.model_dir import ModelConfig, weight_files

logger = logging.getLogger(__name__)

# Checkpoint tensors are matched by their exact module path tail and leaf ("weight"/"bias"),
# never by substring: ``o_proj.weight_scale_inv`` or ``q_proj_extra.weight`` is not a part.
_FUSED = {
    # checkpoint module -> (fused parameter module, part index)
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_FUSED_PARTS = {"self_attn.qkv_proj": 3, "mlp.gate_up_proj": 2}
"""Fused parameter module -> how many checkpoint parts fill it."""
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")
_LEAVES = ("weight", "bias")

# What is split over ranks (q heads, kv heads or MLP columns) -- anything else is replicated:
# column-parallel modules by output rows (weight and bias), row-parallel ones by the weight's
# input columns (their bias is added once, after the all-reduce: whole on every rank).
_COLUMN = {
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "kv",
    "self_attn.v_proj": "kv",
    "mlp.gate_proj": "mlp",
    "mlp.up_proj": "mlp",
}
_ROW = {"self_attn.o_proj": "q", "mlp.down_proj": "mlp"}
_VOCAB = ("model.embed_tokens", "lm_head")
"""Vocabulary-parallel: split by rows (``vocab_rows``); the last rank's padding rows are zero."""


def _split_key(key: str) -> tuple[str, str, str]:
    """``(prefix, module, leaf)`` of a tensor name: ``model.layers.3``, ``self_attn.q_proj``,
    ``weight`` (module: the last two path components before the leaf)."""
    parts = key.split(".")
    return ".".join(parts[:-3]), ".".join(parts[-3:-1]), parts[-1]


def _join(prefix: str, module: str, leaf: str) -> str:
    return f"{prefix}.{module}.{leaf}" if prefix else f"{module}.{leaf}"


def _fused_of(key: str) -> tuple[str, int] | None:
    """``(fused parameter name, part index)`` for a checkpoint q/k/v or gate/up tensor."""
    prefix, module, leaf = _split_key(key)
    if module not in _FUSED or leaf not in _LEAVES:
        return None
    fused, index = _FUSED[module]
    return _join(prefix, fused, leaf), index


def _fused_module(name: str) -> str | None:
    """The fused module (``self_attn.qkv_proj``/``mlp.gate_up_proj``) parameter ``name`` is of."""
    _, module, leaf = _split_key(name)
    return module if module in _FUSED_PARTS and leaf in _LEAVES else None


def _fused_bounds(config: ModelConfig, shard: Shard, fused_name: str) -> tuple[int, ...]:
    """Row offsets of the parts of a fused parameter as this rank holds it."""
    if _fused_module(fused_name) == "self_attn.qkv_proj":
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
    _, module, leaf = _split_key(key)
    if module in _VOCAB and leaf == "weight":
        rows, _ = vocab_rows(config.vocab_size, shard.tp_size, shard.rank)
        return 0, slice(rows.start, rows.stop), config.vocab_size
    if module in _COLUMN and leaf in _LEAVES:
        dim, what = 0, _COLUMN[module]
    elif module in _ROW and leaf == "weight":
        dim, what = 1, _ROW[module]
    else:
        return None
    if what == "mlp":
        owned, unit, full = shard.intermediate, 1, config.intermediate_size
    else:
        owned = shard.q_heads if what == "q" else shard.kv_heads
        heads = config.num_heads if what == "q" else config.num_kv_heads
        unit, full = config.head_dim, heads * config.head_dim
    return dim, slice(owned.start * unit, owned.stop * unit), full


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
    fused = _fused_module(name)
    if fused is not None:
        bounds = _fused_bounds(config, shard_for_config(config, 1, 0), name)
        pieces = []
        for i in range(_FUSED_PARTS[fused]):
            piece = full[bounds[i] : bounds[i + 1]]
            _, rows, _ = _rank_part(config, shard, _checkpoint_name(name, i))
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
        _fill_dummy(params, config, backend, shard, device)
        return model.eval()
    expected: set[tuple[str, int | None]] = set()
    for name in params:
        fused = _fused_module(name)
        parts = range(_FUSED_PARTS[fused]) if fused is not None else (None,)
        expected |= {(name, part) for part in parts}
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


def _fill_dummy(
    params: dict[str, torch.nn.Parameter],
    config: ModelConfig,
    backend: AttentionBackend,
    shard: Shard,
    device: torch.device,
) -> None:
    """Fill ``params`` with ``load_format="dummy"`` weights: norms 1, the rest N(0, 0.02) drawn
    from ``DUMMY_SEED`` in parameter order. Under TP each parameter is drawn at its full
    (one-device) shape and this rank's slice kept, so the model is the same at every TP size."""
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
            _fill(p.data, _local_of_full(config, shard, name, full), name)


def _load_tensor(
    params, config: ModelConfig, shard: Shard, key: str, tensor: torch.Tensor
) -> tuple[str, int | None] | None:
    if key == "lm_head.weight" and config.tie_word_embeddings:
        return None  # some tied checkpoints still store the head; it equals the embedding
    fused = _fused_of(key)
    if fused is not None and fused[0] in params:
        name, part_index = fused
        rows = _shard_rows(config, shard, name, part_index)
        _copy(params[name].data[rows], tensor, key)
        return (name, part_index)
    param = params.get(key)
    if param is None:
        raise ModelLoadError(
            f"unexpected weight {key!r} for a {config.architecture} with this config"
        )
    _fill(param.data, tensor, key)
    return (key, None)


def _fill(dst: torch.Tensor, src: torch.Tensor, key: str) -> None:
    """``_copy``, except that a vocabulary-parallel rank's rows past the vocabulary (the last
    rank's padding) are zeroed: their logits are cut off, their embeddings never looked up."""
    if dst.shape[0] > src.shape[0] and _split_key(key)[1] in _VOCAB:
        dst[src.shape[0] :].zero_()
        dst = dst[: src.shape[0]]
    _copy(dst, src, key)


def _copy(dst: torch.Tensor, src: torch.Tensor, key: str) -> None:
    if dst.shape != src.shape:
        raise ModelLoadError(
            f"weight {key!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}"
        )
    dst.copy_(src)


def _checkpoint_name(name: str, part: int | None) -> str:
    """The checkpoint tensor that fills part ``part`` of parameter ``name`` (None: whole)."""
    if part is None:
        return name
    prefix, module, leaf = _split_key(name)
    for ckpt, (fused, index) in _FUSED.items():
        if fused == module and index == part:
            return _join(prefix, ckpt, leaf)
    return name
