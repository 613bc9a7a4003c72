"""How docs/gpu_check.py runs each part's command: from the repository root, its output into
the log as it comes, for at most the part's budget of seconds, then stopped as a whole process
group; and how it reads the JSON that a command wrote."""
import contextlib
import json
import os
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Log:
    """Each line to the terminal and to the log file, as it comes."""

    def __init__(self, path):
        self.file = open(path, "w")
        self.lock = threading.Lock()

    def __call__(self, line):
        with self.lock:
            print(line, flush=True)
            self.file.write(line + "\n")
            self.file.flush()


def run_command(cmd, budget, log, env=None, stop_when=None):
    """Run cmd from the repository root, its output into the log, for at most budget seconds;
    stop_when() (polled each half second) true stops it early. Returns (status, seconds, the
    last line it printed).

    The command gets a process group of its own, and stopping sends SIGTERM to the whole
    group (torch.compile's workers too): train.py then saves and exits, as it would on a
    preempted machine. Whatever is left 20 s later is killed. The group stays in this
    script's session, so that whoever stops the script stops it too."""
    log(f"$ {shlex.join(cmd)}    # budget {budget} s")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            process_group=0)

    last = [""]

    def pump():  # the output into the log, line by line, while the command runs
        for line in proc.stdout:
            log(line.rstrip("\n"))
            last[0] = line.strip() or last[0]

    reader = threading.Thread(target=pump)
    reader.start()
    status = None
    try:
        while proc.poll() is None and status is None:
            if time.time() - t0 > budget:
                status = "timeout"
            elif stop_when is not None and stop_when():
                status = "stopped"
            else:
                time.sleep(0.5)
    finally:  # also when this script is interrupted: nothing of the part runs on
        stop_group(proc)
    reader.join(10)
    seconds = round(time.time() - t0, 1)
    if status is None:
        status = "ok" if proc.returncode == 0 else f"failed (exit code {proc.returncode})"
    log(f"# {status} after {seconds} s")
    return status, seconds, last[0]


def stop_group(proc):
    """SIGTERM to proc's process group if proc still runs, SIGKILL after 20 s; then SIGKILL to
    whatever is left of the group (compile workers)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def extra(text):
    return shlex.split(text)


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
