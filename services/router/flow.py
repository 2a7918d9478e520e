"""A request's path through the pods, with retries before the first token.

1. Pick a decode pod and call ``Generate``: it reserves the prompt's KV blocks and answers
   ``Admitted`` (or RESOURCE_EXHAUSTED: try the next decode pod; all full -> 429).
2. Disaggregated: pick a prefill pod and call ``Prefill`` with the decode pod as KV target.
   Prompts shorter than ``colocate_below_tokens``, or no prefill pod up: the decode pod
   prefills itself (colocated).
3. Relay the decode pod's token stream.

A failure before any token reached the client (a prefill pod dies mid-transfer, a KV stream is
refused, a pod is unreachable) is retried on other pods, ending with colocated mode. A decode
pod that fails after the first token (it died, its stream broke) is migrated away from, up to
``max_migrations`` times: the request is admitted again on another decode pod with the prompt
plus the tokens the client already has (``Job.resume``; prefilled by a prefill pod or
colocated, as any request), and the stream goes on with the tokens that follow -- none lost or
repeated, the same as an uninterrupted run's (the pods count the brought-along output toward
max/min tokens, penalties, stop strings and the seeded sampler's position). Other failures
after the first token are reported in the stream. Whatever ends the request -- completion,
error, the client going away -- both calls are cancelled, so the pods free the request's blocks.

Parallel sampling (``n`` or ``best_of`` above 1): the decode pod streams every completion's
events, each under its ``index``, and the request ends when all ``n`` finished. Such a request
is NOT migrated: a decode pod failing after its first token fails it with an error saying so
(a resume would have to carry every completion's output and seed position; clients of ``n > 1``
mostly do not stream and retry the request whole).
"""

import asyncio
import itertools
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace

import grpc
import numpy as np
from opentelemetry import context as otel_context
from opentelemetry import trace

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
    UpstreamCancelled,
    UpstreamUnavailable,
)
from tandem.api.grpc_status import error_from_rpc
from tandem.api.requests import Job, Resume, TokenEvent, Usage
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
    migrations: list["Migration"] = field(default_factory=list)
    """Moves of the request to other decode pods after its stream failed mid-way."""


@dataclass(slots=True)
class Migration:
    """One move of a request away from a decode pod that failed after its first token."""

    from_pod: str
    reason: str
    """The failure, as the error class's name (``UpstreamUnavailable``)."""
    num_tokens: int
    """Output tokens the client had when the pod failed."""
    error: TandemError
    """The failure itself: what the client gets if the request cannot move on."""
    to_pod: str = ""
    outcome: str = ""
    """"resumed" (another decode pod continued the stream), "failed" (no pod could take it),
    "limit" (``max_migrations`` used up; 0 turns migration off), "unsupported" (n or best_of
    above 1: not migrated)."""


class _Migrate(Exception):
    """A decode pod failed after tokens reached the client: continue elsewhere, if allowed."""

    def __init__(self, error: TandemError, decode: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.decode = decode


@dataclass(slots=True)
class _Sent:
    """What the caller of ``generate`` got so far: a migration's starting point."""

    token_ids: list[int] = field(default_factory=list)
    num_text_chars: int = 0

    def add(self, event: TokenEvent) -> None:
        self.token_ids.extend(event.token_ids)
        self.num_text_chars += len(event.text)


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
        """The request's token events, placed, retried and migrated across the pods.

        Raises:
            TandemError: it could not be placed (before any event), or it failed after its
                first event and could not move on (a migration's original failure).
        """
        route = route if route is not None else Route()
        # The request's trace context, explicitly: this generator may be resumed from other tasks.
        parent = route.trace.context if route.trace is not None else otel_context.get_current()
        metadata = telemetry.outgoing_metadata(context=parent)
        sent = _Sent()
        migration: Migration | None = None
        while True:
            if migration is None:
                phase = job
            else:
                phase = replace(job, resume=Resume(tuple(sent.token_ids), sent.num_text_chars))
            started = False
            try:
                async for event in self._run_phase(phase, route, parent, metadata):
                    if migration is not None and not started:
                        self._migration_ended(job, route, migration, "resumed")
                    started = True
                    sent.add(event)
                    if event.usage is not None or (
                        event.finish_reason is not None and job.params.n == 1
                    ):
                        if migration is not None and event.usage is not None:
                            event.usage = _uninterrupted_usage(job, sent, event.usage)
                        if route.trace is not None:
                            route.trace.finished(event)
                    yield event
                return
            except _Migrate as failure:
                migration = self._migrate(job, route, failure, sent)
            except TandemError as error:
                if migration is None or started:
                    raise
                # No pod could continue it: the client gets the failure that started the move.
                logger.warning(
                    "request %s could not be migrated after %s: %s",
                    job.request_id,
                    migration.reason,
                    error,
                )
                self._migration_ended(job, route, migration, "failed")
                raise migration.error from None

    def _migrate(self, job: Job, route: Route, failure: _Migrate, sent: _Sent) -> Migration:
        """Start a move away from the failed decode pod, or give up (raises its error)."""
        migration = Migration(
            failure.decode, type(failure.error).__name__, len(sent.token_ids), failure.error
        )
        if _num_samples(job) > 1:
            self._migration_ended(job, route, migration, "unsupported")
            raise UpstreamUnavailable(
                f"{failure.error}; a request with n or best_of above 1 is not moved to another "
                "decode pod: retry it"
            ) from None
        done = sum(1 for m in route.migrations if m.outcome == "resumed")
        if done >= self.settings.max_migrations:
            self._migration_ended(job, route, migration, "limit")
            raise failure.error from None
        logger.warning(
            "request %s: decode pod %s failed after %d tokens (%s); migrating it",
            job.request_id,
            failure.decode,
            len(sent.token_ids),
            failure.error,
        )
        # A new placement: pods that refused or failed before may take it now (the failed pod
        # was marked down, so it is not chosen while it stays down).
        route.tried_decode = {failure.decode}
        route.tried_prefill = set()
        return migration

    def _migration_ended(self, job: Job, route: Route, migration: Migration, outcome: str):
        migration.outcome = outcome
        migration.to_pod = route.decode if outcome == "resumed" else ""
        route.migrations.append(migration)
        if route.trace is not None:
            route.trace.migrated(
                from_pod=migration.from_pod,
                to_pod=migration.to_pod,
                num_tokens=migration.num_tokens,
                reason=migration.reason,
                outcome=outcome,
            )
        if outcome == "resumed":
            logger.info(
                "request %s migrated from %s to %s after %d tokens",
                job.request_id,
                migration.from_pod,
                migration.to_pod,
                migration.num_tokens,
            )

    async def _run_phase(
        self,
        job: Job,
        route: Route,
        parent: otel_context.Context,
        metadata: tuple[tuple[str, str], ...],
    ) -> AsyncIterator[TokenEvent]:
        """Place the job and relay its events, retrying on other pods before its first event.

        Raises:
            _Migrate: its decode pod failed after the first event.
        """
        failures = 0
        refusals: list[TandemError] = []
        colocate = len(job.token_ids) < self.settings.colocate_below_tokens
        cached: dict[str, int] | None = {}
        looked_up = False
        while True:
            # One `route` span per attempt: the decode pod, the kvstore lookup (once per request)
            # and the prefill choice. It ends once the prefill pod is chosen, which for a
            # disaggregated attempt happens while the decode pod is admitting (see _attempt).
            span = telemetry.tracer().start_span("route", context=parent)
            try:
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
            except BaseException:
                span.end()
                raise
            route.attempts += 1
            disaggregate = (
                not colocate
                and failures < self.settings.max_attempts - 1
                and any(
                    p.address not in route.tried_prefill for p in self.registry.by_role("prefill")
                )
            )

            async def choose_prefill(span=span, decode=decode) -> Pod | None:
                nonlocal looked_up, cached
                try:
                    if not looked_up:
                        looked_up = True  # None (kvstore did not answer) is not asked again
                        with trace.use_span(span, end_on_exit=False):
                            cached = await self._cached_tokens(job, route)
                    prefill = self._choose_prefill(job, route, cached)
                    if span.is_recording():
                        span.set_attributes(self._route_attributes(route, decode, prefill))
                    return prefill
                finally:
                    span.end()

            if not disaggregate:
                span.set_attributes(self._route_attributes(route, decode, None))
                span.end()
            try:
                choice = choose_prefill if disaggregate else None
                async for event in self._attempt(job, decode, choice, route, metadata):
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
            finally:
                if span.is_recording():  # the attempt ended before it chose a prefill pod
                    span.end()

    @staticmethod
    def _route_attributes(route: Route, decode: Pod, prefill: Pod | None) -> dict:
        return route_attributes(
            attempt=route.attempts,
            mode="disaggregated" if prefill else "colocated",
            decode=decode.address,
            prefill=prefill.address if prefill else None,
            reason=route.prefill_reason if prefill else "",
            candidates=route.candidates if prefill else (),
            expected_cached_tokens=route.expected_cached_tokens if prefill else 0,
            lookup=route.lookup,
        )

    async def _attempt(
        self,
        job: Job,
        decode: Pod,
        choose_prefill: Callable[[], Awaitable[Pod | None]] | None,
        route: Route,
        metadata: tuple[tuple[str, str], ...],
    ) -> AsyncIterator[TokenEvent]:
        """One try on ``decode``: colocated, or disaggregated when ``choose_prefill`` is given.

        The decode pod's Generate call is sent first; the prefill pod is chosen (the kvstore
        lookup) while the decode pod admits the request, as neither needs the other's answer.
        """
        # Unique across router replicas and restarts: pods refuse a request id already in use.
        rid = f"{job.request_id}.{self._instance}.{next(self._attempt_ids)}"
        route.mode, route.decode, route.prefill = (
            ("disaggregated" if choose_prefill else "colocated"),
            decode.address,
            None,
        )
        call = decode.stub.Generate(
            proto_convert.decode_generate_request(job, rid, remote=choose_prefill is not None),
            metadata=metadata,
        )
        state = _AttemptState()
        prefill_task: asyncio.Task | None = None
        prefill: Pod | None = None
        decode.inflight += 1
        try:
            if choose_prefill is not None:
                prefill = await choose_prefill()
                if prefill is None:  # the prefill pods went away during the lookup
                    raise _Retry(UpstreamUnavailable("no prefill pod is ready"))
                prefill.inflight += 1  # from the choice on: a retired pod's channel stays open
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
                    error = UpstreamUnavailable(
                        f"decode pod {decode.address} ended the stream early"
                    )
                    if state.started:
                        raise _Migrate(error, decode.address)
                    raise error
                event = proto_convert.token_event(resp)
                state.started = (
                    state.started or bool(event.token_ids) or event.finish_reason is not None
                )
                yield event
                if event.finish_reason is not None:
                    state.finished.add(event.index)
                    if len(state.finished) >= job.params.n:  # every completion ended
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
            # Slow, not down: under a burst a busy pod answers late. Marking it down here would
            # turn one late answer into a 503 for every request until the next stats poll (which
            # is what judges health).
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
        work = max(1, len(job.token_ids) - route.expected_cached_tokens)
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
            if not isinstance(error, UpstreamCancelled):  # a cancelling pod is busy, not down
                prefill.mark_down(str(error))
            error = UpstreamUnavailable(f"prefill pod {prefill.address} failed: {error}")
        route.tried_prefill.add(prefill.address)
        raise _Retry(error) from None

    def _raise_decode_failure(self, e: grpc.RpcError, decode: Pod, route: Route, started: bool):
        error = error_from_rpc(e)
        if isinstance(error, UpstreamUnavailable):
            if not isinstance(error, UpstreamCancelled):  # a cancelling pod is busy, not down
                decode.mark_down(str(error))
            route.tried_decode.add(decode.address)
            error = UpstreamUnavailable(f"decode pod {decode.address} failed: {error}")
            if started:  # tokens reached the client: continue on another pod
                raise _Migrate(error, decode.address) from None
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
    finished: set[int] = field(default_factory=set)
    """Indices of the completions that ended (the request ends with the n-th)."""


def _num_samples(job: Job) -> int:
    """Completions the pods generate for the job (``best_of``, else ``n``)."""
    return job.params.best_of if job.params.best_of is not None else job.params.n


def _uninterrupted_usage(job: Job, sent: _Sent, usage: Usage) -> Usage:
    """A migrated request's usage as if it had run on one pod: its own prompt, every token the
    client got, and at most the prompt as cached."""
    prompt = len(job.prompt_token_ids)
    return Usage(prompt, len(sent.token_ids), min(usage.cached_tokens, prompt))
