"""Measure training and sampling speed on random tokens: no dataset needed.

    python bench.py config/train_shakespeare_char_cpu.toml --dtypes=float32,bfloat16
    python bench.py config/train_shakespeare_char.toml --train=false --batch_sizes=1,8,32,128

Training: each variant (every dtype in dtypes with every choice in compiles) runs warmup_steps
untimed iterations (torch.compile compiles there), then timed_steps timed ones, each a whole
iteration as train.py runs it on one process. The variants take turns, one iteration each per
round, so a machine shared with other work slows them alike.

Sampling: the KV-cached sampler against the uncached one, greedy, from the same prompt, taking
turns sample_repeats times; first for the new tokens that fit in one block, then for
max_new_tokens. Past block_size the cached sampler rebuilds its cache for every token (learned
positions shift under it): a full forward, as uncached, so the speed-up shrinks. Both are shown.

What inference costs, at each of batch_sizes: prefill (one forward over a whole prompt of
prefill_tokens, filling the KV caches) and decode (decode_tokens more steps of one token per
sequence), in the cached sampler's own steps, greedy; with the memory the KV caches hold.
Serving (--serve=true): a fixed mix of requests, prompts of 1/16 to 3/8 of block_size and
outputs of 1/32 to 1/2 of it, all waiting at the start, served three ways through serve.py:
one at a time, in static batches of serve_slots (each batch ends with its longest row), and
continuously (a finished row's slot takes the next request at once); greedy, not compiled. It
reports tokens per second, time to first token and time per output token (median and 90th
percentile over the requests), and the bytes the slots' KV caches hold.

Tables go to the terminal, the results to json_out.
"""
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from data.dataset import DataError, load_meta
from model import GPT, KVCache, config_from_dict, sample_next
from parallel import mesh as parallel
from parallel.data_parallel import wrap_ddp
from serving.batching import Request, serve
from tools.common import check_output_file
from training import accounting, runtime
from training.settings import ConfigError, TrainConfig, help_text, parse_config
from training.step import clip_gradients, forward_backward, make_optimizer

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class BenchConfig(TrainConfig):
    vocab_size: int = 0  # of the random tokens; 0: the dataset's if prepared, else 50304
    warmup_steps: int = 3  # untimed iterations per variant first (compilation happens here)
    timed_steps: int = 10  # timed iterations per variant; the median is reported
    dtypes: str = ""  # comma-separated dtypes to time training in; empty: just dtype
    compiles: str = ""  # false,true times training both ways; empty: just compile
    train: bool = True  # run the training benchmark
    sample: bool = True  # run the sampling benchmark (in dtype, never compiled)
    prompt_tokens: int = 1  # length of the random sampling prompt
    max_new_tokens: int = 500  # tokens sampled in the second sampling measurement
    sample_repeats: int = 1  # sample this many times each way; the fastest run counts
    batch_sizes: str = "1,8,32"  # inference cost at these batch sizes; empty: not measured
    prefill_tokens: int = 0  # inference cost: prompt length; 0: half of block_size
    decode_tokens: int = 0  # inference cost: tokens decoded after it; 0: to the block's end
    serve: bool = False  # run the serving benchmark (see above)
    serve_requests: int = 24  # requests in the serving mix
    serve_slots: int = 8  # rows decoded together, in static batches and continuously
    json_out: str = "bench.json"  # where the results are written

    def validate(self):
        super().validate()
        check_output_file("json_out", self.json_out)  # before the benchmark, not after it
        for name in ("timed_steps", "prompt_tokens", "max_new_tokens", "sample_repeats",
                     "serve_requests", "serve_slots"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.vocab_size < 0:
            raise ConfigError("warmup_steps and vocab_size must not be negative")
        if self.prompt_tokens >= self.block_size:
            raise ConfigError(f"prompt_tokens ({self.prompt_tokens}) must be less than "
                              f"block_size ({self.block_size})")
        for dtype in variant_dtypes(self):
            TrainConfig.validate(replace(self, dtype=dtype))
        variant_compiles(self)
        if self.sample and batch_sizes(self):
            prefill, decode = inference_lengths(self)
            if prefill < 1 or decode < 1 or prefill + decode > self.block_size:
                raise ConfigError(f"prefill_tokens ({prefill}) and decode_tokens ({decode}) "
                                  f"must be at least 1 and fit in block_size "
                                  f"({self.block_size}) together")
        return self


def variant_dtypes(cfg):
    return [d.strip() for d in cfg.dtypes.split(",")] if cfg.dtypes else [cfg.dtype]


def variant_compiles(cfg):
    if not cfg.compiles:
        return [cfg.compile]
    words = [c.strip().lower() for c in cfg.compiles.split(",")]
    if not set(words) <= {"true", "false"}:
        raise ConfigError(f"compiles must list true and/or false, got {cfg.compiles!r}")
    return [w == "true" for w in words]


def batch_sizes(cfg):
    try:
        sizes = [int(b) for b in cfg.batch_sizes.split(",") if b.strip()]
    except ValueError:
        sizes = [0]
    if any(b < 1 for b in sizes):
        raise ConfigError(f"batch_sizes must list positive integers, got {cfg.batch_sizes!r}")
    return sizes


def inference_lengths(cfg):
    """(prompt tokens, decoded tokens) of the inference-cost measurement."""
    prefill = cfg.prefill_tokens or cfg.block_size // 2
    return prefill, cfg.decode_tokens or cfg.block_size - prefill


def vocab_size(cfg):
    """(vocabulary, where it came from): the flag, the dataset padded as train.py pads it,
    or GPT-2's padded 50304 when the dataset is not prepared."""
    if cfg.vocab_size:
        return cfg.vocab_size, "vocab_size setting"
    data_dir = cfg.data_dir or str(ROOT / "data" / cfg.dataset)
    try:
        meta = load_meta(data_dir)
    except DataError:
        return 50304, "GPT-2's, padded (no prepared dataset)"
    return accounting.padded_vocab_size(meta["vocab_size"]), os.path.relpath(data_dir)


def sync(device):
    """Wait for queued GPU work, so that a clock reading covers it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(seconds fn took, including the GPU work it queued; its result)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def peak_memory(device):
    """(bytes, what they measure): the CUDA allocator's peak since its last reset, or on
    other devices the largest resident set of the whole process so far."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    import resource  # Unix only, so imported where it is needed
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "max RSS of the whole process"


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
    world_size = layout.dp_size * layout.tp
    parallel.check(cfg, world_size, dtype)
    parallel.spread(model, layout, dtype)
    if cfg.fsdp:
        ctx = contextlib.nullcontext()  # FSDP's own policy casts
    optimizer = make_optimizer(model, cfg)
    model = wrap_ddp(model, layout, device, torch.device(device).index)
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
    world_size = layout.dp_size * layout.tp
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


def bench_sampling(model, prompt, new_tokens, device, ctx, repeats=1):
    """Greedy sampling of new_tokens after prompt, with and without the KV cache: the best
    time of each over repeats runs, taken in turn so that both see the same load.

    same_tokens counts the new tokens the two agree on before their first difference. In
    float32 on a CPU they run the same arithmetic and agree on all (tests/test_model.py checks
    it). On a GPU, or in 16 bits, the cached step and the full forward use different kernels,
    whose rounding can flip a near-tie between two tokens; from there the texts part ways. A
    difference there is rounding, not a wrong cache."""
    t_cached = t_uncached = float("inf")
    with ctx:
        for _ in range(repeats):
            t, cached = timed(lambda: model.generate(prompt, new_tokens, temperature=0),
                              device)
            t_cached = min(t_cached, t)
            t, uncached = timed(
                lambda: model.generate_uncached(prompt, new_tokens, temperature=0), device)
            t_uncached = min(t_uncached, t)
    return dict(new_tokens=new_tokens, cached_tokens_per_s=new_tokens / t_cached,
                uncached_tokens_per_s=new_tokens / t_uncached, speedup=t_uncached / t_cached,
                identical=torch.equal(cached, uncached),
                same_tokens=agreeing(cached, uncached) - prompt.size(1))


def agreeing(a, b):
    """How many positions two sequences (1, T) agree on before their first difference."""
    differ = (a != b).flatten().nonzero()
    return int(differ[0]) if len(differ) else a.size(1)


@torch.no_grad()
def cached_steps(model, idx, caches, steps=1):
    """steps greedy steps of GPT.generate_tokens: the first feeds idx (B, T), which continues
    what the caches hold, each later one the token just chosen. Returns the last, (B, 1)."""
    for _ in range(steps):
        logits = model.lm_head(model.hidden_states(idx, caches)[:, -1, :])
        idx = sample_next(logits, temperature=0)
    return idx


def bench_inference(model, cfg, device, ctx):
    """Prefill and decode throughput, decode latency and KV-cache memory at each batch size:
    the best of sample_repeats runs each. A batch that does not fit in memory ends the list."""
    prefill, decode = inference_lengths(cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    rows = []
    for batch in batch_sizes(cfg):
        prompt = torch.randint(model.config.vocab_size, (batch, prefill), generator=g)
        prompt = prompt.to(device)
        t_prefill = t_decode = float("inf")
        try:
            with ctx:
                for _ in range(cfg.sample_repeats):
                    caches = [KVCache(cfg.block_size) for _ in range(model.config.n_layer)]
                    t, token = timed(lambda: cached_steps(model, prompt, caches), device)
                    t_prefill = min(t_prefill, t)
                    t, _ = timed(lambda: cached_steps(model, token, caches, decode), device)
                    t_decode = min(t_decode, t)
        except torch.OutOfMemoryError:
            print(f"batch {batch}: out of memory; larger batches not measured", flush=True)
            break
        rows.append(dict(batch=batch, prefill_tokens_per_s=batch * prefill / t_prefill,
                         decode_tokens_per_s=batch * decode / t_decode,
                         ms_per_token=t_decode / decode * 1000,
                         # The caches are allocated whole, for block_size positions.
                         kv_cache_bytes=sum(c.k.nbytes + c.v.nbytes for c in caches)))
    return dict(prefill_tokens=prefill, decode_tokens=decode, repeats=cfg.sample_repeats,
                weight_bytes=sum(p.nbytes for p in model.parameters()), rows=rows)


# The serving mix, as fractions of block_size: request i has prompt PROMPTS[i % 4] and output
# OUTPUTS[i % 6], so that long and short rows meet in every batch (at most 7/8 of a block).
SERVE_PROMPTS = (1 / 16, 1 / 4, 1 / 8, 3 / 8)
SERVE_OUTPUTS = (1 / 32, 1 / 2, 3 / 32, 1 / 4, 1 / 16, 3 / 8)


def served(model, mix, slots, static=False):
    """Serve mix, [(prompt ids, new tokens)], all waiting at time 0, slots rows at a time (in
    static batches if static); return (seconds, each request's token times since 0)."""
    times = [[] for _ in mix]
    t0 = time.perf_counter()
    for first in range(0, len(mix), slots if static else len(mix)):
        group = mix[first:first + slots] if static else mix
        requests = [Request(ids, n) for ids, n in group]
        for i, _ in serve(model, requests, slots, temperature=0):  # each token is on the CPU
            times[first + i].append(time.perf_counter() - t0)
    return time.perf_counter() - t0, times


def median_p90(values):
    """The median and the 90th percentile (nearest rank) of values."""
    ordered = sorted(values)
    return statistics.median(ordered), ordered[math.ceil(0.9 * len(ordered)) - 1]


def bench_serving(cfg, model_config, device):
    """The serving mix three ways: one at a time, static batches, continuous batching."""
    dtype = runtime.pick_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    model = GPT(model_config).to(device).eval()
    g = torch.Generator().manual_seed(cfg.seed)
    block, vocab = cfg.block_size, model_config.vocab_size
    mix = [(torch.randint(vocab, (max(1, int(block * SERVE_PROMPTS[i % 4])),),
                          generator=g).tolist(), max(1, int(block * SERVE_OUTPUTS[i % 6])))
           for i in range(cfg.serve_requests)]
    # Each slot holds block_size positions of keys and values in every layer, in the dtype
    # that the forward computes in (autocast's), whatever its row uses.
    per_slot = 2 * model_config.n_layer * block * model_config.n_embd * dtype.itemsize
    ways = [("one at a time", 1, False), ("static batches", cfg.serve_slots, True),
            ("continuous", cfg.serve_slots, False)]
    rows = []
    with runtime.autocast(device, dtype):
        served(model, mix[:2], 2)  # warm-up: first calls pay set-up costs
        for name, slots, static in ways:
            print(f"serving {len(mix)} requests: {name}", flush=True)
            seconds, times = served(model, mix, slots, static)
            firsts = [t[0] for t in times]
            per_token = [(t[-1] - t[0]) / (len(t) - 1) for t in times if len(t) > 1]
            rows.append(dict(way=name, slots=slots, seconds=seconds,
                             tokens_per_s=sum(map(len, times)) / seconds,
                             ttft_s=median_p90(firsts), tpot_s=median_p90(per_token),
                             kv_cache_bytes=slots * per_slot))
    return dict(dtype=str(dtype).removeprefix("torch."), requests=len(mix),
                prompt_tokens=sum(len(ids) for ids, _ in mix),
                new_tokens=sum(n for _, n in mix), rows=rows)


def bench(cfg):
    """Run the benchmarks cfg asks for; return the results as a JSON-ready dict.

    Under torchrun, training is measured as train.py spreads it over the ranks (DDP, FSDP
    with --fsdp=true, TP with --tp=N, or both), with the largest peak memory of any rank;
    sampling is not."""
    rank, _, world_size, device = runtime.setup_distributed(cfg.device, cfg.backend,
                                                            cfg.ddp_timeout)
    if world_size % cfg.tp or cfg.gradient_accumulation_steps % (world_size // cfg.tp):
        raise ConfigError("gradient_accumulation_steps must be divisible by the number of "
                          f"data-parallel ranks ({world_size} processes / tp={cfg.tp})")
    layout = parallel.make_layout(cfg, rank, world_size, device)
    vocab, vocab_source = vocab_size(cfg)
    model_config = config_from_dict({**asdict(cfg), "vocab_size": vocab})
    results = dict(
        machine=dict(device=device, device_name=device_name(device), torch=torch.__version__,
                     threads=torch.get_num_threads(), processes=world_size,
                     parallel=accounting.strategy(cfg, world_size)
                     + (" + activation checkpointing" if cfg.activation_checkpointing else "")),
        settings=asdict(cfg), vocab_size=vocab, vocab_source=vocab_source,
        params=accounting.num_params(model_config, non_embedding=False),
        flops_per_token=accounting.flops_per_token(model_config, cfg.block_size),
        train=None, sample=None, serve=None)
    if cfg.train:
        results["train"] = bench_training(cfg, model_config, device, layout)
    if world_size > 1:
        parallel.release(layout)
        runtime.leave_process_group()
        if rank > 0:
            return None  # rank 0 reports
    if cfg.sample and world_size == 1:
        dtype = runtime.pick_dtype(cfg.dtype, device)
        ctx = runtime.autocast(device, dtype)
        torch.manual_seed(cfg.seed)
        model = GPT(model_config).to(device).eval()
        g = torch.Generator().manual_seed(cfg.seed)
        prompt = torch.randint(vocab, (1, cfg.prompt_tokens), generator=g).to(device)
        bench_sampling(model, prompt, 4, device, ctx)  # warm-up: first calls pay set-up costs
        within = cfg.block_size - cfg.prompt_tokens  # the whole sequence fills one block
        print(f"sampling {within}, then {cfg.max_new_tokens} new tokens, with and without "
              "the KV cache", flush=True)
        results["sample"] = dict(
            dtype=str(dtype).removeprefix("torch."), batch=1, prompt_tokens=cfg.prompt_tokens,
            repeats=cfg.sample_repeats,
            within_block=bench_sampling(model, prompt, within, device, ctx, cfg.sample_repeats),
            requested=bench_sampling(model, prompt, cfg.max_new_tokens, device, ctx,
                                     cfg.sample_repeats),
            inference=bench_inference(model, cfg, device, ctx) if batch_sizes(cfg) else None)
    if cfg.serve and world_size == 1:
        results["serve"] = bench_serving(cfg, model_config, device)
    return results


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            return names[0]
    return platform.processor() or platform.machine()


def tables(results):
    """The results as text tables for the terminal."""
    s, m = results["settings"], results["machine"]
    lines = [f"{m['device']} ({m['device_name']}), {m['threads']} threads, torch {m['torch']}, "
             f"{m['processes']} process(es), parallel: {m['parallel']}",
             f"model: {s['n_layer']} layers, {s['n_head']} heads, {s['n_embd']} wide, block "
             f"{s['block_size']}, vocab {results['vocab_size']} ({results['vocab_source']}), "
             f"{results['params']:,} parameters"]
    if results["train"]:
        first = results["train"][0]
        lines += ["", f"training: {s['batch_size']} x {s['block_size']} tokens x "
                  f"{s['gradient_accumulation_steps']} micro-steps = {first['tokens_per_iter']:,} "
                  f"tokens per iteration; median of {s['timed_steps']} after "
                  f"{s['warmup_steps']} warm-up",
                  f"{'dtype':<10}{'compile':<9}{'warm-up s':>10}{'ms/iter':>9}{'min':>8}"
                  f"{'max':>8}{'tokens/s':>10}{'MFU':>9}{'state MiB':>11}  peak memory"]
        for r in results["train"]:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "unknown"
            lines.append(f"{r['dtype']:<10}{str(r['compile']).lower():<9}{r['warmup_s']:>10.1f}"
                         f"{r['ms_per_iter']:>9.1f}{min(r['ms_per_iter_all']):>8.1f}"
                         f"{max(r['ms_per_iter_all']):>8.1f}{r['tokens_per_s']:>10,.0f}"
                         f"{mfu:>9}{r['state_bytes'] / 2 ** 20:>11,.0f}  "
                         f"{r['peak_memory_bytes'] / 2 ** 20:,.0f} MiB "
                         f"({r['peak_memory_what']})")
    if results["sample"]:
        r = results["sample"]
        lines += ["", f"sampling: greedy, batch 1, prompt {r['prompt_tokens']} token(s), "
                  f"{r['dtype']}, not compiled; best of {r['repeats']} run(s) each way",
                  f"{'':<14}{'new tokens':>11}{'cached tok/s':>14}{'uncached tok/s':>16}"
                  f"{'speed-up':>10}  same tokens"]
        for name, label in (("within_block", "within block"), ("requested", "requested")):
            row = r[name]
            lines.append(f"{label:<14}{row['new_tokens']:>11}{row['cached_tokens_per_s']:>14.1f}"
                         f"{row['uncached_tokens_per_s']:>16.1f}{row['speedup']:>9.1f}x  "
                         + ("all" if row["identical"] else
                            f"the first {row['same_tokens']} (then rounding parts them)"))
    if results["sample"] and results["sample"]["inference"]:
        r, dtype = results["sample"]["inference"], results["sample"]["dtype"]
        lines += ["", f"inference cost: prefill {r['prefill_tokens']} prompt tokens, then decode "
                  f"{r['decode_tokens']} more one at a time; greedy, KV cache, {dtype}; best of "
                  f"{r['repeats']}; weights {r['weight_bytes'] / 2 ** 20:,.1f} MiB",
                  f"{'batch':>6}{'prefill tok/s':>15}{'decode tok/s':>14}{'ms/token':>10}"
                  f"{'KV cache':>12}"]
        for row in r["rows"]:
            lines.append(f"{row['batch']:>6}{row['prefill_tokens_per_s']:>15,.0f}"
                         f"{row['decode_tokens_per_s']:>14,.1f}{row['ms_per_token']:>10.2f}"
                         f"{row['kv_cache_bytes'] / 2 ** 20:>8,.2f} MiB")
    if results["serve"]:
        r = results["serve"]
        lines += ["", f"serving: {r['requests']} requests waiting at once, {r['prompt_tokens']:,} "
                  f"prompt and {r['new_tokens']:,} new tokens; greedy, {r['dtype']}, not compiled",
                  f"{'':<16}{'slots':>6}{'tokens/s':>10}{'first token ms':>18}"
                  f"{'ms per token':>16}{'KV cache':>12}",
                  f"{'':<16}{'':>6}{'':>10}{'median    p90':>18}{'median   p90':>16}"]
        for row in r["rows"]:
            (ttft, ttft90), (tpot, tpot90) = row["ttft_s"], row["tpot_s"]
            lines.append(f"{row['way']:<16}{row['slots']:>6}{row['tokens_per_s']:>10,.1f}"
                         f"{ttft * 1000:>10,.0f}{ttft90 * 1000:>8,.0f}{tpot * 1000:>9,.1f}"
                         f"{tpot90 * 1000:>7,.1f}{row['kv_cache_bytes'] / 2 ** 20:>8,.1f} MiB")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"]):
        own = {f.name for f in fields(BenchConfig)} - {f.name for f in fields(TrainConfig)}
        lines = [line for line in help_text(BenchConfig).splitlines()
                 if line.split("=")[0].strip().removeprefix("--") in own]
        print(__doc__ + "\nBenchmark settings (defaults shown); train.py's settings apply too "
              "(python train.py --help):\n" + "\n".join(lines))
        return 0
    try:
        cfg = parse_config(BenchConfig, argv).validate()
        results = bench(cfg)
    except (ConfigError, runtime.DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if results is None:  # a rank other than 0
        return 0
    print(tables(results))
    with open(cfg.json_out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {cfg.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
