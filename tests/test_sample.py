"""sample.py: where it looks by default, streaming, a reader that leaves early, and
temperatures too small for float32."""
import io
import subprocess
import sys

import torch

from data.tokenizer import CharTokenizer, GPT2Tokenizer
from helpers import ROOT, char_checkpoint
from model import sample_next
from sample import SampleConfig, sample, stream
from training.settings import TrainConfig, parse_config


def test_bare_sample_reads_what_bare_train_writes():
    # `python train.py` trains one of these two recipes; `python sample.py` must find it.
    for name in ("train_shakespeare_char.toml", "train_shakespeare_char_cpu.toml"):
        trained = parse_config(TrainConfig, [str(ROOT / "config" / name)])
        assert SampleConfig().out_dir == trained.out_dir


def test_a_tiny_temperature_is_greedy_not_nan():
    logits = torch.randn(64, 50) * 10
    for temperature in (1e-45, 1e-30, 1e-300):  # float32 overflows dividing by each of these
        draws = sample_next(logits, temperature=temperature, top_k=10, top_p=0.9)
        assert torch.equal(draws.flatten(), logits.argmax(-1)), temperature


def test_sample_py_at_temperature_1e_45_prints_the_greedy_sample(tmp_path):
    char_checkpoint(tmp_path, "abcd")
    texts = {}
    for temperature in (0.0, 1e-45):
        cfg = SampleConfig(out_dir=str(tmp_path), start="ab", num_samples=1, device="cpu",
                           max_new_tokens=30, temperature=temperature)
        out = io.StringIO()
        texts[temperature] = sample(cfg.validate(), out)
        assert out.getvalue() == texts[temperature][0] + "\n"  # as it streamed
    assert texts[1e-45] == texts[0.0] and len(texts[0.0][0]) == 32


def test_a_reader_that_leaves_early_is_no_error(tmp_path):
    # python sample.py | head -3: head exits, and the next write finds the pipe closed.
    char_checkpoint(tmp_path)
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), f"--out_dir={tmp_path}",
                             "--device=cpu", "--num_samples=1", "--max_new_tokens=20000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(10)
    proc.stdout.close()
    assert proc.wait(timeout=600) == 0  # a hang guard
    assert proc.stderr.read() == b""


def old_stream(tokenizer, ids, out):
    """sample.py's first streaming, which decoded the whole text again for every token: the
    output the incremental stream must reproduce byte for byte."""
    shown = 0
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n])
        if not text.endswith("\ufffd"):
            out.write(text[shown:])
            shown = len(text)
    out.write(tokenizer.decode(ids)[shown:] + "\n")


def streamed(tokenizer, ids):
    out = io.StringIO()
    assert stream(tokenizer, (torch.tensor([[i]]) for i in ids), out) == ids
    return out.getvalue()


def test_stream_prints_what_the_whole_decode_printed(gpt2_vocab_path):
    gpt2 = GPT2Tokenizer()
    text = "Café 🙂 naïve 日本語 done"
    ids = gpt2.encode(text)
    assert len(ids) > len(text.split())  # the emoji and the kanji are split across tokens
    lone = [gpt2.encoding.encode_single_token(b) for b in (b"\xe6", b"\x80", b"\xf0\x9f")]
    for case in (ids, ids[:-3] + lone, lone + ids, ids + lone[:1]):  # broken bytes too
        expected = io.StringIO()
        old_stream(gpt2, case, expected)
        assert streamed(gpt2, case) == expected.getvalue()
    char = CharTokenizer.from_text(text)
    assert streamed(char, char.encode(text)) == text + "\n"


class Counting:
    """A tokenizer that counts the tokens it turns back into text."""

    def __init__(self, tokenizer):
        self.tokenizer, self.work = tokenizer, 0

    def decode(self, ids):
        ids = list(ids)
        self.work += len(ids)
        return self.tokenizer.decode(ids)

    def token_bytes(self, i):
        self.work += 1
        return self.tokenizer.token_bytes(i)


def test_streaming_costs_linear_work():
    char = CharTokenizer(["a", "b", "é"])
    work = {}
    for n in (2_000, 20_000):
        counting = Counting(char)
        streamed(counting, [i % 3 for i in range(n)])
        work[n] = counting.work
    # Ten times the tokens, about ten times the work; decoding all so far per token is 100x.
    assert work[20_000] <= 11 * work[2_000], work
