"""Serving many prompts at once, in miniature: a few rows ("slots") decode together, and a slot
whose row has ended takes the next waiting prompt at once ("continuous batching").

    python sample.py --prompts=prompts.txt --batch_size=4 --temperature=0

Why batch: decoding one token reads every weight to do 2 FLOPs with each (docs/inference.md,
"What inference costs"), so rows decoded together share that read and cost little more than
one. Why refill: rows end at different times (at <|endoftext|>, or at their max_new_tokens). A
static batch runs until its longest row ends, its finished slots idle and the prompts behind it
wait; here a finished slot takes the next prompt on the very next step.

How every row stays exactly what it would be alone (in float32; 16-bit rounding differs between
batch shapes, and a near-tie between two tokens may then flip):
- A newcomer's prompt is prefilled alone, as a lone run starts: one forward over its last
  block_size tokens into a fresh cache, whose keys and values are copied into its slot's row of
  the batch's caches. No padding: a row's columns hold its own tokens from column 0 on.
- A decode step feeds every slot one token at its own position, the length of its row; the
  cache writes each row's key and value at that column, and the mask lets each row see its
  columns up to there, never another row's or a stale one.
- A row whose cache is full (block_size tokens) is prefilled again from its last block_size
  tokens, as GPT.generate_tokens rebuilds its cache past block_size.
The decode step has one shape whatever the rows hold, (slots, 1) tokens into caches of
block_size columns, so torch.compile compiles it once; on CUDA, mode="reduce-overhead" also
captures it as a CUDA graph, replayed for every token without launching each kernel.

What a real server adds, and why (engine.py, pages.py and prefix.py build the first three):
- Paged caches (vLLM's PagedAttention). Here each slot holds block_size columns whether its row
  uses ten or all of them, and this memory, not compute, bounds the batch. Pages of some 16
  tokens, handed out as rows grow, fit several times more rows in the same memory.
- Scheduling. Requests arrive over time, not as a list known at the start; admission follows
  the memory left, with priorities and fairness; a row is preempted (its cache dropped and
  recomputed later) when memory runs out; long prompts are prefilled in chunks mixed into the
  decode steps, so that one long prompt does not stall every other row's next token. Here each
  newcomer is prefilled alone, which is exact and simple but leaves the others waiting.
- Prefix reuse. Prompts that begin alike (a system prompt, a few-shot preamble) share the cached
  keys and values of that beginning instead of prefilling it again: a radix tree of cached
  prefixes (SGLang) or hashed pages (vLLM).
"""
from collections import deque
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from model import KVCache, sample_next


@dataclass
class Request:
    ids: list[int]  # the prompt's token ids, at least one; a lone run reads its last block_size
    max_new_tokens: int  # tokens drawn at most (an <|endoftext|> drawn ends it sooner)
    seed: int | None = None  # its draws come from its own generator, seeded so: whichever slot
    # it takes, it draws the same tokens. The generator (~2.7 KB) is made when it starts and
    # dropped when it ends, so that a million waiting requests do not hold a million of them.
    sampling: dict | None = None  # its own temperature, top_k, top_p (serving/engine.py only);
    # None: the engine's, which sample.py sets for all


@dataclass
class Row:
    request: int  # which request the slot is serving
    tokens: list[int]  # its prompt and the tokens drawn so far
    cached: int = 0  # how many of them the slot's cache holds
    drawn: int = 0
    generator: torch.Generator | None = None  # the request's, seeded by its seed


class SlotCache:
    """The batch's keys and values, block_size columns per slot in every layer, answering what
    the attention asks a cache (model.KVCache): each row's one new token sits at its own
    column, cols (slots,), where its key and value are written; the row sees its columns up to
    there, never another row's or a stale one."""

    def __init__(self, n_layer, cols, block_size):
        self.k, self.v, self.cols = [None] * n_layer, [None] * n_layer, cols
        self.keys = torch.arange(block_size, device=cols.device)

    def positions(self, T, device):
        assert T == 1, "a decode step feeds each slot one token"
        # Row b sees its columns 0..cols[b] (B, 1, 1, keys): at least one, even in a free slot,
        # so that no softmax is empty (NaN).
        self.seen = (self.keys <= self.cols[:, None]).view(len(self.cols), 1, 1, -1)
        return self.cols[:, None]  # (B, 1)

    def attend(self, layer, q, k, v):
        at = self.cols.view(-1, 1, 1, 1).expand_as(k)  # (B, nh, 1, hs): column per row
        keys, values = self.k[layer].scatter_(2, at, k), self.v[layer].scatter_(2, at, v)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.seen)


class Slots:
    """The batch's cache, one row per slot, and the two ways of filling it."""

    def __init__(self, model, slots, compile=False):
        cfg, device = model.config, next(model.parameters()).device
        self.model, self.slots, self.compiled = model, slots, compile
        self.cols = torch.zeros(slots, dtype=torch.long, device=device)  # where each row writes
        self.cache = SlotCache(cfg.n_layer, self.cols, cfg.block_size)
        mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs
        self.decode = torch.compile(self._decode, mode=mode) if compile else self._decode

    def _decode(self, tokens):
        """Next-token logits (slots, vocab) after one token per slot, tokens (slots, 1), each
        at its row's own position, cols."""
        return self.model.lm_head(self.model.hidden_states(tokens, self.cache)[:, -1])

    def prefill(self, slot, ids):
        """Run ids (B=1) alone into a fresh cache, as a lone run does; copy its keys and values
        into slot's row; return the next-token logits (1, vocab)."""
        cfg = self.model.config
        alone = KVCache(cfg.n_layer, cfg.block_size)
        idx = torch.tensor([ids], dtype=torch.long, device=self.cols.device)
        logits = self.model.lm_head(self.model.hidden_states(idx, alone)[:, -1])
        for layer, (k, v) in enumerate(zip(alone.k, alone.v)):
            if self.cache.k[layer] is None:  # allocated on first use, in the forward's dtype
                self.cache.k[layer] = k.new_zeros(self.slots, *k.shape[1:])
                self.cache.v[layer] = v.new_zeros(self.slots, *v.shape[1:])
                if self.compiled:  # the same buffers every step: a CUDA graph may keep them
                    torch._dynamo.mark_static_address(self.cache.k[layer])
                    torch._dynamo.mark_static_address(self.cache.v[layer])
            self.cache.k[layer][slot], self.cache.v[layer][slot] = k[0], v[0]
        return logits


@torch.no_grad()
def serve(model, requests, slots, temperature=1.0, top_k=None, top_p=None, eot=None,
          compile=False, admitted=None, stats=None):
    """Yield (request index, token id) as each token is drawn, continuing every request's
    prompt, slots rows at a time, a freed slot taking the next request in order. A request
    ends after its max_new_tokens, or at eot, which is not yielded. admitted, a list, receives
    (step, slot, request) at each admission; a step draws one token for every busy slot.
    stats, if given (the bench's), counts prefill_tokens, and the peak_rows busy and the
    peak_tokens cached at once.

    Each request's tokens are those GPT.generate_tokens draws for it alone (greedy, float32),
    whatever the other rows hold: see this file's docstring."""
    block = model.config.block_size
    slots = min(slots, max(1, len(requests)))  # no slot that no request could ever use
    batch = Slots(model, slots, compile)
    waiting = deque(i for i, r in enumerate(requests) if r.max_new_tokens > 0)
    rows, step = [None] * slots, 0
    while waiting or any(rows):
        logits = {}  # slot: its next-token logits, (1, vocab)
        for s in range(slots):  # prefill: newcomers, and rows whose cache is full
            if rows[s] is None and waiting:
                i = waiting.popleft()
                rows[s] = Row(i, list(requests[i].ids), generator=new_generator(
                    requests[i].seed, batch.cols.device))
                if admitted is not None:
                    admitted.append((step, s, rows[s].request))
            row = rows[s]
            if row is not None and row.cached in (0, block):
                logits[s] = batch.prefill(s, row.tokens[-block:])
                row.cached = min(len(row.tokens), block)
                if stats is not None:
                    stats.prefill_tokens += row.cached
        if stats is not None:
            busy = [r for r in rows if r is not None]
            stats.peak_rows = max(stats.peak_rows, len(busy))
            stats.peak_tokens = max(stats.peak_tokens, sum(r.cached for r in busy))
        decoding = [s for s, row in enumerate(rows) if row is not None and s not in logits]
        if decoding:  # one step for every slot, its shape fixed; see _decode
            # A slot that does not decode writes a stray key and value where its next token
            # will go, or, if full or free, where its next prefill will write: none is read.
            batch.cols.copy_(torch.tensor([min(r.cached, block - 1) if r else 0 for r in rows]))
            tokens = torch.tensor([[r.tokens[-1] if r else 0] for r in rows])
            out = batch.decode(tokens.to(batch.cols.device))
            for s in decoding:
                logits[s] = out[s:s + 1]
                rows[s].cached += 1
        for s in sorted(logits):
            row, request = rows[s], requests[rows[s].request]
            token = sample_next(logits[s], temperature, top_k, top_p, row.generator).item()
            row.tokens.append(token)
            row.drawn += 1
            if token == eot or row.drawn == request.max_new_tokens:
                rows[s] = None  # the slot is free for the next step's prefill
            if token != eot:
                yield row.request, token
        step += 1


def new_generator(seed, device):
    """A generator on device seeded with seed, or None (torch's global one) for no seed."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)
