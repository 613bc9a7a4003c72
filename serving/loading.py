"""The one model loader of the scripts that use a trained model (sample.py, serving/http.py,
tools/hellaswag.py): a checkpoint of ours, or OpenAI's GPT-2 weights. train.py builds its model
in training/startup.py from the same pieces. And the KV cache's size that sample.py and the
server give such a model by default.

    model, meta, ckpt = load_model("resume", "out")  # the latest checkpoint in out
    model, meta, _ = load_model("gpt2")              # OpenAI's weights: a hub name or a folder
"""
import json
import os

from model import GPT
from serving.pages import PagePool
from training import accounting, runtime
from training.checkpoint import latest_checkpoint, model_from_checkpoint
from training.safe_load import CheckpointError, load_checkpoint, load_pretrained

GPT2_META = {"tokenizer": "gpt2", "vocab_size": 50257}  # what OpenAI's weights read and write


def load_model(init_from, out_dir="out", dropout=0.0):
    """(model, meta, checkpoint) for init_from: "resume" reads out_dir's latest checkpoint,
    and checkpoint is then its whole dict (optimizer state, iteration, settings); a GPT-2 size
    or a folder of GPT-2 files gives OpenAI's weights, and checkpoint None. meta describes the
    model's tokenizer, as a dataset's meta.json does. Any failure is a CheckpointError that
    names where the model was to come from."""
    if init_from != "resume":
        return load_pretrained(GPT, init_from, dropout), pretrained_meta(init_from), None
    if not any(os.path.isfile(os.path.join(out_dir, name)) for name in ("ckpt.pt", "last.pt")):
        raise CheckpointError(f"no checkpoint in {out_dir}: train one first: python train.py "
                              f"--out_dir={out_dir}")
    path = latest_checkpoint(out_dir)
    ckpt = load_checkpoint(path)
    return (*model_from_checkpoint(ckpt, path, dropout), ckpt)


def pretrained_meta(name_or_path):
    """The tokenizer of GPT-2 weights: GPT-2's own, unless their folder holds a meta.json,
    which tools/export.py writes beside a character model."""
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


def default_kv_pages(m, rows, page_size, device, dtype):
    """Pages for every row to reach block_size, as today's slots reserve, but no more than
    half the memory the weights leave: beyond that, rows wait or are preempted."""
    pool = PagePool(m.n_layer, 0, page_size)
    pages = rows * pool.pages_for(m.block_size)
    have = runtime.device_memory(device)
    if have:
        spare = have // 2 - 4 * accounting.num_params(m, non_embedding=False)
        pages = min(pages, spare // accounting.kv_cache_bytes(m, page_size, dtype.itemsize))
    return max(1, pages)
