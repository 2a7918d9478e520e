"""The inference engine: paged KV cache, prefix caching, continuous batching.

``LLM`` is the offline API; ``LLMEngine`` the step-level API the services drive. This package
loads torch: processes that must stay light (the router, the SDK) import ``tandem.api`` instead,
where the request and output types live.
"""

from tandem.api.outputs import CompletionOutput, OutputKind, RequestOutput, TokenLogprob
from tandem.api.sampling_params import SamplingParams
from tandem.api.stats import EngineStats
from tandem.engine.config import EngineConfig
from tandem.engine.llm import LLM
from tandem.engine.llm_engine import LLMEngine
from tandem.engine.scheduling_policy import SchedulingPolicy, register_scheduling_policy

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "EngineStats",
    "LLMEngine",
    "OutputKind",
    "RequestOutput",
    "SamplingParams",
    "SchedulingPolicy",
    "TokenLogprob",
    "register_scheduling_policy",
]
