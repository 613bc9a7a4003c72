"""Stopping: what a signal does to a run, and what a diverged loss does.

SIGINT, SIGTERM or SIGHUP (Ctrl-C, a preempted machine, a closed terminal) to any rank asks the
run to stop soon, with a checkpoint: the handler (StopSignals) only raises a flag; the ranks
agree on it with the step's other flags (StopCheck.check); the loop then ends at its next head,
where training/checkpoint.py's Milestones saves. One process stops within a micro-step
(StopCheck.interrupted): that iteration is dropped, and redone on resume. A second Ctrl-C exits
at once. A loss or gradient norm that is not finite on any rank skips that step's update on
the device and stops every rank with TrainingError; no checkpoint is written from a diverged
run (training/checkpoint.py), so the last one kept holds finite weights.
"""
import os
import signal
import sys

import torch


class TrainingError(RuntimeError):
    """Training cannot go on (a diverged loss); the message says what to change."""


def diverged_error(what, out_dir):
    """The one error of a diverged run. No checkpoint is ever written from one (Milestones
    refuses a non-finite evaluation, save non-finite weights), so the last one kept is good."""
    return TrainingError(f"{what}. No checkpoint is written from a diverged run: the last one "
                         f"in {out_dir}, if any, holds the last finite weights. Try a lower "
                         "learning_rate or a longer warmup_iters")


class StopCheck:
    """Whether to stop: after a signal (SIGINT, SIGTERM, SIGHUP) to any rank, all ranks stop after
    the same iteration (self.stopping, which training/checkpoint.py's Milestones acts on); after
    a loss or gradient norm that is not finite on any rank, every rank raises TrainingError, and
    that step's update never reaches the weights.

    Without making the host wait for the GPU at every step: each step's flags (a signal came,
    diverged, loss, norm) are reduced over the ranks and copied to the host in the background,
    and read one step later, or at once before anything is evaluated or saved (settle)."""

    def __init__(self, run):
        self.run, self.signals, self.pending = run, StopSignals(), None
        self.stopping = False  # the ranks agreed to stop: the run ends at the next milestone

    def check(self, iter_num, loss, norm):
        """Queue this step's flags (call it before the optimizer step), and act on the previous
        step's: set self.stopping if they say stop; raise TrainingError if they say diverged."""
        run = self.run
        diverged = (~torch.isfinite(loss if run.scaler.is_enabled() else norm)).float()
        if not run.scaler.is_enabled():
            # The fused AdamW (and MuonAdamW) reads found_inf inside its kernel: where it is 1,
            # the whole update is skipped on the device, weights and moments untouched. That is
            # float16's GradScaler's own protocol (it sets the flag from its overflow check); here
            # it lets the host read the verdict a step late, without waiting for the GPU now.
            run.optimizer.found_inf = diverged
        signalled = torch.full((), float(self.signals.received), device=run.device)
        flags = torch.stack([signalled, diverged, loss.float(), norm.float()])
        if run.world_size > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        self.settle()
        on_gpu = run.device.startswith("cuda")
        host = flags.to("cpu", non_blocking=on_gpu)
        self.pending = (iter_num, host, torch.cuda.Event() if on_gpu else None)
        if on_gpu:
            self.pending[2].record()

    def interrupted(self):
        """One process asked to stop stops at once, within a micro-step: it has no other
        rank to agree with."""
        self.stopping |= self.run.world_size == 1 and self.signals.received
        return self.stopping and self.run.world_size == 1

    def until_stop(self, batches, filler=None):
        """The batches of an evaluation, until they run out or a signal comes: then
        self.stopping is set and no more are given. Ranks may hold different numbers of
        batches; under DDP they agree before every batch (a collective of two numbers: a
        signal came, a batch is left) until every rank's batches are done. A rank whose
        batches are done while others' are not is given filler, if any (under FSDP every
        forward gathers weights from all ranks: one rank missing would hang the others)."""
        batches = iter(batches)
        while True:
            batch = next(batches, None)
            if self.run.world_size == 1:
                signalled, left = self.signals.received, batch is not None
            else:
                flags = torch.tensor([float(self.signals.received), float(batch is not None)],
                                     device=self.run.device)
                torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
                signalled, left = flags.tolist()
            if signalled:
                self.stopping = True
                return
            if not left:
                return
            if batch is not None or filler is not None:
                yield filler if batch is None else batch

    def settle(self):
        """Read the pending flags, waiting for them if need be; set self.stopping if they say
        stop."""
        if self.pending is None:
            return
        iter_num, flags, copied = self.pending
        self.pending = None
        if copied is not None:
            copied.synchronize()
        signalled, diverged, loss, norm = flags.tolist()
        if diverged:
            raise diverged_error(f"iteration {iter_num}: the loss or gradient norm is not "
                                 f"finite (loss {loss:.4g}, gradient norm {norm:.4g}); stopped "
                                 "before the update", self.run.cfg.out_dir)
        self.stopping |= bool(signalled)


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP (Ctrl-C, a preempted machine, a closed terminal) ask to stop
    soon, with a checkpoint; a second Ctrl-C exits at once, with no new checkpoint."""

    def __init__(self):
        self.received = False
        self.previous = {s: signal.signal(s, self._handle)
                         for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            # Not KeyboardInterrupt, a screen of traceback through collectives and a save:
            # checkpoints are written atomically, so leaving at once keeps the last one whole.
            print("second Ctrl-C: exiting now; the last checkpoint saved is kept",
                  file=sys.stderr, flush=True)
            os._exit(130)
        self.received = True
        print(f"{signal.Signals(signum).name} received: stopping with a checkpoint",
              file=sys.stderr, flush=True)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
