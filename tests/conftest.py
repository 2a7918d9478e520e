"""Shared fixtures: tiny model directories of every supported architecture, generated once."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# name -> model-gen options. Each is a real transformers architecture with random weights.
TINY_MODELS = {
    "llama": dict(arch="llama"),
    "llama-tied-rope3": dict(arch="llama", tie_embeddings=True, rope_scaling="llama3", seed=1),
    "mistral-swa": dict(arch="mistral", sliding_window=24, seed=2),
    "qwen2": dict(arch="qwen2", seed=3),
    "qwen3": dict(arch="qwen3", seed=4),
}


def _gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def pytest_collection_modifyitems(config, items):
    if _gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(model_root):
    """Returns a function name -> model directory (generated on first use)."""
    from tandem.model_gen import ModelGenOptions, generate_model_dir

    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = generate_model_dir(ModelGenOptions(out=model_root / name, **TINY_MODELS[name]))
        return made[name]

    return get


@pytest.fixture(scope="session")
def llama_dir(tiny_model) -> Path:
    return tiny_model("llama")
