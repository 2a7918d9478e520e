"""The KV page wire format: how a slab of pages becomes a ``KVChunk`` and back, with checks.

A chunk carries layers ``[layer_start, layer_end)`` of a request's logical blocks
``[block_start, block_end)`` as one row-major array ``[layers, 2, blocks, block_size, kv_heads,
head_dim]``. The receiver checks every field against what it reserved *before* touching its
pool: a chunk for another model, dtype or shape, out of range, oversized, truncated or
overlapping what already arrived is refused with a ``KVTransferError`` naming the problem.
"""

import warnings
from dataclasses import dataclass

import torch

from tandem.api.errors import KVFingerprintMismatch, KVTransferError
from tandem.proto.common.v1 import common_pb2

DTYPE_TO_WIRE = {
    torch.float32: common_pb2.KV_DTYPE_FLOAT32,
    torch.bfloat16: common_pb2.KV_DTYPE_BFLOAT16,
    torch.float16: common_pb2.KV_DTYPE_FLOAT16,
}
WIRE_TO_DTYPE = {v: k for k, v in DTYPE_TO_WIRE.items()}

DEFAULT_MAX_CHUNK_BYTES = 4 << 20
"""Chunks stay well under gRPC message limits (GRPC_MAX_MESSAGE_BYTES in
tandem.api.channel_options)."""


@dataclass(slots=True, frozen=True)
class PageLayout:
    """Shape of one block of one layer's K and V on both ends of a transfer."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_block_layer(self) -> int:
        """Bytes of one block in one layer, K and V."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    def shape(self, num_layers: int, num_blocks: int) -> list[int]:
        return [num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim]


def blocks_per_chunk(layout: PageLayout, num_layers: int, max_chunk_bytes: int) -> int:
    """How many blocks of ``num_layers`` layers fit in one chunk (at least one)."""
    return max(1, max_chunk_bytes // (layout.bytes_per_block_layer * num_layers))


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a contiguous CPU tensor (any dtype, bfloat16 included)."""
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def chunk_header(
    request_id: str,
    fingerprint: str,
    sequence_number: int,
    layers: tuple[int, int],
    blocks: tuple[int, int],
    pages: torch.Tensor,
    transfer_token: str = "",
) -> common_pb2.KVChunk:
    """Every field of a chunk but its data, for pages ``[layers, 2, blocks, block_size, H, D]``."""
    return common_pb2.KVChunk(
        request_id=request_id,
        transfer_token=transfer_token,
        sequence_number=sequence_number,
        model_fingerprint=fingerprint,
        layer_start=layers[0],
        layer_end=layers[1],
        block_start=blocks[0],
        block_end=blocks[1],
        dtype=DTYPE_TO_WIRE[pages.dtype],
        shape=list(pages.shape),
    )


def page_buffer(pages: torch.Tensor):
    """A buffer over a contiguous CPU tensor's bytes, without copying them."""
    return pages.contiguous().view(torch.uint8).numpy()


def make_chunk(
    request_id: str,
    fingerprint: str,
    sequence_number: int,
    layers: tuple[int, int],
    blocks: tuple[int, int],
    pages: torch.Tensor,
) -> common_pb2.KVChunk:
    """A complete chunk message (plain protobuf; the sender uses ``codec`` instead)."""
    chunk = chunk_header(request_id, fingerprint, sequence_number, layers, blocks, pages)
    chunk.data = tensor_bytes(pages)
    return chunk


def check_fingerprint(got: str, expected: str) -> None:
    if got != expected:
        raise KVFingerprintMismatch(
            f"KV model fingerprint {got!r} does not match this pod's {expected!r} "
            "(different model, dtype, block size or layout)"
        )


def validate_chunk(
    chunk: common_pb2.KVChunk,
    data,
    layout: PageLayout,
    fingerprint: str,
    *,
    first_block: int,
    num_blocks: int,
    max_chunk_bytes: int,
) -> torch.Tensor:
    """Check a chunk against the reservation and return its pages as a CPU tensor over ``data``.

    Args:
        data: the chunk's payload (a buffer: ``codec`` hands over a view of the message).
        first_block: the first logical block the sender must send (earlier ones are cached here).
        num_blocks: the reservation's number of blocks.

    Raises:
        KVTransferError: anything about the chunk is off.
    """
    check_fingerprint(chunk.model_fingerprint, fingerprint)
    dtype = WIRE_TO_DTYPE.get(chunk.dtype)
    if dtype != layout.dtype:
        raise KVTransferError(
            f"KV dtype {common_pb2.KVDtype.Name(chunk.dtype)} does not match {layout.dtype}"
        )
    l0, l1, b0, b1 = chunk.layer_start, chunk.layer_end, chunk.block_start, chunk.block_end
    if not 0 <= l0 < l1 <= layout.num_layers:
        raise KVTransferError(f"layer range [{l0}, {l1}) outside [0, {layout.num_layers})")
    if not first_block <= b0 < b1 <= num_blocks:
        raise KVTransferError(
            f"block range [{b0}, {b1}) outside the expected [{first_block}, {num_blocks})"
        )
    expected_shape = layout.shape(l1 - l0, b1 - b0)
    if list(chunk.shape) != expected_shape:
        raise KVTransferError(f"KV chunk shape {list(chunk.shape)} != expected {expected_shape}")
    expected_bytes = (l1 - l0) * (b1 - b0) * layout.bytes_per_block_layer
    data = memoryview(data).cast("B")
    if len(data) > max_chunk_bytes:
        raise KVTransferError(
            f"KV chunk of {len(data)} bytes exceeds the {max_chunk_bytes}-byte limit"
        )
    if len(data) != expected_bytes:
        raise KVTransferError(f"KV chunk holds {len(data)} bytes, its shape needs {expected_bytes}")
    return _read_only_view(data).view(dtype).view(expected_shape)


def _read_only_view(data) -> torch.Tensor:
    """A uint8 tensor over the message's bytes without copying them; it is only ever read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(data, dtype=torch.uint8)
