"""Running the real command lines, as a user does, for the end-to-end tests."""
import json
import os
import re
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
# A 2-layer, 32-wide model that trains in a fraction of a second per step on a CPU.
# Flags alone refine the default run (the CPU recipe): these make it GPT-2's architecture and
# AdamW settings again, so that runs export to transformers and compare with its reference.
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--gradient_accumulation_steps=2", "--learning_rate=3e-3", "--warmup_iters=2",
        "--lr_decay_iters=20", "--min_lr=3e-4", "--eval_iters=4", "--log_interval=1",
        "--device=cpu", "--dtype=float32", "--bias=true", "--rope=false", "--qk_norm=false",
        "--relu2=false", "--schedule=cosine", "--beta1=0.9", "--beta2=0.95",
        "--eval_interval=2000", "--max_iters=600000"]


def train_cmd(args, data_dir, out_dir, launcher=(sys.executable,), script="train.py"):
    return [*launcher, str(ROOT / script), *TINY, f"--data_dir={data_dir}",
            f"--out_dir={out_dir}", *args]


def main_of(script):
    """The main(argv) of a script (its path, absolute or from the root) or of a tool (a module
    name: "tools.bench"), loaded as python would run it (a package runs its __main__), under
    another name than "__main__", so that it only waits to be called."""
    if script.endswith(".py"):
        return runpy.run_path(str(ROOT / script))["main"]
    with warnings.catch_warnings():  # another test imported the tool first: harmless here
        warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
        return runpy.run_module(script)["main"]


def quiet_env(**extra):
    """One thread per process: the tests run several processes on two cores."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def start_server(args, cwd=ROOT):
    """python -m serving.http with args on a free port, as a user starts it, from cwd:
    (the process, its URL), once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "serving.http", *args, "--port=0"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=quiet_env(PYTHONPATH=str(ROOT)))
    line = proc.stdout.readline()  # the line it prints once it listens
    assert line.startswith("serving "), proc.stderr.read()
    return proc, re.search(r"http://\S+/", line)[0]


def run_train(args, data_dir, out_dir, launcher=(sys.executable,), expect_ok=True,
              script="train.py", **env):
    """Run train.py; return the metrics.jsonl rows, or the finished process if not expect_ok."""
    proc = subprocess.run(train_cmd(args, data_dir, out_dir, launcher, script),
                          capture_output=True, text=True, env=quiet_env(**env),
                          cwd=Path(out_dir).parent)
    if not expect_ok:
        return proc
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return read_metrics(out_dir)


def read_metrics(out_dir):
    with open(Path(out_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def train_losses(rows):
    """{iteration: training loss}; a later row for the same iteration wins."""
    return {r["iter"]: r["loss"] for r in rows if "loss" in r}


def assert_same_run(a, b, iters):
    """Training losses a and b ({iteration: loss}) hold iters, and agree there to 1e-5."""
    import pytest
    assert [it for it in a if it in iters] == [it for it in b if it in iters] == list(iters)
    for it in iters:
        assert a[it] == pytest.approx(b[it], abs=1e-5), (it, a[it], b[it])


def hub_state(model):
    """Our GPT's weights as OpenAI's GPT-2 files name and lay them out: no "transformer."
    prefix, no lm_head (it is tied to wte), and the Conv1D weights as (in, out)."""
    from model import CONV1D_WEIGHTS
    return {k.removeprefix("transformer."): (v.t() if k.endswith(CONV1D_WEIGHTS) else v)
            for k, v in model.state_dict().items() if k != "lm_head.weight"}


def write_gpt2_folder(folder, state, config, fmt="safetensors"):
    """A folder as the hub holds GPT-2: config.json (config: n_layer, n_head, n_embd,
    n_positions, vocab_size) and state, in the hub's names, as model.safetensors or
    pytorch_model.bin."""
    from safetensors.torch import save_file  # test-only dependency
    folder = Path(folder)
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    state = {k: v.contiguous() for k, v in state.items()}
    if fmt == "safetensors":
        save_file(state, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return folder


def char_checkpoint(folder, chars="abc\n", block_size=16):
    """A one-layer, 8-wide character model of chars, untrained (seed 0), saved as
    folder/ckpt.pt as train.py saves one: for sample.py and serve.py to load."""
    from dataclasses import asdict

    from training.checkpoint import save_checkpoint
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=len(chars), n_layer=1, n_head=1,
                          n_embd=8))
    meta = {"tokenizer": "char", "vocab_size": len(chars), "chars": list(chars)}
    save_checkpoint({"model": model.state_dict(), "model_args": asdict(model.config),
                     "meta": meta}, Path(folder) / "ckpt.pt")
    return folder


def assert_samples(out_dir):
    """sample.py samples from out_dir's checkpoint, as a user runs it after training."""
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--out_dir={out_dir}",
                           "--num_samples=1", "--max_new_tokens=10", "--start=A"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("A"), proc.stderr
