"""Datasets on disk, and the one sampler that draws batches from them.

A dataset is a folder holding `meta.json` (the tokenizer and the token counts) and, per split,
either one `{split}.bin` or shards `{split}_000000.bin, {split}_000001.bin, ...`: flat arrays of
uint16 token ids, the format nanoGPT uses. The sampler memory-maps them, so a dataset larger than
RAM costs nothing to open. Web-scale corpora are streamed into shards by prepare_corpus, whose
memory stays one shard however large the corpus.
"""
import argparse
import contextlib
import glob
import json
import multiprocessing
import os
import shutil
import sys
import urllib.request
from collections.abc import Iterable, Iterator
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


def _replace_atomically(path: Path, write) -> None:
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
def _replacing_dataset(out_dir: Path):
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
    _replace_atomically(Path(path), lambda tmp: arr.astype(np.uint16).tofile(tmp))


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
    with _replacing_dataset(out_dir):
        for split, part in (("train", text[:cut]), ("val", text[cut:])):
            ids = tok.encode(part)
            write_tokens(out_dir / f"{split}.bin", ids, tok.vocab_size)
            meta[f"{split}_tokens"] = len(ids)
        _replace_atomically(out_dir / "meta.json",
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
        _replace_atomically(path, fetch)
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


# ----------------------------------------------------------------------------- large corpora

CORPUS_SUFFIXES = (".txt", ".jsonl", ".parquet")


def corpus_files(paths) -> list[Path]:
    """The files that paths name, in order: a file as is, a folder's .txt, .jsonl and .parquet
    files (searched recursively) sorted by name, a glob pattern's matches sorted by name."""
    files = []
    for arg in map(str, paths):
        matches = sorted(glob.glob(arg, recursive=True)) if any(c in arg for c in "*?[") \
            else [arg]
        if not matches:
            raise DataError(f"no files match {arg}")
        for path in map(Path, matches):
            if path.is_dir():
                found = sorted(f for f in path.rglob("*")
                               if f.suffix in CORPUS_SUFFIXES and f.is_file())
                if not found:
                    raise DataError(f"{path} holds no .txt, .jsonl or .parquet files")
                files += found
            elif not path.is_file():
                raise DataError(f"{path} not found")
            elif path.suffix not in CORPUS_SUFFIXES:
                raise DataError(f"{path}: unknown format; expected .txt (one document per "
                                "file), .jsonl (a \"text\" field per line) or .parquet")
            else:
                files.append(path)
    return files


def _read_parquet(path: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq  # optional: only .parquet input needs it
    except ImportError as e:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from e
    table = pq.ParquetFile(path)
    if "text" not in table.schema_arrow.names:
        raise DataError(f"{path} has no \"text\" column (it has {table.schema_arrow.names})")
    for batch in table.iter_batches(batch_size=1024, columns=["text"]):  # a batch at a time
        yield from batch.column(0).to_pylist()


def _read_file(path: Path) -> Iterator[str]:
    if path.suffix == ".txt":
        with open(path, encoding="utf-8", newline="") as f:  # newline="": keep "\r\n" as is
            yield f.read()
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    raise DataError(f"{path}:{n}: not a JSON object with a \"text\" field") \
                        from None
    else:
        yield from _read_parquet(path)


def iter_documents(paths) -> Iterator[str]:
    """The documents of local files, one at a time: a .txt file is one document, a .jsonl file
    one per line (its "text" field), a .parquet file one per row (its "text" column).

    paths are files, folders or glob patterns (see corpus_files); a missing one is a DataError
    at once, before any document is read."""
    files = corpus_files(paths)

    def documents():
        for path in files:
            try:
                for n, text in enumerate(_read_file(path)):
                    if not isinstance(text, str):
                        raise DataError(f"{path}: document {n} is {type(text).__name__}, "
                                        "not text")
                    yield text
            except (OSError, ValueError) as e:  # ValueError: bad UTF-8, a corrupt .parquet
                raise DataError(f"cannot read {path}: {e}") from e

    return documents()


def hub_documents(path: str, name: str | None = None) -> Iterator[str]:
    """The "text" of each row of a Hugging Face hub dataset's train split, downloaded (and
    cached) by the `datasets` package; the rows are memory-mapped, never all in RAM."""
    try:
        import datasets  # optional: only downloading needs it
    except ImportError as e:
        raise DataError("downloading needs the Hugging Face datasets package: "
                        "pip install datasets; or pass local files with --input") from e
    try:
        ds = datasets.load_dataset(path, name=name, split="train")
    except OSError as e:  # connection errors, missing files
        raise DataError(f"cannot download {path}: {e}") from e
    return (text for batch in ds.iter(batch_size=1024) for text in batch["text"])


def encode_document(text: str) -> np.ndarray:
    """<|endoftext|> followed by text's GPT-2 tokens, as uint16; runs in worker processes."""
    from tokenizer import GPT2Tokenizer
    tok = GPT2Tokenizer()  # the vocabulary is cached: it loads once per process
    # NOTE encode_ordinary: a page that quotes "<|endoftext|>" keeps it as plain text, rather
    # than gaining a document boundary that its author never wrote.
    return np.array([tok.eot_token] + tok.encoding.encode_ordinary(text), dtype=np.uint16)


class ShardWriter:
    """Turns a token stream into shards through one preallocated buffer of shard_size tokens.

    The first val_tokens tokens become val_000000.bin, the rest train_000000.bin,
    train_000001.bin, ... of shard_size tokens each, each written the moment it fills."""

    def __init__(self, out_dir: Path, shard_size: int, val_tokens: int):
        self.out_dir = out_dir
        self.buffer = np.empty(shard_size, dtype=np.uint16)
        self.fill = 0  # tokens now in the buffer
        self.split, self.limit = "val", val_tokens  # the split being filled, its shard length
        self.sizes = {"val": [], "train": []}  # tokens of each shard written

    def path(self, split: str, k: int) -> Path:
        return self.out_dir / f"{split}_{k:06d}.bin"

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            take = min(len(tokens), self.limit - self.fill)
            self.buffer[self.fill:self.fill + take] = tokens[:take]
            self.fill, tokens = self.fill + take, tokens[take:]
            if self.fill == self.limit:
                self._flush()
                self.split, self.limit = "train", len(self.buffer)

    def _flush(self) -> None:
        shard = self.buffer[:self.fill]
        _replace_atomically(self.path(self.split, len(self.sizes[self.split])), shard.tofile)
        self.sizes[self.split].append(self.fill)
        self.fill = 0

    def close(self) -> None:
        """Write the tokens left over. A last train shard under a tenth of shard_size would be
        a scrap that get_batch seldom draws from and that TokenData rejects if it is shorter
        than block_size + 1: it is appended to the shard before instead, which so holds up
        to 1.1 shard sizes."""
        train = self.sizes["train"]
        if self.split == "train" and train and 0 < self.fill < len(self.buffer) // 10:
            last, tail = self.path("train", len(train) - 1), self.buffer[:self.fill]

            def append(tmp: Path) -> None:
                shutil.copyfile(last, tmp)
                with open(tmp, "ab") as f:
                    f.write(tail.tobytes())

            _replace_atomically(last, append)
            train[-1] += self.fill
            self.fill = 0
        elif self.fill:
            self._flush()


def prepare_corpus(documents: Iterable[str], out_dir, shard_size: int = 100_000_000,
                   val_tokens: int = 10_000_000, num_proc: int = 1) -> dict:
    """Tokenize documents with GPT-2's BPE into uint16 shards in out_dir; return the meta.

    Each document is preceded by <|endoftext|> (50256), as in llm.c. The first val_tokens
    tokens of that stream are val_000000.bin (the document they cut through goes on into
    train), the rest train_000000.bin, ... of shard_size tokens (see ShardWriter.close for the
    last one). num_proc worker processes tokenize; the order does not depend on their number.
    Documents are streamed and shards written as they fill: memory is one shard however large
    the corpus. A dataset already in out_dir is replaced once the new one is complete.
    """
    from tokenizer import GPT2Tokenizer
    if shard_size < 1 or not 1 <= val_tokens <= shard_size or num_proc < 1:
        raise DataError(f"need shard_size >= val_tokens >= 1 and num_proc >= 1, got "
                        f"shard_size={shard_size}, val_tokens={val_tokens}, num_proc={num_proc}")
    try:
        tok = GPT2Tokenizer()  # fail here, not in a worker, if the vocabulary is unavailable
    except (OSError, RuntimeError, ValueError) as e:
        raise DataError(f"cannot build the gpt2 tokenizer: {e}") from e
    out_dir = Path(out_dir)
    with _replacing_dataset(out_dir):
        writer = ShardWriter(out_dir, shard_size, val_tokens)
        bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            bar = tqdm(unit="tok", unit_scale=True, desc=out_dir.name)
        n_docs = 0
        pool = multiprocessing.Pool(num_proc) if num_proc > 1 else contextlib.nullcontext()
        with pool:  # stops the workers however the loop ends
            # imap keeps the documents' order, and reads ahead only as far as its pipe to the
            # workers holds; chunks of 16 documents keep the traffic between processes low.
            encoded = pool.imap(encode_document, documents, chunksize=16) if num_proc > 1 \
                else map(encode_document, documents)
            for tokens in encoded:
                writer.write(tokens)
                n_docs += 1
                if bar is not None:
                    bar.update(len(tokens))
        if bar is not None:
            bar.close()
        writer.close()
        if not writer.sizes["train"]:
            raise DataError(f"the corpus has {sum(writer.sizes['val']):,} tokens, no more "
                            f"than val_tokens={val_tokens:,}: nothing is left to train on")
        meta = tok.meta()
        for split in ("train", "val"):
            meta[f"{split}_tokens"] = sum(writer.sizes[split])
        meta["shards"] = {split: len(writer.sizes[split]) for split in ("train", "val")}
        _replace_atomically(out_dir / "meta.json",
                            lambda tmp: tmp.write_text(json.dumps(meta, indent=1) + "\n"))
    print(f"gpt2: {n_docs:,} documents; train {meta['train_tokens']:,} tokens in "
          f"{meta['shards']['train']} shards, val {meta['val_tokens']:,} tokens -> {out_dir}")
    return meta


def corpus_main(argv, doc: str, script_dir, hub: tuple[str, str | None],
                val_tokens: int) -> dict:
    """The command line shared by data/openwebtext/prepare.py and data/fineweb/prepare.py;
    hub is the (path, name) of the Hugging Face dataset downloaded when no --input is given."""
    p = ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", nargs="+", default=None,
                   help="local .txt (one document each), .jsonl (\"text\" field) or .parquet "
                        "(\"text\" column) files,\nfolders or glob patterns (default: download "
                        f"{hub[0]} with `datasets`)")
    p.add_argument("--out_dir", type=Path, default=Path(script_dir),
                   help="where to write the shards and meta.json (default: %(default)s)")
    p.add_argument("--shard_size", type=int, default=100_000_000,
                   help="tokens per train shard (default: %(default)s)")
    p.add_argument("--val_tokens", type=int, default=val_tokens,
                   help="tokens of val_000000.bin, taken from the start (default: %(default)s)")
    p.add_argument("--num_proc", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="tokenizer processes (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        docs = iter_documents(args.input) if args.input else hub_documents(*hub)
        return prepare_corpus(docs, args.out_dir, args.shard_size, args.val_tokens,
                              args.num_proc)
    except DataError as e:
        raise SystemExit(f"error: {e}") from e


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
