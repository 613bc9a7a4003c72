"""tools/load.py against a fake OpenAI-style server in a thread: the times it measures are at
least the delays the fake sleeps, its counts are exact, a 503 is rejected and a 400 failed; and
the nearest-rank percentile and the Poisson arrivals on known values. No model."""
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from tools import load

FIRST = 0.2  # seconds the fake waits before its first token
GAP = 0.02  # seconds between its next tokens
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class FakeServer(BaseHTTPRequestHandler):
    """Streams max_tokens tokens "t", FIRST then GAP seconds apart, then the usage chunk if asked,
    as serving/http.py does. The prompt "FULL" is answered 503 (the queue is full), "BAD" 400
    (an error of the request); "HELD" has its first two tokens in one event, as a character
    made of two tokens is sent once whole; "PLAIN" has no usage chunk, as a simpler server."""

    def do_GET(self):
        self.reply(200, {"status": "ok"})

    authorization = []  # the Authorization header of each request

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.authorization.append(self.headers.get("Authorization"))
        if request["prompt"] == "FULL":
            return self.reply(503, {"error": {"message": "queue full"}}, {"Retry-After": "1"})
        if request["prompt"] == "BAD":
            return self.reply(400, {"error": {"message": "max_tokens too large"}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        n = request["max_tokens"]
        for i in range(n):
            time.sleep(FIRST if i == 0 else GAP)
            if not (request["prompt"] == "HELD" and i == 0):
                self.event([{"text": "é" if i == 1 else "t", "finish_reason": None}])
        self.event([{"text": "", "finish_reason": "length"}])
        if request["stream_options"]["include_usage"] and request["prompt"] != "PLAIN":
            usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
            self.event([], usage=usage)
        self.wfile.write(b"data: [DONE]\n\n")

    def event(self, choices, **extra):
        chunk = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "fake",
                 "choices": [{"index": 0, "logprobs": None, **c} for c in choices], **extra}
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.flush()

    def reply(self, status, body, headers=()):
        self.send_response(status)
        for key, value in dict(headers).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture(scope="module")
def url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_percentile_by_nearest_rank():
    # Nearest rank: the ceil(p/100 * n)-th smallest. With 1..10, p90 is the 9th and p99 the 10th.
    values = list(range(10, 0, -1))  # unsorted on purpose
    assert [load.percentile(values, p) for p in (0, 10, 50, 90, 99, 100)] == [1, 1, 5, 9, 10, 10]
    # Wikipedia's example of the method: 15, 20, 35, 40, 50.
    values = [15, 20, 35, 40, 50]
    assert [load.percentile(values, p) for p in (5, 30, 40, 50, 100)] == [15, 20, 20, 35, 50]
    assert load.percentile([7.5], 99) == 7.5
    assert load.percentile([], 50) is None


def test_arrivals_are_poisson_at_the_rate():
    times = load.arrivals(4.0, 20_001, np.random.default_rng(0))
    assert times[0] == 0 and np.all(np.diff(times) >= 0)
    gaps = np.diff(times)
    # The mean of 20,000 exponential gaps of mean 0.25 has a standard deviation of
    # 0.25 / sqrt(20,000) = 0.0018: 3% off (4 of those) is about 1 chance in 30,000.
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    # An exponential's standard deviation equals its mean (a fixed gap's would be 0).
    assert gaps.std() == pytest.approx(0.25, rel=0.05)
    assert list(load.arrivals(float("inf"), 3, np.random.default_rng(0))) == [0, 0, 0]


def test_one_stream_is_timed(url):
    cfg = load.LoadConfig(url=url, max_tokens=5)
    result = load.stream_one(cfg, "hello", seed=0)
    assert (result.outcome, result.tokens, result.error) == ("ok", 5, "")
    # Lower bounds only: a busy machine makes every time longer, never shorter.
    assert result.ttft >= FIRST
    assert result.tpot >= GAP
    assert result.e2e >= FIRST + 4 * GAP
    assert result.e2e >= result.ttft + 4 * result.tpot - 1e-9
    # Two tokens in one event: the usage chunk still counts five.
    held = load.stream_one(cfg, "HELD", seed=0)
    assert (held.outcome, held.tokens) == ("ok", 5) and held.ttft >= FIRST + GAP
    # Without the usage chunk, each event is a token.
    assert load.stream_one(cfg, "PLAIN", seed=0).tokens == 5


def test_the_api_key_is_sent(url):
    load.stream_one(load.LoadConfig(url=url, max_tokens=1, api_key="sesame"), "hi", seed=0)
    assert FakeServer.authorization[-1] == "Bearer sesame"
    load.stream_one(load.LoadConfig(url=url, max_tokens=1), "hi", seed=0)
    assert FakeServer.authorization[-1] is None


def test_a_first_request_that_fails_stops_the_run(url, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("BAD\nto be\n")
    assert load.main([f"--url={url}", f"--prompts={prompts}"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: a first request to {url} failed: HTTP 400")
    assert captured.out == ""  # no table begun


def test_a_full_server_is_rejected_and_an_error_failed(url, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("to be\nFULL\nBAD\nor not\n")
    out, picture = tmp_path / "rows.jsonl", tmp_path / "load.png"
    argv = [f"--url={url}", "--rate=inf,50", "--requests=4", "--max_tokens=3",
            f"--prompts={prompts}", f"--out={out}", f"--plot={picture}"]
    assert load.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["rate"] for row in rows] == ["inf", 50]  # JSON has no infinity
    for row in rows:
        assert (row["requests"], row["rejected"], row["failed"]) == (4, 1, 1)
        assert row["output_tokens"] == 2 * 3  # two answered, three tokens each
        assert row["first_error"].startswith("HTTP 400")
        assert row["ttft_p50"] >= FIRST and row["tpot_p99"] >= GAP
        assert row["e2e_p90"] >= FIRST + 2 * GAP
        assert 0 < row["req_per_s"] and row["tok_per_s"] == pytest.approx(3 * row["req_per_s"])
    assert picture.read_bytes()[:8] == PNG_SIGNATURE
    printed = capsys.readouterr()
    table = printed.out.splitlines()
    assert table[0].split()[:2] == ["offered", "achieved"] and "TTFT ms" in table[0]
    assert table[2].split()[0] == "inf" and table[2].split()[-2:] == ["1", "1"]
    assert "the first that failed: HTTP 400" in printed.err
    # A second run drawn beside the first: the rows of --out read back, under their label.
    again = tmp_path / "again.png"
    argv = [f"--url={url}", "--rate=inf", "--requests=2", "--max_tokens=3", "--label=b",
            f"--prompts={prompts}", f"--plot={again}", f"--compare={out}"]
    assert load.main(argv) == 0 and again.read_bytes()[:8] == PNG_SIGNATURE
    assert list(load.read_rows(str(out))) == [str(out)]  # unlabelled: named by its file


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv, message", [
    (["--url=http://127.0.0.1:{port}"], "error: cannot reach http://127.0.0.1:"),
    (["--rate=0,1"], "error: rate must be positive numbers or inf"),
    (["--rate=fast"], "error: rate must be positive numbers or inf"),
    (["--url=localhost:8000"], "error: url must look like http://HOST:PORT"),
    (["--plot=load.jpg"], "error: plot must end in .png, .pdf or .svg"),
    (["--out=/no/such/folder/rows.jsonl"], "error: out: cannot write"),
])
def test_mistakes_are_one_line(argv, message, capsys):
    argv = [a.format(port=free_port()) for a in argv]
    assert load.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_a_missing_dataset_says_how_to_give_prompts(url, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/ here
    assert load.main([f"--url={url}", "--dataset=nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no prompts from data/nope") and "--prompts=FILE" in err


def test_prompts_are_slices_of_the_dataset(tmp_path, monkeypatch):
    from data.preparation import prepare_text
    monkeypatch.chdir(tmp_path)
    text = "".join(chr(ord("a") + i % 26) for i in range(10000))
    prepare_text(text, tmp_path / "data" / "tiny", "char")
    cfg = load.LoadConfig(dataset="tiny", prompt_tokens=10, requests=50)
    prompts = load.read_prompts(cfg, np.random.default_rng(0))
    assert len(prompts) == 50 and all(len(p) == 10 and p in text for p in prompts)
    assert len(set(prompts)) > 1  # drawn at random, not one slice 50 times
