"""A spread run's checkpoint: the shards of every rank, and the stages of a pipeline, gathered
into the one format that every checkpoint has (whole tensors in GPT-2's layout, the optimizer
numbered as one process numbers it), and spread back when a run resumes, whatever its layout
was and is now.
"""
import torch

from parallel.tensor_parallel import regroup_qkv
from training.safe_load import check_optimizer_state


def training_state(model, optimizer, layout):
    """(model state, optimizer state) to save, in the one format of every checkpoint: whole
    tensors on the CPU in GPT-2's layout, the optimizer's state numbered as one process's
    optimizer.state_dict() numbers it. Sharded (FSDP, TP) or pipelined: every rank must call
    this, as the shards and stages are gathered from all of them (to rank 0, which saves)."""
    if not layout.sharded and layout.pp == 1:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint import state_dict as dcp
    # Under PP every rank keeps its stage's whole tensors, for _gather_stages to send on.
    whole = dcp.StateDictOptions(full_state_dict=True, cpu_offload=layout.pp == 1)
    model_state = dcp.get_model_state_dict(model, options=whole)
    if optimizer.state:
        optim = dcp.get_optimizer_state_dict(model, optimizer, options=whole)  # keyed by name
    else:  # nothing to gather yet, and DCP would take a step to create the state
        optim = {"state": {}, "param_groups": _named_groups(model, optimizer)}
    names, kind = _names(model, optimizer, layout)
    if layout.pp > 1:
        model_state, optim = _gather_stages(model_state, optim, layout)
    if not optim:  # ranks other than 0 receive nothing
        return model_state, optim
    model_state = _gpt2_order(model_state, layout.tp)
    number = {name: i for i, name in enumerate(names)}  # not the head's copy of wte (PP)
    groups = {}  # one per kind of parameter, as one process has them
    for g in optim["param_groups"]:
        merged = groups.setdefault(kind[g["params"][0]], {**g, "params": []})
        merged["params"] = sorted(merged["params"] + [number[n] for n in g["params"]
                                                      if n in number])
    return model_state, {
        "state": {number[n]: s for n, s in _gpt2_order(optim["state"], layout.tp).items()
                  if n in number},
        "param_groups": [groups[k] for k in sorted(groups)]}


def _gather_stages(model_state, optim, layout):
    """Rank 0's (model state, optimizer state by name) of the whole model, from the states of
    the stages (those of dp and tp rank 0, which hold them whole); ({}, {}) elsewhere."""
    from torch.utils._pytree import tree_map_only
    rank = torch.distributed.get_rank()
    sender = rank % (layout.dp_size * layout.tp) == 0  # the first rank of each stage
    mine = tree_map_only(torch.Tensor, torch.Tensor.cpu, (model_state, optim)) if sender else None
    stages = [None] * torch.distributed.get_world_size() if rank == 0 else None
    torch.distributed.gather_object(mine, stages, dst=0)
    if rank != 0:
        return {}, {}
    parts = [part for part in stages if part is not None]
    return ({k: v for m, _ in parts for k, v in m.items()},
            {"state": {k: v for _, o in parts for k, v in o["state"].items()},
             "param_groups": [g for _, o in parts for g in o["param_groups"]]})


def load_optimizer_state(model, optimizer, state, layout):
    """Load a checkpoint's optimizer state, whichever way the run is spread over ranks now,
    once it is checked to fit the model (checkpoint.check_optimizer_state). A pipeline's last
    stage gives the head, wte's copy, wte's state."""
    names, kind = _names(model, optimizer, layout)
    shapes = getattr(model, "whole", None) or {n: p.shape for n, p in model.named_parameters()}
    check_optimizer_state(state, [(n, shapes[n]) for n in names],
                          [n for n in map([kind[n] for n in names].count, (0, 1, 2)) if n])
    if not layout.sharded and layout.pp == 1:
        return optimizer.load_state_dict(state)
    if not state["state"]:  # saved before the first step: a new optimizer is the same
        return
    from torch.distributed.checkpoint import state_dict as dcp
    by_name = {names[i]: s for i, s in state["state"].items()}
    by_name["lm_head.weight"] = by_name.get("transformer.wte.weight")  # a last stage's copy
    own = {n: by_name[n] for n, _ in model.named_parameters() if n in by_name}
    by_name = _gpt2_order(own, layout.tp, True)
    groups = _named_groups(model, optimizer)
    dcp.set_optimizer_state_dict(model, optimizer, {"state": by_name, "param_groups": groups},
                                 options=dcp.StateDictOptions(full_state_dict=True))


def _names(model, optimizer, layout):
    """The parameters' names as one process's optimizer numbers them (step.make_optimizer:
    Muon's matrices if any, the other decayed matrices, then the rest), and each one's kind.
    A pipeline's stages each know their own: every rank must call this, to gather them."""
    muon = {p for g in optimizer.param_groups if g.get("muon") for p in g["params"]}
    kind = {n: 0 if p in muon else 1 if p.dim() >= 2 else 2 for n, p in model.named_parameters()}
    if layout.pp == 1:
        return sorted(kind, key=kind.get), kind  # sorted keeps the model's order within a kind
    kinds = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(kinds, kind)
    kind = {n: k for stage in kinds for n, k in stage.items()}
    return sorted(model.whole, key=kind.get), kind  # whole: one process's order, no head copy


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
