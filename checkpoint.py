"""The one checkpoint save/load pair: atomic writes, and loads that cannot run code.

A checkpoint is a dict of tensors and plain Python values (no classes), so that it loads
with torch.load(weights_only=True): a file from the internet can hold data, never a program.
"""
import glob
import os
import pickle
import re
import tempfile
import warnings

import torch

from model import GPT


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
    except BaseException:
        os.unlink(tmp)
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
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only names the first class or function the file asks for; anything else
        # it cannot parse is damage, not danger.
        code = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if code:
            raise CheckpointError(
                f"{path}: refused to load: it asks to import {code.group(1)}, so it could run "
                "code; a checkpoint holds only tensors and plain data") from None
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint (not a torch file)") \
            from None
    except Exception as e:  # damaged bytes can fail anywhere in the unpickler, in any way
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no 'model' entry)")
    return state


def load_pretrained(name_or_path, dropout=0.0):
    """GPT.from_pretrained, with every failure (an unknown name, a folder without the files,
    no network, damaged weights) a one-line CheckpointError naming the source."""
    try:
        return GPT.from_pretrained(name_or_path, dropout=dropout)
    except (ValueError, OSError, ImportError, RuntimeError, KeyError) as e:
        reason = " ".join(str(e).split())
        raise CheckpointError(f"cannot load the model from {name_or_path}: {reason}") from None
