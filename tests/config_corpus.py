"""Differential corpus for the SSH config parser: each case is a set of files and
the aliases to resolve.  `python3 tests/config_corpus.py --record` asks the local
`ssh -G -T -F FILE alias` for every alias and writes config_corpus.json, which the
tests compare mesh.py against (and, where ssh exists, re-check against ssh).

Placeholders in file text: {dir} the case's temp directory, {home} the passwd home
(where ssh resolves ~ and relative Includes), {tag} a unique name for files that
must live in ~/.ssh.  Expected values use {user} for the local user."""

import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
RECORD = os.path.join(HERE, "config_corpus.json")

CASES = [
    ("basic", {"config": "Host gpu1\n  HostName 192.0.2.10\n  User alice\n  Port 2222\n  IdentityFile ~/.ssh/k1\n"},
     ["gpu1", "other"]),
    ("two patterns on a Host line", {"config": "Host a b\n  User both\n"}, ["a", "b", "c"]),
    ("comma is literal on a Host line", {"config": "Host a,b\n  User comma\n"}, ["a", "b"]),
    ("first value wins: specific before Host *",
     {"config": "Host n1\n  User specific\nHost *\n  User default\n  Port 2200\n"}, ["n1", "n2"]),
    ("first value wins: Host * first",
     {"config": "Host *\n  User default\nHost n1\n  User specific\n  Port 2300\n"}, ["n1"]),
    ("negation skips one host", {"config": "Host * !bastion\n  User pooled\n"}, ["gpu", "bastion"]),
    ("only negated patterns match nothing", {"config": "Host !gpu1\n  User neg\n"}, ["gpu1", "gpu2"]),
    ("question mark wildcard", {"config": "Host gpu?\n  Port 2201\n"}, ["gpu1", "gpu10", "gpu"]),
    ("brackets are literal", {"config": "Host [ab]x\n  User br\n"}, ["ax", "[ab]x"]),
    ("Host matching is case-sensitive", {"config": "Host Alpha\n  User upper\n"}, ["alpha", "Alpha"]),
    ("keywords are case-insensitive",
     {"config": "HOST h1\n  hOsTnAmE 10.1.1.1\n  USER carol\n  pOrT 2022\n"}, ["h1"]),
    ("Key=value forms",
     {"config": "Host h1\n  HostName=10.1.1.2\n  User = dave\n  Port= 2023\n  IdentityFile =~/.ssh/eq\n"}, ["h1"]),
    ("double and single quotes",
     {"config": "Host q1\n  User \"x y\"\n  IdentityFile '~/.ssh/with space'\nHost q2\n  User 'sq'\n"}, ["q1", "q2"]),
    ("backslash escapes",
     {"config": "Host e1\n  User a\\ b\n  IdentityFile \"~/.ssh/q\\\"uote\"\nHost e2\n  User back\\\\slash\n"},
     ["e1", "e2"]),
    ("trailing comment ends the line", {"config": "Host c1\n  Port 2024 # the gpu box\n  User erin #x\n"}, ["c1"]),
    ("hash inside a token is literal", {"config": "Host c2\n  User h#x\n  HostName box#1\n"}, ["c2"]),
    ("comments, blank lines and tabs",
     {"config": "# top comment\n\n\tHost t1\n\t\t# inside\n\n\tUser\ttabs\n   Port\t2025\n"}, ["t1"]),
    ("IdentityFile accumulates without duplicates",
     {"config": "Host i1\n  IdentityFile ~/.ssh/a\n  IdentityFile ~/.ssh/b\nHost *\n  IdentityFile ~/.ssh/a\n  IdentityFile ~/.ssh/c\n"},
     ["i1", "i2"]),
    ("default identity files", {"config": "Host d1\n  User x\n"}, ["d1"]),
    ("HostName %h expands to the alias",
     {"config": "Host *.short\n  HostName %h.example.com\n"}, ["gpu.short", "x"]),
    ("HostName %% is a percent", {"config": "Host p1\n  HostName 100%%host\n"}, ["p1"]),
    ("HostName is lowercased", {"config": "Host u1\n  HostName GPU.Example.COM\n"}, ["u1"]),
    ("defaults: port 22, local user, hostname = alias", {"config": "Host z\n  Compression yes\n"}, ["z", "Mixed.Case"]),
    ("Include an absolute file",
     {"config": "Include {dir}/nodes.conf\nHost *\n  User fallback\n", "nodes.conf": "Host inc1\n  User included\n"},
     ["inc1", "other"]),
    ("Include several paths on one line",
     {"config": "Include {dir}/one.conf {dir}/two.conf\n",
      "one.conf": "Host m1\n  User one\n", "two.conf": "Host m1\n  Port 2101\nHost m2\n  User two\n"},
     ["m1", "m2"]),
    ("Include glob in sorted order",
     {"config": "Include {dir}/conf.d/*.conf\n",
      "conf.d/20-b.conf": "Host g1\n  User from-b\n", "conf.d/10-a.conf": "Host g1\n  User from-a\n  Port 2102\n"},
     ["g1"]),
    ("Include of a missing file is ignored",
     {"config": "Include {dir}/nope.conf {dir}/none/*.conf\nHost x1\n  User still\n"}, ["x1"]),
    ("Include inside a Host block applies only to it",
     {"config": "Host special\n  Include {dir}/special.conf\nHost *\n  User plain\n",
      "special.conf": "User special-user\nPort 2103\n"},
     ["special", "other"]),
    ("parent state is restored after an Include",
     {"config": "Host alpha\n  Include {dir}/inc.conf\n  User alpha-user\nHost *\n  Port 2999\n",
      "inc.conf": "Host beta\n  User beta-user\n"},
     ["alpha", "beta"]),
    ("relative Include resolves against ~/.ssh",
     {"config": "Include {tag}.conf\n", "~/.ssh/{tag}.conf": "Host rel1\n  User relative\n"}, ["rel1"]),
    ("Include with ~", {"config": "Include ~/.ssh/{tag}.conf\n", "~/.ssh/{tag}.conf": "Host til1\n  Port 2104\n"},
     ["til1"]),
    ("recursive Include is an error",
     {"config": "Host a\n  User x\nInclude {dir}/loop.conf\n", "loop.conf": "Include {dir}/loop.conf\n"}, ["a"]),
    ("Match all", {"config": "Host h\n  Port 2105\nMatch all\n  User everyone\n"}, ["h"]),
    ("Match host compares the HostName so far",
     {"config": "Host gpu1\n  HostName 10.0.0.5\nMatch host 10.0.0.*\n  User lan\nMatch host gpu1\n  Port 2106\n"},
     ["gpu1"]),
    ("Match host before HostName sees the alias",
     {"config": "Match host gpu2\n  Port 2107\nHost gpu2\n  HostName 10.0.0.6\n"}, ["gpu2"]),
    ("Match originalhost is case-insensitive",
     {"config": "Host o1\n  HostName 10.0.0.7\nMatch originalhost O1\n  User orig\n"}, ["o1"]),
    ("Match user and localuser",
     {"config": "Host w1\n  User bob\nMatch user bob\n  Port 2108\nMatch localuser {user}\n  IdentityFile ~/.ssh/local\n"},
     ["w1", "w2"]),
    ("Match negation", {"config": "Match !host skip*\n  User notskipped\n"}, ["skipme", "keep"]),
    ("Match pattern list", {"config": "Match host a1,b1,!c*\n  User listed\n"}, ["a1", "b1", "c1"]),
    ("Match criteria are ANDed",
     {"config": "Match host and1 user nobody\n  Port 2109\nMatch host and1 localuser {user}\n  Port 2110\n"},
     ["and1"]),
    ("Match final makes a second pass on the lowercased HostName",
     {"config": "Host f1\n  HostName Final.Example\nMatch final\n  User fin\nHost final.example\n  Port 2111\n"},
     ["f1"]),
    ("Match canonical without final never applies",
     {"config": "Match canonical\n  User canon\nHost c\n  Port 2112\n"}, ["c"]),
    ("Match canonical all is accepted", {"config": "Match canonical all\n  User ca\n"}, ["x"]),
    ("Match exec after a failing criterion is not run",
     {"config": "Match host nomatch exec false\n  User never\nHost e\n  Port 2113\n"}, ["e"]),
    ("Match exec decides", {"config": "Match exec true\n  User byexec\nMatch exec false\n  Port 2114\n"}, ["ex"]),
    ("unknown keyword is an error", {"config": "Host a\n  User ok\n\nHost b\n  Bogus yes\n"}, ["a"]),
    ("IgnoreUnknown covers unknown keywords",
     {"config": "IgnoreUnknown UseKeychain,AddKeys*\nHost a\n  UseKeychain yes\n  User ok\n"}, ["a"]),
    ("IgnoreUnknown in a block that does not match does not apply",
     {"config": "Host other\n  IgnoreUnknown UseKeychain\nHost a\n  UseKeychain yes\n"}, ["a"]),
    ("missing argument", {"config": "Host a\n  User\n"}, ["a"]),
    ("extra argument", {"config": "Host a\n  User alice bob\n"}, ["a"]),
    ("unbalanced quote", {"config": "Host a\n  User \"alice\n"}, ["a"]),
    ("Match with unknown criterion", {"config": "Host a\n  User x\nMatch colour blue\n  User y\n"}, ["a"]),
    ("Match criterion without argument", {"config": "Match user\n  Port 2115\n"}, ["a"]),
    ("Match all combined with another criterion", {"config": "Match all host x\n  User y\n"}, ["a"]),
    ("error in an Include under a block that does not match",
     {"config": "Host nomatch\n  Include {dir}/bad.conf\nHost a\n  User fine\n", "bad.conf": "Bogus 1\n"}, ["a"]),
    ("bad port", {"config": "Host a\n  Port 70000\n"}, ["a"]),
    ("Host without patterns", {"config": "Host\n  User x\n"}, ["a"]),
    ("bad token in HostName", {"config": "Host a\n  HostName %n.example.com\n"}, ["a"]),
    ("ProxyCommand keeps the rest of the line",
     {"config": "Host pc\n  ProxyCommand ssh -W %h:%p bastion # not a comment for ssh\n  User pcu\n"}, ["pc"]),
    ("bad time value", {"config": "Host a\n  ServerAliveInterval 5x\n"}, ["a"]),
    ("bad yes/no value", {"config": "Host a\n  BatchMode maybe\n"}, ["a"]),
    ("SendEnv takes names, not assignments", {"config": "Host a\n  SendEnv LANG=C\n"}, ["a"]),
    ("the first bad line is the one reported",
     {"config": "Host a\n  Bogus 1\n  User x y\n"}, ["a"]),
    ("Port may be a service name", {"config": "Host a\n  Port ssh\n"}, ["a"]),
    ("all after one criterion is accepted", {"config": "Match host gpu* all\n  User m\n"}, ["gpu1", "cpu1"]),
    ("all after two criteria is an error", {"config": "Match canonical final all\n  User m\n"}, ["a"]),
    ("negated all never matches", {"config": "Match !all\n  User m\n"}, ["a"]),
    ("an empty quoted argument is an error", {"config": "Host a\n  User \"\"\n"}, ["a"]),
    ("a leading = before the keyword is skipped", {"config": "Host a\n  =User lead\n"}, ["a"]),
    ("quoted Host pattern", {"config": "Host \"q*\" r\n  User quoted\n"}, ["qq", "r", "s"]),
    ("CRLF line endings", {"config": "Host a\r\n  User crlf\r\n  Port 2117\r\n"}, ["a"]),
    ("ControlPath tokens",
     {"config": "Host cp\n  HostName Box.Example\n  User bob\n  Port 2201\n"
                "  ControlPath ~/.ssh/cm-%r@%h:%p-%n-%l-%L-%u-%d-%%\n"}, ["cp"]),
    ("ControlPath %C is SHA-1 of %l%h%p%r", {"config": "Host c9\n  User u9\n  ControlPath /tmp/x-%C\n"}, ["c9"]),
    ("ControlPath none", {"config": "Host cn\n  ControlPath none\n"}, ["cn"]),
    ("IdentityAgent and UserKnownHostsFile expand ~ and ${VAR}",
     {"config": "Host ia\n  IdentityAgent ~/agent-%u.sock\n  UserKnownHostsFile ${{HOME}}/kh-%h ~/.ssh/kh2\n"}, ["ia"]),
    ("IdentityFile keeps its tokens as ssh -G shows", {"config": "Host it\n  IdentityFile ~/.ssh/id-%r@%h\n"}, ["it"]),
    ("several blocks stack", {"config": "Host s1\n  User s\nHost s*\n  Port 2116\nHost *\n  HostName %h.lan\n"},
     ["s1", "t1"]),
]


def materialize(files, root, tag):
    """Write a case's files; return (config path, files written outside root)."""
    home = _home()
    outside = []
    for rel, text in files.items():
        text = text.format(dir=root, home=home, tag=tag, user=_local_user())
        rel = rel.format(tag=tag)
        path = os.path.join(home, rel[2:]) if rel.startswith("~/") else os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)
        if rel.startswith("~/"):
            outside.append(path)
    return os.path.join(root, "config"), outside


def _home():
    import pwd
    return pwd.getpwuid(os.getuid()).pw_dir


def _local_user():
    import pwd
    return pwd.getpwuid(os.getuid()).pw_name


EXPANDED = ("controlpath", "identityagent", "userknownhostsfile")   # recorded when a case sets them


def ssh_g(config, alias):
    """What ssh says: ({hostname, user, port, identityfile, ...}, None) or (None, line-or-0)."""
    p = subprocess.run(["ssh", "-G", "-T", "-F", config, "--", alias], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        m = re.search(r"line (\d+)", p.stderr)
        return None, int(m.group(1)) if m else 0
    out = {"identityfile": []}
    for line in p.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key == "identityfile":
            out["identityfile"].append(value)
        elif key in ("hostname", "user"):
            out[key] = value
        elif key == "port":
            out[key] = int(value)
        elif key in EXPANDED and key.lower() in open(config).read().lower():
            out[key] = value
    return out, None


def normalise(values, root, home):
    """Make recorded values portable: temp dir, home and local user as placeholders."""
    import socket

    def sub(s):
        s = re.sub(r"\b[0-9a-f]{40}\b", "{C}", s)
        local = socket.gethostname()
        s = s.replace(root, "{dir}").replace(home, "{home}")
        for value, name in ((local, "{l}"), (local.split(".")[0], "{L}"), (_local_user(), "{u}")):
            s = re.sub(r"(?<=[-@:/_])" + re.escape(value) + r"(?=[-@:/_.]|$)", name, s)
        return s
    if values is None:
        return None
    out = dict(values)
    out["identityfile"] = [sub(v) for v in values["identityfile"]]
    for key in EXPANDED:
        if key in out:
            out[key] = sub(out[key])
    if out["user"] == _local_user():
        out["user"] = "{user}"
    return out


def record():
    results = {}
    for name, files, aliases in CASES:
        with tempfile.TemporaryDirectory() as root:
            tag = "mesh-corpus-" + os.path.basename(root)
            config, outside = materialize(files, root, tag)
            try:
                entry = {}
                for alias in aliases:
                    values, err = ssh_g(config, alias)
                    entry[alias] = ({"error_line": err} if values is None
                                    else normalise(values, root, _home()))
                results[name] = entry
            finally:
                for path in outside:
                    os.unlink(path)
    version = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    with open(RECORD, "w") as fh:
        json.dump({"ssh_version": version, "cases": results}, fh, indent=1, sort_keys=True)
        fh.write("\n")
    print(f"recorded {len(results)} cases with {version}")


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    if sys.argv[1:] == ["--record"]:
        record()
    else:
        print(__doc__)
