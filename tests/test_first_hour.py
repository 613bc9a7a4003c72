"""What a newcomer meets first and what a bad day brings: flags refine the default run, a
resumed run keeps its own settings, stops are quick and keep the best model, one out_dir serves
one run, and errors are one line. (The documented commands: tests/test_docs_commands.py.)"""
import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

import train
from helpers import TINY as TINY_FLAGS
from helpers import ROOT, TORCHRUN, quiet_env, read_metrics, run_train, train_cmd
from training import startup
from training.checkpoint import save_checkpoint
from training.safe_load import CheckpointError, load_checkpoint
from training.settings import TrainConfig, parse_config
from training.stopping import STOPPED

CPU_RECIPE = ROOT / "config" / "train_shakespeare_char_cpu.toml"


def test_flags_refine_the_default_run_and_help_shows_its_values(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seen = []
    monkeypatch.setattr(train, "train", lambda cfg, named, signals: seen.append((cfg, named)))
    assert train.main(["--max_iters=20"]) == 0
    cfg, named = seen[0]
    assert cfg == parse_config(TrainConfig, [str(CPU_RECIPE), "--max_iters=20",
                                             "--lr_decay_iters=20"])  # the schedule follows
    assert cfg.n_layer == 4 and cfg.block_size == 64
    assert named == {"max_iters", "lr_decay_iters"}
    assert train.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "--n_layer=4 " in text and "--out_dir=out-shakespeare-char " in text


@pytest.mark.parametrize("args, lr_decay_iters", [
    (["--max_iters=200"], 200),  # the CPU recipe's 700 would never cool down
    (["--max_iters=200", "--lr_decay_iters=150"], 150),  # named: kept
    ([str(ROOT / "config" / "train_gpt2.toml"), "--max_iters=5000"], 5000),
    ([str(ROOT / "config" / "train_gpt2.toml")], 600000)])  # no flag: the file's own
def test_a_max_iters_flag_moves_the_end_of_the_schedule(monkeypatch, args, lr_decay_iters):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seen = []
    monkeypatch.setattr(train, "train", lambda cfg, named, signals: seen.append((cfg, named)))
    monkeypatch.setattr(startup, "out_dir_lock", lambda out_dir: contextlib.nullcontext())
    assert train.main(args) == 0
    cfg, named = seen[0]
    assert cfg.lr_decay_iters == lr_decay_iters
    assert "lr_decay_iters" in named  # so that a resumed run takes it from this command


@pytest.mark.slow
def test_a_resumed_run_keeps_its_settings_and_says_when_its_schedule_has_ended(char_data,
                                                                               tmp_path):
    out = tmp_path / "out"
    run_train(["--max_iters=2", "--eval_interval=2", "--n_layer=3"], char_data, out)

    def resume(*flags):  # no shape or data flags: the run's own come from its checkpoint
        return subprocess.run([sys.executable, str(ROOT / "train.py"), "--init_from=resume",
                               f"--out_dir={out}", "--eval_interval=100", *flags],
                              capture_output=True, text=True, env=quiet_env(), cwd=tmp_path)
    proc = resume("--max_iters=24")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] == 24 and ckpt["model_args"]["n_layer"] == 3
    assert ckpt["config"]["data_dir"] == str(char_data)
    assert "schedule ended" not in proc.stderr
    # --max_iters alone moves the end of the schedule (lr_decay_iters, 20 here) with it
    proc = resume("--max_iters=30")
    assert proc.returncode == 0 and "schedule ends at iteration 30" in proc.stdout
    assert load_checkpoint(out / "ckpt.pt")["config"]["lr_decay_iters"] == 30
    proc = resume("--max_iters=34", "--lr_decay_iters=30")  # a schedule that has ended
    assert proc.returncode == 0 and "the learning-rate schedule ended at iteration 30" in (
        proc.stderr)
    proc = resume("--max_iters=36", "--n_layer=2")  # a flag that contradicts the checkpoint
    assert proc.returncode == 2 and "has n_layer=3 but the config says 2" in proc.stderr


@pytest.mark.slow
def test_a_run_ends_with_the_whole_split_loss_and_eval_only_reads_the_checkpoint(char_data,
                                                                                 tmp_path):
    out = tmp_path / "out"
    rows = run_train(["--max_iters=4", "--eval_interval=4"], char_data, out)
    before, whole = len(rows), rows[-1]["whole_val_loss"]
    # --eval_only without --init_from evaluates the run's checkpoint, and only adds to the log
    rows = run_train(["--eval_only", "--eval_iters=0"], char_data, out)
    assert len(rows) == before + 1 and rows[-1]["val_loss"] == pytest.approx(whole, abs=1e-6)
    proc = run_train(["--eval_only"], char_data, tmp_path / "empty", expect_ok=False)
    assert proc.returncode == 2 and "holds no checkpoint" in proc.stderr


def start(args, char_data, out):
    return subprocess.Popen(train_cmd(args, char_data, out), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=quiet_env())


def wait_for_rows(out, n, proc):
    deadline = time.time() + 600  # a hang guard
    while True:
        try:
            if len(read_metrics(out)) >= n:
                return
        except (FileNotFoundError, ValueError):
            pass
        assert time.time() < deadline and proc.poll() is None, "the run did not get going"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_stop_keeps_the_best_model_and_resumes_from_where_it_stopped(char_data, tmp_path):
    out = tmp_path / "out"
    # The best model is the one evaluated at iteration 0, the only evaluation before the stop.
    args = ["--max_iters=400", "--eval_interval=1000", "--always_save_checkpoint=false"]
    proc = start(args, char_data, out)
    wait_for_rows(out, 4, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=600) == STOPPED  # a hang guard
    best, last = load_checkpoint(out / "ckpt.pt"), load_checkpoint(out / "last.pt")
    assert best["iter_num"] == 0 < last["iter_num"]  # the stop did not overwrite the best
    rows = run_train(["--init_from=resume", f"--max_iters={last['iter_num'] + 2}"], char_data,
                     out)
    assert max(r["iter"] for r in rows) == last["iter_num"] + 2


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_comes_within_a_micro_step_even_in_a_long_iteration(char_data, tmp_path, signum):
    # 100,000 micro-steps make an iteration of an hour or more: the stop must not wait for it.
    out = tmp_path / "out"
    proc = start(["--max_iters=5", "--gradient_accumulation_steps=100000"], char_data, out)
    wait_for_rows(out, 1, proc)  # the first evaluation is written: the iteration has begun
    time.sleep(1)
    proc.send_signal(signum)
    assert proc.wait(timeout=600) == STOPPED  # a hang guard, far below the iteration's length
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 0  # the unfinished one is redone


@pytest.mark.slow
@pytest.mark.parametrize("layout", [[], ["--tp=2"]], ids=["ddp", "tp"])
def test_under_torchrun_a_stop_comes_within_a_micro_step_too(char_data, tmp_path, layout):
    # The ranks agree on the signal within the iteration: torchrun, signalled itself, gives
    # its workers 30 s before it kills them, far less than this iteration's length.
    out = tmp_path / "out"
    proc = subprocess.Popen(train_cmd(["--max_iters=5", "--gradient_accumulation_steps=100000",
                                       *layout], char_data, out, launcher=TORCHRUN),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=quiet_env())
    wait_for_rows(out, 1, proc)  # the first evaluation is written: the iteration has begun
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)  # a hang guard
    assert "stopped by a signal at iteration 0" in stdout, stderr[-3000:]
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 0  # the unfinished one is redone
    assert stderr.count("SIGTERM received: stopping with a checkpoint") == 1  # rank 0, once


def wait_for_lock(out, proc):
    """Until the run holds out_dir's lock (startup.out_dir_lock): flock fails for anyone else."""
    import fcntl
    deadline = time.time() + 600  # a hang guard
    while True:
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(out, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return
            finally:
                os.close(fd)  # closing drops a lock taken here
        assert time.time() < deadline and proc.poll() is None, "the run did not get going"
        time.sleep(0.02)


def catches_sigterm(pid):
    """Whether the process has installed its own SIGTERM handler (Linux: /proc's SigCgt)."""
    with open(f"/proc/{pid}/status") as f:
        caught = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.mark.slow
def test_a_second_run_on_the_same_out_dir_stops_at_once(char_data, tmp_path):
    out = tmp_path / "out"
    first = start(["--max_iters=1000000", "--eval_interval=1000000"], char_data, out)
    wait_for_lock(out, first)
    second = run_train(["--max_iters=2", "--overwrite=true"], char_data, out, expect_ok=False)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=600) == STOPPED
    assert second.returncode == 2 and "another run is using out_dir" in second.stderr


@pytest.mark.slow
def test_a_stop_at_any_moment_of_start_up_is_a_clean_exit(char_data, tmp_path):
    # From the moment train.py has its handler (its first lines, before torch loads): during
    # the imports, setting up, the first evaluation. Not a death by the signal (-15).
    for k, delay in enumerate((0.0, 0.5, 1.5, 3.0)):
        proc = start(["--max_iters=1000000", "--eval_interval=1000000"], char_data,
                     tmp_path / str(k))
        deadline = time.time() + 600  # a hang guard
        while not catches_sigterm(proc.pid):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == STOPPED, (delay, stderr[-2000:])
        assert stderr.splitlines() == ["SIGTERM received: stopping with a checkpoint"], stderr
        assert "stopped by a signal at iteration " in stdout and "ckpt.pt" in stdout


@pytest.mark.slow
def test_workers_do_not_outlive_a_killed_torchrun(char_data, tmp_path):
    from test_robustness import children
    out = tmp_path / "out"
    launcher = subprocess.Popen(train_cmd(["--max_iters=4000"], char_data, out,
                                          launcher=TORCHRUN), env=quiet_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_rows(out, 2, launcher)
    workers = children(launcher.pid)
    assert len(workers) == 2
    launcher.kill()  # SIGKILL: torchrun cannot pass anything on
    launcher.wait()
    deadline = time.time() + 600  # a hang guard
    while any(_alive(pid) for pid in workers):
        assert time.time() < deadline, "orphaned workers still running"
        time.sleep(0.2)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_full_disk_is_one_error_and_the_old_checkpoint_stays(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "iter_num": 1}, path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match="No space left on device; the previous"):
        save_checkpoint({"model": {}, "iter_num": 2}, path)
    assert load_checkpoint(path)["iter_num"] == 1
    assert not list(tmp_path.glob(".ckpt-*.tmp"))


@pytest.mark.parametrize("damage, message", [
    ("nanogpt", "cannot load this checkpoint"), ("nan", "weights are not all finite")])
def test_a_foreign_or_broken_checkpoint_is_one_line_on_resume(char_data, tmp_path, damage,
                                                            message):
    out = tmp_path / "out"
    run_train(["--max_iters=1", "--eval_interval=1"], char_data, out)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    if damage == "nanogpt":  # nanoGPT's keys: no meta, no scaler, no origin; compiled names
        ckpt = {k: ckpt[k] for k in ("optimizer", "model_args", "iter_num", "best_val_loss",
                                     "config")} | {"model": {
            "_orig_mod." + k: v for k, v in ckpt["model"].items()}}
    else:
        ckpt["model"] = {k: torch.full_like(v, float("nan")) for k, v in ckpt["model"].items()}
    torch.save(ckpt, out / "ckpt.pt")
    proc = run_train(["--max_iters=2", "--init_from=resume"], char_data, out, expect_ok=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_evaluations_are_not_counted_in_the_next_step_and_elapsed_spans_a_resume(char_data,
                                                                                 tmp_path):
    from model import GPTConfig
    from training.metrics import MetricsLog
    fake = types.SimpleNamespace(
        cfg=TrainConfig(out_dir=str(tmp_path), log_interval=1, max_iters=10), rank=0,
        world_size=1, device="cpu", dtype=torch.float32, iter_num=0, elapsed_s=100.0,
        raw_model=types.SimpleNamespace(config=GPTConfig(n_layer=1, n_embd=8, n_head=1,
                                                         vocab_size=16)))
    log = MetricsLog(fake)
    assert log.elapsed() >= 100  # the time of the processes before this one
    time.sleep(0.6)  # an evaluation of 0.6 s
    log.evaluation(0, {"train": 1.0, "val": 1.0}, seconds=0.6)
    log.step(1, torch.tensor(1.0), 1e-3)
    log.close()
    assert read_metrics(tmp_path)[-1]["ms"] < 300  # not the 600 ms of the evaluation
    out = tmp_path / "run"
    first = run_train(["--max_iters=2", "--eval_interval=2"], char_data, out)
    second = run_train(["--max_iters=4", "--eval_interval=2", "--init_from=resume"], char_data,
                       out)
    elapsed = [r["elapsed_s"] for r in second if "elapsed_s" in r]
    assert elapsed == sorted(elapsed) and elapsed[-1] > first[-2]["elapsed_s"]


def test_progress_is_shown_off_a_terminal_every_30_seconds(monkeypatch, capsys):
    clock = iter(range(0, 1000, 11))  # each reading 11 s after the last
    monkeypatch.setattr(train.time, "time", lambda: next(clock))
    assert list(train.progress(range(8), "eval val", rank=0)) == list(range(8))
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith("eval val: ") for line in lines) and len(lines) < 8


def started(args, data, out):
    """A run started in the background, once it is past setup and its loop has begun."""
    proc = start(args, data, out)
    for line in proc.stdout:  # setup's last line; the signal handlers follow at once
        if "starting at iteration" in line:
            break
    wait_for_rows(out, 0, proc)  # metrics.jsonl is open: the loop begins
    time.sleep(1)
    return proc


@pytest.mark.slow
def test_a_stop_during_an_evaluation_abandons_it_and_the_resumed_run_does_it(char_data,
                                                                             tmp_path):
    # Ten million batches: hours of evaluation at iteration 0, unless the stop abandons it.
    out = tmp_path / "out"
    proc = started(["--max_iters=2", "--eval_interval=2", "--eval_iters=10000000"], char_data,
                   out)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)  # a hang guard only
    assert proc.returncode == STOPPED, stderr[-2000:]
    assert "stopped by a signal at iteration 0" in stdout and "Traceback" not in stderr
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] == 0 and ckpt["evaluated"] is False
    assert read_metrics(out) == []
    rows = run_train(["--init_from=resume", "--max_iters=2", "--eval_interval=2",
                      "--eval_iters=2"], char_data, out)
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 2]  # 0's evaluation is done


@pytest.mark.slow
def test_a_stop_during_the_final_evaluation_is_made_up_and_a_finished_run_says_so(
        char_data, tmp_path):
    # A validation split of 20M tokens: its whole-split evaluation would take many minutes.
    big = tmp_path / "big"
    big.mkdir()
    meta = json.loads((char_data / "meta.json").read_text())
    (big / "meta.json").write_text(json.dumps({**meta, "val_tokens": 20_000_000}))
    (big / "train.bin").write_bytes((char_data / "train.bin").read_bytes())
    tokens = np.random.default_rng(0).integers(0, meta["vocab_size"], 20_000_000)
    tokens.astype(np.uint16).tofile(big / "val.bin")
    out = tmp_path / "out"
    proc = start(["--max_iters=0", "--eval_iters=2"], big, out)
    wait_for_rows(out, 1, proc)  # iteration 0 is evaluated and saved: the whole split begins
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)  # a hang guard only
    assert proc.returncode == STOPPED and "stopped by a signal at iteration 0" in stdout, stderr
    before = read_metrics(out)
    assert not any("whole_val_loss" in r for r in before)
    # The resumed run computes the whole-split loss the stop abandoned, and nothing else (on
    # the small split of the same vocabulary: its data_dir is named, so it is taken).
    rows = run_train(["--init_from=resume", "--max_iters=0"], char_data, out)
    assert rows[:len(before)] == before and len(rows) == len(before) + 1
    assert "whole_val_loss" in rows[-1] and rows[-1]["iter"] == 0
    proc = run_train(["--init_from=resume", "--max_iters=0"], char_data, out, expect_ok=False)
    assert proc.returncode == 0 and "is complete" in proc.stdout and "--max_iters=" in (
        proc.stdout)
    assert read_metrics(out) == rows  # nothing evaluated again
    # What it printed at start: the settings not at their defaults, the cost, and the memory
    # against the CPU's (not the GPU sizes), in a screen, not 45 lines of JSON.
    assert "settings (those not at their defaults):" in proc.stdout
    assert " --out_dir=" in proc.stdout and " --dtype=float32" in proc.stdout
    assert "that cpu has" in proc.stdout and "fits GPUs" not in proc.stdout
    assert len(proc.stdout.splitlines()) < 20


def test_names_that_do_not_exist_say_what_does(char_data, tmp_path):
    out = tmp_path / "out"
    proc = run_train(["--dataset=shakespeare-char", "--data_dir="], char_data, out,
                     expect_ok=False)
    assert proc.returncode == 2 and "(did you mean 'shakespeare_char'?)" in proc.stderr
    assert "prepared: " in proc.stderr and not out.exists()  # a failed start leaves nothing
    proc = run_train(["--block_size=200000"], char_data, out, expect_ok=False)  # > 10,000
    assert proc.returncode == 2 and "fewer than block_size + 1 = 200001" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"),
                           str(ROOT / "config" / "train_gpt2.toml"), "--help"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and "--n_layer=12 " in proc.stdout  # the file's values
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--out_dir={out}"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "train one first: python train.py" in proc.stderr


def test_a_second_ctrl_c_exits_at_once_in_one_line():
    code = ("import os, signal, sys, time; sys.path.insert(0, sys.argv[1]); "
            "from training import process; process.StopSignals(); "
            "os.kill(os.getpid(), signal.SIGINT); "
            "os.kill(os.getpid(), signal.SIGINT); time.sleep(600)")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 130
    assert proc.stderr.splitlines() == ["SIGINT received: stopping with a checkpoint",
                                        "second Ctrl-C: exiting now; the last checkpoint saved "
                                        "is kept"]


def test_a_busy_machine_is_said_in_one_line(monkeypatch):
    from training import runtime
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (4.0, 3.0, 2.0))
    assert "looks busy (load average 4.0 on 2 cores)" in runtime.busy_note("cpu")
    assert runtime.busy_note("cuda") is None
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (0.3, 0.2, 0.1))
    assert runtime.busy_note("cpu") is None


def test_another_optimizer_on_resume_is_named_and_a_checkpoint_can_be_finetuned(char_data,
                                                                                tmp_path):
    muon = tmp_path / "muon"
    run_train(["--optimizer=muon", "--max_iters=2"], char_data, muon)
    proc = run_train(["--init_from=resume", "--optimizer=adamw", "--max_iters=4"], char_data,
                     muon, expect_ok=False)
    assert proc.returncode == 2 and "trained with optimizer=muon" in proc.stderr
    assert f"--init_from={muon / 'ckpt.pt'} --out_dir=NEW" in proc.stderr
    # Its weights, with a fresh AdamW: iteration 0 of the new run evaluates the Muon weights.
    rows = run_train([f"--init_from={muon / 'ckpt.pt'}", "--max_iters=2"], char_data,
                     tmp_path / "adamw")
    assert rows[0]["iter"] == 0 and rows[0]["val_loss"] == read_metrics(muon)[-2]["val_loss"]
    proc = run_train([f"--init_from={muon / 'ckpt.pt'}", "--max_iters=2"], char_data, muon,
                     expect_ok=False)
    assert proc.returncode == 2 and "give another --out_dir" in proc.stderr


def test_a_gpu_recipe_on_a_cpu_says_at_start_how_long_it_would_take(char_data, tmp_path, capsys):
    # The GPU recipe, 5,000 iterations of 16,384 tokens at 71M FLOPs each: 5.8e15 FLOPs.
    cfg = parse_config(TrainConfig, [str(ROOT / "config" / "train_shakespeare_char.toml"),
                                     "--device=cpu",
                                     f"--data_dir={char_data}", f"--out_dir={tmp_path}"])
    startup.setup(cfg.validate())
    out = capsys.readouterr().out
    assert "note: 5.8e+15 FLOPs take hours on a CPU" in out
    assert "config/train_shakespeare_char_cpu.toml is the CPU's" in out


def test_a_warmup_as_long_as_the_run_is_said(char_data, tmp_path, capsys):
    cfg = parse_config(TrainConfig, [*TINY_FLAGS, f"--data_dir={char_data}",
                                     f"--out_dir={tmp_path}", "--max_iters=100",
                                     "--lr_decay_iters=100", "--warmup_iters=100"])
    startup.setup(cfg.validate())
    assert "warmup_iters (100) is not below the schedule's end (100)" in capsys.readouterr().err
