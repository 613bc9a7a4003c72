"""Where and how the code runs: the device, the precision, the group of processes. The one
place that decides these, for train.py, sample.py and the tools (hellaswag, bench).
"""
import contextlib
import datetime
import gc
import os
import signal
import sys

import torch


class DeviceError(RuntimeError):
    """The requested device or precision is not available here."""


def device_type(device):
    """"cuda", "mps" or "cpu": the kind of device, without the index of "cuda:1"."""
    return device.split(":")[0]


def pick_device(requested="auto", local_rank=None):
    """'auto' is CUDA, then Apple's MPS, then the CPU; anything else is checked to exist. Under
    torchrun (local_rank given) each process on a machine takes a GPU of its own."""
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        else:
            return "mps" if torch.backends.mps.is_available() else "cpu"
    if requested == "cuda" and local_rank is not None:
        requested = f"cuda:{local_rank}"
    kind = device_type(requested)
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


def native_bfloat16(device):
    """Whether device computes in bfloat16 natively: CUDA GPUs since Ampere (capability 8.0);
    torch.cuda.is_bf16_supported() also says yes for a V100 or T4, which emulate it slowly."""
    return device.startswith("cuda") and torch.cuda.get_device_capability(device)[0] >= 8


def pick_dtype(requested, device):
    """The autocast precision: 'auto' is bfloat16 on GPUs that have it natively, float16 (with
    a gradient scaler) on older GPUs; float32 on other devices, where half precision is not
    reliably faster."""
    if requested == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if native_bfloat16(device) else torch.float16
        return torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[requested]
    if dtype == torch.bfloat16 and device.startswith("cuda") and not native_bfloat16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise DeviceError(f"this GPU (compute capability {major}.{minor}) has no native "
                          "bfloat16, only a slow emulation: use --dtype=float16")
    return dtype


def autocast(device, dtype):
    """Mixed-precision context for forward passes; a no-op in float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type(device), dtype=dtype)


def device_memory(device):
    """Bytes of memory the device has (the machine's RAM for the CPU), or None if unknown."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(device).total_memory
    if device == "mps":
        return torch.mps.recommended_max_memory()
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return None


def training_precision(requested, device, deterministic=False):
    """(dtype, autocast context, gradient scaler) for training on device. float16 has so few
    exponent bits that small gradients underflow to zero: the scaler multiplies the loss before
    backward and divides the gradients after, skipping steps that overflowed (a no-op in other
    dtypes). float32 matmuls may use TF32 tensor cores (since Ampere): nearly free speed.
    deterministic: bit-identical results on a GPU too, slower: flash attention's backward and
    some cuBLAS kernels add in a varying order; cuBLAS then needs a fixed workspace."""
    dtype = pick_dtype(requested, device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    scaler = torch.amp.GradScaler(device_type(device), enabled=dtype == torch.float16)
    return dtype, autocast(device, dtype), scaler


def setup_distributed(requested_device="auto", backend="auto", timeout_s=600):
    """(rank, local_rank, world_size, device): this process's device, in the process group
    that torchrun describes, joined ((0, 0, 1, device) without torchrun). The backend follows
    the device: NCCL for GPUs, gloo for CPUs. timeout_s bounds a wait on a dead peer."""
    if "RANK" not in os.environ:
        device = pick_device(requested_device)
        if device.startswith("cuda:"):  # else pinned copies would open a context on GPU 0
            torch.cuda.set_device(device)
        return 0, 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if sys.platform == "linux" and "TORCHELASTIC_RUN_ID" in os.environ:
        # If torchrun itself is killed (even by SIGKILL), Linux sends this worker SIGTERM:
        # it stops with a checkpoint rather than running on, orphaned (prctl PR_SET_PDEATHSIG).
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    if requested_device.startswith("cuda:"):
        raise DeviceError(f"--device={requested_device} under torchrun would put every "
                          "process on one GPU: each takes the GPU of its local rank with "
                          "--device=cuda; choose the GPUs with CUDA_VISIBLE_DEVICES")
    device = pick_device(requested_device, local_rank)
    if device_type(device) == "cuda":
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device_type(device) == "cuda" else "gloo"
    if not torch.distributed.is_backend_available(backend):
        raise DeviceError(f"backend {backend!r} is not available in this PyTorch build: use "
                          "auto, gloo (CPUs) or nccl (CUDA GPUs)")
    if backend == "nccl" and device_type(device) != "cuda":
        raise DeviceError(f"backend nccl connects CUDA GPUs, and this run is on {device}: "
                          "use --backend=gloo, or auto")
    # Imported now, before the group exists: this module, which FSDP and DCP import, keeps
    # the default group as a default argument, which would outlive leave_process_group.
    from torch.distributed.nn import functional  # noqa: F401
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
    return rank, local_rank, world_size, device


def leave_process_group():
    """Destroy the process groups, and with them their threads, once nothing holds the model
    or its optimizer (which hold the groups). A gloo thread still running as Python exits may
    let go of a finished collective's tensor after the interpreter is gone, and the process
    aborts (SIGABRT, "terminate called without an active exception") after a run that did
    its work: rarely, and more often on a busy machine."""
    if torch.distributed.is_initialized():
        gc.collect()  # a sharded model's hooks and states refer to each other, and to the group
        torch.distributed.destroy_process_group()


def all_reduce_mean(values, device, world_size):
    """Average a list of numbers (floats, or 1-element tensors) over all ranks, which must all
    call this. One process needs no tensor (no device round trip; MPS has no float64)."""
    if world_size == 1:
        return [float(v) for v in values]
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    torch.distributed.all_reduce(t)
    return (t / world_size).tolist()


def busy_note(device):
    """A line for a CPU run on a machine that other jobs keep busy, or None: torch's threads
    wait for each other at every operation, so a core taken by another job stalls them all."""
    threads, cores = torch.get_num_threads(), os.cpu_count() or 1
    if device != "cpu" or threads == 1 or not hasattr(os, "getloadavg"):
        return None
    load = os.getloadavg()[0]
    if load < cores:  # this process has not started its threads yet: the load is others'
        return None
    return (f"note: this machine looks busy (load average {load:.1f} on {cores} cores): "
            "training is slower than on a quiet one, and OMP_NUM_THREADS=1 may help")
