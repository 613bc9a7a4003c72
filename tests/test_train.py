"""train.py end to end, as a user runs it: loss falls, sampling works, resume is exact,
two DDP ranks equal one process, and checkpoints are safe to load."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import ROOT, TORCHRUN
from helpers import run_train as run
from helpers import train_losses
from serving.loading import load_model
from training.safe_load import load_checkpoint
from training.settings import TrainConfig, parse_config


@pytest.mark.slow
def test_loss_falls_then_sample_from_the_checkpoint(char_data, tmp_path):
    out = tmp_path / "out"
    rows = run(["--max_iters=60", "--eval_interval=30"], char_data, out)
    evals = [r for r in rows if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 30, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5  # from ~4.1 (ln 61) to ~3.4
    assert 0 <= evals[0]["elapsed_s"] < evals[1]["elapsed_s"] < evals[2]["elapsed_s"]
    for r in rows:
        if "loss" in r:
            assert {"iter", "loss", "lr", "tokens_per_sec"} <= r.keys()
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--out_dir={out}",
                           "--num_samples=2", "--max_new_tokens=50", "--start=ROMEO:"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    samples = proc.stdout.split("---------------")
    assert len(samples) == 3 and all(s.strip().startswith("ROMEO:") for s in samples[:2])
    assert len(samples[0].strip()) == len("ROMEO:") + 50  # one character per token


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_bit_identical(char_data, tmp_path, optimizer):
    # Dropout is on, so the resumed run must also reproduce the random masks.
    common = ["--eval_interval=3", "--dropout=0.1", "--lr_decay_iters=6",
              f"--optimizer={optimizer}"]
    straight = train_losses(run(common + ["--max_iters=6"], char_data, tmp_path / "a"))
    run(common + ["--max_iters=3"], char_data, tmp_path / "b")
    resumed = train_losses(run(common + ["--max_iters=6", "--init_from=resume"],
                               char_data, tmp_path / "b"))
    assert list(resumed) == [1, 2, 3, 4, 5, 6]  # the log continues from the first half
    assert resumed == straight  # bit for bit: floats compared exactly


@pytest.mark.slow
def test_two_ddp_ranks_equal_one_process(char_data, tmp_path):
    # with dropout: its masks are seeded per global micro-step, not per rank
    args = ["--max_iters=5", "--eval_interval=5", "--gradient_accumulation_steps=4",
            "--dropout=0.1"]
    single = run(args, char_data, tmp_path / "one")
    double = run(args, char_data, tmp_path / "two", launcher=TORCHRUN)
    a, b = train_losses(single), train_losses(double)
    assert list(a) == list(b) == [1, 2, 3, 4, 5]
    for it in a:
        assert abs(a[it] - b[it]) < 1e-5, (it, a[it], b[it])
    val = [r["val_loss"] for r in single if "val_loss" in r]
    val2 = [r["val_loss"] for r in double if "val_loss" in r]
    assert val == pytest.approx(val2, abs=1e-5)
    proc = run(args + ["--gradient_accumulation_steps=3"], char_data, tmp_path / "three",
               launcher=TORCHRUN, expect_ok=False)
    assert proc.returncode != 0
    assert "must be divisible by the number of processes (2)" in proc.stderr


def test_checkpoint_is_plain_and_safe(char_data, tmp_path):
    out = tmp_path / "out"
    run(["--max_iters=2", "--eval_interval=2", "--compile=false"], char_data, out)
    raw = torch.load(out / "ckpt.pt", weights_only=True)  # plain data: loads without pickle
    assert raw.keys() >= {"model", "optimizer", "scaler", "config", "model_args", "meta",
                          "iter_num", "best_val_loss"}
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in raw["model"])
    assert raw["iter_num"] == 2 and raw["config"]["max_iters"] == 2
    assert raw["meta"]["tokenizer"] == "char"
    assert load_checkpoint(out / "ckpt.pt")["best_val_loss"] == raw["best_val_loss"]


@pytest.mark.slow
def test_fresh_run_refuses_to_overwrite_and_auto_resumes(char_data, tmp_path):
    out = tmp_path / "out"
    run(["--max_iters=2", "--eval_interval=2"], char_data, out)
    before = (out / "ckpt.pt").read_bytes()
    proc = run(["--max_iters=2"], char_data, out, expect_ok=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert "--overwrite=true" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "ckpt.pt").read_bytes() == before
    rows = run(["--max_iters=4", "--eval_interval=2", "--init_from=auto"], char_data, out)
    assert max(r["iter"] for r in rows) == 4
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 4


@pytest.mark.slow
def test_whole_split_evaluation_is_every_token_once_and_the_same_on_two_ranks(char_data,
                                                                             tmp_path):
    args = ["--max_iters=2", "--eval_interval=2", "--eval_iters=0"]
    one = [r for r in run(args, char_data, tmp_path / "one") if "val_loss" in r]
    two = [r for r in run(args, char_data, tmp_path / "two", launcher=TORCHRUN)
           if "val_loss" in r]
    assert [r["iter"] for r in one] == [r["iter"] for r in two] == [0, 2]
    for a, b in zip(one, two):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
    # The figure is the mean loss over the split's non-overlapping blocks of 32 tokens, each
    # token predicted once: recompute it from the checkpoint saved at iteration 2.
    model, _, _ = load_model("resume", tmp_path / "one")
    tokens = np.fromfile(char_data / "val.bin", dtype=np.uint16)
    tokens = torch.from_numpy(tokens.astype(np.int64))
    rows = torch.stack([tokens[s:s + 33] for s in range(0, len(tokens) - 32, 32)])
    with torch.no_grad():
        _, loss = model.eval()(rows[:, :-1], rows[:, 1:].contiguous())
    assert one[-1]["val_loss"] == pytest.approx(loss.item(), abs=1e-5)


@pytest.mark.slow
def test_compiled_training_checkpoints_resumes_and_samples(char_data, tmp_path):
    # torch.compile wraps the model in an OptimizedModule whose state_dict keys start with
    # "_orig_mod.": the checkpoint must hold the plain model's keys all the same.
    out = tmp_path / "out"
    eager = train_losses(run(["--max_iters=4", "--eval_interval=2"], char_data, tmp_path / "e"))
    run(["--compile=true", "--max_iters=2", "--eval_interval=2"], char_data, out)
    raw = torch.load(out / "ckpt.pt", weights_only=True)
    assert raw["model"].keys() == torch.load(tmp_path / "e" / "ckpt.pt")["model"].keys()
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in raw["model"])
    compiled = train_losses(run(["--compile=true", "--max_iters=4", "--eval_interval=2",
                                 "--init_from=resume"], char_data, out))
    assert list(compiled) == list(eager) == [1, 2, 3, 4]
    for it in eager:  # compiled kernels round differently, but the run is the same run
        assert compiled[it] == pytest.approx(eager[it], abs=1e-4)
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--out_dir={out}",
                           "--num_samples=1", "--max_new_tokens=20", "--start=ROMEO:"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("ROMEO:"), proc.stderr


def test_no_arguments_prepare_the_data_and_pick_the_cpu_recipe(tmp_path, monkeypatch,
                                                               shakespeare_path):
    # `python train.py` alone runs the recipe for this machine (default_config), and its
    # dataset is prepared on first use (from its input.txt, which the download would have
    # fetched). The training itself is the CPU recipe, timed elsewhere.
    import train
    from training import startup
    script = tmp_path / "data" / "shakespeare_char" / "prepare.py"
    script.parent.mkdir(parents=True)
    shutil.copy(ROOT / "data" / "shakespeare_char" / "prepare.py", script)
    shutil.copy(shakespeare_path, script.parent / "input.txt")
    (tmp_path / "config").symlink_to(ROOT / "config")
    monkeypatch.setattr(startup, "ROOT", tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seen = []
    monkeypatch.setattr(train, "train", lambda cfg, named, signals: seen.append(cfg))
    assert train.main([]) == 0
    assert seen[0] == parse_config(TrainConfig, [str(ROOT / "config" /
                                                     "train_shakespeare_char_cpu.toml")])
    startup.prepare_default_data(rank=0, world_size=1)
    meta = json.loads((script.parent / "meta.json").read_text())
    assert meta["vocab_size"] == 65 and meta["train_tokens"] == 1_003_854
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert startup.default_config() == [str(tmp_path / "config" / "train_shakespeare_char.toml")]
