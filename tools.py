"""What the tools share that train.py does not need: the one model loader of the scripts that
use a trained model (sample.py, hellaswag.py), and the check of a file a tool is to write
(bench.py, plot.py). train.py builds its model in startup.py from the same pieces.

    model, meta, ckpt = load_model("resume", "out")  # the latest checkpoint in out
    model, meta, _ = load_model("gpt2")              # OpenAI's weights: a hub name or a folder
"""
import json
import os

from checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, load_pretrained,
                        model_from_checkpoint)
from config import ConfigError

GPT2_META = {"tokenizer": "gpt2", "vocab_size": 50257}  # what OpenAI's weights read and write


def load_model(init_from, out_dir="out", dropout=0.0):
    """(model, meta, checkpoint) for init_from: "resume" reads out_dir's latest checkpoint,
    and checkpoint is then its whole dict (optimizer state, iteration, settings); a GPT-2 size
    or a folder of GPT-2 files gives OpenAI's weights, and checkpoint None. meta describes the
    model's tokenizer, as a dataset's meta.json does. Any failure is a CheckpointError that
    names where the model was to come from."""
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


def check_output_file(name, path):
    """The file setting name says to write can be written: its folder exists and takes files.
    Checked at the start, so that a typo does not cost a whole benchmark or plot first."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"{name}: cannot write {path}: the folder {folder} does not exist")
    if os.path.isdir(path) or not os.access(folder, os.W_OK):
        raise ConfigError(f"{name}: cannot write {path}: "
                          + ("it is a folder" if os.path.isdir(path) else "permission denied"))
