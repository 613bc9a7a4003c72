"""What a lent GPU should measure, in one call that fits the loan: the figures of issue 22
(training MFU of GPT-2 124M, the character model's time to a validation loss of 1.47, decode
speed) and the test suite, each part under a time budget of its own, so that a part that hangs
costs its budget and no more.

    python docs/gpu_check.py --out=DIR                # on a CUDA machine
    python docs/gpu_check.py --device=cpu --out=DIR   # the rehearsal: the same steps, tiny sizes

Every line goes to the terminal and to DIR/gpu_check.log. The figures, with the targets beside
them and whether each was met, go to DIR/gpu_check.json, rewritten after each part (a run
killed midway still leaves what it measured), beside the raw files they were read from. DIR is
$OUT when --out is not given: the folder whose files the device tool sends back (8 at most;
this writes 6).

The parts, figures first (only a GPU can produce them; the tests would run anywhere):
  mfu       bench.py on random tokens in GPT-2 124M's shape (config/train_gpt2.toml, block
            1024), bfloat16, compile=true: tokens/s, and MFU against the board's dense peak
            in accounting.PEAK_FLOPS. Target: 50% or more (llm.c reports about 50%).
  char      config/train_shakespeare_char.toml on Tiny Shakespeare, prepared here from the
            shared copy, every evaluation over the whole validation split (eval_iters=0),
            stopped once val_loss <= 1.47. Target: within 60 s of the first iteration, read
            from metrics.jsonl's elapsed_s (evaluations and compilation count in it).
  decode    bench.py's inference mode in GPT-2's shape, batch 1 and 32, prefill and decode
            apart, eager and then with COMPILED_DECODE's flags. Target: batch-1 decode within
            3x of reading the bfloat16 weights once per token at the board's memory bandwidth.
  tests     pytest's fast tier, -m "not slow or cuda" (the CUDA-only tests too), with
            NANOGPT_SHARED at the shared data; in parallel where pytest-xdist is installed.
  parallel  FSDP and TP: skipped, and said so; they need two GPUs or more.

The call for the next session that has a GPU. The device machine does not see ../shared, so a
copy of its data travels in gpu_shared/ (ignored by git, named in carry). Here, in the
repository root, first:

    mkdir -p gpu_shared && cp -rL ../shared/data gpu_shared/

then the device tool's run, with
    command:   PYTHONUNBUFFERED=1 python3 docs/gpu_check.py --shared=gpu_shared
    carry:     ["gpu_shared"]
    timeout_s: 520

The parts' budgets add up to 485 s (the settings below; torch.compile of GPT-2's training step
takes the most of its part). A part that ends early leaves its time unused, and the JSON is
rewritten as each part ends, so a call cut at timeout_s still brings back what was measured.
A call that used every budget would leave about 4 minutes of the 15-minute loan, start-up
included; most parts end well inside theirs, and a second call can run only the parts that
broke, for example --parts=decode,tests.

Without --shared the data is looked for in $NANOGPT_SHARED, then gpu_shared/, then ../shared:
a developer with ../shared beside the checkout runs the script as it is.
"""
import contextlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from training import accounting  # noqa: E402
from training.settings import ConfigError, help_text, parse_config  # noqa: E402

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

# The flags that make bench.py's inference figures those of a compiled decode. Today bench.py
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
        # bench.py's other sampling figures (cached against uncached) are not wanted here: a
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


@dataclass
class CheckConfig:
    device: str = "cuda"  # cuda: the real check; cpu: the rehearsal, at tiny sizes
    parts: str = ",".join(PARTS)  # the parts to run; the others are listed as skipped
    out: str = ""  # folder for the log, the JSON and raw files; empty: $OUT
    shared: str = ""  # folder holding data/; empty: $NANOGPT_SHARED, gpu_shared/, ../shared
    budget_mfu: int = 150  # seconds the part may take before it is stopped: bench.py training
    budget_char: int = 120  # train.py on the character model; its data preparation, apart
    budget_decode: int = 45  # bench.py's eager inference
    budget_decode_compiled: int = 60  # bench.py's inference with COMPILED_DECODE's flags
    budget_tests: int = 110  # pytest
    peak_flops: float = 0.0  # FLOP/s that MFU is measured against; 0: accounting.PEAK_FLOPS's
    bandwidth: float = 0.0  # memory bytes/s of the board; 0: HBM_BANDWIDTH's
    extra_mfu: str = ""  # more flags for bench.py's training, split as a shell splits them
    extra_char: str = ""  # more flags for train.py
    extra_decode: str = ""  # more flags for both inference runs of bench.py
    extra_tests: str = ""  # more flags for pytest

    def validate(self):
        if self.device not in SIZES:
            raise ConfigError(f"device must be cuda or cpu, got {self.device!r}")
        unknown = set(self.wanted()) - set(PARTS)
        if unknown:
            raise ConfigError(f"unknown part(s) {sorted(unknown)}: choose from {PARTS}")
        if not (self.out or os.environ.get("OUT")):
            raise ConfigError("give --out=DIR for the results (or set OUT)")
        return self

    def wanted(self):
        return [p.strip() for p in self.parts.split(",") if p.strip()]


# ----------------------------------------------------------------------------- running parts

class Log:
    """Each line to the terminal and to the log file, as it comes."""

    def __init__(self, path):
        self.file = open(path, "w")
        self.lock = threading.Lock()

    def __call__(self, line):
        with self.lock:
            print(line, flush=True)
            self.file.write(line + "\n")
            self.file.flush()


def run_command(cmd, budget, log, env=None, stop_when=None):
    """Run cmd from the repository root, its output into the log, for at most budget seconds;
    stop_when() (polled each half second) true stops it early. Returns (status, seconds, the
    last line it printed).

    The command gets a process group of its own, and stopping sends SIGTERM to the whole
    group (torch.compile's workers too): train.py then saves and exits, as it would on a
    preempted machine. Whatever is left 20 s later is killed. The group stays in this
    script's session, so that whoever stops the script stops it too."""
    log(f"$ {shlex.join(cmd)}    # budget {budget} s")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            process_group=0)

    last = [""]

    def pump():  # the output into the log, line by line, while the command runs
        for line in proc.stdout:
            log(line.rstrip("\n"))
            last[0] = line.strip() or last[0]

    reader = threading.Thread(target=pump)
    reader.start()
    status = None
    try:
        while proc.poll() is None and status is None:
            if time.time() - t0 > budget:
                status = "timeout"
            elif stop_when is not None and stop_when():
                status = "stopped"
            else:
                time.sleep(0.5)
    finally:  # also when this script is interrupted: nothing of the part runs on
        stop_group(proc)
    reader.join(10)
    seconds = round(time.time() - t0, 1)
    if status is None:
        status = "ok" if proc.returncode == 0 else f"failed (exit code {proc.returncode})"
    log(f"# {status} after {seconds} s")
    return status, seconds, last[0]


def stop_group(proc):
    """SIGTERM to proc's process group if proc still runs, SIGKILL after 20 s; then SIGKILL to
    whatever is left of the group (compile workers)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def extra(text):
    return shlex.split(text)


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def board_of(results, cfg):
    """(device name, PEAK_FLOPS key or None) of the machine a bench.py result ran on."""
    name = results["machine"]["device_name"] if results else "unknown"
    return name, accounting.board(name) if cfg.device == "cuda" else None


# ----------------------------------------------------------------------------- the parts

def mfu_command(cfg, out):
    return [sys.executable, "bench.py", *SIZES[cfg.device]["mfu"], f"--device={cfg.device}",
            "--sample=false", f"--json_out={out}", *extra(cfg.extra_mfu)]


def char_command(cfg, data, out_dir):
    return [sys.executable, "train.py", *SIZES[cfg.device]["char"], f"--device={cfg.device}",
            f"--data_dir={data}", f"--out_dir={out_dir}", "--eval_iters=0",
            *extra(cfg.extra_char)]


def decode_command(cfg, flags, out):
    return [sys.executable, "bench.py", *SIZES[cfg.device]["decode"], f"--device={cfg.device}",
            "--train=false", "--batch_sizes=1,32", "--max_new_tokens=1", *flags,
            f"--json_out={out}", *extra(cfg.extra_decode)]


def part_mfu(cfg, run):
    """GPT-2 124M's training step in bench.py: tokens/s and MFU."""
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
    # MFU: the model's FLOPs per second over the board's peak (bench.py's own figure, where
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
    """Whether bench.py's results say their inference figures are of a compiled decode: a
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
            variant["status"] = ("not measured: bench.py reported no compiled decode (point "
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


# ----------------------------------------------------------------------------- the report

def machine(cfg):
    info = dict(device=cfg.device, torch=torch.__version__, python=sys.version.split()[0],
                cpus=os.cpu_count(), load_average=os.getloadavg())
    if cfg.device == "cuda" and torch.cuda.is_available():
        info.update(device_name=torch.cuda.get_device_name(0),
                    gpus=torch.cuda.device_count())
    if shutil.which("nvidia-smi"):  # reading the card's state; nothing is changed
        query = "name,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"],
                              capture_output=True, text=True)
        info["nvidia_smi"] = proc.stdout.strip()
    return info


def shown(value, fmt):
    return "n/a" if value is None else format(value, fmt)


def figures(name, p):
    """(figure, value, target, met) rows of a part's report."""
    if name == "mfu":
        yield "tokens/s", shown(p["tokens_per_s"], ",.0f"), "", None
        yield "MFU", shown(p["mfu"], ".1%"), f">= {TARGET_MFU:.0%}", p["met"]
    elif name == "char":
        yield (f"s to val loss {p['target_loss']}", shown(p["time_to_target_s"], ".1f"),
               f"<= {TARGET_SECONDS:.0f} s", p["met"])
        yield "  of which training steps, s", shown(p.get("steps_only_s"), ".1f"), "", None
    elif name == "decode":
        for variant in ("eager", "compiled"):
            if not (p.get(variant) or {}).get("rows"):
                yield f"{variant} decode", "n/a", "", None
            for row in (p.get(variant) or {}).get("rows") or []:
                label = f"{variant} batch {row['batch']}"
                prefill, decode = row["prefill_tokens_per_s"], row["decode_tokens_per_s"]
                yield f"{label} prefill tok/s", shown(prefill, ",.0f"), "", None
                yield f"{label} decode tok/s", shown(decode, ",.1f"), "", None
        yield ("batch-1 ms/token (best)", shown(p.get("batch1_ms_per_token"), ".3f"),
               f"<= {shown(p.get('target_ms'), '.3f')} ms", p.get("met"))
    elif name == "tests":  # pytest's last line: "330 passed, 3 failed in 95.12s"
        yield p["outcome"][:34], "", "", None


def summary(parts):
    """The report as a table: one line per figure, with its target and whether it was met."""
    met = {True: "yes", False: "NO", None: "-"}
    lines = [f"{'part':<10}{'figure':<34}{'value':>14}  {'target':<18}met   status"]
    for name, p in parts.items():
        rows = [] if p["status"] == "skipped" else list(figures(name, p))
        for k, (figure, value, target, ok) in enumerate(rows or [("", "", "", None)]):
            status = "" if k else p["status"] + (f": {p['reason']}" if "reason" in p else "")
            lines.append(f"{name:<10}{figure:<34}{value:>14}  {target:<18}{met[ok]:<6}{status}")
    return "\n".join(lines)


@dataclass
class Run:
    out: Path  # results
    scratch: Path  # prepared data and checkpoints, deleted at the end
    shared: Path  # the folder holding data/
    log: Log


def find_shared(cfg):
    """The folder holding data/tinyshakespeare and data/gpt2 that the tests and part char read."""
    choices = [cfg.shared] if cfg.shared else [os.environ.get("NANOGPT_SHARED"),
                                               ROOT / "gpu_shared", ROOT.parent / "shared"]
    for folder in filter(None, choices):
        if (Path(folder) / "data" / "tinyshakespeare" / "input.txt").is_file():
            return Path(folder).resolve()
    raise ConfigError("no shared data: give --shared=DIR, the folder holding "
                      "data/tinyshakespeare/input.txt (mkdir -p gpu_shared && cp -rL "
                      "../shared/data gpu_shared/ makes one that travels)")


PART_FUNCTIONS = dict(mfu=part_mfu, char=part_char, decode=part_decode, tests=part_tests,
                      parallel=part_parallel)


def check(cfg):
    out = Path(cfg.out or os.environ["OUT"]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shared = find_shared(cfg)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda, but CUDA is not available here: rehearse on the CPU "
                          "with --device=cpu")
    log = Log(out / "gpu_check.log")
    # A SIGTERM (a tool's time limit) ends the script as Ctrl-C does: through run_command's
    # finally, which stops the part that is running.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    report = dict(machine=machine(cfg), settings=asdict(cfg),
                  targets=dict(mfu=TARGET_MFU, char_loss=TARGET_LOSS, char_s=TARGET_SECONDS,
                               decode_vs_floor=TARGET_DECODE), parts={})
    log(json.dumps(report["machine"], indent=1))
    with tempfile.TemporaryDirectory() as scratch:
        run = Run(out, Path(scratch), shared, log)
        for name in PARTS:
            if name in cfg.wanted():
                log(f"\n=== {name}")
                report["parts"][name] = PART_FUNCTIONS[name](cfg, run)
                log(summary({name: report["parts"][name]}))
            else:
                report["parts"][name] = dict(status="skipped", reason="not in --parts")
                if name == "tests":  # what would have run
                    report["parts"][name]["command"] = shlex.join(pytest_command(cfg))
            (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    log("\n" + summary(report["parts"]))
    log(f"\nwrote {out / 'gpu_check.json'} and {out / 'gpu_check.log'}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"]):
        print(__doc__ + "\nSettings (defaults shown):\n" + help_text(CheckConfig))
        return 0
    try:
        check(parse_config(CheckConfig, argv).validate())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
