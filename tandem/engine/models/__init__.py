"""Model implementations. One Llama-family decoder covers Llama, Mistral, Qwen2 and Qwen3."""

from tandem.engine.models.llama import DecoderLM
from tandem.engine.models.loader import load_model

__all__ = ["DecoderLM", "load_model"]
