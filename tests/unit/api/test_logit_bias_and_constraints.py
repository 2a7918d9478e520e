"""The router's checks of logit_bias and structured outputs (both front doors go through
``resolve_sampling_params`` and ``JobBuilder.job``)."""

import pytest

from services.router.jobs import JobBuilder
from tandem.api.errors import InvalidRequest
from tandem.api.sampling_params import StructuredOutputs
from tandem.api.sampling_request import RequestLimits, resolve_sampling_params

LIMITS = RequestLimits(vocab_size=100, max_model_len=64)


def resolve(fields):
    return resolve_sampling_params(fields, num_prompt_tokens=10, limits=LIMITS)


def test_logit_bias_keys_are_token_ids_inside_the_vocabulary():
    assert resolve({"logit_bias": {"99": 100, "3": -100.0}}).logit_bias == (
        (3, -100.0),
        (99, 100.0),
    )
    for bad, fragment in (
        ({"100": 1}, "outside the vocabulary"),
        ({"x": 1}, "token ids"),
        ({"-1": 1}, "token ids"),
        ({"5": 101}, "[-100, 100]"),
        ({"5": float("nan")}, "[-100, 100]"),
        ({str(t): 1 for t in range(1025)}, "at most 1024 tokens"),  # sampler cost per step
    ):
        with pytest.raises(InvalidRequest) as e:
            resolve({"logit_bias": bad})
        assert e.value.param == "logit_bias" and fragment in str(e.value), bad


def builder() -> JobBuilder:
    return JobBuilder(None, model_name="m", vocab_size=100, max_model_len=lambda: 64)


def test_a_job_with_an_invalid_constraint_is_refused_naming_the_field():
    """The gRPC door's path: the constraint arrives in SamplingParams, compiled by the builder."""
    for so, param in (
        ({"json": '{"type": 5}'}, "structured_outputs.json"),
        ({"regex": "a{2"}, "structured_outputs.regex"),
        ({"grammar": "start: nothing_here"}, "structured_outputs.grammar"),
    ):
        with pytest.raises(InvalidRequest) as e:
            builder().job("r", [1, 2, 3], {"structured_outputs": so, "max_tokens": 4})
        assert e.value.param == param, so
    job = builder().job("r", [1, 2, 3], {"structured_outputs": {"regex": "a+"}, "max_tokens": 4})
    assert job.params.structured_outputs == StructuredOutputs(regex="a+")
