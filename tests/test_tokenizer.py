"""Tokenizer tests: the char tokenizer's contract, and GPT-2 ids checked against a reference.

Offline we cannot fetch tiktoken's own gpt2 files, so the reference is Hugging Face's GPT-2
tokenizer (transformers 5 runs it on the Rust `tokenizers` BPE, a separate implementation with
the original GPT-2 regex). It needs merges.txt, which we do not have, so tokenizer.gpt2_merges
recovers the merges from encoder.json: a token's id is its merge rank, so BPE of its
characters using only the lower ranks must stop at exactly the two halves GPT-2 merged.
"""
import json

import pytest
from transformers import GPT2Tokenizer as HFGPT2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode as hf_bytes_to_unicode

from data.tokenizer import (CharTokenizer, GPT2Tokenizer, bytes_to_unicode, get_tokenizer,
                            gpt2_merges, load_gpt2_encoding, tokenizer_from_meta)

EOT = "<|endoftext|>"
TEXTS = [
    "Hello world", " Hello world", "don't DON'T they'll we've I'm she'd you're it's",
    "  multiple   spaces\n\n", "trailing spaces   ", "\n\n\nnewlines\r\n\ttabs\t\t", "",
    "héllo wörld, naïve café 日本語のテキスト Привет мир ελληνικά",
    "emoji 🙂🎉 and a family joined by zero-width joiners 👩\u200d👩\u200d👧",
    "numbers 3.14159 1,000,000 2024-01-01 0x7fff 12345678901234 ½ Ⅻ",
    "def f(x):\n    return x ** 2  # square\n\nprint({'a': [1, 2]})\n",
    "a<|endoftext|>b", f"{EOT}{EOT} two documents", "\x00\x01\x7f control bytes \u00ad",
]


@pytest.fixture(scope="session")
def shakespeare(shakespeare_path) -> str:
    return shakespeare_path.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------- char tokenizer

def test_char_round_trip_on_shakespeare(shakespeare):
    tok = CharTokenizer.from_text(shakespeare)
    assert tok.vocab_size == 65  # Tiny Shakespeare's well-known character count
    ids = tok.encode(shakespeare)
    assert len(ids) == len(shakespeare) and max(ids) == 64
    assert tok.decode(ids) == shakespeare
    assert tok.eot_token is None


def test_char_vocab_is_sorted_so_ids_do_not_depend_on_text_order():
    assert CharTokenizer.from_text("cab\nc").chars == ["\n", "a", "b", "c"]
    assert CharTokenizer.from_text("bca").encode("abc") == [0, 1, 2]


def test_char_unknown_character_is_named_with_its_position():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"character 'Z' at position 2 is not in the vocab"):
        tok.encode("abZc")
    with pytest.raises(ValueError, match=r"'\\n' at position 0"):
        tok.encode("\nabc")


def test_char_rejects_a_vocabulary_of_non_characters():
    with pytest.raises(ValueError, match="distinct single characters"):
        CharTokenizer(["a", "a"])
    with pytest.raises(ValueError, match="distinct single characters"):
        CharTokenizer(["ab"])


def test_char_meta_survives_json_and_rebuilds_the_same_tokenizer():
    text = "To be, or not to be: ¿que? \"quoted\"\n\ttab 🙂"
    tok = CharTokenizer.from_text(text)
    meta = json.loads(json.dumps(tok.meta()))
    assert meta == {"tokenizer": "char", "vocab_size": tok.vocab_size, "chars": tok.chars}
    again = tokenizer_from_meta(meta)
    assert again.encode(text) == tok.encode(text)
    assert again.decode(tok.encode(text)) == text


def test_meta_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown tokenizer 'sentencepiece'"):
        tokenizer_from_meta({"tokenizer": "sentencepiece"})
    with pytest.raises(ValueError, match="vocab_size 3 but its char tokenizer has 2"):
        tokenizer_from_meta({"tokenizer": "char", "vocab_size": 3, "chars": ["a", "b"]})


def test_get_tokenizer():
    assert get_tokenizer("char", "hello").chars == ["e", "h", "l", "o"]
    assert get_tokenizer("gpt2").vocab_size == 50257
    with pytest.raises(ValueError, match="pass text="):
        get_tokenizer("char")
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'"):
        get_tokenizer("bpe")


# ---------------------------------------------------------------------------- GPT-2 BPE

@pytest.fixture(scope="session")
def reference(gpt2_vocab_path):
    encoder = json.loads(gpt2_vocab_path.read_text(encoding="utf-8"))
    merges = gpt2_merges(encoder)
    assert len(merges) == 50000  # GPT-2's merges.txt has 50000 lines after its header
    # vocab and merges passed in memory: nothing is looked up on the Hub, so this runs offline.
    return HFGPT2Tokenizer(vocab=encoder, merges=merges)


@pytest.fixture(scope="session")
def gpt2(gpt2_vocab_path) -> GPT2Tokenizer:
    return GPT2Tokenizer(str(gpt2_vocab_path))


def test_bytes_to_unicode_matches_gpt2_table():
    table = bytes_to_unicode()
    assert table == hf_bytes_to_unicode()
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    assert len(set(table.values())) == 256


def test_gpt2_ids_match_reference(gpt2, reference, shakespeare):
    paragraphs = shakespeare.split("\n\n")
    for text in TEXTS + paragraphs[:200] + [shakespeare]:
        assert gpt2.encode(text) == reference.encode(text, add_special_tokens=False), text[:80]


def test_gpt2_golden_ids(gpt2, reference):
    # "Hello world" and " Hello world" are the examples in transformers' GPT2Tokenizer docs.
    golden = {"Hello world": [15496, 995], " Hello world": [18435, 995], EOT: [50256]}
    for text, ids in golden.items():
        assert gpt2.encode(text) == ids
        assert reference.encode(text, add_special_tokens=False) == ids


def test_gpt2_decode_round_trip(gpt2):
    for text in TEXTS:
        assert gpt2.decode(gpt2.encode(text)) == text
    # Half of a multi-byte character (a cut in sampling) decodes to U+FFFD instead of raising.
    assert gpt2.decode(gpt2.encode("🙂")[:1]) == "\ufffd"


def test_gpt2_interface_and_meta(gpt2):
    assert (gpt2.vocab_size, gpt2.eot_token) == (50257, 50256)
    meta = json.loads(json.dumps(gpt2.meta()))
    assert meta == {"tokenizer": "gpt2", "vocab_size": 50257}
    assert isinstance(tokenizer_from_meta(meta), GPT2Tokenizer)


def test_gpt2_vocab_errors_are_actionable(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"missing.json \(from GPT2_VOCAB\)"):
        GPT2Tokenizer(str(tmp_path / "missing.json"))
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"a": 0, EOT: 1}))
    with pytest.raises(ValueError, match="is not GPT-2's encoder.json"):
        GPT2Tokenizer(str(small))

    def no_network(name):
        raise OSError("no network")
    monkeypatch.setattr("tiktoken.get_encoding", no_network)
    with pytest.raises(RuntimeError, match="set GPT2_VOCAB"):
        load_gpt2_encoding.__wrapped__(None)  # past the cache, which may hold a real download
