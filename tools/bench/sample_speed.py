"""Timing sampling: the KV-cached sampler against the uncached one, and prefill and decode at
each batch size (tools/bench/__main__.py says how)."""
import torch

from model import KVCache, sample_next
from tools.bench.measure import timed
from training.settings import ConfigError


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
def cached_steps(model, idx, cache, steps=1):
    """steps greedy steps of GPT.generate_tokens: the first feeds idx (B, T), which continues
    what the cache holds, each later one the token just chosen. Returns the last, (B, 1)."""
    for _ in range(steps):
        logits = model.lm_head(model.hidden_states(idx, cache)[:, -1, :])
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
                    cache = KVCache(model.config.n_layer, cfg.block_size)
                    t, token = timed(lambda: cached_steps(model, prompt, cache), device)
                    t_prefill = min(t_prefill, t)
                    t, _ = timed(lambda: cached_steps(model, token, cache, decode), device)
                    t_decode = min(t_decode, t)
        except torch.OutOfMemoryError:
            print(f"batch {batch}: out of memory; larger batches not measured", flush=True)
            break
        rows.append(dict(batch=batch, prefill_tokens_per_s=batch * prefill / t_prefill,
                         decode_tokens_per_s=batch * decode / t_decode,
                         ms_per_token=t_decode / decode * 1000,
                         # The caches are allocated whole, for block_size positions.
                         kv_cache_bytes=sum(t.nbytes for t in cache.k + cache.v)))
    return dict(prefill_tokens=prefill, decode_tokens=decode, repeats=cfg.sample_repeats,
                weight_bytes=sum(p.nbytes for p in model.parameters()), rows=rows)
