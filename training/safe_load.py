"""Reading files that may be damaged or hostile, our checkpoints and OpenAI's GPT-2 weights: a
file from the internet can hold data, never a program.
- A checkpoint: torch.load(weights_only=True) unpickles plain data and tensors only; every entry
  is then checked for its type and a sane value, so that a damaged file fails at once in one
  line, not as a traceback many iterations later.
- GPT-2's weights, from the Hugging Face hub or a folder: safetensors is parsed here, as data;
  pytorch_model.bin loads with weights_only. The model is built by the class the caller gives
  (model.GPT.from_gpt2), so that this page does not import the model.
"""
import dataclasses
import io
import json
import math
import os
import pickle
import re
import warnings
import zipfile

import torch

from training.settings import TrainConfig


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, unsafe or incompatible."""


def load_checkpoint(path, map_location="cpu", resume=False):
    """Read a checkpoint with weights_only=True and check its fields (with resume, also those
    continuing a run needs): a damaged file fails now in one line, a CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # damaged files set off torch's pickle-protocol notes
            warnings.simplefilter("ignore")
            # mmap: tensors are read as they are used, not copied whole into every rank.
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        # weights_only names the first class or function asked for ("unsupported GLOBAL
        # posix.system ..."; older torch "Unsupported global: GLOBAL ..."); else it is damage.
        code = re.search(r"(?i)unsupported (?:global: )?GLOBAL (\S+)", str(e))
        if code:
            raise CheckpointError(
                f"{path}: refused to load: it carries code (it asks to import "
                f"{code.group(1)}); a checkpoint holds only tensors and plain data") from None
        raise CheckpointError(
            f"{path}: corrupt or truncated checkpoint (not a torch file)") from None
    except Exception as e:  # damaged bytes can fail anywhere in the unpickler, in any way
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint "
                              f"({type(e).__name__}: {_first_sentence(e)})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no 'model' entry)")
    check_fields(state, path, resume)
    return state


def _first_sentence(error, limit=200):
    """An exception's message on one line, cut at a sentence's or a word's end, not midway."""
    text = " ".join(str(error).split())
    if len(text) <= limit:
        return text
    cut = text.rfind(". ", 0, limit)
    return text[:cut + 1] if cut > 0 else text[:text.rfind(" ", 0, limit)] + " ..."


# The entries of a checkpoint and the type each must have: the first three build the model,
# the rest continue training (resume).
FIELDS = {"model": dict, "model_args": dict, "meta": dict,
          "optimizer": dict, "iter_num": int, "best_val_loss": (float, int), "config": dict,
          "scaler": dict, "elapsed_s": (float, int), "origin": str}
RESUME_FIELDS = ("model_args", "meta", "optimizer", "iter_num", "best_val_loss", "config")
MAX_PARAMS = 10e9  # as for GPT-2's config.json: GPT-2 XL has 1.6e9; more is a damaged file


def check_fields(ckpt, path, resume=False):
    """Every entry present has its type and a sane value (model_args: positive sizes, at most
    MAX_PARAMS parameters, as n_layer=10**6 would take hours to allocate, then fail); with
    resume, every entry that continuing a run needs is present."""
    def refuse(reason):
        raise CheckpointError(f"{path}: cannot load this checkpoint: {reason}")

    for name in RESUME_FIELDS if resume else ():
        if name not in ckpt:
            refuse(f"it has no {name!r} entry, which resuming a run needs")
    for name, kind in FIELDS.items():
        value = ckpt.get(name)
        if name in ckpt and (not isinstance(value, kind) or isinstance(value, bool)):
            refuse(f"its {name!r} entry is {type(value).__name__} {_short(value)}, "
                   f"not {getattr(kind, '__name__', 'a number')}")
    if ckpt.get("iter_num", 0) < 0:
        refuse(f"iter_num is {ckpt['iter_num']}; it counts iterations done, from 0")
    if math.isnan(ckpt.get("best_val_loss", 0.0)):
        refuse("best_val_loss is nan")
    optimizer = ckpt.get("optimizer", {"state": {}, "param_groups": []})
    if not (isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)):
        refuse("its optimizer entry has no 'state' dict and 'param_groups' list")
    saved = ckpt.get("config", {})  # the run's settings, which resume takes
    for setting in dataclasses.fields(TrainConfig):
        value = saved.get(setting.name)
        if setting.name in saved and not _is_a(value, setting.type):
            kind = getattr(setting.type, "__name__", setting.type)
            refuse(f"config.{setting.name} is {_short(value)}, not {kind}")
    args = ckpt.get("model_args", {})
    for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
        if name in args and (type(args[name]) is not int or args[name] < 1):
            refuse(f"model_args.{name} is {_short(args[name])}, not a positive integer")
    if all(type(args.get(k)) is int for k in ("n_layer", "n_embd", "vocab_size", "block_size")):
        L, C, V, T = (args[k] for k in ("n_layer", "n_embd", "vocab_size", "block_size"))
        if 12 * L * C * C + (V + T) * C > MAX_PARAMS:  # the blocks, then the two embeddings
            refuse(f"model_args describe {12 * L * C * C + (V + T) * C:.2g} parameters; more "
                   f"than {MAX_PARAMS:.0e} is refused as a damaged file")


def _is_a(value, kind):
    """Whether value is of the setting type kind (a float setting takes an int too)."""
    if kind is float:
        kind = (float, int)
    return isinstance(value, kind) and (isinstance(value, bool) == (kind is bool))


def _short(value):
    """A value as it would be typed, cut short if long."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_optimizer_state(state, params, group_sizes):
    """The saved optimizer state fits this model, whose (name, whole shape) params are in one
    process's optimizer's order, in groups of group_sizes; else a CheckpointError (AdamW would
    take it, and the run diverge many iterations later)."""
    groups = state["param_groups"]
    sizes = [len(g.get("params", ())) if isinstance(g, dict) else None for g in groups]
    if sizes != list(group_sizes):
        raise CheckpointError(f"the checkpoint's optimizer state has groups of {sizes} "
                              f"parameters; this model's optimizer has {list(group_sizes)}")
    for i, moments in state["state"].items():
        if type(i) is not int or not 0 <= i < len(params) or not isinstance(moments, dict):
            raise CheckpointError(f"the checkpoint's optimizer state has an entry {i!r} for "
                                  f"no parameter of this model's {len(params)}")
        name, shape = params[i]
        for key, value in moments.items():
            if key != "step" and (not isinstance(value, torch.Tensor) or value.shape != shape):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else _short(value)
                raise CheckpointError(f"the checkpoint's optimizer state for {name} has "
                                      f"{key} of shape {got}, the parameter {tuple(shape)}")


def checkpoint_iteration(path):
    """A checkpoint's iter_num, read without its tensors: torch.save's zip holds data.pkl, the
    pickled dict, whose tensors refer to records of their own. Reading data.pkl alone takes
    7 ms for a 1.6 GB file, torch.load 92 ms with mmap, 2 s without. The unpickler imports
    nothing (every class or function becomes an inert stand-in), so no code from the file runs."""
    try:
        with zipfile.ZipFile(path) as archive:
            index = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            ckpt = _Index(io.BytesIO(archive.read(index))).load()
    except Exception as e:  # not a zip, no data.pkl, or damage anywhere in it
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint "
                              f"({type(e).__name__}: {_first_sentence(e)})") from None
    iter_num = ckpt.get("iter_num") if isinstance(ckpt, dict) else None
    if type(iter_num) is not int or iter_num < 0:
        raise CheckpointError(f"{path}: cannot load this checkpoint: its iter_num is "
                              f"{_short(iter_num)}, not a count of iterations")
    return iter_num


class _Inert(dict):
    """What every class, function and tensor of the index unpickles to: a dict (state dicts
    are OrderedDicts, filled item by item) that takes any arguments, and does nothing."""

    def __init__(self, *args, **kwargs):
        super().__init__()


class _Index(pickle.Unpickler):
    def find_class(self, module, name):
        return _Inert

    def persistent_load(self, pid):  # a tensor's storage, in a record not read here
        return None


# ----------------------------------------------------------------------------- GPT-2's files

GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def load_pretrained(model_class, name_or_path, dropout=0.0):
    """load_gpt2, with every failure (an unknown name, no files, no network, damaged weights)
    a one-line CheckpointError naming the source."""
    try:
        model = load_gpt2(model_class, name_or_path, dropout)
    except (ValueError, OSError, ImportError, RuntimeError, KeyError) as e:
        reason = " ".join(str(e).split())
        raise CheckpointError(f"cannot load the model from {name_or_path}: {reason}") from None
    return check_finite(model, name_or_path)


def check_finite(model, source):
    """model, refused if a weight is NaN or infinite: every logit would be NaN, and training
    would seem to diverge at its first step, blaming the learning rate."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise CheckpointError(f"{source}: the model's weights are not all finite (NaN or inf), "
                              "so it cannot be trained on or sampled from")
    return model


def load_gpt2(model_class, name_or_path, dropout=0.0):
    """OpenAI's GPT-2, built by model_class.from_gpt2: a hub name (gpt2, gpt2-medium,
    gpt2-large, gpt2-xl) or a local folder with config.json and model.safetensors or
    pytorch_model.bin, in the hub's layout or save_pretrained's."""
    folder = name_or_path if os.path.isdir(name_or_path) else _download_gpt2(name_or_path)
    with open(os.path.join(folder, "config.json")) as f:
        hf_config = json.load(f)
    return model_class.from_gpt2(hf_config, _read_weights(folder), dropout)


def _download_gpt2(name):
    """Fetch a GPT-2 size from the Hugging Face hub; return the local folder."""
    if name not in GPT2_SIZES:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(GPT2_SIZES)} "
                         "or a directory holding config.json and model.safetensors")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ImportError(f"downloading {name} needs huggingface_hub (pip install "
                          "huggingface_hub), or pass a local directory of its files") from e
    return snapshot_download(name, allow_patterns=["config.json", "model.safetensors"])


def _read_weights(folder):
    """Tensors from model.safetensors or pytorch_model.bin, neither able to run code."""
    path = os.path.join(folder, "model.safetensors")
    if os.path.exists(path):
        return read_safetensors(path)
    path = os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(path):
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # it asks for a class or function, or is damaged
            tensors = None
        if not isinstance(tensors, dict):
            raise ValueError(f"{path}: refused to load: it is not a file of plain tensors "
                             "(it may be damaged, or carry code)")
        return tensors
    raise FileNotFoundError(f"{folder} holds neither model.safetensors nor pytorch_model.bin")


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F64": torch.float64, "I64": torch.int64, "U8": torch.uint8,
                       "BOOL": torch.bool}


def read_safetensors(path):
    """Parse a .safetensors file: an 8-byte header length, a JSON header, then raw tensors:
    data only, so it needs no trust and no package. Every header field is checked (ValueError).
    Memory-mapped: the tensors are views of the page cache, not a private copy per rank."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or 8 + n > size:
            raise ValueError(f"{path}: truncated safetensors file: its header says {n} bytes, "
                             f"the file has {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError:  # not JSON, or not UTF-8
            header = None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    # shared=False maps the file copy-on-write: the model never writes back into it.
    data = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)[8 + n:]
    tensors, spans = {}, []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype, shape, offsets = (info.get(k) if isinstance(info, dict) else None
                                 for k in ("dtype", "shape", "data_offsets"))
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {key} has an unknown dtype {dtype!r}")
        dtype = _SAFETENSORS_DTYPES[dtype]
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError(f"{path}: tensor {key} has a bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= len(data)):
            raise ValueError(f"{path}: tensor {key} has data_offsets {offsets!r} outside the "
                             f"{len(data)} bytes of data")
        begin, end = offsets
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{path}: tensor {key} of shape {shape} needs "
                             f"{math.prod(shape) * dtype.itemsize} bytes, its offsets span "
                             f"{end - begin}")
        spans.append((begin, end, key))
        flat = data[begin:end]
        if (8 + n + begin) % dtype.itemsize:  # a view needs aligned data; copy what is not
            flat = flat.clone()
        tensors[key] = flat.view(dtype).view(shape)
    spans.sort()
    for (_, end, key), (begin, _, other) in zip(spans, spans[1:]):
        if begin < end:
            raise ValueError(f"{path}: tensors {key} and {other} overlap in the file")
    return tensors
