"""plot.py on real runs of train.py: a valid PNG from two runs, a resumed run drawn as one
curve, the learning-rate schedule of a config, and the message when matplotlib is missing."""
import shutil
import sys

import pytest

from helpers import ROOT, read_metrics, run_train
from tools import plot
from training.settings import TrainConfig, parse_config
from training.step import get_lr

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CPU_RECIPE = ROOT / "config" / "train_shakespeare_char_cpu.toml"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, char_data):
    """Two real runs: one that stopped after 4 iterations, and a copy of it resumed to 8,
    whose metrics.jsonl the second process appended to."""
    root = tmp_path_factory.mktemp("runs")
    steps = ["--eval_interval=4", "--log_interval=2"]
    run_train(steps + ["--max_iters=4"], char_data, root / "stopped")
    shutil.copytree(root / "stopped", root / "resumed")
    run_train(steps + ["--max_iters=8", "--init_from=resume"], char_data, root / "resumed")
    return root / "stopped", root / "resumed"


def assert_png(path):
    from matplotlib.image import imread
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width, channels = imread(path).shape
    assert height > 100 and width > 100 and channels in (3, 4)


@pytest.mark.slow
def test_two_runs_make_a_png(runs, capsys):
    stopped, resumed = runs
    assert plot.main([str(stopped), str(resumed)]) == 0
    assert_png(stopped / "loss.png")  # the default: beside the first run's metrics
    assert capsys.readouterr().out == f"wrote {stopped / 'loss.png'}\n"


@pytest.mark.slow
def test_a_resumed_run_is_one_curve(runs):
    stopped, resumed = runs
    # The second process appended its rows after the first's; it does not evaluate again
    # where it resumed. (Each run ends with a row of its whole-split validation loss.)
    assert [r["iter"] for r in read_metrics(resumed)] == [0, 2, 4, 4, 4, 6, 8, 8, 8]
    (train_s, val_s), (train_r, val_r) = plot.read_curves(stopped), plot.read_curves(resumed)
    assert [p[0] for p in train_r] == [2, 4, 6, 8] and [p[0] for p in val_r] == [0, 4, 8]
    # Up to iteration 4 it is the stopped run, clock and all; from there its clock goes on.
    assert train_r[:2] == train_s and val_r[:2] == val_s
    for curve in (train_r, val_r):
        seconds = [p[1] for p in curve]
        assert seconds == sorted(seconds) and seconds[-1] > seconds[1] > 0
    # The clock reaches an evaluation just before it runs; elapsed_s is taken after it.
    elapsed = {r["iter"]: r["elapsed_s"] for r in read_metrics(stopped) if "elapsed_s" in r}
    assert all(seconds <= elapsed[it] + 0.01 for it, seconds, _ in val_s)
    fig = plot.draw({"stopped": (train_s, val_s), "resumed": (train_r, val_r)}, None,
                    stopped / "check.png")
    by_iter, by_time = fig.axes
    assert len(by_iter.lines) == len(by_time.lines) == 4  # train and validation per run


def test_overlapping_rows_of_a_resumed_run_keep_the_later(tmp_path):
    # A run killed at iteration 6 after its checkpoint at 4 is resumed from 4: iteration 6
    # is logged twice, and the second try is what the finished run did.
    rows = ['{"iter": 0, "train_loss": 4.0, "val_loss": 4.1, "elapsed_s": 0.5}',
            '{"iter": 2, "loss": 3.9, "ms": 500}', '{"iter": 4, "loss": 3.8, "ms": 500}',
            '{"iter": 4, "train_loss": 3.7, "val_loss": 3.75, "elapsed_s": 2.5}',
            '{"iter": 6, "loss": 9.9, "ms": 500}', '{"iter": 6, "loss": 3.6, "ms": 1500}',
            '{"iter": 8, "loss": 3.5, "ms": 500}']
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    train, val = plot.read_curves(tmp_path)
    assert train == [(2, 1.0, 3.9), (4, 2.0, 3.8), (6, 5.0, 3.6), (8, 6.0, 3.5)]
    assert val == [(0, 0.0, 4.1), (4, 2.0, 3.75)]


@pytest.mark.slow
def test_learning_rate_schedule_of_a_config(runs, tmp_path):
    iters, rates, title = plot.lr_schedule(str(CPU_RECIPE))
    cfg = parse_config(TrainConfig, [str(CPU_RECIPE)])
    assert iters == list(range(cfg.max_iters + 1))
    assert rates == [get_lr(it, cfg) for it in iters]
    assert max(rates) == cfg.learning_rate and rates[-1] == cfg.min_lr and "wsd" in title
    out = tmp_path / "lr.png"
    assert plot.main([f"--lr_config={CPU_RECIPE}", f"--out={out}"]) == 0
    assert_png(out)
    # Beside loss curves it is a third panel.
    assert plot.main([str(runs[0]), f"--lr_config={CPU_RECIPE}", f"--out={out}"]) == 0
    assert_png(out)


@pytest.mark.slow
def test_without_matplotlib_one_line_says_how_to_get_it(runs, monkeypatch, capsys, tmp_path):
    # None in sys.modules makes an import fail; the submodule too, in case it is loaded.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "none.png"
    assert plot.main([str(runs[0]), f"--out={out}"]) == 2
    assert capsys.readouterr().err == ("error: plot.py needs matplotlib: "
                                       "pip install matplotlib\n")
    assert not out.exists()


def test_bad_input_is_one_line(tmp_path, capsys):
    assert plot.main([str(tmp_path / "missing")]) == 2
    assert plot.main([]) == 2
    assert plot.main([str(tmp_path), "--out=loss.jpg"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "metrics.jsonl" in err and "RUN_DIR" in err
