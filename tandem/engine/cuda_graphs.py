"""CUDA graphs of decode-only steps: one per padded batch size, replayed instead of ~10 launches
a layer.

At batch 1 a small model's decode step is a few hundred short kernels; launched one by one from
Python the step costs several times its memory-bound floor. A graph replays them all with one
launch. The graph reads its inputs from persistent device buffers, filled each step with a
single host-to-device copy from a pinned staging buffer: token ids, positions, slots, lengths,
the table width, then the block tables packed as ``batch x width`` (the width of this step's
longest sequence, not of ``max_model_len``). The graph's first kernel spreads the packed rows
into the fixed-stride table the attention kernel reads; entries past a sequence's pages are
never read, so nothing is zeroed. Batches are padded to the next captured size; padding rows
have length 0 (attention outputs 0) and write their K/V into the pool's scratch slot.

All sizes are captured together (largest first, sharing one memory pool): by a decode pod
before it serves (``ModelRunner.capture_decode_graphs``), otherwise at the first decode step.
Capture is thread-local, so the decode pod's KV writer threads may keep using the GPU. The LM
head runs after the replay, on the real rows only (no per-graph logits in the pool).
Requirements: CUDA, the Triton backend (the torch backend reads host-side lengths), no per-layer
hook (prefill pods), every block table within ``max_blocks``.
"""

import logging
import time

import numpy as np
import torch
import triton
import triton.language as tl

from tandem.engine.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to ``max_batch`` (which is always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


@triton.jit
def _spread_tables_kernel(packed_ptr, width_ptr, table_ptr, max_blocks, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    width = tl.sum(tl.load(width_ptr + tl.arange(0, 1)), 0)
    ok = cols < width
    ids = tl.load(packed_ptr + row * width + cols, mask=ok)
    tl.store(table_ptr + row * max_blocks + cols, ids, mask=ok)


class DecodeGraphs:
    def __init__(
        self,
        model,
        kv_cache,
        block_size: int,
        max_batch: int,
        max_blocks: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.sizes = graph_batch_sizes(max_batch)
        self.max_batch = n = self.sizes[-1]
        self.max_blocks = max_blocks
        self.device = device
        # Staging layout (int64): [ids | positions | slots | lens | width | packed tables].
        total = 4 * n + 1 + n * max_blocks
        self._device_buf = torch.zeros(total, dtype=torch.int64, device=device)
        self._host_buf = torch.zeros(total, dtype=torch.int64, pin_memory=True)
        self._host = self._host_buf.numpy()
        d = self._device_buf
        self.input_ids, self.positions, self.slots, self.seq_lens = (
            d[i * n : (i + 1) * n] for i in range(4)
        )
        self._width = d[4 * n : 4 * n + 1]
        self._packed = d[4 * n + 1 :]
        self.tables = torch.zeros((n, max_blocks), dtype=torch.int64, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._hidden: dict[int, torch.Tensor] = {}
        self._pool = None
        self._copied = torch.cuda.Event()
        self.replays = 0

    def bucket(self, batch: int) -> int | None:
        """The captured size a batch of ``batch`` decodes runs at (None: too big for a graph)."""
        for size in self.sizes:
            if size >= batch:
                return size
        return None

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:size],
            block_tables=self.tables[:size],
            seq_lens=self.seq_lens[:size],
            query_start_loc=self.seq_lens[: size + 1],
            num_decodes=size,
            seq_lens_cpu=[1] * size,
            query_start_loc_cpu=list(range(size + 1)),
            block_size=self.block_size,
        )

    def _step(self, size: int) -> torch.Tensor:
        """What a graph replays: spread the packed tables, then the forward (hidden states)."""
        _spread_tables_kernel[(size, triton.cdiv(self.max_blocks, 1024))](
            self._packed, self._width, self.tables, self.max_blocks, BLOCK=1024
        )
        return self.model(
            self.input_ids[:size], self.positions[:size], self.kv_cache.tensor, self._meta(size)
        )

    def capture_all(self) -> None:
        """Capture every size, largest first (the smaller graphs reuse its memory)."""
        logger.info(
            "capturing %d decode CUDA graphs (batch 1..%d)", len(self.sizes), self.max_batch
        )
        start = time.perf_counter()
        for size in reversed(self.sizes):
            self._capture(size)
        logger.info(
            "captured %d decode CUDA graphs (batch 1..%d) in %.1f s",
            len(self.sizes),
            self.max_batch,
            time.perf_counter() - start,
        )

    def _capture(self, size: int) -> None:
        torch.cuda.synchronize(self.device)
        # Padding everywhere (length 0, scratch writes): the warm-ups must not write into blocks
        # that earlier, larger steps left in these buffers (they may belong to other requests now).
        self._device_buf.zero_()
        self.slots.fill_(self.kv_cache.scratch_slot)
        self._width.fill_(1)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles the kernels and settles cuBLAS before the capture
                self._step(size)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self._hidden[size] = self._step(size)
        self._pool = graph.pool()
        self._graphs[size] = graph

    def run(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        slots: np.ndarray,
        seq_lens: np.ndarray,
        tables: np.ndarray,
        device_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [batch, vocab] of one decode step (the inputs are per real sequence, in order).

        ``device_ids``: the token ids as a device tensor instead of ``input_ids`` (the tokens of
        a step still in flight: async scheduling); copied into the graph's input on the device.
        """
        batch = len(input_ids)
        size = self.bucket(batch)
        if size not in self._graphs:
            self._capture(size)
        n, h = self.max_batch, self._host
        self._copied.synchronize()  # the previous step's copy has left the pinned buffer
        for i, values, pad in (
            (0, input_ids, 0),
            (1, positions, 0),
            (2, slots, self.kv_cache.scratch_slot),
            (3, seq_lens, 0),
        ):
            h[i * n : i * n + batch] = values
            h[i * n + batch : i * n + size] = pad
        width = tables.shape[1]
        h[4 * n] = width
        used = 4 * n + 1 + batch * width
        h[4 * n + 1 : used] = tables.reshape(-1)
        self._device_buf[:used].copy_(self._host_buf[:used], non_blocking=True)
        self._copied.record()
        if device_ids is not None:
            self.input_ids[:batch].copy_(device_ids)
        self._graphs[size].replay()
        self.replays += 1
        return self.model.compute_logits(self._hidden[size][:batch])
