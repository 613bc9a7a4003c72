"""Timing serving: a fixed mix of requests served one at a time, in static batches and
continuously; and the paged engine's two workloads against today's slots (tools/bench/__main__.py
says how)."""
import collections
import statistics
import time

import torch

from model import GPT
from serving.batching import Request, serve
from serving.engine import Engine, Stats
from tools.common import percentile
from training import accounting, runtime


# The serving mix, as fractions of block_size: request i has prompt PROMPTS[i % 4] and output
# OUTPUTS[i % 6], so that long and short rows meet in every batch (at most 7/8 of a block).
SERVE_PROMPTS = (1 / 16, 1 / 4, 1 / 8, 3 / 8)
SERVE_OUTPUTS = (1 / 32, 1 / 2, 3 / 32, 1 / 4, 1 / 16, 3 / 8)


def served(model, mix, slots, static=False):
    """Serve mix, [(prompt ids, new tokens)], all waiting at time 0, slots rows at a time (in
    static batches if static); return (seconds, {request: its token times since 0})."""
    def tokens():
        for first in range(0, len(mix), slots if static else len(mix)):
            group = mix[first:first + slots] if static else mix
            requests = [Request(ids, n) for ids, n in group]
            for i, token in serve(model, requests, slots, temperature=0):
                yield first + i, token
    return token_times(tokens())


def token_times(tokens):
    """(seconds, {request: its token times since the start}) of a run yielding (request,
    token), each token already on the CPU."""
    times = collections.defaultdict(list)
    t0 = time.perf_counter()
    for i, _ in tokens:
        times[i].append(time.perf_counter() - t0)
    return time.perf_counter() - t0, times


def latencies(seconds, times):
    """A run's tokens a second, and the median and p90 of its requests' first-token times and
    of their times per token after the first."""
    per_token = [(t[-1] - t[0]) / (len(t) - 1) for t in times.values() if len(t) > 1]
    return dict(tokens_per_s=sum(map(len, times.values())) / seconds,
                ttft_s=median_p90([t[0] for t in times.values()]),
                tpot_s=median_p90(per_token or [0.0]))


def median_p90(values):
    """The median and the 90th percentile (nearest rank) of values."""
    return statistics.median(values), percentile(values, 90)


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
    per_slot = accounting.kv_cache_bytes(model_config, block, dtype.itemsize)
    ways = [("one at a time", 1, False), ("static batches", cfg.serve_slots, True),
            ("continuous", cfg.serve_slots, False)]
    rows = []
    with runtime.autocast(device, dtype):
        served(model, mix[:2], 2)  # warm-up: first calls pay set-up costs
        for name, slots, static in ways:
            print(f"serving {len(mix)} requests: {name}", flush=True)
            seconds, times = served(model, mix, slots, static)
            rows.append(dict(way=name, slots=slots, seconds=seconds,
                             **latencies(seconds, times), kv_cache_bytes=slots * per_slot))
    return dict(dtype=str(dtype).removeprefix("torch."), requests=len(mix),
                prompt_tokens=sum(len(ids) for ids, _ in mix),
                new_tokens=sum(n for _, n in mix), rows=rows)


# The paged engine's two workloads (--paged=true), as fractions of block_size, served by today's
# slots and by the engine at the same KV memory (paged_slots * block_size tokens):
# 1. a shared system prompt of 3/8 of the block, then a request's own 1/16 to 3/16: the shared
#    part is 75% of a prompt on average;
# 2. mixed lengths: 7 of 8 prompts short (1/32 to 1/16), every 8th near the block (7/8).
# Outputs of 1/32 to 1/8 of the block, or until <|endoftext|> (the last token id here).
SYSTEM, OWN = 3 / 8, (1 / 16, 1 / 8, 3 / 16, 1 / 8)
SHORT, LONG = (1 / 32, 1 / 16, 3 / 64), 7 / 8
PAGED_OUTPUTS = (1 / 32, 1 / 8, 1 / 16, 3 / 32)


def workloads(cfg, vocab):
    """{name: [(prompt ids, new tokens)]} of the two workloads."""
    g = torch.Generator().manual_seed(cfg.seed)
    n, block = cfg.paged_requests, cfg.block_size

    def ids(fraction):
        return torch.randint(vocab - 1, (max(1, int(block * fraction)),), generator=g).tolist()

    out = [max(1, int(block * PAGED_OUTPUTS[i % 4])) for i in range(n)]
    system = ids(SYSTEM)
    shared = [(system + ids(OWN[i % 4]), out[i]) for i in range(n)]
    mixed = [(ids(LONG if i % 8 == 7 else SHORT[i % 3]), out[i]) for i in range(n)]
    return {"shared system prompt": shared, "mixed lengths": mixed}


def one_way(model, mix, way, cfg, eot):
    """Serve mix one way; its measures (the bench's table row)."""
    m, block = model.config, cfg.block_size
    slots, chunk = cfg.paged_slots, cfg.prefill_chunk or block // 8
    requests = [Request(ids, n) for ids, n in mix]
    if way == "slots":
        stats = Stats()
        seconds, times = token_times(serve(model, requests, slots, temperature=0, eot=eot,
                                           stats=stats))
        reserved, used = slots * block, stats.peak_tokens
    else:
        pages = slots * block // cfg.page_size  # the slots' memory
        engine = Engine(model, requests, len(requests), cfg.page_size, pages,
                        chunk if "chunked" in way else None, temperature=0, eot=eot,
                        prefix_reuse="reuse" in way)
        seconds, times = token_times(engine.run())
        stats = engine.stats
        reserved, used = pages * cfg.page_size, stats.peak_pages * cfg.page_size
    per_token = accounting.kv_cache_bytes(m, 1, next(model.parameters()).dtype.itemsize)
    shorts = [times[i][0] for i, (ids, _) in enumerate(mix) if i in times and len(ids) < block / 2]
    return dict(way=way, seconds=seconds, **latencies(seconds, times),
                short_ttft_s=median_p90(shorts or [0.0]),
                kv_reserved_bytes=reserved * per_token, kv_used_bytes=used * per_token,
                peak_rows=stats.peak_rows, prefill_tokens=stats.prefill_tokens,
                preemptions=stats.preemptions)


def bench_paged(cfg, model_config, device):
    """The two workloads, today's slots against the engine (with and without prefix reuse on
    the first, with and without chunked prefill on the second), the ways taking turns
    paged_repeats times; each measure is the median over the repeats."""
    torch.manual_seed(cfg.seed)
    model = GPT(model_config).to(device).eval()  # float32: the exact setting
    eot = model_config.vocab_size - 1
    ways = {"shared system prompt": ("slots", "paged", "paged + reuse"),
            "mixed lengths": ("slots", "paged", "paged + chunked")}
    results = {}
    for name, mix in workloads(cfg, model_config.vocab_size).items():
        runs = collections.defaultdict(list)
        for _ in range(cfg.paged_repeats):
            for way in ways[name]:
                runs[way].append(one_way(model, mix, way, cfg, eot))
                print(f"{name}: {len(mix)} requests, {way}: {runs[way][-1]['seconds']:.1f} s",
                      flush=True)
        rows = [{key: way if key == "way" else median_each([m[key] for m in measured])
                 for key in measured[0]} for way, measured in runs.items()]
        results[name] = dict(requests=len(mix), prompt_tokens=sum(len(i) for i, _ in mix),
                             rows=rows)
    return dict(page_size=cfg.page_size, prefill_chunk=cfg.prefill_chunk or cfg.block_size // 8,
                slots=cfg.paged_slots, repeats=cfg.paged_repeats, workloads=results)


def median_each(values):
    """The median of numbers, or of pairs taken element by element."""
    if isinstance(values[0], tuple):
        return tuple(statistics.median(v) for v in zip(*values))
    return statistics.median(values)
