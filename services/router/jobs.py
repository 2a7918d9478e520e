"""JobBuilder: the router's one path from a front door's request to a validated ``Job``.

The OpenAI HTTP API and the gRPC RouterService both end here: they tokenize (or take token
ids), gather the sampling fields their request sets, and call ``job``. Limits come from the
served model and the live decode pods, defaults from the model's generation config, and the
checks from ``tandem.api.sampling_request``, so the two doors accept and refuse alike.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tandem.api.errors import ModelNotFound
from tandem.api.requests import Job
from tandem.api.sampling_request import RequestLimits, check_prompt_ids, resolve_sampling_params
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
    ) -> None:
        """
        Args:
            max_model_len: the context served now (the configured one, or less when a decode
                pod reports less).
            sampling_defaults: values for sampling fields a request leaves unset (the model's
                generation config, by default).
        """
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.vocab_size = vocab_size
        self._max_model_len = max_model_len
        self.sampling_defaults = dict(sampling_defaults or {})

    @property
    def max_model_len(self) -> int:
        return self._max_model_len()

    def check_model(self, model: str | None) -> None:
        """An empty name means the one model served."""
        if model and model != self.model_name:
            raise ModelNotFound(
                f"the model {model!r} does not exist; this server serves {self.model_name!r}"
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
        check_prompt_ids(prompt_ids, limits, prompt_param)
        params = resolve_sampling_params(
            sampling,
            num_prompt_tokens=len(prompt_ids),
            limits=limits,
            defaults=self.sampling_defaults,
        )
        return Job(request_id, list(prompt_ids), params, priority, cache_salt)
