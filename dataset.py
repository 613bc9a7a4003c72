"""Datasets on disk, and the one sampler that draws batches from them.

A dataset is a folder holding `meta.json` (the tokenizer and the token counts) and, per split,
either one `{split}.bin` or shards `{split}_000000.bin, {split}_000001.bin, ...`: flat arrays of
uint16 token ids, the format nanoGPT uses. The sampler memory-maps them, so a dataset larger than
RAM costs nothing to open. Web-scale corpora are streamed into shards by corpus.py.
"""
import argparse
import contextlib
import json
import os
import shutil
import sys
import urllib.request
from pathlib import Path

import numpy as np
import torch

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt")


class DataError(Exception):
    """A problem with a dataset that the user can fix (missing, malformed or too short)."""


class ArgumentParser(argparse.ArgumentParser):
    """The data scripts' parser: a mistake in the flags is one line, `error: ...` (exit 2),
    like every other error of this project, rather than argparse's usage text and error."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def _prepare_hint(data_dir: Path) -> str:
    script = data_dir / "prepare.py"
    if script.is_file():
        return f"run `python {script}` to create it"
    return f"run `python data/prepare.py --input FILE --out_dir {data_dir}` to create it"


# ----------------------------------------------------------------------------- preparing

def _make_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission
        raise DataError(f"cannot create the folder {folder}: {e.strerror}") from None


def replace_atomically(path: Path, write) -> None:
    """Call write(tmp) then rename tmp to path, so a crash never leaves half a file at path."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)  # atomic on POSIX and Windows when both are on one filesystem
    finally:
        tmp.unlink(missing_ok=True)


def _dataset_files(folder: Path) -> list[Path]:
    """meta.json and the token files of both splits, whichever of them are in folder."""
    names = ["meta.json", "train.bin", "val.bin"]
    shards = [p for split in ("train", "val") for p in folder.glob(f"{split}_[0-9]*.bin")]
    return [p for p in [*(folder / n for n in names), *shards] if p.is_file()]


@contextlib.contextmanager
def replacing_dataset(out_dir: Path):
    """Let the body write a new dataset into out_dir, the old one kept in out_dir/.old.

    The body's success deletes the old files (stale shards would silently join the new
    dataset); its failure, a bad document halfway through a corpus or Ctrl-C, deletes the new
    files and puts the old ones back, so a failed run loses nothing prepared before. The body
    writes meta.json last: it exists only beside complete .bin files."""
    _make_dir(out_dir)
    aside = out_dir / ".old"
    if aside.exists():
        raise DataError(f"{aside} holds the dataset an interrupted run set aside: move its "
                        f"files back into {out_dir}, or delete it, then run again")
    old = _dataset_files(out_dir)
    aside.mkdir()
    for path in old:
        path.rename(aside / path.name)
    try:
        yield
    except BaseException:
        for path in _dataset_files(out_dir):
            path.unlink()
        for path in old:
            (aside / path.name).rename(path)
        aside.rmdir()
        raise
    shutil.rmtree(aside)


def write_tokens(path, ids, vocab_size: int) -> None:
    """Write token ids as a flat uint16 array; every id must be below vocab_size <= 2**16."""
    assert vocab_size <= 2**16, f"vocab of {vocab_size} does not fit in uint16"
    arr = np.asarray(ids, dtype=np.int64)
    assert arr.size == 0 or (0 <= arr.min() and arr.max() < vocab_size), "id outside the vocab"
    replace_atomically(Path(path), lambda tmp: arr.astype(np.uint16).tofile(tmp))


def prepare_text(text: str, out_dir, tokenizer_kind: str, val_fraction: float = 0.1) -> dict:
    """Tokenize text into out_dir/{train,val}.bin and meta.json; return the meta.

    As in nanoGPT the split is by characters: the first 1 - val_fraction of the text trains,
    the rest validates. Each part is encoded on its own, so no token straddles the cut.
    """
    from tokenizer import get_tokenizer  # ours; imported here so sampling needs no tokenizer
    if not text:
        raise DataError("no text to prepare: the input is empty")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    try:
        tok = get_tokenizer(tokenizer_kind, text if tokenizer_kind == "char" else None)
    except (OSError, RuntimeError, ValueError) as e:  # unknown kind, GPT-2 vocab unavailable
        raise DataError(f"cannot build the {tokenizer_kind} tokenizer: {e}") from e
    cut = int(len(text) * (1 - val_fraction))
    out_dir = Path(out_dir)
    meta = tok.meta()
    with replacing_dataset(out_dir):
        for split, part in (("train", text[:cut]), ("val", text[cut:])):
            ids = tok.encode(part)
            write_tokens(out_dir / f"{split}.bin", ids, tok.vocab_size)
            meta[f"{split}_tokens"] = len(ids)
        replace_atomically(out_dir / "meta.json",
                            lambda tmp: tmp.write_text(json.dumps(meta, indent=1) + "\n"))
    print(f"{tokenizer_kind}: vocab {meta['vocab_size']:,}, train {meta['train_tokens']:,} "
          f"tokens, val {meta['val_tokens']:,} tokens -> {out_dir}")
    return meta


def prepare_file(input_path, out_dir, tokenizer_kind: str, val_fraction: float = 0.1) -> dict:
    """prepare_text on a UTF-8 text file."""
    try:
        text = Path(input_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {input_path} as UTF-8 text: {e}") from e
    return prepare_text(text, out_dir, tokenizer_kind, val_fraction)


def download(url: str, path) -> None:
    """Fetch url into path (standard library only); a progress bar when stderr is a terminal."""
    path = Path(path)
    _make_dir(path.parent)

    def fetch(tmp: Path) -> None:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            bar = None
            if sys.stderr.isatty():
                from tqdm import tqdm
                bar = tqdm(total=total, unit="B", unit_scale=True, desc=path.name)
            while chunk := r.read(1 << 20):
                f.write(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()

    print(f"downloading {url} -> {path}")
    try:
        replace_atomically(path, fetch)
    except OSError as e:  # urllib's URLError and HTTPError are OSErrors
        raise DataError(f"download of {url} failed: {e}; download it yourself and pass "
                        "--input PATH") from e


def prepare_shakespeare(out_dir, tokenizer_kind: str, input_path=None) -> dict:
    """Tiny Shakespeare into out_dir, downloading it to out_dir/input.txt unless given."""
    if input_path is None:
        input_path = Path(out_dir) / "input.txt"
        if not input_path.is_file():
            download(SHAKESPEARE_URL, input_path)
    return prepare_file(input_path, out_dir, tokenizer_kind)


def shakespeare_main(argv, tokenizer_kind: str, script_dir) -> dict:
    """The command line shared by data/shakespeare*/prepare.py."""
    p = ArgumentParser(
        description=f"Prepare Tiny Shakespeare with the {tokenizer_kind} tokenizer.")
    p.add_argument("--input", type=Path, default=None,
                   help="a local copy of input.txt (default: download into OUT_DIR)")
    p.add_argument("--out_dir", type=Path, default=Path(script_dir),
                   help="where to write train.bin, val.bin and meta.json (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        return prepare_shakespeare(args.out_dir, tokenizer_kind, args.input)
    except DataError as e:
        raise SystemExit(f"error: {e}") from e


def load_meta(data_dir) -> dict:
    """Read data_dir/meta.json, or raise DataError saying how to create it."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"{path} not found; {_prepare_hint(Path(data_dir))}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int) \
            or meta["vocab_size"] < 1:
        raise DataError(f"{path} has no vocab_size; {_prepare_hint(Path(data_dir))}")
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
    """One split of a dataset folder; get_batch draws uniformly over all its windows.

    Only paths and lengths are kept: no open files, no random state. A batch depends on its key
    alone, which is what makes resume and multi-GPU runs reproduce a single-process run exactly.
    """

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
        sizes = [p.stat().st_size for p in self.paths]
        for path, size in zip(self.paths, sizes):
            if size % 2:
                raise DataError(f"{path} is {size} bytes, not a whole number of uint16 tokens; "
                                "it is truncated or not a token file")
        self.lengths = np.array(sizes, dtype=np.int64) // 2  # tokens per shard

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

    def get_batch(self, key: tuple[int, ...], batch_size: int, block_size: int, device):
        """Return (x, y), int64 tensors of shape (batch_size, block_size), y = x shifted by one.

        key: non-negative ints, e.g. (seed, split_code, step, micro_step); the batch is a pure
        function of it. Each row's window is uniform over every (shard, start) pair of the split,
        so a shard is chosen in proportion to its number of starts.
        """
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
            tokens = np.memmap(self.paths[s], dtype=np.uint16, mode="r")
            for r in np.flatnonzero(shard == s):
                rows[r] = tokens[offset[r]:offset[r] + block_size + 1]
            del tokens
        return _split_rows(rows, device)

    def windows(self, block_size: int, batch_size: int, device):
        """Yield (x, y) batches of every non-overlapping block of the split, in order: the
        whole-split evaluation, where each token is predicted once (a shard's last partial
        block is left out)."""
        for path, n in zip(self.paths, self.lengths):
            tokens = np.memmap(path, dtype=np.uint16, mode="r")
            starts = range(0, n - block_size, block_size)
            for i in range(0, len(starts), batch_size):
                rows = np.stack([tokens[s:s + block_size + 1] for s in starts[i:i + batch_size]])
                yield _split_rows(rows.astype(np.int64), device)
            del tokens

    def check_vocab(self, vocab_size: int) -> None:
        """Raise DataError if any token id is >= vocab_size.

        This reads every token: a second for Shakespeare, but minutes for a web-scale dataset,
        whose writer records its vocab in meta.json; there, trust that and skip this check.
        """
        for path, n in zip(self.paths, self.lengths):
            if n == 0:
                continue
            top = int(np.memmap(path, dtype=np.uint16, mode="r").max())
            if top >= vocab_size:
                raise DataError(f"{path} holds token id {top}, outside the vocab of {vocab_size}; "
                                "was it prepared with another tokenizer?")
