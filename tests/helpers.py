"""Running the real command lines, as a user does, for the end-to-end tests."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
# A 2-layer, 32-wide model that trains in a fraction of a second per step on a CPU.
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--gradient_accumulation_steps=2", "--learning_rate=3e-3", "--warmup_iters=2",
        "--lr_decay_iters=20", "--min_lr=3e-4", "--eval_iters=4", "--log_interval=1",
        "--device=cpu", "--dtype=float32", "--bias=true"]


def train_cmd(args, data_dir, out_dir, launcher=(sys.executable,), script="train.py"):
    return [*launcher, str(ROOT / script), *TINY, f"--data_dir={data_dir}",
            f"--out_dir={out_dir}", *args]


def quiet_env(**extra):
    """One thread per process: the tests run several processes on two cores."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


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
