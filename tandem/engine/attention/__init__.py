"""Attention backends: how a layer writes new K/V into the paged cache and attends over it."""

from tandem.engine.attention.backend import AttentionBackend, AttentionMetadata
from tandem.engine.attention.selector import get_attention_backend, resolve_backend_name

__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend", "resolve_backend_name"]
