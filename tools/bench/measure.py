"""How the benchmark reads the clock and the memory on a device (tools/bench/__main__.py)."""
import sys
import time

import torch


def sync(device):
    """Wait for queued GPU work, so that a clock reading covers it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(seconds fn took, including the GPU work it queued; its result)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def peak_memory(device):
    """(bytes, what they measure): the CUDA allocator's peak since its last reset, or on
    other devices the largest resident set of the whole process so far."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    import resource  # Unix only, so imported where it is needed
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "max RSS of the whole process"
