"""Serve a trained model over HTTP to many clients at once, as OpenAI's completions API does.

    python -m serving.http --out_dir=out-shakespeare-char     # then open http://127.0.0.1:8000/
    curl -N 127.0.0.1:8000/v1/completions -d '{"prompt": "ROMEO:", "stream": true}'  # 16 tokens

Any OpenAI client works unchanged: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").
GET / is a playground page (serving/playground.html), GET /v1/models names the model and its
settings, GET /health counts the requests and the KV cache's pages.

How a request travels:
1. Socket. http.server accepts the connection and gives it a thread of its own (Handler),
   which reads the request and checks it (serving/api.py). Bad input is answered 4xx there,
   and never reaches the model.
2. Queue. The thread hands the prompts to the engine's loop (Loop.submit). If max_waiting
   requests are waiting already it answers 503 at once, with Retry-After: the backlog is
   bounded, and a client learns at once to come back later rather than time out.
3. Step. One thread, the loop, owns the engine (serving/engine.py) and the model. Between two
   steps it takes in what arrived, so that a new request joins at the next step, and what was
   cancelled; then it runs one step for every running request.
4. Tokens back. Each token drawn goes into its request's own bounded buffer (Reply); the
   request's thread takes it out and writes it to the socket, as a server-sent event when
   streaming. A reader slower than the engine fills its buffer and is cancelled: it never
   slows the others. A client that leaves is noticed by its thread, which cancels the request,
   and its pages are back in the pool before the next step.

Why one loop on one thread: a step is one forward over every running request's tokens, and its
cost is reading the weights (docs/inference.md); two threads stepping would each read them all
for half the rows, and the engine's pages would need locks. The connections' threads only wait,
on the network or on their buffers, with the GIL released.

Why the standard library's http.server and not FastAPI with uvicorn (the field's convention, in
vLLM and nanochat): nothing to install, and each step above is code on this page. Async would
let one thread hold thousands of idle connections; here the engine, not the connections, is
what runs out. What a production server adds: HTTP/1.1 keep-alive and HTTP/2, TLS, hardened
parsing, rate limits per client; put this behind a reverse proxy (nginx, Caddy) before it faces
the internet, and Python's own docs warn http.server is not meant for production.
"""
import codecs
import json
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from training import process

process.limit_openmp_spin()  # before torch loads OpenMP, which reads it once

from data.tokenizer import TokenizerError, tokenizer_from_meta  # noqa: E402
from serving import api  # noqa: E402
from serving.batching import Request  # noqa: E402
from serving.engine import Engine, ServingError  # noqa: E402
from serving.loop import Loop  # noqa: E402
from serving.loading import default_kv_pages, load_model  # noqa: E402
from training import runtime  # noqa: E402
from training.safe_load import CheckpointError  # noqa: E402
from training.settings import ConfigError, check_dtype, run_main  # noqa: E402

PLAYGROUND = os.path.join(os.path.dirname(os.path.abspath(__file__)), "playground.html")
LOCAL = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    init_from: str = "resume"  # resume (the checkpoint in out_dir), gpt2*, or a weights folder
    out_dir: str = "out-shakespeare-char"  # with init_from=resume; `python train.py` writes here
    host: str = "127.0.0.1"  # the address to listen on; 0.0.0.0 is every network: set api_key
    port: int = 8000  # 0 picks a free one (the line printed at the start names it)
    api_key: str = ""  # if set, /v1/ requests must carry "Authorization: Bearer <api_key>"
    batch_size: int = 16  # requests decoded together, at most (the engine's rows)
    page_size: int = 16  # tokens of keys and values per page of the KV cache
    kv_pages: int = 0  # pages in the KV cache; 0: block_size for each row, within half the memory
    prefill_chunk: int = 256  # tokens of a prompt prefilled per step, beside the others' decode
    max_tokens: int = 1024  # the most tokens one completion may ask for
    max_waiting: int = 64  # requests waiting for a row, at most; more are answered 503
    stream_buffer: int = 256  # tokens drawn for a request and not yet sent; past it, cancelled
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto, float32, bfloat16 or float16
    log_requests: bool = False  # a line on stderr for every request

    def validate(self):
        """Reject values no server can use; the message names the setting."""
        for name in ("batch_size", "page_size", "prefill_chunk", "max_tokens", "max_waiting",
                     "stream_buffer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.kv_pages < 0:
            raise ConfigError(f"kv_pages must be 0 (fit the memory) or more, got {self.kv_pages}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be from 0 to 65535, got {self.port}")
        check_dtype(self.dtype)
        return self


class Server(ThreadingHTTPServer):
    """http.server's threaded server (a thread per connection), keeping what handlers need."""
    daemon_threads = False  # server_close() joins every connection's thread: none is left
    # Connections the kernel holds until they are accepted; socketserver's default, 5, resets
    # the rest of a burst of clients before they could even be answered 503.
    request_queue_size = 128

    def __init__(self, cfg, loop, name, tokenizer, settings):
        self.cfg, self.loop, self.name, self.tokenizer = cfg, loop, name, tokenizer
        self.settings = settings  # the model's, for /v1/models
        self.connections, self.lock = set(), threading.Lock()  # the open ones, for a stop
        self.address_family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        super().__init__((cfg.host, cfg.port), Handler)

    def cut_connections(self, grace):
        """After grace seconds, shut the sockets of connections still open (a reader that does
        not read, a client that never finished its request): their threads then end."""
        for _ in range(int(grace * 10)):
            with self.lock:
                if not self.connections:
                    return
            time.sleep(0.1)
        with self.lock:
            for connection in self.connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class ClientLeft(Exception):
    """The client closed its connection (or the engine failed): nobody to answer."""


class Handler(BaseHTTPRequestHandler):
    """One connection's thread (steps 1 and 4): one request, then the connection closes
    (so no idle connection holds a thread). HTTP/1.1 for curl's "Expect: 100-continue"."""
    timeout = 30  # seconds a client may take to send its request, or to take what is written
    server_version = "nanoGPT-serving"
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        with self.server.lock:
            self.server.connections.add(self.connection)

    def finish(self):
        with self.server.lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format, *args):
        if self.server.cfg.log_requests:
            super().log_message(format, *args)

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request, an unknown method), as JSON."""
        self.send_json(code, api.APIError(code, message or self.responses[code][0]).body())

    def do_GET(self):
        path = urlsplit(self.path).path
        try:
            if path == "/":
                with open(PLAYGROUND, "rb") as f:
                    self.send(200, f.read(), "text/html; charset=utf-8")
            elif path == "/health":  # open to all, as a load balancer probes it
                self.send_json(200, self.server.loop.health)
            elif path == "/v1/models":
                api.authorize(self.headers, self.server.cfg.api_key)
                self.send_json(200, {"object": "list", "data": [
                    {"id": self.server.name, "object": "model", "created": 0,
                     "owned_by": "you", "settings": self.server.settings}]})
            else:
                raise api.APIError(404, f"no such route: GET {path}", code="not_found")
        except api.APIError as e:
            self.send_json(e.status, e.body())

    def do_POST(self):
        path, loop = urlsplit(self.path).path, self.server.loop
        try:
            # The body first, whatever the answer: a body left unread can reset the connection.
            body = api.read_body(self.headers, self.rfile)
            if path != "/v1/completions":
                raise api.APIError(404, f"no such route: POST {path} (this server has "
                                        "/v1/completions)", code="not_found")
            api.authorize(self.headers, self.server.cfg.api_key)
            completion = api.parse_completion(
                api.parse_body(body), self.server.name, self.server.tokenizer,
                self.server.settings["block_size"], self.server.cfg.max_tokens)
            if len(completion.prompts) > loop.max_waiting:
                raise api.APIError(400, f"prompt: {len(completion.prompts)} prompts, more than "
                                        f"the server queues at once ({loop.max_waiting})",
                                   "prompt")
            for ids in completion.prompts:  # larger than the whole KV cache: it would hang
                try:
                    loop.engine.check(Request(ids, completion.max_tokens))
                except ServingError as e:
                    raise api.APIError(400, f"max_tokens: the prompt with them {e}",
                                       "max_tokens") from None
            reply = loop.submit(completion)
            if reply is None:
                raise api.APIError(503, "the server is busy: too many requests are waiting; "
                                        "retry after a second", kind="server_busy")
        except api.APIError as e:
            self.send_json(e.status, e.body(), {"Retry-After": "1"} if e.status == 503 else {})
            return
        except OSError:  # the client stalled past the timeout, or left, while sending
            self.close_connection = True
            return
        try:
            if completion.stream:
                self.stream(reply)
            else:
                self.answer(reply)
        except (ClientLeft, OSError):  # gone, or too slow to take what is written
            loop.cancel(reply)

    def events(self, reply):
        """(prompt, token id or finish reason) from reply until every prompt ends. While none
        comes, look every half second whether the client left (then ClientLeft)."""
        open_ = len(reply.completion.prompts)
        while open_:
            try:
                k, item = reply.tokens.get(timeout=0.5)
            except queue.Empty:
                if self.client_left() or self.server.loop.failure is not None:
                    raise ClientLeft from None
                continue
            open_ -= isinstance(item, str)
            yield k, item

    def client_left(self):
        """The client closed its side: the socket reads as ready, with nothing to read."""
        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            return bool(ready) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def answer(self, reply):
        """The whole completion as one JSON body, once every prompt has ended."""
        c, tokenizer = reply.completion, self.server.tokenizer
        ids, finishes = [[] for _ in c.prompts], [None] * len(c.prompts)
        for k, item in self.events(reply):
            if isinstance(item, str):
                finishes[k] = item
            else:
                ids[k].append(item)
        usage = api.usage(sum(map(len, c.prompts)), sum(map(len, ids)))
        body = api.Chunks(self.server.name).whole([tokenizer.decode(x) for x in ids],
                                                  finishes, usage)
        self.send_json(200, body)

    def stream(self, reply):
        """Server-sent events: a chunk per token of text, a last one per prompt with its finish
        reason, the token counts if asked, then [DONE]. A token that ends partway through a
        character (an emoji is several GPT-2 tokens) is held until the character is whole."""
        c, tokenizer = reply.completion, self.server.tokenizer
        chunks = api.Chunks(self.server.name)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's
        self.end_headers()
        decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in c.prompts]
        for k, item in self.events(reply):
            if isinstance(item, str):
                self.event(chunks.chunk(k, decoders[k].decode(b"", final=True), item))
            elif text := decoders[k].decode(tokenizer.token_bytes(item)):
                self.event(chunks.chunk(k, text))
        if c.usage_chunk:
            self.event(chunks.chunk(None, "", usage=api.usage(sum(map(len, c.prompts)),
                                                               sum(reply.drawn))))
        self.wfile.write(b"data: [DONE]\n\n")

    def event(self, body):
        self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")

    def send_json(self, status, body, headers={}):
        self.send(status, json.dumps(body).encode(), "application/json", headers)

    def send(self, status, data, content_type, headers={}):
        try:
            self.send_response(status)
            for name, value in {"Content-Type": content_type, "Content-Length": len(data),
                                "Connection": "close", **headers}.items():
                self.send_header(name, str(value))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client left before its answer: nothing to do
            pass


def serve(cfg):
    """Load the model, start the loop and the server, serve until SIGTERM or Ctrl-C."""
    device = runtime.pick_device(cfg.device)
    dtype = runtime.pick_dtype(cfg.dtype, device)
    model, meta, ckpt = load_model(cfg.init_from, cfg.out_dir)
    tokenizer = tokenizer_from_meta(meta)
    model.eval().to(device)
    kv_pages = cfg.kv_pages or default_kv_pages(model.config, cfg.batch_size, cfg.page_size,
                                                device, dtype)
    engine = Engine(model, [], cfg.batch_size, cfg.page_size, kv_pages, cfg.prefill_chunk,
                    eot=tokenizer.eot_token)
    loop = Loop(engine, cfg.max_waiting, cfg.stream_buffer)
    name = (os.path.basename(os.path.abspath(cfg.out_dir)) if cfg.init_from == "resume"
            else cfg.init_from)
    settings = {**asdict(model.config), "tokenizer": meta.get("tokenizer"), "kv_pages": kv_pages,
                "page_size": cfg.page_size, "iter_num": ckpt and ckpt.get("iter_num")}
    try:
        server = Server(cfg, loop, name, tokenizer, settings)
    except OSError as e:
        raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror}") from None
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():  # a second Ctrl-C: leave now
            os._exit(130)
        stop.set()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    engine_thread = threading.Thread(target=loop.run, args=(device, dtype), name="engine")
    http_thread = threading.Thread(target=server.serve_forever, args=(0.1,), name="http")
    engine_thread.start()
    http_thread.start()
    host, port = server.server_address[:2]
    if cfg.host not in LOCAL:
        print(f"warning: listening on {cfg.host}, beyond this machine: anyone who reaches it "
              "can use the model" + ("" if cfg.api_key else "; set --api_key"), file=sys.stderr)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    print(f"serving {name} at {url} (the playground; OpenAI's API at {url}v1), {kv_pages} KV "
          f"pages of {cfg.page_size} tokens, {cfg.batch_size} rows", flush=True)
    while not stop.wait(0.5) and engine_thread.is_alive():
        pass
    print("stopping: no new requests; ending those in flight", file=sys.stderr, flush=True)
    server.shutdown()  # serve_forever returns: nothing new is accepted
    loop.stop()
    engine_thread.join()  # every request has had its last event
    server.cut_connections(grace=2.0)
    server.server_close()  # joins the connections' threads
    http_thread.join()
    if loop.failure is not None:
        print(f"error: the engine failed: {loop.failure}", file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return run_main(ServeConfig, serve, argv, __doc__,
                    (CheckpointError, TokenizerError, ServingError, runtime.DeviceError))


if __name__ == "__main__":
    sys.exit(main())
