"""A request's path through the pods, with retries before the first token.

1. Pick a decode pod and call ``Generate``: it reserves the prompt's KV blocks and answers
   ``Admitted`` (or RESOURCE_EXHAUSTED: try the next decode pod; all full -> 429).
2. Disaggregated: pick a prefill pod and call ``Prefill`` with the decode pod as KV target.
   Prompts shorter than ``colocate_below_tokens``, or no prefill pod up: the decode pod
   prefills itself (colocated).
3. Relay the decode pod's token stream.

A failure before any token reached the client (a prefill pod dies mid-transfer, a KV stream is
refused, a pod is unreachable) is retried on other pods, ending with colocated mode; after the
first token it is reported. Whatever ends the request -- completion, error, the client going
away -- both calls are cancelled, so the pods free the request's blocks.
"""

import asyncio
import itertools
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import numpy as np
from opentelemetry import context as otel_context

from services.router.pods import Pod, PodRegistry
from services.router.prefix_index import PrefixIndexClient
from services.router.request_trace import RequestTrace, route_attributes
from services.router.routing import PrefillCandidate, PrefillScorer, PrefixLoadScorer, pick_decode
from services.router.settings import RouterSettings
from tandem import telemetry
from tandem.api import proto_convert
from tandem.api.errors import (
    CapacityExceeded,
    DeadlineExceeded,
    KVTransferError,
    RequestTooLarge,
    TandemError,
    UpstreamUnavailable,
)
from tandem.api.grpc_status import error_from_rpc
from tandem.api.requests import Job, TokenEvent
from tandem.proto.decode.v1 import decode_pb2
from tandem.proto.prefill.v1 import prefill_pb2

logger = logging.getLogger(__name__)

# Failures that mean "the transfer or a pod broke", worth another try elsewhere (before any token).
_RETRYABLE = (UpstreamUnavailable, KVTransferError, DeadlineExceeded)


@dataclass(slots=True)
class Route:
    """Where a request ran (for logs, metrics and traces)."""

    mode: str = ""
    decode: str = ""
    prefill: str | None = None
    attempts: int = 0
    prefill_response: prefill_pb2.PrefillResponse | None = None
    prefill_reason: str = ""
    """Why that prefill pod: "prefix" (its cache won), "load", or "index_unavailable"."""
    expected_cached_tokens: int = 0
    """Prompt tokens kvstore said the chosen prefill pod caches."""
    candidates: list[PrefillCandidate] = field(default_factory=list)
    """The last prefill choice's candidates with their scores, best first."""
    lookup: dict[str, float | str] | None = None
    """kvstore lookup outcome ("status", "seconds"), when one was made."""
    trace: RequestTrace | None = None
    """The API request's server span (its children and GenAI attributes hang off it)."""
    tried_decode: set[str] = field(default_factory=set)
    tried_prefill: set[str] = field(default_factory=set)


class _Retry(Exception):
    """An attempt failed before any token reached the client; ``error`` if no retry is left.

    ``refused``: the decode pod turned the request away at admission (full, or its pool too
    small for it); another decode pod may take it.
    """

    def __init__(self, error: TandemError, *, refused: bool = False) -> None:
        super().__init__(str(error))
        self.error = error
        self.refused = refused


class Dispatcher:
    """Runs requests across the registry's pods."""

    def __init__(
        self,
        registry: PodRegistry,
        settings: RouterSettings,
        prefix_index: PrefixIndexClient | None = None,
        scorer: PrefillScorer | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.prefix_index = prefix_index
        self.scorer = scorer or PrefixLoadScorer(
            settings.prefix_weight,
            settings.load_weight,
            settings.hotspot_ratio,
            settings.hotspot_min_tokens,
        )
        self._attempt_ids = itertools.count()
        self._instance = uuid.uuid4().hex[:8]

    async def _cached_tokens(self, job: Job, route: Route) -> dict[str, int] | None:
        """What kvstore says each prefill pod caches of the prompt (None: no answer)."""
        if self.prefix_index is None:
            return {}
        reference = next((p.stats for p in self.registry.by_role("prefill") if p.stats), None)
        if reference is None:
            return {}
        start = time.perf_counter()
        cached = await self.prefix_index.cached_tokens(
            job.prompt_token_ids,
            job.cache_salt,
            reference.model_fingerprint,
            reference.block_size,
            metadata=telemetry.outgoing_metadata(),
        )
        route.lookup = {
            "status": "ok" if cached is not None else "unavailable",
            "seconds": time.perf_counter() - start,
        }
        return cached

    def _choose_prefill(self, job: Job, route: Route, cached: dict[str, int] | None) -> Pod | None:
        pods = [p for p in self.registry.by_role("prefill") if p.address not in route.tried_prefill]
        # With kvstore, ties break by the prompt so that every router replica agrees; without it,
        # at random: a content-hashed tie-break would be prefix affinity in disguise.
        if self.prefix_index is not None:
            tie_key = np.asarray(job.prompt_token_ids[:256], dtype="<u4").tobytes()
        else:
            tie_key = os.urandom(8)
        ranked = self.scorer.rank(pods, len(job.prompt_token_ids), cached or {}, tie_key)
        route.candidates = ranked
        if not ranked:
            return None
        best = ranked[0]
        route.prefill_reason = (
            "index_unavailable" if cached is None else ("prefix" if best.cached_tokens else "load")
        )
        route.expected_cached_tokens = best.cached_tokens
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "request %s -> prefill %s (%s); candidates: %s",
                job.request_id,
                best.pod.address,
                route.prefill_reason,
                "; ".join(
                    f"{c.pod.address} cached={c.cached_tokens} queued={c.queued_tokens} "
                    f"cost={c.cost:g}{' hot' if c.hot else ''}"
                    for c in ranked
                ),
            )
        return best.pod

    async def generate(self, job: Job, route: Route | None = None) -> AsyncIterator[TokenEvent]:
        route = route if route is not None else Route()
        # The request's trace context, explicitly: this generator may be resumed from other tasks.
        parent = route.trace.context if route.trace is not None else otel_context.get_current()
        metadata = telemetry.outgoing_metadata(context=parent)
        failures = 0
        refusals: list[TandemError] = []
        colocate = len(job.prompt_token_ids) < self.settings.colocate_below_tokens
        cached: dict[str, int] | None = {}
        looked_up = False
        while True:
            # One `route` span per attempt: the kvstore lookup (once per request) and the choice.
            with telemetry.tracer().start_as_current_span("route", context=parent) as span:
                decode = pick_decode(self.registry.by_role("decode"), route.tried_decode)
                if decode is None:
                    if refusals and all(isinstance(r, RequestTooLarge) for r in refusals):
                        raise refusals[0]  # no pod could ever hold it: a 400, not a 429
                    if refusals:
                        raise CapacityExceeded("every decode pod is at capacity; retry later")
                    if failures:
                        raise UpstreamUnavailable(
                            f"the request failed on every pod tried ({failures} attempts)"
                        )
                    raise UpstreamUnavailable("no decode pod is ready")
                prefill = None
                if not colocate and failures < self.settings.max_attempts - 1:
                    if not looked_up and self.registry.by_role("prefill"):
                        looked_up = True  # None (kvstore did not answer) is not asked again
                        cached = await self._cached_tokens(job, route)
                    prefill = self._choose_prefill(job, route, cached)
                route.attempts += 1
                if span.is_recording():
                    span.set_attributes(
                        route_attributes(
                            attempt=route.attempts,
                            mode="disaggregated" if prefill else "colocated",
                            decode=decode.address,
                            prefill=prefill.address if prefill else None,
                            reason=route.prefill_reason if prefill else "",
                            candidates=route.candidates if prefill else (),
                            expected_cached_tokens=route.expected_cached_tokens if prefill else 0,
                            lookup=route.lookup,
                        )
                    )
            try:
                async for event in self._attempt(job, decode, prefill, route, metadata):
                    if event.finish_reason is not None and route.trace is not None:
                        route.trace.finished(event)
                    yield event
                return
            except _Retry as retry:
                if retry.refused:
                    route.tried_decode.add(decode.address)
                    refusals.append(retry.error)
                    continue
                failures += 1
                logger.warning(
                    "request %s attempt %d failed: %s", job.request_id, route.attempts, retry.error
                )
                if failures >= self.settings.max_attempts:
                    raise retry.error from None

    async def _attempt(
        self,
        job: Job,
        decode: Pod,
        prefill: Pod | None,
        route: Route,
        metadata: tuple[tuple[str, str], ...],
    ) -> AsyncIterator[TokenEvent]:
        # Unique across router replicas and restarts: pods refuse a request id already in use.
        rid = f"{job.request_id}.{self._instance}.{next(self._attempt_ids)}"
        route.mode, route.decode, route.prefill = (
            ("disaggregated" if prefill else "colocated"),
            decode.address,
            None,
        )
        call = decode.stub.Generate(
            proto_convert.decode_generate_request(job, rid, remote=prefill is not None),
            metadata=metadata,
        )
        state = _AttemptState()
        prefill_task: asyncio.Task | None = None
        decode.inflight += 1
        if prefill is not None:
            prefill.inflight += 1  # from the choice on: a retired pod's channel stays open for us
        try:
            admitted = await self._admission(call, decode, route)
            if prefill is not None:
                route.prefill = prefill.address
                prefill_task = self._start_prefill(
                    job, rid, prefill, decode, admitted, call, route, state, metadata
                )
            while True:
                try:
                    resp = await call.read()
                except asyncio.CancelledError:
                    if (
                        state.prefill_error is not None
                    ):  # we cancelled the call: the KV will never come
                        self._raise_prefill_failure(state.prefill_error, prefill, route)
                    raise  # the caller is gone: not a failure, no retry
                except grpc.RpcError as e:
                    if state.prefill_error is not None:
                        self._raise_prefill_failure(state.prefill_error, prefill, route)
                    self._raise_decode_failure(e, decode, route, state.started)
                if resp is grpc.aio.EOF:
                    raise UpstreamUnavailable(f"decode pod {decode.address} ended the stream early")
                event = proto_convert.token_event(resp)
                state.started = (
                    state.started or bool(event.token_ids) or event.finish_reason is not None
                )
                yield event
                if event.finish_reason is not None:
                    break
        finally:
            decode.inflight -= 1
            if prefill is not None:
                prefill.inflight -= 1
            if prefill_task is not None:
                if not state.started:
                    prefill_task.cancel()  # after the first token the KV is in place: let it finish
            call.cancel()

    async def _admission(self, call, decode: Pod, route: Route) -> decode_pb2.Admitted:
        try:
            first = await asyncio.wait_for(call.read(), self.settings.admission_timeout_s)
        except TimeoutError:
            decode.mark_down("admission timed out")
            route.tried_decode.add(decode.address)
            raise _Retry(
                UpstreamUnavailable(f"decode pod {decode.address} did not answer admission")
            ) from None
        except grpc.RpcError as e:
            error = error_from_rpc(e)
            if isinstance(error, (CapacityExceeded, RequestTooLarge)):
                raise _Retry(error, refused=True) from None
            self._raise_decode_failure(e, decode, route, started=False)
        if first is grpc.aio.EOF or first.WhichOneof("event") != "admitted":
            route.tried_decode.add(decode.address)
            raise _Retry(
                UpstreamUnavailable(f"decode pod {decode.address} did not admit the request")
            )
        decode.inflight_blocks += first.admitted.num_reserved_blocks
        return first.admitted

    def _start_prefill(
        self,
        job: Job,
        rid: str,
        prefill: Pod,
        decode: Pod,
        admitted,
        call,
        route: Route,
        state: "_AttemptState",
        metadata: tuple[tuple[str, str], ...],
    ) -> asyncio.Task:
        # Blocks the decode pod already caches are not sent (admission tells how many tokens).
        block_size = decode.stats.block_size if decode.stats else 0
        skip_blocks = admitted.num_cached_tokens // block_size if block_size else 0
        request = proto_convert.prefill_request(
            job, rid, decode.address, skip_blocks, admitted.model_fingerprint, admitted
        )
        # The prefill computes the prompt minus what that pod caches (kvstore's estimate).
        work = max(1, len(job.prompt_token_ids) - route.expected_cached_tokens)
        prefill.prefill_started(work)
        task = asyncio.ensure_future(prefill.stub.Prefill(request, metadata=metadata))

        def on_done(t: asyncio.Task) -> None:
            prefill.prefill_finished(work)
            if t.cancelled():
                return  # our own cancellation
            if t.exception() is not None:
                if not state.started:
                    state.prefill_error = t.exception()
                    call.cancel()  # the KV will never come: stop waiting on the decode stream
                # After the first token the decode pod holds the KV; a lost answer changes nothing.
            else:
                route.prefill_response = t.result()

        task.add_done_callback(on_done)
        return task

    def _raise_prefill_failure(self, exc: BaseException, prefill: Pod, route: Route):
        error = (
            error_from_rpc(exc)
            if isinstance(exc, grpc.RpcError)
            else UpstreamUnavailable(repr(exc))
        )
        if isinstance(error, UpstreamUnavailable):
            prefill.mark_down(str(error))
            error = UpstreamUnavailable(f"prefill pod {prefill.address} failed: {error}")
        route.tried_prefill.add(prefill.address)
        raise _Retry(error) from None

    def _raise_decode_failure(self, e: grpc.RpcError, decode: Pod, route: Route, started: bool):
        error = error_from_rpc(e)
        if isinstance(error, UpstreamUnavailable):
            decode.mark_down(str(error))
            route.tried_decode.add(decode.address)
            error = UpstreamUnavailable(f"decode pod {decode.address} failed: {error}")
        if started or not isinstance(error, _RETRYABLE):
            raise error from None
        if isinstance(error, KVTransferError) and route.prefill is not None:
            route.tried_prefill.add(route.prefill)  # the KV transfer broke: use another prefill pod
        raise _Retry(error) from None


@dataclass(slots=True)
class _AttemptState:
    started: bool = False
    """A token (or the end) reached the caller: no retry from here on."""
    prefill_error: BaseException | None = None
    """The prefill failed before the first token (so its KV will never arrive)."""
