"""SSH safety (issue 12): a control directory that is provably ours, ssh calls that do
only what mesh asks whatever the user's config says, one master per resolved
destination, and only the hosts the user marked are nodes."""
import asyncio
import json
import os
import socket
import stat
import subprocess
import sys

import pytest

import mesh
from conftest import needs_sshd
from lab import MESH, FakeOllama, free_port, wait_for

FAST = dict(connect_timeout=3, first_byte_timeout=30, idle_timeout=5, liveness_interval=0.5)
NOBODY = 65534


def run(coro):
    return asyncio.run(coro)


def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True
    except OSError:
        return False


# -- the control directory ------------------------------------------------------------

def test_shared_control_dir_is_left_alone_and_gets_a_private_subdirectory(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)                        # like /tmp
    monkeypatch.setenv("MESH_CONTROL_DIR", str(shared))
    path = mesh.control_dir()
    assert path == str(shared / f"mesh-{os.getuid()}")
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777        # sticky bit and mode untouched
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700


@pytest.mark.skipif(os.getuid() != 0, reason="planting another user's files needs root")
@pytest.mark.parametrize("plant, why", [
    ("other_owner", "owned by uid 65534"), ("symlink", "is a symlink"), ("loose_mode", "mode is 0755"),
])
def test_a_planted_control_subdirectory_is_refused_untouched(tmp_path, plant, why):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    sub = shared / f"mesh-{os.getuid()}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if plant == "symlink":
        os.symlink(elsewhere, sub)
    else:
        sub.mkdir()
        os.chmod(sub, 0o755)
        if plant == "other_owner":
            os.chown(sub, NOBODY, NOBODY)
    cfg = tmp_path / "config"
    cfg.write_text("Host n\n  HostName 127.0.0.1\n  Port 1\n  # mesh: on\n")
    p = subprocess.run([sys.executable, MESH, "--config", str(cfg), "test"], capture_output=True, text=True,
                       env=dict(os.environ, MESH_CONTROL_DIR=str(shared)), timeout=30)
    assert p.returncode == 1 and why in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1
    assert os.listdir(elsewhere) == []
    if plant != "symlink":
        assert stat.S_IMODE(os.lstat(sub).st_mode) == 0o755                 # never chmod-ed


@pytest.mark.skipif(os.getuid() != 0, reason="a directory of another user's needs root")
@pytest.mark.parametrize("mode, owner, why", [
    (0o1777, NOBODY, "owned by uid 65534, who could replace"),      # its owner may rename mesh-UID
    (0o777, 0, "writable by others (mode 0777, not sticky)"),        # anyone may rename mesh-UID
])
def test_a_control_dir_others_could_swap_is_refused_untouched(tmp_path, mode, owner, why):
    """Another user who may rename entries of MESH_CONTROL_DIR could swap mesh's private
    subdirectory for their own while mesh runs: refused, one line, by every command
    (list with two nodes checked them in background tasks that each printed a traceback)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    os.chown(shared, owner, owner)
    cfg = tmp_path / "config"
    cfg.write_text("Host n1 n2\n  HostName 127.0.0.1\n  Port 1\n  # mesh: on\n")
    for command in ("list", "test"):
        p = subprocess.run([sys.executable, MESH, "--config", str(cfg), command], capture_output=True, text=True,
                           env=dict(os.environ, MESH_CONTROL_DIR=str(shared)), timeout=30)
        assert p.returncode == 1 and p.stdout == "", (command, p.stdout)
        assert p.stderr.startswith("mesh: error: MESH_CONTROL_DIR=") and why in p.stderr, p.stderr
        assert p.stderr.count("\n") == 1, p.stderr
    assert os.listdir(shared) == [] and stat.S_IMODE(os.stat(shared).st_mode) == mode


@pytest.mark.skipif(os.getuid() != 0, reason="another user's symlink needs root")
def test_a_control_dir_through_another_users_symlink_is_refused(tmp_path):
    """MESH_CONTROL_DIR=/tmp/x where another user made /tmp/x a symlink to a directory
    of root's: nothing is created there (mesh-0 appeared in the target)."""
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    os.symlink(target, link)
    os.lchown(link, NOBODY, NOBODY)
    cfg = tmp_path / "config"
    cfg.write_text("Host n\n  HostName 127.0.0.1\n  Port 1\n  # mesh: on\n")
    p = subprocess.run([sys.executable, MESH, "--config", str(cfg), "test"], capture_output=True, text=True,
                       env=dict(os.environ, MESH_CONTROL_DIR=str(link)), timeout=30)
    assert p.returncode == 1 and "owned by uid 65534" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert os.listdir(target) == []


@needs_sshd
@pytest.mark.skipif(os.getuid() != 0, reason="planting another user's socket needs root")
def test_a_socket_not_owned_by_the_user_is_never_used(mesh_env):
    lab = mesh_env
    lab.add_node("solo", ["m:1"])
    rogue = socket.socket(socket.AF_UNIX)

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **FAST) as m:
            t = m.node("solo").transport
            os.makedirs(t.dir, exist_ok=True)
            for path in (t.ctl, t.fwd):                 # someone else's sockets, listening
                s = socket.socket(socket.AF_UNIX)
                s.bind(path)
                s.listen(8)
                s.setblocking(False)
                os.chown(path, NOBODY, NOBODY)
                rogue_socks.append(s)
            return await m.generate("secret prompt", model="m:1")

    rogue_socks = [rogue]
    try:
        r = run(go())
        for s in rogue_socks[1:]:
            with pytest.raises(BlockingIOError):
                s.accept()                              # nobody ever connected to them
    finally:
        for s in rogue_socks:
            s.close()
    assert r["response"] == "Hello from solo."


# -- ssh options: the user's config cannot make mesh's ssh calls do more -------------------

@needs_sshd
@pytest.mark.parametrize("transport", ["forward", "stdio", "exec"])
def test_users_forwards_stdin_null_and_quiet_log_change_nothing(lab, tmp_path, transport):
    """LocalForward/RemoteForward are not opened, StdinNull does not empty the body, and
    with LogLevel QUIET a failure still names ssh's reason; the control dir may hold
    a space and a '%'."""
    fake = lab.add_node("n", ["m:1"], settings=f"transport={transport}")
    local_port, remote_port = free_port(), free_port()
    lab.extra_config = (f"Host *\n  LocalForward 127.0.0.1:{local_port} 127.0.0.1:{fake.port}\n"
                        f"  RemoteForward 127.0.0.1:{remote_port} 127.0.0.1:{fake.port}\n"
                        "  StdinNull yes\n  LogLevel QUIET\n")
    lab.write_config()
    odd = os.path.join(lab.control_dir, "a b%c")
    env = lab.env(MESH_CONTROL_DIR=odd)
    p = lab.run("generate", "--model", "m:1", "the prompt", env=env)
    assert p.returncode == 0 and p.stdout.decode() == "Hello from n.\n", p.stderr.decode()
    assert fake.bodies("/api/generate")[0]["prompt"] == "the prompt"
    assert not listening(local_port) and not listening(remote_port)
    assert lab.control_sockets() and all(" b%c/" in s for s in lab.control_sockets())
    lab.stop_masters()
    lab.nodes["n"].kill()
    p = lab.run("--connect-timeout", "3", "test", env=env)
    assert p.returncode == 1 and "connection refused" in p.stdout.decode(), p.stdout.decode()


@pytest.mark.parametrize("stderr, reason", [
    ("Received disconnect from 127.0.0.1 port 22:2: Too many authentication failures\r\n"
     "Disconnected from 127.0.0.1 port 22\r\n", "too many authentication failures (ssh offered more keys "
                                                 "than the server allows before the right one; give the node "
                                                 "its key with IdentityFile, listed first"),
    ("alice@10.0.0.5: Permission denied (publickey).\r\n", "authentication failed"),
    ("ssh: connect to host 10.0.0.5 port 22: Connection refused\r\n", "connection refused"),
    ("", "ssh exited with status 255"),
])
def test_ssh_failure_names_the_real_reason(stderr, reason):
    assert reason in mesh.describe_ssh_failure(stderr, 255)


@needs_sshd
def test_too_many_keys_is_named_with_loglevel_error(lab, tmp_path):
    """Seven other IdentityFile lines before the node's key and LogLevel ERROR: sshd
    disconnects after MaxAuthTries (6); the user reads why and what to do."""
    lab.add_node("n", ["m:1"])
    keys = ""
    for i in range(7):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / f"k{i}")], check=True)
        keys += f"    IdentityFile {tmp_path / f'k{i}'}\n"
    block = lab.host_block("n").replace("    IdentityFile", keys + "    IdentityFile", 1)
    with open(lab.config_path, "w") as fh:
        fh.write(block + "    LogLevel ERROR\n")
    p = lab.run("test")
    assert p.returncode == 1 and "ssh: too many authentication failures" in p.stdout.decode(), p.stdout
    assert "listed first" in p.stdout.decode()


def test_setup_script_checks_nodes_with_meshs_own_options():
    script = open(os.path.join(os.path.dirname(MESH), "setup-ssh-mesh.sh")).read()
    line = script.split("MESH_SSH_OPTS=(", 1)[1].split(")", 1)[0].split()
    opts = {line[i + 1] for i in range(0, len(line), 2) if line[i] == "-o"}
    assert {o for o in opts if not o.startswith(("ConnectTimeout=", "ControlPath="))} == \
        set(mesh.SSH_OPTIONS) | {mesh.SESSION_OPTION}             # the check runs a command: `true`
    assert "IdentitiesOnly=yes" not in script                # the blocks carry it, the check adds nothing


# -- which hosts are nodes ---------------------------------------------------------------

def nodes_json(cfg, *extra, env=None):
    p = subprocess.run([sys.executable, MESH, "--config", str(cfg), "nodes", "--json", *extra],
                       capture_output=True, text=True, env=env)
    return p.returncode, json.loads(p.stdout or "null"), p.stderr


def test_only_marked_hosts_are_nodes_and_all_says_why(tmp_path):
    cfg = tmp_path / "config"
    cfg.write_text("Host gpu1 gpu2\n  HostName 192.0.2.7\n  # mesh: weight=2\n"
                   "Host github.com work\n  User git\n"
                   "Host cpu\n  # mesh: on\nHost old\n  # mesh: off\n  # mesh: on\n"
                   "Host *\n  # mesh: max_concurrent=4\n")
    rc, rows, _ = nodes_json(cfg)
    assert rc == 0 and [r["name"] for r in rows] == ["gpu1", "gpu2", "cpu"]
    assert all(r["max_concurrent"] == 4 for r in rows)             # Host * gives defaults, marks nobody
    rc, rows, _ = nodes_json(cfg, "--all")
    by = {r["name"]: r for r in rows}
    assert [r["name"] for r in rows] == ["gpu1", "gpu2", "github.com", "work", "cpu", "old"]
    assert by["gpu1"]["node"] is True and by["gpu1"]["reason"] is None and by["gpu1"]["hostname"] == "192.0.2.7"
    assert by["github.com"]["node"] is False and "# mesh: on" in by["github.com"]["reason"]
    assert "under 'Host *'" in by["github.com"]["reason"]        # why its max_concurrent=4 did not mark it
    assert by["github.com"]["user"] == "git"
    assert by["old"]["node"] is False and "off" in by["old"]["reason"]
    p = subprocess.run([sys.executable, MESH, "--config", str(cfg), "--nodes", "work", "test"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "'work' is not a node" in p.stderr


@needs_sshd
def test_unmarked_hosts_are_never_contacted(lab, tmp_path):
    lab.add_node("a", ["m:1"])
    lab.add_node("b", ["m:1"])
    touched = tmp_path / "touched"
    lab.extra_config = f"Host github.com work\n  ProxyCommand touch {touched}\n"
    lab.write_config()
    p = lab.run("test")
    assert p.returncode == 0 and "2 of 2 nodes healthy" in p.stderr.decode(), p.stderr.decode()
    p = lab.run("generate", "--model", "m:1", "x")
    assert p.returncode == 0 and not touched.exists()


@needs_sshd
def test_no_marked_host_means_the_local_ollama_with_a_note(lab, tmp_path):
    fake = FakeOllama(["m:1"], name="local")
    touched = tmp_path / "touched"
    try:
        cfg = tmp_path / "config"
        cfg.write_text(f"Host github.com\n  User git\n  ProxyCommand touch {touched}\n")
        env = lab.env(OLLAMA_HOST=f"127.0.0.1:{fake.port}")
        p = subprocess.run([sys.executable, MESH, "--config", str(cfg), "generate", "--model", "m:1", "hi"],
                           capture_output=True, text=True, env=env)
        assert p.returncode == 0 and p.stdout == "Hello from local.\n"
        assert "no Host" in p.stderr and "node 'local'" in p.stderr and "# mesh: on" in p.stderr
        assert not touched.exists()
    finally:
        fake.close()


# -- one master per resolved destination ----------------------------------------------------

def _alias_n(lab):
    """Two machines, "first" and "second", and a function that points alias n (the only
    Host in the config) at one of them, as an edit of its HostName and Port does."""
    lab.add_node("first", ["m:1"])
    lab.add_node("second", ["m:1"])

    def point_n_at(name):
        with open(lab.config_path, "w") as fh:
            fh.write(lab.host_block(name).replace(f"Host {name}\n", "Host n\n"))
    return point_n_at


@needs_sshd
def test_a_changed_hostname_moves_requests_and_retires_the_old_master(mesh_env):
    """The same alias, re-pointed at another machine: a new master for the new one,
    the old master ended, nothing sent to the old machine any more."""
    lab = mesh_env
    point_n_at = _alias_n(lab)

    async def go():
        point_n_at("first")
        async with mesh.MeshOrchestrator(config=lab.config_path, **FAST) as m:
            before = (await m.generate("x", model="m:1"))["response"]
            old_masters = lab.master_pids()
            point_n_at("second")
            report = m.reload()
            after = (await m.generate("x", model="m:1"))["response"]
            for _ in range(200):                        # the old master is retired in the background
                if not set(old_masters) & set(lab.master_pids()):
                    break
                await asyncio.sleep(0.05)
            return before, after, report, old_masters, lab.master_pids()

    before, after, report, old, now = run(go())
    assert before == "Hello from first." and after == "Hello from second."
    assert report == {"added": [], "changed": ["n"], "removed": []}
    assert len(old) == 1 and len(now) == 1 and now != old


@needs_sshd
def test_a_one_shot_command_after_an_edit_retires_the_old_master(mesh_env):
    """`generate` after a HostName edit: the answer comes from the new machine, and the
    master the previous command left for the old one ends instead of staying connected
    for ControlPersist seconds; `connections` lists only the new one."""
    lab = mesh_env
    point_n_at = _alias_n(lab)

    point_n_at("first")
    p = lab.run("generate", "--model", "m:1", "x")
    assert p.returncode == 0 and p.stdout == b"Hello from first.\n"
    old = lab.master_pids()
    point_n_at("second")
    p = lab.run("generate", "--model", "m:1", "x")
    assert p.returncode == 0 and p.stdout == b"Hello from second.\n"
    wait_for(lambda: not set(old) & set(lab.master_pids()), 15, "the old master to end")
    listed = json.loads(lab.run("connections", "--json").stdout)
    assert [m["node"] for m in listed] == ["n"] and len(lab.master_pids()) == 1
