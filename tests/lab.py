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
from typing import Any, Dict, List, Optional

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
    """Speaks the parts of Ollama's API mesh.py uses.  `mode` injects faults:
    ok, hang (accept, never answer), garbage (200 with non-JSON), error500, html,
    busy (503), truncate (stream cut before done), error_line (an error mid-stream,
    `error_text`), badhead (not HTTP at all), bad_line (a line that is not JSON
    mid-stream), after_done (more lines after done, then the reply held open - for
    stream:false too), done_reason (a last line with done_reason but no done)."""

    def __init__(self, models: List[str], *, name: str = "fake", version: str = "0.6.1",
                 delay: float = 0.0, token_delay: float = 0.0, tokens: Optional[List[str]] = None,
                 loaded: Optional[List[str]] = None) -> None:
        self.models = list(models)
        self.loaded = list(loaded or [])
        self.name = name
        self.version = version
        self.delay = delay                # seconds before the first byte of generate/chat
        self.token_delay = token_delay    # seconds between streamed chunks
        self.tokens = tokens or ["Hello", " from", " " + name, "."]
        self.mode = "ok"
        self.pull_error: Optional[str] = None   # /api/pull streams this as Ollama's {"error": ...} line
        self.error_text = "CUDA error: out of memory"
        self.requests: List[Dict[str, Any]] = []
        self.active = 0
        self.max_active = 0
        self.disconnects = 0
        self.connections: set = set()
        self._lock = threading.Lock()
        self.release = threading.Event()  # lets a "hang" end
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

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # as Go (Ollama) does by default
            # Go's net/http sends a small reply in one write; an unbuffered handler
            # would send the head and the body as two segments.
            wbufsize = 1 << 16

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                fake.connections.add(self.connection)

            def finish(self) -> None:
                fake.connections.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

            def _json(self, status: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()

            def _chunk(self, obj: Any) -> None:
                line = (obj if isinstance(obj, bytes) else json.dumps(obj).encode() + b"\n")
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()

            def _fault(self) -> bool:
                mode = fake.mode
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

            def do_HEAD(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                fake.requests.append({"path": self.path, "body": None, "conn": id(self.connection)})
                if fake.mode in ("hang", "badhead", "garbage", "html") and self._fault():
                    return
                if self.path == "/api/version":
                    self._json(200, {"version": fake.version})
                elif self.path == "/api/tags":
                    self._json(200, {"models": [
                        {"name": m, "model": m, "modified_at": "2026-01-01T00:00:00Z", "size": 1000,
                         "digest": "sha256:" + str(abs(hash(m)))[:12], "details": {"family": "fake"}}
                        for m in fake.models]})
                elif self.path == "/api/ps":
                    self._json(200, {"models": [{"name": m, "model": m, "size": 2000, "size_vram": 1000,
                                                 "digest": "sha256:" + str(abs(hash(m)))[:12],
                                                 "expires_at": time.strftime("%Y-%m-%dT%H:%M:%S.123456789Z",
                                                                             time.gmtime(time.time() + 299))}
                                                for m in fake.loaded]})
                elif self.path == "/":
                    data = b"Ollama is running"
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                else:
                    self._json(404, {"error": "404 page not found"})

            def do_DELETE(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                fake.requests.append({"path": self.path, "body": body, "method": "DELETE"})
                model = body.get("model") or body.get("name") or ""
                if self.path != "/api/delete":
                    self._json(405, {"error": "method not allowed"})
                elif model not in fake.models:
                    self._json(404, {"error": f"model '{model}' not found"})
                else:   # Ollama answers 200 with no body
                    fake.models.remove(model)
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._json(400, {"error": "invalid JSON"})
                    return
                fake.requests.append({"path": self.path, "body": body, "raw": raw})
                with fake._lock:
                    fake.active += 1
                    fake.max_active = max(fake.max_active, fake.active)
                try:
                    self._post(body)
                except (BrokenPipeError, ConnectionResetError):
                    fake.disconnects += 1
                    self.close_connection = True
                finally:
                    with fake._lock:
                        fake.active -= 1

            def _post(self, body: Dict[str, Any]) -> None:
                if self._fault():
                    return
                model = body.get("model", "")
                if self.path == "/api/pull":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/x-ndjson")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self._chunk({"status": "pulling manifest"})
                    if fake.pull_error:
                        self._chunk({"error": fake.pull_error})
                        self._chunk(b"")
                        return
                    for done in (0, 500, 1000):
                        self._chunk({"status": "pulling 8eeb52dfb3bb", "digest": "sha256:8eeb52dfb3bb",
                                     "total": 1000, "completed": done})
                        if fake.token_delay:
                            time.sleep(fake.token_delay)
                    self._chunk({"status": "verifying sha256 digest"})
                    self._chunk({"status": "writing manifest"})
                    self._chunk({"status": "success"})
                    self._chunk(b"")
                    if model not in fake.models:
                        fake.models.append(model)
                    return
                known = {m if ":" in m else m + ":latest" for m in fake.models}
                if (model if ":" in model else model + ":latest") not in known:
                    self._json(404, {"error": f'model "{model}" not found, try pulling it first'})
                    return
                if fake.delay:
                    time.sleep(fake.delay)
                if self.path == "/api/embed":
                    inputs = body.get("input")
                    inputs = [inputs] if isinstance(inputs, str) else inputs
                    self._json(200, {"model": model, "embeddings": [[float(len(s)), 0.5, fake.port % 7] for s in inputs]})
                    return
                if self.path == "/api/embeddings":
                    self._json(200, {"embedding": [float(len(body.get("prompt", ""))), 0.5]})
                    return
                if self.path == "/api/show":
                    self._json(200, {"modelfile": "FROM " + model, "parameters": "temperature 0.7",
                                     "template": "{{ .Prompt }}", "license": "FAKE LICENSE",
                                     "details": {"family": "fake", "parameter_size": "7.6B",
                                                 "quantization_level": "Q4_K_M", "format": "gguf"},
                                     "model_info": {"general.architecture": "fake", "fake.context_length": 32768},
                                     "capabilities": ["completion"]})
                    return
                if self.path == "/api/generate" and "prompt" not in body and body.get("keep_alive") == 0:
                    if model in fake.loaded:   # `ollama stop`: unload
                        fake.loaded.remove(model)
                    self._json(200, {"model": model, "created_at": "2026-01-01T00:00:00Z", "response": "",
                                     "done": True, "done_reason": "unload"})
                    return
                chat = self.path == "/api/chat"
                if chat:
                    last = (body.get("messages") or [{}])[-1].get("content", "")
                else:
                    last = body.get("prompt", "")
                tokens = list(fake.tokens)

                def piece(text: str, done: bool) -> Dict[str, Any]:
                    obj: Dict[str, Any] = {"model": model, "created_at": "2026-01-01T00:00:00Z", "done": done}
                    if chat:
                        obj["message"] = {"role": "assistant", "content": text}
                    else:
                        obj["response"] = text
                    if done:
                        obj.update(done_reason="stop", total_duration=1000, eval_count=len(tokens),
                                   eval_duration=1_000_000, prompt_eval_count=len(last))
                    return obj

                if body.get("stream", True) is False and fake.mode != "after_done":
                    self._json(200, piece("".join(tokens), True))
                    return
                if body.get("stream", True) is False:      # after_done: the answer, junk, held open
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json; charset=utf-8")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self._chunk(piece("".join(tokens), True))
                    self._chunk(piece("JUNK AFTER DONE", False))
                    fake.release.wait(10)
                    self._chunk(b"")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i, tok in enumerate(tokens):
                    if fake.mode == "error_line" and i == 1:
                        self._chunk({"error": fake.error_text})
                        self._chunk(b"")
                        return
                    if fake.mode == "bad_line" and i == 1:
                        self._chunk(b"this is not json\n")
                    if fake.mode == "truncate" and i == 2:
                        self.close_connection = True
                        self.wfile.flush()
                        return  # no terminating chunk
                    self._chunk(piece(tok, False))
                    if fake.token_delay:
                        time.sleep(fake.token_delay)
                final = piece("", True)
                if fake.mode == "done_reason":
                    del final["done"]
                self._chunk(final)
                if fake.mode == "after_done":
                    self._chunk(piece("JUNK AFTER DONE", False))
                    fake.release.wait(10)
                self._chunk(b"")

        return Handler


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
                f"    # mesh: ollama_port={self.fakes[name].port} {self.settings[name]}\n\n")

    def write_config(self) -> None:
        with open(self.config_path, "w") as fh:
            fh.write("# written by tests/lab.py\n\n")
            for name in self.nodes:
                fh.write(self.host_block(name))
            fh.write(self.extra_config)

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

    def stop_masters(self) -> None:
        for entry in os.listdir(self.control_dir):
            path = os.path.join(self.control_dir, entry)
            if "." in entry:
                continue
            subprocess.run([SSH, "-o", f"ControlPath={path}", "-O", "exit", "dummy"],
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
