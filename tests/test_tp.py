"""Tensor parallelism (--tp) and its 2-D combination with FSDP, on the CPU with gloo ranks: the
same run as one process, and checkpoints that move between one process and TP either way."""
from dataclasses import replace

import pytest
import torch

from helpers import TORCHRUN, assert_same_run, assert_samples, run_train, train_losses
from parallel.mesh import check
from parallel.tensor_parallel import regroup_qkv
from training.runtime import DeviceError
from training.safe_load import load_checkpoint
from training.settings import TrainConfig
from training.step import clip_grad_norm_

# Four micro-steps and a clip that bites (norms here are about 1), as in test_fsdp.py; dropout 0.
ARGS = ["--gradient_accumulation_steps=4", "--grad_clip=0.5", "--eval_interval=3"]
# The CPU recipe's later practice: rotary positions, QK-norm, ReLU squared.
MODERN = ARGS + ["--rope=true", "--qk_norm=true", "--relu2=true"]
TP = ["--tp=2"]
FOUR = (*TORCHRUN[:-1], "--nproc_per_node=4")


@pytest.fixture(scope="module")
def straight(char_data, tmp_path_factory):
    """Ten iterations of GPT-2's architecture in one process: the run TP must reproduce."""
    out = tmp_path_factory.mktemp("straight")
    return train_losses(run_train(ARGS + ["--max_iters=10"], char_data, out))


@pytest.fixture(scope="module")
def straight_modern(char_data, tmp_path_factory):
    """Eight iterations with RoPE, QK-norm and ReLU squared, in one process."""
    out = tmp_path_factory.mktemp("modern")
    return train_losses(run_train(MODERN + ["--max_iters=8"], char_data, out))


@pytest.mark.slow
def test_tp_is_the_same_run_as_one_process_and_resumes_and_samples_there(
        straight, char_data, tmp_path):
    out = tmp_path / "out"
    split = train_losses(run_train(ARGS + TP + ["--max_iters=8"], char_data, out,
                                   launcher=TORCHRUN))
    assert_same_run(straight, split, range(1, 9))
    # One file of whole tensors in GPT-2's names and shapes, c_attn's rows in GPT-2's order.
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["model"]["transformer.h.0.attn.c_attn.weight"].shape == (96, 32)
    # Resumed in one process without --tp: how a run is spread is the command's to say.
    resumed = train_losses(run_train(ARGS + ["--max_iters=10", "--init_from=resume"],
                                     char_data, out))
    assert_same_run(straight, resumed, range(9, 11))
    assert_samples(out)


@pytest.mark.slow
def test_a_tp_checkpoint_from_before_the_first_step_resumes_in_one_process(
        straight, char_data, tmp_path):
    # Saved at iteration 0, with no optimizer state yet: still in one process's groups.
    out = tmp_path / "out"
    run_train(ARGS + TP + ["--max_iters=0"], char_data, out, launcher=TORCHRUN)
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 0
    resumed = train_losses(run_train(ARGS + ["--max_iters=2", "--init_from=resume"],
                                     char_data, out))
    assert_same_run(straight, resumed, range(1, 3))


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_under_tp(straight_modern, char_data, tmp_path):
    # With the modern options, and activation checkpointing, which must change no loss.
    out = tmp_path / "out"
    run_train(MODERN + ["--max_iters=4"], char_data, out)
    resumed = train_losses(run_train(
        MODERN + TP + ["--max_iters=8", "--init_from=resume", "--activation_checkpointing"],
        char_data, out, launcher=TORCHRUN))
    assert_same_run(straight_modern, resumed, range(5, 9))


@pytest.mark.slow
def test_fsdp_by_tp_on_four_ranks_is_the_same_run_as_one_process(straight_modern, char_data,
                                                                 tmp_path):
    # dp=2 rows of tp=2: each row trains on half of each batch, its two ranks split the Blocks.
    two_d = train_losses(run_train(MODERN + TP + ["--fsdp=true", "--max_iters=8"], char_data,
                                   tmp_path / "out", launcher=FOUR))
    assert_same_run(straight_modern, two_d, range(1, 9))


def test_regrouping_qkv_gives_each_rank_its_own_heads_and_undoes():
    # Rows of c_attn: q of heads 0, 1 (rows 0-3), k (4-7), v (8-11); two rows per head.
    rows = torch.arange(12)
    regrouped = regroup_qkv(rows, tp=2)
    assert regrouped.tolist() == [0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11]  # rank 0 | rank 1
    assert torch.equal(regroup_qkv(regrouped, tp=2, undo=True), rows)


def test_clipping_combines_the_norms_of_whole_and_split_gradients(tmp_path):
    # Under AdamW a clip changes these tiny runs' losses little (Adam divides out a steady
    # scale), so the norm is checked here: one gloo rank, a plain and a DTensor gradient.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        whole = torch.nn.Parameter(torch.zeros(4, 3))
        split = torch.nn.Parameter(distribute_tensor(torch.zeros(6), mesh, [Shard(0)]))
        whole.grad = torch.ones(4, 3)
        split.grad = distribute_tensor(torch.full((6,), 2.0), mesh, [Shard(0)])
        # sqrt(12 * 1^2 + 6 * 2^2) = 6; clipped to 3, every gradient is halved
        norm = clip_grad_norm_([whole, split], max_norm=3.0)
        assert norm.item() == pytest.approx(6.0)
        assert torch.allclose(whole.grad, torch.full((4, 3), 0.5), atol=1e-6)
        assert torch.allclose(split.grad.full_tensor(), torch.ones(6), atol=1e-6)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("changes, world_size, message", [
    (dict(n_head=3, n_embd=48), 2, r"tp=2 must divide n_head \(3\)"),
    (dict(tp=3, n_head=3, n_embd=48), 4, "tp=3 does not divide the 4 processes"),
    (dict(), 4, "tp=2 over 4 processes makes 2 data-parallel rows, which need --fsdp=true"),
    (dict(dtype="float16"), 2, "tp=2 does not take float16"),
    (dict(compile=True), 2, "compile=true with tp>1 is not supported"),
])
def test_layouts_that_cannot_run_are_refused(monkeypatch, changes, world_size, message):
    monkeypatch.setenv("RANK", "0")  # as under torchrun
    cfg = replace(TrainConfig(n_head=2, n_embd=32, tp=2), **changes)
    dtype = torch.float16 if cfg.dtype == "float16" else torch.float32
    with pytest.raises(DeviceError, match=message):
        check(cfg, world_size, dtype)


def test_tp_needs_torchrun(char_data, tmp_path):
    proc = run_train(TP + ["--max_iters=1"], char_data, tmp_path / "o", expect_ok=False)
    assert proc.returncode == 2 and "torchrun" in proc.stderr and "Traceback" not in proc.stderr
