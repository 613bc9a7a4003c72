"""Data parallelism: every rank trains on its share of each batch. Under DDP each holds the
whole model and the gradients are averaged over the ranks (an all-reduce) after backward; under
FSDP (fsdp=true) each holds 1/dp of the weights, gradients and AdamW state, gathering a Block's
weights just before it runs.
"""
import torch


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
    for block in model.transformer.h.children():  # a stage's too
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)



def after_evaluation(model, layout):
    """FSDP's root keeps its weights gathered after a forward without backward: free them."""
    if layout.fsdp:
        model.reshard()
