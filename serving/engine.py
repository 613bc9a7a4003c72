"""The serving engine: many requests through one paged KV cache (pages.py, prefix.py), each step
one forward over every running request's next tokens, admitted and preempted by memory.

    python sample.py --prompts=prompts.txt --kv_pages=256 --page_size=16 --prefill_chunk=64

A step, in order:
1. Make room. Each running request, oldest first, gets the pages its next tokens need (a new
   page every page_size tokens). When none is left, the most recently admitted request is
   preempted: its pages go back (a prefix of them stays cached, prefix.py), its tokens are
   kept, and it waits at the head of the queue to be prefilled again, prompt and drawn tokens
   alike, when memory allows. The oldest request always goes on: none is larger than the pool
   (checked at the start), so nothing deadlocks.
2. Admit. While there is a row free (at most rows requests run at once), the next waiting
   request starts if the pool has pages for its whole prompt, beyond the pages of its prefix
   already cached, and a page to spare for each running request. A request never preempts
   another to start: admission waits for memory.
3. Forward. Every running request feeds its uncomputed tokens, at most prefill_chunk of them:
   a newcomer its prompt, chunk by chunk; the others the one token drawn last. All of them
   are packed into one row, (1, N) tokens, so that newcomers' prefills and the others' decode
   tokens share one pass over the weights, and a long prompt holds the others back by one
   chunk per step, not by its whole length (Sarathi's chunked prefill, Agrawal et al., 2023).
4. Draw. A request whose tokens are all computed draws its next token from the logits at its
   last one; it ends at eot (not yielded) or after max_new_tokens, and its pages go back.

Exact, as serving/batching.py is: each request's tokens are those GPT.generate_tokens draws
for it alone (greedy, float32; 16-bit rounding differs between shapes). Its tokens sit at the
positions a lone run gives them, attend over its own pages only, and a page is shared only
when every token up to its end is the same (prefix.py). Past block_size the context is, as
generate_tokens' docstring explains, rebuilt on the last block_size tokens: the request lets
go of its pages and prefills those tokens again, at every step from then on.

Requests may arrive over time: add() queues one between two steps, and cancel() ends one at
once, its pages back to the pool (serving/http.py serves clients so, one loop calling step()).
What a production engine adds: CUDA graphs of the decode step, attention kernels that read
pages in place (pages.py), a token budget per step shared by all prefills, and priorities
between requests.
"""
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from model import sample_next
from serving.batching import new_generator
from serving.pages import PagedCache, PagePool
from serving.prefix import PrefixCache, page_keys


class ServingError(ValueError):
    """A setting or a request the engine cannot serve: the user's to fix. request is the
    index of the request at fault, if one is."""

    def __init__(self, message, request=None):
        super().__init__(message)
        self.request = request


@dataclass
class Sequence:
    request: int  # its index in the requests
    tokens: list[int]  # its prompt and the tokens drawn so far
    generator: torch.Generator | None = None  # made when it first starts, kept if preempted
    start: int = 0  # its context, what its pages hold, is tokens[start:] (past block_size)
    table: list[int] = field(default_factory=list)  # its page table
    keys: list = field(default_factory=list)  # the prefix keys of its full pages (prefix.py)
    cached: int = 0  # tokens of its context whose keys and values its pages hold
    drawn: int = 0


@dataclass
class Stats:
    """What a run did: for sample.py's summary line and the bench."""
    requests: int = 0
    tokens: int = 0  # drawn, eot included
    prefill_tokens: int = 0  # fed to the forward as prompt (or recomputed), not one at a time
    steps: int = 0
    peak_rows: int = 0  # requests running at once, at most
    peak_pages: int = 0  # pages held by tables at once, at most
    peak_tokens: int = 0  # (serving/batching.py's slots, for the bench) tokens cached at once
    reused_pages: int = 0  # pages taken from the prefix cache instead of prefilled
    preemptions: int = 0
    seconds: float = 0.0


class Engine:
    """Serve requests (serving/batching.py's Request: ids, max_new_tokens, seed, sampling)
    through a pool of kv_pages pages of page_size tokens, at most rows at once; see this page's
    docstring. prefill_chunk None prefills a prompt whole. More may be add()ed later; a request
    is known by its index in the order added."""

    def __init__(self, model, requests, rows, page_size=16, kv_pages=None, prefill_chunk=None,
                 temperature=1.0, top_k=None, top_p=None, eot=None, prefix_reuse=True):
        cfg = model.config
        self.model, self.block = model, cfg.block_size
        self.device = next(model.parameters()).device
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.eot, self.chunk = eot, prefill_chunk or cfg.block_size
        if page_size < 1 or rows < 1 or prefill_chunk is not None and prefill_chunk < 1:
            raise ServingError(f"page_size ({page_size}), rows ({rows}) and prefill_chunk "
                               f"({prefill_chunk}) must be at least 1")
        self.rows = min(rows, len(requests)) if requests else rows  # no row left unused
        if kv_pages is None:  # what today's slots reserve: every row can reach block_size
            kv_pages = self.rows * -(-cfg.block_size // page_size)
        if kv_pages < 1:
            raise ServingError(f"kv_pages must be at least 1, got {kv_pages}")
        self.pool = PagePool(cfg.n_layer, kv_pages, page_size)
        self.prefix = PrefixCache(self.pool, prefix_reuse)
        # The queue holds indices, and the Sequences of preempted requests: a Sequence (its
        # tokens, table, generator) exists only from a request's start to its end; a request
        # only until its end.
        self.requests, self.waiting, self.running = {}, deque(), []
        self.stats = Stats()
        self.ended = set()  # the requests done, once run() has given out their last token
        for request in requests:
            self.add(request)

    def check(self, request, i=None):
        """Refuse a request larger than the whole pool: it could never run, and would hang."""
        longest = min(len(request.ids) + request.max_new_tokens - 1, self.block)
        if request.max_new_tokens > 0 and self.pool.pages_for(longest) > self.pool.n_pages:
            raise ServingError(
                f"{'' if i is None else f'request {i} '}needs {self.pool.pages_for(longest)} "
                f"pages of {self.pool.page_size} tokens at its longest ({longest} tokens), "
                f"more than the pool's {self.pool.n_pages}: raise kv_pages or lower "
                "max_new_tokens", i)

    def add(self, request):
        """Queue request, checked, to start at a step to come; return its index."""
        self.check(request, self.stats.requests)
        i, self.stats.requests = self.stats.requests, self.stats.requests + 1
        if request.max_new_tokens > 0:
            self.requests[i] = request
            self.waiting.append(i)
        else:
            self.ended.add(i)
        return i

    def cancel(self, i):
        """End request i now, running or waiting (its client left): its pages go back."""
        for seq in self.running:
            if seq.request == i:
                self.end(seq)
                break
        self.waiting = deque(w for w in self.waiting
                             if (w if isinstance(w, int) else w.request) != i)
        self.requests.pop(i, None)

    def summary(self):
        """One line on what the run did (sample.py prints it on stderr)."""
        s = self.stats
        return (f"served {s.requests:,} requests: {s.tokens:,} tokens in {s.seconds:.2f} s "
                f"({s.tokens / max(s.seconds, 1e-9):,.1f} tokens/s); KV pages: "
                f"{s.peak_pages:,} of {self.pool.n_pages:,} ({self.pool.page_size} tokens "
                f"each) at peak, {s.reused_pages:,} reused from shared prefixes; "
                f"{s.preemptions:,} preemptions")

    def context(self, seq, first=0, end=None):
        """seq's context, tokens[start:] (or its tokens first to end), copying only those."""
        end = self.length(seq) if end is None else end
        return seq.tokens[seq.start + first:seq.start + end]

    def length(self, seq):
        """The tokens in seq's context, counted without copying them (a step asks often)."""
        return len(seq.tokens) - seq.start

    @torch.no_grad()
    def run(self):
        """Yield (request index, token id) as each token is drawn, until every request ends."""
        t0 = time.perf_counter()
        while self.waiting or self.running:
            drawn, ended = self.step()
            yield from drawn
            self.ended.update(ended)
            self.stats.seconds = time.perf_counter() - t0

    def step(self):
        """One step (this page's docstring): ([(request index, token id)] drawn in it, [the
        requests that ended in it])."""
        self.make_room()
        self.admit()
        assert self.running, "nothing runs: the oldest request always fits the pool"
        held = self.pool.n_pages - self.prefix.available()  # each page: held, idle or free
        self.stats.peak_pages = max(self.stats.peak_pages, held)
        self.stats.peak_rows = max(self.stats.peak_rows, len(self.running))
        self.stats.steps += 1
        spans = [(seq, min(self.length(seq) - seq.cached, self.chunk))
                 for seq in self.running]
        cache = PagedCache(self.pool, [(s.table, s.cached, n) for s, n in spans], self.device)
        fed = [t for s, n in spans for t in self.context(s, s.cached, s.cached + n)]
        idx = torch.tensor([fed], device=self.device)
        x = self.model.hidden_states(idx, cache)  # (1, N, n_embd)
        last, drawing, end, self.ending = [], [], 0, []
        for seq, n in spans:
            end += n
            decode = seq.drawn > 0 and n == 1 and seq.cached == self.length(seq) - 1
            self.stats.prefill_tokens += 0 if decode else n
            seq.cached += n
            # The pages this step filled: shareable now (keyed already, when their tokens came).
            for page in seq.table[(seq.cached - n) // self.pool.page_size:
                                  seq.cached // self.pool.page_size]:
                self.prefix.written(page)
            if seq.cached == self.length(seq):  # all computed: it draws
                last.append(end - 1)
                drawing.append(seq)
        if not drawing:
            return [], []
        logits = self.model.lm_head(x[0, last])  # (drawing, vocab)
        drawn = [out for seq, row in zip(drawing, logits) for out in self.draw(seq, row[None])]
        return drawn, self.ending

    def draw(self, seq, logits):
        """Draw seq's next token from logits (1, vocab); end seq if it is done."""
        request = self.requests[seq.request]
        token = sample_next(logits, **(request.sampling or self.sampling),
                            generator=seq.generator).item()
        seq.tokens.append(token)
        seq.drawn += 1
        self.stats.tokens += 1
        self.key_full_pages(seq)
        if token == self.eot or seq.drawn == request.max_new_tokens:
            self.ending.append(seq.request)
            self.end(seq)
        return [] if token == self.eot else [(seq.request, token)]

    def end(self, seq):
        """seq's request is done: its pages go back (prefix.py keeps the keyed ones)."""
        self.running.remove(seq)
        self.prefix.release(seq.table)
        seq.table = []
        del self.requests[seq.request]

    def make_room(self):
        """Step 1: pages for every running request's next tokens, preempting the newest."""
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if self.length(seq) > self.block:  # rebuilt on the last block_size tokens
                self.prefix.release(seq.table)
                seq.table, seq.keys, seq.cached = [], [], 0
                seq.start = len(seq.tokens) - self.block
            need = self.pool.pages_for(self.length(seq)) - len(seq.table)
            while need > self.prefix.available() and seq in self.running:
                self.preempt(self.running[-1])
            if seq not in self.running:
                return  # it was the newest: everything after it has gone too
            seq.table += [self.prefix.allocate() for _ in range(need)]
            self.key_full_pages(seq)
            i += 1

    def preempt(self, seq):
        """Give back seq's pages and put it first in the queue; its tokens stay."""
        self.running.remove(seq)
        self.prefix.release(seq.table)
        seq.table, seq.keys, seq.cached = [], [], 0
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    def admit(self):
        """Step 2: start waiting requests, in order, while rows and pages allow."""
        while self.waiting and len(self.running) < self.rows:
            if isinstance(self.waiting[0], int):
                i = self.waiting[0]
                self.waiting[0] = Sequence(i, list(self.requests[i].ids))
            seq = self.waiting[0]
            seq.start = max(seq.start, len(seq.tokens) - self.block)
            context = self.context(seq)
            # Pages of the prompt cached already; never its last token, whose logits it needs.
            keys = page_keys(context[:len(context) - 1], self.pool.page_size)
            shared, wait = self.prefix.match(keys) if self.prefix.enabled else ([], False)
            need = self.pool.pages_for(len(context)) - len(shared)
            # Shared pages that were idle are no longer there to be allocated; and a page is
            # kept free for each running request, itself included, so that the next steps'
            # tokens do not preempt at once what was just admitted (vLLM keeps such a
            # watermark too): otherwise a request can be admitted, preempted, admitted... Alone,
            # a request needs no spare page: none is larger than the pool.
            spare = (len(self.running) + 1 if self.running else 0) + sum(
                p in self.prefix.idle for p in shared)
            if wait or need + spare > self.prefix.available():
                return  # its prefix is being computed, or memory is short: it waits
            self.waiting.popleft()
            self.prefix.hold(shared)
            self.stats.reused_pages += len(shared)
            seq.table = shared + [self.prefix.allocate() for _ in range(need)]
            seq.keys, seq.cached = keys[:len(shared)], len(shared) * self.pool.page_size
            self.key_full_pages(seq)
            if seq.generator is None:
                seq.generator = new_generator(self.requests[seq.request].seed, self.device)
            self.running.append(seq)

    def key_full_pages(self, seq):
        """Key each page of seq's table that its context fills, for prefixes to come."""
        full = min(self.length(seq) // self.pool.page_size, len(seq.table))
        if len(seq.keys) < full:
            parent = seq.keys[-1] if seq.keys else None
            first = len(seq.keys) * self.pool.page_size
            new = page_keys(self.context(seq, first, full * self.pool.page_size),
                            self.pool.page_size, parent)
            for page, key in zip(seq.table[len(seq.keys):full], new):
                self.prefix.key(page, key)
            seq.keys += new
