"""Many prompts at once (serve.py, sample.py --prompts): every row is exactly its lone run.

The reference is GPT.generate_tokens on one prompt, greedy, in float32 on the CPU, where a row of
a batch and a lone run agree to rounding and so draw the same tokens.
"""
import functools
import io
import json
import weakref

import pytest
import torch
import torch._dynamo.utils

import helpers
import sample
import serving.batching
from model import GPT, GPTConfig
from serving.batching import Request, serve
from training import runtime
from training.settings import ConfigError
from tools.bench.__main__ import main as bench_main
from training.settings import parse_config

BLOCK = 48


def tiny(**options):
    torch.manual_seed(0)
    config = GPTConfig(block_size=BLOCK, vocab_size=50, n_layer=2, n_head=2, n_embd=32, **options)
    return GPT(config).eval()


def alone(model, ids, max_new_tokens, eot=None):
    """The greedy tokens of one prompt decoded by itself, up to (not including) eot."""
    new = [int(t) for t in model.generate_tokens(torch.tensor([ids]), max_new_tokens,
                                                  temperature=0)]
    return new[:new.index(eot)] if eot in new else new


def served(model, requests, slots, **options):
    out = [[] for _ in requests]
    for i, token in serve(model, requests, slots, temperature=0, **options):
        out[i].append(token)
    return out


def prompts(*lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(50, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("options", [{}, dict(rope=True, qk_norm=True)],
                         ids=["learned_positions", "rope_qk_norm"])
def test_batched_greedy_rows_equal_lone_runs(options):
    model = tiny(**options)
    # 60 is longer than block_size (cut to its last 48 tokens, as a lone run cuts it), and
    # 40 + 20 new tokens run past it: those rows rebuild their caches as they go.
    cases = prompts(1, 7, 40, 60)
    rows = served(model, [Request(ids, 20) for ids in cases], slots=4)
    assert rows == [alone(model, ids, 20) for ids in cases]


def test_seven_prompts_through_three_slots():
    model = tiny()
    cases = prompts(5, 1, 12, 30, 7, 3, 20, seed=2)
    # A token that prompt 0's lone run draws early serves as <|endoftext|>: that row ends
    # there, and its slot must take the next waiting prompt at once.
    eot = alone(model, cases[0], 3)[-1]
    expected = [alone(model, ids, 25, eot) for ids in cases]
    admitted = []
    assert served(model, [Request(ids, 25) for ids in cases], 3, eot=eot,
                  admitted=admitted) == expected
    # Each request takes one step per token it draws (its <|endoftext|> too): the slot that
    # frees first takes the next one, the lower slot on a tie.
    draws = [min(len(e) + 1, 25) for e in expected]
    free_at, order = [0, 0, 0], []
    for request, n in enumerate(draws):
        slot = min(range(3), key=lambda s: (free_at[s], s))
        order.append((free_at[slot], slot, request))
        free_at[slot] += n
    assert admitted == order
    # Continuous, not static: prompt 3 started before the first three had all ended.
    assert draws[0] < 25 and admitted[3][0] < max(draws[:3])


@pytest.mark.slow
def test_compiled_decode_compiles_once_and_draws_the_same_tokens(monkeypatch):
    # The "aot_eager" backend traces with dynamo and functionalizes the cache writes as the
    # default one does, without its minute of C++ compilation on a CPU: recompilations are
    # dynamo's to decide, whichever backend runs the graph.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    model = tiny()
    cases = prompts(3, 11)  # two prompt lengths, 50 tokens each, through two slots
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = served(model, [Request(ids, 50) for ids in cases], 2, compile=True)
    counters = torch._dynamo.utils.counters
    assert counters["frames"]["total"] == 1, dict(counters["frames"])  # no recompilation
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert compiled == [alone(model, ids, 50) for ids in cases]


def test_no_more_slots_than_requests(monkeypatch):
    # --batch_size=1000000 for 3 prompts once allocated a million slots' caches (18.6 GB).
    made = []

    class Recorded(serving.batching.Slots):
        def __init__(self, model, slots, compile=False):
            made.append(slots)
            assert slots <= 3, f"{slots} slots for 3 requests"  # before they are allocated
            super().__init__(model, slots, compile)

    monkeypatch.setattr(serving.batching, "Slots", Recorded)
    model = tiny()
    cases = prompts(4, 9, 2)
    assert served(model, [Request(ids, 5) for ids in cases], 10 ** 6) == [
        alone(model, ids, 5) for ids in cases]
    assert made == [3]


@pytest.fixture
def char_checkpoint(tmp_path):
    return helpers.char_checkpoint(tmp_path, block_size=32)


def run_sample(out_dir, *flags):
    cfg = parse_config(sample.SampleConfig, [f"--out_dir={out_dir}", "--device=cpu",
                                             "--max_new_tokens=20", *flags])
    return sample.sample(cfg.validate(), io.StringIO())


def test_sampled_rows_repeat_with_the_same_seed(char_checkpoint, tmp_path):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "ab\\nc"}\n{"prompt": "b"}\n'
                                            '{"prompt": "cab"}\n')
    flags = [f"--prompts={tmp_path / 'prompts.jsonl'}", "--num_samples=2", "--temperature=1"]
    first = run_sample(char_checkpoint, *flags, "--seed=7", "--batch_size=2")
    assert len(first) == 6 and first[0].startswith("ab\nc") and first[2].startswith("b")
    # Each sample has its own generator, so neither a rerun nor other slots change it.
    assert run_sample(char_checkpoint, *flags, "--seed=7", "--batch_size=2") == first
    assert run_sample(char_checkpoint, *flags, "--seed=7", "--batch_size=5") == first
    # a billion rows asked, six allocated: once an allocator's traceback
    assert run_sample(char_checkpoint, *flags, "--seed=7", "--batch_size=1000000000") == first
    # nor do the pages, or the chunks (the same draws, whatever waits or is preempted)
    assert run_sample(char_checkpoint, *flags, "--seed=7", "--page_size=2", "--kv_pages=14",
                      "--prefill_chunk=1") == first
    assert run_sample(char_checkpoint, *flags, "--seed=8", "--batch_size=2") != first


def test_a_generator_lives_only_while_its_sample_is_drawn(char_checkpoint, monkeypatch):
    # One torch.Generator (~2.7 KB) per sample, all made at the start, once took 6 GB for
    # 2,000,000 samples of one token, which the memory check did not count.
    real, alive, peak = torch.Generator, [], [0]

    def counted(*args, **kwargs):
        generator = real(*args, **kwargs)
        alive.append(weakref.ref(generator))
        peak[0] = max(peak[0], sum(ref() is not None for ref in alive))
        return generator

    monkeypatch.setattr(torch, "Generator", counted)
    texts = run_sample(char_checkpoint, "--num_samples=30", "--batch_size=2", "--temperature=1",
                       "--max_new_tokens=3")
    assert len(texts) == 30 and len(alive) >= 30
    assert peak[0] <= 3  # one a row, and the one that a finished row hands on


def test_the_memory_check_counts_each_samples_bookkeeping(char_checkpoint, monkeypatch):
    # 1,000,000 one-token samples hold ~1 GB of requests, lists and text (~750 bytes each,
    # measured), not 128 MB: the check refuses them on a 1 GiB machine before sampling.
    monkeypatch.setattr(runtime, "device_memory", lambda device: 2 ** 30)
    monkeypatch.setattr(sample, "Engine", lambda *a, **k: pytest.fail("sampled regardless"))
    with pytest.raises(ConfigError, match="sampling 1,000,000 sequences"):
        run_sample(char_checkpoint, "--num_samples=1000000", "--max_new_tokens=1")


@pytest.mark.parametrize("name, content, flags, message", [
    ("p.txt", "", [], "the prompts file {path} holds no prompts"),
    ("p.txt", "ab\n\nba\n", [], "{path}:2: an empty line; each line is a prompt"),
    ("p.txt", "ab\nb∑a\n", [], "{path}:2: character '∑' at position 1 is not in the vocab"),
    ("p.jsonl", '{"prompt": "a"}\n["b"]\n', [], '{path}:2: expected a JSON object {{"prompt"'),
    ("p.txt", "ab\n", ["--batch_size=0"], "batch_size must be at least 1, got 0"),
    ("p.txt", "ab\n", ["--page_size=0"], "page_size must be at least 1, got 0"),
    ("p.txt", "ab\n", ["--prefill_chunk=-1"], "prefill_chunk must be at least 1, got -1"),
    ("p.txt", "ab\n", ["--kv_pages=-1"], "kv_pages must be 0 (fit the memory) or more"),
    ("p.txt", "ab\nabcabcabca\n", ["--kv_pages=3", "--page_size=4", "--max_new_tokens=4"],
     "{path}:2: request 3 needs 4 pages of 4 tokens at its longest (13 tokens), more than the "
     "pool's 3: raise kv_pages"),
], ids=["empty_file", "empty_line", "unknown_character", "not_an_object", "no_slots",
        "no_page", "no_chunk", "negative_pool", "larger_than_the_pool"])
def test_bad_prompts_are_one_line_errors(char_checkpoint, tmp_path, capsys, name, content,
                                         flags, message):
    path = tmp_path / name
    path.write_text(content)
    status = sample.main([f"--out_dir={char_checkpoint}", "--device=cpu",
                          f"--prompts={path}", *flags])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert message.format(path=path) in lines[0]


def test_many_prompts_print_their_texts_and_a_summary_line_apart(char_checkpoint, tmp_path):
    (tmp_path / "p.txt").write_text("ab\nb\n")
    cfg = parse_config(sample.SampleConfig, [f"--out_dir={char_checkpoint}", "--device=cpu",
                                             "--temperature=0", f"--prompts={tmp_path / 'p.txt'}",
                                             "--num_samples=2", "--max_new_tokens=5"])
    out, err = io.StringIO(), io.StringIO()
    sample.sample(cfg.validate(), out, err)
    assert out.getvalue().count("---------------") == 4 and out.getvalue().startswith("ab")
    assert err.getvalue().startswith("served 4 requests: 20 tokens in ")
    # 4 rows of at most 2 + 5 - 1 tokens: a page of 16 each
    assert "KV pages: 4 of 8 (16 tokens each) at peak, 0 reused" in err.getvalue()
    assert err.getvalue().endswith("; 0 preemptions\n") and err.getvalue().count("\n") == 1


def test_bench_serves_the_mix_three_ways(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench_main(["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16",
                       "--vocab_size=50", "--device=cpu", "--dtype=float32", "--train=false",
                       "--sample=false", "--serve=true", "--serve_requests=5", "--serve_slots=2",
                       f"--json_out={out}"]) == 0
    result = json.loads(out.read_text())["serve"]
    # Outputs of 1/32, 1/2, 3/32, 1/4 and 1/16 of the 16-token block: 1 (at least), 8, 1, 4, 1.
    assert result["new_tokens"] == 15
    assert [(r["way"], r["slots"]) for r in result["rows"]] == [
        ("one at a time", 1), ("static batches", 2), ("continuous", 2)]
    for r in result["rows"]:
        assert r["tokens_per_s"] * r["seconds"] == pytest.approx(15)  # every token was timed
        assert r["ttft_s"][0] <= r["ttft_s"][1] and r["tpot_s"][0] <= r["tpot_s"][1]
        # keys and values x 2 layers x 16 positions x 32 channels x 4 bytes, for every slot
        assert r["kv_cache_bytes"] == r["slots"] * 2 * 2 * 16 * 32 * 4
    assert "continuous" in capsys.readouterr().out


def test_bench_serves_both_paged_workloads_beside_todays_slots(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench_main(["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=64",
                       "--vocab_size=50", "--device=cpu", "--dtype=float32", "--train=false",
                       "--sample=false", "--paged=true", "--paged_requests=16",
                       "--paged_slots=2", "--page_size=4", f"--json_out={out}"]) == 0
    paged = json.loads(out.read_text())["paged"]
    shared, mixed = (paged["workloads"][name]["rows"]
                     for name in ("shared system prompt", "mixed lengths"))
    assert [r["way"] for r in shared] == ["slots", "paged", "paged + reuse"]
    assert [r["way"] for r in mixed] == ["slots", "paged", "paged + chunked"]
    for r in shared + mixed:  # the same KV memory: 2 slots of 64 positions, or 32 pages of 4
        assert r["kv_reserved_bytes"] == 2 * 64 * 2 * 2 * 32 * 4 >= r["kv_used_bytes"] > 0
    # 16 prompts of a 24-token system prompt and 4 to 12 tokens of their own: the first
    # prefills its prompt, the others take the system prompt's 6 pages of 4 tokens
    prompts = paged["workloads"]["shared system prompt"]["prompt_tokens"]
    assert shared[0]["prefill_tokens"] == prompts  # the slots prefill every prompt whole
    assert shared[2]["prefill_tokens"] == prompts - 15 * 6 * 4
    assert shared[0]["peak_rows"] == mixed[0]["peak_rows"] == 2
    assert mixed[1]["peak_rows"] > 2 and mixed[2]["peak_rows"] > 2  # pages fit more rows
    assert "paged + chunked" in capsys.readouterr().out


def test_each_text_is_printed_as_soon_as_it_and_those_before_it_are_done(char_checkpoint,
                                                                         tmp_path):
    # One row at a time: sample 0 is done after 5 tokens, and printed with the next step's
    # token (the engine says a request ended once its last token is given out), not at the end.
    (tmp_path / "p.txt").write_text("ab\nb\nba\n")
    cfg = parse_config(sample.SampleConfig, [f"--out_dir={char_checkpoint}", "--device=cpu",
                                             f"--prompts={tmp_path / 'p.txt'}", "--batch_size=1",
                                             "--num_samples=1", "--max_new_tokens=5"])
    drawn, printed = [], []

    class Out(io.StringIO):
        def write(self, text):
            printed.append((len(drawn), text.count("---------------")))
            return super().write(text)
    draw = sample.Engine.draw

    def counting(self, seq, logits):
        drawn.append(seq.request)
        return draw(self, seq, logits)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sample.Engine, "draw", counting)
        sample.sample(cfg.validate(), Out(), io.StringIO())
    assert [n for n, separators in printed if separators] == [6, 11, 15]
