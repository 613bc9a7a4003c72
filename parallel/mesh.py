"""The device mesh: the processes as a grid of pp stages, each of dp rows of tp ranks,
rank = (pp_rank * dp + dp_rank) * tp + tp_rank, so that the ranks of a row are neighbours, on
one machine, where the links are fastest, and the stages, which exchange least, may sit on
different machines. The ranks of a row split each Block (tensor_parallel.py) and see the same
batch; the rows share the batch out (data_parallel.py); the stages each hold a slice of the
Blocks and pass activations along (pipeline.py). The step's own pieces that depend on the
layout (gradients exchanged at the last micro-step, norms over shards and stages) are in
training/step.py.
"""
import logging
import os
from dataclasses import dataclass

import torch

from parallel.data_parallel import shard
from parallel.pipeline import Stage
from parallel.tensor_parallel import tensor_parallel
from training.runtime import DeviceError


@dataclass
class Layout:
    """How a run is spread: pp stages of dp_size data-parallel rows of tp ranks; this rank is
    in row dp_rank of stage pp_rank."""
    dp_rank: int = 0
    dp_size: int = 1
    tp: int = 1
    fsdp: bool = False
    mesh: object = None  # the DeviceMesh ("dp", "tp"), or ("pp", "dp", "tp") under PP
    pp: int = 1
    pp_rank: int = 0

    @property
    def sharded(self):  # the weights are DTensors, which checkpoints gather
        return self.fsdp or self.tp > 1


def check(cfg, world_size, dtype):
    """Refuse, in one line, a layout that cannot run (float16's scaler would need a sharded
    variant; TP splits whole heads and the MLP's width evenly; PP whole Blocks). cfg has the
    model's shape."""
    tp, pp, spread = cfg.tp, cfg.pp, cfg.fsdp or cfg.tp * cfg.pp > 1
    what = f"pp={pp}" if pp > 1 else "fsdp=true" if cfg.fsdp else f"tp={tp}"
    if spread and "RANK" not in os.environ:
        raise DeviceError(f"{what} spreads the model over the processes of torchrun: run it "
                          "as torchrun --standalone --nproc_per_node=N train.py ...")
    if spread and dtype == torch.float16:
        raise DeviceError(f"{what} does not take float16: use --dtype=bfloat16 (or float32)")
    if world_size % (tp * pp):
        split = f"tp={tp} x pp={pp}" if pp > 1 else f"tp={tp}"
        raise DeviceError(f"{split} does not divide the {world_size} processes")
    if cfg.n_layer % pp:
        raise DeviceError(f"pp={pp} must divide n_layer ({cfg.n_layer}): stages of equal depth")
    for name, size in (("n_head", cfg.n_head), ("4*n_embd", 4 * cfg.n_embd)):
        if size % tp:
            raise DeviceError(f"tp={tp} must divide {name} ({size}): each rank takes an equal "
                              "share of the heads and of the MLP's hidden units")
    dp, micro = world_size // (tp * pp), cfg.gradient_accumulation_steps * tp * pp // world_size
    if tp * pp > 1 and dp > 1 and not cfg.fsdp:  # DDP's reducer fails in a pipeline, or is wrong
        raise DeviceError(f"{what} over {world_size} processes makes {dp} data-parallel rows, "
                          "which need --fsdp=true (DDP cannot follow TP's or PP's gradients)")
    if pp > 1 and cfg.pp_schedule == "1f1b" and micro < pp:
        raise DeviceError(f"pp_schedule=1f1b needs at least pp={pp} micro-batches per row, "
                          f"not {micro}: raise gradient_accumulation_steps, or use gpipe")
    if tp * pp > 1 and cfg.compile:
        raise DeviceError(f"compile=true with {'pp' if pp > 1 else 'tp'}>1 is not supported: "
                          "use --compile=false")


def make_layout(cfg, rank, world_size, device):
    """The run's Layout; FSDP, TP and PP get their device mesh (every rank must call this)."""
    mesh, tp, pp = None, cfg.tp, cfg.pp
    dp = world_size // (tp * pp)
    if cfg.fsdp or tp > 1 or pp > 1:
        from torch.distributed.device_mesh import init_device_mesh
        shape, names = ((pp, dp, tp), ("pp", "dp", "tp")) if pp > 1 else ((dp, tp), ("dp", "tp"))
        mesh = init_device_mesh(device.split(":")[0], shape, mesh_dim_names=names)
    if cfg.fsdp and tp > 1:
        # On the 2-D mesh DTensor warns (every rank, once per kind) when it makes a tensor whole
        # in two collectives, one per dimension: the gradient norm, the checkpoint's gather.
        # Both are exact, and each result is the same on every rank; a flattened mesh would
        # save one collective per step, not worth a second mesh. Quiet, not 8 lines a run.
        logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    return Layout(rank // tp % dp, dp, tp, cfg.fsdp, mesh, pp, rank // (tp * dp))


def spread(model, layout, dtype):
    """This rank's part of the whole model, as layout says: its pipeline stage (the model
    itself without PP), split by TP inside each row, then by FSDP over the rows."""
    if layout.pp > 1:
        model = Stage(model, layout.pp_rank, layout.pp)
    if layout.tp > 1:
        tensor_parallel(model, layout.mesh["tp"])
    if layout.fsdp:
        shard(model, layout.mesh["dp"], dtype)
    return model


def release(layout):
    """Let go of the mesh's process groups at the end of a run: torch's DTensor caches keep
    the mesh alive, and the groups with it, past runtime.leave_process_group (see there)."""
    if layout.mesh is not None:
        getattr(layout.mesh, "_pg_registry", {}).clear()  # a private dict in torch 2.13
