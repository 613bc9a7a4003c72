"""One training step in its pieces: the optimizer, the learning rate, forward and backward over
the micro-steps, gradient clipping, and the check that decides whether to go on.

train.py's loop calls them in this order, then takes the optimizer step; tools/bench times
the same calls, so what it measures is what training runs.
"""
import contextlib
import math

import torch

from parallel.pipeline import Pipeline
from training.muon import MuonAdamW


def make_optimizer(model, cfg):
    """AdamW decaying the 2-D weights (matmuls, embeddings) but not biases or norms; with
    optimizer=muon, Muon takes the Blocks' matrices (muon.py). Each kind in groups of one kind
    of tensor (by_mesh, below), as the fused kernel needs. A Muon group's lr_scale
    makes the one schedule peak at muon_lr there."""
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
    (gradient_sync). Under PP the pipeline's schedule runs them all, in its own order."""
    if isinstance(model, Pipeline):
        return model.forward_backward(batches, ctx)
    loss_sum = 0.0
    for micro, (x, y) in enumerate(batches):
        with gradient_sync(model, micro == micro_steps - 1), ctx:
            _, loss = model(x, y)
            loss = loss / micro_steps
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    return loss_sum


def gradient_sync(model, last):
    """The context of one micro-step: until the last, DDP and FSDP keep each rank's gradients
    to itself, exchanging them once per iteration (TP's all-reduces are in every pass)."""
    if hasattr(model, "set_requires_gradient_sync"):  # a module that fully_shard made
        model.set_requires_gradient_sync(last)
    elif isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def clip_gradients(model, optimizer, scaler, grad_clip):
    """Undo the float16 loss scaling, then scale the gradients down so that their global
    norm is at most grad_clip (0: no limit). Returns the norm before clipping, as a tensor."""
    scaler.unscale_(optimizer)
    stages = (model.counted, model.group) if isinstance(model, Pipeline) else ()
    return clip_grad_norm_(model.parameters(), grad_clip or float("inf"), *stages)


def clip_grad_norm_(parameters, max_norm, counted=None, stages=None):
    """Scale the gradients down so that their global norm is at most max_norm; return the
    norm before clipping, the same on every rank. A sharded gradient's norm is reduced over its
    mesh (each rank holds a part), then the groups' norms are combined. Under PP, the norm of
    the counted parameters (the head's copy of wte is not: Pipeline.counted) is combined over
    the stages' group: each stage holds some of the layers, and all clip by the same norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    own = grads if counted is None else [p.grad for p in counted if p.grad is not None]
    norms = [torch.nn.utils.get_total_norm(group) for group in by_mesh(own)]
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    if stages is not None:  # the square root of the sum of the stages' squared norms
        total = total.square()
        torch.distributed.all_reduce(total, group=stages)
        total = total.sqrt()
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as clip_grad_norm_ computes it
    for g in grads:
        (g.to_local() if hasattr(g, "to_local") else g).mul_(scale)
    return total


def by_mesh(tensors):
    """tensors in groups of one kind, plain or DTensors of one mesh, as fused AdamW and norms
    need (under TP whole weights are plain, split ones DTensors; 2-D has two meshes)."""
    groups = {}
    for t in tensors:
        groups.setdefault(getattr(t, "device_mesh", None), []).append(t)
    return list(groups.values())
