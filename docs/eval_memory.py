"""Peak memory (RSS) of an evaluation on the CPU against its number of batches, with GPT-2's
vocabulary: every batch frees logits of batch_size x block_size x 50,304 floats (25 MB here),
so memory that grows with the batches shows at once. Each row is a fresh train.py process
that only evaluates (max_iters=0), on random GPT-2 token ids in a temporary folder.

    python docs/eval_memory.py [batches ...]      # default: 25 100 400

A flat column is the expected result; before train.estimate_loss read each CPU loss at once,
the peak grew by about one logits tensor a batch (issue: 7.5 GB for a 1.6M-parameter model)."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 50257  # GPT-2's tokenizer; the model pads it to 50,304
MODEL = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
         "--device=cpu", "--dtype=float32", "--max_iters=0", "--eval_interval=1"]


def peak_rss_mib(cmd, env):
    """Run cmd to its end; return its peak resident memory in MiB (Linux counts kB)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-500:]}")
    return usage.ru_maxrss / 1024


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    counts = [int(n) for n in argv] or [25, 100, 400]
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "data"
        data.mkdir()
        rng = np.random.default_rng(0)
        sizes = {"train": 100_000, "val": 2_000}  # the final whole-split pass: 16 batches
        for split, n in sizes.items():
            rng.integers(0, VOCAB, n).astype(np.uint16).tofile(data / f"{split}.bin")
        (data / "meta.json").write_text(json.dumps({
            "tokenizer": "gpt2", "vocab_size": VOCAB, "train_tokens": sizes["train"],
            "val_tokens": sizes["val"]}))
        print("eval batches per split  peak RSS (MiB)")
        for n in counts:
            cmd = [sys.executable, str(ROOT / "train.py"), *MODEL, f"--eval_iters={n}",
                   f"--data_dir={data}", f"--out_dir={Path(folder) / f'out-{n}'}"]
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
            print(f"{n:>22}  {peak_rss_mib(cmd, env):>15,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
