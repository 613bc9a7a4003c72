"""Sample text from a trained checkpoint or from OpenAI's GPT-2.

    python sample.py --out_dir=out-shakespeare-char
    python sample.py --init_from=gpt2 --start="FILE:prompt.txt" --num_samples=1 --top_p=0.9

Several samples are drawn together as one batch; a single sample streams as it is drawn.
"""
import json
import os
import sys
from dataclasses import dataclass

import torch

import runtime
from checkpoint import CheckpointError, load_checkpoint, load_pretrained
from config import ConfigError, run_main
from model import GPT, config_from_dict
from tokenizer import GPT2Tokenizer, tokenizer_from_meta


@dataclass
class SampleConfig:
    init_from: str = "resume"  # resume (the checkpoint in out_dir), gpt2*, or a weights folder
    out_dir: str = "out"  # where the checkpoint is, with init_from=resume
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
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, "
                              f"got {self.dtype!r}")
        return self


def load_model(cfg):
    """The model and its tokenizer, from out_dir's checkpoint or from OpenAI's weights.

    Any failure is a CheckpointError that names where the model was to come from."""
    if cfg.init_from != "resume":
        # export.py writes a character model's vocabulary beside its weights as meta.json.
        meta_path = os.path.join(cfg.init_from, "meta.json")
        if not os.path.isfile(meta_path):
            return load_pretrained(cfg.init_from), GPT2Tokenizer()
        try:
            with open(meta_path, encoding="utf-8") as f:
                tokenizer = tokenizer_from_meta(json.load(f))
        except (OSError, ValueError, KeyError) as e:  # JSON errors are ValueErrors
            raise CheckpointError(f"{meta_path}: cannot read the tokenizer: {e}") from None
        return load_pretrained(cfg.init_from), tokenizer
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path)
    try:
        model = GPT(config_from_dict(ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        return model, tokenizer_from_meta(ckpt["meta"])
    except (ValueError, RuntimeError, KeyError) as e:  # a checkpoint of another project
        reason = " ".join(str(e).split())  # one line, even for load_state_dict's list
        raise CheckpointError(f"{path}: cannot load this checkpoint: {reason}") from None


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

    A token may end partway through a multi-byte character, so text is printed only up to
    the last complete character."""
    ids, shown = [], 0
    for token in tokens:
        ids.append(token.item())
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):
            out.write(text[shown:])
            out.flush()
            shown = len(text)
    out.write(tokenizer.decode(ids)[shown:] + "\n")
    return ids


def sample(cfg, out=sys.stdout):
    """Draw cfg.num_samples samples; print them to out and return them as strings."""
    device = runtime.pick_device(cfg.device)
    dtype = runtime.pick_dtype(cfg.dtype, device)
    model, tokenizer = load_model(cfg)
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
    return run_main(SampleConfig, sample, argv, __doc__, (CheckpointError, runtime.DeviceError))


if __name__ == "__main__":
    sys.exit(main())
