"""Reading and writing models: our checkpoints, and OpenAI's GPT-2 weights.

    model, meta, ckpt = load_model("resume", "out")  # train.py, sample.py, hellaswag.py, bench.py
    model, meta, _ = load_model("gpt2")              # OpenAI's weights: a hub name or a folder

A checkpoint is a dict of tensors and plain Python values (no classes), so that it loads
with torch.load(weights_only=True): a file from the internet can hold data, never a program.
GPT-2's files are held to the same rule: safetensors is parsed here (it is data only), and
pytorch_model.bin loads with weights_only too.
"""
import glob
import json
import math
import os
import pickle
import re
import tempfile
import warnings

import torch

from model import GPT, config_from_dict

GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
GPT2_META = {"tokenizer": "gpt2", "vocab_size": 50257}  # what OpenAI's weights read and write


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, unsafe or incompatible."""


def save_checkpoint(state, path):
    """Write state to path so that a crash at any moment leaves the old file intact.

    The new file is written beside the old one, flushed to disk, then renamed over it:
    os.replace is atomic on one filesystem, so readers see the old file or the new one."""
    folder = os.path.dirname(os.path.abspath(path))
    for stale in glob.glob(os.path.join(folder, ".ckpt-*.tmp")):
        os.unlink(stale)  # left by a save that was killed midway; only rank 0 writes here
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ckpt-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError) or isinstance(e.__cause__, OSError):  # a full disk, say
            reason = os.strerror(e.errno) if getattr(e, "errno", None) else str(e)
            raise CheckpointError(f"cannot write the checkpoint {path}: {reason}; the "
                                  "previous checkpoint there is intact") from None
        raise
    # Make the rename itself durable (the directory entry), where the OS allows it.
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(folder, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint with weights_only=True; every failure is a CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # damaged files set off torch's pickle-protocol notes
            warnings.simplefilter("ignore")
            # mmap: tensors are read from the file as they are used, so that eight ranks
            # resuming a large model do not each hold a whole copy in memory at once.
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        # weights_only names the first class or function the file asks for; anything else
        # it cannot parse is damage, not danger.
        code = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if code:
            raise CheckpointError(
                f"{path}: refused to load: it asks to import {code.group(1)}, so it could run "
                "code; a checkpoint holds only tensors and plain data") from None
        raise CheckpointError(
            f"{path}: corrupt or truncated checkpoint (not a torch file)") from None
    except Exception as e:  # damaged bytes can fail anywhere in the unpickler, in any way
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no 'model' entry)")
    return state


def model_from_checkpoint(ckpt, path, dropout=0.0):
    """(model, meta): the GPT that a checkpoint of ours holds, and its tokenizer's meta.
    A checkpoint of another project, or whose weights are not finite, is a CheckpointError."""
    try:
        model = GPT(config_from_dict({**ckpt["model_args"], "dropout": dropout}))
        model.load_state_dict(ckpt["model"])
        meta = ckpt["meta"]
    except (ValueError, RuntimeError, KeyError, TypeError) as e:  # another project's file
        reason = " ".join(str(e).split())  # one line, even for load_state_dict's list
        raise CheckpointError(f"{path}: cannot load this checkpoint: {reason}") from None
    return check_finite(model, path), meta


def check_finite(model, source):
    """model, refused if a weight is NaN or infinite: every logit would be NaN, and training
    would seem to diverge at its first step, blaming the learning rate."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise CheckpointError(f"{source}: the model's weights are not all finite (NaN or inf), "
                              "so it cannot be trained on or sampled from")
    return model


def latest_checkpoint(out_dir):
    """The checkpoint to resume from: ckpt.pt, or last.pt where a stop wrote one later (a run
    that keeps only its best model in ckpt.pt saves its stopping point beside it)."""
    best, last = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "last.pt")
    if not os.path.isfile(last):
        return best
    if not os.path.isfile(best):
        return last
    newer = load_checkpoint(last)["iter_num"] > load_checkpoint(best)["iter_num"]
    return last if newer else best


def load_model(init_from, out_dir="out", dropout=0.0):
    """(model, meta, checkpoint) for init_from: "resume" reads out_dir's latest checkpoint,
    and checkpoint is then its whole dict (optimizer state, iteration) for train.py to
    continue from; a GPT-2 size or a folder of GPT-2 files gives OpenAI's weights, and
    checkpoint None. meta describes the model's tokenizer, as a dataset's meta.json does. Any
    failure is a CheckpointError that names where the model was to come from."""
    if init_from != "resume":
        return load_pretrained(init_from, dropout), pretrained_meta(init_from), None
    path = latest_checkpoint(out_dir)
    ckpt = load_checkpoint(path)
    return (*model_from_checkpoint(ckpt, path, dropout), ckpt)


def pretrained_meta(name_or_path):
    """The tokenizer of GPT-2 weights: GPT-2's own, unless their folder holds a meta.json,
    which export.py writes beside a character model."""
    path = os.path.join(name_or_path, "meta.json")
    if not os.path.isfile(path):
        return GPT2_META
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:  # JSON errors are ValueErrors
        raise CheckpointError(f"{path}: cannot read the tokenizer: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: not a tokenizer's meta.json")
    return meta


def load_pretrained(name_or_path, dropout=0.0):
    """load_gpt2, with every failure (an unknown name, a folder without the files, no
    network, damaged weights) a one-line CheckpointError naming the source."""
    try:
        model = load_gpt2(name_or_path, dropout)
    except (ValueError, OSError, ImportError, RuntimeError, KeyError) as e:
        reason = " ".join(str(e).split())
        raise CheckpointError(f"cannot load the model from {name_or_path}: {reason}") from None
    return check_finite(model, name_or_path)


def load_gpt2(name_or_path, dropout=0.0):
    """OpenAI's GPT-2: a hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local folder
    with config.json and model.safetensors or pytorch_model.bin, in the hub's layout or
    save_pretrained's."""
    folder = name_or_path if os.path.isdir(name_or_path) else _download_gpt2(name_or_path)
    with open(os.path.join(folder, "config.json")) as f:
        hf_config = json.load(f)
    return GPT.from_gpt2(hf_config, _read_weights(folder), dropout)


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
    """Parse a .safetensors file: an 8-byte header length, a JSON header, then raw tensors.

    The format holds data only, so reading it needs no trust, and no extra package. Every field
    of the header is checked, as it may come from anywhere: ValueError for any that is wrong.
    The file is memory-mapped, not read: the tensors are views of the page cache, so eight
    ranks loading GPT-2 XL on one machine do not each hold a private copy of the file."""
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
