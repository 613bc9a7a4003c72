"""Run train.py, but make rank FAIL_RANK die abruptly when it draws its first training batch
of iteration FAIL_AT, on the first attempt only: a stand-in for a crashed or lost machine.

    FAIL_AT=5 FAIL_RANK=1 torchrun --nproc_per_node=2 --max_restarts=1 tests/crash_once.py ...
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import dataset  # noqa: E402
import train  # noqa: E402

FAIL_AT, FAIL_RANK = int(os.environ["FAIL_AT"]), os.environ.get("FAIL_RANK", "1")
first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
get_batch = dataset.TokenData.get_batch


def failing_get_batch(self, key, *args, **kwargs):
    if (key[1] == train.TRAIN_BATCHES and key[2] == FAIL_AT and first_attempt
            and os.environ.get("RANK", "0") == FAIL_RANK):
        os._exit(13)  # no cleanup, no goodbye: like a machine that vanished
    return get_batch(self, key, *args, **kwargs)


dataset.TokenData.get_batch = failing_get_batch
sys.exit(train.main())
