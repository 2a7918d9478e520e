"""The one translation from a request's sampling fields to SamplingParams (both front doors)."""

import pytest

from tandem.api.errors import InvalidRequest, RequestTooLarge
from tandem.api.sampling_request import (
    RequestLimits,
    check_prompt_ids,
    resolve_sampling_params,
)

LIMITS = RequestLimits(vocab_size=100, max_model_len=64)


def resolve(fields, *, prompt=10, defaults=None, limits=LIMITS):
    return resolve_sampling_params(
        fields, num_prompt_tokens=prompt, limits=limits, defaults=defaults
    )


def test_unset_fields_take_the_generation_defaults_and_set_ones_win():
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    p = resolve({"temperature": 0.0}, defaults=defaults)
    assert (p.temperature, p.top_p, p.top_k) == (0.0, 0.9, 20)
    # Only vLLM's generation-config fields are defaults, whatever else the mapping holds.
    assert resolve({}, defaults={"max_tokens": 3, "seed": 1}).seed is None


@pytest.mark.parametrize("off", [0, -1])
def test_top_k_zero_or_minus_one_means_off_even_over_a_default(off):
    assert resolve({"top_k": off}, defaults={"top_k": 20}).top_k is None
    assert resolve({"top_k": 5}, defaults={"top_k": 20}).top_k == 5


@pytest.mark.parametrize("bad", [-2, False, 2**31])  # the wire's top_k is an int32
def test_other_top_k_values_are_refused(bad):
    with pytest.raises(InvalidRequest) as e:
        resolve({"top_k": bad})
    assert e.value.param == "top_k"


def test_max_tokens_defaults_to_the_rest_of_the_context_and_must_fit_it():
    assert resolve({}, prompt=10).max_tokens == 54
    assert resolve({"max_tokens": 54}, prompt=10).max_tokens == 54
    with pytest.raises(RequestTooLarge) as e:
        resolve({"max_tokens": 55}, prompt=10)
    assert e.value.param == "max_tokens" and "65 were requested" in str(e.value)
    with pytest.raises(InvalidRequest) as e:
        resolve({"max_tokens": 0})
    assert e.value.param == "max_tokens"


def test_stop_token_ids_must_lie_inside_the_vocabulary():
    assert resolve({"stop_token_ids": [99]}).stop_token_ids == (99,)
    with pytest.raises(InvalidRequest) as e:
        resolve({"stop_token_ids": [100]})
    assert e.value.param == "stop_token_ids"
    with pytest.raises(InvalidRequest) as e:
        resolve({"stop_token_ids": 5})  # not a list
    assert e.value.param == "stop_token_ids"


def test_unknown_fields_and_unset_values():
    with pytest.raises(InvalidRequest, match="unknown sampling option 'temperatur'") as e:
        resolve({"temperatur": 1})
    assert e.value.param == "temperatur"
    assert resolve({"seed": None, "stop": None}).seed is None  # None: not set


def test_without_limits_only_the_values_are_checked():
    """The SDK checks a call before sending it, not knowing the context length."""
    p = resolve({"min_tokens": 40}, limits=None)
    assert p.min_tokens == 40  # a stand-in max_tokens that admits min_tokens
    assert resolve({"stop_token_ids": [10**6]}, limits=None).stop_token_ids == (10**6,)
    with pytest.raises(InvalidRequest) as e:
        resolve({"temperature": -1}, limits=None)
    assert e.value.param == "temperature"


@pytest.mark.parametrize(
    "ids, error, fragment",
    [
        ([], InvalidRequest, "empty"),
        ([1, 100], InvalidRequest, "token id 100 is outside the vocabulary"),
        ([-1], InvalidRequest, "token id -1"),
        ([1] * 64, RequestTooLarge, "the prompt has 64"),
    ],
)
def test_prompts_are_checked_against_vocabulary_and_context(ids, error, fragment):
    with pytest.raises(error, match=fragment) as e:
        check_prompt_ids(ids, LIMITS, "messages")
    assert e.value.param == "messages"
    check_prompt_ids([1] * 63, LIMITS, "prompt")


def test_the_http_body_declares_every_sampling_field():
    """A field added to SamplingParams (and so to the protobuf message) must reach HTTP too."""
    from services.router.openai_protocol import ChatCompletionRequest, CompletionRequest
    from tandem.api.sampling_params import SAMPLING_FIELDS

    for body in (CompletionRequest, ChatCompletionRequest):
        missing = set(SAMPLING_FIELDS) - set(body.model_fields)
        assert not missing, (body.__name__, missing)
