"""The load test's measurement and workload parts (loadtest/), without a server."""

import json
import sys
from pathlib import Path

import pytest

# Imported the way locust imports them: from the locustfile's directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtest"))
from measure import JsonlWriter, RequestRecord, StreamError, StreamTimer, sse_payloads  # noqa: E402
from workloads import Conversation, WorkloadOptions, as_prompt, system_prompt  # noqa: E402


def sse(*payloads) -> list[str]:
    return [f"data: {p if isinstance(p, str) else json.dumps(p)}" for p in payloads]


def test_sse_payloads_stop_at_done_and_skip_blank_lines():
    lines = ["", *sse({"a": 1}), "", *sse({"b": 2}, "[DONE]", {"never": 1})]
    assert list(sse_payloads(lines)) == [{"a": 1}, {"b": 2}]


def test_an_error_inside_the_stream_is_a_failure_with_its_message():
    lines = sse(
        {"a": 1},
        {"error": {"type": "ServiceUnavailableError", "message": "decode pod died"}},
        "[DONE]",
    )
    with pytest.raises(StreamError, match="ServiceUnavailableError: decode pod died"):
        list(sse_payloads(lines))


def test_a_stream_cut_before_done_is_a_failure():
    with pytest.raises(StreamError, match=r"without data: \[DONE\]"):
        list(sse_payloads(sse({"a": 1})))


def test_timer_definitions():
    timer = StreamTimer()
    timer.start -= 1.0  # the request went out a second ago
    for _ in range(3):
        timer.content()
    record = RequestRecord("chat", "random", "r1")
    timer.finish(record, output_tokens=5)
    assert 1.0 <= record.ttft_s <= record.e2e_s
    assert len(record.itl_s) == 2
    assert record.tpot_s == pytest.approx((record.e2e_s - record.ttft_s) / 4)


def test_nothing_generated_is_a_failure():
    with pytest.raises(StreamError, match="no content"):
        StreamTimer().finish(RequestRecord("chat", "random", "r1"), output_tokens=0)


def test_jsonl_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    writer = JsonlWriter(str(path))
    writer.write(RequestRecord("sdk", "random", "r1", ok=True, output_tokens=3))
    writer.write(RequestRecord("chat", "random", "r2", error="HTTP 400"))
    writer.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["request_id"], r["ok"], r["error"]) for r in rows] == [
        ("r1", True, None),
        ("r2", False, "HTTP 400"),
    ]


def test_random_prompts_vary_in_length_within_bounds():
    conv = Conversation(WorkloadOptions(prompt_words_min=5, prompt_words_max=9), 0)
    lengths = {len(conv.next_messages()[0]["content"].split()) for _ in range(50)}
    assert lengths <= set(range(5, 10)) and len(lengths) > 1


def test_shared_prefix_users_share_a_few_system_prompts():
    opts = WorkloadOptions(workload="shared-prefix", system_prompts=2, system_prompt_words=10)
    systems = {Conversation(opts, u).next_messages()[0]["content"] for u in range(20)}
    assert systems <= {system_prompt(opts, 0), system_prompt(opts, 1)} and len(systems) == 2


def test_multi_turn_conversations_grow_then_start_over():
    conv = Conversation(
        WorkloadOptions(workload="multi-turn", turns=2, prompt_words_min=2, prompt_words_max=5), 3
    )
    first = conv.next_messages()
    conv.answered("reply one")
    second = conv.next_messages()
    assert second[: len(first)] == first and second[len(first)] == {
        "role": "assistant",
        "content": "reply one",
    }
    assert as_prompt(second).startswith(as_prompt(first)[: -len("\nassistant:")])
    conv.answered("reply two")
    assert len(conv.next_messages()) == 2  # a new conversation: system + first question


@pytest.mark.parametrize(
    "bad",
    [
        {"workload": "bursty"},
        {"prompt_words_min": 0},
        {"prompt_words_min": 9, "prompt_words_max": 3},
        {"turns": 0},
    ],
)
def test_bad_workload_options_are_refused(bad):
    with pytest.raises(ValueError):
        WorkloadOptions(**bad)
