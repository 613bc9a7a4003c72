"""Typed settings: one dataclass of defaults, overridden by TOML files, then --key=value flags.

    python train.py config/train_shakespeare_char.toml --batch_size=32 --compile=false

An unknown key, or a value not of the setting's type, is a ConfigError naming the key (and the
closest valid one). Nothing is exec'd.
"""
import difflib
import inspect
import os
import re
import sys
import tomllib
import types
from dataclasses import dataclass, fields


class ConfigError(ValueError):
    """A user mistake in a config file or flag; scripts print it in one line and exit."""


def check_dtype(dtype):
    """The dtype settings of every script take the same four words."""
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"  # checkpoints (each holds every setting of its run) and metrics.jsonl
    eval_interval: int = 2000  # evaluate and checkpoint every this many iterations
    log_interval: int = 1  # print and record a metrics line every this many iterations
    eval_iters: int = 200  # batches per split for each loss estimate; 0: the whole split
    eval_only: bool = False  # evaluate once, then exit without training
    always_save_checkpoint: bool = True  # checkpoint at every eval, not only on a new best
    init_from: str = "scratch"  # scratch, resume, auto (resume if one exists), gpt2*, a ckpt.pt
    # (a ckpt.pt: another run's weights, with a fresh optimizer, to finetune them)
    overwrite: bool = False  # allow a fresh run to replace a checkpoint already in out_dir
    # logging
    wandb_log: bool = False  # also log to Weights & Biases (needs the wandb package)
    wandb_project: str = "nanogpt"  # W&B project name
    wandb_run_name: str = "run"  # W&B run name
    # data
    dataset: str = "shakespeare_char"  # a folder under data/ made by its prepare.py
    data_dir: str = ""  # the dataset's folder, if not data/<dataset>
    gradient_accumulation_steps: int = 1  # micro-steps per iteration, across all ranks
    batch_size: int = 12  # sequences per micro-step on each rank
    block_size: int = 1024  # tokens per sequence
    # model (GPTConfig's fields)
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.0  # 0 for pretraining; 0.1+ to regularise small datasets
    bias: bool = False  # biases in Linear and LayerNorm layers (GPT-2 has them)
    rope: bool = False  # rotary position embeddings instead of a learned position table
    qk_norm: bool = False  # RMS-normalise queries and keys per head
    relu2: bool = False  # ReLU squared instead of GELU in the MLP
    # optimizer
    optimizer: str = "adamw"  # adamw, or muon: Muon for the Blocks' matrices, AdamW the rest
    learning_rate: float = 6e-4  # peak learning rate (of AdamW's parameters)
    muon_lr: float = 0.02  # optimizer=muon: the peak learning rate of the Blocks' matrices
    muon_ns_steps: int = 5  # optimizer=muon: Newton-Schulz iterations per update; 3 is cheaper
    max_iters: int = 600000  # total optimizer steps
    weight_decay: float = 0.1  # decoupled weight decay on 2-D weights
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    grad_clip: float = 1.0  # clip the gradient norm to this; 0 disables clipping
    # learning-rate schedule
    decay_lr: bool = True  # warm up then decay as `schedule` says; false keeps it constant
    schedule: str = "cosine"  # cosine, or wsd: warmup, stable, then a linear cooldown
    cooldown_frac: float = 0.2  # wsd: the share of lr_decay_iters spent cooling down
    warmup_iters: int = 2000  # linear warmup length
    lr_decay_iters: int = 600000  # where the schedule reaches min_lr; a --max_iters flag moves it
    min_lr: float = 6e-5  # floor of the decay, about learning_rate / 10
    # system
    device: str = "auto"  # auto picks cuda, then mps, then cpu; or cuda:1 and so on
    dtype: str = "auto"  # auto, float32, bfloat16 or float16 (autocast precision)
    compile: bool = False  # torch.compile the model (slow start, faster steps)
    seed: int = 1337  # seeds initialisation, batches and dropout
    deterministic: bool = False  # bit-identical reruns on GPUs too, with slower kernels
    backend: str = "auto"  # DDP backend: auto is nccl on CUDA devices and gloo otherwise
    ddp_timeout: int = 600  # seconds a rank waits for its peers before failing with an error
    fsdp: bool = False  # shard weights, gradients and AdamW state over the ranks (FSDP2, torchrun)
    tp: int = 1  # tensor-parallel degree: ranks that split each Block (torchrun; parallel/)
    pp: int = 1  # pipeline-parallel degree: stages that split the Blocks by depth (torchrun)
    pp_schedule: str = "1f1b"  # pp>1: 1f1b (holds at most pp micro-batches) or gpipe (all)
    activation_checkpointing: bool = False  # recompute Blocks in backward: less memory, +1/3 FLOPs

    def validate(self):
        """Reject values no run can use; the message names the setting."""
        positive = ["eval_interval", "log_interval", "batch_size", "block_size", "tp", "pp",
                    "gradient_accumulation_steps", "n_layer", "n_head", "n_embd", "ddp_timeout",
                    "muon_ns_steps"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        # Written as `not 0 < x < inf` so that nan fails too.
        for name in ("learning_rate", "muon_lr"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ConfigError(f"{name} must be positive and finite, got "
                                  f"{getattr(self, name)}")
        # Muon's Newton-Schulz steps bring every singular value into 0.7..1.2 within about 5;
        # more change little, each costs three matrix products per weight, and a step cannot be
        # interrupted (a stop waits for it): 20 is plenty.
        if self.muon_ns_steps > 20:
            raise ConfigError(f"muon_ns_steps must be at most 20, got {self.muon_ns_steps}: "
                              "5 is the usual, 3 is cheaper")
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.seed >= 2 ** 63:  # torch's generators take a signed 64-bit seed
            raise ConfigError(f"seed must be below 2**63, got {self.seed}")
        for name in ["seed", "eval_iters", "min_lr", "weight_decay",
                     "grad_clip", "max_iters", "warmup_iters", "lr_decay_iters"]:
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.decay_lr and self.min_lr > self.learning_rate:  # the decay would climb
            raise ConfigError(f"min_lr ({self.min_lr:g}) must not exceed learning_rate "
                              f"({self.learning_rate:g}), the rate it decays from")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, "
                              f"{self.beta2}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head "
                              f"({self.n_head})")
        if self.rope and self.n_embd // self.n_head % 2:  # RoPE turns pairs of channels
            raise ConfigError(f"rope=true needs an even head size, n_embd / n_head = "
                              f"{self.n_embd // self.n_head}: change n_embd or n_head")
        if self.pp_schedule not in ("1f1b", "gpipe"):
            raise ConfigError(f"pp_schedule must be 1f1b or gpipe, got {self.pp_schedule!r}")
        if self.schedule not in ("cosine", "wsd"):
            raise ConfigError(f"schedule must be cosine or wsd, got {self.schedule!r}")
        if not 0 <= self.cooldown_frac <= 1:
            raise ConfigError(f"cooldown_frac must be in [0, 1], got {self.cooldown_frac}")
        if self.rope and self.init_from.startswith("gpt2"):
            raise ConfigError("rope=true cannot load OpenAI's GPT-2, which learned positions")
        check_dtype(self.dtype)
        return self


def help_text(cls, defaults=None):
    """One line per setting: name, default (defaults' value, or the class's) and the comment
    beside it in the source (of cls, or of the class it extends)."""
    source = "".join(inspect.getsource(c) for c in cls.__mro__ if c is not object)
    comments = dict(re.findall(r"^\s+(\w+):.*?#\s*(.*)$", source, re.M))
    def shown(value):  # as it would be typed: true/false, and strings quoted if odd
        if isinstance(value, bool):
            return str(value).lower()
        return repr(value) if isinstance(value, str) and not value.isprintable() else value

    value = (lambda f: getattr(defaults, f.name)) if defaults else (lambda f: f.default)
    return "\n".join(f"  {'--' + f.name + '=' + str(shown(value(f))):<32} "
                     f"{comments.get(f.name, '')}" for f in fields(cls))


def _field_type(cls, key, source):
    """The type of setting key; an unknown key is an error suggesting the closest one."""
    known = {f.name: f.type for f in fields(cls)}
    if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{source}: unknown setting {key!r}{hint}")
    return known[key]


def _convert(cls, key, value, source):
    """value (a TOML value, or a flag's string) as the type of setting key of cls; a setting
    typed `int | None` also takes the word none."""
    want = _field_type(cls, key, source)
    if isinstance(want, types.UnionType):  # X | None
        if isinstance(value, str) and value.strip().lower() == "none":
            return None
        want = next(t for t in want.__args__ if t is not type(None))
    if isinstance(value, str) and want is not str:
        text = value.strip().lower()
        if want is bool:
            if text not in ("true", "false"):
                raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
            return text == "true"
        try:
            return want(text)
        except ValueError:
            raise ConfigError(f"{source}: {key} must be {want.__name__}, "
                              f"got {value!r}") from None
    if want is float and type(value) is int:  # TOML's 1 for a float setting
        return float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {key} must be {want.__name__}, got {value!r}")
    return value


def parse_config(cls, argv):
    """Build cls from its defaults, then TOML files, then --key=value flags, in argv order (a
    bare --flag sets a boolean setting to true)."""
    return cls(**parse_overrides(cls, argv))


def parse_overrides(cls, argv):
    """{setting: value} for every setting that the files and flags of argv name."""
    overrides = {}
    for arg in argv:
        if not arg.startswith("--"):
            try:
                with open(arg, "rb") as f:
                    table = tomllib.load(f)
            except OSError as e:
                raise ConfigError(f"cannot read config file {arg}: {e.strerror}") from None
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{arg}: not valid TOML: {e}") from None
            for key, value in table.items():
                overrides[key] = _convert(cls, key, value, arg)
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if _field_type(cls, key, arg) is not bool:
                raise ConfigError(f"{arg}: give a value, as in --{key}=VALUE")
            value = "true"
        overrides[key] = _convert(cls, key, value, arg)
    return overrides


HELP = ("-h", "--help")


def run_main(cls, action, argv, doc, errors=(), base=()):
    """The scripts' main(): --help prints doc and every setting of cls with its default;
    otherwise the settings from base (config files that come first) then argv are validated
    and handed to action, whose result, if an int, is the exit status. A ConfigError or one of
    errors is the user's to fix: one line on stderr and exit code 2."""
    if any(arg in HELP for arg in argv):  # anywhere: after a config file too
        rest = [arg for arg in argv if arg not in HELP]
        try:
            shown = parse_config(cls, [*base, *rest])
        except ConfigError:  # a bad flag beside --help: show the plain defaults
            shown = parse_config(cls, base)
        print(doc + "\nSettings (as this command would set them):\n" + help_text(cls, shown))
        return 0
    try:
        status = action(parse_config(cls, [*base, *argv]).validate())
        return status if isinstance(status, int) else 0
    except (ConfigError, *errors) as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, once, not once per rank
            print(f"error: {e}", file=sys.stderr)
        if "TORCHELASTIC_ERROR_FILE" in os.environ:  # torchrun's summary then names the cause
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
            ErrorHandler().record_exception(e)
        return 2
