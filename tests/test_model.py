"""Contract and equivalence tests for model.py: shapes, causality, attention, KV cache,
sampling filters, and the golden test against transformers' GPT-2 on the same weights."""
import math

import pytest
import torch
from torch.nn import functional as F

import model as model_module
from helpers import hub_state, write_gpt2_folder
from model import GPT, GPTConfig, sample_next
from training.safe_load import CheckpointError, load_gpt2

TINY = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY.__dict__, **overrides})).eval()


def test_shapes_and_loss_contract():
    m = tiny_model()
    idx = torch.randint(0, 50, (3, 10))
    logits, loss = m(idx)
    assert logits.shape == (3, 10, 50) and loss is None
    targets = idx.clone()
    targets[:, :5] = -1  # ignored positions must not count
    _, loss = m(idx, targets)
    manual = F.cross_entropy(logits[:, 5:].reshape(-1, 50), idx[:, 5:].reshape(-1))
    assert loss.shape == () and torch.allclose(loss, manual, atol=1e-6)


def test_initial_loss_is_near_uniform():
    m = tiny_model()
    idx = torch.randint(0, 50, (8, 16))
    _, loss = m(idx, torch.randint(0, 50, (8, 16)))
    assert abs(loss.item() - math.log(50)) < 0.15


def test_causality():
    m = tiny_model()
    idx = torch.randint(0, 50, (1, 16))
    changed = idx.clone()
    changed[0, 9] = (idx[0, 9] + 1) % 50
    a, _ = m(idx)
    b, _ = m(changed)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def explicit_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
    """softmax(q k^T / sqrt(hs) + causal mask) v, written out; attn_mask True where seen."""
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    if attn_mask is not None:
        att = att.masked_fill(~attn_mask, float("-inf"))
    if is_causal:
        T, S = q.size(-2), k.size(-2)
        mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
        att = att.masked_fill(~mask, float("-inf"))
    return F.softmax(att, dim=-1) @ v


def test_sdpa_equals_explicit_attention(monkeypatch):
    m = tiny_model()
    idx = torch.randint(0, 50, (2, 16))
    fast, _ = m(idx)
    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", explicit_attention)
    slow, _ = m(idx)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


@pytest.mark.parametrize("new_tokens", [5, 40])  # 40 runs well past block_size 16
def test_cached_greedy_equals_uncached(new_tokens):
    m = tiny_model()
    prompt = torch.randint(0, 50, (2, 6))
    cached = m.generate(prompt, new_tokens, temperature=0)
    uncached = m.generate_uncached(prompt, new_tokens, temperature=0)
    assert cached.shape == (2, 6 + new_tokens)
    assert torch.equal(cached[:, :6], prompt)
    assert torch.equal(cached, uncached)


def test_cached_logits_match_full_recompute():
    m = tiny_model()
    idx = torch.randint(0, 50, (1, 16))
    full, _ = m(idx)
    cache = model_module.KVCache(2, 16)
    steps = [m.lm_head(m.hidden_states(idx[:, :4], cache))]
    steps += [m.lm_head(m.hidden_states(idx[:, t:t + 1], cache)) for t in range(4, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_seeded_sampling_is_reproducible_and_cache_independent():
    m = tiny_model()
    prompt = torch.zeros((3, 1), dtype=torch.long)

    def draw(seed, cached=True):
        g = torch.Generator().manual_seed(seed)
        sampler = m.generate if cached else m.generate_uncached
        return sampler(prompt, 30, temperature=0.9, top_k=20, top_p=0.95, generator=g)

    assert torch.equal(draw(1), draw(1))
    assert torch.equal(draw(1), draw(1, cached=False))
    assert not torch.equal(draw(1), draw(2))


PROBS = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])


def kept_tokens(**filters):
    """Token ids drawn from 4,000 samples of PROBS under the given filters.

    A kept token of probability >= 0.04 is missed with odds below (1 - 0.04)^4000 ~ 1e-71."""
    logits = PROBS.log().expand(4000, -1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, generator=g, **filters).flatten()
    return set(draws.tolist()), draws


def test_top_k_keeps_exactly_the_k_most_likely():
    assert kept_tokens(top_k=3)[0] == {0, 1, 2}
    assert kept_tokens(top_k=1)[0] == {0}
    assert kept_tokens(top_k=5)[0] == {0, 1, 2, 3, 4}


def test_top_p_keeps_the_smallest_set_reaching_p():
    assert kept_tokens(top_p=0.65)[0] == {0, 1}  # 0.4 + 0.3 reaches 0.65
    assert kept_tokens(top_p=0.75)[0] == {0, 1, 2}
    assert kept_tokens(top_p=0.3)[0] == {0}
    assert kept_tokens(top_p=1.0)[0] == {0, 1, 2, 3, 4}
    # The survivors are renormalised: 0.4 / 0.7 of draws are token 0 (std ~0.008).
    _, draws = kept_tokens(top_p=0.65)
    assert abs((draws == 0).float().mean().item() - 0.4 / 0.7) < 0.04


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next(logits, temperature=0).flatten(), logits.argmax(-1))


def test_residual_projections_are_scaled():
    m = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, vocab_size=100, block_size=32))
    std = m.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(m.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001


# The golden test: our GPT-2 and transformers' GPT2LMHeadModel on the same weights.

def reference_gpt2():
    import transformers  # test-only dependency; missing, this test fails rather than skips
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32,
                                  vocab_size=100, bos_token_id=99, eos_token_id=99)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random biases and norms too, so every parameter is checked
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return ref


def write_hub_layout(ref, folder, fmt):
    """The files as OpenAI's GPT-2 lies on the hub: no "transformer." prefix, no lm_head."""
    cfg = ref.config
    state = {k.removeprefix("transformer."): v
             for k, v in ref.state_dict().items() if not k.startswith("lm_head")}
    for i in range(cfg.n_layer):  # the old files also carry the causal-mask buffer
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
    write_gpt2_folder(folder, state, dict(n_layer=cfg.n_layer, n_head=cfg.n_head,
                                          n_embd=cfg.n_embd, n_positions=cfg.n_positions,
                                          vocab_size=cfg.vocab_size), fmt)


@pytest.mark.parametrize("layout", ["save_pretrained", "hub_safetensors", "hub_bin"])
def test_golden_logits_match_transformers(tmp_path, layout):
    ref = reference_gpt2()
    folder = tmp_path / layout
    if layout == "save_pretrained":
        ref.save_pretrained(folder)
    else:
        write_hub_layout(ref, folder, layout.removeprefix("hub_"))
    ours = load_gpt2(GPT, str(folder)).eval()
    idx = torch.randint(0, 100, (2, 32))
    with torch.no_grad():
        expected = ref(idx).logits
        logits, _ = ours(idx)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    greedy = ours.generate(idx[:, :4], 10, temperature=0)
    ref_greedy = ref.generate(idx[:, :4], max_new_tokens=10, do_sample=False,
                              pad_token_id=99)
    assert torch.equal(greedy, ref_greedy)


def test_from_pretrained_rejects_unknown_names_and_mismatched_weights(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        load_gpt2(GPT, "gpt3")
    ref = reference_gpt2()
    ref.save_pretrained(tmp_path)
    cfg = (tmp_path / "config.json").read_text().replace('"n_embd": 32', '"n_embd": 64')
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match="shape"):
        load_gpt2(GPT, str(tmp_path))


def test_gpt_from_pretrained_is_nanogpts_call(tmp_path):
    # nanoGPT's users load OpenAI's weights with GPT.from_pretrained("gpt2"); a folder of the
    # hub's files stands in for the download, which needs the network.
    mine = tiny_model(seed=3, block_size=32, bias=True)
    folder = write_gpt2_folder(tmp_path / "gpt2", hub_state(mine), dict(
        n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=50))
    loaded = GPT.from_pretrained(str(folder))
    assert loaded.state_dict().keys() == mine.state_dict().keys()
    assert all(torch.equal(v, mine.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(CheckpointError, match="cannot load the model from gpt3: unknown model"):
        GPT.from_pretrained("gpt3")


# The modern options keep every contract: causality, cache equivalence, SDPA equivalence.
OPTIONS = {"rope": dict(rope=True), "qk_norm": dict(qk_norm=True), "relu2": dict(relu2=True),
           "all": dict(rope=True, qk_norm=True, relu2=True)}


@pytest.mark.parametrize("name", OPTIONS)
def test_options_keep_the_contracts(name, monkeypatch):
    m = tiny_model(**OPTIONS[name])
    idx = torch.randint(0, 50, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (idx[:, 9] + 1) % 50
    a, _ = m(idx)
    assert torch.equal(a[:, :9], m(changed)[0][:, :9])
    prompt = idx[:, :5]
    assert torch.equal(m.generate(prompt, 30, temperature=0),
                       m.generate_uncached(prompt, 30, temperature=0))
    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", explicit_attention)
    torch.testing.assert_close(m(idx)[0], a, atol=1e-5, rtol=0)


def test_rope_scores_depend_on_relative_position_only():
    m = tiny_model(rope=True)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i, j):
        rq = model_module.apply_rotary(q, m.rope_cos[i:i + 1], m.rope_sin[i:i + 1])
        rk = model_module.apply_rotary(k, m.rope_cos[j:j + 1], m.rope_sin[j:j + 1])
        return (rq * rk).sum().item()

    assert score(7, 3) == pytest.approx(score(12, 8), abs=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 5), abs=1e-3)


def test_option_parameter_layout():
    rope = tiny_model(rope=True)
    assert "transformer.wpe.weight" not in rope.state_dict()
    assert rope.num_params() == rope.num_params(non_embedding=False)  # no position table
