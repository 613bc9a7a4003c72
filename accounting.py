"""What a training run costs: parameters, FLOPs, tokens, memory, and time and energy on GPUs.

    print(accounting.report(cfg, world_size, raw_model.config))  # at the start of training
    print(accounting.estimate(cfg, world_size, model_config))    # train.py --estimate

cfg holds the run's settings (a TrainConfig); model_config the model's shape (a GPTConfig, or
anything with its fields), which the config alone does not fix: the vocabulary comes from the
dataset, padded, and a pretrained model brings its own. All of it is arithmetic on these
numbers and on a model of that shape that holds no data, and on the table of GPUs below.
"""
import re
from dataclasses import replace

import torch

from model import GPT, config_from_dict

GIB = 2 ** 30


def padded_vocab_size(vocab_size):
    """A large vocabulary padded up to a multiple of 64 (GPT-2's 50257 to 50304) for faster
    matmuls, as train.py's init_model pads it; a character vocabulary is kept as it is."""
    return -(-vocab_size // 64) * 64 if vocab_size > 256 else vocab_size


def shape_model(m):
    """GPT with the shape m (a GPTConfig, or a TrainConfig with vocab_size set) on PyTorch's
    meta device: every parameter has its shape but no storage, so even gpt2-xl costs nothing.
    Counting on the model itself keeps one definition of the parameters and FLOPs."""
    with torch.device("meta"):
        return GPT(config_from_dict(vars(m)))


def num_params(m, non_embedding=True):
    """GPT(m).num_params(non_embedding): the position table, a lookup that does no matmul,
    is left out when non_embedding."""
    return shape_model(m).num_params(non_embedding)


def flops_per_token(m, seq_len):
    """Training FLOPs per token, forward and backward: 6N + 12 * n_layer * n_embd * seq_len
    (the PaLM paper's appendix B). 6N: each weight does a multiply-add (2 FLOPs) forward and
    two backward; the second term is attention's q k^T and (scores) v, which no parameter
    accounts for."""
    return shape_model(m).flops_per_token(seq_len)


def tokens_per_iter(cfg):
    """Tokens in one optimizer step, summed over every process: gradient_accumulation_steps
    already counts the micro-steps of all ranks together."""
    return cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps


def total_flops(cfg, m):
    """Training FLOPs of the whole run: max_iters steps of tokens_per_iter tokens each."""
    return flops_per_token(m, cfg.block_size) * tokens_per_iter(cfg) * cfg.max_iters


def memory_per_rank(cfg, m, world_size=1):
    """Bytes one process needs at its peak, by part, for the run as cfg configures it (DDP or
    FSDP over world_size processes, with or without activation checkpointing). An estimate,
    not a measurement; N is the parameter count.

    DDP, or one process: the weights stay in fp32 under autocast, with fp32 gradients and
    AdamW's two fp32 moments: 16 bytes per parameter; DDP adds its gradient buckets, 4 more.

    FSDP (cfg.fsdp, PyTorch's fully_shard on each Block, then on the root model): each rank
    holds 1/world_size of the fp32 weights, gradients and AdamW moments, 16N / world_size.
    What is gathered, in the compute dtype (bf16 with MixedPrecisionPolicy), is counted apart
    (torch/distributed/fsdp/_fully_shard, torch 2.13):
    - gathered parameters: the root's own (wte, tied to lm_head, wpe and ln_f) stay gathered
      from forward to the end of backward (fully_shard's reshard_after_forward is False for the
      root, by default); of the Blocks, two at a time: the one computing and the next,
      gathered ahead (FSDPParamGroup's backward prefetch; in forward, the gather of the next
      Block is issued while this one computes).
    - gathered gradients: the root's full gradient, whose lm_head half is the first computed
      in backward and reduce-scattered last; one Block's full gradient plus its fp32 copy
      that reduce-scatter reads (foreach_reduce's buffer, in MixedPrecisionPolicy's
      reduce_dtype).
    - accumulated gradients: with more than one micro-step per rank, the gradients are not
      reduce-scattered until the last (set_requires_gradient_sync(False), DDP's no_sync):
      FSDP then keeps every parameter's full gradient in fp32 in between, 4N
      (FSDPParam.to_accumulated_grad_if_needed). One micro-step per rank avoids it.

    Activations for one micro-batch (batch_size x block_size tokens) follow Korthikanti et
    al. 2022, "Reducing Activation Recomputation in Large Transformer Models", section 4.1:
    34 * n_embd bytes per token per layer with 16-bit activations (doubled here in float32),
    leaving out the 5 * n_head * block_size bytes of attention scores, which SDPA's fused
    kernels never store. With activation checkpointing each Block keeps only its input, the
    residual stream: float32 under autocast (the embeddings are float32, and float32 plus
    bfloat16 is float32), 4 * n_embd bytes per token per layer; under FSDP in 16 bits, 2
    (MixedPrecisionPolicy casts each Block's inputs); plus, in backward, the 34 * n_embd of
    the one Block being recomputed.
    The logits are counted apart: the loss holds them in 16 bits, in fp32, and as fp32
    log-probabilities (10 bytes each; 8 in float32).
    Not counted: the CUDA context, allocator fragmentation, autocast's cached weight copies,
    FSDP's padding of each shard to equal sizes, communication buffers of a few MB."""
    fsdp = getattr(cfg, "fsdp", False)  # old callers' settings may not have these fields
    checkpointing = getattr(cfg, "activation_checkpointing", False)
    n = num_params(m, non_embedding=False)
    act_bytes = _activation_bytes(cfg)  # the compute dtype's size: 2 or 4
    tokens = cfg.batch_size * cfg.block_size
    if fsdp:
        n_block = sum(p.numel() for p in shape_model(m).transformer.h[0].parameters())
        n_root = n - m.n_layer * n_block  # wte (= lm_head), wpe, ln_f
        parts = {"weights": 4 * n // world_size, "gradients": 4 * n // world_size,
                 "optimizer state": 8 * n // world_size,
                 "gathered parameters": act_bytes * (n_root + 2 * n_block),
                 "gathered gradients": act_bytes * n_root + (act_bytes + 4) * n_block}
        if cfg.gradient_accumulation_steps // world_size > 1:
            parts["accumulated gradients"] = 4 * n
    else:
        parts = {"weights": 4 * n, "gradients": 4 * n, "optimizer state": 8 * n}
        if world_size > 1:
            parts["DDP buckets"] = 4 * n
    one_layer = tokens * 34 * m.n_embd * act_bytes // 2
    if checkpointing:
        residual_bytes = act_bytes if fsdp else 4
        parts["activations"] = m.n_layer * tokens * m.n_embd * residual_bytes + one_layer
    else:
        parts["activations"] = m.n_layer * one_layer
    logit_bytes = 2 + 4 + 4 if act_bytes == 2 else 4 + 4  # float() is a no-op in float32
    parts["logits"] = tokens * m.vocab_size * logit_bytes
    return parts


# GPU memory sizes, in GB of 10^9 bytes, and the boards that have them (NVIDIA's datasheets).
# A run fits when its estimate is at most the size in 10^9 bytes: a little under what each
# of these boards can allocate (their sizes are in GiB of 2^30 bytes, less a little that the
# driver keeps), which leaves some room for what the estimate leaves out.
GPU_MEMORY_GB = {24: "RTX 4090, A10G, L4", 40: "A100 40GB", 80: "A100 80GB, H100",
                 141: "H200"}


def fits(n_bytes):
    """The sizes in GPU_MEMORY_GB that n_bytes fits in."""
    return [gb for gb in GPU_MEMORY_GB if n_bytes <= gb * 10 ** 9]


def report(cfg, world_size=1, model_config=None):
    """A few lines on what the run costs, for train.py to print at the start.

    model_config is the model's GPTConfig; without it, cfg must carry the model's fields,
    vocab_size (padded) included."""
    m = _model_shape(cfg, model_config)
    n, n_body = num_params(m, non_embedding=False), num_params(m)
    tpi = tokens_per_iter(cfg)
    memory = memory_per_rank(cfg, m, world_size)
    act_bytes = _activation_bytes(cfg)
    scores = (m.n_layer * cfg.batch_size * cfg.block_size * 5 * m.n_head * cfg.block_size
              * act_bytes // 2)
    state = [name for name in memory if name not in ("activations", "logits")]
    checkpointing = getattr(cfg, "activation_checkpointing", False)
    return "\n".join([
        f"model: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, block {m.block_size}, "
        f"vocab {m.vocab_size}, biases {'on' if m.bias else 'off'}",
        f"parameters: {n:,}; {n_body:,} without the position table",
        f"FLOPs per token: 6N + 12 * n_layer * n_embd * T = "
        f"{flops_per_token(m, cfg.block_size):,} (N = {n_body:,}, T = {cfg.block_size})",
        f"tokens per iteration: {tpi:,} = {cfg.batch_size} sequences x {cfg.block_size} tokens "
        f"x {cfg.gradient_accumulation_steps} micro-steps, over {world_size} process(es)",
        f"whole run: {cfg.max_iters:,} iterations, {tpi * cfg.max_iters:.3g} tokens, "
        f"{total_flops(cfg, m):.3g} FLOPs",
        f"memory per process ({_strategy(cfg, world_size)}), an estimate (see "
        f"accounting.memory_per_rank): {_size(sum(memory.values()))}",
        "  " + " + ".join(f"{name} {_size(memory[name])}" for name in state),
        f"  activations {_size(memory['activations'])}, one micro-batch: {34 * act_bytes // 2} "
        "* n_embd bytes per token per layer (Korthikanti 2022)" if not checkpointing else
        f"  activations {_size(memory['activations'])}, one micro-batch, checkpointed: each "
        f"layer keeps its input, one is rerun ({34 * act_bytes // 2} * n_embd per token)",
        f"  logits {_size(memory['logits'])}; unfused attention would add "
        f"{_size(scores)} of scores, which SDPA does not store",
        f"  {_fits_text(memory)}",
    ])


def memory_table(cfg, world_size=1, model_config=None):
    """Memory per GPU with DDP and with FSDP (one process alone: without), each with and
    without activation checkpointing, and the GPU sizes each fits: for train.py --estimate."""
    m = _model_shape(cfg, model_config)
    strategies = [False, True] if world_size > 1 else [False]
    lines = [f"memory per GPU on {world_size} GPU(s) in GiB, {cfg.batch_size} x "
             f"{cfg.block_size} tokens per micro-step, {_activation_bytes(cfg) * 8}-bit "
             "activations;",
             "state: weights, gradients, AdamW moments, and what DDP or FSDP adds to them",
             f"{'':<6}{'checkpointing':<15}{'state':>7}{'activations':>13}{'logits':>8}"
             f"{'total':>8}  fits GPUs of (GB)"]
    for fsdp in strategies:
        for checkpointing in (False, True):
            run = replace(cfg, fsdp=fsdp, activation_checkpointing=checkpointing)
            parts = memory_per_rank(run, m, world_size)
            state = sum(v for k, v in parts.items() if k not in ("activations", "logits"))
            sizes = fits(sum(parts.values()))
            lines.append(f"{_strategy(run, world_size).split()[0]:<6}"
                         f"{'on' if checkpointing else 'off':<15}"
                         f"{state / GIB:>7.1f}{parts['activations'] / GIB:>13.1f}"
                         f"{parts['logits'] / GIB:>8.1f}{sum(parts.values()) / GIB:>8.1f}  "
                         f"{', '.join(map(str, sizes)) or 'none'}")
    return "\n".join(lines)


# Dense (no sparsity) peak tensor throughput in FLOP/s, by board and autocast dtype, float32
# meaning TF32 tensor cores where the board has them. Sources: NVIDIA's datasheets ("NVIDIA
# A100 Tensor Core GPU"; "H100 Tensor Core GPU" for the SXM, PCIe and NVL boards; "H200 Tensor
# Core GPU" for H200 SXM and NVL; "NVIDIA L4", "NVIDIA L40", "NVIDIA L40S"; the "Ada Lovelace
# architecture" whitepaper, appendix A, FP32 accumulate, for the RTX 4090). The Hopper and
# Ada datasheets quote figures with 2:4 sparsity; those are halved here.
PEAK_FLOPS = {
    "A100": {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 156e12},
    "A100 PCIe": {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 156e12},
    "H100": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 494e12},  # SXM
    "H100 PCIe": {torch.bfloat16: 756e12, torch.float16: 756e12, torch.float32: 378e12},
    "H100 NVL": {torch.bfloat16: 835e12, torch.float16: 835e12, torch.float32: 417e12},
    "H200": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 494e12},  # SXM
    "H200 NVL": {torch.bfloat16: 835e12, torch.float16: 835e12, torch.float32: 417e12},
    "L4": {torch.bfloat16: 121e12, torch.float16: 121e12, torch.float32: 60e12},
    "L40": {torch.bfloat16: 181e12, torch.float16: 181e12, torch.float32: 90e12},
    "L40S": {torch.bfloat16: 362e12, torch.float16: 362e12, torch.float32: 183e12},
    "RTX 4090": {torch.bfloat16: 165e12, torch.float16: 165e12, torch.float32: 83e12},
    "A10G": {torch.bfloat16: 70e12, torch.float16: 70e12, torch.float32: 35e12},
    "V100": {torch.float16: 125e12, torch.float32: 15.7e12},
    "T4": {torch.float16: 65e12, torch.float32: 8.1e12},
}

# Rated board power in watts (the form factor's maximum TDP), for energy estimates. Sources:
# the same datasheets; V100 is the SXM2 board; the RTX 4090's is its total graphics power.
# A10G, an AWS-only part with no public datasheet: the 300 W power limit nvidia-smi shows on
# EC2 G5 instances.
BOARD_WATTS = {"A100": 400, "A100 PCIe": 300, "H100": 700, "H100 PCIe": 350, "H100 NVL": 400,
               "H200": 700, "H200 NVL": 600, "L4": 72, "L40": 300, "L40S": 350,
               "RTX 4090": 450, "A10G": 300, "V100": 300, "T4": 70}


def board(device_name):
    """The key of PEAK_FLOPS that names this device, or None. Names match as whole words,
    the most specific first: "NVIDIA H100 PCIe" is the H100 PCIe, "NVIDIA H100 80GB HBM3" the
    H100 (SXM), and "NVIDIA L40S" neither the L40 nor the L4."""
    words = set(re.split(r"[\s\-]+", device_name.upper()))
    matches = [key for key in PEAK_FLOPS if set(key.upper().split()) <= words]
    return max(matches, key=lambda key: len(key.split()), default=None)


def peak_flops(device, dtype):
    """Peak FLOP/s of this device at dtype, or None when it is not in PEAK_FLOPS."""
    if not device.startswith("cuda"):
        return None
    key = board(torch.cuda.get_device_name(device))
    return PEAK_FLOPS[key].get(dtype) if key else None


def estimate(cfg, world_size=1, model_config=None, mfu=0.4):
    """A table of the run's wall-clock time, GPU-hours and energy on each GPU in
    PEAK_FLOPS, at bfloat16 where the board has it, else float16; then memory_table's
    memory per GPU, with DDP and FSDP, with and without activation checkpointing.

    time = total FLOPs / (world_size * peak FLOP/s * mfu). Energy is the GPUs' rated board
    power times GPU-hours: no CPUs, memory, network or cooling."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    m = _model_shape(cfg, model_config)
    total = total_flops(cfg, m)
    lines = [
        f"{total:.3g} FLOPs ({cfg.max_iters:,} iterations of {tokens_per_iter(cfg):,} tokens) "
        f"on {world_size} GPU(s) at {mfu:.0%} MFU",
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
    return "\n".join(lines + [memory_table(cfg, world_size, m)])


def _model_shape(cfg, model_config):
    m = cfg if model_config is None else model_config
    if not hasattr(m, "vocab_size"):
        raise ValueError("the vocabulary size is not in the run's settings: pass the model's "
                         "GPTConfig as model_config")
    return m


def _strategy(cfg, world_size):
    if getattr(cfg, "fsdp", False):
        return f"FSDP over {world_size}"
    return f"DDP over {world_size}" if world_size > 1 else "one process"


def _fits_text(memory):
    sizes = fits(sum(memory.values()))
    too_small = [f"{gb} GB ({GPU_MEMORY_GB[gb]})" for gb in GPU_MEMORY_GB if gb not in sizes]
    if not sizes:
        return f"too much for every GPU size we know ({', '.join(map(str, GPU_MEMORY_GB))} GB)"
    return (f"fits GPUs of {', '.join(map(str, sizes))} GB"
            + (f", not {', '.join(too_small)}" if too_small else ""))


def _activation_bytes(cfg):
    """2 under 16-bit autocast, 4 in float32; dtype auto is 16-bit unless the device is
    set to the CPU or MPS (runtime.pick_dtype's rule, taking device auto as a GPU)."""
    if cfg.dtype == "auto":
        return 4 if cfg.device.startswith(("cpu", "mps")) else 2
    return 4 if cfg.dtype == "float32" else 2


def _duration(seconds):
    for unit, size, limit in (("s", 1, 60), ("min", 60, 3600), ("h", 3600, 48 * 3600)):
        if seconds < limit:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds / 86400:.1f} days"


def _amount(x):
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _size(n_bytes):
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB else f"{n_bytes / 2 ** 20:.1f} MiB"
