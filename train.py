"""Train a GPT on one CPU, one GPU, or many GPUs and machines with DDP.

    python train.py                                       # the Shakespeare character model
    python train.py config/train_gpt2.toml --batch_size=8   # any config, flags override it
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.toml

The batch each (iteration, micro-step) sees is a pure function of the seed, so a resumed run
repeats exactly what the uninterrupted run would have done, and the global batch does not
depend on the number of processes.
"""
import importlib.util
import json
import math
import os
import runpy
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import accounting
import runtime
from checkpoint import CheckpointError, load_checkpoint, load_pretrained, save_checkpoint
from config import ConfigError, TrainConfig, run_main
from dataset import DataError, TokenData, load_meta
from model import GPT, GPTConfig, GPT2_SIZES, config_from_dict

ROOT = Path(__file__).resolve().parent
TRAIN, VAL = 0, 1  # split codes, part of each batch's random key


def default_args():
    """`python train.py` alone: the Shakespeare character model sized for this machine."""
    name = "train_shakespeare_char" if torch.cuda.is_available() else \
        "train_shakespeare_char_cpu"
    if not (ROOT / "data" / "shakespeare_char" / "meta.json").exists():
        print("data/shakespeare_char is not prepared yet: running "
              "python data/shakespeare_char/prepare.py", flush=True)
        script = runpy.run_path(str(ROOT / "data" / "shakespeare_char" / "prepare.py"))
        script["main"]([])
    return [str(ROOT / "config" / f"{name}.toml")]


def get_lr(it, cfg):
    """Linear warmup for warmup_iters, then decay to min_lr at lr_decay_iters: along a cosine,
    or (wsd) flat until the last cooldown_frac of the way, then in a straight line."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    if cfg.schedule == "wsd":
        cooldown_start = cfg.lr_decay_iters * (1 - cfg.cooldown_frac)
        if it < cooldown_start:
            return cfg.learning_rate
        progress = (it - cooldown_start) / (cfg.lr_decay_iters - cooldown_start)
        return cfg.learning_rate + progress * (cfg.min_lr - cfg.learning_rate)
    progress = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate -
                                                                     cfg.min_lr)


def step_seed(*numbers):
    """A 63-bit seed that is a pure function of the given integers."""
    return int(np.random.SeedSequence(numbers).generate_state(2, np.uint64)[0] >> 1)


def all_reduce_mean(values, world_size, device):
    """Average a list of floats over all ranks (every rank must call this)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size > 1:
        torch.distributed.all_reduce(t)
    return (t / world_size).tolist()


@torch.no_grad()
def estimate_loss(model, data, cfg, ctx, rank, world_size, device):
    """Mean loss per split: over the same eval_iters random batches at every evaluation, or,
    with eval_iters=0, over every block of the split, each token predicted once.

    Fixed batches make successive evaluations comparable; the ranks share the batches out
    and average, so the estimate does not depend on the number of processes."""
    model.eval()
    out = {}
    for split, code in (("train", TRAIN), ("val", VAL)):
        if cfg.eval_iters:
            batches = (data[split].get_batch((cfg.seed, code + 2, k), cfg.batch_size,
                                             cfg.block_size, device)
                       for k in range(cfg.eval_iters))
        else:
            batches = data[split].windows(cfg.block_size, cfg.batch_size, device)
        total, count = 0.0, 0
        # A progress bar for rank 0 at a terminal: a whole-split evaluation takes a while.
        quiet = not (rank == 0 and sys.stderr.isatty())
        batches = tqdm(batches, desc=f"eval {split}", leave=False, disable=quiet)
        for k, (x, y) in enumerate(batches):
            if k % world_size == rank:
                with ctx:
                    _, loss = model(x, y)
                total, count = total + loss.item() * y.numel(), count + y.numel()
        total, count = all_reduce_mean([total, count], world_size, device)
        out[split] = total / count
    model.train()
    return out


def check_vocab(meta, data, vocab_size, data_dir):
    """The dataset's token ids must fit the model's vocabulary."""
    if meta["vocab_size"] > vocab_size:
        raise DataError(f"{data_dir} uses a vocabulary of {meta['vocab_size']} tokens, more "
                        f"than the model's {vocab_size}")
    # Scanning every token costs a second per 500M tokens: do it where that is cheap.
    if sum(int(split.lengths.sum()) for split in data.values()) < 500_000_000:
        for split in data.values():
            split.check_vocab(vocab_size)


def check_writable(out_dir):
    """Create out_dir and prove a file can be written there, before any work is done."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise ConfigError(f"cannot write to out_dir {out_dir}: {e.strerror}") from None


def model_fields(cfg):
    return {f.name: getattr(cfg, f.name) for f in fields(GPTConfig) if hasattr(cfg, f.name)}


def init_model(cfg, meta, ckpt):
    """Build the model: from the checkpoint's shape on resume, OpenAI weights, or scratch."""
    if ckpt is not None:
        tokenizer_keys = ("tokenizer", "vocab_size", "chars")
        if any(ckpt["meta"].get(k) != meta.get(k) for k in tokenizer_keys):
            raise CheckpointError(f"the checkpoint in {cfg.out_dir} was trained with another "
                                  "tokenizer or vocabulary than this dataset's meta.json")
        saved = ckpt["model_args"]
        # A run from scratch took its shape from the config, which must still say the same;
        # a finetuning run took it from the pretrained weights, as its resumption does.
        for name, value in model_fields(cfg).items():
            if name in ("dropout", "vocab_size") or saved[name] == value:
                continue
            if ckpt["origin"] == "scratch":
                raise CheckpointError(
                    f"checkpoint in {cfg.out_dir} has {name}={saved[name]} but the config "
                    f"says {value}: pass --{name}={saved[name]} or use another out_dir")
            setattr(cfg, name, saved[name])
        model = GPT(config_from_dict({**saved, "dropout": cfg.dropout}))
        model.load_state_dict(ckpt["model"])
        return model
    if cfg.init_from in GPT2_SIZES or os.path.isdir(cfg.init_from):
        model = load_pretrained(cfg.init_from, dropout=cfg.dropout)
        for name in ("n_layer", "n_head", "n_embd", "bias"):
            setattr(cfg, name, getattr(model.config, name))  # the checkpoint's shape wins
        if cfg.block_size > model.config.block_size:
            raise ConfigError(f"block_size {cfg.block_size} exceeds the pretrained model's "
                              f"{model.config.block_size}")
        return model
    if cfg.init_from != "scratch":
        raise ConfigError(f"init_from={cfg.init_from!r}: expected scratch, resume, auto, "
                          f"one of {', '.join(GPT2_SIZES)}, or a directory of GPT-2 weights")
    return GPT(scratch_config(cfg, meta))


def scratch_config(cfg, meta):
    """The shape of a model trained from scratch on the dataset that meta describes; the
    padding ids of its vocabulary (see accounting.padded_vocab_size) are never targets."""
    vocab = accounting.padded_vocab_size(meta["vocab_size"])
    return config_from_dict({**model_fields(cfg), "vocab_size": vocab})


def resolve_init(cfg, ckpt_path):
    """Turn init_from=auto into resume or scratch; refuse to overwrite a checkpoint."""
    exists = os.path.exists(ckpt_path)
    if cfg.init_from == "auto":
        cfg.init_from = "resume" if exists else "scratch"
    if cfg.init_from == "resume" and not exists:
        raise CheckpointError(f"init_from=resume but there is no checkpoint at {ckpt_path}")
    if cfg.init_from != "resume" and exists and not (cfg.overwrite or cfg.eval_only):
        raise CheckpointError(f"{ckpt_path} already exists: pass --init_from=resume to "
                              "continue it, or --overwrite=true to start afresh over it")


def train(cfg):
    """Run the training loop that cfg describes; returns the final validation loss."""
    rank, local_rank, world_size = runtime.setup_distributed(cfg.backend, cfg.ddp_timeout)
    master = rank == 0
    device = runtime.pick_device(cfg.device)
    if device == "cuda" and world_size > 1:
        device = f"cuda:{local_rank}"
    dtype = runtime.pick_dtype(cfg.dtype, device)
    ctx = runtime.autocast(device, dtype)
    if cfg.gradient_accumulation_steps % world_size:
        raise ConfigError(f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) "
                          f"must be divisible by the number of processes ({world_size})")
    micro_steps = cfg.gradient_accumulation_steps // world_size
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: ~free speed on Ampere+
    torch.backends.cudnn.allow_tf32 = True

    if master:
        check_writable(cfg.out_dir)
    if cfg.wandb_log and importlib.util.find_spec("wandb") is None:
        raise ConfigError("wandb_log=true needs the wandb package: pip install wandb")
    data_dir = cfg.data_dir or str(ROOT / "data" / cfg.dataset)
    meta = load_meta(data_dir)
    data = {split: TokenData(data_dir, split) for split in ("train", "val")}
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    resolve_init(cfg, ckpt_path)
    ckpt = load_checkpoint(ckpt_path) if cfg.init_from == "resume" else None
    origin = ckpt["origin"] if ckpt else cfg.init_from  # scratch, or the pretrained weights
    torch.manual_seed(cfg.seed)
    model = init_model(cfg, meta, ckpt).to(device)
    check_vocab(meta, data, model.config.vocab_size, data_dir)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                           (cfg.beta1, cfg.beta2), device.split(":")[0])
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)
    iter_num, best_val_loss = 0, float("inf")
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        del ckpt  # free the CPU copy of the weights and optimizer state
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    ddp_model = model
    if world_size > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.startswith("cuda") else None)

    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    flops_per_iter = raw_model.flops_per_token(cfg.block_size) * tokens_per_iter
    peak = runtime.peak_flops(device, dtype)
    if master:
        print(json.dumps(asdict(cfg), indent=1))
        print(accounting.report(cfg, world_size, raw_model.config))
        print(f"{world_size} process(es) on {device} in {str(dtype).removeprefix('torch.')}; "
              f"{raw_model.num_params() / 1e6:.2f}M parameters; {tokens_per_iter:,} tokens "
              f"per iteration; starting at iteration {iter_num}")
    log = MetricsLog(cfg, master, resumed=iter_num > 0)

    def save(iter_num):
        if master:
            save_checkpoint({
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "config": asdict(cfg),
                "model_args": asdict(raw_model.config), "meta": meta, "origin": origin,
                "iter_num": iter_num, "best_val_loss": best_val_loss}, ckpt_path)

    start_iter, t_start = iter_num, time.time()
    t_last, val_loss, stopping = time.time(), None, False
    signals = StopSignals()
    try:
        while True:
            evaluate = iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters
            # A resumed run already evaluated its first iteration before it was saved.
            resumed_here = iter_num == start_iter > 0 and not cfg.eval_only
            if (evaluate or cfg.eval_only) and not resumed_here:
                losses = estimate_loss(model, data, cfg, ctx, rank, world_size, device)
                val_loss = losses["val"]
                elapsed = time.time() - t_start  # since this process's loop began
                log.write(iter=iter_num, train_loss=losses["train"], val_loss=val_loss,
                          elapsed_s=round(elapsed, 2))
                if master:
                    print(f"eval {iter_num}: train loss {losses['train']:.4f}, "
                          f"val loss {val_loss:.4f} ({elapsed:.1f} s)")
                improved = val_loss < best_val_loss
                best_val_loss = min(best_val_loss, val_loss)
                if (improved or cfg.always_save_checkpoint) and not cfg.eval_only:
                    save(iter_num)
            if stopping:
                save(iter_num)
                if master:
                    print(f"stopped by a signal after iteration {iter_num}; checkpoint saved "
                          f"to {ckpt_path}: resume with --init_from=resume", flush=True)
                break
            if iter_num >= cfg.max_iters or cfg.eval_only:
                break

            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Dropout draws from the global generator: seed it per step and rank, so a resumed
            # run draws the same masks as the uninterrupted one without saving generator state.
            torch.manual_seed(step_seed(cfg.seed, iter_num, rank))
            # Global micro-step index: ranks take consecutive slices of the global batch.
            batches = (data["train"].get_batch((cfg.seed, TRAIN, iter_num,
                                                rank * micro_steps + micro),
                                               cfg.batch_size, cfg.block_size, device)
                       for micro in range(micro_steps))
            loss_sum, norm = accumulate_gradients(ddp_model, optimizer, scaler, ctx, batches,
                                                  micro_steps, cfg.grad_clip)
            # float16's scaler skips steps with infinite gradients by design; elsewhere a
            # non-finite norm means the weights would be ruined. Ranks must agree on stopping,
            # so both flags travel in one all-reduce (a max): one small collective per step.
            diverged = ~torch.isfinite(loss_sum if scaler.is_enabled() else norm)
            flags = torch.stack([torch.tensor(signals.received, device=device), diverged])
            if world_size > 1:
                torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            if flags[1]:
                raise TrainingError(
                    f"iteration {iter_num}: the loss or gradient norm is not finite (loss "
                    f"{float(loss_sum):.4g}, gradient norm {float(norm):.4g}); stopped before "
                    f"the update, the last checkpoint in {cfg.out_dir} is untouched. Try a "
                    "lower learning_rate or a longer warmup_iters")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            stopping = bool(flags[0])

            if iter_num % cfg.log_interval == 0:
                loss_value = all_reduce_mean([float(loss_sum)], world_size, device)[0]
                now = time.time()
                dt = (now - t_last) / cfg.log_interval
                t_last = now
                tokens_per_sec = tokens_per_iter / dt
                mfu = flops_per_iter / dt / (peak * world_size) if peak else None
                eta = (now - t_start) / (iter_num - start_iter) * (cfg.max_iters - iter_num)
                log.write(iter=iter_num, loss=loss_value, lr=lr, ms=dt * 1000,
                          tokens_per_sec=tokens_per_sec, mfu=mfu)
                if master:
                    mfu_text = f"{mfu * 100:.1f}%" if mfu is not None else "n/a"
                    print(f"iter {iter_num}/{cfg.max_iters} | loss {loss_value:.4f} | lr "
                          f"{lr:.2e} | {dt * 1000:.1f} ms | {tokens_per_sec:,.0f} tok/s | mfu "
                          f"{mfu_text} | eta {format_duration(eta)}", flush=True)
    finally:
        signals.restore()
        log.close()
    if world_size > 1:
        torch.distributed.destroy_process_group()
    return val_loss


class TrainingError(RuntimeError):
    """Training cannot go on (a diverged loss); the message says what to change."""


class StopSignals:
    """Turn SIGINT and SIGTERM (Ctrl-C, a preempted machine) into a request to stop after
    the current step, with a checkpoint. A second Ctrl-C stops at once."""

    def __init__(self):
        self.received = False
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT,
                                                                     signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = True
        print(f"{signal.Signals(signum).name} received: stopping after this step",
              file=sys.stderr, flush=True)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def accumulate_gradients(model, optimizer, scaler, ctx, batches, micro_steps, grad_clip):
    """Forward and backward over one iteration's micro_steps batches (x, y), the gradient
    averaged over them, then unscaled and clipped (grad_clip 0: not clipped). Returns the
    mean loss and the gradient norm, as tensors. The caller takes the optimizer step.

    Under DDP (model wrapped), only the last backward all-reduces the gradients."""
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    loss_sum = 0.0
    for micro, (x, y) in enumerate(batches):
        last = micro == micro_steps - 1
        with (model.no_sync() if ddp and not last else nullcontext()), ctx:
            _, loss = model(x, y)
            loss = loss / micro_steps
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    return loss_sum, norm


def format_duration(seconds):
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLog:
    """Rank 0's metrics.jsonl (one JSON object per line), and optionally Weights & Biases."""

    def __init__(self, cfg, master, resumed):
        self.file = self.wandb = None
        if not master:
            return
        self.file = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a" if resumed else "w")
        if cfg.wandb_log:
            import wandb  # optional: only needed when asked for
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name,
                                    config=asdict(cfg))

    def write(self, **row):
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(row, step=row["iter"])

    def close(self):
        if self.file is not None:
            self.file.close()


def print_estimate(cfg):
    """--estimate: the run's cost, from the config and the dataset's vocabulary, no training."""
    world_size = cfg.estimate_gpus
    try:
        meta = load_meta(cfg.data_dir or str(ROOT / "data" / cfg.dataset))
    except DataError:
        meta = {"vocab_size": 50257}
        print(f"(dataset {cfg.dataset} not prepared: assuming GPT-2's vocabulary)")
    print(accounting.report(cfg, world_size, scratch_config(cfg, meta)))
    print(accounting.estimate(cfg, world_size, scratch_config(cfg, meta), cfg.estimate_mfu))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return run_main(TrainConfig, lambda cfg: print_estimate(cfg) if cfg.estimate else train(cfg),
                    argv, __doc__, (DataError, CheckpointError, TrainingError,
                                    runtime.DeviceError), default_argv=default_args)


if __name__ == "__main__":
    sys.exit(main())
