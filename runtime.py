"""Where the code runs: device and precision choice, distributed set-up, and peak FLOP/s.

The one place that decides these, shared by train.py, sample.py and bench.py."""
import contextlib
import datetime
import os

import torch


class DeviceError(RuntimeError):
    """The requested device or precision is not available here."""


def pick_device(requested="auto"):
    """'auto' is CUDA, then Apple's MPS, then the CPU; anything else is checked to exist."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    kind = requested.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {requested!r} requested, but CUDA is not available here "
                          "(use --device=cpu or --device=auto)")
    if kind == "cuda" and ":" in requested:
        index = int(requested.split(":")[1])
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {requested!r} requested, but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {requested!r} requested, but MPS is not available here")
    if kind not in ("cuda", "mps", "cpu"):
        raise DeviceError(f"unknown device {requested!r}: expected auto, cpu, cuda, cuda:N "
                          "or mps")
    return requested


def pick_dtype(requested, device):
    """The autocast precision: 'auto' is bfloat16 on CUDA where supported, else float16;
    float32 on other devices, where half precision is not reliably faster."""
    if requested == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[requested]
    if dtype == torch.bfloat16 and device.startswith("cuda") \
            and not torch.cuda.is_bf16_supported():
        raise DeviceError("this GPU does not support bfloat16; use --dtype=float16")
    return dtype


def autocast(device, dtype):
    """Mixed-precision context for forward passes; a no-op in float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def setup_distributed(backend="auto", timeout_s=600):
    """Join the process group that torchrun describes in the environment, if any.

    Returns (rank, local_rank, world_size); (0, 0, 1) when not launched by torchrun. The
    timeout bounds how long a rank waits on a collective whose peer has died."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent keeps one key-value store across elastic restarts, and (in torch
        # 2.13 at least) a restarted group reads its dead predecessors' addresses from it and
        # hangs. Each attempt gets keys of its own.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        agent_store = torch.distributed.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
            is_master=False, timeout=timeout)
        store = torch.distributed.PrefixStore(f"nanogpt/attempt_{attempt}", agent_store)
    torch.distributed.init_process_group(backend=backend, store=store, rank=rank,
                                         world_size=world_size, timeout=timeout)
    return rank, local_rank, world_size


# Dense (no sparsity) peak tensor throughput in FLOP/s, by device name and autocast dtype.
# Sources: NVIDIA's datasheets for each board (A100: "NVIDIA A100 Tensor Core GPU" datasheet;
# H100/H200 SXM: "H100 Tensor Core GPU" and "H200" datasheets; L4: "NVIDIA L4" datasheet;
# RTX 4090: "Ada Lovelace architecture" whitepaper, appendix A, FP32 accumulate). The
# datasheets quote sparse figures for Hopper and Ada; those are halved here.
PEAK_FLOPS = {
    "A100": {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 156e12},  # TF32
    "H100": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 494e12},
    "H200": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 494e12},
    "L4": {torch.bfloat16: 121e12, torch.float16: 121e12, torch.float32: 60e12},
    "RTX 4090": {torch.bfloat16: 165e12, torch.float16: 165e12, torch.float32: 83e12},
    "A10G": {torch.bfloat16: 70e12, torch.float16: 70e12, torch.float32: 35e12},
    "V100": {torch.float16: 125e12, torch.float32: 15.7e12},
    "T4": {torch.float16: 65e12, torch.float32: 8.1e12},
}

# Rated board power in watts (the maximum TDP of the form factor whose FLOP/s are quoted
# above), for energy estimates. Sources: the same datasheets. A100 and H100/H200 are the SXM
# boards (A100 PCIe: 250-300 W; H100 PCIe: 350 W; H200 NVL: 600 W); V100 is SXM2 (PCIe:
# 250 W); RTX 4090 is its total graphics power. A10G, an AWS-only part with no public
# datasheet: the 300 W power limit nvidia-smi shows on EC2 G5 instances.
BOARD_WATTS = {"A100": 400, "H100": 700, "H200": 700, "L4": 72, "RTX 4090": 450,
               "A10G": 300, "V100": 300, "T4": 70}


def peak_flops(device, dtype):
    """Peak FLOP/s of this device at dtype, or None when it is not in PEAK_FLOPS."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    # Longest key first, so that "RTX 4090" is not mistaken for another board's substring.
    for board in sorted(PEAK_FLOPS, key=len, reverse=True):
        if board in name:
            return PEAK_FLOPS[board].get(dtype)
    return None
