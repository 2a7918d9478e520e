"""vLLM's utility routes on the router: ``POST /tokenize``, ``POST /detokenize``, ``GET /version``,
``GET /tokenizer_info`` (with ``--enable-tokenizer-info-endpoint``) and OpenAI's
``GET /v1/models/{id}``.

They sit behind the same API-key check and input limits as the generation routes (both are ASGI
middleware around every route) and answer errors in the same OpenAI envelope. ``/tokenize``
renders a conversation exactly as ``/v1/chat/completions`` does (``OpenAIServing.
chat_prompt_ids``), so its count is the prompt a chat request would be charged for.

Shapes (vLLM's ``TokenizeCompletionRequest``/``TokenizeChatRequest``, ``DetokenizeRequest``):

- ``/tokenize`` ``{"model", "prompt", "add_special_tokens": true, "return_token_strs": false}`` or
  ``{"model", "messages", "add_generation_prompt": true, "continue_final_message": false,
  "add_special_tokens": false, "chat_template", "chat_template_kwargs", "tools", ...}`` ->
  ``{"count", "max_model_len", "tokens", "token_strs"}`` (``token_strs`` null unless asked);
- ``/detokenize`` ``{"model", "tokens"}`` -> ``{"prompt"}`` (special tokens kept, as vLLM).
"""

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

import tandem
from services.router.input_limits import LargeTextGate
from services.router.openai_api import OpenAIServing
from services.router.openai_protocol import ChatCompletionRequest, ChatMessage
from tandem.api.errors import InvalidRequest, ModelNotFound, RequestTooLarge


class TokenizeRequest(BaseModel):
    """vLLM's two tokenize bodies in one: exactly one of ``prompt`` and ``messages``."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None
    """Add the tokenizer's special tokens (BOS): default true for a prompt, false for messages
    (whose chat template writes them)."""
    return_token_strs: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None

    def chat_request(self) -> ChatCompletionRequest:
        """The conversation as the chat route receives it (rendered by the same code)."""
        if self.continue_final_message and self.add_generation_prompt:
            raise InvalidRequest(
                "continue_final_message and add_generation_prompt cannot both be true",
                param="continue_final_message",
            )
        kwargs = dict(self.chat_template_kwargs or {})
        if self.continue_final_message:
            kwargs["continue_final_message"] = True
        return ChatCompletionRequest(
            model=self.model,
            messages=self.messages,
            add_generation_prompt=self.add_generation_prompt,
            chat_template=self.chat_template,
            chat_template_kwargs=kwargs or None,
            tools=self.tools,
        )


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


def model_card(serving: OpenAIServing) -> dict:
    """The served model as ``/v1/models`` lists it (vLLM's fields)."""
    return {
        "id": serving.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "tandem",
        "root": serving.model_name,
        "max_model_len": serving.jobs.max_model_len,
    }


def tokenize(serving: OpenAIServing, body: TokenizeRequest) -> dict:
    """``/tokenize``'s answer (tokenizes: call it off the event loop).

    Raises:
        InvalidRequest: neither or both of prompt and messages, a text longer than any the
            context could hold (``RequestTooLarge``), a template error; ``param`` names it.
        ModelNotFound: another model.
    """
    jobs = serving.jobs
    jobs.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequest("exactly one of prompt and messages is required", param="prompt")
    if body.prompt is not None:
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = jobs.encode(body.prompt, "prompt", add_special_tokens=add_special)
    else:
        ids = serving.chat_prompt_ids(
            body.chat_request(), add_special_tokens=bool(body.add_special_tokens)
        )
    backend = serving.tokenizer.backend
    return {
        "count": len(ids),
        "max_model_len": jobs.max_model_len,
        "tokens": ids,
        "token_strs": [backend.id_to_token(t) for t in ids] if body.return_token_strs else None,
    }


def detokenize(serving: OpenAIServing, body: DetokenizeRequest) -> dict:
    """``/detokenize``'s answer.

    Raises:
        InvalidRequest: a token id outside the vocabulary, more tokens than the context holds
            (``RequestTooLarge``); ``param`` is ``tokens``.
        ModelNotFound: another model.
    """
    jobs = serving.jobs
    jobs.check_model(body.model)
    if len(body.tokens) > jobs.max_model_len:
        raise RequestTooLarge(
            f"{len(body.tokens)} tokens are more than this model's context of "
            f"{jobs.max_model_len} tokens",
            param="tokens",
        )
    bad = next((t for t in body.tokens if not 0 <= t < jobs.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(
            f"token id {bad} is outside the vocabulary [0, {jobs.vocab_size})", param="tokens"
        )
    return {"prompt": serving.tokenizer.decode(body.tokens, skip_special_tokens=False)}


def add_utility_routes(
    app: FastAPI, serving: OpenAIServing, large_texts: LargeTextGate, *, tokenizer_info: bool
) -> None:
    """Mount the routes (after ``ParsedBodyRoute`` is the app's route class); ``/tokenizer_info``
    only when ``tokenizer_info`` (it publishes the chat template)."""

    @app.post("/tokenize")
    async def tokenize_route(body: TokenizeRequest, request: Request):
        async with large_texts.slot(request):  # a long text is tokenized in a thread
            return await asyncio.to_thread(tokenize, serving, body)

    @app.post("/detokenize")
    async def detokenize_route(body: DetokenizeRequest, request: Request):
        async with large_texts.slot(request):
            return await asyncio.to_thread(detokenize, serving, body)

    if tokenizer_info:

        @app.get("/tokenizer_info")
        async def tokenizer_info_route():
            return serving.tokenizer.info()

    @app.get("/version")
    async def version():
        return {"version": tandem.__version__}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str):
        if model_id != serving.model_name:
            raise ModelNotFound(
                f"the model {model_id!r} does not exist; this server serves {serving.model_name!r}"
            )
        return model_card(serving)
