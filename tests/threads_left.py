"""Run train.py, then print the process groups' threads still running in this process
(Linux). A run must leave none: one that wakes as Python exits can abort a finished run
(runtime.leave_process_group).

    torchrun --nproc_per_node=2 tests/threads_left.py ...
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402

code = train.main()
names = [Path(f"/proc/self/task/{t}/comm").read_text().strip()
         for t in os.listdir("/proc/self/task")]
left = sorted(name for name in names if "gloo" in name)
# one write of the whole line: the ranks share one pipe, unbuffered under torchrun
os.write(sys.stdout.fileno(), f"gloo threads left: {left}\n".encode())
sys.exit(code)
