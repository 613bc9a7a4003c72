"""What only a GPU (or a Mac) runs, proven on the CPU where the CPU can imitate it: the
precision and device choices against mocked torch.cuda functions, the backend and process
group set-up, the peak FLOP/s table, resuming across precisions, the multi-machine resume
rule, and the training loop's freedom from a host-device wait per step."""
import os
import signal
import time

import pytest
import torch

from helpers import ROOT, TORCHRUN, run_train, train_cmd
from model import GPT, GPTConfig, KVCache
from training import accounting, runtime, step
from training.settings import ConfigError, TrainConfig, parse_config
from training.stopping import STOPPED


def fake_gpu(monkeypatch, capability=(8, 0), count=2, name="NVIDIA H100 80GB HBM3"):
    """torch.cuda as a machine with `count` GPUs would answer; records set_device calls."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # as on a V100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(torch.distributed, "is_backend_available",  # a CUDA build has NCCL
                        lambda backend: backend in ("gloo", "nccl"))
    return calls


@pytest.mark.parametrize("capability, auto", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                              ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_bfloat16_only_where_the_gpu_has_it_natively(monkeypatch, capability, auto):
    # A V100 (7.0) or T4 (7.5) answers is_bf16_supported() with True, by emulation.
    fake_gpu(monkeypatch, capability)
    assert runtime.pick_dtype("auto", "cuda") == auto
    if auto == torch.float16:
        with pytest.raises(runtime.DeviceError, match="use --dtype=float16"):
            runtime.pick_dtype("bfloat16", "cuda:0")
    else:
        assert runtime.pick_dtype("bfloat16", "cuda:0") == torch.bfloat16


@pytest.fixture
def torchrun_env(monkeypatch):
    """The environment torchrun gives local rank 1 of 2, and a recorder for the group."""
    for key, value in dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29999").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    groups = []
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kw: groups.append(backend))
    return groups


def test_the_backend_follows_the_device_used_not_the_machine(monkeypatch, torchrun_env):
    set_device = fake_gpu(monkeypatch)
    assert runtime.setup_distributed("cpu") == (1, 1, 2, "cpu")  # a CPU run on a GPU host
    assert torchrun_env == ["gloo"] and set_device == []
    assert runtime.setup_distributed("auto") == (1, 1, 2, "cuda:1")
    assert torchrun_env[-1] == "nccl" and set_device == ["cuda:1"]


def test_an_explicit_gpu_index_is_refused_under_torchrun_and_set_in_one_process(monkeypatch,
                                                                                torchrun_env):
    set_device = fake_gpu(monkeypatch)
    with pytest.raises(runtime.DeviceError, match="CUDA_VISIBLE_DEVICES"):
        runtime.setup_distributed("cuda:1")
    assert torchrun_env == []
    monkeypatch.delenv("RANK")
    assert runtime.setup_distributed("cuda:1") == (0, 0, 1, "cuda:1")
    assert set_device == ["cuda:1"]  # pinned copies then go to GPU 1, not a context on GPU 0


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA L4", 121e12),
    ("NVIDIA L40", 181e12), ("NVIDIA L40S", 362e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100-PCIE-40GB", 312e12), ("NVIDIA GeForce RTX 4090", 165e12),
    ("NVIDIA GeForce RTX 3090", None), ("Tesla T4", None)])  # a T4 has no bfloat16
def test_peak_flops_match_whole_board_names(monkeypatch, name, peak):
    fake_gpu(monkeypatch, name=name)
    assert accounting.peak_flops("cuda", torch.bfloat16) == peak
    assert accounting.peak_flops("cpu", torch.bfloat16) is None


def test_one_process_averages_without_touching_the_device():
    # MPS has no float64 and a CPU machine has no MPS at all: with one process, nothing is
    # sent to the device, so this runs here as it does on a Mac.
    assert runtime.all_reduce_mean([1.5, torch.tensor(2.0)], "mps", 1) == [1.5, 2.0]


def test_the_kv_cache_holds_keys_and_values_in_the_compute_dtype(monkeypatch):
    # CUDA's autocast runs rms_norm in float32 (the CPU's does not): imitate it.
    rms_norm = torch.nn.functional.rms_norm
    monkeypatch.setattr(torch.nn.functional, "rms_norm", lambda x, *a, **k: rms_norm(
        x.float(), *a, **k))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32,
                          qk_norm=True, rope=True)).eval()
    cache = KVCache(2, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.hidden_states(torch.randint(50, (1, 5)), cache)
    assert {t.dtype for t in cache.k + cache.v} == {torch.bfloat16}


def test_gradient_accumulation_error_says_which_values_work():
    from training import startup
    with pytest.raises(ConfigError, match=r"\(16\): try 32 or 48"):
        startup.check_divisible(TrainConfig(gradient_accumulation_steps=40), 16)
    startup.check_divisible(TrainConfig(gradient_accumulation_steps=32), 16)


def test_the_readme_multi_node_example_divides_evenly():
    readme = (ROOT / "README.md").read_text()
    commands = [line.split() for line in readme.splitlines()
                if line.strip().startswith("torchrun --nnodes=")]
    assert len(commands) == 2
    for words in commands:
        opts = dict(w[2:].split("=", 1) for w in words if w.startswith("--") and "=" in w)
        processes = int(opts["nnodes"]) * int(opts["nproc_per_node"])
        args = words[words.index("train.py") + 1:]
        cfg = parse_config(TrainConfig, [str(ROOT / a) if a.startswith("config/") else a
                                         for a in args]).validate()
        assert cfg.gradient_accumulation_steps % processes == 0
        # the same 491,520 tokens per iteration as config/train_gpt2.toml on one node
        assert cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps == 491_520


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [("float32", "float16"), ("float16", "bfloat16")])
def test_resuming_with_another_precision_works(char_data, tmp_path, first, then):
    out = tmp_path / "out"
    run_train(["--max_iters=2", "--eval_interval=2", f"--dtype={first}"], char_data, out)
    rows = run_train(["--max_iters=4", "--eval_interval=2", f"--dtype={then}",
                      "--init_from=resume"], char_data, out)
    assert max(r["iter"] for r in rows) == 4


def test_deterministic_turns_on_deterministic_kernels(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        runtime.training_precision("float32", "cpu", deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.slow
def test_rank_0_decides_to_resume_and_a_rank_without_the_checkpoint_fails_at_once(char_data,
                                                                                   tmp_path):
    out = tmp_path / "out"
    run_train(["--max_iters=2", "--eval_interval=2"], char_data, out)
    start = time.time()
    proc = run_train(["--max_iters=4", "--eval_interval=2", "--init_from=auto",
                      "--ddp_timeout=1200"], char_data, out, launcher=TORCHRUN, expect_ok=False,
                     script="tests/hide_checkpoint.py", HIDE_RANK="1")
    assert proc.returncode != 0
    assert f"rank 0 resumes from {out / 'ckpt.pt'}, which rank(s) 1 cannot read" in proc.stderr
    assert time.time() - start < 600  # at once, not after ddp_timeout


def test_a_stop_does_not_start_an_evaluation(char_data, tmp_path, monkeypatch):
    # torchrun kills its workers 30 s after passing on a SIGTERM: a due evaluation must not
    # eat that time. Here an evaluation is due at every iteration, and the signal comes
    # during the third iteration's forward and backward.
    import train
    events, forward_backward, estimate_loss = [], step.forward_backward, train.estimate_loss

    def stepping(*args):
        events.append("step")
        if events.count("step") == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward_backward(*args)
    monkeypatch.setattr(step, "forward_backward", stepping)
    monkeypatch.setattr(train, "estimate_loss", lambda *a, **k: events.append("eval") or
                        estimate_loss(*a, **k))
    args = train_cmd(["--max_iters=400", "--eval_interval=1", "--eval_iters=2"], char_data,
                     tmp_path / "out")[2:]
    assert train.main(args) == STOPPED
    third = [i for i, event in enumerate(events) if event == "step"][2]
    assert events[third:] == ["step"]  # stopped, without another evaluation


@pytest.mark.slow
def test_the_loop_never_waits_for_the_device_per_step_or_per_batch(char_data, tmp_path,
                                                                   monkeypatch):
    # On a GPU, Tensor.item() and bool(tensor) make the host wait for every queued kernel.
    # Count them in runs of different lengths: only a fixed number may happen (at start, at
    # log lines and at the end), none per step or per evaluation batch.
    import train
    counts = {"n": 0}
    for method in ("item", "__bool__"):
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original):
            counts["n"] += 1
            return _original(self, *args)
        monkeypatch.setattr(torch.Tensor, method, counted)

    def waits(steps, eval_iters):
        counts["n"] = 0
        args = train_cmd([f"--max_iters={steps}", f"--eval_interval={steps}",
                          f"--eval_iters={eval_iters}", "--log_interval=1000"], char_data,
                         tmp_path / f"run{steps}-{eval_iters}")[2:]
        assert train.main(args) == 0
        return counts["n"]

    short = waits(3, 2)
    assert waits(9, 2) == short  # none per step
    # None per evaluation batch on a GPU. On the CPU alone each loss is read at once (see
    # train.estimate_loss), and costs no wait: 2 evaluations x 2 splits x 4 more batches.
    assert waits(3, 6) - short == 2 * 2 * 4


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_diverged_step_never_reaches_the_weights_although_it_is_read_a_step_late(
        char_data, tmp_path, monkeypatch, optimizer):
    import train
    good = tmp_path / "good"  # in this process too: the same threads, the same rounding
    flag = f"--optimizer={optimizer}"  # both honour the step's found_inf flag on the device
    assert train.main(train_cmd(["--max_iters=3", "--eval_interval=3", flag], char_data,
                                good)[2:]) == 0
    calls, forward_backward = [], step.forward_backward

    def poisoned(model, batches, *args):  # iteration 3's gradients are NaN
        loss = forward_backward(model, batches, *args)
        calls.append(model)
        if len(calls) == 4:
            for p in model.parameters():
                p.grad.fill_(float("nan"))
            return loss * float("nan")
        return loss
    monkeypatch.setattr(step, "forward_backward", poisoned)
    args = train_cmd(["--max_iters=6", "--eval_interval=100", flag], char_data,
                     tmp_path / "bad")[2:]
    assert train.main(args) == 2
    expected = torch.load(good / "ckpt.pt", weights_only=True)["model"]
    for name, tensor in calls[0].state_dict().items():
        assert torch.equal(tensor, expected[name]), name  # the weights after iteration 2
