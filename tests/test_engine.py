"""The paged engine (serving/engine.py, pages.py, prefix.py): every request's tokens are exactly
its lone run's, whatever shares the pool, and the allocator never leaks or mixes up a page.

The reference is GPT.generate_tokens on one prompt, greedy, in float32 on the CPU, as in
tests/test_serve.py. Pages of 4 tokens and pools of a few pages make every path happen at
these tiny sizes: shared pages, preemption, chunks smaller than a prompt, block_size passed.
"""
import pytest
import torch

from serving.batching import Request
from serving.engine import Engine, ServingError
from serving.pages import PagedCache, PagePool
from serving.prefix import PrefixCache
from test_serve import BLOCK, alone, prompts
from test_serve import tiny as untrained

BOTH = pytest.mark.parametrize("options", [{}, dict(rope=True, qk_norm=True)],
                               ids=["learned_positions", "rope_qk_norm"])


def tiny(**options):
    """The tiny model of test_serve.py with its matrices 10 times larger: an untrained model's
    greedy tokens then follow its context (at init they repeat one token, which would hide
    a wrong key as well as a right one)."""
    model = untrained(**options)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    return model


@BOTH
def test_paged_attention_equals_the_whole_forward(options):
    # The paged cache at the logits: two prompts fed side by side in one packed row, in
    # chunks that start partway through a page and continue a cached prefix, through pages
    # handed out out of order; each position's logits equal one forward over its prompt.
    model = tiny(**options)
    a, b = prompts(23, 14, seed=8)
    pool = PagePool(model.config.n_layer, 16, 4)
    prefix = PrefixCache(pool, enabled=False)
    pool.free.rotate(5)  # tables of scattered pages
    tables = [[prefix.allocate() for _ in range(pool.pages_for(len(ids)))] for ids in (a, b)]
    steps = [[(0, 0, 5), (1, 0, 1)], [(0, 5, 5), (1, 1, 13)], [(0, 10, 13)]]  # (row, cached, n)
    logits = [[], []]
    with torch.no_grad():
        for spans in steps:
            cache = PagedCache(pool, [(tables[r], c, n) for r, c, n in spans], "cpu")
            idx = torch.tensor([[t for r, c, n in spans for t in (a, b)[r][c:c + n]]])
            out = model.lm_head(model.hidden_states(idx, cache))[0]  # (N, vocab)
            for (r, c, n), part in zip(spans, out.split([n for _, _, n in spans])):
                logits[r].append(part)
        for r, ids in enumerate((a, b)):
            whole, _ = model(torch.tensor([ids]))
            torch.testing.assert_close(torch.cat(logits[r]), whole[0], atol=1e-4, rtol=1e-5)


def run(engine, check=True):
    """Every request's tokens, stepping the engine and checking the allocator at each step."""
    out = [[] for _ in engine.requests]
    with torch.no_grad():
        while engine.waiting or engine.running:
            for i, token in engine.step()[0]:
                out[i].append(token)
            if check:
                assert_pages_sound(engine)
    assert not any(engine.pool.refs), "pages held after every request ended"
    assert len(engine.pool.free) + len(engine.prefix.idle) == engine.pool.n_pages
    return out


def assert_pages_sound(engine):
    engine.prefix.check()
    P, held = engine.pool.page_size, {}
    for seq in engine.running:
        # pages for what it holds, and at most for all its tokens (the last drawn is not in)
        pages_for = engine.pool.pages_for
        assert pages_for(seq.cached) <= len(seq.table) <= pages_for(len(engine.context(seq)))
        for j, page in enumerate(seq.table):
            held.setdefault(page, []).append(engine.context(seq)[:(j + 1) * P])
    for page, prefixes in held.items():
        assert engine.pool.refs[page] == len(prefixes), page
        # shared only by requests whose tokens are the same up to the page's end
        assert all(p == prefixes[0] for p in prefixes), (page, prefixes)


@BOTH
def test_rows_equal_lone_runs_through_small_pages_and_chunks(options):
    model = tiny(**options)
    # 60 is longer than block_size (48): cut to its last 48, as a lone run cuts it; 40 + 20
    # new tokens pass block_size, and the context is rebuilt at every step from there.
    cases = prompts(1, 7, 40, 60, 13)
    engine = Engine(model, [Request(ids, 20) for ids in cases], rows=4, page_size=4,
                    prefill_chunk=5, temperature=0)
    assert run(engine) == [alone(model, ids, 20) for ids in cases]
    assert engine.stats.preemptions == 0 and engine.stats.peak_rows == 4


@BOTH
def test_shared_prefixes_are_prefilled_once(options):
    model = tiny(**options)
    system = prompts(18, seed=3)[0]  # four pages and a half of 4 tokens
    cases = [system + tail for tail in prompts(3, 6, 1, 9, seed=4)] + [system[:9]]
    engine = Engine(model, [Request(ids, 12) for ids in cases], rows=5, page_size=4,
                    temperature=0)
    assert run(engine) == [alone(model, ids, 12) for ids in cases]
    # The first prompt computes the system prompt; each of the next three takes its four full
    # pages, the last (9 tokens) two of them.
    assert engine.stats.reused_pages == 3 * 4 + 2
    total = sum(len(ids) for ids in cases)
    assert engine.stats.prefill_tokens == total - engine.stats.reused_pages * 4


@BOTH
def test_preemption_then_recomputation_equals_an_uninterrupted_run(options):
    model = tiny(**options)
    cases = prompts(10, 3, 17, 6, 12, seed=5)
    # 12 pages of 4 tokens: each request alone fits (at most 12 + 30 - 1 tokens, capped at
    # block_size's 48: 12 pages), all five together do not.
    engine = Engine(model, [Request(ids, 30) for ids in cases], rows=5, page_size=4,
                    kv_pages=12, prefill_chunk=3, temperature=0)
    assert run(engine) == [alone(model, ids, 30) for ids in cases]
    assert engine.stats.preemptions > 0 and engine.stats.peak_pages <= 12


def test_eot_ends_a_request_and_frees_its_pages_for_the_next():
    model = tiny()
    cases = prompts(5, 1, 12, 30, 7, 3, 20, seed=2)
    eot = alone(model, cases[0], 3)[-1]
    engine = Engine(model, [Request(ids, 25) for ids in cases], rows=3, page_size=4,
                    kv_pages=30, prefill_chunk=8, temperature=0, eot=eot)
    assert run(engine) == [alone(model, ids, 25, eot) for ids in cases]


def test_without_reuse_nothing_is_shared_and_every_page_is_freed():
    model = tiny()
    system = prompts(16, seed=3)[0]
    cases = [system + tail for tail in prompts(2, 5, seed=4)]
    engine = Engine(model, [Request(ids, 6) for ids in cases], rows=2, page_size=4,
                    temperature=0, prefix_reuse=False)
    assert run(engine) == [alone(model, ids, 6) for ids in cases]
    assert engine.stats.reused_pages == 0 and len(engine.pool.free) == engine.pool.n_pages
    assert engine.stats.prefill_tokens == sum(map(len, cases))


def test_idle_prefix_pages_are_evicted_least_recently_used_first():
    model = tiny()
    a, b = prompts(8, 8, seed=6)  # two pages each, then one token drawn: three pages a run
    engine = Engine(model, [Request(a + [1], 1), Request(b + [1], 1), Request(a + [2], 1)],
                    rows=1, page_size=4, kv_pages=4, temperature=0)
    run(engine)
    # a's two full pages went idle, then b's run needed three of four pages: it took the two
    # free ones first, then a's least recently used page (its second, released first); so the
    # third request found only a's first page.
    assert engine.stats.reused_pages == 1


@pytest.mark.parametrize("settings, message", [
    (dict(page_size=0), "page_size (0), rows (2) and prefill_chunk (None) must be at least 1"),
    (dict(prefill_chunk=0), "prefill_chunk (0) must be at least 1"),
    (dict(prefill_chunk=-3), "prefill_chunk (-3) must be at least 1"),
    (dict(kv_pages=0), "kv_pages must be at least 1, got 0"),
    (dict(page_size=4, kv_pages=3), "request 1 needs 4 pages of 4 tokens at its longest (14 "
                                    "tokens), more than the pool's 3"),
], ids=["page_size", "chunk_0", "chunk_negative", "no_pages", "larger_than_the_pool"])
def test_what_cannot_be_served_is_refused_at_the_start(settings, message):
    requests = [Request([1, 2], 3), Request(list(range(10)), 5)]
    with pytest.raises(ServingError) as e:
        Engine(tiny(), requests, rows=2, **settings)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_context_at_block_size_needs_only_block_size_tokens_of_pages():
    model = tiny()
    ids = prompts(BLOCK, seed=7)[0]  # a full block, then 10 tokens past it, in 12 pages
    engine = Engine(model, [Request(ids, 10)], rows=1, page_size=4, kv_pages=BLOCK // 4,
                    temperature=0)
    assert run(engine) == [alone(model, ids, 10)]


def test_a_page_is_shared_only_when_everything_before_it_is_the_same():
    model = tiny()
    x, y, z = prompts(8, 8, 8, seed=9)
    # y's two pages follow z in one prompt and x in the next: the same tokens at the same
    # positions, but keys and values that differ (they attend over z or x), so not shared.
    # The third prompt must take the second's x and y, never the first's y.
    cases = [z + y + [3], x + y + [3], x + y + [5]]
    engine = Engine(model, [Request(ids, 8) for ids in cases], rows=1, page_size=4,
                    temperature=0)
    tables, out = {}, [[] for _ in cases]  # each request's page table when it starts
    with torch.no_grad():
        while engine.waiting or engine.running:
            for i, token in engine.step()[0]:
                out[i].append(token)
            for seq in engine.running:
                tables.setdefault(seq.request, list(seq.table))
    assert out == [alone(model, ids, 8) for ids in cases]
    assert tables[2][:4] == tables[1][:4] and not set(tables[2]) & set(tables[0][:4])
    assert engine.stats.reused_pages == 4
    # (The tokens agree even when y's pages are wrongly shared: a 2-layer model's greedy
    # tokens barely feel its second layer's keys. Hence the tables.)


@BOTH
def test_every_drawn_tokens_logits_equal_one_forward(options, monkeypatch):
    # Tokens can agree while keys are wrong (see above); the logits each token is drawn from
    # cannot. Shared prefixes, preemption forced by a small pool and chunks of 3 at once,
    # within block_size, where one forward over the whole sequence is the lone run's logits.
    model = tiny(**options)
    system = prompts(9, seed=10)[0]
    cases = [system + tail for tail in prompts(5, 12, 2, 7, seed=11)] + prompts(14, seed=12)
    seen = {i: [] for i in range(len(cases))}
    draw = Engine.draw

    def recorded(self, seq, logits):
        seen[seq.request].append(logits[0])
        return draw(self, seq, logits)

    monkeypatch.setattr(Engine, "draw", recorded)
    engine = Engine(model, [Request(ids, 18) for ids in cases], rows=5, page_size=4,
                    kv_pages=10, prefill_chunk=3, temperature=0)
    out = run(engine)
    assert engine.stats.preemptions > 0 and engine.stats.reused_pages > 0
    with torch.no_grad():
        for i, ids in enumerate(cases):
            whole, _ = model(torch.tensor([ids + out[i][:-1]]))  # (1, T, vocab)
            torch.testing.assert_close(torch.stack(seen[i]), whole[0, len(ids) - 1:],
                                       atol=1e-4, rtol=1e-5)
