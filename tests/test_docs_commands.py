"""Every command line in README.md and docs/*.md runs as written: in one scratch folder, in the
order the pages give them, at tiny sizes by flags appended to each. A script runs by its path,
a tool (python -m tools.NAME) as the module it names, as from the repository root. The few
that cannot run here are listed below with the reason, and their settings are still checked; a
new command that is neither runnable nor listed fails the test."""
import contextlib
import os
import re
import shlex
import subprocess

import pytest

from helpers import ROOT, TORCHRUN, main_of, quiet_env, start_server
from training.settings import TrainConfig, parse_config

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = {"python", "python3", "torchrun", "pip", "printf", "/usr/bin/time", "mkdir", "cp",
            "git", "bash", "curl", "wget", "cd", "export"}

# What cannot run here, and why. Their training settings are parsed all the same.
DOWNLOAD = "downloads from the Hugging Face hub; the tests run offline"
CANNOT_RUN = {
    "pip install -r requirements.txt": "installs from the network",
    "pip install -r requirements-test.txt": "installs from the network",
    "pip install huggingface_hub": "installs from the network",
    "python -m pytest -q": "the test suite itself, which holds this test",
    "python -m pytest -q -m \"not slow\"": "the test suite itself, which holds this test",
    "python train.py config/finetune_shakespeare.toml": DOWNLOAD + " (OpenAI's GPT-2)",
    "python train.py config/eval_gpt2.toml": DOWNLOAD + " (OpenAI's GPT-2)",
    "python -m tools.hellaswag --init_from=gpt2": DOWNLOAD + " (OpenAI's GPT-2 and HellaSwag)",
    "python sample.py --init_from=gpt2 --start=FILE:prompt.txt --max_new_tokens=200":
        DOWNLOAD + " (OpenAI's GPT-2)",
    "torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.toml":
        "8 processes, one per GPU of an 8-GPU machine",
    "torchrun --standalone --nproc_per_node=8 train.py config/finetune_gpt2_xl_fsdp.toml":
        "8 GPUs, and " + DOWNLOAD + " (OpenAI's GPT-2 XL)",
    **{f"torchrun --nnodes=2 --node_rank={rank} --nproc_per_node=8 --master_addr=10.0.0.1 "
       "--master_port=29500 train.py config/train_gpt2.toml --batch_size=15 "
       "--gradient_accumulation_steps=32": "two machines of 8 GPUs" for rank in (0, 1)},
}

# Appended to every run: a 1-layer, 32-wide model for 2 iterations on the CPU. Appended flags
# override the command's own; compiling is turned off (a cold compile takes a minute here, and
# tests/test_train.py and tests/test_serve.py compile).
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2",
        "--device=cpu", "--dtype=float32", "--compile=false"]
TRAIN = [*TINY, "--max_iters=2", "--eval_iters=1", "--eval_interval=2", "--log_interval=1",
         "--gradient_accumulation_steps=2", "--wandb_log=false"]
RESUME = ["--max_iters=4", "--eval_iters=1", "--eval_interval=2", "--device=cpu"]
BENCH = [*TINY, "--warmup_steps=0", "--timed_steps=1",
         "--compiles=false", "--prompt_tokens=4", "--max_new_tokens=4", "--sample_repeats=1",
         "--batch_sizes=1,2", "--serve_requests=2", "--serve_slots=2"]
SAMPLE = ["--max_new_tokens=4", "--device=cpu", "--compile=false"]
PORT = "127.0.0.1:8000"  # the server's address in the pages; here a free port instead


class Served:
    """The server a page's `python -m serving.http` starts, in the background, for the commands
    after it (curl, an OpenAI client, the load tool) to call at its real address."""

    def __init__(self):
        self.proc, self.address = None, PORT

    def start(self, args, folder):
        self.stop()
        self.proc, url = start_server([*args, "--device=cpu"], folder)
        self.address = url.split("/")[2]  # host:port

    def client(self, cmd, folder):
        """Run a command that calls the server, at the server's real address."""
        assert self.proc is not None, f"{cmd}: no server started before it"
        words = shlex.split(cmd.replace(PORT, self.address))
        if "tools.load" in words:  # 3 requests a rate: seconds, not minutes
            words.append("--requests=3")
        proc = subprocess.run(words, cwd=folder,
                              capture_output=True, text=True, timeout=300,
                              env=quiet_env(PYTHONPATH=str(ROOT)))
        assert proc.returncode == 0 and proc.stdout.strip(), (cmd, proc.stderr[-2000:])
        assert '"error"' not in proc.stdout, (cmd, proc.stdout[-2000:])  # curl exits 0 on a 4xx

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            assert self.proc.wait(timeout=60) == 0, self.proc.stderr.read()
            self.proc = None


def code_lines(text):
    """The lines of a page's code blocks: ``` fences, and blocks indented by four spaces after a
    blank line. A line ending in a backslash goes on in the next one."""
    lines, fenced, indented, previous_blank = [], False, False, True
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            indented = line.startswith("    ") and (indented or previous_blank)
            previous_blank = not line.strip()
        if fenced or indented:
            if lines and lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1].rstrip() + " " + line.strip()
            else:
                lines.append(line.strip())
    return lines


def commands(page):
    """The commands of a page, in order: each code line whose first word names a program (after
    VAR=value settings), split at &&, without its trailing # comment."""
    found = []
    for line in code_lines(page.read_text()):
        line = re.sub(r"\s+#\s.*$", "", line)
        for part in line.split("&&"):
            words = part.split()  # output shown in a block may not parse as shell words
            program = next((w for w in words if not re.match(r"^[A-Z_]+=", w)), "")
            if program in PROGRAMS:
                found.append(" ".join(part.split()))
    return found


def all_commands():
    return [(page.relative_to(ROOT).as_posix(), cmd) for page in PAGES for cmd in commands(page)]


def test_the_pages_hold_commands_and_every_listed_one_is_still_there():
    found = {cmd for _, cmd in all_commands()}
    assert len(found) > 40 and "python train.py" in found and "python sample.py" in found
    assert set(CANNOT_RUN) <= found, set(CANNOT_RUN) - found  # the list does not rot


def script_argv(cmd):
    """The script and arguments of a command: no env settings, no /usr/bin/time, no python.
    The script is a file's absolute path, or for python -m a module's name ("tools.bench");
    config files are named by their absolute path."""
    words = [w for w in shlex.split(cmd) if not re.match(r"^[A-Z_]+=", w)]
    if words[0] == "/usr/bin/time":
        words = words[3:]  # -f FORMAT
    words = words[1:]  # python, or torchrun's options up to its script
    while words[0].startswith("--"):
        words = words[1:]
    module = words[0] == "-m"
    words = words[module:]

    def repo(word):
        head, eq, path = word.rpartition("=")
        return head + eq + str(ROOT / path) if path.startswith("config/") else word
    return words[0] if module else str(ROOT / words[0]), [repo(w) for w in words[1:]]


@contextlib.contextmanager
def inside(folder):
    here = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(here)


def run_one(cmd, folder, char_data, shakespeare_path, overwrite=True, served=None):
    """Run one command in folder, in this process where the script has a main(argv)."""
    if cmd.startswith("printf"):
        subprocess.run(cmd, shell=True, cwd=folder, check=True)
        return
    if cmd.startswith(("curl ", "python -c ")) or PORT in cmd:  # a client of the server
        served.client(cmd, folder)
        return
    script, args = script_argv(cmd)
    name = os.path.relpath(script, ROOT) if os.path.isabs(script) else script
    if name.startswith("data/"):  # from the shared copy, into the scratch folder
        if "prepare.py" in name and "shakespeare" in name:
            out = folder / "data" / os.path.basename(os.path.dirname(script))
            extra = [f"--input={shakespeare_path}", f"--out_dir={out}"]
        elif name == "data/prepare.py":
            (folder / "my.txt").write_text(shakespeare_path.read_text()[:20_000])
            extra = []
        else:  # a web corpus: a local text file instead of the download
            extra = ["--input", str(shakespeare_path), "--out_dir", str(folder / "data" / "web"),
                     "--num_proc", "1", "--shard_size", "200000", "--val_tokens", "1000"]
        args = [*args, *extra]
    elif name == "train.py" and args != ["--help"]:
        # A resumed run takes its data from its checkpoint. A fresh one replaces an earlier
        # command's run only where overwrite says so: not in the README, whose commands each
        # name an out_dir of their own, so that they run in order in one clone.
        resume = "--init_from=resume" in args
        args = [*args, *([*TINY, *RESUME] if resume else [*TRAIN, f"--data_dir={char_data}"]),
                *(["--overwrite=true"] if overwrite and not resume else [])]
    elif name == "sample.py":
        args = [*args, *SAMPLE]
    elif name == "tools.bench":
        args = [*args, *BENCH]
    elif name == "serving.http":
        served.start(args, folder)
        return
    status = main_of(script)(args)
    assert status in (0, None) or isinstance(status, dict), (cmd, status)


@pytest.mark.slow
def test_every_command_runs_as_written(char_data, shakespeare_path, tmp_path, capsys):
    folder = tmp_path
    (folder / "docs").mkdir()  # plot.py ... --out=docs/loss_cpu_recipe.png
    (folder / "prompt.txt").write_text("ROMEO:")
    # out-shakespeare is what the finetuning command writes, from OpenAI's weights: a stand-in
    # of GPT-2's architecture, so that the commands that read it run.
    gpt2_like = ["--rope=false", "--qk_norm=false", "--relu2=false", "--bias=true"]
    with inside(folder):
        run_one("python train.py --out_dir=out-shakespeare " + " ".join(gpt2_like), folder,
                char_data, shakespeare_path)
    ran, served = [], Served()
    for page, cmd in all_commands():
        words = cmd.split()
        if cmd in CANNOT_RUN or words[0] == "torchrun" and "train.py" not in words:
            continue
        if words[0] == "torchrun":  # here in one process, so that the commands after it find
            # its checkpoint; test_every_torchrun_command_runs_as_written runs it as written
            cmd = "python " + " ".join(w for w in words[words.index("train.py"):]
                                       if w.split("=")[0] not in ("--tp", "--fsdp", "--pp"))
        if cmd in ran:  # a command that two pages give runs once
            continue
        with inside(folder):
            try:
                run_one(cmd, folder, char_data, shakespeare_path, page != "README.md", served)
            except SystemExit as e:
                assert not e.code, f"{page}: {cmd}: {e}"
        ran.append(cmd)
        capsys.readouterr()  # keep the captured output small
    served.stop()
    assert "python sample.py" in ran
    for tool in ("bench", "estimate", "export", "plot"):  # each tool's commands ran here
        assert any(c.startswith(f"python -m tools.{tool} ") for c in ran), tool


def torchrun_commands():
    return sorted({cmd for _, cmd in all_commands()
                   if cmd.split()[0] == "torchrun" and cmd not in CANNOT_RUN})


@pytest.mark.slow
@pytest.mark.parametrize("cmd", torchrun_commands())
def test_every_torchrun_command_runs_as_written(cmd, char_data, tmp_path):
    script, args = script_argv(cmd)
    nproc = next(int(w.split("=")[1]) for w in cmd.split() if w.startswith("--nproc_per_node="))
    launcher = [*TORCHRUN[:-1], f"--nproc_per_node={nproc}"]
    extra = BENCH if script == "tools.bench" else TRAIN
    if script == str(ROOT / "train.py"):
        extra = [*extra, f"--data_dir={char_data}"]
    pp = next((w.split("=")[1] for w in cmd.split() if w.startswith("--pp=")), None)
    if pp and script == str(ROOT / "train.py"):  # a layer a stage: TRAIN's one does not split
        extra = [*extra, f"--n_layer={pp}"]
    if "--pp_sleep_ms=80" in cmd:  # the bubble's shape, in a tenth of the time
        extra = [*extra, "--pp_sleep_ms=8"]
    # torchrun -m imports the module as python -m does, here from the repository, as in a clone
    target = [script] if os.path.isabs(script) else ["-m", script]
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.run([*launcher, *target, *args, *extra],
                          capture_output=True, text=True, env=quiet_env(PYTHONPATH=path),
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("cmd", sorted(c for c in CANNOT_RUN if "train.py" in c))
def test_the_commands_that_cannot_run_here_have_valid_settings(cmd, monkeypatch):
    monkeypatch.chdir(ROOT)  # they name config files from the repository root
    words = shlex.split(cmd)
    args = words[next(i for i, w in enumerate(words) if w.endswith(".py")) + 1:]
    cfg = parse_config(TrainConfig, args).validate()
    words = {w.split("=")[0]: w.split("=")[-1] for w in words if w.startswith("--")}
    processes = int(words.get("--nnodes", 1)) * int(words.get("--nproc_per_node", 1))
    assert cfg.gradient_accumulation_steps % processes == 0
