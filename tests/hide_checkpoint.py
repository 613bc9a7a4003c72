"""Run train.py as if rank HIDE_RANK's machine had no checkpoint in out_dir: a node of a
multi-machine run whose disk is not the one rank 0 resumes from.

    HIDE_RANK=1 torchrun --nproc_per_node=2 tests/hide_checkpoint.py --init_from=auto ...
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402

if os.environ.get("RANK") == os.environ["HIDE_RANK"]:
    isfile, exists = os.path.isfile, os.path.exists
    os.path.isfile = lambda p: False if str(p).endswith("ckpt.pt") else isfile(p)
    os.path.exists = lambda p: False if str(p).endswith("ckpt.pt") else exists(p)
sys.exit(train.main())
