#!/usr/bin/env python3
"""Relay benchmark: direct vs nginx vs mesh.py serve (HTTP nodes, SSH nodes), side by side.

    python3 tests/bench_relay.py [--quick] [--mesh OTHER/mesh.py] [--litellm VENV/bin/litellm] [--herd VENV/bin]

Three stand-in Ollama backends (asyncio, one process each, one write per token as
Ollama's Go server flushes one line per token) serve every contender in the same run:
  direct    the client spreads requests over the three backends itself
  nginx     Debian's nginx as the yardstick: upstream least_conn, keepalive, no buffering
  mesh/http mesh.py serve, the three backends as `transport=http` nodes
  mesh/ssh  mesh.py serve, each backend behind its own real sshd (tests/lab.py)
  ssh alone the client straight through the forwards of mesh/ssh's own ssh masters (a unix
            socket per node, a new channel per connection), no mesh: what SSH itself costs
  litellm   (optional) LiteLLM's proxy, one `ollama/m:1` deployment per backend; the
            client speaks OpenAI's /v1/completions (SSE), as LiteLLM's users do
  herd      (optional) Ollama Herd: its router and one herd-node per backend; the client
            speaks Ollama's /api/generate
LiteLLM and Herd come from a throwaway venv (never a dependency) and run only inside a
network namespace with nothing but loopback: asked for them, the bench runs itself again
under `unshare --net` (root), so whatever they try to reach beyond 127.0.0.1 fails at once
(their opt-outs are set too: telemetry off, no cost-map download, nodes told the router's URL).
Figures, interleaved per round: one long stream's tokens/s and router CPU per chunk;
N concurrent streams' wall time and router CPU; small requests' added latency p50/p99;
a whole short stream over SSH on a master mesh started and on one it reuses (once the
machine is quiet after the first request); a burst
of simultaneous connects (how many waited for a SYN retry).  Every response is
checked (status, token count, done line or finish_reason, the first token echoing the
prompt's hash, the node header).  Router CPU is the
router's own processes (mesh.py; nginx's worker), read from /proc; for mesh/ssh the
ssh masters' CPU is shown apart (and Herd's nodes').  Not part of the test run; skips nginx with a
message where it is not installed, and LiteLLM/Herd where not given or no namespace can be made.
"""

import argparse
import asyncio
import glob
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from lab import MESH, SSHLab, free_port, wait_for, _descendants  # noqa: E402

SSH_ALONE = "ssh alone"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
TICK = os.sysconf("SC_CLK_TCK")


def tag(prompt):
    """The stand-in's echo of a prompt: the first token of every reply is this, so a client
    can check that the reply it got is the one for its own prompt, through any router."""
    return "h" + hashlib.sha1(prompt.encode()).hexdigest()[:8]


def prompt_delay_ms(prompt):
    """The token delay a prompt asks for ("... d=10"): carried in the prompt, not in
    options, because LiteLLM's OpenAI front passes no unknown options on to Ollama."""
    for word in prompt.split():
        if word.startswith("d="):
            return float(word[2:])
    return 0.0


# ---------------------------------------------------------------------------
# The stand-in backend (run as `bench_relay.py --backend PORT`)
# ---------------------------------------------------------------------------

def backend_main(port: int, name: str) -> None:
    """A fast stand-in Ollama: /api/generate streams options.num_predict tokens, one
    chunk and one write per token (token_delay_ms between them), then the done line."""
    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = json.loads(await reader.readexactly(length)) if length else {}
                path = head.split(b" ", 2)[1]
                if path != b"/api/generate":
                    data = json.dumps({"version": "0.6.1"} if path == b"/api/version" else
                                      {"models": [{"name": "m:1", "model": "m:1"}]} if path == b"/api/tags" else
                                      # m:1 is loaded (hot), as on a busy Ollama: routing has no load to weigh
                                      {"models": [{"name": "m:1", "model": "m:1", "size": 1,
                                                   "expires_at": "2099-01-01T00:00:00Z"}]}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
                    continue
                opts = body.get("options") or {}
                n = int(opts.get("num_predict", 10))
                prompt = body.get("prompt", "")
                delay = float(opts.get("token_delay_ms", prompt_delay_ms(prompt))) / 1000
                echo = tag(prompt)
                if body.get("stream", True) is False:
                    data = json.dumps({"model": "m:1", "created_at": "2026-01-01T00:00:00Z",
                                       "response": echo + "t" * n, "done": True, "done_reason": "stop",
                                       "eval_count": n, "prompt": prompt[:16], "backend": name}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
                    continue
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
                line = b'{"model":"m:1","created_at":"2026-01-01T00:00:00.000000Z","response":"tok","done":false}\n'
                chunk = b"%x\r\n%s\r\n" % (len(line), line)
                first = line.replace(b'"tok"', b'"%s"' % echo.encode())
                first = b"%x\r\n%s\r\n" % (len(first), first)
                for i in range(n):
                    writer.write(chunk if i else first)
                    if delay:
                        await asyncio.sleep(delay)
                    elif i % 64 == 63:
                        await writer.drain()
                done = json.dumps({"model": "m:1", "created_at": "2026-01-01T00:00:00Z", "response": "",
                                   "done": True, "done_reason": "stop", "eval_count": n,
                                   "eval_duration": n * 1000, "prompt_eval_count": len(prompt),
                                   "backend": name}).encode() + b"\n"
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()
    asyncio.run(main())


# ---------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------

class Conn:
    """One keep-alive client connection that reads replies with minimal work."""

    def __init__(self, port):
        self.port = port
        self.r = self.w = None

    async def open(self):
        self.r, self.w = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 22)

    async def post(self, body, want_node=None):
        """POST /api/generate; returns (lines, done_obj, node header, seconds); done_obj["first"]
        is the first line's response (the whole response when not streamed)."""
        head, payload, secs = await self.exchange(b"/api/generate", body)
        hl = head.lower()
        node = None
        i = hl.find(b"x-mesh-node:")
        if i >= 0:
            node = head[i + 12:head.index(b"\r\n", i)].strip().decode()
        lines = payload.count(b"\n") + (0 if payload.endswith(b"\n") else 1)
        last = payload.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        done = json.loads(last)
        assert done.get("done") is True, last[:200]
        done["first"] = json.loads(payload.split(b"\n", 1)[0])["response"]
        return lines, done, node, secs

    async def exchange(self, path, body, headers=b""):
        """POST body as JSON to path; returns (head, payload de-chunked, seconds)."""
        if self.r is None:
            await self.open()
        data = json.dumps(body).encode()
        t = time.perf_counter()
        self.w.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n%s"
                     b"Content-Length: %d\r\n\r\n%s" % (path, self.port, headers, len(data), data))
        head = await self.r.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        hl = head.lower()
        if b"transfer-encoding: chunked" in hl:
            buf = bytearray()
            while not buf.endswith(b"\r\n0\r\n\r\n") and not (buf == b"0\r\n\r\n"):
                more = await self.r.read(1 << 20)
                assert more, "connection closed mid-reply"
                buf += more
            # de-chunk for checking (cheap enough on the client)
            payload, pos = bytearray(), 0
            while True:
                nl = buf.index(b"\r\n", pos)
                size = int(buf[pos:nl], 16)
                if not size:
                    break
                payload += buf[nl + 2:nl + 2 + size]
                pos = nl + 4 + size
        else:
            i = hl.index(b"content-length:")
            n = int(hl[i + 15:hl.index(b"\r\n", i)])
            payload = await self.r.readexactly(n)
        return head, payload, time.perf_counter() - t

    def close(self):
        if self.w:
            self.w.close()


class UnixConn(Conn):
    """A Conn to a node's forward through its ssh master (a unix socket path): the
    node's Ollama with SSH and nothing else on the way."""

    def __init__(self, path):
        super().__init__(11434)               # (the port the Host header names)
        self.path = path

    async def open(self):
        self.r, self.w = await asyncio.open_unix_connection(self.path, limit=1 << 22)


class OpenAIConn(Conn):
    """A client of OpenAI's POST /v1/completions (SSE when streamed), as most LiteLLM users
    call it; the bench's Ollama-shaped body is put as such a client would (num_predict ->
    max_tokens, usage asked for in the stream), and the reply read back into Conn.post's
    shape: one line per token with text plus one for the finish, eval_count from usage."""

    key = b""

    async def post(self, body, want_node=None):
        stream = body.get("stream", True)
        req = {"model": body["model"], "prompt": body["prompt"], "stream": stream,
               "max_tokens": body["options"]["num_predict"]}
        if stream:
            req["stream_options"] = {"include_usage": True}
        head, payload, secs = await self.exchange(b"/v1/completions", req,
                                                  b"Authorization: Bearer %s\r\n" % self.key)
        if not stream:
            obj = json.loads(payload)
            choice = obj["choices"][0]
            return 1, {"done": choice["finish_reason"] == "stop", "eval_count": obj["usage"]["completion_tokens"],
                       "first": choice["text"]}, None, secs
        events = [e[6:] for e in payload.split(b"\n\n") if e.startswith(b"data: ")]
        assert events and events[-1] == b"[DONE]", payload[-200:]
        # every token's event is decoded only at the ends; the rest are counted (client CPU is not the figure)
        texts = payload.count(b'"text":"') - payload.count(b'"text":""')
        first = next(c["text"] for e in events[:-1] for c in json.loads(e)["choices"] if c.get("text"))
        finish, usage = None, None
        for e in events[-4:-1]:
            obj = json.loads(e)
            usage = obj.get("usage") or usage
            finish = next((c["finish_reason"] for c in obj["choices"] if c.get("finish_reason")), finish)
        assert finish == "stop" and usage, events[-4:]
        return texts + 1, {"done": True, "eval_count": usage["completion_tokens"], "first": first}, None, secs


def proc_cpu(pids):
    """CPU seconds the processes have used: the scheduler's own count in nanoseconds
    (/proc/PID/task/TID/schedstat, first field) summed over their threads; where the
    kernel keeps no schedstat, utime + stime from /proc/PID/stat (10 ms ticks).  A
    thread that ended takes its nanoseconds with it: the routers measured here are
    single-threaded while they relay (LiteLLM's and Herd's helper threads, if any,
    may be under-counted)."""
    total = 0.0
    for pid in pids:
        try:
            ns = 0
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                    ns += int(fh.read().split()[0])
            if ns:
                total += ns / 1e9
                continue
            with open(f"/proc/{pid}/stat") as fh:
                f = fh.read().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12])) / TICK
        except (OSError, IndexError, ValueError):
            pass
    return total


class Contender:
    def __init__(self, name, ports, pids_fn, extra_pids_fn=None, conn=Conn):
        self.name, self.ports, self.pids_fn, self.extra_pids_fn = name, ports, pids_fn, extra_pids_fn
        self.conn = conn                          # the client class: Conn (Ollama's API) or OpenAIConn
        self._rr = 0

    def port(self):
        self._rr += 1
        return self.ports[self._rr % len(self.ports)]


def check(lines, done, node, n, c, prompt):
    assert lines == n + 1, f"{c.name}: {lines} lines for {n} tokens"
    assert done["eval_count"] == n
    assert done["first"] == tag(prompt), f"{c.name}: reply to another prompt ({done['first']!r})"
    if c.name not in ("direct", "nginx", "litellm", "herd", SSH_ALONE):
        assert node, "no X-Mesh-Node"


async def one_stream(c, n, delay_ms=0, prompt="p"):
    conn = c.conn(c.port())
    prompt = f"{prompt} d={delay_ms}"             # the delay goes in the prompt: see prompt_delay_ms
    try:
        lines, done, node, secs = await conn.post({"model": "m:1", "prompt": prompt,
                                                   "options": {"num_predict": n}})
        check(lines, done, node, n, c, prompt)
        return secs
    finally:
        conn.close()


async def long_stream(c, n):
    pids = c.pids_fn()
    extra = c.extra_pids_fn() if c.extra_pids_fn else []
    cpu0, x0 = proc_cpu(pids), proc_cpu(extra)
    secs = await one_stream(c, n)
    cpu, x = proc_cpu(pids) - cpu0, proc_cpu(extra) - x0
    return n / secs, cpu / n * 1e6, x / n * 1e6


async def concurrent(c, n_streams, tokens, delay_ms):
    pids = c.pids_fn()
    cpu0 = proc_cpu(pids)
    t = time.perf_counter()
    await asyncio.gather(*(one_stream(c, tokens, delay_ms, prompt=f"p{i}") for i in range(n_streams)))
    wall = time.perf_counter() - t
    return wall, proc_cpu(pids) - cpu0


async def small_requests(c, count):
    conns = [c.conn(p) for p in c.ports]
    out = []
    try:
        for i in range(count):
            conn = conns[i % len(conns)]
            lines, done, node, secs = await conn.post({"model": "m:1", "prompt": f"s{i}", "stream": False,
                                                       "options": {"num_predict": 4}})
            assert done["eval_count"] == 4 and done["done"] is True
            # (Herd asks the node for a stream and joins it: "tok" * 3 after the echo)
            assert done["first"].startswith(tag(f"s{i}")), f"{c.name}: {done['first']!r} for s{i}"
            out.append(secs)
    finally:
        for conn in conns:
            conn.close()
    return out


async def short_streams(c, count, n=11):
    out = []
    conn = c.conn(c.ports[0])
    try:
        for i in range(count):
            lines, done, node, secs = await conn.post({"model": "m:1", "prompt": f"q{i}",
                                                       "options": {"num_predict": n}})
            check(lines, done, node, n, c, f"q{i}")
            out.append(secs)
    finally:
        conn.close()
    return out


async def burst(c, n):
    """n simultaneous connects; how many took longer than 0.9 s (a SYN retry).  None for
    a contender reached by unix socket (no SYN)."""
    if c.conn is UnixConn:
        return None
    async def one():
        t = time.perf_counter()
        r, w = await asyncio.open_connection("127.0.0.1", c.port())
        secs = time.perf_counter() - t
        return secs, w
    results = await asyncio.gather(*(one() for _ in range(n)))
    for _, w in results:
        w.close()
    return sum(1 for s, _ in results if s > 0.9)


# ---------------------------------------------------------------------------
# Bringing up the contenders
# ---------------------------------------------------------------------------

def start_nginx(tmp, backends):
    port = free_port()
    conf = os.path.join(tmp, "nginx.conf")
    ups = "\n".join(f"        server 127.0.0.1:{p};" for p in backends)
    with open(conf, "w") as fh:
        fh.write(f"""worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/cb; proxy_temp_path {tmp}/pt; fastcgi_temp_path {tmp}/ft;
    uwsgi_temp_path {tmp}/ut; scgi_temp_path {tmp}/st;
    upstream ollama {{
        least_conn;
{ups}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://ollama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
""")
    proc = subprocess.Popen([NGINX, "-p", tmp, "-c", conf, "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: port_open(port), 10, "nginx to listen")
    return proc, port


def port_open(port):
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


def start_mesh(config, env, mesh=MESH):
    port = free_port()
    # access log off, as nginx's here; stderr to a file (a pipe nobody reads fills and stalls serve)
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, mesh, "--config", config, "serve", "--listen", f"127.0.0.1:{port}",
                             "--access-log", "off"], stdout=subprocess.DEVNULL, stderr=err, env=env)
    wait_for(lambda: port_open(port) or proc.poll() is not None, 20, "mesh serve to listen")
    if proc.poll() is not None:
        err.seek(0)
        raise SystemExit("mesh serve failed: " + err.read().decode(errors="replace"))
    return proc, port


# LiteLLM and Ollama Herd (optional, from a throwaway venv): they run only inside a network
# namespace that has nothing but loopback (see in_loopback_netns), with their documented
# opt-outs set as well: no telemetry, no model-cost-map download, no mDNS discovery by nodes.

def contender_env(tmp, name):
    """Their environment: HOME in tmp (both write state under ~), opt-outs set."""
    home = os.path.join(tmp, name + "-home")
    os.makedirs(home, exist_ok=True)
    return dict(os.environ, HOME=home,
                LITELLM_LOCAL_MODEL_COST_MAP="True",     # no cost-map download at import
                LITELLM_TELEMETRY_DISABLED="true", LITELLM_LOG="WARNING",  # WARNING: no access log
                FLEET_NODE_TELEMETRY="false", FLEET_TELEMETRY="false",     # Herd's daily summary
                FLEET_ENV_FILE=os.path.join(home, "none"), NO_COLOR="1")


def version_of(venv_python, dist):
    out = subprocess.run([venv_python, "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "?"


def start_litellm(tmp, backends, binary):
    """LiteLLM's proxy: one deployment of `ollama/m:1` per backend under one model name (the
    Router's default simple-shuffle), one worker, a master key (it refuses to start without)."""
    port = free_port()
    conf = os.path.join(tmp, "litellm.yaml")
    with open(conf, "w") as fh:
        fh.write("model_list:\n")
        for p in backends:
            fh.write(f"  - model_name: m:1\n    litellm_params: {{model: ollama/m:1, "
                     f"api_base: 'http://127.0.0.1:{p}'}}\n")
    key = "sk-bench-" + os.urandom(24).hex()
    # the stand-ins send the same token over and over, which LiteLLM ends after 100 as a model
    # "repeating the same chunk": the limit is raised (the check runs per chunk either way)
    env = dict(contender_env(tmp, "litellm"), LITELLM_MASTER_KEY=key, REPEATED_STREAMING_CHUNK_LIMIT="1000000000")
    log = open(os.path.join(tmp, "litellm.log"), "wb")
    proc = subprocess.Popen([binary, "--config", conf, "--host", "127.0.0.1", "--port", str(port),
                             "--num_workers", "1"], stdout=log, stderr=log, env=env)
    wait_for(lambda: port_open(port) or proc.poll() is not None, 120, "litellm to listen")
    if proc.poll() is not None:
        raise SystemExit("litellm failed; its log: " + os.path.join(tmp, "litellm.log"))
    OpenAIConn.key = key.encode()
    return proc, port, version_of(os.path.join(os.path.dirname(binary), "python3"), "litellm")


def start_herd(tmp, backends, bindir):
    """Ollama Herd: the router (`herd`) and one `herd-node` per backend, each told the router's
    URL (no mDNS browsing) and its backend as its Ollama; ready when all three are online.
    The cap is lifted as far as Herd goes: a node reads OLLAMA_NUM_PARALLEL from its own
    environment (unset: 1 at a time per node), and the router clamps it to 8 per node and
    model (queue_manager's _MAX_CONCURRENCY, no setting)."""
    port = free_port()
    env = dict(contender_env(tmp, "herd"), OLLAMA_NUM_PARALLEL="1000")
    log = open(os.path.join(tmp, "herd.log"), "wb")
    router = subprocess.Popen([os.path.join(bindir, "herd"), "--host", "127.0.0.1", "--port", str(port),
                               "--log-level", "warning"], stdout=log, stderr=log, env=env)
    procs = [router]
    wait_for(lambda: port_open(port) or router.poll() is not None, 60, "herd to listen")
    for i, p in enumerate(backends):
        procs.append(subprocess.Popen([os.path.join(bindir, "herd-node"), "--node-id", f"n{i}",
                                       "--ollama-host", f"http://127.0.0.1:{p}",
                                       "--router-url", f"http://127.0.0.1:{port}", "--log-level", "WARNING"],
                                      stdout=log, stderr=log, env=env))

    def online():
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/fleet/status", timeout=2) as r:
                status = json.loads(r.read())
        except (OSError, ValueError):
            return False
        return sum(1 for nd in status.get("nodes", []) if nd.get("status") == "online") == len(backends)
    wait_for(lambda: online() or any(p.poll() is not None for p in procs), 60, "herd's nodes to be online")
    if any(p.poll() is not None for p in procs):
        raise SystemExit("herd failed; its log: " + os.path.join(tmp, "herd.log"))
    return procs, port, version_of(os.path.join(bindir, "python3"), "ollama-herd")


def in_loopback_netns():
    """True when this process's network namespace has no interface but lo (nothing can leave)."""
    import socket
    return [name for _, name in socket.if_nameindex()] == ["lo"]   # this namespace's (not sysfs')


def reexec_in_netns():
    """Run this bench again in a new network namespace with only loopback up (root, unshare(1),
    ip(8)); returns only if that is not possible."""
    ip = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.path.exists(p)), None)
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or not ip or not unshare or os.environ.get("BENCH_RELAY_NETNS"):
        return
    sys.stdout.flush()
    os.execvpe(unshare, [unshare, "--net", "sh", "-c", f'{ip} link set lo up && exec "$@"', "sh",
                         sys.executable, os.path.abspath(__file__)] + sys.argv[1:],
               dict(os.environ, BENCH_RELAY_NETNS="1"))


def stop(proc):
    if proc and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", type=int)
    ap.add_argument("--name", default="b")
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3): more give steadier medians")
    ap.add_argument("--mesh", metavar="PATH", help="another mesh.py (an older one) as an extra contender on "
                                                  "the same HTTP and SSH nodes, columns 'PATH/http' and 'PATH/ssh'")
    ap.add_argument("--litellm", default=os.environ.get("BENCH_LITELLM"), metavar="BIN",
                    help="also measure LiteLLM's proxy (path to its `litellm` script in a venv)")
    ap.add_argument("--herd", default=os.environ.get("BENCH_HERD"), metavar="BINDIR",
                    help="also measure Ollama Herd (the venv's bin directory with `herd` and `herd-node`)")
    args = ap.parse_args()
    if args.backend:
        backend_main(args.backend, args.name)
        return
    if args.litellm and not os.path.exists(args.litellm):
        print(f"litellm: {args.litellm} not found - skipped")
        args.litellm = None
    if args.herd and not os.path.exists(os.path.join(args.herd, "herd")):
        print(f"herd: no {args.herd}/herd - skipped")
        args.herd = None
    if (args.litellm or args.herd) and not in_loopback_netns():
        reexec_in_netns()
        print("litellm/herd: no network namespace with loopback only (needs root, unshare, ip) - skipped")
        args.litellm = args.herd = None
    versions = {}
    rounds = 1 if args.quick else max(1, args.rounds)
    tmp = tempfile.mkdtemp(prefix="bench-relay-")
    backends, procs = [], []
    lab = None
    mesh_procs = []
    try:
        for i in range(3):
            p = free_port()
            procs.append(subprocess.Popen([sys.executable, __file__, "--backend", str(p), "--name", f"b{i}"]))
            backends.append(p)
        for p in backends:
            wait_for(lambda: port_open(p), 10, "backend")
        contenders = [Contender("direct", backends, lambda: [])]
        if NGINX:
            ngx, ngx_port = start_nginx(tmp, backends)
            procs.append(ngx)
            contenders.append(Contender("nginx", [ngx_port], lambda: [ngx.pid] + _descendants(ngx.pid)))
        else:
            print("nginx: not installed (apt-get install nginx-light) - skipped; targets relative to nginx "
                  "are not judged")
        # mesh over HTTP nodes
        cfg = os.path.join(tmp, "http_nodes")
        with open(cfg, "w") as fh:
            for i, p in enumerate(backends):
                fh.write(f"Host h{i}\n    HostName 127.0.0.1\n    # mesh: transport=http ollama_host=127.0.0.1 "
                         f"ollama_port={p} max_concurrent=1000 num_parallel=1000\n\n")
        env = dict(os.environ, MESH_CONTROL_DIR=tempfile.mkdtemp(prefix="mc-", dir="/tmp"))
        mh, mh_port = start_mesh(cfg, env)
        mesh_procs.append(mh)
        contenders.append(Contender("mesh/http", [mh_port], lambda: [mh.pid]))
        # mesh over SSH: each backend behind its own sshd
        lab = SSHLab()
        for i, p in enumerate(backends):
            lab.add_node(f"s{i}", ["m:1"], settings="max_concurrent=1000 num_parallel=1000")
            lab.fakes[f"s{i}"].close()
            lab.fakes[f"s{i}"].port = p
        lab.write_config()
        ms, ms_port = start_mesh(lab.config_path, lab.env())
        mesh_procs.append(ms)

        def ssh_masters():
            return [int(x.split(":")[0]) for x in lab.ssh_processes(include_masters=True)]
        mesh_ssh = Contender("mesh/ssh", [ms_port], lambda: [ms.pid], ssh_masters)
        contenders.append(mesh_ssh)
        # SSH alone: the first request makes mesh start every node's master and its forward
        asyncio.run(one_stream(mesh_ssh, 5))
        forwards = lambda: sorted(glob.glob(os.path.join(lab.control_dir, "*", "*.f")))  # noqa: E731
        wait_for(lambda: len(forwards()) == len(backends), 20, "every node's forward")
        contenders.append(Contender(SSH_ALONE, forwards(), lambda: [], ssh_masters, conn=UnixConn))
        if args.mesh:                      # the same, with another mesh.py: A/B in one run
            label = os.path.basename(args.mesh)
            oh, oh_port = start_mesh(cfg, env, args.mesh)
            os_, os_port = start_mesh(lab.config_path, lab.env(), args.mesh)
            mesh_procs += [oh, os_]
            contenders.append(Contender(f"{label}/http", [oh_port], lambda: [oh.pid]))
            contenders.append(Contender(f"{label}/ssh", [os_port], lambda: [os_.pid], ssh_masters))
        if args.litellm:
            ll, ll_port, versions["LiteLLM"] = start_litellm(tmp, backends, args.litellm)
            procs.append(ll)
            contenders.append(Contender("litellm", [ll_port], lambda: [ll.pid] + _descendants(ll.pid),
                                        conn=OpenAIConn))
        if args.herd:
            hd, hd_port, versions["Ollama Herd"] = start_herd(tmp, backends, args.herd)
            procs.extend(hd)
            contenders.append(Contender("herd", [hd_port], lambda: [hd[0].pid] + _descendants(hd[0].pid),
                                        lambda: [p.pid for p in hd[1:]]))
        if in_loopback_netns():
            print("network namespace: loopback only (interfaces: lo) - nothing can leave the machine",
                  file=sys.stderr)
        asyncio.run(run(contenders, rounds, lab, mesh_ssh, versions))
    finally:
        for p in mesh_procs + procs:
            stop(p)
        if lab:
            lab.close()
        shutil.rmtree(tmp, ignore_errors=True)


async def run(contenders, rounds, lab, mesh_ssh, versions=None):
    # warm: masters, inventories, pools
    for c in contenders:
        for _ in range(3):
            await one_stream(c, 20)
        await asyncio.gather(*(one_stream(c, 5) for _ in range(60)))
    res = {c.name: {} for c in contenders}

    def add(c, key, value):
        res[c.name].setdefault(key, []).append(value)

    n_long, ns = 20000, (50, 200, 500)
    for rnd in range(rounds):
        for c in contenders:                      # interleaved: each round visits every contender
            print(f"round {rnd + 1}/{rounds}: {c.name}", file=sys.stderr, end="", flush=True)
            t0 = time.perf_counter()
            rate, cpu, ssh_cpu = await long_stream(c, n_long)
            add(c, "rate", rate)
            add(c, "cpu_chunk", cpu)
            add(c, "ssh_cpu_chunk", ssh_cpu)
            for n in ns:
                wall, cpu = await concurrent(c, n, 50, 10)
                add(c, f"wall{n}", wall)
                add(c, f"cpu{n}", cpu)
            add(c, "small", await small_requests(c, 200))
            add(c, "short", await short_streams(c, 50))
            add(c, "syn_retry", await burst(c, 500))
            print(f" ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    # SSH: a whole short stream on a master mesh starts (fresh) and on one it reuses
    short_fresh, short_reused = await ssh_master_cases(lab)
    report(contenders, res, short_fresh, short_reused, versions or {})


def machine_busy():
    """(busy, all) jiffies of every CPU so far, from /proc/stat (idle and iowait are not busy)."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)


async def quiet(limit=5.0, window=0.2, share=0.1):
    """Until the machine's CPUs were less than `share` busy for `window` seconds (at most
    `limit` seconds)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        b0, a0 = machine_busy()
        await asyncio.sleep(window)
        b1, a1 = machine_busy()
        if (b1 - b0) < share * max(1, a1 - a0):
            return


async def ssh_master_cases(lab):
    """A new mesh serve with no masters (it starts them), then another one reusing them.
    After the first request the machine is let settle: a new serve starts the other
    nodes' masters and reads their models in the background, SSH handshakes whose CPU
    on these two shared cores would otherwise be measured as the stream's (a few ms)."""
    lab.stop_masters()
    out = []
    for _ in range(2):
        proc, port = start_mesh(lab.config_path, lab.env())
        try:
            c = Contender("mesh/ssh", [port], lambda: [])
            await one_stream(c, 11)               # the first request starts (or finds) the master
            await quiet()
            out.append(await short_streams(c, 50))
        finally:
            stop(proc)
    return out


def med(xs):
    return statistics.median(xs)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def report(contenders, res, short_fresh, short_reused, versions):
    names = [c.name for c in contenders]
    only_ssh = lambda v: [v if n == "mesh/ssh" else "" for n in names]  # noqa: E731
    apart = [c.name for c in contenders if c.extra_pids_fn]
    has_nginx = "nginx" in names
    w = max(15, max(len(n) for n in names) + 2)
    print()
    print(f"{'figure':<44}" + "".join(f"{n:>{w}}" for n in names) + "   target (mesh vs nginx/direct)")

    def line(label, values, target=""):
        print(f"{label:<44}" + "".join(f"{v:>{w}}" for v in values) + "   " + target)

    r = {n: med(res[n]["rate"]) for n in names}
    ngx = r.get("nginx")
    line("one 20k-token stream: tokens/s", [f"{r[n]:,.0f}" for n in names],
         "" if not ngx else f">= 0.8x nginx: http {r['mesh/http'] / ngx:.2f}x, ssh {r['mesh/ssh'] / ngx:.2f}x"
         + (f" (ssh alone {r[SSH_ALONE] / ngx:.2f}x)" if SSH_ALONE in r else ""))
    cpu = {n: med(res[n]["cpu_chunk"]) for n in names}
    no_router = ("direct", SSH_ALONE)
    line("  router CPU per chunk (us)", ["-" if n in no_router else f"{cpu[n]:.1f}" for n in names],
         "(scheduler's ns count, /proc/PID/task/*/schedstat)")
    line("  ssh masters' / herd-nodes' CPU/chunk, apart", [f"{med(res[n]['ssh_cpu_chunk']):.1f}" if n in apart
                                                           else "" for n in names])
    for n_ in (50, 200, 500):
        walls = {n: med(res[n][f"wall{n_}"]) for n in names}
        tgt = ""
        if n_ == 500 and has_nginx:
            tgt = f"<= 1.2x nginx: http {walls['mesh/http'] / walls['nginx']:.2f}x, ssh {walls['mesh/ssh'] / walls['nginx']:.2f}x"
            if SSH_ALONE in walls:
                tgt += f" (ssh alone {walls[SSH_ALONE] / walls['nginx']:.2f}x)"
        line(f"{n_} concurrent streams x 50 tokens: wall s", [f"{walls[n]:.3f}" for n in names], tgt)
        chunks = n_ * 51
        per = {n: med(res[n][f"cpu{n_}"]) / chunks * 1e6 for n in names}
        tgt = ""
        if has_nginx and per["nginx"] > 0:
            tgt = (f"CPU/chunk <= 2.5x nginx: http {per['mesh/http'] / per['nginx']:.1f}x, "
                   f"ssh {per['mesh/ssh'] / per['nginx']:.1f}x")
        line("  router CPU s (per chunk us)", ["-" if n in no_router else
                                               f"{med(res[n][f'cpu{n_}']):.2f} ({per[n]:.1f})" for n in names], tgt)
    small = {n: [x for xs in res[n]["small"] for x in xs] for n in names}
    d50, d99 = med(small["direct"]), pct(small["direct"], 0.99)
    line("small request p50 ms", [f"{med(small[n]) * 1000:.3f}" for n in names],
         f"added <= +0.15 ms over HTTP nodes: +{(med(small['mesh/http']) - d50) * 1000:.3f} ms")
    line("small request p99 ms", [f"{pct(small[n], 0.99) * 1000:.3f}" for n in names],
         f"(direct p99 {d99 * 1000:.3f})")
    short = {n: [x for xs in res[n]["short"] for x in xs] for n in names}
    sd = med(short["direct"])
    line("whole 11-token stream p50 ms", [f"{med(short[n]) * 1000:.3f}" for n in names],
         f"ssh <= direct + 2 ms: +{(med(short['mesh/ssh']) - sd) * 1000:.2f} ms")
    line("  same, ssh master started by this mesh", only_ssh(f"{med(short_fresh) * 1000:.3f}"),
         f"+{(med(short_fresh) - sd) * 1000:.2f} ms over direct (max {max(short_fresh) * 1000:.1f} ms)")
    line("  same, ssh master reused from before", only_ssh(f"{med(short_reused) * 1000:.3f}"),
         f"+{(med(short_reused) - sd) * 1000:.2f} ms over direct (max {max(short_reused) * 1000:.1f} ms)")
    line("500 simultaneous connects: waited for SYN retry",
         ["-" if None in res[n]["syn_retry"] else str(sum(res[n]["syn_retry"])) for n in names],
         "0 for mesh")
    print(f"\n{len(res['direct']['rate'])} round(s); medians; Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs; nginx {'present' if has_nginx else 'absent'}"
          + "".join(f"; {k} {v}" for k, v in versions.items()))


if __name__ == "__main__":
    main()
