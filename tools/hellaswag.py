"""HellaSwag: zero-shot accuracy at choosing how a short story goes on.

    python -m tools.hellaswag --init_from=gpt2        # OpenAI's weights: a hub name or a folder
    python -m tools.hellaswag --out_dir=out-gpt2      # our checkpoint in out_dir
    torchrun --standalone --nproc_per_node=8 -m tools.hellaswag --init_from=gpt2-xl

Each example is a context and four endings, one of them right. The model reads the context
followed by each ending (" " + ending), and its cross-entropy on the ending's tokens alone
scores that ending: the lowest wins. acc sums the loss over the ending's tokens, which favours
short endings; acc_norm takes the mean per token. This is llm.c's "completion style"; the
Eleuther harness's multiple-choice style scores differently and gives other numbers.

Published for this protocol on the 10,042 validation examples (llm.c, dev/data/hellaswag.py):
gpt2 (124M) acc 0.2859, acc_norm 0.2955; gpt2-xl (1558M) acc 0.3842, acc_norm 0.4893.
Guessing scores 0.25.
"""
import json
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from data.dataset import DataError
from data.preparation import download
from data.tokenizer import TokenizerError, tokenizer_from_meta
from serving.loading import load_model
from training import runtime
from training.safe_load import CheckpointError
from training.settings import ConfigError, check_dtype, run_main

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
CACHE = Path(__file__).resolve().parents[1] / "data" / "hellaswag" / "hellaswag_val.jsonl"


@dataclass
class HellaSwagConfig:
    init_from: str = "resume"  # resume (the checkpoint in out_dir), gpt2*, or a weights folder
    out_dir: str = "out"  # where the checkpoint is, with init_from=resume
    input: str = ""  # a local hellaswag_val.jsonl; empty downloads it to data/hellaswag/
    limit: int | None = None  # evaluate the first limit examples only; none takes them all
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto, float32, bfloat16 or float16

    def validate(self):
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be at least 1 (or none), got {self.limit}")
        check_dtype(self.dtype)
        return self


def load_examples(path, limit=None):
    """The examples of a HellaSwag .jsonl file: dicts with ctx, 4 endings and label 0-3."""
    examples = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if len(examples) == limit:
                    break
                if not line.strip():
                    continue
                try:
                    ex = json.loads(line)
                    # type(): true and 3.0 are `in range(4)` too; a string has 4 characters
                    ok = (isinstance(ex["ctx"], str) and type(ex["label"]) is int
                          and 0 <= ex["label"] < 4 and isinstance(ex["endings"], list)
                          and len(ex["endings"]) == 4
                          and all(isinstance(e, str) for e in ex["endings"]))
                except (ValueError, KeyError, TypeError):
                    ok = False
                if not ok:
                    raise DataError(f"{path}:{n}: not a HellaSwag example (a JSON object with "
                                    "ctx, 4 endings and a label from 0 to 3)")
                examples.append(ex)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def render_example(example, tokenizer, block_size):
    """tokens and mask, both (4, T) int64: row i is the context then ending i, padded with 0;
    mask is 1 on ending i's tokens. A row longer than block_size loses its oldest tokens."""
    ctx = tokenizer.encode(example["ctx"])
    rows = []
    for ending in example["endings"]:
        end = tokenizer.encode(" " + ending)  # the space belongs to the ending's first token
        mask = [0] * len(ctx) + [1] * len(end)
        rows.append(((ctx + end)[-block_size:], mask[-block_size:]))
    T = max(len(tokens) for tokens, _ in rows)
    tokens = torch.zeros((4, T), dtype=torch.long)
    mask = torch.zeros((4, T), dtype=torch.long)
    for i, (row, row_mask) in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = torch.tensor(row_mask)
    return tokens, mask


@torch.no_grad()
def ending_losses(model, tokens, mask):
    """Cross-entropy of each row's masked tokens: (sum, mean), each of shape (rows,).

    Attention is causal, so the padding after a row's end changes none of its losses."""
    logits, _ = model(tokens)  # (B, T, vocab)
    # The logits at position t predict token t + 1: shift targets and mask one to the left.
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(),
                             reduction="none").view(tokens.size(0), -1)
    mask = mask[:, 1:]
    total = (losses * mask).sum(dim=1)
    return total, total / mask.sum(dim=1)


def evaluate(model, tokenizer, examples, device, autocast=nullcontext(), rank=0, world_size=1):
    """acc, acc_norm and count over examples; rank r of world_size scores examples r,
    r + world_size, ... and the counts are summed over the ranks (all must call this)."""
    right = right_norm = count = 0
    with autocast:  # entered once: it is not free to enter per example
        for ex in examples[rank::world_size]:
            tokens, mask = render_example(ex, tokenizer, model.config.block_size)
            total, mean = ending_losses(model, tokens.to(device), mask.to(device))
            right += int(total.argmin()) == ex["label"]
            right_norm += int(mean.argmin()) == ex["label"]
            count += 1
    counts = torch.tensor([right, right_norm, count], device=device)
    if world_size > 1:
        torch.distributed.all_reduce(counts)
    right, right_norm, count = counts.tolist()
    return {"acc": right / count, "acc_norm": right_norm / count, "count": count}


def examples_path(cfg, rank, world_size):
    """--input, or the cached download, which rank 0 fetches while the others wait."""
    if cfg.input:
        return cfg.input
    if rank == 0 and not CACHE.is_file():
        download(URL, CACHE, "python -m tools.hellaswag --input=PATH ...")
    if world_size > 1:
        torch.distributed.barrier()
    return CACHE


def run(cfg):
    """Evaluate the model cfg names; rank 0 prints the result, which every rank returns."""
    rank, _, world_size, device = runtime.setup_distributed(cfg.device)
    try:
        autocast = runtime.autocast(device, runtime.pick_dtype(cfg.dtype, device))
        model, meta, _ = load_model(cfg.init_from, cfg.out_dir)
        if meta.get("tokenizer") != "gpt2":
            raise CheckpointError(f"the checkpoint in {cfg.out_dir} uses the "
                                  f"{meta.get('tokenizer')} tokenizer; HellaSwag needs "
                                  "a model that reads GPT-2 tokens")
        model.eval().to(device)
        tokenizer = tokenizer_from_meta(meta)  # GPT-2's, checked above
        examples = load_examples(examples_path(cfg, rank, world_size), cfg.limit)
        result = evaluate(model, tokenizer, examples, device, autocast, rank, world_size)
    finally:
        runtime.leave_process_group()
    if rank == 0:
        print(f"hellaswag: acc {result['acc']:.4f} | acc_norm {result['acc_norm']:.4f} | "
              f"{result['count']} examples")
    return result


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return run_main(HellaSwagConfig, run, argv, __doc__,
                    (DataError, CheckpointError, TokenizerError, runtime.DeviceError))


if __name__ == "__main__":
    sys.exit(main())
