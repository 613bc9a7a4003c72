"""metrics.jsonl on a bad day: a full disk, and a resumed run after a row was cut in half."""
import errno
import json
from types import SimpleNamespace

import pytest

from model import GPTConfig
from training.metrics import MetricsError, MetricsLog
from training.settings import TrainConfig


def fake_run(out_dir, iter_num):
    """What MetricsLog reads of startup.py's Run, for a CPU run of one process."""
    return SimpleNamespace(cfg=TrainConfig(out_dir=str(out_dir)), rank=0, world_size=1,
                           device="cpu", dtype="float32", iter_num=iter_num, elapsed_s=0.0,
                           raw_model=SimpleNamespace(config=GPTConfig(n_layer=1, n_embd=8,
                                                                      n_head=1, vocab_size=16)))


def test_a_resumed_run_drops_a_half_written_row(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"iter": 1, "loss": 4.0}, {"iter": 2, "loss": 3.5}]
    # Longer than the 4096 bytes metrics.py reads back at a time, so both paths are taken.
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iter": 3, "lo' + "x" * 5000)
    log = MetricsLog(fake_run(tmp_path, iter_num=2))
    log.write(iter=3, loss=3.0)
    log.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        *rows, {"iter": 3, "loss": 3.0}]
    path.write_text('{"iter": 1, "lo')  # no whole row at all: nothing survives
    log = MetricsLog(fake_run(tmp_path, iter_num=1))
    log.close()
    assert path.read_text() == ""


class FullDisk:
    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        raise OSError(errno.ENOSPC, "No space left on device")  # the buffered row, again


def test_a_full_disk_is_one_clear_error(tmp_path):
    log = MetricsLog(fake_run(tmp_path, iter_num=0))
    log.file.close()
    log.file = FullDisk()
    with pytest.raises(MetricsError, match=r"^no space left on device: cannot write "
                                           r".*metrics\.jsonl$"):
        log.write(iter=1, loss=4.0)
    log.close()  # train.py closes the log as it unwinds: no second error


def test_after_a_resume_the_first_line_times_the_iterations_this_process_ran(tmp_path,
                                                                            monkeypatch):
    # Resumed at 7 with log_interval 5: the line at 10 covers 3 iterations, 3 s, so 1 s each.
    run = fake_run(tmp_path, iter_num=7)
    run.cfg.log_interval = 5
    clock = iter([100.0, 103.0, 108.0])
    monkeypatch.setattr("training.metrics.time.time", lambda: next(clock))
    log = MetricsLog(run)
    log.step(10, 4.0, 1e-3)
    log.step(15, 4.0, 1e-3)  # then 5 iterations in 5 s
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["ms"] for row in rows] == [1000.0, 1000.0]
