"""Train a GPT on one CPU, one GPU, or many GPUs and machines with DDP.

    python train.py                                       # the Shakespeare character model
    python train.py config/train_gpt2.toml --batch_size=8   # any config, flags override it
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.toml

startup.setup() turns the settings into a ready run, then train() loops: evaluate and checkpoint
when due, set the learning rate, forward and backward over the micro-steps, clip, step, log.
Each batch is a pure function of the seed, (iteration, micro-step): a resumed run repeats the
uninterrupted one exactly, and the global batch does not depend on the number of processes.
"""
import os
import sys
import time
from dataclasses import asdict, replace

# torch's OpenMP threads spin while they wait for work (GNU: 300,000 turns), on the cores other
# jobs need. On 2 cores (docs/benchmarks.md), quiet, a short spin is 2x faster than none; beside
# two busy jobs the default is ~30x slower than none, 10,000 turns ~3x. So 10,000 turns, or none
# on a machine busy at start, unless the environment says. Read once, when torch loads OpenMP.
if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] >= (os.cpu_count() or 1)
    os.environ["GOMP_SPINCOUNT"] = "0" if busy else "10000"

import numpy as np
import torch
from tqdm import tqdm

import parallel
import runtime
from checkpoint import CheckpointError, save_checkpoint
from config import TrainConfig, parse_overrides, run_main
from dataset import DataError
from metrics import MetricsError, MetricsLog
from startup import default_config, out_dir_lock, setup
from step import StopCheck, TrainingError, clip_gradients, forward_backward, get_lr

# The second number of every batch's random key names its stream: the training batches, or
# the fixed batches that every evaluation draws from each split.
TRAIN_BATCHES = 0
EVAL_BATCHES = {"train": 2, "val": 3}


# ----------------------------------------------------------------------------- the loop's parts

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


@torch.no_grad()
def estimate_loss(run, stop_check, splits=("train", "val"), eval_iters=None):
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
            for x, y in progress(stop_check.until_stop(batches, filler), f"eval {split}",
                                 run.rank):
                with run.ctx:
                    loss = run.model(x, y)[1]  # the logits are not kept past this line
                if filler is not None and x is filler[0]:
                    continue  # run only to take part in the other ranks' weight gathers
                losses.append(loss.item() if on_host else loss.detach())
                counts.append(y.numel())
            if stop_check.stopped:
                return None
            if losses and not on_host:
                losses = torch.stack(losses).cpu().double().tolist()
            total = sum(mean * n for mean, n in zip(losses, counts))
            total, count = runtime.all_reduce_mean([total, sum(counts)], run.device,
                                                   run.world_size)
            out[split] = total / count
    finally:
        run.model.train()
        parallel.after_evaluation(run.raw_model, run.layout)
    return out


def save(run, iter_num, log, evaluated, name="ckpt.pt"):
    """Rank 0 writes a checkpoint into out_dir: everything needed to continue exactly, and
    whether iteration iter_num's evaluation is done. Every rank calls this (FSDP and TP gather
    the shards of every rank)."""
    model_state, optimizer_state = parallel.training_state(run.raw_model, run.optimizer,
                                                           run.layout)
    state = None  # the other ranks only learn whether rank 0's write succeeded
    if run.rank == 0:
        state = {
            "model": model_state, "optimizer": optimizer_state,
            "scaler": run.scaler.state_dict(), "config": asdict(run.cfg),
            "model_args": asdict(run.raw_model.config), "meta": run.meta, "origin": run.origin,
            "iter_num": iter_num, "best_val_loss": run.best_val_loss,
            "elapsed_s": log.elapsed(), "evaluated": evaluated}
    save_checkpoint(state, os.path.join(run.cfg.out_dir, name), run.world_size)


def evaluate_and_checkpoint(run, iter_num, log, stop_check):
    """Estimate and log both losses; save on a new best validation loss (or always, with
    always_save_checkpoint). Returns the validation loss, or None if a stop came."""
    started = time.time()
    losses = estimate_loss(run, stop_check)
    if losses is None:
        return None
    improved = losses["val"] < run.best_val_loss
    run.best_val_loss = min(run.best_val_loss, losses["val"])
    if (improved or run.cfg.always_save_checkpoint) and not run.cfg.eval_only:
        save(run, iter_num, log, evaluated=True)
    log.evaluation(iter_num, losses, seconds=time.time() - started)
    return losses["val"]


def save_on_stop(run, iter_num, log, evaluated):
    """A stopped run's checkpoint: ckpt.pt, or last.pt where ckpt.pt keeps only the best model
    (resuming takes the newer: checkpoint.latest_checkpoint). --eval_only saves nothing."""
    if run.cfg.eval_only:
        if run.rank == 0:
            print("stopped by a signal: the evaluation is abandoned", flush=True)
        return
    name = "ckpt.pt" if run.cfg.always_save_checkpoint else "last.pt"
    save(run, iter_num, log, evaluated, name)
    if run.rank == 0:
        print(f"stopped by a signal at iteration {iter_num}; checkpoint saved to "
              f"{os.path.join(run.cfg.out_dir, name)}: resume with --init_from=resume",
              flush=True)


def train_batches(run, iter_num, stop_check):
    """This rank's micro-batches of iteration iter_num: micro-steps are numbered across the
    ranks, each taking a consecutive slice, so the global batch is the same for any number of
    processes. One process asked to stop gets no more (ranks stop together: see StopCheck)."""
    cfg = run.cfg
    first = run.layout.dp_rank * run.micro_steps  # the ranks of a tensor-parallel row share it
    for micro in range(run.micro_steps):
        if stop_check.interrupted():
            return
        key = (cfg.seed, TRAIN_BATCHES, iter_num, first + micro)
        yield run.data["train"].get_batch(key, cfg.batch_size, cfg.block_size, run.device)


def finished(run):
    """A resumed run that has already done all its iterations says so, and how to go on."""
    if run.rank == 0:
        cfg = run.cfg
        print(f"the run in {cfg.out_dir} is complete: it has done its max_iters="
              f"{cfg.max_iters} iterations. To train it longer: python train.py "
              f"--init_from=resume --out_dir={cfg.out_dir} --max_iters={2 * cfg.max_iters} "
              "(README: Training)", flush=True)


def step_seed(*numbers):
    """A 63-bit seed that is a pure function of the given integers."""
    return int(np.random.SeedSequence(numbers).generate_state(2, np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------- the loop

def train(cfg, named=()):
    """Run the training that cfg describes; returns the last validation loss."""
    run = setup(cfg, named)
    cfg, model, optimizer, scaler = run.cfg, run.model, run.optimizer, run.scaler
    log, stop_check = MetricsLog(run), StopCheck(run)
    iter_num, val_loss, stopping = run.iter_num, None, False
    # Whether this iteration's evaluation is done: a resumed run's checkpoint says, so that
    # the resumed run does every evaluation the uninterrupted one does, once. (--eval_only
    # evaluates whatever the iteration.)
    evaluated = run.evaluated and not cfg.eval_only
    try:
        if evaluated and iter_num >= cfg.max_iters:
            finished(run)
            return None
        while True:
            # evaluate the losses and checkpoint, when due; not when stopping, which must be
            # quick (torchrun kills its workers 30 s after its own SIGTERM)
            due = iter_num % cfg.eval_interval == 0 or iter_num >= cfg.max_iters
            if due or stopping:  # nothing is saved before the last step's flags are read
                stopping = stop_check.settle() or stopping
            if (due or cfg.eval_only) and not evaluated and not stopping:
                val_loss = evaluate_and_checkpoint(run, iter_num, log, stop_check)
                evaluated, stopping = val_loss is not None, val_loss is None
            if stopping:
                save_on_stop(run, iter_num, log, evaluated)
                break
            if iter_num >= cfg.max_iters or cfg.eval_only:
                if not cfg.eval_only and cfg.eval_iters:  # the figure the README quotes
                    whole = estimate_loss(run, stop_check, ("val",), eval_iters=0)
                    if whole is None:  # stopped: the run is complete all the same
                        save_on_stop(run, iter_num, log, evaluated)
                        break
                    log.whole_split(iter_num, whole)
                break

            # the learning rate of this iteration
            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:  # Muon's peak at muon_lr (step.py)
                group["lr"] = lr * group.get("lr_scale", 1.0)
            # Dropout draws from the global generator: seed it per step and rank, so a resumed
            # run draws the same masks as the uninterrupted one without saving generator state.
            torch.manual_seed(step_seed(cfg.seed, iter_num, run.layout.dp_rank))
            # forward and backward over the micro-steps, then clip the gradients
            loss = forward_backward(model, train_batches(run, iter_num, stop_check), run.ctx,
                                    scaler, run.micro_steps)
            if stop_check.interrupted():  # this iteration is dropped, and redone on resume
                optimizer.zero_grad(set_to_none=True)
                stopping = True
                continue
            norm = clip_gradients(model, optimizer, scaler, cfg.grad_clip)
            stopping = stop_check.should_stop(iter_num, loss, norm)  # raises if diverged
            # the update, skipped on the device if this step's gradients are not finite
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num, evaluated = iter_num + 1, False

            if iter_num % cfg.log_interval == 0:
                log.step(iter_num, loss, lr)
    finally:
        stop_check.signals.restore()
        log.close()
        parallel.release(run.layout)
    return val_loss


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
    base = [] if any(not arg.startswith("-") for arg in argv) else default_config()

    def action(cfg):  # a resumed run takes from this command only the settings it names
        named = set(parse_overrides(TrainConfig, argv))
        flags = parse_overrides(TrainConfig, [a for a in argv if a.startswith("--")])
        if "max_iters" in flags:
            named.add("lr_decay_iters")
        with out_dir_lock(cfg.out_dir):
            return train(schedule_follows(cfg, flags), named)
    try:
        return run_main(TrainConfig, action, argv, __doc__, (DataError, CheckpointError,
                        TrainingError, MetricsError, runtime.DeviceError), base)
    finally:  # here, where the run's model and optimizer are gone
        runtime.leave_process_group()


if __name__ == "__main__":
    sys.exit(main())
