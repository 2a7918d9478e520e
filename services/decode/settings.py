"""Settings of the decode service (``tandem decode``, ``TANDEM_DECODE_*``)."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tandem.serving.settings import PodSettings


class DecodeSettings(PodSettings):
    """Run a decode pod."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_DECODE_")

    port: int = Field(50052, ge=0, le=65535)
    """gRPC port (0 picks a free one)."""
    kv_timeout_s: float = Field(60.0, gt=0)
    """How long an admitted request waits for its KV pages before it is failed and freed. It
    includes the prompt's wait in the prefill queue, so keep it above the worst prefill backlog."""
    kv_max_chunk_bytes: int = Field(32 << 20, ge=64 << 10, le=48 << 20)
    """Largest KV chunk accepted (prefill pods' --kv-chunk-bytes may go up to 32 MiB)."""
    kv_lease_s: float = Field(90.0, gt=0)
    """How long a reservation's writer may write. After an abort, blocks a memory transport may
    still be writing are reused only once the writer confirmed it stopped or the lease ended;
    keep it above kv_timeout_s."""
