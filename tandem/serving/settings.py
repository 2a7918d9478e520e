"""Settings shared by the GPU pods (prefill and decode): server, identity, and engine fields.

Each service subclasses ``PodSettings`` with its own ``TANDEM_<SERVICE>_`` prefix; every field is
also a CLI flag of ``tandem <service>`` (kebab-case), generated from the same definition.
"""

import os
import socket
import time
import uuid
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tandem.api.cluster_auth import ClusterAuthOptions
from tandem.engine.config import EngineConfig, EngineOptions
from tandem.serving.engine_core import EngineInfo
from tandem.transfer.transport import KVTransportMode


class PodSettings(BaseSettings, EngineOptions, ClusterAuthOptions):
    model_config = SettingsConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    model: Path
    """Hugging Face model directory (config.json, *.safetensors, tokenizer.json)."""
    served_model_name: str | None = None
    """Model name reported to clients (default: the directory's name)."""
    host: str = "0.0.0.0"
    """Interface the gRPC server listens on."""
    port: int = Field(50051, ge=0, le=65535)
    """gRPC port (0 picks a free one)."""
    advertise_address: str | None = None
    """host:port other pods use to reach this one (default: this host's name and the port)."""
    pod_id: str | None = None
    """Stable name of this pod (default: the advertised address)."""
    metrics_port: int | None = Field(None, ge=0, le=65535)
    """Serve Prometheus metrics (vllm:* and tandem_*) over HTTP on this port."""
    shutdown_grace_s: float = Field(30.0, ge=0)
    """On SIGTERM, seconds requests in flight get to finish before the pod exits (keep the
    pod's terminationGracePeriodSeconds above it)."""
    max_waiting: int = Field(1024, gt=0)
    """Most requests queued in the engine; more are refused with RESOURCE_EXHAUSTED."""
    kv_transport: KVTransportMode = "auto"
    """How KV pages move between prefill and decode pods: auto (the fastest both pods can use of
    cuda-ipc, shm and grpc), cuda-ipc (GPU pools on one node), shm (CPU pools on one host), nixl
    (NIXL over UCX: RDMA across nodes; the nixl extra; only when named: its agent keeps a CPU core
    busy), grpc (any network). Decode pods offer it (and grpc); prefill pods choose per
    transfer."""
    kv_transport_strict: bool = False
    """Refuse a transfer rather than fall back to a slower transport (a fallback is otherwise
    logged at WARNING and counted in tandem_kv_transfer_fallbacks_total)."""

    def engine_config(self) -> EngineConfig:
        return EngineConfig(model=str(self.model), **self.engine_options())

    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name

    def address(self, bound_port: int) -> str:
        return self.advertise_address or f"{socket.gethostname()}:{bound_port}"

    def identity(self, info: EngineInfo, role: int, address: str) -> dict:
        """PodStats identity fields of this pod (the incarnation is new at every process start).

        The incarnation starts with the start time in microseconds, fixed width, so that a later
        process sorts after an earlier one: kvstore refuses heartbeats of an older incarnation.
        """
        return dict(
            role=role,
            pod_id=self.pod_id or address,
            model=self.model_name(),
            model_fingerprint=info.fingerprint,
            block_size=info.block_size,
            max_model_len=info.max_model_len,
            incarnation=f"{time.time_ns() // 1000:016d}-{os.getpid()}-{uuid.uuid4().hex[:8]}",
        )

    def cache_config_info(self, info: EngineInfo) -> dict[str, str]:
        """Labels of vllm:cache_config_info."""
        return {
            "block_size": str(info.block_size),
            "num_gpu_blocks": str(info.num_kv_blocks),
            "enable_prefix_caching": str(info.enable_prefix_caching),
            "cache_dtype": info.kv_dtype,
        }
