"""Host-to-device copies that never wait for the device.

A copy from ordinary (pageable) host memory waits until every kernel queued before it has run.
With async scheduling a step is always queued when the host prepares the next one, so such a
copy would make the host wait for the whole step in flight and silently undo the overlap. These
go through page-locked memory and return at once (PyTorch's pinned allocator keeps the staging
memory alive until the copy is done).
"""

import numpy as np
import torch


def upload(values: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    """``values`` (a host tensor or array) on ``device``, queued without waiting for the device.

    Pass fresh host memory: ordinary memory is copied into pinned memory first, but a tensor
    that is already pinned is copied from directly, so reusing it at once would race the copy.
    """
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(values)
    if device.type != "cuda":
        return values
    return values.pin_memory().to(device, non_blocking=True)
