"""Preparing datasets: the real scripts, run as a user would, and the functions under them."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.dataset import DataError, TokenData, load_meta
from data.preparation import download, prepare_text
from data.tokenizer import get_tokenizer, tokenizer_from_meta

ROOT = Path(__file__).resolve().parent.parent
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 3


def run_script(script: str, *args, cwd) -> subprocess.CompletedProcess:
    """Run one of the data scripts in a fresh interpreter, from cwd, as a user would."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=1800)


def load_script(script: str):
    """Import a data script as a module; importing it must do nothing but define main."""
    spec = importlib.util.spec_from_file_location("prepare_script", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_bin(path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint16)


def test_prepare_text_char(tmp_path):
    meta = prepare_text(TEXT, tmp_path, "char")
    cut = int(len(TEXT) * 0.9)
    train, val = read_bin(tmp_path / "train.bin"), read_bin(tmp_path / "val.bin")
    assert (meta["train_tokens"], meta["val_tokens"]) == (cut, len(TEXT) - cut) == (len(train),
                                                                                      len(val))
    assert meta["chars"] == sorted(set(TEXT)) and meta["vocab_size"] == len(set(TEXT))
    assert json.loads((tmp_path / "meta.json").read_text()) == meta == load_meta(tmp_path)
    tok = tokenizer_from_meta(meta)
    assert tok.decode(train.tolist()) == TEXT[:cut]  # the first 90% trains, the rest validates
    assert tok.decode(train.tolist() + val.tolist()) == TEXT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_prepare_text_gpt2(tmp_path, gpt2_vocab_path):
    meta = prepare_text(TEXT, tmp_path, "gpt2")
    cut = int(len(TEXT) * 0.9)
    tok = get_tokenizer("gpt2")
    train, val = read_bin(tmp_path / "train.bin"), read_bin(tmp_path / "val.bin")
    assert train.tolist() == tok.encode(TEXT[:cut]) and val.tolist() == tok.encode(TEXT[cut:])
    assert meta == {"tokenizer": "gpt2", "vocab_size": 50257,
                    "train_tokens": len(train), "val_tokens": len(val)}
    assert len(train) < cut / 2  # BPE really merged: English runs about 4 characters a token
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == TEXT


def test_shakespeare_char_script(tmp_path, shakespeare_path):
    # Run from tmp_path, not the repo root: the script must find our modules by itself.
    out = tmp_path / "out"
    r = run_script("data/shakespeare_char/prepare.py", "--input", shakespeare_path,
                   "--out_dir", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "1,003,854" in r.stdout and "111,540" in r.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == "char" and meta["vocab_size"] == len(meta["chars"]) == 65
    assert (meta["train_tokens"], meta["val_tokens"]) == (1_003_854, 111_540)
    assert (out / "train.bin").stat().st_size == 2 * 1_003_854
    assert (out / "val.bin").stat().st_size == 2 * 111_540
    TokenData(out, "train").check_vocab(65)
    with pytest.raises(DataError, match="train.bin holds token id 64, outside the vocab of 64"):
        TokenData(out, "train").check_vocab(64)
    # Run again without --input: prepared already, so no download (which fails offline).
    before = (out / "train.bin").stat().st_mtime_ns
    r = run_script("data/shakespeare_char/prepare.py", "--out_dir", out, cwd=tmp_path)
    assert r.returncode == 0 and "is prepared already" in r.stdout, r.stderr
    assert (out / "train.bin").stat().st_mtime_ns == before


def test_shakespeare_gpt2_uses_input_already_there(tmp_path, shakespeare_path, gpt2_vocab_path):
    # input.txt already in the output folder is used as is: no download is attempted.
    (tmp_path / "input.txt").write_bytes(shakespeare_path.read_bytes())
    meta = load_script("data/shakespeare/prepare.py").main(["--out_dir", str(tmp_path)])
    assert meta == {"tokenizer": "gpt2", "vocab_size": 50257,
                    "train_tokens": 301_966, "val_tokens": 36_059}
    TokenData(tmp_path, "val").check_vocab(50257)


def test_prepare_script_on_a_user_file(tmp_path, gpt2_vocab_path):
    (tmp_path / "book.txt").write_text(TEXT, encoding="utf-8")
    r = run_script("data/prepare.py", "--input", "book.txt", "--tokenizer", "gpt2",
                   "--out_dir", "my_book", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    meta = load_meta(tmp_path / "my_book")
    tok = get_tokenizer("gpt2")
    assert meta["tokenizer"] == "gpt2"
    assert meta["train_tokens"] == len(tok.encode(TEXT[:int(len(TEXT) * 0.9)]))
    x, y = TokenData(tmp_path / "my_book", "train").get_batch((0,), 2, 8, "cpu")
    assert tok.decode(x[0].tolist()) in TEXT

    # A user mistake is a message and a non-zero exit (SystemExit with text), not a traceback.
    with pytest.raises(SystemExit, match=r"error: cannot read .*missing\.txt"):
        load_script("data/prepare.py").main(["--input", str(tmp_path / "missing.txt"),
                                             "--out_dir", str(tmp_path / "x")])


def test_download_writes_whole_file_or_nothing(tmp_path):
    src = tmp_path / "src.txt"
    src.write_text(TEXT)
    download(src.as_uri(), tmp_path / "got" / "input.txt", "python x.py --input PATH")
    assert (tmp_path / "got" / "input.txt").read_text() == TEXT
    with pytest.raises(DataError, match="nothing.txt"):
        download((tmp_path / "nothing.txt").as_uri(), tmp_path / "got" / "bad.txt",
                 "python x.py --input PATH")
    assert sorted(os.listdir(tmp_path / "got")) == ["input.txt"]  # no partial file, no .tmp


def test_a_failed_download_under_train_names_the_command_that_takes_input(tmp_path,
                                                                          monkeypatch):
    # A bare `python train.py` prepares Shakespeare itself, and train.py has no --input: the
    # error must name the prepare script that does.
    import data.preparation
    from training import startup
    script = tmp_path / "data" / "shakespeare_char" / "prepare.py"
    script.parent.mkdir(parents=True)
    script.write_bytes((ROOT / "data" / "shakespeare_char" / "prepare.py").read_bytes())
    monkeypatch.setattr(startup, "ROOT", tmp_path)
    monkeypatch.setattr(data.preparation, "SHAKESPEARE_URL", (tmp_path / "none.txt").as_uri())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        startup.prepare_default_data(rank=0, world_size=1)
    command = "`python data/shakespeare_char/prepare.py --input PATH`"
    assert f"download it yourself and run {command}" in str(stop.value), stop.value
