"""Activation checkpointing (GPT.activation_checkpointing): the same training, bit for bit,
and on the CPU a measure of what it saves: only each Block's input is kept for backward."""
import pytest
import torch

from model import GPT, GPTConfig

B, T, C = 4, 32, 64  # batch, sequence, width of the tiny model


def tiny(n_layer=2, dropout=0.0, rope=False):
    torch.manual_seed(0)
    config = GPTConfig(block_size=T, vocab_size=64, n_layer=n_layer, n_head=2, n_embd=C,
                       dropout=dropout, rope=rope)
    return GPT(config).train()


def two_steps(checkpointing, rope):
    """Losses and gradients of two AdamW steps of a model with dropout 0.1."""
    model = tiny(dropout=0.1, rope=rope)
    model.activation_checkpointing = checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = torch.Generator().manual_seed(1)
    torch.manual_seed(2)  # the dropout masks
    losses, grads = [], []
    for _ in range(2):
        x, y = torch.randint(0, 64, (2, B, T), generator=batches)
        _, loss = model(x, y)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, grads


@pytest.mark.parametrize("rope", [False, True])  # rope: the blocks also take the angles
def test_checkpointing_gives_the_same_losses_and_gradients(rope):
    plain, checkpointed = two_steps(False, rope), two_steps(True, rope)
    # The rerun in backward draws dropout's masks from the RNG state saved at the forward
    # pass, so every number is the same: atol=0, rtol=0.
    for a, b in zip(plain[0], checkpointed[0]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for step_a, step_b in zip(plain[1], checkpointed[1]):
        for a, b in zip(step_a, step_b):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    # ...and dropout was on: the same batch twice gives two losses.
    model, x = tiny(dropout=0.1), torch.randint(0, 64, (B, T))
    assert model(x, x)[1] != model(x, x)[1]


def saved_bytes(n_layer, checkpointing):
    """Bytes of activations autograd keeps for backward after one training forward: every
    tensor saved for backward, each storage counted once, the weights left out."""
    model = tiny(n_layer)
    model.activation_checkpointing = checkpointing
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randint(0, 64, (B, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, x)
    return sum(saved.values())


def test_checkpointing_keeps_only_each_blocks_input():
    # Two more layers add two Blocks and nothing else: the difference is the Blocks' share.
    per_layer = {ckpt: (saved_bytes(4, ckpt) - saved_bytes(2, ckpt)) // 2
                 for ckpt in (False, True)}
    # In float32, per token, a Block saves (counting in units of C floats):
    #   ln_1's input 1, c_attn's input 1, q, k, v 3, attention's output (c_proj's input) 1,
    #   ln_2's input 1, c_fc's input 1, GELU's input 4 and output (c_proj's input) 4  = 16
    # which is Korthikanti's 34 bytes in 16 bits less the 2 bytes of dropout masks
    # (dropout is 0 here); plus, per token, the two LayerNorms' mean and 1/std (4 floats)
    # and the fused attention's log-sum-exp of each head (n_head = 2 floats).
    assert per_layer[False] == B * T * (16 * C + 4 + 2) * 4  # 132,096 bytes
    # Checkpointed, a Block keeps its input x alone, the float32 residual stream: C floats.
    assert per_layer[True] == B * T * C * 4  # 32,768 bytes: a 16th of the above
