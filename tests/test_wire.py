"""Pure parts: NDJSON framing, HTTP heads, error shapes, names and addresses."""
import json
import re

import pytest

import mesh


@pytest.mark.parametrize("pieces, expected", [
    ([b'{"a":1}\n'], [{"a": 1}]),
    ([b'{"a":', b'1}\n{"b"', b':2}\n'], [{"a": 1}, {"b": 2}]),          # split across reads
    ([b'{"a":1}\r\n', b'\n', b'{"b":2}\n'], [{"a": 1}, {"b": 2}]),      # CRLF and blank lines
    ([b'{"t":"caf\xc3', b'\xa9"}\n'], [{"t": "caf\u00e9"}]),             # UTF-8 split mid-character
    ([b'{"a":1}\n{"b":2}'], [{"a": 1}]),                                 # last line not yet complete
    ([b''], []),
])
def test_ndjson_feed(pieces, expected):
    dec = mesh.NDJSONDecoder()
    out = []
    for p in pieces:
        out += dec.feed(p)
    assert out == expected


@pytest.mark.parametrize("tail, expected", [
    (b'{"done":true}', [{"done": True}]),    # a whole last line without newline counts
    (b'', []),
    (b'   ', []),
])
def test_ndjson_finish(tail, expected):
    dec = mesh.NDJSONDecoder()
    dec.feed(tail)
    assert dec.finish() == expected


@pytest.mark.parametrize("data, message", [
    (b"<html>oops</html>\n", "not JSON"),
    (b"[1,2]\n", "not a JSON object"),
    (b"not json\n", "not JSON"),
])
def test_ndjson_rejects(data, message):
    with pytest.raises(mesh.ProtocolError, match=message):
        mesh.NDJSONDecoder().feed(data)


def test_ndjson_truncated_tail_is_an_error():
    dec = mesh.NDJSONDecoder()
    dec.feed(b'{"response":"hal')
    with pytest.raises(mesh.ProtocolError, match="ended in the middle"):
        dec.finish()


@pytest.mark.parametrize("head, status, headers", [
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\n", 200,
     {"content-type": "application/json", "content-length": "5"}),
    (b"HTTP/1.0 404 Not Found\r\nX-A: 1\r\nx-a: 2\r\n\r\n", 404, {"x-a": "1, 2"}),
])
def test_parse_http_head(head, status, headers):
    assert mesh.parse_http_head(head) == (status, headers)


def test_parse_http_head_rejects_non_http():
    with pytest.raises(mesh.ProtocolError, match="not an HTTP response"):
        mesh.parse_http_head(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")


@pytest.mark.parametrize("status, body, expected", [
    (404, b'{"error":"model \\"x\\" not found, try pulling it first"}', 'model "x" not found, try pulling it first'),
    (502, b"<html><body>Bad gateway</body></html>", "HTTP 502 with an HTML page (not Ollama?)"),
    (500, b"", "HTTP 500"),
    (500, b"plain text", "HTTP 500: 'plain text'"),
])
def test_error_message(status, body, expected):
    assert mesh.error_message(status, body) == expected


@pytest.mark.parametrize("name, key", [
    ("llama3", "llama3:latest"), ("llama3:latest", "llama3:latest"), ("qwen2.5:7b", "qwen2.5:7b"),
    ("registry.example.com:5000/lib/m", "registry.example.com:5000/lib/m:latest"),
    ("user/m:q4", "user/m:q4"),
])
def test_model_key(name, key):
    assert mesh.model_key(name) == key


@pytest.mark.parametrize("text, expected", [
    ("", ("127.0.0.1", 11434)), ("0.0.0.0", ("127.0.0.1", 11434)), ("http://box:8080/", ("box", 8080)),
    (":9000", ("127.0.0.1", 9000)), ("[::1]:9001", ("::1", 9001)), ("example.org", ("example.org", 11434)),
])
def test_parse_host_port(text, expected):
    assert mesh.parse_host_port(text, 11434) == expected


@pytest.mark.parametrize("text, expected", [
    ("11652", ("127.0.0.1", 11652)), (":11652", ("127.0.0.1", 11652)), ("0.0.0.0:8080", ("0.0.0.0", 8080)),
    ("0", ("127.0.0.1", 0)), ("box", ("box", 11500)),
])
def test_listen_address(text, expected):
    """`serve --listen 11652` means port 11652 on the default (loopback) address."""
    assert mesh.parse_host_port(text, 11500, listen=True) == expected


@pytest.mark.parametrize("text, listen, message", [
    ("h:70000", False, "bad port in 'h:70000' (1-65535)"),
    ("99999", True, "bad port in '99999' (0-65535)"),        # what was typed, not ':99999'
    ("http://a:b:c", True, "bad address 'http://a:b:c' (expected HOST:PORT)"),
])
def test_parse_host_port_rejects_bad_port(text, listen, message):
    with pytest.raises(mesh.UsageError, match=re.escape(message)):
        mesh.parse_host_port(text, 11434, listen=listen)


@pytest.mark.parametrize("text, expected", [
    ('name="Vengeance RTX 4090" weight=3', {"name": "Vengeance RTX 4090", "weight": "3"}),
    ("off", {"enabled": "no"}),
    ("on max-concurrent=4", {"enabled": "yes", "max_concurrent": "4"}),
    ("ollama_port=11500 transport=exec", {"ollama_port": "11500", "transport": "exec"}),
])
def test_mesh_settings(text, expected):
    assert mesh.parse_mesh_settings(text) == expected


@pytest.mark.parametrize("settings, message", [
    ({"weight": "fast"}, "not a number"), ({"weight": "0"}, "must be > 0"),
    ({"max_concurrent": "0"}, "out of range"), ({"ollama_port": "99999"}, "out of range"),
    ({"transport": "carrier-pigeon"}, "one of"), ({"colour": "red"}, "unknown mesh setting"),
])
def test_bad_node_settings(settings, message):
    with pytest.raises(mesh.ConfigError, match=message):
        mesh.NodeSpec.from_settings("n", settings)


def test_request_bytes_carry_body_exactly():
    body = '{"prompt": "$(rm -rf /) `x` \\\\ \\n caf\u00e9"}'.encode()
    req = mesh.build_request("/api/generate", body, host="h:1", keep_alive=True)
    head, _, rest = req.partition(b"\r\n\r\n")
    assert rest == body
    assert b"Content-Length: %d" % len(body) in head


@pytest.mark.parametrize("name, names, expected", [
    ("lama3", ["llama3:latest", "qwen2.5:7b", "mistral:latest"], ["llama3:latest"]),
    ("llama3:latest", ["llama3", "llama3.1:8b"], ["llama3", "llama3.1:8b"]),
    ("qwen2.5:7", ["qwen2.5:7b", "qwen2.5:14b", "phi3:mini"], ["qwen2.5:7b", "qwen2.5:14b"]),
    ("zzz", ["llama3:latest", "qwen2.5:7b"], []),
    ("anything", [], []),
])
def test_closest_names(name, names, expected):
    assert mesh.closest_names(name, names) == expected


@pytest.mark.parametrize("size, text", [
    (None, "-"), (512, "512 B"), (1000, "1.0 KB"), (4_683_087_332, "4.7 GB"), (274_302_450, "274 MB"),
])
def test_human_size(size, text):
    assert mesh._human_size(size) == text


@pytest.mark.parametrize("text, epoch", [
    ("2024-06-04T14:38:31.83753-07:00", 1717537111.83753),
    ("2026-01-01T00:00:00Z", 1767225600.0),
    ("2026-01-01T00:00:00.123456789Z", 1767225600.123456),
    ("0001-01-01T00:00:00Z", -62135596800.0),
    ("soon", None), (None, None),
])
def test_parse_time(text, epoch):
    got = mesh._parse_time(text)
    assert got == epoch if epoch is None else got == pytest.approx(epoch)


@pytest.mark.parametrize("delta, text", [
    (240, "4 minutes from now"), (-3 * 86400, "3 days ago"), (30, "less than a minute from now"),
    (20 * 365 * 86400, "Forever"), (3600, "1 hour from now"),
])
def test_relative_time(delta, text):
    assert mesh._relative(1_000_000_000 + delta, now=1_000_000_000) == text


@pytest.mark.parametrize("entry, text", [
    ({"size": 100, "size_vram": 100}, "100% GPU"), ({"size": 100, "size_vram": 0}, "100% CPU"),
    ({"size": 100, "size_vram": 52}, "48%/52% CPU/GPU"), ({"size": 100}, "-"),
])
def test_processor_column(entry, text):
    assert mesh._processor(entry) == text


MEMINFO = "MemTotal:       65794068 kB\nMemFree:         1000000 kB\nMemAvailable:   40000000 kB\n"


@pytest.mark.parametrize("text, expected", [
    ("NVIDIA GeForce RTX 4090, 24564, 1234\n@@meminfo\n" + MEMINFO + "@@loadavg\n0.42 0.30 0.20 1/523 4242\n"
     "@@nproc\n16\n",
     {"gpu": "NVIDIA GeForce RTX 4090", "gpus": 1, "vram_total": 24564 << 20, "vram_used": 1234 << 20,
      "ram_total": 65794068 * 1024, "ram_available": 40000000 * 1024, "load_1m": 0.42, "load_5m": 0.30,
      "load_15m": 0.20, "cpus": 16}),
    ("Tesla T4, 15360, 0\nTesla T4, 15360, 100\n@@meminfo\n@@loadavg\n@@nproc\n",
     {"gpu": "2 x Tesla T4", "gpus": 2, "vram_total": 30720 << 20, "vram_used": 100 << 20}),
    ("A100, 81920, 1\nRTX 3090, 24576, 2\n@@meminfo\n", {"gpu": "A100, RTX 3090", "gpus": 2,
                                                        "vram_total": 106496 << 20, "vram_used": 3 << 20}),
    # no nvidia-smi, no /proc (macOS, BSD): nothing to tell
    ("@@meminfo\n@@loadavg\n@@nproc\n8\n", {"cpus": 8}),
    # nvidia-smi that failed prints its complaint on stdout
    ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n@@meminfo\n", {}),
    ("MemTotal: 1 kB\n", {}),     # before any section marker: GPU lines only
])
def test_parse_node_facts(text, expected):
    assert mesh.parse_node_facts(text) == expected


@pytest.mark.parametrize("size, facts, fits", [
    (40_000_000_000, {"vram_total": 8 << 30, "ram_total": 16 << 30}, False),
    (4_000_000_000, {"vram_total": 8 << 30, "ram_total": 16 << 30}, True),
    (20_000_000_000, {"vram_total": 8 << 30, "ram_total": 16 << 30}, True),    # split GPU/CPU, as Ollama does
    (40_000_000_000, {}, True), (None, {"ram_total": 1}, True), (0, {"ram_total": 1}, True),
])
def test_fits_in_memory(size, facts, fits):
    assert mesh.fits_in_memory(size, facts) is fits


# -- node replies: chunked framing taken off in bulk, the reply's end found in bytes --

def _chunked(lines):
    return b"".join(b"%x\r\n%s\r\n" % (len(x), x) for x in lines) + b"0\r\n\r\n"


@pytest.mark.parametrize("lines", [
    [b'{"a":1}\n', b'{"b":2}\n'],
    [b'{"a":1}\n' * 40],                               # one big chunk
    [b"x\r\ny", b"\r\n", b"z" * 70000],                # CRLF inside data, a chunk larger than a read
    [b'{"t":"caf\xc3\xa9"}\n'],
])
def test_reply_dechunker_any_split(lines):
    raw = _chunked(lines) + b"NEXT"
    for step in (1, 2, 3, 7, 64, len(raw)):
        dec = mesh.ReplyDechunker()
        out = b"".join(dec.feed(raw[i:i + step]) for i in range(0, len(raw), step))
        assert out == b"".join(lines) and dec.done and dec.rest == b"NEXT", step


@pytest.mark.parametrize("raw", [b"zz\r\nabc\r\n", b"3\r\nabcd\r\n0\r\n\r\n", b"-1\r\n",
                                 # what int(x, 16) takes but HTTP does not, alone and after a good chunk
                                 b"0x3\r\nabc\r\n", b"+3\r\nabc\r\n", b" 3\r\nabc\r\n", b"1_0\r\n" + b"a" * 16 + b"\r\n",
                                 b"1\r\na\r\n0x3\r\nabc\r\n"])
def test_reply_dechunker_rejects_bad_framing(raw):
    with pytest.raises(mesh.ProtocolError, match="bad chunked framing"):
        mesh.ReplyDechunker().feed(raw)


LINE = b'{"model":"m","response":"a","done":false}\n'
DONE = b'{"model":"m","response":"","done":true,"done_reason":"stop","eval_count":3,"eval_duration":9}\n'


@pytest.mark.parametrize("pieces, passed, done, error", [
    ([LINE, DONE], LINE + DONE, True, None),
    ([LINE + DONE + LINE], LINE + DONE, True, None),                       # bytes after done: ignored
    ([LINE[:10], LINE[10:] + DONE[:5], DONE[5:]], LINE + DONE, True, None),  # lines split across reads
    ([b'{"response":"done","done":false}\n'], b'{"response":"done","done":false}\n', False, None),
    ([b'{"message":{"tool_calls":[{"arguments":{"done":true}}]},"done":false}\n'],
     b'{"message":{"tool_calls":[{"arguments":{"done":true}}]},"done":false}\n', False, None),
    ([LINE, b"this is not json\n", LINE], LINE, False, "not JSON: 'this is not json'"),
    ([LINE + b"[1]\n"], LINE, False, "not a JSON object: '[1]'"),
    ([LINE + b'{"error":"CUDA error"}\n' + LINE], LINE, False, "Ollama error: CUDA error"),
    ([b'{"response":"the error","done":false}\n'], b'{"response":"the error","done":false}\n', False, None),
    ([LINE.replace(b"\n", b"\r\n") + b"\r\n" + DONE], LINE + DONE, True, None),   # CRLF, blank line
])
def test_reply_scanner_ndjson(pieces, passed, done, error):
    sc = mesh.ReplyScanner()
    out = b"".join(sc.feed(p) for p in pieces) + sc.finish()
    assert (out, sc.done, sc.error) == (passed, done, error)
    if done:
        assert sc.final_obj()["eval_count"] == 3


def test_reply_scanner_last_line_with_done_reason_but_no_done():
    sc = mesh.ReplyScanner()
    last = b'{"response":"","done_reason":"stop"}'
    assert sc.feed(LINE + last) == LINE and sc.finish() == last
    assert not sc.done and sc.error is None and sc.final_obj() == {"response": "", "done_reason": "stop"}


@pytest.mark.parametrize("size, decoded", [(1000, True), (mesh.WHOLE_DECODE_LIMIT + 1, False)])
def test_reply_scanner_decodes_a_last_line_only_up_to_the_limit(size, decoded):
    # A whole answer with no final line (embeddings) is passed on as bytes; it is decoded
    # for its statistics only while small (16 MB took ~0.35 s, holding every other stream)
    line = b'{"model":"m","embeddings":[[' + b"0.5," * ((size - 40) // 4) + b'0.5]],"prompt_eval_count":3}'
    sc = mesh.ReplyScanner()
    assert sc.feed(line) == b"" and sc.finish() == line and sc.error is None
    assert (sc.final_obj() is not None) is decoded
    if decoded:
        assert sc.final_obj()["prompt_eval_count"] == 3


@pytest.mark.parametrize("data", [
    b'{"model":"m","response":"hi","done":true,"eval_count":3}',           # Ollama's stream=false answer
    b'{"model":"m","response":"hi","done":true,"eval_count":3}\n',
    b'{"model":"m","response":"a \\"done\\":true in the text","done":false}',  # not final: fed instead
    b'{"model":"m","embeddings":[[0.1]]}',                                 # no done at all (/api/embed)
    b'{"error":"model not found"}',
    b'{"done":true}\n{"done":true}\n',                                    # two lines
    b'[{"done":true}]',
    b'{"done":true',                                                      # not whole
])
def test_reply_scanner_whole_object_reads_as_feed_then_finish(data):
    """The one-read stream=False path leaves the scanner as feeding the body would."""
    fed = mesh.ReplyScanner(strict=False)
    passed = fed.feed(data) + fed.finish()
    whole = mesh.ReplyScanner(strict=False)
    if not whole.whole_object(data):
        assert not fed.done or data.count(b"\n") > 1 or not data.startswith(b"{")
        return
    assert passed == data
    state = ("done", "final", "last", "lines", "error", "extra", "open")
    assert [getattr(whole, k) for k in state] == [getattr(fed, k) for k in state]
    assert whole.final_obj() == fed.final_obj() == json.loads(data)


@pytest.mark.parametrize("pieces, passed", [
    ([b'data: {"a":1}\n\ndata: {"b"', b':2}\n\ndata: [DONE]\n\ndata: late\n\n'],
     b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: [DONE]\n\n'),                      # OpenAI
    ([b'event: message_start\ndata: {}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\nx'],
     b'event: message_start\ndata: {}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'),  # Anthropic
    ([b'data: {"a":1}\r\n\r\n'], b'data: {"a":1}\r\n\r\n'),
    ([b'data: {"a":1}\r\n\r\ndata: [DONE]\r\n\r\ndata: late\r\n\r\n'],          # CRLF: cut at [DONE] too
     b'data: {"a":1}\r\n\r\ndata: [DONE]\r\n\r\n'),
    ([b'data: {"a"', b':1}\r', b'\n', b'\r\ndata: [DONE]\r\n', b'\r\nlate'],     # blank line across reads
     b'data: {"a":1}\r\n\r\ndata: [DONE]\r\n\r\n'),
])
def test_reply_scanner_sse_event_by_event(pieces, passed):
    sc = mesh.ReplyScanner(sse=True)
    assert b"".join(sc.feed(p) for p in pieces) + sc.finish() == passed


def test_reply_scanner_drops_an_sse_event_the_body_ends_inside():
    """As the SSE spec (and every client) does: an event with no blank line after it when
    the body ends is not passed on, so an error event after a cut is not glued to it."""
    sc = mesh.ReplyScanner(sse=True)
    assert sc.feed(b'data: {"a":1}\n\ndata: {"id":"c","object":"chat') == b'data: {"a":1}\n\n'
    assert sc.finish() == b"" and not sc.open and sc.extra == len(b'data: {"id":"c","object":"chat')
    first = mesh.ReplyScanner(sse=True)
    assert first.feed(b'data: {"id":"c"') + first.finish() == b""    # nothing passed: the reply failed


@pytest.mark.parametrize("sse", [False, True])
def test_reply_scanner_long_line_in_many_reads(sse):
    """A line (an event) that takes many reads comes out whole, as from one read; past
    max_line it is an error."""
    line = (b'data: {"x":"' if sse else b'{"response":"') + b"a" * 50000 + \
        (b'"}\r\n\r\n' if sse else b'","done":false}\n')
    one = mesh.ReplyScanner(sse=sse)
    whole = one.feed(line) + one.finish()
    sc = mesh.ReplyScanner(sse=sse)
    got = b"".join(sc.feed(line[i:i + 1000]) for i in range(0, len(line), 1000)) + sc.finish()
    assert got == whole == line and sc.error is None
    small = mesh.ReplyScanner(sse=sse, max_line=20000)
    assert b"".join(small.feed(line[i:i + 1000]) for i in range(0, len(line), 1000)) == b""
    assert small.error == "a line longer than 20000 bytes"


def test_a_connect_without_a_file_descriptor_is_not_the_nodes_fault():
    import errno
    with pytest.raises(mesh.NodeError) as err:
        mesh._check_descriptors("gpu1", OSError(errno.EMFILE, "Too many open files"))
    assert not err.value.mark_down and err.value.retryable
    assert str(err.value) == ("gpu1: no connection opened: too many open files in mesh.py "
                              "(its open files limit, ulimit -n)")
    mesh._check_descriptors("gpu1", ConnectionRefusedError(errno.ECONNREFUSED, "refused"))   # not this case


@pytest.mark.parametrize("stream, usage", [
    (b'data: {"choices":[{"delta":{"content":"\\"usage\\""}}]}\n\n'            # the word in the text
     b'data: {"choices":[],"usage":{"completion_tokens":4}}\n\ndata: [DONE]\n\n',
     {"choices": [], "usage": {"completion_tokens": 4}}),                          # OpenAI, include_usage
    (b'event: message_start\ndata: {"usage":{"output_tokens":0}}\n\n'
     b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":7}}\n\n'
     b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
     {"type": "message_delta", "usage": {"output_tokens": 7}}),                    # Anthropic
    (b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n', None),   # no usage asked for
])
def test_reply_scanner_keeps_the_sse_token_counts(stream, usage):
    sc = mesh.ReplyScanner(sse=True)
    for i in range(0, len(stream), 7):     # in pieces that cut events anywhere
        sc.feed(stream[i:i + 7])
    sc.finish()
    assert sc.done and sc.usage_obj() == usage and sc.final_obj() is None


@pytest.mark.parametrize("name, words, value", [
    ("temperature", ["0.25"], 0.25), ("num_ctx", ["4096"], 4096), ("use_mmap", ["false"], False),
    ("stop", ["<|end|>", "###"], ["<|end|>", "###"]), ("stop", ["one"], ["one"]),   # always a list
    ("temperature", ["warm"], "invalid float value [warm]"), ("num_ctx", ["4k"], "invalid int value [4k]"),
    ("use_mmap", ["yes"], "invalid bool value [yes]"),
    ("some_new_option", ["3"], 3), ("some_new_option", ["a", "b"], "a b"),   # unknown: passed on
])
def test_chat_parameter_types_as_ollama_formats_them(name, words, value):
    if isinstance(value, str) and value.startswith("invalid"):
        with pytest.raises(ValueError, match=re.escape(value)):
            mesh._chat_parameter(name, words)
    else:
        got = mesh._chat_parameter(name, words)
        assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text, one_line, shown", [
    ("plain\ttext\n", False, "plain\ttext\n"),
    ("\x1b]0;owned\x07title", False, "\\x1b]0;owned\\x07title"),
    ("a\x1b[2Jb\rc", False, "a\\x1b[2Jb\\rc"),
    ("line1\nline2", True, "line1\\nline2"),
    ("lone \ud800 surrogate", False, "lone \ufffd surrogate"),
    ("\x9b31m", False, "\\x9b31m"),                       # C1 CSI
])
def test_terminal_text(text, one_line, shown):
    assert mesh.terminal_text(text, one_line=one_line) == shown


def test_option_flags_take_ollamas_types_too():
    assert mesh._parse_options(["stop=a", "stop=b", "temperature=0.1", "seed=7"]) == {
        "stop": ["a", "b"], "temperature": 0.1, "seed": 7}
    with pytest.raises(mesh.UsageError, match=re.escape("bad --option 'temperature=warm': invalid float value")):
        mesh._parse_options(["temperature=warm"])


def test_a_line_cut_off_inside_an_object_is_not_decoded_to_say_so(monkeypatch):
    # a reply cut off mid-answer (megabytes of embeddings) ends as "not JSON" without a decode
    # of what came: decoding 32 MB only to fail held serve ~0.5 s, every other stream with it
    decoded = []
    real = mesh.ReplyScanner._decode
    monkeypatch.setattr(mesh.ReplyScanner, "_decode", staticmethod(lambda line: decoded.append(line) or real(line)))
    sc = mesh.ReplyScanner()
    cut = b'{"object":"list","data":[{"embedding":[' + b"0.5," * 1000
    assert sc.feed(cut) == b"" and sc.finish() == b""
    assert sc.error == "not JSON: " + mesh._excerpt(cut) and decoded == []
    sc = mesh.ReplyScanner()
    assert sc.feed(b"[1]\n") == b"" and sc.error == "not a JSON object: '[1]'"    # still told apart


@pytest.mark.parametrize("content_type, whole", [
    ("application/json; charset=utf-8", True), ("application/x-ndjson", False), ("text/event-stream", False)])
def test_a_relayed_whole_answer_may_be_as_long_as_a_whole_reply(content_type, whole):
    # OpenAI's /v1/embeddings with stream false is relayed as it comes, but it is one object,
    # not a stream's line: it may pass 64 MiB (thousands of inputs) as /api/embed's may
    import asyncio
    from types import SimpleNamespace

    async def make():
        ex = SimpleNamespace(status=200, headers={"content-type": content_type})
        raw = mesh.RawStream(None, SimpleNamespace(name="n"), ex, "/v1/embeddings", True)
        raw._closed = True      # (never opened on a node: nothing to close when let go)
        return raw
    raw = asyncio.run(make())
    line = b'{"data":"' + b"x" * (65 * 1024 * 1024) + b'"}'
    # one JSON object: passed on whole at the body's end; a stream's line (event): too long
    assert raw._scan.feed(line) == b"" and raw._scan.finish() == (line if whole else b"")
    assert (raw._scan.error is None) is whole
