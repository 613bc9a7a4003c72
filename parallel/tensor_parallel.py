"""Tensor parallelism: the tp ranks of a row split every Block between them, each computing
its share of the heads and of the MLP's hidden units from the same batch.
"""
import torch


def tensor_parallel(model, mesh):
    """Megatron's layout (Shoeybi et al. 2019) over the tp ranks of mesh: in each pair of
    matmuls the first is split by output columns, the second by input rows:

        x ──┬── c_attn[cols 0] ── heads of rank 0 ── c_proj[rows 0] ──┐
            └── c_attn[cols 1] ── heads of rank 1 ── c_proj[rows 1] ──┴── all-reduce (+) ── y
        (and so c_fc, the activation, and the MLP's c_proj)

    Heads are independent, and so are the MLP's hidden units: from the whole x a rank computes
    its columns, then its rows' partial sum of y, with no exchange in between; one all-reduce
    per pair adds them up (one in backward sums x's gradient). Embeddings, norms and the head
    stay whole: a small part of a large model, and a split vocabulary would untie wte.
    c_attn's rows are [q; k; v]: a plain split would give rank 0 all of q and half of k. They
    are regrouped once, so each rank holds its own heads' q, k, v (checkpoints undo it)."""
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    plan = {"attn.c_attn": ColwiseParallel(), "attn.c_proj": RowwiseParallel(),
            "mlp.c_fc": ColwiseParallel(), "mlp.c_proj": RowwiseParallel()}
    for block in model.transformer.h.children():  # a stage's too
        with torch.no_grad():
            for p in block.attn.c_attn.parameters():
                p.copy_(regroup_qkv(p, mesh.size()))
        parallelize_module(block, mesh, plan)


def regroup_qkv(t, tp, undo=False):
    """c_attn's rows [q; k; v] (each n_embd long) regrouped as [q_0 k_0 v_0; q_1 k_1 v_1; ...],
    rank r's third of each side by side; undo goes back to GPT-2's order."""
    return t.unflatten(0, (tp, 3, -1) if undo else (3, tp, -1)).transpose(0, 1).flatten(0, 2)
