"""The run's log: what train.py prints, and metrics.jsonl, one JSON object per line (and
Weights & Biases with wandb_log). Evaluation rows hold iter, train_loss, val_loss, elapsed_s;
training rows iter, loss, lr, ms (per iteration), tokens_per_sec and mfu.
"""
import errno
import json
import os
import time
from dataclasses import asdict

from training import accounting, runtime


def format_duration(seconds):
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsError(RuntimeError):
    """metrics.jsonl cannot be written, most often because the disk is full."""


def _write_error(path, e):
    if e.errno == errno.ENOSPC:
        return MetricsError(f"no space left on device: cannot write {path}")
    return MetricsError(f"cannot write {path}: {e.strerror or e}")


class MetricsLog:
    """Rank 0 prints and writes; every rank calls step(), which averages the loss over them."""

    def __init__(self, run):
        self.run, self.file, self.wandb = run, None, None
        cfg = run.cfg
        self.tokens_per_iter = accounting.tokens_per_iter(cfg)
        self.flops_per_iter = (accounting.flops_per_token(run.raw_model.config, cfg.block_size)
                               * self.tokens_per_iter)
        self.peak = accounting.peak_flops(run.device, run.dtype)  # None where unknown
        if run.rank == 0:
            self.path = os.path.join(cfg.out_dir, "metrics.jsonl")
            # A fresh run starts its log; a resumed one (even from iteration 0), or an
            # evaluation, adds to it.
            resumed = cfg.init_from == "resume" or run.iter_num > 0 or cfg.eval_only
            try:
                if resumed and os.path.exists(self.path):  # cut a row half written when a
                    with open(self.path, "rb+") as f:  # run died (a full disk, a kill)
                        f.truncate(f.read().rfind(b"\n") + 1)
                self.file = open(self.path, "a" if resumed else "w")
            except OSError as e:
                raise _write_error(self.path, e) from None
            if cfg.wandb_log:
                import wandb  # optional: only needed when asked for
                self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name,
                                        config=asdict(cfg))
        # elapsed_s counts training time across resumes; the time left, this process's pace
        self.t_loop = self.t_last = time.time()
        self.iter_last = run.iter_num  # that of the last step line, or where this process began
        self.t_start = self.t_loop - run.elapsed_s

    def elapsed(self):
        """Seconds of training since the run began, earlier processes included."""
        return time.time() - self.t_start

    def write(self, **row):
        if self.file is None:
            return
        try:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        except OSError as e:
            self.close()  # so that the unwritten row is not tried again at exit
            raise _write_error(self.path, e) from None
        if self.wandb is not None:
            self.wandb.log(row, step=row["iter"])

    def evaluation(self, iter_num, losses, seconds):
        """An evaluation (and its checkpoint) that took seconds: not counted in the time
        per iteration of the next step line."""
        self.t_last += seconds
        elapsed = self.elapsed()
        self.write(iter=iter_num, train_loss=losses["train"], val_loss=losses["val"],
                   elapsed_s=round(elapsed, 2))
        if self.run.rank == 0:
            print(f"eval {iter_num}: train loss {losses['train']:.4f}, "
                  f"val loss {losses['val']:.4f} ({elapsed:.1f} s)")

    def step(self, iter_num, loss, lr):
        """Every log_interval iterations: loss and lr, the time per iteration since the last
        call, throughput, MFU (model FLOPs / time / the device's peak) and the time left."""
        cfg = self.run.cfg
        loss = runtime.all_reduce_mean([float(loss)], self.run.device, self.run.world_size)[0]
        now = time.time()  # per iteration since the last line (fewer after a resume)
        dt = (now - self.t_last) / (iter_num - self.iter_last)
        self.t_last, self.iter_last = now, iter_num
        mfu = self.flops_per_iter / dt / (self.peak * self.run.world_size) if self.peak else None
        eta = (now - self.t_loop) / (iter_num - self.run.iter_num) * (cfg.max_iters - iter_num)
        self.write(iter=iter_num, loss=loss, lr=lr, ms=dt * 1000,
                   tokens_per_sec=self.tokens_per_iter / dt, mfu=mfu)
        if self.run.rank == 0:
            mfu_text = f"{mfu * 100:.1f}%" if mfu is not None else "n/a"
            print(f"iter {iter_num}/{cfg.max_iters} | loss {loss:.4f} | lr {lr:.2e} | "
                  f"{dt * 1000:.1f} ms | {self.tokens_per_iter / dt:,.0f} tok/s | mfu "
                  f"{mfu_text} | eta {format_duration(eta)}", flush=True)

    def whole_split(self, iter_num, losses):
        """The validation loss over every token of the split, at the end of a run."""
        self.write(iter=iter_num, whole_val_loss=losses["val"])
        if self.run.rank == 0:
            print(f"final: val loss {losses['val']:.4f} over the whole validation split "
                  "(the evaluations above estimate it from eval_iters batches)", flush=True)

    def close(self):
        file, self.file = self.file, None
        if file is not None:
            try:
                file.close()
            except OSError:  # a buffered row that cannot be written: the error was raised
                pass
