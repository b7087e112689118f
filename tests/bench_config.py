"""Speed of reading the SSH config (issue 13): `mesh.py nodes` on a 300-node config,
cold (no cache: the hand parser plus one `ssh -G` referee call) and warm (nothing
changed: the cached verdict), against `mesh.py --help`.  Prints figures; asserts nothing.

    python3 tests/bench_config.py [NODES] [RUNS]
"""
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MESH = os.path.join(os.path.dirname(HERE), "mesh.py")


def measure(argv, env, before=None):
    """(wall seconds, CPU seconds of the child and its children) of one run."""
    if before:
        before()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def main():
    nodes = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 9
    root = tempfile.mkdtemp(prefix="mesh-bench-config-")
    try:
        config = os.path.join(root, "config")
        with open(config, "w") as fh:
            fh.write("Host *\n  ServerAliveInterval 30\n  IdentitiesOnly yes\n\n")
            for i in range(nodes):
                fh.write(f"Host gpu{i}\n  # mesh: on\n  HostName 10.{i // 250}.{i % 250}.7\n  User u{i % 7}\n"
                         f"  Port {2200 + i % 50}\n  IdentityFile ~/.ssh/k{i % 3}\n\n")
        cache = os.path.join(root, "cache")
        env = {**os.environ, "MESH_CACHE_DIR": cache}
        help_argv = [sys.executable, MESH, "--help"]
        nodes_argv = [sys.executable, MESH, "--config", config, "nodes"]
        rows = {
            "--help": [measure(help_argv, env) for _ in range(runs)],
            f"nodes, {nodes} nodes, cold": [measure(nodes_argv, env, lambda: shutil.rmtree(cache, True))
                                            for _ in range(runs)],
            f"nodes, {nodes} nodes, warm": [measure(nodes_argv, env) for _ in range(runs)],
        }
        print(f"{'':28} {'wall median':>12} {'CPU median':>12}   ({runs} runs, {os.cpu_count()} CPUs, "
              f"load {os.getloadavg()[0]:.1f})")
        med = {}
        for name, samples in rows.items():
            wall = sorted(w for w, _ in samples)[runs // 2]
            cpu = sorted(c for _, c in samples)[runs // 2]
            med[name] = (wall, cpu)
            print(f"{name:28} {wall * 1000:10.0f} ms {cpu * 1000:10.0f} ms")
        warm = med[f"nodes, {nodes} nodes, warm"]
        print(f"warm nodes over --help: {(warm[0] - med['--help'][0]) * 1000:+.0f} ms wall, "
              f"{(warm[1] - med['--help'][1]) * 1000:+.0f} ms CPU")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
