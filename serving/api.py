"""What the HTTP server (serving/http.py) reads and writes: OpenAI's completions format.

A request is untrusted: its length, its key and every field of its body are checked here, in
the request's own thread, before anything reaches the engine, and each mistake is an APIError
that names the field, so that the client gets a 4xx with OpenAI's error body and the server
goes on serving:

    {"error": {"message": "max_tokens must be an integer from 1 to 1024, got 0", "type":
               "invalid_request_error", "param": "max_tokens", "code": null}}

Fields OpenAI has and this server does not implement (stop strings, logprobs, n, ...) are
accepted only at the value that changes nothing, so that a client's defaults pass and a
setting the server would silently ignore is refused instead.
"""
import hmac
import json
import secrets
import time
from dataclasses import dataclass

MAX_BODY = 1 << 20  # bytes; a body this large is some thousands of prompts, not one request

# OpenAI's fields this server leaves out, with the value that asks for nothing of them.
UNUSED = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "stop": None, "suffix": None,
          "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None}
ANY = {"user", "stream_options"}  # read or free to ignore: who asks, the usage chunk
USED = {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stream"}


class APIError(Exception):
    """A request the server refuses: the HTTP status, and OpenAI's error body."""

    def __init__(self, status, message, param=None, kind="invalid_request_error", code=None):
        super().__init__(message)
        self.status, self.param, self.kind, self.code = status, param, kind, code

    def body(self):
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass
class Completion:
    """A checked request: its prompts' token ids and how to draw from them."""
    prompts: list[list[int]]
    max_tokens: int
    sampling: dict  # temperature, top_k, top_p: serving/batching.py's Request.sampling
    seed: int  # prompt k draws from a generator seeded seed + k, as sample.py's sample k does
    stream: bool
    usage_chunk: bool  # stream_options.include_usage: a last chunk with the token counts


def parse_body(raw):
    """The JSON object of a request's body (bytes)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # not UTF-8 or not JSON; nested past the limit
        raise APIError(400, f"the body is not JSON: {e}"[:200]) from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object, as OpenAI's completions take")
    return body


def read_body(headers, rfile):
    """The body of a request (bytes), as long as its Content-Length says, within MAX_BODY."""
    length = headers.get("Content-Length")
    if length is None or not length.isdigit():
        raise APIError(411, "the request needs a Content-Length header")
    if int(length) > MAX_BODY:
        # Read it, and drop it, if it is not huge: a client still sending when the answer
        # comes and the connection closes would see it reset, not the answer.
        left = min(int(length), 16 * MAX_BODY)
        while left > 0 and (chunk := rfile.read(min(left, 65536))):
            left -= len(chunk)
        raise APIError(413, f"the body is {int(length):,} bytes, more than this server takes "
                            f"({MAX_BODY:,})")
    body = rfile.read(int(length))
    if len(body) < int(length):
        raise APIError(400, "the body ended before its Content-Length")
    return body


def authorize(headers, api_key):
    """The api_key, if the server has one, compared in constant time (hmac.compare_digest),
    so that the time of a refusal does not tell how much of a guess was right."""
    given = headers.get("Authorization", "")
    if api_key and not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        raise APIError(401, "a valid API key is needed: Authorization: Bearer <key>",
                       code="invalid_api_key")


def parse_completion(body, model_name, tokenizer, block_size, max_tokens_limit):
    """A Completion from a request's JSON object, its prompts encoded by tokenizer; APIError
    for anything it cannot be."""
    for key, value in body.items():
        if key not in USED | ANY and (key not in UNUSED or value != UNUSED[key]):
            raise APIError(400, f"{key}: not implemented by this server (it takes "
                                f"{', '.join(sorted(USED))})", key,
                           code="unsupported_parameter")
    if body.get("model") not in (None, model_name):  # absent or null: the one served
        raise APIError(404, f"the model {body['model']!r} does not exist: this server serves "
                            f"{model_name!r} (GET /v1/models)", "model", code="model_not_found")
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if (not isinstance(prompts, list) or not prompts
            or not all(isinstance(p, str) for p in prompts)):
        raise APIError(400, "prompt must be a string or a non-empty list of strings", "prompt")
    max_tokens = number(body, "max_tokens", 16, int, 1, max_tokens_limit)
    temperature = number(body, "temperature", 1.0, float, 0, 2)
    top_p = number(body, "top_p", 1.0, float, 0, 1)
    if top_p == 0:
        raise APIError(400, "top_p must be above 0 (and at most 1), got 0", "top_p")
    seed = number(body, "seed", None, int, 0, 2 ** 63 - 1)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}"[:200], "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    return Completion([encode(tokenizer, p, block_size) for p in prompts], max_tokens,
                      dict(temperature=temperature, top_k=None, top_p=top_p),
                      secrets.randbits(63) if seed is None else seed, stream,
                      stream and options.get("include_usage") is True)


def encode(tokenizer, prompt, block_size):
    """A prompt's token ids, or the APIError that says why the model cannot read it."""
    try:
        ids = tokenizer.encode(prompt)
    except ValueError as e:  # a character the character-level vocabulary does not have
        raise APIError(400, f"prompt: {e}", "prompt") from None
    if not ids and tokenizer.eot_token is None:
        raise APIError(400, "prompt: empty; a character model starts from a character", "prompt")
    if len(ids) > block_size:
        raise APIError(400, f"prompt: {len(ids)} tokens, more than the model's context of "
                            f"{block_size}", "prompt")
    return ids or [tokenizer.eot_token]  # GPT-2 starts documents after <|endoftext|>


def number(body, key, default, kind, low, high):
    """body[key], a number of kind (int or float) from low to high, or default if absent."""
    value = body.get(key)
    if value is None:
        return default
    whole = isinstance(value, int) or isinstance(value, float) and value.is_integer()
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and (kind is float or whole) and low <= value <= high)  # nan and inf fail too
    if not ok:
        what = "an integer" if kind is int else "a number"
        raise APIError(400, f"{key} must be {what} from {low} to {high}, got {value!r}"[:200], key)
    return kind(value)


class Chunks:
    """The JSON bodies of one completion's answer: whole, or chunk by chunk for a stream."""

    def __init__(self, model_name):
        self.head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion",
                     "created": int(time.time()), "model": model_name}

    def choice(self, index, text, finish=None):
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    def chunk(self, index, text, finish=None, usage=None):
        """One server-sent event's JSON: a piece of choice index, or its end."""
        body = {**self.head, "choices": [] if index is None else
                [self.choice(index, text, finish)]}
        return body if usage is None else {**body, "usage": usage}

    def whole(self, texts, finishes, usage):
        return {**self.head, "choices": [self.choice(k, text, finish) for k, (text, finish)
                                         in enumerate(zip(texts, finishes))], "usage": usage}


def usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
