"""`mesh.py serve` as every API a current Ollama serves (issue 11): the OpenAI and
Anthropic endpoints relayed from the nodes, the lists mesh merges, model management
across the pool, unload on every node, CORS and the Host check.

The requests below are what the real clients send (captured from openai 3.57.0,
anthropic 2.14.0 and ollama 0.6.3 against a stand-in); the tests send them with the
standard library, through mesh and straight to one node, and compare the shapes."""
import http.client
import json
import socket
import urllib.error
import urllib.request

import pytest

import mesh
from conftest import needs_sshd
from lab import wait_for
from test_serve import Serve

# ---------------------------------------------------------------------------
# Pure parts: tables of cases
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("host,listen,ok", [
    ("127.0.0.1:11500", "127.0.0.1", True), ("localhost:11500", "127.0.0.1", True), ("", "127.0.0.1", True),
    ("[::1]:11500", "127.0.0.1", True), ("app.localhost", "127.0.0.1", True), ("nas.local:80", "127.0.0.1", True),
    ("svc.internal", "127.0.0.1", True), ("192.168.1.4:11500", "127.0.0.1", True), ("0.0.0.0", "127.0.0.1", True),
    ("myhost", "127.0.0.1", True), ("MYHOST:1", "127.0.0.1", True),
    ("evil.example", "127.0.0.1", False), ("evil.example:11500", "127.0.0.1", False), ("8.8.8.8", "127.0.0.1", False),
    ("localhost.evil.example", "127.0.0.1", False), ("mesh.lan:11500", "mesh.lan", True),
])
def test_host_allowed(host, listen, ok):
    assert mesh.host_allowed(host, listen, hostname="myhost") is ok


@pytest.mark.parametrize("origin,extra,ok", [
    ("http://localhost:5173", None, True), ("http://localhost", None, True), ("https://127.0.0.1:8443", None, True),
    ("http://0.0.0.0:3000", None, True), ("app://obsidian.md", None, True), ("file://", None, True),
    ("tauri://localhost", None, True), ("vscode-webview://abc", None, True),
    ("chrome-extension://abcdef", None, True), ("moz-extension://x", None, True),
    ("https://evil.example", None, False), ("http://localhost.evil.example", None, False),
    ("http://127.0.0.1.nip.io", None, False), ("null", None, False),
    ("https://app.example", "https://app.example", True), ("https://b.example", "https://*.example", True),
    ("https://evil.example", "*", True), ("https://evil.example", "'https://app.example'", False),
])
def test_origin_allowed(origin, extra, ok):
    assert mesh.origin_allowed(origin, mesh.allowed_origins(extra)) is ok


@pytest.mark.parametrize("value,seconds", [
    (0, 0.0), (0.0, 0.0), ("0", 0.0), ("0s", 0.0), ("500ms", 0.5), ("5m", 300.0), ("1h30m", 5400.0),
    (-1, -1.0), ("-1m", -60.0), (None, None), ("soon", None), (True, None), ("5x", None),
])
def test_keep_alive_seconds(value, seconds):
    assert mesh.keep_alive_seconds(value) == seconds


@pytest.mark.parametrize("path,payload,unload", [
    ("/api/generate", {"model": "m", "keep_alive": 0}, True),
    ("/api/generate", {"model": "m", "prompt": "", "keep_alive": 0.0}, True),    # what `ollama stop` sends
    ("/api/chat", {"model": "m", "messages": [], "keep_alive": "0s"}, True),
    ("/api/generate", {"model": "m", "prompt": "hi", "keep_alive": 0}, False),   # generates, then unloads
    ("/api/generate", {"model": "m", "prompt": ""}, False),                      # a preload
    ("/api/chat", {"model": "m", "keep_alive": "5m"}, False),
    ("/api/generate", {"model": "m", "keep_alive": -1}, False),                  # keep forever
])
def test_is_unload_request(path, payload, unload):
    assert mesh.is_unload_request(path, payload) is unload


@pytest.mark.parametrize("path,family,status,body", [
    ("/v1/chat/completions", "openai", 404,
     {"error": {"message": "m", "type": "not_found_error", "param": None, "code": None}}),
    ("/v1/models/x", "openai", 400,
     {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}}),
    ("/v1/embeddings", "openai", 503, {"error": {"message": "m", "type": "api_error", "param": None, "code": None}}),
    ("/v1/messages", "anthropic", 404, {"type": "error", "error": {"type": "not_found_error", "message": "m"}}),
    ("/v1/messages", "anthropic", 401, {"type": "error", "error": {"type": "authentication_error", "message": "m"}}),
    ("/v1/messages", "anthropic", 503, {"type": "error", "error": {"type": "overloaded_error", "message": "m"}}),
    ("/api/chat", "ollama", 404, {"error": "m"}),
])
def test_error_shapes(path, family, status, body):
    assert mesh.api_family(path) == family
    assert mesh.error_body(family, status, "m") == body


@pytest.mark.parametrize("status,headers,body,unsupported", [
    (404, {"content-type": "text/plain"}, b"404 page not found", True),
    (404, {}, b"404 page not found", True),
    (404, {"content-type": "application/json; charset=utf-8"}, b'{"error":"model \\"x\\" not found"}', False),
    (404, {"content-type": "application/json"}, b'{"error":{"message":"404 page not found"}}', False),
    (500, {"content-type": "text/plain"}, b"404 page not found", False),
])
def test_is_unsupported_reply(status, headers, body, unsupported):
    assert mesh.is_unsupported_reply(status, headers, body) is unsupported


def test_merge_ps_one_entry_per_model_with_nodes():
    entries = [{"name": "a:1", "model": "a:1", "size": 5, "expires_at": "2026-01-01T00:01:00Z", "node": "n1"},
               {"name": "b", "model": "b", "size": 7, "expires_at": "2026-01-01T00:09:00Z", "node": "n1"},
               {"name": "a:1", "model": "a:1", "size": 6, "expires_at": "2026-01-01T00:05:00Z", "node": "n2"}]
    assert mesh.merge_ps(entries) == [
        {"name": "b", "model": "b", "size": 7, "expires_at": "2026-01-01T00:09:00Z", "nodes": ["n1"]},
        {"name": "a:1", "model": "a:1", "size": 6, "expires_at": "2026-01-01T00:05:00Z", "nodes": ["n1", "n2"]}]


@pytest.mark.parametrize("name,owned_by", [("llama3", "library"), ("jmorgan/tiny:1b", "jmorgan"),
                                           ("registry.example/team/m:1", "team")])
def test_openai_model(name, owned_by):
    assert mesh.openai_model({"name": name, "modified_at": "2026-01-01T00:00:00.5+01:00"}) == \
        {"id": name, "object": "model", "created": 1767222000, "owned_by": owned_by}


# ---------------------------------------------------------------------------
# Through `mesh.py serve` over real sshd nodes
# ---------------------------------------------------------------------------

def call(base, method, path, body=None, headers=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    hdrs.update(headers or {})
    req = urllib.request.Request(base + path, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def shape(obj):
    """The structure of a JSON value: keys and types, not values."""
    if isinstance(obj, dict):
        return {k: shape(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [shape(v) for v in obj[:1]]
    return type(obj).__name__


def sse_events(body):
    """[(event name or None, data text)] of a text/event-stream body."""
    out = []
    for block in body.decode().split("\n\n"):
        if block.strip():
            fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
            out.append((fields.get("event"), fields.get("data")))
    return out


@pytest.fixture(scope="module")
def pool():
    """Three nodes: a and b current, c an old Ollama without /api/embed and /v1/*."""
    from lab import HAVE_SSHD, SSHLab
    if not HAVE_SSHD:
        pytest.skip("OpenSSH sshd not installed")
    lab = SSHLab()
    try:
        lab.add_node("a", ["qwen2.5:7b", "llama3"], loaded=["llama3"])
        lab.add_node("b", ["qwen2.5:7b", "nomic-embed-text"])
        lab.add_node("c", ["nomic-embed-text", "old-only"], old=True, version="0.1.30")
        serve = Serve(lab)
        try:
            yield lab, serve
        finally:
            serve.stop()
    finally:
        lab.close()


# (path, body the client sends) as captured from the real SDKs
OPENAI_CALLS = {
    "chat": ("/v1/chat/completions", {"model": "qwen2.5:7b", "messages": [{"role": "user", "content": "hi"}]}),
    "chat_tools": ("/v1/chat/completions", {"model": "qwen2.5:7b", "messages": [{"role": "user", "content": "weather?"}],
                   "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
                       "type": "object", "properties": {"city": {"type": "string"}}}}}]}),
    "chat_response_format": ("/v1/chat/completions", {"model": "qwen2.5:7b", "messages": [
        {"role": "user", "content": "json"}], "response_format": {"type": "json_object"}}),
    "completions": ("/v1/completions", {"model": "qwen2.5:7b", "prompt": "Say"}),
    "embeddings_base64": ("/v1/embeddings", {"model": "nomic-embed-text", "input": ["a", "bbb"],
                                             "encoding_format": "base64"}),
    "embeddings_float": ("/v1/embeddings", {"model": "nomic-embed-text", "input": "abc", "encoding_format": "float"}),
    "responses": ("/v1/responses", {"model": "qwen2.5:7b", "input": "hi"}),
    "messages": ("/v1/messages", {"max_tokens": 50, "messages": [{"role": "user", "content": "hi"}],
                                  "model": "qwen2.5:7b"}),
    "ollama_chat": ("/api/chat", {"model": "qwen2.5:7b", "stream": False,
                                  "messages": [{"role": "user", "content": "hi"}], "tools": []}),
}


@needs_sshd
@pytest.mark.parametrize("name", sorted(OPENAI_CALLS))
def test_client_calls_same_shape_as_a_node(pool, name):
    lab, serve = pool
    path, body = OPENAI_CALLS[name]
    sdk_headers = {"Authorization": "Bearer ollama", "Accept": "application/json"}
    status, headers, data = call(serve.base, "POST", path, body, sdk_headers)
    assert status == 200, data
    node = headers["x-mesh-node"]
    assert node in ("a", "b")                       # never the old node c
    fake = lab.fakes[node]
    assert fake.requests[-1]["raw"] == json.dumps(body).encode()   # the client's bytes, unchanged
    direct = call(f"http://127.0.0.1:{fake.port}", "POST", path, body, sdk_headers)
    assert headers["content-type"] == direct[1]["content-type"]
    assert shape(json.loads(data)) == shape(json.loads(direct[2]))
    if name == "embeddings_base64":
        assert isinstance(json.loads(data)["data"][0]["embedding"], str)


STREAMS = {
    "chat_include_usage": ("/v1/chat/completions", {"model": "qwen2.5:7b", "stream": True, "messages": [
        {"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}),
    "completions": ("/v1/completions", {"model": "qwen2.5:7b", "prompt": "Say", "stream": True}),
    "responses": ("/v1/responses", {"model": "qwen2.5:7b", "stream": True, "input": "hi"}),
    "messages": ("/v1/messages", {"max_tokens": 50, "messages": [{"role": "user", "content": "hi"}],
                                  "model": "qwen2.5:7b", "stream": True}),
}


def read_first_event(port, path, body):
    """Send a request on a raw socket; return (socket file, head, first chunk's bytes)."""
    sock = socket.create_connection(("127.0.0.1", port), 30)
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    f = sock.makefile("rb")
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += f.readline()
    size = int(f.readline(), 16)
    return sock, f, head, f.read(size + 2)[:-2]


def read_rest(f):
    parts = []
    while True:
        size = int(f.readline(), 16)
        if size == 0:
            f.readline()
            return b"".join(parts)
        parts.append(f.read(size + 2)[:-2])


@needs_sshd
@pytest.mark.parametrize("name", sorted(STREAMS))
def test_streams_arrive_event_by_event(pool, name):
    lab, serve = pool
    path, body = STREAMS[name]
    for fake in lab.fakes.values():
        fake.finish_stream.clear()        # every node holds its last event until we have the first
    try:
        sock, f, head, first = read_first_event(serve.port, path, body)
        assert b" 200 " in head and b"text/event-stream" in head
        node = [n for n in "ab" if f"X-Mesh-Node: {n}".encode() in head][0]
        assert first.startswith((b"data: {", b"event: "))   # a whole event, while the node is still answering
        assert lab.fakes[node].active == 1
        lab.fakes[node].finish_stream.set()
        events = sse_events(first + read_rest(f))
        sock.close()
    finally:
        for fake in lab.fakes.values():
            fake.finish_stream.set()
    direct = call(f"http://127.0.0.1:{lab.fakes[node].port}", "POST", path, body)[2]
    assert [e for e, _ in events] == [e for e, _ in sse_events(direct)]
    if path in ("/v1/chat/completions", "/v1/completions"):
        assert events[-1] == (None, "[DONE]")
        if name == "chat_include_usage":
            assert json.loads(events[-2][1])["usage"]["total_tokens"] > 0
    if path == "/v1/messages":
        assert [e for e, _ in events][:2] == ["message_start", "content_block_start"]
        assert events[-1][0] == "message_stop"


@needs_sshd
def test_unknown_model_404_in_each_apis_shape(pool):
    _, serve = pool
    cases = [("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, "openai"),
             ("/v1/embeddings", {"model": "nope", "input": "x"}, "openai"),
             ("/v1/messages", {"model": "nope", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
              "anthropic"),
             ("/api/chat", {"model": "nope", "messages": []}, "ollama")]
    for path, body, family in cases:
        status, _, data = call(serve.base, "POST", path, body)
        obj = json.loads(data)
        assert status == 404, (path, data)
        if family == "openai":
            assert obj["error"]["type"] == "not_found_error" and "nope" in obj["error"]["message"]
            assert set(obj["error"]) == {"message", "type", "param", "code"}
        elif family == "anthropic":
            assert obj["type"] == "error" and obj["error"]["type"] == "not_found_error"
        else:
            assert "nope" in obj["error"]
    status, _, data = call(serve.base, "GET", "/v1/models/nope")
    assert status == 404 and json.loads(data)["error"]["type"] == "not_found_error"
    status, _, data = call(serve.base, "POST", "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and json.loads(data)["error"]["type"] == "invalid_request_error"


@needs_sshd
def test_model_lists_merged(pool):
    lab, serve = pool
    listed = json.loads(call(serve.base, "GET", "/v1/models")[2])
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == ["llama3", "nomic-embed-text", "old-only", "qwen2.5:7b"]
    direct = json.loads(call(f"http://127.0.0.1:{lab.fakes['a'].port}", "GET", "/v1/models")[2])
    assert shape(listed) == shape(direct)
    one = json.loads(call(serve.base, "GET", "/v1/models/llama3")[2])
    assert one == {"id": "llama3", "object": "model", "created": 1767225600, "owned_by": "library"}


@needs_sshd
def test_old_node_skipped_for_missing_endpoint_but_kept(pool):
    lab, serve = pool
    old = lab.fakes["c"]
    for _ in range(4):
        status, headers, data = call(serve.base, "POST", "/api/embed", {"model": "nomic-embed-text", "input": "x"})
        assert status == 200 and headers["x-mesh-node"] == "b", data
    assert len(old.bodies("/api/embed")) <= 1            # asked once at most, then remembered
    status, _, data = call(serve.base, "POST", "/api/embed", {"model": "old-only", "input": "x"})
    assert status == 404 and "does not support /api/embed" in json.loads(data)["error"]
    status, _, data = call(serve.base, "POST", "/v1/embeddings", {"model": "old-only", "input": "x"})
    assert status == 404 and "does not support /v1/embeddings" in json.loads(data)["error"]["message"]
    # its model list is untouched, and it still serves what it has
    nodes = {n["name"]: n for n in json.loads(call(serve.base, "GET", "/mesh/status")[2])["nodes"]}
    assert nodes["c"]["healthy"] and "old-only" in nodes["c"]["models"]
    status, headers, data = call(serve.base, "POST", "/api/generate",
                                 {"model": "old-only", "prompt": "hi", "stream": False})
    assert status == 200 and headers["x-mesh-node"] == "c" and json.loads(data)["done"]


@pytest.fixture
def trio(lab):
    lab.add_node("a", ["base:1", "other"], loaded=["base:1"])
    lab.add_node("b", ["base:1"], loaded=["base:1"])
    lab.add_node("c", ["other"])
    s = Serve(lab)
    yield s
    s.stop()


def names(serve):
    return [m["name"] for m in json.loads(call(serve.base, "GET", "/api/tags")[2])["models"]]


@needs_sshd
def test_management_changes_exactly_the_ruled_nodes(trio, lab):
    a, b, c = (lab.fakes[n] for n in "abc")
    # create from a base model: on every node that has the base
    status, _, data = call(trio.base, "POST", "/api/create", {"model": "mine", "from": "base:1", "stream": False})
    assert status == 200 and json.loads(data) == {"status": "success"}
    assert (a.has("mine"), b.has("mine"), c.has("mine")) == (True, True, False)
    assert "mine" in names(trio)
    # pinned: that node only
    call(trio.base, "POST", "/api/create", {"model": "solo", "from": "other"}, {"X-Mesh-Node": "c"})
    assert (a.has("solo"), b.has("solo"), c.has("solo")) == (False, False, True)
    # copy: every node that has the source
    status, headers, _ = call(trio.base, "POST", "/api/copy", {"source": "other", "destination": "other2"})
    assert status == 200 and headers["x-mesh-node"] == "a,c"
    assert (a.has("other2"), b.has("other2"), c.has("other2")) == (True, False, True)
    assert call(trio.base, "POST", "/api/copy", {"source": "nope", "destination": "x"})[0] == 404
    # delete: every node that has it; 404 only when none has it
    status, headers, _ = call(trio.base, "DELETE", "/api/delete", {"model": "mine"})
    assert status == 200 and headers["x-mesh-node"] == "a,b"
    assert not a.has("mine") and not b.has("mine") and "mine" not in names(trio)
    status, _, data = call(trio.base, "DELETE", "/api/delete", {"model": "mine"})
    assert status == 404 and "not found" in json.loads(data)["error"]
    # push: one node that has it
    status, _, data = call(trio.base, "POST", "/api/push", {"model": "other2", "stream": False})
    assert status == 200 and len(a.bodies("/api/push")) + len(c.bodies("/api/push")) == 1


@needs_sshd
def test_blobs_go_where_create_from_files_goes(trio, lab):
    import hashlib
    blob = b"GGUF fake weights"
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    assert call(trio.base, "HEAD", f"/api/blobs/{digest}")[0] == 404
    status, headers, _ = call(trio.base, "POST", f"/api/blobs/{digest}", raw=blob,
                              headers={"Content-Type": "application/octet-stream"})
    assert status == 201 and headers["x-mesh-node"] == "a"        # the first healthy node
    assert call(trio.base, "HEAD", f"/api/blobs/{digest}")[0] == 200
    assert call(trio.base, "HEAD", f"/api/blobs/{digest}", headers={"X-Mesh-Node": "b"})[0] == 404
    status, _, data = call(trio.base, "POST", "/api/create",
                           {"model": "fromfiles", "files": {"model.gguf": digest}, "stream": False})
    assert status == 200, data
    assert lab.fakes["a"].has("fromfiles") and not lab.fakes["b"].has("fromfiles")
    assert call(trio.base, "HEAD", "/api/blobs/sha256:not-a-digest")[0] == 400


@needs_sshd
def test_unload_reaches_every_node_and_preload_one(trio, lab):
    a, b = lab.fakes["a"], lab.fakes["b"]
    # what `ollama stop base:1` sends
    status, headers, data = call(trio.base, "POST", "/api/generate",
                                 {"model": "base:1", "stream": False, "keep_alive": 0.0, "prompt": ""})
    assert status == 200 and json.loads(data)["done_reason"] == "unload"
    assert sorted(headers["x-mesh-node"].split(",")) == ["a", "b"]
    assert not a.is_loaded("base:1") and not b.is_loaded("base:1")
    assert json.loads(call(trio.base, "GET", "/api/ps")[2])["models"] == []
    status, _, data = call(trio.base, "POST", "/api/chat", {"model": "base:1", "stream": False})
    assert status == 200 and json.loads(data)["done_reason"] == "load"
    assert a.is_loaded("base:1") + b.is_loaded("base:1") == 1      # a preload goes to one node
    ps = json.loads(call(trio.base, "GET", "/api/ps")[2])["models"]
    assert [(m["name"], len(m["nodes"])) for m in ps] == [("base:1", 1)]


def raw(port, request):
    sock = socket.create_connection(("127.0.0.1", port), 10)
    sock.sendall(request)
    reply = b""
    while b"\r\n\r\n" not in reply:
        data = sock.recv(65536)
        if not data:
            break
        reply += data
    sock.close()
    return reply.split(b"\r\n\r\n")[0].decode()


def preflight(origin, host="127.0.0.1"):
    return (f"OPTIONS /api/chat HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\n"
            "Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type\r\n"
            "Connection: close\r\n\r\n").encode()


@needs_sshd
def test_browsers_cors_and_host_check(lab):
    fake = lab.add_node("a", ["m:1"])
    s = Serve(lab, "--token", "sesame", "--origins", "https://app.example")
    try:
        head = raw(s.port, preflight("http://localhost:5173"))        # no token needed for a preflight
        assert head.startswith("HTTP/1.1 204") and "Access-Control-Allow-Origin: http://localhost:5173" in head
        assert "Access-Control-Allow-Headers: " in head and "Authorization" in head
        assert "Access-Control-Allow-Origin: https://app.example" in raw(s.port, preflight("https://app.example"))
        head = raw(s.port, preflight("https://evil.example"))
        assert head.startswith("HTTP/1.1 403") and "Access-Control-Allow-Origin" not in head
        # the real request still needs the token, and gets the CORS header
        body = {"model": "m:1", "prompt": "hi", "stream": False}
        page = {"Origin": "http://localhost:5173"}
        assert call(s.base, "POST", "/api/generate", body, page)[0] == 401
        status, headers, _ = call(s.base, "POST", "/api/generate", body, dict(page, Authorization="Bearer sesame"))
        assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:5173"
        # a form-like cross-site text/plain POST from another site: refused before any node sees it
        # (counted once serve's first inventory, which runs in the background, is in)
        wait_for(lambda: any(r["path"] == "/api/ps" for r in fake.requests), 10, "serve's first inventory")
        before = len(fake.requests)
        status, headers, _ = call(s.base, "POST", "/api/generate", raw=json.dumps(body).encode(), headers={
            "Origin": "https://evil.example", "Content-Type": "text/plain", "Authorization": "Bearer sesame"})
        assert status == 403 and "access-control-allow-origin" not in headers
        assert len(fake.requests) == before
        # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends Host: evil.example
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
        conn.request("GET", "/api/tags", headers={"Host": "evil.example", "Authorization": "Bearer sesame"})
        assert conn.getresponse().status == 403
        conn.close()
        conn = http.client.HTTPConnection("localhost", s.port, timeout=10)
        conn.request("GET", "/api/tags", headers={"Authorization": "Bearer sesame"})
        assert conn.getresponse().status == 200
        conn.close()
        # the Anthropic SDK's x-api-key is accepted as the token
        status, _, _ = call(s.base, "POST", "/v1/messages", {"model": "m:1", "max_tokens": 5, "messages": [
            {"role": "user", "content": "hi"}]}, {"x-api-key": "sesame"})
        assert status == 200
        status, _, data = call(s.base, "POST", "/v1/messages", {"model": "m:1", "max_tokens": 5, "messages": []})
        assert status == 401 and json.loads(data)["error"]["type"] == "authentication_error"
    finally:
        s.stop()
    wait_for(lambda: s.proc.poll() is not None, 10, "serve to stop")
