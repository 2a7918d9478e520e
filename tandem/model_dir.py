"""Reading a Hugging Face model directory: architecture, shapes, rope, weights, EOS ids.

Torch-free on purpose: the router reads the same directory (tokenizer, context length,
fingerprint) without loading weights.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from tandem.api.errors import InvalidRequest, ModelLoadError
from tandem.api.sampling_params import SamplingParams
from tandem.api.sampling_request import GENERATION_DEFAULT_FIELDS

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(slots=True, frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF ``rope_parameters`` / legacy ``rope_theta`` +
    ``rope_scaling``)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(slots=True, frozen=True)
class ModelConfig:
    """The shapes and options of a Llama-family decoder, normalised across architectures."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    """q/k/v projections carry a bias (always on Qwen2; ``attention_bias`` on Llama/Qwen3)."""
    o_proj_bias: bool
    """The attention output projection carries a bias (``attention_bias`` on Llama/Qwen3)."""
    mlp_bias: bool
    """The MLP projections carry a bias (Llama's ``mlp_bias``)."""
    qk_norm: bool
    """RMSNorm over each head of q and k before rope (Qwen3)."""
    rope: RopeConfig
    sliding_windows: tuple[int | None, ...]
    """Per layer: attention window in tokens (query included), or None for full attention."""
    torch_dtype: str | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    @property
    def kv_elements_per_token(self) -> int:
        """K and V elements stored per token over all layers (times the dtype's size: bytes)."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e


def _require_dir(model_dir: Path) -> Path:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"model directory {model_dir} has no config.json")
    return model_dir


def _parse_rope(raw: dict[str, Any]) -> RopeConfig:
    # transformers 5 writes rope_parameters (theta inside); older files use rope_theta +
    # rope_scaling.
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"rope type {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
    )


def _sliding_windows(raw: dict[str, Any], arch: str, num_layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        if len(layer_types) != num_layers:
            raise ModelLoadError("config.json layer_types does not have one entry per layer")
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if window is None:
        return (None,) * num_layers
    if arch == "MistralForCausalLM":
        return (window,) * num_layers
    if raw.get("use_sliding_window"):
        first = raw.get("max_window_layers", num_layers)
        return tuple(window if i >= first else None for i in range(num_layers))
    return (None,) * num_layers


def _has_bias(arch: str, raw: dict[str, Any]) -> bool:
    """``attention_bias`` as transformers reads it: honoured by Llama and Qwen3 only."""
    return arch in ("LlamaForCausalLM", "Qwen3ForCausalLM") and bool(
        raw.get("attention_bias", False)
    )


def _eos_ids(model_dir: Path, raw: dict[str, Any]) -> tuple[int, ...]:
    gen_path = model_dir / "generation_config.json"
    eos = _read_json(gen_path).get("eos_token_id") if gen_path.is_file() else None
    if eos is None:
        eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def generation_defaults(model_dir: str | Path) -> dict[str, Any]:
    """The model's recommended sampling (e.g. an instruct model's temperature 0.6, top_p 0.9) from
    its generation_config.json: the defaults for what a request leaves unset, as vLLM serves with
    ``--generation-config auto``. Empty without the file.

    Raises:
        ModelLoadError: the file is not valid JSON, or a field is not a number or out of range.
    """
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    raw = _read_json(path)
    defaults = {}
    for name in GENERATION_DEFAULT_FIELDS:
        value = raw.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ModelLoadError(f"{path}: {name} must be a number, not {value!r}")
        if name == "top_k" and value <= 0:
            continue  # 0 or -1: no top-k (HF's and vLLM's "off")
        defaults[name] = int(value) if name == "top_k" else float(value)
    try:
        SamplingParams(**defaults)  # out of range: fail where the model is loaded, not per request
    except InvalidRequest as e:
        raise ModelLoadError(f"{path}: {e}") from None
    return defaults


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Parse ``config.json`` (and ``generation_config.json``) of a model directory.

    Raises:
        ModelLoadError: the directory or a field is missing, or the architecture is unsupported.
    """
    model_dir = _require_dir(Path(model_dir))
    raw = _read_json(model_dir / "config.json")
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ModelLoadError(
            f"unsupported architecture {archs or '(none given)'} in {model_dir}/config.json; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"hidden_act {raw['hidden_act']!r} is not supported (only silu)")
    try:
        hidden = int(raw["hidden_size"])
        num_heads = int(raw["num_attention_heads"])
        num_layers = int(raw["num_hidden_layers"])
        cfg = ModelConfig(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=_has_bias(arch, raw) or arch == "Qwen2ForCausalLM",
            o_proj_bias=_has_bias(arch, raw),
            mlp_bias=arch == "LlamaForCausalLM" and bool(raw.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            rope=_parse_rope(raw),
            sliding_windows=_sliding_windows(raw, arch, num_layers),
            torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
            eos_token_ids=_eos_ids(model_dir, raw),
            bos_token_id=raw.get("bos_token_id"),
        )
    except KeyError as e:
        raise ModelLoadError(f"{model_dir}/config.json is missing the field {e.args[0]!r}") from e
    if cfg.num_heads % cfg.num_kv_heads:
        raise ModelLoadError("num_attention_heads must be a multiple of num_key_value_heads")
    return cfg


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files holding the weights (all shards named by the index file, if any)."""
    model_dir = _require_dir(Path(model_dir))
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise ModelLoadError(f"{model_dir} is missing weight shard(s) {', '.join(missing)}")
        if names:
            return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir} holds no *.safetensors weights")
    return files


def config_digest(model_dir: str | Path) -> str:
    """A digest of config.json's content (key order aside): names a model's shape, e.g. for
    dummy weights, whose values depend on nothing else."""
    raw = _read_json(_require_dir(Path(model_dir)) / "config.json")
    return xxhash.xxh3_64_hexdigest(json.dumps(raw, sort_keys=True).encode())


def weights_digest(model_dir: str | Path) -> str:
    """A cheap identity of the weights: config plus each shard's size, head and tail bytes.

    Distinguishes fine-tunes of one architecture without reading gigabytes.
    """
    model_dir = Path(model_dir)
    h = xxhash.xxh3_64((model_dir / "config.json").read_bytes())
    for path in weight_files(model_dir):
        size = path.stat().st_size
        h.update(path.name.encode() + size.to_bytes(8, "little"))
        with path.open("rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()
