"""The HTTP front: HTTP/1.1 framing (pure, tables of cases), the route table, and
hostile requests sent as raw bytes to a real `mesh.py serve`."""
import pytest

import mesh

HTTPError = mesh.HTTPError


# -- request heads -------------------------------------------------------------

@pytest.mark.parametrize("head, method, path, query, version, keep, length, chunked", [
    (b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n", "GET", "/api/tags", "", (1, 1), True, None, False),
    (b"GET /api/tags?a=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "GET", "/api/tags", "a=1", (1, 1),
     False, None, False),
    (b"GET /api/version HTTP/1.0\r\n\r\n", "GET", "/api/version", "", (1, 0), False, None, False),  # 1.0: no Host needed
    (b"GET /api/version HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", "GET", "/api/version", "", (1, 0), True,
     None, False),                                                   # 1.0 keeps it only when asked
    (b"GET /api/version HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n", "GET", "/api/version", "", (1, 0),
     False, None, False),                                            # ... and not also told to close
    (b"GET /api/version HTTP/1.0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n", "GET", "/api/version",
     "", (1, 0), False, None, False),
    (b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n", "POST", "/api/generate", "",
     (1, 1), True, 12, False),
    (b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n", "POST", "/api/chat", "",
     (1, 1), True, None, True),
    (b"GET http://127.0.0.1:11500/api/version HTTP/1.1\r\nHost: x\r\n\r\n", "GET", "/api/version", "", (1, 1),
     True, None, False),                                             # absolute form (RFC 9112 3.2.2)
    (b"GET http://h HTTP/1.1\r\nHost: h\r\n\r\n", "GET", "/", "", (1, 1), True, None, False),
    (b"GET /api/blobs/sha256%3Aab HTTP/1.1\r\nHost: x\r\n\r\n", "GET", "/api/blobs/sha256:ab", "", (1, 1),
     True, None, False),                                             # percent-decoded path
    (b"GET / HTTP/1.1\nHost: x\n\n", "GET", "/", "", (1, 1), True, None, False),          # bare LF lines
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Empty:\r\nX-Pad:   v \t\r\n\r\n", "GET", "/", "", (1, 1), True, None,
     False),
    (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", "OPTIONS", "*", "", (1, 1), True, None, False),
])
def test_parse_request_head(head, method, path, query, version, keep, length, chunked):
    req = mesh.parse_request_head(head)
    assert (req.method, req.path, req.query, req.version, req.keep_alive, req.content_length, req.chunked) == \
        (method, path, query, version, keep, length, chunked)


def test_headers_are_case_insensitive_and_repeated_ones_joined():
    req = mesh.parse_request_head(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\nX-Pad:  v \r\n\r\n")
    assert req.header("X-A") == "1, 2" and req.header("x-pad") == "v" and req.header("nope", "d") == "d"


def test_expect_100_continue_only_with_a_body():
    assert mesh.parse_request_head(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                   b"Content-Length: 5\r\n\r\n").expect_continue is True
    assert mesh.parse_request_head(b"GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n"
                                   ).expect_continue is False


@pytest.mark.parametrize("head, status, message", [
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505, "not supported"),
    (b"GET / HTTP/1.2\r\nHost: x\r\n\r\n", 505, "not supported"),
    (b"GET / HTTP/0.9\r\n\r\n", 505, "not supported"),
    (b"GET / HTTP/11\r\nHost: x\r\n\r\n", 400, "malformed HTTP version"),
    (b"GET /\r\n\r\n", 400, "malformed request line"),
    (b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "malformed request line"),
    (b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "malformed method"),
    (b"GET / HTTP/1.1\r\n\r\n", 400, "missing required Host"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "too many Host"),
    (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "malformed Host"),
    (b"GET api/tags HTTP/1.1\r\nHost: x\r\n\r\n", 400, "malformed request target"),
    (b"GET ftp://h/x HTTP/1.1\r\nHost: x\r\n\r\n", 400, "malformed request target"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n", 400, "malformed header line"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nName : v\r\n\r\n", 400, "malformed header line"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n", 400, "malformed header line"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n\r\n", 400, "line folding"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400, "control character"),
    (b"GET / HTTP/1.1\r\nHost: x\rX-A: 1\r\n\r\n", 400, "bare CR"),
    # Content-Length and Transfer-Encoding (request smuggling)
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400, "more than one"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", 400, "more than one"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\n", 400, "malformed Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400, "malformed Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n", 400, "malformed Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x10\r\n\r\n", 400, "malformed Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length:\r\n\r\n", 400, "malformed Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \xd9\xa3\r\n\r\n", 400, "malformed Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400,
     "both Content-Length and Transfer-Encoding"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400,
     "malformed Transfer-Encoding"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400, "malformed Transfer-Encoding"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n", 400, "malformed Transfer-Encoding"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, "unsupported transfer"),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "HTTP/1.0"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\nContent-Length: 1\r\n\r\n", 417, "Expect"),
])
def test_parse_request_head_rejects(head, status, message):
    with pytest.raises(HTTPError, match=message) as info:
        mesh.parse_request_head(head)
    assert info.value.status == status


@pytest.mark.parametrize("buf, end", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\nrest", 27),
    (b"GET / HTTP/1.1\nHost: x\n\nrest", 24),
    (b"GET / HTTP/1.1\r\nHost: x\n\r\n", 26),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r", -1),            # the last LF may still come
    (b"GET / HTTP/1.1\r\nHost: x\r\n", -1),
    (b"GET / HTTP/1.1", -1),
    (b"GET / HTTP/1.1\nHost: x\n\r\nX: y\n\n", 25),       # the first empty line, whichever its end
    (b"GET / HTTP/1.1\r\nA: b\n\nC: d\r\n\r\n", 22),
    (b"GET / HTTP/1.1\r\nA: b\n\r\r\n\r\n\n", 26),       # a CR alone is no line end
])
def test_find_head_end(buf, end):
    assert mesh.find_head_end(buf) == end


# -- chunked bodies ---------------------------------------------------------------

@pytest.mark.parametrize("pieces, body, rest", [
    ([b"5\r\nhello\r\n0\r\n\r\n"], b"hello", b""),
    ([b"5\r\nhel", b"lo\r", b"\n6\r\n world\r\n0\r\n", b"\r\nGET"], b"hello world", b"GET"),  # split anywhere
    ([b"A\r\n0123456789\r\n0\r\n\r\n"], b"0123456789", b""),
    ([b"a;ext=1\r\n0123456789\r\n0;x\r\n\r\n"], b"0123456789", b""),   # chunk extensions ignored
    ([b"3 \r\nabc\r\n0\r\n\r\n"], b"abc", b""),                       # whitespace before an extension
    ([b"3\nabc\r\n0\n\n"], b"abc", b""),                               # bare LF ends a size line
    ([b"0\r\nX-Trailer: 1\r\n\r\nnext"], b"", b"next"),                # trailer fields skipped
    ([b"0000000000000003\r\nabc\r\n0\r\n\r\n"], b"abc", b""),          # 16 hex digits
])
def test_chunked_decoder(pieces, body, rest):
    dec = mesh.ChunkedDecoder(max_body=1 << 20)
    out, left = b"", b""
    for piece in pieces:
        assert not dec.done
        data, used = dec.feed(piece)
        out += data
        left += piece[used:]
    assert dec.done and out == body and left == rest


@pytest.mark.parametrize("data, status, message", [
    (b"0x16\r\n", 400, "malformed chunk size"),
    (b"1_6\r\n", 400, "malformed chunk size"),
    (b"-2\r\n", 400, "malformed chunk size"),
    (b"+2\r\n", 400, "malformed chunk size"),
    (b"\r\n", 400, "malformed chunk size"),
    (b" 5\r\n", 400, "malformed chunk size"),
    (b"g\r\n", 400, "malformed chunk size"),
    (b"00000000000000003\r\n", 400, "malformed chunk size"),   # 17 digits: Go's limit is 16
    (b"5\r\nhelloXX", 400, "not followed by CRLF"),
    (b"5\r\nhello\n", 400, "not followed by CRLF"),
    (b"1" * 5000, 400, "line too long"),
    (b"401\r\n", 413, "larger than 1024"),                     # refused before its data is read
    (b"400\r\n" + b"x" * 1024 + b"\r\n1\r\n", 413, "larger than 1024"),
    (b"0\r\n" + b"X: y\r\n" * 20000, 400, "trailer section too large"),
])
def test_chunked_decoder_rejects(data, status, message):
    dec = mesh.ChunkedDecoder(max_body=1024)
    with pytest.raises(HTTPError, match=message) as info:
        dec.feed(data)
    assert info.value.status == status


# -- responses -----------------------------------------------------------------------

@pytest.mark.parametrize("version, method, status, length, keep, fields, chunked, keep_after", [
    ((1, 1), "GET", 200, 5, True, [("Content-Length", "5")], False, True),
    ((1, 1), "HEAD", 200, 5, True, [("Content-Length", "5")], False, True),    # the length GET would have
    ((1, 1), "POST", 200, None, True, [("Transfer-Encoding", "chunked")], True, True),
    ((1, 0), "POST", 200, None, False, [("Connection", "close")], False, False),  # close-delimited
    ((1, 0), "POST", 200, None, True, [("Connection", "close")], False, False),   # ... even when asked to keep it
    ((1, 0), "GET", 200, 5, True, [("Content-Length", "5"), ("Connection", "keep-alive")], False, True),
    ((1, 1), "GET", 404, 9, False, [("Content-Length", "9"), ("Connection", "close")], False, False),
    ((1, 1), "GET", 204, 0, True, [], False, True),
])
def test_response_framing(version, method, status, length, keep, fields, chunked, keep_after):
    assert mesh.response_framing(version, method, status, length, keep_alive=keep) == (fields, chunked, keep_after)


@pytest.mark.parametrize("method, status, allowed", [
    ("GET", 200, True), ("HEAD", 200, False), ("HEAD", 404, False), ("POST", 204, False),
    ("GET", 304, False), ("GET", 100, False), ("POST", 400, True),
])
def test_body_allowed(method, status, allowed):
    assert mesh.body_allowed(method, status) is allowed


def test_response_head():
    assert mesh.response_head(404, [("Content-Length", "2")]) == \
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n"
    with pytest.raises(ValueError):
        mesh.response_head(200, [("X-Mesh-Node", "a\r\nSet-Cookie: x")])


# -- the route table ------------------------------------------------------------------

class _API:
    routes = [mesh.Route("GET", "/api/tags", "tags"), mesh.Route("POST", "/api/blobs/:digest", "blob"),
              mesh.Route("GET", "/mesh/*rest", "dash"), mesh.Route("OPTIONS", "/v1/*rest", "cors", auth=False)]


@pytest.mark.parametrize("method, path, handler, params, status", [
    ("GET", "/api/tags", "tags", {}, None),
    ("HEAD", "/api/tags", "tags", {}, None),                 # GET routes answer HEAD
    ("POST", "/api/tags", None, {}, 405),
    ("POST", "/api/blobs/sha256:abc", "blob", {"digest": "sha256:abc"}, None),
    ("POST", "/api/blobs/a/b", None, {}, 404),               # a parameter is one segment
    ("GET", "/mesh/", "dash", {"rest": ""}, None),
    ("GET", "/mesh/a/b.js", "dash", {"rest": "a/b.js"}, None),
    ("OPTIONS", "/v1/chat/completions", "cors", {"rest": "chat/completions"}, None),
    ("GET", "/nothing", None, {}, 404),
])
def test_router(method, path, handler, params, status):
    route, got, error = mesh.Router([_API()]).match(method, path)
    assert (route.handler if route else None, got, error.status if error else None) == (handler, params, status)
    if status == 405:
        assert error.headers == [("Allow", "GET, HEAD")]


def test_server_limits_are_named_settings_with_defaults():
    limits = mesh.ServerLimits(max_body=10)
    assert limits.max_body == 10 and mesh.ServerLimits().max_body >= 64 * 1024 * 1024
    with pytest.raises(TypeError):
        mesh.ServerLimits(max_bodyy=1)


# -- hostile requests, raw over a socket, to a real `mesh.py serve` ---------------------

import json  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from conftest import needs_sshd  # noqa: E402
from lab import HAVE_SSHD, MESH, SSHLab, free_port, wait_for  # noqa: E402
from test_serve import Serve  # noqa: E402

TOKEN = "s3cret"
AUTH = f"Authorization: Bearer {TOKEN}\r\n"


@pytest.fixture(scope="module")
def front():
    """One serve for the module: a token, a 1 MiB body limit, short timeouts."""
    if not HAVE_SSHD:
        pytest.skip("OpenSSH sshd not installed")
    the_lab = SSHLab()
    try:
        the_lab.add_node("a", ["m:1"], tokens=["ok"])
        s = Serve(the_lab, "--token", TOKEN, "--max-body", "1M", "--header-timeout", "2",
                  "--keepalive-timeout", "2")
        s.lab = the_lab
        yield s
        s.stop()
    finally:
        the_lab.close()


def exchange(port, data, *, timeout=10):
    """Send raw bytes, read until the server closes (or `timeout`): (bytes, closed)."""
    s = socket.create_connection(("127.0.0.1", port), timeout)
    try:
        s.sendall(data)
        out = b""
        while True:
            try:
                piece = s.recv(65536)
            except ConnectionResetError:
                return out, True
            except socket.timeout:
                return out, False
            if not piece:
                return out, True
            out += piece
    finally:
        s.close()


def status_of(reply):
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else None


def error_of(reply):
    return json.loads(reply.partition(b"\r\n\r\n")[2])["error"]


GEN = b'{"model": "m:1", "prompt": "x", "stream": false}'


@pytest.mark.parametrize("request_bytes, status, fragment", [
    # duplicate / malformed / conflicting framing headers
    (b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: 48\r\nContent-Length: 4\r\n\r\n" + GEN,
     400, "more than one Content-Length"),
    (b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: -1\r\n\r\n" + GEN, 400, "malformed Content-Length"),
    (b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: 48\r\nTransfer-Encoding: chunked\r\n\r\n" + GEN,
     400, "both Content-Length and Transfer-Encoding"),
    # chunk sizes Go refuses (the token is right, so the body is read)
    (b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\n" + AUTH.encode() + b"Transfer-Encoding: chunked\r\n\r\n0x16\r\n",
     400, "malformed chunk size"),
    (b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\n" + AUTH.encode() + b"Transfer-Encoding: chunked\r\n\r\n1_6\r\n",
     400, "malformed chunk size"),
    (b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\n" + AUTH.encode() + b"Transfer-Encoding: chunked\r\n\r\n-2\r\n",
     400, "malformed chunk size"),
    # versions, Host
    (b"GET /api/version HTTP/2.0\r\nHost: localhost\r\n\r\n", 505, "not supported"),
    (b"GET /api/version HTTP/1.1\r\n" + AUTH.encode() + b"\r\n", 400, "missing required Host"),
    # limits: head, body (known length, chunked), header timeout
    (b"GET /api/version HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431, "request head larger"),
    (b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\n" + AUTH.encode() + b"Content-Length: 2000000\r\n\r\n{",
     413, "larger than 1048576"),
    (b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\n" + AUTH.encode()       # 413 without asking for the body
     + b"Expect: 100-continue\r\nContent-Length: 2000000\r\n\r\n", 413, "larger than 1048576"),
    (b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\n" + AUTH.encode() + b"Transfer-Encoding: chunked\r\n\r\n"
     + b"80000\r\n" + b" " * 0x80000 + b"\r\n80001\r\n", 413, "larger than 1048576"),
    (b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n", 408, "not complete within 2 s"),
    # the token before any body byte, and before 100 Continue
    (b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000000\r\n\r\n", 401, "unauthorized"),
    (b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n", 401, "unauthorized"),
    (b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: 48\r\n\r\n", 401,
     "unauthorized"),
])
def test_bad_framing_gets_a_status_and_a_closed_connection(front, request_bytes, status, fragment):
    reply, closed = exchange(front.port, request_bytes)
    assert status_of(reply) == status and fragment in error_of(reply)
    assert b"100 Continue" not in reply and b"Connection: close" in reply.partition(b"\r\n\r\n")[0]
    assert closed


@pytest.mark.parametrize("path, shape", [
    ("/api/chat", lambda e: isinstance(e["error"], str)),
    ("/v1/chat/completions", lambda e: e["error"]["type"] == "api_error" and "message" in e["error"]),
    ("/v1/messages?beta=true", lambda e: e["type"] == "error" and e["error"]["type"] == "api_error"),
])
def test_a_head_that_cannot_be_read_gets_its_apis_error_shape(front, path, shape):
    """431, 505, and the like, decided before any route: the error is still in the shape
    of the API the request line names, as every other error on that path."""
    for head, status in ((b"POST %s HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),
                         (b"POST %s HTTP/2.0\r\nHost: localhost\r\n\r\n", 505)):
        reply, closed = exchange(front.port, head % path.encode())
        err = json.loads(reply.partition(b"\r\n\r\n")[2])
        assert status_of(reply) == status and shape(err) and closed, err


@pytest.mark.parametrize("request_bytes, status", [
    (b"HEAD /api/version HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"HEAD /api/version HTTP/1.1\r\n\r\n", 400),
    (b"HEAD /api/version HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),
])
def test_head_with_bad_framing_gets_no_body_either(front, request_bytes, status):
    reply, closed = exchange(front.port, request_bytes)
    assert status_of(reply) == status and reply.endswith(b"\r\n\r\n") and closed


def ok_request(port):
    reply, _ = exchange(port, f"GET /api/version HTTP/1.1\r\nHost: localhost\r\n{AUTH}Connection: close\r\n\r\n".encode())
    return status_of(reply) == 200


@pytest.mark.parametrize("request_bytes", [
    f"GET /api/version HTTP/1.1\nHost: localhost\n{AUTH[:-2]}\nConnection: close\n\n".encode(),          # bare LF
    f"GET http://127.0.0.1/api/version HTTP/1.1\r\nHost: localhost\r\n{AUTH}Connection: close\r\n\r\n".encode(),
    f"GET /api/version HTTP/1.0\r\n{AUTH}\r\n".encode(),                                          # 1.0: closes
])
def test_lenient_where_http_allows(front, request_bytes):
    reply, closed = exchange(front.port, request_bytes)
    assert status_of(reply) == 200 and json.loads(reply.partition(b"\r\n\r\n")[2])["version"] and closed


def test_head_never_has_a_body_even_for_errors(front):
    s = socket.create_connection(("127.0.0.1", front.port), 10)
    f = s.makefile("rb")
    for path, status in (("/api/version", 200), ("/api/tags", 200), ("/api/ps", 200), ("/", 200),
                         ("/nothing", 404), ("/api/generate", 405)):
        s.sendall(f"HEAD {path} HTTP/1.1\r\nHost: localhost\r\n{AUTH}\r\n".encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += f.readline()
        assert status_of(head) == status and b"Content-Length: " in head, head
    s.sendall(f"GET / HTTP/1.1\r\nHost: localhost\r\n{AUTH}Connection: close\r\n\r\n".encode())
    rest = f.read()          # had a HEAD reply carried a body, this would not start with a status line
    assert status_of(rest) == 200 and rest.endswith(b"\r\n\r\nOllama is running")


def test_http_1_0_keep_alive_is_kept_after_a_body_of_known_length(front):
    """Two HTTP/1.0 requests asking for keep-alive on one connection (as ApacheBench's -k
    sends them): both answered, each with Connection: keep-alive; the stream after them is
    close-delimited and ends the connection."""
    body = b'{"model": "m:1", "prompt": "x"}'
    one = f"GET /api/version HTTP/1.0\r\n{AUTH}Connection: keep-alive\r\n\r\n".encode()
    stream = f"POST /api/generate HTTP/1.0\r\n{AUTH}Connection: keep-alive\r\nContent-Length: {len(body)}\r\n\r\n"
    reply, closed = exchange(front.port, one + one + stream.encode() + body)
    parts = reply.split(b"HTTP/1.1 ")[1:]
    assert [p[:3] for p in parts] == [b"200"] * 3 and closed
    assert [b"\r\nConnection: keep-alive\r\n" in p for p in parts] == [True, True, False]
    head, _, data = parts[2].partition(b"\r\n\r\n")
    assert b"\r\nConnection: close" in head and [json.loads(x)["response"] for x in data.splitlines()] == ["ok", ""]


def test_http_1_0_gets_a_close_delimited_stream(front):
    body = b'{"model": "m:1", "prompt": "x"}'
    reply, closed = exchange(front.port, f"POST /api/generate HTTP/1.0\r\n{AUTH}Content-Length: {len(body)}\r\n\r\n"
                             .encode() + body)
    head, _, data = reply.partition(b"\r\n\r\n")
    assert status_of(reply) == 200 and b"chunked" not in head.lower() and b"Connection: close" in head and closed
    assert [json.loads(x)["response"] for x in data.splitlines()] == ["ok", ""]


def test_idle_keep_alive_connection_is_closed(front):
    s = socket.create_connection(("127.0.0.1", front.port), 10)
    s.sendall(f"GET /api/version HTTP/1.1\r\nHost: localhost\r\n{AUTH}\r\n".encode())
    got = b""
    while b'"version"' not in got:
        got += s.recv(65536)
    s.settimeout(30)
    assert s.recv(100) == b""        # closed by the server after --keepalive-timeout 2
    s.close()


@pytest.mark.parametrize("body, status, expected", [
    (b'{"model": "m:1", "prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, "exceeded max depth"),
    (b'{"model": 5, "prompt": "x"}', 400,
     "json: cannot unmarshal number into Go struct field GenerateRequest.model of type string"),
    (b'{"model": "m:1", "prompt": "x", "stream": "false"}', 400,
     "json: cannot unmarshal string into Go struct field GenerateRequest.stream of type bool"),
    (b'[1]', 400, "request body must be a JSON object"),
    (b'{"model": "m:1", "prompt": "caf\xe9 \xff", "stream": false}', 200, "caf\ufffd \ufffd"),
    (b'{"model": "m:1", "prompt": "cut \\ud83d emoji \\ud83d\\ude00", "stream": false}', 200,
     "cut \ufffd emoji \U0001F600"),
])
def test_every_json_body_gets_an_answer(front, body, status, expected, path="/api/generate"):
    reply, _ = exchange(front.port, f"POST {path} HTTP/1.1\r\nHost: localhost\r\n{AUTH}Connection: close\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert status_of(reply) == status
    if status == 200:
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["done"] is True
        assert front.lab.fakes["a"].bodies("/api/generate")[-1]["prompt"] == expected
    else:
        error = error_of(reply)
        assert (error["message"] if isinstance(error, dict) else error) == expected


def test_an_escaped_emoji_reaches_the_node_as_the_client_sent_it(front):
    # a surrogate pair's escapes (what Python's json.dumps and requests send for an emoji) are
    # one character: nothing to mend, so the node gets the client's own bytes
    body = b'{"model": "m:1", "prompt": "an emoji \\ud83d\\ude00 and \\uD83D\\uDE00", "stream": false}'
    reply, _ = exchange(front.port, f"POST /api/generate HTTP/1.1\r\nHost: localhost\r\n{AUTH}Connection: close\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert status_of(reply) == 200
    sent = [r for r in front.lab.fakes["a"].requests if r["path"] == "/api/generate"][-1]
    assert sent["raw"] == body and sent["body"]["prompt"] == "an emoji \U0001F600 and \U0001F600"


@pytest.mark.parametrize("path, body, expected", [
    # Go's encoding/json has no NaN/Infinity and no float64 past 1.8e308: the node never gets them
    ("/api/generate", b'{"model": "m:1", "prompt": NaN}', "invalid JSON: invalid character 'N' looking for beginning of value"),
    ("/api/generate", b'{"model": "m:1", "prompt": "x", "x": -Infinity}',
     "invalid JSON: invalid character 'I' looking for beginning of value"),
    ("/api/generate", b'{"model": "m:1", "prompt": "x", "x": 1e999}',
     "invalid JSON: json: cannot unmarshal number 1e999 into Go value of type float64"),
    # a wrong type where mesh reads the field is 400 on every route, never a 500
    ("/v1/chat/completions", b'{"model": 5, "messages": []}',
     "json: cannot unmarshal number into Go struct field ChatCompletionRequest.model of type string"),
    ("/v1/messages", b'{"model": 5, "max_tokens": 1, "messages": []}',
     "json: cannot unmarshal number into Go struct field MessagesRequest.model of type string"),
    ("/api/copy", b'{"source": 5, "destination": "x"}',
     "json: cannot unmarshal number into Go struct field CopyRequest.source of type string"),
    ("/api/create", b'{"model": "x", "from": 5}',
     "json: cannot unmarshal number into Go struct field CreateRequest.from of type string"),
])
def test_bad_json_values_get_400_on_every_route(front, path, body, expected):
    test_every_json_body_gets_an_answer(front, body, 400, expected, path)


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1])


def test_unauthenticated_600_mb_is_refused_without_reading_it(front):
    before = rss_kb(front.proc.pid)
    for framing in ("Content-Length: 629145600\r\n", "Transfer-Encoding: chunked\r\n"):
        s = socket.create_connection(("127.0.0.1", front.port), 10)
        s.sendall(f"POST /api/generate HTTP/1.1\r\nHost: localhost\r\n{framing}\r\n".encode())
        sent = 0
        try:
            while sent < 600 * 2**20:
                sent += s.send(b"x" * 2**20)
        except OSError:
            pass                     # reset: the server closed after its 401
        s.close()
        assert sent < 100 * 2**20
    assert rss_kb(front.proc.pid) - before < 50_000
    assert ok_request(front.port)


def test_a_client_writing_during_a_stream_is_not_buffered(front):
    fake = front.lab.fakes["a"]
    fake.tokens, fake.token_delay = ["t"] * 20, 0.1
    try:
        before = rss_kb(front.proc.pid)
        body = b'{"model": "m:1", "prompt": "x"}'
        s = socket.create_connection(("127.0.0.1", front.port), 30)
        s.sendall(f"POST /api/generate HTTP/1.1\r\nHost: localhost\r\n{AUTH}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert s.recv(100).startswith(b"HTTP/1.1 200")
        s.setblocking(False)
        pushed = 0
        while pushed < 100 * 2**20:
            try:
                pushed += s.send(b"y" * 2**20)
            except BlockingIOError:
                break
            except OSError:
                break
        s.settimeout(30)
        rest = b""
        while True:
            try:
                piece = s.recv(65536)
            except OSError:
                break
            if not piece:
                break
            rest += piece
        assert rest.endswith(b"0\r\n\r\n")     # the stream completed, then the server closed
        s.close()
        assert rss_kb(front.proc.pid) - before < 50_000
    finally:
        fake.tokens, fake.token_delay = ["ok"], 0.0


def test_server_kept_serving_throughout(front):
    assert ok_request(front.port)


@needs_sshd
def test_out_of_descriptors_logs_once_and_recovers(lab, tmp_path):
    """ulimit -n 1024 and 1,100 idle connections: one log line, and service again
    once they close."""
    lab.add_node("a", ["m:1"])
    port = free_port()
    log = tmp_path / "stderr"
    proc = subprocess.Popen([sys.executable, MESH, "--config", lab.config_path, "serve", "--listen",
                             f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env=lab.env(),
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)))
    socks = []
    try:
        wait_for(lambda: b"serving" in log.read_bytes(), 20, "serve to listen")
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 1200:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
        for _ in range(1100):
            socks.append(socket.create_connection(("127.0.0.1", port), 10))
        wait_for(lambda: b"cannot accept connections" in log.read_bytes(), 30, "the out-of-descriptors line")
        for s in socks:
            s.close()
        socks = []
        wait_for(lambda: ok_version(port), 30, "service to resume")
        text = log.read_text()
        assert text.count("cannot accept connections: Too many open files") == 1
        assert "Traceback" not in text and len(text.splitlines()) < 10
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(20)


def ok_version(port):
    try:
        reply, _ = exchange(port, b"GET /api/version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", timeout=2)
    except OSError:
        return False
    return status_of(reply) == 200


@needs_sshd
def test_a_client_that_stops_reading_is_disconnected(lab):
    fake = lab.add_node("a", ["m:1"], tokens=["x" * 1_000_000] * 40)
    s = Serve(lab, "--write-timeout", "1")
    try:
        body = b'{"model": "m:1", "prompt": "x"}'
        c = socket.create_connection(("127.0.0.1", s.port), 30)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.sendall(f"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for(lambda: fake.active == 1, 20, "the node's request to start")
        wait_for(lambda: fake.active == 0, 60, "the node's request to be cancelled")   # nothing was read
        c.close()
        assert ok_version(s.port)
        # the access log says the reply was cut, not a clean 200
        wait_for(lambda: 'error="client read nothing for 1 s"' in s.stderr(), 20, "the request's access log line")
    finally:
        s.stop()


@pytest.mark.parametrize("shape", ["short", "long text", "many containers"])
def test_json_depth_limit_is_the_same_however_it_is_proved(shape):
    # 512 containers deep is taken, 513 is Ollama's "exceeded max depth" - whether the
    # body is short, mostly text (a walk over its few containers proves it) or made of
    # many small containers (the brackets are counted, then walked)
    def body(depth):
        extra = {"short": "", "long text": '"x":"' + "y" * 5000 + '",',
                 "many containers": '"m":[' + ",".join(['{"a":[1,{"b":2}]}'] * 400) + "],"}[shape]
        return ('{' + extra + '"a":' + "[" * (depth - 1) + "]" * (depth - 1) + "}").encode()
    assert isinstance(mesh.decode_json_body(body(512)), dict)
    with pytest.raises(ValueError, match="exceeded max depth"):
        mesh.decode_json_body(body(513))
