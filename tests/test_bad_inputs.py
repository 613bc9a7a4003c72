"""Bad input: every user mistake is one line on stderr, a non-zero exit and no traceback, and
nothing already on disk changes.

Each row of the tables below is a real command line. They run in-process (the script's
main(argv), as `python script ...` would call it) to keep the suite fast; a few run as real
processes to prove the exit code and the stderr end to end. Every command runs in a folder
holding a trained checkpoint, a good dataset, a sharded corpus and damaged datasets, and the
test checks that the folder is byte for byte the same afterwards.
"""
import functools
import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import ROOT, TINY, hub_state, main_of, quiet_env, write_gpt2_folder
from model import GPT, GPTConfig
from training.safe_load import load_checkpoint

STEPS = ["--max_iters=1", "--eval_interval=1", "--eval_iters=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, char_data, gpt2_vocab_path):
    """The files the commands run against, as a dict of names for the tables' {placeholders}."""
    from data.corpus import prepare_corpus
    root = tmp_path_factory.mktemp("world")
    data = root / "data"
    shutil.copytree(char_data, data)
    trained = root / "trained"
    assert main_of("train.py")([*TINY, *STEPS, f"--data_dir={data}", f"--out_dir={trained}"]) == 0

    good_meta = json.loads((data / "meta.json").read_text())

    def dataset(name, meta=None, train=None, val=None, recount=True):
        """A copy of data with its meta.json text, train and val tokens replaced (or removed
        where given as ""); meta.json's token counts follow new tokens unless recount=False."""
        folder = root / name
        shutil.copytree(data, folder)
        if meta is None and recount:
            counts = {f"{split}_tokens": len(tokens) // 2
                      for split, tokens in (("train", train), ("val", val)) if tokens}
            meta = json.dumps({**good_meta, **counts})
        for file, content in (("meta.json", meta), ("train.bin", train), ("val.bin", val)):
            if content == "":
                (folder / file).unlink()
            elif isinstance(content, str):
                (folder / file).write_text(content)
            elif content is not None:
                (folder / file).write_bytes(content)

    vocab = good_meta["vocab_size"]
    chars = good_meta["chars"]
    dataset("nometa", meta="")
    dataset("badjson", meta='{"tokenizer": "char", ')
    dataset("novocab", meta='{"tokenizer": "char"}')
    dataset("noval", val="")
    dataset("odd", train=(data / "train.bin").read_bytes()[:1001])
    dataset("short", train=np.arange(10, dtype=np.uint16).tobytes())
    dataset("bigid", train=np.full(1000, vocab + 100, dtype=np.uint16).tobytes())
    dataset("cut", train=(data / "train.bin").read_bytes()[:2000], recount=False)
    for name, change in [("vocab66", {"vocab_size": vocab + 1}),
                         ("twice", {"chars": ["a", *chars[:-1]]}),
                         ("notchars", {"chars": ["ab", *chars[1:]]}),
                         ("gpt2vocab", {"tokenizer": "gpt2"}),
                         ("sentencepiece", {"tokenizer": "sentencepiece"})]:
        dataset(name, meta=json.dumps({**good_meta, **change}))
    prepare_corpus([" the" * 40] * 20, root / "corpus", shard_size=200, val_tokens=50)
    torch.manual_seed(0)
    gpt2 = GPT(GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=1, n_embd=8))
    write_gpt2_folder(root / "gpt2", hub_state(gpt2), dict(n_layer=1, n_head=1, n_embd=8,
                                                           n_positions=16, vocab_size=50257))
    (root / "interrupted" / ".old").mkdir(parents=True)  # left by a prepare that was killed

    def checkpoint(name, change):
        """A copy of the trained checkpoint, its dict changed by change(ckpt)."""
        ckpt = load_checkpoint(trained / "ckpt.pt")
        change(ckpt)
        (root / name).mkdir()
        torch.save(ckpt, root / name / "ckpt.pt")  # as is: save_checkpoint refuses NaN weights

    checkpoint("nan", lambda c: c["model"].update((k, torch.full_like(v, float("nan")))
                                                  for k, v in c["model"].items()))
    # Damaged or hand-edited fields, each refused at load in one line.
    checkpoint("no_optimizer", lambda c: c.pop("optimizer"))
    checkpoint("no_iter", lambda c: c.pop("iter_num"))
    checkpoint("iter_text", lambda c: c.update(iter_num="5"))
    checkpoint("iter_negative", lambda c: c.update(iter_num=-10))
    checkpoint("best_text", lambda c: c.update(best_val_loss="low"))
    checkpoint("max_iters_text", lambda c: c["config"].update(max_iters="abc"))
    checkpoint("config_text", lambda c: c.update(config="notadict"))
    checkpoint("meta_text", lambda c: c.update(meta="x"))
    checkpoint("million_layers", lambda c: c["model_args"].update(n_layer=10 ** 6))
    checkpoint("moments_shape", lambda c: c["optimizer"]["state"][0].update(
        exp_avg=torch.zeros(3, 3)))
    (root / "code").mkdir()  # a checkpoint whose unpickling would call os.system
    torch.save({"model": {}, "payload": SystemCall()}, root / "code" / "ckpt.pt")
    checkpoint("twice_ckpt", lambda c: c["meta"].update(chars=["a", *chars[:-1]]))
    checkpoint("notchars_ckpt", lambda c: c["meta"].update(chars=["ab", *chars[1:]]))

    def gpt2_files(name, header=None, data=b"", config=None, raw=None):
        """A folder of GPT-2 files whose config.json has the keys in config changed and whose
        model.safetensors holds header (JSON, unless bytes) then data, or else raw."""
        folder = root / name
        folder.mkdir()
        config = {"n_layer": 1, "n_head": 1, "n_embd": 8, "n_positions": 16,
                  "vocab_size": 50257, **(config or {})}
        (folder / "config.json").write_text(json.dumps(config))
        head = header if isinstance(header, bytes) else json.dumps(header or {}).encode()
        (folder / "model.safetensors").write_bytes(
            raw if raw is not None else len(head).to_bytes(8, "little") + head + data)

    def f32(shape, offsets):
        return {"dtype": "F32", "shape": shape, "data_offsets": offsets}

    gpt2_files("st_long", raw=(1000).to_bytes(8, "little") + b"{}")
    gpt2_files("st_list", header=[1, 2])
    gpt2_files("st_notjson", header=b"{not json")
    gpt2_files("st_dtype", {"wte.weight": {**f32([1], [0, 1]), "dtype": "F8"}}, bytes(1))
    gpt2_files("st_shape", {"wte.weight": f32([-1], [0, 4])}, bytes(4))
    gpt2_files("st_negative", {"wte.weight": f32([1], [-4, 0])}, bytes(4))
    gpt2_files("st_reversed", {"wte.weight": f32([1], [4, 0])}, bytes(4))
    gpt2_files("st_beyond", {"wte.weight": f32([100], [0, 400])}, bytes(4))
    gpt2_files("st_size", {"wte.weight": f32([3], [0, 4])}, bytes(4))
    gpt2_files("st_overlap", {"a": f32([2], [0, 8]), "b": f32([2], [4, 12])}, bytes(12))
    gpt2_files("cfg_missing", config={"n_head": None})
    gpt2_files("cfg_type", config={"n_layer": "2"})
    gpt2_files("cfg_zero", config={"n_embd": 0})
    gpt2_files("cfg_negative", config={"n_positions": -5})
    gpt2_files("cfg_heads", config={"n_embd": 10, "n_head": 3})
    gpt2_files("cfg_huge", config={"n_layer": 1000, "n_embd": 100_000})
    gpt2_files("cfg_list")
    (root / "cfg_list" / "config.json").write_text("[]")
    (root / "good.jsonl").write_text('{"text": "One document."}\n' * 30)
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "a typo in the key"}\n')
    (root / "text.txt").write_text("First Citizen:\nBefore we proceed any further, hear me.\n")
    (root / "empty.txt").write_text("")
    (root / "deep.jsonl").write_text('{"prompt": ' * 1000 + '"x"' + "}" * 1000 + "\n")
    (root / "empty_prompt.jsonl").write_text('{"prompt": "a"}\n{"prompt": ""}\n')
    (root / "latin1.txt").write_bytes("café".encode("latin-1"))
    (root / "bad.toml").write_text("batch_size = \n")
    (root / "latin1.toml").write_bytes("out_dir = 'café'\n".encode("latin-1"))
    (root / "file").write_text("a regular file, where a folder is expected\n")
    (root / "empty").mkdir()
    (root / "dangling").symlink_to(root / "nowhere")  # a link to a folder that is not there
    for name, change in [("label_true", {"label": True}), ("label_float", {"label": 3.0}),
                         ("endings_text", {"endings": "abcd"})]:
        example = {"ctx": "A man sits down.", "endings": ["a", "b", "c", "d"], "label": 0}
        (root / f"{name}.jsonl").write_text(json.dumps({**example, **change}) + "\n")
    (root / "latin1_run").mkdir()
    (root / "latin1_run" / "metrics.jsonl").write_bytes('{"iter": 1, "loss": "é"}\n'.encode(
        "latin-1"))
    names = {p.name.replace(".", "_"): str(p) for p in root.iterdir()}
    return {**names, "missing": str(root / "missing.txt"), "root": root}


class SystemCall:
    """Pickles as a call of os.system, which no checkpoint may make on load."""

    def __reduce__(self):
        import os
        return os.system, ("true",)


def snapshot(folder):
    """Every path under folder, with a hash of each file's bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "folder" for p in sorted(folder.rglob("*"))}


main_of = functools.cache(main_of)  # each script is loaded once for all its cases


def run_main(script, argv, capsys):
    """Run script's main(argv) in-process; return its exit status and its stderr."""
    try:
        status = main_of(script)(argv)
    except SystemExit as e:
        status = e.code
        if isinstance(status, str):  # how Python exits with a message: stderr, then status 1
            print(status, file=sys.stderr)
            status = 1
    return status, capsys.readouterr().err


def assert_one_line_error(status, stderr, message):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert isinstance(status, int) and status != 0, (status, stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert message in lines[0], stderr


# A resumed run with a typo is where damage would hurt: each train.py command starts from
# these flags, so it resumes the trained checkpoint unless its row says otherwise.
TRAIN = [*TINY, "--max_iters=2", "--eval_interval=1", "--eval_iters=1", "--init_from=resume",
         "--data_dir={data}", "--out_dir={trained}"]
SCRATCH = ["--init_from=scratch", "--out_dir={new}"]  # a new run: nothing to compare meta with
SAMPLE = ["--out_dir={trained}", "--device=cpu", "--max_new_tokens=5", "--num_samples=1"]

CASES = [
    # script, flags (after TRAIN or SAMPLE), the message expected on stderr
    ("train.py", ["--learnig_rate=1e-3"],
     "unknown setting 'learnig_rate' (did you mean 'learning_rate'?)"),
    ("train.py", ["--batch_size=abc"], "batch_size must be int, got 'abc'"),
    ("train.py", ["--batch_size"], "give a value, as in --batch_size=VALUE"),
    ("train.py", ["--compile=yes"], "compile must be true or false"),
    ("train.py", ["--learning_rate=-1"], "learning_rate must be positive and finite, got -1.0"),
    ("train.py", ["--batch_size=0"], "batch_size must be at least 1, got 0"),
    ("train.py", ["--n_embd=30", "--n_head=4"], "n_embd (30) must be divisible by n_head (4)"),
    ("train.py", ["--dtype=fp8"], "dtype must be auto, float32, bfloat16 or float16"),
    ("train.py", ["--device=cuda:99"], "device 'cuda:99' requested, but"),
    ("train.py", ["{missing}"], "cannot read config file"),
    ("train.py", ["{bad_toml}"], "not valid TOML"),
    ("train.py", ["--out_dir={file}/out"], "cannot write to out_dir"),
    ("train.py", ["--out_dir={empty}"], "init_from=resume but there is no checkpoint at"),
    ("train.py", ["--out_dir={new}", "--init_from=gpt3"],
     "init_from='gpt3': expected scratch, resume, auto, one of gpt2"),
    ("train.py", ["--data_dir=", "--dataset=no_such_dataset"],
     "no dataset 'no_such_dataset' under data/; prepared: "),
    ("train.py", ["--data_dir={nometa}"], "meta.json not found"),
    ("train.py", ["--data_dir={badjson}"], "cannot read"),
    ("train.py", ["--data_dir={novocab}"], "meta.json has no vocab_size"),
    ("train.py", ["--data_dir={noval}"], "split 'val' not found"),
    ("train.py", ["--data_dir={odd}"], "1001 bytes, not a whole number of uint16 tokens"),
    ("train.py", ["--data_dir={short}"], "holds 10 tokens, fewer than block_size + 1 = 33"),
    ("train.py", ["--data_dir={bigid}"], "outside the vocab of"),
    ("train.py", ["--data_dir={cut}", *SCRATCH],
     "cut/train.bin holds 1,000 tokens but meta.json records 90,000: truncated, or written by "
     "another preparation; run `python data/prepare.py --input FILE --out_dir {cut}` to "
     "re-create it"),
    ("train.py", ["--data_dir={vocab66}", *SCRATCH],
     "meta.json says vocab_size 62 but lists 61 characters"),
    ("train.py", ["--data_dir={twice}", *SCRATCH], "meta.json lists a character twice in chars"),
    ("train.py", ["--data_dir={notchars}", *SCRATCH],
     "meta.json has no chars list of single characters"),
    ("train.py", ["--data_dir={gpt2vocab}", *SCRATCH],
     "meta.json says vocab_size 61 but GPT-2's tokenizer has 50257 tokens"),
    ("train.py", ["--data_dir={sentencepiece}", *SCRATCH],
     "meta.json names an unknown tokenizer 'sentencepiece'; expected 'char' or 'gpt2'"),
    ("train.py", ["--seed=-1"], "seed must not be negative"),
    ("train.py", ["--seed=18446744073709551616"], "seed must be below 2**63"),
    ("train.py", ["--out_dir={new}", "--init_from=scratch", "--n_embd=131072", "--n_head=1"],
     "GiB per process (accounting.memory_per_rank), more than the"),
    ("train.py", ["--out_dir={new}", "--init_from=scratch", "--eval_only"],
     "--eval_only evaluates a trained model"),
    ("train.py", ["--learning_rate=nan"], "learning_rate must be positive and finite, got nan"),
    ("train.py", ["{latin1_toml}"], "not valid TOML"),
    ("train.py", ["--out_dir={new}", "--init_from={empty}"], "cannot load the model from"),
    ("train.py", ["--wandb_log=true"], "pip install wandb"),
    ("train.py", ["--out_dir={new}", "--init_from={st_overlap}"], "a and b overlap in the file"),
    ("train.py", ["--out_dir={new}", "--init_from={cfg_huge}"], "describes 1.2e+14 parameters"),
    ("train.py", ["--out_dir={new}", "--init_from={st_long}"], "its header says 1000 bytes"),
    ("train.py", ["--min_lr=0.1"], "min_lr (0.1) must not exceed learning_rate (0.003)"),
    ("train.py", ["--init_from=scratch", "--out_dir={dangling}"],
     "dangling is a symbolic link to {root}/nowhere, which does not exist"),
    # Damaged checkpoints: each field checked once, at load.
    ("train.py", ["--out_dir={no_optimizer}"], "it has no 'optimizer' entry, which resuming"),
    ("train.py", ["--out_dir={no_iter}"], "it has no 'iter_num' entry, which resuming"),
    ("train.py", ["--out_dir={iter_text}"], "its 'iter_num' entry is str '5', not int"),
    ("train.py", ["--out_dir={iter_negative}"], "iter_num is -10; it counts iterations"),
    ("train.py", ["--out_dir={best_text}"], "its 'best_val_loss' entry is str 'low', not a"),
    ("train.py", ["--out_dir={max_iters_text}"], "config.max_iters is 'abc', not int"),
    ("train.py", ["--out_dir={config_text}"], "its 'config' entry is str 'notadict', not dict"),
    ("train.py", ["--out_dir={meta_text}"], "its 'meta' entry is str 'x', not dict"),
    ("train.py", ["--out_dir={million_layers}"], "model_args describe 1.2e+10 parameters"),
    ("train.py", ["--out_dir={moments_shape}"],
     "optimizer state for transformer.wte.weight has exp_avg of shape (3, 3), the parameter"),
    ("train.py", ["--out_dir={code}"], "refused to load: it carries code (it asks to import "
     "posix.system)"),

    ("sample.py", ["--tempurature=0.5"], "did you mean 'temperature'"),
    ("sample.py", ["--top_p=0"], "top_p must be in (0, 1], got 0.0"),
    ("sample.py", ["--top_p=1.5"], "top_p must be in (0, 1], got 1.5"),
    ("sample.py", ["--temperature=-1"], "temperature must be 0 (greedy) or more, got -1.0"),
    ("sample.py", ["--temperature=nan"], "temperature must be 0 (greedy) or more, got nan"),
    ("sample.py", ["--top_k=0"], "top_k must be at least 1 (or none), got 0"),
    ("sample.py", ["--max_new_tokens=-1"], "max_new_tokens must be at least 0, got -1"),
    ("sample.py", ["--num_samples=0"], "num_samples must be at least 1, got 0"),
    ("sample.py", ["--dtype=bogus"], "dtype must be auto, float32, bfloat16 or float16"),
    ("sample.py", ["--device=cuda:99"], "device 'cuda:99' requested, but"),
    ("sample.py", ["--start=FILE:{missing}"], "cannot read the prompt file"),
    ("sample.py", ["--start=FILE:{latin1_txt}"], "latin1.txt is not UTF-8 text"),
    ("sample.py", ["--start=∑ is not Shakespeare"],
     "character '∑' at position 0 is not in the vocabulary"),
    ("sample.py", ["--start="], "the prompt is empty; give one with --start"),
    ("sample.py", ["--prompts={deep_jsonl}"], 'deep.jsonl:1: expected a JSON object {{"prompt"'),
    ("sample.py", ["--prompts={empty_prompt_jsonl}"],
     "empty_prompt.jsonl:2: the prompt is empty; give it a character"),
    ("sample.py", ["--out_dir={empty}"], "train one first: python train.py --out_dir="),
    ("sample.py", ["--init_from=gpt3"], "cannot load the model from gpt3: unknown model"),
    ("sample.py", ["--init_from={empty}"], "cannot load the model from"),
    ("sample.py", ["--out_dir={nan}"],
     "nan/ckpt.pt: the model's weights are not all finite (NaN or inf)"),
    ("sample.py", ["--out_dir={twice_ckpt}"],
     "cannot build the tokenizer: a character vocabulary must be distinct single characters"),
    ("sample.py", ["--out_dir={notchars_ckpt}"],
     "cannot build the tokenizer: a character vocabulary must be distinct single characters"),
    # Crafted GPT-2 files: every field of the safetensors header and of config.json checked.
    ("sample.py", ["--init_from={st_long}"], "its header says 1000 bytes, the file has 10"),
    ("sample.py", ["--init_from={st_list}"], "the safetensors header is not a JSON object"),
    ("sample.py", ["--init_from={st_notjson}"], "the safetensors header is not a JSON object"),
    ("sample.py", ["--init_from={st_dtype}"], "tensor wte.weight has an unknown dtype 'F8'"),
    ("sample.py", ["--init_from={st_shape}"], "tensor wte.weight has a bad shape [-1]"),
    ("sample.py", ["--init_from={st_negative}"],
     "tensor wte.weight has data_offsets [-4, 0] outside the 4 bytes of data"),
    ("sample.py", ["--init_from={st_reversed}"], "has data_offsets [4, 0] outside the 4 bytes"),
    ("sample.py", ["--init_from={st_beyond}"], "has data_offsets [0, 400] outside the 4 bytes"),
    ("sample.py", ["--init_from={st_size}"],
     "tensor wte.weight of shape [3] needs 12 bytes, its offsets span 4"),
    ("sample.py", ["--init_from={st_overlap}"], "tensors a and b overlap in the file"),
    ("sample.py", ["--init_from={cfg_missing}"],
     "config.json needs n_head as a positive integer, got None"),
    ("sample.py", ["--init_from={cfg_type}"],
     "config.json needs n_layer as a positive integer, got '2'"),
    ("sample.py", ["--init_from={cfg_zero}"], "needs n_embd as a positive integer, got 0"),
    ("sample.py", ["--init_from={cfg_negative}"],
     "needs n_positions as a positive integer, got -5"),
    ("sample.py", ["--init_from={cfg_heads}"], "n_embd 10 is not divisible by its n_head 3"),
    ("sample.py", ["--init_from={cfg_huge}"], "config.json describes 1.2e+14 parameters"),
    ("sample.py", ["--init_from={cfg_list}"], "config.json is not a JSON object"),

    ("sample.py", ["--out_dir={meta_text}"], "its 'meta' entry is str 'x', not dict"),
    ("sample.py", ["--out_dir={million_layers}"], "model_args describe 1.2e+10 parameters"),
    ("sample.py", ["--out_dir={code}"], "refused to load: it carries code"),
    ("sample.py", ["--seed=100000000000000000000"], "seed must be from 0 to 2**63 - 1"),
    ("sample.py", ["--num_samples=100000000"], "sampling 100,000,000 sequences, 8 at"),

    ("tools.hellaswag", ["--out_dir={trained}", "--device=cpu"],
     "uses the char tokenizer; HellaSwag needs a model that reads GPT-2 tokens"),
    ("tools.hellaswag", ["--init_from={gpt2}", "--input={label_true_jsonl}"],
     "label_true.jsonl:1: not a HellaSwag example"),
    ("tools.hellaswag", ["--init_from={gpt2}", "--input={label_float_jsonl}"],
     "label_float.jsonl:1: not a HellaSwag example"),
    ("tools.hellaswag", ["--init_from={gpt2}", "--input={endings_text_jsonl}"],
     "endings_text.jsonl:1: not a HellaSwag example"),

    ("tools.plot", ["{latin1_run}"], "metrics.jsonl is not UTF-8 text"),
    ("tools.plot", ["{trained}", "--out={root}/missing/loss.png"],
     "out: cannot write {root}/missing/loss.png: the folder {root}/missing does not exist"),
    ("tools.bench", ["--json_out={root}/missing/b.json"],
     "json_out: cannot write {root}/missing/b.json: the folder {root}/missing does not exist"),
    ("tools.estimate", ["--data_dir={badjson}", "--gpus=1"], "badjson/meta.json: Expecting"),
    ("tools.estimate", ["--gpus=3", "--gradient_accumulation_steps=40"],
     "gradient_accumulation_steps (40) must be divisible by the number of processes (3)"),
    ("tools.estimate", ["--gpus=2", "--fsdp=true", "--dtype=float16"],
     "fsdp=true does not take float16"),

    ("data/prepare.py", ["--out_dir", "{data}"],
     "the following arguments are required: --input"),
    ("data/prepare.py", ["--input", "{missing}", "--out_dir", "{data}"], "cannot read"),
    ("data/prepare.py", ["--input", "{empty_txt}", "--out_dir", "{data}"], "input is empty"),
    ("data/prepare.py", ["--input", "{latin1_txt}", "--out_dir", "{data}"],
     "cannot read {latin1_txt} as UTF-8 text"),
    ("data/prepare.py", ["--input", "{empty}", "--out_dir", "{data}"], "Is a directory"),
    ("data/prepare.py", ["--input", "{text_txt}", "--out_dir", "{data}", "--tokenizer=bogus"],
     "argument --tokenizer: invalid choice: 'bogus'"),
    ("data/prepare.py", ["--input", "{text_txt}", "--out_dir", "{data}", "--val_fraction=1"],
     "val_fraction must be between 0 and 1, got 1.0"),
    ("data/prepare.py", ["--input", "{text_txt}", "--out_dir", "{data}", "--val_fraction=x"],
     "argument --val_fraction: invalid float value: 'x'"),
    ("data/prepare.py", ["--input", "{text_txt}", "--out_dir", "{data}", "--bogus"],
     "unrecognized arguments: --bogus"),
    ("data/prepare.py", ["--input", "{text_txt}", "--out_dir", "{file}/sub"],
     "cannot create the folder"),
    ("data/shakespeare_char/prepare.py", ["--out_dir", "{file}/sub"],
     "cannot create the folder"),
    ("data/shakespeare_char/prepare.py", ["--imput", "{text_txt}", "--out_dir", "{data}"],
     "unrecognized arguments: --imput"),
    ("data/shakespeare/prepare.py", ["--input", "{missing}", "--out_dir", "{data}"],
     "cannot read"),
    ("data/openwebtext/prepare.py", ["--input", "{missing}", "--out_dir", "{corpus}"],
     "missing.txt not found"),
    ("data/openwebtext/prepare.py", ["--input", "{good_jsonl}", "{bad_jsonl}", "--out_dir",
                                     "{corpus}", "--num_proc=1"],
     "bad.jsonl:2: not a JSON object with a \"text\" field"),
    ("data/openwebtext/prepare.py", ["--input", "{text_txt}", "--shard_size=0", "--out_dir",
                                     "{corpus}"], "need shard_size >= val_tokens >= 1"),
    ("data/openwebtext/prepare.py", ["--num_proc=two"],
     "argument --num_proc: invalid int value: 'two'"),
    ("data/fineweb/prepare.py", ["--input", "{good_jsonl}", "--out_dir", "{interrupted}"],
     ".old holds the dataset an interrupted run set aside"),
    ("data/fineweb/prepare.py", ["--input", "{good_jsonl}", "--out_dir", "{file}/sub"],
     "cannot create the folder"),
]


@pytest.mark.parametrize("script, flags, message", CASES, ids=[
    " ".join([row[0], *row[1]]) for row in (getattr(c, "values", c) for c in CASES)])
def test_a_bad_input_is_a_one_line_error_and_changes_nothing(script, flags, message, world,
                                                            tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import` fails
    names = {**world, "new": str(tmp_path / "new")}
    base = {"train.py": TRAIN, "sample.py": SAMPLE}.get(script, [])
    argv = [arg.format(**names) for arg in base + flags]
    before = snapshot(world["root"])
    status, stderr = run_main(script, argv, capsys)
    assert_one_line_error(status, stderr, message.format(**names))
    assert snapshot(world["root"]) == before


# ----------------------------------------------------------------------------- end to end

def run_process(script, argv, **env):
    return subprocess.run([sys.executable, str(ROOT / script), *argv], capture_output=True,
                          text=True, env=quiet_env(**env), timeout=1800, cwd=ROOT)


@pytest.mark.slow
def test_processes_exit_non_zero_with_one_line_and_no_traceback(world, tmp_path):
    before = snapshot(world["root"])
    # An error late in a resumed run, after the model and the optimizer are built.
    train = [arg.format(**world) for arg in TRAIN] + [f"--data_dir={world['short']}"]
    proc = run_process("train.py", train)
    assert proc.returncode == 2
    assert_one_line_error(proc.returncode, proc.stderr, "fewer than block_size + 1")
    # argparse's own error, made one line.
    proc = run_process("data/prepare.py", ["--out_dir", world["data"]])
    assert proc.returncode == 2
    assert_one_line_error(proc.returncode, proc.stderr, "required: --input")
    # Two tokenizer processes: the bad line still stops the run, and the old corpus is back.
    proc = run_process("data/openwebtext/prepare.py", [
        "--input", world["good_jsonl"], world["bad_jsonl"], "--out_dir", world["corpus"],
        "--shard_size=200", "--val_tokens=50", "--num_proc=2"])
    assert_one_line_error(proc.returncode, proc.stderr, "bad.jsonl:2: not a JSON object")
    assert snapshot(world["root"]) == before
    # Samples written to a full disk.
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, str(ROOT / "sample.py"),
                               *[arg.format(**world) for arg in SAMPLE]], stdout=full,
                              stderr=subprocess.PIPE,
                              text=True, env=quiet_env(), timeout=1800)
    assert_one_line_error(proc.returncode, proc.stderr,
                          "cannot write the samples: No space left on device")


def test_gpt2_weights_unavailable_offline(tmp_path):
    proc = run_process("sample.py", ["--init_from=gpt2", "--device=cpu"],
                       HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    assert proc.returncode == 2
    assert_one_line_error(proc.returncode, proc.stderr, "cannot load the model from gpt2:")


def test_gpt2_vocabulary_unavailable_offline(world, capsys, monkeypatch):
    # No network and no GPT2_VOCAB: tiktoken cannot fetch GPT-2's vocabulary. The model loads;
    # the tokenizer then fails, and must say how to work offline in one line.
    from data import tokenizer

    def no_network(name):
        raise OSError("no network")
    monkeypatch.setattr("tiktoken.get_encoding", no_network)
    monkeypatch.setattr(tokenizer, "load_gpt2_encoding", tokenizer.load_gpt2_encoding.__wrapped__)
    monkeypatch.delenv("GPT2_VOCAB")
    for script, argv in [("sample.py", ["--init_from={gpt2}", "--device=cpu"]),
                         ("tools.hellaswag", ["--init_from={gpt2}", "--input={good_jsonl}"])]:
        status, stderr = run_main(script, [arg.format(**world) for arg in argv], capsys)
        assert_one_line_error(status, stderr, "set GPT2_VOCAB to a local copy")


def test_a_damaged_gpt2_vocabulary_is_one_line_in_every_script(world, gpt2_vocab_path, tmp_path,
                                                               capsys, monkeypatch):
    # GPT2_VOCAB points at a local encoder.json: damaged, it must be refused where it is read
    # (tokenizer.load_gpt2_encoding) for every script, not fail inside tiktoken.
    encoder = json.loads(gpt2_vocab_path.read_text(encoding="utf-8"))
    first, second = list(encoder)[:2]
    damaged = {
        "outside": ({**{k: v for k, v in encoder.items() if k != first}, "€": encoder[first]},
                    "has a character outside GPT-2's byte alphabet"),
        "duplicate": ({**encoder, second: encoder[first]}, "an id is used twice"),
        "list": (list(encoder), "it holds a JSON list, not an object"),
        "string_id": ({**encoder, first: str(encoder[first])}, "has the id '0', not an integer"),
    }
    scripts = [("sample.py", ["--init_from={gpt2}", "--device=cpu"]),
               ("data/prepare.py", ["--input", "{text_txt}", "--out_dir", str(tmp_path / "d"),
                                    "--tokenizer=gpt2"]),
               ("tools.hellaswag", ["--init_from={gpt2}", "--input={good_jsonl}"])]
    for name, (content, message) in damaged.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(content))
        monkeypatch.setenv("GPT2_VOCAB", str(path))
        for script, argv in scripts:
            status, stderr = run_main(script, [arg.format(**world) for arg in argv], capsys)
            assert_one_line_error(status, stderr, message)
