"""sample.py: where it looks by default, streaming, and the inputs that must not reach the
sampler (extreme temperatures, weights that are not numbers)."""
from config import TrainConfig, parse_config
from helpers import ROOT
from sample import SampleConfig


def test_bare_sample_reads_what_bare_train_writes():
    # `python train.py` trains one of these two recipes; `python sample.py` must find it.
    for name in ("train_shakespeare_char.toml", "train_shakespeare_char_cpu.toml"):
        trained = parse_config(TrainConfig, [str(ROOT / "config" / name)])
        assert SampleConfig().out_dir == trained.out_dir
