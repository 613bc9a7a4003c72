"""The paged KV cache (vLLM's PagedAttention, Kwon et al., 2023): the keys and values of every
request live in one pool of fixed-size pages, and each request keeps a page table, the list of
its pages in order. A page holds page_size tokens' keys and values for every head of a layer.

    pool (one per layer)   page 0   page 1   page 2   page 3   page 4   page 5   ...
                           [A0-3]   [A4-7]   [free]   [B8-9 ]  [A8-11]  [C0-2 ]
    request A, 12 tokens:  table [0, 1, 4]        its tokens 0-3 in page 0, 4-7 in 1, 8-11 in 4
    request B, 10 tokens:  table [0, 1, 3]        begins as A does: pages 0 and 1 held by both
    request C,  3 tokens:  table [5]              a request holds only the pages it fills

Why pages: serving/batching.py gives every slot block_size columns whether its row uses ten
tokens or all of them, so memory, not compute, bounds the batch. Here a request holds what its
length needs, to within one page, and gets another page as it grows: the same memory holds
several times the rows. A page that two requests' tables share (a common prefix, prefix.py)
is stored once.

Token t of a request lives in page table[t // page_size], at offset t % page_size; its
position, for the learned table or RoPE, is t. To attend, a request's pages are gathered, in
table order, into the (1, nh, tokens, hs) layout that scaled_dot_product_attention takes:
this copies them, which on a CPU costs little beside the matmuls. A GPU kernel (PagedAttention,
FlashInfer, FlashAttention's paged variant) instead reads the pages where they lie, following
the table inside the kernel, and attends over every request of the batch in one launch.
"""
from collections import deque

import torch
from torch.nn import functional as F


class PagePool:
    """n_pages pages of page_size tokens' keys and values in each of n_layer layers, and how
    many page tables hold each page. Which pages are free is prefix.py's to decide."""

    def __init__(self, n_layer, n_pages, page_size):
        self.n_layer, self.n_pages, self.page_size = n_layer, n_pages, page_size
        # (n_layer, n_pages, page_size, nh, hs) each, allocated at the first write, in the
        # dtype the forward computes keys in (autocast's), as model.KVCache is.
        self.k = self.v = None
        self.refs = [0] * n_pages  # how many requests' tables hold each page
        self.free = deque(range(n_pages))  # pages that hold nothing anyone needs

    def pages_for(self, tokens):
        """How many pages tokens tokens fill: the last one perhaps in part."""
        return -(-tokens // self.page_size)

    def allocate_tensors(self, k):
        """The pool itself, shaped after one layer's keys k (1, nh, T, hs)."""
        _, nh, _, hs = k.shape
        shape = (self.n_layer, self.n_pages, self.page_size, nh, hs)
        self.k, self.v = k.new_zeros(shape), k.new_zeros(shape)


class PagedCache:
    """One step of the engine as model.hidden_states sees it: the tokens of several requests,
    packed into one row (1, N), each request's span continuing the tokens its pages hold.
    It answers what the attention asks a cache (model.KVCache): the positions of the tokens
    fed, and attention over each request's own cached tokens, its new ones stored first.

    spans: [(table, cached, n)]: a request's page table (enough pages for cached + n tokens),
    how many of its tokens the pages already hold, and how many it feeds now (a prompt's
    chunk, or the one token drawn last)."""

    def __init__(self, pool, spans, device):
        self.pool, self.spans = pool, []
        pos, where = [], []  # each fed token's position, and its place in the pool's pages
        P = pool.page_size
        for table, cached, n in spans:
            for t in range(cached, cached + n):
                pos.append(t)
                where.append(table[t // P] * P + t % P)
            pages = torch.tensor(table[:pool.pages_for(cached + n)], device=device)
            mask = None  # no mask: filling empty pages is causal; one token sees all before it
            if cached > 0 and n > 1:  # a later chunk: its token i sees tokens <= cached + i
                keys = torch.arange(cached + n, device=device)
                mask = keys <= torch.arange(cached, cached + n, device=device)[:, None]
            self.spans.append((pages, cached, n, mask))
        self.pos = torch.tensor([pos], device=device)  # (1, N)
        self.where = torch.tensor(where, device=device)  # (N,)

    def positions(self, T, device):
        assert T == self.pos.size(1), "the step feeds the tokens its spans name"
        return self.pos

    def attend(self, layer, q, k, v):
        """Store the N new keys and values k, v (1, nh, N, hs) in their pages; return each
        span's queries' attention over its request's tokens, (1, nh, N, hs)."""
        if self.pool.k is None:
            self.pool.allocate_tensors(k)
        nh, hs = k.size(1), k.size(3)
        keys, values = self.pool.k[layer], self.pool.v[layer]  # (n_pages, page_size, nh, hs)
        keys.view(-1, nh, hs).index_copy_(0, self.where, k[0].transpose(0, 1))
        values.view(-1, nh, hs).index_copy_(0, self.where, v[0].transpose(0, 1))
        out, first = [], 0
        for pages, cached, n, mask in self.spans:
            length = cached + n
            # the request's pages in table order: (pages, page_size, nh, hs) -> (1, nh, T, hs)
            k_r = keys[pages].flatten(0, 1)[:length].transpose(0, 1).unsqueeze(0)
            v_r = values[pages].flatten(0, 1)[:length].transpose(0, 1).unsqueeze(0)
            out.append(F.scaled_dot_product_attention(
                q[:, :, first:first + n], k_r, v_r, attn_mask=mask, is_causal=cached == 0))
            first += n
        return torch.cat(out, dim=2)
