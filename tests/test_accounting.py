"""accounting.py against figures worked out by hand for GPT-2 124M, and against the model."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from model import GPT, GPTConfig
from tools import estimate
from training import accounting, runtime
from training.settings import TrainConfig, parse_config

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
    table = estimate.cost(RUN, 8, GPT2, mfu=0.4)
    a100 = next(line for line in table.splitlines() if line.startswith("A100"))
    assert a100.split() == ["A100", "bfloat16", "312", "400", "2.9", "days", "561", "225"]
    assert estimate.BOARD_WATTS["A100"] == 400


def test_estimate_lists_every_board_with_its_power():
    assert set(estimate.BOARD_WATTS) == set(accounting.PEAK_FLOPS)
    rows = estimate.cost(RUN, 1, GPT2).splitlines()[3:3 + len(accounting.PEAK_FLOPS)]
    assert [row.split()[0] for row in rows] == [b.split()[0] for b in accounting.PEAK_FLOPS]
    assert "float16" in next(row for row in rows if row.startswith("V100"))  # no bfloat16
    with pytest.raises(ValueError, match="mfu"):
        estimate.cost(RUN, 1, GPT2, mfu=0)


def test_gpt2_memory_by_hand():
    # weights, gradients, AdamW's two moments: 4 + 4 + 8 bytes * 124,439,808 parameters
    # activations, bfloat16: 12 layers * (12 * 1024 tokens) * 34 * 768 bytes = 3,850,371,072
    # logits: 12 * 1024 tokens * 50257 * 10 bytes = 6,175,580,160
    parts = accounting.memory_per_rank(RUN, GPT2, world_size=1)
    assert parts == {"weights": 497_759_232, "gradients": 497_759_232,
                     "optimizer state": 995_518_464, "activations": 3_850_371_072,
                     "logits": 6_175_580_160}
    assert accounting.memory_per_rank(RUN, GPT2, world_size=8)["DDP buckets"] == 497_759_232


# GPT-2 XL with the vocabulary padded to 50304, as estimate.py and a run from scratch have it,
# finetuned as config/finetune_gpt2_xl_fsdp.toml does: on 8 GPUs, 4 sequences x 1024 tokens
# per GPU, 8 micro-steps in all (one per GPU), bfloat16.
XL = GPTConfig(n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50304,
               bias=True)
XL_RUN = TrainConfig(batch_size=4, block_size=1024, gradient_accumulation_steps=8,
                     dtype="bfloat16")


def test_gpt2_xl_parameters_by_hand():
    # wte  50304 * 1600                               =    80,486,400 (also lm_head: once)
    # wpe   1024 * 1600                               =     1,638,400
    # one block: 12 * 1600^2 weights + 13 * 1600 biases and norms (as for GPT-2 above)
    #   = 30,720,000 + 20,800                         =    30,740,800
    #   forty-eight blocks                            = 1,475,558,400
    # ln_f 2 * 1600                                   =         3,200
    # total                                           = 1,557,686,400
    # (OpenAI's unpadded 50257 rows: 47 * 1600 = 75,200 fewer, 1,557,611,200)
    assert accounting.num_params(XL, non_embedding=False) == 1_557_686_400
    assert accounting.num_params(replace(XL, vocab_size=50257), False) == 1_557_611_200


def xl_memory(fsdp, checkpointing, **changes):
    run = replace(XL_RUN, fsdp=fsdp, activation_checkpointing=checkpointing, **changes)
    return accounting.memory_per_rank(run, XL, world_size=8)


def test_gpt2_xl_memory_on_8_gpus_by_hand():
    n = 1_557_686_400
    tokens = 4 * 1024  # one micro-batch per GPU
    # Activations, bfloat16, one layer: 4096 tokens * 34 * 1600 bytes = 222,822,400;
    # 48 layers                                                       = 10,695,475,200.
    # Logits: 4096 tokens * 50304 * 10 bytes (bf16, fp32, fp32 log-probabilities)
    #                                                                 =  2,060,451,840.
    layer, logits = tokens * 34 * 1600, tokens * 50304 * 10
    assert (layer, logits) == (222_822_400, 2_060_451_840)

    # DDP: every GPU holds 4 + 4 + 8 bytes per parameter and 4 more of gradient buckets:
    # 20 * 1,557,686,400 = 31,153,728,000 bytes (29.0 GiB), before a single activation.
    ddp = xl_memory(fsdp=False, checkpointing=False)
    assert ddp == {"weights": 4 * n, "gradients": 4 * n, "optimizer state": 8 * n,
                   "DDP buckets": 4 * n, "activations": 48 * layer, "logits": logits}
    # 31,153,728,000 + 10,695,475,200 + 2,060,451,840 = 43,909,655,040: 80 GB cards only.
    assert sum(ddp.values()) == 43_909_655_040
    assert estimate.fits(sum(ddp.values())) == [80, 141]
    # Checkpointed, a layer keeps its input, the float32 residual stream under autocast:
    # 48 * 4096 * 1600 * 4 = 1,258,291,200, plus one layer rerun in backward, 222,822,400:
    # 1,481,113,600. 34,695,293,440 in all: the 29 GiB of state still rule out 24 GB.
    ddp_ckpt = xl_memory(fsdp=False, checkpointing=True)
    assert ddp_ckpt["activations"] == 1_481_113_600 == 48 * tokens * 1600 * 4 + layer
    assert sum(ddp_ckpt.values()) == 34_695_293_440
    assert estimate.fits(sum(ddp_ckpt.values())) == [40, 80, 141]

    # FSDP over 8: an eighth of the fp32 state, 16 * 1,557,686,400 / 8 = 3,115,372,800;
    # root (wte = lm_head, wpe, ln_f): 80,486,400 + 1,638,400 + 3,200 = 82,128,000 params;
    # gathered parameters, bf16: the root and two blocks,
    #   2 * (82,128,000 + 2 * 30,740,800)                        =   287,219,200
    # gathered gradients: the root's in bf16 and one block's in bf16 plus its fp32 copy,
    #   2 * 82,128,000 + (2 + 4) * 30,740,800                    =   348,700,800
    # one micro-step per GPU: no full gradients kept between micro-steps.
    fsdp = xl_memory(fsdp=True, checkpointing=False)
    assert fsdp == {"weights": 778_843_200, "gradients": 778_843_200,
                    "optimizer state": 1_557_686_400, "gathered parameters": 287_219_200,
                    "gathered gradients": 348_700_800, "activations": 48 * layer,
                    "logits": logits}
    # 3,751,292,800 of state + 10,695,475,200 + 2,060,451,840 = 16,507,219,840: fits 24 GB.
    assert sum(fsdp.values()) == 16_507_219_840
    assert estimate.fits(sum(fsdp.values())) == [24, 40, 80, 141]
    # Checkpointed under FSDP, the Blocks' inputs are bfloat16 (MixedPrecisionPolicy casts
    # them): 48 * 4096 * 1600 * 2 = 629,145,600 + 222,822,400 = 851,968,000;
    # 3,751,292,800 + 851,968,000 + 2,060,451,840 = 6,663,712,640, less than half.
    fsdp_ckpt = xl_memory(fsdp=True, checkpointing=True)
    assert fsdp_ckpt["activations"] == 851_968_000
    assert sum(fsdp_ckpt.values()) == 6_663_712_640

    # Accumulating 8 micro-steps per GPU without communication keeps every parameter's full
    # fp32 gradient in between: 4 * 1,557,686,400 = 6,230,745,600 bytes more.
    accumulating = xl_memory(fsdp=True, checkpointing=False, gradient_accumulation_steps=64)
    assert accumulating["accumulated gradients"] == 6_230_745_600


@pytest.mark.slow
def test_report_and_estimate_give_memory_for_the_run_as_configured():
    run = replace(XL_RUN, fsdp=True)
    report = accounting.report(run, 8, XL)
    assert "(FSDP over 8)" in report and "gathered parameters" in report
    assert "15.37 GiB" in report  # 16,507,219,840 bytes
    assert (estimate.fits_text(sum(accounting.memory_per_rank(run, XL, 8).values()))
            == "fits GPUs of 24, 40, 80, 141 GB")
    ddp = replace(XL_RUN, activation_checkpointing=True)
    ddp_report = accounting.report(ddp, 8, XL)
    assert "(DDP over 8)" in ddp_report and "checkpointed" in ddp_report
    assert (estimate.fits_text(sum(accounting.memory_per_rank(ddp, XL, 8).values()))
            == "fits GPUs of 40, 80, 141 GB, not 24 GB (RTX 4090, A10G, L4)")
    # estimate.py: DDP and FSDP, each without and with checkpointing, on the same lines
    rows = estimate.memory_table(XL_RUN, 8, XL).splitlines()[-4:]
    assert [row.split()[:2] for row in rows] == [["DDP", "off"], ["DDP", "on"],
                                                 ["FSDP", "off"], ["FSDP", "on"]]
    assert [row.split()[5] for row in rows] == ["40.9", "32.3", "15.4", "6.2"]  # GiB
    assert rows[0].endswith("80, 141") and rows[2].endswith("24, 40, 80, 141")


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


def test_estimate_prints_the_cost_and_trains_nothing(tmp_path, capsys):
    config = Path(__file__).resolve().parent.parent / "config" / "train_gpt2.toml"
    out = tmp_path / "out"
    assert estimate.main([str(config), "--gpus=8", "--mfu=0.4",
                          f"--out_dir={out}", f"--data_dir={tmp_path / 'none'}"]) == 0
    text = capsys.readouterr().out
    assert "assuming GPT-2's vocabulary" in text  # no dataset prepared: 50257, padded
    assert "2.52e+20 FLOPs" in text and "on 8 GPU(s) at 40% MFU" in text
    assert any(line.startswith("A100") and "2.9 days" in line for line in text.splitlines())
    assert not out.exists()  # nothing written, nothing trained
    assert "memory per process (one process)" not in text  # the report is for the 8 GPUs
    assert estimate.main([str(config), "--mfu=0"]) == 2  # one line, the setting named
    assert "mfu must be in (0, 1], got 0.0" in capsys.readouterr().err


def test_estimate_help_lists_its_settings_and_train_py_s(capsys):
    assert estimate.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "--mfu=0.4" in text and "model FLOPs utilisation" in text
    assert "--batch_size=12" in text and "sequences per micro-step" in text


def test_gpt2_memory_and_communication_under_tp_by_hand():
    # TP over 2 splits each Block's four matrices, 12 * 768^2 = 7,077,888, and the biases of
    # the column-split c_attn and c_fc, 7 * 768 = 5,376: 7,083,264, half of it per rank,
    # 3,541,632. ln_1, ln_2 and the two c_proj biases, 4,608, stay whole: 3,546,240 a Block.
    # Whole too: wte 38,597,376 + wpe 786,432 + ln_f 1,536 = 39,385,344.
    # Per rank: 39,385,344 + 12 * 3,546,240 = 81,940,224 parameters (of 124,439,808).
    assert accounting.local_params(GPT2, tp=2) == (39_385_344, 3_546_240)
    tp = accounting.memory_per_rank(replace(RUN, tp=2), GPT2, world_size=2)
    # activations: 10 + 24/2 = 22 of the 34 bytes per n_embd per token, in bfloat16:
    # 12 layers * 12,288 tokens * 22 * 768 = 2,491,416,576; the logits stay whole.
    assert tp == {"weights": 4 * 81_940_224, "gradients": 4 * 81_940_224,
                  "optimizer state": 8 * 81_940_224, "activations": 2_491_416_576,
                  "logits": 6_175_580_160}
    # 2-D on 8: 4 rows of TP over 2, FSDP over the rows: a quarter of each rank's state;
    # gathered in bf16: the root and two Blocks, 2 * (39,385,344 + 2 * 3,546,240) = 92,955,648;
    # the root's gradient and a Block's, plus its fp32 copy: 2 * 39,385,344 + 6 * 3,546,240
    # = 100,048,128; 40 / 4 = 10 micro-steps per row keep whole gradients, 4 * 81,940,224.
    two_d = accounting.memory_per_rank(replace(RUN, tp=2, fsdp=True), GPT2, world_size=8)
    assert two_d == {"weights": 81_940_224, "gradients": 81_940_224,
                     "optimizer state": 163_880_448, "gathered parameters": 92_955_648,
                     "gathered gradients": 100_048_128, "accumulated gradients": 327_760_896,
                     "activations": 2_491_416_576, "logits": 6_175_580_160}
    # Sent per iteration and rank, ring collectives:
    # DDP over 8: an all-reduce of the fp32 gradients, 2 * 7/8 * 4 * 124,439,808 = 871,078,656.
    assert accounting.communication_per_step(RUN, GPT2, 8) == {"DDP": 871_078_656}
    # TP over 2: 40 micro-steps * 12 Blocks * 4 all-reduces (2 forward, 2 backward) of
    # 12 * 1024 * 768 bf16 activations, 18,874,368 bytes, each sending 2 * 1/2 of it:
    # 1,920 * 18,874,368 = 36,238,786,560, about 34 GiB: NVLink's job.
    assert accounting.communication_per_step(replace(RUN, tp=2), GPT2, 2) == {
        "TP": 36_238_786_560}
    # 2-D on 8: TP as above for 10 micro-steps, 9,059,696,640; FSDP over 4 rows gathers per
    # micro-step the root once and the Blocks twice, in bf16: 10 * 2 * (39,385,344 + 2 * 12 *
    # 3,546,240) = 2,489,902,080, and reduce-scatters 4 * 81,940,224 = 327,760,896 bytes of
    # fp32 gradients once: 3/4 of 2,817,662,976 = 2,113,247,232.
    assert accounting.communication_per_step(replace(RUN, tp=2, fsdp=True), GPT2, 8) == {
        "FSDP": 2_113_247_232, "TP": 9_059_696_640}
    assert accounting.strategy(replace(RUN, tp=2, fsdp=True), 8) == "FSDP over 4 x TP over 2"
    assert "communication per iteration" in accounting.report(replace(RUN, tp=2), 2, GPT2)
