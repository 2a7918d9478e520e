from tandem.proto.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PREFILL_MODE_UNSPECIFIED: _ClassVar[PrefillMode]
    PREFILL_MODE_REMOTE: _ClassVar[PrefillMode]
    PREFILL_MODE_LOCAL: _ClassVar[PrefillMode]
PREFILL_MODE_UNSPECIFIED: PrefillMode
PREFILL_MODE_REMOTE: PrefillMode
PREFILL_MODE_LOCAL: PrefillMode

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling_params", "prefill_mode", "priority", "cache_salt", "resume")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MODE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling_params: _common_pb2.SamplingParams
    prefill_mode: PrefillMode
    priority: int
    cache_salt: str
    resume: _common_pb2.Resume
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling_params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., prefill_mode: _Optional[_Union[PrefillMode, str]] = ..., priority: _Optional[int] = ..., cache_salt: _Optional[str] = ..., resume: _Optional[_Union[_common_pb2.Resume, _Mapping]] = ...) -> None: ...

class Admitted(_message.Message):
    __slots__ = ("num_cached_tokens", "num_reserved_blocks", "model_fingerprint", "transfer_token", "lease_epoch", "lease_expires_unix_ms", "block_ids", "incarnation")
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_RESERVED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LEASE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    num_cached_tokens: int
    num_reserved_blocks: int
    model_fingerprint: str
    transfer_token: str
    lease_epoch: int
    lease_expires_unix_ms: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    incarnation: str
    def __init__(self, num_cached_tokens: _Optional[int] = ..., num_reserved_blocks: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., transfer_token: _Optional[str] = ..., lease_epoch: _Optional[int] = ..., lease_expires_unix_ms: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ..., incarnation: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("admitted", "chunk", "usage")
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    admitted: Admitted
    chunk: _common_pb2.TokenChunk
    usage: _common_pb2.Usage
    def __init__(self, admitted: _Optional[_Union[Admitted, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.TokenChunk, _Mapping]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ...) -> None: ...

class PushKVRequest(_message.Message):
    __slots__ = ("chunk", "end")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    chunk: _common_pb2.KVChunk
    end: _common_pb2.KVTransferEnd
    def __init__(self, chunk: _Optional[_Union[_common_pb2.KVChunk, _Mapping]] = ..., end: _Optional[_Union[_common_pb2.KVTransferEnd, _Mapping]] = ...) -> None: ...

class PushKVResponse(_message.Message):
    __slots__ = ("chunks_received", "bytes_received")
    CHUNKS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    chunks_received: int
    bytes_received: int
    def __init__(self, chunks_received: _Optional[int] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("stats",)
    STATS_FIELD_NUMBER: _ClassVar[int]
    stats: _common_pb2.PodStats
    def __init__(self, stats: _Optional[_Union[_common_pb2.PodStats, _Mapping]] = ...) -> None: ...

class DescribeKVRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KVPoolDescriptor(_message.Message):
    __slots__ = ("transport", "descriptor")
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    transport: str
    descriptor: bytes
    def __init__(self, transport: _Optional[str] = ..., descriptor: _Optional[bytes] = ...) -> None: ...

class DescribeKVResponse(_message.Message):
    __slots__ = ("incarnation", "pools")
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    incarnation: str
    pools: _containers.RepeatedCompositeFieldContainer[KVPoolDescriptor]
    def __init__(self, incarnation: _Optional[str] = ..., pools: _Optional[_Iterable[_Union[KVPoolDescriptor, _Mapping]]] = ...) -> None: ...

class ClaimKVRequest(_message.Message):
    __slots__ = ("request_id", "transfer_token", "transport", "renews")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    RENEWS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    transfer_token: str
    transport: str
    renews: bool
    def __init__(self, request_id: _Optional[str] = ..., transfer_token: _Optional[str] = ..., transport: _Optional[str] = ..., renews: _Optional[bool] = ...) -> None: ...

class ClaimKVResponse(_message.Message):
    __slots__ = ("lease_expires_unix_ms", "block_ids", "first_block", "lease_remaining_ms")
    LEASE_EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    LEASE_REMAINING_MS_FIELD_NUMBER: _ClassVar[int]
    lease_expires_unix_ms: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    first_block: int
    lease_remaining_ms: int
    def __init__(self, lease_expires_unix_ms: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ..., first_block: _Optional[int] = ..., lease_remaining_ms: _Optional[int] = ...) -> None: ...

class CompleteKVRequest(_message.Message):
    __slots__ = ("end",)
    END_FIELD_NUMBER: _ClassVar[int]
    end: _common_pb2.KVTransferEnd
    def __init__(self, end: _Optional[_Union[_common_pb2.KVTransferEnd, _Mapping]] = ...) -> None: ...

class CompleteKVResponse(_message.Message):
    __slots__ = ("bytes_received",)
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    def __init__(self, bytes_received: _Optional[int] = ...) -> None: ...

class RenewKVRequest(_message.Message):
    __slots__ = ("request_id", "transfer_token")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    transfer_token: str
    def __init__(self, request_id: _Optional[str] = ..., transfer_token: _Optional[str] = ...) -> None: ...

class RenewKVResponse(_message.Message):
    __slots__ = ("lease_expires_unix_ms", "lease_remaining_ms")
    LEASE_EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_REMAINING_MS_FIELD_NUMBER: _ClassVar[int]
    lease_expires_unix_ms: int
    lease_remaining_ms: int
    def __init__(self, lease_expires_unix_ms: _Optional[int] = ..., lease_remaining_ms: _Optional[int] = ...) -> None: ...
