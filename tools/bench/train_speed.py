"""Timing training iterations, as train.py runs them, for each variant (tools/bench/__main__.py
says how)."""
import contextlib
import statistics
import time

import torch

from model import GPT
from parallel import mesh as parallel
from parallel.data_parallel import wrap_ddp
from parallel.pipeline import Pipeline
from tools.bench.measure import peak_memory, sync, timed
from training import accounting, runtime
from training.settings import ConfigError
from training.step import clip_gradients, forward_backward, make_optimizer


def variant_dtypes(cfg):
    return [d.strip() for d in cfg.dtypes.split(",")] if cfg.dtypes else [cfg.dtype]


def variant_compiles(cfg):
    if not cfg.compiles:
        return [cfg.compile]
    words = [c.strip().lower() for c in cfg.compiles.split(",")]
    if not set(words) <= {"true", "false"}:
        raise ConfigError(f"compiles must list true and/or false, got {cfg.compiles!r}")
    return [w == "true" for w in words]


def train_step(model, optimizer, scaler, ctx, batches, grad_clip):
    """One iteration as train.py's loop runs it on one process: forward and backward over
    every micro-batch, clipping, then the AdamW step."""
    forward_backward(model, batches, ctx, scaler, len(batches))
    clip_gradients(model, optimizer, scaler, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def state_bytes(model, optimizer):
    """Bytes of weights and AdamW moments held by this process: its shards under FSDP. On a
    CPU the peak RSS is dominated by transient buffers; this shows what sharding divides."""
    local = [getattr(t, "_local_tensor", t) for t in model.parameters()]
    local += [getattr(t, "_local_tensor", t) for state in optimizer.state.values()
              for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
    return sum(t.numel() * t.element_size() for t in local)


def warm_up(cfg, model_config, device, layout, dtype_name, compiled, batches):
    """Build a model and its optimizer for one variant and run its warm-up iterations; under
    torchrun the model is spread over the ranks as train.py spreads it (parallel/mesh.py).

    Returns (the arguments of train_step, the variant's result so far)."""
    dtype, ctx, scaler = runtime.training_precision(dtype_name, device)
    print(f"building and warming up: {dtype_name}, compile={compiled}", flush=True)
    cuda = device.startswith("cuda")
    base = torch.cuda.memory_allocated(device) if cuda else 0  # the variants built before
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.seed)
    model = GPT(model_config).to(device)
    model.activation_checkpointing = cfg.activation_checkpointing
    world_size = layout.dp_size * layout.tp * layout.pp
    parallel.check(cfg, world_size, dtype)
    model = parallel.spread(model, layout, dtype)
    if cfg.fsdp:
        ctx = contextlib.nullcontext()  # FSDP's own policy casts
    optimizer = make_optimizer(model, cfg)
    model = wrap_ddp(model, layout, device, torch.device(device).index)
    if layout.pp > 1:
        model = Pipeline(model, layout, device, len(batches), cfg.pp_schedule)
    step_args = (torch.compile(model) if compiled else model, optimizer, scaler, ctx, batches,
                 cfg.grad_clip)
    t0 = time.perf_counter()
    for _ in range(cfg.warmup_steps):
        train_step(*step_args)
    sync(device)
    warmup_s = time.perf_counter() - t0
    memory, measured = peak_memory(device)
    state = state_bytes(model, optimizer)
    if world_size > 1:  # the largest over the ranks
        largest = torch.tensor([memory, state], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
        memory, state = map(int, largest.tolist())
    return step_args, dict(dtype=str(dtype).removeprefix("torch."), compile=compiled,
                           warmup_s=warmup_s, peak_memory_bytes=memory - base,
                           state_bytes=state,
                           peak_memory_what=measured,
                           peak_flops=accounting.peak_flops(device, dtype))


def bench_training(cfg, model_config, device, layout=parallel.Layout()):
    """Median time per iteration of each (dtype, compile) variant, with throughput and MFU.

    Every variant stays in memory until the end, so that they can take turns. Every rank
    draws the same batches, so the ranks of a tensor-parallel row agree."""
    world_size = layout.dp_size * layout.tp * layout.pp
    g = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch_size, cfg.block_size)
    batches = [(torch.randint(model_config.vocab_size, shape, generator=g).to(device),
                torch.randint(model_config.vocab_size, shape, generator=g).to(device))
               for _ in range(cfg.gradient_accumulation_steps // layout.dp_size)]
    variants = [warm_up(cfg, model_config, device, layout, dtype_name, compiled, batches)
                for dtype_name in variant_dtypes(cfg) for compiled in variant_compiles(cfg)]
    times = [[] for _ in variants]
    for _ in range(cfg.timed_steps):  # round-robin: every variant sees the same load
        for (step_args, _), ms in zip(variants, times):
            seconds, _ = timed(lambda: train_step(*step_args), device)
            ms.append(seconds * 1000)
    tokens_per_iter = accounting.tokens_per_iter(cfg)
    flops_per_iter = accounting.flops_per_token(model_config, cfg.block_size) * tokens_per_iter
    results = []
    for (_, result), ms in zip(variants, times):
        median_s = statistics.median(ms) / 1000
        results.append(dict(result, ms_per_iter=median_s * 1000, ms_per_iter_all=ms,
                            tokens_per_iter=tokens_per_iter,
                            tokens_per_s=tokens_per_iter / median_s,
                            mfu=flops_per_iter / median_s / (result["peak_flops"] * world_size)
                            if result["peak_flops"] else None))
    return results
