"""sample.py: where it looks by default, streaming, and temperatures too small for float32."""
import io
from dataclasses import asdict

import torch

from checkpoint import save_checkpoint
from config import TrainConfig, parse_config
from helpers import ROOT
from model import GPT, GPTConfig, sample_next
from sample import SampleConfig, sample


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
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=4, n_layer=1, n_head=1, n_embd=8))
    meta = {"tokenizer": "char", "vocab_size": 4, "chars": ["a", "b", "c", "d"]}
    save_checkpoint({"model": model.state_dict(), "model_args": asdict(model.config),
                     "meta": meta}, tmp_path / "ckpt.pt")
    texts = {}
    for temperature in (0.0, 1e-45):
        cfg = SampleConfig(out_dir=str(tmp_path), start="ab", num_samples=1, device="cpu",
                           max_new_tokens=30, temperature=temperature)
        out = io.StringIO()
        texts[temperature] = sample(cfg.validate(), out)
        assert out.getvalue() == texts[temperature][0] + "\n"  # as it streamed
    assert texts[1e-45] == texts[0.0] and len(texts[0.0][0]) == 32
