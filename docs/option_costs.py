"""Time per training step of the CPU recipe with each option switched off (or Muon on), measured
round-robin in one process: every variant takes one step in turn, so a machine that slows
down slows them all alike. Prints the median of `rounds` steps for each.

    python docs/option_costs.py [rounds]

The model, batch and optimizer are config/train_shakespeare_char_cpu.toml's, on random tokens
(the data does not change the arithmetic). The rows for RMSNorm and an untied head in
docs/benchmarks.md came from this script's first version (git log docs/option_costs.py),
before those options were removed."""
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from training import runtime  # noqa: E402
from tools.bench.train_speed import train_step  # noqa: E402
from training.settings import TrainConfig, parse_config  # noqa: E402
from model import GPT, config_from_dict  # noqa: E402
from training.step import make_optimizer  # noqa: E402

RECIPE = ROOT / "config" / "train_shakespeare_char_cpu.toml"
VOCAB = 65  # Tiny Shakespeare's characters
VARIANTS = {
    "reference (nanoGPT's)": dict(rope=False, qk_norm=False, relu2=False),
    "recipe": {},
    "recipe without rope": dict(rope=False),
    "recipe without qk_norm": dict(qk_norm=False),
    "recipe without relu2 (GELU)": dict(relu2=False),
    "recipe with muon": dict(optimizer="muon"),
    "recipe with muon, 3 NS steps": dict(optimizer="muon", muon_ns_steps=3),
}


def make_step(cfg, options):
    """One float32 training step as train.py takes it (tools/bench/train_speed.py), of a fresh
    model and optimizer with cfg's settings and the given options changed."""
    torch.manual_seed(0)
    cfg = replace(cfg, **options)
    model = GPT(config_from_dict({**asdict(cfg), "vocab_size": VOCAB}))
    optimizer = make_optimizer(model, cfg)
    _, ctx, scaler = runtime.training_precision("float32", "cpu")
    batch = [tuple(torch.randint(VOCAB, (cfg.batch_size, cfg.block_size)) for _ in range(2))]
    return lambda: train_step(model, optimizer, scaler, ctx, batch, cfg.grad_clip)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    rounds = int(argv[0]) if argv else 150
    cfg = parse_config(TrainConfig, [str(RECIPE)])
    steps = {name: make_step(cfg, options) for name, options in VARIANTS.items()}
    for step in steps.values():  # warm up: first calls pay one-off costs
        for _ in range(5):
            step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["recipe"])
    print(f"median ms per step over {rounds} rounds, {torch.get_num_threads()} threads")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:<30}{t * 1e3:8.1f} ms  {t / base:6.3f} x the recipe")
    return 0


if __name__ == "__main__":
    sys.exit(main())
