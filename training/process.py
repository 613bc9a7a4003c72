"""What a script sets up before torch loads: OpenMP's idle spin, and the stop signals.

Both must come first. OpenMP reads its spin setting once, when torch loads it; and a stop
(Ctrl-C, a preempted machine) that lands while torch is still importing would otherwise kill the
process outright. So this page imports nothing heavy, and the entry points call it before
`import torch`: train.py, sample.py, and every tool (tools/__init__.py).
"""
import os
import signal
import sys


def limit_openmp_spin():
    """torch's OpenMP threads spin while they wait for work (GNU: 300,000 turns), on the cores
    other jobs need. On 2 cores (docs/benchmarks.md), quiet, a short spin is 2x faster than
    none; beside two busy jobs the default is ~30x slower than none, 10,000 turns ~3x. So
    10,000 turns, or none on a machine busy at start, unless the environment says."""
    if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
        busy = hasattr(os, "getloadavg") and os.getloadavg()[0] >= (os.cpu_count() or 1)
        os.environ["GOMP_SPINCOUNT"] = "0" if busy else "10000"


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP (Ctrl-C, a preempted machine, a closed terminal) ask to stop
    soon, with a checkpoint: the handler only raises a flag, which training/stopping.py's
    StopCheck acts on. A second Ctrl-C exits at once, with no new checkpoint. Rank 0 says so
    once, however many signals come (torchrun and the terminal may both send one)."""

    def __init__(self):
        self.received = False
        self.previous = {s: signal.signal(s, self._handle)
                         for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            # Not KeyboardInterrupt, a screen of traceback through collectives and a save:
            # checkpoints are written atomically, so leaving at once keeps the last one whole.
            print("second Ctrl-C: exiting now; the last checkpoint saved is kept",
                  file=sys.stderr, flush=True)
            os._exit(130)
        if not self.received and os.environ.get("RANK", "0") == "0":
            print(f"{signal.Signals(signum).name} received: stopping with a checkpoint",
                  file=sys.stderr, flush=True)
        self.received = True

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
