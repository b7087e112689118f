"""The SSH config parser against OpenSSH's own resolution (issue 3).

Every alias of every corpus case is resolved by mesh.py and compared with the
values `ssh -G -T -F FILE alias` printed when the corpus was recorded; where ssh is
installed, the recording is checked against the live ssh too."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import mesh
from config_corpus import CASES, EXPANDED, RECORD, _home, _local_user, materialize, normalise, ssh_g

RECORDED = json.load(open(RECORD))["cases"]
HAVE_SSH = shutil.which("ssh") is not None
PARAMS = [pytest.param(name, files, alias, id=f"{name} / {alias}") for name, files, aliases in CASES
          for alias in aliases]


def test_corpus_is_large_and_recorded():
    assert len(CASES) >= 40
    assert sorted(RECORDED) == sorted(name for name, _, _ in CASES)


@pytest.fixture
def case_dir(tmp_path):
    tag = "mesh-corpus-" + tmp_path.name
    made = []

    def make(files):
        config, outside = materialize(files, str(tmp_path), tag)
        made.extend(outside)
        return config

    yield make
    for path in made:
        os.unlink(path)


@pytest.mark.parametrize("name, files, alias", PARAMS)
def test_matches_ssh(name, files, alias, case_dir):
    config = case_dir(files)
    root = os.path.dirname(config)
    expected = RECORDED[name][alias]
    live = live_raw = None
    if HAVE_SSH:
        live_raw, err = ssh_g(config, alias)
        live = {"error_line": err} if live_raw is None else normalise(live_raw, root, _home())
        assert live == expected, "the recording is stale: re-run tests/config_corpus.py --record"
        if live_raw is None:
            live = None
    try:
        info = mesh.SSHConfig.load(config).resolve(alias)
    except mesh.ConfigError as exc:
        assert "error_line" in expected, f"mesh rejected a config ssh accepts: {exc}"
        m = re.match(r"(.+?):(\d+): ", str(exc))
        assert m, f"error without FILE:LINE: {exc}"
        assert os.path.exists(m.group(1))
        if expected["error_line"]:
            assert int(m.group(2)) == expected["error_line"], str(exc)
        return
    assert "error_line" not in expected, "ssh rejects this config, mesh accepted it"
    if info.unresolved:
        assert "exec" in name  # only `Match exec` may leave a value to ssh
        return
    got = {"hostname": info.hostname, "user": info.user, "port": info.port, "identityfile": info.identityfile}
    for key in EXPANDED:
        if key in expected:
            got[key] = info.expanded(key)
    if HAVE_SSH and live is not None:
        assert {k: got[k] for k in live} == {k: v for k, v in live_raw.items()}   # exact, %C included
    assert normalise(got, root, _home()) == expected


@pytest.mark.parametrize("line, args", [
    ('User "x y"', ["User", "x y"]),
    ("User 'a b' c", ["User", "a b", "c"]),
    (r"User a\ b", ["User", "a b"]),
    (r'IdentityFile "q\"uote"', ["IdentityFile", 'q"uote']),
    (r"X a\b", ["X", r"a\b"]),
    ("Port 22 # comment", ["Port", "22"]),
    ("User h#x", ["User", "h#x"]),
    ("a\t b", ["a", "b"]),
])
def test_split_args(line, args):
    assert mesh.split_args(line) == args


@pytest.mark.parametrize("line, result", [
    ("Host a", ("host", "a")), ("HostName=1.2.3.4", ("hostname", "1.2.3.4")),
    ("User = carol", ("user", "carol")), ("Port= 22", ("port", "22")), ("  # c", None), ("", None),
    ("User==x", ("user", "=x")),
])
def test_split_keyword(line, result):
    assert mesh.split_keyword(line) == result


@pytest.mark.parametrize("pattern, text, matches", [
    ("gpu*", "gpu12", True), ("gpu?", "gpu12", False), ("[ab]", "a", False), ("[ab]", "[ab]", True),
    ("*.lan", "x.lan", True), ("a.b", "axb", False), ("A", "a", False),
])
def test_match_pattern(pattern, text, matches):
    assert mesh.match_pattern(text, pattern) is matches


def test_match_exec_is_asked_of_ssh(tmp_path):
    """A value a `Match exec` decides is taken from ssh -G for that node only."""
    if not HAVE_SSH:
        pytest.skip("ssh not installed")
    cfg = tmp_path / "config"
    cfg.write_text("Host n1 n2\n  HostName 10.9.9.9\n  # mesh: on\nMatch originalhost n1 exec true\n  User byexec\n  Port 2400\n")
    p = subprocess.run([sys.executable, mesh.__file__, "--config", str(cfg), "nodes", "--json"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rows = {r["name"]: r for r in json.loads(p.stdout)}
    assert rows["n1"]["user"] == "byexec" and rows["n1"]["port"] == 2400 and rows["n1"]["unresolved"]
    assert rows["n2"]["user"] == _local_user() and rows["n2"]["port"] == 22 and not rows["n2"]["unresolved"]


def nodes_json(cfg, *extra):
    p = subprocess.run([sys.executable, mesh.__file__, "--config", str(cfg), *extra, "nodes", "--json"],
                       capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def test_discovery_follows_includes_and_skips_patterns(tmp_path):
    d = tmp_path / "config.d"
    d.mkdir()
    (d / "10-gpu.conf").write_text("Host gpu1 gpu2\n  HostName 192.0.2.7\n  # mesh: weight=2\n")
    (d / "20-cpu.conf").write_text("Host cpu1\n  # mesh: name=\"CPU box\" max_concurrent=2\n")
    cfg = tmp_path / "config"
    cfg.write_text(f"Include {d}/*.conf\n\nHost github.com\n  User git\n  # mesh: off\n\n"
                   "Host *.internal !x.internal\n  User ops\n\nHost *\n  ServerAliveInterval 60\n")
    rc, out, err = nodes_json(cfg)
    assert rc == 0, err
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["gpu1", "gpu2", "cpu1"]
    assert rows[0]["weight"] == 2 and rows[1]["hostname"] == "192.0.2.7"
    assert rows[2]["display_name"] == "CPU box" and rows[2]["max_concurrent"] == 2


def test_opt_in_with_host_star_off(tmp_path):
    """`# mesh: off` under Host * (last) and `# mesh: on` in node blocks: only marked hosts are nodes."""
    cfg = tmp_path / "config"
    cfg.write_text("Host gpu\n  # mesh: on\nHost bastion github.com\n  User git\nHost *\n  # mesh: off\n")
    rc, out, _ = nodes_json(cfg)
    assert [r["name"] for r in json.loads(out)] == ["gpu"]


@pytest.mark.parametrize("text, where", [
    ("Host a\n  Bogus yes\n", ":2: Bad configuration option: bogus"),
    ("Host a\n  User x y\n", ":2: keyword user extra arguments"),
    ("Host a\n  # mesh: weight=heavy\n", "weight='heavy': not a number"),
    ("Host a\n  # mesh: 'unbalanced\n", ":2: bad '# mesh:' comment"),
])
def test_config_errors_are_one_line_exit_1(tmp_path, text, where):
    cfg = tmp_path / "config"
    cfg.write_text(text)
    rc, out, err = nodes_json(cfg)
    assert rc == 1 and err.startswith("mesh: error: ") and err.count("\n") == 1 and where in err, err


# -- issue 13: the local ssh is the referee; errors name the place; the fuzzer ----------

def fake_ssh(tmp_path, body):
    """A stand-in `ssh` on PATH for a patched build: a Python script whose `main(argv)`
    is `body`; REAL is the real ssh, CALLS a file each call appends its argv to."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir(exist_ok=True)
    script = bindir / "ssh"
    script.write_text(f"#!{sys.executable}\nimport os, re, sys\nREAL = {shutil.which('ssh')!r}\n"
                      f"CALLS = {str(tmp_path / 'calls')!r}\n"
                      "with open(CALLS, 'a') as fh:\n    fh.write(' '.join(sys.argv[1:]) + '\\n')\n" + body)
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "MESH_CACHE_DIR": str(tmp_path / "cache")}


# Apple's ssh knows UseKeychain: stand for it by hiding those lines from the real ssh.
APPLE_SSH = """argv = sys.argv[1:]
if "-F" in argv:
    i = argv.index("-F") + 1
    text = re.sub(r"(?im)^[ \\t]*usekeychain\\b.*$", "", open(argv[i]).read())
    argv[i] = argv[i] + ".seen-by-apple-ssh"
    open(argv[i], "w").write(text)
os.execv(REAL, [REAL] + argv)
"""


def nodes_env(cfg, env):
    p = subprocess.run([sys.executable, mesh.__file__, "--config", str(cfg), "nodes", "--json"],
                       capture_output=True, text=True, env=env)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.skipif(not HAVE_SSH, reason="ssh not installed")
def test_a_patched_ssh_that_knows_a_keyword_makes_mesh_accept_it(tmp_path):
    cfg = tmp_path / "config"
    cfg.write_text("Host *\n  UseKeychain yes\n  AddKeysToAgent yes\nHost gpu1\n  HostName 10.1.1.1\n  User ann\n"
                   "  # mesh: on\n")
    rc, out, err = nodes_env(cfg, {**os.environ, "MESH_CACHE_DIR": str(tmp_path / "cache0")})
    assert rc == 1 and err == f"mesh: error: {cfg}:2: Bad configuration option: usekeychain\n"
    rc, out, err = nodes_env(cfg, fake_ssh(tmp_path, APPLE_SSH))
    assert rc == 0, err
    assert [(r["name"], r["hostname"], r["user"]) for r in json.loads(out)] == [("gpu1", "10.1.1.1", "ann")]
    # in every block of a large config, too: ssh is still asked once
    cfg.write_text("".join(f"Host n{i}\n  # mesh: on\n  UseKeychain yes\n  Port {2000 + i}\n" for i in range(150)))
    rc, out, err = nodes_env(cfg, fake_ssh(tmp_path, APPLE_SSH))
    assert rc == 0, err
    assert [r["port"] for r in json.loads(out)] == list(range(2000, 2150))
    assert (tmp_path / "calls").read_text().count("-G") == 2


@pytest.mark.skipif(not HAVE_SSH, reason="ssh not installed")
def test_a_patched_ssh_that_rejects_gives_its_reason_with_file_and_line(tmp_path):
    cfg = tmp_path / "config"
    cfg.write_text("Host gpu1\n  # mesh: on\n  ForwardX11 yes\n")
    env = fake_ssh(tmp_path, "argv = sys.argv[1:]\nif '-G' in argv:\n"
                             "    sys.stderr.write(argv[argv.index('-F') + 1] + ' line 3: ForwardX11 is not "
                             "supported by this build\\n')\n    sys.exit(255)\nos.execv(REAL, [REAL] + argv)\n")
    rc, out, err = nodes_env(cfg, env)
    assert (rc, out) == (1, "")
    assert err == f"mesh: error: {cfg}:3: ForwardX11 is not supported by this build\n"


@pytest.mark.skipif(not HAVE_SSH, reason="ssh not installed")
def test_ssh_is_asked_once_per_config_change(tmp_path):
    d = tmp_path / "config.d"
    d.mkdir()
    (d / "10.conf").write_text("Host gpu1\n  # mesh: on\n  Port 2201\n")
    cfg = tmp_path / "config"
    cfg.write_text(f"Include {d}/*.conf\n")
    env = fake_ssh(tmp_path, "os.execv(REAL, [REAL] + sys.argv[1:])\n")
    calls = lambda: (tmp_path / "calls").read_text().count("-G")  # noqa: E731

    def ports():
        rc, out, err = nodes_env(cfg, env)
        assert rc == 0, err
        return {r["name"]: r["port"] for r in json.loads(out)}
    assert ports() == {"gpu1": 2201} and calls() == 1
    assert ports() == {"gpu1": 2201} and calls() == 1          # nothing changed: the cache answers
    (d / "10.conf").write_text("Host gpu1\n  # mesh: on\n  Port 2299\n")
    os.utime(d / "10.conf", ns=(1, 1))                         # a different mtime even on a coarse clock
    assert ports() == {"gpu1": 2299} and calls() == 2          # an included file changed
    (d / "20.conf").write_text("Host gpu2\n  # mesh: on\n")
    assert ports() == {"gpu1": 2299, "gpu2": 22} and calls() == 3   # a new file matches the glob


@pytest.mark.parametrize("files, where", [
    ({"config": "Host a\n  # mesh: on\nInclude {dir}/loop.conf\n", "loop.conf": "# loops\nInclude {dir}/loop.conf\n"},
     "loop.conf:2: Too many recursive configuration includes"),
    (dict({"config": "Host a\n  # mesh: on\nInclude {dir}/c1.conf\n"},
          **{f"c{i}.conf": f"\nInclude {{dir}}/c{i + 1}.conf\n" for i in range(1, 17)}, **{"c17.conf": "Port 2\n"}),
     "c16.conf:2: Too many recursive configuration includes"),
])
def test_include_loops_and_depth_name_the_include_line(tmp_path, files, where):
    for name, text in files.items():
        (tmp_path / name).write_text(text.format(dir=tmp_path))
    rc, out, err = nodes_json(tmp_path / "config")
    assert rc == 1 and err.startswith(f"mesh: error: {tmp_path}/{where}") and err.count("\n") == 1, err


def test_include_chain_16_deep_is_fine(tmp_path):
    files = dict({"config": "Include {dir}/c1.conf\n"}, **{f"c{i}.conf": f"Include {{dir}}/c{i + 1}.conf\n"
                                                           for i in range(1, 16)})
    files["c16.conf"] = "Include {dir}/none/*.conf\nHost a\n  # mesh: on\n  Port 2016\n"
    for name, text in files.items():
        (tmp_path / name).write_text(text.format(dir=tmp_path))
    rc, out, err = nodes_json(tmp_path / "config")
    assert rc == 0 and json.loads(out)[0]["port"] == 2016, err


@pytest.mark.skipif(not HAVE_SSH, reason="ssh not installed")
def test_fuzzed_configs_agree_with_ssh(tmp_path):
    """A bounded, seeded differential fuzz: random configs built from the edges above;
    accept/reject, the line ssh complains about, hostname/user/port/identityfile."""
    from config_corpus import fuzz_disagreements
    problems = fuzz_disagreements(mesh, seed=13, count=150, root=str(tmp_path / "fuzz"))
    assert not problems, "\n".join(problems[:5])


def test_fuzzed_aliases_are_the_concrete_host_patterns(tmp_path):
    """The node list: every concrete pattern of a Host line ssh reads at top level, in order."""
    import random
    from config_corpus import FUZZ_ALIASES, fuzz_config
    rng = random.Random(7)
    for n in range(60):
        root = tmp_path / f"c{n}"
        config, _ = materialize(fuzz_config(rng), str(root), "x")
        names = mesh.SSHConfig.load(config).alias_names()
        assert set(names) <= set(FUZZ_ALIASES) and len(names) == len(set(names))
