"""One training step in its pieces: the optimizer, the learning rate, forward and backward over
the micro-steps, gradient clipping, and the check that decides whether to go on.

train.py's loop calls them in this order, then takes the optimizer step; bench.py times the
same calls, so what it measures is what training runs.
"""
import math

import torch

from parallel.data_parallel import gradient_sync
from parallel.mesh import by_mesh, clip_grad_norm_
from training import runtime
from training.muon import MuonAdamW


def make_optimizer(model, cfg):
    """AdamW decaying the 2-D weights (matmuls, embeddings) but not biases or norms; with
    optimizer=muon, Muon takes the Blocks' matrices (muon.py). Each kind in groups of one kind
    of tensor (parallel/mesh.py, by_mesh), as the fused kernel needs. A Muon group's lr_scale makes the
    one schedule peak at muon_lr there."""
    kinds = {"muon": [], "decay": [], "rest": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            muon = cfg.optimizer == "muon" and name.startswith("transformer.h.") and p.dim() == 2
            kinds["muon" if muon else "decay" if p.dim() >= 2 else "rest"].append(p)
    muon_group = {"muon": True, "lr_scale": cfg.muon_lr / cfg.learning_rate, "momentum": 0.95,
                  "ns_steps": cfg.muon_ns_steps}
    groups = [{"params": group, "weight_decay": 0.0 if kind == "rest" else cfg.weight_decay,
               **(muon_group if kind == "muon" else {})}
              for kind, params in kinds.items() for group in by_mesh(params)]
    # The fused kernel (CUDA, MPS and the CPU have it) updates every parameter in one launch,
    # and skips the whole update on the device when its found_inf flag is set (StopCheck.check).
    optimizer = MuonAdamW if cfg.optimizer == "muon" else torch.optim.AdamW
    return optimizer(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)


def get_lr(it, cfg):
    """Linear warmup for warmup_iters, then decay to min_lr at lr_decay_iters: along a cosine,
    or (wsd) flat until the last cooldown_frac of the way, then in a straight line."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    if cfg.schedule == "wsd":
        cooldown_start = cfg.lr_decay_iters * (1 - cfg.cooldown_frac)
        if it < cooldown_start:
            return cfg.learning_rate
        progress = (it - cooldown_start) / (cfg.lr_decay_iters - cooldown_start)
        return cfg.learning_rate + progress * (cfg.min_lr - cfg.learning_rate)
    progress = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # from 1 down to 0
    return cfg.min_lr + cosine * (cfg.learning_rate - cfg.min_lr)


def forward_backward(model, batches, ctx, scaler, micro_steps):
    """Forward and backward over one iteration's micro_steps batches (x, y): the gradients
    add up over them, each loss divided by micro_steps, so the sum is the gradient of the
    mean loss over the whole batch. Returns that mean loss, as a tensor (no device sync).

    Under DDP or FSDP only the last backward reduces the gradients over the ranks
    (parallel/data_parallel.py, gradient_sync)."""
    loss_sum = 0.0
    for micro, (x, y) in enumerate(batches):
        with gradient_sync(model, micro == micro_steps - 1), ctx:
            _, loss = model(x, y)
            loss = loss / micro_steps
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    return loss_sum


def clip_gradients(model, optimizer, scaler, grad_clip):
    """Undo the float16 loss scaling, then scale the gradients down so that their global
    norm is at most grad_clip (0: no limit). Returns the norm before clipping, as a tensor."""
    scaler.unscale_(optimizer)
    return clip_grad_norm_(model.parameters(), grad_clip or float("inf"))


class TrainingError(RuntimeError):
    """Training cannot go on (a diverged loss); the message says what to change."""


class StopCheck:
    """Whether to stop: after a signal (SIGINT, SIGTERM, SIGHUP) to any rank, all ranks stop after
    the same iteration (self.stopping, which training/checkpoint.py's Milestones acts on); after
    a loss or gradient norm that is not finite on any rank, every rank raises TrainingError, and
    that step's update never reaches the weights.

    Without making the host wait for the GPU at every step: each step's flags (a signal came,
    diverged, loss, norm) are reduced over the ranks and copied to the host in the background,
    and read one step later, or at once before anything is evaluated or saved (settle)."""

    def __init__(self, run):
        self.run, self.signals, self.pending = run, runtime.StopSignals(), None
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
        signal = torch.full((), float(self.signals.received), device=run.device)
        flags = torch.stack([signal, diverged, loss.float(), norm.float()])
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
        if self.run.world_size == 1 and self.signals.received:
            self.stopping = True
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
                signal, left = self.signals.received, batch is not None
            else:
                flags = torch.tensor([float(self.signals.received), float(batch is not None)],
                                     device=self.run.device)
                torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
                signal, left = flags.tolist()
            if signal:
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
        signal, diverged, loss, norm = flags.tolist()
        if diverged:
            raise TrainingError(
                f"iteration {iter_num}: the loss or gradient norm is not finite (loss "
                f"{loss:.4g}, gradient norm {norm:.4g}); stopped before the update, the last "
                f"checkpoint in {self.run.cfg.out_dir} is untouched. Try a lower "
                "learning_rate or a longer warmup_iters")
        self.stopping = self.stopping or bool(signal)
