"""The pieces of a training step: the optimizer's groups (AdamW, Muon), the learning-rate
schedules, gradient accumulation and clipping."""
import pytest
import torch

from model import GPT, GPTConfig
from training.muon import MuonAdamW, orthogonalise
from training.runtime import training_precision
from training.settings import TrainConfig
from training.step import clip_gradients, forward_backward, get_lr, make_optimizer

TINY = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def tiny_model():
    torch.manual_seed(0)
    return GPT(TINY)


def test_optimizer_decays_only_2d_weights():
    m = tiny_model()
    opt = make_optimizer(m, TrainConfig(weight_decay=0.1, learning_rate=1e-3))
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    m = tiny_model()
    opt = make_optimizer(m, TrainConfig(optimizer="muon", learning_rate=1e-3, muon_lr=0.02))
    assert isinstance(opt, MuonAdamW)
    muon, decay, rest = opt.param_groups
    names = {p: n for n, p in m.named_parameters()}
    assert sorted(names[p].split(".", 3)[3] for p in muon["params"]) == sorted(
        ["attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"] * 2)
    assert muon["lr_scale"] == pytest.approx(20)  # the schedule's 1e-3 peak is 0.02 there
    # the embeddings (the head is tied to wte)
    assert [names[p] for p in decay["params"]] == ["transformer.wte.weight",
                                                   "transformer.wpe.weight"]
    assert all(p.dim() < 2 for p in rest["params"]) and rest["weight_decay"] == 0.0


@pytest.mark.parametrize("shape", [(64, 16), (16, 48)])
def test_orthogonalise_sets_every_singular_value_near_one(shape):
    torch.manual_seed(0)
    # Singular values spread over a factor of 100 (5 steps lift up to ~3.4^5 = 480x).
    u, _, v = torch.linalg.svd(torch.randn(shape), full_matrices=False)
    m = u @ torch.diag(torch.logspace(-2, 0, min(shape))) @ v * 37
    s = torch.linalg.svdvals(orthogonalise(m))
    assert 0.6 < s.min() and s.max() < 1.2  # Jordan's quintic: near 1, not exactly 1
    # The same directions: U V^T is the polar factor, and ours is close to it.
    assert torch.nn.functional.cosine_similarity((u @ v).flatten(), orthogonalise(m).flatten(),
                                                 dim=0) > 0.95


def test_a_step_flagged_found_inf_changes_neither_weights_nor_state():
    m = tiny_model()
    opt = make_optimizer(m, TrainConfig(optimizer="muon", learning_rate=1e-3))
    x = torch.randint(0, 50, (2, 16))
    for poisoned in (False, True):
        m(x, x)[1].backward()
        if poisoned:
            for p in m.parameters():
                p.grad.fill_(float("nan"))
            before = ({n: p.clone() for n, p in m.named_parameters()},
                      {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()})
        opt.found_inf = torch.tensor(float(poisoned))  # as StopCheck sets it
        opt.step()
        opt.zero_grad(set_to_none=True)
    weights, state = before
    assert all(torch.equal(p, weights[n]) for n, p in m.named_parameters())
    assert all(torch.equal(v, state[id(p)][k]) for p, s in opt.state.items() for k, v in s.items())
    assert any("momentum_buffer" in s for s in opt.state.values())


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


def gradients(batches):
    """The loss and every parameter's gradient after forward_backward over batches."""
    m = tiny_model()
    _, ctx, scaler = training_precision("float32", "cpu")
    loss = forward_backward(m, batches, ctx, scaler, len(batches))
    return loss, {name: p.grad.clone() for name, p in m.named_parameters()}


def test_gradient_accumulation_equals_one_big_batch():
    # k micro-steps of b rows each must give the gradient of one batch of the k * b rows:
    # each micro-step's loss is divided by k, and the gradients add up.
    k, b = 4, 3
    g = torch.Generator().manual_seed(1)
    x = torch.randint(50, (k * b, 16), generator=g)
    y = torch.randint(50, (k * b, 16), generator=g)
    loss_k, grads_k = gradients([(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]) for i in range(k)])
    loss_1, grads_1 = gradients([(x, y)])
    assert loss_k.item() == pytest.approx(loss_1.item(), abs=1e-6)
    for name in grads_1:
        torch.testing.assert_close(grads_k[name], grads_1[name], atol=1e-6, rtol=0,
                                   msg=name)


def test_clipping_scales_the_gradient_down_to_the_limit():
    m = tiny_model()
    opt = make_optimizer(m, TrainConfig())
    _, ctx, scaler = training_precision("float32", "cpu")
    forward_backward(m, [(torch.randint(50, (2, 16)), torch.randint(50, (2, 16)))], ctx,
                     scaler, 1)
    before = torch.cat([p.grad.flatten() for p in m.parameters()])
    norm = clip_gradients(m, opt, scaler, grad_clip=0.01)
    after = torch.cat([p.grad.flatten() for p in m.parameters()])
    assert norm.item() == pytest.approx(before.norm().item(), rel=1e-5) and norm > 0.01
    assert after.norm().item() == pytest.approx(0.01, rel=1e-4)
    torch.testing.assert_close(after, before * (0.01 / norm), atol=1e-9, rtol=1e-5)
