"""The parts of docs/gpu_check.py: what each one runs, at which sizes, and the figures it reads
from what its command wrote, each beside its target."""
import importlib.util
import json
import os
import shlex
import shutil
import statistics
import sys
from pathlib import Path

import torch

from gpu_check_run import extra, read_json, run_command
from training import accounting

PARTS = ("mfu", "char", "decode", "tests", "parallel")
TARGET_MFU = 0.5
TARGET_LOSS, TARGET_SECONDS = 1.47, 60.0
TARGET_DECODE = 3.0  # batch-1 decode: at most this many times the weight-reading floor

# Memory bandwidth in bytes/s, by accounting.PEAK_FLOPS's board names, from the same
# datasheets; the A100's is the 80 GB SXM board's.
HBM_BANDWIDTH = {"A100": 2.039e12, "A100 PCIe": 1.935e12, "H100": 3.35e12, "H100 PCIe": 2.0e12,
                 "H100 NVL": 3.9e12, "H200": 4.8e12, "H200 NVL": 4.8e12, "L4": 0.3e12,
                 "L40": 0.864e12, "L40S": 0.864e12, "RTX 4090": 1.008e12, "A10G": 0.6e12,
                 "V100": 0.9e12, "T4": 0.32e12}

# The flags that make tools.bench's inference figures those of a compiled decode. Today tools.bench
# never compiles its sampling, and says nothing of compilation in its results: the compiled
# figures are then reported as not measured (see compiled_decode). When the compiled
# static-cache decode of the many-prompts issue lands, point these at its option.
COMPILED_DECODE = ["--compile=true"]

# The commands run from the repository root.
GPT2_SHAPE = ["config/train_gpt2.toml", "--vocab_size=50304"]
CHAR_CONFIG = "config/train_shakespeare_char.toml"
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32"]
# Each part's flags: the real sizes on a GPU; on a CPU the same commands at tiny sizes (of two
# flags for one setting, the later wins).
SIZES = {
    "cuda": dict(
        mfu=[*GPT2_SHAPE, "--dtype=bfloat16", "--compile=true", "--batch_size=12",
             "--gradient_accumulation_steps=4", "--warmup_steps=3", "--timed_steps=20"],
        char=[CHAR_CONFIG],
        # tools.bench's other sampling figures (cached against uncached) are not wanted here: a
        # prompt that nearly fills the block leaves them 2 tokens to time
        decode=[*GPT2_SHAPE, "--dtype=bfloat16", "--prompt_tokens=1022", "--prefill_tokens=512",
                "--decode_tokens=256", "--sample_repeats=3"],
        char_chars=None, target_loss=TARGET_LOSS),
    "cpu": dict(
        mfu=[*GPT2_SHAPE, *TINY, "--vocab_size=256", "--dtype=float32", "--compile=false",
             "--batch_size=4", "--gradient_accumulation_steps=2", "--warmup_steps=1",
             "--timed_steps=3"],
        char=[CHAR_CONFIG, *TINY, "--batch_size=16", "--dropout=0", "--dtype=float32",
              "--compile=false", "--eval_interval=10", "--log_interval=5", "--warmup_iters=5",
              "--max_iters=200", "--lr_decay_iters=200", "--learning_rate=3e-3"],
        decode=[*GPT2_SHAPE, *TINY, "--vocab_size=256", "--dtype=float32", "--prompt_tokens=30",
                "--prefill_tokens=16", "--decode_tokens=8", "--sample_repeats=1"],
        # 2% of the text, so that whole-split evaluations take a moment on a CPU; and a loss
        # that a tiny model reaches in a few dozen steps
        char_chars=20_000, target_loss=3.5),
}


def board_of(results, cfg):
    """(device name, PEAK_FLOPS key or None) of the machine a tools.bench result ran on."""
    name = results["machine"]["device_name"] if results else "unknown"
    return name, accounting.board(name) if cfg.device == "cuda" else None


# ----------------------------------------------------------------------------- the parts

def mfu_command(cfg, out):
    return [sys.executable, "-m", "tools.bench", *SIZES[cfg.device]["mfu"],
            f"--device={cfg.device}", "--sample=false", f"--json_out={out}",
            *extra(cfg.extra_mfu)]


def char_command(cfg, data, out_dir):
    return [sys.executable, "train.py", *SIZES[cfg.device]["char"], f"--device={cfg.device}",
            f"--data_dir={data}", f"--out_dir={out_dir}", "--eval_iters=0",
            *extra(cfg.extra_char)]


def decode_command(cfg, flags, out):
    return [sys.executable, "-m", "tools.bench", *SIZES[cfg.device]["decode"],
            f"--device={cfg.device}", "--train=false", "--batch_sizes=1,32", "--max_new_tokens=1",
            *flags, f"--json_out={out}", *extra(cfg.extra_decode)]


def part_mfu(cfg, run):
    """GPT-2 124M's training step in tools.bench: tokens/s and MFU."""
    out = run.out / "bench_mfu.json"
    out.unlink(missing_ok=True)  # a file left by an earlier run must not pass for this one's
    cmd = mfu_command(cfg, out)
    status, seconds, _ = run_command(cmd, cfg.budget_mfu, run.log)
    part = dict(status=status, seconds=seconds, command=shlex.join(cmd), target=TARGET_MFU)
    results = read_json(out)
    if not results or not results.get("train"):
        return dict(part, tokens_per_s=None, mfu=None, met=None)
    train = results["train"][0]
    peak = cfg.peak_flops or train["peak_flops"]
    # MFU: the model's FLOPs per second over the board's peak (tools.bench's own figure, where
    # the board is in PEAK_FLOPS; computed the same way here where --peak_flops names it).
    mfu = train["tokens_per_s"] * results["flops_per_token"] / peak if peak else None
    return dict(part, device_name=board_of(results, cfg)[0], dtype=train["dtype"],
                compile=train["compile"], params=results["params"],
                flops_per_token=results["flops_per_token"],
                tokens_per_iter=train["tokens_per_iter"], ms_per_iter=train["ms_per_iter"],
                warmup_s=train["warmup_s"], tokens_per_s=train["tokens_per_s"],
                peak_flops=peak, mfu=mfu, met=None if mfu is None else mfu >= TARGET_MFU)


def crossing(rows, target):
    """From metrics.jsonl's rows: (seconds from the first iteration to the first evaluation
    with val_loss <= target, its iteration, seconds of training steps alone to it), or Nones.

    elapsed_s counts from before the evaluation at iteration 0, so that evaluation's time is
    taken off. The steps' time alone adds each training row's ms over the iterations it
    covers: it leaves out the evaluations and checkpoints, which the rows' ms leave out."""
    evals = [r for r in rows if "val_loss" in r]
    start = next((r["elapsed_s"] for r in evals if r["iter"] == 0), 0.0)
    hit = next((r for r in evals if r["val_loss"] <= target), None)
    if hit is None:
        return None, None, None
    steps_ms, last = 0.0, 0
    for r in rows:
        if "ms" in r and r["iter"] <= hit["iter"]:
            steps_ms, last = steps_ms + r["ms"] * (r["iter"] - last), r["iter"]
    return round(hit["elapsed_s"] - start, 2), hit["iter"], round(steps_ms / 1000, 2)


def metrics_rows(path):
    """metrics.jsonl's complete rows so far (a line being written is left for later)."""
    try:
        lines = Path(path).read_text().splitlines(keepends=True)
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.endswith("\n")]


def part_char(cfg, run):
    """The character model, from prepared data to the first evaluation at the target loss."""
    size, scratch = SIZES[cfg.device], run.scratch
    text = run.shared / "data" / "tinyshakespeare" / "input.txt"
    if size["char_chars"]:  # the rehearsal trains on a prefix: quick whole-split evaluations
        (scratch / "input.txt").write_text(text.read_text()[:size["char_chars"]])
        text = scratch / "input.txt"
    data, out_dir = scratch / "shakespeare_char", scratch / "char"
    prepare = [sys.executable, "data/shakespeare_char/prepare.py", f"--input={text}",
               f"--out_dir={data}"]
    status, _, _ = run_command(prepare, cfg.budget_char, run.log)  # seconds; guards a hang
    target = size["target_loss"]
    cmd = char_command(cfg, data, out_dir)
    part = dict(command=shlex.join(cmd), target_loss=target, target_s=TARGET_SECONDS)
    if status != "ok":
        return dict(part, status=f"data preparation {status}", time_to_target_s=None, met=None)
    metrics = out_dir / "metrics.jsonl"
    reached = lambda: crossing(metrics_rows(metrics), target)[0] is not None  # noqa: E731
    status, seconds, _ = run_command(cmd, cfg.budget_char, run.log, stop_when=reached)
    if metrics.exists():
        shutil.copy(metrics, run.out / "char_metrics.jsonl")
    rows = metrics_rows(metrics)
    to_target, at_iter, steps_s = crossing(rows, target)
    evals = [r for r in rows if "val_loss" in r]
    steps = [r["ms"] for r in rows if "ms" in r]
    return dict(part, status="reached" if at_iter is not None else status, seconds=seconds,
                time_to_target_s=to_target, iter=at_iter, steps_only_s=steps_s,
                best_val_loss=min((r["val_loss"] for r in evals), default=None),
                last_iter=max((r["iter"] for r in rows), default=None),
                median_ms_per_iter=statistics.median(steps) if steps else None,
                met=None if to_target is None else to_target <= TARGET_SECONDS)


def compiled_decode(results):
    """Whether tools.bench's results say their inference figures are of a compiled decode: a
    "compile" entry in results["sample"] or its "inference" that is true."""
    sample = (results or {}).get("sample") or {}
    return bool(sample.get("compile") or (sample.get("inference") or {}).get("compile"))


def part_decode(cfg, run):
    """Prefill and decode speed at batch 1 and 32, eager then compiled, against the floor of
    reading every bfloat16 weight once per decoded token."""
    variants, floor = {}, None
    for name, flags, budget in (("eager", ["--compile=false"], cfg.budget_decode),
                                ("compiled", COMPILED_DECODE, cfg.budget_decode_compiled)):
        out = run.out / f"bench_decode_{name}.json"
        out.unlink(missing_ok=True)
        cmd = decode_command(cfg, flags, out)
        status, seconds, _ = run_command(cmd, budget, run.log)
        results = read_json(out)
        variant = dict(status=status, seconds=seconds, command=shlex.join(cmd), rows=None)
        if name == "compiled" and results and not compiled_decode(results):
            variant["status"] = ("not measured: tools.bench reported no compiled decode (point "
                                 "COMPILED_DECODE at its option)")
        elif results and results.get("sample"):
            inference = results["sample"]["inference"]
            variant.update(prefill_tokens=inference["prefill_tokens"],
                           decode_tokens=inference["decode_tokens"],
                           rows=[{k: row[k] for k in ("batch", "prefill_tokens_per_s",
                                                      "decode_tokens_per_s", "ms_per_token")}
                                 for row in inference["rows"]])
        if results and floor is None:
            name_, key = board_of(results, cfg)
            bandwidth = cfg.bandwidth or HBM_BANDWIDTH.get(key)
            weight_bytes = results["params"] * 2  # bfloat16
            floor = dict(device_name=name_, weight_bytes_bf16=weight_bytes, bandwidth=bandwidth,
                         floor_ms=weight_bytes / bandwidth * 1000 if bandwidth else None)
        variants[name] = variant
    floor = floor or dict(floor_ms=None)
    batch1 = [row["ms_per_token"] for v in variants.values() for row in v["rows"] or []
              if row["batch"] == 1]
    best = min(batch1, default=None)
    target = TARGET_DECODE * floor["floor_ms"] if floor["floor_ms"] else None
    status = "; ".join(f"{name}: {v['status']}" for name, v in variants.items()
                       if v["status"] != "ok")
    return dict(status=status or "ok", **floor, target_ms=target,
                batch1_ms_per_token=best, **variants,
                met=None if best is None or target is None else best <= target)


def pytest_command(cfg):
    """The fast tier, with a per-test hang guard and in parallel where the plugins exist."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "not slow or cuda", "--durations=25"]
    if importlib.util.find_spec("xdist"):
        cmd += ["-n", str(min(12, os.cpu_count() or 1))]
    if importlib.util.find_spec("pytest_timeout"):
        cmd += ["--timeout=120"]
    return cmd + extra(cfg.extra_tests)


def part_tests(cfg, run):
    cmd = pytest_command(cfg)
    # One thread per torch process: the workers share the cores.
    env = {"NANOGPT_SHARED": str(run.shared), "OMP_NUM_THREADS": "1"}
    status, seconds, outcome = run_command(cmd, cfg.budget_tests, run.log, env=env)
    return dict(status="passed" if status == "ok" else status, seconds=seconds,
                outcome=outcome, command=shlex.join(cmd), nanogpt_shared=str(run.shared))


def part_parallel(cfg, run):
    gpus = torch.cuda.device_count() if cfg.device == "cuda" else 0
    return dict(status="skipped", reason=f"FSDP and TP need two GPUs or more; this machine "
                f"has {gpus}, and the loan gives one")

