"""What a run would cost, before it starts: time, GPU-hours and energy on each GPU we know, and
memory per GPU and bytes sent per step with DDP, FSDP, and with --tp=N tensor parallelism (TP
alone on N GPUs, or FSDP x TP on more) and --pp=N pipeline parallelism (with TP and FSDP as
given, on the GPUs left), with and without activation checkpointing.

    python -m tools.estimate config/train_gpt2.toml --gpus=8 --mfu=0.4

It reads train.py's config files and flags, prints the report train.py prints at its start
and the GPU sizes it fits, then the tables. It is arithmetic on the settings
(training/accounting.py): nothing is trained or written.
"""
import itertools
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from data.dataset import GPT2_VOCAB_SIZE, DataError, load_meta
from training import accounting
from training.accounting import GIB, PEAK_FLOPS
from training.settings import ConfigError, TrainConfig, run_main
from training.startup import check_divisible

# Rated board power in watts (the form factor's maximum TDP), for energy estimates. Sources:
# the datasheets of accounting.PEAK_FLOPS; V100 is the SXM2 board; the RTX 4090's is its total
# graphics power. A10G, an AWS-only part with no public datasheet: the 300 W power limit
# nvidia-smi shows on EC2 G5 instances.
BOARD_WATTS = {"A100": 400, "A100 PCIe": 300, "H100": 700, "H100 PCIe": 350, "H100 NVL": 400,
               "H200": 700, "H200 NVL": 600, "L4": 72, "L40": 300, "L40S": 350,
               "RTX 4090": 450, "A10G": 300, "V100": 300, "T4": 70}


@dataclass
class EstimateConfig(TrainConfig):
    gpus: int = 8  # how many GPUs share the run
    mfu: float = 0.4  # the model FLOPs utilisation to assume

    def validate(self):
        if self.gpus < 1:
            raise ConfigError(f"gpus must be at least 1, got {self.gpus}")
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"mfu must be in (0, 1], got {self.mfu}")
        if self.fsdp and self.dtype == "float16":  # as train.py refuses it (runtime.check_fsdp)
            raise ConfigError("fsdp=true does not take float16: use --dtype=bfloat16 "
                              "(or float32)")
        super().validate()
        if self.gpus % (self.tp * self.pp) or self.n_layer % self.pp:  # as parallel/mesh.py
            raise ConfigError(f"tp={self.tp} x pp={self.pp} must divide gpus ({self.gpus}), "
                              f"and pp must divide n_layer ({self.n_layer})")
        check_divisible(self, self.gpus)  # as train.py would refuse the run
        return self


def cost(cfg, world_size, m, mfu=0.4):
    """A table of the run's wall-clock time, GPU-hours and energy on each GPU in PEAK_FLOPS,
    at bfloat16 where the board has it, else float16. m is the model's shape (a GPTConfig).

    time = total FLOPs / (world_size * peak FLOP/s * mfu). Energy is the GPUs' rated board
    power times GPU-hours: no CPUs, memory, network or cooling."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    total = accounting.total_flops(cfg, m)
    lines = [
        f"{total:.3g} FLOPs ({cfg.max_iters:,} iterations of "
        f"{accounting.tokens_per_iter(cfg):,} tokens) on {world_size} GPU(s) at {mfu:.0%} MFU",
        "energy: the GPUs' rated board power x GPU-hours; no CPUs, memory, network or cooling",
        f"{'GPU':<10}{'dtype':<10}{'peak TFLOP/s':>13}{'board W':>9}{'wall clock':>12}"
        f"{'GPU-hours':>11}{'kWh':>10}",
    ]
    for name, peaks in PEAK_FLOPS.items():
        dtype = torch.bfloat16 if torch.bfloat16 in peaks else torch.float16
        seconds = total / (world_size * peaks[dtype] * mfu)
        gpu_hours = world_size * seconds / 3600
        watts = BOARD_WATTS[name]
        lines.append(f"{name:<10}{str(dtype).removeprefix('torch.'):<10}"
                     f"{peaks[dtype] / 1e12:>13.0f}{watts:>9}{_duration(seconds):>12}"
                     f"{_amount(gpu_hours):>11}{_amount(gpu_hours * watts / 1000):>10}")
    return "\n".join(lines)


def memory_table(cfg, world_size, m):
    """Memory per GPU with DDP and with FSDP (one process alone: without), and with cfg.tp > 1
    with TP (on tp GPUs) or 2-D (FSDP x TP, on more), with cfg.pp > 1 with PP (x FSDP on
    more, x TP as cfg.tp), each with and without activation checkpointing; the GPU sizes each
    fits, the bytes each GPU sends per iteration, and a pipeline's bubble."""
    lines = [f"memory per GPU on {world_size} GPU(s) in GiB, {cfg.batch_size} x "
             f"{cfg.block_size} tokens per micro-step, "
             f"{accounting.activation_bytes(cfg) * 8}-bit activations;",
             "state: weights, gradients, AdamW moments, and what DDP or FSDP adds to them;",
             "sent: GiB each GPU sends per iteration (accounting.communication_per_step); "
             "idle: a pipeline's bubble",
             f"{'':<12}{'checkpointing':<13}{'state':>7}{'activations':>13}{'logits':>8}"
             f"{'total':>8}{'sent':>8}{'idle':>6}  fits GPUs of (GB)"]
    # FSDP and TP do not take float16 (parallel.check): no row for what train.py refuses.
    sharded = world_size > 1 and cfg.dtype != "float16"
    layouts = [(False, 1, 1), (True, 1, 1)] if sharded else [(False, 1, 1)]
    if cfg.tp > 1 and sharded:
        layouts.append((world_size > cfg.tp, cfg.tp, 1))
    if cfg.pp > 1 and sharded:
        layouts.append((world_size > cfg.tp * cfg.pp, cfg.tp, cfg.pp))
    for (fsdp, tp, pp), checkpointing in itertools.product(layouts, (False, True)):
        run = replace(cfg, fsdp=fsdp, tp=tp, pp=pp, activation_checkpointing=checkpointing)
        parts = accounting.memory_per_rank(run, m, world_size)
        state = sum(v for k, v in parts.items() if k not in ("activations", "logits"))
        sent = sum(accounting.communication_per_step(run, m, world_size).values())
        dp = world_size // (tp * pp)
        name = "x".join(word for word, used in (("PP", pp > 1), ("FSDP" if fsdp else "DDP",
                                                 fsdp or dp > 1), ("TP", tp > 1))
                        if used) or "one"  # PPxFSDPxTP, as accounting.strategy orders them
        lines.append(f"{name:<12}{'on' if checkpointing else 'off':<13}"
                     f"{state / GIB:>7.1f}{parts['activations'] / GIB:>13.1f}"
                     f"{parts['logits'] / GIB:>8.1f}{sum(parts.values()) / GIB:>8.1f}"
                     f"{sent / GIB:>8.1f}{accounting.bubble(run, world_size):>6.0%}  "
                     f"{', '.join(map(str, fits(sum(parts.values())))) or 'none'}")
    return "\n".join(lines)


# GPU memory sizes in GB and the boards that have them. A run fits when its estimate is at
# most the size in 10^9 bytes: under the GiB the boards have, for what the estimate leaves out.
GPU_MEMORY_GB = {24: "RTX 4090, A10G, L4", 40: "A100 40GB", 80: "A100 80GB, H100",
                 141: "H200"}


def fits(n_bytes):
    """The sizes in GPU_MEMORY_GB that n_bytes fits in."""
    return [gb for gb in GPU_MEMORY_GB if n_bytes <= gb * 10 ** 9]


def fits_text(n_bytes):
    """Which GPU sizes a run needing n_bytes per GPU fits, and which not."""
    sizes = fits(n_bytes)
    too_small = [f"{gb} GB ({GPU_MEMORY_GB[gb]})" for gb in GPU_MEMORY_GB if gb not in sizes]
    if not sizes:
        return f"too much for every GPU size we know ({', '.join(map(str, GPU_MEMORY_GB))} GB)"
    return (f"fits GPUs of {', '.join(map(str, sizes))} GB"
            + (f", not {', '.join(too_small)}" if too_small else ""))


def _duration(seconds):
    for unit, size, limit in (("s", 1, 60), ("min", 60, 3600), ("h", 3600, 48 * 3600)):
        if seconds < limit:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds / 86400:.1f} days"


def _amount(x):
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def print_estimate(cfg):
    """The model's shape comes from the settings and the dataset's vocabulary, padded as a run
    from scratch pads it; a dataset not prepared yet is taken to use GPT-2's."""
    data_dir = cfg.data_dir or str(Path(__file__).resolve().parents[1] / "data" / cfg.dataset)
    if Path(data_dir, "meta.json").exists():  # a damaged one is an error, not GPT-2's
        vocab_size = load_meta(data_dir)["vocab_size"]
    else:
        vocab_size = GPT2_VOCAB_SIZE
        print(f"(dataset {cfg.dataset} not prepared: assuming GPT-2's vocabulary)")
    m = accounting.model_shape(cfg, vocab_size)
    print(accounting.report(cfg, cfg.gpus, m))
    memory = sum(accounting.memory_per_rank(cfg, m, cfg.gpus).values())
    print(f"memory per process: {fits_text(memory)}")
    print(cost(cfg, cfg.gpus, m, cfg.mfu))
    print(memory_table(cfg, cfg.gpus, m))


def main(argv=None):
    return run_main(EstimateConfig, print_estimate, sys.argv[1:] if argv is None else argv,
                    __doc__, (DataError,))


if __name__ == "__main__":
    sys.exit(main())
