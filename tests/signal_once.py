"""Run train.py, but send rank SIGNAL_RANK a SIGTERM of its own as it draws a chosen batch:
the training batch of iteration SIGNAL_AT, or (SIGNAL_AT=eval) its first evaluation batch. A
stand-in for a preempted machine, at a moment chosen to the batch.

    SIGNAL_AT=5 SIGNAL_RANK=1 torchrun --nproc_per_node=2 tests/signal_once.py ...
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import dataset  # noqa: E402
import train  # noqa: E402

SIGNAL_AT, SIGNAL_RANK = os.environ["SIGNAL_AT"], os.environ.get("SIGNAL_RANK", "1")
get_batch = dataset.TokenData.get_batch
sent = []


def signalling_get_batch(self, key, *args, **kwargs):
    if SIGNAL_AT == "eval":
        chosen = key[1] in train.EVAL_BATCHES.values()
    else:
        chosen = key[1] == train.TRAIN_BATCHES and key[2] == int(SIGNAL_AT)
    if chosen and not sent and os.environ.get("RANK", "0") == SIGNAL_RANK:
        sent.append(key)
        os.kill(os.getpid(), signal.SIGTERM)
    return get_batch(self, key, *args, **kwargs)


dataset.TokenData.get_batch = signalling_get_batch
sys.exit(train.main())
