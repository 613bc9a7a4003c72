"""Large corpora: documents streamed into fixed-size uint16 shards, tokenized with GPT-2's BPE
in parallel worker processes.

The documents come from local .txt, .jsonl or .parquet files or from a Hugging Face hub dataset;
the shards are the dataset format that dataset.py samples from, written through
preparation.py's replacing_dataset. Memory stays one shard however large the corpus.
"""
import argparse
import contextlib
import glob
import json
import multiprocessing
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from data.dataset import DataError
from data.preparation import (ArgumentParser, prepared_already, replace_atomically,
                              replacing_dataset)
from data.tokenizer import GPT2Tokenizer

CORPUS_SUFFIXES = (".txt", ".jsonl", ".parquet")


def corpus_files(paths) -> list[Path]:
    """The files that paths name, in order: a file as is, a folder's .txt, .jsonl and .parquet
    files (searched recursively) sorted by name, a glob pattern's matches sorted by name."""
    files = []
    for arg in map(str, paths):
        is_pattern = any(c in arg for c in "*?[")
        matches = sorted(glob.glob(arg, recursive=True)) if is_pattern else [arg]
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
                    raise DataError(
                        f"{path}:{n}: not a JSON object with a \"text\" field") from None
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
        replace_atomically(self.path(self.split, len(self.sizes[self.split])), shard.tofile)
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

            replace_atomically(last, append)
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
    if shard_size < 1 or not 1 <= val_tokens <= shard_size or num_proc < 1:
        raise DataError(f"need shard_size >= val_tokens >= 1 and num_proc >= 1, got "
                        f"shard_size={shard_size}, val_tokens={val_tokens}, num_proc={num_proc}")
    try:
        tok = GPT2Tokenizer()  # fail here, not in a worker, if the vocabulary is unavailable
    except (OSError, RuntimeError, ValueError) as e:
        raise DataError(f"cannot build the gpt2 tokenizer: {e}") from e
    out_dir = Path(out_dir)
    with replacing_dataset(out_dir):
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
            encoded = (pool.imap(encode_document, documents, chunksize=16) if num_proc > 1
                       else map(encode_document, documents))
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
        replace_atomically(out_dir / "meta.json",
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
    p.add_argument("--force", action="store_true", help="prepare it again if it is prepared")
    args = p.parse_args(argv)
    try:
        if meta := prepared_already(args):
            return meta
        docs = iter_documents(args.input) if args.input else hub_documents(*hub)
        return prepare_corpus(docs, args.out_dir, args.shard_size, args.val_tokens,
                              args.num_proc)
    except DataError as e:
        raise SystemExit(f"error: {e}") from e
