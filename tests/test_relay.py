"""The data path (issue 16) and node replies read strictly (issue 12 item 6): what a
client of `serve` or the CLI gets from a node that misbehaves, TCP_NODELAY on sshd's
side of a master, and the listen backlog."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import needs_sshd
from lab import SSH, _descendants
from test_serve import Serve, lines

pytestmark = needs_sshd


def post(serve, body, path="/api/generate", timeout=8):
    req = urllib.request.Request(serve.base + path, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, dict(r.headers), r.read()


@pytest.fixture
def hostile(lab):
    fake = lab.add_node("h", ["m:1"], tokens=["Hello", " \ud800", " there"])
    s = Serve(lab)
    yield fake, s
    s.stop()


def test_reply_ends_at_done_later_bytes_ignored(hostile, lab):
    fake, s = hostile
    fake.mode = "after_done"            # done, a junk line, then the reply held open for 10 s
    status, headers, body = post(s, {"model": "m:1", "prompt": "x"})
    got = lines(body)
    assert status == 200 and headers["Content-Type"] == "application/x-ndjson"
    assert got[-1]["done"] is True and "JUNK" not in body.decode()
    assert "\\ud800" in body.decode()                    # the node's bytes, as it sent them
    status, _, body = post(s, {"model": "m:1", "prompt": "x", "stream": False})
    assert json.loads(body)["response"] == "Hello \ufffd there".replace("\ufffd", "\ud800")
    p = lab.run("generate", "--model", "m:1", "--no-stream", "hi", timeout=8)
    assert p.returncode == 0 and p.stdout.decode() == "Hello \ufffd there\n"   # surrogate shown as U+FFFD


def test_bytes_past_content_length_do_not_spoil_the_next_request(hostile):
    fake, s = hostile
    fake.mode = "past_length"           # each stream=false answer is followed by b"GARBAGE"
    for _ in range(3):                  # the same keep-alive connection would be reused
        status, _, body = post(s, {"model": "m:1", "prompt": "x", "stream": False})
        assert status == 200 and json.loads(body)["response"] == "Hello \ud800 there"
    fake.mode = "ok"
    _, _, body = post(s, {"model": "m:1", "prompt": "x"})
    assert lines(body)[-1]["done"] is True and "error" not in body.decode()
    nodes = json.loads(urllib.request.urlopen(s.base + "/mesh/status", timeout=8).read())["nodes"]
    assert [n["healthy"] for n in nodes] == [True]


def test_bytes_a_node_sends_late_on_a_pooled_connection_do_not_fail_the_request(hostile):
    """Bytes that come after a reply's end while its connection waits in the pool (here:
    before the next reply's head) spoil that connection, not the node: the request is
    sent again on a fresh connection."""
    fake, s = hostile
    fake.mode = "garbage_on_reuse"
    for _ in range(3):
        status, _, body = post(s, {"model": "m:1", "prompt": "x", "stream": False})
        assert status == 200 and json.loads(body)["response"] == "Hello \ud800 there"
    nodes = json.loads(urllib.request.urlopen(s.base + "/mesh/status", timeout=8).read())["nodes"]
    assert [n["healthy"] for n in nodes] == [True]


def test_a_500_from_the_node_is_the_requests_error_not_the_pools(hostile, lab):
    """A request the only node answers with 500 (Ollama's own error: a model that cannot
    load, an image its runner rejects) gets that status and message, as from Ollama, and
    the node is not marked down: the next request is answered (it got 503 for a second)."""
    fake, s = hostile
    fake.mode = "error500"
    for path, body in (("/api/generate", {"model": "m:1", "prompt": "x", "stream": False}),
                       ("/v1/chat/completions", {"model": "m:1", "messages": [{"role": "user", "content": "x"}]})):
        with pytest.raises(urllib.error.HTTPError) as err:
            post(s, body, path)
        reply = json.loads(err.value.read())
        message = reply["error"] if path.startswith("/api/") else reply["error"]["message"]
        assert err.value.code == 500 and "h: llama runner process has terminated" in message, reply
    fake.mode = "ok"
    status, _, body = post(s, {"model": "m:1", "prompt": "x", "stream": False})
    assert status == 200 and json.loads(body)["response"] == "Hello \ud800 there"
    nodes = json.loads(urllib.request.urlopen(s.base + "/mesh/status", timeout=8).read())["nodes"]
    assert [n["healthy"] for n in nodes] == [True]


@pytest.mark.parametrize("mode, code, reason", [
    ("bad_first", 502, "bad reply: not JSON: '<html>oops</html>'"),
    ("error_first", 500, "Ollama error: CUDA error: out of memory"),
])
def test_a_stream_that_starts_wrong_on_every_node_is_the_requests_error(hostile, mode, code, reason):
    """A stream whose first line is not Ollama's (an HTML page) or is Ollama's error line, on
    every node that could take it: the request's fault, not the nodes' - 502 (a reply mesh
    cannot read) or 500 (Ollama's error), in the API's shape, and the node stays up: the next
    request is answered at once, not refused for a second as by a pool marked down."""
    fake, s = hostile
    fake.mode = mode
    for path, body in (("/api/generate", {"model": "m:1", "prompt": "x"}),
                       ("/api/chat", {"model": "m:1", "messages": [{"role": "user", "content": "x"}]})):
        with pytest.raises(urllib.error.HTTPError) as err:
            post(s, body, path)
        reply = json.loads(err.value.read())
        assert err.value.code == code and reply == {"error": f"every node failed: h: {reason}"}, reply
    fake.mode = "ok"
    status, _, body = post(s, {"model": "m:1", "prompt": "x", "stream": False})
    assert status == 200 and json.loads(body)["response"] == "Hello \ud800 there"
    nodes = json.loads(urllib.request.urlopen(s.base + "/mesh/status", timeout=8).read())["nodes"]
    assert [n["healthy"] for n in nodes] == [True]


@pytest.mark.parametrize("mode, reason", [
    ("negative_length", "bad Content-Length '-1'"),
    ("deep_nesting", "bad reply: not a JSON object"),
])
def test_a_reply_mesh_cannot_read_is_the_nodes_error(hostile, lab, mode, reason):
    fake, s = hostile
    fake.mode = mode
    req = urllib.request.Request(s.base + "/api/generate", method="POST",
                                 data=json.dumps({"model": "m:1", "prompt": "x", "stream": False}).encode())
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=8)
    message = json.loads(err.value.read())["error"]
    # (the node answered, with what mesh cannot read: 502, as nginx answers an invalid upstream reply)
    assert err.value.code == 502 and message.startswith("every node failed: h: ") and reason in message, message
    p = lab.run("generate", "--model", "m:1", "--no-stream", "hi", timeout=8)
    out = p.stderr.decode()
    assert p.returncode == 1 and out.startswith("mesh: error: ") and out.count("\n") == 1, out
    assert reason in out and "Traceback" not in out


def test_a_whole_answer_cut_off_ends_short_with_no_error_glued_to_it(hostile):
    """stream=false on /v1 (an object with no "done" to end it): the node's connection
    closes before its body's last chunk: the client's body ends short (no last chunk), as
    from the node itself, rather than the object plus an error line in Ollama's shape
    that leaves neither readable.  (An Ollama answer ends at its done line: whole.)"""
    import http.client
    fake, s = hostile
    fake.mode = "cut_whole"
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions",
                     json.dumps({"model": "m:1", "messages": [{"role": "user", "content": "x"}]}))
        reply = conn.getresponse()
        assert reply.status == 200
        with pytest.raises(http.client.IncompleteRead) as cut:
            reply.read()
    finally:
        conn.close()
    assert b"error" not in cut.value.partial
    assert json.loads(cut.value.partial)["choices"][0]["message"]["content"] == "Hello \ud800 there"


def test_a_line_in_braces_that_is_not_json_ends_the_cli_with_an_error(hostile, lab):
    fake, _ = hostile
    fake.mode = "brace_line"
    p = lab.run("generate", "--model", "m:1", "hi", timeout=8)
    err = p.stderr.decode()
    assert p.stdout.decode() == "Hello" and p.returncode == 1, (p.stdout, err)
    assert err == ("mesh: error: h: bad reply: not JSON: '{this is not json}' "
                   "(after part of the answer was sent; not retried)\n"), err


def test_last_line_with_done_reason_but_no_done_is_passed_on(hostile):
    fake, s = hostile
    fake.mode = "done_reason"
    _, _, body = post(s, {"model": "m:1", "prompt": "x"})
    got = lines(body)
    assert got[-1]["done_reason"] == "stop" and "done" not in got[-1] and "error" not in body.decode()


def test_bad_line_mid_stream_ends_with_an_error_line(hostile):
    fake, s = hostile
    fake.mode = "bad_line"
    _, _, body = post(s, {"model": "m:1", "prompt": "x"})
    got = lines(body)
    assert got[0]["response"] == "Hello" and list(got[-1]) == ["error"] and len(got) == 2
    assert "h: bad reply: not JSON: 'this is not json'" in got[-1]["error"]


def test_error_after_a_last_line_without_its_newline_is_a_line_of_its_own(hostile):
    fake, s = hostile
    fake.mode = "no_newline"
    _, _, body = post(s, {"model": "m:1", "prompt": "x"})
    got = lines(body)                     # every line is JSON (none glued to the error)
    assert [x.get("response") for x in got[:-1]] == ["Hello", " \ud800", " there"]
    assert 'stream ended before its final line (truncated: the body ended with no "done": true line)' \
        in got[-1]["error"]


def test_bad_chunk_framing_mid_stream_ends_with_an_error_line(hostile):
    """A chunk size line that is not hex digits ("0x5e") is bad framing: the client gets
    an error line in well-formed chunks, not the node's malformed chunk passed on."""
    fake, s = hostile
    fake.mode, fake.token_delay = "bad_chunk", 0.1     # (the bad chunk comes after the first line is out)
    body = json.dumps({"model": "m:1", "prompt": "x"}).encode()
    sock = socket.create_connection(("127.0.0.1", s.port))
    sock.settimeout(30)
    sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    head, _, rest = read_to_end(sock).partition(b"\r\n\r\n")
    if head.startswith(b"HTTP/1.1 503"):     # a loaded machine read both chunks at once: nothing was out yet
        assert "malformed chunk size" in json.loads(rest)["error"]
        return
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head
    payload = b""
    while True:                           # strictly: bare hex digits, as curl and Go read them
        size_line, _, rest = rest.partition(b"\r\n")
        assert re.fullmatch(rb"[0-9a-fA-F]+", size_line), size_line
        size = int(size_line, 16)
        payload, rest = payload + rest[:size], rest[size + 2:]
        if not size:
            break
    got = lines(payload)
    assert got[0]["response"] == "Hello" and list(got[-1]) == ["error"] and len(got) == 2
    assert "malformed chunk size" in got[-1]["error"]


def test_control_characters_from_a_node_are_made_visible(lab):
    fake = lab.add_node("solo", ["m:1"])
    fake.mode = "error_line"
    fake.error_text = "\x1b]0;owned\x07\x1b[2Jgone\nmesh: fake line"
    p = lab.run("generate", "--model", "m:1", "hi")
    err = p.stderr.decode()
    assert p.returncode == 1 and "\x1b" not in err and "\x07" not in err
    assert err.count("\n") == 1 and "\\x1b]0;owned\\x07\\x1b[2Jgone\\nmesh: fake line" in err


# -- TCP_NODELAY on sshd's side of the master ---------------------------------------

def _nodelay_of(pid):
    """TCP_NODELAY of each TCP socket another process holds (pidfd_getfd: root, Linux 5.6+)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    values = []
    pidfd = os.pidfd_open(pid)
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    continue
            except OSError:
                continue
            mine = libc.syscall(438, pidfd, int(fd), 0)   # SYS_pidfd_getfd
            if mine < 0:
                continue
            sock = socket.socket(fileno=mine)
            try:
                if sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM:
                    values.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            except OSError:
                pass
            finally:
                sock.close()
    finally:
        os.close(pidfd)
    return values


def sshd_nodelay(lab, name):
    values = []
    for pid in _descendants(lab.nodes[name].proc.pid):
        try:
            values += _nodelay_of(pid)
        except (ProcessLookupError, FileNotFoundError):
            pass   # a session's process that ended meanwhile (e.g. the master's first session)
    return values


@pytest.mark.skipif(os.getuid() != 0 or not hasattr(os, "pidfd_open"), reason="reads sshd's socket: root only")
def test_sshd_side_of_the_master_has_tcp_nodelay(lab):
    lab.add_node("a", ["m:1"])
    lab.add_node("b", ["m:1"])
    try:
        _nodelay_of(os.getpid())
    except OSError:
        pytest.skip("no pidfd_getfd here")
    # b's master is started the way mesh used to (no session ever runs on the node), then reused
    env = lab.env()
    ctl_b = None
    p = lab.run("generate", "--model", "m:1", "--nodes", "a", "hi")
    assert p.returncode == 0, p.stderr
    assert sshd_nodelay(lab, "a") == [1]
    p = lab.run("nodes", "--json")
    ctl_dir = os.path.join(env["MESH_CONTROL_DIR"], f"mesh-{os.getuid()}")   # mesh's private subdirectory
    before = set(os.listdir(ctl_dir))
    subprocess.run([SSH, "-F", lab.config_path, "-o", "BatchMode=yes", "-o", "ControlMaster=yes",
                    "-o", "ControlPersist=60", "-o", "ControlPath=" + os.path.join(ctl_dir, "probe"),
                    "-f", "-N", "b"], check=True, timeout=30)
    assert sshd_nodelay(lab, "b") == [0]                   # what a master without a session has
    subprocess.run([SSH, "-o", "ControlPath=" + os.path.join(ctl_dir, "probe"), "-O", "exit", "b"],
                   capture_output=True, timeout=10)
    p = lab.run("generate", "--model", "m:1", "--nodes", "b", "hi")
    assert p.returncode == 0, p.stderr
    ctl_b = [e for e in set(os.listdir(ctl_dir)) - before if "." not in e and e != "probe"]
    assert ctl_b and sshd_nodelay(lab, "b") == [1]


def test_serve_raises_its_open_files_limit_to_the_hard_one(lab):
    """As Go's runtime (and so Ollama) does at start: two descriptors per relayed stream
    must not cap serve near 500 streams under the usual soft limit of 1024."""
    import resource
    lab.add_node("f", ["m:1"])
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard open files limit here is {hard}")

    def low():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    s = Serve(lab, preexec_fn=low)
    try:
        with open(f"/proc/{s.proc.pid}/limits") as fh:
            soft_now = next(line.split()[3] for line in fh if line.startswith("Max open files"))
    finally:
        s.stop()
    assert soft_now == ("unlimited" if hard == resource.RLIM_INFINITY else str(hard))


def test_listen_backlog_is_the_kernels(lab):
    if not shutil.which("ss"):
        pytest.skip("ss (iproute2) not installed")
    lab.add_node("a", ["m:1"])
    s = Serve(lab)
    try:
        out = subprocess.run(["ss", "-Hltn", f"sport = :{s.port}"], capture_output=True, text=True).stdout
        backlog = int(out.split()[2])                      # Send-Q of a listener is its backlog
        with open("/proc/sys/net/core/somaxconn") as fh:
            assert backlog == int(fh.read()) >= 500
    finally:
        s.stop()


def test_node_cut_off_or_silent_mid_stream_ends_with_an_error_line(hostile, lab):
    """The relay's own end of a reply (the node's connection read by serve's relay
    protocol): a node that closes mid-stream, and one that goes silent."""
    fake, s = hostile
    fake.mode = "truncate"              # two lines, then the connection closes without the last chunk
    got = lines(post(s, {"model": "m:1", "prompt": "x"})[2])
    assert [g.get("response") for g in got[:2]] == ["Hello", " \ud800"] and list(got[-1]) == ["error"]
    assert "stream ended before its final line (truncated: the connection closed inside the body)" \
        in got[-1]["error"]
    fake.mode = "cut_midline"           # closed inside a chunk, half a line sent: cut off, not "not JSON"
    got = lines(post(s, {"model": "m:1", "prompt": "x"})[2])
    assert [g.get("response") for g in got[:2]] == ["Hello", " \ud800"] and list(got[-1]) == ["error"]
    assert "h: bad reply: stream cut off (truncated: the chunked body did not end)" in got[-1]["error"]
    fake.mode = "ok"
    fake.finish_stream.clear()          # every token, then silence before the done line
    quick = Serve(lab, "--idle-timeout", "1")
    try:
        got = lines(post(quick, {"model": "m:1", "prompt": "x"})[2])
    finally:
        fake.finish_stream.set()
        quick.stop()
    assert len(got) == 4 and got[2]["response"] == " there" and list(got[-1]) == ["error"]
    assert "no data for idle_timeout=1s" in got[-1]["error"]
    assert [g["done"] for g in lines(post(s, {"model": "m:1", "prompt": "x"})[2])][-1] is True


def test_idle_timeout_is_the_silence_allowed(lab):
    """--idle-timeout N: the error line comes N seconds (plus at most an eighth) after the
    node's last data, however the silence falls against the relay's idle timer."""
    import http.client
    fake = lab.add_node("p", ["m:1"], tokens=["a"] * 5, token_delay=0.3)
    fake.finish_stream.clear()          # five tokens 0.3 s apart, then silence before the done line
    s = Serve(lab, "--idle-timeout", "1")
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    try:
        conn.request("POST", "/api/generate", json.dumps({"model": "m:1", "prompt": "x"}))
        reply = conn.getresponse()
        arrived = []
        while True:
            line = reply.readline()
            if not line:
                break
            arrived.append((time.monotonic(), json.loads(line)))
    finally:
        fake.finish_stream.set()
        conn.close()
        s.stop()
    assert [a[1].get("response") for a in arrived[:5]] == ["a"] * 5 and list(arrived[-1][1]) == ["error"]
    silence = arrived[-1][0] - arrived[4][0]
    assert 0.9 <= silence < 1.5, silence


def test_a_reply_that_ends_without_its_final_line_loses_no_token(hostile):
    """The body's proper end arriving in the same read as the last tokens, no done line:
    those tokens are passed on, then the error line (they were dropped with the error)."""
    fake, s = hostile
    fake.mode, fake.token_delay = "no_final", 0.05   # paced: the end comes to the relay, not the first read
    got = lines(post(s, {"model": "m:1", "prompt": "x"})[2])
    assert [g.get("response") for g in got[:-1]] == ["Hello", " \ud800", " there"] and list(got[-1]) == ["error"]
    assert 'stream ended before its final line (truncated: the body ended with no "done": true line)' \
        in got[-1]["error"]


def read_to_end(sock, size=65536):
    """Everything the socket gives until serve closes it; the socket is closed."""
    data = bytearray()
    while True:
        piece = sock.recv(size)
        if not piece:
            break
        data += piece
    sock.close()
    return bytes(data)


def test_a_client_that_pipelines_then_half_closes_gets_its_reply(hostile):
    """Two requests sent together, then the client's side closed (it has said all it
    will): the first is answered whole, as Go's net/http and nginx do, not cancelled
    as if the client had left; the connection closes after it."""
    _, s = hostile
    body = json.dumps({"model": "m:1", "prompt": "x"}).encode()
    req = (b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    sock = socket.create_connection(("127.0.0.1", s.port))
    sock.settimeout(30)
    sock.sendall(req + req)
    sock.shutdown(socket.SHUT_WR)
    data = read_to_end(sock)
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and payload.endswith(b"0\r\n\r\n")
    assert b'"done": true' in payload and b"HTTP/1.1" not in payload


def test_a_client_that_reads_slowly_gets_the_whole_stream(lab):
    """A reply far larger than the socket buffers, to a client with a small receive
    buffer: serve stops reading the node while the client is behind (no unbounded
    buffering, nothing dropped) and the stream arrives whole, in order."""
    tokens = [f"{i:05d}" + "x" * 8000 for i in range(1500)]     # ~12 MB of lines
    lab.add_node("big", ["m:1"], tokens=tokens)
    s = Serve(lab)
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(60)             # a stall fails the test instead of hanging it
        sock.connect(("127.0.0.1", s.port))
        body = json.dumps({"model": "m:1", "prompt": "x"}).encode()
        sock.sendall(b"POST /api/generate HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        first = sock.recv(1024)
        time.sleep(1)                   # a client busy elsewhere: what it was sent piles up in serve
        data = first + read_to_end(sock, 1024)
    finally:
        s.stop()
    head, _, payload = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    got = lines(payload)
    assert [g["response"] for g in got[:-1]] == tokens and got[-1]["done"] is True
