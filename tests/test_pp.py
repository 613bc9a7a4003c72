"""Pipeline parallelism (--pp), alone and with FSDP and TP in a 3-D mesh, on the CPU with gloo
ranks: the same run as one process, and checkpoints that move between one process and PP."""
import json
import subprocess
from dataclasses import replace

import pytest
import torch

from helpers import (ROOT, TORCHRUN, assert_same_run, assert_samples, quiet_env, run_train,
                     train_losses)
from model import GPTConfig
from parallel.mesh import check
from training.accounting import bubble, communication_per_step, memory_per_rank
from training.runtime import DeviceError
from training.safe_load import load_checkpoint
from training.settings import ConfigError, TrainConfig
from training.stopping import STOPPED

# Four layers (two a stage), four micro-steps (the pipeline's micro-batches), a clip that bites
# (norms here are about 1). Measured over 8 iterations at pp=2: without the tied gradient's sum
# the loss drifts by 0.009, without the norm over the stages (each stage clipping by its own)
# by 0.005, with the head's copy counted twice in the norm by 0.002: far above 1e-5.
ARGS = ["--n_layer=4", "--gradient_accumulation_steps=4", "--grad_clip=0.5",
        "--eval_interval=3"]
# The CPU recipe's later practice (rotary positions: no position table on the first stage).
MODERN = ARGS + ["--rope=true", "--qk_norm=true", "--relu2=true"]
PP = ["--pp=2"]
EIGHT = (*TORCHRUN[:-1], "--nproc_per_node=8")


@pytest.fixture(scope="module")
def straight(char_data, tmp_path_factory):
    """Eight iterations in one process: the run PP must reproduce."""
    out = tmp_path_factory.mktemp("straight")
    return train_losses(run_train(ARGS + ["--max_iters=8"], char_data, out))


@pytest.mark.slow
def test_pp_is_the_same_run_as_one_process_and_resumes_and_samples_there(
        straight, char_data, tmp_path):
    out = tmp_path / "out"
    piped = train_losses(run_train(ARGS + PP + ["--max_iters=6"], char_data, out,
                                   launcher=TORCHRUN))
    assert_same_run(straight, piped, range(1, 7))
    # One file of whole tensors, with every stage's keys: wte from the first, the head from
    # the last, tied again when loaded; the optimizer's state has no entry for the head copy.
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert {"transformer.h.0.attn.c_attn.weight", "transformer.h.3.mlp.c_fc.weight",
            "transformer.wte.weight", "lm_head.weight"} <= set(ckpt["model"])
    assert torch.equal(ckpt["model"]["transformer.wte.weight"], ckpt["model"]["lm_head.weight"])
    # 4 Blocks x 12 tensors (biases on) + wte, wpe, ln_f's two, one process's count
    assert len(ckpt["optimizer"]["state"]) == 4 * 12 + 4
    resumed = train_losses(run_train(ARGS + ["--max_iters=8", "--init_from=resume"],
                                     char_data, out))
    assert_same_run(straight, resumed, range(7, 9))
    assert_samples(out)


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_under_pp_with_gpipe(straight, char_data, tmp_path):
    out = tmp_path / "out"
    run_train(ARGS + ["--max_iters=4"], char_data, out)
    resumed = train_losses(run_train(ARGS + PP + ["--pp_schedule=gpipe", "--max_iters=8",
                                                  "--init_from=resume"],
                                     char_data, out, launcher=TORCHRUN))
    assert_same_run(straight, resumed, range(5, 9))


@pytest.mark.slow
def test_a_stop_signal_ends_a_pipelined_run_at_an_iteration_boundary(straight, char_data,
                                                                     tmp_path):
    # A SIGTERM to rank 1 (the last stage) as it draws iteration 4's batches: the ranks agree
    # on it a micro-step later, still drawing (the schedule runs only once all are drawn), so
    # iteration 4 never runs and the run saves at its head; resumed in one process, it goes on
    # as the uninterrupted run.
    out = tmp_path / "out"
    proc = run_train(ARGS + PP + ["--max_iters=8"], char_data, out, launcher=TORCHRUN,
                     script="tests/signal_once.py", expect_ok=False, SIGNAL_AT="4")
    assert f"(exitcode: {STOPPED})" in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "stopped by a signal at iteration 4" in proc.stdout
    resumed = train_losses(run_train(ARGS + ["--max_iters=8", "--init_from=resume"],
                                     char_data, out))
    assert_same_run(straight, resumed, range(5, 9))


@pytest.mark.slow
def test_pp_by_fsdp_by_tp_on_eight_ranks_is_the_same_run_as_one_process(char_data, tmp_path):
    # 2 stages x 2 FSDP rows x 2 TP ranks: each stage's Blocks split by TP, sharded by FSDP.
    straight = train_losses(run_train(MODERN + ["--max_iters=4"], char_data, tmp_path / "one"))
    three_d = train_losses(run_train(MODERN + PP + ["--tp=2", "--fsdp=true", "--max_iters=4"],
                                     char_data, tmp_path / "out", launcher=EIGHT))
    assert_same_run(straight, three_d, range(1, 5))


@pytest.mark.parametrize("changes, world_size, message", [
    (dict(n_layer=3), 2, r"pp=2 must divide n_layer \(3\)"),
    (dict(n_layer=6, pp=3), 4, "tp=1 x pp=3 does not divide the 4 processes"),
    (dict(gradient_accumulation_steps=1), 2, "1f1b needs at least pp=2 micro-batches per row, "
                                             "not 1"),
    (dict(gradient_accumulation_steps=4), 4, "pp=2 over 4 processes makes 2 data-parallel rows, "
                                             r"which need --fsdp=true \(DDP cannot follow"),
    (dict(dtype="float16"), 2, "pp=2 does not take float16"),
    (dict(compile=True), 2, "compile=true with pp>1 is not supported"),
])
def test_pipelines_that_cannot_run_are_refused(monkeypatch, changes, world_size, message):
    monkeypatch.setenv("RANK", "0")  # as under torchrun
    cfg = replace(TrainConfig(n_layer=4, n_head=2, n_embd=32, pp=2,
                              gradient_accumulation_steps=2), **changes)
    dtype = torch.float16 if cfg.dtype == "float16" else torch.float32
    with pytest.raises(DeviceError, match=message):
        check(cfg, world_size, dtype)


def test_gpipe_takes_fewer_micro_batches_than_stages(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    check(TrainConfig(n_layer=4, pp=2, pp_schedule="gpipe", gradient_accumulation_steps=1), 2,
          torch.float32)


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ConfigError, match="pp_schedule must be 1f1b or gpipe"):
        TrainConfig(pp_schedule="zbv").validate()


def test_pp_needs_torchrun(char_data, tmp_path):
    proc = run_train(PP + ["--max_iters=1"], char_data, tmp_path / "o", expect_ok=False)
    assert proc.returncode == 2 and "torchrun" in proc.stderr and "Traceback" not in proc.stderr


def test_the_bubble_and_the_memory_a_stage_holds():
    # GPT-2 small (vocabulary padded to 50304, biases on), 12 x 1024 tokens a micro-step,
    # 8 micro-steps, float32, on 4 stages (4 ranks: one data-parallel row, m = 8).
    m = GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024)
    cfg = TrainConfig(n_layer=12, pp=4, gradient_accumulation_steps=8, dtype="float32")
    # bubble: of the m + p - 1 = 11 slots from first forward to last backward, 3 are idle
    assert bubble(cfg, 4) == pytest.approx(3 / 11)
    assert bubble(replace(cfg, gradient_accumulation_steps=4), 4) == pytest.approx(3 / 7)
    # A stage's weights: 3 Blocks of 12 * 768^2 + 13 * 768 = 7,087,872, plus the whole model's
    # root (wte 50304 * 768 = 38,633,472, wpe 1024 * 768 = 786,432, ln_f 1,536) = 39,421,440,
    # an upper bound on the first stage's (wte, wpe) and the last's (ln_f, the head copy).
    piped = memory_per_rank(cfg, m, 4)
    assert piped["weights"] == 4 * (39_421_440 + 3 * 7_087_872)
    assert piped["optimizer state"] == 8 * (39_421_440 + 3 * 7_087_872)
    # 1F1B's first stage holds pp = 4 micro-batches of 3 layers each: 12 layers' worth, what one
    # process holds for its one micro-batch; GPipe holds all 8: twice that.
    whole = memory_per_rank(replace(cfg, pp=1), m, 1)
    assert piped["activations"] == whole["activations"] == 12 * 12288 * 34 * 768 * 4 // 2
    gpipe = memory_per_rank(replace(cfg, pp_schedule="gpipe"), m, 4)
    assert gpipe["activations"] == 2 * whole["activations"]
    assert gpipe["logits"] == 8 * piped["logits"]  # its last stage keeps every m's logits
    # Sent per step by the first stage: 8 micro-batches of 12 x 1024 x 768 fp32 activations
    # (37.7 MB each), then wte's fp32 gradient summed with the last stage's (a 2-rank
    # all-reduce sends 2 (2-1)/2 = 1 times its size); a middle stage sends each both ways.
    sent = 8 * 12288 * 768 * 4
    assert communication_per_step(cfg, m, 4)["PP"] == max(sent + 4 * 38_633_472, 2 * sent)


@pytest.mark.slow
def test_the_bench_runs_both_schedules_and_1f1b_holds_at_most_p_micro_batches(tmp_path):
    # Stages that sleep 1 ms forward and 2 ms backward (F = 2 ms over p = 2): the times are the
    # machine's, not asserted; what each stage holds at most is the schedule's shape: GPipe
    # runs all m = 4 forwards before a backward, 1F1B's first stage starts p = 2.
    out = tmp_path / "bench.json"
    proc = subprocess.run([*TORCHRUN, "-m", "tools.bench", "--pp=2", "--pp_sleep_ms=2",
                           "--pp_microbatches=1,4", "--device=cpu", f"--json_out={out}"],
                          capture_output=True, text=True, cwd=ROOT, env=quiet_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["schedule"], r["m"]): r for r in json.loads(out.read_text())["bubble"]}
    assert rows["gpipe", 4]["peak_held"] == 4 and rows["1f1b", 4]["peak_held"] == 2
    assert rows["gpipe", 1]["idle_formula"] == 1 / 2 and rows["1f1b", 4]["idle_formula"] == 1 / 5
    assert rows["1f1b", 1]["ms_per_step"] is None  # 1F1B needs m >= p
    assert "1F1B needs m >= p" in proc.stdout
