"""The learning rate at each iteration: linear warmup, then a cosine or warmup-stable-decay."""
import math


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
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate -
                                                                     cfg.min_lr)
