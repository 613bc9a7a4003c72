"""The two tokenizers a dataset can use: characters, or GPT-2's byte-level BPE.

CharTokenizer gives each distinct character of the training text one id. Its vocabulary is tiny
(65 for Tiny Shakespeare), so a small model trains fast, but it can only spell what it has seen.

GPT2Tokenizer is OpenAI's byte-pair encoding (50257 tokens) run by tiktoken. Any text encodes,
because every byte has a token, and the ids match OpenAI's GPT-2 weights. Offline, point the
GPT2_VOCAB environment variable at GPT-2's encoder.json and no download is needed.

Both share one interface: encode(text) -> list[int], decode(ids) -> str, token_bytes(id) ->
bytes, vocab_size, eot_token and meta(), a JSON-serialisable dict that a dataset stores in
meta.json and that tokenizer_from_meta() turns back into the same tokenizer.
"""
import functools
import json
import os

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

EOT = "<|endoftext|>"


class TokenizerError(ValueError):
    """A tokenizer that cannot be built: a damaged vocabulary in meta.json, or GPT-2's
    vocabulary unavailable. Scripts print it as one line."""


class CharTokenizer:
    """Maps each character of a fixed vocabulary to its index in that vocabulary."""

    eot_token = None  # character-level data has no document separator

    def __init__(self, chars: list[str]):
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("a character vocabulary must be distinct single characters")
        self.chars = list(chars)
        self.vocab_size = len(self.chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The vocabulary is every character of text, sorted, so the ids do not depend on order."""
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of text; ValueError names the first unknown character."""
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            pos, char = next((i, c) for i, c in enumerate(text) if c not in self.stoi)
            raise ValueError(f"character {char!r} at position {pos} is not in the vocabulary "
                             "of this character-level model") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def token_bytes(self, i: int) -> bytes:
        return self.chars[i].encode("utf-8")

    def meta(self) -> dict:
        return {"tokenizer": "char", "vocab_size": self.vocab_size, "chars": self.chars}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte to a printable character that stands for it.

    encoder.json stores tokens as text, so GPT-2 spells every byte with a visible character:
    printable Latin-1 bytes stand for themselves, and the 68 others (control codes, space,
    0x7f-0xa0, 0xad) are moved up to chr(256), chr(257), ... in byte order. So b" " is "Ġ".
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, moved = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + moved)
            moved += 1
    return table


@functools.lru_cache(maxsize=None)  # building 50k ranks takes a moment; do it once per file
def load_gpt2_encoding(vocab_path: str | None) -> tiktoken.Encoding:
    """GPT-2's tiktoken Encoding, from a local encoder.json if given, else tiktoken's download."""
    if vocab_path is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except (OSError, ValueError) as e:  # requests' errors are OSErrors; bad hash ValueError
            raise RuntimeError(
                "could not download the GPT-2 vocabulary through tiktoken; set GPT2_VOCAB to a "
                "local copy of GPT-2's encoder.json (or vocab.json) to work offline") from e
    if not os.path.isfile(vocab_path):
        raise FileNotFoundError(f"GPT-2 vocabulary {vocab_path} (from GPT2_VOCAB) is not a file")
    with open(vocab_path, encoding="utf-8") as f:
        encoder = json.load(f)  # a damaged file: ValueError (JSON, or UTF-8), as below
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    check_gpt2_encoder(encoder, byte_of, vocab_path)
    # GPT-2 numbers its tokens in the order their merges were learned, so a token's id is its
    # merge rank and tiktoken needs no merges.txt: it merges the pair whose result ranks lowest.
    ranks = {bytes(byte_of[ch] for ch in token): i for token, i in encoder.items() if token != EOT}
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,  # splits text into words before BPE, as in tiktoken's gpt2
        mergeable_ranks=ranks,
        special_tokens={EOT: 50256},
        explicit_n_vocab=50257,
    )


def check_gpt2_encoder(encoder, byte_of, vocab_path):
    """ValueError unless encoder is GPT-2's {token: id}: 50257 tokens spelled in GPT-2's byte
    alphabet (byte_of's keys), ids 0-50256 each used once, <|endoftext|> the last. tiktoken
    would otherwise fail on it with a traceback, or quietly encode with a wrong vocabulary."""
    def refuse(reason):
        raise ValueError(f"{vocab_path} is not GPT-2's encoder.json: {reason}")

    if not isinstance(encoder, dict):
        refuse(f"it holds a JSON {type(encoder).__name__}, not an object of tokens and ids")
    if len(encoder) != 50257 or encoder.get(EOT) != 50256:
        refuse(f"expected 50257 tokens with {EOT} = 50256")
    for token, i in encoder.items():
        if type(i) is not int:
            refuse(f"token {token!r} has the id {i!r}, not an integer")
        if token != EOT and not (token and all(ch in byte_of for ch in token)):
            refuse(f"token {token!r} has a character outside GPT-2's byte alphabet")
    if set(encoder.values()) != set(range(50257)):
        refuse("its ids are not 0 to 50256, each once (an id is used twice)")


def gpt2_merges(encoder: dict[str, int]) -> list[tuple[str, str]]:
    """GPT-2's 50,000 merges in rank order (the lines of its merges.txt), rebuilt from
    encoder.json alone, for tools that want both files. A token's id is its merge rank, so
    byte-pair encoding its characters with only the merges ranked below it must stop at
    exactly the two halves that GPT-2 joined to make it. Takes about half a second."""
    def bpe(word: str, max_rank: int) -> list[str]:
        parts = list(word)  # encoder.json spells each byte as one character
        while len(parts) > 1:
            rank, i = min((encoder.get(a + b, max_rank), i)
                          for i, (a, b) in enumerate(zip(parts, parts[1:])))
            if rank >= max_rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    merges = []
    for token, rank in sorted(encoder.items(), key=lambda item: item[1]):
        if rank < 256 or token == EOT:  # single bytes and the special token are not merges
            continue
        parts = bpe(token, rank)
        assert len(parts) == 2, f"token {token!r} (rank {rank}) is not one merge: {parts}"
        merges.append((parts[0], parts[1]))
    return merges


class GPT2Tokenizer:
    """GPT-2's byte-level BPE, with the vocabulary from vocab_path or GPT2_VOCAB if set."""

    vocab_size = 50257
    eot_token = 50256  # "<|endoftext|>", which GPT-2 placed between documents

    def __init__(self, vocab_path: str | None = None):
        self.encoding = load_gpt2_encoding(vocab_path or os.environ.get("GPT2_VOCAB") or None)

    def encode(self, text: str) -> list[int]:
        """Ids of text. NOTE the literal "<|endoftext|>" becomes the single token 50256, so a
        corpus whose documents are joined by it keeps its separators; it is never spelled out."""
        return self.encoding.encode(text, allowed_special="all")

    def decode(self, ids) -> str:
        # A cut through a multi-byte character decodes to U+FFFD rather than raising.
        return self.encoding.decode(list(ids))

    def token_bytes(self, i: int) -> bytes:
        """A token's bytes, which may be part of a character: what a stream decodes."""
        return self.encoding.decode_single_token_bytes(i)

    def meta(self) -> dict:
        return {"tokenizer": "gpt2", "vocab_size": self.vocab_size}


def tokenizer_from_meta(meta: dict) -> CharTokenizer | GPT2Tokenizer:
    """The tokenizer described by a dataset's meta.json, as written by its tokenizer's meta().
    Any failure, a damaged meta or GPT-2's vocabulary out of reach, is a TokenizerError."""
    kind = meta.get("tokenizer")
    try:
        if kind == "char":
            chars = meta.get("chars")
            if not (isinstance(chars, list) and all(isinstance(c, str) for c in chars)):
                raise ValueError("its chars must be a list of characters")
            tok = CharTokenizer(chars)
        elif kind == "gpt2":
            tok = GPT2Tokenizer()
        else:
            raise ValueError(f"unknown tokenizer {kind!r}; expected 'char' or 'gpt2'")
    except (OSError, RuntimeError, ValueError) as e:  # also GPT-2's vocabulary: no network
        raise TokenizerError(f"cannot build the tokenizer: {e}") from None
    if meta.get("vocab_size", tok.vocab_size) != tok.vocab_size:
        raise TokenizerError(f"meta.json says vocab_size {meta['vocab_size']} but its {kind} "
                             f"tokenizer has {tok.vocab_size} tokens")
    return tok


def get_tokenizer(kind: str, text: str | None = None) -> CharTokenizer | GPT2Tokenizer:
    """A new tokenizer by name: "char" learns its vocabulary from text, "gpt2" needs none."""
    if kind == "char":
        if text is None:
            raise ValueError("a char tokenizer is built from the training text; pass text=")
        return CharTokenizer.from_text(text)
    if kind == "gpt2":
        return GPT2Tokenizer()
    raise ValueError(f"unknown tokenizer {kind!r}; expected 'char' or 'gpt2'")
