"""setup-ssh-mesh.sh against a real sshd on loopback (issue 4).

The node's sshd runs sessions with HOME set to a temporary directory, so the key
is installed there and never in the real ~/.ssh.  The first contact authenticates
with a bootstrap key held by an ssh-agent the test starts (standing in for the
password a person would type); afterwards only the new mesh key is used."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from conftest import needs_sshd
from lab import MESH, SSHD, _pids_matching, _user, free_port, wait_for

pytestmark = needs_sshd
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "setup-ssh-mesh.sh")


class Node:
    def __init__(self, base, name):
        self.dir = os.path.join(base, name)
        self.home = os.path.join(self.dir, "home")
        os.makedirs(self.home)
        self.port = free_port()
        self.config = os.path.join(self.dir, "sshd_config")
        with open(self.config, "w") as fh:
            fh.write(f"ListenAddress 127.0.0.1:{self.port}\nHostKey {base}/hostkey\nPidFile {self.dir}/pid\n"
                     f"AuthorizedKeysFile {self.home}/.ssh/authorized_keys {base}/bootstrap_keys\n"
                     f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                     f"SetEnv HOME={self.home}\n")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", self.config],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.listening, 10, "sshd")

    def listening(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), 0.2).close()
            return True
        except OSError:
            return False

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        for pid in _pids_matching(self.config):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def env(tmp_path):
    if os.getuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)
    base = str(tmp_path)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{base}/hostkey"], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{base}/bootstrap"], check=True)
    shutil.copy(f"{base}/bootstrap.pub", f"{base}/bootstrap_keys")
    agent_sock = f"{base}/agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", agent_sock], stdout=subprocess.DEVNULL)
    wait_for(lambda: os.path.exists(agent_sock), 10, "ssh-agent")
    home = f"{base}/userhome"
    os.makedirs(f"{home}/.ssh", mode=0o700)
    hostkey = " ".join(open(f"{base}/hostkey.pub").read().split()[:2])
    nodes = {"n1": Node(base, "n1"), "n2": Node(base, "n2")}
    known = f"{base}/known_hosts"
    with open(known, "w") as fh:
        for n in nodes.values():
            fh.write(f"[127.0.0.1]:{n.port} {hostkey}\n")
    config = f"{home}/.ssh/config"
    # the user's own entries, which the script must leave exactly as they are
    user_part = ("# my own settings\nHost github.com\n    User git\n\n"
                 f"Host *\n    UserKnownHostsFile {known}\n    StrictHostKeyChecking yes\n")
    with open(config, "w") as fh:
        fh.write(user_part)
    os.chmod(config, 0o600)
    e = dict(os.environ, HOME=home, SSH_AUTH_SOCK=agent_sock, MESH_CONTROL_DIR=base + "/mc")
    os.makedirs(e["MESH_CONTROL_DIR"], mode=0o700)
    subprocess.run(["ssh-add", "-q", f"{base}/bootstrap"], env=e, check=True, capture_output=True)

    class Env:
        pass
    x = Env()
    x.base, x.home, x.config, x.user_part, x.env, x.nodes, x.known = base, home, config, user_part, e, nodes, known
    x.key = f"{home}/.ssh/mesh_ed25519"
    x.specs = [f"{name}={_user()}@127.0.0.1:{n.port}" for name, n in nodes.items()]
    yield x
    for pid in _pids_matching(e["MESH_CONTROL_DIR"]):
        os.kill(pid, signal.SIGKILL)
    for n in nodes.values():
        n.stop()
    agent.kill()
    agent.wait()


def run_script(x, *args, env=None):
    return subprocess.run(["bash", SCRIPT, "--config", x.config, *args], capture_output=True, text=True,
                          env=env or x.env, timeout=120)


def key_login(x, alias):
    e = dict(x.env)
    e.pop("SSH_AUTH_SOCK")   # only the mesh key may count
    return subprocess.run(["ssh", "-F", x.config, "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", alias, "true"],
                          capture_output=True, env=e, timeout=30).returncode == 0


def test_first_run_installs_key_and_second_changes_nothing(env):
    x = env
    p = run_script(x, *x.specs)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "n1: key added" in p.stdout and "n2: key added" in p.stdout
    assert key_login(x, "n1") and key_login(x, "n2")
    text = open(x.config).read()
    assert text.endswith("\n" + x.user_part)                       # user's entries untouched
    assert text.startswith("# >>> mesh nodes (setup-ssh-mesh.sh) >>>\nHost n1\n")
    # HOME is not the passwd home here, so ssh would not find "~/..": the absolute path is written
    assert f"    IdentityFile {x.key}\n    IdentitiesOnly yes\n    ServerAliveInterval 60\n    # mesh: on\n" in text
    assert oct(os.stat(x.config).st_mode & 0o777) == "0o600"
    before = (open(x.config, "rb").read(), open(x.key, "rb").read(), os.stat(x.config).st_mtime_ns)

    p = run_script(x, *x.specs)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "unchanged" in p.stdout and "n1: key already installed" in p.stdout
    assert (open(x.config, "rb").read(), open(x.key, "rb").read(), os.stat(x.config).st_mtime_ns) == before
    auth = open(os.path.join(x.nodes["n1"].home, ".ssh", "authorized_keys")).read()
    assert auth.count(open(x.key + ".pub").read().split()[1]) == 1   # installed once


def test_dry_run_changes_nothing(env):
    x = env
    p = run_script(x, "--dry-run", *x.specs)
    assert p.returncode == 0 and "would update" in p.stdout and "would install" in p.stdout
    assert not os.path.exists(x.key) and open(x.config).read() == x.user_part
    assert not os.path.exists(os.path.join(x.nodes["n1"].home, ".ssh"))
    run_script(x, *x.specs)
    snapshot = open(x.config, "rb").read()
    p = run_script(x, "--dry-run", x.specs[0].replace("127.0.0.1", "localhost"))
    assert p.returncode == 0 and "would update" in p.stdout
    assert open(x.config, "rb").read() == snapshot


@pytest.mark.parametrize("spec", ["noequals", "=root@h", "a b=h", "a=h:99999", "a=u@", "a=h:port", "a=[::1"])
def test_bad_node_spec_is_usage_error(env, spec):
    p = run_script(env, spec)
    assert p.returncode == 2
    assert p.stderr.startswith("setup-ssh-mesh.sh: error: ") and "Traceback" not in p.stderr
    assert open(env.config).read() == env.user_part


def test_changed_node_updated_in_place_and_failures_do_not_stop_others(env):
    x = env
    run_script(x, *x.specs)
    dead = f"dead=127.0.0.1:{free_port()}"
    changed = x.specs[0]
    nodes_file = os.path.join(x.base, "nodes.txt")
    with open(nodes_file, "w") as fh:
        fh.write(f"# my nodes\n{changed}   name=\"Vengeance RTX 4090\" weight=3   # the 4090\n\n{dead}\n")
    p = run_script(x, "--nodes-file", nodes_file)
    assert p.returncode == 1
    assert "dead: FAILED" in p.stdout and "check n1: ok" in p.stdout
    text = open(x.config).read()
    region = text.split("# <<< mesh nodes <<<")[0]
    assert region.index("Host n1") < region.index("Host n2") < region.index("Host dead")   # in place, new at end
    assert '    # mesh: on name="Vengeance RTX 4090" weight=3\n' in region
    rows = json.loads(subprocess.run([sys.executable, MESH, "--config", x.config, "nodes", "--json"],
                                     capture_output=True, text=True, env=x.env).stdout)
    assert [r["name"] for r in rows] == ["n1", "n2", "dead"]          # github.com is not marked
    assert rows[0]["display_name"] == "Vengeance RTX 4090" and rows[0]["weight"] == 3


def test_accept_new_and_strict_default(env):
    x = env
    open(x.known, "w").close()    # host keys unknown now
    p = run_script(x, x.specs[0])
    assert p.returncode == 1 and "Host key verification failed" in p.stdout   # never turned off by default
    p = run_script(x, "--accept-new", x.specs[0])
    assert p.returncode == 0, p.stdout + p.stderr
    assert str(x.nodes["n1"].port) in open(x.known).read()


def test_shellcheck_clean():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck not installed")
    p = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout


def test_example_config_lists_the_three_nodes():
    p = subprocess.run([sys.executable, MESH, "--config", os.path.join(ROOT, "ssh_config.example"), "nodes", "--json"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    assert [r["name"] for r in rows] == ["vengeance", "aurora", "runpod"]
    runpod = rows[2]
    assert runpod["port"] == 13323 and runpod["hostname"] == "198.51.100.132"
    assert all(r["display_name"] != r["name"] for r in rows)


def test_nodes_file_comments_and_quoted_hash(tmp_path):
    nodes = tmp_path / "nodes.txt"
    nodes.write_text('# my pool\n\nrp=root@127.0.0.1:2222   name="RunPod #1" weight=2   # rented\n'
                     "  v6=[::1]:2200 # comment\n")
    p = subprocess.run(["bash", SCRIPT, "--dry-run", "--config", str(tmp_path / "cfg"), "--key", str(tmp_path / "k"),
                        "--nodes-file", str(nodes)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert '    # mesh: on name="RunPod #1" weight=2\n' in p.stdout
    assert "Host v6\n    HostName ::1\n    Port 2200\n" in p.stdout
    assert not (tmp_path / "cfg").exists() and not (tmp_path / "k").exists()
