"""Writing datasets: a text file becomes the folder that dataset.py reads, and a new dataset
replaces an old one without ever leaving half of either.

prepare_text tokenizes text into train.bin, val.bin and meta.json; the data scripts
(data/prepare.py, data/shakespeare*/prepare.py) are command lines over it, and corpus.py writes
web-scale corpora through the same replacing_dataset. Every file is written under a temporary
name and renamed into place, so a crash or Ctrl-C loses nothing prepared before.
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

from data.dataset import DataError, load_meta
from data.tokenizer import get_tokenizer

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt")


class ArgumentParser(argparse.ArgumentParser):
    """The data scripts' parser: a mistake in the flags is one line, `error: ...` (exit 2),
    like every other error of this project, rather than argparse's usage text and error."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


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


def download(url: str, path, offline: str) -> None:
    """Fetch url into path (standard library only); a progress bar when stderr is a terminal.

    offline is the whole command that takes a copy the user fetched themselves, for the error:
    the script that failed may not be the one with an --input flag (train.py prepares data)."""
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
        raise DataError(f"download of {url} failed: {e}; download it yourself and run "
                        f"`{offline}`") from e


def _shown(path: Path) -> str:
    """path as a user would type it: relative to the working folder where it lies below it."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def prepare_shakespeare(out_dir, tokenizer_kind: str, input_path=None, script=None) -> dict:
    """Tiny Shakespeare into out_dir, downloading it to out_dir/input.txt unless given; script
    is the prepare.py to name if the download fails."""
    if input_path is None:
        input_path = Path(out_dir) / "input.txt"
        if not input_path.is_file():
            script = _shown(script or Path(out_dir) / "prepare.py")
            download(SHAKESPEARE_URL, input_path, f"python {script} --input PATH")
    return prepare_file(input_path, out_dir, tokenizer_kind)


def prepared_already(args):
    """The meta of a dataset prepared before in args.out_dir, when the command gives no --input
    and no --force: it is not downloaded and prepared again (offline, the download would fail).
    A damaged meta.json is a DataError (dataset.load_meta)."""
    if args.input is not None or args.force or not (Path(args.out_dir) / "meta.json").is_file():
        return None
    meta = load_meta(args.out_dir)
    print(f"{args.out_dir} is prepared already (meta.json is there): nothing to do. --force "
          "prepares it again; --input prepares it from local files")
    return meta


def shakespeare_main(argv, tokenizer_kind: str, script_dir) -> dict:
    """The command line shared by data/shakespeare*/prepare.py."""
    p = ArgumentParser(
        description=f"Prepare Tiny Shakespeare with the {tokenizer_kind} tokenizer.")
    p.add_argument("--input", type=Path, default=None,
                   help="a local copy of input.txt (default: download into OUT_DIR)")
    p.add_argument("--out_dir", type=Path, default=Path(script_dir),
                   help="where to write train.bin, val.bin and meta.json (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="prepare it again if it is prepared")
    args = p.parse_args(argv)
    try:
        return prepared_already(args) or prepare_shakespeare(
            args.out_dir, tokenizer_kind, args.input, Path(script_dir) / "prepare.py")
    except DataError as e:
        raise SystemExit(f"error: {e}") from e
