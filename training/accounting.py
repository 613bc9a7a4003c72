"""What a training run costs: parameters, FLOPs, tokens, memory, and the GPUs' peak throughput.

    print(accounting.report(cfg, world_size, raw_model.config))  # at the start of training

cfg holds the run's settings (a TrainConfig); m, the model's shape (a GPTConfig: the vocabulary
comes from the dataset, or pretrained weights bring their own). All of it is arithmetic.
"""
import re

import torch

from model import GPT, config_from_dict

GIB = 2 ** 30


def padded_vocab_size(vocab_size):
    """A large vocabulary padded up to a multiple of 64 (GPT-2's 50257 to 50304) for faster
    matmuls; a character vocabulary is kept as it is."""
    return -(-vocab_size // 64) * 64 if vocab_size > 256 else vocab_size


def model_shape(cfg, vocab_size):
    """The GPTConfig of a model trained from scratch with cfg's settings on a dataset of
    vocab_size tokens; the padding ids are never targets."""
    return config_from_dict({**vars(cfg), "vocab_size": padded_vocab_size(vocab_size)})


def shape_model(m):
    """GPT of shape m on the meta device (shapes, no storage: gpt2-xl costs nothing), so that
    the model itself is the one definition of the parameters and FLOPs."""
    with torch.device("meta"):
        return GPT(config_from_dict(vars(m)))


def num_params(m, non_embedding=True):
    """GPT(m).num_params(non_embedding)."""
    return shape_model(m).num_params(non_embedding)


def flops_per_token(m, seq_len):
    """GPT(m).flops_per_token(seq_len): training FLOPs per token, forward and backward."""
    return shape_model(m).flops_per_token(seq_len)


def tokens_per_iter(cfg):
    """Tokens in one optimizer step, summed over every process: gradient_accumulation_steps
    already counts the micro-steps of all ranks together."""
    return cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps


def total_flops(cfg, m):
    """Training FLOPs of the whole run: max_iters steps of tokens_per_iter tokens each."""
    return flops_per_token(m, cfg.block_size) * tokens_per_iter(cfg) * cfg.max_iters


def kv_cache_bytes(m, tokens, dtype_bytes):
    """A KV cache of tokens positions: a key and a value of n_embd numbers per token, in every
    layer (sampling's cache, the serving engine's pages, the slots of serving/batching.py)."""
    return 2 * m.n_layer * tokens * m.n_embd * dtype_bytes


def memory_per_rank(cfg, m, world_size=1):
    """Bytes one process needs at its peak, by part, for the run as cfg spreads it over
    world_size processes. An estimate, not a measurement; N is the parameter count.
    - One process, or DDP: fp32 weights (autocast keeps them), gradients and AdamW's two
      moments, 16N; DDP's gradient buckets add 4N.
    - FSDP (torch 2.13's fully_shard per Block, then the root): 16N / world_size, plus what is
      gathered in the compute dtype: the root's weights (wte, wpe, ln_f), gathered from
      forward to the end of backward, and two Blocks' (the one computing, the next
      prefetched); the root's gradient and one Block's, with its fp32 copy for the
      reduce-scatter; and, with several micro-steps per rank, every full gradient in fp32
      (4N) kept between them, as gradients are reduce-scattered at the last one only.
    - TP: 1/tp of the Blocks' split matrices and their state (local_params); embeddings,
      norms and logits whole on every rank. 2-D: FSDP divides that share over the dp rows.
    - PP: a stage holds n_layer / pp Blocks and, first or last, wte or its copy (the head),
      with their state; and the activations of the micro-batches in flight (in_flight): 1F1B
      at most pp at once, GPipe all m of a row, and GPipe's last stage all m's logits. FSDP
      inside a stage keeps the stage's weights gathered from its first backward to the end of
      the schedule (torch's PipelineStage: no reshard after backward until the last).
    - Activations of one micro-batch: 34 * n_embd bytes per token per layer in 16 bits
      (Korthikanti et al. 2022, section 4.1; 10 + 24/tp under TP, section 4.2.2), twice that
      in float32, without the attention scores that SDPA never stores. Checkpointed, a
      Block keeps only its input, the residual stream (fp32 under autocast: 4 * n_embd; 16
      bits under FSDP, which casts Block inputs), plus one Block rerun in backward.
    - Logits: 16-bit, fp32 and fp32 log-probabilities in the loss, 10 bytes each (8 in fp32).
    Not counted: the CUDA context, fragmentation, autocast's weight copies, FSDP's padding,
    communication buffers of a few MB."""
    fsdp, checkpointing, tp = cfg.fsdp, cfg.activation_checkpointing, cfg.tp
    dp, layers, held = world_size // (tp * cfg.pp), m.n_layer // cfg.pp, in_flight(cfg, world_size)
    n, (n_root, n_block) = num_params(m, non_embedding=False), local_params(m, tp)
    n_local = n_root + layers * n_block  # this rank's share under TP and PP: the whole, without
    act_bytes = activation_bytes(cfg)  # the compute dtype's size: 2 or 4
    tokens = cfg.batch_size * cfg.block_size
    if fsdp:
        parts = {"weights": 4 * n_local // dp, "gradients": 4 * n_local // dp,
                 "optimizer state": 8 * n_local // dp,
                 "gathered parameters": act_bytes * (n_local if cfg.pp > 1 else
                                                     n_root + 2 * n_block),
                 "gathered gradients": act_bytes * n_root + (act_bytes + 4) * n_block}
        if cfg.gradient_accumulation_steps // dp > 1:
            parts["accumulated gradients"] = 4 * n_local
    else:
        parts = {"weights": 4 * n_local, "gradients": 4 * n_local, "optimizer state": 8 * n_local}
        if dp > 1:
            parts["DDP buckets"] = 4 * n
    one_layer = tokens * (10 * tp + 24) * m.n_embd * act_bytes // (2 * tp)
    if checkpointing:
        residual_bytes = act_bytes if fsdp else 4
        parts["activations"] = held * layers * tokens * m.n_embd * residual_bytes + one_layer
    else:
        parts["activations"] = held * layers * one_layer
    logit_bytes = 2 + 4 + 4 if act_bytes == 2 else 4 + 4  # float() is a no-op in float32
    held_logits = held if cfg.pp_schedule == "gpipe" else 1  # GPipe's last stage keeps all m
    parts["logits"] = held_logits * tokens * m.vocab_size * logit_bytes
    return parts


def micro_batches(cfg, world_size):
    """Micro-steps each data-parallel row runs per iteration (the ranks of a TP or PP row share
    theirs): gradient_accumulation_steps over the rows, at least one."""
    return max(cfg.gradient_accumulation_steps * cfg.tp * cfg.pp // world_size, 1)


def in_flight(cfg, world_size):
    """Micro-batches whose activations a stage holds at once: under PP, 1F1B's first stage
    starts pp forwards before its first backward frees one, GPipe runs all m forwards first."""
    m = micro_batches(cfg, world_size)
    return 1 if cfg.pp == 1 else m if cfg.pp_schedule == "gpipe" else min(m, cfg.pp)


def bubble(cfg, world_size):
    """The share of a pipeline's step that a stage idles, (p-1)/(m+p-1): of the m+p-1 slots
    from the first forward to the last backward, each stage works m (GPipe and 1F1B alike)."""
    m = micro_batches(cfg, world_size)
    return (cfg.pp - 1) / (m + cfg.pp - 1)


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
    forward and twice backward, each micro-step (a third forward with checkpointing). PP sends
    each micro-batch's activations forward and their gradients back, point to point, and
    all-reduces wte's fp32 gradient between the first and last stage (the busier of a first
    stage and a middle one)."""
    tp, dp, act_bytes = cfg.tp, world_size // (cfg.tp * cfg.pp), activation_bytes(cfg)
    n_root, n_block = local_params(m, tp)
    n_local = n_root + m.n_layer // cfg.pp * n_block
    micro = micro_batches(cfg, world_size)
    size = cfg.batch_size * cfg.block_size * m.n_embd * act_bytes
    parts = {}
    if dp > 1 and cfg.fsdp:
        gathers = act_bytes * micro * (n_root + 2 * m.n_layer // cfg.pp * n_block)
        parts["FSDP"] = (gathers + 4 * n_local) * (dp - 1) // dp
    elif dp > 1:
        parts["DDP"] = 2 * (dp - 1) * 4 * n_local // dp
    if tp > 1:
        exchanges = (6 if cfg.activation_checkpointing else 4) * m.n_layer // cfg.pp * micro
        parts["TP"] = exchanges * 2 * (tp - 1) * size // tp
    if cfg.pp > 1:
        tied = 4 * m.vocab_size * m.n_embd // (dp if cfg.fsdp else 1)
        parts["PP"] = max(micro * size + tied, 2 * micro * size if cfg.pp > 2 else 0)
    return parts


def report(cfg, world_size=1, model_config=None, device=None):
    """A few lines on what the run costs, for train.py to print at the start. model_config:
    the model's GPTConfig, else cfg's fields (vocab_size included). device: (name, bytes of
    memory or None), the run's, to compare the estimate with (tools/estimate.py, without it,
    names the GPU sizes it fits)."""
    m = cfg if model_config is None else model_config
    if not hasattr(m, "vocab_size"):
        raise ValueError("the vocabulary size is not in the run's settings: pass the model's "
                         "GPTConfig as model_config")
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
        *([f"pipeline: {cfg.pp} stages of {m.n_layer // cfg.pp} Blocks, {cfg.pp_schedule}, "
           f"a stage holds {in_flight(cfg, world_size)} micro-batch(es); bubble (p-1)/(m+p-1) = "
           f"{bubble(cfg, world_size):.0%} of each step idle"] if cfg.pp > 1 else []),
        *([f"  {_device_text(memory, *device)}"] if device else []),
        "communication per iteration and process (accounting.communication_per_step): "
        + (", ".join(f"{k} {_size(v)}" for k, v in comms.items()) or "none"),
    ])


# Dense peak tensor FLOP/s by board and autocast dtype (float32: TF32 where the board has it),
# from NVIDIA's datasheets (A100, H100, H200, L4, L40, L40S) and the Ada Lovelace whitepaper's
# appendix A (RTX 4090, FP32 accumulate); figures quoted with 2:4 sparsity are halved here.
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
    """The key of PEAK_FLOPS that names this device, or None: whole words, the most specific
    first ("NVIDIA H100 PCIe" is the H100 PCIe, "NVIDIA L40S" neither the L40 nor the L4)."""
    words = set(re.split(r"[\s\-]+", device_name.upper()))
    matches = [key for key in PEAK_FLOPS if set(key.upper().split()) <= words]
    return max(matches, key=lambda key: len(key.split()), default=None)


def peak_flops(device, dtype):
    """Peak FLOP/s of this device at dtype, or None when it is not in PEAK_FLOPS."""
    if not device.startswith("cuda"):
        return None
    key = board(torch.cuda.get_device_name(device))
    return PEAK_FLOPS[key].get(dtype) if key else None


def strategy(cfg, world_size):
    dp = world_size // (cfg.tp * cfg.pp)
    tp = f"TP over {cfg.tp}" if cfg.tp > 1 else ""
    pp = f"PP over {cfg.pp}" if cfg.pp > 1 else ""
    data = f"FSDP over {dp}" if cfg.fsdp else f"DDP over {dp}" if dp > 1 else ""
    return " x ".join(filter(None, (pp, data, tp))) or "one process"


def _device_text(memory, name, have):
    if not have:
        return f"{name}'s memory is not known here"
    return f"{sum(memory.values()) / have:.1%} of the {_size(have)} that {name} has"


def activation_bytes(cfg):
    """2 under 16-bit autocast, 4 in float32; dtype auto is 16-bit unless the device is
    set to the CPU or MPS (runtime.pick_dtype's rule, taking device auto as a GPU)."""
    if cfg.dtype == "auto":
        return 4 if cfg.device.startswith(("cpu", "mps")) else 2
    return 4 if cfg.dtype == "float32" else 2


def _size(n_bytes):
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB else f"{n_bytes / 2 ** 20:.1f} MiB"
