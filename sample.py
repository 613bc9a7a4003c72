"""Sample text from a trained checkpoint or from OpenAI's GPT-2.

    python sample.py                               # the model `python train.py` trained
    python sample.py --init_from=gpt2 --start="FILE:prompt.txt" --num_samples=1 --top_p=0.9

Several samples are drawn together as one batch; a single sample streams as it is drawn.
"""
import codecs
import os
import sys
from dataclasses import dataclass

import torch

import runtime
from checkpoint import CheckpointError, load_model
from config import ConfigError, check_dtype, run_main
from tokenizer import TokenizerError, tokenizer_from_meta


@dataclass
class SampleConfig:
    init_from: str = "resume"  # resume (the checkpoint in out_dir), gpt2*, or a weights folder
    out_dir: str = "out-shakespeare-char"  # with init_from=resume; `python train.py` writes here
    start: str = "\n"  # the prompt, or FILE:path to read it from a file
    num_samples: int = 3  # samples drawn together as one batch
    max_new_tokens: int = 500  # tokens generated per sample
    temperature: float = 0.8  # 1.0 samples the model as is; lower is more conservative; 0 greedy
    top_k: int | None = 200  # keep only the k most likely tokens; none keeps all
    top_p: float = 1.0  # keep the most likely tokens whose probabilities sum to top_p
    seed: int = 1337  # the same seed gives the same samples
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto, float32, bfloat16 or float16

    def validate(self):
        """Reject values no sampling can use; the message names the setting."""
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be at least 1, got {self.num_samples}")
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # written so that nan fails too
            raise ConfigError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be at least 1 (or none), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        check_dtype(self.dtype)
        return self


def read_prompt(start):
    if not start.startswith("FILE:"):
        return start
    path = start.removeprefix("FILE:")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read the prompt file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"the prompt file {path} is not UTF-8 text: {e.reason} at byte "
                          f"{e.start}") from None


def stream(tokenizer, tokens, out=sys.stdout):
    """Print one sample as its tokens (each of shape (1, 1)) arrive; return their ids.

    Each token's bytes are decoded once, as they come, so a long sample costs no more per
    token than a short one. A token may end partway through a multi-byte character (an emoji is
    several GPT-2 tokens): the incremental decoder holds those bytes back until the character
    is complete, and prints U+FFFD for bytes that never make one, as decode() does."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    ids = []
    for token in tokens:
        ids.append(token.item())
        out.write(decoder.decode(tokenizer.token_bytes(ids[-1])))
        out.flush()
    out.write(decoder.decode(b"", final=True) + "\n")
    return ids


def sample(cfg, out=sys.stdout):
    """Draw cfg.num_samples samples; print them to out and return them as strings."""
    device = runtime.pick_device(cfg.device)
    dtype = runtime.pick_dtype(cfg.dtype, device)
    if cfg.init_from == "resume" and not any(
            os.path.isfile(os.path.join(cfg.out_dir, name)) for name in ("ckpt.pt", "last.pt")):
        raise CheckpointError(f"no checkpoint in {cfg.out_dir}: train one first: python "
                              f"train.py --out_dir={cfg.out_dir}")
    model, meta, _ = load_model(cfg.init_from, cfg.out_dir)  # refuses non-finite weights
    tokenizer = tokenizer_from_meta(meta)
    model.eval().to(device)
    prompt = read_prompt(cfg.start)
    try:
        ids = tokenizer.encode(prompt)
    except ValueError as e:  # a character the character-level vocabulary does not have
        raise ConfigError(f"prompt: {e}") from None
    if not ids:
        if tokenizer.eot_token is None:
            raise ConfigError("the prompt is empty; give one with --start")
        ids = [tokenizer.eot_token]  # GPT-2 starts documents after <|endoftext|>
    if len(ids) > model.config.block_size:
        print(f"note: the prompt's {len(ids)} tokens are cut to the model's last "
              f"{model.config.block_size}", file=sys.stderr)
    idx = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    options = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                   generator=gen)
    with runtime.autocast(device, dtype):
        if cfg.num_samples == 1:
            out.write(prompt)
            new = [stream(tokenizer, model.generate_tokens(idx, cfg.max_new_tokens, **options),
                          out)]
        else:
            new = model.generate(idx, cfg.max_new_tokens, **options)[:, len(ids):].tolist()
    texts = [prompt + tokenizer.decode(row) for row in new]
    if cfg.num_samples > 1:
        for text in texts:
            out.write(text + "\n---------------\n")
    return texts


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return run_main(SampleConfig, sample, argv, __doc__,
                    (CheckpointError, TokenizerError, runtime.DeviceError))


if __name__ == "__main__":
    sys.exit(main())
