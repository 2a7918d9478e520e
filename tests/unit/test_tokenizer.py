"""Tokenizer: chat template, streaming decode equals full decode (UTF-8 split across tokens)."""

import pytest

from tandem.errors import InvalidRequest
from tandem.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(llama_dir):
    return Tokenizer(llama_dir)


@pytest.mark.parametrize("text", ["plain ascii text", "ünïcödé — 漢字 and emoji 🚀🚀", "a\nb\tc  d"])
def test_stream_decode_equals_full_decode(tok, text):
    ids = tok.encode(text)
    stream = tok.decode_stream()
    assert "".join(stream.step(t) for t in ids) == tok.decode(ids) == text


def test_chat_template_and_errors(tok):
    ids = tok.encode_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n")
    with pytest.raises(InvalidRequest) as e:
        tok.encode_chat([{"content": "no role"}])
    assert e.value.param == "messages"


def test_special_tokens_are_skipped_in_text(tok):
    ids = tok.encode("<|im_end|>x", add_special_tokens=False)
    assert tok.decode(ids) == "x"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_end|>x"
