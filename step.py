"""One training step in its pieces: the optimizer, the learning rate, forward and backward over
the micro-steps, and gradient clipping.

train.py's loop calls them in this order, then takes the optimizer step; bench.py times the
same calls, so what it measures is what training runs.
"""
import math
from contextlib import nullcontext

import torch

from runtime import device_type


def make_optimizer(model, cfg, device):
    """AdamW decaying the 2-D weights (matmuls, embeddings) but not biases or norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates every parameter in one launch; CUDA and the CPU have it.
    fused = device_type(device) in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=fused)


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

    Under DDP (model wrapped) only the last backward all-reduces the gradients: the ranks
    exchange them once per iteration, not once per micro-step."""
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    loss_sum = 0.0
    for micro, (x, y) in enumerate(batches):
        last = micro == micro_steps - 1
        with (model.no_sync() if ddp and not last else nullcontext()), ctx:
            _, loss = model(x, y)
            loss = loss / micro_steps
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    return loss_sum


def clip_gradients(model, optimizer, scaler, grad_clip):
    """Undo the float16 loss scaling, then scale the gradients down so that their global
    norm is at most grad_clip (0: no limit). Returns the norm before clipping, as a tensor."""
    scaler.unscale_(optimizer)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
