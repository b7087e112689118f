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
    (b"GET /api/version HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", "GET", "/api/version", "", (1, 0), False,
     None, False),                                                   # 1.0 always closes after the reply
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
