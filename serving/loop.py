"""The serving engine's one loop, on one thread, and the bounded queue in front of it: how
requests that arrive over time, from many threads, reach serving/engine.py and get their tokens
back (serving/http.py, steps 2 to 4 of its docstring).

    loop = Loop(engine, max_waiting=64, buffer=256)
    threading.Thread(target=loop.run, args=(device, dtype)).start()
    reply = loop.submit(completion)      # from a connection's thread; None: the queue is full
    k, item = reply.tokens.get()         # (prompt, token id), then (prompt, finish reason)

Only the loop's thread touches the engine, so the engine needs no lock: the other threads
talk to it through the queue (arrived, leaving) under one Condition, which also wakes the loop
when it is idle, and receive tokens through their Reply's bounded buffer.
"""
import queue
import threading
import traceback
from collections import Counter

import torch

from serving.batching import Request
from training import runtime


class Reply:
    """One request's way back from the loop to its thread (step 4): its prompts' tokens, at
    most room of them waiting to be sent, as (prompt, token id); then, for each prompt, (prompt,
    finish reason): "stop" at <|endoftext|>, "length" at max_tokens, "abort" if cut short."""

    def __init__(self, completion, buffer):
        self.completion, self.room = completion, buffer * len(completion.prompts)
        self.tokens = queue.Queue(self.room + len(completion.prompts))  # the ends always fit
        self.drawn = [0] * len(completion.prompts)
        self.requests = []  # the engine's indices of its prompts' requests


class Loop:
    """The engine's one thread (step 3), and the bounded queue in front of it (step 2)."""

    def __init__(self, engine, max_waiting, buffer):
        self.engine, self.max_waiting, self.buffer = engine, max_waiting, buffer
        self.wake = threading.Condition()  # guards the four below; notified when one changes
        self.arrived, self.leaving, self.stopping = [], [], False
        self.waiting = 0  # requests arrived or queued in the engine, not running
        self.replies = {}  # the engine's request index -> (its Reply, its prompt's index)
        self.counts = Counter()  # served, cancelled, refused, too slow: for /health
        self.health, self.failure = self.snapshot(), None

    def submit(self, completion):
        """The Reply that completion's tokens will come through; None if the queue is full."""
        with self.wake:
            if self.stopping or self.waiting + len(completion.prompts) > self.max_waiting:
                self.counts["refused"] += 1
                return None
            reply = Reply(completion, self.buffer)
            self.arrived.append(reply)
            self.waiting += len(completion.prompts)
            self.wake.notify()
            return reply

    def cancel(self, reply):
        """Its client left: end reply's requests before the next step."""
        with self.wake:
            self.leaving.append(reply)
            self.wake.notify()

    def stop(self):
        with self.wake:
            self.stopping = True
            self.wake.notify()

    def run(self, device, dtype):
        """The loop: take in what arrived and what left, step, hand out the tokens."""
        try:
            with torch.no_grad(), runtime.autocast(device, dtype):  # both are per thread
                while self.turn():
                    pass
        except Exception as e:  # the engine failed: end every request, say why, exit
            self.failure = e
            traceback.print_exc()
            with self.wake:
                self.stopping = True
            for reply in {reply for reply, _ in self.replies.values()}:
                self.end(reply, "abort", cancel=False)

    def turn(self):
        engine = self.engine
        with self.wake:
            while not (self.arrived or self.leaving or self.stopping or engine.waiting
                       or engine.running):
                self.wake.wait()
            arrived, self.arrived, leaving, self.leaving = self.arrived, [], self.leaving, []
            stopping = self.stopping
        for reply in arrived:
            c = reply.completion
            for k, ids in enumerate(c.prompts):  # prompt k draws as sample.py's sample k
                i = engine.add(Request(ids, c.max_tokens, (c.seed + k) % 2 ** 64, c.sampling))
                self.replies[i] = (reply, k)
                reply.requests.append(i)
        for reply in leaving:
            self.counts["cancelled"] += self.end(reply, "abort")
        if stopping:  # every request still open ends now, with a last event
            for reply in {reply for reply, _ in self.replies.values()}:
                self.end(reply, "abort")
            return False
        if engine.waiting or engine.running:
            drawn, ended = engine.step()
            for i, token in drawn:
                if i in self.replies:
                    self.hand_out(i, token)
            for i in ended:
                if i in self.replies:
                    reply, k = self.replies.pop(i)
                    done = reply.drawn[k] == reply.completion.max_tokens
                    reply.tokens.put_nowait((k, "length" if done else "stop"))
                    self.counts["served"] += 1
        with self.wake:
            self.waiting = (sum(len(r.completion.prompts) for r in self.arrived)
                            + len(engine.waiting))
            self.health = self.snapshot()
        return True

    def hand_out(self, i, token):
        """A token into its request's buffer; a full buffer means a reader too slow: cancel."""
        reply, k = self.replies[i]
        if reply.tokens.qsize() >= reply.room:
            self.counts["too slow"] += self.end(reply, "abort")
            return
        reply.tokens.put_nowait((k, token))
        reply.drawn[k] += 1

    def end(self, reply, reason, cancel=True):
        """End reply's open requests, with reason; their pages go back. 1 if any was open."""
        open_ = [i for i in reply.requests if i in self.replies]
        for i in open_:
            if cancel:
                self.engine.cancel(i)
            reply.tokens.put_nowait((self.replies.pop(i)[1], reason))
        return int(bool(open_))

    def snapshot(self):
        """What /health shows: requests, and the KV cache's pages (held, idle, free)."""
        engine, pool = self.engine, self.engine.pool
        return {"status": "stopping" if self.stopping else "ok",
                "requests": {"running": len(engine.running), "waiting": len(engine.waiting),
                             **{name.replace(" ", "_"): self.counts[name] for name in
                                ("served", "cancelled", "refused", "too slow")}},
                "kv_pages": {"total": pool.n_pages, "free": len(pool.free),
                             "cached": len(engine.prefix.idle),
                             "held": pool.n_pages - engine.prefix.available()}}
