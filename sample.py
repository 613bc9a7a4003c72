"""Sample text from a trained checkpoint or from OpenAI's GPT-2.

    python sample.py                               # the model `python train.py` trained
    python sample.py --init_from=gpt2 --start="FILE:prompt.txt" --num_samples=1 --top_p=0.9
    python sample.py --prompts=prompts.txt --batch_size=8 --temperature=0

A single sample of --start is GPT.generate_tokens, streamed as it is drawn. Several, or
--prompts, go through the serving engine (serving/engine.py): up to batch_size rows at once in
a paged KV cache of kv_pages pages of page_size tokens, prompts that begin alike sharing their
pages, long prompts prefilled prefill_chunk tokens a step. Each text goes to stdout as soon as
it and those before it are done, a summary line to stderr at the end. A sample ends at GPT-2's
<|endoftext|>, which is not printed, or after max_new_tokens.
"""
import codecs
import errno
import json
import os
import sys
from dataclasses import dataclass

from training import process

process.limit_openmp_spin()  # before torch loads OpenMP, which reads it once

import torch  # noqa: E402

from data.tokenizer import TokenizerError, tokenizer_from_meta  # noqa: E402
from serving.batching import Request, new_generator, serve  # noqa: E402
from serving.engine import Engine, ServingError  # noqa: E402
from serving.loading import default_kv_pages, load_model  # noqa: E402
from training import accounting, runtime  # noqa: E402
from training.safe_load import CheckpointError  # noqa: E402
from training.settings import ConfigError, check_dtype, run_main  # noqa: E402


@dataclass
class SampleConfig:
    init_from: str = "resume"  # resume (the checkpoint in out_dir), gpt2*, or a weights folder
    out_dir: str = "out-shakespeare-char"  # with init_from=resume; `python train.py` writes here
    start: str = "\n"  # the prompt, or FILE:path to read it from a file
    prompts: str = ""  # a file of prompts instead, one a line (.jsonl: {"prompt": ...} a line)
    num_samples: int = 3  # samples drawn of each prompt
    batch_size: int = 8  # rows decoded together, at most; a finished row's place goes on at once
    page_size: int = 16  # tokens of keys and values per page of the KV cache
    kv_pages: int = 0  # pages in the KV cache; 0: block_size for each row, within half the memory
    prefill_chunk: int = 256  # tokens of a prompt prefilled per step, beside the others' decode
    max_new_tokens: int = 500  # tokens generated per sample
    temperature: float = 0.8  # 1.0 samples the model as is; lower is more conservative; 0 greedy
    top_k: int | None = 200  # keep only the k most likely tokens; none keeps all
    top_p: float = 1.0  # keep the most likely tokens whose probabilities sum to top_p
    seed: int = 1337  # the same seed gives the same samples
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto, float32, bfloat16 or float16
    compile: bool = False  # compile: serving/batching.py's slots, whose step has one shape

    def validate(self):
        """Reject values no sampling can use; the message names the setting."""
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be at least 1, got {self.num_samples}")
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # written so that nan fails too
            raise ConfigError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        for name in ("batch_size", "page_size", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.kv_pages < 0:
            raise ConfigError(f"kv_pages must be 0 (fit the memory) or more, got {self.kv_pages}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be at least 1 (or none), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        check_dtype(self.dtype)
        if not 0 <= self.seed < 2 ** 63:  # torch's generators take a signed 64-bit seed
            raise ConfigError(f"seed must be from 0 to 2**63 - 1, got {self.seed}")
        return self


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read the prompt file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"the prompt file {path} is not UTF-8 text: {e.reason} at byte "
                          f"{e.start}") from None


def read_prompts(path):
    """[(where, prompt)] of a file of prompts, one a line; in a .jsonl file each line is a JSON
    object whose "prompt" may hold several lines ("\n"). where names the file and line."""
    lines = read_text(path).removesuffix("\n").split("\n")  # a last newline starts no line
    if lines == [""]:
        raise ConfigError(f"the prompts file {path} holds no prompts")
    prompts = []
    for n, line in enumerate(lines, 1):
        where, line = f"{path}:{n}", line.removesuffix("\r")
        if path.endswith(".jsonl"):
            try:
                line = json.loads(line)["prompt"]
            # not JSON (or nested past Python's recursion limit), not an object, no "prompt"
            except (ValueError, KeyError, TypeError, RecursionError):
                line = None
            if not isinstance(line, str):
                raise ConfigError(f'{where}: expected a JSON object {{"prompt": "..."}}')
        elif not line:
            raise ConfigError(f"{where}: an empty line; each line is a prompt (write an empty "
                              'one in a .jsonl file: {"prompt": ""})')
        prompts.append((where, line))
    return prompts


def encode(tokenizer, prompt, where, block_size):
    """The token ids of prompt; ConfigError, naming where, for what the model cannot read."""
    try:
        ids = tokenizer.encode(prompt)
    except ValueError as e:  # a character the character-level vocabulary does not have
        raise ConfigError(f"{where}: {e}") from None
    if not ids:
        if tokenizer.eot_token is None:  # a character-level model starts from a character
            hint = "give one with --start" if where == "prompt" else "give it a character"
            raise ConfigError(f"{where}: the prompt is empty; {hint}")
        ids = [tokenizer.eot_token]  # GPT-2 starts documents after <|endoftext|>
    if len(ids) > block_size:
        print(f"note: {where}: its {len(ids)} tokens are cut to the model's last {block_size}",
              file=sys.stderr)
    return ids


def stream(tokenizer, tokens, out=sys.stdout):
    """Print one sample as its tokens (ids, or tensors of one) arrive; return their ids.

    Each token's bytes are decoded once, as they come, so a long sample costs no more per
    token than a short one. A token may end partway through a multi-byte character (an emoji is
    several GPT-2 tokens): the incremental decoder holds those bytes back until the character
    is complete, and prints U+FFFD for bytes that never make one, as decode() does."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    ids = []
    for token in tokens:
        ids.append(int(token))
        out.write(decoder.decode(tokenizer.token_bytes(ids[-1])))
        out.flush()
    out.write(decoder.decode(b"", final=True) + "\n")
    return ids


def sampling_memory(m, rows, kv_tokens, samples, prompt_tokens, new_tokens, dtype_bytes=4):
    """(device bytes, host bytes) that sampling needs beyond the weights, an estimate. On the
    device: the KV cache, kv_tokens positions of keys and values in every layer (the engine's
    pool, or block_size for each of serving/batching.py's slots); per row decoded together (at
    most the samples): the activations of the prompt it prefills, one layer at a time (34 *
    n_embd bytes a token in 16 bits, as in accounting.memory_per_rank); the last position's
    logits with the copies that sampling makes of them (probabilities, sorted for top-k and
    top-p: 4 fp32 copies); its generator (~2.7 KB on a CPU: 4 KiB counted), made when the row
    starts. On the host, every sample's tokens and text, kept until printed: about 64 bytes a
    token as Python objects, and 1 KiB for its request, list and text (measured: ~750 bytes a
    sample of 2 tokens)."""
    T = min(prompt_tokens, m.block_size)
    per_row = T * 34 * m.n_embd * dtype_bytes // 2 + 4 * 4 * m.vocab_size + 4096
    kv = accounting.kv_cache_bytes(m, kv_tokens, dtype_bytes)
    return kv + rows * per_row, samples * (64 * (prompt_tokens + new_tokens) + 1024)


def check_sampling_memory(m, rows, kv_tokens, samples, prompt_tokens, new_tokens, device,
                          dtype):
    """Refuse, before anything is allocated, to sample more than the memory holds: the weights,
    the KV cache and the rows on the device, the samples' text on the host (the same memory on
    a CPU)."""
    on_device, on_host = sampling_memory(m, rows, kv_tokens, samples, prompt_tokens,
                                         new_tokens, dtype.itemsize)
    on_device += 4 * accounting.num_params(m, non_embedding=False)
    needs = ([(on_device + on_host, device)] if device == "cpu"
             else [(on_device, device), (on_host, "cpu")])
    for need, where in needs:
        have = runtime.device_memory(where)
        if have and need > have:
            raise ConfigError(f"sampling {samples:,} sequences, {rows:,} at a time, needs about "
                              f"{need / 2**30:,.1f} GiB on {where} (sample.sampling_memory), "
                              f"more than its {have / 2**30:,.1f} GiB: lower num_samples, "
                              "batch_size or kv_pages")


def sample(cfg, out=sys.stdout, err=sys.stderr):
    """Draw cfg.num_samples samples of each prompt; print them to out, return them as strings.
    Several samples print a summary line to err."""
    device = runtime.pick_device(cfg.device)
    dtype = runtime.pick_dtype(cfg.dtype, device)
    model, meta, _ = load_model(cfg.init_from, cfg.out_dir)  # refuses non-finite weights
    tokenizer = tokenizer_from_meta(meta)
    model.eval().to(device)
    m = model.config
    start = read_text(cfg.start[5:]) if cfg.start.startswith("FILE:") else cfg.start
    prompts = read_prompts(cfg.prompts) if cfg.prompts else [("prompt", start)]
    ids = [encode(tokenizer, text, where, m.block_size) for where, text in prompts]
    samples = len(ids) * cfg.num_samples
    rows = min(cfg.batch_size, samples)  # what is allocated: no row without a sample
    kv_pages = cfg.kv_pages or default_kv_pages(m, rows, cfg.page_size, device, dtype)
    simple = samples == 1 and not cfg.prompts  # one sample of --start: generate_tokens
    kv_tokens = rows * m.block_size if cfg.compile or simple else kv_pages * cfg.page_size
    check_sampling_memory(m, rows, kv_tokens, samples, max(map(len, ids)), cfg.max_new_tokens,
                          device, dtype)
    # Sample k of the output draws from its own generator, seeded seed + k: its text does not
    # depend on batch_size, nor on which rows shared its steps, and the same seed repeats it.
    requests = [Request(ids[k // cfg.num_samples], cfg.max_new_tokens, (cfg.seed + k) % 2 ** 64)
                for k in range(samples)]
    sampling = (cfg.temperature, cfg.top_k, cfg.top_p)
    with runtime.autocast(device, dtype):
        if simple:  # model.py's own sampler, streamed
            generator = new_generator(requests[0].seed, device)
            drawn = model.generate_tokens(torch.tensor([ids[0]], device=device),
                                          cfg.max_new_tokens, temperature=cfg.temperature,
                                          top_k=cfg.top_k, top_p=cfg.top_p, generator=generator)
            out.write(prompts[0][1])
            new = [stream(tokenizer, until(drawn, tokenizer.eot_token), out)]
        else:
            new, engine = [[] for _ in requests], None
            if cfg.compile:
                drawn = serve(model, requests, rows, *sampling, tokenizer.eot_token, True)
            else:
                try:
                    engine = Engine(model, requests, rows, cfg.page_size, kv_pages,
                                    cfg.prefill_chunk, *sampling, tokenizer.eot_token)
                except ServingError as e:  # name the prompt: requests are samples
                    where = prompts[e.request // cfg.num_samples][0]
                    raise ConfigError(f"{where}: {e}") from None
                drawn = engine.run()
            texts, ended = [], engine.ended if engine else ()

            def show(k):  # sample k's text, printed in the order of the samples
                texts.append(prompts[k // cfg.num_samples][1] + tokenizer.decode(new[k]))
                out.write(texts[-1] + "\n---------------\n")
                out.flush()
            for k, token in drawn:
                new[k].append(token)
                while len(texts) in ended:  # each as soon as it, and those before it, end
                    show(len(texts))
            for k in range(len(texts), len(requests)):
                show(k)
            if engine is not None:
                print(engine.summary(), file=err)
            return texts
    return [prompts[0][1] + tokenizer.decode(new[0])]


def until(tokens, eot):
    """tokens (tensors of one id) up to, not including, the first eot (None: all of them)."""
    for token in tokens:
        if int(token) == eot:
            return
        yield token


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run_main(SampleConfig, sample, argv, __doc__,
                        (CheckpointError, TokenizerError, runtime.DeviceError))
    except BrokenPipeError:  # the reader left (python sample.py | head): done, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for exit's flush
        return 0
    except OSError as e:  # the output cannot be written: a full disk, /dev/full
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        print(f"error: cannot write the samples: {e.strerror}", file=sys.stderr)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for exit's flush
        return 2


if __name__ == "__main__":
    sys.exit(main())
