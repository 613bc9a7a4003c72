"""docs/gpu_check.py, the script a lent GPU runs, rehearsed on the CPU at tiny sizes: every
part runs its real command and reports every figure, so that the one call on a GPU is not
where a typo is found. The test suite's own part is not run from inside the test suite; its
command is still reported."""
import importlib
import importlib.util
import json
import subprocess
import sys

import pytest

from helpers import ROOT, quiet_env

SCRIPT = ROOT / "docs" / "gpu_check.py"
CHAR = "config/train_shakespeare_char.toml"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_parts():
    """docs/gpu_check_parts.py, which the script puts on sys.path when it is loaded."""
    load_script()
    return importlib.import_module("gpu_check_parts")


@pytest.mark.slow
def test_the_cpu_rehearsal_reports_every_figure_against_its_target(tmp_path):
    peak, bandwidth = 1e12, 1e10  # stand-ins for a board's: the CPU has none in the tables
    # Budgets far above the seconds each part takes here: a busy machine must not fail this.
    budgets = [f"--budget_{part}=600" for part in ("mfu", "char", "decode", "decode_compiled")]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device=cpu", f"--out={tmp_path}", *budgets,
         "--parts=mfu,char,decode,parallel", f"--peak_flops={peak}", f"--bandwidth={bandwidth}"],
        capture_output=True, text=True, env=quiet_env(), timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = report["parts"]
    assert list(parts) == ["mfu", "char", "decode", "tests", "parallel"]

    mfu = parts["mfu"]
    assert mfu["status"] == "ok" and mfu["tokens_per_s"] > 0
    assert mfu["mfu"] == mfu["tokens_per_s"] * mfu["flops_per_token"] / peak
    assert mfu["met"] == (mfu["mfu"] >= 0.5)

    char = parts["char"]  # stopped at its (rehearsal) target, read from metrics.jsonl
    assert char["status"] == "reached" and char["best_val_loss"] <= char["target_loss"]
    assert 0 < char["steps_only_s"] and 0 < char["time_to_target_s"]
    assert char["iter"] > 0 and char["met"] == (char["time_to_target_s"] <= 60)
    assert (tmp_path / "char_metrics.jsonl").is_file()

    decode = parts["decode"]
    eager = decode["eager"]
    assert eager["status"] == "ok" and [r["batch"] for r in eager["rows"]] == [1, 32]
    for row in eager["rows"]:
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
    # tools.bench measures a compiled decode, or the report says that it did not
    compiled = decode["compiled"]
    assert compiled["rows"] or compiled["status"].startswith("not measured")
    assert decode["floor_ms"] == decode["weight_bytes_bf16"] / bandwidth * 1000
    assert decode["target_ms"] == 3 * decode["floor_ms"]
    assert decode["met"] == (decode["batch1_ms_per_token"] <= decode["target_ms"])

    tests = parts["tests"]
    assert tests["status"] == "skipped" and "-m 'not slow or cuda'" in tests["command"]
    assert parts["parallel"]["status"] == "skipped" and "FSDP" in parts["parallel"]["reason"]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "$ " in log and "-m tools.bench" in log and "train.py" in log  # the commands, as run
    summary = [line.split() for line in log.splitlines()]  # the table at the end
    met = "yes" if mfu["met"] else "NO"
    assert ["mfu", "MFU", f"{mfu['mfu']:.1%}", ">=", "50%", met] in summary


def test_the_gpu_commands_are_valid_settings_of_bench_and_train(tmp_path, monkeypatch):
    # What only the GPU runs, checked here: a typo in a flag would cost a loan.
    from tools.bench.__main__ import BenchConfig
    monkeypatch.chdir(ROOT)  # the commands name config files from the repository root
    from training.settings import TrainConfig, parse_config
    cfg = load_script().CheckConfig(device="cuda", out=str(tmp_path))
    parts = load_parts()
    commands = [(BenchConfig, parts.mfu_command(cfg, "m.json")),
                (TrainConfig, parts.char_command(cfg, "data", "out")),
                *[(BenchConfig, parts.decode_command(cfg, flags, "d.json"))
                  for flags in (["--compile=false"], parts.COMPILED_DECODE)]]
    # The settings come after python and the script, or after python -m and the module.
    assert [cmd[1:3] for _, cmd in commands] == [["-m", "tools.bench"], ["train.py", CHAR],
                                                  ["-m", "tools.bench"], ["-m", "tools.bench"]]
    flags = [cmd[3:] if cmd[1] == "-m" else cmd[2:] for _, cmd in commands]
    for (cls, _), argv in zip(commands, flags):
        assert parse_config(cls, argv).validate().device == "cuda"
    mfu = parse_config(BenchConfig, flags[0])
    assert (mfu.n_layer, mfu.n_head, mfu.n_embd, mfu.block_size, mfu.vocab_size) == (
        12, 12, 768, 1024, 50304)  # GPT-2 124M's shape
    assert mfu.dtype == "bfloat16" and mfu.compile and not mfu.sample
    char = parse_config(TrainConfig, flags[1])
    assert char.eval_iters == 0 and (char.n_layer, char.n_embd, char.block_size) == (6, 384, 256)


def test_time_to_target_starts_at_the_first_iteration_and_steps_exclude_evaluations():
    rows = [dict(iter=0, train_loss=4.2, val_loss=4.2, elapsed_s=3.0),  # evaluation: 3 s
            dict(iter=10, loss=3.0, ms=100.0), dict(iter=20, loss=2.0, ms=200.0),
            dict(iter=20, train_loss=1.9, val_loss=1.5, elapsed_s=9.0),
            dict(iter=30, loss=1.5, ms=100.0), dict(iter=40, loss=1.4, ms=100.0),
            dict(iter=40, train_loss=1.4, val_loss=1.46, elapsed_s=14.0)]
    parts = load_parts()
    # 10 steps of 100 ms, 10 of 200 ms, 20 of 100 ms, to iteration 40
    assert parts.crossing(rows, 1.47) == (11.0, 40, 5.0)
    assert parts.crossing(rows, 1.0) == (None, None, None)


def test_an_unknown_part_is_a_one_line_error(tmp_path, capsys):
    assert load_script().main([f"--out={tmp_path}", "--parts=mfu,fsdp"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown part(s) ['fsdp']")
