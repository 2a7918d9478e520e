"""The inference engine: paged KV cache, prefix caching, continuous batching.

``LLM`` is the offline API; ``LLMEngine`` the step-level API the services drive.
"""

from tandem.engine.config import EngineConfig
from tandem.engine.llm import LLM
from tandem.engine.llm_engine import EngineStats, LLMEngine
from tandem.engine.outputs import CompletionOutput, OutputKind, RequestOutput, TokenLogprob
from tandem.engine.sampling_params import SamplingParams
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
