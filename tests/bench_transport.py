#!/usr/bin/env python3
"""Transport benchmark: direct HTTP vs mesh.py, side by side, on real sshd nodes.

    python3 tests/bench_transport.py [--nodes-for-test N] [--rtt-ms R]

Brings up real sshd nodes on 127.0.0.1 with stand-in Ollama servers (tests/lab.py),
then prints, in one run, each figure of the transport targets with the direct
figure beside the mesh figure, and the original design's fresh SSH connection per
request as a reference row.  Not part of the test run (pytest does not collect it).
A link with round-trip time R is emulated in user space by a delaying TCP relay in
front of sshd (and in front of the stand-in, for the direct figure).
"""

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import mesh  # noqa: E402
from lab import MESH, DelayLink, SSHLab, _user  # noqa: E402

ROWS = []


def row(figure, direct, via_mesh, target, ok=None, note=""):
    ROWS.append((figure, direct, via_mesh, target, "" if ok is None else ("yes" if ok else "NO"), note))
    print(f"  {figure:<44} {direct:>12} {via_mesh:>14}   {target:<22} {ROWS[-1][4]:<4} {note}", flush=True)


def ms(seconds):
    return f"{seconds * 1000:.2f} ms"


def median(xs):
    return statistics.median(xs)


async def timed(coro_factory, n, warm=3):
    for _ in range(warm):
        await coro_factory()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await coro_factory()
        out.append(time.perf_counter() - t)
    return out


def seed_call(config, alias, port, prompt, model="m:1"):
    """The original design's way: a fresh SSH connection and curl per request,
    blocking (subprocess.run), JSON inside shell quotes."""
    request = {"model": model, "prompt": prompt, "stream": False}
    cmd = ["ssh", "-F", config, "-o", "ControlPath=none", "-o", "BatchMode=yes", alias,
           f"curl -s http://localhost:{port}/api/generate -d '{json.dumps(request)}'"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    return json.loads(result.stdout)


async def direct_small(fake_port, n):
    t = mesh.Transport("direct", "127.0.0.1", fake_port, connect_timeout=5)

    async def one():
        ex = await t.start("/api/generate", b'{"model":"m:1","prompt":"x","stream":false}')
        await ex.read_head()
        await ex.read_body(5)
        await ex.close()
    try:
        return await timed(one, n)
    finally:
        await t.close()


async def direct_ttft(fake_port, n):
    t = mesh.Transport("direct", "127.0.0.1", fake_port, connect_timeout=5)

    async def one():
        ex = await t.start("/api/generate", b'{"model":"m:1","prompt":"x"}')
        await ex.read_head()
        started = time.perf_counter()
        first = None
        async for _ in ex.body(5):
            if first is None:
                first = time.perf_counter() - started
        await ex.close()
    try:
        return await timed(one, n)
    finally:
        await t.close()


async def mesh_small(m, n, node=None):
    return await timed(lambda: m.generate("x", model="m:1", node=node), n)


async def mesh_ttft(m, n, node=None):
    samples = []
    for i in range(n + 3):
        t = time.perf_counter()
        stream = await m.generate("x", model="m:1", node=node, stream=True)
        first = None
        async for _ in stream:
            if first is None:
                first = time.perf_counter() - t
        if i >= 3:
            samples.append(first)
    return samples


def urllib_small(port, n):
    out = []
    body = b'{"model":"m:1","prompt":"x","stream":false}'
    for i in range(n + 3):
        t = time.perf_counter()
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/api/generate", data=body)).read()
        if i >= 3:
            out.append(time.perf_counter() - t)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes-for-test", type=int, default=300, help="aliases for the `test` figure (default 300)")
    ap.add_argument("--rtt-ms", type=float, default=40.0, help="emulated link round trip (default 40)")
    ap.add_argument("-n", type=int, default=150, help="samples per latency figure (default 150)")
    args = ap.parse_args()
    started = time.monotonic()
    lab = SSHLab()
    os.environ["MESH_CONTROL_DIR"] = lab.control_dir
    try:
        print(f"mesh.py transport benchmark - {time.strftime('%Y-%m-%d')}, OpenSSH "
              f"{subprocess.run(['ssh', '-V'], capture_output=True, text=True).stderr.split(',')[0]}, "
              f"Python {sys.version.split()[0]}, {os.cpu_count()} cores; medians; sshd on 127.0.0.1\n")
        print(f"  {'figure':<44} {'direct':>12} {'mesh':>14}   {'target':<22} {'met':<4} note")
        # The stand-ins run any number of requests at once: the nodes say so (num_parallel, as a
        # user states OLLAMA_NUM_PARALLEL); l1-l3 are the same without it (mesh learns the slots).
        fakes = [lab.add_node(name, ["m:1"], settings="num_parallel=10") for name in ("n1", "n2", "n3")]
        learn = [lab.add_node(name, ["m:1"]) for name in ("l1", "l2", "l3")]
        lab.add_node("viaw", ["m:1"], settings="transport=stdio")
        lab.add_node("viacurl", ["m:1"], settings="transport=exec")
        cfg = lab.config_path
        n = args.n

        async def loopback():
            async with mesh.MeshOrchestrator(config=cfg, nodes=["n1", "n2", "n3", "viaw", "viacurl"]) as m:
                await m.refresh()
                d = median(await direct_small(fakes[0].port, n))
                u = median(urllib_small(fakes[0].port, 50))
                got = median(await mesh_small(m, n, node="n1"))
                row("small request, keep-alive (mesh: forward)", ms(d), ms(got), "added <= 2 ms",
                    got - d <= 0.002, f"added {ms(got - d)}")
                row("  direct urllib, new connection each", ms(u), "", "reference")
                w = median(await mesh_small(m, 50, node="viaw"))
                row("  mesh, ssh -W per request (fallback)", ms(d), ms(w), "reference")
                c = median(await mesh_small(m, 30, node="viacurl"))
                row("  mesh, ssh NODE curl (fallback)", ms(d), ms(c), "reference")
                dt = median(await direct_ttft(fakes[0].port, n))
                mt = median(await mesh_ttft(m, n, node="n1"))
                row("time to first token", ms(dt), ms(mt), "<= direct + 2 ms", mt - dt <= 0.002,
                    f"added {ms(mt - dt)}")
        asyncio.run(loopback())

        seed = [seed_call(cfg, "n1", fakes[0].port, "x") for _ in range(3)]
        seed_t = []
        for _ in range(10):
            t = time.perf_counter()
            seed_call(cfg, "n1", fakes[0].port, "x")
            seed_t.append(time.perf_counter() - t)
        row("  original design: fresh ssh + curl each", "", ms(median(seed_t)), "reference", None,
            f"{len(seed)} warm-up runs ok")

        # 30 concurrent requests over 3 nodes, 0.2 s each at the node
        for f in fakes + learn:
            f.delay = 0.2

        async def concurrent(names):
            async with mesh.MeshOrchestrator(config=cfg, nodes=names) as m:
                await m.refresh()
                t = time.perf_counter()
                results = await asyncio.gather(*(m.generate(f"q{i}", model="m:1") for i in range(30)))
                wall = time.perf_counter() - t
                spread = {n: sum(r["node"] == n for r in results) for n in names}
                return wall, spread

        wall, spread = asyncio.run(concurrent(["n1", "n2", "n3"]))
        learned_wall, learned_spread = asyncio.run(concurrent(["l1", "l2", "l3"]))

        async def seed_orchestrator():
            # the original: blocking subprocess.run inside async def, one SSH connection per call
            aliases = ["n1", "n2", "n3"]

            async def call(i):
                alias = aliases[i % 3]
                return seed_call(cfg, alias, lab.fakes[alias].port, f"q{i}")
            t = time.perf_counter()
            await asyncio.gather(*(call(i) for i in range(30)))
            return time.perf_counter() - t

        seed_wall = asyncio.run(seed_orchestrator())
        row("30 concurrent x 0.2 s over 3 nodes (wall)", "0.200 s ideal", f"{wall:.3f} s", "<= 0.3 s",
            wall <= 0.3, f"spread {spread}; original design: {seed_wall:.2f} s")
        row("  same, no num_parallel (slots learned)", "", f"{learned_wall:.3f} s", "reference", None,
            f"spread {learned_spread}: each node is tried with more at once as replies show no queueing")
        for f in fakes + learn:
            f.delay = 0

        # first request to a node with no master yet
        async def cold():
            lab.stop_masters()
            async with mesh.MeshOrchestrator(config=cfg, nodes=["n2"]) as m:
                node = m.nodes[0]
                t = time.perf_counter()
                await node.transport.prepare()
                hand = time.perf_counter() - t
                t2 = time.perf_counter()
                await m.generate("x", model="m:1", node="n2")
                return hand, time.perf_counter() - t, time.perf_counter() - t2
        hand, total, after = asyncio.run(cold())
        bare = []
        for _ in range(5):
            t = time.perf_counter()
            subprocess.run(["ssh", "-F", cfg, "-o", "ControlPath=none", "n2", "true"], check=True)
            bare.append(time.perf_counter() - t)
        row("first request, no master yet", f"ssh {ms(median(bare))}", ms(total),
            "one handshake + request", None, f"master up {ms(hand)}, then request {ms(after)}")

        # emulated link: direct vs mesh over a round trip of R ms
        r = args.rtt_ms / 1000
        far = lab.add_node("far", ["m:1"])
        link_ssh = DelayLink(lab.nodes["far"].port, r / 2)
        link_http = DelayLink(far.port, r / 2)
        with open(cfg) as fh:
            text = fh.read()
        text = text.replace(f"Port {lab.nodes['far'].port}\n", f"Port {link_ssh.port}\n")
        with open(cfg, "w") as fh:
            fh.write(text)
        with open(lab.known_hosts, "a") as fh:
            key = " ".join(open(lab.hostkey + ".pub").read().split()[:2])
            fh.write(f"[127.0.0.1]:{link_ssh.port} {key}\n")

        async def linked():
            async with mesh.MeshOrchestrator(config=cfg, nodes=["far"]) as m:
                await m.refresh()
                d = median(await direct_small(link_http.port, 20))
                got = median(await mesh_small(m, 20, node="far"))
                dt = median(await direct_ttft(link_http.port, 20))
                mt = median(await mesh_ttft(m, 20, node="far"))
                row(f"small request, link RTT {args.rtt_ms:g} ms", ms(d), ms(got), "added <= 2 ms",
                    got - d <= 0.002, f"added {ms(got - d)}")
                # the relay that makes the link costs ~1-2 ms itself, on both columns alike
                row(f"time to first token, link RTT {args.rtt_ms:g} ms", ms(dt), ms(mt), "<= R + 2 ms",
                    mt - dt <= 0.002, f"added {ms(mt - dt)} over direct on the same link")
        asyncio.run(linked())

        async def linked_cold():
            lab.stop_masters()
            async with mesh.MeshOrchestrator(config=cfg, nodes=["far"]) as m:
                t = time.perf_counter()
                await m.generate("x", model="m:1")          # not pinned: inventory, then the request
                total = time.perf_counter() - t
            lab.stop_masters()
            async with mesh.MeshOrchestrator(config=cfg, nodes=["far"]) as m:
                t = time.perf_counter()
                await m.nodes[0].transport.prepare()
                hand = time.perf_counter() - t
            return total, hand
        total, hand = asyncio.run(linked_cold())
        bare = []
        for _ in range(3):
            t = time.perf_counter()
            subprocess.run(["ssh", "-F", cfg, "-o", "ControlPath=none", "far", "true"], check=True)
            bare.append(time.perf_counter() - t)
        row(f"first request, no master, link RTT {args.rtt_ms:g} ms", f"ssh {ms(median(bare))}", ms(total),
            "one handshake + request", None,
            f"= {total / r:.1f} RTT: master up {hand / r:.1f} RTT, then {(total - hand) / r:.1f} RTT "
            f"(channel + request); `ssh NODE true` is {median(bare) / r:.1f} RTT")
        link_ssh.close()
        link_http.close()

        # `test` over many nodes: many aliases spread over a few sshd processes
        count = args.nodes_for_test
        extra = lab.add_node("single", ["m:1"])
        lab.stop_masters()
        many = os.path.join(lab.dir, "many_config")
        sshds = [lab.nodes[name] for name in ("n1", "n2", "n3", "single")]
        with open(many, "w") as fh:
            for i in range(count):
                node = sshds[i % len(sshds)]
                fh.write(f"Host m{i:03d}\n    HostName 127.0.0.1\n    Port {node.port}\n    User {_user()}\n"
                         f"    IdentityFile {lab.userkey}\n    IdentitiesOnly yes\n"
                         f"    UserKnownHostsFile {lab.known_hosts}\n"
                         f"    # mesh: ollama_port={extra.port}\n")
        env = lab.env()
        t = time.perf_counter()
        subprocess.run([sys.executable, MESH, "--config", cfg, "--nodes", "single", "test"],
                       capture_output=True, env=env)
        single = time.perf_counter() - t
        lab.stop_masters()
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t = time.perf_counter()
        allp = subprocess.run([sys.executable, MESH, "--config", many, "test", "--json"], capture_output=True, env=env)
        wall_all = time.perf_counter() - t
        rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        ok = sum(r["ok"] for r in json.loads(allp.stdout)) if allp.stdout else 0
        # Again, with the masters the first run left (ControlPersist): mesh.py's own share.
        t = time.perf_counter()
        warm = subprocess.run([sys.executable, MESH, "--config", many, "test", "--json"], capture_output=True, env=env)
        wall_warm = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run([sys.executable, MESH, "--config", many, "--nodes", "m000", "test"], capture_output=True, env=env)
        single_warm = time.perf_counter() - t
        ok_warm = sum(r["ok"] for r in json.loads(warm.stdout)) if warm.stdout else 0
        # The floor on one machine: plain ssh making the same handshakes, 64 at a time.
        from concurrent.futures import ThreadPoolExecutor
        lab.stop_masters()

        def bare_ssh(i):
            return subprocess.run(["ssh", "-F", many, "-o", "ControlPath=none", "-o", "BatchMode=yes",
                                   f"m{i:03d}", "true"], capture_output=True).returncode
        sample = min(32, count)
        t = time.perf_counter()
        with ThreadPoolExecutor(64) as pool:
            codes = list(pool.map(bare_ssh, range(sample)))
        bare_all = time.perf_counter() - t
        row(f"`test` over {count} nodes (wall)", f"1 node {single:.2f} s", f"{wall_all:.2f} s",
            "<= 2x slowest node", wall_all <= 2 * single,
            f"{ok}/{count} ok; plain `ssh NODE true` to {sample} nodes at once took {bare_all:.2f} s "
            f"({codes.count(0)} ok): this host runs both ends of every handshake")
        row(f"`test` over {count} nodes, masters warm", f"1 node {single_warm:.2f} s", f"{wall_warm:.2f} s",
            "<= 2x slowest node", wall_warm <= 2 * single_warm, f"{ok_warm}/{count} ok; no handshakes")
        row("mesh.py memory during that `test`", "", f"{rss_mb:.0f} MB", "<= 100 MB", rss_mb <= 100,
            "peak RSS (largest child so far)" if before else "peak RSS")
        lab.stop_masters()

        # --help start-up
        def t_cmd(cmd, k=15):
            xs = []
            for _ in range(k):
                t = time.perf_counter()
                subprocess.run(cmd, capture_output=True)
                xs.append(time.perf_counter() - t)
            return median(xs)
        bare_py = t_cmd([sys.executable, "-c", "pass"])
        helped = t_cmd([sys.executable, MESH, "--help"])
        row("python3 mesh.py --help", f"bare {ms(bare_py)}", ms(helped), "<= bare + 50 ms",
            helped - bare_py <= 0.05, f"added {ms(helped - bare_py)}")
        print(f"\n(benchmark took {time.monotonic() - started:.0f} s)")
    finally:
        lab.close()


if __name__ == "__main__":
    if not shutil.which("sshd") and not os.path.exists("/usr/sbin/sshd"):
        sys.exit("bench_transport.py needs OpenSSH's sshd (apt-get install openssh-server)")
    main()
