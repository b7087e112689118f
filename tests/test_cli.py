"""The real mesh.py CLI, through real sshd nodes on 127.0.0.1 (issue 2)."""
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import needs_sshd
from lab import MESH, FakeOllama, _pids_matching, free_port as lab_free_port, wait_for

pytestmark = needs_sshd

HOSTILE = [
    "quotes ' \" and `backticks` and $(echo pwned) and ${HOME} and \\ backslash",
    "line one\nline two\n\ttabbed\r\nCRLF",
    "non-ASCII: caf\u00e9 \u65e5\u672c\u8a9e \U0001F680 \u0645\u0631\u062d\u0628\u0627",
    "-v --model x; rm -rf / && echo 'injected' | sh",
]


def three_nodes(lab):
    lab.add_node("alpha", ["qwen2.5:7b", "llama3"])
    lab.add_node("beta", ["qwen2.5:7b"])
    lab.add_node("gamma", ["qwen2.5:7b", "only-gamma:1b"])


def one_line_error(proc):
    err = proc.stderr.decode()
    assert err.startswith("mesh: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_test_all_healthy_then_one_ollama_stopped(lab):
    three_nodes(lab)
    p = lab.run("test")
    out = p.stdout.decode()
    assert p.returncode == 0, p.stderr.decode()
    for name in ("alpha", "beta", "gamma"):
        assert any(line.startswith("ok") and f" {name} " in line for line in out.splitlines()), out
    assert "only-gamma:1b" in out

    lab.fakes["beta"].stop()
    p = lab.run("test")
    assert p.returncode == 1
    bad = [line for line in p.stdout.decode().splitlines() if line.startswith("FAIL")]
    assert len(bad) == 1 and "beta" in bad[0], p.stdout.decode()
    assert "Ollama not answering" in bad[0] and "connection refused" in bad[0]
    assert lab.ssh_processes() == []


def test_test_json_shape(lab):
    three_nodes(lab)
    lab.nodes["gamma"].kill()
    p = lab.run("test", "--json")
    assert p.returncode == 1
    rows = json.loads(p.stdout)
    assert [r["name"] for r in rows] == ["alpha", "beta", "gamma"]
    for r in rows:
        assert {"name", "ok", "ssh_ms", "version", "models", "error"} <= set(r)
    assert rows[0]["ok"] is True and rows[0]["error"] is None and rows[0]["version"] == "0.6.1"
    assert isinstance(rows[0]["ssh_ms"], float) and rows[0]["models"] == ["llama3", "qwen2.5:7b"]
    assert rows[2]["ok"] is False and "connection refused" in rows[2]["error"]


def test_nodes_json_and_restriction(lab):
    three_nodes(lab)
    p = lab.run("nodes", "--json")
    assert p.returncode == 0
    rows = json.loads(p.stdout)
    assert [r["name"] for r in rows] == ["alpha", "beta", "gamma"]
    assert rows[0]["hostname"] == "127.0.0.1" and rows[0]["port"] == lab.nodes["alpha"].port
    assert rows[0]["identityfile"] == [lab.userkey] and rows[0]["ollama_port"] == lab.fakes["alpha"].port
    p = lab.run("--nodes", "beta,gamma", "nodes", "--json")
    assert [r["name"] for r in json.loads(p.stdout)] == ["beta", "gamma"]
    p = lab.run("--nodes", "beta,nosuch", "nodes")
    assert p.returncode == 2
    assert "unknown node 'nosuch'" in one_line_error(p)


@pytest.mark.parametrize("prompt", HOSTILE)
def test_generate_hostile_prompt_arrives_byte_for_byte(lab, prompt):
    lab.add_node("alpha", ["qwen2.5:7b"])
    p = lab.run("generate", "--", prompt)   # '--': a prompt may start with '-'
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode() == "Hello from alpha.\n"
    sent = lab.fakes["alpha"].requests[-1]
    assert sent["body"]["prompt"] == prompt
    assert sent["raw"] == json.dumps({"model": "qwen2.5:7b", "prompt": prompt, "stream": True},
                                     ensure_ascii=False).encode()


def test_generate_300kb_prompt_from_stdin_and_not_in_ps(lab):
    lab.add_node("alpha", ["qwen2.5:7b"], delay=1.0)
    marker = "MARKER-7f3a9"
    prompt = (marker + " \"'$(x)`\n\u00e9") * (300_000 // 20)
    assert len(prompt.encode()) > 300_000
    proc = subprocess.Popen([sys.executable, MESH, "--config", lab.config_path, "generate", "-"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=lab.env())
    proc.stdin.write(prompt.encode())
    proc.stdin.close()
    proc.stdin = None
    wait_for(lambda: lab.fakes["alpha"].active == 1, 20, "the request to reach the node")
    assert _pids_matching(marker) == []  # no process on either side carries the prompt in argv
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert lab.fakes["alpha"].bodies("/api/generate")[0]["prompt"] == prompt


def test_model_only_one_node_has_is_always_served_there(lab):
    three_nodes(lab)
    for _ in range(4):
        p = lab.run("generate", "--json", "--model", "only-gamma:1b", "hi")
        assert p.returncode == 0 and json.loads(p.stdout)["node"] == "gamma"
    p = lab.run("-v", "generate", "--model", "llama3", "hi")   # tag-less name matches llama3:latest
    assert "served by alpha" in p.stderr.decode()


def test_unknown_model_is_one_line_error(lab):
    three_nodes(lab)
    p = lab.run("generate", "--model", "nosuch:70b", "hi")
    assert p.returncode == 1
    err = one_line_error(p)
    assert 'model "nosuch:70b" not found on any node' in err
    assert lab.ssh_processes() == []


def test_generate_json_and_no_stream(lab):
    lab.add_node("alpha", ["m:1"])
    p = lab.run("generate", "--model", "m:1", "--json", "--system", "be brief", "x")
    obj = json.loads(p.stdout)
    assert obj["response"] == "Hello from alpha." and obj["done"] is True and obj["node"] == "alpha"
    body = lab.fakes["alpha"].bodies("/api/generate")[0]
    assert body["system"] == "be brief" and body["stream"] is False
    p = lab.run("generate", "--model", "m:1", "--no-stream", "x")
    assert p.stdout.decode() == "Hello from alpha.\n"


def test_model_from_env(lab):
    lab.add_node("alpha", ["envmodel:2b"])
    p = lab.run("generate", "x", env=lab.env(MESH_MODEL="envmodel:2b"))
    assert p.returncode == 0 and lab.fakes["alpha"].bodies("/api/generate")[0]["model"] == "envmodel:2b"


@pytest.mark.parametrize("args, message", [
    (["generate", ""], "empty prompt"),
    (["generate", "--bogus", "x"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice"),
    (["--connect-timeout", "-1", "test"], "must be > 0"),
])
def test_usage_errors(lab, args, message):
    lab.add_node("alpha", ["m"])
    p = lab.run(*args)
    assert p.returncode == 2
    assert message in one_line_error(p)


def test_unreadable_config_is_usage_error(lab, tmp_path):
    p = subprocess.run([sys.executable, MESH, "--config", str(tmp_path / "nope"), "test"],
                       capture_output=True, env=lab.env())
    assert p.returncode == 2 and "no such file" in one_line_error(p)
    p = subprocess.run([sys.executable, MESH, "test"], capture_output=True,
                       env=lab.env(MESH_SSH_CONFIG=str(tmp_path / "nope")))
    assert p.returncode == 2 and "MESH_SSH_CONFIG=" in one_line_error(p)


def test_no_stdin_at_all(lab):
    """Run with standard input closed (as under some CI and cron): a clear usage error."""
    lab.add_node("a", ["qwen2.5:7b"])
    p = subprocess.run([sys.executable, MESH, "--config", lab.config_path, "generate"],
                       capture_output=True, env=lab.env(), stdin=None, close_fds=True,
                       preexec_fn=lambda: os.close(0))
    assert p.returncode == 2 and "no prompt" in one_line_error(p)


def test_chat_keeps_history(lab):
    lab.add_node("alpha", ["qwen2.5:7b"])
    p = lab.run("chat", input="first question\nsecond question\n".encode())
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode() == "Hello from alpha.\nHello from alpha.\n"
    second = lab.fakes["alpha"].bodies("/api/chat")[1]["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"] == "Hello from alpha." and second[2]["content"] == "second question"


def test_ctrl_c_ends_cleanly_without_orphans(lab):
    fake = lab.add_node("alpha", ["qwen2.5:7b"], token_delay=0.5, tokens=["t"] * 40)
    # SIGINT as a terminal gives it: a test run started in the background by a shell (`&`)
    # has SIGINT ignored, and mesh.py, like any program, rightly keeps ignoring it then.
    proc = subprocess.Popen(["env", "--default-signal=INT", sys.executable, MESH, "--config", lab.config_path,
                             "generate", "hi"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=lab.env())
    os.set_blocking(proc.stdout.fileno(), False)
    wait_for(lambda: proc.stdout.read(1), 20, "the first token")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and "Traceback" not in err.decode(), err.decode()
    wait_for(lambda: fake.active == 0, 10, "the node's request to end")
    assert lab.ssh_processes() == []


def test_local_pseudo_node_without_any_ssh_node(lab, tmp_path):
    fake = FakeOllama(["qwen2.5:7b"], name="local")
    try:
        cfg = tmp_path / "empty_config"
        cfg.write_text("Host *\n    ServerAliveInterval 60\n")
        env = lab.env(OLLAMA_HOST=f"127.0.0.1:{fake.port}")
        p = subprocess.run([sys.executable, MESH, "--config", str(cfg), "nodes"], capture_output=True, env=env)
        assert p.stdout.decode().startswith("local ")
        p = subprocess.run([sys.executable, MESH, "--config", str(cfg), "generate", "hi"],
                           capture_output=True, env=env)
        assert p.returncode == 0 and p.stdout.decode() == "Hello from local.\n", p.stderr.decode()
    finally:
        fake.close()


def test_help_for_every_command():
    for args in ([], ["test"], ["nodes"], ["generate"], ["chat"], ["serve"], ["bench"], ["run"], ["list"], ["ps"],
                 ["show"], ["pull"], ["rm"], ["stop"], ["connections"]):
        p = subprocess.run([sys.executable, MESH, *args, "--help"], capture_output=True)
        assert p.returncode == 0 and b"usage: mesh.py" in p.stdout


def test_bench_measures_nodes_that_have_the_model(lab):
    lab.add_node("alpha", ["qwen2.5:7b"])
    lab.add_node("beta", ["llama3"])
    p = lab.run("bench", "--runs", "2")
    out = p.stdout.decode()
    assert p.returncode == 0, p.stderr.decode()
    alpha = [line.split() for line in out.splitlines() if " alpha " in f" {line} "][0]
    assert alpha[:2] == ["alpha", "2"] and float(alpha[2]) > 0 and alpha[3] == "4000.0"  # eval_count/eval_duration
    assert any("beta" in line and "does not have the model" in line for line in out.splitlines())
    p = lab.run("bench", "--model", "nosuch")
    assert p.returncode == 1 and one_line_error(p)


@pytest.mark.parametrize("transport", ["forward", "stdio", "exec"])
def test_users_remote_command_and_tty_settings_do_not_interfere(lab, transport):
    lab.add_node("a", ["qwen2.5:7b"], settings=f"transport={transport}")
    lab.extra_config = "Host *\n    RemoteCommand echo hijacked\n    RequestTTY yes\n"
    lab.write_config()
    p = lab.run("generate", "hi")
    assert p.returncode == 0 and p.stdout.decode() == "Hello from a.\n", p.stderr.decode()


def test_this_machine_as_a_node_over_plain_http(lab):
    lab.add_node("a", ["qwen2.5:7b"])
    here = FakeOllama(["only-here:1b"], name="here")
    try:
        lab.extra_config = f"Host here\n    # mesh: transport=http ollama_host=127.0.0.1 ollama_port={here.port}\n"
        lab.write_config()
        p = lab.run("-v", "generate", "--model", "only-here:1b", "hi")
        assert p.returncode == 0 and "served by here" in p.stderr.decode(), p.stderr.decode()
        rows = json.loads(lab.run("test", "--json").stdout)
        assert {r["name"]: r["ok"] for r in rows} == {"a": True, "here": True}
        assert [r["transport"] for r in rows] == ["forward", "http"] and rows[1]["ssh_ms"] is None
    finally:
        here.close()


# -- the commands an Ollama user knows, over the whole pool (issue 15) ---------------

def test_list_ps_show_over_the_pool(lab):
    lab.add_node("alpha", ["qwen2.5:7b", "llama3"], loaded=["qwen2.5:7b"])
    lab.add_node("beta", ["qwen2.5:7b"])
    p = lab.run("list")
    assert p.returncode == 0, p.stderr.decode()
    lines = p.stdout.decode().splitlines()
    assert lines[0].split() == ["NAME", "ID", "SIZE", "MODIFIED", "NODES"]
    assert lines[1].split()[0] == "llama3" and lines[1].endswith("alpha")
    assert lines[2].split()[0] == "qwen2.5:7b" and lines[2].endswith("alpha, beta") and "1.0 KB" in lines[2]
    listed = json.loads(lab.run("ls", "--json").stdout)
    assert [(m["name"], m["nodes"]) for m in listed["models"]] == [("llama3", ["alpha"]),
                                                                   ("qwen2.5:7b", ["alpha", "beta"])]
    assert listed["down"] == {}

    p = lab.run("ps")
    lines = p.stdout.decode().splitlines()
    assert lines[0].split() == ["NAME", "NODE", "SIZE", "PROCESSOR", "UNTIL"]
    assert lines[1].split()[:3] == ["qwen2.5:7b", "alpha", "2.0"] and "50%/50% CPU/GPU" in lines[1]
    assert lines[1].endswith("4 minutes from now"), lines[1]
    ps = json.loads(lab.run("ps", "--json").stdout)
    assert [(m["name"], m["node"]) for m in ps["models"]] == [("qwen2.5:7b", "alpha")]

    p = lab.run("show", "llama3")
    out = p.stdout.decode()
    assert p.returncode == 0 and "parameters          7.6B" in out and "node                alpha" in out, out
    assert lab.run("show", "--license", "llama3").stdout.decode() == "FAKE LICENSE\n"
    assert json.loads(lab.run("show", "--json", "llama3").stdout)["node"] == "alpha"
    p = lab.run("show", "lama3")
    assert p.returncode == 1
    assert 'model "lama3" not found on any node' in one_line_error(p) and "closest: llama3" in p.stderr.decode()


def test_pull_onto_every_node_one_failing_does_not_stop_the_others(lab):
    lab.add_node("alpha", ["llama3"])
    lab.add_node("beta", ["llama3"]).pull_error = "pull model manifest: file does not exist"
    lab.add_node("gamma", ["llama3"])
    lab.nodes["gamma"].kill()
    p = lab.run("pull", "phi3:mini")
    assert p.returncode == 1
    out = p.stdout.decode()
    assert out.splitlines() == ["alpha  success", "beta   error: pull model manifest: file does not exist",
                                "gamma  error: down: ssh: connection refused"]
    assert "\x1b" not in out + p.stderr.decode()    # not a terminal: nothing drawn
    assert "phi3:mini" in lab.fakes["alpha"].models
    p = lab.run("pull", "--json", "qwen2:0.5b", "alpha")
    assert p.returncode == 0 and json.loads(p.stdout) == [{"node": "alpha", "ok": True, "error": None}]
    assert "qwen2:0.5b" not in lab.fakes["beta"].models
    p = lab.run("pull", "x", "nosuch")
    assert p.returncode == 2 and "unknown node 'nosuch'" in one_line_error(p)


def test_rm_asks_first_and_stop_unloads(lab):
    lab.add_node("alpha", ["llama3", "phi3:mini"], loaded=["llama3"])
    lab.add_node("beta", ["llama3"], loaded=["llama3"])
    p = lab.run("rm", "phi3:mini")
    assert p.returncode == 2 and "add --yes" in one_line_error(p)
    assert "phi3:mini" in lab.fakes["alpha"].models
    p = lab.run("rm", "--yes", "phi3:mini")
    assert p.returncode == 0 and p.stdout.decode() == "alpha  deleted 'phi3:mini'\n"
    assert lab.fakes["alpha"].models == ["llama3"] and lab.fakes["beta"].models == ["llama3"]
    p = lab.run("rm", "--yes", "phi3:mini")
    assert p.returncode == 1 and 'model "phi3:mini" not found on any node' in one_line_error(p)

    p = lab.run("stop", "--json", "llama3")
    assert p.returncode == 0 and {r["node"] for r in json.loads(p.stdout)} == {"alpha", "beta"}
    assert lab.fakes["alpha"].loaded == [] and lab.fakes["beta"].loaded == []
    unload = lab.fakes["alpha"].bodies("/api/generate")[-1]
    assert unload["keep_alive"] == 0 and "prompt" not in unload
    p = lab.run("stop", "llama3")
    assert p.returncode == 1 and "couldn't find model \"llama3\" to stop" in one_line_error(p)

    # a node that is down may still hold the model: it is named, and the command is not a success
    lab.add_node("gamma", ["llama3"], loaded=["llama3"])
    lab.fakes["gamma"].stop()
    p = lab.run("stop", "llama3")
    assert p.returncode == 1 and "(not loaded on any node; gamma is down (" in one_line_error(p)
    p = lab.run("rm", "--yes", "llama3")
    assert p.returncode == 1 and "gamma is down" in p.stderr.decode()
    assert p.stdout.decode().splitlines()[-1].startswith("gamma  error: down: ")


def test_misspelt_model_with_a_node_down_is_not_found_not_that_nodes_fault(lab):
    lab.add_node("alpha", ["llama3"])
    lab.add_node("beta", ["qwen2.5:7b"])
    lab.nodes["beta"].kill()
    p = lab.run("generate", "--model", "lama3", "hi")
    assert p.returncode == 1
    err = one_line_error(p)
    assert 'model "lama3" not found on any node (searched: alpha); down: beta (ssh: connection refused)' in err
    assert err.rstrip().endswith("closest: llama3")


def test_run_generate_hint_short_help(lab):
    lab.add_node("alpha", ["llama3"])
    p = lab.run("run", "llama3", "why", "is", "the", "sky", "blue")
    assert p.returncode == 0 and p.stdout.decode() == "Hello from alpha.\n", p.stderr.decode()
    assert lab.fakes["alpha"].bodies("/api/generate")[-1]["prompt"] == "why is the sky blue"
    p = lab.run("run", "llama3", input=b"from a pipe\n")
    assert p.returncode == 0 and lab.fakes["alpha"].bodies("/api/generate")[-1]["prompt"] == "from a pipe\n"
    p = lab.run("run", "llama3", "sum", "this", "up", input=b"notes\n")     # both, as ollama run joins them
    assert p.returncode == 0 and lab.fakes["alpha"].bodies("/api/generate")[-1]["prompt"] == "notes\n sum this up"
    p = lab.run("generate", "llama3", "why is the sky blue")
    assert p.returncode == 2 and 'mesh.py run llama3 "why is the sky blue"' in one_line_error(p)
    p = subprocess.run([sys.executable, MESH], capture_output=True)
    assert p.returncode == 0 and p.stdout.startswith(b"usage: mesh.py COMMAND")
    assert all(f"\n  {c} ".encode() in p.stdout for c in ("run", "list", "ps", "pull", "rm", "stop", "serve"))


def test_words_after_an_option_and_missing_arguments_as_ollama_users_type_them(lab):
    """`ollama run MODEL --verbose PROMPT` habit: words after a flag still belong to the prompt/nodes."""
    lab.add_node("alpha", ["llama3"])
    lab.add_node("beta", ["llama3"])
    p = lab.run("run", "llama3", "--verbose", "why", "is", "the", "sky", "blue")
    assert p.returncode == 0 and p.stdout.decode() in ("Hello from alpha.\n", "Hello from beta.\n")
    assert "served by" in p.stderr.decode()
    bodies = lab.fakes["alpha"].bodies("/api/generate") + lab.fakes["beta"].bodies("/api/generate")
    assert [b["prompt"] for b in bodies] == ["why is the sky blue"]
    p = lab.run("run", "llama3", "--keepalive", "10m", "hi")          # ollama run's spelling of the flag
    assert p.returncode == 0, p.stderr.decode()
    bodies = lab.fakes["alpha"].bodies("/api/generate") + lab.fakes["beta"].bodies("/api/generate")
    assert [b.get("keep_alive") for b in bodies if b["prompt"] == "hi"] == ["10m"]
    p = lab.run("pull", "llama3", "--json", "beta")
    assert p.returncode == 0 and [r["node"] for r in json.loads(p.stdout)] == ["beta"], p.stderr.decode()
    p = lab.run("run", "llama3", "hi", "--bogus")
    assert p.returncode == 2 and "unrecognized arguments: --bogus" in one_line_error(p)
    for cmd in ("rm", "stop", "run"):   # NODE/PROMPT are optional: only MODEL is named as missing
        p = lab.run(cmd)
        assert p.returncode == 2 and one_line_error(p).endswith("the following arguments are required: MODEL\n")
    p = lab.run("-v")   # global options but no command: the short help, as with no arguments
    assert p.returncode == 0 and p.stdout.startswith(b"usage: mesh.py COMMAND"), p.stderr.decode()

@pytest.mark.parametrize("command", [["generate", "hi"], ["list"], ["ps"]])
def test_no_config_and_no_local_ollama_says_so(lab, tmp_path, command):
    cfg = tmp_path / "empty_config"
    cfg.write_text("Host *\n    ServerAliveInterval 60\n")
    env = lab.env(OLLAMA_HOST=f"127.0.0.1:{lab_free_port()}")
    p = subprocess.run([sys.executable, MESH, "--config", str(cfg), *command], capture_output=True, env=env)
    assert p.stdout == b""    # no empty table
    assert p.returncode == 1
    note, err = p.stderr.decode().splitlines()          # the no-marked-Host note, then the error
    assert note.startswith(f"mesh: no Host in {cfg} is marked as a node") and "# mesh: on" in note
    assert err.startswith("mesh: error: ") and "Traceback" not in err
    assert f"no nodes: {cfg} has no Host marked '# mesh: on', and no Ollama answers on this machine" in err
    assert "connection refused" in err and "Add a node: a Host block with a '# mesh: on' line in" in err


def test_bench_exits_1_when_a_node_could_not_be_measured(lab):
    lab.add_node("alpha", ["qwen2.5:7b"])
    lab.add_node("beta", ["qwen2.5:7b"])
    lab.nodes["beta"].kill()
    p = lab.run("bench", "qwen2.5:7b", "--runs", "1")            # the model as `run MODEL` takes it
    assert p.returncode == 1 and "could not measure beta (down: ssh: connection refused)" in one_line_error(p)
    assert any(line.split()[:2] == ["alpha", "1"] for line in p.stdout.decode().splitlines())


def test_node_facts_over_ssh_in_test_and_ps_and_status(lab, tmp_path):
    """GPU from nvidia-smi (a stand-in on the node's PATH), RAM and load from /proc, over the master."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA GeForce RTX 4090, 24564, 1234'\n")
    smi.chmod(0o755)
    lab.add_node("gpu", ["qwen2.5:7b"], loaded=["qwen2.5:7b"],
                 sshd_extra=f"SetEnv PATH={bin_dir}:/usr/local/bin:/usr/bin:/bin")
    lab.add_node("cpu", ["qwen2.5:7b"])
    rows = {r["name"]: r for r in json.loads(lab.run("test", "--json").stdout)}
    gpu, cpu = rows["gpu"]["facts"], rows["cpu"]["facts"]
    assert gpu["gpu"] == "NVIDIA GeForce RTX 4090" and gpu["vram_total"] == 24564 << 20
    assert gpu["ram_total"] > 0 and "load_1m" in gpu and gpu["cpus"] >= 1
    assert "gpu" not in cpu and cpu["ram_total"] == gpu["ram_total"]      # no GPU: simply less
    line = [x for x in lab.run("test").stdout.decode().splitlines() if " gpu " in x][0]
    assert "NVIDIA GeForce RTX 4090 1.3/25.8 GB VRAM" in line and "RAM " in line and "load " in line
    out = lab.run("ps").stdout.decode()
    assert "NODE" in out and "GPU" in out and "RTX 4090" in out
    status = json.loads(lab.run("ps", "--json").stdout)["nodes"]
    assert [n["facts"].get("gpu") for n in status] == ["NVIDIA GeForce RTX 4090", None]


def test_routing_leaves_out_a_node_that_cannot_hold_the_model(mesh_env):
    import asyncio
    import mesh
    lab = mesh_env
    lab.add_node("small", ["big:70b"])
    lab.add_node("large", ["big:70b"])

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path) as orch:
            await orch.refresh(force=True)
            for node in orch.nodes:
                node.models[mesh.model_key("big:70b")]["size"] = 40_000_000_000
            orch.node("small").facts = {"vram_total": 8 << 30, "ram_total": 16 << 30}
            orch.node("large").facts = {"vram_total": 48 << 30, "ram_total": 64 << 30}
            served = [(await orch.generate("hi", model="big:70b"))["node"] for _ in range(6)]
            orch.node("small").facts, orch.node("large").facts = orch.node("large").facts, {"ram_total": 1 << 30}
            swapped = [(await orch.generate("hi", model="big:70b"))["node"] for _ in range(6)]
            orch.node("small").facts = {"ram_total": 1 << 30}     # now neither could: Ollama decides
            last = await orch.generate("hi", model="big:70b")
            return served, swapped, last
    served, swapped, last = asyncio.run(go())
    assert served == ["large"] * 6 and swapped == ["small"] * 6
    assert last["node"] in ("small", "large") and last["response"]


def test_connections_lists_and_stops_meshs_own_masters(lab):
    lab.add_node("alpha", ["qwen2.5:7b"])
    lab.add_node("beta", ["qwen2.5:7b"], settings="transport=exec")
    p = lab.run("connections")
    assert p.returncode == 0 and p.stdout == b"" and b"no ssh masters" in p.stderr
    assert lab.run("test").returncode == 0
    masters = json.loads(lab.run("connections", "--json").stdout)
    assert sorted((m["node"], m["transport"], m["alive"]) for m in masters) == [("alpha", "forward", True),
                                                                               ("beta", "exec", True)]
    lines = lab.run("connections").stdout.decode().splitlines()
    assert lines[0].split() == ["NODE", "SINCE", "TRANSPORT", "STATE", "SOCKET"]
    assert {tuple(x.split()[:1]) for x in lines[1:]} == {("alpha",), ("beta",)}
    assert "just now" in lines[1] or " ago " in lines[1]      # SINCE, however fast the run was
    assert len(lab.ssh_processes(include_masters=True)) == 2

    p = lab.run("connections", "--stop", "alpha")
    assert p.returncode == 0 and p.stdout.decode().startswith("stopped alpha (")
    assert [m["node"] for m in json.loads(lab.run("connections", "--json").stdout)] == ["beta"]
    wait_for(lambda: len(lab.ssh_processes(include_masters=True)) == 1, 10, "alpha's master to end")
    p = lab.run("connections", "--stop", "alpha")
    assert p.returncode == 1 and b"no ssh master for alpha" in p.stderr
    assert lab.run("connections", "--stop").returncode == 0
    wait_for(lambda: lab.ssh_processes(include_masters=True) == [], 10, "every master to end")
    assert lab.control_sockets() == [] and [f for _, _, fs in os.walk(lab.control_dir) for f in fs] == []
    assert lab.run("generate", "hi").returncode == 0       # the next command starts a new master
