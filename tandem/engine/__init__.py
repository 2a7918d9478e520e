"""The inference engine: paged KV cache, prefix caching, continuous batching.

``LLM`` is the offline API; ``LLMEngine`` the step-level API the services drive. Names are
imported on first use, so that light users (the router, the SDK) can import
``tandem.engine.sampling_params`` without loading torch.
"""

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "LLM": "tandem.engine.llm",
    "CompletionOutput": "tandem.engine.outputs",
    "EngineConfig": "tandem.engine.config",
    "EngineStats": "tandem.engine.llm_engine",
    "LLMEngine": "tandem.engine.llm_engine",
    "OutputKind": "tandem.engine.outputs",
    "RequestOutput": "tandem.engine.outputs",
    "SamplingParams": "tandem.engine.sampling_params",
    "SchedulingPolicy": "tandem.engine.scheduling_policy",
    "TokenLogprob": "tandem.engine.outputs",
    "register_scheduling_policy": "tandem.engine.scheduling_policy",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tandem.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


if TYPE_CHECKING:  # pragma: no cover
    from tandem.engine.config import EngineConfig
    from tandem.engine.llm import LLM
    from tandem.engine.llm_engine import EngineStats, LLMEngine
    from tandem.engine.outputs import CompletionOutput, OutputKind, RequestOutput, TokenLogprob
    from tandem.engine.sampling_params import SamplingParams
    from tandem.engine.scheduling_policy import SchedulingPolicy, register_scheduling_policy
