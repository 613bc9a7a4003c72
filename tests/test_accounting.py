"""accounting.py against figures worked out by hand for GPT-2 124M, and against the model."""
from pathlib import Path

import pytest
import torch

import accounting
import runtime
from config import TrainConfig, parse_config
from model import GPT, GPTConfig

CONFIGS = Path(__file__).resolve().parent.parent / "config"

# GPT-2 124M as OpenAI shipped it: vocabulary 50257 (unpadded), biases on.
GPT2 = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257,
                 bias=True)
# config/train_gpt2.toml's run: 12 sequences x 1024 tokens x 40 micro-steps, 600k iterations.
RUN = TrainConfig(batch_size=12, block_size=1024, gradient_accumulation_steps=40,
                  max_iters=600_000, dtype="bfloat16")


def test_gpt2_parameters_by_hand():
    # wte  50257 * 768                                = 38,597,376 (also lm_head: once)
    # wpe   1024 * 768                                =    786,432
    # one block: 12 * 768^2 weights                   =  7,077,888
    #   + 13 * 768: ln_1, ln_2 weight and bias (4C), c_attn bias 3C, attn.c_proj bias C,
    #     c_fc bias 4C, mlp.c_proj bias C             =      9,984
    #   = 7,087,872; twelve blocks                    = 85,054,464
    # ln_f weight and bias 2 * 768                    =      1,536
    # total 38,597,376 + 786,432 + 85,054,464 + 1,536 = 124,439,808
    # without wpe: 124,439,808 - 786,432             = 123,653,376
    assert accounting.num_params(GPT2, non_embedding=False) == 124_439_808
    assert accounting.num_params(GPT2) == 123_653_376


def test_gpt2_flops_and_tokens_by_hand():
    # 6N = 6 * 123,653,376                            =   741,920,256
    # 12 * n_layer * n_embd * T = 12 * 12 * 768 * 1024 =  113,246,208
    # FLOPs per token                                 =   855,166,464
    assert accounting.flops_per_token(GPT2, 1024) == 855_166_464
    # tokens per iteration: 12 * 1024 * 40            =       491,520
    assert accounting.tokens_per_iter(RUN) == 491_520
    # total: 855,166,464 * 491,520 * 600,000 = 855,166,464 * 294,912,000,000
    #      = 252,198,852,231,168,000,000 (about 2.52e20)
    assert accounting.total_flops(RUN, GPT2) == 252_198_852_231_168_000_000


def test_gpt2_estimate_on_8_a100_by_hand():
    # 8 A100 at 40% of 312 TFLOP/s: 8 * 312e12 * 0.4 = 9.984e14 FLOP/s
    # 2.52198852e20 / 9.984e14 = 252,603 s = 70.17 h = 2.92 days; 8 GPUs: 561.3 GPU-hours
    # energy at the SXM board's 400 W: 561.34 h * 0.4 kW = 224.54 kWh, printed as 225
    table = accounting.estimate(RUN, 8, GPT2, mfu=0.4)
    a100 = next(line for line in table.splitlines() if line.startswith("A100"))
    assert a100.split() == ["A100", "bfloat16", "312", "400", "2.9", "days", "561", "225"]
    assert accounting.BOARD_WATTS["A100"] == 400


def test_estimate_lists_every_board_with_its_power():
    assert set(accounting.BOARD_WATTS) == set(accounting.PEAK_FLOPS)
    rows = accounting.estimate(RUN, 1, GPT2).splitlines()[3:]
    assert [row.split()[0] for row in rows] == [b.split()[0] for b in accounting.PEAK_FLOPS]
    assert "float16" in next(row for row in rows if row.startswith("V100"))  # no bfloat16
    with pytest.raises(ValueError, match="mfu"):
        accounting.estimate(RUN, 1, GPT2, mfu=0)


def test_gpt2_memory_by_hand():
    # weights, gradients, AdamW's two moments: 4 + 4 + 8 bytes * 124,439,808 parameters
    # activations, bfloat16: 12 layers * (12 * 1024 tokens) * 34 * 768 bytes = 3,850,371,072
    # logits: 12 * 1024 tokens * 50257 * 10 bytes = 6,175,580,160
    parts = accounting.memory_per_rank(RUN, GPT2, world_size=1)
    assert parts == {"weights": 497_759_232, "gradients": 497_759_232,
                     "optimizer state": 995_518_464, "activations": 3_850_371_072,
                     "logits": 6_175_580_160}
    assert accounting.memory_per_rank(RUN, GPT2, world_size=8)["DDP buckets"] == 497_759_232


@pytest.mark.parametrize("shape", [
    dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, bias=True),
    dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, bias=False),
    dict(n_layer=3, n_head=4, n_embd=64, block_size=40, vocab_size=320, bias=False),
    # later practice: no position table with rope
    dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, bias=True, rope=True,
         qk_norm=True, relu2=True),
    dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, bias=False, rope=True),
])
def test_counts_on_the_meta_device_match_a_real_model(shape):
    config = GPTConfig(**shape)
    model = GPT(config)
    assert (accounting.num_params(config, non_embedding=False)
            == sum(p.numel() for p in model.parameters())
            == model.num_params(non_embedding=False))
    assert accounting.num_params(config) == model.num_params(non_embedding=True)
    assert accounting.flops_per_token(config, 12) == model.flops_per_token(12)


def test_padded_vocab_size():
    assert accounting.padded_vocab_size(50257) == 50304
    assert accounting.padded_vocab_size(50304) == 50304
    assert accounting.padded_vocab_size(65) == 65  # a character vocabulary stays as it is


def test_report_for_the_gpt2_run():
    cfg = parse_config(TrainConfig, [str(CONFIGS / "train_gpt2.toml")]).validate()
    model_config = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024,
                             vocab_size=accounting.padded_vocab_size(50257), bias=cfg.bias)
    text = accounting.report(cfg, 8, model_config)
    assert "491,520" in text and "over 8 process(es)" in text and "600,000" in text
    assert f"{accounting.num_params(model_config, non_embedding=False):,}" in text
    assert "DDP buckets" in text
    with pytest.raises(ValueError, match="model_config"):
        accounting.report(cfg, 1)  # TrainConfig alone does not know the vocabulary


def test_memory_is_float32_on_the_cpu_config():
    cfg = parse_config(TrainConfig, [str(CONFIGS / "train_shakespeare_char_cpu.toml")])
    small = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65)
    # dtype auto on device cpu is float32: 68 bytes per n_embd, twice the 16-bit 34
    acts = accounting.memory_per_rank(cfg, small)["activations"]
    assert acts == 4 * (12 * 64) * 68 * 128
    assert torch.float32 == runtime.pick_dtype(cfg.dtype, cfg.device)


def test_train_estimate_prints_the_cost_and_trains_nothing(tmp_path, capsys):
    import train
    config = Path(__file__).resolve().parent.parent / "config" / "train_gpt2.toml"
    out = tmp_path / "out"
    assert train.main([str(config), "--estimate", "--estimate_gpus=8", "--estimate_mfu=0.4",
                       f"--out_dir={out}", f"--data_dir={tmp_path / 'none'}"]) == 0
    text = capsys.readouterr().out
    assert "assuming GPT-2's vocabulary" in text  # no dataset prepared: 50257, padded
    assert "2.52e+20 FLOPs" in text and "on 8 GPU(s) at 40% MFU" in text
    assert any(line.startswith("A100") and "2.9 days" in line for line in text.splitlines())
    assert not out.exists()  # nothing written, nothing trained
