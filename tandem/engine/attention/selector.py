"""Which attention backend an engine runs, and whether the Triton kernels can serve a shape.

Kept apart from ``backend.py`` (the interface every backend implements), so that the backends
import the interface and this module imports the backends, never the other way round.
"""

import functools

from tandem.engine.attention.backend import AttentionBackend


@functools.cache
def triton_available() -> bool:
    """Whether Triton is installed (the fused kernels and the triton backend need it)."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def triton_supports(head_dim: int, block_size: int) -> bool:
    """Shapes the Triton kernels compile for: power-of-two head_dim (16..256), block size <= 128."""
    pow2 = head_dim & (head_dim - 1) == 0
    return (
        pow2 and 16 <= head_dim <= 256 and block_size <= 128 and block_size & (block_size - 1) == 0
    )


def resolve_backend_name(name: str, device_type: str) -> str:
    """``auto``: triton on CUDA (if Triton is installed), torch elsewhere."""
    if name != "auto":
        return name
    return "triton" if device_type == "cuda" and triton_available() else "torch"


def get_attention_backend(name: str) -> AttentionBackend:
    if name == "torch":
        from tandem.engine.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        from tandem.engine.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}")
