"""export.py end to end: tiny models trained by train.py, exported, then loaded by transformers
(the golden test: the same logits) and by our own train.py and sample.py."""
import io
import json
import subprocess
import sys

import pytest
import torch

import sample
from data.tokenizer import GPT2Tokenizer
from helpers import ROOT, quiet_env, read_metrics, run_train
from model import GPT, config_from_dict
from tools import export
from training.checkpoint import save_checkpoint
from training.safe_load import load_checkpoint, read_safetensors

STEPS = ["--max_iters=3", "--eval_interval=3"]


@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory, shakespeare_path):
    """A GPT-2-tokenized dataset of the first 20,000 characters of Tiny Shakespeare."""
    from data.preparation import prepare_text
    folder = tmp_path_factory.mktemp("shakespeare_gpt2")
    prepare_text(shakespeare_path.read_text()[:20_000], folder, "gpt2")
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory, char_data, gpt2_data):
    """{name: (run folder, exported folder)}: a character model trained without biases, and
    a GPT-2-tokenizer model with them; the first exported by the command line, as a user
    would, the second through main()."""
    root = tmp_path_factory.mktemp("export")
    run_train(STEPS + ["--bias=false"], char_data, root / "char")
    run_train(STEPS + ["--bias=true"], gpt2_data, root / "gpt2")
    proc = subprocess.run([sys.executable, "-m", "tools.export", f"--out_dir={root / 'char'}",
                           f"--hf_dir={root / 'hf-char'}"], capture_output=True, text=True,
                          env=quiet_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "transformers has no tokenizer" in proc.stdout  # the character model's note
    assert export.main([f"--out_dir={root / 'gpt2'}", f"--hf_dir={root / 'hf-gpt2'}"]) == 0
    return {"char": (root / "char", root / "hf-char"), "gpt2": (root / "gpt2", root / "hf-gpt2")}


def our_model(run):
    ckpt = load_checkpoint(run / "ckpt.pt")
    model = GPT(config_from_dict(ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


@pytest.mark.slow
@pytest.mark.parametrize("name, bias", [("char", False), ("gpt2", True)])
def test_transformers_computes_our_logits(exported, name, bias):
    import transformers  # test-only dependency; missing, this test fails rather than skips
    run, folder = exported[name]
    ours, ckpt = our_model(run)
    assert ckpt["model_args"]["bias"] is bias
    ref = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    # Exactly the tensors save_pretrained writes: every parameter but the tied head, whose
    # absence makes transformers tie it to the token table again.
    written = read_safetensors(folder / "model.safetensors")
    assert set(written) == set(ref.state_dict()) - {"lm_head.weight"}
    assert ref.lm_head.weight.data_ptr() == ref.transformer.wte.weight.data_ptr()
    if not bias:  # the biases GPT-2 has and this model was trained without: zeros
        assert all(not t.any() for key, t in written.items() if key.endswith(".bias"))
    # The padded vocabulary is kept: 50304 for GPT-2's 50257 tokens; characters are not padded.
    padded = 50304 if name == "gpt2" else ckpt["meta"]["vocab_size"]
    assert ref.config.vocab_size == ours.config.vocab_size == padded
    idx = torch.randint(0, padded, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(ref(idx).logits, ours(idx)[0], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_gpt2_tokenizer_files_work_in_transformers_offline(exported, shakespeare_path):
    from transformers import AutoTokenizer, pipeline
    run, folder = exported["gpt2"]
    theirs, ours = AutoTokenizer.from_pretrained(folder), GPT2Tokenizer()
    texts = ["ROMEO:\nWhat light   through yonder window breaks?", " naïve café 日本語 🙂",
             "one<|endoftext|>two", shakespeare_path.read_text()[:3000]]
    for text in texts:
        assert theirs(text)["input_ids"] == ours.encode(text), text[:40]
    # A pipeline greedy-decodes what our sampler does with the same weights.
    model, _ = our_model(run)
    prompt = "ROMEO:"
    generated = model.generate(torch.tensor([ours.encode(prompt)]), 8, temperature=0)
    text = pipeline("text-generation", model=str(folder))(prompt, max_new_tokens=8,
                                                           do_sample=False)[0]["generated_text"]
    assert text == ours.decode(generated[0].tolist())


@pytest.mark.slow
def test_character_model_keeps_its_vocabulary_and_loads_back(exported, char_data, tmp_path):
    run, folder = exported["char"]
    _, ckpt = our_model(run)
    assert json.loads((folder / "meta.json").read_text()) == ckpt["meta"]
    assert not (folder / "vocab.json").exists()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["eos_token_id"] is None
    # sample.py from the folder (with meta.json's characters) writes what it writes from the
    # checkpoint: zero biases change nothing.
    flags = dict(start="ROMEO:", num_samples=1, max_new_tokens=30, temperature=0, device="cpu")
    from_folder = sample.sample(sample.SampleConfig(init_from=str(folder), **flags), io.StringIO())
    from_run = sample.sample(sample.SampleConfig(out_dir=str(run), **flags), io.StringIO())
    assert from_folder == from_run and len(from_run[0]) == len("ROMEO:") + 30
    # train.py from the folder starts where the run ended: its first evaluation (the same
    # batches, seeded) gives the run's last validation loss.
    rows = run_train(["--max_iters=2", "--eval_interval=2", f"--init_from={folder}"],
                     char_data, tmp_path / "finetuned")
    assert rows[0]["iter"] == 0 and rows[-1]["iter"] == 2
    last = [r for r in read_metrics(run) if "val_loss" in r][-1]
    assert rows[0]["val_loss"] == pytest.approx(last["val_loss"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("option", ["rope", "qk_norm", "relu2"])
def test_what_gpt2_cannot_hold_is_refused_and_nothing_written(exported, tmp_path, option,
                                                               capsys):
    # export.py decides from the checkpoint's model_args, before it reads a weight.
    ckpt = load_checkpoint(exported["char"][0] / "ckpt.pt")
    ckpt["model_args"][option] = True
    (tmp_path / "run").mkdir()
    save_checkpoint(ckpt, tmp_path / "run" / "ckpt.pt")
    hf = tmp_path / "hf"
    assert export.main([f"--out_dir={tmp_path / 'run'}", f"--hf_dir={hf}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {option}=true")
    assert not hf.exists()


@pytest.mark.slow
def test_export_refuses_to_write_over_a_folder(exported, capsys):
    run, folder = exported["char"]
    assert export.main([f"--out_dir={run}", f"--hf_dir={folder}"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert export.main([f"--out_dir={run}", f"--hf_dir={folder}", "--overwrite=true"]) == 0
    assert export.main([f"--out_dir={folder}", "--hf_dir=x"]) == 2  # no ckpt.pt there
    assert export.main([f"--out_dir={run}"]) == 2  # no hf_dir
    assert capsys.readouterr().err.count("\n") == 2
