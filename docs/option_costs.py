"""Time per training step of the CPU recipe with each option switched off (or on), measured
round-robin in one process: every variant takes one step in turn, so a machine that slows
down slows them all alike. Prints the median of `rounds` steps for each.

    python docs/option_costs.py [rounds]

The model and batch are config/train_shakespeare_char_cpu.toml's, with random tokens (the
data does not change the arithmetic)."""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import GPT, GPTConfig  # noqa: E402

RECIPE = {"rope": True, "qk_norm": True, "relu2": True, "rmsnorm": False, "tie_weights": True}
VARIANTS = {
    "reference (nanoGPT's)": dict(rope=False, qk_norm=False, relu2=False),
    "recipe": {},
    "recipe without rope": dict(rope=False),
    "recipe without qk_norm": dict(qk_norm=False),
    "recipe without relu2 (GELU)": dict(relu2=False),
    "recipe with rmsnorm": dict(rmsnorm=True),
    "recipe with an untied head": dict(tie_weights=False),
}


def make_step(options):
    """One AdamW training step, as train.py takes it, of a freshly built model."""
    config = GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128,
                       bias=False, **{**RECIPE, **options})
    torch.manual_seed(0)
    model = GPT(config)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.8, 0.99), "cpu")
    x, y = torch.randint(65, (12, 64)), torch.randint(65, (12, 64))

    def step():
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    rounds = int(argv[0]) if argv else 150
    steps = {name: make_step(options) for name, options in VARIANTS.items()}
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
