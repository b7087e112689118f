"""How an Ollama server spends its time, as a behavioural model for stand-in nodes.

What it models (from Ollama's scheduler and runner):
- each loaded model has its own runner with `parallel` slots (OLLAMA_NUM_PARALLEL);
  a slot keeps the last sequence it ran, and a new request reuses the longest prefix
  its prompt shares with a free slot's sequence and evaluates only the rest (at least
  one token, as the runner does).  When that slot's sequence is longer than the shared
  prefix, the prefix is copied into the least recently used free slot instead, so
  other conversations keep theirs (Ollama's multi-user cache, findBestCacheSlot);
- at most `max_models` models are loaded (OLLAMA_MAX_LOADED_MODELS, or what fits in
  memory); loading takes `load_s` seconds and unloads the least recently used model
  that has no request running; requests beyond the free slots wait inside the server;
- prompt evaluation at `prompt_tps` tokens/s, generation at `gen_tps` tokens/s per
  sequence;
- the final chunk carries what Ollama reports: total_duration (from arrival, waits
  included), load_duration (time until the model was ready), prompt_eval_count (the
  tokens actually evaluated), prompt_eval_duration, eval_count, eval_duration, all in
  nanoseconds, and `context` for /api/generate.

Tokens: 4 characters of the rendered prompt make one token (chat messages are rendered
as role and content in order, so a conversation's next turn shares its prefix).
Used by tests/lab.py's FakeOllama (`sim=`) and tests/bench_routing.py.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Optional, Tuple

CHARS_PER_TOKEN = 4


def tokenize(text: str) -> List[int]:
    """One token per 4 characters (a stable small integer per piece)."""
    return [hash(text[i:i + CHARS_PER_TOKEN]) & 0xFFFFFF for i in range(0, len(text), CHARS_PER_TOKEN)]


def render(path: str, body: Dict[str, Any]) -> Tuple[List[int], Optional[str]]:
    """The token sequence a request asks the model to continue, and for chat the
    rendered text (the next turn renders the reply after it, as a template does)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        text = "".join(f"\x00{m.get('role', '')}\x01{m.get('content', '')}" for m in messages if isinstance(m, dict))
        text += "\x00assistant\x01"
        return tokenize(text), text
    context = body.get("context") if isinstance(body.get("context"), list) else []
    system = body.get("system") or ""
    return list(context) + tokenize(f"{system}\x02{body.get('prompt', '')}"), None


def common_prefix(a: List[int], b: List[int]) -> int:
    """Length of the longest common prefix (binary search over slice comparisons)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class _Slot:
    __slots__ = ("seq", "busy", "used")

    def __init__(self) -> None:
        self.seq: List[int] = []
        self.busy = False
        self.used = 0.0


class _Runner:
    def __init__(self, parallel: int) -> None:
        self.slots = [_Slot() for _ in range(parallel)]
        self.ready = False
        self.active = 0
        self.used = time.monotonic()
        self.queue: List[int] = []     # tickets waiting for a slot, first come first served


class SimOllama:
    """One simulated Ollama server.  `run()` is called from each request's thread."""

    def __init__(self, *, gen_tps: float = 50.0, prompt_tps: float = 2000.0, parallel: int = 1,
                 max_models: int = 3, load_s: float = 1.0, reply_tokens: int = 20,
                 loaded: Optional[List[str]] = None) -> None:
        self.gen_tps, self.prompt_tps = gen_tps, prompt_tps
        self.parallel, self.max_models, self.load_s = parallel, max_models, load_s
        self.reply_tokens = reply_tokens
        self.cond = threading.Condition()
        self.runners: "OrderedDict[str, _Runner]" = OrderedDict()   # least recently used first
        for model in loaded or []:
            runner = self.runners[model] = _Runner(parallel)
            runner.ready = True
        self.loads = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.busy_seconds = 0.0          # prompt evaluation + generation, summed over requests
        self.prompt_tokens = 0           # prompt tokens actually evaluated
        self._ticket = 0
        self._replies = 0

    def loaded(self) -> List[str]:
        with self.cond:
            return [m for m, r in self.runners.items() if r.ready]

    def _runner(self, model: str) -> _Runner:
        """The model's runner, loading it (and unloading the least recently used idle
        one when full) if needed.  Called with the lock held; may wait."""
        while True:
            runner = self.runners.get(model)
            if runner is not None:
                self.runners.move_to_end(model)
                while not runner.ready:
                    self.cond.wait()
                return runner
            if len(self.runners) < self.max_models:
                break
            idle = [m for m, r in self.runners.items() if r.ready and r.active == 0 and not r.queue]
            if idle:
                del self.runners[idle[0]]
                break
            self.cond.wait()
        runner = self.runners[model] = _Runner(self.parallel)
        runner.active += 1           # the loading request holds it
        self.loads += 1
        self.cond.release()
        try:
            time.sleep(self.load_s)
        finally:
            self.cond.acquire()
        runner.ready = True
        runner.active -= 1
        self.cond.notify_all()
        return runner

    def run(self, model: str, path: str, body: Dict[str, Any]) -> Iterator[Tuple[str, Any]]:
        """Serve one request: yields ("token", text) as tokens are generated, then
        ("done", fields of Ollama's final chunk)."""
        arrived = time.monotonic()
        seq, text = render(path, body)
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        n_reply = int(options.get("num_predict") or body.get("max_tokens") or self.reply_tokens)
        with self.cond:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._replies += 1
            reply_id = self._replies
            runner = self._runner(model)
            ready = time.monotonic()
            self._ticket += 1
            ticket = self._ticket
            runner.queue.append(ticket)
            runner.active += 1
            while True:
                free = [s for s in runner.slots if not s.busy]
                if free and runner.queue[0] == ticket:
                    break
                self.cond.wait()
            runner.queue.pop(0)
            best = max(free, key=lambda s: (common_prefix(s.seq, seq), -s.used))
            reuse = min(common_prefix(best.seq, seq), len(seq) - 1)
            slot = best
            if reuse < len(best.seq) - 1:
                # Reusing it would cut another sequence short: take the least recently used
                # free slot and copy the common prefix into it (Ollama's multi-user cache).
                slot = min(free, key=lambda s: s.used)
            slot.busy = True
            self.cond.notify_all()
        try:
            started = time.monotonic()
            n_prompt = max(1, len(seq) - reuse)
            time.sleep(n_prompt / self.prompt_tps)
            prompt_done = time.monotonic()
            pieces = [f"{(reply_id * 7919 + i) % 10000:04d}" for i in range(n_reply)]
            step = max(1, int(self.gen_tps * 0.05))     # a chunk every ~50 ms
            for i in range(0, n_reply, step):
                time.sleep(len(pieces[i:i + step]) / self.gen_tps)
                yield "token", "".join(pieces[i:i + step])
            done = time.monotonic()
            reply_tokens = tokenize("".join(pieces))
            with self.cond:
                slot.seq = tokenize(text + "".join(pieces)) if text is not None else seq + reply_tokens
                self.busy_seconds += done - started
                self.prompt_tokens += n_prompt
        finally:
            with self.cond:
                slot.busy = False
                slot.used = time.monotonic()
                runner.active -= 1
                runner.used = time.monotonic()
                self.in_flight -= 1
                self.cond.notify_all()
        fields: Dict[str, Any] = {
            "done_reason": "stop",
            "total_duration": int((done - arrived) * 1e9),
            "load_duration": int((ready - arrived) * 1e9),
            "prompt_eval_count": n_prompt,
            "prompt_eval_duration": int((prompt_done - started) * 1e9),
            "eval_count": n_reply,
            "eval_duration": int((done - prompt_done) * 1e9),
        }
        if "messages" not in body:
            fields["context"] = seq + reply_tokens
        yield "done", fields
