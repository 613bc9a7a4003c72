"""The GPT-2 language model and its key/value-cached sampler, in the order the parts build on
each other: attention, MLP, Block, GPT. Parameter names are GPT-2's own, so OpenAI's weights map
one to one (GPT.from_gpt2; training/safe_load.py reads the files). This file needs torch alone.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context the model can attend over
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # 0 for pretraining, 0.1+ for finetuning small data
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2 has
    # Later practice, off by default to stay GPT-2 (docs/benchmarks.md: each one's measured gain)
    rope: bool = False  # rotary position embeddings in attention, instead of a learned table
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attention
    relu2: bool = False  # ReLU squared instead of GELU in the MLP


class KVCache:
    """Keys and values of the tokens seen so far, in every layer, for rows that start together
    (generate_tokens). The attention asks its cache two things, and serving/pages.py's paged
    cache answers the same two: where the tokens fed next sit (positions), and attention over
    all that is cached once their own keys and values are stored (attend)."""

    def __init__(self, n_layer, max_len):
        self.max_len, self.start, self.length = max_len, 0, 0
        self.k, self.v = [None] * n_layer, [None] * n_layer

    def positions(self, T, device):
        """The positions (T,) of the next T tokens, which every layer's attend then stores."""
        assert self.length + T <= self.max_len, "KV cache overflow: the caller must refill it"
        self.start, self.length = self.length, self.length + T
        return torch.arange(self.start, self.length, device=device)

    def attend(self, layer, q, k, v):
        """Store layer's k, v (B, nh, T, hs); return q's attention over all cached so far."""
        if self.k[layer] is None:  # allocate on first use, in the dtype autocast gave k and v
            B, nh, _, hs = k.shape
            self.k[layer] = k.new_zeros(B, nh, self.max_len, hs)
            self.v[layer] = v.new_zeros(B, nh, self.max_len, hs)
        self.k[layer][:, :, self.start:self.length] = k
        self.v[layer][:, :, self.start:self.length] = v
        # Filling an empty cache, token t sees tokens <= t; a later step's one new token sees
        # all stored before it (SDPA's is_causal would align it with the first key instead).
        assert self.start == 0 or k.size(2) == 1, "cached decoding feeds one token at a time"
        return F.scaled_dot_product_attention(q, self.k[layer][:, :, :self.length],
                                              self.v[layer][:, :, :self.length],
                                              is_causal=self.start == 0)


def apply_rotary(x, cos, sin):
    """Rotate pairs of channels of x (B, nh, T, hs) by position-dependent angles (.., T, hs/2):
    a query and a key then score by their relative position alone (Su et al., 2021)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer=0):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout, self.qk_norm = config.n_head, config.dropout, config.qk_norm
        self.layer = layer  # which of a KV cache's layers holds this one's keys and values

    def forward(self, x, rotary=None, kv_cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).chunk(3, dim=2)  # -1 heads: under TP a rank has n_head / tp
        q, k, v = [t.view(B, T, -1, C // self.n_head).transpose(1, 2)
                   for t in (q, k, v)]  # (B, nh, T, hs)
        if self.qk_norm:
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        # CUDA's autocast runs rms_norm in float32: back to v's dtype, which attention uses
        # anyway, so that the KV cache holds keys and values alike, cast once.
        q, k = q.to(v.dtype), k.to(v.dtype)
        if kv_cache is None:  # token t sees tokens <= t
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:  # the cache stores k and v, and knows which keys each query may see
            y = kv_cache.attend(self.layer, q, k, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2's GELU is the tanh approximation; ReLU squared is the cheaper later choice.
        self.act = ReLUSquared() if config.relu2 else nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class ReLUSquared(nn.Module):
    def forward(self, x):
        return F.relu(x).square()


class Block(nn.Module):
    def __init__(self, config, layer=0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rotary=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), rotary, kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # A way to train, not a part of the model's shape, so not in GPTConfig (which
        # checkpoints save): the trainer sets it (see hidden_states).
        self.activation_checkpointing = False
        if config.rope:  # angles (block_size, hs/2), derived, so not saved in checkpoints
            hs = config.n_embd // config.n_head
            freqs = 10000.0 ** (-torch.arange(0, hs, 2).float() / hs)
            angles = torch.outer(torch.arange(config.block_size).float(), freqs)
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)
        else:
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.transformer.wte.weight = self.lm_head.weight  # one matrix reads and writes tokens
        self.apply(self._init_weights)
        # GPT-2 scales the projections into the residual stream by 1/sqrt(2 * n_layer):
        # each block adds two of them, and the sum should not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        """Parameter count. non_embedding leaves out the position table, as GPT-2's paper
        does; the token table is counted because it doubles as the output head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.rope:
            n -= self.transformer.wpe.weight.numel()
        return n

    def hidden_states(self, idx, kv_cache=None):
        """The final norm's activations (B, T, n_embd) for token ids idx (B, T). With kv_cache
        (a KVCache, or serving/pages.py's paged one), idx continues what the cache holds, at
        the positions the cache gives: (T,), or (B, T) when rows sit at different lengths."""
        B, T = idx.size()
        if kv_cache is None:
            assert T <= self.config.block_size, (
                f"sequence of length {T} exceeds block_size {self.config.block_size}")
            pos = torch.arange(T, dtype=torch.long, device=idx.device)
        else:
            pos = kv_cache.positions(T, idx.device)
        x, rotary = self.transformer.wte(idx), None
        if self.config.rope:  # angles (1, T, hs/2), or (B, 1, T, hs/2) for rows' own positions
            rotary = (self.rope_cos[pos].unsqueeze(-3), self.rope_sin[pos].unsqueeze(-3))
        else:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            if self.activation_checkpointing and self.training and kv_cache is None:
                # Keep only the block's input x (B, T, C); backward reruns the block, with the
                # RNG state restored so dropout draws the same masks: the same gradients.
                x = checkpoint(block, x, rotary, None, use_reentrant=False)
            else:
                x = block(x, rotary, kv_cache)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        """Return (logits (B, T, vocab_size), mean cross-entropy or None); targets -1 ignored."""
        logits = self.lm_head(self.hidden_states(idx))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1),
                                   ignore_index=-1)
        return logits, loss

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token, 6N + 12 * n_layer * n_embd * seq_len (PaLM, appendix B):
        6 per parameter, plus attention's score and value matmuls."""
        seq_len = seq_len or self.config.block_size
        return 6 * self.num_params() + 12 * self.config.n_layer * self.config.n_embd * seq_len

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, **sampling):
        """Yield max_new_tokens tokens, each (B, 1), continuing idx (B, T), drawn by
        sample_next(**sampling): the prompt is cached once, then each step feeds one token.
        Once the sequence outgrows block_size, every cached key and value is stale: computed at
        a position that has shifted, and (past the first layer) from tokens that have left the
        window. So from then on the cache is rebuilt on the last block_size tokens at every
        step: exactly what recomputing the cropped context gives, at the same cost."""
        cfg, cache = self.config, None
        for _ in range(max_new_tokens):
            if cache is None or cache.length == cfg.block_size:
                context = idx[:, -cfg.block_size:]
                cache = KVCache(cfg.n_layer, cfg.block_size)
            else:
                context = idx[:, -1:]
            logits = self.lm_head(self.hidden_states(context, cache)[:, -1, :])
            idx_next = sample_next(logits, **sampling)
            idx = torch.cat((idx, idx_next), dim=1)
            yield idx_next

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, **sampling):
        """Return idx (B, T) followed by max_new_tokens tokens drawn by sample_next(**sampling)."""
        return torch.cat([idx, *self.generate_tokens(idx, max_new_tokens, **sampling)], dim=1)

    @torch.no_grad()
    def generate_uncached(self, idx, max_new_tokens, **sampling):
        """The textbook loop, the cached sampler's reference: rerun the context for each token."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            idx_next = sample_next(logits[:, -1, :], **sampling)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    @classmethod
    def from_gpt2(cls, hf_config, tensors, dropout=0.0):
        """GPT-2 from OpenAI's (or transformers') parameters: hf_config is their config.json as
        a dict, tensors their state dict, in the hub's names ("h.0.attn.c_attn.weight") or
        save_pretrained's ("transformer.h.0..."). ValueError for anything that does not fit,
        found before anything is allocated."""
        if not isinstance(hf_config, dict):
            raise ValueError("config.json is not a JSON object")
        keys = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")
        for key in keys:
            if type(hf_config.get(key)) is not int or hf_config[key] < 1:  # type(): not a bool
                raise ValueError(f"config.json needs {key} as a positive integer, got "
                                 f"{hf_config.get(key)!r}")
        L, H, C, T, V = (hf_config[k] for k in keys)
        if C % H:
            raise ValueError(f"config.json's n_embd {C} is not divisible by its n_head {H}")
        params = 12 * L * C * C + (V + T) * C  # blocks, then the two embedding tables
        if params > 10e9:
            raise ValueError(f"config.json describes {params:.2g} parameters; GPT-2 XL has 1.6e9 "
                             "and more than 1e10 is refused as a damaged file")
        config = GPTConfig(block_size=T, n_layer=L, n_head=H, n_embd=C, vocab_size=V,
                           dropout=dropout, bias=True)
        model = cls(config)
        state = model.state_dict()
        for key, tensor in tensors.items():
            key = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
            if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
                continue  # causal-mask buffers, and the head that is tied to wte anyway
            if key not in state or not isinstance(tensor, torch.Tensor):
                raise ValueError(f"unexpected parameter {key} for a GPT-2 model")
            if key.endswith(CONV1D_WEIGHTS):
                tensor = tensor.t()  # OpenAI's Conv1D stores (in, out); nn.Linear wants (out, in)
            if tensor.shape != state[key].shape:
                raise ValueError(f"{key} has shape {tuple(tensor.shape)}, config.json implies "
                                 f"{tuple(state[key].shape)}")
            state[key].copy_(tensor)
            state.pop(key)
        missing = [k for k in state if k != "lm_head.weight"]
        if missing:
            raise ValueError(f"weights missing for {missing[:3]} and others")
        return model

    @classmethod
    def from_pretrained(cls, name_or_path, dropout=0.0):
        """OpenAI's GPT-2, by hub name (gpt2 ... gpt2-xl) or folder, as nanoGPT's call gave it."""
        from training.safe_load import load_pretrained  # reads the files, given this class
        return load_pretrained(cls, name_or_path, dropout)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Draw one token id (B, 1) per row of logits (B, vocab_size); temperature 0 is greedy. top_k
    keeps the k likeliest tokens; top_p the fewest likeliest whose probabilities reach top_p."""
    # Below float32's smallest normal number a temperature scales every gap between logits
    # past float32's range, which is greedy decoding; it would also divide by zero in float32.
    if temperature < torch.finfo(torch.float32).tiny:
        return logits.argmax(dim=-1, keepdim=True)
    # The largest logit is made 0 first, so a small temperature sends the others towards -inf
    # rather than the largest to inf (softmax of inf is NaN).
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < logits.size(-1):
        values, indices = torch.topk(logits, top_k)
        logits = torch.full_like(logits, -float("inf")).scatter(-1, indices, values)
    if top_p is not None and top_p < 1.0:
        sorted_logits, indices = torch.sort(logits, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of all likelier tokens
        sorted_logits[mass_before >= top_p] = -float("inf")  # the top token always survives
        logits = torch.full_like(logits, -float("inf")).scatter(-1, indices, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


# OpenAI's GPT-2 stores these four weights transposed: its Conv1D layer is a Linear as (in, out).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                  "mlp.c_proj.weight")


def config_from_dict(d):
    """A GPTConfig from a dict holding its fields (and perhaps other keys)."""
    return GPTConfig(**{f.name: d[f.name] for f in fields(GPTConfig) if f.name in d})
