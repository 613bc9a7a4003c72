"""Config files and flags: types, errors that name the key, and every shipped config."""
from pathlib import Path

import pytest

from sample import SampleConfig
from training.settings import ConfigError, TrainConfig, help_text, parse_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "config").glob("*.toml"))


def test_defaults_files_then_flags_in_order(tmp_path):
    f = tmp_path / "a.toml"
    f.write_text('batch_size = 7\nlearning_rate = 1\ncompile = true\nout_dir = "x"\n')
    cfg = parse_config(TrainConfig, [str(f), "--batch_size=9", "--compile=False"])
    assert cfg.batch_size == 9 and cfg.compile is False and cfg.out_dir == "x"
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.n_layer == TrainConfig().n_layer  # untouched settings keep their defaults
    assert parse_config(TrainConfig, ["--eval_only"]).eval_only is True


@pytest.mark.parametrize("args, message", [
    (["--learnig_rate=1e-3"], "unknown setting 'learnig_rate' (did you mean 'learning_rate'?)"),
    (["--batch_size=abc"], "batch_size must be int, got 'abc'"),
    (["--batch_size=1.5"], "batch_size must be int"),
    (["--compile=yes"], "compile must be true or false"),
    (["--batch_size"], "give a value, as in --batch_size=VALUE"),
    (["--zzzz=1"], "unknown setting 'zzzz'"),
    (["missing.toml"], "cannot read config file missing.toml"),
])
def test_flag_errors_name_the_key(args, message):
    with pytest.raises(ConfigError) as e:
        parse_config(TrainConfig, args)
    assert message in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("batch_sise = 4", "unknown setting 'batch_sise' (did you mean 'batch_size'?)"),
    ("batch_size = 4.5", "batch_size must be int, got 4.5"),
    ("compile = 1", "compile must be bool"),
    ("batch_size = true", "batch_size must be int"),
    ("batch_size = ", "not valid TOML"),
])
def test_file_errors_name_the_file_and_key(tmp_path, text, message):
    f = tmp_path / "bad.toml"
    f.write_text(text + "\n")
    with pytest.raises(ConfigError) as e:
        parse_config(TrainConfig, [str(f)])
    assert message in str(e.value) and "bad.toml" in str(e.value)


@pytest.mark.parametrize("flag, message", [
    ("--learning_rate=-1", "learning_rate must be positive"),
    ("--batch_size=0", "batch_size must be at least 1"),
    ("--n_embd=100", "n_embd (100) must be divisible by n_head (12)"),
    ("--dropout=1.5", "dropout must be in [0, 1)"),
    ("--dtype=fp8", "dtype must be auto"),
    ("--learning_rate=inf", "learning_rate must be positive and finite, got inf"),
    ("--muon_lr=inf", "muon_lr must be positive and finite"),
    ("--muon_ns_steps=10000000000", "muon_ns_steps must be at most 20"),
    ("--rope=true --n_embd=36 --n_head=4", "rope=true needs an even head size"),
])
def test_validation_rejects_impossible_values(flag, message):
    with pytest.raises(ConfigError) as e:
        parse_config(TrainConfig, flag.split()).validate()
    assert message in str(e.value)


def test_optional_int_takes_none():
    assert parse_config(SampleConfig, ["--top_k=none"]).top_k is None
    assert parse_config(SampleConfig, ["--top_k=5"]).top_k == 5


def test_help_lists_every_setting_with_its_comment():
    text = help_text(TrainConfig)
    assert "--batch_size=12" in text and "sequences per micro-step" in text
    assert len(text.splitlines()) == len(TrainConfig.__dataclass_fields__)


def test_shipped_configs_exist():
    names = {c.stem for c in CONFIGS}
    assert {"train_shakespeare_char", "train_shakespeare_char_cpu", "train_gpt2",
            "finetune_shakespeare", "eval_gpt2", "eval_gpt2_medium", "eval_gpt2_large",
            "eval_gpt2_xl"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = parse_config(TrainConfig, [str(path)]).validate()
    assert cfg.out_dir != TrainConfig().out_dir  # each config writes to a folder of its own
