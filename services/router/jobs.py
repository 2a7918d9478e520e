"""JobBuilder: the router's one path from a front door's request to a validated ``Job``.

The OpenAI HTTP API and the gRPC RouterService both end here: they tokenize (``encode``, which
refuses a text the context could never hold before tokenizing it) or take token ids, gather the
sampling fields their request sets, and call ``job``. Limits come from the served model and the
live decode pods, defaults from the model's generation config, and the checks from
``tandem.api.sampling_request``, so the two doors accept and refuse alike.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from services.router.input_limits import MIN_CHARS_PER_TOKEN, chars_per_token_bound
from tandem.api.errors import InvalidRequest, ModelNotFound, RequestTooLarge
from tandem.api.requests import Job
from tandem.api.sampling_request import RequestLimits, check_prompt_ids, resolve_sampling_params
from tandem.api.structured_grammar import check_structured_outputs
from tandem.tokenizer import Tokenizer


class JobBuilder:
    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        model_name: str,
        vocab_size: int,
        max_model_len: Callable[[], int],
        sampling_defaults: Mapping[str, Any] | None = None,
        max_prompts_per_request: int = 128,
        max_n: int = 128,
    ) -> None:
        """
        Args:
            max_model_len: the context served now (the configured one, or less when a decode
                pod reports less).
            sampling_defaults: values for sampling fields a request leaves unset (the model's
                generation config, by default).
            max_prompts_per_request: most prompts one request may carry.
            max_n: most completions (``n``, ``best_of``) one prompt may ask for.
        """
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.vocab_size = vocab_size
        self._max_model_len = max_model_len
        self.sampling_defaults = dict(sampling_defaults or {})
        self.max_prompts_per_request = max_prompts_per_request
        self.max_n = max_n
        # Most characters one token stands for (``input_limits.chars_per_token_bound``).
        self.chars_per_token = (
            chars_per_token_bound(tokenizer) if tokenizer is not None else MIN_CHARS_PER_TOKEN
        )

    @property
    def max_model_len(self) -> int:
        return self._max_model_len()

    def check_model(self, model: str | None) -> None:
        """An empty name means the one model served."""
        if model and model != self.model_name:
            raise ModelNotFound(
                f"the model {model!r} does not exist; this server serves {self.model_name!r}"
            )

    @property
    def max_prompt_chars(self) -> int:
        """Longest prompt text that could hold fewer tokens than the context."""
        return self.max_model_len * self.chars_per_token

    def check_prompt_chars(self, num_chars: int, param: str = "prompt") -> None:
        """Refuse a text longer than any the context could hold, before it is tokenized.

        Raises:
            RequestTooLarge: naming ``param``.
        """
        if num_chars > self.max_prompt_chars:
            raise RequestTooLarge(
                f"the prompt has {num_chars} characters; this model's context of "
                f"{self.max_model_len} tokens can never hold more than {self.max_prompt_chars}",
                param=param,
            )

    def encode(self, text: str, param: str = "prompt", *, add_special_tokens: bool = True):
        """Token ids of a prompt's text, after ``check_prompt_chars``.

        Raises:
            InvalidRequest: the text is too long, or the tokenizer cannot take it (a lone
                surrogate, which the HTTP layer refuses before, but a front door that misses it
                must still not answer 500).
        """
        self.check_prompt_chars(len(text), param)
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except (TypeError, UnicodeEncodeError) as exc:
            raise InvalidRequest(
                f"the text cannot be tokenized ({type(exc).__name__}): it must be valid "
                "Unicode without lone surrogates",
                param=param,
            ) from None

    def check_json_shape(self, body: object) -> None:
        """Refuse, before pydantic validates it, a parsed HTTP body holding more than any
        servable request: more prompts than ``max_prompts_per_request``, a token-id list longer
        than the context, more messages than the context has tokens, or any other top-level
        list or object with more entries than the context or the vocabulary (validating a
        2 MiB body of 500,000 one-token lists took pydantic ~1 s of the event loop).
        What is not refused here is validated as before.

        Raises:
            InvalidRequest: naming the field.
        """
        if not isinstance(body, dict):
            return
        context = self.max_model_len
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt:
            if isinstance(prompt[0], int):
                self._check_ids(len(prompt), context)
            else:
                self.check_prompt_count(len(prompt))
                for p in prompt:
                    if isinstance(p, list):
                        self._check_ids(len(p), context)
        messages = body.get("messages")
        if isinstance(messages, list) and len(messages) >= context:
            raise RequestTooLarge(
                f"the conversation has {len(messages)} messages; this model's context of "
                f"{context} tokens cannot hold them",
                param="messages",
            )
        most = max(context, self.vocab_size)
        for name, value in body.items():
            if isinstance(value, list | dict) and len(value) > most:
                raise InvalidRequest(f"{name} has {len(value)} entries", param=name)

    @staticmethod
    def _check_ids(num_ids: int, context: int) -> None:
        if num_ids > context:
            raise RequestTooLarge(
                f"the prompt has {num_ids} tokens; this model's context is {context} tokens",
                param="prompt",
            )

    @property
    def max_json_values(self) -> int:
        """Most JSON values a servable request body holds: every prompt filling the context."""
        return self.max_prompts_per_request * self.max_model_len

    @property
    def max_json_containers(self) -> int:
        """Most arrays and objects a servable request body holds: a list per prompt, an object
        and a content-part list per message (fewer messages than the context has tokens), a
        text part per token, and a few for the other fields."""
        return self.max_prompts_per_request + 3 * self.max_model_len + 64

    def check_prompt_count(self, count: int, param: str = "prompt") -> None:
        """At most ``max_prompts_per_request`` prompts in one request."""
        if count > self.max_prompts_per_request:
            raise InvalidRequest(
                f"the request has {count} prompts; at most {self.max_prompts_per_request} are "
                "accepted in one request (send the rest in further requests)",
                param=param,
            )

    def check_num_completions(self, sampling: Mapping[str, Any]) -> None:
        """``n`` and ``best_of`` at most ``max_n`` (the router's ``--max-n``).

        Raises:
            InvalidRequest: naming the field above it.
        """
        for name in ("n", "best_of"):
            value = sampling.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > self.max_n:
                raise InvalidRequest(
                    f"{name} must be at most {self.max_n} (the router's --max-n), got {value}",
                    param=name,
                )

    def job(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        sampling: Mapping[str, Any],
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        prompt_param: str = "prompt",
    ) -> Job:
        """A validated job for one prompt.

        Args:
            sampling: the sampling fields the request sets, by ``SamplingParams`` name.
            prompt_param: the request field that carried the prompt, named in errors.

        Raises:
            InvalidRequest: (``RequestTooLarge`` too) naming the field at fault.
        """
        limits = RequestLimits(vocab_size=self.vocab_size, max_model_len=self.max_model_len)
        self.check_num_completions(sampling)
        check_prompt_ids(prompt_ids, limits, prompt_param)
        params = resolve_sampling_params(
            sampling,
            num_prompt_tokens=len(prompt_ids),
            limits=limits,
            defaults=self.sampling_defaults,
        )
        if params.structured_outputs is not None:  # compiled once per distinct constraint
            check_structured_outputs(params.structured_outputs)
        return Job(request_id, list(prompt_ids), params, priority, cache_salt)
