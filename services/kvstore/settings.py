"""Settings of the kvstore service (``tandem kvstore``, ``TANDEM_KVSTORE_*``)."""

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from tandem.api.cluster_auth import ClusterAuthOptions


class KVStoreSettings(BaseSettings, ClusterAuthOptions):
    """Run the kvstore service (prefix-cache index over Redis)."""

    model_config = SettingsConfigDict(
        env_prefix="TANDEM_KVSTORE_", frozen=True, extra="forbid", use_attribute_docstrings=True
    )

    host: str = "0.0.0.0"
    """Interface of the gRPC server."""
    port: int = Field(50060, ge=0, le=65535)
    """gRPC port."""
    metrics_port: int | None = Field(None, ge=0, le=65535)
    """Serve Prometheus metrics over HTTP on this port."""
    redis_url: str | None = None
    """Redis to keep the index in (shared by every kvstore replica); None: in this process's
    memory. It may carry a user and password (redis://user:password@host:6379/0) and use TLS
    (rediss://)."""
    redis_password: SecretStr | None = None
    """Password of Redis (AUTH) when redis_url carries none. Give it through the
    TANDEM_KVSTORE_REDIS_PASSWORD environment variable (a mounted Secret), not as a flag: flags
    show in process listings."""
    key_prefix: str = "tandem"
    """Prefix of every Redis key (several deployments can share one Redis)."""
    capacity: int = Field(1_000_000, gt=0)
    """Most block entries the index holds; the least recently used go first."""
    lease_s: float = Field(10.0, gt=0)
    """A pod that has not heartbeated for this long stops counting."""
    block_size: int = Field(16, gt=0)
    """Block size of the pods' engines; event batches with another one are refused."""
    redis_timeout_s: float = Field(0.05, gt=0)
    """Socket timeout of each Redis call (the router's lookups must stay within tens of ms)."""
    redis_retries: int = Field(2, ge=0)
    """Retries of a Redis call that failed to connect or timed out (exponential backoff)."""
    redis_max_connections: int = Field(64, gt=0)
    """Size of the Redis connection pool."""
    sweep_interval_s: float = Field(5.0, gt=0)
    """How often dead entries (silent, restarted or cleared pods) are swept and silent pods
    forgotten."""
    sweep_batch: int = Field(10_000, gt=0)
    """Most dead holdings examined (and expired pods retired) per sweep: one Lua script, so this
    bounds how long a sweep holds Redis. Dead entries drain at sweep_batch / sweep_interval_s
    per second; until then they do not count (and lookups no longer refresh them in LRU order)."""
