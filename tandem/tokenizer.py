"""The tokenizer of a model directory: encode, decode, chat templates, streaming decode.

Wraps the Hugging Face fast tokenizer so that chat templates render exactly as transformers
renders them. Torch-free: the router uses it too.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tandem.api.errors import InvalidRequest, ModelLoadError


class Tokenizer:
    """Tokenizer loaded from ``tokenizer.json`` / ``tokenizer_config.json`` of a model directory."""

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer.json").is_file():
            raise ModelLoadError(f"model directory {model_dir} has no tokenizer.json")
        from transformers import AutoTokenizer  # deferred: heavy import, not needed at module load

        try:
            self._hf = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load the tokenizer of {model_dir}: {e}") from e
        self.backend = self._hf.backend_tokenizer
        """The underlying ``tokenizers.Tokenizer`` (used for streaming decode)."""

    @property
    def vocab_size(self) -> int:
        return len(self._hf)

    @property
    def eos_token_id(self) -> int | None:
        return self._hf.eos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._hf, "chat_template", None))

    def info(self) -> dict[str, Any]:
        """What a client needs to tokenize as this tokenizer does (vLLM's ``/tokenizer_info``):
        its class, special tokens, context bound and chat template."""
        hf = self._hf
        return {
            "tokenizer_class": type(hf).__name__,
            "bos_token": hf.bos_token,
            "eos_token": hf.eos_token,
            "pad_token": hf.pad_token,
            "unk_token": hf.unk_token,
            "add_bos_token": getattr(hf, "add_bos_token", None),
            "model_max_length": hf.model_max_length,
            "chat_template": getattr(hf, "chat_template", None),
        }

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (with the tokenizer's BOS etc. when ``add_special_tokens``)."""
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids`` (invalid UTF-8 becomes U+FFFD)."""
        return self._hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (for logprobs), decoded as far as it goes alone."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """Render a conversation to the prompt text with the model's chat template.

        Raises:
            InvalidRequest: the model has no chat template (and ``chat_template_kwargs`` brings
                none: a request's own, when trusted), or the template rejects the messages.
        """
        if not self.has_chat_template and not (chat_template_kwargs or {}).get("chat_template"):
            raise InvalidRequest(
                "this model has no chat template; use completions", param="messages"
            )
        from jinja2 import TemplateError

        try:
            return self._hf.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **(chat_template_kwargs or {}),
            )
        except (TemplateError, KeyError, TypeError, ValueError) as e:
            raise InvalidRequest(
                f"the chat template rejected the messages: {e}", param="messages"
            ) from e

    def encode_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        """Token ids of a rendered conversation (the template writes any BOS itself)."""
        return self.encode(self.render_chat(messages, **kwargs), add_special_tokens=False)

    def decode_stream(
        self, *, skip_special_tokens: bool = True, prompt_token_ids: Sequence[int] = ()
    ) -> "StreamDecoder":
        """An incremental decoder for the tokens that continue ``prompt_token_ids``."""
        return StreamDecoder(
            self, skip_special_tokens=skip_special_tokens, context=prompt_token_ids
        )


class StreamDecoder:
    """Incremental detokenizer: feed tokens one at a time, get text as soon as it is complete.

    Holds back partial UTF-8 sequences. Primed with the end of the prompt, so that tokenizers
    whose decoders treat the first token specially (SentencePiece's leading space) render a
    continuation as it reads after the prompt: " Paris", not "Paris".
    """

    CONTEXT_TOKENS = 6

    def __init__(
        self, tokenizer: Tokenizer, *, skip_special_tokens: bool, context: Sequence[int] = ()
    ) -> None:
        from tokenizers.decoders import DecodeStream

        self._backend = tokenizer.backend
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        tail = list(context)[-self.CONTEXT_TOKENS :]
        # A prompt ending inside a UTF-8 character would leak its stray bytes into the output.
        while tail and self._backend.decode(tail, skip_special_tokens=skip_special_tokens).endswith(
            "\ufffd"
        ):
            tail.pop()
        for token_id in tail:
            self._stream.step(self._backend, token_id)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._backend, token_id) or ""
