"""Stopping: what a signal does to a run, and what a diverged loss does.

SIGINT, SIGTERM or SIGHUP (Ctrl-C, a preempted machine, a closed terminal) to any rank asks the
run to stop soon, with a checkpoint. The handler (training/process.py's StopSignals, installed
before anything is written, before torch even loads) only raises a flag. Within an iteration
the ranks agree on it before every micro-step (StopCheck.interrupted), so a stop comes within a
micro-step or two in every layout, and the unfinished iteration is dropped: its gradients are
thrown away, and the resumed run does it again, from its first micro-step. The loop then ends at
its next head, where training/checkpoint.py's Milestones saves, and the process exits with
STOPPED. A second Ctrl-C exits at once. A loss or gradient norm that is not finite on any rank
skips that step's update on the device and stops every rank with TrainingError; no checkpoint
is written from a diverged run (training/checkpoint.py), so the last one kept holds finite
weights.
"""
import torch


# A stopped run's exit status: EX_TEMPFAIL (sysexits.h), "try again later". Not 0, so that a
# scheduler can tell a stop from the end of the run; not a failure's 1 or 2 either. torchrun
# restarts its workers on any status but 0 when given --max-restarts (a restart resumes where
# the command says --init_from=auto): a stop of one worker is then a resume; but torchrun never
# restarts after a signal to itself, so a stop of the whole job (Ctrl-C, a preempted machine)
# ends it, as it should.
STOPPED = 75


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

    def __init__(self, run, signals):
        self.run, self.signals, self.pending = run, signals, None  # signals: StopSignals
        self.stopping = False  # the ranks agreed to stop: the run ends at the next milestone
        # Ranks agree on a stop within the iteration on a group of their own, on the host
        # (gloo), so that its small all-reduces wait for nothing else (interrupted).
        self.side = torch.distributed.new_group(backend="gloo") if run.world_size > 1 else None
        self.asked = None  # the all-reduce the last interrupted() started: (flag, work)

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
        """Whether to stop now, within the iteration (called before every micro-step, and once
        after the last): a stop comes within a micro-step or two, even in an iteration of an
        hour. One process stops at once. Ranks must stop at the same micro-step (the next one's
        collectives would wait for ever), without waiting on each other at every one: each call
        starts an all-reduce of this rank's flag on the side group and reads the one that the
        previous call started, long since arrived. Every rank reads the same verdict at the
        same call, so all stop together, one micro-step after the first saw the signal."""
        if self.stopping or self.run.world_size == 1:
            self.stopping |= self.signals.received
            return self.stopping
        if self.asked is not None:
            flag, work = self.asked
            work.wait()
            self.stopping = bool(flag.item())
        if not self.stopping:
            flag = torch.tensor([float(self.signals.received)])
            self.asked = flag, torch.distributed.all_reduce(
                flag, op=torch.distributed.ReduceOp.MAX, group=self.side, async_op=True)
        return self.stopping

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
