"""Timing serving: a fixed mix of requests served one at a time, in static batches and
continuously (tools/bench/__main__.py says how)."""
import math
import statistics
import time

import torch

from model import GPT
from serving.batching import Request, serve
from training import runtime


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
