"""Measure training and sampling speed on random tokens: no dataset needed.

    python -m tools.bench config/train_shakespeare_char_cpu.toml --dtypes=float32,bfloat16
    python -m tools.bench config/train_shakespeare_char.toml --train=false --batch_sizes=1,8,32,128

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
outputs of 1/32 to 1/2 of it, all waiting at the start, served three ways through
serving/batching.py: one at a time, in static batches of serve_slots (each batch ends with its
longest row), and continuously (a finished row's slot takes the next request at once); greedy,
not compiled. It reports tokens per second, time to first token and time per output token
(median and 90th percentile over the requests), and the bytes the slots' KV caches hold.

The paged engine (--paged=true): two workloads of paged_requests requests, all waiting at the
start (serve_speed.py: a shared system prompt, 75% of each prompt; mixed lengths, most short,
every 8th near block_size), each served by today's slots (paged_slots of them) and by
serving/engine.py in the same KV memory: on the first without and with prefix reuse, on the
second without and with chunked prefill. Greedy, float32. It reports tokens per second, time
to first token (of every request, and of the short ones), time per output token, the KV
memory reserved and used at peak, the rows in flight at peak and the prompt tokens computed.

Pipeline (--pp=N under torchrun): training is timed as train.py runs it, and with
--pp_sleep_ms=F the stages sleep a known time instead of computing, so that the schedule's
bubble shows as it would on GPUs (pipeline_speed.py): GPipe and 1F1B for each m in
pp_microbatches, nothing else measured.

Tables go to the terminal, the results to json_out.
"""
import json
import os
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from data.dataset import DataError, load_meta
from model import GPT, config_from_dict
from parallel import mesh as parallel
from tools.bench.pipeline_speed import bench_bubble, bubble_table
from tools.bench.sample_speed import (batch_sizes, bench_inference, bench_sampling,
                                      inference_lengths)
from tools.bench.serve_speed import bench_paged, bench_serving
from tools.bench.tables import device_name, tables
from tools.bench.train_speed import bench_training, variant_compiles, variant_dtypes
from tools.common import check_output_file
from training import accounting, runtime
from training.startup import check_divisible
from training.settings import ConfigError, TrainConfig, help_text, parse_config

ROOT = Path(__file__).resolve().parents[2]


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
    paged: bool = False  # run the paged engine's two workloads (see above)
    paged_requests: int = 64  # requests in each of the paged workloads
    paged_slots: int = 8  # today's slots; the engine gets their KV memory in pages
    page_size: int = 16  # tokens per page of the engine's KV cache
    prefill_chunk: int = 0  # prompt tokens prefilled per step, chunked; 0: block_size / 8
    paged_repeats: int = 1  # the ways take turns this many times; medians are reported
    pp_sleep_ms: float = 0.0  # >0: time the pipeline's schedules with stages that sleep
    pp_microbatches: str = "1,4,8"  # with pp_sleep_ms: the micro-batches per step to time
    json_out: str = "bench.json"  # where the results are written

    def validate(self):
        super().validate()
        check_output_file("json_out", self.json_out)  # before the benchmark, not after it
        for name in ("timed_steps", "prompt_tokens", "max_new_tokens", "sample_repeats",
                     "serve_requests", "serve_slots", "paged_requests", "paged_slots",
                     "page_size", "paged_repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.vocab_size < 0 or self.prefill_chunk < 0:
            raise ConfigError("warmup_steps, vocab_size and prefill_chunk must not be negative")
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


def bench(cfg):
    """Run the benchmarks cfg asks for; return the results as a JSON-ready dict.

    Under torchrun, training is measured as train.py spreads it over the ranks (DDP, FSDP
    with --fsdp=true, TP with --tp=N, PP with --pp=N, or several), with the largest peak
    memory of any rank; sampling is not."""
    rank, _, world_size, device = runtime.setup_distributed(cfg.device, cfg.backend,
                                                            cfg.ddp_timeout)
    if cfg.pp_sleep_ms and (world_size != cfg.pp or "RANK" not in os.environ):
        raise ConfigError(f"pp_sleep_ms times a pipeline alone, on pp={cfg.pp} processes: "
                          f"torchrun --standalone --nproc_per_node={cfg.pp} -m tools.bench ...")
    layout = parallel.make_layout(cfg, rank, world_size, device)  # refuses a split that cannot run
    check_divisible(cfg, world_size)  # as train.py refuses it
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
        train=None, sample=None, serve=None, paged=None, bubble=None)
    if cfg.pp_sleep_ms:
        microbatches = [int(m) for m in cfg.pp_microbatches.split(",")]
        results["bubble"] = bench_bubble(cfg, layout, device, microbatches)
    elif cfg.train:
        results["train"] = bench_training(cfg, model_config, device, layout)
    if world_size > 1:
        parallel.release(layout)
        runtime.leave_process_group()
        if rank > 0:
            return None  # rank 0 reports
    if cfg.sample and world_size == 1 and not cfg.pp_sleep_ms:
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
    if cfg.paged and world_size == 1:
        results["paged"] = bench_paged(cfg, model_config, device)
    return results


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
    if results["bubble"]:
        print("\n" + bubble_table(results["bubble"], cfg.pp_sleep_ms))
    with open(cfg.json_out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {cfg.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
