"""What a training run costs: parameters, FLOPs, tokens, memory, and the GPUs' peak throughput.

    print(accounting.report(cfg, world_size, raw_model.config))  # at the start of training

cfg holds the run's settings (a TrainConfig); m, the model's shape (a GPTConfig), which the
config alone does not fix: the vocabulary comes from the dataset, padded, and a pretrained model
brings its own. All of it is arithmetic on these numbers, on a model of that shape that holds no
data, and on the table of GPUs below. estimate.py prints the time and energy it implies.
"""
import re

import torch

from model import GPT, config_from_dict

GIB = 2 ** 30


def padded_vocab_size(vocab_size):
    """A large vocabulary padded up to a multiple of 64 (GPT-2's 50257 to 50304) for faster
    matmuls, as model_shape pads it; a character vocabulary is kept as it is."""
    return -(-vocab_size // 64) * 64 if vocab_size > 256 else vocab_size


def model_shape(cfg, vocab_size):
    """The GPTConfig of a model trained from scratch with cfg's settings on a dataset of
    vocab_size tokens; the padding ids are never targets."""
    return config_from_dict({**vars(cfg), "vocab_size": padded_vocab_size(vocab_size)})


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
    TP (cfg.tp, parallel.tensor_parallel): each rank holds 1/tp of the Blocks' split matrices
    and their gradients and moments (local_params), and 10 + 24/tp of the 34 bytes of
    activations; the embeddings, norms and logits are whole on every rank. 2-D: FSDP then
    divides this rank's share by the world_size / tp data-parallel rows.
    Not counted: the CUDA context, allocator fragmentation, autocast's cached weight copies,
    FSDP's padding of each shard to equal sizes, communication buffers of a few MB."""
    fsdp, checkpointing, tp = cfg.fsdp, cfg.activation_checkpointing, cfg.tp
    dp = world_size // tp
    n, (n_root, n_block) = num_params(m, non_embedding=False), local_params(m, tp)
    n_local = n_root + m.n_layer * n_block  # this rank's share under TP: the whole, without
    act_bytes = activation_bytes(cfg)  # the compute dtype's size: 2 or 4
    tokens = cfg.batch_size * cfg.block_size
    if fsdp:
        parts = {"weights": 4 * n_local // dp, "gradients": 4 * n_local // dp,
                 "optimizer state": 8 * n_local // dp,
                 "gathered parameters": act_bytes * (n_root + 2 * n_block),
                 "gathered gradients": act_bytes * n_root + (act_bytes + 4) * n_block}
        if cfg.gradient_accumulation_steps // dp > 1:
            parts["accumulated gradients"] = 4 * n_local
    else:
        parts = {"weights": 4 * n_local, "gradients": 4 * n_local, "optimizer state": 8 * n_local}
        if dp > 1:
            parts["DDP buckets"] = 4 * n
    # Under TP, 24 of the 34 are inside the split layers (Korthikanti, section 4.2.2)
    one_layer = tokens * (10 * tp + 24) * m.n_embd * act_bytes // (2 * tp)
    if checkpointing:
        residual_bytes = act_bytes if fsdp else 4
        parts["activations"] = m.n_layer * tokens * m.n_embd * residual_bytes + one_layer
    else:
        parts["activations"] = m.n_layer * one_layer
    logit_bytes = 2 + 4 + 4 if act_bytes == 2 else 4 + 4  # float() is a no-op in float32
    parts["logits"] = tokens * m.vocab_size * logit_bytes
    return parts


def local_params(m, tp=1):
    """(whole parameters, one Block's parameters on one rank) under tensor parallelism: in a
    Block the four matrices (12 n_embd^2) and the biases of the column-split c_attn and c_fc
    (7 n_embd) are split over tp ranks; norms and c_proj's biases are whole everywhere."""
    block = sum(p.numel() for p in shape_model(m).transformer.h[0].parameters())
    split = 12 * m.n_embd ** 2 + (7 * m.n_embd if m.bias else 0)
    return num_params(m, non_embedding=False) - m.n_layer * block, block - split + split // tp


def communication_per_step(cfg, m, world_size=1):
    """Bytes each process sends per iteration, by kind, in ring collectives: an all-reduce of
    S bytes over k ranks sends 2 (k-1)/k S per rank, an all-gather or reduce-scatter (k-1)/k S.
    DDP all-reduces the fp32 gradients once. FSDP gathers, at each micro-step, the root once
    and every Block twice (forward, backward) in the compute dtype, and reduce-scatters the
    fp32 gradients once. TP all-reduces (batch, block, n_embd) activations twice per Block
    forward and twice backward, each micro-step (a third forward with checkpointing)."""
    tp, dp, act_bytes = cfg.tp, world_size // cfg.tp, activation_bytes(cfg)
    n_root, n_block = local_params(m, tp)
    n_local, micro = n_root + m.n_layer * n_block, max(cfg.gradient_accumulation_steps // dp, 1)
    parts = {}
    if dp > 1 and cfg.fsdp:
        gathers = act_bytes * micro * (n_root + 2 * m.n_layer * n_block)
        parts["FSDP"] = (gathers + 4 * n_local) * (dp - 1) // dp
    elif dp > 1:
        parts["DDP"] = 2 * (dp - 1) * 4 * n_local // dp
    if tp > 1:
        exchanges = (6 if cfg.activation_checkpointing else 4) * m.n_layer * micro
        size = cfg.batch_size * cfg.block_size * m.n_embd * act_bytes
        parts["TP"] = exchanges * 2 * (tp - 1) * size // tp
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


def report(cfg, world_size=1, model_config=None, device=None):
    """A few lines on what the run costs, for train.py to print at the start.

    model_config is the model's GPTConfig; without it, cfg must carry the model's fields,
    vocab_size (padded) included. device: (name, bytes of memory or None), the one the run
    uses; without it, the GPU sizes that the estimate fits."""
    m = _model_shape(cfg, model_config)
    n, n_body = num_params(m, non_embedding=False), num_params(m)
    tpi = tokens_per_iter(cfg)
    memory = memory_per_rank(cfg, m, world_size)
    comms = communication_per_step(cfg, m, world_size)
    act_bytes = activation_bytes(cfg)
    per_channel = (10 + 24 / cfg.tp) * act_bytes / 2  # Korthikanti's 34 bytes, under TP
    scores = (m.n_layer * cfg.batch_size * cfg.block_size * 5 * m.n_head * cfg.block_size
              * act_bytes // 2)
    state = [name for name in memory if name not in ("activations", "logits")]
    checkpointing = cfg.activation_checkpointing
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
        f"memory per process ({strategy(cfg, world_size)}), an estimate (see "
        f"accounting.memory_per_rank): {_size(sum(memory.values()))}",
        "  " + " + ".join(f"{name} {_size(memory[name])}" for name in state),
        f"  activations {_size(memory['activations'])}, one micro-batch: {per_channel:g} "
        "* n_embd bytes per token per layer (Korthikanti 2022)" if not checkpointing else
        f"  activations {_size(memory['activations'])}, one micro-batch, checkpointed: each "
        f"layer keeps its input, one is rerun ({per_channel:g} * n_embd per token)",
        f"  logits {_size(memory['logits'])}; unfused attention would add "
        f"{_size(scores)} of scores, which SDPA does not store",
        f"  {_fits_text(memory) if device is None else _device_text(memory, *device)}",
        "communication per iteration and process (accounting.communication_per_step): "
        + (", ".join(f"{k} {_size(v)}" for k, v in comms.items()) or "none"),
    ])


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


def _model_shape(cfg, model_config):
    m = cfg if model_config is None else model_config
    if not hasattr(m, "vocab_size"):
        raise ValueError("the vocabulary size is not in the run's settings: pass the model's "
                         "GPTConfig as model_config")
    return m


def strategy(cfg, world_size):
    dp = world_size // cfg.tp
    tp = f"TP over {cfg.tp}" if cfg.tp > 1 else ""
    data = f"FSDP over {dp}" if cfg.fsdp else f"DDP over {dp}" if dp > 1 else ""
    return " x ".join(filter(None, (data, tp))) or "one process"


def _device_text(memory, name, have):
    if not have:
        return f"{name}'s memory is not known here"
    return f"{sum(memory.values()) / have:.1%} of the {_size(have)} that {name} has"


def _fits_text(memory):
    sizes = fits(sum(memory.values()))
    too_small = [f"{gb} GB ({GPU_MEMORY_GB[gb]})" for gb in GPU_MEMORY_GB if gb not in sizes]
    if not sizes:
        return f"too much for every GPU size we know ({', '.join(map(str, GPU_MEMORY_GB))} GB)"
    return (f"fits GPUs of {', '.join(map(str, sizes))} GB"
            + (f", not {', '.join(too_small)}" if too_small else ""))


def activation_bytes(cfg):
    """2 under 16-bit autocast, 4 in float32; dtype auto is 16-bit unless the device is
    set to the CPU or MPS (runtime.pick_dtype's rule, taking device auto as a GPU)."""
    if cfg.dtype == "auto":
        return 4 if cfg.device.startswith(("cpu", "mps")) else 2
    return 4 if cfg.dtype == "float32" else 2


def _size(n_bytes):
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB else f"{n_bytes / 2 ** 20:.1f} MiB"
