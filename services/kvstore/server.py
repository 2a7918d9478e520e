"""The kvstore service: ``KVStoreService`` over an Index (Redis, or memory for one replica).

It is the only component that talks to Redis. Event batches are validated (hash algorithm,
block size, identity) and applied in order; batches from an incarnation that is not the pod's
registered one are refused, and so are heartbeats from an incarnation older than the registered
one while its lease is alive; a gap in a pod's sequence numbers is logged and counted (the pod
repairs the index by resending its whole cache when a heartbeat says the index does not know
it). Redis calls that fail to connect or time out are retried briefly; if Redis stays down, calls
fail with UNAVAILABLE and the router routes by load alone. A background task sweeps dead entries
and forgets the sequence numbers of pods gone silent.
"""

import asyncio
import logging
import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from redis.exceptions import AuthenticationError as RedisAuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError as RedisResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from services.kvstore.index import Index
from services.kvstore.memory_index import MemoryIndex
from services.kvstore.redis_index import RedisIndex
from services.kvstore.settings import KVStoreSettings
from tandem import telemetry
from tandem.api import cluster_auth
from tandem.api.channel_options import KVSTORE_MESSAGE_BYTES
from tandem.api.errors import InvalidRequest, TandemError, Unauthenticated, UpstreamUnavailable
from tandem.api.grpc_status import abort_with
from tandem.api.hashing import HASH_ALGORITHM
from tandem.api.ids import BlockHash, PodId
from tandem.proto.kvstore.v1 import kvstore_pb2, kvstore_pb2_grpc
from tandem.serving.grpc_server import GrpcServer, RunningService

logger = logging.getLogger(__name__)
MAX_LOOKUP_BLOCKS = 1 << 16


class KVStoreMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.entries = Gauge(
            "tandem_kvstore_index_entries", "Block entries in the index", registry=r
        )
        self.lookups = Counter("tandem_kvstore_lookups", "Prefix lookups", registry=r)
        self.hit_blocks = Counter(
            "tandem_kvstore_lookup_hit_blocks", "Blocks matched by lookups", registry=r
        )
        self.evictions = Gauge(
            "tandem_kvstore_evictions", "Entries evicted by LRU (index lifetime)", registry=r
        )
        self.retired_generations = Gauge(
            "tandem_kvstore_retired_generations",
            "Retired pod generations the sweep has still to drain",
            registry=r,
        )
        self.lookup_duration = Histogram(
            "tandem_kvstore_lookup_duration_seconds",
            "Lookup latency, Redis included",
            registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25),
        )
        self.event_lag = Histogram(
            "tandem_kvstore_event_lag_seconds",
            "From a pod sending an event batch to its application",
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
        )
        self.events = Counter(
            "tandem_kvstore_events", "Events applied, by kind", ["kind"], registry=r
        )
        self.rejected = Counter(
            "tandem_kvstore_rejected_batches",
            "Event batches refused, by reason",
            ["reason"],
            registry=r,
        )
        self.gaps = Counter(
            "tandem_kvstore_sequence_gaps", "Gaps in pods' event sequence numbers", registry=r
        )
        self.redis_errors = Counter(
            "tandem_kvstore_redis_errors", "Index calls that failed after retries", registry=r
        )


@dataclass(slots=True)
class _Sequence:
    """The last accepted event batch of a pod's incarnation, and when the pod was last heard."""

    incarnation: str
    number: int
    seen_at: float


class KVStoreServicer(kvstore_pb2_grpc.KVStoreServiceServicer):
    def __init__(self, index: Index, settings: KVStoreSettings, metrics: KVStoreMetrics) -> None:
        self.index = index
        self.settings = settings
        self.metrics = metrics
        self._last_seq: dict[str, _Sequence] = {}
        """pod id -> its current incarnation's last batch; pods silent for a lease are forgotten."""
        self.rejected_batches = 0
        self.sequence_gaps = 0

    async def _call(self, make_coro):
        """Run an index call with brief retries on Redis connection errors and timeouts."""
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.settings.redis_retries + 1),
                wait=wait_exponential(multiplier=0.005, max=0.05),
                retry=retry_if_exception_type((RedisConnectionError, RedisTimeoutError)),
                reraise=True,
            ):
                with attempt:
                    return await make_coro()
        except (RedisConnectionError, RedisTimeoutError) as e:
            self.metrics.redis_errors.inc()
            raise UpstreamUnavailable(f"the index's Redis is unavailable: {e}") from None

    async def Lookup(self, request: kvstore_pb2.LookupRequest, context):
        try:
            hashes = _hashes(request.block_hashes)
            start = time.perf_counter()
            counts = await self._call(
                lambda: self.index.lookup(request.model_fingerprint, hashes, time.time())
            )
            self.metrics.lookup_duration.observe(time.perf_counter() - start)
            self.metrics.lookups.inc()
            self.metrics.hit_blocks.inc(max(counts.values(), default=0))
            return kvstore_pb2.LookupResponse(
                matches=[
                    kvstore_pb2.PodMatch(pod_id=p, num_blocks=n) for p, n in sorted(counts.items())
                ]
            )
        except TandemError as exc:
            await abort_with(context, exc)

    async def Heartbeat(self, request: kvstore_pb2.HeartbeatRequest, context):
        try:
            if not request.pod_id or not request.incarnation:
                raise InvalidRequest("pod_id and incarnation are required", param="pod_id")
            now = time.time()
            registration = await self._call(
                lambda: self.index.heartbeat(
                    PodId(request.pod_id), request.incarnation, self.settings.lease_s, now
                )
            )
            if registration.superseded:
                logger.debug(
                    "refused a heartbeat of pod %s's old incarnation %s",
                    request.pod_id,
                    request.incarnation,
                )
                # NOTE: HeartbeatResponse has no "superseded" field (the proto is shared with the
                # pods); a lease of 0 s with known=False tells the old process it holds no lease.
                # Publishers of releases before this one read it as "heartbeat every 0 s" and
                # resync every flush; the chart's pods never share a pod id across a rollout, and
                # docs/kubernetes.md ("Upgrade") says to upgrade stable-id pods before kvstore.
                return kvstore_pb2.HeartbeatResponse(lease_seconds=0.0, known=False)
            if not registration.known:
                logger.info(
                    "pod %s (incarnation %s) registered", request.pod_id, request.incarnation
                )
            sequence = self._last_seq.get(request.pod_id)
            if sequence is not None and sequence.incarnation == request.incarnation:
                sequence.seen_at = now
            return kvstore_pb2.HeartbeatResponse(
                lease_seconds=self.settings.lease_s, known=registration.known
            )
        except TandemError as exc:
            await abort_with(context, exc)

    async def PublishEvents(self, request: kvstore_pb2.PublishEventsRequest, context):
        try:
            reason = self._invalid(request)
            if reason is not None:
                self.rejected_batches += 1
                self.metrics.rejected.labels(reason).inc()
                raise InvalidRequest(f"event batch refused: {reason}", param=reason)
            accepted = await self._call(lambda: self._apply(request))
            if not accepted:
                self.rejected_batches += 1
                self.metrics.rejected.labels("stale_incarnation").inc()
                logger.info(
                    "ignored events of %s's old incarnation %s", request.pod_id, request.incarnation
                )
                return kvstore_pb2.PublishEventsResponse(accepted=False)
            self._check_sequence(request)
            if request.sent_at:
                self.metrics.event_lag.observe(max(0.0, time.time() - request.sent_at))
            return kvstore_pb2.PublishEventsResponse(accepted=accepted)
        except TandemError as exc:
            await abort_with(context, exc)

    def _invalid(self, request: kvstore_pb2.PublishEventsRequest) -> str | None:
        if request.hash_algorithm != HASH_ALGORITHM:
            return "hash_algorithm"
        if request.block_size != self.settings.block_size:
            return "block_size"
        if not request.pod_id or not request.incarnation:
            return "pod_id"
        if not request.model_fingerprint:
            return "model_fingerprint"
        return None

    def _check_sequence(self, request: kvstore_pb2.PublishEventsRequest) -> None:
        """Count a gap in an accepted batch's sequence (a new incarnation starts afresh)."""
        last = self._last_seq.get(request.pod_id)
        if (
            last is not None
            and last.incarnation == request.incarnation
            and request.sequence_number != last.number + 1
        ):
            self.sequence_gaps += 1
            self.metrics.gaps.inc()
            logger.warning(
                "pod %s: event batch %d after %d (events lost or reordered)",
                request.pod_id,
                request.sequence_number,
                last.number,
            )
        self._last_seq[request.pod_id] = _Sequence(
            request.incarnation, request.sequence_number, time.time()
        )

    def forget_silent_pods(self, now: float) -> int:
        """Drop the sequence state of pods not heard from for a lease; returns how many.

        The index retires such pods too, so a returning one registers afresh and resyncs.
        """
        silent = [
            pod for pod, seq in self._last_seq.items() if seq.seen_at + self.settings.lease_s <= now
        ]
        for pod in silent:
            del self._last_seq[pod]
        return len(silent)

    async def _apply(self, request: kvstore_pb2.PublishEventsRequest) -> bool:
        pod, inc, ns, now = (
            PodId(request.pod_id),
            request.incarnation,
            request.model_fingerprint,
            time.time(),
        )
        for event in request.events:
            kind = event.WhichOneof("event")
            if kind == "stored":
                ok = await self.index.add(ns, pod, inc, _hashes(event.stored.block_hashes), now)
            elif kind == "removed":
                ok = await self.index.remove(ns, pod, inc, _hashes(event.removed.block_hashes))
            elif kind == "cleared":
                ok = await self.index.clear_pod(pod, inc)
            else:
                continue
            if not ok:
                return False
            self.metrics.events.labels(kind).inc()
        return True

    async def Stats(self, request, context):
        try:
            stats = await self._call(lambda: self.index.stats(time.time()))
            return kvstore_pb2.StatsResponse(
                num_entries=stats.num_entries,
                capacity=stats.capacity,
                lookups=stats.lookups,
                hit_blocks=stats.hit_blocks,
                evictions=stats.evictions,
                live_pods=stats.live_pods,
                rejected_batches=self.rejected_batches,
                sequence_gaps=self.sequence_gaps,
            )
        except TandemError as exc:
            await abort_with(context, exc)


def _hashes(raw) -> list[BlockHash]:
    if len(raw) > MAX_LOOKUP_BLOCKS:
        raise InvalidRequest(
            f"at most {MAX_LOOKUP_BLOCKS} block hashes per call", param="block_hashes"
        )
    if any(len(h) != 16 for h in raw):
        raise InvalidRequest("block hashes are 16 bytes (xxh3_128)", param="block_hashes")
    return [BlockHash(bytes(h)) for h in raw]


def make_index(settings: KVStoreSettings) -> Index:
    if settings.redis_url is None:
        return MemoryIndex(settings.capacity)
    import redis.asyncio as aioredis

    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    client = aioredis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        max_connections=settings.redis_max_connections,
        **({"password": password} if password else {}),  # a password in the URL wins
    )
    return RedisIndex(client, capacity=settings.capacity, prefix=settings.key_prefix)


def redacted(url: str) -> str:
    """``url`` without its password (for logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


async def check_redis_credentials(index: RedisIndex, url: str) -> None:
    """Fail the start when Redis refuses our credentials (a wrong or missing password never
    heals by retrying); an unreachable Redis only warns: calls fail with UNAVAILABLE until it
    is back, as when it dies later."""
    try:
        await index.client.ping()
    except RedisAuthenticationError as exc:
        raise Unauthenticated(f"Redis at {redacted(url)} refused the credentials: {exc}") from None
    except RedisResponseError as exc:
        if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
            raise Unauthenticated(
                f"Redis at {redacted(url)} needs a password (TANDEM_KVSTORE_REDIS_PASSWORD or "
                f"the URL's): {exc}"
            ) from None
        raise
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        logger.warning("Redis at %s is not reachable yet: %s", redacted(url), exc)


async def _sweeper(
    servicer: KVStoreServicer, settings: KVStoreSettings, metrics: KVStoreMetrics
) -> None:
    """Every ``sweep_interval_s``: one bounded sweep step, and forget silent pods' sequences.

    A failed step is logged and the next one runs on time: whatever Redis answers (down, OOM,
    BUSY, a script error), a dead sweeper would let retired entries pile up for good.
    """
    index = servicer.index
    while True:
        await asyncio.sleep(settings.sweep_interval_s)
        try:
            servicer.forget_silent_pods(time.time())
            removed = await index.sweep(time.time(), settings.sweep_batch)
            stats = await index.stats(time.time())
            metrics.entries.set(stats.num_entries)
            metrics.evictions.set(stats.evictions)
            metrics.retired_generations.set(stats.retired_generations)
            if removed:
                logger.debug("swept %d dead entries", removed)
        except (RedisConnectionError, RedisTimeoutError) as e:
            logger.warning("sweep skipped: %s", e)
        except Exception:
            logger.exception("sweep failed; retrying in %.1f s", settings.sweep_interval_s)


async def start(settings: KVStoreSettings) -> RunningService:
    auth = settings.cluster_auth()
    cluster_auth.install(auth)
    index = make_index(settings)
    if isinstance(index, RedisIndex):
        await check_redis_credentials(index, settings.redis_url)
    metrics = KVStoreMetrics()
    server = GrpcServer(
        settings.host,
        settings.port,
        ["tandem.kvstore.v1.KVStoreService"],
        auth=auth.check if auth.enabled else None,
        max_receive_message_length=KVSTORE_MESSAGE_BYTES,
    )
    servicer = KVStoreServicer(index, settings, metrics)
    kvstore_pb2_grpc.add_KVStoreServiceServicer_to_server(servicer, server.server)
    if settings.metrics_port is not None:
        start_http_server(settings.metrics_port, registry=metrics.registry)
    await server.start()
    sweeper = asyncio.create_task(_sweeper(servicer, settings, metrics))
    backend = f"Redis at {redacted(settings.redis_url)}" if settings.redis_url else "memory"
    logger.info(
        "kvstore serving on port %d (index in %s, capacity %d)",
        server.port,
        backend,
        settings.capacity,
    )
    return RunningService(server, [sweeper.cancel], index=index, metrics=metrics, servicer=servicer)


async def serve(settings: KVStoreSettings) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    telemetry.setup_tracing("kvstore")
    telemetry.instrument_redis()
    service = await start(settings)
    await service.serve_until_signalled()
