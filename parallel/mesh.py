"""The device mesh: the processes as a grid of pp stages, each of dp rows of tp ranks,
rank = (pp_rank * dp + dp_rank) * tp + tp_rank, so that the ranks of a row are neighbours, on
one machine, where the links are fastest, and the stages, which exchange least, may sit on
different machines. The ranks of a row split each Block (tensor_parallel.py) and see the same
batch; the rows share the batch out (data_parallel.py); the stages each hold a slice of the
Blocks and pass activations along (pipeline.py). The step's own pieces that depend on the
layout (gradients exchanged at the last micro-step, norms over shards and stages) are in
training/step.py.
"""
import os
from dataclasses import dataclass

import torch

from parallel.data_parallel import shard
from parallel.pipeline import Pipeline, Stage
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
    tp, pp = cfg.tp, cfg.pp
    what = f"pp={pp}" if pp > 1 else "fsdp=true" if cfg.fsdp else f"tp={tp}"
    if (cfg.fsdp or tp > 1 or pp > 1) and "RANK" not in os.environ:
        raise DeviceError(f"{what} spreads the model over the processes of torchrun: run it "
                          "as torchrun --standalone --nproc_per_node=N train.py ...")
    if (cfg.fsdp or tp > 1 or pp > 1) and dtype == torch.float16:
        raise DeviceError(f"{what} does not take float16: use --dtype=bfloat16 (or float32)")
    if world_size % (tp * pp):
        raise DeviceError(f"{'pp=%d x ' % pp if pp > 1 else ''}tp={tp} does not divide the "
                          f"{world_size} processes into rows")
    if cfg.n_layer % pp:
        raise DeviceError(f"pp={pp} must divide n_layer ({cfg.n_layer}): each stage holds an "
                          "equal share of the Blocks")
    dp = world_size // (tp * pp)
    if pp > 1 and dp > 1 and not cfg.fsdp:
        raise DeviceError(f"pp={pp} over {world_size} processes makes {dp} data-parallel rows, "
                          "which need --fsdp=true: DDP's reducer cannot follow a pipeline "
                          "schedule's backward passes (it fails, or is silently wrong)")
    micro = cfg.gradient_accumulation_steps // dp
    if pp > 1 and cfg.pp_schedule == "1f1b" and micro < pp:
        raise DeviceError(f"pp_schedule=1f1b needs at least as many micro-batches per "
                          f"data-parallel row as stages: {micro} < pp={pp}; raise "
                          "--gradient_accumulation_steps, or use --pp_schedule=gpipe")
    if pp > 1 and cfg.compile:
        raise DeviceError("compile=true with pp>1 is not supported: use --compile=false")
    for name, size in (("n_head", cfg.n_head), ("4*n_embd", 4 * cfg.n_embd)):
        if size % tp:
            raise DeviceError(f"tp={tp} must divide {name} ({size}): each rank takes an equal "
                              "share of the heads and of the MLP's hidden units")
    if tp > 1 and dp > 1 and not cfg.fsdp:
        raise DeviceError(f"tp={tp} over {world_size} processes makes {dp} "
                          "data-parallel rows, which need --fsdp=true: DDP cannot wrap a "
                          "tensor-parallel model")
    if tp > 1 and cfg.compile:
        raise DeviceError("compile=true with tp>1 is not supported: use --compile=false")


def make_layout(cfg, rank, world_size, device):
    """The run's Layout; FSDP, TP and PP get their device mesh (every rank must call this)."""
    mesh, tp, pp = None, cfg.tp, cfg.pp
    dp = world_size // (tp * pp)
    if cfg.fsdp or tp > 1 or pp > 1:
        from torch.distributed.device_mesh import init_device_mesh
        shape, names = ((pp, dp, tp), ("pp", "dp", "tp")) if pp > 1 else ((dp, tp), ("dp", "tp"))
        mesh = init_device_mesh(device.split(":")[0], shape, mesh_dim_names=names)
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


def pipelined(model, layout, device, micro_steps, schedule):
    """What the loop runs: model, or under PP the Pipeline of its stages."""
    return Pipeline(model, layout, device, micro_steps, schedule) if layout.pp > 1 else model


def release(layout):
    """Let go of the mesh's process groups at the end of a run: torch's DTensor caches keep
    the mesh alive, and the groups with it, past runtime.leave_process_group (see there)."""
    if layout.mesh is not None:
        getattr(layout.mesh, "_pg_registry", {}).clear()  # a private dict in torch 2.13
