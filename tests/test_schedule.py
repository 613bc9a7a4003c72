"""The learning-rate schedules."""
import pytest

from config import TrainConfig
from lr_schedule import get_lr


def test_cosine_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    lrs = [get_lr(it, cfg) for it in range(120)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == 1.0 and lrs[60] == pytest.approx(0.55)  # halfway down the cosine
    assert lrs[110:] == [0.1] * 10
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert get_lr(50, TrainConfig(learning_rate=0.3, decay_lr=False)) == 0.3


def test_wsd_schedule_holds_then_cools_down_linearly():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.0, warmup_iters=10, lr_decay_iters=100,
                      schedule="wsd", cooldown_frac=0.2)
    assert [get_lr(it, cfg) for it in (10, 50, 80)] == [1.0, 1.0, 1.0]
    assert get_lr(90, cfg) == pytest.approx(0.5) and get_lr(100, cfg) == 0.0
