"""Checkpoints on a bad day: a stale last.pt, a damaged one, a full disk, a file carrying code.

A fresh --overwrite=true run leaves nothing of the old run to resume; the newer of ckpt.pt and
last.pt is found from their indexes alone; a damaged last.pt does not stand in the way of a
good ckpt.pt; a full disk is one line on every rank, with the old checkpoint and the log kept.
"""
import os
import subprocess
import zipfile

import pytest
import torch
from full_disk import filling_disk

import sample
import train
from helpers import ROOT, TINY, TORCHRUN, quiet_env, read_metrics
from tools import plot
from training import checkpoint, safe_load
from training.checkpoint import latest_checkpoint, save_checkpoint
from training.safe_load import CheckpointError, checkpoint_iteration, load_checkpoint


def run_args(data, out, *flags):
    return [*TINY, f"--data_dir={data}", f"--out_dir={out}", "--eval_iters=2", *flags]


def one_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.slow
def test_a_fresh_run_over_a_folder_leaves_nothing_of_the_old_run(char_data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    save_checkpoint({"model": {}, "iter_num": 100}, out / "ckpt.pt")  # the old run's files:
    save_checkpoint({"model": {}, "iter_num": 150}, out / "last.pt")  # its best, its stop
    assert latest_checkpoint(out) == str(out / "last.pt")
    fresh = ["--init_from=scratch", "--overwrite=true", "--max_iters=0"]
    assert train.main(run_args(char_data, out, *fresh)) == 0
    assert not (out / "last.pt").exists()  # it would have won resume and sampling
    assert load_checkpoint(latest_checkpoint(out))["iter_num"] == 0

    # A damaged last.pt blocks neither sampling, nor an evaluation, nor a fresh run: each
    # takes ckpt.pt, saying in a whole sentence what it passed over.
    (out / "last.pt").write_bytes((out / "ckpt.pt").read_bytes()[:5000])
    capsys.readouterr()
    assert sample.main([f"--out_dir={out}", "--device=cpu", "--max_new_tokens=2",
                        "--num_samples=1"]) == 0
    note = one_line(capsys.readouterr().err)
    assert note.startswith(f"note: passed over {out / 'last.pt'}: corrupt or truncated")
    assert note.endswith(")")  # not cut mid-sentence
    assert train.main(run_args(char_data, out, "--eval_only=true")) == 0
    assert "passed over" in capsys.readouterr().err
    assert train.main(run_args(char_data, out, *fresh)) == 0
    assert not (out / "last.pt").exists()


class Payload:
    """Unpickles as a call that creates a file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_the_newer_checkpoint_is_found_from_the_index_alone(tmp_path):
    best, last = tmp_path / "ckpt.pt", tmp_path / "last.pt"
    marker = tmp_path / "code-ran"
    save_checkpoint({"model": {"w": torch.ones(1000)}, "iter_num": 7}, best)
    torch.save({"model": {"w": torch.ones(1000)}, "iter_num": 9,
                "payload": Payload(str(marker))}, last)
    # last.pt without its tensors' records: only the index (data.pkl) is left to read.
    with zipfile.ZipFile(last) as archive:
        kept = {n: archive.read(n) for n in archive.namelist() if "/data/" not in n}
    last.unlink()
    with zipfile.ZipFile(last, "w") as archive:
        for name, content in kept.items():
            archive.writestr(name, content)
    assert checkpoint_iteration(last) == 9 and checkpoint_iteration(best) == 7
    assert latest_checkpoint(tmp_path) == str(last)
    assert not marker.exists()  # the index was read, and nothing it names was run
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(last)  # a whole load needs the tensors


def test_a_long_reason_is_cut_at_a_sentence_or_a_word():
    first = "The archive is damaged. " * 5
    assert safe_load._first_sentence(first + "x" * 300) == first.strip()
    cut = safe_load._first_sentence("word " * 100)
    assert cut.endswith("word ...") and len(cut) <= 204


def test_checkpoints_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        save_checkpoint({"model": {}}, tmp_path / "a.pt")
        os.umask(0o077)
        save_checkpoint({"model": {}}, tmp_path / "b.pt")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == 0o644  # as nanoGPT's
    assert (tmp_path / "b.pt").stat().st_mode & 0o777 == 0o600


def test_a_full_disk_is_one_line_and_keeps_the_checkpoint_and_the_log(char_data, tmp_path,
                                                                      capsys, monkeypatch):
    out = tmp_path / "out"
    # The save at iteration 0 fits; the disk is full at the next, at iteration 2.
    monkeypatch.setattr(checkpoint, "open", filling_disk(1), raising=False)
    args = run_args(char_data, out, "--max_iters=4", "--eval_interval=2")
    assert train.main(args) == 2
    error = one_line(capsys.readouterr().err)
    assert error == (f"error: cannot write the checkpoint {out / 'ckpt.pt'}: No space left on "
                     "device; the previous checkpoint there is intact")
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 0
    assert not list(out.glob(".ckpt-*.tmp"))
    log = (out / "metrics.jsonl").read_bytes()
    assert len(read_metrics(out)) == 3  # evaluation 0, iterations 1 and 2
    # Resuming from iteration 0 onto the full disk fails again, and the log keeps its rows.
    monkeypatch.setattr(checkpoint, "open", filling_disk(0), raising=False)
    assert train.main([*args, "--init_from=resume"]) == 2
    assert "No space left on device" in one_line(capsys.readouterr().err)
    assert (out / "metrics.jsonl").read_bytes().startswith(log)


@pytest.mark.slow
def test_a_full_disk_under_fsdp_is_one_line_on_every_rank(char_data, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [*TORCHRUN, str(ROOT / "tests" / "full_disk.py"),
         *run_args(char_data, out, "--max_iters=2", "--eval_interval=2", "--fsdp=true")],
        capture_output=True, text=True, env=quiet_env(FULL_AFTER_SAVES="1"), timeout=300)
    assert proc.returncode != 0
    error = (f"error: cannot write the checkpoint {out / 'ckpt.pt'}: No space left on device; "
             "the previous checkpoint there is intact")
    assert proc.stderr.count(error) == 1, proc.stderr  # once, from rank 0; no traceback
    assert "[rank0]" not in proc.stderr and "[rank1]" not in proc.stderr
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 0


@pytest.mark.parametrize("backend, available, message", [
    ("bogus", False, "backend 'bogus' is not available in this PyTorch build"),
    ("nccl", True, "backend nccl connects CUDA GPUs, and this run is on cpu"),
])
def test_a_backend_that_cannot_run_here_is_one_line(backend, available, message, char_data,
                                                    tmp_path, capsys, monkeypatch):
    # As torchrun would start one process; the backend is checked before the group is joined.
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29599")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(torch.distributed, "is_backend_available", lambda b: available)
    argv = run_args(char_data, tmp_path / "out", f"--backend={backend}", "--max_iters=1")
    assert train.main(argv) == 2
    assert message in one_line(capsys.readouterr().err)


def test_plot_draws_the_rows_it_can_and_skips_the_others(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rows = ['{"iter": 1, "loss": 4.0, "ms": 10}', '{"iter": 2, "loss": 3.9}',
            '{"iter": "3", "loss": 3.8, "ms": 10}', "[1, 2]", "7", '{"iter": 4, "val_loss": 3.7}',
            '{"iter": 5, "loss": 3.5, "ms": 10}', '{"iter": 6, "val_loss": "low"}']
    (run / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    train_curve, val_curve = plot.read_curves(run)
    assert [p[0] for p in train_curve] == [1, 5] and [p[0] for p in val_curve] == [4]
    assert "note: skipped 5 damaged line(s)" in capsys.readouterr().err
    assert plot.main([str(run)]) == 0 and (run / "loss.png").is_file()
