"""The messages between a pod's front process and its engine core process (msgpack over ZeroMQ).

Front -> core: a list of commands per message. Core -> front: one ``CoreUpdate`` per engine step
(or per batch of commands that produced something): the step's tokens as columns
(``StepOutputs``), the engine's stats, and the answers to commands. Everything here is plain data
(msgspec structs and the dataclasses of ``tandem.api``), so both sides decode it typed and fast.
"""

from typing import Any

import msgspec

from tandem.api.errors import (
    CapacityExceeded,
    InvalidRequest,
    KVFingerprintMismatch,
    KVPoolUnmappable,
    KVTransferError,
    ModelNotFound,
    RequestTooLarge,
    ShuttingDown,
    TandemError,
    UpstreamUnavailable,
)
from tandem.api.kv_events import BlocksRemoved, BlocksStored, CacheCleared, KVEvent
from tandem.api.outputs import TokenLogprob
from tandem.api.stats import EngineStats
from tandem.api.step_outputs import StepOutputs

# ---- front -> core ------------------------------------------------------------------------------


class KVTargetSpec(msgspec.Struct, frozen=True):
    """Where a prefill pod sends a prompt's KV (``tandem.transfer.push_streams.KVTarget``)."""

    address: str
    request_id: str
    skip_blocks: int
    transfer_token: str = ""
    transport: str = "grpc"
    descriptor: bytes | None = None
    """Memory transports: the decode pod's ``PoolDescriptor`` (msgpack)."""
    block_ids: list[int] = []
    lease_expires_unix_ms: int = 0
    incarnation: str = ""
    checksum: bool = False


class AddRequest(msgspec.Struct, tag="add", frozen=True):
    """Queue a request. Answered (``call_id``) once queued, or with the reason it was refused."""

    call_id: int
    request_id: str
    prompt_token_ids: list[int]
    sampling: dict[str, Any]
    """``SamplingParams`` fields (the router resolved them; the core validates them again)."""
    priority: int = 0
    cache_salt: str | None = None
    require_room: bool = False
    """Refuse (CapacityExceeded) unless the prompt's blocks fit now: a decode pod's admission of
    a colocated request."""
    kv_target: KVTargetSpec | None = None
    """Prefill pods: stream the prompt's KV there; the core reports ``PrefillDone``."""
    trace_carrier: dict[str, str] | None = None
    """W3C trace context of the request (the prefill pod's ``kv_transfer`` span continues it)."""
    num_output_tokens: int = 0
    """A migrated request: the last this many prompt tokens are output already generated."""


class ReserveRemote(msgspec.Struct, tag="reserve", frozen=True):
    """Decode pods: hold blocks for a prompt whose KV a prefill pod pushes. Answered with
    ``[block ids, cached tokens]``."""

    call_id: int
    request_id: str
    prompt_token_ids: list[int]
    sampling: dict[str, Any]
    priority: int = 0
    cache_salt: str | None = None
    num_output_tokens: int = 0
    """As ``AddRequest``'s."""


class CompleteRemote(msgspec.Struct, tag="complete", frozen=True):
    """Decode pods: the reserved blocks hold the prompt's KV; join the decode batch."""

    call_id: int
    request_id: str
    first_token_id: int
    logprob: TokenLogprob | None
    num_cached_tokens: int
    prompt_logprobs: list[TokenLogprob] | None = None
    """Computed by the prefill pod, when the request asked for them."""


class Abort(msgspec.Struct, tag="abort", frozen=True):
    """Give up a request wherever it is and free what it holds (no answer)."""

    request_id: str


class KVSnapshot(msgspec.Struct, tag="kv_snapshot", frozen=True):
    """Prefill pods with kvstore: drop pending KV events, answer every cached block's hash."""

    call_id: int


class Shutdown(msgspec.Struct, tag="shutdown", frozen=True):
    pass


Command = AddRequest | ReserveRemote | CompleteRemote | Abort | KVSnapshot | Shutdown

# ---- core -> front ------------------------------------------------------------------------------


class ErrorInfo(msgspec.Struct, frozen=True):
    """A ``TandemError`` across the process boundary."""

    kind: str
    message: str
    param: str | None = None


class Reply(msgspec.Struct, frozen=True):
    call_id: int
    value: Any = None
    error: ErrorInfo | None = None


class Failure(msgspec.Struct, frozen=True):
    """Requests the engine gave up on (a failed forward): their streams end with ``message``."""

    request_ids: list[str]
    message: str


class PrefillDone(msgspec.Struct, frozen=True):
    """A prefill pod's request: its first token, and how its KV transfer ended."""

    request_id: str
    first_token_id: int
    num_cached_tokens: int
    scheduled_time: float | None
    first_token_time: float
    transfer_bytes: int = 0
    transfer_chunks: int = 0
    transfer_seconds: float = 0.0
    transport: str = "grpc"
    """The transport that carried the pages (may differ from the one asked for: a fallback)."""
    error: ErrorInfo | None = None


class CoreUpdate(msgspec.Struct):
    stats: EngineStats
    steps: int
    """Engine steps so far (the router's stall detection watches it move)."""
    outputs: StepOutputs | None = None
    replies: list[Reply] = []
    failures: list[Failure] = []
    prefills: list[PrefillDone] = []
    kv_events: list[tuple[str, list[bytes]]] = []
    """Prefix-cache events, as (kind, block hashes): kind is stored, removed or cleared."""


# ---- codecs -------------------------------------------------------------------------------------

command_encoder = msgspec.msgpack.Encoder()
commands_decoder = msgspec.msgpack.Decoder(list[Command])
update_encoder = msgspec.msgpack.Encoder()
update_decoder = msgspec.msgpack.Decoder(CoreUpdate)

_ERRORS: dict[str, type[TandemError]] = {
    cls.__name__: cls
    for cls in (
        InvalidRequest,
        RequestTooLarge,
        CapacityExceeded,
        ModelNotFound,
        KVTransferError,
        KVFingerprintMismatch,
        KVPoolUnmappable,
        ShuttingDown,
        UpstreamUnavailable,
    )
}


def error_info(exc: BaseException) -> ErrorInfo:
    if isinstance(exc, TandemError):
        return ErrorInfo(type(exc).__name__, str(exc), getattr(exc, "param", None))
    return ErrorInfo("TandemError", f"{type(exc).__name__}: {exc}")


def error_from_info(info: ErrorInfo) -> TandemError:
    """The exception ``error_info`` described (an unknown kind: a plain ``TandemError``)."""
    cls = _ERRORS.get(info.kind, TandemError)
    if issubclass(cls, InvalidRequest):
        return cls(info.message, param=info.param)
    return cls(info.message)


def events_to_wire(events: list[KVEvent]) -> list[tuple[str, list[bytes]]]:
    wire: list[tuple[str, list[bytes]]] = []
    for e in events:
        if isinstance(e, BlocksStored):
            wire.append(("stored", list(e.block_hashes)))
        elif isinstance(e, BlocksRemoved):
            wire.append(("removed", list(e.block_hashes)))
        else:
            wire.append(("cleared", []))
    return wire


def events_from_wire(wire: list[tuple[str, list[bytes]]]) -> list[KVEvent]:
    events: list[KVEvent] = []
    for kind, hashes in wire:
        if kind == "stored":
            events.append(BlocksStored(tuple(hashes)))
        elif kind == "removed":
            events.append(BlocksRemoved(tuple(hashes)))
        else:
            events.append(CacheCleared())
    return events
