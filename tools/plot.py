"""Draw the loss curves of training runs, and the learning-rate schedule of a config.

    python -m tools.plot out-shakespeare-char                  # out-shakespeare-char/loss.png
    python -m tools.plot out-a out-b --out=compare.png          # two runs in one picture
    python -m tools.plot --lr_config=config/train_shakespeare_char_cpu.toml   # no run needed

A run's metrics.jsonl (written by train.py) gives its training loss, one batch every
log_interval iterations, and its validation loss at every evaluation. Both are drawn against
iterations and against seconds of training, each run labelled by its folder. The seconds add
up the time per iteration of each logged row, which covers all the loop did since the row
before it, evaluations included (start-up is not). So a resumed run, whose rows were appended,
draws as one curve: the iterations it ran again replace the first tries, and the time lost
between the crash and the restart is not counted.

--lr_config draws, in a panel of its own, the learning rate that train.py would use at each
iteration with that config's settings.
"""
import json
import os
import sys
from dataclasses import dataclass

import numpy as np

from tools.common import check_output_file
from training.settings import ConfigError, TrainConfig, parse_config, run_main
from training.step import get_lr


@dataclass
class PlotConfig:
    out: str = ""  # the picture to write; default: loss.png in the first run's folder
    lr_config: str = ""  # a TOML config file: also draw the learning rate its settings give

    def validate(self):
        if self.out and not self.out.endswith((".png", ".pdf", ".svg")):
            raise ConfigError(f"out must end in .png, .pdf or .svg, got {self.out!r}")
        return self


class PlotError(ValueError):
    """A run folder without metrics to draw, or no matplotlib."""


def read_curves(run_dir):
    """(train, val) for the run in run_dir: lists of (iteration, seconds, loss), in order of
    iteration. Where a resumed run logged an iteration again, its later row wins."""
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
    except OSError as e:
        raise PlotError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise PlotError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): not a "
                        "metrics file of train.py") from None
    rows, damaged = [], 0
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed process
            row = None
        if _is_row(row):
            rows.append(row)
        else:
            damaged += 1
    if damaged:
        print(f"note: skipped {damaged} damaged line(s) in {path}", file=sys.stderr)
    train = {r["iter"]: r for r in rows if "loss" in r}
    val = {r["iter"]: r for r in rows if "val_loss" in r}
    if not train and not val:
        raise PlotError(f"{path} holds no losses yet")
    # The clock at each logged iteration: a row's ms is the mean over the iterations since
    # the row before.
    iters, seconds = [0], [0.0]
    for it in sorted(train):
        seconds.append(seconds[-1] + train[it]["ms"] / 1000 * (it - iters[-1]))
        iters.append(it)
    # An evaluation at iteration i runs before step i: at the clock of row i, near enough.
    return ([(it, s, train[it]["loss"]) for it, s in zip(iters[1:], seconds[1:])],
            [(it, float(np.interp(it, iters, seconds)), val[it]["val_loss"])
             for it in sorted(val)])


def _is_row(row):
    """Whether row is one train.py writes: an object with an integer iter and, for the losses
    drawn, numbers: loss with ms (a training row), or val_loss (an evaluation)."""
    def number(key):
        return isinstance(row.get(key), (int, float)) and not isinstance(row[key], bool)
    return (isinstance(row, dict) and type(row.get("iter")) is int
            and ((number("loss") and number("ms")) or number("val_loss")
                 or not ({"loss", "val_loss"} & row.keys())))


def lr_schedule(config_path):
    """(iterations, learning rates) that train.py's schedule gives with the config's settings,
    and a title naming it."""
    cfg = parse_config(TrainConfig, [config_path]).validate()
    iters = range(0, cfg.max_iters + 1, max(1, cfg.max_iters // 5000))  # enough to draw
    shape = cfg.schedule if cfg.decay_lr else "constant"
    return list(iters), [get_lr(it, cfg) for it in iters], f"{config_path}: {shape}"


def draw(runs, schedule, out):
    """Save a figure to out: for runs ({label: (train, val)}) loss against iterations and
    against seconds; for schedule ((iterations, rates, title)) the learning rate. Returns it."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no window, no global state
    except ImportError:
        raise PlotError("plot.py needs matplotlib: pip install matplotlib") from None
    panels = (2 if runs else 0) + (1 if schedule else 0)
    fig = Figure(figsize=(5 * panels, 3.6), layout="constrained")
    axes = list(fig.subplots(1, panels, squeeze=False)[0])
    if runs:
        by_iter, by_time = axes.pop(0), axes.pop(0)
        for color, (label, (train, val)) in enumerate(runs.items()):
            for ax, x in ((by_iter, 0), (by_time, 1)):
                ax.plot([p[x] for p in train], [p[2] for p in train], color=f"C{color}",
                        alpha=0.35, linewidth=1, label=f"{label}: train (one batch)")
                ax.plot([p[x] for p in val], [p[2] for p in val], color=f"C{color}",
                        marker="o", markersize=3, label=f"{label}: validation")
        by_iter.set(xlabel="iteration", ylabel="loss")
        by_time.set(xlabel="seconds of training", ylabel="loss")
        by_iter.legend(fontsize="small")
        for ax in (by_iter, by_time):
            ax.grid(alpha=0.3)
    if schedule:
        ax = axes.pop(0)
        iters, rates, title = schedule
        ax.plot(iters, rates)
        ax.set(xlabel="iteration", ylabel="learning rate", title=title)
        ax.title.set_fontsize("small")
        ax.grid(alpha=0.3)
    fig.savefig(out, dpi=80)  # small files, still readable
    return fig


def plot(run_dirs, cfg):
    """Read the runs and the config that cfg names, draw them, and say where the picture is."""
    if not run_dirs and not cfg.lr_config:
        raise ConfigError("give one or more run folders (RUN_DIR ...), or --lr_config=FILE")
    # Each run is labelled by its folder's name, or its whole path where two names are alike.
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    labels = [n if names.count(n) == 1 else os.path.normpath(d)
              for n, d in zip(names, run_dirs)]
    runs = {label: read_curves(d) for label, d in zip(labels, run_dirs)}
    schedule = lr_schedule(cfg.lr_config) if cfg.lr_config else None
    out = cfg.out or (os.path.join(run_dirs[0], "loss.png") if run_dirs else "lr_schedule.png")
    check_output_file("out", out)
    draw(runs, schedule, out)
    print(f"wrote {out}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    run_dirs = [a for a in argv if not a.startswith("-")]
    flags = [a for a in argv if a.startswith("-")]
    return run_main(PlotConfig, lambda cfg: plot(run_dirs, cfg), flags, __doc__, (PlotError,))


if __name__ == "__main__":
    sys.exit(main())
