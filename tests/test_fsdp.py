"""FSDP (fully_shard) and activation checkpointing, on the CPU with two gloo ranks: the same
run as one process, and checkpoints that move between one process, DDP and FSDP; Muon under
every layout."""

import pytest

from helpers import TORCHRUN, assert_same_run, assert_samples, run_train, train_losses
from training.safe_load import load_checkpoint

# Four micro-steps (two per rank) and a clip that bites: norms here are about 1. Three
# evaluation batches over two ranks: one rank runs a filler forward beside the other's second.
# Dropout on: its masks are seeded per global micro-step, the same in every layout.
ARGS = ["--gradient_accumulation_steps=4", "--grad_clip=0.5", "--eval_interval=3",
        "--eval_iters=3", "--dropout=0.1"]
FSDP = ["--fsdp=true"]


@pytest.fixture(scope="module")
def straight(char_data, tmp_path_factory):
    """Six iterations in one process: the run the others must reproduce."""
    out = tmp_path_factory.mktemp("straight")
    return train_losses(run_train(ARGS + ["--max_iters=6"], char_data, out))


@pytest.mark.slow
def test_fsdp_on_two_ranks_is_the_same_run_as_one_process(straight, char_data, tmp_path):
    sharded = train_losses(run_train(ARGS + FSDP + ["--max_iters=6"], char_data, tmp_path / "f",
                                     launcher=TORCHRUN))
    assert_same_run(straight, sharded, range(1, 7))


@pytest.mark.slow
def test_an_fsdp_checkpoint_resumes_in_one_process_and_samples(straight, char_data, tmp_path):
    out = tmp_path / "out"
    run_train(ARGS + FSDP + ["--max_iters=3"], char_data, out, launcher=TORCHRUN)
    ckpt = load_checkpoint(out / "ckpt.pt")  # one file, whole tensors, our usual keys
    assert ckpt["iter_num"] == 3 and not any("_fsdp" in k for k in ckpt["model"])
    resumed = train_losses(run_train(ARGS + ["--max_iters=6", "--init_from=resume",
                                             "--fsdp=false"], char_data, out))
    assert_same_run(straight, resumed, range(4, 7))
    assert_samples(out)


@pytest.mark.slow
def test_a_ddp_checkpoint_resumes_under_fsdp(straight, char_data, tmp_path):
    out = tmp_path / "out"
    run_train(ARGS + ["--max_iters=3"], char_data, out, launcher=TORCHRUN)
    resumed = train_losses(run_train(ARGS + FSDP + ["--max_iters=6", "--init_from=resume"],
                                     char_data, out, launcher=TORCHRUN))
    assert_same_run(straight, resumed, range(4, 7))


@pytest.mark.slow
def test_muon_trains_alike_in_one_process_and_under_ddp_fsdp_and_tp(char_data, tmp_path):
    # Under FSDP and TP each rank orthogonalises the whole update, gathered from the shards
    # (muon.orthogonalise); the FSDP run's checkpoint, momentum included, resumes in one
    # process.
    args = ARGS + ["--optimizer=muon", "--dropout=0"]  # TP draws other masks (parallelism.md)
    one = train_losses(run_train(args + ["--max_iters=6"], char_data, tmp_path / "one"))
    for name, layout in (("ddp", []), ("fsdp", FSDP), ("tp", ["--tp=2"])):
        spread = train_losses(run_train(args + layout + ["--max_iters=3"], char_data,
                                        tmp_path / name, launcher=TORCHRUN))
        assert_same_run(one, spread, range(1, 4))
    resumed = train_losses(run_train(args + ["--max_iters=6", "--init_from=resume"], char_data,
                                     tmp_path / "fsdp"))
    assert_same_run(one, resumed, range(4, 7))


@pytest.mark.slow
def test_activation_checkpointing_changes_no_loss(straight, char_data, tmp_path):
    args = ARGS + ["--max_iters=6", "--activation_checkpointing=true"]
    assert train_losses(run_train(args, char_data, tmp_path / "one")) == straight  # exactly
    sharded = train_losses(run_train(args + FSDP, char_data, tmp_path / "f", launcher=TORCHRUN))
    assert_same_run(straight, sharded, range(1, 7))


def test_fsdp_needs_torchrun(char_data, tmp_path):
    proc = run_train(FSDP + ["--max_iters=1"], char_data, tmp_path / "o", expect_ok=False)
    assert proc.returncode == 2 and "torchrun" in proc.stderr and "Traceback" not in proc.stderr
