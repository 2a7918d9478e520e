"""Reused pinned host buffers for device-to-host KV copies (CUDA only).

Pinned memory makes the copy asynchronous and fast, but pinning is expensive: buffers are
allocated once at the chunk size and recycled.
"""

import threading

import torch


class PinnedBufferPool:
    def __init__(self, buffer_bytes: int, max_buffers: int = 64) -> None:
        self.buffer_bytes = buffer_bytes
        self.max_buffers = max_buffers
        self._free: list[torch.Tensor] = []
        self._allocated = 0
        self._cond = threading.Condition()

    def acquire(self) -> torch.Tensor:
        """A pinned uint8 buffer of ``buffer_bytes``; waits if ``max_buffers`` are all in use."""
        with self._cond:
            while not self._free and self._allocated >= self.max_buffers:
                self._cond.wait()
            if self._free:
                return self._free.pop()
            self._allocated += 1
        return torch.empty(self.buffer_bytes, dtype=torch.uint8, pin_memory=True)

    def release(self, buf: torch.Tensor) -> None:
        with self._cond:
            self._free.append(buf)
            self._cond.notify()
