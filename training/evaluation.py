"""Evaluation: the mean loss of the model on each split, over the same batches at every
evaluation so that they compare, or over every token of a split at the end of a run.
"""
import sys
import time

import torch
from tqdm import tqdm

from parallel.data_parallel import after_evaluation
from training import runtime

# The second number of every batch's random key names its stream (train.py: 0 for training):
# the fixed batches that every evaluation draws from each split.
EVAL_BATCHES = {"train": 2, "val": 3}


@torch.no_grad()
def estimate_loss(run, stop, splits=("train", "val"), eval_iters=None):
    """Mean loss per split: over the same eval_iters random batches at every evaluation (so
    that they compare), or, with eval_iters=0, over every block of the split. The ranks share
    the batches out and average. None if a stop came: the evaluation is then abandoned.
    A GPU's losses stay on it until the end, with no wait per batch; on the CPU each is read at
    once: 0-d tensors kept between the large logits freed at every batch (25 MB with GPT-2's
    vocabulary) fragment the heap, which then grows by that much a batch."""
    cfg = run.cfg
    eval_iters = cfg.eval_iters if eval_iters is None else eval_iters
    on_host = run.device == "cpu"
    run.model.eval()
    out = {}
    try:
        for split in splits:
            if eval_iters:
                batches = (run.data[split].get_batch((cfg.seed, EVAL_BATCHES[split], k),
                                                     cfg.batch_size, cfg.block_size, run.device)
                           for k in range(run.layout.dp_rank, eval_iters, run.layout.dp_size))
            else:
                batches = run.data[split].windows(cfg.block_size, cfg.batch_size, run.device,
                                                  run.layout.dp_rank, run.layout.dp_size)
            losses, counts = [], []
            filler = None if not run.layout.fsdp else (torch.zeros(
                cfg.batch_size, cfg.block_size, dtype=torch.long, device=run.device),) * 2
            for x, y in progress(stop.until_stop(batches, filler), f"eval {split}",
                                 run.rank):
                with run.ctx:
                    loss = run.model(x, y)[1]  # the logits are not kept past this line
                if filler is not None and x is filler[0]:
                    continue  # run only to take part in the other ranks' weight gathers
                losses.append(loss.item() if on_host else loss.detach())
                counts.append(y.numel())
            if stop.stopping:
                return None
            if losses and not on_host:
                losses = torch.stack(losses).cpu().double().tolist()
            total = sum(mean * n for mean, n in zip(losses, counts))
            total, count = runtime.all_reduce_mean([total, sum(counts)], run.device,
                                                   run.world_size)
            out[split] = total / count
    finally:
        run.model.train()
        after_evaluation(run.raw_model, run.layout)
    return out


def progress(batches, desc, rank):
    """batches, with rank 0 showing progress: a bar at a terminal, else a line every 30 s."""
    if rank != 0:
        yield from batches
    elif sys.stderr.isatty():
        yield from tqdm(batches, desc=desc, leave=False)
    else:
        last = time.time()
        for k, batch in enumerate(batches, 1):
            yield batch
            if time.time() - last > 30:
                print(f"{desc}: {k} batches done", flush=True)
                last = time.time()
