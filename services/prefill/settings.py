"""Settings of the prefill service (``tandem prefill``, ``TANDEM_PREFILL_*``)."""

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from tandem.serving.discovery import Discovery, DiscoveryKind, make_discovery
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
    discovery: DiscoveryKind = "static"
    """How this pod finds the decode pods it may push KV to (configure it as the router's): the
    --decode list, the DNS name of their headless Service, or its EndpointSlices through the
    Kubernetes API. A Prefill request naming any other decode address is refused
    (PERMISSION_DENIED) before any connection is made."""
    decode: list[str] = Field(default_factory=list)
    """static: the decode pods' host:port addresses, spelled as the router's --decode (none: every
    Prefill request is refused)."""
    decode_service: str | None = None
    """dns: DNS name of the decode pods' headless Service; kubernetes: its name."""
    decode_port: int = Field(50052, ge=1, le=65535)
    """dns: gRPC port of decode pods (kubernetes reads the Service's port named "grpc")."""
    namespace: str | None = None
    """kubernetes: namespace of the decode Service (default: this pod's own)."""
    decode_lookup_interval_s: float = Field(1.0, gt=0)
    """A decode address discovery does not list (a pod just started) is looked up afresh, at
    most this often; misses meanwhile wait for that lookup."""

    @model_validator(mode="after")
    def _discovery_has_its_inputs(self) -> "PrefillSettings":
        if self.discovery == "static" and self.decode_service:
            raise ValueError("--decode-service needs --discovery dns or kubernetes")
        if self.discovery != "static":
            if not self.decode_service:
                raise ValueError(f"--discovery {self.discovery} needs --decode-service")
            if self.decode:
                raise ValueError(
                    f"--decode is a static list; with --discovery {self.discovery} name the "
                    "decode Service instead"
                )
        return self

    def make_discovery(self) -> Discovery:
        """The decode pods' discovery (role "decode" only)."""
        return make_discovery(
            self.discovery,
            static={"decode": self.decode},
            services={"decode": self.decode_service} if self.decode_service else {},
            ports={"decode": self.decode_port},
            namespace=self.namespace,
            interval_s=self.decode_lookup_interval_s,
        )
