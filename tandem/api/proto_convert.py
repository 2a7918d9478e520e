"""Protobuf <-> the dataclasses of ``tandem.api``: the only place any process translates
between them (router, pods, SDK).

Mechanical both ways: validation and defaults belong to ``tandem.api.sampling_request``.
"""

from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import descriptor

from tandem.api.errors import InvalidRequest
from tandem.api.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from tandem.api.requests import Job, Resume, TokenEvent, Usage
from tandem.api.sampling_params import SAMPLING_FIELDS, SamplingParams, StructuredOutputs
from tandem.api.stats import EngineStats
from tandem.proto.common.v1 import common_pb2
from tandem.proto.decode.v1 import decode_pb2
from tandem.proto.prefill.v1 import prefill_pb2

FINISH_REASON_TO_PROTO = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}
FINISH_REASON_FROM_PROTO = {v: k for k, v in FINISH_REASON_TO_PROTO.items()}

# ---- sampling parameters -----------------------------------------------------------------------
#
# The message mirrors SamplingParams field for field (SAMPLING_FIELDS; a unit test holds the two
# equal), so these walk the message's descriptor instead of keeping a list of their own.

_FLOAT = descriptor.FieldDescriptor.TYPE_FLOAT


def sampling_fields_from_proto(pb: common_pb2.SamplingParams) -> dict[str, Any]:
    """The fields a message sets, by ``SamplingParams`` name: optional fields when present,
    lists when non-empty, plain scalars when not zero (their zero is the dataclass default)."""
    fields: dict[str, Any] = {}
    for f in pb.DESCRIPTOR.fields:
        value = getattr(pb, f.name)
        if f.name == "logit_bias":
            if value:
                fields[f.name] = tuple(sorted((t, _round_float32(b)) for t, b in value.items()))
        elif f.name == "structured_outputs":
            if pb.HasField(f.name):
                fields[f.name] = structured_outputs_from_proto(value)
        elif f.is_repeated:
            if value:
                fields[f.name] = tuple(value)
        elif f.has_presence:
            if pb.HasField(f.name):
                fields[f.name] = _round_float32(value) if f.type == _FLOAT else value
        elif value:
            fields[f.name] = value
    return fields


def _round_float32(x: float) -> float:
    # proto floats are float32: 0.7 arrives as 0.699999988. Seven significant digits give back
    # the value the caller wrote, so the same request samples the same way locally and remotely.
    return float(f"{x:.7g}")


def sampling_fields_to_proto(fields: Mapping[str, Any]) -> common_pb2.SamplingParams:
    """A message setting exactly ``fields`` (by ``SamplingParams`` name; None: left unset).

    Raises:
        InvalidRequest: an unknown field, or a value the message cannot carry (a string where
            a number goes, a negative token id, ...); ``param`` names the field.
    """
    pb = common_pb2.SamplingParams()
    by_name = pb.DESCRIPTOR.fields_by_name
    for name, value in fields.items():
        if value is None:
            continue
        f = by_name.get(name)
        if f is None:
            raise InvalidRequest(f"unknown sampling option {name!r}", param=name)
        try:
            if name == "logit_bias":
                pb.logit_bias.update(value.items() if isinstance(value, Mapping) else value)
            elif name == "structured_outputs":
                pb.structured_outputs.CopyFrom(structured_outputs_to_proto(value))
            elif f.is_repeated:
                getattr(pb, name).extend([value] if isinstance(value, str) else value)
            else:
                setattr(pb, name, value)
        except (TypeError, ValueError) as e:
            raise InvalidRequest(f"{name}: {e}", param=name) from None
    return pb


def structured_outputs_to_proto(so: StructuredOutputs) -> common_pb2.StructuredOutputs:
    if isinstance(so, Mapping):
        so = StructuredOutputs(**so)
    if so.choice is not None:
        return common_pb2.StructuredOutputs(choice=common_pb2.ChoiceList(choices=so.choice))
    return common_pb2.StructuredOutputs(**{so.kind: getattr(so, so.kind)})


def structured_outputs_from_proto(pb: common_pb2.StructuredOutputs) -> StructuredOutputs:
    """Raises ``InvalidRequest`` for a message with no constraint set."""
    which = pb.WhichOneof("constraint")
    if which is None:
        raise InvalidRequest("structured_outputs sets no constraint", param="structured_outputs")
    if which == "choice":
        return StructuredOutputs(choice=tuple(pb.choice.choices))
    return StructuredOutputs(**{which: getattr(pb, which)})


def sampling_params_from_proto(pb: common_pb2.SamplingParams) -> SamplingParams:
    """The SamplingParams a pod runs: the router resolved defaults and limits already.

    Raises:
        InvalidRequest: a value is out of range (``param`` names the field).
    """
    return SamplingParams(**sampling_fields_from_proto(pb))


def sampling_params_to_proto(sp: SamplingParams) -> common_pb2.SamplingParams:
    return sampling_fields_to_proto({name: getattr(sp, name) for name in SAMPLING_FIELDS})


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
    token_ids: Iterable[int],
    text: str,
    logprobs: Iterable[TokenLogprob],
    finish_reason,
    stop,
    prompt_logprobs: Iterable[TokenLogprob] | None = None,
) -> common_pb2.TokenChunk:
    chunk = common_pb2.TokenChunk(
        token_ids=list(token_ids),
        text=text,
        logprobs=[logprob_to_proto(lp) for lp in logprobs],
        finish_reason=FINISH_REASON_TO_PROTO[finish_reason],
        prompt_logprobs=[logprob_to_proto(lp) for lp in prompt_logprobs or ()],
    )
    if isinstance(stop, str):
        chunk.stop_string = stop
    elif isinstance(stop, int):
        chunk.stop_token_id = stop
    return chunk


def token_chunk(out: RequestOutput, comp: CompletionOutput | None = None) -> common_pb2.TokenChunk:
    """The engine's output for one request (its completion ``comp``, of its n; the first by
    default), as the decode pod streams it. Prompt logprobs go with the first completion."""
    first = out.outputs[0]
    comp = first if comp is None else comp
    chunk = _chunk(
        comp.token_ids,
        comp.text,
        comp.logprobs or (),
        comp.finish_reason,
        comp.stop_reason,
        out.prompt_logprobs if comp is first else None,
    )
    chunk.index = comp.index
    return chunk


def event_chunk(event: TokenEvent) -> common_pb2.TokenChunk:
    """A router token event, as RouterService streams it."""
    chunk = _chunk(
        event.token_ids,
        event.text,
        event.logprobs,
        event.finish_reason,
        event.stop_reason,
        event.prompt_logprobs,
    )
    chunk.index = event.index
    return chunk


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
        index=chunk.index,
        prompt_logprobs=chunk_prompt_logprobs(chunk),
    )


def chunk_prompt_logprobs(chunk: common_pb2.TokenChunk) -> list[TokenLogprob] | None:
    """A chunk's prompt logprobs (None: none carried; a one-token prompt's first chunk carries
    none either, and its client reads that as no entries)."""
    if not chunk.prompt_logprobs:
        return None
    return [logprob_from_proto(lp) for lp in chunk.prompt_logprobs]


# ---- requests between router and pods ----------------------------------------------------------


def resume_to_proto(resume: Resume | None) -> common_pb2.Resume | None:
    if resume is None:
        return None
    return common_pb2.Resume(
        num_output_tokens=len(resume.output_token_ids), num_text_chars=resume.num_text_chars
    )


def decode_generate_request(
    job: Job, request_id: str, *, remote: bool
) -> decode_pb2.GenerateRequest:
    return decode_pb2.GenerateRequest(
        request_id=request_id,
        prompt_token_ids=job.token_ids,
        sampling_params=sampling_params_to_proto(job.params),
        prefill_mode=decode_pb2.PREFILL_MODE_REMOTE if remote else decode_pb2.PREFILL_MODE_LOCAL,
        priority=job.priority,
        cache_salt=job.cache_salt or "",
        resume=resume_to_proto(job.resume),
    )


def prefill_request(
    job: Job,
    request_id: str,
    decode_address: str,
    skip_blocks: int,
    fingerprint: str,
    admitted: "decode_pb2.Admitted | None" = None,
) -> prefill_pb2.PrefillRequest:
    """The prefill half of a disaggregated request; ``admitted`` (the decode pod's answer)
    carries the lease the prefill pod's writer presents and the reserved blocks' ids."""
    request = prefill_pb2.PrefillRequest(
        request_id=request_id,
        prompt_token_ids=job.token_ids,
        sampling_params=sampling_params_to_proto(job.params),
        priority=job.priority,
        cache_salt=job.cache_salt or "",
        resume=resume_to_proto(job.resume),
        decode_target=prefill_pb2.DecodeTarget(
            address=decode_address,
            request_id=request_id,
            skip_blocks=skip_blocks,
            model_fingerprint=fingerprint,
        ),
    )
    if admitted is not None:
        t = request.decode_target
        t.transfer_token = admitted.transfer_token
        t.lease_expires_unix_ms = admitted.lease_expires_unix_ms
        t.block_ids.extend(admitted.block_ids)
        t.incarnation = admitted.incarnation
    return request


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
    if out.prompt_logprobs:
        end.prompt_logprobs.extend(logprob_to_proto(lp) for lp in out.prompt_logprobs)
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


def pod_stats(stats: EngineStats, **identity) -> common_pb2.PodStats:
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


def num_output_tokens(request: decode_pb2.GenerateRequest | prefill_pb2.PrefillRequest) -> int:
    """How many trailing prompt tokens of a (migrated) request are output already generated."""
    return request.resume.num_output_tokens if request.HasField("resume") else 0


def num_text_chars(request: decode_pb2.GenerateRequest) -> int | None:
    """Characters of a migrated request's text its client has (None: not a migrated request)."""
    return request.resume.num_text_chars if request.HasField("resume") else None


def prompt_ids(ids) -> list[int]:
    """Validated prompt token ids of a request message."""
    ids = list(ids)
    if not ids:
        raise InvalidRequest("prompt_token_ids is empty", param="prompt_token_ids")
    return ids
