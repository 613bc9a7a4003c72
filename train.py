"""Train a GPT on one CPU, one GPU, or many GPUs and machines with DDP.

    python train.py                                       # the Shakespeare character model
    python train.py config/train_gpt2.toml --batch_size=8   # any config, flags override it
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.toml

training/startup.py's setup() turns the settings into a ready run, then train() loops:
evaluate and checkpoint when due (training/checkpoint.py, Milestones), set the learning rate,
forward and backward over the micro-steps, clip, step, zero_grad, log. Each batch is a pure
function of the seed, (iteration, micro-step): a resumed run repeats the uninterrupted one
exactly, and the global batch does not depend on the number of processes.
"""
import os
import sys
import time
from dataclasses import replace

from training import process

process.limit_openmp_spin()  # before torch loads OpenMP, which reads it once
# Run as a script, a stop is caught from this moment, during the imports below too.
SIGNALS = process.StopSignals() if __name__ == "__main__" else None

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.dataset import DataError  # noqa: E402
from parallel import data_parallel, mesh  # noqa: E402
from training import (checkpoint, metrics, runtime, safe_load, settings, startup,  # noqa: E402
                      step, stopping)

# The second number of every batch's random key names its stream: the training batches, or
# the fixed batches that every evaluation draws from each split.
TRAIN_BATCHES = 0
EVAL_BATCHES = {"train": 2, "val": 3}


# ----------------------------------------------------------------------------- the loop's parts

def train_batches(run, iter_num, stop):
    """This rank's micro-batches of iteration iter_num: micro-steps are numbered across the
    ranks, each taking a consecutive slice, so the global batch is the same for any number of
    processes. After a stop there are no more (the ranks agree: training/stopping.py)."""
    cfg = run.cfg
    first = run.layout.dp_rank * run.micro_steps  # the ranks of a tensor-parallel row share it
    for micro in range(run.micro_steps):
        if stop.interrupted():
            return
        # Dropout draws from the global generator: seeded per global micro-step, its masks are
        # those of one process whatever the layout (docs/parallelism.md: TP's are not), and a
        # resumed run draws what the uninterrupted one did, with no generator state saved.
        torch.manual_seed(step_seed(cfg.seed, iter_num, first + micro))
        key = (cfg.seed, TRAIN_BATCHES, iter_num, first + micro)
        yield run.data["train"].get_batch(key, cfg.batch_size, cfg.block_size, run.device)


def step_seed(*numbers):
    """A 63-bit seed that is a pure function of the given integers."""
    return int(np.random.SeedSequence(numbers).generate_state(2, np.uint64)[0] >> 1)


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
        data_parallel.after_evaluation(run.raw_model, run.layout)
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


# ----------------------------------------------------------------------------- the loop

def train(cfg, named, signals):
    """Run the training that cfg describes; returns the exit status: 0, or STOPPED if a signal
    stopped it (with a checkpoint). signals: process.StopSignals, installed before anything is
    written."""
    run = startup.setup(cfg, named)
    cfg, model, optimizer, scaler = run.cfg, run.model, run.optimizer, run.scaler
    log, stop = metrics.MetricsLog(run), stopping.StopCheck(run, signals)
    milestones = checkpoint.Milestones(run, log, stop, estimate_loss)
    iter_num = run.iter_num
    try:
        while True:
            # evaluate and checkpoint when due; the run ends here at max_iters, or on a stop
            if milestones.end_here(iter_num):
                break
            # the learning rate of this iteration
            lr = step.get_lr(iter_num, cfg)
            for group in optimizer.param_groups:  # Muon's peak at muon_lr (training/step.py)
                group["lr"] = lr * group.get("lr_scale", 1.0)
            # forward and backward over the micro-steps (--pp: the schedule), then clip them
            loss = step.forward_backward(model, train_batches(run, iter_num, stop), run.ctx,
                                         scaler, run.micro_steps)
            if stop.interrupted():  # this iteration is dropped, and redone on resume
                optimizer.zero_grad(set_to_none=True)
                continue
            norm = step.clip_gradients(model, optimizer, scaler, cfg.grad_clip)
            stop.check(iter_num, loss, norm)  # a step not finite is skipped, then raises
            # the update, then zero the gradients for the next iteration
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            if iter_num % cfg.log_interval == 0:
                log.step(iter_num, loss, lr)
    finally:
        log.close()
        mesh.release(run.layout)
    return stopping.STOPPED if stop.stopping else 0


def schedule_follows(cfg, flags):
    """A --max_iters flag without --lr_decay_iters moves the end of the learning-rate schedule
    to the new end of the run: else a shorter run would not cool down, a longer idle at min_lr."""
    if "max_iters" not in flags or "lr_decay_iters" in flags:
        return cfg
    if cfg.decay_lr and cfg.lr_decay_iters != cfg.max_iters and os.environ.get("RANK", "0") == "0":
        print(f"lr_decay_iters follows --max_iters: the learning-rate schedule ends at "
              f"iteration {cfg.max_iters} (--lr_decay_iters sets it apart)", flush=True)
    return replace(cfg, lr_decay_iters=cfg.max_iters)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    # Flags alone refine the default run; a config file given replaces it.
    base = [] if any(not arg.startswith("-") for arg in argv) else startup.default_config()
    signals = SIGNALS or process.StopSignals()  # before anything is written

    def action(cfg):  # a resumed run takes from this command only the settings it names
        named = set(settings.parse_overrides(settings.TrainConfig, argv))
        flags = {arg[2:].partition("=")[0] for arg in argv if arg.startswith("--")}
        if "max_iters" in flags:
            named.add("lr_decay_iters")
        with startup.out_dir_lock(cfg.out_dir):
            return train(schedule_follows(cfg, flags), named, signals)
    try:
        return settings.run_main(settings.TrainConfig, action, argv, __doc__, (
            DataError, safe_load.CheckpointError, stopping.TrainingError, metrics.MetricsError,
            runtime.DeviceError), base)
    finally:  # here, where the run's model and optimizer are gone
        signals.restore()
        runtime.leave_process_group()


if __name__ == "__main__":
    sys.exit(main())
