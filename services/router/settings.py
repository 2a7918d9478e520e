"""Settings of the router (``tandem router``, ``TANDEM_ROUTER_*``)."""

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

logger = logging.getLogger(__name__)


class RouterSettings(BaseSettings):
    """Run the router (OpenAI HTTP API + gRPC RouterService)."""

    model_config = SettingsConfigDict(
        env_prefix="TANDEM_ROUTER_", frozen=True, extra="forbid", use_attribute_docstrings=True
    )

    model: Path
    """Model directory (the router reads its tokenizer, chat template and config.json only)."""
    served_model_name: str | None = None
    """Model name clients must use (default: the directory's name)."""
    generation_config: Literal["auto", "vllm"] = "auto"
    """auto: sampling values an OpenAI request leaves unset (temperature, top_p, top_k, min_p,
    repetition_penalty) come from the model's generation_config.json, as vLLM does; vllm: the
    plain defaults (temperature 1, no top-p/top-k)."""
    host: str = "0.0.0.0"
    """Interface for HTTP and gRPC."""
    port: int = Field(8000, ge=0, le=65535)
    """HTTP port of the OpenAI-compatible API."""
    grpc_port: int = Field(50050, ge=0, le=65535)
    """gRPC port of RouterService (the SDK's target)."""
    discovery: Literal["static", "dns", "kubernetes"] = "static"
    """How pods are found: the --prefill/--decode lists, the DNS names of headless Services, or
    the EndpointSlices of those Services through the Kubernetes API (follows pods as they come
    and go)."""
    prefill: list[str] = Field(default_factory=list)
    """static: prefill pods' host:port addresses (none: every request runs colocated)."""
    decode: list[str] = Field(default_factory=list)
    """static: decode pods' host:port addresses."""
    prefill_service: str | None = None
    """dns: DNS name of the prefill pods' headless Service; kubernetes: its name."""
    decode_service: str | None = None
    """dns: DNS name of the decode pods' headless Service; kubernetes: its name."""
    prefill_port: int = Field(50051, ge=1, le=65535)
    """dns: gRPC port of prefill pods (kubernetes reads the Service's port named "grpc")."""
    decode_port: int = Field(50052, ge=1, le=65535)
    """dns: gRPC port of decode pods."""
    namespace: str | None = None
    """kubernetes: namespace of the Services (default: this pod's own)."""
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
    shutdown_grace_s: float = Field(30.0, ge=0)
    """On SIGTERM, seconds HTTP streams and then gRPC streams in flight get to finish."""
    admission_timeout_s: float = Field(10.0, gt=0)
    """Deadline for a decode pod to admit (or refuse) a request; then another pod is tried."""

    @model_validator(mode="after")
    def _discovery_has_its_inputs(self) -> "RouterSettings":
        if self.discovery == "static" and (self.prefill_service or self.decode_service):
            raise ValueError(
                "--prefill-service/--decode-service need --discovery dns or kubernetes"
            )
        if self.discovery != "static":
            if not self.decode_service:
                raise ValueError(f"--discovery {self.discovery} needs --decode-service")
            if self.prefill or self.decode:
                raise ValueError(
                    f"--prefill/--decode are static addresses; with --discovery {self.discovery} "
                    "name the Services instead"
                )
        return self

    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name

    def make_discovery(self):
        from services.router.discovery import DnsDiscovery, KubernetesDiscovery, StaticDiscovery

        services = {
            r: s
            for r, s in (("prefill", self.prefill_service), ("decode", self.decode_service))
            if s
        }
        if self.discovery == "dns":
            ports = {"prefill": self.prefill_port, "decode": self.decode_port}
            return DnsDiscovery(services, ports, interval_s=self.stats_interval_s)
        if self.discovery == "kubernetes":
            return KubernetesDiscovery(self.namespace or _own_namespace(), services)
        return StaticDiscovery(self.prefill, self.decode)

    def sampling_defaults(self) -> dict:
        """Defaults for unset sampling fields of OpenAI requests (``generation_config``)."""
        if self.generation_config == "vllm":
            return {}
        from tandem.model_dir import generation_defaults

        defaults = generation_defaults(self.model)  # a bad value fails the start, not every request
        if defaults:
            logger.info(
                "default sampling from %s/generation_config.json: "
                "%s (--generation-config vllm to ignore it)",
                self.model,
                defaults,
            )
        return defaults


def _own_namespace() -> str:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    try:
        return path.read_text().strip()
    except OSError:
        raise ValueError(
            f"--discovery kubernetes outside a pod needs --namespace ({path} is unreadable)"
        ) from None
