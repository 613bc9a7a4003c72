"""The learning-rate schedules and the Muon optimizer."""
import pytest
import torch

from config import TrainConfig
from model import GPT, GPTConfig
from muon import Muon, orthogonalize
from train import get_lr, make_optimizer


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


def test_orthogonalize_flattens_the_singular_values():
    torch.manual_seed(0)
    for shape in [(64, 16), (16, 64), (128, 32)]:
        g = torch.randn(shape) * torch.logspace(-1, 1, shape[1])  # columns 100x apart in scale
        assert torch.linalg.cond(g) > 5  # far from orthogonal to begin with
        s = torch.linalg.svdvals(orthogonalize(g).float())
        assert s.min() > 0.5 and s.max() < 1.3, s  # Muon's quintic lands in about [0.7, 1.2]


def test_muon_covers_every_parameter_once_and_trains():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=2, n_head=2, n_embd=32))
    opt = make_optimizer(model, TrainConfig(optimizer="muon", learning_rate=3e-3), "cpu")
    assert isinstance(opt, Muon)
    seen = [p for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len({id(p) for p in seen}) == len(list(model.parameters()))
    muon_group = next(g for g in opt.param_groups if g["use_muon"])
    assert all(p.dim() == 2 for p in muon_group["params"])
    assert all(p is not model.transformer.wte.weight for p in muon_group["params"])
    x = torch.randint(0, 20, (8, 16))
    losses = []
    for _ in range(30):
        _, loss = model(x, x)  # learn to copy the input: easy, so the loss must fall fast
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
