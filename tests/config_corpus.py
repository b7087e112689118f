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
    # Issue 13: kinds where ssh accepts what a naive reader rejects.
    ("Include glob matching a subdirectory reads it as empty",
     {"config": "Include {dir}/config.d/*\nHost a\n  User top\n", "config.d/10-a.conf": "Host a\n  Port 2201\n",
      "config.d/sub/x.conf": "Host a\n  User never\n"}, ["a"]),
    ("IPQoS takes two values", {"config": "Host a\n  IPQoS lowdelay throughput\n  Port 2202\n"}, ["a"]),
    ("RekeyLimit with an interval", {"config": "Host a\n  RekeyLimit 1G 1h\n  Port 2203\n"}, ["a"]),
    ("AddKeysToAgent confirm with a lifetime", {"config": "Host a\n  AddKeysToAgent confirm 5m\n  User akta\n"}, ["a"]),
    ("Port with a plus sign", {"config": "Host a\n  Port +2222\n"}, ["a"]),
    ("ServerAliveInterval none", {"config": "Host a\n  ServerAliveInterval none\n  User sai\n"}, ["a"]),
    ("Match splits on one =", {"config": "Match host=a\n  User eq\nMatch originalhost=b user=x\n  Port 2204\n"},
     ["a", "b"]),
    ("HostName tokens are expanded only for the host in use",
     {"config": "Host unused\n  HostName %n.example\nHost a\n  User used\n"}, ["a", "unused"]),
    ("Include chain 16 deep whose last glob matches nothing",
     dict({"config": "Include {dir}/chain1.conf\nHost a\n  User top\n"},
          **{f"chain{i}.conf": f"Include {{dir}}/chain{i + 1}.conf\n" for i in range(1, 16)},
          **{"chain16.conf": "Include {dir}/nothing/*.conf\nHost a\n  Port 2205\n"}), ["a"]),
    ("Include chain 17 deep is too deep",
     dict({"config": "Host a\n  User top\nInclude {dir}/chain1.conf\n"},
          **{f"chain{i}.conf": f"Include {{dir}}/chain{i + 1}.conf\n" for i in range(1, 17)},
          **{"chain17.conf": "Host a\n  Port 2206\n"}), ["a"]),
    ("UseKeychain is unknown to stock OpenSSH", {"config": "Host a\n  UseKeychain yes\n"}, ["a"]),
    # ... where ssh rejects what a naive reader accepts.
    ("bad cipher name", {"config": "Host a\n  Ciphers aes128-ctr,bogus-cipher\n"}, ["a"]),
    ("bad MAC and KEX names", {"config": "Host a\n  MACs hmac-sha9\nHost b\n  KexAlgorithms nope\n"}, ["a"]),
    ("algorithm lists with +, - and ^",
     {"config": "Host a\n  Ciphers +aes128-cbc\n  MACs -hmac-md5*,bogus\n  KexAlgorithms ^curve25519-sha256\n"
                "  HostKeyAlgorithms ssh-ed25519*\n  User algos\n"}, ["a"]),
    ("unbalanced quote in ProxyCommand", {"config": "Host a\n  ProxyCommand ssh -W %h:%p \"bastion\n"}, ["a"]),
    ("empty Host pattern", {"config": "Host a \"\"\n  User x\n"}, ["a"]),
    ("empty SendEnv argument", {"config": "Host a\n  SendEnv LANG \"\"\n"}, ["a"]),
    ("ProxyJump without a host", {"config": "Host a\n  ProxyJump user@\n"}, ["a"]),
    ("ProxyJump to itself is a loop", {"config": "Host a\n  ProxyJump a\n"}, ["a", "b"]),
    ("Compression takes yes or no only", {"config": "Host a\n  Compression true\n"}, ["a"]),
    ("ControlPersist flags are lowercase", {"config": "Host a\n  ControlPersist YES\n"}, ["a"]),
    # ... where the answers differ.
    ("quoted keyword", {"config": "Host a\n  \"User\" bob\n"}, ["a"]),
    ("Match keeps single quotes", {"config": "Match originalhost 'a'\n  User sq\nMatch originalhost \"a\"\n  Port 2207\n"},
     ["a"]),
    ("CanonicalizeHostname makes a second pass",
     {"config": "Host a\n  CanonicalizeHostname yes\n  HostName Box.Lan\nHost box.lan\n  User canon\n  Port 2208\n"},
     ["a"]),
    ("numeric HostNames as ssh shows them",
     {"config": "Host a\n  HostName 127.1\nHost b\n  HostName 2001:DB8:0:0:0:0:0:1\nHost c\n  HostName 0x7f.1\n"
                "Host d\n  HostName ::FFFF:10.1.2.3\n"}, ["a", "b", "c", "d"]),
    ("only newline ends a line",
     {"config": "Host a\n  # note\fPort 9\n  # vt\vUser vt\n  # ls\u2028Port 8\n  # cr\rUser cr\n  User nl\n"},
     ["a"]),
    ("a NUL ends the line early", {"config": "Host a\n  Port 2209\0 junk\n"}, ["a"]),
    ("a line of a form feed alone is an error", {"config": "Host a\n\f\n"}, ["a"]),
    ("a Host line negation stops the checks", {"config": "Host !a \"\"\n  User x\n"}, ["a", "b"]),
    ("Include in a block that does not match is still read",
     {"config": "Host other\n  Include {dir}/bad.conf\nHost a\n  User fine\n", "bad.conf": "Port 0\n"}, ["a"]),
    ("IgnoreUnknown in force before the unknown line only",
     {"config": "Host a\n  FooBar 1\n  IgnoreUnknown Foo*\n"}, ["a"]),
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


def g_values(text, extra=()):
    """The fields the corpus records from `ssh -G` output: hostname, user, port, every
    identityfile, and the `extra` keywords."""
    out = {"identityfile": []}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "identityfile":
            out["identityfile"].append(value)
        elif key in ("hostname", "user") or key in extra:
            out[key] = value
        elif key == "port":
            out[key] = int(value)
    return out


def ssh_g(config, alias):
    """What ssh says: ({hostname, user, port, identityfile, ...}, None) or (None, line-or-0)."""
    p = subprocess.run(["ssh", "-G", "-T", "-F", config, "--", alias], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        m = re.search(r"line (\d+)", p.stderr)
        return None, int(m.group(1)) if m else 0
    with open(config) as fh:
        text = fh.read().lower()
    return g_values(p.stdout, [k for k in EXPANDED if k in text]), None


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


# ---------------------------------------------------------------------------
# Random configs for the differential fuzz test: each case exercises the edges
# the hand parser must read as ssh does (tokenising, quoting, line ends, values
# ssh validates, Include globs and depth, Match forms, numeric HostNames, the
# second pass).  Nothing here makes ssh look a name up: no CanonicalDomains, no
# trailing-dot names.
# ---------------------------------------------------------------------------

FUZZ_ALIASES = ["a", "b", "gpu1", "Gpu2", "web.lan", "x-1"]

_VALUES = {
    "HostName": ["10.0.0.1", "127.1", "0x7f.1", "2001:DB8:0:0:0:0:0:1", "::FFFF:10.1.2.3", "Box.Example",
                 "%h.example", "%h", "100%%x", "%n.example", "%", "GPU.lan", "1.2.3.4.5", '"q h"', "fe80::1"],
    "User": ["alice", '"x y"', "'sq'", r"a\ b", '""', "bob carol", "%u", "h#x", "#c", "u=v"],
    "Port": ["2222", "+2222", "0", "70000", "ssh", '" 22"', "-1", "22x", "0022", "http"],
    "IdentityFile": ["~/.ssh/k1", "~/.ssh/k2", '"~/.ssh/with space"', "%d/k", '""', "k1 k2"],
    "IPQoS": ["lowdelay throughput", "af21", "le", "0x10", "256", "bogus", "af11 af12 af13", "010", "08", "ef cs1"],
    "RekeyLimit": ["1G 1h", "default none", "1G", "10", "512K 30m", "1G!", "1Gx", "+1M", "1.5M 1h", "default 5x"],
    "AddKeysToAgent": ["confirm 5m", "yes", "ask", "5m", "confirm", "confirm x", "yes 5m", "maybe", "1h30m"],
    "ServerAliveInterval": ["none", "5m", "1h30m", "x", "+5", " 5", "5 6", "NONE", "2147483648"],
    "ConnectTimeout": ["none", "10", "10s", "-1", "1w"],
    "Ciphers": ["aes128-ctr", "+aes128-cbc", "-aes128-ctr,bogus", "^chacha20-poly1305@openssh.com", "bogus",
                "aes128-ctr,,bogus", "none", "+", "aes128-ctr,bogus"],
    "MACs": ["hmac-sha2-256", "hmac-sha9", "-x", "+umac-64@openssh.com"],
    "KexAlgorithms": ["curve25519-sha256", "sntrup761x25519-sha512@openssh.com", "bogus-kex", "+diffie-hellman-group1-sha1"],
    "HostKeyAlgorithms": ["ssh-ed25519", "ssh-ed25519*", "!nomatch", "bogus", "+ssh-rsa", "rsa-sha2-512"],
    "ProxyCommand": ['ssh -W %h:%p bastion', 'ssh "x', "nc %h %p # not a comment", "none", '""'],
    "ProxyJump": ["bastion", "user@", "u@j:2222", "ssh://u@j:22", "a,b", "a,,b", "none", "j:0", "[::1]:22", "@x"],
    "SendEnv": ["LANG", 'LANG ""', "LC_*", "X=Y", "-LANG"],
    "SetEnv": ["A=1", "A", "A=1 B=2"],
    "Compression": ["yes", "true", "no"],
    "ControlPersist": ["yes", "YES", "10m", "no", "x"],
    "ControlMaster": ["auto", "autoask", "maybe"],
    "StrictHostKeyChecking": ["accept-new", "off", "nope"],
    "LogLevel": ["ERROR", "debug3", "loud"],
    "EscapeChar": ["~", "^A", "none", "ab", "^"],
    "LocalForward": ["8080 localhost:80", "8080", "[::1]:8080 h:80", "0 h:80", "/tmp/s h:80"],
    "DynamicForward": ["1080", "x:1080", "bogus"],
    "CanonicalizeHostname": ["yes", "always", "no"],
    "CanonicalizeMaxDots": ["0", "1", "x"],
    "CanonicalizeFallbackLocal": ["no", "yes"],
    "ForwardAgent": ["yes", "/tmp/agent", "${{MESH_FUZZ_UNSET}}", "$bad-name"],
    "UseKeychain": ["yes"],
    "IgnoreUnknown": ["UseKeychain", "Use*", "nothing"],
    "GSSAPIAuthentication": ["yes"],
    "Tunnel": ["point-to-point", "yes", "x"],
    "TunnelDevice": ["any:any", "1:2", "x"],
}

# Values ssh rejects (or, for UseKeychain, an unknown keyword): a "clean" case leaves them out.
_BAD_VALUES = {'HostName': ['%n.example', '%'], 'User': ['""', 'bob carol', '#c'], 'Port': ['0', '70000', '-1', '22x'], 'IdentityFile': ['""', 'k1 k2'], 'IPQoS': ['256', 'bogus', 'af11 af12 af13', '08'], 'RekeyLimit': ['10', '1Gx', 'default 5x'], 'AddKeysToAgent': ['confirm', 'confirm x', 'yes 5m', 'maybe'], 'ServerAliveInterval': ['x', '5 6', 'NONE', '2147483648'], 'ConnectTimeout': ['-1'], 'Ciphers': ['bogus', 'none', '+', 'aes128-ctr,bogus'], 'MACs': ['hmac-sha9'], 'KexAlgorithms': ['bogus-kex'], 'HostKeyAlgorithms': ['!nomatch', 'bogus'], 'ProxyCommand': ['ssh "x'], 'ProxyJump': ['user@', 'a,,b', 'j:0', '@x'], 'SendEnv': ['LANG ""', 'X=Y'], 'SetEnv': ['A'], 'Compression': ['true'], 'ControlPersist': ['YES', 'x'], 'ControlMaster': ['maybe'], 'StrictHostKeyChecking': ['nope'], 'LogLevel': ['loud'], 'EscapeChar': ['ab', '^'], 'LocalForward': ['8080', '0 h:80'], 'DynamicForward': ['bogus'], 'CanonicalizeMaxDots': ['x'], 'ForwardAgent': ['${{MESH_FUZZ_UNSET}}', '$bad-name'], 'UseKeychain': ['yes'], 'Tunnel': ['x'], 'TunnelDevice': ['x']}

_FORMS = ["{k} {v}", "{k}={v}", "{k} = {v}", '"{k}" {v}', "\t{k}\t{v}", "  {k} {v} # trailing", "{kl} {v}",
          "{ku} {v}", "={k} {v}"]
_ODD_LINES = ["# note\fPort 9", "# a\vUser v", "# c\rUser cr", "# u\u2028Port 8", "", "   ", "\f", "#", "# mesh: on",
              "Port 2200\r", "User trailing \f", "Host", '"User bob', "Bogus 1"]


def _fuzz_match(rng):
    alias = rng.choice(FUZZ_ALIASES)
    return rng.choice([
        f"Match host {alias}", f"Match host={alias}", f"Match originalhost '{alias}'",
        f'Match originalhost "{alias}"', "Match all", "Match final", "Match canonical", f"Match !host {alias}",
        f"Match host {alias},!b", "Match user alice", f"Match host 10.0.0.* user {_local_user()}",
        "Match final host *.example", "Match canonical all", "Match all host x", f"Match host {alias} all",
        "Match colour blue", "Match user", f"Match localuser {_local_user()}", "Match host 127.0.0.1",
        f"Match originalhost {alias.upper()}", "Match exec false", "Match host a # comment",
    ])


def fuzz_config(rng, depth_budget=3):
    """One random config: {relative path: text}; the top file is 'config'."""
    files = {}
    clean = rng.random() < 0.6

    def block_lines(n):
        out = []
        for _ in range(n):
            roll = rng.random()
            if roll < 0.07:
                out.append(rng.choice(_ODD_LINES[:10] if clean else _ODD_LINES))
                continue
            k = rng.choice(list(_VALUES))
            choices = [v for v in _VALUES[k] if not clean or v not in _BAD_VALUES.get(k, ())]
            if not choices:
                continue
            v = rng.choice(choices)
            form = rng.choice(_FORMS) if rng.random() < 0.35 else "  {k} {v}"
            out.append(form.format(k=k, v=v, kl=k.lower(), ku=k.upper()))
        return out

    def host_line():
        pats = rng.sample(FUZZ_ALIASES, rng.randint(1, 3))
        extra = rng.random()
        if extra < 0.15:
            pats.append(rng.choice(["*", "gpu*", "!b", "web.*", "?", '"a"'] + ([] if clean else ['""'])))
        elif extra < 0.2:
            pats = ["!" + pats[0]] + pats[1:]
        return "Host " + " ".join(pats)

    def make_file(name, depth):
        lines = block_lines(rng.randint(0, 3))
        for _ in range(rng.randint(1, 4)):
            roll = rng.random()
            if roll < 0.6:
                lines.append(host_line())
                if rng.random() < 0.3:
                    lines.append("  # mesh: on")
            elif roll < 0.85:
                lines.append(_fuzz_match(rng))
            else:
                lines.append("Host *")
            lines.extend(block_lines(rng.randint(0, 4)))
            if depth < depth_budget and rng.random() < 0.25:
                kind = rng.random()
                sub = f"inc{depth}_{rng.randint(0, 99)}"
                if kind < 0.4:
                    lines.append(f"Include {{dir}}/{sub}.conf")
                    make_file(f"{sub}.conf", depth + 1)
                elif kind < 0.6:
                    lines.append(f"Include {{dir}}/{sub}.d/*")
                    make_file(f"{sub}.d/10.conf", depth + 1)
                    files[f"{sub}.d/sub/20.conf"] = "User in-subdir\n"   # a subdirectory reads as empty
                elif kind < 0.75:
                    lines.append(f"Include {{dir}}/nothing-{sub}/*.conf {{dir}}/missing-{sub}.conf")
                elif kind < 0.85:
                    lines.append(f'Include {{dir}}/{sub}.conf ""')
                    make_file(f"{sub}.conf", depth + 1)
                else:
                    lines.append(f"Include {{dir}}/{name}")  # a loop: too deep
        ending = rng.choice(["\n", "\n", "\n", "\r\n"])
        text = ending.join(lines) + ("" if rng.random() < 0.1 else ending)
        files[name] = text

    make_file("config", 0)
    if rng.random() < 0.05:   # an Include chain as deep as ssh allows, ending in a glob that matches nothing
        n = rng.choice([15, 16, 17])
        files["config"] += f"\nInclude {{dir}}/chain1.conf\n"
        for i in range(1, n + 1):
            files[f"chain{i}.conf"] = f"Include {{dir}}/chain{i + 1}.conf\n" if i < n else \
                "Include {dir}/chain-end/*.conf\nHost a\n  User deep\n"
    return files


def ssh_verdict(config, alias, env=None):
    """(values or None, (file, line) of ssh's first complaint or None) from ssh -G."""
    p = subprocess.run(["ssh", "-G", "-T", "-F", config, "--", alias], capture_output=True, text=True,
                       timeout=30, env=env, errors="surrogateescape")
    if p.returncode != 0:
        m = re.search(r"^(.*?):? line (\d+): (?!Unsupported option)", p.stderr, re.M)
        return None, ((m.group(1), int(m.group(2))) if m else None)
    return g_values(p.stdout), None


def mesh_verdict(mesh, config, alias):
    """The same from mesh.py's hand parser: (values or None, (file, line) or None, unresolved)."""
    try:
        info = mesh.SSHConfig.load(config).resolve(alias)
    except mesh.ConfigError as exc:
        m = re.match(r"(.+?):(\d+): ", str(exc))
        return None, ((m.group(1), int(m.group(2))) if m else None), False
    return ({"hostname": info.hostname, "user": info.user, "port": info.port,
             "identityfile": info.identityfile}, None, info.unresolved)


def fuzz_disagreements(mesh, seed, count, root, aliases_per_case=3, workers=4):
    """Generate `count` configs from `seed`, ask ssh -G and mesh about some aliases
    of each, return the disagreements as readable strings."""
    import random
    import shutil
    from concurrent.futures import ThreadPoolExecutor
    rng = random.Random(seed)
    jobs = []
    for n in range(count):
        files = fuzz_config(rng)
        case_root = os.path.join(root, f"case{n}")
        os.makedirs(case_root)
        config, _ = materialize(files, case_root, "unused")
        for alias in rng.sample(FUZZ_ALIASES, aliases_per_case):
            jobs.append((n, files, config, alias))
    env = {k: v for k, v in os.environ.items() if k != "MESH_FUZZ_UNSET"}
    with ThreadPoolExecutor(workers) as pool:
        answers = list(pool.map(lambda job: ssh_verdict(job[2], job[3], env), jobs))
    problems = []
    for (n, files, config, alias), (want, want_err) in zip(jobs, answers):
        got, got_err, unresolved = mesh_verdict(mesh, config, alias)
        if unresolved and got is not None:
            continue   # a `Match exec` or a DNS lookup: mesh asks ssh -G for this node
        if (want is None) != (got is None):
            verdict = "rejects" if want is None else "accepts"
            problems.append(f"case {n} alias {alias}: ssh {verdict}, mesh {'accepts' if got else 'rejects'} "
                            f"({got_err or want_err}) files={files!r}")
        elif want is not None and want != got:
            problems.append(f"case {n} alias {alias}: ssh {want} mesh {got} files={files!r}")
        elif want is None and want_err and got_err and (os.path.realpath(want_err[0]), want_err[1]) != (
                os.path.realpath(got_err[0]), got_err[1]):
            problems.append(f"case {n} alias {alias}: ssh complains at {want_err}, mesh at {got_err} "
                            f"files={files!r}")
    shutil.rmtree(root, ignore_errors=True)
    return problems
