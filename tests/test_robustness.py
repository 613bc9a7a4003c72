"""No lost work: signals, kills in the middle of a save, elastic restarts, dead ranks,
diverging losses, and checkpoints that are corrupt or carry code."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import ROOT, TORCHRUN, quiet_env, read_metrics, run_train, train_cmd, train_losses
from training.checkpoint import save_checkpoint
from training.safe_load import CheckpointError, load_checkpoint
from training.stopping import STOPPED


def wait_for(predicate, timeout=600, what="condition"):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def logged_iters(out_dir):
    try:
        return [r["iter"] for r in read_metrics(out_dir) if "loss" in r]
    except (FileNotFoundError, ValueError):
        return []


def children(pid):
    """Process ids whose parent is pid (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def rank_of(pid):
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(int(v[5:]) for v in env if v.startswith(b"RANK="))


SLOW = ["--max_iters=400", "--eval_interval=1000", "--lr_decay_iters=20"]


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_continues_exactly(char_data, tmp_path):
    out = tmp_path / "stopped"
    proc = subprocess.Popen(train_cmd(SLOW, char_data, out), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=quiet_env())
    wait_for(lambda: len(logged_iters(out)) >= 3, what="three iterations")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == STOPPED, stderr
    assert "stopped by a signal" in stdout
    stop = load_checkpoint(out / "ckpt.pt")["iter_num"]
    assert stop == logged_iters(out)[-1] >= 3  # the step in flight was finished and saved
    run_train(["--max_iters=400", "--eval_interval=1000", "--lr_decay_iters=20",
               f"--max_iters={stop + 3}", "--init_from=resume"], char_data, out)
    straight = run_train([f"--max_iters={stop + 3}", "--eval_interval=1000",
                          "--lr_decay_iters=20"], char_data, tmp_path / "straight")
    assert train_losses(read_metrics(out)) == train_losses(straight)


@pytest.mark.slow
def test_under_ddp_a_signal_to_one_rank_stops_all_at_the_same_step(char_data, tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.Popen(train_cmd(SLOW, char_data, out, launcher=TORCHRUN),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=quiet_env())
    wait_for(lambda: len(logged_iters(out)) >= 3, what="three iterations")
    workers = {rank_of(pid): pid for pid in children(proc.pid)}
    os.kill(workers[1], signal.SIGTERM)  # only rank 1 is told
    stdout, stderr = proc.communicate(timeout=600)
    assert f"(exitcode: {STOPPED})" in stderr, stderr[-3000:]  # as torchrun reports a worker's
    assert "stopped by a signal" in stdout
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] == logged_iters(out)[-1] < 400


@pytest.mark.slow
@pytest.mark.parametrize("layout", [[], ["--fsdp=true"]], ids=["ddp", "fsdp"])
def test_a_finished_run_leaves_no_process_group_threads(char_data, tmp_path, layout):
    # A gloo thread alive as Python exits may drop a tensor after the interpreter is gone:
    # SIGABRT, in about one torchrun end in a hundred here, after all the work was done.
    # Under FSDP torch's caches hold the mesh; under DDP the model holds the group.
    proc = run_train(["--max_iters=2", "--eval_iters=1", *layout], char_data, tmp_path / "o",
                     launcher=TORCHRUN, script="tests/threads_left.py", expect_ok=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("gloo threads left: []") == 2, proc.stdout[-2000:]


@pytest.mark.slow
def test_a_kill_during_a_save_leaves_the_old_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "iter_num": 1}, path)
    writer = subprocess.Popen([sys.executable, "-c", f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
from training.checkpoint import save_checkpoint
big = {{"model": {{"w": torch.zeros(150_000_000)}}, "iter_num": 2}}  # 600 MB: a slow write
while True:
    save_checkpoint(big, {str(path)!r})
"""])
    wait_for(lambda: list(tmp_path.glob(".ckpt-*.tmp")), what="a save in progress")
    writer.kill()  # SIGKILL: the process cannot tidy up
    writer.wait()
    ckpt = load_checkpoint(path)
    assert ckpt["iter_num"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    assert list(tmp_path.glob(".ckpt-*.tmp"))  # the half-written file is left behind...
    save_checkpoint({"model": {}, "iter_num": 3}, path)
    assert not list(tmp_path.glob(".ckpt-*.tmp"))  # ...and cleared by the next save


@pytest.mark.slow
def test_elastic_restart_resumes_and_ends_with_the_same_loss(char_data, tmp_path):
    args = ["--max_iters=8", "--eval_interval=2", "--init_from=auto"]
    elastic = (sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "--max_restarts=1")
    crashed = run_train(args, char_data, tmp_path / "crashed", launcher=elastic,
                        script="tests/crash_once.py", FAIL_AT="5")
    steady = run_train(args, char_data, tmp_path / "steady", launcher=TORCHRUN)
    # The first attempt logged iterations 1-5 and died drawing the batch of step 5 (which
    # would log as iteration 6); the restart resumed from the checkpoint at 4 and logged 5-8,
    # redoing step 4 exactly.
    rows = [r for r in crashed if "loss" in r]
    assert [r["iter"] for r in rows] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    assert rows[4]["loss"] == rows[5]["loss"]
    assert train_losses(crashed)[8] == train_losses(steady)[8]


@pytest.mark.slow
def test_a_dead_rank_does_not_leave_the_other_hanging(char_data, tmp_path):
    """Without torchrun to clean up, the survivor must still fail, after ddp_timeout."""
    port = 29000 + os.getpid() % 1000
    procs = []
    for rank in (0, 1):
        env = quiet_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FAIL_AT="3")
        cmd = train_cmd(["--max_iters=50", "--eval_interval=1000", "--ddp_timeout=30"],
                        char_data, tmp_path / "out", script="tests/crash_once.py")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      env=env))
    codes = [p.wait(timeout=900) for p in procs]  # a hang guard
    assert codes[1] == 13 and codes[0] != 0


@pytest.mark.parametrize("flags", [["--learning_rate=1e30", "--eval_interval=5"],
                                   ["--learning_rate=1e30", "--eval_interval=1"],
                                   ["--optimizer=muon", "--muon_lr=1e300", "--eval_interval=1"]])
def test_a_diverging_run_stops_and_keeps_the_good_checkpoint(char_data, tmp_path, flags):
    """The loss goes NaN either at the next step (read by the stop check) or, when an
    evaluation comes first, at that evaluation: neither may overwrite the good checkpoint."""
    out = tmp_path / "out"
    proc = run_train(["--max_iters=10", "--warmup_iters=0", *flags], char_data, out,
                     expect_ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    said = ("eval 1: train loss nan" if "--eval_interval=1" in flags else
            "iteration 1: the loss or gradient norm is not finite")
    assert said in proc.stderr and "the last finite weights" in proc.stderr
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] == 0
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    sample = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--out_dir={out}",
                             "--max_new_tokens=5", "--device=cpu"], capture_output=True, text=True)
    assert sample.returncode == 0, sample.stderr


class Payload:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_carrying_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "extra": Payload(str(marker))}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(tmp_path / "ckpt.pt")
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--out_dir={tmp_path}"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "refused to load" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_weights_carrying_code_are_refused_and_run_nothing(tmp_path):
    from model import GPT
    from training.safe_load import load_gpt2
    marker = tmp_path / "pwned"
    (tmp_path / "config.json").write_text(
        '{"n_layer": 1, "n_head": 1, "n_embd": 8, "n_positions": 8, "vocab_size": 10}')
    torch.save({"wte.weight": Payload(str(marker))}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="refused to load"):
        load_gpt2(GPT, str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_checkpoint_is_a_clear_error(char_data, tmp_path, damage):
    out = tmp_path / "out"
    run_train(["--max_iters=1", "--eval_interval=1"], char_data, out)
    data = (out / "ckpt.pt").read_bytes()
    damaged = {"truncated": data[:len(data) // 2], "garbage": random.Random(0).randbytes(4096),
               "empty": b""}[damage]
    (out / "ckpt.pt").write_bytes(damaged)
    proc = run_train(["--max_iters=2", "--init_from=resume"], char_data, out, expect_ok=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "corrupt or truncated checkpoint" in proc.stderr and "ckpt.pt" in proc.stderr


def test_a_checkpoint_of_another_shape_is_a_clear_error(char_data, tmp_path):
    out = tmp_path / "out"
    run_train(["--max_iters=1", "--eval_interval=1"], char_data, out)
    proc = run_train(["--max_iters=2", "--init_from=resume", "--n_layer=3"], char_data, out,
                     expect_ok=False)
    assert proc.returncode == 2
    assert "has n_layer=2 but the config says 3" in proc.stderr


def test_resuming_on_a_dataset_with_another_vocabulary_is_refused(char_data, shakespeare_path,
                                                                 tmp_path):
    from data.preparation import prepare_text
    out = tmp_path / "out"
    run_train(["--max_iters=1", "--eval_interval=1"], char_data, out)
    other = tmp_path / "other"
    # Same number of characters, one of them different: the ids would silently mean other
    # letters if training went on.
    source = shakespeare_path.read_text()[:100_000]
    assert "~" not in source
    prepare_text(source.replace("z", "~"), other, "char")
    proc = run_train(["--max_iters=2", "--init_from=resume"], other, out, expect_ok=False)
    assert proc.returncode == 2 and "another tokenizer or vocabulary" in proc.stderr


@pytest.mark.slow
def test_under_ddp_stops_at_and_during_evaluations_lose_none_of_them(char_data, tmp_path):
    # The uninterrupted run evaluates at 0, 2, 4, 6 and 8. A SIGTERM to rank 1 during step 5
    # stops the run at 6 before its evaluation; the resumed run is stopped again during that
    # evaluation; the third run must still evaluate at 6, and each iteration exactly once.
    out = tmp_path / "out"
    args = ["--max_iters=8", "--eval_interval=2", "--eval_iters=2",
            "--always_save_checkpoint=false", "--lr_decay_iters=8"]
    for signal_at, resume in (("5", []), ("eval", ["--init_from=resume"])):
        proc = run_train(args + resume, char_data, out, launcher=TORCHRUN,
                         script="tests/signal_once.py", expect_ok=False, SIGNAL_AT=signal_at)
        assert f"(exitcode: {STOPPED})" in proc.stderr, proc.stderr[-3000:]
        assert "stopped by a signal at iteration 6" in proc.stdout
        last = load_checkpoint(out / "last.pt")
        assert last["iter_num"] == 6 and last["evaluated"] is False
    rows = run_train(args + ["--init_from=resume"], char_data, out)
    evals = {r["iter"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 2, 4, 6, 8]
    assert [r["iter"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6, 7, 8]
    # ckpt.pt holds the best model, as in the uninterrupted run
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == min(evals, key=evals.get)
