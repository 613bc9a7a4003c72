"""The device mesh: the processes as a grid of dp rows of tp ranks, rank = dp_rank * tp +
tp_rank, so that the ranks of a row are neighbours, on one machine, where the links are
fastest. The ranks of a row split each Block (tensor_parallel.py) and see the same batch; the
rows share the batch out (data_parallel.py). The step's own pieces that depend on the layout
(gradients exchanged at the last micro-step, norms over shards) are in training/step.py.
"""
import logging
import os
from dataclasses import dataclass

import torch

from parallel.data_parallel import shard
from parallel.tensor_parallel import tensor_parallel
from training.runtime import DeviceError


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
    if cfg.fsdp and cfg.tp > 1:
        # On the 2-D mesh DTensor warns (every rank, once per kind) when it makes a tensor whole
        # in two collectives, one per dimension: the gradient norm, the checkpoint's gather.
        # Both are exact, and each result is the same on every rank; a flattened mesh would
        # save one collective per step, not worth a second mesh. Quiet, not 8 lines a run.
        logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    return Layout(rank // cfg.tp, world_size // cfg.tp, cfg.tp, cfg.fsdp, mesh)


def spread(model, layout, dtype):
    """Split the whole model, in place, as layout says: TP inside each row, then FSDP over them."""
    if layout.tp > 1:
        tensor_parallel(model, layout.mesh["tp"])
    if layout.fsdp:
        shard(model, layout.mesh["dp"], dtype)


def release(layout):
    """Let go of the mesh's process groups at the end of a run: torch's DTensor caches keep
    the mesh alive, and the groups with it, past runtime.leave_process_group (see there)."""
    if layout.mesh is not None:
        getattr(layout.mesh, "_pg_registry", {}).clear()  # a private dict in torch 2.13
