"""Spreading one run over many processes: by the data (DDP, FSDP), by the model (tensor
parallel, TP), and both (2-D). Each trains the same model as one process (tests/test_tp.py).

The processes form a grid, the device mesh: dp rows of tp ranks, rank = dp_rank * tp + tp_rank,
so the ranks of a row are neighbours, on one machine, where the links are fastest.
- DDP: every rank holds the whole model, trains on its share of the batch, and the gradients
  are averaged over the ranks (an all-reduce) after backward.
- FSDP (fsdp=true): each rank holds 1/dp of the weights, gradients and AdamW state (shard).
- TP (tp>1): the ranks of a row split every Block (tensor_parallel) and see the same batch:
  batches, dropout masks and evaluation shares go by data-parallel rank (train.py).
- 2-D (tp>1, fsdp=true): TP inside a row, FSDP down the columns (DDP cannot wrap DTensors).
"""
import contextlib
import os
from dataclasses import dataclass

import torch

from checkpoint import check_optimizer_state
from runtime import DeviceError


@dataclass
class Layout:
    """How a run is spread: dp_size data-parallel rows of tp ranks; this rank is in dp_rank."""
    dp_rank: int = 0
    dp_size: int = 1
    tp: int = 1
    fsdp: bool = False
    mesh: object = None  # the DeviceMesh ("dp", "tp"), under FSDP or TP

    @property
    def sharded(self):  # the weights are DTensors, which checkpoints gather
        return self.fsdp or self.tp > 1


def check(cfg, world_size, dtype):
    """Refuse, in one line, a layout that cannot run (float16's scaler would need a sharded
    variant; TP splits whole heads and the MLP's width evenly). cfg has the model's shape."""
    tp, what = cfg.tp, "fsdp=true" if cfg.fsdp else f"tp={cfg.tp}"
    if (cfg.fsdp or tp > 1) and "RANK" not in os.environ:
        raise DeviceError(f"{what} spreads the model over the processes of torchrun: run it "
                          "as torchrun --standalone --nproc_per_node=N train.py ...")
    if (cfg.fsdp or tp > 1) and dtype == torch.float16:
        raise DeviceError(f"{what} does not take float16: use --dtype=bfloat16 (or float32)")
    if world_size % tp:
        raise DeviceError(f"tp={tp} does not divide the {world_size} processes into rows")
    for name, size in (("n_head", cfg.n_head), ("4*n_embd", 4 * cfg.n_embd)):
        if size % tp:
            raise DeviceError(f"tp={tp} must divide {name} ({size}): each rank takes an equal "
                              "share of the heads and of the MLP's hidden units")
    if tp > 1 and world_size > tp and not cfg.fsdp:
        raise DeviceError(f"tp={tp} over {world_size} processes makes {world_size // tp} "
                          "data-parallel rows, which need --fsdp=true: DDP cannot wrap a "
                          "tensor-parallel model")
    if tp > 1 and cfg.compile:
        raise DeviceError("compile=true with tp>1 is not supported: use --compile=false")


def make_layout(cfg, rank, world_size, device):
    """The run's Layout; FSDP and TP get their device mesh (every rank must call this)."""
    mesh = None
    if cfg.fsdp or cfg.tp > 1:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(device.split(":")[0], (world_size // cfg.tp, cfg.tp),
                                mesh_dim_names=("dp", "tp"))
    return Layout(rank // cfg.tp, world_size // cfg.tp, cfg.tp, cfg.fsdp, mesh)


def release(layout):
    """Let go of the mesh's process groups at the end of a run: torch's DTensor caches keep
    the mesh alive, and the groups with it, past runtime.leave_process_group (see there)."""
    if layout.mesh is not None:
        getattr(layout.mesh, "_pg_registry", {}).clear()  # a private dict in torch 2.13


# ----------------------------------------------------------------------------- the layouts

def spread(model, layout, dtype):
    """Split the whole model, in place, as layout says: TP inside each row, then FSDP over them."""
    if layout.tp > 1:
        tensor_parallel(model, layout.mesh["tp"])
    if layout.fsdp:
        shard(model, layout.mesh["dp"], dtype)


def wrap_ddp(model, layout, device, local_rank):
    """model under DDP when the run is data parallel and unsharded; as it is otherwise."""
    if layout.dp_size == 1 or layout.sharded:
        return model
    # Gradients live in DDP's all-reduce buckets (no second copy); the model's only
    # buffers are rotary tables that never change, so nothing is broadcast per step.
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[local_rank] if device.startswith("cuda") else None,
        gradient_as_bucket_view=True, forward_sync_buffers=False)


def shard(model, mesh, dtype):
    """FSDP2: each Block, then the rest, becomes a unit whose weights, gradients and AdamW
    moments are split over mesh; its weights are gathered just before its forward (and its
    backward) and freed after, its gradients reduce-scattered. In 16 bits it computes in dtype,
    keeping the master weights and the gradient reductions in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    half = None if dtype == torch.float32 else dtype
    policy = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


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
    for block in model.transformer.h:
        with torch.no_grad():
            for p in block.attn.c_attn.parameters():
                p.copy_(regroup_qkv(p, mesh.size()))
        parallelize_module(block, mesh, plan)


def regroup_qkv(t, tp, undo=False):
    """c_attn's rows [q; k; v] (each n_embd long) regrouped as [q_0 k_0 v_0; q_1 k_1 v_1; ...],
    rank r's third of each side by side; undo goes back to GPT-2's order."""
    return t.unflatten(0, (tp, 3, -1) if undo else (3, tp, -1)).transpose(0, 1).flatten(0, 2)


# ----------------------------------------------------------------------------- around the step

def gradient_sync(model, last):
    """The context of one micro-step: until the last, DDP and FSDP keep each rank's gradients
    to itself, exchanging them once per iteration (TP's all-reduces are in every pass)."""
    if hasattr(model, "set_requires_gradient_sync"):  # a module that fully_shard made
        model.set_requires_gradient_sync(last)
    elif isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def by_mesh(tensors):
    """tensors in groups of one kind, plain or DTensors of one mesh, as fused AdamW and norms
    need (under TP whole weights are plain, split ones DTensors; 2-D has two meshes)."""
    groups = {}
    for t in tensors:
        groups.setdefault(getattr(t, "device_mesh", None), []).append(t)
    return list(groups.values())


def clip_grad_norm_(parameters, max_norm):
    """Scale the gradients down so that their global norm is at most max_norm; return the
    norm before clipping, the same on every rank. A sharded gradient's norm is reduced over its
    mesh (each rank holds a part), then the groups' norms are combined."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norms = [torch.nn.utils.get_total_norm(group) for group in by_mesh(grads)]
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as clip_grad_norm_ computes it
    for g in grads:
        (g.to_local() if hasattr(g, "to_local") else g).mul_(scale)
    return total


def after_evaluation(model, layout):
    """FSDP's root keeps its weights gathered after a forward without backward: free them."""
    if layout.fsdp:
        model.reshard()


# ----------------------------------------------------------------------------- checkpoints

def training_state(model, optimizer, layout):
    """(model state, optimizer state) to save, in the one format of every checkpoint: whole
    tensors on the CPU in GPT-2's layout, the optimizer's state numbered as one process's
    optimizer.state_dict() numbers it. Sharded (FSDP, TP): every rank must call this, as the
    shards are gathered from all of them (to rank 0, the one that saves)."""
    if not layout.sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint import state_dict as dcp
    whole = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = _gpt2_order(dcp.get_model_state_dict(model, options=whole), layout.tp)
    if optimizer.state:
        optim = dcp.get_optimizer_state_dict(model, optimizer, options=whole)  # keyed by name
    else:  # nothing to gather yet, and DCP would take a step to create the state
        optim = {"state": {}, "param_groups": _named_groups(model, optimizer)}
    if not optim:  # ranks other than 0 receive nothing
        return model_state, optim
    names, kind = _names(model, optimizer)
    number = {name: i for i, name in enumerate(names)}
    groups = {}  # one per kind of parameter, as one process has them
    for g in optim["param_groups"]:
        merged = groups.setdefault(kind[g["params"][0]], {**g, "params": []})
        merged["params"] = sorted(merged["params"] + [number[n] for n in g["params"]])
    return model_state, {
        "state": {number[n]: s for n, s in _gpt2_order(optim["state"], layout.tp).items()},
        "param_groups": [groups[k] for k in sorted(groups)]}


def load_optimizer_state(model, optimizer, state, layout):
    """Load a checkpoint's optimizer state, whichever way the run is spread over ranks now,
    once it is checked to fit the model (checkpoint.check_optimizer_state)."""
    names, kind = _names(model, optimizer)
    shapes = dict((name, p.shape) for name, p in model.named_parameters())  # whole, as DTensors
    check_optimizer_state(state, [(n, shapes[n]) for n in names],
                          [n for n in map(list(kind.values()).count, (0, 1, 2)) if n])
    if not layout.sharded:
        return optimizer.load_state_dict(state)
    if not state["state"]:  # saved before the first step: a new optimizer is the same
        return
    from torch.distributed.checkpoint import state_dict as dcp
    by_name = _gpt2_order({names[i]: s for i, s in state["state"].items()}, layout.tp, True)
    name_of = {param: name for name, param in model.named_parameters()}
    groups = [{**g, "params": [name_of[p] for p in g["params"]]} for g in optimizer.param_groups]
    dcp.set_optimizer_state_dict(model, optimizer, {"state": by_name, "param_groups": groups},
                                 options=dcp.StateDictOptions(full_state_dict=True))


def _names(model, optimizer):
    """The parameters' names as one process's optimizer numbers them (step.make_optimizer:
    Muon's matrices if any, the other decayed matrices, then the rest), and each one's kind."""
    muon = {p for g in optimizer.param_groups if g.get("muon") for p in g["params"]}
    kind = {n: 0 if p in muon else 1 if p.dim() >= 2 else 2 for n, p in model.named_parameters()}
    return sorted(kind, key=kind.get), kind  # sorted keeps the model's order within a kind


def _gpt2_order(state, tp, undo=False):
    """state (a model's, or the optimizer's moments, keyed by name) with c_attn's rows in
    GPT-2's order (undo: in tensor_parallel's order)."""
    def fix(t):
        if isinstance(t, dict):
            return {k: fix(v) for k, v in t.items()}
        return regroup_qkv(t, tp, not undo) if torch.is_tensor(t) and t.dim() > 0 else t
    return {k: fix(v) if tp > 1 and ".attn.c_attn." in k else v for k, v in state.items()}


def _named_groups(model, optimizer):
    """optimizer's param_groups, each parameter given by its name."""
    name_of = {param: name for name, param in model.named_parameters()}
    return [{**g, "params": [name_of[p] for p in g["params"]]} for g in optimizer.param_groups]
