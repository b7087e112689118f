"""Many nodes, many dead (issue 12, item 7): the first `mesh.py generate` over a config
of NODES nodes of which only LIVE answer, beside the same request with only the live
nodes configured (the live nodes' own time).  Dead nodes are Host blocks on 127.0.0.1
only: "refused" ones point at a port nothing listens on; "silent" ones at a port whose
SYNs are dropped (a listening socket with backlog 0 and a full accept queue: Linux
drops further SYNs, so connect() and ssh wait as for a blackholed address, until
ConnectTimeout); "silent-proxy" ones have a ProxyCommand that never says a word (ssh
waits its ConnectTimeout; mesh cannot knock on such a node); "all-proxy" is that with the
live nodes behind a ProxyCommand too (nothing to knock on).  Each case starts cold (a
control directory of its own) and runs twice, masters stopped after each run: the
first request, and the next run's (what mesh.py noted in its control directory about
failed starts stays).  Prints, per case and mesh.py: wall times and their excess over
the live nodes' own, the CPU time of mesh.py and the ssh processes it waited for, the
most ssh masters connecting at once (sampled every 2 ms), and the ProxyCommands still
running after mesh.py exited (orphans).  Asserts nothing.

    python3 tests/bench_dead_nodes.py [NODES] [LIVE] [--mesh PATH]... [--runs N] [--kinds K,...]
                                      [--orders spread,last]

--mesh PATH runs another mesh.py (e.g. an older one, for a before/after table); given
more than once, the mesh.py files take turns case by case (A/B on a loaded machine).
"""
import argparse
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from lab import MESH, SSHLab, _pids_matching, masters_starting, silent_port  # noqa: E402


def one_request(mesh, config, env, marker):
    """One `generate`: (wall s, peak masters starting, orphans, ok, CPU s)."""
    peak = [0]
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, mesh, "--config", config, "generate", "--model", "m:1", "hi"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], masters_starting(proc.pid))
            time.sleep(0.002)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate(timeout=600)
    wall = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    stop.set()
    t.join()
    time.sleep(0.5)                      # anything mesh.py left behind shows now
    orphans = _pids_matching(marker)
    for pid in orphans:                  # ours (the marker is this run's): end them
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    subprocess.run([sys.executable, mesh, "--config", config, "connections", "--stop"], env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    ok = proc.returncode == 0 and out.strip() != b""
    if not ok:
        sys.stderr.write(f"  (failed: {err.decode(errors='replace').strip()[:300]})\n")
    return wall, peak[0], len(orphans), ok, cpu


def run_case(lab, mesh, config, marker):
    """A cold first request (new control directory), then the next run's first request
    (masters stopped in between; what mesh.py noted about failed starts stays)."""
    ctl = tempfile.mkdtemp(prefix="mb-", dir="/tmp")
    env = lab.env(MESH_CONTROL_DIR=ctl, MESH_SSH_CONFIG=config)
    try:
        return one_request(mesh, config, env, marker), one_request(mesh, config, env, marker)
    finally:
        shutil.rmtree(ctl, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("nodes", nargs="?", type=int, default=500)
    ap.add_argument("live", nargs="?", type=int, default=10)
    ap.add_argument("--mesh", action="append")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--kinds", default="refused,silent,silent-proxy,all-proxy")
    ap.add_argument("--orders", default="spread,last")
    args = ap.parse_args()
    meshes = args.mesh or [MESH]
    lab = SSHLab()
    hold = socket.socket()               # bound, never listening: connections to it are refused
    hold.bind(("127.0.0.1", 0))
    closed_port = hold.getsockname()[1]
    dropping_port, keep = silent_port()
    marker = f"{3601 + os.getpid() % 1000}.{int(time.time()) % 100000}"
    try:
        for i in range(args.live):
            lab.add_node(f"live{i}", ["m:1"])
        live_blocks = {name: lab.host_block(name) for name in lab.nodes}
        names = list(live_blocks)
        dead = args.nodes - args.live

        def dead_block(i, kind):
            if kind == "refused":
                how = f"    Port {closed_port}\n"
            elif kind == "silent":
                how = f"    Port {dropping_port}\n"
            else:
                how = f"    ProxyCommand sleep {marker}\n"
            return f"Host dead{i}\n    HostName 127.0.0.1\n{how}    User nobody\n    # mesh: on\n\n"

        # "all-proxy": the live nodes too are reached through a ProxyCommand (bash's
        # /dev/tcp as the relay), so mesh.py can knock on no node at all
        relay = "    ProxyCommand bash -c 'exec 3<>/dev/tcp/%h/%p; cat <&3 & exec cat >&3'\n"
        proxied = {name: block.replace("\n", "\n" + relay, 1) for name, block in live_blocks.items()}

        def write(path, kind, order):
            with open(path, "w") as fh:
                if kind is None:
                    fh.write("".join(live_blocks.values()))
                    return
                live = proxied if kind == "all-proxy" else live_blocks
                blocks = [dead_block(i, "silent-proxy" if kind == "all-proxy" else kind) for i in range(dead)]
                if order == "spread":      # live nodes evenly among the dead
                    step = max(1, len(blocks) // max(1, args.live))
                    for j, name in enumerate(names):
                        blocks.insert(j * (step + 1), live[name])
                else:                      # the worst case: every dead node first
                    blocks += [live[n] for n in names]
                fh.write("".join(blocks))

        cases = [("live nodes only (their own time)", None, None)]
        for kind in args.kinds.split(","):
            for order in args.orders.split(","):
                cases.append((f"{dead} {kind}, live {order}", kind, order))
        print(f"{args.nodes} nodes, {args.live} live; {os.cpu_count()} CPUs, "
              f"load {os.getloadavg()[0]:.1f}; runs per case: {args.runs}")
        for i, path in enumerate(meshes):
            print(f"mesh.py [{i}]: {path}")
        print(f"{'case':30} {'mesh':>4} {'first request':>13} {'vs own':>8} {'CPU':>7} {'next run':>9} "
              f"{'vs own':>8} {'CPU':>7} {'peak starting':>13} {'orphans':>7}")
        own = {}
        for title, kind, order in cases:
            path = os.path.join(lab.dir, f"config-{kind}-{order}")
            write(path, kind, order)
            for i, mesh in enumerate(meshes):
                results = [run_case(lab, mesh, path, marker) for _ in range(args.runs)]
                cold = sorted(r[0][0] for r in results)[len(results) // 2]
                warm = sorted(r[1][0] for r in results)[len(results) // 2]
                cpu1 = sorted(r[0][4] for r in results)[len(results) // 2]
                cpu2 = sorted(r[1][4] for r in results)[len(results) // 2]
                peak = max(max(r[0][1], r[1][1]) for r in results)
                orphans = max(max(r[0][2], r[1][2]) for r in results)
                ok = all(r[0][3] and r[1][3] for r in results)
                if kind is None:
                    own[i] = (cold, warm)
                d1 = f"{cold - own[i][0]:+.2f}" if kind else ""
                d2 = f"{warm - own[i][1]:+.2f}" if kind else ""
                print(f"{title:30} {i:>4} {cold:11.2f} s {d1:>8} {cpu1:5.2f} s {warm:7.2f} s {d2:>8} "
                      f"{cpu2:5.2f} s {peak:>13} {orphans:>7}{'' if ok else '  FAILED'}", flush=True)
        print(f"load at the end {os.getloadavg()[0]:.1f}")
    finally:
        hold.close()
        for s in keep:
            s.close()
        lab.close()


if __name__ == "__main__":
    main()
