"""The GPT-2 language model, its key/value-cached sampler, and OpenAI weight loading.

The parts come in the order they build on each other: attention, MLP, Block, GPT. Parameter
names are GPT-2's own, so OpenAI's checkpoints map one to one (after transposing their Conv1D
weights). This file depends on torch alone.
"""
import json
import math
import os
import pickle
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context the model can attend over
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # 0 for pretraining, 0.1+ for finetuning small data
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2 has
    # Later practice, each off by default so that the model stays GPT-2 (docs/benchmarks.md
    # has what each one measured on the CPU recipe).
    rope: bool = False  # rotary position embeddings in attention, instead of a learned table
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attention
    relu2: bool = False  # ReLU squared instead of GELU in the MLP


class KVCache:
    """Keys and values of the tokens seen so far, for one attention layer."""

    def __init__(self, max_len):
        self.max_len, self.length = max_len, 0
        self.k = self.v = None

    def append(self, k, v):
        """Store k, v of shape (B, nh, T, hs); return all keys and values so far."""
        if self.k is None:  # allocate on first use, in the dtype autocast gave k and v
            B, nh, _, hs = k.shape
            self.k = k.new_zeros(B, nh, self.max_len, hs)
            self.v = v.new_zeros(B, nh, self.max_len, hs)
        start, end = self.length, self.length + k.size(2)
        assert end <= self.max_len, "KV cache overflow: the caller must refill it"
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def apply_rotary(x, cos, sin):
    """Rotate pairs of channels of x (B, nh, T, hs) by position-dependent angles (T, hs/2):
    a query and a key then score by their relative position alone (Su et al., 2021)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm

    def forward(self, x, rotary=None, kv_cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = [t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in (q, k, v)]  # (B, nh, T, hs)
        if self.qk_norm:
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        # Without a cache, or when filling an empty one, token t sees tokens <= t. A cached
        # step feeds one new token, which sees every token stored before it: no mask needed.
        is_causal = kv_cache is None or kv_cache.length == 0
        if kv_cache is not None:
            assert is_causal or T == 1, "cached decoding feeds one token at a time"
            k, v = kv_cache.append(k, v)  # (B, nh, T_total, hs)
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2's GELU is the tanh approximation; ReLU squared is the cheaper later choice.
        self.gelu = ReLUSquared() if config.relu2 else nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class ReLUSquared(nn.Module):
    def forward(self, x):
        return F.relu(x).square()


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
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
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
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

    def hidden_states(self, idx, kv_caches=None):
        """The final norm's activations (B, T, n_embd) for token ids idx (B, T).

        With kv_caches (one KVCache per layer), idx continues the tokens already cached."""
        B, T = idx.size()
        start = 0 if kv_caches is None else kv_caches[0].length
        assert start + T <= self.config.block_size, (
            f"sequence of length {start + T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x, rotary = self.transformer.wte(idx), None
        if self.config.rope:
            rotary = (self.rope_cos[pos], self.rope_sin[pos])
        else:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rotary, None if kv_caches is None else kv_caches[i])
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        """Return (logits (B, T, vocab_size), mean cross-entropy or None); targets -1 ignored."""
        logits = self.lm_head(self.hidden_states(idx))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1),
                                   ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW decaying the 2-D weights (matmuls, embeddings) but not biases or norms."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # The fused kernel updates every parameter in one launch; CUDA and the CPU have it.
        fused = device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token: 6 per parameter plus attention's score and value matmuls.

        Follows the PaLM paper's appendix B: 6N + 12 * n_layer * n_embd * seq_len."""
        cfg = self.config
        seq_len = seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * seq_len

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        generator=None):
        """Yield max_new_tokens next tokens, each of shape (B, 1), continuing idx (B, T).

        The prompt is processed once and its keys and values cached; each later step feeds one
        token. Once the sequence outgrows block_size, every cached key and value is stale: it
        was computed at a position that has shifted, and (past the first layer) from tokens
        that have left the window. So the cache is rebuilt on the last block_size tokens at
        every step from then on: the result is exactly what recomputing the cropped context
        gives, at the same cost."""
        cfg = self.config
        caches = None
        for _ in range(max_new_tokens):
            if caches is None or caches[0].length == cfg.block_size:
                context = idx[:, -cfg.block_size:]
                caches = [KVCache(cfg.block_size) for _ in range(cfg.n_layer)]
            else:
                context = idx[:, -1:]
            logits = self.lm_head(self.hidden_states(context, caches)[:, -1, :])
            idx_next = sample_next(logits, temperature, top_k, top_p, generator)
            idx = torch.cat((idx, idx_next), dim=1)
            yield idx_next

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 generator=None):
        """Return idx (B, T) followed by max_new_tokens sampled tokens; temperature 0 is greedy."""
        new = list(self.generate_tokens(idx, max_new_tokens, temperature, top_k, top_p,
                                        generator))
        return torch.cat([idx] + new, dim=1)

    @torch.no_grad()
    def generate_uncached(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                          generator=None):
        """The textbook loop: rerun the whole (cropped) context for every new token.

        Kept as the reference that tests and benchmarks compare the cached sampler with."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            idx_next = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    @classmethod
    def from_pretrained(cls, name_or_path, dropout=0.0):
        """Load OpenAI's GPT-2 weights: a hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl)
        or a local directory with config.json and model.safetensors or pytorch_model.bin."""
        folder = name_or_path if os.path.isdir(name_or_path) else _download_gpt2(name_or_path)
        with open(os.path.join(folder, "config.json")) as f:
            hf = json.load(f)
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                           dropout=dropout, bias=True)
        model = cls(config)
        state = model.state_dict()
        for key, tensor in _read_weights(folder).items():
            # The hub's files name parameters "h.0...", save_pretrained's "transformer.h.0...".
            key = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
            if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
                continue  # causal-mask buffers, and the head that is tied to wte anyway
            if key not in state:
                raise ValueError(f"{folder}: unexpected parameter {key} for a GPT-2 model")
            if key.endswith(CONV1D_WEIGHTS):
                tensor = tensor.t()  # OpenAI's Conv1D stores (in, out); nn.Linear wants (out, in)
            if tensor.shape != state[key].shape:
                raise ValueError(f"{folder}: {key} has shape {tuple(tensor.shape)}, "
                                 f"config.json implies {tuple(state[key].shape)}")
            state[key].copy_(tensor)
            state.pop(key)
        missing = [k for k in state if k != "lm_head.weight"]
        if missing:
            raise ValueError(f"{folder}: weights missing for {missing[:3]} and others")
        return model


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Draw one token id per row of logits (B, vocab_size); returns (B, 1).

    temperature 0 takes the most likely token. top_k keeps the k most likely tokens; top_p
    keeps the smallest set of most likely tokens whose probabilities sum to at least top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
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


GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                   "mlp.c_proj.weight")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F64": torch.float64, "I64": torch.int64, "U8": torch.uint8,
                       "BOOL": torch.bool}


def _download_gpt2(name):
    """Fetch a GPT-2 size from the Hugging Face hub; return the local folder."""
    if name not in GPT2_SIZES:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(GPT2_SIZES)} "
                         "or a directory holding config.json and model.safetensors")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ImportError(f"downloading {name} needs huggingface_hub (pip install "
                          "huggingface_hub), or pass a local directory of its files") from e
    return snapshot_download(name, allow_patterns=["config.json", "model.safetensors"])


def _read_weights(folder):
    """Tensors from model.safetensors or pytorch_model.bin, neither able to run code."""
    path = os.path.join(folder, "model.safetensors")
    if os.path.exists(path):
        return read_safetensors(path)
    path = os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(path):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # it asks for a class or function, or is damaged
            raise ValueError(f"{path}: refused to load: it is not a file of plain tensors "
                             "(it may be damaged, or carry code)") from None
    raise FileNotFoundError(f"{folder} holds neither model.safetensors nor pytorch_model.bin")


def read_safetensors(path):
    """Parse a .safetensors file: an 8-byte header length, a JSON header, then raw tensors.

    The format holds data only, so reading it needs no trust, and no extra package."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    n = int.from_bytes(data[:8], "little")
    if len(data) < 8 + n:
        raise ValueError(f"{path}: truncated safetensors header")
    header = json.loads(data[8:8 + n])
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = (8 + n + offset for offset in info["data_offsets"])
        if info["dtype"] not in _SAFETENSORS_DTYPES or end > len(data):
            raise ValueError(f"{path}: tensor {key} is truncated or of unknown dtype")
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        flat = torch.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                offset=begin) if end > begin else torch.empty(0, dtype=dtype)
        tensors[key] = flat.view(info["shape"])
    return tensors


def config_from_dict(d):
    """A GPTConfig from a dict holding its fields (and perhaps other keys)."""
    return GPTConfig(**{f.name: d[f.name] for f in fields(GPTConfig) if f.name in d})
