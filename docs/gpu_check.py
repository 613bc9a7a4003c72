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
  mfu       python -m tools.bench on random tokens in GPT-2 124M's shape
            (config/train_gpt2.toml, block 1024), bfloat16, compile=true: tokens/s, and MFU
            against the board's dense peak in accounting.PEAK_FLOPS. Target: 50% or more
            (llm.c reports about 50%).
  char      config/train_shakespeare_char.toml on Tiny Shakespeare, prepared here from the
            shared copy, every evaluation over the whole validation split (eval_iters=0),
            stopped once val_loss <= 1.47. Target: within 60 s of the first iteration, read
            from metrics.jsonl's elapsed_s (evaluations and compilation count in it).
  decode    tools.bench's inference mode in GPT-2's shape, batch 1 and 32, prefill and decode
            apart, eager and then with COMPILED_DECODE's flags. Target: batch-1 decode within
            3x of reading the bfloat16 weights once per token at the board's memory bandwidth.
  tests     pytest's fast tier, -m "not slow or cuda" (the CUDA-only tests too), with
            NANOGPT_SHARED at the shared data; in parallel where pytest-xdist is installed.
  parallel  FSDP and TP: skipped, and said so; they need two GPUs or more.

This page holds the settings, the order of the run and the report. Beside it,
gpu_check_parts.py holds each part: its command, its sizes (on a GPU and in the rehearsal), its
targets and the figures it reads; gpu_check_run.py runs a command under its budget.

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
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# The library, and this script's own pages beside it (also when it is loaded from elsewhere).
sys.path[:0] = [str(ROOT), str(ROOT / "docs")]
from gpu_check_parts import (PARTS, SIZES, TARGET_DECODE, TARGET_LOSS, TARGET_MFU,  # noqa: E402
                             TARGET_SECONDS, part_char, part_decode, part_mfu, part_parallel,
                             part_tests, pytest_command)
from gpu_check_run import Log  # noqa: E402
from training.settings import ConfigError, help_text, parse_config  # noqa: E402


@dataclass
class CheckConfig:
    device: str = "cuda"  # cuda: the real check; cpu: the rehearsal, at tiny sizes
    parts: str = ",".join(PARTS)  # the parts to run; the others are listed as skipped
    out: str = ""  # folder for the log, the JSON and raw files; empty: $OUT
    shared: str = ""  # folder holding data/; empty: $NANOGPT_SHARED, gpu_shared/, ../shared
    budget_mfu: int = 150  # seconds the part may take before it is stopped: bench's training
    budget_char: int = 120  # train.py on the character model; its data preparation, apart
    budget_decode: int = 45  # tools.bench's eager inference
    budget_decode_compiled: int = 60  # tools.bench's inference with COMPILED_DECODE's flags
    budget_tests: int = 110  # pytest
    peak_flops: float = 0.0  # FLOP/s that MFU is measured against; 0: accounting.PEAK_FLOPS's
    bandwidth: float = 0.0  # memory bytes/s of the board; 0: HBM_BANDWIDTH's
    extra_mfu: str = ""  # more flags for bench's training, split as a shell splits them
    extra_char: str = ""  # more flags for train.py
    extra_decode: str = ""  # more flags for both inference runs of tools.bench
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
