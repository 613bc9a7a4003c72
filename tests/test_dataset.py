"""The one batch sampler, and the errors of reading a dataset that is missing or damaged."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data.dataset import DataError, TokenData, load_meta


def read_bin(path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint16)


def write_bin(path, tokens) -> None:
    np.asarray(tokens, dtype=np.uint16).tofile(path)


# ----------------------------------------------------------------------------- sampling

@pytest.fixture
def counting_data(tmp_path) -> Path:
    """A train split whose token at position i is i: a row's first token says where it starts."""
    write_bin(tmp_path / "train.bin", np.arange(1000))
    return tmp_path


def test_batch_is_a_pure_function_of_the_key(counting_data):
    a, b = TokenData(counting_data, "train"), TokenData(counting_data, "train")
    x1, y1 = a.get_batch((1337, 0, 5, 0), 8, 16, "cpu")
    a.get_batch((1337, 0, 6, 0), 8, 16, "cpu")  # a draw in between changes nothing: no state
    x2, y2 = b.get_batch((1337, 0, 5, 0), 8, 16, "cpu")
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == y1.shape == (8, 16) and x1.dtype == y1.dtype == torch.int64
    # Keys differing in any one position give different batches.
    for key in [(1338, 0, 5, 0), (1337, 1, 5, 0), (1337, 0, 6, 0), (1337, 0, 5, 1)]:
        assert not torch.equal(a.get_batch(key, 8, 16, "cpu")[0], x1), key


def test_rows_are_real_windows_and_y_is_x_shifted(counting_data):
    data = read_bin(counting_data / "train.bin").astype(np.int64)
    x, y = TokenData(counting_data, "train").get_batch((0,), 64, 32, "cpu")
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        i = row_x[0]
        assert np.array_equal(row_x, data[i:i + 32]) and np.array_equal(row_y, data[i + 1:i + 33])


def test_every_valid_start_is_drawn_and_no_other(tmp_path):
    # Shards of block_size + 1 and block_size + 3 tokens: starts (0, 0), (1, 0), (1, 1), (1, 2).
    # Shard k holds 1000 * k + position, so a row's first token names its shard and start.
    T = 8
    write_bin(tmp_path / "train_000000.bin", np.arange(T + 1))
    write_bin(tmp_path / "train_000001.bin", 1000 + np.arange(T + 3))
    data = TokenData(tmp_path, "train")
    firsts = np.concatenate([data.get_batch((s,), 64, T, "cpu")[0][:, 0].numpy()
                             for s in range(4)])
    # 256 uniform draws over 4 windows miss one with probability < 4 * 0.75**256 ~ 1e-31.
    assert set(firsts.tolist()) == {0, 1000, 1001, 1002}

    # A split of exactly block_size + 1 tokens has one window, and every row is it.
    write_bin(tmp_path / "val.bin", np.arange(T + 1))
    x, y = TokenData(tmp_path, "val").get_batch((7,), 16, T, "cpu")
    assert (x == torch.arange(T)).all() and (y == torch.arange(1, T + 1)).all()


def test_windows_predict_every_token_once_in_order(tmp_path):
    # The whole-split evaluation: shards of 3 full blocks + 2 tokens and of 1 block + 1 token.
    T = 4
    write_bin(tmp_path / "val_000000.bin", np.arange(3 * T + 2))
    write_bin(tmp_path / "val_000001.bin", 1000 + np.arange(T + 1))
    batches = list(TokenData(tmp_path, "val").windows(T, 2, "cpu"))
    assert [x.shape[0] for x, _ in batches] == [2, 1, 1]  # batches never span two shards
    x = torch.cat([x for x, _ in batches]).flatten().tolist()
    y = torch.cat([y for _, y in batches]).flatten().tolist()
    assert x == list(range(3 * T)) + list(range(1000, 1000 + T))
    # Every token but a shard's first is a target once; the tail shorter than a block is not.
    assert y == list(range(1, 3 * T + 1)) + list(range(1001, 1001 + T))


def test_shards_are_drawn_in_proportion_to_their_windows(tmp_path):
    # With block_size 10, the shards have 10, 90 and 300 starts: shares 2.5%, 22.5% and 75%.
    for k, n in enumerate([20, 100, 310]):
        write_bin(tmp_path / f"train_{k:06d}.bin", 1000 * k + np.arange(n))
    x, y = TokenData(tmp_path, "train").get_batch((3,), 8000, 10, "cpu")
    assert torch.equal(y[:, :-1], x[:, 1:])
    shard = x[:, 0].numpy() // 1000
    share = np.bincount(shard, minlength=3) / len(shard)
    # One standard deviation of a share is at most sqrt(0.25 / 8000) = 0.0056; 0.03 is 5 sigma.
    assert np.allclose(share, [0.025, 0.225, 0.75], atol=0.03), share
    assert (x[:, 0] % 1000 + 10 < torch.tensor([20, 100, 310])[shard]).all()  # starts in range


# ----------------------------------------------------------------------------- errors

def test_odd_sized_file_is_rejected(tmp_path):
    (tmp_path / "train.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(DataError, match=r"train\.bin is 3 bytes, not a whole number"):
        TokenData(tmp_path, "train")


def test_missing_split_names_the_path_and_the_fix(counting_data):
    with pytest.raises(DataError, match=r"split 'val' not found: no .*val\.bin.*data/prepare"):
        TokenData(counting_data, "val")


def test_too_short_shard_names_the_file_and_sizes(tmp_path):
    write_bin(tmp_path / "train_000000.bin", np.arange(100))
    write_bin(tmp_path / "train_000001.bin", np.arange(16))
    data = TokenData(tmp_path, "train")
    data.get_batch((0,), 2, 15, "cpu")  # 16 tokens are exactly one window of 15
    with pytest.raises(DataError, match=r"train_000001\.bin holds 16 tokens, fewer than "
                                        r"block_size \+ 1 = 17"):
        data.get_batch((0,), 2, 16, "cpu")


def test_single_file_and_shards_together_are_ambiguous(counting_data):
    write_bin(counting_data / "train_000000.bin", np.arange(100))
    with pytest.raises(DataError, match=r"both train\.bin and shards train_000000\.bin"):
        TokenData(counting_data, "train")


def test_load_meta_missing_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"meta\.json not found.*data/prepare\.py"):
        load_meta(tmp_path)
    with pytest.raises(DataError, match=str(tmp_path / "meta.json")):
        load_meta(tmp_path)


def test_token_files_must_hold_the_counts_meta_json_records(tmp_path):
    meta = {"tokenizer": "char", "vocab_size": 2, "chars": ["a", "b"], "train_tokens": 300}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    write_bin(tmp_path / "train_000000.bin", np.zeros(200))
    write_bin(tmp_path / "train_000001.bin", np.zeros(100))
    assert TokenData(tmp_path, "train").lengths.sum() == 300
    write_bin(tmp_path / "train_000001.bin", np.zeros(99))  # a shard cut short
    with pytest.raises(DataError, match=r"train_\*\.bin \(2 shards\) holds 299 tokens but "
                                        r"meta\.json records 300.*to re-create it"):
        TokenData(tmp_path, "train")


def test_a_dataset_prepared_again_under_a_running_training_is_not_seen(tmp_path):
    from data.preparation import prepare_text
    prepare_text("abcdefgh" * 100, tmp_path, "char")
    data = TokenData(tmp_path, "train")
    before = data.get_batch((0,), 4, 8, "cpu")
    evaluation = list(data.windows(8, 4, "cpu"))
    prepare_text("zyxwvuts" * 200, tmp_path, "char")  # renamed over the files the run opened
    assert read_bin(tmp_path / "train.bin").size == 1440  # the folder holds the new dataset...
    after = data.get_batch((0,), 4, 8, "cpu")  # ...and the run still reads the old one
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    again = list(data.windows(8, 4, "cpu"))
    assert all(torch.equal(a, b) for old, new in zip(evaluation, again) for a, b in zip(old, new))
    data.check_vocab(8)
