"""The field policy of the OpenAI routes: what cannot be honoured is a 400 naming the field, never
silently ignored; harmless fields pass; unknown ones are logged by name once."""

import logging

import pytest

from services.router import field_policy
from services.router.openai_protocol import ChatCompletionRequest, CompletionRequest
from tandem.api.errors import InvalidRequest

MESSAGES = [{"role": "user", "content": "hi"}]

OPENAI_CHAT_FIELDS = (
    "messages model audio frequency_penalty function_call functions logit_bias logprobs "
    "max_completion_tokens max_tokens metadata modalities n parallel_tool_calls prediction "
    "presence_penalty prompt_cache_key prompt_cache_retention reasoning_effort response_format "
    "safety_identifier seed service_tier stop store stream stream_options temperature "
    "tool_choice tools top_logprobs top_p user verbosity web_search_options"
).split()
OPENAI_COMPLETION_FIELDS = (
    "model prompt best_of echo frequency_penalty logit_bias logprobs max_tokens n "
    "presence_penalty seed stop stream stream_options suffix temperature top_p user"
).split()
VLLM_EXTRA_FIELDS = (
    "use_beam_search top_k min_p repetition_penalty length_penalty stop_token_ids "
    "include_stop_str_in_output ignore_eos min_tokens skip_special_tokens "
    "spaces_between_special_tokens truncate_prompt_tokens prompt_logprobs allowed_token_ids "
    "bad_words logits_processors vllm_xargs kv_transfer_params return_tokens_as_token_ids "
    "return_token_ids cache_salt priority request_id structured_outputs guided_json "
    "guided_regex guided_choice guided_grammar guided_decoding_backend "
    "guided_whitespace_pattern structural_tag add_special_tokens mm_processor_kwargs "
    "media_io_kwargs"
).split()
VLLM_CHAT_FIELDS = (
    "echo add_generation_prompt continue_final_message documents chat_template "
    "chat_template_kwargs include_reasoning"
).split()


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=MESSAGES, **fields)


def completion(**fields) -> CompletionRequest:
    return CompletionRequest(prompt="hi", **fields)


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        (chat, OPENAI_CHAT_FIELDS + VLLM_EXTRA_FIELDS + VLLM_CHAT_FIELDS),
        (completion, OPENAI_COMPLETION_FIELDS + VLLM_EXTRA_FIELDS + ["response_format"]),
    ],
)
def test_every_openai_and_vllm_field_is_honoured_refused_or_ignored(body, fields):
    declared = set(type(body()).model_fields)
    endpoint = field_policy.CHAT_REFUSED if body is chat else field_policy.COMPLETION_REFUSED
    listed = set(field_policy.REFUSED) | set(endpoint) | field_policy.IGNORED
    assert sorted(set(fields) - declared - listed) == []


@pytest.mark.parametrize(
    ("body", "field", "value"),
    [
        (chat, "audio", {"voice": "alloy", "format": "wav"}),
        (chat, "modalities", ["text", "audio"]),
        (chat, "prediction", {"type": "content", "content": "x"}),
        (chat, "web_search_options", {}),
        (chat, "reasoning_effort", "low"),
        (chat, "functions", [{"name": "f"}]),
        (chat, "function_call", "auto"),
        (chat, "use_beam_search", True),
        (chat, "length_penalty", 0.5),
        (chat, "spaces_between_special_tokens", False),
        (chat, "truncate_prompt_tokens", 10),
        (chat, "allowed_token_ids", [1, 2]),
        (chat, "bad_words", ["x"]),
        (chat, "return_token_ids", True),
        (chat, "echo", True),
        (chat, "continue_final_message", True),
        (chat, "add_special_tokens", True),
        (completion, "add_special_tokens", False),
        (completion, "response_format", {"type": "json_object"}),
        (completion, "prompt_embeds", "AAAA"),
        (completion, "kv_transfer_params", {"do_remote_decode": True}),
    ],
)
def test_a_field_tandem_cannot_honour_is_refused_naming_it(body, field, value):
    req = body(**{field: value})
    if field in type(req).model_fields:
        pytest.skip(f"{field} is declared on the body now: honoured there")
    with pytest.raises(InvalidRequest) as err:
        req.sampling_fields()
    assert err.value.param == field
    assert field in str(err.value)


@pytest.mark.parametrize(
    ("body", "field", "value"),
    [
        (chat, "audio", None),
        (chat, "modalities", ["text"]),
        (chat, "functions", []),
        (chat, "function_call", "none"),
        (chat, "use_beam_search", False),
        (chat, "length_penalty", 1.0),
        (chat, "spaces_between_special_tokens", True),
        (chat, "echo", False),
        (chat, "add_special_tokens", False),
        (completion, "add_special_tokens", True),
        (completion, "bad_words", []),
        (chat, "user", "alice"),
        (chat, "store", True),
        (chat, "metadata", {"team": "a"}),
        (chat, "service_tier", "auto"),
        (completion, "request_id", "abc"),
    ],
)
def test_neutral_and_harmless_values_are_accepted(body, field, value, caplog):
    with caplog.at_level(logging.WARNING, logger=field_policy.__name__):
        body(**{field: value}).sampling_fields()
    assert not caplog.records  # known fields: nothing to warn about


def test_a_neutral_value_must_match_its_type():
    """``0`` is not ``false``: a value of another type is no neutral one."""
    assert field_policy.REFUSED["use_beam_search"].asks_for_something(0)
    assert not field_policy.REFUSED["length_penalty"].asks_for_something(1)


def test_unknown_fields_are_logged_once_by_name_never_by_value(caplog, monkeypatch):
    monkeypatch.setattr(field_policy, "_warned", set())
    with caplog.at_level(logging.WARNING, logger=field_policy.__name__):
        chat(my_field="SECRET-PROMPT-TEXT", other=1).sampling_fields()
        chat(my_field="again").sampling_fields()
        completion(my_field=2, third=[1]).sampling_fields()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "The following fields were present in the request but ignored: 'my_field', 'other'",
        "The following fields were present in the request but ignored: 'third'",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    assert "SECRET" not in caplog.text


def test_remembered_unknown_names_are_bounded(caplog, monkeypatch):
    monkeypatch.setattr(field_policy, "_warned", set())
    monkeypatch.setattr(field_policy, "MAX_WARNED_NAMES", 3)
    with caplog.at_level(logging.WARNING, logger=field_policy.__name__):
        for i in range(10):
            chat(**{f"f{i}": 1, "x" * 500: 1}).sampling_fields()
    assert len(field_policy._warned) == 3
    assert max(len(n) for n in field_policy._warned) == 64  # a long name is shortened
    assert len(caplog.records) == 2  # once the bound is reached, nothing more is logged


def test_the_http_refusal_is_a_400_envelope_naming_the_field():
    """The refusal raised while the request becomes jobs is the 400 of the OpenAI envelope."""
    from services.router.http_errors import error_response

    with pytest.raises(InvalidRequest) as err:
        chat(audio={"voice": "alloy"}).sampling_fields()
    response = error_response(err.value)
    assert response.status_code == 400
    body = response.body.decode()
    assert '"param":"audio"' in body and '"type":"BadRequestError"' in body
