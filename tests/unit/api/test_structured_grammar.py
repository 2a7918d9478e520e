"""Structured outputs as llguidance grammars: what each constraint compiles to, and the 400s."""

import json

import pytest

from tandem.api.errors import InvalidRequest
from tandem.api.sampling_params import StructuredOutputs
from tandem.api.structured_grammar import check_structured_outputs, grammar_text


@pytest.fixture(scope="module")
def ll_tokenizer(llama_dir):
    import llguidance

    return llguidance.LLTokenizer(str(llama_dir / "tokenizer.json"))


@pytest.fixture
def accepts(ll_tokenizer):
    """accepts(so, text): whether the constraint's grammar matches ``text`` in full."""
    import llguidance

    def check(so: StructuredOutputs, text: str) -> bool:
        m = llguidance.LLMatcher(ll_tokenizer, grammar_text(so), log_level=0)
        ids = ll_tokenizer.tokenize_str(text)
        return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()

    return check


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 4}, "n": {"type": "integer"}},
    "required": ["name", "n"],
    "additionalProperties": False,
}


def test_json_schema_is_compact_json_by_default(accepts):
    so = StructuredOutputs(json=SCHEMA)
    assert accepts(so, '{"name":"ab","n":12}')
    assert not accepts(so, '{"name": "ab", "n": 12}')  # whitespace: off unless the schema asks
    assert not accepts(so, '{"name":"abcde","n":1}')  # maxLength
    assert not accepts(so, '{"name":"ab"}')  # required
    flexible = StructuredOutputs(json={**SCHEMA, "x-guidance": {"whitespace_flexible": True}})
    assert accepts(flexible, '{"name": "ab", "n": 12}')


def test_json_object_is_any_object(accepts):
    so = StructuredOutputs(json_object=True)
    assert accepts(so, '{"a":[1,2,{"b":null}]}')
    assert not accepts(so, "[1]") and not accepts(so, '"text"')


def test_regex_matches_in_full(accepts):
    so = StructuredOutputs(regex=r"[a-z]{2}-\d{3}")
    assert accepts(so, "ab-123")
    assert not accepts(so, "ab-12") and not accepts(so, "xab-123")


def test_choice_is_exactly_one_of_the_strings_escaped(accepts):
    tricky = ('say "hi"', "back\\slash", "a|b", "/x/", "")
    so = StructuredOutputs(choice=tricky)
    for c in tricky:
        assert accepts(so, c), c
    assert not accepts(so, "say hi") and not accepts(so, "a") and not accepts(so, "ab")


def test_grammar_takes_lark_and_gbnf(accepts):
    lark = StructuredOutputs(grammar='start: "(" item ("," item)* ")"\nitem: /[0-9]+/')
    assert accepts(lark, "(1,22,333)") and not accepts(lark, "(1,)")
    gbnf = StructuredOutputs(grammar='root ::= "yes" | "no"')
    assert accepts(gbnf, "no") and not accepts(gbnf, "maybe")


@pytest.mark.parametrize(
    ("so", "param", "reason"),
    [
        (StructuredOutputs(json='{"type": "bogus"}'), "structured_outputs.json", "bogus"),
        (StructuredOutputs(json="{not json"), "structured_outputs.json", "JSON schema"),
        (
            StructuredOutputs(json={"properties": {"a": {"$ref": "#/nope"}}}),
            "structured_outputs.json",
            "nope",
        ),
        (StructuredOutputs(regex="[0-9"), "structured_outputs.regex", "unclosed"),
        (
            StructuredOutputs(grammar="start: undefined_rule"),
            "structured_outputs.grammar",
            "unknown",
        ),
    ],
)
def test_invalid_constraints_are_refused_naming_the_field(so, param, reason):
    with pytest.raises(InvalidRequest) as info:
        check_structured_outputs(so)
    assert info.value.param == param
    assert reason in str(info.value)


def test_the_error_can_name_the_field_the_constraint_came_from():
    with pytest.raises(InvalidRequest) as info:
        check_structured_outputs(StructuredOutputs(json="[]"), param="response_format")
    assert info.value.param == "response_format"


def test_valid_constraints_pass_and_validation_is_memoised():
    so = StructuredOutputs(json=json.dumps(SCHEMA))
    check_structured_outputs(so)
    check_structured_outputs(StructuredOutputs(json=json.dumps(SCHEMA)))  # equal value: cached
    from tandem.api import structured_grammar

    assert structured_grammar._validate.cache_info().hits >= 1


def test_large_constraints_are_checked_but_never_memoised():
    # Regression: the memo caches kept every distinct constraint (512 of 2 MiB bodies: gigabytes
    # of router memory, refused ones included).
    from tandem.api import structured_grammar

    big = StructuredOutputs(choice=tuple(f"{i}-" + "x" * 1000 for i in range(70)))
    bad = StructuredOutputs(regex="(" + "a" * 70_000)
    before = (structured_grammar._validate.cache_info(), structured_grammar._build.cache_info())
    check_structured_outputs(big)
    assert "69-" in grammar_text(big)  # the last choice: built whole
    with pytest.raises(InvalidRequest) as info:
        check_structured_outputs(bad)
    assert info.value.param == "structured_outputs.regex"
    after = (structured_grammar._validate.cache_info(), structured_grammar._build.cache_info())
    assert [c.currsize for c in after] == [c.currsize for c in before]
