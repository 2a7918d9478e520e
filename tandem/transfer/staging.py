"""Reused pinned host buffers for device-to-host KV copies (CUDA only).

Pinned memory makes the copy asynchronous and fast, but pinning is expensive: buffers are
allocated once at the chunk size and recycled. ``acquire`` never waits: the engine thread calls
it in the middle of a forward, and must not block there (the caller copies without staging when
every buffer is in flight). Every acquired buffer must be released on every exit path of its
chunk (``tandem.transfer.push_streams._Chunk``).
"""

import threading

import torch


class PinnedBufferPool:
    def __init__(
        self, buffer_bytes: int, max_buffers: int = 64, *, pin_memory: bool = True
    ) -> None:
        self.buffer_bytes = buffer_bytes
        self.max_buffers = max_buffers
        self.pin_memory = pin_memory
        self._free: list[torch.Tensor] = []
        self._allocated = 0
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        with self._lock:
            return self._allocated - len(self._free)

    def acquire(self) -> torch.Tensor | None:
        """A buffer of ``buffer_bytes`` (uint8), or None when ``max_buffers`` are all in use."""
        with self._lock:
            if self._free:
                return self._free.pop()
            if self._allocated >= self.max_buffers:
                return None
            self._allocated += 1
        return torch.empty(self.buffer_bytes, dtype=torch.uint8, pin_memory=self.pin_memory)

    def release(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)
