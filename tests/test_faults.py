"""Fault injection against real sshd nodes (issue 5): every request for a model a
healthy node has succeeds; failures name the node; nothing waits past its timeout;
no ssh process is left behind."""
import asyncio
import json
import os
import shutil
import signal
import time

import pytest

import mesh
from conftest import needs_sshd
from lab import _pids_matching, masters_starting, silent_port, wait_for

pytestmark = needs_sshd

FAST = dict(connect_timeout=3, first_byte_timeout=30, idle_timeout=5, liveness_interval=0.5)


def run(coro):
    return asyncio.run(coro)


def two_nodes(lab, **kw):
    a = lab.add_node("a", ["m:1"], **kw)
    b = lab.add_node("b", ["m:1"], **kw)
    return a, b


async def ask_many(m, n, **kw):
    return await asyncio.gather(*(m.generate(f"q{i}", model="m:1", **kw) for i in range(n)))


def pinned_first(m, name):
    """Make `name` the node the router tries first (lower score for it; far faster for
    the default routing, which goes by expected completion time)."""
    for node in m.nodes:
        node.avg_latency = 0.0 if node.name == name else 5.0
        node.route.model("m:1").gen_tps = 1000.0 if node.name == name else 1.0
        node.route.loaded["m:1"] = 0.0   # the stand-in's /api/ps lists nothing: no load to expect


@pytest.mark.parametrize("fault", ["stop_ollama", "kill_sshd", "error500", "busy", "garbage", "html", "badhead"])
def test_failover_before_first_byte(mesh_env, fault):
    lab = mesh_env
    a, b = two_nodes(lab)

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **FAST) as m:
            await m.refresh()
            if fault == "stop_ollama":
                a.stop()
            elif fault == "kill_sshd":
                lab.nodes["a"].kill()
            else:
                a.mode = fault
            pinned_first(m, "a")
            results = await ask_many(m, 10)
            return results, m.node("a")

    results, node_a = run(go())
    assert len(results) == 10 and all(r["response"] == "Hello from b." for r in results)  # 10 of 10
    if fault == "busy":
        assert node_a.healthy   # 503 busy: try elsewhere, but the node is not sick
    elif fault != "kill_sshd" or not node_a.healthy:
        assert not node_a.healthy and node_a.reason
    assert lab.ssh_processes() == []


def test_a_request_every_node_answers_500_marks_none_down(mesh_env):
    """A node that answers 500 where another answers is marked down (above); a request every
    node answers with 500 is the request's fault: RequestFailedError, every node still up."""
    lab = mesh_env
    a, b = two_nodes(lab)
    a.mode = b.mode = "error500"

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **FAST) as m:
            await m.refresh()
            with pytest.raises(mesh.RequestFailedError) as err:
                await m.generate("x", model="m:1")
            a.mode = b.mode = "ok"
            after = await m.generate("y", model="m:1")
            return err.value, [n.healthy for n in m.nodes], after["response"]

    exc, healthy, after = run(go())
    assert exc.status == 500 and str(exc).startswith("every node failed: ") and healthy == [True, True]
    assert "a: llama runner process has terminated" in str(exc) and "b: llama runner" in str(exc)
    assert after.startswith("Hello from ")


@pytest.mark.parametrize("fault, status, text", [
    ("bad_first", 502, "bad reply: not JSON: '<html>oops</html>'"),
    ("error_first", 500, "Ollama error: CUDA error: out of memory"),
])
def test_a_stream_every_node_starts_wrong_marks_none_down(mesh_env, fault, status, text):
    """A stream that starts wrong on every node (a first line that is not JSON, Ollama's error
    line) is the request's fault, as an error status from every node is: RequestFailedError
    (502: a reply mesh cannot read; 500: Ollama's error), every node still up."""
    lab = mesh_env
    a, b = two_nodes(lab)
    a.mode = b.mode = fault

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **FAST) as m:
            await m.refresh()
            with pytest.raises(mesh.RequestFailedError) as err:
                await m.generate("x", model="m:1", stream=True)
            a.mode = b.mode = "ok"
            after = [c async for c in await m.generate("y", model="m:1", stream=True)]
            return err.value, [n.healthy for n in m.nodes], after

    exc, healthy, after = run(go())
    assert exc.status == status and str(exc).startswith("every node failed: ") and healthy == [True, True]
    assert f"a: {text}" in str(exc) and f"b: {text}" in str(exc), str(exc)
    assert "".join(c["response"] for c in after).startswith("Hello from ") and after[-1]["done"] is True


def test_a_node_whose_stream_starts_wrong_is_marked_down_once_another_answers(mesh_env):
    """The same first line on one node only: that node's fault - the request goes to the other
    node, and the first is marked down then (and only then)."""
    lab = mesh_env
    a, b = two_nodes(lab)
    a.mode = "bad_first"

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **FAST) as m:
            await m.refresh()
            pinned_first(m, "a")
            chunks = [c async for c in await m.generate("x", model="m:1", stream=True)]
            return chunks, m.node("a"), m.node("b"), sum(r["path"] == "/api/generate" for r in a.requests)

    chunks, node_a, node_b, asked_a = run(go())
    assert {c["node"] for c in chunks} == {"b"} and chunks[-1]["done"] is True
    assert asked_a == 1 and not node_a.healthy and "not JSON" in node_a.reason and node_b.healthy


def test_a_whole_answer_cut_off_goes_to_another_node(mesh_env):
    """stream=false: a node whose connection closes in the middle of its answer has handed
    nothing on (the answer is one line: its first whole line is all of it), so another node
    answers, and the first is marked down then."""
    lab = mesh_env
    a, b = two_nodes(lab)
    a.mode = "cut_answer"

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **FAST) as m:
            await m.refresh()
            pinned_first(m, "a")
            r = await m.generate("x", model="m:1")
            a.mode = b.mode = "cut_answer"
            with pytest.raises(mesh.RequestFailedError) as err:
                await m.generate("y", model="m:1")
            return r, m.node("a"), m.node("b"), err.value, sum(r["path"] == "/api/generate" for r in a.requests)

    r, node_a, node_b, exc, asked_a = run(go())
    assert r["node"] == "b" and r["response"] == "Hello from b." and r["done"] is True
    assert asked_a == 1 and not node_a.healthy and "reply cut off" in node_a.reason
    # then every node that could take it (b: a is down) cut it off: the request's fault, 502 as
    # from nginx, and b stays up
    assert exc.status == 502 and str(exc).startswith("every node failed: b: bad reply: reply cut off"), str(exc)
    assert node_b.healthy


@pytest.mark.parametrize("fault, reason", [
    ("garbage", "not JSON"), ("html", "HTML page"), ("error500", "llama runner process has terminated"),
    ("badhead", "not an Ollama reply"),
])
def test_single_node_bad_reply_names_node(lab, fault, reason):
    fake = lab.add_node("solo", ["m:1"])
    fake.mode = fault
    p = lab.run("--connect-timeout", "3", "generate", "--model", "m:1", "hi")
    err = p.stderr.decode()
    assert p.returncode == 1 and err.startswith("mesh: error: ") and err.count("\n") == 1, err
    assert "solo" in err and reason in err, err
    assert lab.ssh_processes() == []


def test_model_missing_on_a_node_is_skipped_not_marked_down(mesh_env):
    lab = mesh_env
    a = lab.add_node("a", ["m:1"])
    lab.add_node("b", ["m:1"])

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **FAST) as m:
            await m.refresh()
            a.models.remove("m:1")             # deleted on the node after the inventory was read
            pinned_first(m, "a")
            r = await m.generate("x", model="m:1")
            return r, m.node("a")

    r, node_a = run(go())
    assert r["node"] == "b" and node_a.healthy and "m:1" not in node_a.models


def test_no_retry_after_first_byte_stream_ends_with_error(mesh_env):
    lab = mesh_env
    a, b = two_nodes(lab, token_delay=0.05, tokens=["one", " two", " three", " four"])
    a.mode = "truncate"

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **FAST) as m:
            await m.refresh()
            pinned_first(m, "a")
            got = []
            with pytest.raises(mesh.StreamInterruptedError, match="a: .*truncated.*not retried"):
                async for chunk in await m.generate("x", model="m:1", stream=True):
                    got.append(chunk["response"])
            return got

    got = run(go())
    assert got == ["one", " two"]                          # what came, once; nothing from b appended
    assert b.bodies("/api/generate") == []                 # never retried elsewhere


def test_error_line_mid_stream(lab):
    fake = lab.add_node("solo", ["m:1"])
    fake.mode = "error_line"
    p = lab.run("generate", "--model", "m:1", "hi")
    assert p.returncode == 1
    assert p.stdout.decode() == "Hello"                    # the token that came before the error
    assert "solo: Ollama error: CUDA error: out of memory" in p.stderr.decode()


def test_hung_node_fails_over_well_before_first_byte_timeout(mesh_env):
    lab = mesh_env
    a, b = two_nodes(lab)

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **FAST) as m:
            await m.refresh()
            a.mode = "hang"                                # accepts, never answers anything
            pinned_first(m, "a")
            started = time.monotonic()
            r = await m.generate("x", model="m:1")
            return r, time.monotonic() - started, m.node("a")

    r, elapsed, node_a = run(go())
    assert r["node"] == "b" and not node_a.healthy and "stopped answering" in node_a.reason
    assert elapsed < FAST["first_byte_timeout"] / 2, elapsed


def test_frozen_machine_fails_over(mesh_env):
    lab = mesh_env
    a, b = two_nodes(lab)

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **FAST) as m:
            await m.refresh()
            lab.nodes["a"].freeze()                        # every sshd process of node a stops
            try:
                pinned_first(m, "a")
                results = await ask_many(m, 5)
                return results, m.node("a")
            finally:
                lab.nodes["a"].thaw()

    results, node_a = run(go())
    assert all(r["node"] == "b" for r in results) and not node_a.healthy


def test_slow_model_load_gets_the_full_first_byte_time(mesh_env):
    lab = mesh_env
    fake = lab.add_node("solo", ["m:1"], delay=2.5)        # answers /api/version, first token late

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **FAST) as m:
            return await m.generate("x", model="m:1"), m.node("solo")

    r, node = run(go())
    assert r["response"] == "Hello from solo." and node.healthy
    assert fake.bodies("/api/generate") and len(fake.bodies("/api/generate")) == 1   # no retry


def test_first_byte_and_idle_timeouts(lab):
    # Past first_byte_timeout a node that answers its liveness probe is waited for
    # (issue 12): the long generation is not a failure and runs once.
    fake = lab.add_node("solo", ["m:1"], delay=3)
    p = lab.run("--first-byte-timeout", "1", "generate", "--model", "m:1", "x",
                env=lab.env(MESH_LIVENESS_INTERVAL="0.5"))
    assert p.returncode == 0 and p.stdout.decode() == "Hello from solo.\n", p.stderr.decode()
    assert len(fake.bodies("/api/generate")) == 1
    fake.delay = 0
    fake.token_delay = 3
    p = lab.run("--idle-timeout", "1", "generate", "--model", "m:1", "x")
    assert p.returncode == 1 and "no data for idle_timeout=1s" in p.stderr.decode()
    assert p.stdout.decode() == "Hello"
    assert lab.ssh_processes() == []


def prefer(m, names):
    """Make the router try `names` in this order."""
    for rank, node in enumerate(sorted(m.nodes, key=lambda n: names.index(n.name))):
        node.avg_latency = float(rank)
        node.route.model("m:1").gen_tps = 1000.0 / (1 + 10 * rank)
        node.route.loaded["m:1"] = 0.0


@pytest.mark.parametrize("stream", [False, True])
def test_long_generation_on_a_live_node_runs_once(mesh_env, stream):
    """A stream=false answer (its first byte is its last) or a slow model load longer
    than first_byte_timeout, on a node that keeps answering: waited for, not re-run."""
    lab = mesh_env
    a, b = two_nodes(lab, delay=3)

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **dict(FAST, first_byte_timeout=1)) as m:
            await m.refresh()
            prefer(m, ["a", "b"])
            r = await m.generate("x", model="m:1", stream=stream)
            if stream:
                r = [c async for c in r][-1]
            return r, m.node("a").healthy

    r, healthy = run(go())
    assert r["node"] == "a" and healthy
    assert len(a.bodies("/api/generate")) == 1 and b.bodies("/api/generate") == []


@pytest.mark.parametrize("retries, answered", [(None, False), (2, True)])
def test_silent_node_is_retried_once_unless_asked(mesh_env, retries, answered):
    """A node that goes silent with a request (its liveness probe stops answering) is
    replaced by one other node; a second silent node ends the request, unless the
    user allowed more (retries)."""
    lab = mesh_env
    a, b = two_nodes(lab)
    c = lab.add_node("c", ["m:1"])
    extra = {} if retries is None else {"retries": retries}

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **dict(FAST, connect_timeout=1), **extra) as m:
            await m.refresh()
            a.mode = b.mode = "hang"
            prefer(m, ["a", "b", "c"])
            try:
                return await m.generate("x", model="m:1")
            except mesh.MeshError as exc:
                return exc

    try:
        r = run(go())
    finally:
        a.release.set()
        b.release.set()
    assert len(a.bodies("/api/generate")) == 1 and len(b.bodies("/api/generate")) == 1
    if answered:
        assert r["node"] == "c"
    else:
        assert isinstance(r, mesh.NodeError) and "stopped answering" in str(r) and "retries=1" in str(r), r
        assert c.bodies("/api/generate") == []


def test_retries_option(lab):
    lab.add_node("solo", ["m:1"])
    p = lab.run("--retries", "x", "generate", "--model", "m:1", "hi")
    assert p.returncode == 2 and "--retries" in p.stderr.decode() and "Traceback" not in p.stderr.decode()
    p = lab.run("--retries", "0", "generate", "--model", "m:1", "hi")
    assert p.returncode == 0 and p.stdout.decode() == "Hello from solo.\n"


def test_test_command_finishes_on_time_with_a_frozen_node(lab):
    lab.add_node("a", ["m:1"])
    lab.add_node("b", ["m:1"])
    lab.nodes["b"].freeze()
    try:
        started = time.monotonic()
        p = lab.run("--connect-timeout", "2", "test", "--timeout", "3", "--json")
        elapsed = time.monotonic() - started
    finally:
        lab.nodes["b"].thaw()
    rows = {r["name"]: r for r in json.loads(p.stdout)}
    assert p.returncode == 1 and rows["a"]["ok"] and not rows["b"]["ok"]
    assert elapsed < 10, elapsed
    assert lab.ssh_processes() == []


def test_node_comes_back_by_itself(mesh_env):
    lab = mesh_env
    a, b = two_nodes(lab)

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **FAST) as m:
            await m.refresh()
            a.stop()
            pinned_first(m, "a")
            await ask_many(m, 3)
            node_a = m.node("a")
            assert not node_a.healthy and "Ollama not answering" in node_a.reason
            a.start_again()
            while not node_a.healthy:                       # background re-probe with backoff
                await asyncio.sleep(0.05)
            pinned_first(m, "a")
            return await m.generate("x", model="m:1")

    r = asyncio.run(asyncio.wait_for(go(), 60))
    assert r["node"] == "a"


def test_killed_master_is_replaced(mesh_env):
    lab = mesh_env
    lab.add_node("solo", ["m:1"])

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **FAST) as m:
            await m.generate("x", model="m:1")
            masters = lab.master_pids()     # the master says who it is (under load other ssh may be around)
            assert len(masters) == 1
            os.kill(masters[0], signal.SIGKILL)   # the socket file stays behind
            wait_for(lambda: lab.master_pids() == [], 10, "the master to die")
            r = await m.generate("x", model="m:1")
            return r, lab.master_pids()

    r, masters = run(go())
    assert r["node"] == "solo" and len(masters) == 1


def test_master_killed_mid_stream(mesh_env):
    lab = mesh_env
    lab.add_node("solo", ["m:1"], token_delay=0.3, tokens=["t"] * 20)

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **FAST) as m:
            got = []
            with pytest.raises(mesh.StreamInterruptedError, match="solo"):
                async for chunk in await m.generate("x", model="m:1", stream=True):
                    got.append(chunk)
                    if len(got) == 2:
                        pid = int(lab.ssh_processes(include_masters=True)[0].split(":")[0])
                        os.kill(pid, signal.SIGKILL)
            return got

    got = run(go())
    assert 2 <= len(got) < 20
    assert lab.ssh_processes() == []


def test_hundred_concurrent_requests_for_one_node(mesh_env):
    lab = mesh_env
    only = lab.add_node("big", ["rare:70b"], delay=0.05)
    lab.add_node("small", ["m:1"])

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **FAST) as m:
            results = await asyncio.gather(*(m.generate(f"q{i}", model="rare:70b") for i in range(100)))
            return results, m.node("big").max_concurrent

    results, cap = run(go())
    assert len(results) == 100 and all(r["node"] == "big" and r["done"] for r in results)
    assert only.max_active <= cap == 16                    # queued in mesh.py, not flooded onto the node
    assert only.max_active >= 8


def test_forwarding_refused_falls_back_to_curl(mesh_env):
    lab = mesh_env
    fake = lab.add_node("locked", ["m:1"], allow_forwarding=False)

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **FAST) as m:
            r = await m.generate("caf\u00e9 $(x) 'q'", model="m:1")
            chunks = [c async for c in await m.generate("s", model="m:1", stream=True)]
            return r, chunks, m.node("locked").transport.mode

    r, chunks, mode = run(go())
    assert mode == "exec" and r["response"] == "Hello from locked."
    assert "".join(c["response"] for c in chunks) == "Hello from locked."
    assert fake.bodies("/api/generate")[0]["prompt"] == "caf\u00e9 $(x) 'q'"
    assert lab.ssh_processes() == []


def test_control_dir_is_private(tmp_path, monkeypatch):
    target = tmp_path / "ctl"
    monkeypatch.setenv("MESH_CONTROL_DIR", str(target))
    assert mesh.control_dir() == str(target / f"mesh-{os.getuid()}")
    assert oct(os.stat(target / f"mesh-{os.getuid()}").st_mode & 0o777) == "0o700"


@pytest.mark.parametrize("transport", ["forward", "stdio", "exec"])
def test_cancelled_request_ends_its_ssh_child(lab, monkeypatch, transport):
    """A cancelled task ends its request on the node, frees its slot, and leaves no
    ssh child (per-request ones for ssh -W and ssh NODE curl; none at all with the forward)."""
    monkeypatch.setenv("MESH_CONTROL_DIR", lab.control_dir)
    fake = lab.add_node("solo", ["m:1"], settings=f"transport={transport}", token_delay=0.3, tokens=["t"] * 40)

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **FAST) as m:
            async def consume():
                async for _ in await m.generate("x", model="m:1", stream=True):
                    pass
            task = asyncio.ensure_future(consume())
            while fake.active == 0:
                await asyncio.sleep(0.02)
            if transport != "forward":
                assert lab.ssh_processes() != []      # the request's own ssh child is running
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return m.nodes[0].active_requests

    assert run(go()) == 0
    assert lab.ssh_processes() == []
    wait_for(lambda: fake.active == 0, 10, "the node to see the request end")


async def first_token(m, prompt):
    async for chunk in await m.generate(prompt, model="m:1", stream=True):
        return chunk["response"]        # the stream is let go here, never closed


@pytest.mark.parametrize("transport", ["forward", "stdio", "exec"])
def test_abandoned_stream_ends_its_request(lab, monkeypatch, transport):
    """A library stream left early (`return` out of `async for`, no aclose) and let go is
    closed as asyncio closes an abandoned async generator: the node's request ends, its
    slot is free for the next request (max_concurrent=1), and no ssh child is left."""
    monkeypatch.setenv("MESH_CONTROL_DIR", lab.control_dir)
    fake = lab.add_node("solo", ["m:1"], settings=f"transport={transport} max_concurrent=1",
                        token_delay=0.3, tokens=["t"] * 40)

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **FAST) as m:
            # the second request needs the node's only slot: the first stream's
            firsts = [await asyncio.wait_for(first_token(m, prompt), 10) for prompt in ("x", "y")]
            deadline = time.monotonic() + 10
            while (m.nodes[0].active_requests or fake.active) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            return firsts, m.nodes[0].active_requests, fake.active, lab.ssh_processes()

    firsts, in_flight, at_node, children = run(go())
    assert firsts == ["t", "t"]
    assert in_flight == 0 and at_node == 0 and children == []


@pytest.mark.parametrize("transport", ["forward", "stdio", "exec"])
def test_stream_let_go_as_the_orchestrator_closes_leaves_nothing_running(lab, monkeypatch, transport):
    """A stream let go and the orchestrator closed at once, before the stream's own close
    gets to run: the node's request still ends and no ssh child is left."""
    monkeypatch.setenv("MESH_CONTROL_DIR", lab.control_dir)
    fake = lab.add_node("solo", ["m:1"], settings=f"transport={transport}", token_delay=0.3, tokens=["t"] * 40)

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **FAST) as m:
            return await asyncio.wait_for(first_token(m, "x"), 10)    # closed as soon as it returns

    assert run(go()) == "t"
    wait_for(lambda: fake.active == 0, 10, "the node to see the request end")
    assert lab.ssh_processes() == []


@pytest.mark.parametrize("transport", ["forward", "stdio", "exec"])
@pytest.mark.parametrize("mode, text", [
    ("cut_midline", "bad reply: stream cut off (truncated: "),    # the node's connection closed mid-line
    ("truncate", "stream ended before its final line (truncated: the connection closed inside the body)"),
    ("no_final", 'stream ended before its final line (truncated: the body ended with no "done": true line)'),
], ids=["cut_midline", "truncate", "no_final"])
def test_a_stream_cut_off_says_so_on_every_transport(lab, monkeypatch, transport, mode, text):
    """How a stream ended early is told the same way whichever way the node is reached -
    with ssh NODE curl too, where curl takes the framing off and its exit status (18) is
    what shows a cut."""
    monkeypatch.setenv("MESH_CONTROL_DIR", lab.control_dir)
    fake = lab.add_node("solo", ["m:1"], settings=f"transport={transport}", tokens=["a", "b", "c", "d"])
    fake.mode = mode

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **FAST) as m:
            got = []
            with pytest.raises(mesh.StreamInterruptedError) as err:
                async for chunk in await m.generate("x", model="m:1", stream=True):
                    got.append(chunk["response"])
            return got, str(err.value)

    got, message = run(go())
    assert got[:2] == ["a", "b"] and message.startswith("solo: ") and text in message, message
    assert lab.ssh_processes() == []


BLOB = b"\x00GGUF\n\n\xff 'x' $(y)\r\n" * 5000     # binary, ~110 KB: NULs, newlines, quotes


@pytest.mark.parametrize("method, path, body, status, rc", [
    ("POST", "/api/blobs/sha256-" + __import__("hashlib").sha256(BLOB).hexdigest(), BLOB, b"201", 0),
    ("HEAD", "/api/blobs/sha256-none", None, b"404", 0),
    (None, "/api/tags", None, b"200", 0),
    ("POST", "/api/show", b'{"model": "m:1"}', b"200", 0),
    (None, "/api/tags", None, None, 7),                      # nothing listens: curl's own status
], ids=["binary-blob", "head", "get", "json-body", "refused"])
def test_exec_transport_command(method, path, body, status, rc):
    """The command `ssh NODE curl` runs on the node (curl_command), run here by sh: the
    body byte for byte (then stdin stays open, as mesh keeps it), the reply ends when
    curl does, and curl's exit status is the command's."""
    import subprocess
    from lab import FakeOllama
    fake = FakeOllama(["m:1"])
    port = fake.port
    if rc:
        fake.close()
    try:
        cmd = mesh.curl_command(f"http://127.0.0.1:{port}{path}", None if body is None else len(body), method)
        p = subprocess.Popen(["sh", "-c", cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
        try:
            if body is not None:
                p.stdin.write(body)
                p.stdin.flush()
            out = p.stdout.read()                   # to EOF, while stdin is still open
            assert p.wait(10) == rc
            if rc == 0:
                assert out.split(b" ")[1] == status
            if method == "POST" and body is BLOB:
                assert fake.requests[-1]["raw"] == BLOB
        finally:
            p.stdin.close()
            p.wait(10)
    finally:
        fake.close()


@pytest.mark.parametrize("own_group", [True, False])
def test_exec_transport_command_ends_curl_when_stdin_ends(own_group):
    """Run as OpenSSH's sshd runs a session (its own process group, setsid): when stdin
    ends - mesh's ssh child gone - curl ends at once and the node's generation with it.
    Under an sshd that keeps a connection's sessions in one group (old dropbear) the
    command is not its group's leader: it kills nothing, and curl runs to its end."""
    import subprocess
    from lab import FakeOllama
    fake = FakeOllama(["m:1"], delay=60 if own_group else 1)
    body = json.dumps({"model": "m:1", "prompt": "x", "stream": False}).encode()
    cmd = mesh.curl_command(f"http://127.0.0.1:{fake.port}/api/generate", len(body))
    # not the leader: a subshell of the session's leader runs it
    argv = ["sh", "-c", cmd if own_group else f"( {cmd} ); exit $?"]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        p.stdin.write(body)
        p.stdin.flush()
        wait_for(lambda: fake.active == 1, 10, "the generation to start")
        p.stdin.close()
        out = p.stdout.read()
        p.wait(10)
        if own_group:
            wait_for(lambda: fake.cancelled == 1, 10, "the generation to be cancelled")
        else:
            assert p.returncode == 0 and fake.cancelled == 0
            assert json.loads(out.split(b"\r\n\r\n", 1)[1])["done"] is True
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        fake.close()


@pytest.mark.parametrize("shell", ["dash", "bash", "mksh", "busybox"])
def test_exec_transport_command_under_other_shells(shell, tmp_path):
    """The node's `sh` is whatever its PATH finds (mksh on some BSD-likes, busybox on
    Alpine): a reply comes back for a request with a body, and a client that leaves
    still ends curl.  Under mksh a subshell kept a copy of the pipe to curl, so curl
    never saw the body's end: every request with a body hung."""
    import subprocess
    import threading
    from lab import FakeOllama
    found = shutil.which(shell)
    if not found:
        pytest.skip(f"{shell} not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in (["sh", "head", "cut", "cat", "ps"] if shell == "busybox" else ["sh"]):
        (bin_dir / tool).symlink_to(found)         # busybox: its applets, as on Alpine
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    fake = FakeOllama(["m:1"])
    body = json.dumps({"model": "m:1", "prompt": "x", "stream": False}).encode()
    cmd = mesh.curl_command(f"http://127.0.0.1:{fake.port}/api/generate", len(body))
    procs = []

    def start():
        p = subprocess.Popen(["sh", "-c", cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, start_new_session=True, env=env)
        procs.append(p)
        p.stdin.write(body)
        p.stdin.flush()
        return p
    try:
        p, out = start(), []
        reader = threading.Thread(target=lambda: out.append(p.stdout.read()), daemon=True)
        reader.start()
        reader.join(30)                              # stdin still open, as mesh keeps it
        assert out, "no reply while stdin stays open"
        assert json.loads(out[0].split(b"\r\n\r\n", 1)[1])["response"] == "Hello from fake."
        p.stdin.close()
        fake.delay = 60
        p = start()
        wait_for(lambda: fake.active == 1, 10, "the generation to start")
        p.stdin.close()
        wait_for(lambda: fake.cancelled == 1, 10, "the generation to be cancelled")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        fake.close()


def test_curl_fallback_names_a_stopped_ollama(lab):
    fake = lab.add_node("locked", ["m:1"], allow_forwarding=False)
    fake.stop()
    p = lab.run("--connect-timeout", "3", "test")
    line = p.stdout.decode().strip().splitlines()[0]
    assert p.returncode == 1 and line.startswith("FAIL") and "locked" in line
    assert "Ollama not answering" in line and "connection refused" in line, line
    assert lab.ssh_processes() == []


@pytest.mark.parametrize("transport", ["stdio", "exec"])
def test_killed_master_is_replaced_for_per_request_transports(mesh_env, transport):
    lab = mesh_env
    lab.add_node("solo", ["m:1"], settings=f"transport={transport}")

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **FAST) as m:
            await m.generate("x", model="m:1")
            # The master as it says itself (ssh -O check): the first ssh process listed
            # under CPU load can be a request's own ssh child still exiting - killing that
            # instead of the master was this test's flake.
            first = lab.master_pids()
            assert len(first) == 1
            os.kill(first[0], signal.SIGKILL)
            wait_for(lambda: lab.master_pids() == [], 10, "the master to die")
            r = await m.generate("x", model="m:1")
            return r, first, lab.master_pids()

    r, first, now = run(go())
    assert r["node"] == "solo" and len(now) == 1 and now != first   # a new master, not a bare connection


@pytest.mark.parametrize("knock, failed_lately, rank", [
    ("answered", False, 0),                             # it answers: first
    ("answered", True, 1),      # answers, but its ssh failed lately (a hung host's kernel): after those
    (None, False, 1),                                   # not knocked (few nodes, ProxyJump): as listed
    (None, True, 2),
    ("refused", False, None), ("refused", True, None),  # down: no ssh process at all
    ("silent", False, None), ("silent", True, None),    # ssh would time out just the same
])
def test_start_rank(knock, failed_lately, rank):
    assert mesh.start_rank(knock, failed_lately) == rank


def test_start_gate_order():
    """Starts wait by rank, then in arrival order; a quarter of the slots is never
    given to last-rank (suspect) starts."""
    async def go():
        gate, order = mesh._StartGate(4), []
        await asyncio.gather(*(gate.acquire(rank=2) for _ in range(3)))   # 3 of 4: the reserve is left
        async def start(name, rank):
            await gate.acquire(rank=rank)
            order.append(name)
        tasks = [asyncio.ensure_future(start(n, r)) for n, r in
                 [("s1", 2), ("a1", 1), ("k1", 0), ("s2", 2), ("k2", 0), ("a2", 1)]]
        await asyncio.sleep(0)
        got_at_once = list(order)
        for _ in range(4):
            gate.release()
            await asyncio.sleep(0)
        held_back = list(order)                  # 3 starting, 1 free: the reserve, not for s1
        for _ in range(2):
            gate.release()
            await asyncio.sleep(0)
        for t in tasks:
            t.cancel()
        return got_at_once, held_back, order, gate.peak
    at_once, held_back, order, peak = run(go())
    assert at_once == ["a1"]                     # the one free slot, nobody waiting before it
    assert held_back == ["a1", "k1", "k2", "a2"]
    assert order == ["a1", "k1", "k2", "a2", "s1", "s2"] and peak == 4


@pytest.mark.parametrize("pool, knockable, caps", [
    (4, 4, [4, 4, 3]),     # no knocks (few nodes): suspects (rank 2) leave a quarter to the others
    (5, 1, [4, 3, 2]),     # knocks: a quarter kept for each better rank
    (5, 0, [4, 4, 3]),     # nothing to knock on (all behind ProxyJump): as without knocks
])
def test_start_gate_reserves(pool, knockable, caps):
    gate = mesh._StartGate(4)
    gate.pool, gate.knockable = pool, knockable
    assert [gate._cap(rank) for rank in (0, 1, 2)] == caps


@pytest.mark.parametrize("target, host, verdict", [
    ("listening", "127.0.0.1", "answered"),
    ("listening", "localhost", "answered"),     # a name: looked up, each address tried
    ("closed", "127.0.0.1", "refused"),
    ("dropping", "127.0.0.1", "silent"),        # SYNs dropped: as a blackholed host
    (None, None, None),                         # ProxyJump & co: not knocked
])
def test_knock(target, host, verdict):
    import socket
    keep = []
    if target == "listening":
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        keep, port = [srv], srv.getsockname()[1]
    elif target == "closed":
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        keep, port = [srv], srv.getsockname()[1]
    elif target == "dropping":
        port, keep = silent_port()

    async def go():
        gate = mesh._StartGate(1)
        t = mesh.SSHTransport("n", "localhost", 11434, config=None, ssh="ssh", connect_timeout=1,
                              control_persist=1, start_gate=gate,
                              knock_address=(host, port) if host else None)
        return await t.knock()
    try:
        assert run(go()) == verdict
    finally:
        for s in keep:
            s.close()


@pytest.mark.parametrize("connect_timeout, seconds", [(0.3, 1), (1, 1), (2.5, 2), (10, 10)])
def test_knock_waits_as_long_as_ssh(connect_timeout, seconds):
    """A silent knock is the node's verdict (down, no ssh): it waits ssh's own
    ConnectTimeout, whole seconds and at least 1, not a `--connect-timeout 0.3` ssh
    never applies."""
    t = mesh.SSHTransport("n", "localhost", 11434, config=None, ssh="ssh", connect_timeout=connect_timeout,
                          control_persist=1, start_gate=mesh._StartGate(1), knock_address=("127.0.0.1", 22))
    assert t.ssh_connect_timeout == seconds          # ssh's -o ConnectTimeout and the knock's wait


def test_knock_waiting_for_a_slot_keeps_its_connect_timeout():
    """Knocks beyond the gate's slots wait behind the silent ones: a live node knocked
    after that wait still answers (its connect timeout was spent in the queue: 'silent',
    started last - with the open-files limit at 1024, 300 silent nodes listed first kept
    the live ones from starting for 50 s)."""
    import socket
    quiet_port, keep = silent_port()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    keep.append(srv)

    async def go():
        gate = mesh._StartGate(1)
        gate._knock_slots = asyncio.Semaphore(1)     # as when the open-files limit is reached
        ts = [mesh.SSHTransport(name, "localhost", 11434, config=None, ssh="ssh", connect_timeout=1,
                                control_persist=1, start_gate=gate, knock_address=("127.0.0.1", port))
              for name, port in (("quiet", quiet_port), ("live", srv.getsockname()[1]))]
        return await asyncio.gather(*(t.knock() for t in ts))
    try:
        assert run(go()) == ["silent", "answered"]
    finally:
        for s in keep:
            s.close()


def test_knock_slots_grow_with_the_pool():
    """serve's config reload adds nodes: the knock slots (and the open-files limit) grow
    with them; made for the first pool only, they stayed its size."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4 * 3000 + 1024:
        pytest.skip("hard open-files limit too low to grow into")

    async def free(sem):            # knocks that could start now
        n = 0
        while not sem.locked():
            await sem.acquire()
            n += 1
        for _ in range(n):
            sem.release()
        return n

    async def go():
        gate = mesh._StartGate(4)
        gate.pool = gate.knockable = 10
        small = await free(gate.knock_slots())
        gate.pool = gate.knockable = 3000
        return small, await free(gate.knock_slots())
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))      # the common default
    try:
        assert run(go()) == ((4 * 10 + 1024) // 4, (4 * 3000 + 1024) // 4)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 4 * 3000 + 1024
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("knocks, soft, hard, budget", [
    (500, 1024, 524288, (3024, 756)),       # the usual desktop default: raised as far as needed
    (500, 1024, 1024, (1024, 256)),         # a hard limit: a quarter of it
    (500, 1024, None, (3024, 756)),         # unlimited hard limit
    (500, 65536, 65536, (65536, 16384)),    # enough already: left alone
    (500, None, None, (None, 65536)),
    (10, 256, 256, (256, 64)),              # never fewer than the master starts at once
    (0, 1024, 524288, (1024, 256)),         # nothing to knock on
])
def test_knock_budget(knocks, soft, hard, budget):
    assert mesh._knock_budget(knocks, soft, hard, 64) == budget


def test_many_nodes_knocked_before_ssh(mesh_env, tmp_path):
    """More nodes than master starts at once (max_starts lowered to 1): each ssh port is
    knocked on first - the node that answers gets the one start slot although a silent
    and a refusing node are listed before it, and the refusing and the silent node are
    down with ssh's own words without an ssh process ever started for them (a silent one
    started last cost `test` two connect timeouts)."""
    import socket
    lab = mesh_env
    lab.add_node("live", ["m:1"])
    hold = socket.socket()            # bound, never listening: connections are refused
    hold.bind(("127.0.0.1", 0))
    refused_port = hold.getsockname()[1]
    quiet_port, keep = silent_port()
    log = tmp_path / "ssh-calls"
    wrapper = tmp_path / "ssh"
    wrapper.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {log}\nexec {shutil.which('ssh')} \"$@\"\n")
    wrapper.chmod(0o755)
    with open(lab.config_path, "w") as fh:
        fh.write(f"Host quiet\n    HostName 127.0.0.1\n    Port {quiet_port}\n    # mesh: on\n\n"
                 f"Host gone\n    HostName 127.0.0.1\n    Port {refused_port}\n    # mesh: on\n\n"
                 + lab.host_block("live"))

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, ssh=str(wrapper), max_starts=1,
                                         **dict(FAST, connect_timeout=5)) as m:
            r = await m.generate("x", model="m:1")
            for _ in range(400):
                if not m.node("gone").healthy and not m.node("quiet").healthy:
                    break
                await asyncio.sleep(0.05)
            return r, m.node("gone").reason, m.node("quiet").reason
    try:
        r, reason, quiet_reason = run(go())
    finally:
        hold.close()
        for s in keep:
            s.close()
    starts = [line for line in log.read_text().splitlines() if "ControlMaster=yes" in line]
    assert r["node"] == "live"
    assert starts[0].endswith(" live"), starts              # the answering node started first
    assert not any(line.endswith((" gone", " quiet")) for line in starts)   # no ssh master for them
    assert not any(line.endswith(" gone") for line in log.read_text().splitlines())   # no ssh at all
    assert reason == "ssh: connection refused"               # as when ssh itself is refused
    assert quiet_reason == "ssh: connection timed out"       # as when ssh itself times out
    assert lab.ssh_processes() == []


def test_many_dead_nodes(mesh_env):
    """Dead nodes among live ones (on 127.0.0.1 only: a port nothing listens on, and a
    ProxyCommand that never answers, as a blackholed address): the request is answered by
    a live node without waiting for the dead ones, no more masters connect at once than
    allowed, and ssh killed while connecting takes its ProxyCommand with it."""
    import socket
    import threading
    lab = mesh_env
    lab.add_node("live0", ["m:1"])
    lab.add_node("live1", ["m:1"])
    hold = socket.socket()            # bound, never listening: connections are refused
    hold.bind(("127.0.0.1", 0))
    marker = f"{3900 + os.getpid() % 100}.{int(time.time() * 1000) % 1000000}"
    silent = [f"Host quiet{i}\n    HostName 127.0.0.1\n    ProxyCommand sleep {marker}\n    # mesh: on\n\n"
              for i in range(10)]
    refused = [f"Host gone{i}\n    HostName 127.0.0.1\n    Port {hold.getsockname()[1]}\n    # mesh: on\n\n"
               for i in range(10)]
    with open(lab.config_path, "w") as fh:
        fh.write("".join(silent[:5] + refused[:5] + [lab.host_block("live0")] + silent[5:] + refused[5:]
                         + [lab.host_block("live1")]))
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], masters_starting(os.getpid()))
            time.sleep(0.002)

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **dict(FAST, connect_timeout=2),
                                         max_starts=4) as m:
            r = await m.generate("x", model="m:1")
            return r, m.start_gate.peak

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        r, gate_peak = run(go())
    finally:
        stop.set()
        watcher.join()
        hold.close()
    try:
        assert r["node"] in ("live0", "live1")
        assert gate_peak <= 4 and peak[0] <= 4, (gate_peak, peak[0])
        wait_for(lambda: _pids_matching(marker) == [], 10, "no ProxyCommand left running")
        assert lab.ssh_processes() == []
    finally:
        for pid in _pids_matching(marker):
            os.kill(pid, signal.SIGKILL)


def test_a_check_that_cannot_start_ssh_says_why(lab):
    """mesh.py out of file descriptors (a busy serve under `ulimit -n`): the node's check
    says why in one reason - no "Task exception was never retrieved" traceback on serve's
    stderr - and the node is used again once descriptors are free."""
    import resource
    lab.add_node("a", ["m:1"])

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **FAST) as m:
            node = m.node("a")
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            lowest = os.dup(0)       # the descriptor the next open would get
            os.close(lowest)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
            try:
                failed = await m.check_node(node)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            return failed, await m.check_node(node)

    failed, again = run(go())
    assert not failed.get("ok") and "could not start ssh for it: Too many open files" in failed["error"]
    assert again.get("ok") and again["models"] == ["m:1"]
