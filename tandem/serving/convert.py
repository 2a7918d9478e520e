"""Protobuf <-> engine and router dataclasses: the only place the services translate between them.

Torch-free (the router and the SDK use it too).
"""

from collections.abc import Iterable
from typing import TYPE_CHECKING

from tandem.engine.outputs import RequestMetrics, RequestOutput, TokenLogprob
from tandem.engine.sampling_params import SamplingParams
from tandem.errors import InvalidRequest
from tandem.proto.common.v1 import common_pb2
from tandem.proto.decode.v1 import decode_pb2
from tandem.proto.prefill.v1 import prefill_pb2
from tandem.serving.requests import Job, TokenEvent, Usage

if TYPE_CHECKING:  # pragma: no cover
    from tandem.engine.llm_engine import EngineStats

FINISH_REASON_TO_PROTO = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}
FINISH_REASON_FROM_PROTO = {v: k for k, v in FINISH_REASON_TO_PROTO.items()}

_OPTIONAL_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logprobs",
    "skip_special_tokens",
)

# ---- sampling parameters -----------------------------------------------------------------------


def sampling_params_from_proto(
    pb: common_pb2.SamplingParams, *, max_tokens: int | None = None, defaults: dict | None = None
) -> SamplingParams:
    """Engine SamplingParams; unset optional fields take ``defaults``, else the engine's.

    Args:
        max_tokens: overrides the message's max_tokens (the router resolves it against the context).
        defaults: values for unset fields (the router's: the model's generation config).

    Raises:
        InvalidRequest: a value is out of range (``param`` names the field).
    """
    kwargs: dict = dict(defaults or {})
    kwargs.update({name: getattr(pb, name) for name in _OPTIONAL_FIELDS if pb.HasField(name)})
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    elif pb.HasField("max_tokens"):
        kwargs["max_tokens"] = pb.max_tokens
    for name in (
        "temperature",
        "top_p",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    ):
        if name in kwargs:
            kwargs[name] = _round_float32(kwargs[name])
    return SamplingParams(
        stop=tuple(pb.stop),
        stop_token_ids=tuple(pb.stop_token_ids),
        include_stop_str_in_output=pb.include_stop_str_in_output,
        ignore_eos=pb.ignore_eos,
        min_tokens=pb.min_tokens,
        **kwargs,
    )


def _round_float32(x: float) -> float:
    # proto floats are float32: 0.7 arrives as 0.699999988. Seven significant digits give back
    # the value the caller wrote, so the same request samples the same way locally and remotely.
    return float(f"{x:.7g}")


def sampling_params_to_proto(sp: SamplingParams) -> common_pb2.SamplingParams:
    pb = common_pb2.SamplingParams(
        max_tokens=sp.max_tokens,
        temperature=sp.temperature,
        top_p=sp.top_p,
        min_p=sp.min_p,
        presence_penalty=sp.presence_penalty,
        frequency_penalty=sp.frequency_penalty,
        repetition_penalty=sp.repetition_penalty,
        stop=list(sp.stop),
        stop_token_ids=list(sp.stop_token_ids),
        include_stop_str_in_output=sp.include_stop_str_in_output,
        ignore_eos=sp.ignore_eos,
        min_tokens=sp.min_tokens,
        skip_special_tokens=sp.skip_special_tokens,
    )
    if sp.top_k is not None:
        pb.top_k = sp.top_k
    if sp.seed is not None:
        pb.seed = sp.seed
    if sp.logprobs is not None:
        pb.logprobs = sp.logprobs
    return pb


# ---- tokens, logprobs, usage -------------------------------------------------------------------


def logprob_to_proto(lp: TokenLogprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        rank=lp.rank,
        top=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )


def logprob_from_proto(pb: common_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(
        pb.token_id, pb.logprob, pb.rank, tuple((t.token_id, t.logprob) for t in pb.top)
    )


def _chunk(
    token_ids: Iterable[int], text: str, logprobs: Iterable[TokenLogprob], finish_reason, stop
) -> common_pb2.TokenChunk:
    chunk = common_pb2.TokenChunk(
        token_ids=list(token_ids),
        text=text,
        logprobs=[logprob_to_proto(lp) for lp in logprobs],
        finish_reason=FINISH_REASON_TO_PROTO[finish_reason],
    )
    if isinstance(stop, str):
        chunk.stop_string = stop
    elif isinstance(stop, int):
        chunk.stop_token_id = stop
    return chunk


def token_chunk(out: RequestOutput) -> common_pb2.TokenChunk:
    """The engine's output for one request, as the decode pod streams it."""
    comp = out.outputs[0]
    return _chunk(
        comp.token_ids, comp.text, comp.logprobs or (), comp.finish_reason, comp.stop_reason
    )


def event_chunk(event: TokenEvent) -> common_pb2.TokenChunk:
    """A router token event, as RouterService streams it."""
    return _chunk(
        event.token_ids, event.text, event.logprobs, event.finish_reason, event.stop_reason
    )


def stop_reason(chunk: common_pb2.TokenChunk) -> str | int | None:
    which = chunk.WhichOneof("stop_reason")
    return getattr(chunk, which) if which else None


def usage(out: RequestOutput, completion_tokens: int) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=len(out.prompt_token_ids),
        completion_tokens=completion_tokens,
        cached_tokens=out.num_cached_tokens,
    )


def usage_to_proto(u: Usage) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        cached_tokens=u.cached_tokens,
    )


def usage_from_proto(u: common_pb2.Usage) -> Usage:
    return Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)


def token_event(resp: decode_pb2.GenerateResponse) -> TokenEvent:
    """A decode pod's streamed response, as the router relays it."""
    chunk = resp.chunk
    return TokenEvent(
        token_ids=list(chunk.token_ids),
        text=chunk.text,
        logprobs=[logprob_from_proto(lp) for lp in chunk.logprobs],
        finish_reason=FINISH_REASON_FROM_PROTO[chunk.finish_reason],
        stop_reason=stop_reason(chunk),
        usage=usage_from_proto(resp.usage) if resp.HasField("usage") else None,
    )


# ---- requests between router and pods ----------------------------------------------------------


def decode_generate_request(
    job: Job, request_id: str, *, remote: bool
) -> decode_pb2.GenerateRequest:
    return decode_pb2.GenerateRequest(
        request_id=request_id,
        prompt_token_ids=job.prompt_token_ids,
        sampling_params=sampling_params_to_proto(job.params),
        prefill_mode=decode_pb2.PREFILL_MODE_REMOTE if remote else decode_pb2.PREFILL_MODE_LOCAL,
        priority=job.priority,
        cache_salt=job.cache_salt or "",
    )


def prefill_request(
    job: Job, request_id: str, decode_address: str, skip_blocks: int, fingerprint: str
) -> prefill_pb2.PrefillRequest:
    return prefill_pb2.PrefillRequest(
        request_id=request_id,
        prompt_token_ids=job.prompt_token_ids,
        sampling_params=sampling_params_to_proto(job.params),
        priority=job.priority,
        cache_salt=job.cache_salt or "",
        decode_target=prefill_pb2.DecodeTarget(
            address=decode_address,
            request_id=request_id,
            skip_blocks=skip_blocks,
            model_fingerprint=fingerprint,
        ),
    )


def transfer_end(out: RequestOutput, request_id: str, fingerprint: str) -> common_pb2.KVTransferEnd:
    """The end of a prefill pod's KV transfer: its first token (and logprob) and cache hits."""
    comp = out.outputs[0]
    end = common_pb2.KVTransferEnd(
        request_id=request_id,
        model_fingerprint=fingerprint,
        first_token_id=comp.token_ids[0],
        num_cached_tokens=out.num_cached_tokens,
    )
    if comp.logprobs:
        end.first_token_logprob.CopyFrom(logprob_to_proto(comp.logprobs[0]))
    return end


def prefill_timing(m: RequestMetrics, transfer_seconds: float) -> prefill_pb2.PrefillTiming:
    scheduled = m.first_scheduled_time or m.arrival_time
    first_token = m.first_token_time or scheduled
    return prefill_pb2.PrefillTiming(
        queue_seconds=scheduled - m.arrival_time,
        compute_seconds=first_token - scheduled,
        transfer_seconds=transfer_seconds,
    )


# ---- pods ---------------------------------------------------------------------------------------


def pod_stats(stats: "EngineStats", **identity) -> common_pb2.PodStats:
    """PodStats from engine counters plus identity fields (role, pod_id, model, ...)."""
    return common_pb2.PodStats(
        num_running=stats.num_running,
        num_waiting=stats.num_waiting,
        num_waiting_for_kv=stats.num_waiting_for_kv,
        num_queued_prefill_tokens=stats.num_queued_prefill_tokens,
        num_free_blocks=stats.num_free_blocks,
        num_total_blocks=stats.num_total_blocks,
        num_cached_blocks=stats.num_cached_blocks,
        prefix_cache_queries=stats.prefix_cache_queries,
        prefix_cache_hits=stats.prefix_cache_hits,
        num_preemptions=stats.num_preemptions,
        **identity,
    )


def prompt_ids(ids) -> list[int]:
    """Validated prompt token ids of a request message."""
    ids = list(ids)
    if not ids:
        raise InvalidRequest("prompt_token_ids is empty", param="prompt_token_ids")
    return ids
