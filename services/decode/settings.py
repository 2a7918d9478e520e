"""Settings of the decode service (``tandem decode``, ``TANDEM_DECODE_*``)."""

from pydantic import Field, model_validator
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
    kv_claim_timeout_s: float = Field(5.0, gt=0)
    """How long a REMOTE reservation waits for a writer to claim it (a prefill pod's ClaimKV, sent
    on receipt of its Prefill request, or a first KV chunk) before its blocks are released and
    its Generate stream fails: a reservation nobody feeds must not hold blocks for the whole
    kv_timeout_s. Capped by kv_timeout_s."""
    kv_max_chunk_bytes: int = Field(32 << 20, ge=64 << 10, le=48 << 20)
    """Largest KV chunk accepted (prefill pods' --kv-chunk-bytes may go up to 32 MiB)."""
    kv_lease_s: float = Field(150.0, gt=0)
    """How long a reservation's writer may write. After an abort, blocks a memory transport may
    still be writing are reused only once the writer confirmed it stopped or the lease ended.
    Must exceed kv_timeout_s: a lease that ends before the request's wait does would let blocks
    go back to the pool while a writer may still be entitled to write."""
    kv_write_lease_s: float = Field(10.0, ge=1.0)
    """How long a memory-transport writer's claim lets it write before it must renew
    (``RenewKV``, which it does every third of it): a prefill pod that dies mid-transfer holds
    the blocks this long, not kv_lease_s. The writer stops a quarter of it (at most 5 s) before
    its end, so a copy still in flight has that long to land: keep it several seconds where
    cuda-ipc copies queue behind busy GPUs. At most kv_lease_s, which still bounds everything."""

    @model_validator(mode="after")
    def _lease_outlives_the_wait(self):
        if self.kv_lease_s <= self.kv_timeout_s:
            raise ValueError(
                f"kv_lease_s ({self.kv_lease_s:g}) must exceed kv_timeout_s "
                f"({self.kv_timeout_s:g}): a writer's lease must outlive the wait for its pages"
            )
        if self.kv_write_lease_s > self.kv_lease_s:
            raise ValueError(
                f"kv_write_lease_s ({self.kv_write_lease_s:g}) must not exceed kv_lease_s "
                f"({self.kv_lease_s:g}): the reservation's lease bounds every write lease"
            )
        return self
