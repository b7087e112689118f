"""Operating `serve` (issue 15): the access log, GET /metrics in Prometheus' text format
(read back by a strict parser written from the format's specification), /mesh/health,
the SSH config re-read while serving under load, and the /mesh/ dashboard in a real
headless Chromium."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import mesh
from conftest import needs_sshd
from lab import _descendants, wait_for
from test_serve import Serve

M = "qwen2.5:7b"


# ---------------------------------------------------------------------------
# A strict reader of the text exposition format 0.0.4
# (prometheus.io/docs/instrumenting/exposition_formats): anything the format does
# not allow is an error, as are a sample without a TYPE and a family split in two.
# ---------------------------------------------------------------------------

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


def _float(text):
    if text in ("NaN", "+Inf", "-Inf", "Inf"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    if not _FLOAT.fullmatch(text):
        raise ValueError(f"bad value {text!r}")
    return float(text)


def _sample(line):
    m = _NAME.match(line)
    if not m:
        raise ValueError(f"bad metric name in {line!r}")
    name, i, labels = m.group(0), m.end(), {}
    if line[i:i + 1] == "{":
        i += 1
        while line[i:i + 1] != "}":
            m = _LABEL.match(line, i)
            if not m or line[m.end():m.end() + 2] != '="':
                raise ValueError(f"bad label in {line!r}")
            label, i, value = m.group(0), m.end() + 2, []
            while True:
                if i >= len(line):
                    raise ValueError(f"unterminated label value in {line!r}")
                c = line[i]
                if c == "\\":
                    escaped = {"\\": "\\", '"': '"', "n": "\n"}.get(line[i + 1:i + 2])
                    if escaped is None:
                        raise ValueError(f"bad escape in {line!r}")
                    value.append(escaped)
                    i += 2
                elif c == '"':
                    i += 1
                    break
                else:
                    value.append(c)
                    i += 1
            if label in labels:
                raise ValueError(f"label {label} twice in {line!r}")
            labels[label] = "".join(value)
            if line[i:i + 1] == ",":
                i += 1
            elif line[i:i + 1] != "}":
                raise ValueError(f"expected , or }} in {line!r}")
        i += 1
    if line[i:i + 1] != " ":
        raise ValueError(f"expected one space before the value in {line!r}")
    rest = line[i + 1:].split(" ")
    if len(rest) > 2 or (len(rest) == 2 and not re.fullmatch(r"-?\d+", rest[1])):
        raise ValueError(f"bad value/timestamp in {line!r}")
    return name, labels, _float(rest[0])


def parse_exposition(text):
    """{family: {"type", "help", "samples": [(name, labels, value)]}}; ValueError on any fault."""
    if not text.endswith("\n"):
        raise ValueError("the last line must end with a newline")
    families, current, done, series = {}, None, set(), set()
    for line in text[:-1].split("\n"):
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if not _NAME.fullmatch(name):
                    raise ValueError(f"bad name in {line!r}")
                if name != current:
                    if name in done:
                        raise ValueError(f"{name}: its lines are not one group")
                    if current:
                        done.add(current)
                    current = name
                fam = families.setdefault(name, {"type": None, "help": None, "samples": []})
                what = parts[1].lower()
                if fam[what] is not None:
                    raise ValueError(f"second {parts[1]} for {name}")
                arg = parts[3] if len(parts) > 3 else ""
                if what == "type":
                    if arg not in _TYPES or fam["samples"]:
                        raise ValueError(f"bad or late TYPE line {line!r}")
                else:
                    if re.search(r"\\[^\\n]", arg.replace("\\\\", "")):
                        raise ValueError(f"bad escape in HELP {line!r}")
                fam[what] = arg
            continue
        name, labels, value = _sample(line)
        base = name
        if name not in families:
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if families.get(base, {}).get("type") not in ("histogram", "summary"):
                raise ValueError(f"sample {name} has no TYPE")
        if base != current:
            raise ValueError(f"sample {name} outside its family's group")
        key = (name, tuple(sorted(labels.items())))
        if key in series:
            raise ValueError(f"series {key} twice")
        series.add(key)
        families[base]["samples"].append((name, labels, value))
    for name, fam in families.items():
        if fam["type"] is None:
            raise ValueError(f"{name} has no TYPE")
        if fam["type"] == "counter":
            for _, _, v in fam["samples"]:
                if not v >= 0:
                    raise ValueError(f"counter {name} is {v}")
        if fam["type"] == "histogram":
            _check_histogram(name, fam["samples"])
    return families


def _check_histogram(name, samples):
    groups = {}
    for sname, labels, value in samples:
        rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        g = groups.setdefault(rest, {"buckets": [], "sum": None, "count": None})
        if sname == name + "_bucket":
            if "le" not in labels:
                raise ValueError(f"{name}_bucket without le")
            g["buckets"].append((_float(labels["le"]), value))
        elif sname in (name + "_sum", name + "_count"):
            if "le" in labels:
                raise ValueError(f"{sname} with le")
            g[sname.rsplit("_", 1)[1]] = value
        else:
            raise ValueError(f"{sname} in histogram {name}")
    for rest, g in groups.items():
        bounds = [b for b, _ in g["buckets"]]
        counts = [c for _, c in g["buckets"]]
        if not bounds or bounds[-1] != math.inf:
            raise ValueError(f"{name}{rest}: no +Inf bucket")
        if bounds != sorted(bounds) or counts != sorted(counts):
            raise ValueError(f"{name}{rest}: buckets not ascending and cumulative")
        if g["count"] is None or g["sum"] is None or counts[-1] != g["count"]:
            raise ValueError(f"{name}{rest}: +Inf bucket must equal _count, and _sum must be there")


def value(families, name, **labels):
    """The one sample of `name` whose labels include `labels` (None if there is none)."""
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    fam = families.get(name) or families.get(base) or {"samples": []}
    found = [v for n, ls, v in fam["samples"] if n == name and all(ls.get(k) == x for k, x in labels.items())]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


# ---------------------------------------------------------------------------
# Pure: rendering, the parser's strictness, access-log lines, the page
# ---------------------------------------------------------------------------

def test_registry_renders_what_a_strict_parser_reads_back():
    reg = mesh.MetricsRegistry()
    c = reg.add("x_requests_total", "counter", "Requests.\nSecond line \\ here.", ("path", "model"))
    c.inc(("/api/generate", 'odd "model"\\name\n'), 2)
    c.inc(("/api/chat", ""))
    g = reg.add("x_queue_length", "gauge", "Waiting.")
    g.set((), 3)
    h = reg.add("x_duration_seconds", "histogram", "Durations.", ("node",), buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 0.5, 7.0):
        h.observe(("a",), v)
    fams = parse_exposition(reg.render())
    assert fams["x_requests_total"]["type"] == "counter"
    assert value(fams, "x_requests_total", model='odd "model"\\name\n') == 2
    assert value(fams, "x_requests_total", path="/api/chat") == 1
    assert value(fams, "x_queue_length") == 3
    assert [value(fams, "x_duration_seconds_bucket", le=le) for le in ("0.1", "1", "+Inf")] == [1, 3, 4]
    assert value(fams, "x_duration_seconds_sum") == 8.05 and value(fams, "x_duration_seconds_count") == 4
    assert fams["x_requests_total"]["help"] == "Requests.\\nSecond line \\\\ here."
    with pytest.raises(ValueError):
        c.inc(("only-one-label",))
    with pytest.raises(ValueError):
        c.inc(("a", "b"), -1)


@pytest.mark.parametrize("text", [
    "# TYPE a counter\na 1",                                        # no final newline
    "a 1\n",                                                        # no TYPE
    "# TYPE a counter\n# TYPE a counter\na 1\n",                    # TYPE twice
    "# TYPE a counter\na 1\n# TYPE b gauge\nb 1\na{x=\"1\"} 2\n",   # family split in two
    "# TYPE a counter\na{x=\"\\t\"} 1\n",                           # escape the format lacks
    "# TYPE a counter\na{x=\"1\"}  1\n",                            # two spaces
    "# TYPE a counter\na{x=1} 1\n",                                 # unquoted value
    "# TYPE a counter\na 1\na 2\n",                                 # same series twice
    "# TYPE a counter\na -1\n",                                     # negative counter
    "# TYPE a counter\na one\n",                                    # not a number
    "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",  # not cumulative
    "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",                          # no +Inf
    "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n",                      # +Inf != count
])
def test_strict_parser_rejects(text):
    with pytest.raises(ValueError):
        parse_exposition(text)


def _record(**kw):
    rec = mesh.AccessRecord("127.0.0.1", kw.pop("method", "POST"), kw.pop("path", "/api/generate"),
                            started=1767225600.25)
    for k, v in kw.items():
        setattr(rec, k, v)
    return rec


@pytest.mark.parametrize("fields, plain", [
    (dict(model="llama3", node="a", status=200, ttfb=0.0125, tokens=42, duration=0.8302),
     "2026-01-01T00:00:00.250Z 127.0.0.1 POST /api/generate 200 model=llama3 node=a ttfb_ms=12.5 tokens=42 "
     "duration_ms=830.2"),
    (dict(status=404, duration=0.001, error='model "x y" not found'),
     '2026-01-01T00:00:00.250Z 127.0.0.1 POST /api/generate 404 model=- node=- ttfb_ms=- tokens=- '
     'duration_ms=1.0 error="model \\"x y\\" not found"'),
    (dict(method="GET", path="/a b", model="m=1 x", duration=0.0),
     '2026-01-01T00:00:00.250Z 127.0.0.1 GET "/a b" - model="m=1 x" node=- ttfb_ms=- tokens=- duration_ms=0.0'),
])
def test_access_line_formats(fields, plain):
    rec = _record(**fields)
    assert mesh.format_access_line(rec, "plain") == plain
    obj = json.loads(mesh.format_access_line(rec, "json"))
    assert obj["time"] == "2026-01-01T00:00:00.250Z" and obj["status"] == fields.get("status")
    assert set(obj) == {"time", "client", "method", "path", "model", "node", "status", "ttfb_ms", "ttft_ms",
                        "tokens", "tokens_per_s", "duration_ms", "error"}


def test_dashboard_page_is_self_contained():
    page = mesh.DASHBOARD_HTML
    assert page.startswith("<!doctype html>") and '<meta name="viewport"' in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)      # no external asset
    assert not re.search(r"<link|@import|url\(", page, re.I)
    assert "innerHTML" not in page     # node names and reasons go in as text, never as markup


# ---------------------------------------------------------------------------
# Against a running serve
# ---------------------------------------------------------------------------

def _metrics(s):
    status, headers, body = s.call("GET", "/metrics")
    assert status == 200 and headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse_exposition(body.decode("utf-8"))


def _status_names(s):
    return [n["name"] for n in json.loads(s.call("GET", "/mesh/status")[2])["nodes"]]


@needs_sshd
@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_access_log_has_one_line_per_request_and_no_prompt(lab, fmt):
    lab.add_node("a", [M, "llama3"], token_delay=0.01)
    log = os.path.join(lab.dir, "access.log")
    s = Serve(lab, "--access-log", fmt, "--access-log-file", log)
    secret = "PROMPT-TEXT-7f3a"
    try:
        calls = [("POST", "/api/generate", {"model": M, "prompt": secret}),
                 ("POST", "/api/generate", {"model": M, "prompt": secret, "stream": False}),
                 ("POST", "/api/chat", {"model": "llama3", "messages": [{"role": "user", "content": secret}]}),
                 ("POST", "/api/generate", {"model": "nosuch", "prompt": secret}),
                 ("GET", "/api/tags", None), ("GET", "/nowhere", None)]
        for method, path, body in calls:
            s.call(method, path, body)
        wait_for(lambda: os.path.exists(log) and open(log).read().count("\n") >= len(calls), 10, "log lines")
        os.rename(log, log + ".1")                  # logrotate moves the file: serve writes a new one
        s.call("GET", "/api/version")
        wait_for(lambda: os.path.exists(log) and "/api/version" in open(log).read(), 10, "a line in the new file")
    finally:
        s.stop()
    text = open(log + ".1").read()
    assert secret not in text
    lines = text.splitlines()
    assert len(lines) == len(calls)
    if fmt == "json":
        rows = [json.loads(line) for line in lines]
        assert [(r["method"], r["path"], r["status"]) for r in rows] == [
            ("POST", "/api/generate", 200), ("POST", "/api/generate", 200), ("POST", "/api/chat", 200),
            ("POST", "/api/generate", 404), ("GET", "/api/tags", 200), ("GET", "/nowhere", 404)]
        assert rows[0]["node"] == "a" and rows[0]["model"] == M and rows[0]["tokens"] == 4
        assert rows[0]["ttfb_ms"] is not None and rows[0]["duration_ms"] >= rows[0]["ttfb_ms"]
        assert rows[0]["client"] == "127.0.0.1" and rows[2]["model"] == "llama3"
        assert rows[3]["node"] is None and "not found" in rows[3]["error"]
    else:
        assert re.fullmatch(r"\S+Z 127\.0\.0\.1 POST /api/generate 200 model=qwen2\.5:7b node=a "
                            r"ttfb_ms=[\d.]+ tokens=4 duration_ms=[\d.]+", lines[0]), lines[0]
        assert " GET /nowhere 404 " in lines[5]


@needs_sshd
def test_openai_and_anthropic_replies_count_their_tokens(lab):
    lab.add_node("a", [M])       # the stand-in answers with 4 tokens and reports them in "usage"
    log = os.path.join(lab.dir, "access.log")
    s = Serve(lab, "--access-log", "json", "--access-log-file", log)
    msgs = [{"role": "user", "content": "x"}]
    calls = [("/v1/chat/completions", {"model": M, "messages": msgs, "stream": True,
                                       "stream_options": {"include_usage": True}}),
             ("/v1/chat/completions", {"model": M, "messages": msgs}),
             ("/v1/messages", {"model": M, "max_tokens": 50, "messages": msgs, "stream": True}),
             ("/v1/responses", {"model": M, "input": "x", "stream": True})]
    try:
        for path, body in calls:
            assert s.call("POST", path, body)[0] == 200
        wait_for(lambda: os.path.exists(log) and open(log).read().count("\n") >= len(calls), 10, "log lines")
        fams = _metrics(s)
    finally:
        s.stop()
    rows = [json.loads(line) for line in open(log).read().splitlines()]
    assert [(r["path"], r["tokens"]) for r in rows[:len(calls)]] == [(path, 4) for path, _ in calls]
    assert value(fams, "mesh_tokens_generated_total", model=M, node="a") == 16


@needs_sshd
def test_metrics_count_requests_and_show_in_flight_and_queue(lab):
    lab.add_node("a", [M], token_delay=0.3, settings="max_concurrent=1")
    lab.add_node("b", [M], token_delay=0.01)
    s = Serve(lab, "--access-log", "off")
    try:
        for stream in (True, True, False):
            assert s.call("POST", "/api/generate", {"model": M, "prompt": "x", "stream": stream},
                          headers={"X-Mesh-Node": "b"})[0] == 200
        assert s.call("POST", "/api/generate", {"model": "nosuch", "prompt": "x"})[0] == 404
        # two requests for a, which takes one at a time: one runs, one waits in mesh.py
        held = [threading.Thread(target=s.call, args=("POST", "/api/generate", {"model": M, "prompt": "x"}),
                                 kwargs={"headers": {"X-Mesh-Node": "a"}}) for _ in range(2)]
        for t in held:
            t.start()

        def busy():
            fams = _metrics(s)
            return (value(fams, "mesh_requests_in_flight", node="a") == 1
                    and value(fams, "mesh_queue_length") == 1 and value(fams, "mesh_node_queue_length", node="a") == 1)
        wait_for(busy, 20, "one request running on a and one queued")
        for t in held:
            t.join(30)
        # a client that leaves in the middle of its answer is a disconnect, not the stream's fault
        import socket
        body = json.dumps({"model": M, "prompt": "x"}).encode()
        with socket.create_connection(("127.0.0.1", s.port), 10) as sock:
            sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Mesh-Node: a\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            assert b"200 OK" in sock.recv(65536)                 # the answer has begun
        wait_for(lambda: value(_metrics(s), "mesh_request_errors_total", node="a", type="disconnect") == 1, 20,
                 "the disconnect counted")
        fams = _metrics(s)
        promtool = shutil.which("promtool")    # Prometheus' own checker, where it is installed
        if promtool:
            check = subprocess.run([promtool, "check", "metrics"], input=s.call("GET", "/metrics")[2],
                                   capture_output=True, timeout=30)
            assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr
    finally:
        s.stop()
    gen = dict(path="/api/generate", model=M)
    assert value(fams, "mesh_requests_total", node="b", code="200", **gen) == 3
    assert value(fams, "mesh_requests_total", node="a", code="200", **gen) == 3    # the one that left too
    assert value(fams, "mesh_requests_total", path="/api/generate", model="", node="", code="404") == 1
    assert value(fams, "mesh_request_errors_total", path="/api/generate", type="client") == 1
    assert value(fams, "mesh_request_errors_total", path="/api/generate", type="stream") is None
    assert value(fams, "mesh_time_to_first_token_seconds_count", model=M, node="b") == 2   # streamed ones
    assert value(fams, "mesh_request_duration_seconds_count", model=M, node="b") == 3
    assert value(fams, "mesh_tokens_generated_total", model=M, node="b") == 12
    assert value(fams, "mesh_node_up", node="a") == 1 and value(fams, "mesh_node_up", node="b") == 1
    assert value(fams, "mesh_requests_in_flight", node="a") == 0 and value(fams, "mesh_queue_length") == 0
    for name, fam in fams.items():      # Prometheus' naming conventions
        assert name.startswith("mesh_")
        assert (fam["type"] == "counter") == name.endswith("_total"), name
        assert "duration" not in name and "time_to" not in name or name.endswith("_seconds"), name


@needs_sshd
def test_health_follows_the_nodes(lab):
    lab.add_node("a", [M])
    lab.add_node("b", [M])
    s = Serve(lab, "--access-log", "off")
    try:
        status, _, body = s.call("GET", "/mesh/health")
        assert status == 200 and json.loads(body)["healthy"] == ["a", "b"]
        lab.fakes["a"].stop()
        lab.fakes["b"].stop()
        wait_for(lambda: s.call("GET", "/mesh/health")[0] == 503, 20, "health to say 503 with every node down")
        body = json.loads(s.call("GET", "/mesh/health")[2])
        assert body["status"] == "unavailable" and set(body["down"]) == {"a", "b"}
        assert s.call("GET", "/")[2] == b"Ollama is running"            # Ollama's answer stays
        fams = _metrics(s)
        assert value(fams, "mesh_node_up", node="a") == 0
        assert "mesh: a: marked down: " in s.stderr()     # the operator's log says so without -v
        lab.fakes["b"].start_again()
        wait_for(lambda: s.call("GET", "/mesh/health")[0] == 200, 40, "health back to 200")
        wait_for(lambda: "mesh: b: back up" in s.stderr(), 10, "the log line for b")
    finally:
        s.stop()


class Load:
    """Clients asking the pool without a pause; every answer is kept with when it was asked."""

    def __init__(self, serve, clients=4):
        self.serve, self.results, self.stop = serve, [], threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def _client(self):
        while not self.stop.is_set():
            started = time.monotonic()
            # a prompt of its own each time: many users, no conversation for routing to keep together
            prompt = f"question {len(self.results)} from {threading.get_ident()}"
            status, headers, body = self.serve.call("POST", "/api/generate", {"model": M, "prompt": prompt})
            lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
            complete = status == 200 and lines and lines[-1].get("done") is True and not any("error" in x for x in lines)
            self.results.append((started, headers.get("X-Mesh-Node"), complete))

    def nodes_since(self, t):
        return {node for started, node, _ in list(self.results) if started > t}

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(30)
        return self.results


@needs_sshd
def test_config_reload_under_load_adds_and_removes_nodes(lab):
    # M is loaded on a and b; c has it on disk only: mesh loads it there when c joins
    # (else routing would rightly keep to a and b, which have free slots and no load to wait for)
    for name in ("a", "b"):
        lab.add_node(name, [M], loaded=[M], token_delay=0.02)
    lab.add_node("c", [M], token_delay=0.02)
    lab.write_config(leave_out={"c"})            # c is a machine the config doesn't name yet
    s = Serve(lab, "--access-log", "off")
    load = Load(s)
    try:
        wait_for(lambda: len(load.results) >= 8, 30, "traffic")
        added = time.monotonic()
        lab.write_config()
        wait_for(lambda: "c" in load.nodes_since(added), 10, "the new node c to serve within 10 s")

        lab.write_config(leave_out={"b"})
        wait_for(lambda: "b" not in _status_names(s), 10, "b to leave the pool")
        removed = time.monotonic()
        wait_for(lambda: len([r for r in load.results if r[0] > removed]) >= 12, 30, "more traffic")
        assert "b" not in load.nodes_since(removed)
        # b's master ends once its streams are done: no session is left on b's sshd
        wait_for(lambda: not _descendants(lab.nodes["b"].proc.pid), 15, "b's master to end")
    finally:
        results = load.finish()
        s.stop()
    assert results and all(complete for _, _, complete in results), "a request was lost"
    assert {"a", "b", "c"} <= {node for _, node, _ in results}


@needs_sshd
def test_changed_destination_gets_a_new_master_never_the_old_machine(lab):
    lab.add_node("a", [M])
    lab.add_node("x", [M])                        # another machine, sshd and Ollama of its own
    lab.write_config(leave_out={"x"})
    s = Serve(lab, "--access-log", "off")
    try:
        assert s.call("POST", "/api/generate", {"model": M, "prompt": "x"})[0] == 200
        assert len(lab.fakes["a"].bodies("/api/generate")) == 1
        assert _descendants(lab.nodes["a"].proc.pid)          # a's master is connected to a
        with open(lab.config_path + ".new", "w") as fh:      # alias a now points at machine x
            fh.write(lab.host_block("x").replace("Host x\n", "Host a\n"))
        os.replace(lab.config_path + ".new", lab.config_path)

        def lands_on_x():
            s.call("POST", "/api/generate", {"model": M, "prompt": "x", "stream": False})
            return lab.fakes["x"].bodies("/api/generate")
        wait_for(lands_on_x, 10, "requests for a to reach machine x")
        before_a, before_x = len(lab.fakes["a"].bodies("/api/generate")), len(lab.fakes["x"].bodies("/api/generate"))
        for _ in range(3):
            status, headers, _ = s.call("POST", "/api/generate", {"model": M, "prompt": "x", "stream": False})
            assert status == 200 and headers["X-Mesh-Node"] == "a"
        assert len(lab.fakes["a"].bodies("/api/generate")) == before_a
        assert len(lab.fakes["x"].bodies("/api/generate")) == before_x + 3
        wait_for(lambda: not _descendants(lab.nodes["a"].proc.pid), 15, "the old master to end")
        assert _descendants(lab.nodes["x"].proc.pid)
    finally:
        s.stop()


@needs_sshd
def test_a_reload_that_raises_max_concurrent_lets_more_run_at_once(lab):
    """The new max_concurrent reaches the router's plan, not only the count it checks."""
    fakes = [lab.add_node(name, [M], loaded=[M], settings="max_concurrent=1") for name in ("a", "b")]
    s = Serve(lab, "--access-log", "off")
    held = []
    try:
        assert s.call("POST", "/api/generate", {"model": M, "prompt": "x"})[0] == 200
        for name in ("a", "b"):
            lab.settings[name] = "max_concurrent=3"
        lab.write_config()
        wait_for(lambda: value(_metrics(s), "mesh_node_max_concurrent", node="b") == 3, 20, "the reload")
        for fake in fakes:
            fake.finish_stream.clear()              # every stream stays open until released
        held = [threading.Thread(target=s.call, args=("POST", "/api/generate", {"model": M, "prompt": f"p{i}"}))
                for i in range(4)]
        for t in held:
            t.start()
        # (at max_concurrent=1 two would run and two would wait in mesh)
        wait_for(lambda: sum(f.active for f in fakes) >= 3, 20, "more than one stream at once on a node")
    finally:
        for fake in fakes:
            fake.finish_stream.set()
        for t in held:
            t.join(30)
        s.stop()


@needs_sshd
def test_sighup_rereads_the_config(lab):
    lab.add_node("a", [M])
    lab.add_node("b", [M])
    lab.write_config(leave_out={"b"})
    s = Serve(lab, "--access-log", "off", env=lab.env(MESH_CONFIG_POLL_INTERVAL="3600"))  # no polling
    try:
        assert _status_names(s) == ["a"]
        lab.write_config()
        s.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: _status_names(s) == ["a", "b"], 10, "b after SIGHUP")
        assert s.proc.poll() is None
        s.proc.send_signal(signal.SIGHUP)          # nothing changed: it still says it looked
        wait_for(lambda: "SSH config re-read: no change (2 node(s))" in s.stderr(), 10, "the SIGHUP answered")
    finally:
        s.stop()


@needs_sshd
def test_a_broken_config_edit_keeps_the_nodes(lab):
    lab.add_node("a", [M])
    s = Serve(lab, "--access-log", "off")
    try:
        assert s.call("POST", "/api/generate", {"model": M, "prompt": "x"})[0] == 200   # a's master is up
        # ssh itself refuses this file from now on; mesh keeps its nodes and masters
        lab.extra_config = "Host broken\n    Port nonsense\n"
        lab.write_config()
        wait_for(lambda: value(_metrics(s), "mesh_config_reloads_total", result="error") == 1, 10, "the reload")
        assert _status_names(s) == ["a"]
        assert s.call("POST", "/api/generate", {"model": M, "prompt": "x"})[0] == 200
        assert "Bad port 'nonsense'" in s.stderr()
    finally:
        s.stop()


# ---------------------------------------------------------------------------
# The dashboard in a real browser: Chromium over the DevTools protocol on a pipe
# (--remote-debugging-pipe: NUL-terminated JSON on fds 3 and 4; no websocket needed)
# ---------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    def __init__(self, env=None):
        import fcntl
        self.profile = tempfile.mkdtemp(prefix="mesh-chromium-")
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        # Chromium reads fd 3 and writes fd 4: a tiny launcher puts the pipe ends there.
        hi_r, hi_w = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_w, fcntl.F_DUPFD, 10)
        for fd in (to_r, from_w):
            os.close(fd)
        launcher = ("import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); os.dup2(r, 3); os.dup2(w, 4); "
                    "os.close(r); os.close(w); os.execv(sys.argv[3], sys.argv[3:])")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", launcher, str(hi_r), str(hi_w), CHROMIUM, "--headless", "--no-sandbox",
             "--disable-gpu", "--remote-debugging-pipe", f"--user-data-dir={self.profile}", "--no-first-run",
             "--no-default-browser-check", "about:blank"],
            pass_fds=(hi_r, hi_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env=env)
        os.close(hi_r)
        os.close(hi_w)
        self.out = os.fdopen(to_w, "wb", buffering=0)
        self.inp = os.fdopen(from_r, "rb", buffering=0)
        self.next_id, self.replies, self.cond = 0, {}, threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buf = b""
        while True:
            data = self.inp.read(65536)
            if not data:
                return
            buf += data
            while b"\0" in buf:
                msg, buf = buf.split(b"\0", 1)
                obj = json.loads(msg)
                if "id" in obj:
                    with self.cond:
                        self.replies[obj["id"]] = obj
                        self.cond.notify_all()

    def call(self, method, params=None, session=None, timeout=60):
        self.next_id += 1
        mid = self.next_id
        msg = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.out.write(json.dumps(msg).encode() + b"\0")
        with self.cond:
            if not self.cond.wait_for(lambda: mid in self.replies, timeout):
                raise AssertionError(f"chromium did not answer {method} within {timeout} s")
        reply = self.replies.pop(mid)
        if "error" in reply:
            raise AssertionError(f"{method}: {reply['error']}")
        return reply["result"]

    def open(self, url):
        target = self.call("Target.createTarget", {"url": url})["targetId"]
        return self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def eval(self, session, expression):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
        return result["result"].get("value")

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
            self.proc.wait(10)
        except (AssertionError, OSError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)   # its own session: only what this test started
            self.proc.wait()
        self.out.close()
        shutil.rmtree(self.profile, ignore_errors=True)


NODES_JS = "Array.from(document.querySelectorAll('[data-node]')).map(e => e.dataset.node + ':' + e.dataset.healthy)"


@needs_sshd
@pytest.mark.skipif(not CHROMIUM, reason="Chromium is not installed (apt-get install chromium): "
                                         "the dashboard is tested in a real headless browser")
def test_dashboard_in_headless_chromium(lab):
    lab.add_node("a", [M, "llama3"], loaded=["llama3"])
    lab.add_node("b", [M])
    lab.add_node("c", [M])
    s = Serve(lab, "--token", "s3cret", "--access-log", "off")
    browser = Browser(env=dict(os.environ, TZ="Asia/Tokyo"))   # a viewer far from UTC
    try:
        auth = {"Authorization": "Bearer s3cret"}
        assert s.call("POST", "/api/generate", {"model": M, "prompt": "x"}, headers=auth)[0] == 200
        assert s.call("GET", "/mesh/status")[0] == 401          # the data needs the token
        assert s.call("GET", "/mesh/")[0] == 200                # the page itself holds none

        page = browser.open(s.base + "/mesh/#token=s3cret")
        wait_for(lambda: browser.eval(page, NODES_JS) == ["a:true", "b:true", "c:true"], 30, "every node, up")
        text = browser.eval(page, "document.body.innerText")
        assert "llama3" in text and "loaded" in text and "3 of 3 nodes up" in text
        # node facts, read over ssh from this machine's /proc (no nvidia-smi here: no GPU row)
        wait_for(lambda: "GB free" in browser.eval(page, "document.querySelector('[data-node=a]').innerText"),
                 20, "node a's RAM on its card")
        assert browser.eval(page, "document.querySelectorAll('#recent tbody tr td').length") >= 8
        # the request's time in the viewer's time zone, like the "updated" clock (it was UTC)
        stamp = json.loads(s.call("GET", "/mesh/status", headers=auth)[2])["recent"][0]["time"]
        assert browser.eval(page, "document.querySelector('#recent tbody td').textContent === "
                                  f"new Date({json.dumps(stamp)}).toLocaleTimeString()")
        assert browser.eval(page, "location.hash") == ""             # the token left the address bar

        lab.nodes["c"].kill()
        wait_for(lambda: browser.eval(page, NODES_JS) == ["a:true", "b:true", "c:false"], 10,
                 "the dashboard to show c down within 10 s")
        assert browser.eval(page, "document.querySelector('[data-node=c] .reason').textContent")

        # a phone's width: the page itself does not scroll sideways (wide tables scroll in their box)
        browser.call("Emulation.setDeviceMetricsOverride",
                     {"width": 375, "height": 740, "deviceScaleFactor": 2, "mobile": True}, page)
        updates = browser.eval(page, "+document.body.dataset.updates")
        wait_for(lambda: browser.eval(page, "+document.body.dataset.updates") > updates, 10, "a redraw")
        assert browser.eval(page, "document.documentElement.scrollWidth <= window.innerWidth + 1")

        # without the token the page asks for it, and takes it
        bare = browser.open(s.base + "/mesh/")
        wait_for(lambda: browser.eval(bare, "getComputedStyle(document.getElementById('auth')).display") == "block",
                 30, "the token form")
        browser.eval(bare, "document.getElementById('token').value = 's3cret';"
                           "document.getElementById('auth').requestSubmit(); 1")
        wait_for(lambda: len(browser.eval(bare, NODES_JS)) == 3, 30, "the nodes after typing the token")
    finally:
        browser.close()
        s.stop()


@needs_sshd
def test_a_host_in_a_new_directory_an_include_glob_matches_becomes_a_node(lab):
    # `Include DIR/*/config`: serve keeps the list of files it stats between polls, so the
    # directories the glob reads must be on it for a new DIR/b/config to show.
    lab.add_node("a", [M])
    lab.add_node("b", [M])
    hosts = os.path.join(lab.dir, "hosts")
    os.mkdir(hosts)
    lab.extra_config = f"Host *\n    Include {hosts}/*/config\n"
    lab.write_config(leave_out={"b"})
    s = Serve(lab, "--access-log", "off")
    try:
        assert _status_names(s) == ["a"]
        os.mkdir(os.path.join(hosts, "b"))
        with open(os.path.join(hosts, "b", "config"), "w") as fh:
            fh.write(lab.host_block("b"))
        wait_for(lambda: _status_names(s) == ["a", "b"], 10, "b from the new directory")
    finally:
        s.stop()


def test_a_host_in_a_new_included_file_becomes_a_node(lab):
    lab.add_node("a", [M])
    lab.add_node("b", [M])
    conf_d = os.path.join(lab.dir, "conf.d")
    os.mkdir(conf_d)
    lab.extra_config = f"Host *\n    Include {conf_d}/*.conf\n"      # after the Host blocks: under Host *
    lab.write_config(leave_out={"b"})
    s = Serve(lab, "--access-log", "off")
    try:
        assert _status_names(s) == ["a"]
        with open(os.path.join(conf_d, "b.conf"), "w") as fh:     # a new file the Include glob matches
            fh.write(lab.host_block("b"))
        wait_for(lambda: _status_names(s) == ["a", "b"], 10, "b from the included file")
        status, headers, _ = s.call("POST", "/api/generate", {"model": M, "prompt": "x"}, headers={"X-Mesh-Node": "b"})
        assert status == 200 and headers["X-Mesh-Node"] == "b"
        os.unlink(os.path.join(conf_d, "b.conf"))
        wait_for(lambda: _status_names(s) == ["a"], 10, "b gone with its file")
    finally:
        s.stop()
