"""The pipeline's bubble, measured with stages that spend a known time (--pp_sleep_ms=F).

On a CPU, real compute measures how the processes share the cores, not the schedule: p stages
on 2 cores run no faster than one process. So here each stage sleeps instead of computing, as
a GPU stage would be busy: F/p ms per micro-batch forward and 2F/p backward (a backward costs
about two forwards), the work of one model of forward time F split over p stages. Torch's
schedules run them for real (parallel/pipeline.py's, with point-to-point messages between
gloo processes); only the compute is a stand-in.

A step of m micro-batches keeps each stage busy m * 3F/p; the rest of its time is the bubble,
measured as 1 - m * 3F/p / (time per step), beside the formula (p-1)/(m+p-1). Each stage also
counts the micro-batches whose backward has not run yet: their activations are what it holds.

    torchrun --standalone --nproc_per_node=4 -m tools.bench --pp=4 --pp_sleep_ms=80
"""
import statistics
import time

import torch
from torch import nn


class _Sleep(torch.autograd.Function):
    """x unchanged; its backward sleeps the stage's backward time, and frees a micro-batch."""

    @staticmethod
    def forward(ctx, x, stage):
        ctx.stage = stage
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.stage.backward_s)
        ctx.stage.held -= 1
        return grad, None


class SleepingStage(nn.Module):
    """A stage that computes nothing of note and spends forward_s, then backward_s, seconds per
    micro-batch; it records the most micro-batches it held at once (peak_held)."""

    def __init__(self, forward_s, backward_s):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.forward_s, self.backward_s, self.held, self.peak_held = forward_s, backward_s, 0, 0

    def forward(self, x):
        time.sleep(self.forward_s)
        self.held += 1
        self.peak_held = max(self.peak_held, self.held)
        return _Sleep.apply(x * self.weight, self)


def bench_bubble(cfg, layout, device, microbatches, repeats=5):
    """For each schedule and each m in microbatches: the median time per step over repeats,
    the idle share measured and by the formula, and the most micro-batches a stage held (the
    largest over the stages). Every rank must call this; rank 0's list is the result."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    p = layout.pp
    forward_s = cfg.pp_sleep_ms / 1000 / p
    group = layout.mesh["pp"].get_group() if p > 1 else torch.distributed.group.WORLD
    rows = []
    for name, kind in (("gpipe", ScheduleGPipe), ("1f1b", Schedule1F1B)):
        for m in microbatches:
            if name == "1f1b" and m < p:  # torch's 1F1B refuses it (mesh.check says why)
                rows.append(dict(schedule=name, p=p, m=m, ms_per_step=None))
                continue
            stage = SleepingStage(forward_s, 2 * forward_s)
            schedule = kind(PipelineStage(stage, layout.pp_rank, p, torch.device(device),
                                          group=group), m, loss_fn=lambda y, _: y.sum())
            x, times = torch.ones(m, 4), []
            for _ in range(repeats + 1):  # the first step sets the stages up: not timed
                torch.distributed.barrier()
                start = time.perf_counter()
                schedule.step(x, target=x, losses=[])
                torch.distributed.barrier()
                times.append(time.perf_counter() - start)
                if len(times) == 1:  # count from here: setting up ran a forward of its own
                    stage.held = stage.peak_held = 0
            step_s = statistics.median(times[1:])
            held = torch.tensor(float(stage.peak_held))
            torch.distributed.all_reduce(held, op=torch.distributed.ReduceOp.MAX)
            rows.append(dict(schedule=name, p=p, m=m, ms_per_step=step_s * 1000,
                             idle_measured=1 - m * 3 * forward_s / step_s,
                             idle_formula=(p - 1) / (m + p - 1), peak_held=int(held)))
    return rows


def bubble_table(rows, sleep_ms):
    """The measurements as a table, for the terminal."""
    lines = [f"pipeline bubble, stages sleeping F/p forward and 2F/p backward, F = {sleep_ms:g} "
             "ms", f"{'schedule':<10}{'p':>3}{'m':>4}{'ms/step':>10}{'ideal':>8}"
             f"{'idle measured':>15}{'(p-1)/(m+p-1)':>15}{'held':>6}"]
    for r in rows:
        if r["ms_per_step"] is None:
            lines.append(f"{r['schedule']:<10}{r['p']:>3}{r['m']:>4}   1F1B needs m >= p")
            continue
        ideal = r["m"] * 3 * sleep_ms / r["p"]  # busy time alone, no bubble
        lines.append(f"{r['schedule']:<10}{r['p']:>3}{r['m']:>4}{r['ms_per_step']:>10.0f}"
                     f"{ideal:>8.0f}{r['idle_measured']:>15.0%}{r['idle_formula']:>15.0%}"
                     f"{r['peak_held']:>6}")
    return "\n".join(lines)
