"""Settings of the router (``tandem router``, ``TANDEM_ROUTER_*``)."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RouterSettings(BaseSettings):
    """Run the router (OpenAI HTTP API + gRPC RouterService)."""

    model_config = SettingsConfigDict(
        env_prefix="TANDEM_ROUTER_", frozen=True, extra="forbid", use_attribute_docstrings=True
    )

    model: Path
    """Model directory (the router reads its tokenizer, chat template and config.json only)."""
    served_model_name: str | None = None
    """Model name clients must use (default: the directory's name)."""
    host: str = "0.0.0.0"
    """Interface for HTTP and gRPC."""
    port: int = Field(8000, ge=0, le=65535)
    """HTTP port of the OpenAI-compatible API."""
    grpc_port: int = Field(50050, ge=0, le=65535)
    """gRPC port of RouterService (the SDK's target)."""
    prefill: list[str] = Field(default_factory=list)
    """Prefill pods' host:port addresses. None: every request runs colocated on a decode pod."""
    decode: list[str] = Field(default_factory=list)
    """Decode pods' host:port addresses."""
    kvstore: str | None = None
    """host:port of kvstore: route prompts to the prefill pod that caches their longest prefix."""
    kvstore_timeout_s: float = Field(0.05, gt=0)
    """A kvstore lookup slower than this is abandoned and the request routed by load."""
    prefix_weight: float = Field(1.0, ge=0)
    """Weight of uncached prompt tokens in a prefill pod's cost."""
    load_weight: float = Field(1.0, ge=0)
    """Weight of a prefill pod's queued prompt tokens in its cost."""
    hotspot_ratio: float = Field(2.0, ge=1)
    """A prefill pod queueing more than ratio x the least loaded one (+ hotspot_min_tokens)
    gets no credit for its cache: load wins."""
    hotspot_min_tokens: int = Field(4096, ge=0)
    """Slack of the hot-spot rule, so small queues never count as hot."""
    colocate_below_tokens: int = Field(0, ge=0)
    """Prompts shorter than this run colocated on the decode pod (conditional disaggregation);
    0 disaggregates every prompt. A few hundred tokens is typical on GPUs."""
    max_model_len: int | None = Field(None, gt=0)
    """Longest prompt + output accepted (default: the model's max_position_embeddings)."""
    stats_interval_s: float = Field(0.5, gt=0)
    """How often pods' load and health are polled."""
    max_attempts: int = Field(3, ge=1)
    """Tries per request (other pods, then colocated) before the first token is sent."""
    retry_after_s: int = Field(1, ge=0)
    """Retry-After of 429 answers when every decode pod refuses admission."""
    pod_timeout_s: float = Field(2.0, gt=0)
    """Deadline of stats calls; a pod that misses it is considered down until it answers."""
    stall_timeout_s: float = Field(60.0, gt=0)
    """A pod whose engine has work but made no progress for this long is considered down."""
    admission_timeout_s: float = Field(10.0, gt=0)
    """Deadline for a decode pod to admit (or refuse) a request; then another pod is tried."""

    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name

    def cli_cmd(self) -> None:
        from services.router.server import serve

        serve(self)
