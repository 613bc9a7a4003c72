"""Load a completions server with requests at a steady rate, and measure how fast it answers.

    python -m serving.http --out_dir=out-shakespeare-char --port=8000      # in one terminal
    python -m tools.load --url=http://127.0.0.1:8000 --rate=0.5,1,2,4 --requests=20
    python -m tools.load --rate=inf --prompts=prompts.txt --out=load.jsonl --plot=load.png

At each rate R (requests a second) the tool sends --requests requests, arriving as a Poisson
process: the gaps between them are drawn from an exponential distribution of mean 1/R, the way
independent users arrive. --rate=inf sends them all at once. Each request asks for a stream,
and the tool times, for every request:
    TTFT  time to first token: from sending the request to its first token, the wait a user sees
    TPOT  time per output token after the first: (last token - first token) / (tokens - 1)
    e2e   end to end: from sending the request to the end of its stream
A row per rate gives the offered rate, the throughput achieved (requests and output tokens a
second, over the time from the first request sent to the last answer) and the 50th, 90th and
99th percentiles of each time. A server that is full answers 503: the request is counted as
rejected, not retried. Anything else that goes wrong counts as failed. Send enough requests: the
sum of N exponential gaps varies by about 1/sqrt(N) of itself (25% for 16), so that a short
run's achieved rate can stray well above or below the rate offered.

Plotted against throughput, the latencies draw the curve a serving system is judged by: as the
offered rate grows, throughput rises until the server is busy, then only the waits grow.
The prompts are the lines of --prompts, or slices of --dataset's validation split (the text
the model was not trained on, decoded from val.bin by its meta.json). The client is the
standard library's http.client, a thread per request (matplotlib for --plot). It shares the
machine with the server when both run on one: on a CPU, read its highest rates with that in
mind.
"""
import http.client
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from data.dataset import DataError, load_meta
from data.tokenizer import TokenizerError, tokenizer_from_meta
from tools.common import check_output_file, percentile
from training.settings import ConfigError, run_main


@dataclass
class LoadConfig:
    url: str = "http://127.0.0.1:8000"  # the server, as `python -m serving.http` prints it
    api_key: str = ""  # sent as "Authorization: Bearer <api_key>" to a server that has one
    rate: str = "1"  # requests a second, Poisson arrivals; several run in turn: 0.5,1,2; inf
    requests: int = 20  # requests sent at each rate
    prompts: str = ""  # a file of prompts, one a line, used in turn; default: --dataset's text
    dataset: str = "shakespeare_char"  # without --prompts: slices of data/<dataset>/val.bin
    prompt_tokens: int = 16  # tokens in each slice of the dataset
    max_tokens: int = 48  # tokens each request asks for (16 + 48: the CPU recipe's block, 64)
    temperature: float = 0.8  # as sample.py's; 0 is greedy
    top_p: float = 1.0  # keep the most likely tokens whose probabilities sum to top_p
    seed: int = 1337  # seeds the arrivals, the slices, and each request's sampling (seed + i)
    timeout: float = 120.0  # seconds to wait for an answer, or its next token, before failing
    out: str = ""  # also write the rows to this .jsonl file (times in seconds)
    plot: str = ""  # draw latency against throughput into this .png, .pdf or .svg
    label: str = ""  # this run's name in the plot's legend and in --out's rows
    compare: str = ""  # another run's --out rows (.jsonl), drawn in --plot beside this one

    def validate(self):
        """Reject values no load test can use; the message names the setting."""
        parse_rates(self.rate)
        if urlsplit(self.url).scheme not in ("http", "https") or not urlsplit(self.url).hostname:
            raise ConfigError(f"url must look like http://HOST:PORT, got {self.url!r}")
        for name in ("requests", "prompt_tokens", "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.temperature >= 0:  # written so that nan fails too
            raise ConfigError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.timeout < float("inf"):
            raise ConfigError(f"timeout must be positive seconds, got {self.timeout}")
        if self.plot and not self.plot.endswith((".png", ".pdf", ".svg")):
            raise ConfigError(f"plot must end in .png, .pdf or .svg, got {self.plot!r}")
        return self


class LoadError(ValueError):
    """A server that cannot be reached, prompts that cannot be read, or no matplotlib."""


def parse_rates(text):
    """The rates of --rate, "0.5,1,inf": positive numbers, inf meaning all at once."""
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError:
        rates = []
    if not rates or not all(r > 0 for r in rates):  # nan is not > 0 either
        raise ConfigError(f"rate must be positive numbers or inf, as in 0.5,1,2, got {text!r}")
    return rates


def read_prompts(cfg, rng):
    """cfg.requests prompts: the lines of cfg.prompts in turn, or random slices of
    prompt_tokens tokens of the dataset's validation split, as text."""
    if not cfg.prompts:
        return dataset_prompts(cfg, rng)
    try:
        with open(cfg.prompts, encoding="utf-8") as f:
            lines = [line for line in f.read().splitlines() if line]
    except OSError as e:
        raise LoadError(f"cannot read {cfg.prompts}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise LoadError(f"{cfg.prompts} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    if not lines:
        raise LoadError(f"the prompts file {cfg.prompts} holds no prompts")
    return [lines[i % len(lines)] for i in range(cfg.requests)]


def dataset_prompts(cfg, rng):
    folder = os.path.join("data", cfg.dataset)
    try:
        tokenizer = tokenizer_from_meta(load_meta(folder))
        tokens = np.fromfile(os.path.join(folder, "val.bin"), dtype=np.uint16)
    except (DataError, TokenizerError, OSError) as e:
        raise LoadError(f"no prompts from {folder}: {e} (prepare it, or give "
                        "--prompts=FILE)") from None
    if len(tokens) <= cfg.prompt_tokens:
        raise LoadError(f"{folder}/val.bin is shorter than prompt_tokens ({cfg.prompt_tokens})")
    starts = rng.integers(0, len(tokens) - cfg.prompt_tokens, size=cfg.requests)
    return [tokenizer.decode(tokens[s:s + cfg.prompt_tokens].tolist()) for s in starts]


@dataclass
class Result:
    """What one request saw. Times are in seconds; ttft and e2e are None unless it succeeded."""
    outcome: str = "failed"  # ok, rejected (503: the server was full) or failed
    tokens: int = 0  # tokens received, as the usage chunk counts them
    ttft: float | None = None
    tpot: float | None = None  # None for fewer than two tokens
    e2e: float | None = None
    error: str = ""


def connect(url, timeout):
    """An HTTP(S) connection to url's server."""
    parts = urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return kind(parts.hostname, parts.port, timeout=timeout)


def stream_one(cfg, prompt, seed):
    """Send one streaming completion and time its tokens as they arrive."""
    result, times, drawn = Result(), [], None
    # include_usage asks for a last chunk that counts the tokens drawn: events do not, as a
    # token that ends partway through a character (GPT-2's emoji) waits for the next one.
    body = json.dumps({"prompt": prompt, "max_tokens": cfg.max_tokens, "stream": True,
                       "stream_options": {"include_usage": True}, "seed": seed,
                       "temperature": cfg.temperature, "top_p": cfg.top_p})
    conn = connect(cfg.url, cfg.timeout)
    sent = time.perf_counter()
    try:
        conn.request("POST", urlsplit(cfg.url).path.rstrip("/") + "/v1/completions", body,
                     {"Content-Type": "application/json",
                      **({"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {})})
        response = conn.getresponse()
        if response.status != 200:
            result.outcome = "rejected" if response.status == 503 else "failed"
            result.error = f"HTTP {response.status}: {response.read(300).decode(errors='replace')}"
            return result
        finished = False
        for line in response:  # server-sent events: "data: {json}" lines, blank between
            if line.strip() == b"data: [DONE]":
                break
            if not line.startswith(b"data: "):
                continue
            chunk = json.loads(line[6:])
            for choice in chunk["choices"]:  # none in the usage chunk
                if choice["finish_reason"] is not None:  # the last of the choice: why it ends
                    finished = True
                elif choice["text"]:
                    times.append(time.perf_counter())
            if chunk.get("usage"):
                drawn = int(chunk["usage"]["completion_tokens"])
        if not finished:
            result.error = "the stream ended before its finish_reason"
            return result
    except (OSError, http.client.HTTPException, ValueError, LookupError, TypeError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    finally:
        conn.close()
    result.outcome, result.e2e = "ok", time.perf_counter() - sent
    result.tokens = len(times) if drawn is None else drawn  # a server without usage: events
    if times:
        result.ttft = times[0] - sent
    if result.tokens > 1 and len(times) > 1:
        result.tpot = (times[-1] - times[0]) / (result.tokens - 1)
    return result


def arrivals(rate, n, rng):
    """When each of n requests is sent, in seconds from the first: a Poisson process of rate
    requests a second, whose gaps are exponential with mean 1 / rate; all at 0 for inf."""
    if rate == math.inf:
        return np.zeros(n)
    return np.concatenate([[0.0], np.cumsum(rng.exponential(1 / rate, size=n - 1))])


def run_rate(cfg, rate, prompts, rng):
    """Send the prompts at rate requests a second, one thread a request, and wait for every
    answer. Returns (results, seconds from the first sent to the last answered)."""
    results = [None] * len(prompts)

    def send(i):
        results[i] = stream_one(cfg, prompts[i], cfg.seed + i)

    threads, start = [], time.perf_counter()
    for i, at in enumerate(arrivals(rate, len(prompts), rng)):
        time.sleep(max(0.0, start + at - time.perf_counter()))
        threads.append(threading.Thread(target=send, args=(i,), daemon=True))
        threads[-1].start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - start


def summarize(rate, results, seconds):
    """The row of one rate: throughput, percentiles of each time, and the outcomes."""
    ok = [r for r in results if r.outcome == "ok"]
    row = {"rate": rate, "requests": len(results),
           "req_per_s": len(ok) / seconds,
           "tok_per_s": sum(r.tokens for r in ok) / seconds,
           "output_tokens": sum(r.tokens for r in ok)}
    for name in ("ttft", "tpot", "e2e"):
        values = [getattr(r, name) for r in ok if getattr(r, name) is not None]
        for p in (50, 90, 99):
            row[f"{name}_p{p}"] = percentile(values, p)
    row["rejected"] = sum(r.outcome == "rejected" for r in results)
    row["failed"] = sum(r.outcome == "failed" for r in results)
    row["first_error"] = next((r.error for r in results if r.outcome == "failed"), "")
    return row


# The table's columns after the offered rate and the throughput: three percentiles of each time,
# (heading, the rows' key, scale from seconds, format).
TIMES = (("TTFT ms", "ttft", 1000, ".0f"), ("TPOT ms", "tpot", 1000, ".1f"),
         ("e2e s", "e2e", 1, ".2f"))
HEADER = (f"{'offered':>7}{'achieved':>14} |" + "".join(f"{t[0]:>21} |" for t in TIMES) + "\n"
          + f"{'req/s':>7}{'req/s':>7}{'tok/s':>7} |" + "    p50    p90    p99 |" * len(TIMES)
          + " rejected failed")


def format_row(row):
    """The row as a line of the table under HEADER; - for a time that no request gave."""
    def cell(value, form, scale=1):
        return f"{'-' if value is None else format(value * scale, form):>7}"
    line = cell(row["rate"], "g") + cell(row["req_per_s"], ".2f") + cell(row["tok_per_s"], ".1f")
    for _, name, scale, form in TIMES:
        line += " |" + "".join(cell(row[f"{name}_p{p}"], form, scale) for p in (50, 90, 99))
    return line + f" |{row['rejected']:>9}{row['failed']:>7}"


def read_rows(path):
    """{label: rows} of a run's --out file, for --compare."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise LoadError(f"compare: cannot read the rows of {path}: {e}") from None
    for row in rows:
        row["rate"] = float(row["rate"])  # "inf" too
    return {rows[0].get("label") or path: rows} if rows else {}


def draw(runs, out):
    """Save to out TTFT and TPOT (p50 and p90) against output tokens a second, a point a rate,
    a colour a run ({label: rows})."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no window, no global state
    except ImportError:
        raise LoadError("--plot needs matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    for ax, name, title in zip(fig.subplots(1, 2), ("ttft", "tpot"),
                               ("time to first token", "time per output token")):
        for (label, rows), color in zip(runs.items(), ("C0", "C1", "C2", "C3")):
            for p, style in ((50, "o-"), (90, "s--")):
                ax.plot([r["tok_per_s"] for r in rows],
                        [math.nan if r[f"{name}_p{p}"] is None else r[f"{name}_p{p}"] * 1000
                         for r in rows], style, color=color, label=f"{label} p{p}".strip())
            for r in rows:  # name each point by the rate that was offered
                ax.annotate("all at once" if r["rate"] == math.inf else f"{r['rate']:g}/s",
                            (r["tok_per_s"], (r[f"{name}_p50"] or 0) * 1000),
                            fontsize="x-small", textcoords="offset points", xytext=(3, 3))
        ax.set(xlabel="output tokens/s achieved", ylabel="ms", title=title, ylim=(0, None))
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.savefig(out, dpi=80)


def check_server(cfg):
    """Fail at once, in one line, when nothing answers at the url."""
    conn = connect(cfg.url, 10)
    try:
        conn.request("GET", urlsplit(cfg.url).path.rstrip("/") + "/health")
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as e:
        raise LoadError(f"cannot reach {cfg.url}: {e} (is `python -m serving.http` "
                        "running there?)") from None
    finally:
        conn.close()
    if status != 200:
        raise LoadError(f"{cfg.url}/health answered HTTP {status}: not a serving.http server?")


def load(cfg):
    """Run every rate in turn, print a row each, and write the rows and the plot if asked."""
    for name in ("out", "plot"):
        if getattr(cfg, name):
            check_output_file(name, getattr(cfg, name))
    other = read_rows(cfg.compare) if cfg.compare else {}
    check_server(cfg)
    rng = np.random.default_rng(cfg.seed)
    prompts = read_prompts(cfg, rng)  # the same prompts at every rate, so the rows compare
    # One request first: a mistake that would fail them all (a wrong api_key, a prompt too long
    # for the model) is one line, and the server's first-call costs stay out of the first row.
    first = stream_one(cfg, prompts[0], cfg.seed)
    if first.outcome == "failed":
        raise LoadError(f"a first request to {cfg.url} failed: {first.error}")
    print(HEADER, flush=True)
    rows = []
    for rate in parse_rates(cfg.rate):
        rows.append(summarize(rate, *run_rate(cfg, rate, prompts, rng)))
        print(format_row(rows[-1]), flush=True)
        if rows[-1]["first_error"]:
            print(f"  the first that failed: {rows[-1]['first_error']}", file=sys.stderr)
    if cfg.out:
        with open(cfg.out, "w", encoding="utf-8") as f:
            for row in rows:  # JSON has no infinity: --rate=inf is written "inf"
                f.write(json.dumps({**row, "label": cfg.label, "rate": row["rate"]
                                    if row["rate"] < math.inf else "inf"}) + "\n")
        print(f"wrote {cfg.out}")
    if cfg.plot:
        draw({cfg.label: rows, **other}, cfg.plot)
        print(f"wrote {cfg.plot}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return run_main(LoadConfig, load, argv, __doc__, (LoadError,))


if __name__ == "__main__":
    sys.exit(main())
