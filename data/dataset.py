"""Datasets on disk, and the one sampler that draws batches from them.

A dataset is a folder holding `meta.json` (the tokenizer and the token counts) and, per split,
one `{split}.bin` or shards `{split}_000000.bin, ...`: flat arrays of uint16 token ids, as in
nanoGPT, memory-mapped. data/preparation.py and data/corpus.py write them.
"""
import json
import os
from pathlib import Path

import numpy as np
import torch


GPT2_VOCAB_SIZE = 50257  # tokenizer.GPT2Tokenizer's; not imported, to keep tiktoken off this path


class DataError(Exception):
    """A problem with a dataset that the user can fix (missing, malformed or too short)."""


def _prepare_hint(data_dir: Path, verb="create") -> str:
    script = data_dir / "prepare.py"
    if script.is_file():
        return f"run `python {script}` to {verb} it"
    return f"run `python data/prepare.py --input FILE --out_dir {data_dir}` to {verb} it"


def _vocab_problem(meta: dict) -> str | None:
    """What is wrong with meta's vocabulary for its tokenizer, or None."""
    kind, size = meta.get("tokenizer"), meta["vocab_size"]
    if kind == "gpt2":
        return None if size == GPT2_VOCAB_SIZE else (
            f"says vocab_size {size} but GPT-2's tokenizer has {GPT2_VOCAB_SIZE} tokens")
    if kind != "char":
        return f"names an unknown tokenizer {kind!r}; expected 'char' or 'gpt2'"
    chars = meta.get("chars")
    if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
        return "has no chars list of single characters"
    if len(set(chars)) != len(chars):
        return "lists a character twice in chars"
    if len(chars) != size:
        return f"says vocab_size {size} but lists {len(chars)} characters"
    return None


def load_meta(data_dir) -> dict:
    """Read data_dir/meta.json, or raise DataError saying how to create it; a vocabulary that
    does not fit its tokenizer, or token counts that are not counts, are refused here."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"{path} not found; {_prepare_hint(Path(data_dir))}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if (not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int)
            or meta["vocab_size"] < 1):
        raise DataError(f"{path} has no vocab_size; {_prepare_hint(Path(data_dir))}")
    problem = _vocab_problem(meta)
    for key in ("train_tokens", "val_tokens"):
        count = meta.get(key, 0)
        if type(count) is not int or count < 0:  # type(): True is an int, but not a count
            problem = problem or f"has {key} {count!r}, not a count of tokens"
    if problem:
        raise DataError(f"{path} {problem}; {_prepare_hint(Path(data_dir), 're-create')}")
    return meta


# ----------------------------------------------------------------------------- sampling

def _split_rows(rows: np.ndarray, device):
    """Rows of block_size + 1 tokens -> inputs x and targets y (y is x shifted by one)."""
    rows = torch.from_numpy(rows)
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    device = torch.device(device)
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.to(device), y.to(device)


class TokenData:
    """One split of a dataset folder; get_batch draws uniformly over all its windows. No random
    state is kept: a batch depends on its key alone, so resumed and multi-GPU runs reproduce a
    single-process run exactly. The files are opened once, here: a dataset prepared again
    under a running training (renamed over the old files) leaves it reading the old ones."""

    def __init__(self, data_dir, split: str):
        data_dir = Path(data_dir)
        single = data_dir / f"{split}.bin"
        shards = sorted(data_dir.glob(f"{split}_[0-9]*.bin"))
        if single.is_file() and shards:
            raise DataError(f"{data_dir} holds both {single.name} and shards "
                            f"{shards[0].name}...; remove one")
        self.paths = shards or [single]
        if not self.paths[0].is_file():
            raise DataError(f"split '{split}' not found: no {single} or {split}_*.bin shards; "
                            f"{_prepare_hint(data_dir)}")
        self.files = [open(p, "rb") for p in self.paths]  # closed when this object is freed
        sizes = [os.fstat(f.fileno()).st_size for f in self.files]
        for path, size in zip(self.paths, sizes):
            if size % 2:
                raise DataError(f"{path} is {size} bytes, not a whole number of uint16 tokens; "
                                "it is truncated or not a token file")
        self.lengths = np.array(sizes, dtype=np.int64) // 2  # tokens per shard
        meta = load_meta(data_dir) if (data_dir / "meta.json").is_file() else {}
        expected = meta.get(f"{split}_tokens")
        if expected is not None and expected != self.lengths.sum():
            files = single if not shards else data_dir / f"{split}_*.bin ({len(shards)} shards)"
            raise DataError(f"{files} holds {self.lengths.sum():,} tokens but meta.json records "
                            f"{expected:,}: truncated, or written by another preparation; "
                            f"{_prepare_hint(data_dir, 're-create')}")

    def _starts(self, block_size: int) -> np.ndarray:
        """Valid start positions per shard: i with i + block_size + 1 <= len(shard)."""
        starts = self.lengths - block_size
        short = np.flatnonzero(starts < 1)
        if short.size:
            i = short[0]
            raise DataError(f"{self.paths[i]} holds {self.lengths[i]} tokens, fewer than "
                            f"block_size + 1 = {block_size + 1}; use more text or a smaller "
                            "block_size")
        return starts

    def check_block_size(self, block_size: int) -> None:
        """Raise DataError if a shard of this split holds fewer than block_size + 1 tokens."""
        self._starts(block_size)

    def get_batch(self, key: tuple[int, ...], batch_size: int, block_size: int, device):
        """(x, y), int64 (batch_size, block_size), y = x shifted by one: a pure function of key,
        non-negative ints such as (seed, stream, step, micro_step). Each row's window is uniform
        over every (shard, start) pair of the split."""
        starts = self._starts(block_size)
        ends = np.cumsum(starts)  # window number g lies in the first shard with g < ends[shard]
        rng = np.random.default_rng(key)  # hashes all the ints through a SeedSequence
        g = rng.integers(0, ends[-1], size=batch_size)
        shard = np.searchsorted(ends, g, side="right")
        offset = g - (ends[shard] - starts[shard])
        rows = np.empty((batch_size, block_size + 1), dtype=np.int64)
        # Open the memmaps per batch, as nanoGPT does: a long-lived memmap keeps every page it
        # ever touched in the process's memory, which grows to the size of the dataset.
        for s in np.unique(shard):
            tokens = np.memmap(self.files[s], dtype=np.uint16, mode="r")
            for r in np.flatnonzero(shard == s):
                rows[r] = tokens[offset[r]:offset[r] + block_size + 1]
            del tokens
        return _split_rows(rows, device)

    def windows(self, block_size: int, batch_size: int, device, rank=0, world_size=1):
        """Yield (x, y) batches of every non-overlapping block of the split, in order (a shard's
        last partial block left out), each token predicted once; rank gets batches rank,
        rank + world_size, ... of them, and builds no other."""
        k = 0  # the batch's number in the whole sequence
        for file, n in zip(self.files, self.lengths):
            tokens = np.memmap(file, dtype=np.uint16, mode="r")
            starts = range(0, n - block_size, block_size)
            for i in range(0, len(starts), batch_size):
                if k % world_size == rank:
                    rows = np.stack([tokens[s:s + block_size + 1]
                                     for s in starts[i:i + batch_size]])
                    yield _split_rows(rows.astype(np.int64), device)
                k += 1
            del tokens

    def check_vocab(self, vocab_size: int) -> None:
        """Raise DataError if any token id is >= vocab_size. This reads every token: a second
        for Shakespeare, minutes for a web-scale dataset (startup.check_vocab skips those)."""
        for path, file, n in zip(self.paths, self.files, self.lengths):
            if n == 0:
                continue
            top = int(np.memmap(file, dtype=np.uint16, mode="r").max())
            if top >= vocab_size:
                raise DataError(f"{path} holds token id {top}, outside the vocab of {vocab_size}; "
                                "was it prepared with another tokenizer?")
