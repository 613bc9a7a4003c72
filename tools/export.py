"""Export a checkpoint as the folder transformers' GPT2LMHeadModel.save_pretrained writes.

    python -m tools.export --out_dir=out-shakespeare-char --hf_dir=hf-shakespeare-char

GPT2LMHeadModel.from_pretrained("hf-shakespeare-char") then gives the same logits as our model,
and `--init_from=hf-shakespeare-char` loads it back in train.py and sample.py. The folder holds
config.json and model.safetensors (float32); a model trained with GPT-2's tokenizer also gets
vocab.json and merges.txt, so that transformers' pipelines work with it offline. transformers
has no character tokenizer, so a character model gets our meta.json instead.

GPT-2 has biases, learned positions, GELU and plain attention. A model trained without biases
exports with zero biases, which compute the same; one trained with rope, qk_norm or relu2 has
no GPT-2 equivalent and is refused before anything is written.
"""
import json
import os
import sys
from dataclasses import dataclass, replace

import torch

from data.tokenizer import EOT, GPT2Tokenizer, bytes_to_unicode, gpt2_merges
from model import CONV1D_WEIGHTS, config_from_dict
from training import accounting
from training.safe_load import CheckpointError, load_checkpoint
from training.settings import ConfigError, run_main


@dataclass
class ExportConfig:
    out_dir: str = "out"  # the run whose checkpoint (out_dir/ckpt.pt) is exported
    hf_dir: str = ""  # the folder to write; it must be new or empty
    overwrite: bool = False  # allow writing over the files in a folder that is not empty

    def validate(self):
        if not self.hf_dir:
            raise ConfigError("give the folder to write with --hf_dir=FOLDER")
        return self


class ExportError(ValueError):
    """A model or a folder that cannot be exported; nothing has been written."""


# The options of ours that GPT-2's architecture has no place for, and what it has instead.
NOT_IN_GPT2 = {"rope": "a learned table of positions", "qk_norm": "no norm on queries and keys",
               "relu2": "a GELU MLP"}


def gpt2_state_dict(state, config):
    """Our parameters under the names, shapes and order that save_pretrained writes: the tied
    lm_head left out (transformers ties it to wte again), Conv1D weights transposed, and the
    biases of a model trained without them as zeros. Every tensor is float32."""
    try:  # on a model of shapes only (no memory), torch names any tensor missing or misshapen
        accounting.shape_model(config).load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"the checkpoint's weights do not fit its model_args: "
                              f"{' '.join(str(e).split())[:300]}") from None
    gpt2 = accounting.shape_model(replace(config, bias=True)).state_dict()
    out = {}
    for key, like in sorted(gpt2.items()):
        if key == "lm_head.weight":
            continue
        tensor = state[key].float() if key in state else torch.zeros(like.shape)
        # OpenAI's Conv1D stores (in, out) where our nn.Linear has (out, in).
        out[key] = (tensor.t() if key.endswith(CONV1D_WEIGHTS) else tensor).contiguous()
    return out


def hf_config(config, eos_token):
    """config.json as save_pretrained writes it for a GPT2LMHeadModel of this shape."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size,  # padded as trained; the tokenizer never emits the pad
        "n_positions": config.block_size, "n_ctx": config.block_size,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",  # GELU's tanh approximation, as nn.GELU("tanh")
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout, "initializer_range": 0.02, "scale_attn_weights": True,
        "tie_word_embeddings": True, "bos_token_id": eos_token, "eos_token_id": eos_token,
        "dtype": "float32",
    }


def write_safetensors(tensors, path):
    """Write {name: tensor} in the safetensors format: the header's length in 8 little-endian
    bytes, a JSON header giving each tensor's dtype, shape and byte range, then the raw bytes.
    The header is padded with spaces to a multiple of 8 bytes, as the reference writer pads
    it, so that every tensor starts aligned."""
    assert sys.byteorder == "little", "tensors are written in the machine's byte order"
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, tensor in tensors.items():
        assert tensor.dtype == torch.float32, f"{name} is {tensor.dtype}, not float32"
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for tensor in tensors.values():
            f.write(tensor.numpy().tobytes())


def gpt2_vocab():
    """GPT-2's vocab.json (its encoder.json): each token's bytes, spelled with GPT-2's printable
    stand-ins for bytes, mapped to its id. Read from the vocabulary our tokenizer uses (GPT2_VOCAB
    or tiktoken's cache), so no download is needed where training needed none."""
    try:
        encoding = GPT2Tokenizer().encoding
    except (RuntimeError, OSError, ValueError) as e:
        raise ExportError(f"vocab.json needs GPT-2's vocabulary: {e}") from None
    spell = bytes_to_unicode()
    vocab = {"".join(spell[b] for b in encoding.decode_single_token_bytes(i)): i
             for i in range(GPT2Tokenizer.eot_token)}
    vocab[EOT] = GPT2Tokenizer.eot_token
    return vocab


def export(cfg):
    """Write cfg.out_dir's checkpoint to cfg.hf_dir; every check comes before the first write."""
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
    try:
        config, meta = config_from_dict(ckpt["model_args"]), ckpt["meta"]
        gpt2_tokenizer = meta["tokenizer"] == "gpt2"
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg.out_dir}/ckpt.pt lacks {e} (not this project's)") from None
    for name, instead in NOT_IN_GPT2.items():
        if getattr(config, name):
            raise ExportError(f"{name}=true: GPT-2's architecture has {instead}, so "
                              "transformers' GPT2LMHeadModel cannot hold this model; nothing "
                              "was written")
    if os.path.isdir(cfg.hf_dir) and os.listdir(cfg.hf_dir) and not cfg.overwrite:
        raise ExportError(f"{cfg.hf_dir} is not empty: choose a new folder, or pass "
                          "--overwrite=true to write over its files")
    if os.path.exists(cfg.hf_dir) and not os.path.isdir(cfg.hf_dir):
        raise ExportError(f"{cfg.hf_dir} is a file, not a folder")
    tensors = gpt2_state_dict(ckpt["model"], config)
    vocab = gpt2_vocab() if gpt2_tokenizer else None

    os.makedirs(cfg.hf_dir, exist_ok=True)
    with open(os.path.join(cfg.hf_dir, "config.json"), "w") as f:
        eos = GPT2Tokenizer.eot_token if gpt2_tokenizer else None
        json.dump(hf_config(config, eos), f, indent=2)
    write_safetensors(tensors, os.path.join(cfg.hf_dir, "model.safetensors"))
    if gpt2_tokenizer:
        with open(os.path.join(cfg.hf_dir, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(cfg.hf_dir, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in gpt2_merges(vocab)))
    else:
        with open(os.path.join(cfg.hf_dir, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, ensure_ascii=False)
    print(f"wrote {cfg.hf_dir}: {', '.join(sorted(os.listdir(cfg.hf_dir)))}")
    print(f"load it with transformers.GPT2LMHeadModel.from_pretrained({cfg.hf_dir!r}), or "
          f"here with --init_from={cfg.hf_dir} (train.py, sample.py)")
    if not gpt2_tokenizer:
        print(f"note: transformers has no tokenizer for this {meta['tokenizer']}-level model; "
              f"its {meta['vocab_size']} tokens are in meta.json, which sample.py reads")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return run_main(ExportConfig, export, argv, __doc__, (CheckpointError, ExportError))


if __name__ == "__main__":
    sys.exit(main())
