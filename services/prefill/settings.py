"""Settings of the prefill service (``tandem prefill``, ``TANDEM_PREFILL_*``)."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tandem.serving.settings import PodSettings


class PrefillSettings(PodSettings):
    """Run a prefill pod."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_PREFILL_")

    port: int = Field(50051, ge=0, le=65535)
    """gRPC port (0 picks a free one)."""
    kv_layers_per_group: int = Field(4, gt=0)
    """Layers computed before their KV pages start streaming (smaller: earlier overlap, more
    chunks)."""
    kv_chunk_bytes: int = Field(4 << 20, ge=64 << 10, le=32 << 20)
    """Largest KV chunk message (the issue's 1-4 MiB; gRPC messages are capped at 64 MiB)."""
    kv_streams: int = Field(2, ge=1, le=16)
    """Parallel gRPC streams (each on its own connection) per KV transfer."""
    kv_push_timeout_s: float = Field(300.0, gt=0)
    """Deadline of one KV transfer's streams (a blackholed decode pod must not pin them forever)."""
    kv_checksum: bool = False
    """Memory transports: send a checksum of the pages with each completion notice; the decode
    pod verifies it (costs a pass over the pages on both sides)."""
    kv_staging_buffers: int = Field(64, gt=0)
    """Pinned host buffers for device-to-host KV copies (each kv_chunk_bytes large; CUDA only)."""
    kvstore: str | None = None
    """host:port of kvstore: publish this pod's prefix-cache events there (prefix-aware routing)."""
    kvstore_heartbeat_s: float = Field(2.0, gt=0)
    """How often this pod renews its lease in kvstore."""
