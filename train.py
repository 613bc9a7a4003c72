"""Train a GPT on one CPU, one GPU, or many GPUs and machines with DDP.

    python train.py                                       # the Shakespeare character model
    python train.py config/train_gpt2.toml --batch_size=8   # any config, flags override it
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.toml

training/startup.py's setup() turns the settings into a ready run, then train() loops:
evaluate and checkpoint when due, set the learning rate, forward and backward over the
micro-steps, clip, step, zero_grad, log.
Each batch is a pure function of the seed, (iteration, micro-step): a resumed run repeats the
uninterrupted one exactly, and the global batch does not depend on the number of processes.
"""
import os
import sys
from dataclasses import replace

# torch's OpenMP threads spin while they wait for work (GNU: 300,000 turns), on the cores other
# jobs need. On 2 cores (docs/benchmarks.md), quiet, a short spin is 2x faster than none; beside
# two busy jobs the default is ~30x slower than none, 10,000 turns ~3x. So 10,000 turns, or none
# on a machine busy at start, unless the environment says. Read once, when torch loads OpenMP.
if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] >= (os.cpu_count() or 1)
    os.environ["GOMP_SPINCOUNT"] = "0" if busy else "10000"

import numpy as np
import torch

from data.dataset import DataError
from parallel.mesh import release
from training import runtime
from training.checkpoint import Milestones
from training.metrics import MetricsError, MetricsLog
from training.safe_load import CheckpointError
from training.settings import TrainConfig, parse_overrides, run_main
from training.startup import default_config, out_dir_lock, setup
from training.step import StopCheck, TrainingError, clip_gradients, forward_backward, get_lr

# The second number of every batch's random key names its stream: the training batches here,
# the evaluations' in training/evaluation.py.
TRAIN_BATCHES = 0


def train_batches(run, iter_num, stop):
    """This rank's micro-batches of iteration iter_num: micro-steps are numbered across the
    ranks, each taking a consecutive slice, so the global batch is the same for any number of
    processes. One process asked to stop gets no more (ranks stop together: see StopCheck)."""
    cfg = run.cfg
    first = run.layout.dp_rank * run.micro_steps  # the ranks of a tensor-parallel row share it
    for micro in range(run.micro_steps):
        if stop.interrupted():
            return
        key = (cfg.seed, TRAIN_BATCHES, iter_num, first + micro)
        yield run.data["train"].get_batch(key, cfg.batch_size, cfg.block_size, run.device)


def step_seed(*numbers):
    """A 63-bit seed that is a pure function of the given integers."""
    return int(np.random.SeedSequence(numbers).generate_state(2, np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------- the loop

def train(cfg, named=()):
    """Run the training that cfg describes; returns the last validation loss."""
    run = setup(cfg, named)
    cfg, model, optimizer, scaler = run.cfg, run.model, run.optimizer, run.scaler
    log, stop = MetricsLog(run), StopCheck(run)
    milestones, iter_num = Milestones(run, log, stop), run.iter_num
    try:
        while True:
            # evaluate and checkpoint when due; the run ends here at max_iters, or on a stop
            if milestones.end_here(iter_num):
                break
            # the learning rate of this iteration
            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:  # Muon's peak at muon_lr (training/step.py)
                group["lr"] = lr * group.get("lr_scale", 1.0)
            # Dropout draws from the global generator: seed it per step and rank, so a resumed
            # run draws the same masks as the uninterrupted one without saving generator state.
            torch.manual_seed(step_seed(cfg.seed, iter_num, run.layout.dp_rank))
            # forward and backward over the micro-steps, then clip the gradients
            loss = forward_backward(model, train_batches(run, iter_num, stop), run.ctx, scaler,
                                    run.micro_steps)
            if stop.interrupted():  # this iteration is dropped, and redone on resume
                optimizer.zero_grad(set_to_none=True)
                continue
            norm = clip_gradients(model, optimizer, scaler, cfg.grad_clip)
            stop.check(iter_num, loss, norm)  # a step not finite is skipped, then raises
            # the update, then zero the gradients for the next iteration
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            if iter_num % cfg.log_interval == 0:
                log.step(iter_num, loss, lr)
    finally:
        stop.signals.restore()
        log.close()
        release(run.layout)
    return milestones.val_loss


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
