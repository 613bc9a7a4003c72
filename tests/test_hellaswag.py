"""HellaSwag scoring on a model whose every loss is known in closed form, then the command line
on a GPT-2 weights folder, on our checkpoints, and under torchrun with two processes."""
import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from data.tokenizer import GPT2Tokenizer
from helpers import hub_state, write_gpt2_folder
from model import GPT, GPTConfig
from tools import hellaswag
from tools.hellaswag import ending_losses, evaluate, load_examples, render_example
from training.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
GOOD, LOGIT = 922, 12.0  # " good", the one token with a logit above 0
LOG_Z = math.log(math.exp(LOGIT) + 50256)
LOSS_GOOD, LOSS_OTHER = LOG_Z - LOGIT, LOG_Z  # about 0.27 and 12.27 nats, whatever the context

# (ctx, label, endings). Every word below is one GPT-2 token once a space precedes it.
EXAMPLES = [
    ("A man sits on a roof. He", 0, ["good good good", "bad", "bad bad", "cat dog cat"]),
    ("The cat watches the bird and", 1, ["bad", "good", "bad bad", "dog dog dog"]),
    # The sum of losses prefers the short "bad" (12.3 < 7 * 0.27 + 12.3); the mean prefers
    # the long ending (1.8 < 12.3): acc is wrong here and acc_norm right.
    ("She opens the box and", 2, ["bad", "cat cat", "dog good good good good good good good",
                                  "dog dog dog"]),
    ("The kids run to the park, then", 3, ["good", "bad", "cat", "dog"]),  # both wrong
]
RESULT = "acc 0.5000 | acc_norm 0.7500 | 4 examples"


def unigram_gpt(vocab_size=50257):
    """A GPT-2 whose next-token distribution ignores the context: softmax of LOGIT on " good"
    and 0 elsewhere. ln_f's weight 0 and bias e_0 make the last hidden state e_0 for every
    input, so the logits are column 0 of the (tied) token embedding."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=64, vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=32))
    with torch.no_grad():
        m.transformer.ln_f.weight.zero_()
        m.transformer.ln_f.bias.zero_()[0] = 1.0
        m.transformer.wte.weight[:, 0] = 0.0
        m.transformer.wte.weight[GOOD, 0] = LOGIT
    return m.eval()


@pytest.fixture
def examples_file(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    rows = [{"ind": i, "ctx": c, "label": y, "endings": e, "split": "val"}
            for i, (c, y, e) in enumerate(EXAMPLES)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """unigram_gpt as OpenAI's files lie on the hub: Conv1D weights (in, out), no lm_head."""
    return write_gpt2_folder(tmp_path_factory.mktemp("gpt2-unigram"), hub_state(unigram_gpt()),
                             dict(n_layer=1, n_head=2, n_embd=32, n_positions=64,
                                  vocab_size=50257))


def test_ending_losses_score_only_the_ending(gpt2_vocab_path):
    tok = GPT2Tokenizer()
    tokens, mask = render_example({"ctx": EXAMPLES[2][0], "endings": EXAMPLES[2][2]}, tok, 64)
    assert mask.sum(dim=1).tolist() == [1, 2, 8, 3]
    total, mean = ending_losses(unigram_gpt(), tokens, mask)
    # A context token counted, or the mask one place off (ending 2), would add 12 nats; the
    # float32 softmax over 50,257 logits is good to about 1e-4 nats a token.
    expected = torch.tensor([LOSS_OTHER, 2 * LOSS_OTHER, 7 * LOSS_GOOD + LOSS_OTHER,
                             3 * LOSS_OTHER])
    torch.testing.assert_close(total, expected, atol=0.01, rtol=0)
    torch.testing.assert_close(mean, expected / torch.tensor([1, 2, 8, 3]), atol=0.01, rtol=0)


def test_padded_batch_equals_each_row_alone(gpt2_vocab_path):
    # A random model, so that context matters: padding must not change any row's losses.
    torch.manual_seed(1)
    m = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)).eval()
    tok = GPT2Tokenizer()
    tokens, mask = render_example({"ctx": EXAMPLES[0][0], "endings": EXAMPLES[2][2]}, tok, 64)
    total, mean = ending_losses(m, tokens, mask)
    for i in range(4):
        n = len(tok.encode(EXAMPLES[0][0])) + int(mask[i].sum())  # the row without padding
        targets = torch.where(mask[i, 1:n] == 1, tokens[i, 1:n], -1)
        with torch.no_grad():
            _, loss = m(tokens[i:i + 1, :n - 1], targets[None])
        torch.testing.assert_close(mean[i], loss, atol=1e-5, rtol=0)
        torch.testing.assert_close(total[i], loss * mask[i].sum(), atol=1e-4, rtol=0)


def test_long_rows_keep_their_last_block_size_tokens(gpt2_vocab_path):
    tok = GPT2Tokenizer()
    ex = {"ctx": "one two three four five six seven eight nine ten", "endings": EXAMPLES[2][2]}
    ctx = tok.encode(ex["ctx"])  # 10 tokens, and endings of 1 to 8: every row is cropped
    tokens, mask = render_example(ex, tok, block_size=9)
    assert tokens.shape == (4, 9)
    for i, ending in enumerate(ex["endings"]):
        end = tok.encode(" " + ending)
        assert tokens[i].tolist() == (ctx + end)[-9:]
        assert mask[i].tolist() == ([0] * len(ctx) + [1] * len(end))[-9:]


def test_evaluate_counts_sum_and_mean_wins(examples_file, gpt2_vocab_path):
    examples = load_examples(examples_file)
    result = evaluate(unigram_gpt(), GPT2Tokenizer(), examples, "cpu")
    assert result == {"acc": 0.5, "acc_norm": 0.75, "count": 4}
    result = evaluate(unigram_gpt(), GPT2Tokenizer(), load_examples(examples_file, 3), "cpu")
    assert result == {"acc": 2 / 3, "acc_norm": 1.0, "count": 3}


def run_cli(*args, launcher=()):
    return subprocess.run([sys.executable, *launcher, "-m", "tools.hellaswag", *args],
                          capture_output=True, text=True, timeout=1800, cwd=ROOT)


def test_cli_on_a_gpt2_weights_folder(gpt2_folder, examples_file, gpt2_vocab_path):
    r = run_cli(f"--init_from={gpt2_folder}", f"--input={examples_file}", "--device=cpu")
    assert r.returncode == 0, r.stderr
    assert RESULT in r.stdout


@pytest.mark.slow
def test_cli_under_torchrun_matches_one_process(gpt2_folder, examples_file, gpt2_vocab_path):
    # Rank 0 alone would see examples 0 and 2 (acc 0.5, acc_norm 1.0): the sum must be global.
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r = run_cli(f"--init_from={gpt2_folder}", f"--input={examples_file}", "--device=cpu",
                launcher=launcher)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("hellaswag:") == 1 and RESULT in r.stdout


def test_our_checkpoints_and_the_download(tmp_path, examples_file, monkeypatch, capsys,
                                          gpt2_vocab_path):
    m = unigram_gpt(vocab_size=50304)  # padded as train.py pads GPT-2's vocabulary
    meta = {"tokenizer": "gpt2", "vocab_size": 50257}
    (tmp_path / "gpt2").mkdir()
    save_checkpoint({"model": m.state_dict(), "model_args": asdict(m.config), "meta": meta},
                    tmp_path / "gpt2" / "ckpt.pt")
    # No --input: the file is fetched once into the cache, here from a local URL.
    monkeypatch.setattr(hellaswag, "URL", examples_file.as_uri())
    monkeypatch.setattr(hellaswag, "CACHE", tmp_path / "cache" / "hellaswag_val.jsonl")
    assert hellaswag.main([f"--out_dir={tmp_path / 'gpt2'}", "--device=cpu"]) == 0
    assert RESULT in capsys.readouterr().out and hellaswag.CACHE.is_file()
    assert hellaswag.main([f"--out_dir={tmp_path / 'gpt2'}", "--limit=3"]) == 0
    assert "acc 0.6667 | acc_norm 1.0000 | 3 examples" in capsys.readouterr().out

    char = GPT(GPTConfig(block_size=16, vocab_size=3, n_layer=1, n_head=1, n_embd=8))
    (tmp_path / "char").mkdir()
    save_checkpoint({"model": char.state_dict(), "model_args": asdict(char.config),
                     "meta": {"tokenizer": "char", "vocab_size": 3, "chars": ["a", "b", "c"]}},
                    tmp_path / "char" / "ckpt.pt")
    assert hellaswag.main([f"--out_dir={tmp_path / 'char'}"]) == 2
    assert "uses the char tokenizer; HellaSwag needs" in capsys.readouterr().err


def test_user_mistakes_are_one_line_errors(tmp_path, examples_file, gpt2_folder, capsys,
                                          gpt2_vocab_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(examples_file.read_text() + '{"ctx": "x", "label": 4, "endings": []}\n')
    model = f"--init_from={gpt2_folder}"
    cases = [
        ([model, f"--input={bad}"], "bad.jsonl:5: not a HellaSwag example"),
        ([model, f"--input={tmp_path / 'none.jsonl'}"], "cannot read"),
        ([f"--input={examples_file}", "--init_from=gpt3"], "cannot load the model from gpt3"),
        ([f"--input={examples_file}", f"--out_dir={tmp_path}"], "no checkpoint in"),
        (["--limit=0"], "limit must be at least 1"),
        (["--limt=3"], "did you mean 'limit'"),
    ]
    for argv, message in cases:
        assert hellaswag.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
