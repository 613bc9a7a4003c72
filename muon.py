"""Muon (Keller Jordan et al., 2024): momentum whose update for each weight matrix is
orthogonalised, so that every direction of the matrix learns at the same rate.

It suits the 2-D weights inside the transformer blocks; embeddings, the output head, biases
and norms keep AdamW, in the same optimizer, so that one learning-rate schedule, one gradient
scaler and one checkpoint entry serve both.
"""
import torch


def orthogonalize(g, steps=5):
    """Push the singular values of g towards 1 (U S V^T -> ~U V^T) with a quintic
    Newton-Schulz iteration in bfloat16. The coefficients, from Muon's authors, trade
    exactness (singular values land in about [0.7, 1.2]) for convergence in 5 steps."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + 1e-7)  # the spectral norm is now at most 1, where the iteration works
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Param groups with use_muon=True take Muon steps; the others take AdamW steps.

    Every group needs lr and weight_decay; Muon groups use momentum, AdamW groups betas."""

    def __init__(self, param_groups, momentum=0.95, betas=(0.9, 0.95), eps=1e-8):
        super().__init__(param_groups, dict(momentum=momentum, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled weight decay
                if group["use_muon"]:
                    self._muon(p, group)
                else:
                    self._adamw(p, group)

    def _muon(self, p, group):
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - group["momentum"])
        update = p.grad.lerp(buf, group["momentum"])  # Nesterov: look one step ahead
        # An orthogonal update has RMS 1/sqrt(max dim); this rescales wide and tall alike.
        scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
        p.add_(orthogonalize(update), alpha=-group["lr"] * scale)

    def _adamw(self, p, group):
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
        denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / bias1)
