"""A lab of real OpenSSH nodes on 127.0.0.1 for tests and the benchmark.

Each node is its own `sshd` (so one can be killed or frozen alone) on a free high
port, run as the current user with temporary host and user keys, plus a stand-in
Ollama HTTP server the lab owns.  Nothing here listens on anything but 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Sequence, Tuple

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
SSH = shutil.which("ssh")
HAVE_SSHD = bool(SSHD and SSH and shutil.which("ssh-keygen"))
MESH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mesh.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll until predicate() is truthy (tests wait for conditions, never sleep blindly)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---------------------------------------------------------------------------
# Stand-in Ollama
# ---------------------------------------------------------------------------

class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver listens with a backlog of 5: a burst of connections overflows it and
    # the rest wait a second for a SYN retry.  Go's listener (Ollama) uses the system maximum.
    request_queue_size = 1024


class FakeOllama:
    """Speaks Ollama's API in Ollama's shapes: the native /api/* endpoints (NDJSON),
    the OpenAI /v1/* ones and the Anthropic /v1/messages (Server-Sent Events when
    streaming, with `data: [DONE]` / Anthropic's event types), model management
    (create, copy, delete, push, blobs) and keep_alive load/unload.

    `mode` injects faults: ok, hang (accept, never answer), garbage (200 with
    non-JSON), error500, html, busy (503), truncate (stream cut before done),
    cut_midline (the connection closed inside a chunk, in the middle of a line),
    error_line (an error mid-stream, `error_text`), badhead (not HTTP at all),
    bad_line (a line that is not JSON mid-stream), after_done (more lines after
    done, then the reply held open - for stream:false too), done_reason (a last line
    with done_reason but no done), no_final (the body ends properly without the final
    line, the last token sent in one write with the body's end), bad_chunk (a chunk
    whose size line is "0x..." mid-stream: not HTTP framing), no_newline (the body ends
    after a last token line that lacks its newline), bad_first (a stream whose first line
    is an HTML page's), error_first (a stream whose only line is an error, `error_text`),
    cut_answer (a stream:false answer closed after half its Content-Length).
    `lacks`: paths (or prefixes ending in "/") this Ollama is too old to have; they
    get Go's plain-text `404 page not found`, as a real old Ollama answers.
    `old=True` is an Ollama from before /api/embed and the /v1 endpoints.
    `delay` is the silent part of a generation (a model load; for stream=false all of
    it): a client that leaves during it ends it (`cancelled` counts those).
    `sim` (tests/ollama_sim.py's SimOllama): generate and chat take the time a real
    server would (speeds, parallel slots, prompt cache, model loads) and report its
    figures; /api/ps lists what the simulation has loaded."""

    def __init__(self, models: List[str], *, name: str = "fake", version: str = "0.6.1",
                 delay: float = 0.0, token_delay: float = 0.0, tokens: Optional[List[str]] = None,
                 loaded: Optional[List[str]] = None, lacks: Sequence[str] = (), old: bool = False,
                 sim: Any = None) -> None:
        self.models = list(models)
        self.sim = sim
        self.loaded = list(loaded or [])
        self.name = name
        self.version = version
        self.delay = delay                # seconds before the first byte of generate/chat
        self.token_delay = token_delay    # seconds between streamed chunks
        self.tokens = tokens or ["Hello", " from", " " + name, "."]
        self.lacks = list(lacks) + (["/api/embed", "/v1/"] if old else [])
        self.blobs: set = set()           # digests of uploaded blobs
        self.pull_error: Optional[str] = None   # /api/pull streams this as Ollama's {"error": ...} line
        self.error_text = "CUDA error: out of memory"
        self.mode = "ok"
        self.requests: List[Dict[str, Any]] = []
        self.active = 0
        self.max_active = 0
        self.disconnects = 0
        self.cancelled = 0                # generations ended early because the client left (_think)
        self.connections: set = set()
        self._lock = threading.Lock()
        self.release = threading.Event()  # lets a "hang" end
        # A stream's last event waits until this is set: a test clears it to see the first
        # events arrive through mesh while the node is still answering.
        self.finish_stream = threading.Event()
        self.finish_stream.set()
        self.port = free_port()
        self.server = _Server(("127.0.0.1", self.port), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def stop(self) -> None:
        """Like stopping Ollama: nothing listens any more and open connections drop."""
        self.server.shutdown()
        self.server.server_close()
        for conn in list(self.connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def start_again(self) -> None:
        self.server = _Server(("127.0.0.1", self.port), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def bodies(self, path: str) -> List[Dict[str, Any]]:
        return [r["body"] for r in self.requests if r["path"] == path]

    def has(self, model: str) -> bool:
        return _key(model) in {_key(m) for m in self.models}

    def is_loaded(self, model: str) -> bool:
        return _key(model) in {_key(m) for m in self.loaded}

    def lacks_path(self, path: str) -> bool:
        return any(path == p or (p.endswith("/") and path.startswith(p)) for p in self.lacks)

    def _handler(self):
        fake = self

        class Handler(_OllamaShapes, BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # as Go (Ollama) does by default
            # Go's net/http sends a small reply in one write; an unbuffered handler
            # would send the head and the body as two segments.
            wbufsize = 1 << 16

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                self.fake = fake
                fake.connections.add(self.connection)

            def finish(self) -> None:
                fake.connections.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

        return Handler


def _key(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def _digest(model: str) -> str:
    import hashlib
    return "sha256:" + hashlib.sha256(_key(model).encode()).hexdigest()


class _OllamaShapes:
    """The request handler of FakeOllama: each endpoint in the shapes Ollama's
    server/routes.go, openai/ and anthropic/ middleware send."""

    fake: FakeOllama

    # -- writing -----------------------------------------------------------------
    def _json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self._answered()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.wfile.flush()

    def _go_404(self) -> None:
        """What Go's router (gin) sends for a path it has no route for."""
        data = b"404 page not found"
        self.send_response(404)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _start_stream(self, ctype: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, obj: Any) -> None:
        line = (obj if isinstance(obj, bytes) else json.dumps(obj).encode() + b"\n")
        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
        self.wfile.flush()

    def _sse(self, obj: Any, event: Optional[str] = None) -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self._chunk((b"event: %s\n" % event.encode() if event else b"") + b"data: " + data + b"\n\n")

    def _end(self) -> None:
        self._chunk(b"")

    def _fault(self) -> bool:
        fake, mode = self.fake, self.fake.mode
        if mode == "hang":
            fake.release.wait(120)
            self.close_connection = True
            return True
        if mode == "badhead":
            self.wfile.write(b"SSH-2.0-NotOllama\r\n\r\n")
            self.close_connection = True
            return True
        if mode == "garbage":
            data = b"this is not json at all\n"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return True
        if mode == "html":
            data = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
            self.send_response(502)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return True
        if mode == "error500":
            self._json(500, {"error": "llama runner process has terminated"})
            return True
        if mode == "busy":
            self._json(503, {"error": "server busy, please try again.  maximum pending requests exceeded"})
            return True
        return False

    # -- methods -------------------------------------------------------------------
    def do_HEAD(self) -> None:
        fake = self.fake
        fake.requests.append({"path": self.path, "body": None, "method": "HEAD"})
        if self.path.startswith("/api/blobs/"):
            self._empty(200 if self.path[len("/api/blobs/"):] in fake.blobs else 404)
            return
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        fake = self.fake
        fake.requests.append({"path": self.path, "body": None, "conn": id(self.connection)})
        if fake.mode in ("hang", "badhead", "garbage", "html") and self._fault():
            return
        if fake.lacks_path(self.path):
            self._go_404()
        elif self.path == "/api/version":
            self._json(200, {"version": fake.version})
        elif self.path == "/api/tags":
            self._json(200, {"models": [self._tag(m) for m in fake.models]})
        elif self.path == "/api/ps":
            loaded = fake.sim.loaded() if fake.sim else fake.loaded
            self._json(200, {"models": [self._ps_entry(m) for m in loaded]})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 1767225600, "owned_by": "library"} for m in fake.models]})
        elif self.path.startswith("/v1/models/"):
            name = self.path[len("/v1/models/"):]
            if fake.has(name):
                self._json(200, {"id": name, "object": "model", "created": 1767225600, "owned_by": "library"})
            else:
                self._openai_error(404, f"model '{name}' not found")
        elif self.path == "/":
            data = b"Ollama is running"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self._go_404()

    def do_DELETE(self) -> None:
        fake = self.fake
        body = self._read_json()
        if body is None:
            return
        fake.requests.append({"path": self.path, "body": body, "method": "DELETE"})
        if fake.lacks_path(self.path) or self.path != "/api/delete":
            self._go_404()
            return
        name = body.get("model") or body.get("name", "")
        if not fake.has(name):
            self._json(404, {"error": f"model '{name}' not found"})
            return
        fake.models = [m for m in fake.models if _key(m) != _key(name)]
        fake.loaded = [m for m in fake.loaded if _key(m) != _key(name)]
        self._empty(200)

    def _read_json(self) -> Optional[Dict[str, Any]]:
        length = int(self.headers.get("Content-Length") or 0)
        self._raw = self.rfile.read(length)
        try:
            return json.loads(self._raw) if self._raw.strip() else {}
        except ValueError:
            self._json(400, {"error": "invalid JSON"})
            return None

    def do_POST(self) -> None:
        fake = self.fake
        if self.path.startswith("/api/blobs/"):
            length = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(length)
            fake.requests.append({"path": self.path, "body": None, "raw": data})
            import hashlib
            digest = self.path[len("/api/blobs/"):]
            if "sha256:" + hashlib.sha256(data).hexdigest() != digest.replace("-", ":", 1):
                self._json(400, {"error": "digest mismatch"})
                return
            fake.blobs.add(digest)
            self._empty(201)
            return
        body = self._read_json()
        if body is None:
            return
        fake.requests.append({"path": self.path, "body": body, "raw": self._raw, "headers": dict(self.headers)})
        with fake._lock:
            fake.active += 1
            fake.max_active = max(fake.max_active, fake.active)
        self._working = True
        try:
            if not self._fault():
                self._post(body)
        except (BrokenPipeError, ConnectionResetError):
            fake.disconnects += 1
            self.close_connection = True
        finally:
            self._answered()

    def _answered(self) -> None:
        """This request's work is over (`active` one less), before its answer's last bytes
        are written: the client may take the answer and send its next request before this
        thread runs again, and that one must not be counted as running beside this one."""
        if getattr(self, "_working", False):
            self._working = False
            with self.fake._lock:
                self.fake.active -= 1

    def _post(self, body: Dict[str, Any]) -> None:
        fake = self.fake
        if fake.lacks_path(self.path):
            self._go_404()
            return
        routes = {"/api/pull": self._pull, "/api/push": self._push, "/api/create": self._create,
                  "/api/copy": self._copy, "/api/generate": self._generate, "/api/chat": self._generate,
                  "/api/embed": self._embed, "/api/embeddings": self._embed, "/api/show": self._show,
                  "/v1/chat/completions": self._openai_chat, "/v1/completions": self._openai_completion,
                  "/v1/embeddings": self._openai_embeddings, "/v1/responses": self._openai_responses,
                  "/v1/messages": self._anthropic_messages}
        route = routes.get(self.path)
        if route is None:
            self._go_404()
            return
        route(body)

    # -- shapes --------------------------------------------------------------------
    def _tag(self, m: str) -> Dict[str, Any]:
        return {"name": m, "model": m, "modified_at": "2026-01-01T00:00:00Z", "size": 1000,
                "digest": _digest(m)[7:],
                "details": {"parent_model": "", "format": "gguf", "family": "fake", "families": ["fake"],
                            "parameter_size": "7B", "quantization_level": "Q4_K_M"}}

    def _ps_entry(self, m: str) -> Dict[str, Any]:
        expires = time.strftime("%Y-%m-%dT%H:%M:%S.123456789Z", time.gmtime(time.time() + 299))
        return dict(self._tag(m), digest=_digest(m), size=2000, size_vram=1000, expires_at=expires)

    def _missing(self, model: str) -> bool:
        return not self.fake.has(model)

    def _text(self) -> str:
        return "".join(self.fake.tokens)

    def _pace(self) -> None:
        if self.fake.token_delay:
            time.sleep(self.fake.token_delay)

    def _think(self, seconds: float) -> None:
        """A generation's silent part (a model load, or all of a stream=false answer):
        `seconds` long, unless the client leaves first - then it ends, as Ollama's Go
        server cancels a request whose connection closed (fake.cancelled counts them)."""
        import select
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            readable, _, _ = select.select([self.connection], [], [], left)
            if readable:
                try:
                    gone = self.connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    gone = True
                if gone:
                    with self.fake._lock:
                        self.fake.cancelled += 1
                    raise ConnectionResetError("client went away")
                time.sleep(max(0.0, end - time.monotonic()))   # a pipelined request: not our business
                return

    def _hold(self) -> None:
        """Before a stream's last event: wait while the test holds the node mid-answer."""
        self.fake.finish_stream.wait(30)

    # -- the native API --------------------------------------------------------------
    def _progress(self, body: Dict[str, Any], steps: List[Dict[str, Any]]) -> None:
        if body.get("stream", True) is False:
            self._json(200, {"status": "success"})
            return
        self._start_stream("application/x-ndjson")
        for step in steps:
            self._chunk(step)
            if "completed" in step:
                self._pace()
        self._chunk({"status": "success"})
        self._end()

    def _pull(self, body: Dict[str, Any]) -> None:
        fake = self.fake
        model = body.get("model") or body.get("name", "")
        if fake.pull_error:
            self._start_stream("application/x-ndjson")
            self._chunk({"status": "pulling manifest"})
            self._chunk({"error": fake.pull_error})
            self._end()
            return
        layer = [{"status": "pulling 8eeb52dfb3bb", "digest": "sha256:8eeb52dfb3bb", "total": 1000,
                  "completed": done} for done in (0, 500, 1000)]
        self._progress(body, [{"status": "pulling manifest"}, *layer, {"status": "verifying sha256 digest"},
                              {"status": "writing manifest"}])
        if not fake.has(model):
            fake.models.append(model)

    def _push(self, body: Dict[str, Any]) -> None:
        model = body.get("model") or body.get("name", "")
        if self._missing(model):
            self._json(404, {"error": f'model "{model}" not found'})
            return
        self._progress(body, [{"status": "retrieving manifest"}, {"status": "pushing manifest"}])

    def _create(self, body: Dict[str, Any]) -> None:
        fake = self.fake
        model = body.get("model") or body.get("name", "")
        base = body.get("from")
        if base and self._missing(base):
            self._json(404, {"error": f'model "{base}" not found, try pulling it first'})
            return
        for digest in (body.get("files") or {}).values():
            if digest not in fake.blobs:
                self._json(400, {"error": f"blob {digest} not found"})
                return
        self._progress(body, [{"status": "using existing layer " + _digest(base or model)},
                              {"status": "writing manifest"}])
        if not fake.has(model):
            fake.models.append(model)

    def _copy(self, body: Dict[str, Any]) -> None:
        source, dest = body.get("source", ""), body.get("destination", "")
        if self._missing(source):
            self._json(404, {"error": f'model "{source}" not found'})
            return
        if not self.fake.has(dest):
            self.fake.models.append(dest)
        self._empty(200)

    def _show(self, body: Dict[str, Any]) -> None:
        model = body.get("model") or body.get("name", "")
        if self._missing(model):
            self._json(404, {"error": f"model '{model}' not found"})
            return
        self._json(200, {"modelfile": "FROM " + model, "parameters": "temperature 0.7",
                         "template": "{{ .Prompt }}", "license": "FAKE LICENSE",
                         "details": {"family": "fake", "parameter_size": "7.6B", "quantization_level": "Q4_K_M",
                                     "format": "gguf"},
                         "model_info": {"general.architecture": "fake", "fake.context_length": 32768},
                         "capabilities": ["completion"], "modified_at": "2026-01-01T00:00:00Z"})

    def _embed(self, body: Dict[str, Any]) -> None:
        model = body.get("model", "")
        if self._missing(model):
            self._json(404, {"error": f'model "{model}" not found, try pulling it first'})
            return
        if self.path == "/api/embeddings":
            self._json(200, {"embedding": [float(len(body.get("prompt", ""))), 0.5]})
            return
        self._json(200, {"model": model, "embeddings": self._vectors(body.get("input")),
                         "total_duration": 1000, "load_duration": 100, "prompt_eval_count": 3})

    def _vectors(self, inputs: Any) -> List[List[float]]:
        inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
        return [[float(len(s)), 0.5, float(self.fake.port % 7)] for s in inputs]

    def _generate(self, body: Dict[str, Any]) -> None:
        fake = self.fake
        model = body.get("model", "")
        chat = self.path == "/api/chat"
        last = (body.get("messages") or [{}])[-1].get("content", "") if chat else body.get("prompt", "")
        empty = not body.get("messages") if chat else not body.get("prompt")
        keep_alive = body.get("keep_alive")
        if empty and keep_alive in (0, "0", "0s", "0m"):
            if self._missing(model):
                self._json(404, {"error": f"model '{model}' not found"})
                return
            fake.loaded = [m for m in fake.loaded if _key(m) != _key(model)]
            self._json(200, self._piece(model, chat, "", True, reason="unload"))
            return
        if self._missing(model):
            self._json(404, {"error": f'model "{model}" not found, try pulling it first'})
            return
        if fake.delay:
            self._think(fake.delay)
        if empty:   # a preload: the model is loaded, nothing generated
            if not fake.is_loaded(model):
                fake.loaded.append(model)
            self._json(200, self._piece(model, chat, "", True, reason="load"))
            return
        if fake.sim is not None:
            self._simulated(model, chat, body)
            return
        tokens = list(fake.tokens)
        if fake.mode == "garbage_on_reuse" and getattr(self, "answered", False):
            self.wfile.write(b"GARBAGE")    # as if the last reply on this connection had trailing bytes
        self.answered = True                # (this handler object serves one keep-alive connection)
        if body.get("stream", True) is False and fake.mode in ("past_length", "negative_length", "deep_nesting"):
            # Replies no Ollama sends: bytes past Content-Length in the same write (the connection
            # kept alive); a negative Content-Length; nesting deeper than Python's json decodes.
            piece = self._piece(model, chat, "".join(tokens), True, prompt=last)
            if fake.mode == "deep_nesting":
                piece["context"] = "@"
            data = json.dumps(piece).encode().replace(b'"@"', b"[" * 100000 + b"]" * 100000)
            self.send_response(200)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", "-1" if fake.mode == "negative_length" else str(len(data)))
            if fake.mode != "past_length":
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data + (b"GARBAGE" if fake.mode == "past_length" else b""))
            self.wfile.flush()
            return
        if body.get("stream", True) is False and fake.mode == "cut_answer":
            data = json.dumps(self._piece(model, chat, "".join(tokens), True, prompt=last)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if body.get("stream", True) is False and fake.mode != "after_done":
            self._json(200, self._piece(model, chat, "".join(tokens), True, prompt=last))
            return
        if body.get("stream", True) is False:      # after_done: the answer, junk, held open
            self._start_stream("application/json; charset=utf-8")
            self._chunk(self._piece(model, chat, "".join(tokens), True, prompt=last))
            self._chunk(self._piece(model, chat, "JUNK AFTER DONE", False))
            fake.release.wait(10)
            self._end()
            return
        self._start_stream("application/x-ndjson")
        if fake.mode in ("bad_first", "error_first"):
            self._chunk(b"<html>oops</html>\n" if fake.mode == "bad_first" else {"error": fake.error_text})
            self._end()
            return
        for i, tok in enumerate(tokens):
            if fake.mode == "error_line" and i == 1:
                self._chunk({"error": fake.error_text})
                self._end()
                return
            if fake.mode == "bad_line" and i == 1:
                self._chunk(b"this is not json\n")
            if fake.mode == "brace_line" and i == 1:    # braces around what is not JSON
                self._chunk(b"{this is not json}\n")
            if fake.mode == "bad_chunk" and i == 1:     # a chunk size line that is not hex digits
                line = json.dumps(self._piece(model, chat, tok, False)).encode() + b"\n"
                self.wfile.write(b"0x%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
                continue
            if fake.mode == "truncate" and i == 2:
                self.close_connection = True
                self.wfile.flush()
                return  # no terminating chunk
            if fake.mode == "cut_midline" and i == 2:   # closed inside a chunk, in the middle of a line
                line = json.dumps(self._piece(model, chat, tok, False)).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s" % (len(line), line[:len(line) // 2]))
                self.wfile.flush()
                self.close_connection = True
                return
            if fake.mode == "no_newline" and i == len(tokens) - 1:    # then the node is gone
                self._chunk(json.dumps(self._piece(model, chat, tok, False)).encode())
                self._end()
                return
            if fake.mode == "no_final" and i == len(tokens) - 1:
                line = json.dumps(self._piece(model, chat, tok, False)).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(line), line))
                self.wfile.flush()
                return
            self._chunk(self._piece(model, chat, tok, False))
            self._pace()
        self._hold()
        final = self._piece(model, chat, "", True, prompt=last)
        if fake.mode == "done_reason":
            del final["done"]
        self._answered()
        self._chunk(final)
        if fake.mode == "after_done":
            self._chunk(self._piece(model, chat, "JUNK AFTER DONE", False))
            fake.release.wait(10)
        self._end()

    def _simulated(self, model: str, chat: bool, body: Dict[str, Any]) -> None:
        stream, text, started = body.get("stream", True) is not False, [], False
        for kind, value in self.fake.sim.run(model, self.path, body):
            if kind == "token":
                text.append(value)
                if not stream:
                    continue
            obj = self._piece(model, chat, value if kind == "token" else ("" if stream else "".join(text)),
                              kind == "done")
            if kind == "done":
                obj.update(value)
                if not stream:
                    self._json(200, obj)
                    return
            if not started:   # Go writes the head with the first line
                self._start_stream("application/x-ndjson")
                started = True
            self._chunk(obj)
        self._end()

    def _piece(self, model: str, chat: bool, text: str, done: bool, *, reason: str = "stop",
               prompt: str = "") -> Dict[str, Any]:
        obj: Dict[str, Any] = {"model": model, "created_at": "2026-01-01T00:00:00Z"}
        if chat:
            obj["message"] = {"role": "assistant", "content": text}
        else:
            obj["response"] = text
        obj["done"] = done
        if done:
            obj["done_reason"] = reason
            if reason == "stop":
                obj.update(total_duration=1000, load_duration=100, prompt_eval_count=len(prompt),
                           prompt_eval_duration=100, eval_count=len(self.fake.tokens), eval_duration=1_000_000)
        return obj

    # -- the OpenAI API (Ollama's openai middleware) ----------------------------------
    def _openai_error(self, status: int, message: str) -> None:
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
        self._json(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})

    def _openai_usage(self, prompt: str) -> Dict[str, int]:
        n = len(self.fake.tokens)
        return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

    def _openai_chat(self, body: Dict[str, Any]) -> None:
        fake = self.fake
        model = body.get("model", "")
        messages = body.get("messages") or []
        if not messages:
            self._openai_error(400, "[] is too short - 'messages'")
            return
        if self._missing(model):
            self._openai_error(404, f'model "{model}" not found, try pulling it first')
            return
        if fake.delay:
            self._think(fake.delay)
        prompt = str(messages[-1].get("content", ""))
        tools = body.get("tools") or []
        calls = [{"id": "call_fake0", "index": 0, "type": "function",
                  "function": {"name": tools[0]["function"]["name"], "arguments": "{\"city\":\"Paris\"}"}}
                 ] if tools else []
        fmt = (body.get("response_format") or {}).get("type")
        text = json.dumps({"answer": self._text()}) if fmt in ("json_object", "json_schema") else self._text()
        reason = "tool_calls" if calls else "stop"
        base = {"id": "chatcmpl-123", "created": 1767225600, "model": model, "system_fingerprint": "fp_ollama"}
        if not body.get("stream"):
            message: Dict[str, Any] = {"role": "assistant", "content": "" if calls else text}
            if calls:
                message["tool_calls"] = calls
            answer = dict(base, object="chat.completion", choices=[
                {"index": 0, "message": message, "finish_reason": reason}], usage=self._openai_usage(prompt))
            if self.fake.mode == "cut_whole":   # in one chunk, then closed before the last chunk
                self._start_stream("application/json")
                self._chunk(answer)
                self.close_connection = True
                return
            self._json(200, answer)
            return
        self._start_stream("text/event-stream")
        chunk = dict(base, object="chat.completion.chunk")
        pieces = [] if calls else list(fake.tokens)
        for tok in pieces:
            self._sse(dict(chunk, choices=[{"index": 0, "delta": {"role": "assistant", "content": tok},
                                            "finish_reason": None}]))
            self._pace()
        self._hold()
        delta: Dict[str, Any] = {"role": "assistant", "content": ""}
        if calls:
            delta["tool_calls"] = calls
        self._sse(dict(chunk, choices=[{"index": 0, "delta": delta, "finish_reason": reason}]))
        if (body.get("stream_options") or {}).get("include_usage"):
            self._sse(dict(chunk, choices=[], usage=self._openai_usage(prompt)))
        self._sse(b"[DONE]")
        self._end()

    def _openai_completion(self, body: Dict[str, Any]) -> None:
        fake = self.fake
        model = body.get("model", "")
        if self._missing(model):
            self._openai_error(404, f'model "{model}" not found, try pulling it first')
            return
        prompt = str(body.get("prompt", ""))
        base = {"id": "cmpl-123", "object": "text_completion", "created": 1767225600, "model": model,
                "system_fingerprint": "fp_ollama"}
        if not body.get("stream"):
            self._json(200, dict(base, choices=[{"text": self._text(), "index": 0, "finish_reason": "stop"}],
                                 usage=self._openai_usage(prompt)))
            return
        usage = (body.get("stream_options") or {}).get("include_usage")
        self._start_stream("text/event-stream")
        for tok in fake.tokens:
            self._sse(dict(base, choices=[{"text": tok, "index": 0, "finish_reason": None}]))
            self._pace()
        self._hold()
        self._sse(dict(base, choices=[{"text": "", "index": 0, "finish_reason": "stop"}]))
        if usage:
            self._sse(dict(base, choices=[], usage=self._openai_usage(prompt)))
        self._sse(b"[DONE]")
        self._end()

    def _openai_embeddings(self, body: Dict[str, Any]) -> None:
        import base64
        import struct
        model = body.get("model", "")
        fmt = body.get("encoding_format") or "float"
        if fmt.lower() not in ("float", "base64"):
            self._openai_error(400, f"Invalid value for 'encoding_format' = {fmt}. "
                                    "Supported values: ['float', 'base64'].")
            return
        if self._missing(model):
            self._openai_error(404, f'model "{model}" not found, try pulling it first')
            return
        data = []
        for i, vec in enumerate(self._vectors(body.get("input"))):
            emb: Any = vec
            if fmt.lower() == "base64":
                emb = base64.b64encode(struct.pack("<%df" % len(vec), *vec)).decode()
            data.append({"object": "embedding", "embedding": emb, "index": i})
        self._json(200, {"object": "list", "data": data, "model": model,
                         "usage": {"prompt_tokens": 3, "total_tokens": 3}})

    def _openai_responses(self, body: Dict[str, Any]) -> None:
        fake = self.fake
        model = body.get("model", "")
        if self._missing(model):
            self._openai_error(404, f'model "{model}" not found, try pulling it first')
            return
        text = self._text()
        usage = {"input_tokens": 3, "output_tokens": len(fake.tokens), "total_tokens": 3 + len(fake.tokens)}
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        item = {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant", "content": [part]}
        response = {"id": "resp_1", "object": "response", "created_at": 1767225600, "completed_at": 1767225601,
                    "status": "completed", "model": model, "output": [item], "usage": usage,
                    "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "error": None,
                    "incomplete_details": None, "instructions": body.get("instructions"), "metadata": {},
                    "temperature": 1.0, "top_p": 1.0, "text": {"format": {"type": "text"}}}
        if not body.get("stream"):
            self._json(200, response)
            return
        self._start_stream("text/event-stream")
        seq = iter(range(1000))

        def event(kind: str, **fields: Any) -> None:
            self._sse(dict(type=kind, sequence_number=next(seq), **fields), event=kind)

        started = dict(response, status="in_progress", output=[], usage=None, completed_at=None)
        event("response.created", response=started)
        event("response.in_progress", response=started)
        event("response.output_item.added", output_index=0,
              item=dict(item, status="in_progress", content=[]))
        event("response.content_part.added", item_id="msg_1", output_index=0, content_index=0,
              part=dict(part, text=""))
        for tok in fake.tokens:
            event("response.output_text.delta", item_id="msg_1", output_index=0, content_index=0, delta=tok,
                  logprobs=[])
            self._pace()
        self._hold()
        event("response.output_text.done", item_id="msg_1", output_index=0, content_index=0, text=text,
              logprobs=[])
        event("response.content_part.done", item_id="msg_1", output_index=0, content_index=0, part=part)
        event("response.output_item.done", output_index=0, item=item)
        event("response.completed", response=response)
        self._end()

    # -- the Anthropic API (Ollama's anthropic middleware) ----------------------------
    def _anthropic_messages(self, body: Dict[str, Any]) -> None:
        fake = self.fake
        model = body.get("model", "")
        if self._missing(model):
            self._json(404, {"type": "error", "error": {"type": "not_found_error",
                                                        "message": f'model "{model}" not found, try pulling it first'},
                             "request_id": "req_fake"})
            return
        if fake.delay:
            self._think(fake.delay)
        usage = {"input_tokens": 3, "output_tokens": len(fake.tokens)}
        message = {"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                   "content": [{"type": "text", "text": self._text()}], "stop_reason": "end_turn",
                   "usage": usage}
        if not body.get("stream"):
            self._json(200, message)
            return
        self._start_stream("text/event-stream")
        self._sse({"type": "message_start", "message": dict(message, content=[], stop_reason=None,
                                                             usage={"input_tokens": 3, "output_tokens": 0})},
                  event="message_start")
        self._sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                  event="content_block_start")
        for tok in fake.tokens:
            self._sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": tok}},
                      event="content_block_delta")
            self._pace()
        self._hold()
        self._sse({"type": "content_block_stop", "index": 0}, event="content_block_stop")
        self._sse({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage},
                  event="message_delta")
        self._sse({"type": "message_stop"}, event="message_stop")
        self._end()


# ---------------------------------------------------------------------------
# sshd nodes
# ---------------------------------------------------------------------------

def _user() -> str:
    import pwd
    return pwd.getpwuid(os.getuid()).pw_name


class SSHNodeProc:
    """One sshd on 127.0.0.1:port."""

    def __init__(self, lab: "SSHLab", name: str, *, allow_forwarding: bool = True, sshd_extra: str = "") -> None:
        self.lab, self.name = lab, name
        self.port = free_port()
        self.dir = os.path.join(lab.dir, "sshd-" + name)
        os.makedirs(self.dir, exist_ok=True)
        self.config = os.path.join(self.dir, "sshd_config")
        self.log = os.path.join(self.dir, "sshd.log")
        # Sessions get a HOME of their own, so the node's shell does not run this machine's
        # dotfiles (a developer's `pyenv init` in ~/.bashrc takes a lock in every shell).
        # sshd takes only its first SetEnv line, so HOME joins the caller's one if there is one.
        home = os.path.join(self.dir, "home")
        os.makedirs(home, exist_ok=True)
        if "SetEnv " in sshd_extra:
            sshd_extra = sshd_extra.replace("SetEnv ", f"SetEnv HOME={home} ", 1)
        else:
            sshd_extra = f"SetEnv HOME={home}\n{sshd_extra}"
        with open(self.config, "w") as fh:
            fh.write(f"""ListenAddress 127.0.0.1:{self.port}
HostKey {lab.hostkey}
PidFile {self.dir}/sshd.pid
AuthorizedKeysFile {lab.authorized_keys}
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
StrictModes no
AllowTcpForwarding {'yes' if allow_forwarding else 'no'}
MaxStartups 100:30:200
PrintMotd no
{sshd_extra}
""")
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", self.config],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        wait_for(self._listening, 10, f"sshd {self.name} to listen")

    def _listening(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise AssertionError(f"sshd exited: {open(self.log).read()[-500:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), 0.2):
                return True
        except OSError:
            return False

    def _all_pids(self) -> List[int]:
        """The listener and every session process it forked (those rename themselves
        `sshd: user@notty`, so they are found through the process tree)."""
        if not self.proc:
            return []
        return [self.proc.pid] + _descendants(self.proc.pid)

    def kill(self) -> None:
        """Kill this node's sshd, listener and sessions, as a crashed machine would."""
        pids = self._all_pids()
        self._signal(pids, signal.SIGKILL)
        if self.proc:
            self.proc.wait()

    @staticmethod
    def _signal(pids: List[int], sig: int) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _signal_all(self, sig: int) -> None:
        self._signal(self._all_pids(), sig)

    def freeze(self) -> None:
        """Like a frozen machine: every sshd process of this node stops answering."""
        self._signal_all(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal_all(signal.SIGCONT)


def _descendants(root: int) -> List[int]:
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _pids_matching(needle: str) -> List[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if needle in cmd:
            pids.append(int(entry))
    return pids


def silent_port() -> Tuple[int, List[socket.socket]]:
    """A port on 127.0.0.1 whose SYNs are dropped, as a blackholed host's: a listening
    socket with backlog 0 whose accept queue is already full (Linux drops further SYNs,
    so connect() and ssh wait out their timeout).  Returns (port, sockets to close)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    filler = socket.create_connection(srv.getsockname(), timeout=10)   # never accepted
    return srv.getsockname()[1], [srv, filler]


def masters_starting(pid: int) -> int:
    """ssh masters process `pid` started that are still connecting: its children with
    ControlMaster=yes (a master that is up has gone to the background and left its
    parent; requests' and sessions' own ssh children are not masters)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            kids = fh.read().split()
    except OSError:
        return 0
    count = 0
    for kid in kids:
        try:
            with open(f"/proc/{kid}/cmdline", "rb") as fh:
                count += b"ControlMaster=yes" in fh.read()
        except OSError:
            pass
    return count


class SSHLab:
    """Temporary keys, an ssh_config with one Host per node, and a control dir."""

    def __init__(self) -> None:
        if os.getuid() == 0:
            os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation dir
        self.dir = tempfile.mkdtemp(prefix="meshlab-")
        # Control sockets need a short path (UNIX socket limit): keep it under /tmp.
        self.control_dir = tempfile.mkdtemp(prefix="mc-", dir="/tmp")
        os.chmod(self.control_dir, 0o700)
        self.hostkey = os.path.join(self.dir, "hostkey")
        self.userkey = os.path.join(self.dir, "userkey")
        self.authorized_keys = os.path.join(self.dir, "authorized_keys")
        for key in (self.hostkey, self.userkey):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
        shutil.copy(self.userkey + ".pub", self.authorized_keys)
        self.known_hosts = os.path.join(self.dir, "known_hosts")
        self.config_path = os.path.join(self.dir, "ssh_config")
        self.nodes: Dict[str, SSHNodeProc] = {}
        self.fakes: Dict[str, FakeOllama] = {}
        self.settings: Dict[str, str] = {}
        self.extra_config = ""

    def add_node(self, name: str, models: List[str], *, settings: str = "", allow_forwarding: bool = True,
                 sshd_extra: str = "", **fake_kw: Any) -> FakeOllama:
        node = SSHNodeProc(self, name, allow_forwarding=allow_forwarding, sshd_extra=sshd_extra)
        fake = FakeOllama(models, name=name, **fake_kw)
        self.nodes[name], self.fakes[name], self.settings[name] = node, fake, settings
        with open(self.hostkey + ".pub") as fh:
            key = " ".join(fh.read().split()[:2])
        with open(self.known_hosts, "a") as fh:
            fh.write(f"[127.0.0.1]:{node.port} {key}\n")
        self.write_config()
        return fake

    def host_block(self, name: str) -> str:
        node = self.nodes[name]
        return (f"Host {name}\n    HostName 127.0.0.1\n    Port {node.port}\n    User {_user()}\n"
                f"    IdentityFile {self.userkey}\n    IdentitiesOnly yes\n"
                f"    UserKnownHostsFile {self.known_hosts}\n    StrictHostKeyChecking yes\n"
                f"    # mesh: on ollama_port={self.fakes[name].port} {self.settings[name]}\n\n")

    def write_config(self, *, leave_out: Any = ()) -> None:
        """The config with one Host block per node (but those in `leave_out`), written
        to a new file renamed over the old one, as editors save."""
        with open(self.config_path + ".new", "w") as fh:
            fh.write("# written by tests/lab.py\n\n")
            for name in self.nodes:
                if name not in leave_out:
                    fh.write(self.host_block(name))
            fh.write(self.extra_config)
        os.replace(self.config_path + ".new", self.config_path)

    def env(self, **extra: str) -> Dict[str, str]:
        env = dict(os.environ)
        env.update(MESH_CONTROL_DIR=self.control_dir, MESH_SSH_CONFIG=self.config_path)
        env.pop("MESH_MODEL", None)
        env.update(extra)
        return env

    def run(self, *args: str, input: Optional[bytes] = None, timeout: float = 60,
            env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
        """Run the real mesh.py CLI with this lab's config."""
        return subprocess.run([sys.executable, MESH, "--config", self.config_path, *args],
                              input=input, stdin=None if input is not None else subprocess.DEVNULL,
                              capture_output=True, timeout=timeout, env=env or self.env())

    def ssh_processes(self, include_masters: bool = False) -> List[str]:
        """ssh processes this lab's mesh.py started that are still alive."""
        out = []
        for pid in _pids_matching(self.control_dir):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    cmd = fh.read().replace(b"\0", b" ").decode()
                with open(f"/proc/{pid}/stat") as fh:
                    state = fh.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if os.path.basename(cmd.split(" ", 1)[0]) != "ssh" or state == "Z":
                continue
            if "ControlMaster=yes" in cmd and not include_masters:
                continue
            out.append(f"{pid}: {cmd}")
        return out

    def control_sockets(self) -> List[str]:
        """Control sockets under the control dir (mesh keeps them in a private subdirectory)."""
        out = []
        for where, _, files in os.walk(self.control_dir):
            out += [os.path.join(where, f) for f in files if "." not in f]
        return out

    def master_pids(self) -> List[int]:
        """The pids of the live masters, as the masters themselves say (ssh -O check)."""
        pids = []
        for path in self.control_sockets():
            p = subprocess.run([SSH, "-F", "none", "-o", f"ControlPath={path}", "-O", "check", "dummy"],
                               capture_output=True, timeout=10, text=True)
            if p.returncode == 0 and "pid=" in p.stderr:
                pids.append(int(p.stderr.split("pid=")[1].split(")")[0]))
        return pids

    def stop_masters(self) -> None:
        for path in self.control_sockets():
            subprocess.run([SSH, "-F", "none", "-o", f"ControlPath={path}", "-O", "exit", "dummy"],
                           capture_output=True, timeout=10)
        for pid in _pids_matching(self.control_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self.stop_masters()
        for node in self.nodes.values():
            node.thaw()
            node.kill()
        for fake in self.fakes.values():
            try:
                fake.close()
            except Exception:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.control_dir, ignore_errors=True)


# ---------------------------------------------------------------------------
# A link with latency, in user space (for the benchmark; netem needs a kernel module)
# ---------------------------------------------------------------------------

class DelayLink:
    """A TCP relay on 127.0.0.1 that delivers every byte `one_way` seconds late in
    each direction: a link with round-trip time 2*one_way in front of `target_port`."""

    def __init__(self, target_port: int, one_way: float) -> None:
        import asyncio
        self.target_port, self.one_way = target_port, one_way
        self.writers: set = set()
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self._start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)

    async def _start(self) -> None:
        import asyncio
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", self.port)

    async def _conn(self, reader: Any, writer: Any) -> None:
        import asyncio
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        for sock in (writer, up_w):
            sock.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.writers.add(sock)

        async def pump(src: Any, dst: Any) -> None:
            try:
                while True:
                    data = await src.read(65536)
                    if not data:
                        self.loop.call_later(self.one_way, dst.close)
                        return
                    self.loop.call_later(self.one_way, dst.write, data)
            except (ConnectionError, OSError):
                dst.close()

        await asyncio.gather(pump(reader, up_w), pump(up_r, writer))

    def close(self) -> None:
        import asyncio

        async def stop() -> None:
            self.server.close()
            for writer in list(self.writers):
                writer.close()   # the pumps see EOF and end by themselves
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if tasks:
                await asyncio.wait(tasks, timeout=5)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
