"""Finetuning and evaluating OpenAI-layout GPT-2 weights with the shipped configs, offline:
a tiny model in the hub's file layout stands in for the real download."""
import subprocess
import sys

import pytest
import torch

from data.preparation import prepare_text
from helpers import ROOT, hub_state, quiet_env, read_metrics, write_gpt2_folder
from model import GPT, GPTConfig
from training.safe_load import load_checkpoint

SMALL = ["--block_size=32", "--batch_size=2", "--gradient_accumulation_steps=2",
         "--eval_iters=4", "--device=cpu", "--dtype=float32"]


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A 2-layer GPT-2 with the real vocabulary, saved as the hub's GPT-2 files are."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32))
    return write_gpt2_folder(tmp_path_factory.mktemp("tiny-gpt2"), hub_state(model), dict(
        n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257))


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory, shakespeare_path):
    folder = tmp_path_factory.mktemp("shakespeare")
    prepare_text(shakespeare_path.read_text()[:40_000], folder, "gpt2")
    return folder


def run(script, args):
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True,
                          text=True, env=quiet_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_finetune_config_trains_from_local_gpt2_weights_then_samples(gpt2_folder, bpe_data,
                                                                     tmp_path):
    out = tmp_path / "out"
    run("train.py", [str(ROOT / "config/finetune_shakespeare.toml"), *SMALL,
                     f"--init_from={gpt2_folder}", f"--data_dir={bpe_data}", f"--out_dir={out}",
                     "--max_iters=30", "--eval_interval=15", "--learning_rate=3e-3"])
    evals = [r["val_loss"] for r in read_metrics(out) if "val_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0] - 0.3  # it learned from Shakespeare
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["model_args"]["vocab_size"] == 50257 and ckpt["model_args"]["n_layer"] == 2
    assert ckpt["meta"]["tokenizer"] == "gpt2"
    # Resuming takes the pretrained shape from the checkpoint, as the first run did.
    run("train.py", [str(ROOT / "config/finetune_shakespeare.toml"), *SMALL,
                     "--init_from=resume", f"--data_dir={bpe_data}", f"--out_dir={out}",
                     "--max_iters=32", "--eval_interval=16", "--learning_rate=3e-3"])
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 32
    text = run("sample.py", [f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=20",
                             "--start=ROMEO:", "--device=cpu"])
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:") + 20


def test_sample_from_a_local_folder_of_gpt2_weights(gpt2_folder):
    text = run("sample.py", [f"--init_from={gpt2_folder}", "--num_samples=2",
                             "--max_new_tokens=8", "--start=Hello", "--device=cpu"])
    samples = text.split("---------------")
    assert len(samples) == 3 and all(s.strip().startswith("Hello") for s in samples[:2])


def test_eval_config_reports_the_loss_of_pretrained_weights_without_training(gpt2_folder,
                                                                             bpe_data, tmp_path):
    out = tmp_path / "eval"
    stdout = run("train.py", [str(ROOT / "config/eval_gpt2.toml"), *SMALL,
                              f"--init_from={gpt2_folder}", f"--data_dir={bpe_data}",
                              f"--out_dir={out}"])
    rows = read_metrics(out)
    assert len(rows) == 1 and rows[0]["iter"] == 0 and "val_loss" in rows[0]
    assert f"val loss {rows[0]['val_loss']:.4f}" in stdout
    assert not (out / "ckpt.pt").exists()  # evaluation writes no checkpoint
