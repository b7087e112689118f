"""`mesh.py serve`: the mesh behind one Ollama-compatible address (issue 6),
driven over real sockets with urllib and raw HTTP."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

import mesh
from conftest import needs_sshd
from lab import MESH, free_port, wait_for

pytestmark = needs_sshd


class Serve:
    def __init__(self, lab, *args, env=None, preexec_fn=None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        # stderr (the access log among it) goes to a file: a pipe nobody reads fills up and stalls serve
        self.stderr_path = os.path.join(lab.dir, f"serve-{self.port}.err")
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, MESH, "--config", lab.config_path, "serve",
                                          "--listen", f"127.0.0.1:{self.port}", *args],
                                         stdout=subprocess.PIPE, stderr=err, env=env or lab.env(),
                                         preexec_fn=preexec_fn)
        wait_for(self.up, 20, "serve to listen")

    def stderr(self):
        with open(self.stderr_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def up(self):
        if self.proc.poll() is not None:
            raise AssertionError(self.stderr())
        try:
            socket.create_connection(("127.0.0.1", self.port), 0.2).close()
            return True
        except OSError:
            return False

    def call(self, method, path, body=None, headers=None, raw=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def served(lab):
    lab.add_node("a", ["qwen2.5:7b", "llama3"], loaded=["llama3"], token_delay=0.01)
    lab.add_node("b", ["qwen2.5:7b", "nomic-embed-text"], token_delay=0.01)
    s = Serve(lab)
    yield s
    s.stop()


def lines(body):
    return [json.loads(x) for x in body.decode().splitlines() if x.strip()]


def test_root_version_tags_ps_status(served, lab):
    assert served.call("GET", "/")[2] == b"Ollama is running"
    status, headers, body = served.call("HEAD", "/")
    assert status == 200 and body == b""
    assert json.loads(served.call("GET", "/api/version")[2])["version"] == "0.6.1"
    names = [m["name"] for m in json.loads(served.call("GET", "/api/tags")[2])["models"]]
    assert names == ["llama3", "nomic-embed-text", "qwen2.5:7b"]          # the union, each once
    ps = json.loads(served.call("GET", "/api/ps")[2])["models"]
    # one entry per model (Ollama's fields) with the nodes that have it loaded
    assert [(m["name"], m["model"], m["size"], m["size_vram"], m["nodes"]) for m in ps] == [
        ("llama3", "llama3", 2000, 1000, ["a"])]
    assert {"digest", "details", "expires_at"} <= set(ps[0])
    nodes = json.loads(served.call("GET", "/mesh/status")[2])["nodes"]
    assert [n["name"] for n in nodes] == ["a", "b"]
    assert {"name", "healthy", "reason", "in_flight", "latency_ms", "models"} <= set(nodes[0])
    assert nodes[0]["healthy"] is True and nodes[0]["in_flight"] == 0


def test_generate_chat_embed_show_shapes(served, lab):
    status, headers, body = served.call("POST", "/api/generate", {"model": "qwen2.5:7b", "prompt": "hi"})
    assert status == 200 and headers["Content-Type"] == "application/x-ndjson"
    assert headers["Transfer-Encoding"] == "chunked" and headers["X-Mesh-Node"] in ("a", "b")
    chunks = lines(body)
    assert "".join(c["response"] for c in chunks) == f"Hello from {headers['X-Mesh-Node']}."
    assert chunks[-1]["done"] is True and "node" not in chunks[0]

    status, headers, body = served.call("POST", "/api/chat", {"model": "llama3", "stream": False,
                                                             "messages": [{"role": "user", "content": "x"}]})
    obj = json.loads(body)
    assert status == 200 and obj["message"]["content"] == "Hello from a." and headers["X-Mesh-Node"] == "a"

    status, headers, body = served.call("POST", "/api/chat", {"model": "llama3",
                                                             "messages": [{"role": "user", "content": "x"}]})
    assert "".join(c["message"]["content"] for c in lines(body)) == "Hello from a."

    status, headers, body = served.call("POST", "/api/embed", {"model": "nomic-embed-text", "input": ["abc"]})
    assert status == 200 and json.loads(body)["embeddings"][0][0] == 3.0 and headers["X-Mesh-Node"] == "b"
    status, _, body = served.call("POST", "/api/embeddings", {"model": "nomic-embed-text", "prompt": "abcd"})
    assert status == 200 and json.loads(body)["embedding"][0] == 4.0
    status, _, body = served.call("POST", "/api/show", {"model": "llama3"})
    assert status == 200 and json.loads(body)["modelfile"] == "FROM llama3"


def test_a_large_embeddings_answer_arrives_whole(served, lab):
    # ~2.5 MB answers, past the size serve decodes: passed on as the node's bytes
    inputs = ["x" * (i % 50) for i in range(100_000)]
    status, headers, body = served.call("POST", "/api/embed", {"model": "nomic-embed-text", "input": inputs})
    obj = json.loads(body)
    assert status == 200 and len(body) > mesh.WHOLE_DECODE_LIMIT and int(headers["Content-Length"]) == len(body)
    assert [e[0] for e in obj["embeddings"]] == [float(len(s)) for s in inputs] and obj["prompt_eval_count"] == 3
    status, headers, body = served.call("POST", "/v1/embeddings", {"model": "nomic-embed-text", "input": inputs})
    obj = json.loads(body)
    assert status == 200 and len(body) > mesh.WHOLE_DECODE_LIMIT
    assert [d["embedding"][0] for d in obj["data"]][:3] == [0.0, 1.0, 2.0] and len(obj["data"]) == len(inputs)


def test_pin_with_header(served, lab):
    for _ in range(3):
        status, headers, _ = served.call("POST", "/api/generate", {"model": "qwen2.5:7b", "prompt": "x", "stream": False},
                                         headers={"X-Mesh-Node": "b"})
        assert status == 200 and headers["X-Mesh-Node"] == "b"
    status, _, body = served.call("POST", "/api/generate", {"model": "qwen2.5:7b", "prompt": "x"},
                                  headers={"X-Mesh-Node": "zz"})
    assert status == 400 and "unknown node 'zz'" in json.loads(body)["error"]


@pytest.mark.parametrize("method, path, body, raw, status, fragment", [
    ("POST", "/api/generate", {"model": "nosuch:1b", "prompt": "x"}, None, 404, 'model "nosuch:1b" not found'),
    ("POST", "/api/chat", {"model": "nosuch:1b", "messages": []}, None, 404, "not found"),
    ("POST", "/api/generate", None, b"{not json", 400, "invalid JSON"),
    ("POST", "/api/generate", {"prompt": "x"}, None, 400, "model is required"),
    ("POST", "/api/generate", None, b"", 400, "missing request body"),
    ("GET", "/api/nothing", None, None, 404, "404 page not found"),
    ("GET", "/api/generate", None, None, 405, "not allowed"),
])
def test_error_codes(served, method, path, body, raw, status, fragment):
    got, headers, data = served.call(method, path, body, raw=raw)
    assert got == status and fragment in json.loads(data)["error"]


def test_503_when_no_node_can_take_it(served, lab):
    lab.fakes["a"].stop()
    lab.fakes["b"].stop()
    status, _, body = served.call("POST", "/api/generate", {"model": "qwen2.5:7b", "prompt": "x"})
    assert status == 503 and "error" in json.loads(body)


def raw_request(port, body, path="/api/generate", headers=""):
    s = socket.create_connection(("127.0.0.1", port), 10)
    data = json.dumps(body).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{headers}"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def test_stream_arrives_line_by_line(lab):
    fake = lab.add_node("slow", ["m:1"], token_delay=0.4, tokens=["a", "b", "c", "d", "e"])
    s = Serve(lab)
    try:
        sock = raw_request(s.port, {"model": "m:1", "prompt": "x"})
        f = sock.makefile("rb")
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += f.readline()
        assert b"200 OK" in head and b"Transfer-Encoding: chunked" in head and b"X-Mesh-Node: slow" in head
        size = int(f.readline(), 16)
        first = json.loads(f.read(size))
        assert first["response"] == "a"
        assert fake.active == 1            # the node is still generating: nothing was buffered
        sock.close()
    finally:
        s.stop()


def test_client_disconnect_cancels_node_request(lab):
    fake = lab.add_node("slow", ["m:1"], token_delay=0.3, tokens=["t"] * 60)
    s = Serve(lab)
    try:
        sock = raw_request(s.port, {"model": "m:1", "prompt": "x"})
        wait_for(lambda: sock.recv(4096), 20, "the stream to start")
        sock.close()
        wait_for(lambda: fake.active == 0, 15, "the node's request to end")
        wait_for(lambda: json.loads(s.call("GET", "/mesh/status")[2])["nodes"][0]["in_flight"] == 0, 10, "in_flight 0")
        # serve's background node-facts session may still be running: wait for it, not for a guess
        wait_for(lambda: lab.ssh_processes() == [], 15, "no ssh session left")
    finally:
        s.stop()


@pytest.mark.parametrize("path, body", [
    ("/api/generate", {"model": "m:1", "prompt": "x", "stream": False}),
    ("/api/chat", {"model": "m:1", "messages": [{"role": "user", "content": "x"}], "stream": False}),
    ("/api/generate", {"model": "m:1", "prompt": "x"}),          # streamed, still loading the model
    ("/v1/chat/completions", {"model": "m:1", "messages": [{"role": "user", "content": "x"}]}),
    ("/v1/messages", {"model": "m:1", "max_tokens": 9, "messages": [{"role": "user", "content": "x"}]}),
])
def test_client_leaving_before_the_reply_cancels_the_generation(lab, path, body):
    """stream=false (the Python client's default): the answer comes whole at the end, so
    the client is watched while the node works; leaving ends the node's generation."""
    fake = lab.add_node("slow", ["m:1"], delay=60)
    s = Serve(lab)
    try:
        sock = raw_request(s.port, body, path=path)
        wait_for(lambda: fake.active == 1, 20, "the node to start generating")
        sock.close()
        wait_for(lambda: fake.cancelled == 1, 10, "the node's generation to be cancelled")
        wait_for(lambda: json.loads(s.call("GET", "/mesh/status")[2])["nodes"][0]["in_flight"] == 0, 10,
                 "in_flight 0")
        assert len(fake.bodies(path)) == 1        # not sent anywhere again
        wait_for(lambda: lab.ssh_processes() == [], 15, "no ssh session left")
    finally:
        s.stop()


def test_client_leaving_ends_curl_on_a_node_that_refuses_forwarding(lab):
    """The exec transport (`ssh NODE curl`, sshd with AllowTcpForwarding no): a stream:false
    client that leaves ends curl on the node too, so the generation stops there (curl
    alone would notice only at its next write: at the end of the generation)."""
    from lab import _pids_matching
    fake = lab.add_node("locked", ["m:1"], delay=60, allow_forwarding=False)
    s = Serve(lab)
    try:
        sock = raw_request(s.port, {"model": "m:1", "prompt": "caf\u00e9 $(x) 'q'", "stream": False})
        wait_for(lambda: fake.active == 1, 20, "the node to start generating")
        assert json.loads(s.call("GET", "/mesh/status")[2])["nodes"][0]["transport"] == "exec"
        sock.close()
        wait_for(lambda: fake.cancelled == 1, 10, "the node's generation to be cancelled")
        assert fake.bodies("/api/generate")[0]["prompt"] == "caf\u00e9 $(x) 'q'"   # the body went first
        # nothing of the request is left on the node (curl, its sh) nor here (ssh)
        wait_for(lambda: _pids_matching(f"127.0.0.1:{fake.port}/api/generate") == [], 10, "curl on the node to end")
        wait_for(lambda: lab.ssh_processes() == [], 15, "no ssh session left")
    finally:
        s.stop()


def test_token_auth(lab):
    lab.add_node("a", ["m:1"])
    s = Serve(lab, "--token", "s3cret")
    try:
        status, _, body = s.call("GET", "/api/tags")
        assert status == 401 and "unauthorized" in json.loads(body)["error"]
        assert s.call("GET", "/api/tags", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert s.call("GET", "/api/tags", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert s.call("GET", "/api/tags", headers={"Authorization": "bearer s3cret"})[0] == 200   # RFC 9110 11.1
    finally:
        s.stop()


def test_non_loopback_needs_token(lab):
    lab.add_node("a", ["m:1"])
    p = subprocess.run([sys.executable, MESH, "--config", lab.config_path, "serve", "--listen", "0.0.0.0:0"],
                       capture_output=True, env=lab.env(), timeout=30)
    assert p.returncode == 2 and b"refusing to listen on non-loopback" in p.stderr


def test_fifty_concurrent_streaming_clients(served, lab):
    results = []

    def client(i):
        status, headers, body = served.call("POST", "/api/generate", {"model": "qwen2.5:7b", "prompt": f"p{i}"})
        chunks = lines(body)
        results.append((status, chunks[-1]["done"], "".join(c["response"] for c in chunks), headers["X-Mesh-Node"]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 50
    assert all(st == 200 and done and text == f"Hello from {node}." for st, done, text, node in results)
    assert {node for *_, node in results} == {"a", "b"}


def test_pull_on_a_named_node(served, lab):
    status, headers, body = served.call("POST", "/api/pull", {"model": "newmodel:1b"}, headers={"X-Mesh-Node": "b"})
    got = lines(body)
    assert status == 200 and got[-1] == {"status": "success"} and got[0]["status"] == "pulling manifest"
    assert "newmodel:1b" in lab.fakes["b"].models and "newmodel:1b" not in lab.fakes["a"].models


def test_sigterm_lets_running_stream_finish(lab):
    lab.add_node("slow", ["m:1"], token_delay=0.3, tokens=["t"] * 6)
    s = Serve(lab)
    sock = raw_request(s.port, {"model": "m:1", "prompt": "x"})
    f = sock.makefile("rb")
    wait_for(lambda: f.peek(1), 20, "the stream to start")
    s.proc.send_signal(signal.SIGTERM)
    rest = f.read()                       # the stream completes after SIGTERM
    assert rest.endswith(b"0\r\n\r\n") and b'"done": true' in rest
    assert s.proc.wait(20) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", s.port), 1)


def read_response(f):
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = f.readline()
        assert line, "connection closed"
        head += line
    body = b""
    if b"chunked" in head:
        while True:
            size = int(f.readline(), 16)
            data = f.read(size + 2)[:-2]
            if size == 0:
                break
            body += data
    else:
        length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
        body = f.read(length)
    return head, body


def test_keep_alive_connection_serves_requests_after_a_stream(served):
    sock = raw_request(served.port, {"model": "qwen2.5:7b", "prompt": "one"})
    f = sock.makefile("rb")
    head, body = read_response(f)
    assert b"200 OK" in head and lines(body)[-1]["done"] is True
    for path in ("/api/tags", "/api/version"):
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head, body = read_response(f)
        assert b"200 OK" in head and json.loads(body)
    sock.close()


def test_large_prompt_with_expect_100_continue(served, lab, tmp_path):
    """curl sends `Expect: 100-continue` for bodies over 1 MB and waits for the go-ahead."""
    prompt = "x" * 1_500_000
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"model": "qwen2.5:7b", "prompt": prompt, "stream": False}))
    p = subprocess.run(["curl", "-sS", "-v", "--data-binary", f"@{body}", "-H", "Content-Type: application/json",
                        "-H", "X-Mesh-Node: a", f"{served.base}/api/generate"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and json.loads(p.stdout)["done"] is True
    assert "Expect: 100-continue" in p.stderr and "HTTP/1.1 100 Continue" in p.stderr
    assert lab.fakes["a"].bodies("/api/generate")[-1]["prompt"] == prompt
