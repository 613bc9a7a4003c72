"""From settings to a ready run, for train.py: processes, device, precision, data, the model
(new, resumed or pretrained) and its optimizer, with the checks that refuse a run before it
costs anything; the default run; the lock that keeps two runs off one out_dir.

    run = setup(cfg, named)  # then train.py loops over run.model, run.data and run.optimizer
"""
import contextlib
import difflib
import importlib.util
import os
import runpy
import sys
import tempfile
import textwrap
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from data.dataset import DataError, TokenData, load_meta
from model import GPT
from parallel import data_parallel, mesh
from parallel.pipeline import Pipeline
from training import accounting, checkpoint, runtime
from training.safe_load import GPT2_SIZES, CheckpointError, load_checkpoint, load_pretrained
from training.settings import ConfigError, TrainConfig
from training.step import make_optimizer

ROOT = Path(__file__).resolve().parents[1]  # the repository


def default_config():
    """What `python train.py` runs: the Shakespeare character model sized for this machine.
    Flags alone refine it (`python train.py --max_iters=100`); a config file replaces it."""
    name = "train_shakespeare_char" if torch.cuda.is_available() else "train_shakespeare_char_cpu"
    return [str(ROOT / "config" / f"{name}.toml")]


def check_divisible(cfg, world_size):
    """The micro-steps of an iteration are shared out evenly over the data-parallel ranks
    (world_size processes in rows of tp, in pp stages: each row, each stage, shares its batch)."""
    steps, world_size = cfg.gradient_accumulation_steps, world_size // (cfg.tp * cfg.pp)
    if steps % world_size:
        below, above = steps // world_size * world_size, (steps // world_size + 1) * world_size
        options = " or ".join(str(n) for n in (below, above) if n)
        ranks = "processes" if cfg.tp * cfg.pp == 1 else "data-parallel rows (processes / tp / pp)"
        raise ConfigError(f"gradient_accumulation_steps ({steps}) must be divisible by the "
                          f"number of {ranks} ({world_size}): try {options}, with "
                          "batch_size scaled to keep the tokens per iteration")


def check_writable(out_dir):
    """Create out_dir and prove a file can be written there, before any work is done."""
    if os.path.islink(out_dir) and not os.path.exists(out_dir):  # makedirs: "File exists"
        raise ConfigError(f"out_dir {out_dir} is a symbolic link to {os.readlink(out_dir)}, "
                          "which does not exist: create that folder, or remove the link")
    try:
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise ConfigError(f"cannot write to out_dir {out_dir}: {e.strerror}") from None


def init_model(cfg, meta, ckpt, ckpt_path):
    """(model, cfg): a new model, the checkpoint's, or OpenAI's weights; and cfg with the
    shape of the model as built (pretrained weights, and a finetuning run, bring their own)."""
    if cfg.init_from == "scratch":
        return GPT(accounting.model_shape(cfg, meta["vocab_size"])), cfg
    if ckpt is None and os.path.isfile(cfg.init_from):  # another run's weights, to finetune
        ckpt, ckpt_path = load_checkpoint(cfg.init_from), cfg.init_from
    if ckpt is not None:
        model, model_meta = checkpoint.model_from_checkpoint(ckpt, ckpt_path, cfg.dropout)
        if any(model_meta.get(k) != meta.get(k) for k in ("tokenizer", "vocab_size", "chars")):
            raise CheckpointError(f"the checkpoint {ckpt_path} was trained with another "
                                  "tokenizer or vocabulary than this dataset's meta.json")
        # A run from scratch took its shape from its settings: this command cannot change it.
        for name, saved in ckpt["model_args"].items():
            value = getattr(cfg, name, saved)  # vocab_size is the dataset's, not a setting
            if (cfg.init_from == "resume" and ckpt.get("origin") == "scratch"
                    and name != "dropout" and saved != value):
                raise CheckpointError(f"the checkpoint in {cfg.out_dir} has {name}={saved} "
                                      f"but the config says {value}: drop --{name}, or use "
                                      "another out_dir")
    elif cfg.init_from in GPT2_SIZES or os.path.isdir(cfg.init_from):
        model = load_pretrained(GPT, cfg.init_from, cfg.dropout)
    else:
        raise ConfigError(f"init_from={cfg.init_from!r}: expected scratch, resume, auto, "
                          f"one of {', '.join(GPT2_SIZES)}, a directory of GPT-2 weights, or "
                          "a checkpoint file")
    shape = {name: getattr(model.config, name)
             for name in ("n_layer", "n_head", "n_embd", "bias", "rope", "qk_norm", "relu2")}
    if cfg.block_size > model.config.block_size:
        raise ConfigError(f"block_size {cfg.block_size} exceeds the pretrained model's "
                          f"{model.config.block_size}")
    return model, replace(cfg, **shape)


def check_memory(cfg, model_config, world_size, device):
    """Refuse, before allocating anything, a run whose estimated memory per process
    (accounting.memory_per_rank) exceeds what the device has."""
    need = sum(accounting.memory_per_rank(cfg, model_config, world_size).values())
    have = runtime.device_memory(device)
    if have and need > have:
        raise ConfigError(f"the run needs about {need / 2**30:,.1f} GiB per process "
                          f"(accounting.memory_per_rank), more than the {have / 2**30:,.1f} "
                          f"GiB that {device} has: lower batch_size or block_size, or use a "
                          "smaller model")


@contextlib.contextmanager
def out_dir_lock(out_dir):
    """One run per out_dir: rank 0 locks the folder while the run lasts, so a second run on it
    fails at once; the OS drops the lock however the process ends, and leaves no file."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    import fcntl  # Unix only
    created = not os.path.lexists(out_dir)
    check_writable(out_dir)
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(f"another run is using out_dir {out_dir}: wait for it to end, or "
                          "use another out_dir") from None
    try:
        yield
    finally:
        os.close(fd)
        if created:  # a run that failed before writing anything leaves no empty folder
            with contextlib.suppress(OSError):  # not empty: the run wrote its files
                os.rmdir(out_dir)


def check_dataset(name):
    """--dataset names a folder under data/: a name that is none is an error listing the
    datasets prepared, and the closest name."""
    if (ROOT / "data" / name).is_dir():
        return
    known = sorted(p.name for p in (ROOT / "data").iterdir()
                   if (p / "prepare.py").is_file() or (p / "meta.json").is_file())
    prepared = [n for n in known if (ROOT / "data" / n / "meta.json").is_file()]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise DataError(f"no dataset {name!r} under data/{hint}; prepared: "
                    f"{', '.join(prepared) or 'none yet'}; others: "
                    f"{', '.join(n for n in known if n not in prepared)}; or --data_dir=PATH")


def prepare_default_data(rank, world_size):
    """data/shakespeare_char, the default run's dataset, is prepared on first use."""
    folder = ROOT / "data" / "shakespeare_char"
    if rank == 0 and not (folder / "meta.json").exists():
        print("data/shakespeare_char is not prepared yet: running "
              "python data/shakespeare_char/prepare.py", flush=True)
        runpy.run_path(str(folder / "prepare.py"))["main"]([])
    if world_size > 1:
        torch.distributed.barrier()


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
    raw_model: GPT  # the model itself (under PP this rank's Stage), whose state is saved
    model: torch.nn.Module  # what the loop runs: raw_model, compiled, DDP-wrapped or pipelined
    layout: mesh.Layout  # how the run is spread: data-parallel rows of tp ranks
    optimizer: torch.optim.Optimizer
    micro_steps: int  # forward/backward passes per iteration on each rank
    iter_num: int  # the iteration to start from
    evaluated: bool | str  # whether iteration iter_num's evaluation is done (checkpoint.save)
    best_val_loss: float
    origin: str  # scratch, or the pretrained weights the run began from
    elapsed_s: float  # seconds of training before this process, in earlier processes


def settings_text(cfg):
    """The settings that differ from TrainConfig's defaults, as flags, wrapped to 100 wide."""
    default = TrainConfig()
    flags = [f"--{f.name}={str(v).lower() if isinstance(v, bool) else v}"
             for f in fields(cfg) if (v := getattr(cfg, f.name)) != getattr(default, f.name)]
    return textwrap.fill(" ".join(["settings (those not at their defaults):", *flags]), 99,
                         subsequent_indent=" ", break_long_words=False, break_on_hyphens=False)


def setup(cfg, named=()):
    """Turn the settings into a ready run; rank 0 prints what it will cost. named: the settings
    this command names, which a resumed run takes from it."""
    rank, local_rank, world_size, device = runtime.setup_distributed(
        cfg.device, cfg.backend, cfg.ddp_timeout)
    if rank == 0:
        check_writable(cfg.out_dir)
    init_from, ckpt_path = checkpoint.resolve_init(cfg, rank, world_size)
    cfg, ckpt = replace(cfg, init_from=init_from), None
    if init_from == "resume":  # the run goes on with its own settings, from its checkpoint
        ckpt = load_checkpoint(ckpt_path, resume=True)
        cfg = checkpoint.resumed_settings(cfg, ckpt.get("config", {}), named)
    dtype, ctx, scaler = runtime.training_precision(cfg.dtype, device, cfg.deterministic)
    if cfg.fsdp:
        ctx = contextlib.nullcontext()  # FSDP's own policy casts (data_parallel.shard)
    if cfg.wandb_log and importlib.util.find_spec("wandb") is None:
        raise ConfigError("wandb_log=true needs the wandb package: pip install wandb")
    if not cfg.data_dir and cfg.dataset == "shakespeare_char":
        prepare_default_data(rank, world_size)
    if not cfg.data_dir:
        check_dataset(cfg.dataset)
    data_dir = cfg.data_dir or str(ROOT / "data" / cfg.dataset)
    meta = load_meta(data_dir)
    data = {split: TokenData(data_dir, split) for split in ("train", "val")}
    for split in data.values():  # a block longer than a split would evaluate for ever
        split.check_block_size(cfg.block_size)
    if init_from == "scratch":
        check_memory(cfg, accounting.model_shape(cfg, meta["vocab_size"]), world_size, device)
    torch.manual_seed(cfg.seed)
    raw_model, cfg = init_model(cfg, meta, ckpt, ckpt_path)
    mesh.check(cfg, world_size, dtype)  # the layout, with the model's shape, now known
    check_divisible(cfg, world_size)
    layout = mesh.make_layout(cfg, rank, world_size, device)
    raw_model.to(device)
    raw_model.activation_checkpointing = cfg.activation_checkpointing
    check_vocab(meta, data, raw_model.config.vocab_size, data_dir)
    raw_model = mesh.spread(raw_model, layout, dtype)  # this rank's part: a stage under PP
    optimizer = make_optimizer(raw_model, cfg)
    iter_num, evaluated, best_val_loss, origin, elapsed_s = 0, False, float("inf"), init_from, 0.0
    if ckpt is not None:  # where the run goes on (training/checkpoint.py)
        iter_num, evaluated, best_val_loss, origin, elapsed_s = checkpoint.resume_state(
            ckpt, raw_model, optimizer, scaler, layout)
        del ckpt  # free the CPU copy of the weights and optimizer state
    model = torch.compile(raw_model) if cfg.compile else raw_model
    model = data_parallel.wrap_ddp(model, layout, device, local_rank)
    micro_steps = cfg.gradient_accumulation_steps // layout.dp_size
    if layout.pp > 1:  # the loop runs the stages' schedule (parallel/pipeline.py)
        model = Pipeline(raw_model, layout, device, micro_steps, cfg.pp_schedule)
    if rank == 0:
        print(settings_text(cfg))  # all of them are saved in each checkpoint
        print(accounting.report(cfg, world_size, raw_model.config,
                                (device, runtime.device_memory(device))))
        print(f"{world_size} process(es) on {device} in {str(dtype).removeprefix('torch.')}; "
              f"{accounting.num_params(raw_model.config) / 1e6:.2f}M parameters; "
              f"{accounting.tokens_per_iter(cfg):,} tokens per iteration; starting at "
              f"iteration {iter_num}")
        if cfg.dropout and (cfg.tp > 1 or cfg.pp > 1):  # docs/parallelism.md: dropout
            print("note: with dropout, TP and PP train the same model but not the same run as "
                  "one process: a rank draws the masks of its own heads, or its own layers")
        flops = accounting.total_flops(cfg, raw_model.config)
        if device == "cpu" and flops > 1e15:  # hours at a CPU's 1e11 FLOP/s: a GPU's recipe?
            print(f"note: {flops:.2g} FLOPs take hours on a CPU (the step lines' eta, measured, "
                  "will say how many); config/train_shakespeare_char_cpu.toml is the CPU's")
        busy = runtime.busy_note(device)
        if busy:  # on stdout with the other start lines: stderr is for what went wrong
            print(busy, flush=True)
        if cfg.decay_lr and cfg.warmup_iters >= min(cfg.lr_decay_iters, cfg.max_iters) > 0:
            print(f"note: warmup_iters ({cfg.warmup_iters}) is not below the schedule's end "
                  f"({min(cfg.lr_decay_iters, cfg.max_iters)}): the learning rate only warms "
                  "up and never cools down; give a smaller --warmup_iters", file=sys.stderr)
        if cfg.decay_lr and cfg.lr_decay_iters <= iter_num < cfg.max_iters:
            print(f"note: the learning-rate schedule ended at iteration {cfg.lr_decay_iters} "
                  f"(lr_decay_iters): the rate stays at min_lr={cfg.min_lr:g} from here. To "
                  "train on, give --max_iters alone: the schedule follows it "
                  "(docs/guarantees.md: resuming a run)", file=sys.stderr, flush=True)
    return Run(cfg, rank, world_size, device, dtype, ctx, scaler, data, meta, raw_model, model,
               layout, optimizer, micro_steps, iter_num,
               evaluated, best_val_loss, origin, elapsed_s)
