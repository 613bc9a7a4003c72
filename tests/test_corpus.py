"""Large corpora: the prepare scripts on .txt, .jsonl and .parquet input, run as a user would,
and the streaming writer's promise that memory stays one shard however large the corpus."""
import importlib.util
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from data.corpus import iter_documents, prepare_corpus
from data.dataset import DataError, TokenData
from data.tokenizer import EOT, GPT2Tokenizer

ROOT = Path(__file__).resolve().parent.parent
SHARD, VAL = 600, 250  # tokens per train shard and in val_000000.bin: the corpus makes ~8


@pytest.fixture(scope="module")
def docs(shakespeare_path) -> list[str]:
    """About 80 documents and 5,000 tokens: Shakespeare's speeches, with some odd ones in."""
    speeches = shakespeare_path.read_text(encoding="utf-8")[:20_000].split("\n\n")
    odd = ["", "A page quoting <|endoftext|> keeps it as text.", "naïve café, 東京 🎉\r\n"]
    return speeches[:10] + odd + speeches[10:]


def expected_tokens(docs) -> np.ndarray:
    """The stream the shards must hold, built here without corpus.py: <|endoftext|> + doc."""
    enc = GPT2Tokenizer().encoding
    return np.concatenate([[50256] + enc.encode_ordinary(d) for d in docs]).astype(np.uint16)


def run_script(script: str, *args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=1800)


def shards(out: Path, split: str) -> list[np.ndarray]:
    return [np.fromfile(p, dtype=np.uint16) for p in sorted(out.glob(f"{split}_*.bin"))]


def write_txt(docs, folder: Path) -> list[str]:
    (folder / "corpus").mkdir()
    for i, d in enumerate(docs):  # newline="" writes "\r\n" as is, and reading keeps it
        (folder / "corpus" / f"doc_{i:04d}.txt").write_text(d, encoding="utf-8", newline="")
    return ["corpus"]  # a folder


def write_jsonl(docs, folder: Path) -> list[str]:
    half = len(docs) // 2
    for k, part in enumerate([docs[:half], docs[half:]]):
        lines = [json.dumps({"id": i, "text": d}) for i, d in enumerate(part)]
        (folder / f"part-{k}.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    return ["part-*.jsonl"]  # a glob pattern, expanded by the script


def write_parquet(docs, folder: Path) -> list[str]:
    import pyarrow as pa  # test-only dependency: missing, this test fails rather than skips
    import pyarrow.parquet as pq
    half = len(docs) // 2
    for k, part in enumerate([docs[:half], docs[half:]]):
        table = pa.table({"url": [f"u{i}" for i in range(len(part))], "text": part})
        pq.write_table(table, folder / f"fw-{k}.parquet", row_group_size=7)
    return ["fw-0.parquet", "fw-1.parquet"]  # files


@pytest.mark.parametrize("script, write", [
    ("data/openwebtext/prepare.py", write_txt),
    ("data/fineweb/prepare.py", write_jsonl),
    ("data/fineweb/prepare.py", write_parquet)])
def test_prepare_script_shards_every_format(tmp_path, docs, script, write, gpt2_vocab_path):
    inputs = write(docs, tmp_path)
    r = run_script(script, "--input", *inputs, "--out_dir", "out", "--shard_size", SHARD,
                   "--val_tokens", VAL, "--num_proc", 2, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    train, val = shards(out, "train"), shards(out, "val")
    # Two workers tokenize, yet the shards hold the documents in order, joined as they must be.
    stream = np.concatenate(val + train)
    assert np.array_equal(stream, expected_tokens(docs))
    assert GPT2Tokenizer().decode(stream) == "".join(EOT + d for d in docs)
    assert (stream == 50256).sum() == len(docs)  # the quoted <|endoftext|> stayed text
    meta = json.loads((out / "meta.json").read_text())
    assert meta == {"tokenizer": "gpt2", "vocab_size": 50257, "train_tokens": len(stream) - VAL,
                    "val_tokens": VAL, "shards": {"train": len(train), "val": 1}}
    assert len(train) >= 5 and [len(s) for s in train[:-1]] == [SHARD] * (len(train) - 1)
    assert SHARD // 10 <= len(train[-1]) < SHARD * 1.1 and len(val[0]) == VAL
    assert f"{len(docs)} documents" in r.stdout
    # The sampler reads the shards: every row is a window of one of them.
    for split, parts in (("train", train), ("val", val)):
        x, y = TokenData(out, split).get_batch((0,), 8, 32, "cpu")
        windows = [np.lib.stride_tricks.sliding_window_view(s, 33) for s in parts]
        for row in np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1):
            assert any((w == row).all(axis=1).any() for w in windows)


def test_shards_are_written_the_moment_they_fill(tmp_path, gpt2_vocab_path):
    # " the" is one token, so document i holds exactly i % 7 + 2 tokens with its separator.
    docs = [" the" * (i % 7 + 1) for i in range(300)]
    shard, val = 50, 20
    on_disk = []  # train shards on disk as each document is drawn

    def stream():
        for d in docs:
            on_disk.append(len(list(tmp_path.glob("train_*.bin"))))
            yield d

    meta = prepare_corpus(stream(), tmp_path, shard_size=shard, val_tokens=val, num_proc=1)
    lengths = [i % 7 + 2 for i in range(300)]
    before = np.cumsum([0] + lengths[:-1])  # tokens ahead of document i
    assert on_disk == (np.maximum(before - val, 0) // shard).tolist()
    assert meta["train_tokens"] + meta["val_tokens"] == sum(lengths)


def test_memory_stays_one_shard_on_a_large_corpus(tmp_path, gpt2_vocab_path):
    # 2M tokens (4 MB as uint16) through 40 KB shards; holding the corpus would show in the peak.
    GPT2Tokenizer()  # load the vocabulary before measuring
    docs = (" the" * 4999 for _ in range(400))
    tracemalloc.start()
    try:
        meta = prepare_corpus(docs, tmp_path, shard_size=20_000, val_tokens=5_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert meta["train_tokens"] + meta["val_tokens"] == 2_000_000
    assert meta["shards"]["train"] == 100  # 1,995,000 tokens: the 15,000 left are a shard
    assert peak < 1_000_000, f"peak {peak:,} bytes"


def the_docs(lengths):
    """Documents of exactly the given token counts, separators included."""
    return [" the" * (n - 1) for n in lengths]


def test_a_scrap_at_the_end_joins_the_last_shard(tmp_path, gpt2_vocab_path):
    # 10 + 200 + 4 tokens: val 10, train 100, 100 and a scrap of 4 < 100 / 10.
    meta = prepare_corpus(the_docs([10] * 21 + [4]), tmp_path, shard_size=100, val_tokens=10)
    assert [len(s) for s in shards(tmp_path, "train")] == [100, 104]
    assert meta["shards"] == {"train": 2, "val": 1} and meta["train_tokens"] == 204
    # A remainder of a tenth of a shard or more is a shard of its own.
    meta = prepare_corpus(the_docs([10] * 22), tmp_path, shard_size=100, val_tokens=10)
    assert [len(s) for s in shards(tmp_path, "train")] == [100, 100, 10]
    # Only one train shard, however short, stays.
    prepare_corpus(the_docs([10, 5]), tmp_path, shard_size=100, val_tokens=10)
    assert [len(s) for s in shards(tmp_path, "train")] == [5]


def test_rerun_replaces_the_old_dataset(tmp_path, gpt2_vocab_path):
    for name in ["train_000009.bin", "train.bin", "val.bin", "notes.bin"]:
        (tmp_path / name).write_bytes(b"\0\0")
    prepare_corpus(the_docs([30, 30]), tmp_path, shard_size=20, val_tokens=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "meta.json", "notes.bin", "train_000000.bin", "train_000001.bin", "train_000002.bin",
        "val_000000.bin"]


def test_user_mistakes_are_data_errors(tmp_path, monkeypatch, gpt2_vocab_path):
    with pytest.raises(DataError, match="missing.jsonl not found"):
        iter_documents([tmp_path / "missing.jsonl"])
    with pytest.raises(DataError, match=r"no files match .*\*\.parquet"):
        iter_documents([str(tmp_path / "*.parquet")])
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"data\.csv: unknown format"):
        iter_documents([tmp_path / "data.csv"])
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not a JSON object with a \"text\""):
        list(iter_documents([tmp_path / "bad.jsonl"]))
    (tmp_path / "null.jsonl").write_text('{"text": null}\n')
    with pytest.raises(DataError, match="document 0 is NoneType, not text"):
        list(iter_documents([tmp_path / "null.jsonl"]))
    with pytest.raises(DataError, match="shard_size >= val_tokens"):
        prepare_corpus(["x"], tmp_path, shard_size=10, val_tokens=20)
    with pytest.raises(DataError, match="nothing is left to train on"):
        prepare_corpus(the_docs([5, 5]), tmp_path, shard_size=100, val_tokens=10)
    assert not (tmp_path / "meta.json").exists()

    # Optional packages missing: a message that says what to install, not a traceback.
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # None makes `import pyarrow` fail
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="pip install pyarrow"):
        list(iter_documents([tmp_path / "x.parquet"]))
    monkeypatch.setitem(sys.modules, "datasets", None)
    spec = importlib.util.spec_from_file_location(
        "owt_prepare", ROOT / "data" / "openwebtext" / "prepare.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit, match=r"pip install datasets; or pass local files"):
        script.main(["--out_dir", str(tmp_path / "owt")])
