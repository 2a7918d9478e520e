"""Settings of the router (``tandem router``, ``TANDEM_ROUTER_*``)."""

import logging
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tandem.api.cluster_auth import ClusterAuthOptions

logger = logging.getLogger(__name__)


class RouterSettings(BaseSettings, ClusterAuthOptions):
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
    max_migrations: int = Field(3, ge=0)
    """Times a request whose decode pod fails after its first token (the pod died, its stream
    broke) may move to another decode pod, which continues it with the tokens generated so far
    (no token lost or repeated); 0 ends such a stream with an in-stream error instead."""
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

    # ---- input limits (services/router/input_limits.py, http_connections.py) ----
    max_request_body_bytes: int = Field(2 << 20, gt=0)
    """Largest HTTP request body (default 2 MiB); a larger one gets 413 before it is read (by
    its Content-Length) or as soon as its bytes pass the limit. A prompt filling a 128k-token
    context is ~0.5-1 MB as text (~4-8 bytes a token; non-ASCII text escaped as ``\\uXXXX`` is
    at most ~1.5 MB) and ~0.8-0.9 MB as token ids (6-7 bytes a token, ``"123456, "``), so
    2 MiB fits it with room to spare. The bound matters: parsing and validating a body costs
    ~150 bytes of memory and ~0.5 us of event-loop time per JSON value (an 8 MiB body of
    one-token lists took 1.1-1.4 GB and 16-25 s of the loop); raise it for larger contexts."""
    body_read_timeout_s: float = Field(10.0, gt=0)
    """A request body not received in full this long after its headers gets 408 and the
    connection is closed (2 MiB in 10 s needs ~2 Mbit/s; in-cluster clients and ingresses,
    which buffer bodies, are far faster)."""
    header_read_timeout_s: float = Field(10.0, gt=0)
    """A connection that has not sent a request's complete headers this long after it opened
    (or after that request's first byte, on a kept-alive connection) is closed (408 if it sent
    part of a request)."""
    max_connections: int = Field(4096, gt=0)
    """Open HTTP connections served at once; a request on one more gets 503 with Retry-After
    and its connection is closed (bounds the router's sockets and memory; well above a
    router's usual few hundred clients or one ingress's pool)."""
    max_prompts_per_request: int = Field(128, gt=0)
    """Most prompts in one /v1/completions request (a list of prompts); more is a 400. Each
    prompt is a sequence on a decode pod: 128 is half a GPU decode pod's usual batch (vLLM's
    max_num_seqs 256); bigger batches go in several requests or through the offline engine."""
    max_n: int = Field(128, gt=0)
    """Most completions one prompt may ask for: ``n`` or ``best_of`` above it is a 400 naming
    the field (128, the maximum OpenAI's API documents for ``n``). Each completion is a
    sequence on a decode pod sharing the prompt's KV blocks (parallel sampling)."""
    trust_request_chat_template: bool = False
    """Accept a chat template sent with a request (chat_template, or
    chat_template_kwargs.chat_template) as vLLM's flag does; without it such requests get 400.
    A trusted template still renders in Jinja's sandbox, but it can burn the router's CPU."""
    tool_call_parser: Literal["llama3_json", "hermes", "mistral"] | None = None
    """How the served model writes tool calls (vLLM's --tool-call-parser): llama3_json (Llama
    3.x JSON, optionally after <|python_tag|>), hermes (Hermes and Qwen <tool_call> blocks) or
    mistral ([TOOL_CALLS]). Needed for tool_choice "auto"; "required" and named functions are
    enforced by structured decoding with or without it."""
    enable_auto_tool_choice: bool = False
    """Serve tool_choice "auto" (the default when a request has tools), parsing calls out of
    the model's text with --tool-call-parser; without it such requests get 400, as vLLM."""
    enable_tokenizer_info_endpoint: bool = False
    """Serve GET /tokenizer_info (special tokens and the chat template; what lm-eval's remote
    tokenizer reads), off by default as in vLLM: a chat template may hold a system prompt an
    operator would not publish."""

    api_key: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)
    """API keys clients must send as Authorization: Bearer <key> (HTTP, and the gRPC
    RouterService's metadata); none: no key needed (as vLLM's --api-key). Several: repeat the
    flag, or comma-separate them in TANDEM_ROUTER_API_KEY (prefer the variable or
    --api-key-file: flags show in process listings)."""
    api_key_file: Path | None = None
    """File of further API keys, one per line (a mounted Kubernetes Secret)."""
    max_requests_per_key: int | None = Field(None, gt=0)
    """Most requests one API key may have in flight (then 429 with Retry-After); without API
    keys, all requests share this budget."""
    max_reserved_tokens_per_key: int | None = Field(None, gt=0)
    """Most tokens (prompt + max_tokens of each request) one API key's requests in flight may
    reserve together (then 429 with Retry-After)."""
    tls_certfile: Path | None = None
    """PEM certificate chain: serve HTTPS and gRPC over TLS (with tls_keyfile)."""
    tls_keyfile: Path | None = None
    """PEM private key of tls_certfile."""

    @field_validator("api_key", mode="before")
    @classmethod
    def _split_keys(cls, value):
        if isinstance(value, str):  # TANDEM_ROUTER_API_KEY=k1,k2
            return [k for k in value.split(",") if k.strip()]
        return value

    @model_validator(mode="after")
    def _keys_and_tls_are_usable(self) -> "RouterSettings":
        from services.router.auth import load_api_keys

        load_api_keys(self.api_key, None)  # a short key fails now; the file is read at start
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("--tls-certfile and --tls-keyfile go together")
        return self

    @model_validator(mode="after")
    def _auto_tool_choice_has_a_parser(self) -> "RouterSettings":
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
        return self

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

    def tls_pem(self) -> tuple[bytes, bytes] | None:
        """(certificate chain, private key) for the gRPC server, or None (plain TCP)."""
        if self.tls_certfile is None or self.tls_keyfile is None:
            return None
        return Path(self.tls_certfile).read_bytes(), Path(self.tls_keyfile).read_bytes()

    def make_discovery(self):
        from tandem.serving.discovery import make_discovery

        services = {
            r: s
            for r, s in (("prefill", self.prefill_service), ("decode", self.decode_service))
            if s
        }
        return make_discovery(
            self.discovery,
            static={"prefill": self.prefill, "decode": self.decode},
            services=services,
            ports={"prefill": self.prefill_port, "decode": self.decode_port},
            namespace=self.namespace,
            interval_s=self.stats_interval_s,
        )

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
