"""Muon (Jordan et al. 2024): momentum whose every update is orthogonalised, for the hidden
matrices of the Blocks; AdamW for everything else (embeddings, head, norms, biases).

A gradient matrix is dominated by a few directions: its largest singular values dwarf the rest,
so a plain step moves the weights far along those and barely along the others. Muon replaces
the momentum matrix M = U S V^T by (nearly) U V^T: the same directions, every singular value
set to about 1, so that each step changes the matrix as much along every direction it has. A
few Newton-Schulz iterations, only matmuls, approximate U V^T without an SVD. It suits matrices
that map one hidden vector to another; an embedding's rows are looked up one token at a time,
and the head's outputs are scored one by one, so those stay with AdamW, as do the vectors.

Cost: each step, 5 iterations of 3 matmuls per matrix, with its smaller side k: about 5 * 4 *
k / (6 * tokens per iteration) of the model's own FLOPs (the CPU recipe: 0.5x of them). Under
FSDP or TP a rank holds part of each matrix, and the orthogonalisation needs all of it: every
rank gathers the whole update of every matrix (one more all-gather of the Blocks per step) and
orthogonalises all of them.
"""
import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from training.runtime import native_bfloat16

# A quintic iteration X <- aX + b(XX^T)X + c(XX^T)^2 X, its coefficients chosen (Keller Jordan's
# Muon post) to push every singular value towards 1 fast, not exactly to 1: 0.7 to 1.2 is enough.
A, B, C = 3.4445, -4.7750, 2.0315


def orthogonalise(m, steps=5):
    """About U V^T for the matrix m = U S V^T. A DTensor (a rank's shard) is gathered whole,
    orthogonalised, and split again as it was. In bfloat16 on GPUs that have it natively; in
    float32 elsewhere (a CPU without bfloat16 units takes 30x longer in it)."""
    if isinstance(m, DTensor):
        whole = orthogonalise(m.full_tensor(), steps)
        return distribute_tensor(whole, m.device_mesh, m.placements, src_data_rank=None)
    x = m.to(torch.bfloat16 if native_bfloat16(str(m.device)) else torch.float32)
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T  # (k, n), k <= n: the Gram matrix X X^T is the small (k, k) one
    x = x / (x.norm() + 1e-7)  # singular values at most 1, where the iteration converges
    for _ in range(steps):
        gram = x @ x.T  # (k, k)
        poly = torch.addmm(gram, gram, gram, beta=B, alpha=C)  # B gram + C gram^2, fused
        x = torch.addmm(x, poly, x, beta=A)  # A x + poly x
    return (x if wide else x.T).to(m.dtype)


class MuonAdamW(torch.optim.AdamW):
    """AdamW (fused) whose param groups marked muon=True take Muon's update instead: momentum
    (nesterov), orthogonalised by ns_steps iterations, scaled by sqrt(max(1, rows / cols)) so
    that tall and wide matrices move alike, and decoupled weight decay.

    Like the fused AdamW, it honours found_inf on the device: a step whose flag is set changes
    neither the weights nor the momentum (training/stopping.py, StopCheck, relies on it)."""

    @torch.no_grad()
    def step(self, closure=None):
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            if not group.get("muon"):
                continue
            lr, decay, beta = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # a step count too, as AdamW's (and its loading) expects
                    state.update(step=torch.zeros((), device=p.device),
                                 momentum_buffer=torch.zeros_like(p))
                buf = state["momentum_buffer"]
                new_buf = buf.lerp(p.grad, 1 - beta)
                nesterov = p.grad.lerp(new_buf, beta)  # momentum's look-ahead
                update = orthogonalise(nesterov, group["ns_steps"])
                rows, cols = p.shape  # whole, also for a shard
                new_p = p * (1 - lr * decay) - update * (lr * max(1, rows / cols) ** 0.5)
                for old, new in ((buf, new_buf), (p, new_p)):  # each rank its own shard
                    old, new = _local(old), _local(new)
                    old.copy_(new if found_inf is None else torch.where(found_inf > 0, old, new))
                state["step"] += 1 if found_inf is None else 1 - found_inf
                p.grad = None  # done with: AdamW's step passes over parameters without one
        return super().step(closure)


def _local(t):
    """A DTensor's shard on this rank; a plain tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t
