"""Tokenizer: chat template, streaming decode equals full decode (UTF-8 split across tokens)."""

import pytest

from tandem.api.errors import InvalidRequest
from tandem.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(llama_dir):
    return Tokenizer(llama_dir)


@pytest.mark.parametrize(
    "text", ["plain ascii text", "ünïcödé — 漢字 and emoji 🚀🚀", "a\nb\tc  d"]
)
def test_stream_decode_equals_full_decode(tok, text):
    ids = tok.encode(text)
    stream = tok.decode_stream()
    assert "".join(stream.step(t) for t in ids) == tok.decode(ids) == text


def test_chat_template_and_errors(tok):
    ids = tok.encode_chat(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    )
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n")
    with pytest.raises(InvalidRequest) as e:
        tok.encode_chat([{"content": "no role"}])
    assert e.value.param == "messages"


def test_special_tokens_are_skipped_in_text(tok):
    ids = tok.encode("<|im_end|>x", add_special_tokens=False)
    assert tok.decode(ids) == "x"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_end|>x"


def test_stream_is_primed_with_the_prompt_for_sentencepiece_style_decoders(tmp_path):
    """Metaspace decoders drop the first token's leading space; a continuation must keep it."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        "<unk>": 0,
        "\u2581The": 1,
        "\u2581capital": 2,
        "\u2581is": 3,
        "\u2581Paris": 4,
        ".": 5,
    }
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    raw.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>").save_pretrained(tmp_path)
    tok = Tokenizer(tmp_path)
    prompt, out = [1, 2, 3], [4, 5]
    assert tok.decode(prompt + out) == "The capital is Paris."
    stream = tok.decode_stream(prompt_token_ids=prompt)
    assert "".join(stream.step(t) for t in out) == " Paris."
