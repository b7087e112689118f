"""A node behind a real network link that gets cut (issue 5).

The node lives in a network namespace this test creates: its own sshd and stand-in
Ollama (on the namespace's own localhost:11434), reached over a veth pair with
addresses that exist only between this machine and that namespace.  Taking the link
down while requests run must leave every request answered by the other node, within
the timeouts, and the node must come back by itself once the link is up again."""
import asyncio
import os
import signal
import shutil
import subprocess
import sys
import time

import pytest

import mesh
from conftest import needs_sshd
from lab import SSHD, _user

pytestmark = needs_sshd
FAST = dict(connect_timeout=3, first_byte_timeout=30, idle_timeout=5, liveness_interval=0.5)
HERE = os.path.dirname(os.path.abspath(__file__))


def sh(*args, check=True):
    return subprocess.run(args, capture_output=True, text=True, check=check)


@pytest.fixture
def far_node(mesh_env):
    lab = mesh_env
    if os.getuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2 to create a network namespace")
    tag = os.getpid() % 100000
    ns, host_if, ns_if = f"meshcut{tag}", f"mc{tag}a", f"mc{tag}b"
    net = f"10.231.{tag % 250}"
    if sh("ip", "netns", "add", ns, check=False).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    procs = []
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        sh("ip", "link", "set", ns_if, "netns", ns)
        sh("ip", "addr", "add", f"{net}.1/30", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{net}.2/30", "dev", ns_if)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        conf = os.path.join(lab.dir, "far_sshd_config")
        with open(conf, "w") as fh:
            fh.write(f"ListenAddress {net}.2:22\nHostKey {lab.hostkey}\nPidFile {lab.dir}/far.pid\n"
                     f"AuthorizedKeysFile {lab.authorized_keys}\nPasswordAuthentication no\nUsePAM no\n"
                     "StrictModes no\n")
        procs.append(subprocess.Popen(["ip", "netns", "exec", ns, SSHD, "-D", "-e", "-f", conf],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # the stand-in on the namespace's own localhost:11434; it ends when its stdin closes
        fake = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c",
             "import sys; sys.path.insert(0, %r); import lab\n"
             "f = lab.FakeOllama(['m:1'], name='far'); f.stop(); f.port = 11434; f.start_again()\n"
             "print('ready', flush=True); sys.stdin.read()" % HERE],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(fake)
        assert fake.stdout.readline().strip() == "ready"
        key = " ".join(open(lab.hostkey + ".pub").read().split()[:2])
        with open(lab.known_hosts, "a") as fh:
            fh.write(f"{net}.2 {key}\n")
        lab.extra_config = (f"Host far\n    HostName {net}.2\n    User {_user()}\n    IdentityFile {lab.userkey}\n"
                            f"    IdentitiesOnly yes\n    UserKnownHostsFile {lab.known_hosts}\n"
                            "    StrictHostKeyChecking yes\n    # mesh: on\n")
        lab.add_node("near", ["m:1"])

        class Far:
            def cut(self):
                sh("ip", "link", "set", host_if, "down")

            def restore(self):
                sh("ip", "link", "set", host_if, "up")
        yield Far()
    finally:
        for p in procs:
            if p.stdin:
                p.stdin.close()
            p.kill()
            p.wait()
        # sshd's session processes live on in the namespace: with the link gone no FIN or RST
        # ever reaches them, so they would wait for ever (one leaked per run, and the namespace with it)
        for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        sh("ip", "link", "del", host_if, check=False)
        sh("ip", "netns", "del", ns, check=False)


def prefer(node, yes):
    """Make the router try this node first: lower score, and far faster for the default
    routing (by expected completion time), with the model loaded."""
    node.avg_latency = 0.0 if yes else 5.0
    node.route.model("m:1").gen_tps = 1000.0 if yes else 1.0
    node.route.loaded["m:1"] = 0.0


def test_network_cut_while_requests_run(mesh_env, far_node):
    lab = mesh_env

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, **FAST) as m:
            await m.refresh()
            far = m.node("far")
            assert far.healthy and far.models, far.reason
            served, waits = [], []
            for i in range(12):
                if i == 4:
                    far_node.cut()              # mid-run: the link goes down
                for node in m.nodes:            # keep preferring the far node
                    prefer(node, node.name == "far")
                started = time.monotonic()
                r = await m.generate(f"q{i}", model="m:1")
                waits.append(time.monotonic() - started)
                served.append(r["node"])
            assert not far.healthy
            far_node.restore()
            deadline = time.monotonic() + 60
            while not far.healthy and time.monotonic() < deadline:
                await asyncio.sleep(0.1)        # the background re-probe brings it back
            back = far.healthy
            for node in m.nodes:
                prefer(node, node.name == "far")
            after = (await m.generate("again", model="m:1"))["node"]
            return served, waits, back, after

    served, waits, back, after = asyncio.run(go())
    assert len(served) == 12                                  # every request answered
    assert served[:4] == ["far"] * 4 and served[4:] == ["near"] * 8
    assert max(waits) < FAST["first_byte_timeout"], waits    # never held up to the long timeout
    assert back and after == "far"                            # used again, no restart
    assert lab.ssh_processes() == []
