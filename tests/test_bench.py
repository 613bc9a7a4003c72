"""python -m tools.bench end to end on a tiny model: the JSON it writes, and its errors. No
timing limits: speeds on a shared machine prove nothing, so only their sanity is checked."""
import json
import subprocess
import sys

import pytest

from helpers import ROOT
from tools.bench.__main__ import main
from tools.bench.sample_speed import agreeing

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=2",
        "--vocab_size=50", "--device=cpu", "--dtype=float32", "--warmup_steps=1",
        "--timed_steps=2", "--max_new_tokens=24"]


@pytest.mark.slow
def test_bench_writes_sane_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(TINY + ["--dtypes=float32,bfloat16", "--gradient_accumulation_steps=2",
                        f"--json_out={out}"]) == 0
    results = json.loads(out.read_text())
    assert results["params"] > 0 and results["vocab_size"] == 50
    train = results["train"]
    assert [(r["dtype"], r["compile"]) for r in train] == [("float32", False),
                                                           ("bfloat16", False)]
    for r in train:
        assert r["tokens_per_iter"] == 2 * 16 * 2
        assert len(r["ms_per_iter_all"]) == 2 and r["ms_per_iter"] > 0
        assert r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0
        assert r["mfu"] is None and r["peak_flops"] is None  # unknown for a CPU: not invented
    sample = results["sample"]
    # 1 prompt token + 15 new fill the block of 16; 24 new tokens run past it
    assert sample["within_block"]["new_tokens"] == 15
    assert sample["requested"]["new_tokens"] == 24
    for row in (sample["within_block"], sample["requested"]):
        assert row["identical"] is True
        assert row["cached_tokens_per_s"] > 0 and row["uncached_tokens_per_s"] > 0
    assert [row["batch"] for row in sample["inference"]["rows"]] == [1, 8, 32]  # the default
    assert "unknown" in capsys.readouterr().out  # the MFU column


@pytest.mark.slow
def test_bench_inference_cost_table(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(TINY + ["--train=false", "--batch_sizes=1,3", "--prefill_tokens=5",
                        "--decode_tokens=4", "--dtype=bfloat16", f"--json_out={out}"]) == 0
    inference = json.loads(out.read_text())["sample"]["inference"]
    assert (inference["prefill_tokens"], inference["decode_tokens"]) == (5, 4)
    assert [row["batch"] for row in inference["rows"]] == [1, 3]
    for row in inference["rows"]:
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["ms_per_token"] > 0
        # Keys and values: 2 x 2 layers x batch x 2 heads x 16 positions (the caches are
        # allocated for the whole block) x 16 channels per head x 2 bytes, as autocast made
        # them bfloat16.
        assert row["kv_cache_bytes"] == 2 * 2 * row["batch"] * 2 * 16 * 16 * 2
    assert "prefill tok/s" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_can_skip_parts(tmp_path):
    out = tmp_path / "b.json"
    assert main(TINY + ["--train=false", "--sample_repeats=2", f"--json_out={out}"]) == 0
    results = json.loads(out.read_text())
    assert results["train"] is None and results["sample"]["repeats"] == 2
    assert results["sample"]["requested"]["identical"] is True


@pytest.mark.parametrize("flag, message", [
    ("--dtypes=float32,fp8", "dtype"),
    ("--compiles=maybe", "compiles"),
    ("--prompt_tokens=16", "prompt_tokens"),
    ("--timed_step=3", "did you mean 'timed_steps'"),
    ("--batch_sizes=1,0", "batch_sizes"),
    ("--decode_tokens=9", "decode_tokens"),  # 8 (half the block) + 9 > 16
])
def test_bench_rejects_bad_settings(flag, message, capsys):
    assert main(TINY + [flag]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_option_costs_script_times_every_variant():
    proc = subprocess.run([sys.executable, str(ROOT / "docs" / "option_costs.py"), "2"],
                          capture_output=True, text=True, timeout=1800)  # hang guard
    assert proc.returncode == 0, proc.stderr
    rows = proc.stdout.splitlines()[1:]
    assert [r.split("  ")[0] for r in rows] == ["reference (nanoGPT's)", "recipe",
                                                "recipe without rope", "recipe without qk_norm",
                                                "recipe without relu2 (GELU)", "recipe with muon",
                                                "recipe with muon, 3 NS steps"]
    assert all(float(r.split()[-6]) > 0 for r in rows)  # ms per step


def test_same_tokens_counts_the_agreement_before_the_first_difference():
    import torch
    assert agreeing(torch.tensor([[5, 1, 2, 3]]), torch.tensor([[5, 1, 2, 4]])) == 3
    assert agreeing(torch.tensor([[5, 1]]), torch.tensor([[5, 1]])) == 2
