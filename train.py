"""Train a GPT on one CPU, one GPU, or many GPUs and machines with DDP.

    python train.py                                       # the Shakespeare character model
    python train.py config/train_gpt2.toml --batch_size=8   # any config, flags override it
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.toml

The page reads as a run goes: setup() turns the settings into a ready run (processes, device,
data, model, optimizer), then train() loops: evaluate and checkpoint when due, set the
learning rate, forward and backward over the micro-steps, clip, step, log.

The batch each (iteration, micro-step) sees is a pure function of the seed, so a resumed run
repeats exactly what the uninterrupted run would have done, and the global batch does not
depend on the number of processes.
"""
import importlib.util
import json
import os
import runpy
import sys
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import accounting
import runtime
from checkpoint import GPT2_SIZES, CheckpointError, load_model, save_checkpoint
from config import ConfigError, TrainConfig, run_main
from dataset import DataError, TokenData, load_meta
from metrics import MetricsLog
from model import GPT, GPTConfig, config_from_dict
from step import (StopCheck, TrainingError, clip_gradients, forward_backward, get_lr,
                  make_optimizer)

ROOT = Path(__file__).resolve().parent
# The second number of every batch's random key names its stream: the training batches, or
# the fixed batches that every evaluation draws from each split.
TRAIN_BATCHES = 0
EVAL_BATCHES = {"train": 2, "val": 3}


def default_args():
    """`python train.py` alone: the Shakespeare character model sized for this machine."""
    gpu = torch.cuda.is_available()
    name = "train_shakespeare_char" if gpu else "train_shakespeare_char_cpu"
    if not (ROOT / "data" / "shakespeare_char" / "meta.json").exists():
        print("data/shakespeare_char is not prepared yet: running "
              "python data/shakespeare_char/prepare.py", flush=True)
        script = runpy.run_path(str(ROOT / "data" / "shakespeare_char" / "prepare.py"))
        script["main"]([])
    return [str(ROOT / "config" / f"{name}.toml")]


# ----------------------------------------------------------------------------- setting up

def check_divisible(cfg, world_size):
    """The micro-steps of an iteration are shared out evenly over the processes."""
    steps = cfg.gradient_accumulation_steps
    if steps % world_size:
        below, above = steps // world_size * world_size, (steps // world_size + 1) * world_size
        options = " or ".join(str(n) for n in (below, above) if n)
        raise ConfigError(f"gradient_accumulation_steps ({steps}) must be divisible by the "
                          f"number of processes ({world_size}): try {options}, with "
                          "batch_size scaled to keep the tokens per iteration")


def check_writable(out_dir):
    """Create out_dir and prove a file can be written there, before any work is done."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise ConfigError(f"cannot write to out_dir {out_dir}: {e.strerror}") from None


def resolve_init(cfg, ckpt_path, rank, world_size):
    """init_from as this run takes it (auto: resume if there is a checkpoint, else scratch).
    A fresh run refuses to overwrite a checkpoint.

    Rank 0 decides from what its disk holds and tells the others: on several machines, a node
    without the checkpoint would otherwise start afresh while the rest resume, and their
    collectives would wait on each other until ddp_timeout. Every rank then checks that it
    can read the checkpoint too, and all fail together, at once, if one cannot."""
    decision = [cfg.init_from, None]  # (init_from, or the error every rank raises)
    if rank == 0:
        exists = os.path.exists(ckpt_path)
        if cfg.init_from == "auto":
            decision[0] = "resume" if exists else "scratch"
        if decision[0] == "resume" and not exists:
            decision[1] = f"init_from=resume but there is no checkpoint at {ckpt_path}"
        if decision[0] != "resume" and exists and not (cfg.overwrite or cfg.eval_only):
            decision[1] = (f"{ckpt_path} already exists: pass --init_from=resume to continue "
                           "it, or --overwrite=true to start afresh over it")
    if world_size > 1:
        torch.distributed.broadcast_object_list(decision, src=0)
    init_from, error = decision
    if not error and init_from == "resume" and world_size > 1:
        readable = [None] * world_size
        torch.distributed.all_gather_object(readable, os.path.isfile(ckpt_path))
        missing = [r for r, ok in enumerate(readable) if not ok]
        if missing:
            error = (f"rank 0 resumes from {ckpt_path}, which rank(s) "
                     f"{', '.join(map(str, missing))} cannot read: every machine needs the "
                     "checkpoint at that path (a shared filesystem, or a copy of out_dir)")
    if error:
        raise CheckpointError(error)
    return init_from


def model_fields(cfg):
    return {f.name: getattr(cfg, f.name) for f in fields(GPTConfig) if hasattr(cfg, f.name)}


def scratch_config(cfg, meta):
    """The shape of a model trained from scratch on the dataset that meta describes; the
    padding ids of its vocabulary (see accounting.padded_vocab_size) are never targets."""
    vocab = accounting.padded_vocab_size(meta["vocab_size"])
    return config_from_dict({**model_fields(cfg), "vocab_size": vocab})


def init_model(cfg, meta):
    """(model, cfg, checkpoint): a new model, or the checkpoint's (which is returned too, for
    its optimizer state), or OpenAI's weights; cfg with the shape of the model as built."""
    if cfg.init_from == "scratch":
        return GPT(scratch_config(cfg, meta)), cfg, None
    if cfg.init_from not in ("resume", *GPT2_SIZES) and not os.path.isdir(cfg.init_from):
        raise ConfigError(f"init_from={cfg.init_from!r}: expected scratch, resume, auto, "
                          f"one of {', '.join(GPT2_SIZES)}, or a directory of GPT-2 weights")
    model, model_meta, ckpt = load_model(cfg.init_from, cfg.out_dir, cfg.dropout)
    if ckpt is not None:
        if any(model_meta.get(k) != meta.get(k) for k in ("tokenizer", "vocab_size", "chars")):
            raise CheckpointError(f"the checkpoint in {cfg.out_dir} was trained with another "
                                  "tokenizer or vocabulary than this dataset's meta.json")
        # A run from scratch took its shape from the config, which must still say the same.
        for name, value in model_fields(cfg).items():
            saved = ckpt["model_args"][name]
            if ckpt["origin"] == "scratch" and name not in ("dropout", "vocab_size") and (
                    saved != value):
                raise CheckpointError(
                    f"checkpoint in {cfg.out_dir} has {name}={saved} but the config "
                    f"says {value}: pass --{name}={saved} or use another out_dir")
    # Pretrained weights, and a finetuning run resumed, bring their own shape.
    shape = {name: getattr(model.config, name)
             for name in ("n_layer", "n_head", "n_embd", "bias", "rope", "qk_norm", "relu2")}
    if cfg.block_size > model.config.block_size:
        raise ConfigError(f"block_size {cfg.block_size} exceeds the pretrained model's "
                          f"{model.config.block_size}")
    return model, replace(cfg, **shape), ckpt


def check_vocab(meta, data, vocab_size, data_dir):
    """The dataset's token ids must fit the model's vocabulary."""
    if meta["vocab_size"] > vocab_size:
        raise DataError(f"{data_dir} uses a vocabulary of {meta['vocab_size']} tokens, more "
                        f"than the model's {vocab_size}")
    # Scanning every token costs a second per 500M tokens: do it where that is cheap.
    if sum(int(split.lengths.sum()) for split in data.values()) < 500_000_000:
        for split in data.values():
            split.check_vocab(vocab_size)


@dataclass
class Run:
    """What setup() decided, for the loop to use."""
    cfg: TrainConfig  # the settings as this run uses them (init_from resolved, model shape)
    rank: int  # this process among world_size; rank 0 prints, logs and saves
    world_size: int
    device: str
    dtype: torch.dtype
    ctx: object  # autocast for the forward pass (a no-op in float32)
    scaler: torch.amp.GradScaler  # float16's loss scaling (disabled otherwise)
    data: dict  # "train" and "val": TokenData
    meta: dict  # the dataset's meta.json, saved with each checkpoint
    raw_model: GPT  # the model itself, whose state_dict is saved
    model: torch.nn.Module  # what the loop runs: raw_model, compiled and DDP-wrapped as asked
    optimizer: torch.optim.Optimizer
    micro_steps: int  # forward/backward passes per iteration on each rank
    iter_num: int  # the iteration to start from
    best_val_loss: float
    origin: str  # scratch, or the pretrained weights the run began from
    ckpt_path: str


def setup(cfg):
    """Turn the settings into a ready run: processes, device and precision, data, the model
    (new, resumed or pretrained) and its optimizer. Rank 0 prints what the run will cost."""
    rank, local_rank, world_size, device = runtime.setup_distributed(
        cfg.device, cfg.backend, cfg.ddp_timeout)
    dtype, ctx, scaler = runtime.training_precision(cfg.dtype, device, cfg.deterministic)
    check_divisible(cfg, world_size)
    if rank == 0:
        check_writable(cfg.out_dir)
    if cfg.wandb_log and importlib.util.find_spec("wandb") is None:
        raise ConfigError("wandb_log=true needs the wandb package: pip install wandb")
    data_dir = cfg.data_dir or str(ROOT / "data" / cfg.dataset)
    meta = load_meta(data_dir)
    data = {split: TokenData(data_dir, split) for split in ("train", "val")}
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    cfg = replace(cfg, init_from=resolve_init(cfg, ckpt_path, rank, world_size))
    torch.manual_seed(cfg.seed)
    raw_model, cfg, ckpt = init_model(cfg, meta)
    raw_model.to(device)
    check_vocab(meta, data, raw_model.config.vocab_size, data_dir)
    optimizer = make_optimizer(raw_model, cfg)
    iter_num, best_val_loss, origin = 0, float("inf"), cfg.init_from
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # empty when saved without float16: the scale then starts afresh
            scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val_loss, origin = ckpt["iter_num"], ckpt["best_val_loss"], ckpt["origin"]
        del ckpt  # free the CPU copy of the weights and optimizer state
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if world_size > 1:
        # Gradients live in DDP's all-reduce buckets (no second copy); the model's only
        # buffers are rotary tables that never change, so nothing is broadcast per step.
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.startswith("cuda") else None,
            gradient_as_bucket_view=True, broadcast_buffers=False)
    if rank == 0:
        print(json.dumps(asdict(cfg), indent=1))
        print(accounting.report(cfg, world_size, raw_model.config))
        print(f"{world_size} process(es) on {device} in {str(dtype).removeprefix('torch.')}; "
              f"{raw_model.num_params() / 1e6:.2f}M parameters; "
              f"{accounting.tokens_per_iter(cfg):,} tokens per iteration; starting at "
              f"iteration {iter_num}")
    return Run(cfg, rank, world_size, device, dtype, ctx, scaler, data, meta, raw_model, model,
               optimizer, cfg.gradient_accumulation_steps // world_size, iter_num,
               best_val_loss, origin, ckpt_path)


# ----------------------------------------------------------------------------- the loop's parts

@torch.no_grad()
def estimate_loss(run):
    """Mean loss per split: over the same eval_iters random batches at every evaluation, or,
    with eval_iters=0, over every block of the split, each token predicted once.

    Fixed batches make successive evaluations comparable; the ranks share the batches out
    (each builds only its own) and average, so the estimate does not depend on the number of
    processes. The losses stay on the device until the end: no wait for the GPU per batch."""
    cfg = run.cfg
    run.model.eval()
    out = {}
    for split in ("train", "val"):
        if cfg.eval_iters:
            batches = (run.data[split].get_batch((cfg.seed, EVAL_BATCHES[split], k),
                                                 cfg.batch_size, cfg.block_size, run.device)
                       for k in range(run.rank, cfg.eval_iters, run.world_size))
        else:
            batches = run.data[split].windows(cfg.block_size, cfg.batch_size, run.device,
                                              run.rank, run.world_size)
        losses, counts = [], []
        # A progress bar for rank 0 at a terminal: a whole-split evaluation takes a while.
        quiet = not (run.rank == 0 and sys.stderr.isatty())
        for x, y in tqdm(batches, desc=f"eval {split}", leave=False, disable=quiet):
            with run.ctx:
                _, loss = run.model(x, y)
            losses.append(loss.detach())
            counts.append(y.numel())
        means = torch.stack(losses).cpu().double().tolist() if losses else []
        total = sum(mean * n for mean, n in zip(means, counts))
        total, count = runtime.all_reduce_mean([total, sum(counts)], run.device, run.world_size)
        out[split] = total / count
    run.model.train()
    return out


def save(run, iter_num):
    """Rank 0 writes the checkpoint: everything needed to continue exactly."""
    if run.rank == 0:
        save_checkpoint({
            "model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(), "config": asdict(run.cfg),
            "model_args": asdict(run.raw_model.config), "meta": run.meta, "origin": run.origin,
            "iter_num": iter_num, "best_val_loss": run.best_val_loss}, run.ckpt_path)


def evaluate_and_checkpoint(run, iter_num, log):
    """Estimate both losses and log them; save on a new best validation loss, or at every
    evaluation with always_save_checkpoint. Returns the validation loss."""
    losses = estimate_loss(run)
    log.evaluation(iter_num, losses)
    improved = losses["val"] < run.best_val_loss
    run.best_val_loss = min(run.best_val_loss, losses["val"])
    if (improved or run.cfg.always_save_checkpoint) and not run.cfg.eval_only:
        save(run, iter_num)
    return losses["val"]


def train_batches(run, iter_num):
    """This rank's micro-batches of iteration iter_num. Micro-steps are numbered across all
    ranks, and the ranks take consecutive slices, so the global batch is the same for any
    number of processes."""
    cfg = run.cfg
    for micro in range(run.micro_steps):
        key = (cfg.seed, TRAIN_BATCHES, iter_num, run.rank * run.micro_steps + micro)
        yield run.data["train"].get_batch(key, cfg.batch_size, cfg.block_size, run.device)


def step_seed(*numbers):
    """A 63-bit seed that is a pure function of the given integers."""
    return int(np.random.SeedSequence(numbers).generate_state(2, np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------- the loop

def train(cfg):
    """Run the training that cfg describes; returns the last validation loss."""
    run = setup(cfg)
    cfg, model, optimizer, scaler = run.cfg, run.model, run.optimizer, run.scaler
    log, stop_check = MetricsLog(run), StopCheck(run)
    iter_num, val_loss, stopping = run.iter_num, None, False
    # A resumed run evaluated its first iteration, and saved, before it stopped: doing it
    # again would log that iteration twice. (--eval_only evaluates whatever the iteration.)
    already_evaluated = run.iter_num if run.iter_num > 0 and not cfg.eval_only else None
    try:
        while True:
            # evaluate the losses and checkpoint, when due; not when stopping, which must be
            # quick (torchrun kills its workers 30 s after its own SIGTERM)
            due = iter_num % cfg.eval_interval == 0 or iter_num >= cfg.max_iters
            if due or stopping:  # nothing is saved before the last step's flags are read
                stopping = stop_check.settle() or stopping
            if (due or cfg.eval_only) and iter_num != already_evaluated and not stopping:
                val_loss = evaluate_and_checkpoint(run, iter_num, log)
            if stopping:
                save(run, iter_num)
                if run.rank == 0:
                    print(f"stopped by a signal after iteration {iter_num}; checkpoint saved "
                          f"to {run.ckpt_path}: resume with --init_from=resume", flush=True)
                break
            if iter_num >= cfg.max_iters or cfg.eval_only:
                break

            # the learning rate of this iteration
            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Dropout draws from the global generator: seed it per step and rank, so a resumed
            # run draws the same masks as the uninterrupted one without saving generator state.
            torch.manual_seed(step_seed(cfg.seed, iter_num, run.rank))
            # forward and backward over the micro-steps, then clip the gradients
            loss = forward_backward(model, train_batches(run, iter_num), run.ctx, scaler,
                                    run.micro_steps)
            norm = clip_gradients(model, optimizer, scaler, cfg.grad_clip)
            stopping = stop_check.should_stop(iter_num, loss, norm)  # raises if diverged
            # the update, skipped on the device if this step's gradients are not finite
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1

            if iter_num % cfg.log_interval == 0:
                log.step(iter_num, loss, lr)
    finally:
        stop_check.signals.restore()
        log.close()
        if run.world_size > 1:
            torch.distributed.destroy_process_group()
    return val_loss


def print_estimate(cfg):
    """--estimate: the run's cost, from the config and the dataset's vocabulary, no training."""
    try:
        meta = load_meta(cfg.data_dir or str(ROOT / "data" / cfg.dataset))
    except DataError:
        meta = {"vocab_size": 50257}
        print(f"(dataset {cfg.dataset} not prepared: assuming GPT-2's vocabulary)")
    model_config = scratch_config(cfg, meta)
    print(accounting.report(cfg, cfg.estimate_gpus, model_config))
    print(accounting.estimate(cfg, cfg.estimate_gpus, model_config, cfg.estimate_mfu))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return run_main(TrainConfig, lambda cfg: print_estimate(cfg) if cfg.estimate else train(cfg),
                    argv, __doc__, (DataError, CheckpointError, TrainingError,
                                    runtime.DeviceError), default_argv=default_args)


if __name__ == "__main__":
    sys.exit(main())
