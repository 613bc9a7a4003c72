"""The HTTP server (python -m serving.http): a real server in a subprocess on a free port, real
clients (OpenAI's own Python client, raw sockets), and the loop between them (serving/loop.py).

The model is a 2-layer, 32-wide character model with random weights drawn wide (std 0.3), so
that each prompt's greedy text is its own: a mix-up between two clients' rows would show.
"""
import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict

import pytest
import torch

import helpers
import sample
from model import GPT, GPTConfig
from serving.api import Completion
from serving.batching import Request
from serving.engine import Engine
from serving.loop import Loop
from training.checkpoint import save_checkpoint
from training.settings import parse_config

CHARS = "abcdefghijklmnopqrstuvwxyz .\n"
PROMPTS = ["to be", "or not", "the quick", "a", "hello world", "zz", "my kingdom", "x."]


def wide_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=len(CHARS), n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wide")
    model = wide_model()
    meta = {"tokenizer": "char", "vocab_size": len(CHARS), "chars": list(CHARS)}
    save_checkpoint({"model": model.state_dict(), "model_args": asdict(model.config),
                     "meta": meta}, folder / "ckpt.pt")
    return folder


class Server:
    """python -m serving.http on a free port, as a user starts it."""

    def __init__(self, out_dir, *flags):
        self.proc, self.url = helpers.start_server([f"--out_dir={out_dir}", *flags])
        self.port = int(self.url.rsplit(":", 1)[1].strip("/"))

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.load(r)

    def post(self, body, headers=None):
        """(status, headers, JSON body) of POST /v1/completions; body bytes or an object."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + "v1/completions", data, headers or {})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, r.headers, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, e.headers, json.load(e)

    def settle(self):
        """/health once nothing runs or waits (the loop has taken in what was sent)."""
        for _ in range(600):
            health = self.get("health")
            if not health["requests"]["running"] and not health["requests"]["waiting"]:
                return health
            time.sleep(0.1)
        raise AssertionError(f"requests still in flight: {health}")

    def stop(self):
        """Kill it if it runs; what it wrote on stderr."""
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.communicate()[1]


@pytest.fixture(scope="module")
def server(checkpoint):
    # Pages of 4 tokens and 4 rows: 8 clients at once queue, share rows, and take turns. A
    # buffer for every token a test asks for: a busy machine's slow thread is not "too slow".
    s = Server(checkpoint, "--page_size=4", "--kv_pages=40", "--batch_size=4",
               "--max_waiting=8", "--max_tokens=100000", "--stream_buffer=100000")
    yield s
    s.stop()


def solo(checkpoint, prompt, max_tokens, *flags):
    """What sample.py prints for prompt, greedy, one sample: the text after the prompt."""
    cfg = parse_config(sample.SampleConfig, [
        f"--out_dir={checkpoint}", f"--start={prompt}", "--num_samples=1", "--temperature=0",
        f"--max_new_tokens={max_tokens}", "--device=cpu", "--dtype=float32", *flags])
    return sample.sample(cfg, out=open("/dev/null", "w"))[0][len(prompt):]


def test_the_openai_client_completes_and_streams_what_sample_py_prints(server, checkpoint):
    from openai import OpenAI
    client = OpenAI(base_url=server.url + "v1", api_key="unused")
    [model] = client.models.list().data
    assert model.id == checkpoint.name
    expected = solo(checkpoint, "to be", 40)
    whole = client.completions.create(model=model.id, prompt="to be", max_tokens=40,
                                      temperature=0)
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (5, 40)
    chunks = list(client.completions.create(model=model.id, prompt="to be", max_tokens=40,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len(chunks) > 10  # token by token, not the whole text at the end
    # Sampled with a seed: what sample.py draws with that seed (and no top_k, as OpenAI has none).
    seeded = client.completions.create(model=model.id, prompt="to be", max_tokens=40,
                                       temperature=0.8, seed=5)
    assert seeded.choices[0].text == solo(checkpoint, "to be", 40, "--temperature=0.8",
                                          "--top_k=none", "--seed=5") != expected


def test_eight_clients_at_once_each_get_what_they_get_alone(server):
    alone = [server.post({"prompt": p, "max_tokens": 30, "temperature": 0})[2]
             for p in PROMPTS]
    assert len({a["choices"][0]["text"] for a in alone}) == len(PROMPTS)
    together, start = [None] * len(PROMPTS), threading.Barrier(len(PROMPTS))

    def client(k):
        start.wait()
        if k % 2:  # half of them stream
            together[k] = "".join(json.loads(e)["choices"][0]["text"]
                                  for e in stream_events(server, PROMPTS[k], 30)[:-1])
        else:
            together[k] = server.post({"prompt": PROMPTS[k], "max_tokens": 30,
                                       "temperature": 0})[2]["choices"][0]["text"]
    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == [a["choices"][0]["text"] for a in alone]
    # Two prompts in one request: each is its own choice, the text it gets alone.
    both = server.post({"prompt": PROMPTS[:2], "max_tokens": 30, "temperature": 0})[2]
    assert [c["text"] for c in both["choices"]] == together[:2]


def stream_events(server, prompt, max_tokens, **fields):
    """The data of each server-sent event of a streamed completion, [DONE] last."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, **fields}).encode()
    request = urllib.request.Request(server.url + "v1/completions", body)
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        text = r.read().decode()
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert events[-1] == "[DONE]", events[-3:]
    return events


def open_stream(server, prompt, max_tokens):
    """A raw socket that asked for a stream and has read its first event."""
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "stream": True}).encode()
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    seen = b""
    while b"data: {" not in seen:
        seen += conn.recv(4096)
    return conn


def test_a_client_that_leaves_mid_stream_is_cancelled_and_its_pages_come_back(server):
    before = server.settle()
    other = threading.Thread(target=lambda: results.append(stream_events(server, "a", 300)))
    results = []
    leaving = open_stream(server, "to be", 100000)  # it would run for minutes
    other.start()
    leaving.close()
    other.join()
    after = server.settle()
    assert after["requests"]["cancelled"] == before["requests"]["cancelled"] + 1
    assert after["requests"]["served"] == before["requests"]["served"] + 1  # the other one
    assert after["kv_pages"]["held"] == 0
    assert json.loads(results[0][-2])["choices"][0]["finish_reason"] == "length"


BAD = [  # (body, status, the field the error names)
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b"\xff\xfe", 400, None),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": ["a", 5]}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": 10 ** 30}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": 10 ** 400}, 400, "max_tokens"),  # past any float
    ({"prompt": "a", "temperature": 1e400}, 400, "temperature"),  # JSON's 1e400: inf
    ({"prompt": "a", "max_tokens": True}, 400, "max_tokens"),
    ({"prompt": "a", "temperature": -1}, 400, "temperature"),
    ({"prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"prompt": "a", "seed": -1}, 400, "seed"),
    ({"prompt": "a", "stream": "yes"}, 400, "stream"),
    ({"prompt": "a", "stop": ["\n"]}, 400, "stop"),
    ({"prompt": "a", "n": 2}, 400, "n"),
    ({"prompt": "a", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "A"}, 400, "prompt"),  # not in the character model's vocabulary
    ({"prompt": ""}, 400, "prompt"),  # a character model starts from a character
    ({"prompt": "a" * 65}, 400, "prompt"),  # longer than its context of 64
    ({"prompt": ["a"] * 9}, 400, "prompt"),  # more than the queue (8) ever holds
]


def test_bad_requests_get_a_4xx_naming_the_field_and_the_server_goes_on(server):
    for body, status, param in BAD:
        got, _, answer = server.post(body)
        assert (got, answer["error"]["param"]) == (status, param), (body, answer)
        assert answer["error"]["message"], body
    # A body over the size limit, and one without a length: refused before it is read.
    assert server.post(b"x" * (2 << 20))[0] == 413
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
    assert conn.recv(100).startswith(b"HTTP/1.1 411")
    assert server.post({"prompt": "a", "max_tokens": 3})[0] == 200
    assert server.get("health")["kv_pages"]["held"] == 0


def test_the_pool_a_request_cannot_fit_and_the_api_key(checkpoint):
    # 4 pages of 4 tokens: a request that would reach 17 tokens (the last token drawn is not
    # cached) can never run. And a key, on every network (0.0.0.0), which it warns of.
    s = Server(checkpoint, "--page_size=4", "--kv_pages=4", "--api_key=sesame", "--host=0.0.0.0")
    try:
        key = {"Authorization": "Bearer sesame"}
        status, _, answer = s.post({"prompt": "to be", "max_tokens": 13}, key)
        assert status == 400 and answer["error"]["param"] == "max_tokens", answer
        assert "raise kv_pages" in answer["error"]["message"]
        assert s.post({"prompt": "to be", "max_tokens": 12}, key)[0] == 200
        for wrong in ({}, {"Authorization": "Bearer sesamf"}, {"Authorization": "sesame"}):
            assert s.post({"prompt": "a"}, wrong)[0] == 401
        assert s.get("health")["status"] == "ok"  # open, for load balancers' probes
    finally:
        err = s.stop()
    assert err.startswith("warning: listening on 0.0.0.0, beyond this machine"), err


def test_sigterm_ends_every_stream_cleanly_and_exits_at_once(checkpoint):
    # One row, one place in the queue: a third request is refused, 503 with Retry-After.
    s = Server(checkpoint, "--batch_size=1", "--max_waiting=1", "--max_tokens=100000",
               "--stream_buffer=100000")
    try:
        results = {}

        def read(name):
            results[name] = stream_events(s, "to be", 100000)
        running = threading.Thread(target=read, args=("running",))
        running.start()
        while s.get("health")["requests"]["running"] < 1:
            time.sleep(0.05)
        waiting = threading.Thread(target=read, args=("waiting",))
        waiting.start()
        while s.get("health")["requests"]["waiting"] < 1:
            time.sleep(0.05)
        status, headers, answer = s.post({"prompt": "a", "max_tokens": 5})
        assert status == 503 and headers["Retry-After"] and "busy" in answer["error"]["message"]
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(timeout=60)
        seconds = time.monotonic() - t0
        running.join()
        waiting.join()
    finally:
        s.stop()
    assert s.proc.returncode == 0
    print(f"exited {seconds:.2f} s after SIGTERM")  # 1.0 s on the 2-core VM, load average 2
    for name in ("running", "waiting"):  # both end with a last event, then [DONE]
        last = json.loads(results[name][-2])["choices"][0]
        assert last["finish_reason"] == "abort", (name, last)
    assert len(results["running"]) > 2  # it had streamed


# The loop without a server: what the HTTP tests cannot time exactly.

def loop_of(max_waiting=4, buffer=4):
    engine = Engine(wide_model(), [], rows=2, page_size=4, kv_pages=32)
    return Loop(engine, max_waiting, buffer)


def completion(prompts, max_tokens=20):
    return Completion([[CHARS.index(c) for c in p] for p in prompts], max_tokens,
                      dict(temperature=0, top_k=None, top_p=1), 0, True, False)


def test_the_queue_is_bounded():
    loop = loop_of(max_waiting=3)
    assert loop.submit(completion(["ab", "cd"])) is not None
    assert loop.submit(completion(["ef", "gh"])) is None  # 4 would wait: refused
    assert loop.submit(completion(["ef"])) is not None
    with torch.no_grad():
        loop.turn()  # two of the three start (2 rows), one waits
    assert loop.waiting == 1 and loop.counts["refused"] == 1
    assert loop.submit(completion(["ij", "kl"])) is not None  # room again, for two
    assert loop.submit(completion(["mn"])) is None


def test_a_reader_that_falls_behind_is_cancelled_and_frees_its_pages():
    loop = loop_of(buffer=4)
    slow, quick = loop.submit(completion(["to be"])), loop.submit(completion(["or not"], 6))
    with torch.no_grad():
        loop.turn()
        while loop.engine.running:  # (turn() waits for work when there is none)
            loop.turn()
            while not quick.tokens.empty():  # this one reads as the tokens come
                quick.tokens.get()
    assert loop.counts["too slow"] == 1 and loop.counts["served"] == 1
    items = [slow.tokens.get() for _ in range(slow.tokens.qsize())]
    assert [item for _, item in items[-1:]] == ["abort"] and len(items) == 5
    assert not loop.engine.running and loop.engine.prefix.available() == 32


def test_a_cancelled_request_gives_its_pages_back_before_the_next_step():
    loop = loop_of()
    reply = loop.submit(completion(["to be"], 50))
    with torch.no_grad():
        loop.turn()
        loop.turn()
        assert loop.engine.pool.n_pages - loop.engine.prefix.available() > 0
        loop.cancel(reply)
        loop.turn()
    assert not loop.engine.running and loop.engine.prefix.available() == 32
    assert loop.counts["cancelled"] == 1
    assert isinstance(list(reply.tokens.queue)[-1][1], str)


def test_the_engine_serves_requests_added_while_others_run():
    model = wide_model()
    ids = [[CHARS.index(c) for c in p] for p in PROMPTS[:3]]
    alone = [model.generate_tokens(torch.tensor([x]), 12, temperature=0) for x in ids]
    alone = [[int(t) for t in a] for a in alone]
    engine = Engine(model, [Request(ids[0], 12)], rows=4, page_size=4, kv_pages=32,
                    temperature=0)
    out = {}
    with torch.no_grad():
        for step in range(40):
            if step in (3, 5):  # arrive while the first decodes
                engine.add(Request(ids[1 if step == 3 else 2], 12))
            if engine.waiting or engine.running:
                for i, token in engine.step()[0]:
                    out.setdefault(i, []).append(token)
    assert [out[i] for i in range(3)] == alone
