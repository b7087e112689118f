#!/usr/bin/env python3
"""mesh.py - one pool of Ollama machines over nothing but SSH.

Every node keeps Ollama on its own localhost:11434 and exposes only sshd.
The nodes are the Host entries of your SSH config that carry a ``# mesh:``
line (``# mesh: on``); other hosts are never contacted.  mesh.py reaches each
node's Ollama through one OpenSSH ControlMaster per node (a forward held by
the master, else per-request ``ssh -W``, else ``ssh NODE curl``), routes each
request to the least loaded node that has the model, fails over before the
first byte, and streams tokens as they arrive.

Command line::

    python3 mesh.py test                 # check every node
    python3 mesh.py nodes --json         # what the SSH config says
    python3 mesh.py nodes --all          # every Host, and why it is or is not a node
    python3 mesh.py generate "Hello"     # ask the pool
    python3 mesh.py run qwen2.5:7b       # chat, as `ollama run` (with a prompt: one answer)
    python3 mesh.py list                 # models x nodes; also ps, show, pull, rm, stop
    python3 mesh.py chat                 # talk to the pool
    python3 mesh.py connections --stop   # list (or end) mesh's own ssh masters
    python3 mesh.py serve                # look like one Ollama on 127.0.0.1:11500 (dashboard: /mesh/)
    python3 mesh.py bench                # time to first token, tokens/s per node

Library::

    from mesh import MeshOrchestrator
    async with MeshOrchestrator(config="~/.ssh/config") as mesh:
        reply = await mesh.generate("Hello", model="qwen2.5:7b")
        async for chunk in await mesh.generate("Hi", stream=True):
            print(chunk["response"], end="")

A node is marked, and its settings ssh does not know are given, in a comment
inside its Host block::

    Host vengeance
        HostName 192.0.2.46
        # mesh: on name="Vengeance RTX 4090" weight=3 max_concurrent=16

Standard library only; Python 3.9 or newer.

Sections, in dependency order (each begins with a banner comment)::

    constants, errors      MeshError and its subclasses (the message is what the user sees)
    SSH config (pure)      SSHConfig, HostInfo: text in, hosts out, held to `ssh -G`
    SSH config referee     read_config_hosts: the local `ssh -G` settles what only it can
                           know, once per config change (cached in config_cache_dir())
    node settings (pure)   NodeSpec, load_node_specs, parse_mesh_settings
    wire formats (pure)    NDJSONDecoder; HTTP/1.1 framing: parse_request_head,
                           ChunkedDecoder, response_head, response_framing;
                           node replies: ReplyDechunker, ReplyScanner (end, bad lines)
    operations (pure)      MetricFamily, MetricsRegistry (Prometheus text format),
                           AccessRecord, format_access_line (access-log lines)
    routing (pure)         load_score, rank_nodes, closest_names (the original score);
                           Balancer, NodeRouteState, RouteRequest, prompt_prefixes,
                           count_busy_connections (routing by expected completion time)
    transport              the only code that spawns ssh or opens sockets to nodes; list_masters,
                           curl_command (what `ssh NODE curl` runs on the node),
                           start_rank (which ssh masters start first, by a knock)
    nodes                  SSHNode: health, load, inventory
    orchestrator           MeshOrchestrator: the public async API; RawStream (bytes; its
                           relay_rest passes a node socket's reads on from data_received);
                           reload, apply_specs, watch_config, watch_health for serve
    dashboard              DASHBOARD_HTML: the page GET /mesh/ serves
    HTTP front             ServerLimits, Router and one route table per API,
                           Exchange, StreamRelay, ServeOps, MeshServer; `serve`, `bench`
    command line           one function per command (run, list, ps, show, pull, rm, stop,
                           connections, generate, chat, test, nodes, bench, serve),
                           ChatSession, main()
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import json
import logging
import os
import random
import re
import sys
import time
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple

__all__ = [
    "MeshError", "UsageError", "ConfigError", "NodeError", "ModelNotFoundError", "NoNodeAvailableError",
    "StreamInterruptedError", "RequestFailedError", "SSHConfig", "HostInfo", "NodeSpec", "load_node_specs",
    "parse_mesh_settings", "read_config_hosts", "config_cache_dir", "parse_ssh_g",
    "NDJSONDecoder", "decode_json_body", "ollama_type_error", "HTTPError", "HTTPRequest", "parse_request_head",
    "find_head_end", "ChunkedDecoder", "response_head", "response_framing", "body_allowed", "SSHNode",
    "MeshOrchestrator",
    "ServerLimits", "Route", "Router", "Exchange", "StreamRelay", "MeshServer", "Listener", "main",
    "ChatSession", "closest_names", "parse_node_facts", "fits_in_memory", "FACTS_COMMAND", "list_masters",
    "stop_master", "node_verdict", "SSH_OPTIONS", "ssh_quote", "control_dir", "curl_command", "start_rank",
    "ReplyDechunker", "ReplyScanner", "RawStream", "listen_backlog", "terminal_text",
    "UnsupportedPathError", "api_family", "error_body", "is_unsupported_reply", "openai_model",
    "openai_model_list", "merge_ps", "keep_alive_seconds", "is_unload_request", "allowed_origins",
    "origin_allowed", "host_allowed", "DEFAULT_ORIGINS",
    "Balancer", "NodeRouteState", "RouteRequest", "prompt_prefixes", "context_fingerprint",
    "count_busy_connections", "ROUTING_POLICIES",
    "MetricFamily", "MetricsRegistry", "AccessRecord", "format_access_line", "ServeOps",
]

__version__ = "1.0.0"

logger = logging.getLogger("mesh")
access_logger = logging.getLogger("mesh.access")   # serve's access log: one line per request


class _LazyModule:
    """A module imported on first use: `mesh.py --help` need not pay ~20 ms for
    asyncio.  After the first attribute access the real module takes its place."""

    def __init__(self, name: str) -> None:
        self.__dict__["_name"] = name

    def __getattr__(self, attr: str) -> Any:
        import importlib
        module = importlib.import_module(self._name)
        globals()[self._name] = module
        return getattr(module, attr)


asyncio = _LazyModule("asyncio")

DEFAULT_MODEL = "qwen2.5:7b"
DEFAULT_OLLAMA_PORT = 11434
DEFAULT_LISTEN = "127.0.0.1:11500"
DEFAULT_MAX_CONCURRENT = 16
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_FIRST_BYTE_TIMEOUT = 600.0   # a cold load of a large model takes minutes
DEFAULT_IDLE_TIMEOUT = 120.0
DEFAULT_RETRIES = 1                  # other nodes a request may go to after its node went silent with it
DEFAULT_CONTROL_PERSIST = 300        # seconds an idle master stays for the next command
LIVENESS_INTERVAL = 5.0              # while waiting for a first byte, ask the node this often
PROBE_TIMEOUT = 5.0                  # a /api/version probe answers within this or the node is sick
FACTS_TTL = 60.0                     # serve re-reads a node's GPU/RAM/load facts this often
INVENTORY_TTL = 30.0                 # how long /api/tags and /api/ps answers are trusted
COOLDOWN_MIN, COOLDOWN_MAX = 1.0, 30.0
IDLE_KEEP = 32                       # idle keep-alive connections kept per node, at least
EXEC_SESSION_CAP = 8                 # below sshd's default MaxSessions 10 for `ssh node curl`
MAX_MASTER_STARTS = 64               # ssh masters connecting at once (many dead nodes: no fork storm)
CONFIG_POLL_INTERVAL = 2.0           # serve: how often the SSH config's files are stat()ed for changes
CLIENT_WENT_AWAY = "client went away"   # Exchange.error of a request whose client left mid-way
HEALTH_INTERVAL = 3.0                # serve: how often an idle healthy node is asked whether it answers


# ---------------------------------------------------------------------------
# Errors: one root; its message is what the user sees.
# ---------------------------------------------------------------------------

class MeshError(Exception):
    """Root of every error mesh.py raises on purpose; str(e) is the user-facing message."""

    exit_code = 1


class UsageError(MeshError):
    """Bad input from the user: unknown node, empty prompt, bad option value."""

    exit_code = 2


class ConfigError(MeshError):
    """An SSH config ssh would reject (or that cannot be read): 'FILE:LINE: what'."""


class NodeError(MeshError):
    """One node failed a request.  `retryable` is true when nothing was relayed yet
    and another node may answer; `status` is Ollama's HTTP status when there was one.
    `timed_out` is true when the request had reached the node and the node went
    silent (it stopped answering its liveness probe): it may still be working on it,
    so another node gets the request at most MeshOrchestrator.retries times.
    `answered` is true when the node answered, but not with a reply mesh can use (an
    error status, a head or a first line that is not Ollama's, an error line): the
    node is up, and whether the fault is the node's or the request's shows when
    another node answers the same request (MeshOrchestrator.open_stream)."""

    def __init__(self, node: str, message: str, *, status: Optional[int] = None,
                 retryable: bool = True, mark_down: bool = True, timed_out: bool = False,
                 answered: bool = False) -> None:
        super().__init__(f"{node}: {message}")
        self.node = node
        self.reason = message
        self.status = status
        self.retryable = retryable
        self.mark_down = mark_down
        self.timed_out = timed_out
        self.answered = answered


class _ClientError(NodeError):
    """Ollama rejected the request itself (400 and the like): not the node's fault,
    not retried elsewhere."""

    def __init__(self, status: int, message: str, node: str) -> None:
        super().__init__(node, message, status=status, retryable=False, mark_down=False)


class _Silent(NodeError):
    """The node's reply stopped: no data for idle_timeout.  Not an answer (NodeError.answered):
    a node that goes silent is marked down at once, so the next requests do not wait on it."""


class _UnsupportedPath(NodeError):
    """The node's Ollama has no such endpoint (Go's plain-text 404): it is too old
    for this path.  Not the model's absence, not the node's health."""

    def __init__(self, node: str, path: str, version: Optional[str]) -> None:
        super().__init__(node, f"this node's Ollama{' ' + version if version else ''} does not support {path}",
                         status=404, retryable=True, mark_down=False)


class ModelNotFoundError(MeshError):
    """No node has the requested model (Ollama's 404)."""

    status = 404


class UnsupportedPathError(MeshError):
    """No node that could take the request has an Ollama new enough for its endpoint."""

    status = 404


class NoNodeAvailableError(MeshError):
    """Nodes have the model but none could take the request."""

    status = 503


class RequestFailedError(MeshError):
    """Every node that could take the request answered it with an error (Ollama's 5xx: a
    model that cannot load, an image its runner rejects; an error line before any token;
    a reply that is not Ollama's): the request is at fault, not the nodes, and none of
    them is marked down.  `status` is what `serve` answers with: the last node's HTTP
    status for a 5xx (as nginx passes an upstream's 500 on), 502 for a reply mesh could
    not read (as nginx answers an invalid upstream reply), 500 for Ollama's error line
    (Ollama's own status for an error in a stream=false answer)."""

    def __init__(self, message: str, *, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


class StreamInterruptedError(MeshError):
    """A stream failed after tokens were handed on; it is never retried (no duplicates).
    `node` and `reason` say which node and why, as NodeError's do."""

    def __init__(self, message: str, *, node: Optional[str] = None, reason: Optional[str] = None) -> None:
        super().__init__(message)
        self.node = node
        self.reason = reason or message


class HTTPError(MeshError):
    """A request the HTTP front answers with an error status: `status` (400, 404,
    413, ...), the message (the error text the client sees) and extra response
    `headers` as (name, value) pairs (Allow for a 405)."""

    def __init__(self, status: int, message: str, *, headers: Sequence[Tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.headers = list(headers)


# ---------------------------------------------------------------------------
# SSH config (pure): text in, hosts out.  The reference is `ssh -G -T -F FILE alias`
# of OpenSSH 9.x; each rule below mirrors readconf.c.
# ---------------------------------------------------------------------------

# How OpenSSH 9.2 (readconf.c) reads each keyword: the kind decides which checks
# run and how many arguments it takes.  Unknown keywords are errors unless
# IgnoreUnknown covers them.  Debian's build adds the GSSAPI key-exchange options.
_KINDS: Dict[str, str] = {}
for _kind, _words in (
    ("flag", """forwardx11 forwardx11trusted gatewayports exitonforwardfailure passwordauthentication
        kbdinteractiveauthentication challengeresponseauthentication skeyauthentication tisauthentication
        hostbasedauthentication gssapiauthentication gssapidelegatecredentials batchmode checkhostip
        tcpkeepalive keepalive nohostauthenticationforlocalhost clearallforwardings enablesshkeysign
        identitiesonly hashknownhosts permitlocalcommand visualhostkey stdinnull forkafterauthentication
        proxyusefdpass canonicalizefallbacklocal streamlocalbindunlink enableescapecommandline
        gssapikeyexchange gssapirenewalforcesrekey gssapitrustdns"""),
    ("time", "connecttimeout forwardx11timeout serveraliveinterval setuptimeout protocolkeepalives"),
    ("int", "numberofpasswordprompts connectionattempts serveralivecountmax canonicalizemaxdots requiredrsasize"),
    ("string", """user hostname hostkeyalias preferredauthentications bindaddress bindinterface pkcs11provider
        smartcarddevice securitykeyprovider xauthlocation kbdinteractivedevices controlpath ignoreunknown
        revokedhostkeys gssapiclientidentity gssapiserveridentity"""),
    ("command", "proxycommand localcommand remotecommand knownhostscommand"),
    ("files", "globalknownhostsfile userknownhostsfile logverbose"),
    ("algos", """ciphers macs kexalgorithms hostkeyalgorithms casignaturealgorithms hostbasedacceptedalgorithms
        hostbasedkeytypes pubkeyacceptedalgorithms pubkeyacceptedkeytypes gssapikexalgorithms"""),
    ("consume", """protocol cipher fallbacktorsh globalknownhostsfile2 rhostsauthentication userknownhostsfile2
        useroaming usersh useprivilegedport afstokenpassing kerberosauthentication kerberostgtpassing
        rsaauthentication rhostsrsaauthentication compressionlevel useblacklistedkeys"""),
    ("multi", """verifyhostkeydns updatehostkeys stricthostkeychecking compression pubkeyauthentication
        dsaauthentication controlmaster tunnel requesttty sessiontype canonicalizehostname addressfamily"""),
):
    for _kw in _words.split():
        _KINDS[_kw] = _kind
for _kw in ("host match include port identityfile identityfile2 certificatefile localforward remoteforward "
            "dynamicforward permitremoteopen sendenv setenv controlpersist tunneldevice ipqos rekeylimit "
            "loglevel syslogfacility escapechar canonicaldomains canonicalizepermittedcnames "
            "streamlocalbindmask fingerprinthash addkeystoagent identityagent forwardagent proxyjump").split():
    _KINDS[_kw] = _kw
_KINDS["identityfile2"] = "identityfile"
# Keywords that are another's alias (the value lands under the canonical name).
_ALIASES = {"identityfile2": "identityfile", "dsaauthentication": "pubkeyauthentication",
            "skeyauthentication": "kbdinteractiveauthentication", "tisauthentication": "kbdinteractiveauthentication",
            "challengeresponseauthentication": "kbdinteractiveauthentication", "keepalive": "tcpkeepalive",
            "pubkeyacceptedkeytypes": "pubkeyacceptedalgorithms", "hostbasedkeytypes": "hostbasedacceptedalgorithms",
            "smartcarddevice": "pkcs11provider", "setuptimeout": "serveraliveinterval",
            "protocolkeepalives": "serveraliveinterval"}
_KEYWORDS = frozenset(_KINDS)

_FLAG = ("yes", "no", "true", "false")
_MULTISTATE = {
    "verifyhostkeydns": _FLAG + ("ask",), "updatehostkeys": _FLAG + ("ask",),
    "stricthostkeychecking": _FLAG + ("ask", "off", "accept-new"), "compression": ("yes", "no"),
    "pubkeyauthentication": _FLAG + ("unbound", "host-bound"), "dsaauthentication": _FLAG + ("unbound", "host-bound"),
    "controlmaster": _FLAG + ("auto", "ask", "autoask"), "tunnel": _FLAG + ("ethernet", "point-to-point"),
    "requesttty": _FLAG + ("force", "auto"), "sessiontype": ("none", "subsystem", "default"),
    "canonicalizehostname": _FLAG + ("always",), "addressfamily": ("inet", "inet6", "any"),
}
_LOG_LEVELS = frozenset("quiet fatal error info verbose debug debug1 debug2 debug3".split())
_SYSLOG_FACILITIES = frozenset("daemon user auth authpriv local0 local1 local2 local3 local4 local5 local6 "
                               "local7".split())
_IPQOS = frozenset("none af11 af12 af13 af21 af22 af23 af31 af32 af33 af41 af42 af43 cs0 cs1 cs2 cs3 cs4 cs5 "
                   "cs6 cs7 ef le lowdelay throughput reliability".split())
_DIGESTS = frozenset("md5 sha1 sha256 sha384 sha512".split())
# Algorithm names OpenSSH 9.2 (with OpenSSL, Debian's GSSAPI key exchange) knows, as `ssh -Q` lists them.
# A newer or patched ssh may know more: the ssh referee then overrules this list.
_CIPHERS = frozenset("""3des-cbc aes128-cbc aes192-cbc aes256-cbc aes128-ctr aes192-ctr aes256-ctr
aes128-gcm@openssh.com aes256-gcm@openssh.com chacha20-poly1305@openssh.com""".split())
_MACS = frozenset("""hmac-sha1 hmac-sha1-96 hmac-sha2-256 hmac-sha2-512 hmac-md5 hmac-md5-96
umac-64@openssh.com umac-128@openssh.com hmac-sha1-etm@openssh.com hmac-sha1-96-etm@openssh.com
hmac-sha2-256-etm@openssh.com hmac-sha2-512-etm@openssh.com hmac-md5-etm@openssh.com
hmac-md5-96-etm@openssh.com umac-64-etm@openssh.com umac-128-etm@openssh.com""".split())
_GSS_KEX = ("gss-gex-sha1-", "gss-group1-sha1-", "gss-group14-sha1-", "gss-group14-sha256-",
            "gss-group16-sha512-", "gss-nistp256-sha256-", "gss-curve25519-sha256-")
_KEX = frozenset("""diffie-hellman-group1-sha1 diffie-hellman-group14-sha1 diffie-hellman-group14-sha256
diffie-hellman-group16-sha512 diffie-hellman-group18-sha512 diffie-hellman-group-exchange-sha1
diffie-hellman-group-exchange-sha256 ecdh-sha2-nistp256 ecdh-sha2-nistp384 ecdh-sha2-nistp521
curve25519-sha256 curve25519-sha256@libssh.org sntrup761x25519-sha512
sntrup761x25519-sha512@openssh.com""".split()) | frozenset(_GSS_KEX)
_KEY_TYPES = frozenset("""ssh-ed25519 ssh-ed25519-cert-v01@openssh.com sk-ssh-ed25519@openssh.com
sk-ssh-ed25519-cert-v01@openssh.com ecdsa-sha2-nistp256 ecdsa-sha2-nistp256-cert-v01@openssh.com
ecdsa-sha2-nistp384 ecdsa-sha2-nistp384-cert-v01@openssh.com ecdsa-sha2-nistp521
ecdsa-sha2-nistp521-cert-v01@openssh.com sk-ecdsa-sha2-nistp256@openssh.com
sk-ecdsa-sha2-nistp256-cert-v01@openssh.com webauthn-sk-ecdsa-sha2-nistp256@openssh.com ssh-dss
ssh-dss-cert-v01@openssh.com ssh-rsa ssh-rsa-cert-v01@openssh.com rsa-sha2-256 rsa-sha2-512
rsa-sha2-256-cert-v01@openssh.com rsa-sha2-512-cert-v01@openssh.com""".split())
_ALGO_ERRORS = {"ciphers": "Bad SSH2 cipher spec '{}'.", "macs": "Bad SSH2 MAC spec '{}'.",
                "kexalgorithms": "Bad SSH2 KexAlgorithms '{}'.", "gssapikexalgorithms": "Bad GSSAPI KexAlgorithms '{}'."}
_KEY_SHORTNAMES = frozenset("rsa dsa ecdsa ed25519 ecdsa-sk ed25519-sk".split())

_DEFAULT_IDENTITY_FILES = ("~/.ssh/id_rsa", "~/.ssh/id_ecdsa", "~/.ssh/id_ecdsa_sk",
                           "~/.ssh/id_ed25519", "~/.ssh/id_ed25519_sk", "~/.ssh/id_xmss", "~/.ssh/id_dsa")
_MAX_INCLUDE_DEPTH = 16                  # READCONF_MAX_DEPTH
_MAX_IDENTITY_FILES = 100                # SSH_MAX_IDENTITY_FILES
_MESH_COMMENT = re.compile(r"^\s*#\s*mesh\s*:(.*)$", re.IGNORECASE)
_WHITESPACE = " \t\r\n"                  # readconf.c's WHITESPACE
_C_SPACE = " \t\n\v\f\r"                 # isspace() in the C locale


class _Bad(Exception):
    """One config line ssh rejects; the message is ssh's text after 'line N: '."""


def _lower(text: str) -> str:
    """ssh's lowercase(): ASCII letters only, as tolower() in the C locale."""
    return text.lower() if text.isascii() else "".join(c.lower() if c.isascii() else c for c in text)


def _strdelim(s: Optional[str]) -> Tuple[Optional[str], Optional[str]]:
    """OpenSSH's strdelim(): (token, rest).  A token ends at whitespace, '"' or one
    '='; a double-quoted part is taken whole.  rest None is C's NULL (nothing left);
    token None is an unmatched quote."""
    if s is None:
        return None, None
    i = next((k for k, c in enumerate(s) if c in ' \t\r\n"='), -1)
    if i < 0:
        return s, None
    if s[i] == '"':
        s = s[:i] + s[i + 1:]
        j = s.find('"', i)
        if j < 0:
            return None, None
        return s[:j], s[j + 1:].lstrip(_WHITESPACE)
    token, rest = s[:i], s[i + 1:].lstrip(_WHITESPACE)
    if s[i] != "=" and rest.startswith("="):
        rest = rest[1:].lstrip(_WHITESPACE)
    return token, rest


def split_args(text: str) -> List[str]:
    """Split an ssh_config argument string the way OpenSSH's argv_split does.

    Spaces and tabs separate; "double" and 'single' quotes group; a backslash escapes
    a quote, a backslash, or (outside quotes) a space; a token that *starts* with '#'
    ends the line, so `h#x` stays literal.  An unbalanced quote raises ValueError."""
    args: List[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] in " \t":
            i += 1
            continue
        if text[i] == "#":
            break
        quote, buf = "", []
        while i < n:
            c = text[i]
            if c == "\\" and i + 1 < n and (text[i + 1] in "'\"\\" or (not quote and text[i + 1] == " ")):
                buf.append(text[i + 1])
                i += 2
                continue
            if not quote and c in " \t":
                break
            if not quote and c in "'\"":
                quote = c
            elif quote and c == quote:
                quote = ""
            else:
                buf.append(c)
            i += 1
        if quote:
            raise ValueError("invalid quotes")
        args.append("".join(buf))
    return args


def split_keyword(line: str) -> Optional[Tuple[str, str]]:
    """(lowercased keyword, rest) of one config line, or None for lines ssh skips.

    As process_config_line(): trailing whitespace (and form feeds) go, the keyword is
    strdelim's first token (`Key value`, `Key=value`, `"Key" value` alike), and rest
    is what follows it without leading whitespace ("" when nothing does)."""
    end = len(line) - 1
    while end > 0 and line[end] in _WHITESPACE + "\f":
        end -= 1
    line = line[:end + 1]
    if not line:
        return None
    keyword, rest = _strdelim(line)
    if keyword == "":
        keyword, rest = _strdelim(rest)
    if not keyword or keyword[0] in "\n#":
        return None
    return _lower(keyword), (rest or "").lstrip(_WHITESPACE)


def _c_strtol(s: str, base: int = 10) -> Tuple[Optional[int], int]:
    """C's strtol(): (value or None when no digits, index where parsing stopped)."""
    i = 0
    while i < len(s) and s[i] in _C_SPACE:
        i += 1
    sign = 1
    if i < len(s) and s[i] in "+-":
        sign = -1 if s[i] == "-" else 1
        i += 1
    if base == 0:
        if s[i:i + 2].lower() == "0x" and i + 2 < len(s) and s[i + 2] in "0123456789abcdefABCDEF":
            base, i = 16, i + 2
        elif s[i:i + 1] == "0":
            base = 8
        else:
            base = 10
    digits = "0123456789abcdef"[:base]
    start = i
    while i < len(s) and s[i].lower() in digits and s[i].isascii():
        i += 1
    if i == start:
        return None, 0
    return sign * int(s[start:i], base), i


def _strtonum(s: str, lo: int, hi: int) -> Tuple[Optional[int], Optional[str]]:
    """OpenBSD strtonum(): (value, None) or (None, 'invalid' | 'too small' | 'too large')."""
    value, end = _c_strtol(s)
    if value is None or end != len(s):
        return None, "invalid"
    if value < lo:
        return None, "too small"
    if value > hi:
        return None, "too large"
    return value, None


def a2port(arg: str) -> int:
    """OpenSSH's a2port(): 1-65535 (digits with an optional sign, or a service name), else -1/0."""
    value, err = _strtonum(arg, 0, 65535)
    if err is None:
        return value  # type: ignore[return-value]
    import socket
    try:
        return socket.getservbyname(arg, "tcp")
    except (OSError, UnicodeError, ValueError):
        return -1


def _port_value(arg: str) -> Optional[int]:
    port = a2port(arg)
    return port if port > 0 else None


def convtime(text: Optional[str]) -> int:
    """OpenSSH's convtime(): '90', '1h30m', '5M', ... as seconds, -1 when invalid."""
    if not text:
        return -1
    total, p = 0, text
    units = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    while p:
        secs, end = _c_strtol(p)
        if secs is None or secs < 0:
            return -1
        unit = p[end:end + 1].lower()
        if unit not in units:
            return -1
        secs *= units[unit]
        total += secs
        if secs > 2147483647 or total > 2147483647:
            return -1
        p = p[end + 1:]
    return total


def _scan_scaled(text: str) -> bool:
    """Whether OpenBSD scan_scaled() accepts a RekeyLimit size ('1G', '512K', '1.5M').
    Returns the value's acceptability only; ssh then rejects 1..15."""
    m = re.match(r"[ \t\n\v\f\r]*([+-]?)(\d*)(\.\d*)?(.*)$", text, re.DOTALL)
    assert m is not None
    if len(m.group(2)) >= 21:
        return False
    rest = m.group(4)
    if not rest:
        whole = int(m.group(2) or 0)
        return whole < 2 ** 63 and (whole == 0 or (whole >= 16 and m.group(1) != "-"))
    if rest[0] not in "BKMGTPEbkmgtpe" or (len(rest) > 1 and rest[1].isascii() and rest[1].isalnum()):
        return False
    scale = 1 << (10 * "BKMGTPE".index(rest[0].upper()))
    value = int(m.group(2) or 0) * scale + int(float("0" + (m.group(3) or ".0")) * scale)
    if value >= 2 ** 63:
        return False
    return value == 0 or (value >= 16 and m.group(1) != "-")


def _valid_ipqos(arg: Optional[str]) -> bool:
    if arg is None:
        return False
    if _lower(arg) in _IPQOS:
        return True
    value, end = _c_strtol(arg, 0)
    return value is not None and end == len(arg) and 0 <= value <= 255


def _valid_domain(name: str) -> Optional[str]:
    """misc.c valid_domain(): None when fine, else ssh's complaint."""
    if not name:
        return "empty domain name"
    if not (name[0].isascii() and name[0].isalnum()):
        return f'domain name "{name}" starts with invalid character'
    last = ""
    for c in _lower(name):
        if last == "." and c == ".":
            return f'domain name "{name}" contains consecutive separators'
        if c not in ".-_" and not (c.isascii() and c.isalnum()):
            return f'domain name "{name}" contains invalid characters'
        last = c
    return None


def _dollar_expand_ok(text: str, env: Optional[Dict[str, str]] = None) -> bool:
    """misc.c dollar_expand(): every ${VAR} closed, named and set."""
    env = os.environ if env is None else env
    i = 0
    while True:
        i = text.find("${", i)
        if i < 0:
            return True
        end = text.find("}", i + 2)
        if end < 0 or end == i + 2 or text[i + 2:end] not in env:
            return False
        i = end + 1


def _valid_env_name(name: str) -> bool:
    return bool(name) and all(c == "_" or (c.isascii() and c.isalnum()) for c in name)


def _algos_ok(keyword: str, arg: str) -> bool:
    """ciphers_valid / mac_valid / kex_names_valid / sshkey_names_valid2 of OpenSSH 9.2.
    A list starting with '-' is not checked; '+' and '^' are prefixes; the check
    stops at the first empty name, as strsep() loops in ssh do."""
    if arg.startswith("-"):
        return True
    if arg[:1] in ("+", "^"):
        arg = arg[1:]
    if not arg:
        return False
    for name in arg.split(","):
        if not name:
            break
        if keyword == "ciphers":
            ok = name in _CIPHERS
        elif keyword == "macs":
            ok = name in _MACS
        elif keyword in ("kexalgorithms", "gssapikexalgorithms"):
            ok = name.startswith(_GSS_KEX) or (keyword == "kexalgorithms" and name in _KEX)
        else:
            ok = (name in _KEY_TYPES or (not name.endswith("-cert-v01@openssh.com") and _lower(name) in _KEY_SHORTNAMES)
                  or any(match_pattern_list(k, name) != 0 for k in _KEY_TYPES))
        if not ok:
            return False
    return True


def _assemble_ok(value: str) -> bool:
    """kex_assemble_names() on HostKeyAlgorithms, which `ssh -G` runs when it prints:
    no '!' outside a '-' list, and an explicit list must name some known algorithm."""
    if value.startswith("-"):
        return True
    names = value[1:] if value[:1] in ("+", "^") else value
    if any(n.startswith("!") for n in names.split(",")):
        return False
    return value[:1] in ("+", "^") or any(match_pattern_list(k, n) == 1 for n in names.split(",")
                                          for k in _KEY_TYPES)


def _hpdelim(s: Optional[str]) -> Tuple[Optional[str], Optional[str], str]:
    """misc.c hpdelim2(): (host part or None when malformed, rest or None, delimiter)."""
    if s is None:
        return None, None, ""
    if s.startswith("["):
        k = s.find("]")
        if k < 0:
            return None, None, ""
        k += 1
    else:
        k = next((j for j, c in enumerate(s) if c in ":/"), len(s))
    if k == len(s):
        return s, None, ""
    if s[k] not in ":/":
        return None, None, ""
    return s[:k], s[k + 1:], s[k]


def _cleanhostname(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") and len(host) > 1 else host


def _urldecode_ok(text: str) -> bool:
    return re.search(r"%(?![0-9a-fA-F]{2})|%00", text) is None


def _jump_ok(spec: str) -> bool:
    """readconf.c parse_jump(): every [user@]host[:port] or ssh:// URI in the list is valid."""
    cut = spec.split("#", 1)[0].rstrip(_C_SPACE)
    if _lower(spec) == "none":
        return True
    parts = cut.split(",")
    for part in reversed(parts):
        if part.startswith("ssh://"):
            uri = part[6:]
            if "@" in uri:
                user, _, uri = uri.partition("@")
                user = user.split(";", 1)[0]
                if not user or not _urldecode_ok(user):
                    return False
            host, rest, delim = _hpdelim(uri)
            if not host or _valid_domain(_cleanhostname(host)) is not None:
                return False
            if rest:
                if delim == ":":
                    port_s, slash, rest = rest.partition("/")
                    if a2port(port_s) <= 0:
                        return False
                    rest = rest if slash else ""
                if rest:
                    return False  # a path is not allowed
            continue
        if "@" in part:
            user, _, part = part.rpartition("@")
            if not user:
                return False
        host, rest, _ = _hpdelim(part)
        if not host:
            return False
        if rest and a2port(rest) <= 0:
            return False
    return True


def _jump_target(spec: str) -> Tuple[Optional[str], str, int]:
    """(user or None, host, port or -1) of the last hop of a valid ProxyJump list,
    the one ssh connects through first."""
    last = spec.split("#", 1)[0].rstrip(_C_SPACE).rsplit(",", 1)[-1]
    user: Optional[str] = None
    if last.startswith("ssh://"):
        last = last[6:]
        if "@" in last:
            user, _, last = last.partition("@")
            user = re.sub(r"%([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)),
                          user.split(";", 1)[0].replace("+", " "))
        host, rest, delim = _hpdelim(last)
        port = a2port(rest.split("/", 1)[0]) if rest and delim == ":" else -1
        return user, _cleanhostname(host or ""), port
    if "@" in last:
        user, _, last = last.rpartition("@")
    host, rest, _ = _hpdelim(last)
    return user, _cleanhostname(host or ""), a2port(rest) if rest else -1


def _forward_ok(spec: str, dynamic: bool, remote: bool) -> bool:
    """readconf.c parse_forward(): a LocalForward/RemoteForward/DynamicForward spec."""
    if not _dollar_expand_ok(spec):
        return False
    env = os.environ
    spec = re.sub(r"\$\{([^}]*)\}", lambda m: env[m.group(1)], spec).lstrip(_C_SPACE)
    fields: List[Tuple[str, bool]] = []
    cp: Optional[str] = spec
    while len(fields) < 4:
        if not cp:
            cp = None
            break
        if cp[0] == "[":
            k = cp.find("]")
            if k < 0 or (k + 1 < len(cp) and cp[k + 1] != ":"):
                break
            fields.append((cp[1:k], "/" in cp[1:k]))
            cp = cp[k + 2:] if k + 1 < len(cp) else ""
            continue
        buf, ispath, j, ended = [], False, 0, False
        while j < len(cp):
            c = cp[j]
            if c == "\\":
                if j + 1 >= len(cp):
                    ended = True
                    break
                buf.append(cp[j + 1])
                j += 2
                continue
            if c == "/":
                ispath = True
            if c == ":":
                break
            buf.append(c)
            j += 1
        if ended:
            break
        fields.append(("".join(buf), ispath))
        cp = cp[j + 1:] if j < len(cp) else ""
    if cp:
        return False
    n = len(fields)
    listen_port, listen_path, connect_port, connect_path = 0, False, 0, False
    connect_host = listen_host = ""
    if n == 1:
        if fields[0][1]:
            listen_path = True
        else:
            listen_port = a2port(fields[0][0])
    elif n == 2:
        if fields[0][1] and fields[1][1]:
            listen_path = connect_path = True
        elif fields[1][1]:
            listen_port, connect_path = a2port(fields[0][0]), True
        else:
            listen_host, listen_port = fields[0][0], a2port(fields[1][0])
    elif n == 3:
        if fields[0][1]:
            listen_path, connect_host, connect_port = True, fields[1][0], a2port(fields[2][0])
        elif fields[2][1]:
            listen_host, listen_port, connect_path = fields[0][0], a2port(fields[1][0]), True
        else:
            listen_port, connect_host, connect_port = a2port(fields[0][0]), fields[1][0], a2port(fields[2][0])
    elif n == 4:
        listen_host, listen_port = fields[0][0], a2port(fields[1][0])
        connect_host, connect_port = fields[2][0], a2port(fields[3][0])
    else:
        return False
    if dynamic:
        if n not in (1, 2):
            return False
    else:
        if n not in (3, 4) and not connect_path and not listen_path:
            return False
        if connect_port <= 0 and not connect_path:
            return False
    if (listen_port < 0 and not listen_path) or (not remote and listen_port == 0 and not listen_path):
        return False
    paths = [f[0] for f in fields if f[1]]
    return (len(connect_host.encode("utf-8", "surrogateescape")) < 1025
            and len(listen_host.encode("utf-8", "surrogateescape")) < 1025
            and all(len(p.encode("utf-8", "surrogateescape")) < 108 for p in paths))


def _check_value(keyword: str, args: List[str], rest: str) -> Any:
    """The checks ssh makes on one line whatever the host; returns the value to keep
    (the first argument, or the rest of the line for commands) or raises _Bad.
    Extra arguments are an error as in ssh."""
    kind = _KINDS[keyword]
    used = 1                                   # arguments the keyword takes
    arg = args[0] if args else None
    value: Any = arg
    if kind in ("command", "proxyjump", "consume"):
        value, used = rest, len(args)
        if kind == "command":
            value = rest.lstrip(_WHITESPACE + "=")
        elif kind == "proxyjump":
            value = rest.lstrip(_WHITESPACE + "=")
            if not _jump_ok(value):
                raise _Bad(f'Invalid ProxyJump "{value}"')
    elif kind == "flag":
        if arg is None or _lower(arg) not in _FLAG:
            raise _Bad(f'unsupported option "{arg}".')
    elif kind == "multi":
        if arg is None or _lower(arg) not in _MULTISTATE[keyword]:
            raise _Bad(f'unsupported option "{arg}".')
    elif kind == "forwardagent":
        if not arg:
            raise _Bad("missing argument.")
        if _lower(arg) not in _FLAG:
            _check_agent_path(arg)
    elif kind == "identityagent":
        if not arg:
            raise _Bad("Missing argument.")
        _check_agent_path(arg)
    elif kind == "time":
        if not arg:
            raise _Bad("missing time value.")
        if arg != "none" and convtime(arg) < 0:
            raise _Bad("invalid time value.")
    elif kind == "int":
        if not arg:
            raise _Bad("integer value missing.")
        _, err = _strtonum(arg, 0, 2147483647)
        if err:
            raise _Bad(f"integer value {err}.")
    elif kind in ("string", "identityfile", "certificatefile", "hostname"):
        if not arg:
            raise _Bad("Missing argument.")
    elif kind == "port":
        if not arg:
            raise _Bad("Missing argument.")
        port = a2port(arg)
        if port <= 0:
            raise _Bad(f"Bad port '{arg}'.")
        value = str(port)
    elif kind == "algos":
        if not arg:
            raise _Bad("Missing argument.")
        if not _algos_ok(keyword, arg):
            raise _Bad(_ALGO_ERRORS.get(keyword, "Bad key types '{}'.").format(arg))
    elif kind == "loglevel":
        if arg is None or _lower(arg) not in _LOG_LEVELS:
            raise _Bad(f"unsupported log level '{arg}'")
    elif kind == "syslogfacility":
        if arg is None or _lower(arg) not in _SYSLOG_FACILITIES:
            raise _Bad(f"unsupported log facility '{arg}'")
    elif kind == "files":
        used = len(args)
        for i, a in enumerate(args):
            if not a:
                raise _Bad(f"keyword {keyword} empty argument")
            if _lower(a) == "none" and len(args) > 1:
                raise _Bad(f'keyword {keyword} "none" argument must appear alone.')
        value = " ".join(args)
    elif kind in ("localforward", "remoteforward", "dynamicforward"):
        if not arg:
            raise _Bad("Missing argument.")
        dynamic, remote = kind == "dynamicforward", kind == "remoteforward"
        spec = arg
        if not dynamic:
            used = 2
            arg2 = args[1] if len(args) > 1 else None
            if not arg2:
                if not remote:
                    raise _Bad("Missing target argument.")
                dynamic = True
            else:
                spec = f"{arg}:{arg2}"
        if not _forward_ok(spec, dynamic, remote):
            raise _Bad("Bad forwarding specification.")
        value = " ".join(args[:used])
    elif kind == "permitremoteopen":
        used = len(args)
        if not arg:
            raise _Bad("missing permitremoteopen specification")
        if arg in ("any", "none"):
            used = 1
        else:
            for a in args:
                host, port_s, _ = _hpdelim(a)
                if host is None:
                    raise _Bad("missing host in permitremoteopen")
                if port_s is None or (port_s != "*" and a2port(port_s) <= 0):
                    raise _Bad("bad port number in permitremoteopen")
        value = " ".join(args[:used])
    elif kind == "sendenv":
        used = len(args)
        if any(not a or "=" in a for a in args):
            raise _Bad("Invalid environment name.")
        value = list(args)
    elif kind == "setenv":
        used = len(args)
        if any("=" not in a for a in args):
            raise _Bad("Invalid SetEnv.")
        value = " ".join(args)
    elif kind == "controlpersist":
        if not arg:
            raise _Bad("Missing ControlPersist argument.")
        if arg not in _FLAG and convtime(arg) < 0:
            raise _Bad("Bad ControlPersist argument.")
    elif kind == "tunneldevice":
        if not arg:
            raise _Bad("Missing argument.")
        if any(_lower(p) != "any" and _strtonum(p, 0, 0x7FFFFFFD)[1] for p in arg.split(":", 1)):
            raise _Bad("Bad tun device.")
    elif kind == "ipqos":
        used = 2
        if not _valid_ipqos(arg) or (len(args) > 1 and not _valid_ipqos(args[1])):
            raise _Bad(f"Bad IPQoS value: {arg if not _valid_ipqos(arg) else args[1]}")
        value = " ".join(args[:2])
    elif kind == "rekeylimit":
        if not arg:
            raise _Bad("Missing argument.")
        if arg != "default" and not _scan_scaled(arg):
            raise _Bad(f"Bad number '{arg}'")
        if len(args) > 1:
            used = 2
            if args[1] != "none" and not args[1]:
                raise _Bad("missing time value.")
            if args[1] != "none" and convtime(args[1]) < 0:
                raise _Bad("invalid time value.")
        value = " ".join(args[:used])
    elif kind == "addkeystoagent":
        used = 2
        arg2 = args[1] if len(args) > 1 else None
        state = _lower(arg) if arg else None
        known = state in _FLAG + ("ask", "confirm")
        if state == "confirm" and arg2 is not None:
            if convtime(arg2) < 0:
                raise _Bad("invalid time value.")
        elif not known and arg2 is None:
            if convtime(arg) < 0:
                raise _Bad("unsupported option")
        elif not known or arg2 is not None:
            raise _Bad("unsupported option")
        value = " ".join(args[:2])
    elif kind == "escapechar":
        if not arg:
            raise _Bad("Missing argument.")
        raw = arg.encode("utf-8", "surrogateescape")
        if not (arg == "none" or len(raw) == 1 or (len(raw) == 2 and raw[0:1] == b"^" and 64 <= raw[1] < 128)):
            raise _Bad("Bad escape character.")
    elif kind == "canonicaldomains":
        used = len(args)
        for a in args:
            if not a:
                raise _Bad(f"keyword {keyword} empty argument")
            if _lower(a) == "none" and len(args) > 1:
                raise _Bad(f'keyword {keyword} "none" argument must appear alone.')
            why = _valid_domain(a)
            if why:
                raise _Bad(why)
        value = " ".join(args)
    elif kind == "canonicalizepermittedcnames":
        used = len(args)
        for a in args:
            if _lower(a) == "none":
                if len(args) > 1:
                    raise _Bad(f'keyword {keyword} "none" argument must appear alone.')
            elif a != "*" and a.find(":") in (-1, len(a) - 1):
                raise _Bad(f'Invalid permitted CNAME "{a}"')
        value = " ".join(args)
    elif kind == "streamlocalbindmask":
        if not arg:
            raise _Bad("Missing StreamLocalBindMask argument.")
        mask, _ = _c_strtol(arg, 8)
        if mask is None or not 0 <= mask <= 0o777:
            raise _Bad("Bad mask.")
    elif kind == "fingerprinthash":
        if not arg:
            raise _Bad("Missing argument.")
        if _lower(arg) not in _DIGESTS:
            raise _Bad(f'Invalid hash algorithm "{arg}".')
    if len(args) > used:
        raise _Bad(f"keyword {keyword} extra arguments at end of line")
    return value


def _check_agent_path(arg: str) -> None:
    if not _dollar_expand_ok(arg):
        raise _Bad(f"Invalid environment expansion {arg}.")
    if arg[:1] == "$" and arg[1:2] != "{" and not _valid_env_name(arg[1:]):
        raise _Bad(f"Invalid environment name {arg}.")


def _pattern_regex(pattern: str) -> "re.Pattern[str]":
    regex = _PATTERNS.get(pattern)
    if regex is None:
        regex = re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern),
                           re.DOTALL)
        if len(_PATTERNS) < 4096:
            _PATTERNS[pattern] = regex
    return regex


_PATTERNS: Dict[str, "re.Pattern[str]"] = {}


def match_pattern(text: str, pattern: str, *, fold: bool = False) -> bool:
    """OpenSSH's match_pattern: only '*' and '?' are special (no [...] classes)."""
    if fold:
        text, pattern = _lower(text), _lower(pattern)
    return _pattern_regex(pattern).fullmatch(text) is not None


def match_pattern_list(text: str, patterns: str, *, fold: bool = False) -> int:
    """OpenSSH's match_pattern_list: a comma-separated list with '!' negation.
    1 when some positive pattern matches and no negated one does, -1 when a negated
    one matches, 0 otherwise.  fold lowercases the patterns (not the text), as
    ssh's dolower does; a pattern of 1023 characters or more matches nothing."""
    found = 0
    for pat in patterns.split(","):
        negated = pat.startswith("!")
        if negated:
            pat = pat[1:]
        if len(pat.encode("utf-8", "surrogateescape")) >= 1023:
            return 0
        if match_pattern(text, _lower(pat) if fold else pat):
            if negated:
                return -1
            found = 1
    return found


def match_hostname(host: str, patterns: str) -> int:
    """match.c match_hostname(): the host lowercased against lowercased patterns."""
    return match_pattern_list(_lower(host), patterns, fold=True)


def is_concrete_alias(pattern: str) -> bool:
    return bool(pattern) and not any(c in pattern for c in "*?!")


def expand_hostname(value: str, alias: str) -> str:
    """HostName accepts only %h (the alias) and %%; anything else is an error in ssh."""
    out, i = [], 0
    while i < len(value):
        c = value[i]
        if c == "%":
            nxt = value[i + 1:i + 2]
            if nxt == "%":
                out.append("%")
            elif nxt == "h":
                out.append(alias)
            else:
                raise ValueError(f"percent_expand: unknown key %{nxt}" if nxt else "percent_expand: invalid format")
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def expand_tokens(value: str, tokens: Dict[str, str], *, home: str,
                  env: Optional[Dict[str, str]] = None) -> str:
    """ssh's expansion of a path-like value (ControlPath, IdentityAgent, ...):
    a leading ~ or ~/ (home from the passwd entry), ${VAR} from the environment,
    then %-tokens from `tokens` (%% is a percent).  Unknown tokens or variables
    raise ValueError, as ssh fails on them."""
    env = os.environ if env is None else env
    if value == "~" or value.startswith("~/"):
        value = home + value[1:]
    elif value.startswith("~"):
        user, sep, tail = value[1:].partition("/")
        try:
            import pwd
            value = pwd.getpwnam(user).pw_dir + sep + tail
        except (ImportError, KeyError):
            raise ValueError(f"tilde_expand_filename: No such user {user}") from None

    def var(m: "re.Match[str]") -> str:
        name = m.group(1)
        if name not in env:
            raise ValueError(f"environment variable ${{{name}}} is not set")
        return env[name]
    if not _dollar_expand_ok(value, env):
        raise ValueError("invalid environment variable expansion")
    value = re.sub(r"\$\{([^}]+)\}", var, value)
    out, i = [], 0
    while i < len(value):
        if value[i] == "%":
            key = value[i + 1:i + 2]
            if key == "%":
                out.append("%")
            elif key in tokens:
                out.append(tokens[key])
            else:
                raise ValueError(f"unknown token %{key}" if key else "trailing %")
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


_PLAIN_IPV4 = re.compile(r"((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\Z")


def canonical_address(host: str, address_family: str = "any") -> Optional[str]:
    """ssh.c resolve_addr(): a numeric address as getnameinfo() prints it
    ('127.1' -> '127.0.0.1', long IPv6 compressed), None when `host` is not one.
    Only numeric parsing: no name is looked up."""
    if _PLAIN_IPV4.match(host):
        return host   # getnameinfo() prints a plain dotted quad as it is
    if not (":" in host or (host[:1].isdigit() and host.isascii())):
        return None   # inet_aton() and inet_pton() need a digit first, or a colon
    import socket
    family = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}.get(address_family, socket.AF_UNSPEC)
    try:
        infos = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
        return socket.getnameinfo(infos[0][4], socket.NI_NUMERICHOST)[0]
    except (OSError, UnicodeError, ValueError):
        return None


def parse_mesh_settings(text: str) -> Dict[str, str]:
    """Parse the body of a `# mesh: key=value ...` comment (shell-like quoting).

    A bare word is a flag: `off`/`skip` mean enabled=no, `on` means enabled=yes."""
    import shlex
    try:
        words = shlex.split(text, comments=False)
    except ValueError as exc:
        raise ValueError(f"bad '# mesh:' comment: {exc}") from None
    out: Dict[str, str] = {}
    for word in words:
        if "=" in word:
            key, _, value = word.partition("=")
            out[key.strip().lower().replace("-", "_")] = value
        elif word.lower() in ("off", "skip", "ignore", "no"):
            out["enabled"] = "no"
        elif word.lower() in ("on", "yes", "node"):
            out["enabled"] = "yes"
        else:
            raise ValueError(f"bad '# mesh:' setting {word!r} (expected key=value)")
    return out


class _Line:
    """One config line as read: keyword, arguments, the value it sets and, when ssh
    rejects it whatever the host, the error (raised when the walk reaches it, so the
    first bad line in ssh's reading order is the one reported)."""
    __slots__ = ("path", "lineno", "keyword", "args", "rest", "mesh", "names", "error", "value", "known",
                 "plain", "skip", "where")

    def __init__(self, path: str, lineno: int, keyword: str, args: List[str], rest: str,
                 mesh: Optional[Dict[str, str]] = None, error: Optional[str] = None, value: Any = None) -> None:
        self.path, self.lineno, self.keyword, self.args, self.rest, self.mesh = (
            path, lineno, keyword, args, rest, mesh)
        self.error, self.value = error, value
        self.where = f"{path}:{lineno}"
        self.known = keyword in _KINDS
        # A plain line only sets a value: an inactive block's run of them is skipped at once.
        self.plain = (self.known and error is None and keyword not in ("host", "match", "include")) or (
            keyword == "#mesh")
        self.skip = 0
        # A Host line of plain names matches by set lookup (a config of 300 nodes is
        # 300 aliases x 300 Host lines).
        self.names = (frozenset(args) if keyword == "host" and args and error is None
                      and all(map(is_concrete_alias, args)) else None)



class HostInfo:
    """What the config says about one alias, as `ssh -G` would print it."""

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.options: Dict[str, Any] = {}      # lowercase keyword -> first value (or list)
        self.mesh: Dict[str, str] = {}         # '# mesh:' settings, first value wins
        self.marked = False                    # a '# mesh:' line in a Host block of its own (not Host *)
        self.unresolved = False                # only ssh can tell (Match exec, DNS); ask ssh -G
        self.canonical_host: Optional[str] = None   # HostName as ssh shows it (expanded, canonical)

    @property
    def hostname(self) -> str:
        if self.canonical_host is not None:
            return self.canonical_host
        return _lower(str(self.options.get("hostname", self.alias)))

    @property
    def user(self) -> str:
        return str(self.options.get("user", _local_user()))

    @property
    def port(self) -> int:
        raw = str(self.options.get("port", 22))
        if raw.isdigit() and raw.isascii():   # the common case, without a2port's full reading
            return int(raw) if 0 < int(raw) <= 65535 else 22
        return _port_value(raw) or 22

    @property
    def identityfile(self) -> List[str]:
        """As ssh -G prints it: unexpanded (ssh expands IdentityFile when it loads the key)."""
        return list(self.options.get("identityfile") or _DEFAULT_IDENTITY_FILES)

    def tokens(self) -> Dict[str, str]:
        """The %-tokens ssh expands in path-like keywords, for this host."""
        import socket
        local = socket.gethostname()
        t = {"d": _home_dir(), "h": self.hostname, "i": str(os.getuid()), "L": local.split(".")[0],
             "l": local, "n": self.alias, "p": str(self.port), "r": self.user, "u": _local_user()}
        t["k"] = _lower(str(self.options["hostkeyalias"])) if "hostkeyalias" in self.options else t["h"]
        # %C as OpenSSH 9.2 computes it; used for display only, never for a socket of ours
        # (newer OpenSSH hashes more fields, so ssh's own value is the one that counts).
        import hashlib
        t["C"] = hashlib.sha1((t["l"] + t["h"] + t["p"] + t["r"]).encode()).hexdigest()
        return t

    def expanded(self, keyword: str) -> Optional[str]:
        """ControlPath, IdentityAgent or UserKnownHostsFile with ~, ${VAR} and %-tokens
        expanded as ssh -G shows them; None when unset (or "none")."""
        raw = self.options.get(keyword)
        if raw is None:
            return None
        if keyword in ("controlpath", "identityagent") and str(raw).lower() == "none":
            return "none"
        parts = split_args(str(raw)) if keyword == "userknownhostsfile" else [str(raw)]
        return " ".join(expand_tokens(p, self.tokens(), home=_home_dir()) for p in parts)

    def to_json(self) -> Dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "HostInfo":
        info = cls(data["alias"])
        info.__dict__.update(data)
        return info


def _local_user() -> str:
    try:
        import pwd
        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return os.environ.get("USER", "user")


def _home_dir() -> str:
    """ssh takes ~ from the passwd entry, not $HOME."""
    try:
        import pwd
        return pwd.getpwuid(os.getuid()).pw_dir
    except (ImportError, KeyError):
        return os.path.expanduser("~")


class _Walk:
    """The state of one pass of ssh over the config for one host."""
    __slots__ = ("info", "host", "original", "final", "active", "want_final", "ignore", "where", "catch_all")

    def __init__(self, info: HostInfo, host: str, original: str, final: bool,
                 where: Dict[str, str]) -> None:
        self.info, self.host, self.original, self.final = info, host, original, final
        self.active = True
        self.want_final = False
        self.ignore: Optional[str] = info.options.get("ignoreunknown")
        self.where = where                       # keyword -> 'FILE:LINE' of the value in use
        self.catch_all = True                    # in `Host *`, `Match all` or before any Host


class SSHConfig:
    """An SSH client config file and everything it includes, read like OpenSSH 9.2 reads it.

    `SSHConfig.load(path)` reads the top file (unreadable: ConfigError);
    `resolve(alias)` gives what ssh -G gives for it, raising ConfigError
    'FILE:LINE: reason' where ssh rejects the config for that alias; `aliases()`
    lists the concrete Host aliases, in file order, resolved.  `overruled` holds
    'FILE:LINE' places and `accepted_keywords` the keywords the ssh referee accepted
    although this reading rejects them (a patched ssh's extra keyword): they are skipped."""

    def __init__(self, path: str, *, home: Optional[str] = None, local_user: Optional[str] = None,
                 reader: Optional[Any] = None, check_perm: bool = False) -> None:
        self.path = path
        self.home = home or _home_dir()
        self.local_user = local_user or _local_user()
        self._read = reader or _read_config_bytes
        self._cache: Dict[str, Optional[List[_Line]]] = {}
        self._positions: Dict[str, Dict[str, List[int]]] = {}
        self.check_perm = check_perm           # ~/.ssh/config read without -F is checked like an Include
        self.overruled: set = set()
        self.accepted_keywords: set = set()    # keywords the referee's ssh knows and this reading does not
        self.files: Dict[str, None] = {}       # every file and glob directory read, for change detection

    @classmethod
    def load(cls, path: str, **kw: Any) -> "SSHConfig":
        cfg = cls(path, **kw)
        try:
            lines = cfg._lines(path)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        if lines is None:
            raise ConfigError(f"{path}: no such file")
        return cfg

    # -- reading -----------------------------------------------------------
    def _lines(self, path: str) -> Optional[List[_Line]]:
        """The lines of one file, or None when ssh's fopen() would fail with ENOENT.
        A directory reads as empty (fopen succeeds, reading fails), as in ssh."""
        if path in self._cache:
            return self._cache[path]
        self.files[path] = None
        data = self._read(path)
        if data is None:
            self._cache[path] = None
            return None
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        lines: List[_Line] = []
        # Only '\n' ends a line (getline); a NUL ends the C string early.
        pieces = data.split(b"\n")
        if pieces and pieces[-1] == b"":
            pieces.pop()
        for lineno, raw_bytes in enumerate(pieces, 1):
            raw = raw_bytes.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if lineno < len(pieces) or data.endswith(b"\n"):
                raw += "\n"
            line = self._parse_line(path, lineno, raw)
            if line is not None:
                lines.append(line)
        # While no block applies, a run of value lines and Host lines of plain names
        # that do not name the host changes nothing: skip to the next line that may.
        following = len(lines)
        for i in range(len(lines) - 1, -1, -1):
            lines[i].skip = following
            if not (lines[i].plain or lines[i].names is not None):
                following = i
        positions: Dict[str, List[int]] = {}
        for i, line in enumerate(lines):
            for name in line.names or ():
                positions.setdefault(name, []).append(i)
        self._positions[path] = positions
        self._cache[path] = lines
        return lines

    @staticmethod
    def _parse_line(path: str, lineno: int, raw: str) -> Optional[_Line]:
        mesh_comment = _MESH_COMMENT.match(raw)
        if mesh_comment:
            try:
                settings = parse_mesh_settings(mesh_comment.group(1))
            except ValueError as exc:
                return _Line(path, lineno, "#error", [], "", error=str(exc))
            return _Line(path, lineno, "#mesh", [], "", settings)
        split = split_keyword(raw)
        if split is None:
            return None
        keyword, rest = split
        if not rest:
            return _Line(path, lineno, keyword, [], rest, error=f'no argument after keyword "{keyword}"')
        try:
            args = split_args(rest)
        except ValueError:
            # ssh names an unknown keyword first, then the quotes: both fail the line
            return _Line(path, lineno, keyword, [], rest, error="invalid quotes")
        if keyword not in _KINDS or keyword in ("host", "match", "include"):
            return _Line(path, lineno, keyword, args, rest)
        try:
            value = _check_value(keyword, args, rest)
        except _Bad as exc:
            return _Line(path, lineno, keyword, args, rest, error=str(exc))
        return _Line(path, lineno, keyword, args, rest, value=value)

    def _include_paths(self, arg: str) -> List[str]:
        """Include's glob(3) with GLOB_TILDE: relative paths live in ~/.ssh, ~ is $HOME."""
        import glob
        if not arg.startswith("/") and not arg.startswith("~"):
            arg = "~/.ssh/" + arg
        if arg.startswith("~"):
            user, sep, tail = arg[1:].partition("/")
            if not user:
                home = os.environ.get("HOME") or self.home
            else:
                try:
                    import pwd
                    home = pwd.getpwnam(user).pw_dir
                except (ImportError, KeyError):
                    home = None
            if home is not None:
                arg = home + (sep + tail if sep else "")
        if "\\" in arg:   # glob(3) takes a backslash as an escape; for Python's glob, [c] says the same
            arg = re.sub(r"\\(.)", lambda m: f"[{m.group(1)}]" if m.group(1) in "*?[" else m.group(1), arg)
        parent = os.path.dirname(arg)
        if glob.has_magic(arg):
            # Every directory the glob reads on its way down, from the one holding its first
            # wildcard: a new match anywhere (`~/.ssh/*/config` and a new directory) changes
            # one of them.
            parts = parent.split("/")
            first = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
            for i in range(first, len(parts) + 1):
                prefix = "/".join(parts[:i]) or "/"
                for d in (glob.glob(prefix) if glob.has_magic(prefix) else [prefix]):
                    self.files[d] = None
            return sorted(glob.glob(arg))
        self.files[parent] = None
        return [arg] if os.path.lexists(arg) else []

    def watch_paths(self) -> List[str]:
        """What to stat() to notice any change to this config: the file, every file it
        Includes (at any depth, active or not), and the directory each Include pattern
        looks in (so a new or deleted `config.d/*.conf` shows).  Files that don't exist
        are listed too: their appearing is a change."""
        seen: set = set()

        def walk(path: str, depth: int) -> None:
            if path in seen or depth > _MAX_INCLUDE_DEPTH:
                return
            seen.add(path)
            try:
                lines = self._lines(path)
            except (ConfigError, OSError):
                return
            for line in lines or []:
                if line.keyword == "include":
                    for arg in line.args:
                        for inc in self._include_paths(arg):
                            walk(inc, depth + 1)

        walk(self.path, 0)
        return list(self.files)

    # -- resolving ---------------------------------------------------------
    def resolve(self, alias: str) -> HostInfo:
        """Effective settings for `alias`, as ssh -G computes them: one pass, then the
        HostName expanded and canonicalised, then a second pass when a `Match final`
        or CanonicalizeHostname asks for one (Host lines then see the new name)."""
        info = HostInfo(alias)
        where: Dict[str, str] = {}
        walk = _Walk(info, alias, alias, False, where)
        self._read_file(self.path, walk, 0, never=False, include=None)
        host = alias
        if "hostname" in info.options:
            try:
                host = expand_hostname(info.options["hostname"], alias)
            except ValueError as exc:
                raise ConfigError(f"{where['hostname']}: {exc}") from None
        canon = canonical_address(host, _lower(str(info.options.get("addressfamily", "any"))))
        mode = _lower(str(info.options.get("canonicalizehostname", "no")))
        looks_like_address = "%" in host or ":" in host or host.strip("0123456789.") == ""   # is_addr_fast()
        if canon is None and not looks_like_address:
            host = _lower(host)   # ssh leaves what looks like an address as written
            if mode in ("yes", "true", "always"):
                self._canonicalize(info, host, mode, where)
        elif canon is not None and _lower(canon) != _lower(host):
            host = canon   # ssh keeps the address as written when only the case differs
        cnames = info.options.get("canonicalizepermittedcnames")
        if canon is None and cnames is not None and _lower(cnames) != "none" and (
                mode in ("yes", "true", "always") or str(info.options.get("proxycommand", "none")).lower() == "none"):
            info.unresolved = True   # ssh follows CNAMEs in the DNS: only it can tell
        info.canonical_host = host
        if walk.want_final or mode in ("yes", "true", "always"):
            info.options["hostname"] = host
            second = _Walk(info, host, alias, True, where)
            self._read_file(self.path, second, 0, never=False, include=None)
        jump = info.options.get("proxyjump")
        if jump is not None and _lower(jump) != "none":
            jump_user, jump_host, jump_port = _jump_target(jump)
            if (jump_host == host and (jump_port if jump_port > 0 else 22) == info.port
                    and (jump_user or info.user) == info.user):
                raise ConfigError(f"{where['proxyjump']}: jumphost loop via {jump_host}")
        self._check_expansions(info, where)
        return info

    @staticmethod
    def _check_expansions(info: HostInfo, where: Dict[str, str]) -> None:
        """What ssh.c expands before `ssh -G` prints (and fails on: an unknown %-token,
        an unset ${VAR}, ~user of no user), and the HostKeyAlgorithms list it assembles."""
        options = info.options
        checks: List[Tuple[str, str, bool]] = []        # (keyword, text, ~ and ${VAR} too)
        for kw in ("controlpath", "identityagent", "userknownhostsfile", "remotecommand", "forwardagent"):
            raw = options.get(kw)
            if raw is None or (kw != "identityagent" and _lower(str(raw)) == "none"):
                continue
            if kw == "forwardagent" and _lower(str(raw)) in _FLAG:
                continue
            parts = str(raw).split() if kw == "userknownhostsfile" else [str(raw)]
            checks.extend((kw, part, kw != "remotecommand") for part in parts)
        for kw in ("localforward", "remoteforward", "dynamicforward"):
            for spec in options.get(kw, ()):   # a Unix socket path in a forward gets the %-tokens
                plain = re.sub(r"\$\{([^}]*)\}", lambda m: os.environ.get(m.group(1), ""), spec)
                checks.extend((f"{kw} {spec}", field, False) for field in re.split(r"[ :]", plain) if "/" in field)
        tokens = info.tokens() if checks else {}
        for kw, part, paths in checks:
            try:
                if paths:
                    expand_tokens(part, tokens, home=_home_dir())
                else:   # %-tokens only: no ~ and no ${VAR}
                    expand_tokens(part.replace("${", "$ {").lstrip("~"), tokens, home="", env={})
            except ValueError as exc:
                raise ConfigError(f"{where.get(kw, '?')}: {exc}") from None
        algos = options.get("hostkeyalgorithms")
        if algos is not None and not _assemble_ok(str(algos)):
            raise ConfigError(f"{where.get('hostkeyalgorithms', '?')}: expand HostKeyAlgorithms: invalid argument")
        return info

    @staticmethod
    def _canonicalize(info: HostInfo, host: str, mode: str, where: Dict[str, str]) -> None:
        """ssh.c resolve_canonicalize() without DNS: when ssh would look names up, only
        ssh can tell the result (the node is marked for ssh -G); when it would give up,
        it fails as ssh does."""
        direct = (str(info.options.get("proxycommand", "none")).lower() == "none"
                  and "proxyjump" not in info.options)
        if not direct and mode != "always":
            return
        if host.endswith(".") or (info.options.get("canonicaldomains") and
                                  host.count(".") <= int(info.options.get("canonicalizemaxdots", 1))):
            info.unresolved = True
            return
        if host.count(".") > int(info.options.get("canonicalizemaxdots", 1)):
            return
        if _lower(str(info.options.get("canonicalizefallbacklocal", "yes"))) in ("no", "false"):
            raise ConfigError(f"{where.get('canonicalizehostname', '?')}: Could not resolve host \"{host}\"")

    def _read_file(self, path: str, walk: _Walk, depth: int, *, never: bool, include: Optional[_Line]) -> bool:
        """read_config_file_depth(): False when the file does not exist."""
        if depth > _MAX_INCLUDE_DEPTH:
            # ssh says only "Too many recursive configuration includes": name the Include line
            assert include is not None
            raise ConfigError(f"{include.where}: Too many recursive configuration includes "
                              f"(an Include more than {_MAX_INCLUDE_DEPTH} deep: {path})")
        lines = self._lines(path)
        if lines is None:
            return False
        if include is not None or self.check_perm:
            self._check_perm(path, include)
        import bisect
        mine = [] if never else self._positions[path].get(walk.host, [])
        i, n = 0, len(lines)
        while i < n:
            line = lines[i]
            if not walk.active and (line.plain or line.names is not None):
                k = bisect.bisect_left(mine, i)
                nxt = mine[k] if k < len(mine) else n
                if nxt != i:
                    i = min(nxt, line.skip)
                    continue
            self._process(line, walk, depth, never)
            i += 1
        return True

    def _check_perm(self, path: str, include: Optional[_Line]) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return
        if (st.st_uid not in (0, os.getuid())) or st.st_mode & 0o022:
            where = include.where if include is not None else f"{path}:0"
            raise ConfigError(f"{where}: Bad owner or permissions on {path}")

    def _process(self, line: _Line, walk: _Walk, depth: int, never: bool) -> None:
        """process_config_line_depth() for one line, in ssh's order of checks."""
        kw, info = line.keyword, walk.info
        if kw == "#mesh":
            if walk.active:
                for key, value in (line.mesh or {}).items():
                    info.mesh.setdefault(key, value)
                # Under `Host *` (or before any Host) a '# mesh:' line gives every node
                # defaults; it does not make every host - github.com too - a node.
                if not walk.catch_all:
                    info.marked = True
            return
        if kw == "#error":
            raise ConfigError(f"{line.where}: {line.error}")
        if self.overruled and line.where in self.overruled:
            if walk.active and line.known:
                info.unresolved = True   # ssh accepts a value this reading does not understand
            return
        if not line.known:
            if line.error is not None and line.error.startswith("no argument"):
                raise ConfigError(f"{line.where}: {line.error}")
            if kw in self.accepted_keywords:
                return
            if walk.ignore is None or match_pattern_list(kw, walk.ignore, fold=True) != 1:
                raise ConfigError(f"{line.where}: Bad configuration option: {kw}")
            if line.error is not None:
                raise ConfigError(f"{line.where}: {line.error}")
            return
        if line.error is not None:
            raise ConfigError(f"{line.where}: {line.error}")
        if kw == "host":
            walk.active = False
            walk.catch_all = all(a == "*" for a in line.args)
            if line.names is not None:
                walk.active = not never and walk.host in line.names
                return
            for arg in line.args:
                if not arg:
                    raise ConfigError(f"{line.where}: keyword host empty argument")
                if never:
                    break
                negated = arg.startswith("!")
                if match_pattern(walk.host, arg[1:] if negated else arg):
                    if negated:
                        walk.active = False
                        break
                    walk.active = True
            return
        if kw == "match":
            result = self._match(line, walk)
            walk.active = False if never else result
            walk.catch_all = [_lower(a) for a in line.args] == ["all"]
            return
        if kw == "include":
            self._include(line, walk, depth, never)
            return
        if not walk.active:
            return
        self._store(line, walk)

    def _include(self, line: _Line, walk: _Walk, depth: int, never: bool) -> None:
        for arg in line.args:
            if not arg:
                raise ConfigError(f"{line.where}: keyword include empty argument")
            was_active, was_catch_all = walk.active, walk.catch_all
            for inc in self._include_paths(arg):
                try:
                    self._read_file(inc, walk, depth + 1, never=never or not was_active, include=line)
                except PermissionError as exc:
                    raise ConfigError(f"{line.where}: Can't open user config file {inc}: {exc.strerror}") from None
                walk.active = was_active  # a Match inside an Include does not leak out of it
                walk.catch_all = was_catch_all

    def _store(self, line: _Line, walk: _Walk) -> None:
        """First value wins, as ssh sets an option only while it is unset; IdentityFile
        and friends accumulate."""
        info = walk.info
        kw = _ALIASES.get(line.keyword, line.keyword)
        options = info.options
        if kw in ("identityfile", "certificatefile"):
            values = options.setdefault(kw, [])
            if line.value not in values:
                if kw == "identityfile" and len(values) >= _MAX_IDENTITY_FILES:
                    raise ConfigError(f"{line.where}: Too many identity files specified "
                                      f"(max {_MAX_IDENTITY_FILES}).")
                values.append(line.value)
            return
        if kw in ("localforward", "remoteforward", "dynamicforward"):
            options.setdefault(kw, []).append(line.value)
            walk.where.setdefault(f"{kw} {line.value}", line.where)
            return
        if kw == "sendenv":
            values = options.setdefault(kw, [])
            for name in line.value:
                if name.startswith("-"):
                    values[:] = [v for v in values if not match_pattern(v, name[1:])]
                else:
                    values.append(name)
            return
        if kw == "proxycommand" and "proxyjump" in options:
            return
        if kw == "proxyjump":
            if "proxycommand" in options or "proxyjump" in options:
                return
            if _lower(line.value) != "none":
                options["proxycommand"] = "none"
        if kw == "ignoreunknown" and walk.ignore is None:
            walk.ignore = line.value
        if kw not in options:
            options[kw] = line.value
            walk.where[kw] = line.where

    def _match(self, line: _Line, walk: _Walk) -> bool:
        """readconf.c match_cfg_line(): criteria read with strdelim (so `host=a` and
        "double quotes" work; 'single quotes' stay literal)."""
        info = walk.info
        fail = lambda msg: ConfigError(f"{line.where}: {msg}")  # noqa: E731
        ruser = str(info.options.get("user", self.local_user))
        if walk.final:
            host = str(info.options.get("hostname", walk.host))
        elif "hostname" in info.options:
            try:
                host = expand_hostname(str(info.options["hostname"]), walk.host)
            except ValueError as exc:
                raise fail(str(exc)) from None
        else:
            host = walk.host
        cp: Optional[str] = line.rest
        result, attributes = True, 0
        while True:
            attrib, cp = _strdelim(cp)
            if not attrib:
                break
            if attrib.startswith("#"):
                cp = None
                break
            negate = attrib.startswith("!")
            crit = _lower(attrib[1:] if negate else attrib)
            if crit == "all":
                arg, cp = _strdelim(cp)
                if attributes > 1 or (arg and not arg.startswith("#")):
                    raise fail(f"'{attrib}' cannot be combined with other Match attributes")
                if arg is not None and arg.startswith("#"):
                    cp = None
                if result:
                    result = not negate
                return self._match_end(line, cp, result)
            attributes += 1
            if crit in ("canonical", "final"):
                if crit == "final" and not walk.final:
                    walk.want_final = True
                if walk.final == negate:
                    result = False
                continue
            arg, cp = _strdelim(cp)
            if not arg or arg.startswith("#"):
                raise fail(f"Missing Match criteria for {attrib[1:] if negate else attrib}")
            if crit == "host":
                ok = match_hostname(host, arg) == 1
            elif crit == "originalhost":
                ok = match_hostname(walk.original, arg) == 1
            elif crit == "user":
                ok = match_pattern_list(ruser, arg) == 1
            elif crit == "localuser":
                ok = match_pattern_list(self.local_user, arg) == 1
            elif crit == "exec":
                if result:
                    # only ssh can run it: never guess - ssh -G answers for this node
                    info.unresolved = True
                    result = False
                continue
            else:
                raise fail(f"Unsupported Match attribute {attrib[1:] if negate else attrib}")
            if ok == negate:
                result = False
        if attributes == 0:
            raise fail("One or more attributes required for Match")
        return self._match_end(line, cp, result)

    @staticmethod
    def _match_end(line: _Line, cp: Optional[str], result: bool) -> bool:
        if cp and line.args:
            raise ConfigError(f"{line.where}: keyword match extra arguments at end of line")
        return result

    def aliases(self) -> List[HostInfo]:
        """Every concrete Host alias (no '*', '?' or '!'), resolved, in file order;
        Includes are followed at top level and under `Host *`/`Match all`."""
        return [self.resolve(alias) for alias in self.alias_names()]

    def alias_names(self) -> List[str]:
        """The concrete Host aliases, in file order, unresolved."""
        seen: Dict[str, None] = {}

        def walk(path: str, depth: int) -> None:
            if depth > _MAX_INCLUDE_DEPTH:
                return  # resolve() reports the loop with its Include line
            global_block = True
            for line in self._lines(path) or []:
                if line.keyword == "host" and line.error is None:
                    global_block = all(p == "*" for p in line.args)
                    for pat in line.args:
                        if is_concrete_alias(pat):
                            seen.setdefault(pat, None)
                elif line.keyword == "match":
                    global_block = [a.lower() for a in line.args] == ["all"]
                elif line.keyword == "include" and global_block and line.error is None:
                    for arg in line.args:
                        for inc in (self._include_paths(arg) if arg else []):
                            walk(inc, depth + 1)

        walk(self.path, 0)
        return list(seen)


def _read_config_bytes(path: str) -> Optional[bytes]:
    """A config file's bytes; None when it does not exist; b"" for a directory
    (ssh's fopen() of a directory succeeds and reading it gives nothing)."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        return b""
    except NotADirectoryError:
        return None


# ---------------------------------------------------------------------------
# SSH config referee (I/O): the local ssh settles what only it can know.
# ---------------------------------------------------------------------------
# The hand parser above follows stock OpenSSH 9.2.  A patched or newer ssh may
# accept more (Apple's `UseKeychain`, new algorithms) or less; so once per config
# change mesh asks the local `ssh -G` about the config and lets it decide.  The
# verdict and the resolved hosts are cached, keyed by the identity and mtime of
# every file and Include directory read, the ssh binary and mesh.py itself.

REFEREE_TIMEOUT = 10.0           # seconds for one `ssh -G`
_CACHE_VERSION = 1
_CACHE_KEEP = 64                 # cache files kept per user; the oldest go first


def config_cache_dir() -> Optional[str]:
    """Where verdicts are cached: $MESH_CACHE_DIR, else $XDG_CACHE_HOME/mesh, else
    ~/.cache/mesh.  Created mode 0700; used only when it is a real directory owned
    by the user that nobody else can reach.  None: no cache (mesh still works)."""
    base = os.environ.get("MESH_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.environ.get("HOME") or _home_dir(), ".cache")
        base = os.path.join(xdg, "mesh")
    try:
        os.makedirs(base, mode=0o700, exist_ok=True)
        st = os.lstat(base)
    except OSError:
        return None
    import stat
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return base


def _stamp(path: str) -> Optional[List[int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode]


class _ConfigVerdict:
    """One config's hosts (or its error) as settled with the referee, and the cache of it."""

    def __init__(self, path: str, ssh: Optional[str], pass_config: bool) -> None:
        self.path, self.ssh, self.pass_config = path, ssh, pass_config
        import hashlib
        key = f"{os.path.realpath(path)}\0{pass_config}\0{ssh}\0{os.getuid()}"
        self.cache_name = "sshconfig-" + hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:24] + ".json"

    def _identity(self) -> Dict[str, Any]:
        return {"version": _CACHE_VERSION, "ssh": [self.ssh, _stamp(self.ssh) if self.ssh else None],
                "mesh": _stamp(os.path.abspath(__file__)), "home": os.environ.get("HOME"),
                "user": _local_user()}

    def load_cached(self) -> Optional[Dict[str, Any]]:
        directory = config_cache_dir()
        if directory is None:
            return None
        try:
            with open(os.path.join(directory, self.cache_name), encoding="utf-8", errors="surrogateescape") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("identity") != json.loads(json.dumps(self._identity())):
            return None
        for path, stamp in data.get("files", []):
            if _stamp(path) != stamp:
                return None
        return data

    def save(self, cfg: "SSHConfig", hosts: List[HostInfo], error: Optional[str]) -> None:
        directory = config_cache_dir()
        if directory is None:
            return
        data = {"identity": self._identity(), "files": [[p, _stamp(p)] for p in cfg.files],
                "error": error, "hosts": [h.to_json() for h in hosts]}
        target = os.path.join(directory, self.cache_name)
        tmp = f"{target}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as fh:
                json.dump(data, fh)
            os.replace(tmp, target)
            names = sorted((e for e in os.scandir(directory) if e.name.startswith("sshconfig-")),
                           key=lambda e: e.stat().st_mtime)
            for entry in names[:-_CACHE_KEEP]:
                os.unlink(entry.path)
        except OSError as exc:
            logger.debug("config cache not written: %s", exc)
            try:
                os.unlink(tmp)
            except OSError:
                pass

    # -- settling ----------------------------------------------------------
    def settle(self) -> List[HostInfo]:
        cached = self.load_cached()
        if cached is not None:
            if cached["error"]:
                raise ConfigError(cached["error"])
            return [HostInfo.from_json(h) for h in cached["hosts"]]
        cfg = SSHConfig.load(self.path, check_perm=not self.pass_config)
        try:
            hosts = self._settle(cfg)
        except ConfigError as exc:
            self.save(cfg, [], str(exc))
            raise
        self.save(cfg, hosts, None)
        return hosts

    def _hand(self, cfg: "SSHConfig") -> Tuple[List[HostInfo], Optional[Tuple[str, ConfigError]]]:
        """Resolve every alias by hand; stop at the first one ssh (per our reading) rejects."""
        names = cfg.alias_names() or ["mesh-config-check"]
        hosts = []
        for alias in names:
            try:
                hosts.append(cfg.resolve(alias))
            except ConfigError as exc:
                return hosts, (alias, exc)
        return hosts if names != ["mesh-config-check"] else [], None

    def _settle(self, cfg: "SSHConfig") -> List[HostInfo]:
        hosts, failure = self._hand(cfg)
        if self.ssh is None:
            if failure:
                raise failure[1]
            return hosts
        asked: Dict[str, Any] = {}
        for _ in range(10000):            # one round per line ssh overrules, at most
            alias = failure[0] if failure else (hosts[0].alias if hosts else "mesh-config-check")
            if alias not in asked:
                if len(asked) >= 4:
                    break
                asked[alias] = self._ssh_g(alias)
            answer = asked[alias]
            if answer is None:           # ssh could not be asked: the hand reading stands
                break
            ok, values, reason = answer
            if not ok:
                raise ConfigError(self._ssh_reason(reason, failure[1] if failure else None))
            if failure is None:
                self._cross_check(hosts, alias, values)
                return hosts
            # ssh accepts what this reading rejects (a patched build's keyword, a newer
            # algorithm): skip that line - or every line of that keyword - as ssh
            # evidently understands it.
            logger.info("ssh accepts what mesh's reading of ssh_config rejects: %s", failure[1])
            unknown = re.search(r": Bad configuration option: (\S+)$", str(failure[1]))
            where = re.match(r"(.*?:\d+): ", str(failure[1]))
            if unknown and unknown.group(1) not in cfg.accepted_keywords:
                cfg.accepted_keywords.add(unknown.group(1))
            elif where is not None and where.group(1) not in cfg.overruled:
                cfg.overruled.add(where.group(1))
            else:
                break
            hosts, failure = self._hand(cfg)
        if failure:
            raise failure[1]
        return hosts

    def _ssh_g(self, alias: str) -> Optional[Tuple[bool, Dict[str, Any], str]]:
        """(accepted, values, stderr) from `ssh -G` for one alias; None when ssh cannot run."""
        import subprocess
        argv = [self.ssh] + (["-F", self.path] if self.pass_config else []) + ["-G", "-T", "--", alias]
        try:
            p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=REFEREE_TIMEOUT)
        except (OSError, subprocess.SubprocessError) as exc:
            logger.warning("cannot ask %s about the SSH config: %s", self.ssh, exc)
            return None
        err = p.stderr.decode("utf-8", "surrogateescape")
        return p.returncode == 0, parse_ssh_g(p.stdout.decode("utf-8", "surrogateescape")), err

    def _ssh_reason(self, stderr: str, ours: Optional[ConfigError]) -> str:
        """ssh's reason as 'FILE:LINE: reason'; where ssh names no line, ours (which
        names the Include that goes too deep, the HostName in use, ...)."""
        lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
        for ln in lines:
            m = re.match(r"(.*?):? line (\d+): (.*)$", ln)
            if m and not m.group(3).startswith("Unsupported option"):   # a warning, not the fault
                return f"{m.group(1)}:{m.group(2)}: {m.group(3)}"
        if ours is not None:
            return str(ours)
        reason = lines[-1] if lines else "ssh -G failed"
        return f"{self.path}:0: {reason} (the local ssh rejects this config; mesh's own reading found no fault)"

    @staticmethod
    def _cross_check(hosts: List[HostInfo], alias: str, values: Dict[str, Any]) -> None:
        """When the local ssh resolves the probed alias differently (a patched build,
        /etc/ssh/ssh_config), mesh's values are not to be trusted: ssh -G answers per node."""
        for info in hosts:
            if info.alias != alias or info.unresolved:
                continue
            mine = {"hostname": info.hostname, "user": info.user, "port": info.port, "identityfile": info.identityfile}
            if any(mine[k] != values[k] for k in mine if values.get(k)):   # what ssh printed
                logger.info("ssh -G resolves %s differently (%s); asking ssh for every node", alias,
                            {k: values.get(k) for k in mine})
                for other in hosts:
                    other.unresolved = True
            return


def parse_ssh_g(text: str) -> Dict[str, Any]:
    """The fields mesh uses from `ssh -G` output: hostname, user, port (int), identityfile (list)."""
    values: Dict[str, Any] = {"identityfile": []}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "identityfile":
            values["identityfile"].append(value)
        elif key in ("hostname", "user"):
            values[key] = value
        elif key == "port" and value.isdigit():
            values[key] = int(value)
    return values


def read_config_hosts(path: str, *, ssh: Optional[str] = "ssh", pass_config: bool = True) -> List[HostInfo]:
    """Every concrete Host alias of the SSH config at `path`, resolved: List[HostInfo].

    The hand parser (SSHConfig) reads it; the local ssh (`ssh`, a name or path; None:
    no referee) settles disagreements once per config change, as `ssh -G` with
    `-F path` when pass_config (else as plain ssh reads ~/.ssh/config).  Raises
    ConfigError 'FILE:LINE: reason' when ssh rejects the config.  Results are cached
    in config_cache_dir()."""
    binary = _which(ssh) if ssh else None
    if binary is not None and not os.path.isabs(binary):
        binary = None   # not installed: the hand reading stands alone
    return _ConfigVerdict(path, binary, pass_config).settle()


# ---------------------------------------------------------------------------
# Node settings (pure): what a node is, from its HostInfo.
# ---------------------------------------------------------------------------

_TRANSPORTS = ("auto", "forward", "stdio", "exec", "http")


class NodeSpec:
    """A node as configured: its ssh alias and its mesh settings."""

    def __init__(self, name: str, *, display_name: Optional[str] = None, weight: float = 1.0,
                 max_concurrent: int = DEFAULT_MAX_CONCURRENT, ollama_port: int = DEFAULT_OLLAMA_PORT,
                 ollama_host: str = "localhost", transport: str = "auto",
                 info: Optional[HostInfo] = None, num_parallel: Optional[int] = None) -> None:
        self.name = name
        self.display_name = display_name or name
        self.weight = weight
        self.max_concurrent = max_concurrent
        self.ollama_port = ollama_port
        self.ollama_host = ollama_host
        self.transport = transport
        self.info = info
        self.num_parallel = num_parallel   # Ollama's OLLAMA_NUM_PARALLEL there, if the user says
        self.fallback = False     # the local Ollama standing in because no Host is marked

    @classmethod
    def from_settings(cls, alias: str, settings: Dict[str, str], info: Optional[HostInfo] = None,
                      where: str = "") -> "NodeSpec":
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{where or alias}: mesh setting {key}={settings[key]!r}: {why}")

        known = {"name", "weight", "max_concurrent", "ollama_port", "ollama_host", "transport", "enabled",
                 "num_parallel"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigError(f"{where or alias}: unknown mesh setting {unknown[0]!r} "
                              f"(known: {', '.join(sorted(known))})")
        kw: Dict[str, Any] = {}
        if "name" in settings:
            kw["display_name"] = settings["name"]
        if "weight" in settings:
            try:
                kw["weight"] = float(settings["weight"])
            except ValueError:
                raise bad("weight", "not a number") from None
            if not kw["weight"] > 0:
                raise bad("weight", "must be > 0")
        for key in ("max_concurrent", "ollama_port", "num_parallel"):
            if key in settings:
                try:
                    kw[key] = int(settings[key])
                except ValueError:
                    raise bad(key, "not a whole number") from None
                if kw[key] < 1 or (key == "ollama_port" and kw[key] > 65535):
                    raise bad(key, "out of range")
        if "ollama_host" in settings:
            kw["ollama_host"] = settings["ollama_host"]
        if "transport" in settings:
            if settings["transport"] not in _TRANSPORTS:
                raise bad("transport", f"one of {', '.join(_TRANSPORTS)}")
            kw["transport"] = settings["transport"]
        return cls(alias, info=info, **kw)

    def destination(self) -> Tuple[Any, ...]:
        """What decides which machine answers: ssh's resolved HostName, Port, User,
        ProxyJump, ProxyCommand and HostKeyAlias, and the Ollama address there.
        A master serves one destination; a different one needs a master of its own."""
        info = self.info
        ollama = (self.transport, self.ollama_host, self.ollama_port)
        if info is None:
            return ollama
        o = info.options
        return (info.hostname, info.port, info.user, o.get("proxyjump"), o.get("proxycommand"),
                o.get("hostkeyalias")) + ollama

    def knock_address(self) -> Optional[Tuple[str, int]]:
        """(HostName, Port) when that is exactly where ssh connects: no ProxyJump or
        ProxyCommand, nothing left to ssh (Match exec, canonicalisation); else None."""
        info = self.info
        if info is None or info.unresolved:
            return None
        for key in ("proxyjump", "proxycommand"):
            value = info.options.get(key)
            if value is not None and str(value).lower() != "none":
                return None
        return info.hostname, info.port

    def as_dict(self) -> Dict[str, Any]:
        info = self.info
        return {
            "name": self.name, "display_name": self.display_name,
            "hostname": info.hostname if info else self.ollama_host,
            "user": info.user if info else None,
            "port": info.port if info else self.ollama_port,
            "identityfile": info.identityfile if info else [],
            "weight": self.weight, "max_concurrent": self.max_concurrent,
            "ollama_port": self.ollama_port, "ollama_host": self.ollama_host,
            "transport": self.transport, "num_parallel": self.num_parallel,
            "unresolved": bool(info and info.unresolved),
        }


def _mesh_enabled(settings: Dict[str, str]) -> bool:
    return settings.get("enabled", "yes").lower() not in ("no", "false", "off", "0")


MARK_HINT = "add a '# mesh: on' line to its Host block"


def node_verdict(info: HostInfo) -> Optional[str]:
    """None when the alias is a node, else why not (for `nodes --all`).

    A Host block is a node only when it carries a `# mesh:` line of its own
    (`# mesh: on` or any mesh setting); `# mesh: off` keeps it out, first value
    winning as in ssh_config(5).  Hosts nobody marked are never contacted."""
    if not info.marked:
        if info.mesh:   # settings it has came from `Host *` / `Match all`: defaults, no mark
            return (f"not marked: a '# mesh:' line under 'Host *', 'Match all' or before any Host "
                    f"gives defaults but marks no host ({MARK_HINT})")
        return f"not marked ({MARK_HINT})"
    if not _mesh_enabled(info.mesh):
        return "'# mesh: off'"
    return None


def load_node_specs(config_path: str, *, only: Optional[Sequence[str]] = None,
                    ollama_host_env: Optional[str] = None, ssh: Optional[str] = "ssh",
                    pass_config: bool = True) -> List[NodeSpec]:
    """Nodes from the SSH config: the concrete aliases `node_verdict` accepts.  When
    none is marked (or there is no config), the local Ollama (OLLAMA_HOST, else
    127.0.0.1:11434) as the one node `local`, its NodeSpec.fallback true.
    ssh/pass_config: the local ssh that referees the config (read_config_hosts).
    Raises ConfigError for a config ssh would reject, UsageError for `only` names
    that are not nodes."""
    specs: List[NodeSpec] = []
    hosts: List[HostInfo] = []
    if os.path.exists(config_path) or config_path != default_config_path():
        hosts = read_config_hosts(config_path, ssh=ssh, pass_config=pass_config)
        for info in hosts:
            if node_verdict(info) is None:
                specs.append(NodeSpec.from_settings(info.alias, info.mesh, info, where=config_path))
    if not specs:
        host, port = parse_host_port(ollama_host_env if ollama_host_env is not None
                                     else os.environ.get("OLLAMA_HOST", ""), DEFAULT_OLLAMA_PORT)
        specs = [NodeSpec("local", display_name=f"local Ollama ({host}:{port})",
                          ollama_host=host, ollama_port=port, transport="http")]
        specs[0].fallback = True
    if only:
        names = {s.name for s in specs}
        unknown = [n for n in only if n not in names]
        if unknown:
            why = {h.alias: node_verdict(h) for h in hosts}.get(unknown[0])
            if why:
                raise UsageError(f"{unknown[0]!r} is not a node: {why}")
            raise UsageError(f"unknown node {unknown[0]!r} (configured: {', '.join(sorted(names))})")
        specs = [s for s in specs if s.name in set(only)]
    return specs


def default_config_path() -> str:
    return os.path.join(_home_dir(), ".ssh", "config")


def parse_host_port(text: str, default_port: int, default_host: str = "127.0.0.1", *,
                    listen: bool = False) -> Tuple[str, int]:
    """'HOST:PORT', 'HOST', ':PORT', 'PORT', '[v6]:PORT' or 'http://HOST:PORT' -> (host, port).

    As a client address (OLLAMA_HOST), 0.0.0.0 means this machine, as Ollama's own
    client reads it; as a listen address it means every interface, and port 0 any port."""
    given = text = text.strip()
    text = re.sub(r"^[a-zA-Z]+://", "", text).rstrip("/")
    if not text:
        return default_host, default_port
    if text.isdigit():
        text = ":" + text   # a bare number is a port (`--listen 11652`), as `ollama serve` reads OLLAMA_HOST
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:]*)(?::(\d+))?", text)
    if not m:
        raise UsageError(f"bad address {given!r} (expected HOST:PORT)")
    host = m.group(1) or m.group(3) or default_host
    port_s = m.group(2) or m.group(4)
    port = int(port_s) if port_s else default_port
    if not (0 if listen else 1) <= port <= 65535:
        raise UsageError(f"bad port in {given!r} (1-65535)" if not listen else f"bad port in {given!r} (0-65535)")
    if host in ("0.0.0.0", "::") and not listen:
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return host, port


# ---------------------------------------------------------------------------
# Wire formats (pure): NDJSON framing, HTTP/1.1 heads and bodies, error shapes.
# ---------------------------------------------------------------------------

class ProtocolError(ValueError):
    """What a node sent is not what Ollama sends."""


# What json.loads raises for text that is not JSON: ValueError, and RecursionError for
# nesting deeper than the interpreter's stack (a node's reply must not become an
# "internal error" by being deep).
_JSON_ERRORS = (ValueError, RecursionError)


class NDJSONDecoder:
    """Feed bytes as they arrive; get each complete JSON line as soon as it is whole.

    Lines split across reads are reassembled; blank lines and CRLF are tolerated.
    A line that is not a JSON object raises ProtocolError with a short excerpt."""

    def __init__(self, max_line: int = 64 * 1024 * 1024) -> None:
        self._buf = bytearray()
        self._max_line = max_line

    def feed(self, data: bytes) -> List[Dict[str, Any]]:
        self._buf += data
        out: List[Dict[str, Any]] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > self._max_line:
                    raise ProtocolError("a line longer than %d bytes" % self._max_line)
                return out
            line = bytes(self._buf[:nl])
            del self._buf[:nl + 1]
            obj = self._decode(line)
            if obj is not None:
                out.append(obj)

    def finish(self) -> List[Dict[str, Any]]:
        """End of stream: a last line without newline still counts if it is whole JSON."""
        line, self._buf = bytes(self._buf), bytearray()
        obj = self._decode(line, final=True)
        return [obj] if obj is not None else []

    @staticmethod
    def _decode(line: bytes, final: bool = False) -> Optional[Dict[str, Any]]:
        line = line.strip()
        if not line:
            return None
        try:
            obj = json.loads(line)
        except _JSON_ERRORS:
            if final:
                raise ProtocolError(f"stream ended in the middle of a line: {_excerpt(line)}") from None
            raise ProtocolError(f"not JSON: {_excerpt(line)}") from None
        if not isinstance(obj, dict):
            raise ProtocolError(f"not a JSON object: {_excerpt(line)}")
        return obj


def _excerpt(data: bytes, limit: int = 80) -> str:
    text = data.decode("utf-8", "replace").strip().replace("\n", " ")
    return repr(text if len(text) <= limit else text[:limit] + "...")


_STATUS_LINE_RE = re.compile(r"HTTP/1\.[01] (\d{3})")


def parse_http_head(head: bytes) -> Tuple[int, Dict[str, str]]:
    """Status and lowercased headers of an HTTP/1.x response head."""
    lines = head.decode("latin-1").split("\r\n")
    m = _STATUS_LINE_RE.match(lines[0])
    if not m:
        raise ProtocolError(f"not an HTTP response: {_excerpt(head)}")
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        k, sep, v = line.partition(":")
        if sep:
            key, v = k.strip().lower(), v.strip()
            headers[key] = (headers[key] + ", " + v) if key in headers else v
    return int(m.group(1)), headers


def error_message(status: int, body: bytes) -> str:
    """Ollama's `{"error": ...}` text (also inside the OpenAI and Anthropic shapes,
    `{"error": {"message": ...}}`), or a description of what came instead."""
    try:
        obj = json.loads(body)
        if isinstance(obj, dict) and isinstance(obj.get("error"), str):
            return obj["error"]
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict) \
                and isinstance(obj["error"].get("message"), str):
            return obj["error"]["message"]
    except _JSON_ERRORS:
        pass
    if b"<html" in body[:512].lower() or b"<!doctype" in body[:512].lower():
        return f"HTTP {status} with an HTML page (not Ollama?)"
    return f"HTTP {status}: {_excerpt(body)}" if body.strip() else f"HTTP {status}"


# What a node says about itself, asked over its ssh master with standard tools (no agent):
# nvidia-smi where there is one, else nothing; /proc on Linux.  Run by `sh -c` so a csh or
# fish login shell reads it the same; a missing tool prints nothing and is not an error.
FACTS_COMMAND = ("nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader,nounits "
                 "2>/dev/null; echo @@meminfo; cat /proc/meminfo 2>/dev/null; echo @@loadavg; "
                 "cat /proc/loadavg 2>/dev/null; echo @@nproc; nproc 2>/dev/null; exit 0")


def parse_node_facts(text: str) -> Dict[str, Any]:
    """FACTS_COMMAND's output -> a flat dict of what the node told (bytes, load averages):
    gpu (names, ', '-joined; 'N x NAME' when alike), gpus, vram_total, vram_used (from
    nvidia-smi's MiB), ram_total, ram_available (from /proc/meminfo's kB), load_1m,
    load_5m, load_15m, cpus.  Keys the node could not tell are absent."""
    section, gpus, facts = "gpu", [], {}   # type: str, List[Tuple[str, int, int]], Dict[str, Any]
    mem: Dict[str, int] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("@@"):
            section = line[2:]
            continue
        if not line:
            continue
        if section == "gpu":
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                gpus.append((parts[0], int(parts[1]) << 20, int(parts[2]) << 20))
        elif section == "meminfo":
            m = re.match(r"(\w+):\s+(\d+)\s*kB", line)
            if m:
                mem[m.group(1)] = int(m.group(2)) * 1024
        elif section == "loadavg":
            fields = line.split()
            try:
                facts.update(load_1m=float(fields[0]), load_5m=float(fields[1]), load_15m=float(fields[2]))
            except (IndexError, ValueError):
                pass
        elif section == "nproc" and line.isdigit():
            facts["cpus"] = int(line)
    if gpus:
        names = [g[0] for g in gpus]
        facts["gpu"] = f"{len(names)} x {names[0]}" if len(set(names)) == 1 and len(names) > 1 else ", ".join(names)
        facts.update(gpus=len(gpus), vram_total=sum(g[1] for g in gpus), vram_used=sum(g[2] for g in gpus))
    if "MemTotal" in mem:
        facts["ram_total"] = mem["MemTotal"]
        facts["ram_available"] = mem.get("MemAvailable", mem.get("MemFree", 0))
    return facts


def fits_in_memory(size: Optional[int], facts: Dict[str, Any]) -> bool:
    """Could a node with these facts hold a model of `size` bytes at all?  Ollama splits a
    model between VRAM and RAM, so the bound is the two together; unknown facts or an
    unknown size never rule a node out."""
    memory = (facts.get("vram_total") or 0) + (facts.get("ram_total") or 0)
    return not size or not memory or size <= memory


MAX_JSON_DEPTH = 512     # nesting a request body may have; Go's encoding/json allows 10000,
                         # Python's json gives up near 1000 (and so would encoding it again)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")   # found by its literal "\u": fast
_LOW_SURROGATE_ESCAPE = re.compile(r"\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def _lone_surrogate_escape(text: str) -> bool:
    """Whether JSON text escapes a lone UTF-16 surrogate: a high one not followed by a
    low one, or a low one not after a high one.  A pair ("\\ud83d\\ude00", what Python's
    json.dumps sends for an emoji) is one character and needs no mending.  Each escape
    is found by the regex's literal prefix (a 40 MB body in ~0.02 s; one regex with
    look-arounds for the pairing took 1.6 s), the pairing checked here."""
    paired = -1
    for m in _SURROGATE_ESCAPE.finditer(text):
        start = m.start()
        if start == paired:
            continue        # the low half of the pair just seen
        if text[start + 3] in "89abAB" and _LOW_SURROGATE_ESCAPE.match(text, m.end()):
            paired = m.end()
            continue
        return True
    return False


def _go_json_constant(name: str) -> Any:
    raise ValueError(f"invalid character '{name[0] if name[0] != '-' else name[1]}' looking for beginning of value")


def _go_json_float(text: str) -> float:
    value = float(text)
    if abs(value) == float("inf"):
        raise ValueError(f"json: cannot unmarshal number {text} into Go value of type float64")
    return value


_GO_JSON = json.JSONDecoder(parse_constant=_go_json_constant, parse_float=_go_json_float)   # made once


def decode_json_body(body: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A request body as JSON, read the way Go's encoding/json (Ollama) reads it:
    invalid UTF-8 and lone UTF-16 surrogates (`"\\ud83d"`, what JavaScript emits for
    a cut emoji) become U+FFFD instead of failing.  None for an empty body.  Raises
    ValueError with the message to show for a syntax error or nesting deeper than
    max_depth ("exceeded max depth", as Go says)."""
    return _decode_json(body, max_depth)[0]


def _decode_json(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> Tuple[Any, bool]:
    """decode_json_body, and whether the body was sound as it came: valid UTF-8 with no
    lone surrogate escapes (then the bytes say exactly what the object does)."""
    try:
        text, sound = body.decode("utf-8"), True
    except UnicodeDecodeError:
        text, sound = body.decode("utf-8", "replace"), False
    if not text.strip():
        return None, sound
    try:
        # Go's encoding/json has no NaN/Infinity and refuses a number a float64
        # cannot hold; Python would take both and send the node invalid JSON.
        obj = _GO_JSON.decode(text)
    except RecursionError:
        raise ValueError("exceeded max depth") from None
    except ValueError as exc:
        raise ValueError(f"invalid JSON: {exc}") from None
    fix = _lone_surrogate_escape(text)
    if not fix:
        # Nothing to mend; only the depth to check.  Too few characters to nest that deep
        # (a level takes two), or a walk over the containers shows it - cheap for the usual
        # body, long texts in few containers; failing that within a budget, too few
        # brackets (counting is cheaper for many small containers), else the whole walk.
        if len(text) <= 2 * max_depth:
            return obj, sound
        shallow = _shallow(obj, max_depth, len(text) >> 6)
        if shallow is None:
            shallow = text.count("{") + text.count("[") <= max_depth or _shallow(obj, max_depth)
        if not shallow:
            raise ValueError("exceeded max depth")
        return obj, sound
    # One iterative walk: depth, and lone surrogates replaced where the text had escapes.
    todo = [(obj, 1)]
    while todo:
        value, depth = todo.pop()
        if depth > max_depth:
            raise ValueError("exceeded max depth")
        if isinstance(value, dict):
            if fix:
                for key in [k for k in value if _LONE_SURROGATE.search(k)]:
                    value[_LONE_SURROGATE.sub("\ufffd", key)] = value.pop(key)
            items: Any = value.items()
        elif isinstance(value, list):
            items = enumerate(value)
        else:
            continue
        for key, item in list(items):
            if isinstance(item, (dict, list)):
                todo.append((item, depth + 1))
            elif fix and isinstance(item, str) and _LONE_SURROGATE.search(item):
                value[key] = _LONE_SURROGATE.sub("\ufffd", item)
    if fix and isinstance(obj, str):
        obj = _LONE_SURROGATE.sub("\ufffd", obj)
    return obj, sound and not fix


def _shallow(obj: Any, max_depth: int, budget: Optional[int] = None) -> Optional[bool]:
    """Whether a decoded JSON value nests at most max_depth containers deep, found by
    walking its containers level by level; None when that would take more than
    `budget` values (then counting brackets is the cheaper proof)."""
    level: List[Any] = [obj]
    for _ in range(max_depth):
        deeper: List[Any] = []
        for value in level:
            items = value.values() if type(value) is dict else value if type(value) is list else ()
            if budget is not None:
                budget -= len(items)
                if budget < 0:
                    return None
            deeper += [item for item in items if type(item) is dict or type(item) is list]
        if not deeper:
            return True
        level = deeper
    return False


# The request structs of Ollama's api/types.go, and the fields mesh itself reads.
OLLAMA_REQUEST_TYPES = {
    "/api/generate": "GenerateRequest", "/api/chat": "ChatRequest", "/api/embed": "EmbedRequest",
    "/api/embeddings": "EmbeddingRequest", "/api/show": "ShowRequest", "/api/pull": "PullRequest",
    "/api/create": "CreateRequest", "/api/copy": "CopyRequest", "/api/push": "PushRequest",
    "/api/delete": "DeleteRequest",
    # Ollama's openai/anthropic middleware structs: the same message, the API's error shape
    "/v1/chat/completions": "ChatCompletionRequest", "/v1/completions": "CompletionRequest",
    "/v1/embeddings": "EmbedRequest", "/v1/responses": "ResponsesRequest", "/v1/messages": "MessagesRequest",
}
_OLLAMA_FIELD_TYPES = {"model": str, "name": str, "stream": bool}
# Fields only some structs have, that mesh reads too.
_OLLAMA_STRUCT_FIELD_TYPES = {"CreateRequest": {"from": str}, "CopyRequest": {"source": str, "destination": str}}
_GO_JSON_TYPES = {str: "string", bool: "bool", int: "number", float: "number", list: "array", dict: "object"}
_OLLAMA_STRUCT_FIELDS = {struct: {**_OLLAMA_FIELD_TYPES, **_OLLAMA_STRUCT_FIELD_TYPES.get(struct, {})}
                         for struct in set(OLLAMA_REQUEST_TYPES.values())}   # made once, read per request


def ollama_type_error(payload: Dict[str, Any], struct: str) -> Optional[str]:
    """Go's encoding/json message for a field of the wrong type among those mesh
    reads ("model", "name", "stream"), or None.  null is fine (Go leaves the zero
    value), as Ollama's handlers see it."""
    fields = _OLLAMA_STRUCT_FIELDS.get(struct)
    if fields is None:
        fields = {**_OLLAMA_FIELD_TYPES, **_OLLAMA_STRUCT_FIELD_TYPES.get(struct, {})}
    for field, want in fields.items():
        value = payload.get(field)
        if value is None or type(value) is want:
            continue
        if field == "stream" and struct in ("EmbedRequest", "EmbeddingRequest", "ShowRequest"):
            continue     # these structs have no stream field: Go ignores it
        return (f"json: cannot unmarshal {_GO_JSON_TYPES.get(type(value), 'value')} into Go struct field "
                f"{struct}.{field} of type {_GO_JSON_TYPES[want]}")
    return None


def model_key(name: str) -> str:
    """Ollama treats 'llama3' and 'llama3:latest' as one model."""
    key = _MODEL_KEYS.get(name)
    if key is None:
        key = name.strip()
        if ":" not in key.rsplit("/", 1)[-1]:
            key += ":latest"
        if len(_MODEL_KEYS) < 4096:     # a request asks for a few names again and again (bounded: any
            _MODEL_KEYS[name] = key     # name a client sends is kept, so not every one)
    return key


_MODEL_KEYS: Dict[str, str] = {}


def build_request(path: str, body: Optional[bytes], *, host: str, keep_alive: bool,
                  token: Optional[str] = None, method: Optional[str] = None) -> bytes:
    """One HTTP/1.1 request head (+ body).  The method is POST with a body and GET
    without one unless given (Ollama's /api/delete wants DELETE with a JSON body)."""
    method = method or ("POST" if body is not None else "GET")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "User-Agent: mesh.py/" + __version__,
             "Accept: application/json, application/x-ndjson",
             "Connection: " + ("keep-alive" if keep_alive else "close")]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


# -- HTTP/1.1 request framing for the HTTP front (RFC 9112, as Go's net/http and
# nginx apply it).  Pure: bytes in, a request or an HTTPError out; the server does
# the reading and writing.

HTTP_REASONS = {
    100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    413: "Content Too Large", 417: "Expectation Failed", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"                            # RFC 9110 5.6.2
_TOKEN_RE = re.compile(_TOKEN + r"\Z")
_VERSION_RE = re.compile(r"HTTP/(\d)\.(\d)\Z")
_FIELD_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")          # CTLs other than HTAB
# The common request line and field line, whole (parse_request_head's fast path): a
# token method, a target without spaces or CTLs, HTTP/1.0 or 1.1; a token name, a value
# of no CTL but HTAB (its surrounding blanks stripped after), the line ending in CRLF or LF.
_REQUEST_LINE_RE = re.compile(f"({_TOKEN}) " + r"([^ \x00-\x1f\x7f]+) HTTP/1\.([01])\r?\n")
_FIELD_LINE_RE = re.compile(f"({_TOKEN}):" + r"([^\x00-\x08\x0a-\x1f\x7f]*)\r?\n")
_FIELD_BLOCK_RE = re.compile(f"(?:{_TOKEN}:" + r"[^\x00-\x08\x0a-\x1f\x7f]*\r?\n)*\r?\n\Z")  # all of them, then the end
_HOST_RE = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@%\[\]]*\Z")      # reg-name / IP-literal, port
_ABSOLUTE_RE = re.compile(r"(https?)://([^/?#]*)(.*)\Z", re.I)
_CHUNK_SIZE_RE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;.*)?\Z")  # Go allows 16 hex digits
# A chunk size line's digits, for the fast paths that read it with int(x, 16): int also
# takes "0x1f", "+1f", " 1f" and "1_f", which are not HTTP (bytes.translate(None, ...)
# leaves nothing of a bare hex number).
_HEX_DIGITS = b"0123456789abcdefABCDEF"


class HTTPRequest:
    """One parsed request head, as the HTTP front's handlers see it.

    method: "GET", "POST" ... (case-sensitive, as RFC 9110 says); target: as sent;
    path: percent-decoded path ("/api/tags"; "*" for `OPTIONS *`); query: the raw query
    string without "?"; version: (1, 0) or (1, 1); headers: lowercased name -> value,
    repeated fields joined with ", "; header_list: (lowercased name, value) in order;
    content_length: int or None; chunked: bool (Transfer-Encoding: chunked);
    keep_alive: whether the connection may serve another request afterwards;
    expect_continue: the client waits for `100 Continue` before sending the body;
    params: filled by the router from ":name" segments of the matched route."""

    __slots__ = ("method", "target", "path", "query", "version", "headers", "header_list",
                 "content_length", "chunked", "keep_alive", "expect_continue", "params")

    def __init__(self, method: str, target: str, path: str, query: str, version: Tuple[int, int],
                 header_list: List[Tuple[str, str]]) -> None:
        self.method, self.target, self.path, self.query, self.version = method, target, path, query, version
        self.header_list = header_list
        headers = self.headers = dict(header_list)
        if len(headers) < len(header_list):      # a name repeated: its values joined, in order
            headers.clear()
            for name, value in header_list:
                headers[name] = (headers[name] + ", " + value) if name in headers else value
        self.content_length: Optional[int] = None
        self.chunked = False
        self.keep_alive = False
        self.expect_continue = False
        self.params: Dict[str, str] = {}

    def header(self, name: str, default: str = "") -> str:
        """A header's value by case-insensitive name (repeated fields joined with ", ")."""
        return self.headers.get(name.lower(), default)

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def __repr__(self) -> str:
        return f"<HTTPRequest {self.method} {self.target} HTTP/{self.version[0]}.{self.version[1]}>"


def find_head_end(buf: "bytes | bytearray", start: int = 0) -> int:
    """Where a request head ends in buf (just past its empty line), or -1 if not yet.

    Lines end in LF with an optional CR before it: RFC 9112 section 2.2 lets a
    recipient take a bare LF as a line end, which Go's net/http does - so a
    bare-LF client is answered, never left waiting for a CRLF that won't come."""
    lf = buf.find(b"\n\n", start)           # the empty line is the first LF followed by LF or CRLF
    crlf = buf.find(b"\n\r\n", start, len(buf) if lf < 0 else lf + 2)
    if crlf >= 0:
        return crlf + 3
    return lf + 2 if lf >= 0 else -1


def parse_request_head(head: bytes) -> HTTPRequest:
    """Parse a request head (request line, fields, empty line) as RFC 9112 says.

    Raises HTTPError: 400 for a malformed request line, field line, target, Host,
    Content-Length or Transfer-Encoding (and both framing headers at once, which
    RFC 9112 section 6.3 calls a smuggling attempt); 501 for a transfer coding other
    than chunked; 505 for an HTTP version other than 1.0 and 1.1; 417 for an
    Expect other than 100-continue.  Every one of them closes the connection."""
    text = head.decode("latin-1")
    m = _REQUEST_LINE_RE.match(text)
    fields: List[Tuple[str, str]] = []
    if m:
        # The common head in one pass of two regexes; anything they do not take (and
        # every malformed head) goes through the line-by-line checks below, which give
        # the precise error.
        if _FIELD_BLOCK_RE.match(text, m.end()):
            fields = [(name.lower(), value.strip(" \t")) for name, value in _FIELD_LINE_RE.findall(text, m.end())]
            return _request_from(m.group(1), m.group(2), (1, int(m.group(3))), fields)
    lines = text.split("\n")
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise HTTPError(400, "empty request")
    if any("\r" in ln for ln in lines):
        raise HTTPError(400, "bare CR in the request head")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not all(parts):
        raise HTTPError(400, f"malformed request line {_excerpt(lines[0].encode('latin-1'), 60)}")
    method, target, version_text = parts
    if not _TOKEN_RE.match(method):
        raise HTTPError(400, "malformed method")
    m = _VERSION_RE.match(version_text)
    if not m:
        raise HTTPError(400, f"malformed HTTP version {_excerpt(version_text.encode('latin-1'), 20)}")
    version = (int(m.group(1)), int(m.group(2)))
    if version not in ((1, 0), (1, 1)):
        raise HTTPError(505, f"HTTP version {version[0]}.{version[1]} not supported (HTTP/1.1 is)")
    fields: List[Tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            raise HTTPError(400, "obsolete line folding in a header")   # RFC 9112 5.2
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN_RE.match(name):    # also "Name : v" (RFC 9112 5.1)
            raise HTTPError(400, f"malformed header line {_excerpt(line.encode('latin-1'), 60)}")
        value = value.strip(" \t")
        if _FIELD_VALUE_BAD.search(value):
            raise HTTPError(400, f"control character in header {name}")
        fields.append((name.lower(), value))
    return _request_from(method, target, version, fields)


def _request_from(method: str, target: str, version: Tuple[int, int], fields: List[Tuple[str, str]]) -> HTTPRequest:
    """The checks of parse_request_head on a head already split into its parts."""
    path, query = _parse_target(method, target)
    req = HTTPRequest(method, target, path, query, version, fields)
    hosts = _values(req, fields, "host")
    if len(hosts) > 1:
        raise HTTPError(400, "too many Host headers")
    if version == (1, 1) and not hosts:
        raise HTTPError(400, "missing required Host header")
    if hosts and not _HOST_RE.match(hosts[0]):
        raise HTTPError(400, "malformed Host header")
    _parse_framing(req, fields)
    tokens = {t.strip().lower() for t in req.headers.get("connection", "").split(",")}
    # HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 only when the client asks
    # for it with keep-alive and not also to close (RFC 9112 9.3, 9.6 and appendix C.2.2), as
    # Go's net/http serves it (shouldClose).
    req.keep_alive = "close" not in tokens and (version == (1, 1) or "keep-alive" in tokens)
    expect = req.headers.get("expect", "").lower()
    if expect and version == (1, 1):
        if expect != "100-continue":
            raise HTTPError(417, f"unsupported Expect: {expect}")
        req.expect_continue = req.has_body
    return req


def _values(req: HTTPRequest, fields: List[Tuple[str, str]], name: str) -> List[str]:
    """Every value of a field, in order (one per field line)."""
    if len(req.headers) == len(fields):      # no name repeated: at most one, in the dict
        value = req.headers.get(name)
        return [] if value is None else [value]
    return [v for n, v in fields if n == name]


def _parse_target(method: str, target: str) -> Tuple[str, str]:
    """(path, query) of an origin-form or absolute-form target (RFC 9112 3.2)."""
    if target.startswith("/"):
        raw = target
    elif target == "*" and method == "OPTIONS":
        return "*", ""
    else:
        m = _ABSOLUTE_RE.match(target)
        if not m:
            raise HTTPError(400, f"malformed request target {_excerpt(target.encode('latin-1'), 60)}")
        raw = m.group(3) or "/"
        if not raw.startswith(("/", "?")):
            raise HTTPError(400, "malformed request target")
        if raw.startswith("?"):
            raw = "/" + raw
    raw = raw.split("#", 1)[0]
    path, _, query = raw.partition("?")
    if "%" not in path:
        return path, query
    from urllib.parse import unquote
    return unquote(path), query


def _parse_framing(req: HTTPRequest, fields: List[Tuple[str, str]]) -> None:
    """Content-Length / Transfer-Encoding, strictly: what one server reads as the
    body's end must be what every server on the way reads (RFC 9112 6.1-6.3)."""
    lengths = _values(req, fields, "content-length")
    codings = [c.strip().lower() for v in _values(req, fields, "transfer-encoding") for c in v.split(",")]
    if lengths and codings:
        raise HTTPError(400, "both Content-Length and Transfer-Encoding")
    if len(lengths) > 1:
        raise HTTPError(400, "more than one Content-Length")   # as nginx: even equal ones
    if lengths:
        if not lengths[0].isdigit() or not lengths[0].isascii():
            raise HTTPError(400, f"malformed Content-Length {_excerpt(lengths[0].encode('latin-1'), 30)}")
        req.content_length = int(lengths[0])
    if codings:
        if req.version == (1, 0):
            raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if codings[-1] != "chunked" or codings.count("chunked") != 1 or not all(codings):
            raise HTTPError(400, f"malformed Transfer-Encoding {_excerpt(req.header('transfer-encoding').encode('latin-1'), 40)}")
        if codings != ["chunked"]:
            raise HTTPError(501, f"unsupported transfer coding {codings[0]!r}")
        req.chunked = True


class ChunkedDecoder:
    """An incremental decoder of a chunked request body (RFC 9112 section 7.1).

    feed(data) -> (body bytes decoded, bytes of data used): bytes after the last
    chunk's trailer section belong to the next request and are not used.  `done`
    turns true at the end of the body; `received` counts body bytes so far.
    Raises HTTPError 400 for a malformed chunk size (only 1-16 hex digits, then an
    optional extension: `0x16`, `1_6`, `-2` and empty are refused, as Go's net/http
    refuses them), a missing CRLF after chunk data or an over-long line; 413 as soon
    as a chunk size would take the body past max_body - before its data is read."""

    def __init__(self, *, max_body: int, max_line: int = 4096, max_trailer: int = 65536) -> None:
        self.max_body = max_body
        self.max_line = max_line
        self.max_trailer = max_trailer
        self.received = 0
        self.done = False
        self._state = "size"       # size -> data -> crlf -> size ... -> trailer -> done
        self._line = bytearray()
        self._left = 0             # data bytes left in this chunk / CRLF bytes left after it
        self._trailer = 0

    def feed(self, data: bytes) -> Tuple[bytes, int]:
        out: List[bytes] = []
        pos, end = 0, len(data)
        while pos < end and not self.done:
            if self._state == "data":
                take = min(self._left, end - pos)
                out.append(data[pos:pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    self._state, self._left = "crlf", 2
            elif self._state == "crlf":
                want = b"\r\n"[2 - self._left]
                if data[pos] != want:
                    raise HTTPError(400, "chunk data not followed by CRLF")
                pos += 1
                self._left -= 1
                if not self._left:
                    self._state = "size"
            else:                               # a line: chunk size or trailer field
                nl = data.find(b"\n", pos)
                stop = end if nl < 0 else nl + 1
                self._line += data[pos:stop]
                pos = stop
                limit = self.max_line if self._state == "size" else self.max_trailer - self._trailer
                if len(self._line) > limit:
                    raise HTTPError(400, "chunk size line too long" if self._state == "size"
                                    else "trailer section too large")
                if nl < 0:
                    break
                line = bytes(self._line[:-1]).rstrip(b"\r")
                self._line.clear()
                if self._state == "size":
                    self._size_line(line)
                else:
                    self._trailer += len(line) + 2
                    if not line:
                        self.done = True
        return b"".join(out), pos

    def _size_line(self, line: bytes) -> None:
        m = _CHUNK_SIZE_RE.match(line)
        if not m:
            raise HTTPError(400, f"malformed chunk size {_excerpt(line, 30)}")
        size = int(m.group(1), 16)
        if self.received + size > self.max_body:
            raise HTTPError(413, f"request body larger than {self.max_body} bytes")
        self.received += size
        self._state, self._left = ("data", size) if size else ("trailer", 0)


def body_allowed(method: str, status: int) -> bool:
    """Whether a response carries a body: never to HEAD, never with 1xx, 204 or 304
    (RFC 9110 sections 9.3.2 and 15)."""
    return method != "HEAD" and status >= 200 and status not in (204, 304)


def response_head(status: int, fields: Sequence[Tuple[str, str]] = ()) -> bytes:
    """An HTTP/1.1 status line and header fields, ending in the empty line.  Raises
    ValueError for CR or LF in a field (no response splitting, whatever the value)."""
    lines = [f"{name}: {value}" for name, value in fields]
    text = "\r\n".join(lines)
    if lines and (text.count("\r") != len(lines) - 1 or text.count("\n") != len(lines) - 1):
        for name, value in fields:     # a CR or LF beyond the joins' own: which field has it
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError(f"CR or LF in response header {name!r}")
    head = f"HTTP/1.1 {status} {HTTP_REASONS.get(status, 'Status')}\r\n"
    return (head + text + "\r\n\r\n" if lines else head + "\r\n").encode("latin-1", "replace")


def response_framing(req_version: Tuple[int, int], method: str, status: int, length: Optional[int], *,
                     keep_alive: bool) -> Tuple[List[Tuple[str, str]], bool, bool]:
    """How to frame a response: (framing header fields, chunked, keep_alive).

    length None means a streamed body of unknown length: chunked to HTTP/1.1 clients,
    close-delimited to HTTP/1.0 ones (they don't know chunked).  An HTTP/1.0 connection
    the client asked to keep (keep_alive) is kept only after a body of known length, and
    the response says so with `Connection: keep-alive`, as Go's net/http does.  A HEAD
    response has the headers a GET would have and no body."""
    fields: List[Tuple[str, str]] = []
    chunked = False
    if length is not None:
        if status >= 200 and status not in (204, 304):
            fields.append(("Content-Length", str(length)))
    elif req_version >= (1, 1):
        chunked = body_allowed(method, status)
        fields.append(("Transfer-Encoding", "chunked"))
    else:
        keep_alive = False
    if not keep_alive:
        fields.append(("Connection", "close"))
    elif req_version < (1, 1):
        fields.append(("Connection", "keep-alive"))
    return fields, chunked, keep_alive


def _chunk(data: bytes, *, last: bool = False) -> bytes:
    """`data` as one HTTP/1.1 chunk (RFC 9112 7.1); last=True: the last chunk follows."""
    return b"%x\r\n%s\r\n%s" % (len(data), data, b"0\r\n\r\n" if last else b"")


class ReplyDechunker:
    """A node's chunked reply body taken off as bytes arrive (RFC 9112 section 7.1).

    feed(data) returns the payload bytes complete so far; `done` turns true at the
    last chunk and its trailers, and `rest` then holds whatever came after the body.
    Bad framing raises ProtocolError.  Go's server (Ollama) sends one chunk per line it
    flushes, so a read usually holds many small chunks: whole chunks at a chunk
    boundary are checked and joined with a few bytes-level calls (split, map) instead
    of a Python step per chunk - each piece must be exactly as long as its size line
    says.  Everything else (a chunk cut by the read, data containing CRLF, extensions,
    the last chunk and trailers) goes through ChunkedDecoder, the exact decoder."""

    def __init__(self) -> None:
        self._exact = ChunkedDecoder(max_body=1 << 62)
        self.done = False
        self.rest = b""

    def one_chunk(self, data: bytes) -> Optional[bytes]:
        """The payload when `data` is exactly one whole non-empty chunk starting at a
        chunk boundary (the usual read of a token stream at low concurrency), else None.
        Nothing is consumed: feed() takes it as the same bytes."""
        exact = self._exact
        if self.done or exact._state != "size" or exact._line:
            return None
        nl = data.find(b"\r\n")
        if 0 < nl <= 16 and not data[:nl].translate(None, _HEX_DIGITS):
            size = int(data[:nl], 16)
            if size and len(data) == nl + size + 4 and data.endswith(b"\r\n"):
                return data[nl + 2:nl + 2 + size]
        return None

    def feed(self, data: bytes) -> bytes:
        if self.done:
            self.rest += data
            return b""
        whole = self.one_chunk(data)
        if whole is not None:
            return whole
        exact = self._exact
        out: List[bytes] = []
        buf = data
        while buf:
            if exact._state == "size" and not exact._line:
                buf = self._fast(buf, out)
                if not buf:
                    break
            # The exact decoder takes the bytes up to the end of the chunk it is in (or
            # of the line it is reading), so the next pass starts at a chunk boundary.
            if exact._state == "data":
                take = exact._left + 2
            elif exact._state == "crlf":
                take = exact._left
            else:
                nl = buf.find(b"\n")
                take = len(buf) if nl < 0 else nl + 1
            try:
                piece, used = exact.feed(buf[:take])
            except HTTPError as exc:
                raise ProtocolError(f"bad chunked framing: {exc}") from None
            if piece:
                out.append(piece)
            if exact.done:
                self.done, self.rest = True, buf[used:]
                break
            buf = buf[take:]
        return b"".join(out) if len(out) != 1 else out[0]

    @staticmethod
    def _fast(buf: bytes, out: List[bytes]) -> bytes:
        parts = buf.split(b"\r\n")
        pairs = (len(parts) - 1) // 2
        if pairs == 0:
            return buf
        sizes, datas = parts[0:2 * pairs:2], parts[1:2 * pairs:2]
        if b"".join(sizes).translate(None, _HEX_DIGITS):
            return buf              # not bare hex digits: the exact decoder's to refuse
        try:
            lengths = list(map(int, sizes, itertools.repeat(16)))
        except ValueError:          # an empty size line
            return buf
        if 0 in lengths:                    # the last chunk: its trailers are the exact decoder's
            k = lengths.index(0)
            sizes, datas, lengths = sizes[:k], datas[:k], lengths[:k]
        if not lengths or lengths != list(map(len, datas)):
            return buf
        out.extend(datas)
        return buf[sum(map(len, sizes)) + sum(lengths) + 4 * len(lengths):]


_DONE_TRUE = re.compile(rb'"done"\s*:\s*true')
_SSE_END = re.compile(rb"^data: ?\[DONE\]|^event: ?message_stop", re.M)
_SSE_EVENT_END = re.compile(rb"\r?\n\r?\n")      # the blank line that ends an event, LF or CRLF


WHOLE_DECODE_LIMIT = 1 << 20   # bytes: a whole answer larger than this is not decoded where only its
                               # bytes are passed on (ReplyScanner.final_obj, open_stream(decode=False))


class ReplyScanner:
    """Finds what mesh must know in a streamed reply without decoding every line:
    where it ends, its final line, and lines that are not what Ollama sends.

    feed(payload) returns the bytes to pass on: whole lines (NDJSON) or whole events
    (SSE, `text/event-stream`), exactly as the node sent them, nothing after the end.
    NDJSON ends at the line whose top-level "done" is true (Ollama's routes.go sends
    it last); SSE at `data: [DONE]` (OpenAI) or the `message_stop` event (Anthropic);
    either also at the end of the body (finish()).  Checks run on whole reads with
    bytes-level calls (count, regex search); a line is JSON-decoded only when one of
    them points at it.  After a feed, `error` (str) tells why the reply must end early:
    a line that is not a JSON object, or Ollama's own `{"error": ...}` line (`node_error`
    holds its text).  strict=False (whole replies) skips the shape check."""

    def __init__(self, sse: bool = False, *, strict: bool = True, max_line: int = 64 * 1024 * 1024) -> None:
        self.sse = sse
        self.strict = strict
        self.done = False            # the final line/event was seen: the reply is complete
        self.final: Optional[bytes] = None   # that final line (NDJSON)
        self.error: Optional[str] = None
        self.node_error: Optional[str] = None
        self.lines = 0               # NDJSON lines passed on
        self.extra = 0               # bytes the node sent after the end (ignored)
        self.last = b""              # the last line passed on (NDJSON)
        self.usage = b""             # SSE: the data of the last event with "usage" (token counts)
        self.open = False            # what was passed on ends inside a line/event (finish())
        self._tail = b""
        self._more: List[bytes] = []  # reads after _tail that hold no line end (not yet joined to it)
        self._more_size = 0
        self._max_line = max_line
        self._final_line: Optional[bytes] = None
        self._final_obj: Optional[Dict[str, Any]] = None

    def feed(self, data: bytes) -> bytes:
        if self.done or self.error:
            self.extra += len(data)
            return b""
        if self.token_line(data):
            return data
        if self._tail:
            if not (b"\n\n" in data or b"\r\n\r\n" in data or data[:1] in (b"\n", b"\r")
                    if self.sse else b"\n" in data):
                # A long line (event) goes on: keep the read as it is; copying and searching
                # all that came before on every read would cost the square of its length.
                self._more.append(data)
                self._more_size += len(data)
                if len(self._tail) + self._more_size > self._max_line:
                    self.error = f"a line longer than {self._max_line} bytes"
                return b""
            self._join_more()
        buf = self._tail + data if self._tail else data
        sep = b"\n\n" if self.sse else b"\n"
        cut = buf.rfind(sep)
        if self.sse and cut < 0 and b"\r\n\r\n" in buf:
            sep, cut = b"\r\n\r\n", buf.rfind(b"\r\n\r\n")
        if cut < 0:
            if len(buf) > self._max_line:
                self.error = f"a line longer than {self._max_line} bytes"
            self._tail = buf
            return b""
        cut += len(sep)
        block, self._tail = buf[:cut], buf[cut:]
        return self._sse(block) if self.sse else self._ndjson(block)

    def token_line(self, data: bytes) -> bool:
        """Whether `data` is one whole NDJSON line that is neither the final line nor an
        error, read at a line boundary: a token, the usual read of a stream.  Counted as
        passed on when it is (feed() returns it as it is)."""
        if self._tail or self.sse or self.done or self.error or data[-2:] != b"}\n" or data[:1] != b"{" \
                or data.find(b"\n") != len(data) - 1 or b'"error"' in data or _DONE_TRUE.search(data):
            return False
        self.lines += 1
        self.last = data
        return True

    def whole_object(self, data: bytes) -> bool:
        """Take a whole reply that is one JSON object with "done": true (stream=False's
        usual answer, as Ollama's routes.go writes it) as feed(data) then finish() would,
        decoding it once; False, nothing taken, for anything else (feed it then)."""
        if self.sse or self.lines or self._tail or self.done or self.error:
            return False
        body = data[:-1] if data[-1:] == b"\n" else data
        if body[:1] != b"{" or body[-1:] != b"}" or b"\n" in body or not _DONE_TRUE.search(body):
            return False
        obj = self._decode(body)
        if not isinstance(obj, dict) or obj.get("done") is not True:
            return False
        self.done, self.final, self.last, self.lines = True, data, data, 1
        self._final_line, self._final_obj = data, obj
        self.open = body is data         # no newline at the end: what follows must end the line first
        return True

    def _join_more(self) -> None:
        if self._more:
            self._tail = b"".join([self._tail, *self._more])
            self._more, self._more_size = [], 0

    def finish(self) -> bytes:
        """End of the body: a last line without its newline still counts if it is whole."""
        self._join_more()
        tail, self._tail = self._tail, b""
        if self.done or self.error or not tail.strip():
            return b""
        if self.sse:
            # An event the body ends inside (no blank line after it) is not an event: the
            # SSE spec drops it unread, as every client does; passing it on would glue it
            # to what follows (an error event), and a first event cut off is a failed reply.
            self.extra += len(tail)
            return b""
        out = self._sse(tail) if self.sse else self._ndjson(tail)
        # A whole last line without its newline (or an event without its blank line):
        # whatever is written after it must first end it.
        self.open = bool(out) and not out.endswith((b"\n\n", b"\r\n\r\n") if self.sse else b"\n")
        return out

    def final_obj(self) -> Optional[Dict[str, Any]]:
        """The final line decoded (its statistics: eval_count, eval_duration, ...), or None;
        with no final line, the last line if it is at most WHOLE_DECODE_LIMIT bytes (a
        larger one is a whole answer - embeddings - with no statistics worth decoding it
        for).  Decoded once per line however often it is asked for (the same dict each time)."""
        line = self.final if self.final is not None else \
            (self.last if not self.sse and len(self.last) <= WHOLE_DECODE_LIMIT else None)
        if line is not self._final_line:
            self._final_line, self._final_obj = line, self._obj(line)
        return self._final_obj

    def usage_obj(self) -> Optional[Dict[str, Any]]:
        """SSE: the last event that carried "usage" (OpenAI's chunk with usage, Anthropic's
        message_delta, the Responses API's response.completed) decoded, or None."""
        return self._obj(self.usage)

    @staticmethod
    def _obj(line: Optional[bytes]) -> Optional[Dict[str, Any]]:
        if not line:
            return None
        try:
            obj = json.loads(line)
        except _JSON_ERRORS:
            return None
        return obj if isinstance(obj, dict) else None

    def _sse(self, block: bytes) -> bytes:
        m = _SSE_END.search(block)
        if m is not None:
            blank = _SSE_EVENT_END.search(block, m.end())
            end = len(block) if blank is None else blank.end()
            self.done = True
            self.extra += len(block) - end + len(self._tail)
            self._tail = b""
            block = block[:end]
        at = block.rfind(b'"usage"')
        if at >= 0:   # the token counts come in one of the last events
            start = block.rfind(b"data:", 0, at)
            stop = block.find(b"\n", at)
            if start >= 0:
                self.usage = block[start + 5:len(block) if stop < 0 else stop].strip()
        return block

    def _ndjson(self, block: bytes) -> bytes:
        # One line (a whole answer, often megabytes of embeddings) is checked without a
        # count over all of it: each pass over 16 MB took ~13 ms here.
        one = block.find(b"\n") in (-1, len(block) - 1)
        n = 1 if one else block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
        if self.strict and not (block[:1] == b"{" and (block.rstrip(b"\n")[-1:] == b"}" if one else
                                                       block.count(b"}\n") + (block[-1:] == b"}") == n
                                                       and block.count(b"\n{") == n - 1)):
            block = self._clean(block)      # blank lines, CRLF, or a bad line: line by line
            n = block.count(b"\n")
            one = False
        end = len(block)
        if b'"error"' in block:
            end = self._find_error(block)
        m = _DONE_TRUE.search(block, 0, end)
        while m is not None:
            start = block.rfind(b"\n", 0, m.start()) + 1
            stop = block.find(b"\n", m.end())
            stop = len(block) if stop < 0 else stop + 1
            obj = self._decode(block[start:stop])
            if isinstance(obj, dict) and obj.get("done") is True:
                self.done, self.final = True, block[start:stop]
                self._final_line, self._final_obj = self.final, obj    # final_obj() needs no second decode
                self.extra += len(block) - stop + len(self._tail)
                self._tail = b""
                self.error = self.node_error = None
                end = stop
                break
            m = _DONE_TRUE.search(block, stop, end)
        out = block[:end]
        if out and one:
            self.lines += 1
            self.last = out
        elif out:
            self.lines += out.count(b"\n") + (0 if out.endswith(b"\n") else 1)
            last_nl = out.rfind(b"\n", 0, len(out) - 1)
            self.last = out[last_nl + 1:]
        return out

    def _find_error(self, block: bytes) -> int:
        """Ollama's `{"error": "..."}` line ends a stream: pass on what came before it."""
        pos = 0
        while True:
            i = block.find(b'"error"', pos)
            if i < 0:
                return len(block)
            start = block.rfind(b"\n", 0, i) + 1
            stop = block.find(b"\n", i)
            stop = len(block) if stop < 0 else stop + 1
            obj = self._decode(block[start:stop])
            if isinstance(obj, dict) and "error" in obj and len(obj) <= 2 and obj.get("done") is not True:
                self.node_error = str(obj["error"])
                self.error = f"Ollama error: {self.node_error}"
                return start
            pos = stop

    def _clean(self, block: bytes) -> bytes:
        out = []
        for line in block.split(b"\n"):
            line = line.strip()
            if not line:
                continue
            # Decoded once at most, and not at all when it starts as an object and does not end
            # as one (a reply cut off: decoding 32 MB of it only to fail held serve ~0.5 s)
            braced = line[:1] == b"{" and line[-1:] == b"}"
            obj = self._decode(line) if braced or line[:1] != b"{" else None
            if not isinstance(obj, dict):
                what = "not JSON" if obj is None else "not a JSON object"
                self.error = f"{what}: {_excerpt(line)}"
                break
            out.append(line + b"\n")
        return b"".join(out)

    @staticmethod
    def _decode(line: bytes) -> Any:
        try:
            if line[:1] == b"{":
                # What json.loads(bytes) does for a line that starts so (UTF-8, no BOM to
                # detect), without its encoding detection in Python
                return json.loads(line.decode("utf-8", "surrogatepass"))
            return json.loads(line)
        except _JSON_ERRORS:
            return None


# ---------------------------------------------------------------------------
# API shapes and browser rules (pure): the OpenAI and Anthropic error bodies,
# the lists mesh merges itself, and Ollama's CORS and Host checks.
# ---------------------------------------------------------------------------

def api_family(path: str) -> str:
    """Which API a path belongs to, for the shape of its error bodies:
    "anthropic" for /v1/messages, "openai" for the rest of /v1/, else "ollama"."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    if path.startswith("/v1/"):
        return "openai"
    return "ollama"


# The error type names each API gives a status, as Ollama's openai.NewError and
# anthropic.NewError map them.
_OPENAI_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error"}
_ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                          404: "not_found_error", 429: "rate_limit_error", 503: "overloaded_error",
                          529: "overloaded_error"}


def error_body(family: str, status: int, message: str) -> Dict[str, Any]:
    """The error object each API sends: Ollama `{"error": message}`; OpenAI
    `{"error": {"message", "type", "param", "code"}}` (Ollama's openai/openai.go);
    Anthropic `{"type": "error", "error": {"type", "message"}}` (Ollama's anthropic.go)."""
    if family == "openai":
        return {"error": {"message": message, "type": _OPENAI_ERROR_TYPES.get(status, "api_error"),
                          "param": None, "code": None}}
    if family == "anthropic":
        return {"type": "error", "error": {"type": _ANTHROPIC_ERROR_TYPES.get(status, "api_error"),
                                           "message": message}}
    return {"error": message}


def is_unsupported_reply(status: int, headers: Dict[str, str], body: bytes) -> bool:
    """True for the plain-text `404 page not found` Go's router (gin) sends for a
    path it has no route for: the node's Ollama is too old for this endpoint.  A
    missing model is a JSON 404 instead."""
    return (status in (404, 405) and "json" not in headers.get("content-type", "")
            and body.strip().lower().startswith((b"404 page not found", b"405 method not allowed")))


def _unix_time(stamp: Any) -> int:
    """Seconds since the epoch of an RFC 3339 time as Ollama writes it (0 if unreadable)."""
    import datetime
    if not isinstance(stamp, str) or not stamp:
        return 0
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?$", stamp.strip())
    if not m:
        return 0
    zone = m.group(3) or "Z"
    when = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")
    offset = 0 if zone == "Z" else (1 if zone[0] == "+" else -1) * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return int(when.replace(tzinfo=datetime.timezone.utc).timestamp()) - offset


def _owned_by(name: str) -> str:
    """The namespace of a model name, as Ollama's model.ParseName gives it ("library" by default)."""
    parts = name.split(":", 1)[0].split("/")
    return parts[-2] if len(parts) >= 2 else "library"


def openai_model(entry: Dict[str, Any], name: Optional[str] = None) -> Dict[str, Any]:
    """An /api/tags entry as an OpenAI model object, as Ollama's openai.ToModel builds it."""
    name = name or entry.get("name") or entry.get("model", "")
    return {"id": name, "object": "model", "created": _unix_time(entry.get("modified_at")),
            "owned_by": _owned_by(name)}


def openai_model_list(tags: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """/v1/models from merged /api/tags entries (Ollama's openai.ToListCompletion)."""
    return {"object": "list", "data": [openai_model(m) for m in tags]}


def merge_ps(entries: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Merge per-node /api/ps entries (each with "node") into one entry per model.

    Each entry keeps Ollama's fields (name, model, size, digest, details, expires_at,
    size_vram) from the node whose copy expires last, and adds "nodes": the nodes
    that have it loaded, in configuration order.  Sorted as Ollama sorts /api/ps:
    the longest time left first."""
    merged: Dict[str, Dict[str, Any]] = {}
    for entry in entries:
        key = model_key(entry.get("name") or entry.get("model", ""))
        node = entry.get("node")
        fields = {k: v for k, v in entry.items() if k != "node"}
        have = merged.get(key)
        if have is None:
            merged[key] = dict(fields, nodes=[node] if node else [])
            continue
        if node:
            have["nodes"].append(node)
        if str(fields.get("expires_at", "")) > str(have.get("expires_at", "")):
            merged[key] = dict(fields, nodes=have["nodes"])
    return sorted(merged.values(), key=lambda m: str(m.get("expires_at", "")), reverse=True)


def keep_alive_seconds(value: Any) -> Optional[float]:
    """Ollama's keep_alive as seconds: a number is seconds, a string a Go duration
    ("5m", "1h30m", "0"); None when absent or unreadable."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    units = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d*)?)(ns|us|\u00b5s|ms|s|m|h)", text.lstrip("+-"))
    if not parts or "".join(a + b for a, b in parts) != text.lstrip("+-"):
        return None
    total = sum(float(num) * units[unit] for num, unit in parts)
    return -total if text.startswith("-") else total


def is_unload_request(path: str, payload: Dict[str, Any]) -> bool:
    """Ollama unloads instead of generating when there is no prompt (no messages for
    /api/chat) and keep_alive is under one second (GenerateHandler/ChatHandler:
    int(KeepAlive.Seconds()) == 0)."""
    seconds = keep_alive_seconds(payload.get("keep_alive"))
    if seconds is None or not (-1 < seconds < 1):
        return False
    return not payload.get("messages") if path == "/api/chat" else not payload.get("prompt")


# Origins Ollama allows without OLLAMA_ORIGINS (envconfig.AllowedOrigins): localhost,
# 127.0.0.1 and 0.0.0.0 on any port over http and https, and app shells.
DEFAULT_ORIGINS = tuple(
    f"{scheme}://{host}{port}" for host in ("localhost", "127.0.0.1", "0.0.0.0")
    for scheme in ("http", "https") for port in ("", ":*")
) + ("app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")
# gin-contrib/cors AllowBrowserExtensions, which Ollama turns on.
_EXTENSION_SCHEMES = ("chrome-extension://", "safari-extension://", "moz-extension://",
                      "ms-browser-extension://")
# Request headers a page may send (Ollama's list, plus the Anthropic SDK's and mesh's own).
CORS_ALLOW_HEADERS = ("Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With",
                      "OpenAI-Beta", "x-stainless-lang", "x-stainless-package-version", "x-stainless-os",
                      "x-stainless-arch", "x-stainless-retry-count", "x-stainless-runtime",
                      "x-stainless-runtime-version", "x-stainless-async", "x-stainless-helper-method",
                      "x-stainless-poll-helper", "x-stainless-custom-poll-interval", "x-stainless-timeout",
                      "x-api-key", "anthropic-version", "anthropic-beta",
                      "anthropic-dangerous-direct-browser-access", "X-Mesh-Node")
CORS_ALLOW_METHODS = "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"
CORS_MAX_AGE = 43200   # seconds; gin-contrib/cors' DefaultConfig (12 h)


def allowed_origins(extra: Optional[str] = None) -> List[str]:
    """The origin patterns a browser page may call from: `extra` (OLLAMA_ORIGINS /
    --origins, comma-separated, "*" for any) followed by Ollama's defaults."""
    listed = [o.strip() for o in (extra or "").strip("\"'").split(",") if o.strip()]
    return listed + list(DEFAULT_ORIGINS)


def origin_allowed(origin: str, patterns: Sequence[str]) -> bool:
    """Whether `origin` (the Origin header) matches: exact, "*" for any, or one
    wildcard ("http://localhost:*"), as gin-contrib/cors with AllowWildcard;
    browser extensions always (AllowBrowserExtensions)."""
    origin = origin.strip().lower()
    if origin.startswith(_EXTENSION_SCHEMES):
        return True
    for pattern in patterns:
        pattern = pattern.lower()
        if pattern == "*" or pattern == origin:
            return True
        if "*" in pattern:
            head, _, tail = pattern.partition("*")
            if origin.startswith(head) and origin.endswith(tail) and len(origin) >= len(head) + len(tail):
                return True
    return False


def host_allowed(host_header: str, listen_host: str, *, hostname: Optional[str] = None) -> bool:
    """Ollama's allowedHostsMiddleware for a server bound to loopback: the Host header
    must name this machine (empty, "localhost", *.localhost, *.local, *.internal, the
    machine's hostname, a loopback/private/unspecified IP) or the listen address, so
    a DNS-rebinding page (Host: evil.example) is refused."""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host in ("", "localhost", listen_host.lower()):
        return True         # (the usual Host: answered before the imports below)
    import ipaddress
    import socket
    try:
        ip = ipaddress.ip_address(host)
        return ip.is_loopback or ip.is_private or ip.is_unspecified
    except ValueError:
        pass
    if host == (hostname if hostname is not None else socket.gethostname()).lower():
        return True
    return host.endswith((".localhost", ".local", ".internal"))

# Operations formats (pure): Prometheus metrics, access-log lines.
# ---------------------------------------------------------------------------

# Seconds.  The Prometheus client libraries' default buckets, extended: a cold model
# load or a long answer takes minutes.
METRIC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _prom_float(value: float) -> str:
    """A sample value as the exposition format writes it (Go's ParseFloat reads it back)."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _prom_label(value: str) -> str:
    # the text format escapes exactly these three in label values
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class MetricFamily:
    """One metric name with its HELP, TYPE and labelled samples, in Prometheus' text
    exposition format 0.0.4 (prometheus.io/docs/instrumenting/exposition_formats).

    kind: "counter", "gauge" or "histogram"; labels: the label names in order; a sample
    is keyed by a tuple of label values of that length (ValueError otherwise).
    Histogram buckets are upper bounds in the metric's unit; "+Inf" is added on output."""

    def __init__(self, name: str, kind: str, help_text: str, labels: Sequence[str] = (),
                 buckets: Sequence[float] = METRIC_BUCKETS) -> None:
        if kind not in ("counter", "gauge", "histogram"):
            raise ValueError(f"unknown metric type {kind!r}")
        if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name):
            raise ValueError(f"bad metric name {name!r}")
        self.name, self.kind, self.help, self.labels = name, kind, help_text, tuple(labels)
        self.buckets = tuple(sorted(buckets))
        self.samples: Dict[Tuple[str, ...], Any] = {}
        if not self.labels and kind != "histogram":
            self.samples[()] = 0.0

    def _key(self, values: Sequence[Any]) -> Tuple[str, ...]:
        key = tuple(values)
        try:
            if key in self.samples:
                return key      # a sample's key: checked when it was made (the usual case)
        except TypeError:       # an unhashable value: made a string below
            pass
        for v in key:
            if type(v) is not str:
                key = tuple("" if v is None else str(v) for v in key)
                break
        if len(key) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.labels)} label values expected, got {len(key)}")
        return key

    def inc(self, values: Sequence[Any] = (), amount: float = 1.0) -> None:
        """Add `amount` (>= 0 for a counter) to one sample."""
        if self.kind == "histogram" or (self.kind == "counter" and amount < 0):
            raise ValueError(f"{self.name}: a {self.kind} cannot be increased by {amount}")
        key = self._key(values)
        self.samples[key] = self.samples.get(key, 0.0) + amount

    def set(self, values: Sequence[Any], value: float) -> None:
        """Set a gauge's sample."""
        if self.kind != "gauge":
            raise ValueError(f"{self.name}: only a gauge can be set")
        self.samples[self._key(values)] = float(value)

    def observe(self, values: Sequence[Any], value: float) -> None:
        """Count one observation into a histogram's buckets, sum and count."""
        if self.kind != "histogram":
            raise ValueError(f"{self.name}: only a histogram observes")
        key = self._key(values)
        counts = self.samples.get(key)
        if counts is None:
            counts = self.samples[key] = [[0] * len(self.buckets), 0.0, 0]
        # Counted in the lowest bucket that holds it; render() makes the counts cumulative.
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.buckets):
            counts[0][i] += 1
        counts[1] += value
        counts[2] += 1

    def render(self) -> List[str]:
        """The family's lines: HELP, TYPE, then samples sorted by label values; a
        histogram's buckets are cumulative and end with le="+Inf" equal to _count."""
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        out = [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} {self.kind}"]
        for key in sorted(self.samples):
            pairs = [f'{k}="{_prom_label(v)}"' for k, v in zip(self.labels, key)]
            plain = "{" + ",".join(pairs) + "}" if pairs else ""
            value = self.samples[key]
            if self.kind != "histogram":
                out.append(f"{self.name}{plain} {_prom_float(value)}")
                continue
            per_bucket, total, count = value
            buckets = list(itertools.accumulate(per_bucket))
            for bound, n in list(zip(self.buckets, buckets)) + [(float("inf"), count)]:
                le = "{" + ",".join(pairs + [f'le="{_prom_float(bound)}"']) + "}"
                out.append(f"{self.name}_bucket{le} {n}")
            out.append(f"{self.name}_sum{plain} {_prom_float(total)}")
            out.append(f"{self.name}_count{plain} {count}")
        return out


class MetricsRegistry:
    """Metric families by name, rendered together as one /metrics page."""

    def __init__(self) -> None:
        self.families: Dict[str, MetricFamily] = {}

    def add(self, name: str, kind: str, help_text: str, labels: Sequence[str] = (),
            buckets: Sequence[float] = METRIC_BUCKETS) -> MetricFamily:
        if name in self.families:
            raise ValueError(f"metric {name} registered twice")
        family = self.families[name] = MetricFamily(name, kind, help_text, labels, buckets)
        return family

    def render(self) -> str:
        lines: List[str] = []
        for family in self.families.values():
            lines += family.render()
        return "\n".join(lines) + "\n"


ACCESS_LOG_FORMATS = ("plain", "json", "off")


class AccessRecord:
    """One request to `serve` as the access log and the metrics see it: who asked for
    what, where it went and how long it took - never the prompt or any other body.

    Times: `started` is time.time() (seconds since the epoch), `ttfb` and `duration`
    are seconds after it (time to the first byte of the response head, to the end);
    `first_token` is when the first streamed chunk went out; `tokens` is Ollama's
    eval_count and `eval_duration` its eval_duration (nanoseconds) from the final chunk."""

    __slots__ = ("started", "client", "method", "path", "model", "node", "status", "ttfb", "first_token",
                 "tokens", "eval_duration", "duration", "error", "_t0")

    def __init__(self, client: str, method: str, path: str, *, started: Optional[float] = None) -> None:
        self.started = time.time() if started is None else started
        self._t0 = time.monotonic()
        self.client, self.method, self.path = client, method, path
        self.model: Optional[str] = None
        self.node: Optional[str] = None
        self.status: Optional[int] = None
        self.ttfb: Optional[float] = None
        self.first_token: Optional[float] = None
        self.tokens: Optional[int] = None
        self.eval_duration: Optional[int] = None
        self.duration: Optional[float] = None
        self.error: Optional[str] = None

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def tokens_per_second(self) -> Optional[float]:
        """Ollama's own generation speed for this request (eval_count / eval_duration)."""
        if self.tokens and self.eval_duration:
            return self.tokens / (self.eval_duration / 1e9)
        return None

    def as_dict(self) -> Dict[str, Any]:
        """The JSON access-log object and /mesh/status' `recent` entry (times in ms)."""
        def ms(value: Optional[float]) -> Optional[float]:
            return None if value is None else round(value * 1000, 1)
        rate = self.tokens_per_second()
        return {"time": _iso_time(self.started), "client": self.client, "method": self.method,
                "path": self.path, "model": self.model, "node": self.node, "status": self.status,
                "ttfb_ms": ms(self.ttfb), "ttft_ms": ms(self.first_token), "tokens": self.tokens,
                "tokens_per_s": None if rate is None else round(rate, 1), "duration_ms": ms(self.duration),
                "error": self.error}


_SECOND_TEXT: List[Any] = [None, ""]     # the last whole second _iso_time formatted, and its text


def _iso_time(epoch: float) -> str:
    """RFC 3339 UTC with milliseconds: 2026-01-31T12:00:00.123Z."""
    whole = int(epoch)
    if _SECOND_TEXT[0] != whole:         # one strftime per second, not per access-log line
        _SECOND_TEXT[:] = [whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))]
    return _SECOND_TEXT[1] + ".%03dZ" % int((epoch - whole) * 1000)


_LOG_BARE = re.compile(r"[\w.:/@+-]+\Z")


def _log_value(value: Any) -> str:
    """A logfmt value: bare when it is safe to split on spaces, else a JSON string."""
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        return str(value)            # digits, sign, point, exponent, inf/nan: always bare
    text = str(value)
    if text and _LOG_BARE.match(text):
        return text
    return json.dumps(text, ensure_ascii=True)


def format_access_line(record: AccessRecord, fmt: str = "plain") -> str:
    """One access-log line (no newline).  plain: time, client, method and path, status,
    then key=value fields (logfmt; '-' when unknown), e.g.
    `2026-01-31T12:00:00.123Z 127.0.0.1 POST /api/generate 200 model=llama3:latest node=a
    ttfb_ms=12.5 tokens=42 duration_ms=830.2`; json: the object of AccessRecord.as_dict()."""
    data = record.as_dict()
    if fmt == "json":
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    if fmt != "plain":
        raise ValueError(f"access log format must be one of {', '.join(ACCESS_LOG_FORMATS)}")
    head = [data["time"], _log_value(data["client"]), _log_value(data["method"]), _log_value(data["path"]),
            _log_value(data["status"])]
    fields = [f"{k}={_log_value(data[k])}" for k in ("model", "node", "ttfb_ms", "tokens", "duration_ms")]
    if data["error"]:
        fields.append(f"error={_log_value(data['error'])}")
    return " ".join(head + fields)


# ---------------------------------------------------------------------------
# Routing (pure): the original load score, and routing by expected completion time.
# ---------------------------------------------------------------------------

def load_score(active: int, latency: Optional[float], weight: float, *,
               neutral_latency: float = 0.0) -> float:
    """In-flight requests weigh most, then recent latency (seconds, EWMA); weight
    divides the whole, so a node with weight 3 takes about three times the load.
    A node never measured gets the pool's typical latency, not zero, so it is
    neither favoured nor starved."""
    lat = neutral_latency if latency is None else latency
    return (active * 100.0 + lat * 10.0) / max(weight, 1e-6)


def ewma(previous: Optional[float], sample: float, alpha: float = 0.3) -> float:
    return sample if previous is None else (1 - alpha) * previous + alpha * sample


def closest_names(name: str, names: Sequence[str], limit: int = 3) -> List[str]:
    """The model names most like a misspelt `name` (difflib ratio >= 0.6, best first);
    'llama3' and 'llama3:latest' count as one name, as model_key() says."""
    import difflib
    by_key = {model_key(n): n for n in names}
    base = {k.rsplit(":", 1)[0] if k.endswith(":latest") else k: k for k in by_key}
    wanted = model_key(name)
    wanted = wanted.rsplit(":", 1)[0] if wanted.endswith(":latest") else wanted
    found = difflib.get_close_matches(wanted, list(base), n=limit, cutoff=0.6)
    return [by_key[base[f]] for f in found]


def rank_nodes(nodes: Sequence["SSHNode"], *, model: Optional[str] = None,
               rng: Optional[random.Random] = None) -> List["SSHNode"]:
    """Candidates best first: lowest score, then the one that has the model loaded,
    then a random draw so ties don't always land on the same node."""
    rng = rng or random
    measured = sorted(n.avg_latency for n in nodes if n.avg_latency is not None)
    neutral = measured[len(measured) // 2] if measured else 0.0
    key = model_key(model) if model else None

    def sort_key(n: "SSHNode") -> Tuple[float, int, float]:
        loaded = 0 if key and key in n.loaded_models else 1
        return (round(n.load_score(neutral_latency=neutral), 6), loaded, rng.random())

    return sorted(nodes, key=sort_key)


# Routing by expected completion time (the `mesh` policy).  Everything below is pure:
# the orchestrator reports what happened (dispatched, finished, what /api/ps and the
# node's connection count say) with the time, and asks for a plan.

ROUTING_POLICIES = ("mesh", "score", "least-connections", "round-robin")
# Requests the balancer plans (the rest go by the original score): Ollama's, OpenAI's
# and Anthropic's generation endpoints, and embeddings.
_PLANNED_PATHS = ("/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions", "/v1/messages",
                  "/api/embed", "/api/embeddings", "/v1/embeddings")
CHARS_PER_TOKEN = 4.0        # rough, as the common tokenizers give for English text and code
PRIOR_GEN_TPS = 20.0         # tokens/s for a node never measured (times its weight)
PRIOR_PROMPT_TPS = 400.0     # prompt tokens/s evaluated, same
PRIOR_LOAD_S = 5.0           # seconds to load a model never seen loading
PRIOR_REPLY_TOKENS = 200.0   # tokens a reply has when nothing is known about the model
NEEDED_WINDOW = 120.0        # a model asked for on a node within this many seconds is still needed there
AFFINITY_ENTRIES = 8192      # conversation fingerprints remembered (8 bytes and 3 numbers each)
RESIDENT_ENTRIES = 64        # per node: the sequences we left in its slots, most recent kept
RESIDENT_WINDOW = 600.0      # a conversation quiet this long is no longer protected
PLAN_DEPTH = 256             # waiting requests planned per pass (later ones wait their turn)
LOAD_INTERVAL = 1.0           # seconds between readings of a node's connection count while busy
LOAD_IDLE_STOP = 30.0        # stop reading them after this long with nothing in flight
STREAM_GAP = 1.5             # a connection that sent within this many seconds may be streaming
SLOT_WAIT_MIN = 0.05         # seconds queued inside Ollama that mean "its parallel slots were full"
_GENERATE_BLOCK = 2048       # /api/generate prompts are fingerprinted every this many characters


def _fp(value: Any) -> bytes:
    """A fingerprint's 8 bytes: Python's hash (SipHash-1-3 over a string's characters,
    keyed per process).  Fingerprints live only in this process, and hashing a 75 KB
    conversation this way took ~30 us here where encoding and blake2b took ~170 us."""
    return hash(value).to_bytes(8, "little", signed=True)


def _cut(value: Any, limit: int) -> Any:
    """A JSON value with each string longer than `limit` characters sampled: its first
    `limit`, then every 64th - two images that share their first kilobytes (screenshots
    with the same top bar share ~56 KB of base64) still differ in the sample."""
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + value[limit::64]
    if isinstance(value, dict):
        return {key: _cut(item, limit) for key, item in value.items()}
    if isinstance(value, list):
        return [_cut(item, limit) for item in value]
    return value


def _sample(value: Any, limit: int = 4096) -> str:
    """A JSON value as text for a fingerprint, each long string in it sampled (_cut):
    an image (base64, megabytes) costs a 64th of itself (encoding a 2 MB one whole took
    ~5-9 ms here, before the node write)."""
    return json.dumps(_cut(value, limit), sort_keys=True, ensure_ascii=False)


def _text_of(content: Any) -> str:
    """A message's content as text for its fingerprint: a string as it is; a list of
    content blocks (OpenAI's and Anthropic's) each block's text, other blocks (an
    image) as _sample gives them; anything else as _sample gives it."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        return "\x1d".join([part["text"] if type(part) is dict and part.get("type") == "text"
                             and type(part.get("text")) is str else _sample(part) for part in content])
    return _sample(content)


def prompt_prefixes(path: str, payload: Dict[str, Any]) -> Tuple[List[Tuple[bytes, int]], int]:
    """Fingerprints of the prefixes of a request's prompt that an earlier request may
    have left in one of Ollama's parallel slots, shortest first, as
    [(8-byte fingerprint, estimated tokens through that prefix)], and the request's
    estimated prompt tokens.  Chat (/api/chat, /v1/chat/completions): one per message;
    /api/generate: one for `context` (the token list a previous reply returned), then
    one per 2,048 characters of the prompt.  Fingerprints include the model and path,
    and are this process's own (_fp); no text is kept (Ollama reuses the longest common
    prefix of a slot's last sequence, as its runner's cache does)."""
    messages = payload.get("messages")
    if not isinstance(messages, list) and not payload.get("context"):
        prompt = payload.get("prompt")
        if isinstance(prompt, str) and len(prompt) < _GENERATE_BLOCK:
            # A short generate prompt has no prefix worth a fingerprint: nothing to hash.
            system = payload.get("system")
            chars = len(_text_of(system)) if system else 0
            return [], int((chars + len(prompt)) / CHARS_PER_TOKEN)
    # Each prefix's key is the key before it and what the prefix adds: hash() of the tuple.
    key: Any = hash((model_key(str(payload.get("model") or "")), path))
    chain: List[Tuple[bytes, int]] = []
    chars = 0
    if isinstance(messages, list):
        for msg in messages:
            if not isinstance(msg, dict):
                continue
            text = _text_of(msg.get("content"))
            role = str(msg.get("role", ""))
            extra = msg.get("images") or msg.get("tool_calls")
            key = hash((key, role, text, _sample(extra) if extra else None))
            chars += len(text) + len(role) + 8
            chain.append((_fp(key), int(chars / CHARS_PER_TOKEN)))
        return chain, int(chars / CHARS_PER_TOKEN)
    tokens = 0
    system = payload.get("system")
    if system:
        text = _text_of(system)
        key = hash((key, "system", text))
        chars += len(text)
    context = payload.get("context")
    if isinstance(context, list) and context:
        try:        # Ollama's token list: ints
            key = hash((key, "context", tuple(context)))
        except TypeError:   # something unhashable in it (not Ollama's): its JSON
            key = hash((key, "context", json.dumps(context, sort_keys=True)))
        tokens = len(context)
        chain.append((_fp(key), tokens + int(chars / CHARS_PER_TOKEN)))
    prompt = _text_of(payload.get("prompt"))
    for start in range(0, len(prompt) - _GENERATE_BLOCK + 1, _GENERATE_BLOCK):
        key = hash((key, prompt[start:start + _GENERATE_BLOCK]))
        chain.append((_fp(key), tokens + int((chars + start + _GENERATE_BLOCK) / CHARS_PER_TOKEN)))
    return chain, tokens + int((chars + len(prompt)) / CHARS_PER_TOKEN)


def context_fingerprint(payload: Dict[str, Any], context: List[Any]) -> bytes:
    """The fingerprint a later /api/generate carrying this reply's `context` will have
    as its first prefix (see prompt_prefixes)."""
    return prompt_prefixes("/api/generate", {"model": payload.get("model"), "system": payload.get("system"),
                                             "context": context})[0][0][0]


def count_busy_connections(text: str, port: int) -> Optional[int]:
    """Requests in flight at a node's Ollama, read from its established TCP connections
    to `port`: the output of `ss -Htni state established '( sport = :PORT )'` (a
    connection is busy when it received data after it last sent, or sent within the
    STREAM_GAP seconds - a stream), or failing that /proc/net/tcp{,6} (every established
    connection counts).  None when the text is neither (no ss, no /proc: not Linux)."""
    lines = text.splitlines()
    if any(line.lstrip().startswith("sl ") for line in lines):
        want = f":{port:04X}"
        busy = 0
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[1].endswith(want) and fields[3] == "01":
                busy += 1
        return busy
    busy, seen, conn = 0, False, False
    for line in lines:
        if not line.strip():
            continue
        if not line[0].isspace():          # a connection line; its details follow indented
            fields = line.split()
            if len(fields) < 4 or ":" not in fields[-1]:
                return None
            if conn:
                busy += 1                  # no details line: count it
            conn, seen = True, True
            continue
        if not conn:
            continue
        conn = False
        m_snd = re.search(r"\blastsnd:(\d+)", line)
        m_rcv = re.search(r"\blastrcv:(\d+)", line)
        snd = int(m_snd.group(1)) if m_snd else 1 << 31
        rcv = int(m_rcv.group(1)) if m_rcv else 1 << 31
        if rcv < snd or snd < STREAM_GAP * 1000:
            busy += 1
    if conn:
        busy += 1
    if not seen and text.strip():
        return None
    return busy


class _ModelStats:
    """What one node showed for one model: EWMAs of tokens/s and load seconds."""

    __slots__ = ("gen_tps", "prompt_tps", "load_s")

    def __init__(self) -> None:
        self.gen_tps: Optional[float] = None
        self.prompt_tps: Optional[float] = None
        self.load_s: Optional[float] = None


class NodeRouteState:
    """What routing knows about one node: speeds per model (learned from the
    eval_count/eval_duration, prompt_eval_count/prompt_eval_duration and
    load_duration Ollama reports), parallel slots (set as `num_parallel`, else
    learned: the most requests seen running at once with none queued inside Ollama),
    loaded models (/api/ps and replies), how many models fit at once (learned when a
    load evicted another), our requests in flight and others' (from the node's
    connection count)."""

    def __init__(self, name: str, *, weight: float = 1.0, max_concurrent: int = DEFAULT_MAX_CONCURRENT,
                 num_parallel: Optional[int] = None) -> None:
        self.name = name
        self.weight = weight
        self.max_concurrent = max_concurrent
        self.num_parallel = num_parallel
        self.parallel_ok = 1                 # most at once seen with no wait inside Ollama
        self.parallel_bad: Optional[int] = None   # fewest at once seen making one wait
        self.stats: Dict[str, _ModelStats] = {}
        self.loaded: Dict[str, float] = {}   # model key -> when last used here (monotonic s)
        self.max_loaded: Optional[int] = None
        self.max_seen_loaded = 0
        self.inflight: Dict[int, Tuple[float, float, str]] = {}   # ticket -> (start, expected s, model)
        self.external = 0                    # requests at the node that are not ours
        self.serial = 0                      # requests sent here
        from collections import OrderedDict
        # Sequences we left in its slots, least recent first: fingerprint -> (tokens, when).
        self.resident: "OrderedDict[bytes, Tuple[int, float]]" = OrderedDict()
        self.cache_proven = 1                # slots shown by a cache that outlived others
        self.new_sequences: Dict[int, int] = {}   # ticket -> tokens, for requests in flight that
                                                  # will take a slot from whatever it held

    @property
    def slots(self) -> int:
        """Requests the node runs at once (Ollama's OLLAMA_NUM_PARALLEL)."""
        if self.num_parallel:
            return self.num_parallel
        return max(1, min(max(self.parallel_ok, self.cache_proven), self.max_concurrent))

    def explore_limit(self) -> int:
        """How many requests may be in flight here while learning whether the node runs
        more at once than seen so far: twice as many until one had to wait inside
        Ollama, then up to one below the count that made it wait."""
        if self.num_parallel:
            return self.num_parallel
        cap = self.max_concurrent if self.parallel_bad is None else self.parallel_bad - 1
        return max(self.slots, min(2 * self.slots, cap))

    def busy(self) -> int:
        return len(self.inflight) + self.external

    def resident_rank(self, fp: bytes) -> Optional[int]:
        """How many sequences we sent here since this one (None: not here)."""
        if fp not in self.resident:
            return None
        rank = 0
        for other in reversed(self.resident):
            if other == fp:
                return rank
            rank += 1
        return None

    def model(self, key: str) -> _ModelStats:
        st = self.stats.get(key)
        if st is None:
            st = self.stats[key] = _ModelStats()
        return st

    def set_loaded(self, keys: Sequence[str], now: float) -> None:
        """What /api/ps says is loaded now."""
        self.loaded = {k: self.loaded.get(k, now - NEEDED_WINDOW) for k in keys}
        self.max_seen_loaded = max(self.max_seen_loaded, len(self.loaded))


def _count(value: Any) -> float:
    """A count or duration from a reply as a float; 0.0 for anything else (bool is not a count)."""
    return float(value) if type(value) in (int, float) else 0.0


class RouteRequest:
    """One request as routing sees it: model, estimated prompt tokens, its prefix
    fingerprints, and (once planned) the node, the reason and a ticket."""

    __slots__ = ("model", "tokens", "chain", "max_tokens", "arrived", "candidates", "node", "why",
                 "ticket", "future", "path", "payload", "exclude", "concurrency", "fresh")

    def __init__(self, path: str, payload: Dict[str, Any], *, now: float) -> None:
        self.path, self.payload = path, payload
        self.model = model_key(str(payload.get("model") or ""))
        self.chain, self.tokens = prompt_prefixes(path, payload)
        options = payload.get("options") if isinstance(payload.get("options"), dict) else {}
        limit = options.get("num_predict", payload.get("max_tokens"))
        self.max_tokens = limit if isinstance(limit, int) and limit > 0 else None
        self.arrived = now
        self.candidates: List[str] = []
        self.node: Optional[str] = None
        self.why = ""
        self.ticket = 0
        self.future: Any = None
        self.exclude: set = set()
        self.concurrency = 1
        self.fresh = False


class Balancer:
    """Chooses nodes by the expected time until each request's answer is complete.

    For a waiting request and each candidate node: when one of the node's parallel
    slots frees (its requests in flight - ours, and others' seen in its connection
    count - and the requests planned before this one), plus a model load if the
    model is not loaded there, plus prompt evaluation of the tokens not already in
    one of its slots (conversation affinity), plus generation at the node's speed.
    Requests are planned first come, first served, each on the node where it would
    finish first; a request goes out only when that node has a free slot now, so
    requests wait in mesh, not at a busy node, and none is overtaken for good.
    A node may be sent one request beyond its known slots to learn whether it runs
    more at once.  A model another request still needs is not evicted while another
    node could take the new one.  Pure: no clock, no I/O; times are seconds on the
    caller's monotonic clock."""

    def __init__(self) -> None:
        self.nodes: Dict[str, NodeRouteState] = {}
        self.affinity: "Any" = None
        from collections import OrderedDict
        self.affinity = OrderedDict()      # fingerprint -> (node, tokens, node serial)
        self.reply_tokens: Dict[str, float] = {}
        self._tickets = 0
        # The pool's median rates per (model, attr), and per (node, model, attr) the rate a
        # node not measured for a model is given: they change only when a reply teaches that
        # rate (finished) or the nodes change; kept between plans, not worked out per request.
        self._pool: Dict[Tuple[str, ...], Optional[float]] = {}

    def node(self, name: str, **kw: Any) -> NodeRouteState:
        st = self.nodes.get(name)
        if st is None:
            st = self.nodes[name] = NodeRouteState(name, **kw)
            self._pool.clear()
        return st

    def nodes_changed(self) -> None:
        """Nodes were added to or removed from `nodes`, or their weights changed."""
        self._pool.clear()

    # -- what was learned ------------------------------------------------------
    def _pool_rate(self, key: str, attr: str) -> Optional[float]:
        """The median over measured nodes of a per-weight rate for this model, else any model."""
        for want in (key, None):
            rates = sorted(getattr(st, attr) / max(n.weight, 1e-6)
                           for n in self.nodes.values() for k, st in n.stats.items()
                           if (want is None or k == want) and getattr(st, attr))
            if rates:
                return rates[len(rates) // 2]
        return None

    def rate(self, node: NodeRouteState, key: str, attr: str, prior: float,
             pool: Dict[Tuple[str, ...], Optional[float]]) -> float:
        st = node.stats.get(key)
        if st is not None:
            value = getattr(st, attr)
            if value:
                return value
        # Not measured here for this model: the node's other models, else the pool's.
        # Kept in `pool` until a reply teaches this rate somewhere (finished).
        memo = pool.get((node.name, key, attr))
        if memo is not None:
            return memo
        own = [getattr(s, attr) for s in node.stats.values() if getattr(s, attr)]
        if own:
            result = sum(own) / len(own)
        else:
            if (key, attr) not in pool:
                pool[(key, attr)] = self._pool_rate(key, attr)
            rate = pool[(key, attr)]
            result = (rate if rate else prior) * node.weight
        pool[(node.name, key, attr)] = result
        return result

    def load_seconds(self, node: NodeRouteState, key: str) -> float:
        st = node.stats.get(key)
        if st is not None and st.load_s is not None:
            return st.load_s
        known = [s.load_s for s in node.stats.values() if s.load_s is not None]
        if not known:
            known = [s.load_s for n in self.nodes.values() for s in n.stats.values() if s.load_s is not None]
        return sorted(known)[len(known) // 2] if known else PRIOR_LOAD_S

    def expected_reply(self, req: RouteRequest) -> float:
        avg = self.reply_tokens.get(req.model, PRIOR_REPLY_TOKENS)
        return min(avg, req.max_tokens) if req.max_tokens else avg

    def cached_tokens(self, req: RouteRequest) -> Dict[str, int]:
        """Per node, the prompt tokens one of its slots probably still holds."""
        found: Dict[str, int] = {}
        for fp, _ in reversed(req.chain):
            entry = self.affinity.get(fp)
            if entry is None:
                continue
            name, tokens, _ = entry
            node = self.nodes.get(name)
            if node is None or name in found:
                continue
            # Each other sequence sent there since may have taken its slot (Ollama keeps
            # one sequence per slot); while the slot count is being learned, hope for more.
            rank = node.resident_rank(fp)
            if rank is None or rank >= node.explore_limit():
                continue
            found[name] = min(tokens, req.tokens)
        return found

    def eviction_cost(self, node: NodeRouteState, now: float, prompt_tps: float) -> float:
        """Seconds another conversation would lose if a new sequence took its slot: the
        least recent of our sequences there, when they fill its slots."""
        if len(node.resident) + len(node.new_sequences) < node.slots:
            return 0.0          # (the list below could not fill them either)
        live = [tokens for tokens, when in node.resident.values() if now - when < RESIDENT_WINDOW]
        live += node.new_sequences.values()     # conversations starting there now
        if len(live) < node.slots:
            return 0.0
        return live[-node.slots] / prompt_tps

    # -- events --------------------------------------------------------------
    def dispatched(self, req: RouteRequest, node_name: str, expected: float, now: float) -> int:
        node = self.nodes[node_name]
        self._tickets += 1
        node.inflight[self._tickets] = (now, expected, req.model)
        if req.chain and not any(fp in node.resident for fp, _ in req.chain):
            node.new_sequences[self._tickets] = req.tokens
        node.serial += 1
        node.loaded[req.model] = now
        req.ticket = self._tickets
        return self._tickets

    def finished(self, req: RouteRequest, node_name: str, now: float, reply: Optional[Dict[str, Any]],
                 *, concurrency: int = 1) -> bool:
        """A request ended (reply: the final chunk, None on failure).  Learns speeds,
        loads and slots; remembers the conversation.  True when the reply shows a model
        load (the node may have unloaded another: ask /api/ps)."""
        node = self.nodes.get(node_name)
        if node is None:
            return False
        node.inflight.pop(req.ticket, None)
        node.new_sequences.pop(req.ticket, None)
        if not reply:
            return False

        st = node.model(req.model)
        ev_n, ev_d, pr_n, pr_d, load_d, total = map(_count, (
            reply.get("eval_count"), reply.get("eval_duration"), reply.get("prompt_eval_count"),
            reply.get("prompt_eval_duration"), reply.get("load_duration"), reply.get("total_duration")))
        ev_d, pr_d, load_d, total = ev_d / 1e9, pr_d / 1e9, load_d / 1e9, total / 1e9
        if ev_n >= 1 and ev_d > 0:
            st.gen_tps = ewma(st.gen_tps, ev_n / ev_d, 0.5)
            self.reply_tokens[req.model] = ewma(self.reply_tokens.get(req.model), ev_n, 0.3)
            self._learned("gen_tps")
        if pr_n >= 32 and pr_d > 0:
            st.prompt_tps = ewma(st.prompt_tps, pr_n / pr_d, 0.5)
            self._learned("prompt_tps")
        loaded_now = load_d > 0.1
        if loaded_now:
            st.load_s = ewma(st.load_s, load_d, 0.5)
        node.loaded[req.model] = now
        waited = total - load_d - pr_d - ev_d
        if total > 0 and node.num_parallel is None:
            if waited > max(SLOT_WAIT_MIN, 0.1 * total) and not loaded_now:
                if concurrency > 1:
                    node.parallel_bad = concurrency
                    node.parallel_ok = min(node.parallel_ok, concurrency - 1)
            elif concurrency > node.parallel_ok:
                node.parallel_ok = min(concurrency, node.max_concurrent)
                if node.parallel_bad is not None and node.parallel_bad <= node.parallel_ok:
                    node.parallel_bad = None
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("learned %s %s: %.1f tokens/s, prompt %.0f tokens/s, %d evaluated, load %.2fs, "
                         "queued in Ollama %.2fs with %d at once; runs %d at once", node.name, req.model,
                         st.gen_tps or 0, st.prompt_tps or 0, pr_n, load_d, max(0.0, waited), concurrency,
                         node.slots)
        # The slot this request used held an earlier part of the conversation, if any:
        # a cache that outlived another sequence shows at least two slots.
        for fp, tokens in reversed(req.chain):
            rank = node.resident_rank(fp)
            if rank is not None:
                if rank and pr_n and pr_n < req.tokens - tokens / 2 and node.num_parallel is None:
                    node.cache_proven = 2   # another sequence ran since and this one survived
                del node.resident[fp]
                break
        # Remember where this conversation's sequence now lives: the whole prompt, and
        # the reply after it.
        reply_tokens = int(ev_n)
        context = reply.get("context")
        if isinstance(context, list) and context:
            self._remember(context_fingerprint(req.payload, context), node, len(context), now)
        elif req.chain:
            self._remember(req.chain[-1][0], node, req.tokens + reply_tokens, now)
        return loaded_now

    def _learned(self, attr: str) -> None:
        """A rate was measured: what rate() worked out from the others for it is stale."""
        if self._pool:
            self._pool = {k: v for k, v in self._pool.items() if k[-1] != attr}

    def _remember(self, fp: bytes, node: NodeRouteState, tokens: int, now: float) -> None:
        self.affinity[fp] = (node.name, tokens, node.serial)
        self.affinity.move_to_end(fp)
        while len(self.affinity) > AFFINITY_ENTRIES:
            self.affinity.popitem(last=False)
        node.resident[fp] = (tokens, now)
        node.resident.move_to_end(fp)
        while len(node.resident) > RESIDENT_ENTRIES:
            node.resident.popitem(last=False)

    def evicted(self, node_name: str, loaded: Sequence[str], now: float) -> None:
        """/api/ps after a load: if a model went away, the node holds only this many."""
        node = self.nodes[node_name]
        before = set(node.loaded)
        node.set_loaded(loaded, now)
        if before - set(loaded) and loaded:
            node.max_loaded = len(loaded)

    # -- the plan ------------------------------------------------------------
    def plan(self, waiting: Sequence[RouteRequest], now: float, *, explain: bool = False,
             rng: Optional[random.Random] = None) -> List[Tuple[RouteRequest, str, float, str]]:
        """Which waiting requests go out now: [(request, node, expected seconds, why)].
        `waiting` is in arrival order; each request's `candidates` are the node names
        that may take it.  With explain, `why` lists every candidate's estimate."""
        rng = rng or random
        if len(waiting) == 1 and not explain:
            lone = self._plan_lone(waiting[0], now, rng)
            if lone is not None:
                return lone
        out: List[Tuple[RouteRequest, str, float, str]] = []
        slots: Dict[str, List[float]] = {}
        free_now = 0
        depth = min(len(waiting), PLAN_DEPTH)
        for node in self.nodes.values():
            if node.slots - len(node.inflight) - node.external >= depth:
                slots[node.name] = [now] * depth    # _slot_times' usual answer, without the call
                free_now += depth
                continue
            heap = self._slot_times(node, now, depth)
            slots[node.name] = heap
            free_now += bisect.bisect_right(heap, now)      # (the list is sorted)
        sent: Dict[str, int] = {}
        planned_loads: Dict[str, set] = {}
        pool, nodes = self._pool, self.nodes
        batch = waiting[:PLAN_DEPTH]
        needed_models = {batch[0].model} if len(batch) == 1 else {r.model for r in batch}
        for req in batch:
            if free_now <= 0 and not self._explorable(req, sent):
                break
            cached = self.cached_tokens(req) if req.chain else {}
            reply = self.expected_reply(req)
            placement = self._placement(req, now, needed_models, planned_loads)
            best: Optional[Tuple[float, str, float, float, str]] = None
            rows = []
            names = req.candidates
            if len(names) > 1:   # equal estimates: a random one, so fresh processes don't all pick the same
                k = rng.randrange(len(names))
                names = names[k:] + names[:k]
            model, tokens = req.model, req.tokens
            for name in names:
                node = nodes.get(name)
                if node is None:
                    continue
                where = placement.get(name, "loaded")
                if where == "forbidden":
                    if explain:
                        rows.append(f"{name}=no (would unload a model still needed)")
                    continue
                start = slots[name][0]
                if start < now:
                    start = now
                load = 0.0 if where == "loaded" else self.load_seconds(node, model)
                have = cached.get(name, 0) if cached else 0
                prompt, gen, evict = self._estimate(node, model, tokens - have, not have, reply, now, pool)
                finish = start - now + load + prompt + gen + evict
                if explain:
                    rows.append(f"{name}={finish:.2f}s(wait {start - now:.2f} load {load:.2f} "
                                f"prompt {prompt:.2f}{' cached ' + str(have) if have else ''} gen {gen:.2f}"
                                f"{' evicts %.2f' % evict if evict else ''})")
                if best is None or finish < best[0] - 1e-9:
                    best = (finish, name, start, finish - evict - (start - now), where)
            if best is None:
                continue
            finish, name, start, service, where = best
            node = self.nodes[name]
            go = start <= now + 1e-6
            why = "free slot, earliest completion"
            if not go and req.model in node.stats \
                    and node.busy() + sent.get(name, 0) < node.explore_limit():
                # The node would be the earliest even if it runs this after its current
                # requests: sending it now costs nothing and shows whether it runs more at once.
                go, why = True, f"earliest completion; trying more than {node.slots} at once"
                heapq.heapreplace(slots[name], start + service)
            elif go:
                heapq.heapreplace(slots[name], now + service)
                free_now -= 1
            else:
                heapq.heapreplace(slots[name], start + service)
            if where != "loaded":
                planned_loads.setdefault(name, set()).add(req.model)
                why += f"; loads {req.model}" + (" (unloading an idle model)" if where == "evict" else "")
            if cached.get(name):
                why += f"; {cached[name]} prompt tokens cached there"
            if explain:
                why += " | " + " ".join(rows)
            if go:
                sent[name] = sent.get(name, 0) + 1
                out.append((req, name, finish, why))
        return out

    def _estimate(self, node: NodeRouteState, model: str, uncached: int, fresh: bool, reply: float,
                  now: float, pool: Dict[Tuple[str, ...], Optional[float]]) -> Tuple[float, float, float]:
        """Seconds of (prompt evaluation, generation, the cache taken from another
        conversation) for a request on `node` once it has a slot: `uncached` prompt
        tokens to evaluate, `reply` tokens to generate; fresh: none of its prompt is
        cached there, so it takes a slot another sequence may still need."""
        st = node.stats.get(model)     # measured here: the rates as they are (rate() else)
        ptps = (st.prompt_tps if st is not None and st.prompt_tps
                else self.rate(node, model, "prompt_tps", PRIOR_PROMPT_TPS, pool))
        gtps = (st.gen_tps if st is not None and st.gen_tps
                else self.rate(node, model, "gen_tps", PRIOR_GEN_TPS, pool))
        # Taking a slot from another conversation costs it its cache: count that too.
        evict = self.eviction_cost(node, now, ptps) if fresh and node.resident else 0.0
        return (uncached if uncached > 1 else 1) / ptps, reply / gtps, evict

    def _plan_lone(self, req: RouteRequest, now: float,
                   rng: Any) -> Optional[List[Tuple[RouteRequest, str, float, str]]]:
        """plan() for one waiting request when every candidate has a slot free now and
        the model loaded - mesh not saturated, the usual case: the same estimates and
        choice, without a batch's slot heaps and placements.  None otherwise (plan
        works it out in full)."""
        nodes, model = self.nodes, req.model
        names = req.candidates
        for name in names:
            node = nodes.get(name)
            if node is None or model not in node.loaded or node.slots - len(node.inflight) - node.external < 1:
                return None
        if not names:
            return None
        cached = self.cached_tokens(req) if req.chain else {}
        reply = self.expected_reply(req)
        if len(names) > 1:   # (as plan: equal estimates go to a random one)
            k = rng.randrange(len(names))
            names = names[k:] + names[:k]
        pool, tokens = self._pool, req.tokens
        best, best_name = 0.0, ""
        for name in names:
            have = cached.get(name, 0) if cached else 0
            prompt, gen, evict = self._estimate(nodes[name], model, tokens - have, not have, reply, now, pool)
            finish = prompt + gen + evict
            if not best_name or finish < best - 1e-9:
                best, best_name = finish, name
        why = "free slot, earliest completion"
        if cached.get(best_name):
            why += f"; {cached[best_name]} prompt tokens cached there"
        return [(req, best_name, best, why)]

    def _explorable(self, req: RouteRequest, sent: Dict[str, int]) -> bool:
        return any(self.nodes[n].busy() + sent.get(n, 0) < self.nodes[n].explore_limit()
                   for n in req.candidates if n in self.nodes)

    def _slot_times(self, node: NodeRouteState, now: float, limit: Optional[int] = None) -> List[float]:
        """When each of the node's slots is next free for a new request (a heap); with
        `limit`, only the soonest `limit` of them (planning k requests takes at most k
        slots of a node: with num_parallel=1000 the whole list cost ~1 ms a request)."""
        n = node.slots
        if limit is not None and n - len(node.inflight) - node.external >= limit:
            return [now] * limit      # enough slots free: nothing in flight decides (the common case)
        ends = []
        for start, expected, _ in node.inflight.values():
            end = start + expected
            if end <= now:   # overdue: it has taken longer than expected, so expect a bit more
                end = now + max(0.25 * (now - start), 0.01)
            ends.append(end)
        if node.external:
            typical = min((1.0 / s.gen_tps * self.reply_tokens.get(k, PRIOR_REPLY_TOKENS)
                           for k, s in node.stats.items() if s.gen_tps), default=1.0)
            ends += [now + typical / 2] * node.external
        ends.sort()
        free = max(0, n - len(ends))
        if limit is not None:
            free = min(free, limit)
            return [now] * free + ends[max(0, len(ends) - n):][:max(0, limit - free)]
        return [now] * free + ends[max(0, len(ends) - n):]   # sorted, so already a heap

    def _placement(self, req: RouteRequest, now: float, needed: set,
                   planned: Dict[str, set]) -> Dict[str, str]:
        """Per candidate: "loaded", "room" (loads without unloading), "evict" (unloads a
        model nobody needs) or "forbidden" (would unload one still needed while another
        node can take the request without that)."""
        out: Dict[str, str] = {}
        if not planned:     # the usual case: every candidate has the model loaded (absent: "loaded")
            for name in req.candidates:
                node = self.nodes.get(name)
                if node is not None and req.model not in node.loaded:
                    break
            else:
                return out
        harmless = False
        for name in req.candidates:
            node = self.nodes.get(name)
            if node is None:
                continue
            extra = planned.get(name)
            if req.model in node.loaded or (extra and req.model in extra):
                out[name] = "loaded"
            else:
                held = set(node.loaded) | (extra or set())
                cap = node.max_loaded or max(1, node.max_seen_loaded)
                if len(held) < cap:
                    out[name] = "room"
                else:
                    victim = min(held, key=lambda k: node.loaded.get(k, now))
                    in_use = any(m == victim for _, _, m in node.inflight.values())
                    wanted = victim in needed or now - node.loaded.get(victim, now) < NEEDED_WINDOW
                    out[name] = "needed" if (in_use or wanted) else "evict"
            harmless = harmless or out[name] != "needed"
        for name, where in out.items():
            if where == "needed":
                out[name] = "forbidden" if harmless else "evict"
        return out


# ---------------------------------------------------------------------------
# Transport: the only place that spawns ssh or opens sockets to nodes.
# ---------------------------------------------------------------------------

# Options mesh.py gives every ssh call that connects.  They come first on the command
# line, so they win over the user's config (ssh takes the first value); everything
# else there (ProxyJump, keys, host key checking) stays as the user set it.
#   ClearAllForwardings  the user's LocalForward/RemoteForward are not opened by mesh
#   RemoteCommand, RequestTTY, StdinNull  made for interactive use; they break `-W`
#                        and `ssh NODE curl` (an empty request body, a shell, a tty);
#                        calls that run a command add SessionType=default (SESSION_OPTION:
#                        ssh refuses it beside -N)
#   LogLevel=INFO        ssh's default: its messages name why it failed, and the
#                        master's log tells a refused forward; QUIET/ERROR hide both
#   PermitLocalCommand, ForwardAgent, ForwardX11  nothing mesh asked for
# setup-ssh-mesh.sh checks nodes with the same list (a test keeps them equal).
SESSION_OPTION = "SessionType=default"
SSH_OPTIONS = ("BatchMode=yes", "ClearAllForwardings=yes", "RemoteCommand=none", "RequestTTY=no",
               "StdinNull=no", "LogLevel=INFO", "PermitLocalCommand=no", "ForwardAgent=no", "ForwardX11=no")


def ssh_quote(path: str) -> str:
    """A path as one ssh_config argument that ssh does not %-expand: spaces and
    quotes survive ssh's argv_split, '%' is doubled (ssh_config(5) TOKENS)."""
    return '"' + path.replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"') + '"'


def _private_dir(path: str, *, create: bool) -> Optional[str]:
    """Why `path` is not a directory provably ours (None when it is): not a symlink,
    a directory, owned by us, mode 0700.  With `create` it is made (0700) when
    missing.  The mode of a directory we did not just create is never changed."""
    import stat
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            return f"cannot create it ({exc.strerror})"
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot use it ({exc.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "it is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if st.st_uid != os.getuid():
        return f"it is owned by uid {st.st_uid}, not by you"
    if st.st_mode & 0o077:
        return f"its mode is {stat.S_IMODE(st.st_mode):04o}, not 0700"
    return None


def _unsafe_ancestry(path: str) -> Optional[str]:
    """Why another user could swap `path` (a directory, symlinks resolved) for one of
    their own, or None: every directory from / down to it must be owned by root or by
    us, and one that others may write to must be sticky (like /tmp), as OpenSSH's
    safe_path() holds ~/.ssh's parents (it allows no writable ones; /tmp must pass).
    The owner of a directory may rename anything in it, sticky or not; the owner of a
    symlink on the way may re-point it, so the path as given is checked as well."""
    import stat
    uid = os.getuid()
    for walk in dict.fromkeys((os.path.abspath(path), os.path.realpath(path))):
        here = "/"
        for part in [""] + [p for p in walk.split("/") if p]:
            here = os.path.join(here, part) if part else here
            try:
                st = os.lstat(here)
            except OSError as exc:
                return f"{here}: {exc.strerror}"
            if st.st_uid not in (0, uid):
                return f"{here} is owned by uid {st.st_uid}, who could replace what mesh keeps in it"
            if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX and not stat.S_ISLNK(st.st_mode):
                return (f"{here} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}, "
                        "not sticky), who could replace what mesh keeps in it")
    return None


def control_dir() -> str:
    """A short directory for control sockets that is provably ours (see _private_dir),
    checked on every call.  MESH_CONTROL_DIR (which may be shared, like /tmp) gets a
    private subdirectory `mesh-UID`; else $XDG_RUNTIME_DIR/mesh, ~/.ssh/mesh, or
    /tmp/mesh-UID, the first that is ours.  Raises MeshError naming the directory.

    A master binds ControlPath plus 17 characters, and a UNIX socket path may hold
    about 104 bytes (90 safely), so the directory must stay short."""
    uid = os.getuid()
    env = os.environ.get("MESH_CONTROL_DIR")
    if env:
        base = os.path.abspath(os.path.expanduser(env))
        if not os.path.isdir(base):
            try:
                os.makedirs(base, 0o700)
            except OSError as exc:
                raise MeshError(f"MESH_CONTROL_DIR={env}: cannot create it ({exc.strerror})") from None
        # Both the path as given (another user's symlink on it would send mesh wherever
        # they like) and the resolved one, which is what ssh is handed.
        why = _unsafe_ancestry(base)
        if why:
            raise MeshError(f"MESH_CONTROL_DIR={env} is not safe for SSH control sockets: {why}")
        path = os.path.join(os.path.realpath(base), f"mesh-{uid}")
        why = _private_dir(path, create=True)
        if why:
            raise MeshError(f"MESH_CONTROL_DIR: {path} is not safe for SSH control sockets: {why}")
        return path
    candidates = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        candidates.append(os.path.join(runtime, "mesh"))
    candidates += [os.path.join(_home_dir(), ".ssh", "mesh"), f"/tmp/mesh-{uid}"]
    reasons = []
    for path in candidates:
        if len(path) > 60:
            continue
        why = _unsafe_ancestry(os.path.dirname(path)) or _private_dir(
            path, create=os.path.isdir(os.path.dirname(path)))
        if why is None:
            return path
        reasons.append(f"{path}: {why}")
    raise MeshError("no private directory for SSH control sockets (" + "; ".join(reasons)
                    + "); set MESH_CONTROL_DIR to a short directory of yours")


def list_masters(directory: str) -> List[Dict[str, Any]]:
    """mesh's ssh masters in a control directory: [{node, since (epoch s), transport,
    socket, alive, ollama, config}], oldest first.  `node` and `since` come from the
    CTL.json that SSHTransport writes when it starts a master (else the socket's time
    and "?"); `alive` is whether anything answers on the socket; `transport` is
    "forward" when the master's forward socket answers, else what was recorded."""
    import socket
    import stat

    def answers(path: str) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            return True
        except OSError:
            return False
        finally:
            probe.close()

    out = []
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return []
    for entry in entries:
        path = os.path.join(directory, entry)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if "." in entry or not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
            continue
        meta: Dict[str, Any] = {}
        try:
            with open(path + ".json") as fh:
                meta = json.load(fh)
        except (OSError, ValueError):
            pass
        forward = os.path.exists(path + ".f") and answers(path + ".f")
        recorded = meta.get("transport") or "?"
        out.append({"node": meta.get("node") or "?", "since": meta.get("started") or st.st_mtime,
                    "transport": "forward" if forward else "stdio" if recorded == "forward" else recorded,
                    "socket": path, "alive": answers(path), "ollama": meta.get("ollama"),
                    "config": meta.get("config")})
    return sorted(out, key=lambda m: m["since"])


async def stop_master(path: str, *, ssh: str = "ssh", timeout: float = 10.0) -> None:
    """End the master on control socket `path` (`ssh -O exit`) and remove what mesh keeps
    beside it (forward socket, log, CTL.json, the TCP_NODELAY marker, the alias's
    pointer to it).  -F none: no user config can redirect it."""
    try:
        await run_command([_which(ssh), "-F", "none", "-o", f"ControlPath={ssh_quote(path)}", "-O", "exit", "mesh-master"],
                          timeout=timeout)
    except (asyncio.TimeoutError, OSError):
        pass
    try:   # the alias's ALIAS.cur (SSHTransport._retire_superseded), if it names this master
        with open(path + ".json") as fh:
            current = os.path.join(os.path.dirname(path), str(json.load(fh).get("alias")) + ".cur")
        with open(current) as fh:
            if fh.read().strip() == os.path.basename(path):
                os.unlink(current)
    except (OSError, ValueError, AttributeError):
        pass
    for extra in ("", ".f", ".log", ".json", ".n"):
        try:
            os.unlink(path + extra)
        except OSError:
            pass


_SSH_FAILURES = (
    # before "Permission denied" and "Connection closed": ssh says those too, after this
    ("Too many authentication failures", "too many authentication failures (ssh offered more keys than "
     "the server allows before the right one; give the node its key with IdentityFile, listed first, "
     "and IdentitiesOnly yes)"),
    ("Permission denied", "authentication failed (permission denied)"),
    ("Host key verification failed", "host key verification failed (unknown or changed host key)"),
    ("REMOTE HOST IDENTIFICATION HAS CHANGED", "host key changed"),
    ("Connection refused", "connection refused"),
    ("Connection timed out", "connection timed out"),
    ("timed out", "connection timed out"),
    ("Could not resolve hostname", "could not resolve hostname"),
    ("No route to host", "no route to host"),
    ("Network is unreachable", "network unreachable"),
    ("Connection closed by", "connection closed by the server"),
    ("Connection reset", "connection reset"),
    ("too long for Unix domain socket", "control socket path too long"),
)


def describe_ssh_failure(stderr: str, rc: Optional[int] = None) -> str:
    """One line saying why ssh failed, from what it printed."""
    for needle, meaning in _SSH_FAILURES:
        if needle.lower() in stderr.lower():
            return "ssh: " + meaning
    lines = [ln.strip() for ln in stderr.splitlines()
             if ln.strip() and not ln.startswith(("Warning: Permanently added", "Pseudo-terminal"))]
    if lines:
        return "ssh: " + lines[-1][:200]
    return f"ssh exited with status {rc}" if rc is not None else "ssh failed"


async def _kill(proc: "asyncio.subprocess.Process") -> None:
    """End a child we started and reap it (no zombies, no orphans).  Its pipes are closed
    too: an ssh that ran a session through a ControlMaster handed its stdio to the master,
    which holds them until that session ends, and asyncio's wait() waits for the pipes as
    well as the exit (base_subprocess: waiters wake on connection_lost)."""
    if proc.returncode is None:
        try:
            # The child's whole process group (spawn made one): ssh and its ProxyCommand.
            # A master that got as far as going to the background (ssh -f) has left the
            # group by then (daemon(3) starts a session), so a live master is never hit.
            os.killpg(proc.pid, _SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                proc.kill()
            except ProcessLookupError:
                pass
    transport = getattr(proc, "_transport", None)   # asyncio.subprocess.Process keeps it there
    if transport is not None:
        for fd in (0, 1, 2):
            pipe = transport.get_pipe_transport(fd)
            if pipe is not None:
                pipe.close()
    try:
        await asyncio.wait_for(proc.wait(), 5)
    except asyncio.TimeoutError:  # pragma: no cover - a kill always lands
        logger.warning("ssh child %s did not exit after SIGKILL", proc.pid)


_SIGKILL = 9   # signal.SIGKILL on every POSIX system; saves importing signal here


def start_rank(knock: Optional[str], failed_lately: bool) -> Optional[int]:
    """Where a node's master start queues (_StartGate): 0 first, 1, 2 last; None: start
    no ssh at all, the node is down.

    knock: what a plain TCP connect to the node's ssh port found (SSHTransport.knock):
    "answered", "refused", "silent" (no answer within the connect timeout), or None when
    the node was not knocked (a small pool; ProxyJump/ProxyCommand; an address only ssh
    knows; a connect that failed otherwise).  failed_lately: the node's last master start
    failed (its `.down` mark)."""
    if knock in ("refused", "silent"):
        # ssh would say "Connection refused", or "Connection timed out" after the same
        # ConnectTimeout (shared by the addresses, as the knock's), after spending a process
        # on it - and a silent node started last made `test`, `list` and `ps` wait two
        # connect timeouts for it
        return None
    if knock == "answered":
        # something listens there: most likely a live sshd - unless its last start failed
        # there (a hung machine whose kernel still completes handshakes, a firewall that
        # answers for everything): those go after the ones with no such mark, or 150 of
        # them listed first held every slot for a connect timeout on every run
        return 1 if failed_lately else 0
    if failed_lately:
        return 2
    return 1


def _knock_budget(knocks: int, soft: Optional[int], hard: Optional[int],
                 limit: int = MAX_MASTER_STARTS) -> Tuple[Optional[int], int]:
    """(soft open-files limit to set, knocks in flight at once) for `knocks` nodes to knock
    on, given the process's soft and hard RLIMIT_NOFILE (None: unlimited) and the master
    starts at once (`limit`).  Knocks take at most a quarter of the soft limit (the rest is
    for ssh's pipes, the nodes' connections and serve's clients); the soft limit is raised,
    never past the hard one, so that every node can be knocked at once - as Go's runtime
    raises it to the hard limit at start - but only as far as that needs."""
    want = 4 * knocks + 1024
    if soft is not None and soft < want:
        soft = want if hard is None else max(soft, min(hard, want))
    quarter = (1 << 16) if soft is None else soft // 4
    return soft, max(limit, quarter)


class _StartGate:
    """At most `limit` ssh masters connecting at once; shared by the nodes of one
    orchestrator.  With hundreds of nodes, many of them dead, a start for each at once
    is a fork storm that slows the live ones too (and every ssh waits out its
    ConnectTimeout on a dead one).  Waiting starts go by rank (start_rank), then first
    come first served: a node whose ssh port answered a knock goes first, one whose last
    start failed (a mark in the control directory, from this or an earlier run) goes
    later, and one whose port refused or stayed silent does not start at all, so the live
    nodes are reached first even when hundreds of dead ones come before them in the
    config.  A quarter of the slots is kept free of each rank for the ranks before it
    (_cap).  `peak` is the most seen at once.

    Knocks happen only when the pool has more ssh nodes (`pool`) than `limit`: a small
    pool never waits, and never costs its nodes a knock.  A pool where no node can be
    knocked on (all behind ProxyJump) keeps every slot for its own starts."""

    def __init__(self, limit: int = MAX_MASTER_STARTS) -> None:
        self.limit = limit
        self.pool = 0                   # ssh nodes of the orchestrator (it sets this),
        self.knockable = 0              # and how many of them can be knocked on
        self.starting = 0
        self.peak = 0
        self._waiting: List[Tuple[int, int, Any]] = []   # heap: (rank, arrival, future)
        self._arrivals = itertools.count()
        self._knock_slots: Optional[asyncio.Semaphore] = None
        self._slots_sized_for = 0       # the knockable count the slots were made for,
        self._slots_made = 0            # and how many they are

    @property
    def knocks(self) -> bool:
        """More nodes than starts at once, some with an address to knock on: knock
        before starting (start_rank)."""
        return self.pool > self.limit and self.knockable > 0

    def knock_slots(self) -> "asyncio.Semaphore":
        """Knocks in flight at once: each holds a socket (a file descriptor) for up to the
        connect timeout.  The soft open-files limit is raised first when the hard one
        allows (_knock_budget): with the common default of 1024, a quarter of it let 256
        silent nodes listed first hold every knock for the whole connect timeout while
        the live ones listed after them waited.  A pool that grows (serve's config
        reload) gets more slots, and the limit raised again."""
        if self._knock_slots is None or self.knockable > self._slots_sized_for:
            self._slots_sized_for = self.knockable
            slots = self._slots_for_knocks()
            if self._knock_slots is None:
                self._knock_slots = asyncio.Semaphore(slots)
                self._slots_made = slots
            while self._slots_made < slots:     # a Semaphore's counter grows by release()
                self._knock_slots.release()
                self._slots_made += 1
        return self._knock_slots

    def _slots_for_knocks(self) -> int:
        try:
            import resource
            unlimited = resource.RLIM_INFINITY
            soft, hard = (None if v == unlimited else v
                          for v in resource.getrlimit(resource.RLIMIT_NOFILE))
            raised, slots = _knock_budget(self.knockable, soft, hard, self.limit)
            if raised != soft:
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (raised, unlimited if hard is None else hard))
                except (OSError, ValueError):   # e.g. macOS caps it below RLIM_INFINITY
                    _, slots = _knock_budget(self.knockable, soft, soft, self.limit)
                else:
                    logger.debug("open files limit raised from %s to %s for %s knocks",
                                 soft, raised, self.knockable)
            return slots
        except (ImportError, OSError, ValueError):
            return max(self.limit, 1024 // 4)

    def _cap(self, rank: int) -> int:
        """How many may be starting when a start of this rank takes a slot.  A quarter of
        the slots is kept for each better rank that can come: when the dead nodes of the
        last run, or nodes that cannot be knocked on (ProxyJump), come first in the config,
        they must not take every slot before the live ones (knocked, answered) even ask."""
        reserved = max(0, rank - (0 if self.knocks else 1))
        return max(1, self.limit - (self.limit // 4) * reserved)

    async def acquire(self, *, rank: int = 1) -> None:
        ahead = self._waiting and self._waiting[0][0] <= rank   # someone before us waits
        if self.starting < self._cap(rank) and not ahead:
            self._take()
            return
        import heapq
        turn = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (rank, next(self._arrivals), turn))
        try:
            await turn              # release() handed its slot over
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release()      # handed over as we were cancelled: pass it on
            raise

    def _take(self) -> None:
        self.starting += 1
        self.peak = max(self.peak, self.starting)

    def release(self) -> None:
        import heapq
        self.starting -= 1
        while self._waiting:
            rank, _, turn = self._waiting[0]
            if turn.done():         # cancelled meanwhile
                heapq.heappop(self._waiting)
                continue
            if self.starting >= self._cap(rank):
                return              # what is free is kept for better ranks than the first waiting
            heapq.heappop(self._waiting)
            self._take()
            turn.set_result(None)
            return


def _which(program: str) -> str:
    """An absolute path, so subprocess can use posix_spawn (much cheaper than fork
    for a large process: it matters when `test` starts hundreds of masters)."""
    path = _WHICH.get(program)
    if path is None:
        import shutil
        path = _WHICH[program] = shutil.which(program) or program
    return path


_WHICH: Dict[str, str] = {}


async def spawn(argv: Sequence[str], *, stdin: Any, stdout: Any = None, stderr: Any = None
                ) -> "asyncio.subprocess.Process":
    """Start a child without a shell.  close_fds=False passes nothing extra, since
    Python creates every descriptor non-inheritable.  Each child leads a session (and
    process group) of its own, so that _kill ends it together with what it started -
    ssh's ProxyCommand, which a kill of ssh alone leaves running - and a Ctrl-C meant
    for mesh.py reaches mesh.py, which ends its children itself."""
    pipe = asyncio.subprocess.PIPE
    starting = asyncio.ensure_future(asyncio.create_subprocess_exec(
        *argv, stdin=stdin, stdout=pipe if stdout is None else stdout,
        stderr=pipe if stderr is None else stderr, close_fds=False, limit=1 << 20,
        start_new_session=True))
    try:
        return await asyncio.shield(starting)
    except asyncio.CancelledError:
        # Cancelled while the child was being made: asyncio would kill only the child
        # itself, so let it finish starting and end its whole group here.
        try:
            proc = await starting
        except BaseException:
            raise asyncio.CancelledError() from None
        await _kill(proc)
        raise


async def run_command(argv: Sequence[str], *, timeout: float, stdin: Optional[bytes] = None
                      ) -> Tuple[int, bytes, str]:
    """Run a short command without a shell; kill it on timeout or cancellation."""
    proc = await spawn(argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL)
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except asyncio.TimeoutError:
        await _kill(proc)
        raise
    except BaseException:
        await _kill(proc)
        raise
    return proc.returncode or 0, out, err.decode("utf-8", "replace")


class _EmptyReply(Exception):
    """The connection closed before a single byte of reply (a refused channel)."""


class _CutOff(ProtocolError):
    """The connection closed before the body's end."""


class _HeadDeadline(Exception):
    """Raised inside the read of a reply's head by SSHNode._await_head's watch."""


class _IdleTimeout(Exception):
    """Raised inside a read by _IdleWatch: the node was silent for idle_timeout."""


class _IdleWatch:
    """One idle deadline for a reply's whole body.  A read sets `since` while it waits;
    the timer, armed by the first read that has to wait, re-arms itself for the
    remaining time until a read has waited the whole timeout, then fails that read (the
    connection is not reused after that).
    asyncio.wait_for around every read would cost a task and a timer per chunk."""

    def __init__(self, reader: asyncio.StreamReader, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.reader, self.timeout = reader, timeout
        self.since: Optional[float] = None
        self._handle: Any = None       # armed by the first read that has to wait (arm)

    def arm(self) -> None:
        """Before a read: make sure the timer runs, unless the read is served from
        what is buffered already (a small reply came whole with its head: no timer)."""
        if self._handle is None and not getattr(self.reader, "_buffer", None):
            self._handle = self.loop.call_later(self.timeout, self._check)

    def _check(self) -> None:
        now = self.loop.time()
        if self.since is not None and now - self.since >= self.timeout:
            self.reader.set_exception(_IdleTimeout())
            return
        self._handle = self.loop.call_at((self.since if self.since is not None else now) + self.timeout,
                                         self._check)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


class _Exchange:
    """One HTTP request/response on a connection: a socket or an ssh child's pipes."""

    def __init__(self, reader: asyncio.StreamReader, writer: Any, *, proc: Any = None,
                 decoded: bool = False, reused: bool = False, on_done: Any = None) -> None:
        self.reader, self.writer, self.proc = reader, writer, proc
        self.decoded = decoded          # curl already took the chunked framing off
        self.reused = reused            # came from the keep-alive pool
        self.status = 0
        self.headers: Dict[str, str] = {}
        self._on_done = on_done
        self._complete = False
        self._closed = False
        self._dechunk: Optional[ReplyDechunker] = None
        self._remaining: Optional[int] = None
        self._idle: Optional[_IdleWatch] = None
        self.leftover = b""             # bytes after the body: make the connection unfit for reuse
        self.retire = False             # the reply was odd: do not reuse the connection
        self.log_mark = 0               # SSH transport: where the master's log stood at the start
        self.head_only = False          # a HEAD request: the reply has no body whatever its headers say

    async def send(self, request: bytes) -> None:
        writer = self.writer
        writer.write(request)
        transport = writer.transport
        if transport.get_write_buffer_size() or transport.is_closing():
            await writer.drain()     # the socket (or pipe) did not take it all at once, or is gone

    async def _head_bytes(self) -> bytes:
        if not self.leftover:
            return await self.reader.readuntil(b"\r\n\r\n")
        buf, self.leftover = self.leftover, b""   # what the last body's read took beyond its end
        while b"\r\n\r\n" not in buf:
            more = await self.reader.read(65536)
            if not more:
                raise asyncio.IncompleteReadError(buf, None)
            buf += more
        end = buf.index(b"\r\n\r\n") + 4
        self.leftover = buf[end:]
        return buf[:end]

    async def read_head(self) -> Tuple[int, Dict[str, str]]:
        try:
            head = await self._head_bytes()
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise _EmptyReply() from None
            raise ProtocolError(f"reply ended inside the HTTP head: {_excerpt(exc.partial)}") from None
        except asyncio.LimitOverrunError:
            raise ProtocolError("HTTP head too large (not Ollama?)") from None
        except (ConnectionError, OSError):
            raise _EmptyReply() from None
        while head.startswith(b"HTTP/1.1 100"):  # curl may relay an interim 100 Continue
            head = await self._head_bytes()
        self.status, self.headers = parse_http_head(head)
        self._start_body()
        return self.status, self.headers

    def _start_body(self) -> None:
        """How the body after this head is framed: chunked, Content-Length, or to EOF."""
        chunked = "chunked" in self.headers.get("transfer-encoding", "").lower() and not self.decoded
        length = self.headers.get("content-length")
        if self.head_only or self.status in (204, 304):
            chunked, length = False, "0"      # no body, whatever the headers say (RFC 9112 6.3)
        self._dechunk = ReplyDechunker() if chunked else None
        self._remaining = None
        if not chunked and length is not None and (not self.decoded or length == "0"):
            if not (length.isascii() and length.isdigit()):
                # digits only, as Go's net/http reads it (no sign, no space, no list)
                raise ProtocolError(f"bad Content-Length {length!r}")
            self._remaining = int(length)
        self._complete = self._remaining == 0

    def watch(self, idle_timeout: Optional[float]) -> None:
        """Arm the idle deadline for the body: one timer for the whole phase, not one per read."""
        self.unwatch()
        if idle_timeout:
            self._idle = _IdleWatch(self.reader, idle_timeout)

    def unwatch(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    async def read_payload(self, size: int = 1 << 18) -> bytes:
        """The body's next bytes as they arrive, framing taken off (b"" at its end).
        Whatever has arrived is returned at once: several of the node's chunks read
        together are returned together."""
        while not self._complete:
            idle = self._idle
            if idle is not None:
                idle.since = idle.loop.time()
                idle.arm()
            if self.leftover:
                data, self.leftover = self.leftover, b""
            else:
                try:
                    data = await self.reader.read(size if self._remaining is None else min(size, self._remaining))
                except _IdleTimeout:
                    raise asyncio.TimeoutError() from None
                finally:
                    if idle is not None:
                        idle.since = None
                if not data and self.decoded and self.proc is not None:
                    await self._curl_finished()
            out = self.unframe(data)
            if out:
                return out
        return b""

    async def _curl_finished(self) -> None:
        """exec transport, at the end of curl's output: curl took the framing off, so that
        end is the body's whether the body ended or the node's connection was cut; curl's
        exit status (the ssh child's) tells which - 18, CURLE_PARTIAL_FILE, and any other
        failure are a cut (_CutOff), as the framing shows on the other transports."""
        try:
            rc = await asyncio.wait_for(self.proc.wait(), 2.0)
        except asyncio.TimeoutError:
            return
        if rc:
            raise _CutOff(f"stream cut off (truncated: the body did not end; curl on the node exited {rc})")

    def unframe(self, data: bytes) -> bytes:
        """Bytes read from the connection (b"": its end) with the body's framing taken
        off; b"" when they held no payload yet.  At the body's end _complete turns true
        and bytes beyond it are kept in `leftover`.  _CutOff when the connection ended
        before the body did; ProtocolError for bad framing."""
        if self._dechunk is not None:
            if not data:
                raise _CutOff("stream cut off (truncated: the chunked body did not end)")
            out = self._dechunk.feed(data)
            if self._dechunk.done:
                self._complete = True
                self.leftover = self._dechunk.rest   # a pipelined next reply starts here
            return out
        if self._remaining is not None:
            if not data:
                raise _CutOff(f"reply cut off ({self._remaining} bytes missing)")
            if len(data) >= self._remaining:
                data, self.leftover = data[:self._remaining], data[self._remaining:]
                self._complete = True
            self._remaining -= len(data)
            return data
        if not data:
            self._complete = True
        return data

    async def body(self, idle_timeout: Optional[float]) -> AsyncIterator[bytes]:
        """The body as it arrives; silence longer than idle_timeout raises asyncio.TimeoutError."""
        self.watch(idle_timeout)
        try:
            while True:
                data = await self.read_payload()
                if not data:
                    return
                yield data
        finally:
            self.unwatch()

    async def read_body(self, idle_timeout: Optional[float], limit: int = 256 * 1024 * 1024) -> bytes:
        parts, size = [], 0
        async for data in self.body(idle_timeout):
            parts.append(data)
            size += len(data)
            if size > limit:
                raise ProtocolError("reply too large")
        return b"".join(parts)

    async def finish_body(self, grace: float = 1.0) -> None:
        """After the reply's final line: read what is left of the body (normally just the
        last chunk) for up to `grace` seconds, then give the connection back for reuse
        if nothing else came, else end it."""
        self.unwatch()
        try:
            data = await asyncio.wait_for(self.read_payload(), grace)
            if data.strip() or self.leftover or not self._complete:
                self.retire = True
        except (asyncio.TimeoutError, ProtocolError, ConnectionError, OSError):
            self.retire = True
        finally:
            await self.close()

    async def close(self) -> None:
        """Give the connection back for reuse when the reply was complete, else end it."""
        if self._closed:
            return
        self._closed = True
        self.unwatch()
        reusable = (self._complete and self.proc is None and not self.leftover and not self.retire
                    and self.headers.get("connection", "").lower() != "close")
        if self._on_done is not None:
            await self._on_done(self, reusable)


def _check_descriptors(node: str, exc: OSError) -> None:
    """A connect that failed because this process (EMFILE) or the system (ENFILE) has
    no file descriptor left is mesh's shortage, not the node's: NodeError that does not
    mark the node down (another node may still be tried; the next request may fit)."""
    import errno
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        raise NodeError(node, f"no connection opened: {os.strerror(exc.errno).lower()} in mesh.py "
                              "(its open files limit, ulimit -n)", mark_down=False) from None


class Transport:
    """How one node's Ollama is reached.  Subclasses: direct HTTP (`local`), and SSH."""

    mode = "http"

    def __init__(self, name: str, host: str, port: int, *, connect_timeout: float) -> None:
        self.name, self.host, self.port = name, host, port
        self.connect_timeout = connect_timeout
        self._idle: List[Tuple[asyncio.StreamReader, Any]] = []
        self.idle_cap = IDLE_KEEP       # idle keep-alive connections kept (set_concurrency)

    def set_concurrency(self, max_concurrent: int) -> None:
        """The node may be sent this many requests at once: keep as many idle
        connections for reuse (at least IDLE_KEEP)."""
        self.idle_cap = max(IDLE_KEEP, max_concurrent)

    async def prepare(self) -> None:
        """Make the node reachable (start the SSH master); nothing to do for plain HTTP."""

    async def _open_socket(self) -> Tuple[asyncio.StreamReader, Any]:
        try:
            return await asyncio.wait_for(asyncio.open_connection(self.host, self.port, limit=1 << 20),
                                          self.connect_timeout)
        except asyncio.TimeoutError:
            raise NodeError(self.name, f"Ollama at {self.host}:{self.port}: connection timed out") from None
        except ConnectionRefusedError:
            raise NodeError(self.name, f"Ollama not answering at {self.host}:{self.port} "
                                       "(connection refused)") from None
        except OSError as exc:
            _check_descriptors(self.name, exc)
            # asyncio joins several attempts into one OSError without a strerror
            raise NodeError(self.name, f"Ollama not answering at {self.host}:{self.port} "
                                       f"({(exc.strerror or str(exc)).lower()})") from None

    async def start(self, path: str, body: Optional[bytes], *, method: Optional[str] = None) -> _Exchange:
        """Send one request; the reply is read from the returned exchange."""
        while self._idle:
            reader, writer = self._idle.pop()
            # Closed by the node, or holding bytes it sent past its last reply's end (they
            # would be read as this reply's head): not a connection to send on.
            if reader.at_eof() or writer.is_closing() or getattr(reader, "_buffer", None):
                writer.close()
                continue
            ex = _Exchange(reader, writer, reused=True, on_done=self._done)
            ex.head_only = method == "HEAD"
            try:
                await ex.send(build_request(path, body, host=self._host_header(), keep_alive=True,
                                            method=method))
                return ex
            except (ConnectionError, OSError):
                writer.close()
        reader, writer = await self._open_socket()
        ex = _Exchange(reader, writer, on_done=self._done)
        ex.head_only = method == "HEAD"
        try:
            await ex.send(build_request(path, body, host=self._host_header(), keep_alive=True,
                                        method=method))
        except (ConnectionError, OSError):
            pass  # closed at once (a refused channel): reading the reply finds EOF and says why
        return ex

    def _host_header(self) -> str:
        return f"{self.host}:{self.port}"

    can_pipeline = True

    async def get_pipelined(self, paths: Sequence[str], timeout: float) -> List[Tuple[int, bytes]]:
        """Several GETs written back to back on one keep-alive connection, the answers
        read in order (HTTP/1.1 pipelining, which Go's server - Ollama - honours): one
        channel and one round trip for all of them."""
        ex = await self.start(paths[0], None)
        results: List[Tuple[int, bytes]] = []
        try:
            ex.writer.write(b"".join(build_request(p, None, host=self._host_header(), keep_alive=True)
                                     for p in paths[1:]))
            for i in range(len(paths)):
                if i:
                    ex._complete = False
                await asyncio.wait_for(ex.read_head(), timeout)
                results.append((ex.status, await ex.read_body(timeout, limit=64 << 20)))
        finally:
            await ex.close()
        return results

    async def _done(self, ex: _Exchange, reusable: bool) -> None:
        if reusable and len(self._idle) < self.idle_cap:
            self._idle.append((ex.reader, ex.writer))
        else:
            ex.writer.close()

    async def run_shell(self, command: str, timeout: float) -> Optional[str]:
        """`command` run by sh on the node; its stdout, or None when it can't be run there.
        Plain HTTP reaches this machine only when the host is a loopback address."""
        if self.host not in ("127.0.0.1", "localhost", "::1"):
            return None
        rc, out, _ = await run_command(["sh", "-c", command], timeout=timeout)
        return out.decode("utf-8", "replace")

    async def diagnose_empty(self, ex: _Exchange) -> Tuple[str, bool]:
        """Why a connection closed without a reply: (reason, retry_on_this_node)."""
        return f"Ollama at {self.host}:{self.port} closed the connection without a reply", False

    async def close(self, *, stop_master: bool = False) -> None:
        while self._idle:
            _, writer = self._idle.pop()
            writer.close()

    async def retire(self) -> None:
        """This way to the node is no longer configured: end it for good."""
        await self.close(stop_master=True)


def curl_command(url: str, body_size: Optional[int], method: Optional[str] = None) -> str:
    """The remote command (str, for the node's login shell) of the exec transport:
    curl sends one request to `url` and writes the reply, head included, to stdout.

    The body (body_size bytes, None for none) comes first on stdin; stdin then stays
    open, and its end - mesh closing it, or ssh's channel closing because mesh's ssh
    child was killed - ends curl and the shell with it: `kill 0`, the session's process
    group, as OpenSSH's sshd runs each session under setsid() (session.c).  An sshd that
    does not (old dropbear) leaves the sessions of a connection in one group; there the
    shell is not its group's leader and nothing is killed (curl then ends at its next
    write, as before).  Without that, curl on the node noticed a client that left only
    at its next write: never, for a `stream: false` answer, so the generation ran to its
    end.  curl's exit status is the command's (7: Ollama not answering, 127: no curl).
    Plain POSIX sh plus `head -c` (GNU, BSD, busybox); ps where there is no /proc."""
    import shlex
    curl = ["curl", "-sS", "-i", "-N", "-H", "Expect:", "-H", "Accept: application/x-ndjson"]
    if body_size is not None:
        curl += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
    if method == "HEAD":
        curl.append("--head")      # -X HEAD would make curl wait for a body
    elif method:
        curl += ["-X", method]
    curl.append(url)
    # The reader passes exactly the body on to curl and closes curl's stdin (curl reads
    # the whole body before it sends), then leaves a watcher on our stdin behind and
    # exits, so the pipeline, and the reply, end when curl does.  fd 3: a background
    # list's stdin would be /dev/null.  `exec 2>` rather than a redirection on the group:
    # dash keeps a copy of the old fd 2 for a group's redirection, and the watcher would
    # hold ssh's stderr open (its end is what mesh waits for to read why curl failed).
    # The watcher kills the group only while the shell ($$, its $1) still leads it: after
    # a normal end the shell is gone, and under an sshd without setsid() the group is not
    # ours.  `exec sh`: the login shell makes way, so sh is the session's leader.  The
    # watcher is a command of its own (sh -c), not a { group } of the forked shell: mksh
    # keeps a copy of the pipe to curl in a subshell, and a subshell waiting for `cat`
    # held curl's stdin open - curl never sent the body, every request with one hung.
    body = f"head -c {int(body_size)}; " if body_size is not None else ""
    watch = "cat >/dev/null; g=$(cut -d\" \" -f5 /proc/$1/stat || ps -o pgid= -p $1); [ \"$g\" -eq $1 ] && kill 0"
    script = (f"exec 3<&0; {{ exec 2>/dev/null; {body}exec >&-; sh -c {shlex.quote(watch)} sh $$ <&3 & }} | "
              f"{' '.join(map(shlex.quote, curl))} 3<&-")
    return "exec sh -c " + shlex.quote(script)


class SSHTransport(Transport):
    """A node reached through its sshd, over one ControlMaster that mesh.py starts.

    Modes, tried in this order unless the node's `transport` setting pins one:
      forward - the master holds a forward from a local UNIX socket to the node's
                Ollama; requests are HTTP keep-alive over pooled connections to it
                (no process per request, not capped by MaxSessions);
      stdio   - `ssh -W host:port` per request through the master;
      exec    - `ssh NODE curl ...` per request, for an sshd that refuses forwarding.
    """

    def __init__(self, name: str, host: str, port: int, *, config: Optional[str], ssh: str,
                 connect_timeout: float, control_persist: int, mode: str = "auto",
                 ctl_dir: Any = None, destination: Sequence[Any] = (),
                 start_gate: Optional[_StartGate] = None,
                 knock_address: Optional[Tuple[str, int]] = None) -> None:
        super().__init__(name, host, port, connect_timeout=connect_timeout)
        self.start_gate = start_gate or _StartGate()
        self.knock_address = knock_address   # where ssh connects, when mesh knows it exactly
        import hashlib
        self.config, self.ssh = config, _which(ssh)
        self.control_persist = control_persist
        self.pinned = mode if mode in ("forward", "stdio", "exec") else None
        self.mode = self.pinned or "forward"
        # The socket's name covers what ssh resolves for the node (NodeSpec.destination):
        # after a config edit the same alias gets a master of its own, never the old one.
        key = "\0".join(map(str, (config or "", name, host, port, *destination)))
        self.ident = hashlib.sha1(key.encode()).hexdigest()[:16]
        # The alias's own name in the control directory, whatever it resolves to: a file
        # there names the master last started for it, so the next start can retire it.
        self.alias_ident = hashlib.sha1(f"{config or ''}\0{name}".encode()).hexdigest()[:16]
        self._dir_source = ctl_dir      # a path, a callable giving one, or None: control_dir()
        self._dir: Optional[str] = None
        self._session_reaper: Optional[asyncio.Future] = None
        # Made on first use, inside the event loop (Python 3.9 binds them when created).
        self._lock_obj: Optional[asyncio.Lock] = None
        self._slots_obj: Optional[asyncio.Semaphore] = None
        self._master_ok = False
        self.started_master = False

    def set_concurrency(self, max_concurrent: int) -> None:
        """Idle forwarded connections stay at IDLE_KEEP whatever max_concurrent says:
        each is a channel of the master, and ssh looks at every open channel each time
        it wakes (its poll loop), so hundreds of idle ones slow every stream through it
        (500 streams: 1.34 s -> 1.62 s wall in tests/bench_relay.py)."""
        self.idle_cap = IDLE_KEEP

    # The directory is looked up (and checked) on first use, not when the node is
    # configured: `nodes` and an unused node never touch it.
    @property
    def dir(self) -> str:
        if self._dir is None:
            source = self._dir_source
            self._dir = source() if callable(source) else (source or control_dir())
        return self._dir

    @property
    def ctl(self) -> str:
        return os.path.join(self.dir, self.ident)

    @property
    def fwd(self) -> str:
        return self.ctl + ".f"

    @property
    def log(self) -> str:
        return self.ctl + ".log"

    @property
    def nodelay_mark(self) -> str:
        return self.ctl + ".n"    # this master has had its first session (TCP_NODELAY)

    def _ours(self, path: str) -> bool:
        """A socket we may use: a socket (not a symlink) owned by us."""
        import stat
        try:
            st = os.lstat(path)
        except OSError:
            return False
        return stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid()

    @property
    def _lock(self) -> "asyncio.Lock":
        if self._lock_obj is None:
            self._lock_obj = asyncio.Lock()
        return self._lock_obj

    @property
    def _exec_slots(self) -> "asyncio.Semaphore":
        if self._slots_obj is None:
            self._slots_obj = asyncio.Semaphore(EXEC_SESSION_CAP)
        return self._slots_obj

    # -- ssh command lines ---------------------------------------------------
    def _base(self, *extra: str) -> List[str]:
        """An ssh call that connects (the master, `-W`, `ssh NODE curl`)."""
        argv = [self.ssh]
        if self.config:
            argv += ["-F", self.config]
        for option in SSH_OPTIONS:
            argv += ["-o", option]
        argv += ["-o", f"ControlPath={ssh_quote(self.ctl)}",
                 "-o", f"ConnectTimeout={self.ssh_connect_timeout}"]
        argv += list(extra)
        return argv

    @property
    def ssh_connect_timeout(self) -> int:
        """ssh's ConnectTimeout for connect_timeout: whole seconds, at least 1 (ssh takes
        no fractions).  A knock waits exactly as long: its verdict stands for ssh's."""
        return max(1, int(round(self.connect_timeout)))

    def _mux(self, op: str, *extra: str) -> List[str]:
        """`ssh -O op` to our master.  `-F none`: a mux client sends the LocalForward and
        RemoteForward lines of the config it reads to the master, and ClearAllForwardings
        would clear our own -L too; the master needs nothing else of the config."""
        return [self.ssh, "-F", "none", "-o", "LogLevel=INFO", "-o", f"ControlPath={ssh_quote(self.ctl)}",
                "-O", op, *extra, "--", self.name]

    async def _check_master(self) -> bool:
        try:
            rc, _, _ = await run_command(self._mux("check"), timeout=self.connect_timeout)
        except asyncio.TimeoutError:
            return False
        return rc == 0

    async def prepare(self) -> None:
        """Start the master exactly once, however many requests arrive together."""
        if self._master_ok:
            return
        async with self._lock:
            if self._master_ok:
                return
            fresh = False
            # A master left by an earlier command is reused; a connect to its socket tells
            # whether it is there without starting a process (`ssh -O check` costs ~5 ms).
            if not (self._ours(self.ctl) and self._master_answers()):
                await self._start_master()
                fresh = True
            await self._nodelay_session()
            if self.mode == "forward" and not self.pinned or self.pinned == "forward":
                await self._add_forward(fresh)
            if fresh:
                self._write_meta()
                await self._retire_superseded()
            self._master_ok = True

    async def _retire_superseded(self) -> None:
        """A master this alias had before its config changed (another resolved
        destination, so another socket) is told to stop (`ssh -O stop`): it takes no
        new session and exits once the ones in flight - a `serve` not yet reloaded, a
        command started before the edit - have ended.  Without this a one-shot command
        after an edit left the old master connected to the old machine for
        ControlPersist seconds.  The alias's CTL file (ALIAS.cur) names the master
        last started for it."""
        current = os.path.join(self.dir, self.alias_ident + ".cur")
        try:
            with open(current) as fh:
                previous = fh.read().strip()
        except OSError:
            previous = ""
        if previous and previous != self.ident and re.fullmatch(r"[0-9a-f]{16}", previous):
            old = os.path.join(self.dir, previous)
            if self._ours(old):
                logger.info("%s: the config changed; the master for its old destination is retired", self.name)
                try:
                    await run_command([self.ssh, "-F", "none", "-o", f"ControlPath={ssh_quote(old)}",
                                       "-O", "stop", "--", self.name], timeout=5)
                except (asyncio.TimeoutError, OSError):
                    pass
                for extra in (".f", ".json", ".n", ".log"):   # nothing new reaches it; `connections` forgets it
                    try:
                        os.unlink(old + extra)
                    except OSError:
                        pass
        try:
            with open(current + ".new", "w") as fh:
                fh.write(self.ident + "\n")
            os.replace(current + ".new", current)
        except OSError as exc:
            logger.debug("%s: cannot write %s: %s", self.name, current, exc)

    def _write_meta(self) -> None:
        """Who this master is, next to its socket (CTL.json), for `mesh.py connections`:
        the socket's own name is a hash."""
        meta = {"node": self.name, "ollama": f"{self.host}:{self.port}", "config": self.config,
                "started": time.time(), "transport": self.mode, "alias": self.alias_ident}
        try:
            with open(self.ctl + ".json", "w") as fh:
                json.dump(meta, fh)
        except OSError as exc:
            logger.debug("%s: cannot write %s.json: %s", self.name, self.ctl, exc)

    async def _start_master(self) -> None:
        for stale in (self.ctl, self.fwd, self.nodelay_mark):
            try:
                os.unlink(stale)  # a master killed by SIGKILL leaves its socket behind
            except FileNotFoundError:
                pass
        try:  # a fresh file of ours: ssh -E appends to whatever the name points at
            os.unlink(self.log)
        except FileNotFoundError:
            pass
        try:
            os.close(os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600))
        except OSError:
            pass
        # -N: the master runs no session of its own (with -f and ControlPersist a command
        # given here never reaches the node anyway); _nodelay_session() follows.
        argv = self._base("-o", "ControlMaster=yes", "-o", f"ControlPersist={self.control_persist}",
                          "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=3",
                          "-o", "ClearAllForwardings=yes", "-o", "StreamLocalBindUnlink=yes",
                          "-E", self.log, "-f", "-N", "--", self.name)
        knock = await self.knock() if self.start_gate.knocks else None
        rank = start_rank(knock, self._failed_lately())
        if rank is None:
            self._mark_failed(True)
            host, port = self.knock_address or ("", 0)
            why = "Connection refused" if knock == "refused" else "Connection timed out"
            logger.info("%s: %s port %s: %s to a knock; no ssh started", self.name, host, port, why.lower())
            # what ssh would have said, read as any ssh failure is: the same message
            raise NodeError(self.name, describe_ssh_failure(
                f"ssh: connect to host {host} port {port}: {why}", 255))
        await self.start_gate.acquire(rank=rank)
        try:
            rc, _, err = await run_command(argv, timeout=self.connect_timeout + 5)
        except asyncio.TimeoutError:
            self._mark_failed(True)
            raise NodeError(self.name, f"ssh: no connection within {self.connect_timeout:g}s "
                                       "(connect timeout)") from None
        finally:
            self.start_gate.release()
        self._mark_failed(rc != 0)
        if rc != 0:
            err = err + self._log_tail(0)
            raise NodeError(self.name, describe_ssh_failure(err, rc))
        self.started_master = True
        logger.debug("%s: master started", self.name)

    async def knock(self) -> Optional[str]:
        """A plain TCP connect to where ssh would connect, closed at once: "answered",
        "refused" (every address refused), "silent" (no answer within the connect
        timeout), or None (not knocked: no exact address, a name that does not resolve
        in time, or another failure - ssh will tell).  The addresses are tried in turn,
        as ssh does.  No ssh process; the node's sshd logs a connection closed before
        authentication."""
        if self.knock_address is None:
            return None
        import socket
        host, port = self.knock_address
        loop = asyncio.get_running_loop()
        async with self.start_gate.knock_slots():
            # the connect timeout counts from here: a knock that waited for a slot (behind
            # hundreds of silent ones) would otherwise call a live node silent unheard
            deadline = loop.time() + self.ssh_connect_timeout
            numeric = canonical_address(host)   # a numeric HostName needs no lookup
            addresses = [numeric] if numeric else None
            if addresses is None:
                try:   # through the loop (a thread): a slow resolver does not stall the others
                    infos = await asyncio.wait_for(
                        loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), self.connect_timeout)
                except (asyncio.TimeoutError, OSError):
                    return None
                addresses = list(dict.fromkeys(info[4][0] for info in infos))
            refused = 0
            for address in addresses:
                try:
                    transport, _ = await asyncio.wait_for(
                        loop.create_connection(asyncio.Protocol, address, port),
                        max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    return "silent"
                except ConnectionRefusedError:
                    refused += 1
                    continue
                except OSError as exc:
                    logger.debug("%s: knock on %s port %s: %s", self.name, address, port, exc)
                    continue
                transport.abort()
                return "answered"
            return "refused" if addresses and refused == len(addresses) else None

    @property
    def failed_mark(self) -> str:
        return self.ctl + ".down"   # the last master start failed (when: its mtime)

    def _failed_lately(self) -> bool:
        """Did this destination's last master start fail within the last ten minutes?"""
        try:
            st = os.lstat(self.failed_mark)
        except OSError:
            return False
        return st.st_uid == os.getuid() and time.time() - st.st_mtime < 600

    def _mark_failed(self, failed: bool) -> None:
        try:
            if failed:
                os.close(os.open(self.failed_mark, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600))
                os.utime(self.failed_mark)
            else:
                os.unlink(self.failed_mark)
        except OSError:
            pass

    async def _nodelay_session(self) -> None:
        """Open one session through the master so that sshd turns Nagle off on its socket.

        sshd sets TCP_NODELAY on its side of a connection when the connection's first
        session starts its command (session.c -> ssh_packet_set_interactive: the first call
        decides, later sessions change nothing); forwarded channels are not sessions.  A
        master that has only ever carried forwards sends every reply with Nagle on, and a
        stream whose chunks come close together waits ~40 ms for the client's delayed ACK.
        ssh's own side has it from the start.  We wait only until the master says the
        session is open (`master session id`, ssh -v): by then it has sent the exec request,
        and sshd handles a connection's messages in order, so it has decided before it sees
        any later request - or our closing of that session, which spares the node's shell
        startup (.bashrc).  A marker file says a master already had its session; a reused
        master is not asked again."""
        if os.path.exists(self.nodelay_mark):
            return
        # -tt: on a pty, closing the session hangs up the node's shell at once (SIGHUP)
        # instead of letting it run its .bashrc for nothing.
        argv = self._base("-o", SESSION_OPTION, "-o", "ControlMaster=no", "-v", "-tt", "--", self.name, "exit 0")
        try:
            proc = await spawn(argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL)
        except OSError:
            return
        try:
            async def opened() -> bool:
                while True:
                    line = await proc.stderr.readline()
                    if not line:
                        return False
                    if b"master session id" in line:
                        return True
            if await asyncio.wait_for(opened(), self.connect_timeout):
                with open(self.nodelay_mark, "w"):
                    pass
            else:
                await _kill(proc)
                return
        except BaseException:
            await _kill(proc)
            if isinstance(sys.exc_info()[1], (asyncio.TimeoutError, OSError)):
                return
            raise
        # The exec request is on its way and sshd reads in order, so we need not wait for the
        # session to end - but it must end by itself: hanging it up would cut the node's shell
        # off in the middle of its start-up files (a `pyenv rehash` killed there leaves a lock
        # that every later shell on the node waits 60 s for).  It is reaped in the background.
        self._session_reaper = asyncio.ensure_future(self._reap(proc))

    async def _reap(self, proc: "asyncio.subprocess.Process") -> None:
        try:
            await asyncio.wait_for(proc.wait(), max(self.connect_timeout, 10.0))
        except BaseException:
            await _kill(proc)

    async def _add_forward(self, fresh: bool = False) -> None:
        spec = f"{self.fwd.replace('%', '%%')}:{self.host}:{self.port}"   # ssh %-expands -L paths
        if fresh:
            await self._request_forward(spec)  # a new master holds no forward yet
            return
        if self._ours(self.fwd):
            try:  # a master left by an earlier command may still hold a working forward
                reader, writer = await asyncio.open_unix_connection(self.fwd, limit=1 << 20)
                self._idle.append((reader, writer))   # the check's connection serves the first request
                return
            except OSError:
                pass
        # The master may still list a forward whose socket file is gone: cancel it first,
        # or it answers "forward exists" and nothing listens.
        await run_command(self._mux("cancel", "-L", spec), timeout=self.connect_timeout)
        await self._request_forward(spec)

    async def _request_forward(self, spec: str) -> None:
        try:
            os.unlink(self.fwd)
        except FileNotFoundError:
            pass
        argv = self._mux("forward", "-L", spec)
        try:
            rc, _, err = await run_command(argv, timeout=self.connect_timeout)
        except asyncio.TimeoutError:
            rc, err = 255, "timed out"
        if rc != 0 or not self._ours(self.fwd):
            logger.info("%s: no forward through the master (%s); using ssh -W per request",
                        self.name, err.strip() or rc)
            if not self.pinned:
                self.mode = "stdio"

    def _log_tail(self, since: int) -> str:
        try:
            with open(self.log, "rb") as fh:
                fh.seek(since)
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _log_size(self) -> int:
        try:
            return os.path.getsize(self.log)
        except OSError:
            return 0

    def master_lost(self) -> None:
        """Forget the master: the next request checks it and starts a new one."""
        self._master_ok = False
        while self._idle:
            _, writer = self._idle.pop()
            writer.close()

    # -- requests ------------------------------------------------------------
    async def _open_socket(self) -> Tuple[asyncio.StreamReader, Any]:
        try:
            return await asyncio.open_unix_connection(self.fwd, limit=1 << 20)
        except OSError as exc:
            _check_descriptors(self.name, exc)
            self.master_lost()  # the master (and its forward) is gone
            await self.prepare()
            try:
                return await asyncio.open_unix_connection(self.fwd, limit=1 << 20)
            except OSError as exc:
                raise NodeError(self.name, f"forward through the ssh master failed: {exc.strerror}") from None

    def _host_header(self) -> str:
        return f"{self.host}:{self.port}"

    def _master_answers(self) -> bool:
        """Is anything listening on the control socket?  A UNIX connect, no process: cheap
        enough per request.  (A per-request ssh would otherwise fall back to a new
        connection of its own without a word, and leave the stale socket behind.)"""
        import socket
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.ctl)
            return True
        except OSError:
            return False
        finally:
            probe.close()

    @property
    def can_pipeline(self) -> bool:  # type: ignore[override]
        return self.mode == "forward"

    async def start(self, path: str, body: Optional[bytes], *, method: Optional[str] = None) -> _Exchange:
        if self.mode != "forward" and self._master_ok and not self._master_answers():
            logger.info("%s: ssh master gone; starting a new one", self.name)
            self.master_lost()
        await self.prepare()
        mark = self._log_size()   # the master's log from here on tells why a channel failed
        ex = await self._start_mode(path, body, method)
        ex.log_mark = mark
        ex.head_only = method == "HEAD"
        return ex

    async def _start_mode(self, path: str, body: Optional[bytes], method: Optional[str]) -> _Exchange:
        if self.mode == "forward":
            return await super().start(path, body, method=method)
        if self.mode == "stdio":
            argv = self._base("-o", "ControlMaster=no", "-W", f"{self.host}:{self.port}", "--", self.name)
            proc = await spawn(argv, stdin=asyncio.subprocess.PIPE)
            ex = _Exchange(proc.stdout, proc.stdin, proc=proc, on_done=self._done_proc)
            # Connection: close, and stdin stays open until the reply is read: a half-close
            # makes Ollama cancel the request.
            try:
                await ex.send(build_request(path, body, host=self._host_header(), keep_alive=False,
                                            method=method))
            except (ConnectionError, OSError):
                pass  # the child died; reading the head reports why
            return ex
        return await self._start_exec(path, body, method)

    async def _start_exec(self, path: str, body: Optional[bytes], method: Optional[str] = None) -> _Exchange:
        url = f"http://{self.host}:{self.port}{path}"
        if ":" in self.host:
            url = f"http://[{self.host}]:{self.port}{path}"
        await self._exec_slots.acquire()
        try:
            argv = self._base("-o", SESSION_OPTION, "-o", "ControlMaster=no", "-T", "--", self.name,
                              curl_command(url, None if body is None else len(body), method))
            proc = await spawn(argv, stdin=asyncio.subprocess.PIPE)
        except BaseException:
            self._exec_slots.release()
            raise
        ex = _Exchange(proc.stdout, proc.stdin, proc=proc, decoded=True, on_done=self._done_proc)
        try:
            if body is not None:
                proc.stdin.write(body)
                await proc.stdin.drain()
            # stdin stays open until the reply is read (_done_proc): its end tells the
            # node's side that mesh has gone, and ends curl there (curl_command)
        except (ConnectionError, OSError):
            pass
        return ex

    async def _done_proc(self, ex: _Exchange, reusable: bool) -> None:
        proc = ex.proc
        try:
            if ex.writer is not None and not ex.writer.is_closing():
                ex.writer.close()
            if ex._complete:
                try:
                    await asyncio.wait_for(proc.wait(), 2)
                except asyncio.TimeoutError:
                    pass
        finally:
            await _kill(proc)
            if ex.decoded:
                self._exec_slots.release()

    async def _child_failure(self, ex: _Exchange) -> str:
        """What an ssh child (stdio / exec modes) said on its way out."""
        proc = ex.proc
        try:
            await asyncio.wait_for(proc.wait(), 3)
        except asyncio.TimeoutError:
            pass
        err = ""
        if proc.stderr is not None:
            try:
                err = (await asyncio.wait_for(proc.stderr.read(), 1)).decode("utf-8", "replace")
            except asyncio.TimeoutError:
                pass
        return err

    async def diagnose_empty(self, ex: _Exchange) -> Tuple[str, bool]:
        """Why a request got no reply at all: what the ssh child said (stdio, exec), or
        what the master logged as it failed the channel (forward, and `-W` whose own
        message "Session open refused by peer" does not say why)."""
        if ex.proc is not None:
            err = await self._child_failure(ex)
            if ex.decoded:  # curl on the node
                if ex.proc.returncode == 7 or "Failed to connect" in err or "Couldn't connect" in err:
                    return f"Ollama not answering on {self.host}:{self.port} (connection refused)", False
                if ex.proc.returncode == 127 or "curl: not found" in err or "command not found" in err:
                    return "curl is not installed on the node (needed when sshd refuses forwarding)", False
            if err.strip() and "refused by peer" not in err and "forwarding" not in err.lower():
                self.master_lost()  # ssh itself failed: the master is gone and no new connection came up
                return describe_ssh_failure(err, ex.proc.returncode), False
        log = self._log_tail(ex.log_mark)
        if "open failed" not in log and "forwarding" not in log.lower():
            await asyncio.sleep(0.05)  # the master logs as it fails the channel: give it a moment
            log = self._log_tail(ex.log_mark)
        if "administratively prohibited" in log or "forwarding request failed" in log.lower():
            if self.pinned:
                return "sshd refuses TCP forwarding (AllowTcpForwarding no)", False
            if self.mode != "exec":
                logger.info("%s: sshd refuses TCP forwarding; falling back to ssh NODE curl", self.name)
                self.mode = "exec"
            return "sshd refuses TCP forwarding", True  # retry this request in exec mode
        m = re.search(r"open failed: connect failed: ([^\r\n]+)", log)
        if m:
            return f"Ollama not answering on {self.host}:{self.port} ({m.group(1).strip().lower()})", False
        if not await self._check_master():
            self.master_lost()
            return "ssh master connection lost", False
        return f"Ollama on {self.host}:{self.port} closed the connection without a reply", False

    async def run_shell(self, command: str, timeout: float) -> Optional[str]:
        """`command` run by sh on the node, as a session of the master (no new connection)."""
        import shlex
        await self.prepare()
        argv = self._base("-o", SESSION_OPTION, "-o", "ControlMaster=no", "-T", "--", self.name,
                          "sh -c " + shlex.quote(command))
        rc, out, err = await run_command(argv, timeout=timeout)
        if rc == 255:
            raise NodeError(self.name, describe_ssh_failure(err, rc))
        return out.decode("utf-8", "replace")

    async def retire(self) -> None:
        """End our master for this destination, whoever started it (it serves a
        destination the config no longer names)."""
        self.started_master = self.started_master or self._ours(self.ctl)
        await self.close(stop_master=True)

    async def close(self, *, stop_master: bool = False) -> None:
        await super().close()
        if self._session_reaper is not None:
            try:   # the TCP_NODELAY session's shell finishing its start-up files
                await asyncio.wait_for(asyncio.shield(self._session_reaper), 5.0)
            except BaseException:
                self._session_reaper.cancel()
                try:
                    await self._session_reaper
                except BaseException:
                    pass
        if stop_master and self.started_master:
            try:
                await run_command(self._mux("exit"), timeout=5)
            except (asyncio.TimeoutError, OSError):
                pass
            for path in (self.fwd, self.log, self.nodelay_mark):
                try:
                    os.unlink(path)
                except OSError:
                    pass
            self._master_ok = False


# ---------------------------------------------------------------------------
# Nodes: one per SSH alias; health, load and inventory.
# ---------------------------------------------------------------------------

class SSHNode:
    """One node of the mesh.  `name` is its ssh alias; `display_name` is for people."""

    def __init__(self, spec: NodeSpec, transport: Transport) -> None:
        self.spec = spec
        self.name = spec.name
        self.ssh_alias = spec.name if spec.transport != "http" else None
        self.transport = transport
        self.route = NodeRouteState(spec.name, weight=spec.weight, max_concurrent=spec.max_concurrent,
                                    num_parallel=spec.num_parallel)
        self.configure(spec)
        self.active_requests = 0
        self.avg_latency: Optional[float] = None   # seconds to first byte, EWMA
        self.healthy = True
        self.reason: Optional[str] = None
        self.version: Optional[str] = None
        self.models: Dict[str, Dict[str, Any]] = {}   # model key -> /api/tags entry
        self.loaded: Dict[str, Dict[str, Any]] = {}   # model key -> /api/ps entry
        self.inventory_at = 0.0
        self.failures = 0
        self.retired = False       # no longer configured (MeshOrchestrator.apply_specs)
        self.down_since: Optional[float] = None
        self.served = 0
        self.unsupported: set = set()   # paths this node's Ollama answered with Go's plain 404
        self.probe_timeout = PROBE_TIMEOUT
        self._probe_task: Optional[asyncio.Task] = None
        self.facts: Dict[str, Any] = {}   # parse_node_facts(): GPU, VRAM, RAM, load (bytes)
        self.facts_at = 0.0
        self.facts_task: Optional[asyncio.Task] = None
        self.recent_done: List[float] = []   # when our recent requests ended (see _read_loads)

    def configure(self, spec: NodeSpec) -> None:
        """Take the settings of `spec` (same destination): its name for people, weight,
        max_concurrent and num_parallel, here, in the balancer's view of the node (route)
        and in the transport's idle connections - a config reload changes all of them."""
        self.spec, self.display_name = spec, spec.display_name
        self.weight, self.max_concurrent = spec.weight, spec.max_concurrent
        route = self.route
        route.weight, route.max_concurrent, route.num_parallel = spec.weight, spec.max_concurrent, spec.num_parallel
        self.transport.set_concurrency(spec.max_concurrent)

    def __repr__(self) -> str:
        return f"<SSHNode {self.name} active={self.active_requests} healthy={self.healthy}>"

    @property
    def loaded_models(self) -> Dict[str, Dict[str, Any]]:
        return self.loaded

    def load_score(self, neutral_latency: float = 0.0) -> float:
        return load_score(self.active_requests, self.avg_latency, self.weight, neutral_latency=neutral_latency)

    def status(self) -> Dict[str, Any]:
        return {"name": self.name, "display_name": self.display_name, "healthy": self.healthy,
                "reason": self.reason, "in_flight": self.active_requests,
                "max_concurrent": self.max_concurrent, "weight": self.weight,
                "latency_ms": None if self.avg_latency is None else round(self.avg_latency * 1000, 1),
                "models": sorted(m["name"] for m in self.models.values()),
                "loaded": sorted(m["name"] for m in self.loaded.values()),
                "version": self.version, "transport": self.transport.mode, "served": self.served,
                "facts": dict(self.facts),
                "parallel": self.route.slots, "others_in_flight": self.route.external,
                "tokens_per_s": {k: round(st.gen_tps, 1) for k, st in self.route.stats.items() if st.gen_tps}}

    def touched(self) -> None:
        """An exchange with the node just ended: its connection looks busy at the node
        for STREAM_GAP seconds more (see count_busy_connections), and is ours."""
        import bisect
        now = time.monotonic()
        done = self.recent_done          # in time order: the stale ones are at the front
        cut = max(bisect.bisect_left(done, now - (STREAM_GAP + 0.5)), len(done) - 63)
        if cut > 0:
            del done[:cut]
        done.append(now)

    async def busy_connections(self) -> Optional[int]:
        """Requests in flight at the node's Ollama from anyone (other mesh processes,
        direct users, and ours), read over the master from its established connections
        (`ss`, else /proc/net/tcp): nothing is installed on the node.  None when the
        node cannot tell (not Linux, or reached without ssh)."""
        transport = self.transport
        if not isinstance(transport, SSHTransport):
            return None
        if not transport._master_ok or not self.healthy:
            return -1   # no master now: nothing to read through (requests will start one)
        port = transport.port
        remote = (f"ss -Htni state established '( sport = :{port} )' 2>/dev/null"
                  f" || cat /proc/net/tcp /proc/net/tcp6 2>/dev/null")
        async with transport._exec_slots:
            rc, out, _ = await run_command(transport._base("-o", "ControlMaster=no", "-T", "--", self.name, remote),
                                           timeout=self.probe_timeout)
        if rc != 0 and not out:
            return None
        return count_busy_connections(out.decode("utf-8", "replace"), port)

    # -- one HTTP exchange, with the first-byte watch --------------------------
    async def open(self, path: str, body: Optional[bytes], *, first_byte_timeout: Optional[float],
                   liveness_interval: Optional[float] = None, method: Optional[str] = None,
                   patient: bool = False) -> _Exchange:
        """Send a request and wait for the reply's head.  Any failure here is a
        NodeError with retryable=True: nothing has been relayed yet.  patient=True
        (generations): past first_byte_timeout the node is waited for as long as it
        answers its liveness probe (see _await_head)."""
        for attempt in range(3):
            try:
                ex = await self.transport.start(path, body, method=method)
            except NodeError:
                raise
            except (ConnectionError, OSError) as exc:
                raise NodeError(self.name, f"cannot reach Ollama: {exc}") from None
            try:
                await self._await_head(ex, first_byte_timeout, liveness_interval, patient=patient)
                return ex
            except _EmptyReply:
                if ex.reused:
                    await ex.close()
                    continue  # an idle pooled connection the server had closed: try a fresh one
                try:
                    reason, again = await self.transport.diagnose_empty(ex)
                finally:
                    await ex.close()
                if again and attempt < 2:
                    continue  # e.g. forwarding refused: the transport switched to ssh NODE curl
                raise NodeError(self.name, reason) from None
            except ProtocolError as exc:
                await ex.close()
                if ex.reused:
                    # Bytes the node sent after its last reply on this pooled connection
                    # came first: the connection is spoiled, not the node.
                    continue
                raise NodeError(self.name, f"not an Ollama reply: {exc}", answered=True) from None
            except BaseException:
                await ex.close()
                raise
        raise NodeError(self.name, "connection closed without a reply")

    async def _await_head(self, ex: _Exchange, first_byte_timeout: Optional[float],
                          liveness_interval: Optional[float], *, patient: bool = False) -> None:
        """Wait for the first byte, but keep asking the node (its /api/version through
        the same master) whether it is still there: a dead node fails fast, a node
        busy loading a model gets the whole first_byte_timeout.  patient=True: at
        first_byte_timeout the node is asked once more, and if it answers the wait goes
        on for as long as it keeps answering - a long generation (stream=false: its
        first byte is its last) on a node that is alive is not a failure, and re-running
        it elsewhere would only cost a second generation.  The head is read in this
        task; one timer (re-armed every liveness interval) does the watching, so a
        quick reply costs no extra task or timer per read."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline: List[Optional[float]] = [None if first_byte_timeout is None else started + first_byte_timeout]
        interval = liveness_interval or LIVENESS_INTERVAL
        probe: List[Any] = [None]
        handle: List[Any] = [None]
        overdue = [False]

        def fail(message: str) -> None:
            ex.reader.set_exception(_HeadDeadline(message))

        def tick() -> None:
            now = loop.time()
            if deadline[0] is not None and now >= deadline[0]:
                if not patient:
                    fail(f"no reply within first_byte_timeout={first_byte_timeout:g}s")
                    return
                # From here on the node's liveness decides: the probe below (or the
                # one in flight) must answer, and so must every later one.
                deadline[0], overdue[0] = None, True
            if probe[0] is None or probe[0].done():
                async def ask() -> None:
                    error = await self.liveness()
                    if error:
                        fail(f"stopped answering while waiting for a reply ({error})")
                    elif overdue[0]:
                        overdue[0] = False
                        logger.info("%s: no reply within first_byte_timeout=%gs, but the node answers: "
                                    "waiting on while it does", self.name, first_byte_timeout)
                probe[0] = asyncio.ensure_future(ask())
            arm(now)

        def arm(now: float) -> None:
            at = now + interval if deadline[0] is None else min(now + interval, deadline[0])
            handle[0] = loop.call_at(at, tick)

        arm(started)
        try:
            await ex.read_head()
        except _HeadDeadline as exc:
            raise NodeError(self.name, str(exc), timed_out=True) from None
        finally:
            handle[0].cancel()
            if probe[0] is not None and not probe[0].done():
                probe[0].cancel()
                try:
                    await probe[0]
                except BaseException:
                    pass
        self.avg_latency = ewma(self.avg_latency, loop.time() - started)

    async def liveness(self) -> Optional[str]:
        """None if the node's Ollama answers /api/version promptly, else why not."""
        try:
            await asyncio.wait_for(self.get_json("/api/version"), self.probe_timeout)
            return None
        except asyncio.TimeoutError:
            return f"/api/version did not answer within {self.probe_timeout:g}s"
        except MeshError as exc:
            return getattr(exc, "reason", str(exc))

    async def get_json(self, path: str, body: Optional[Dict[str, Any]] = None, *,
                       timeout: Optional[float] = None, method: Optional[str] = None) -> Dict[str, Any]:
        """A small request answered with one JSON object (tags, ps, version, show);
        an empty 200 reply (Ollama's /api/delete) is {}."""
        timeout = timeout or self.probe_timeout
        raw = None if body is None else json.dumps(body).encode()
        ex = await self.open(path, raw, first_byte_timeout=timeout, liveness_interval=timeout, method=method)
        try:
            data = await ex.read_body(timeout)
        except asyncio.TimeoutError:
            await ex.close()
            raise NodeError(self.name, f"{path}: reply stalled") from None
        except ProtocolError as exc:
            await ex.close()
            raise NodeError(self.name, f"{path}: {exc}") from None
        await ex.close()
        self.touched()
        return self._json_answer(path, ex.status, data)

    def _json_answer(self, path: str, status: int, data: bytes) -> Dict[str, Any]:
        if status != 200:
            raise NodeError(self.name, f"{path}: {error_message(status, data)}", status=status,
                            mark_down=status >= 500 and status != 503)
        if not data.strip():
            return {}
        try:
            obj = json.loads(data)
        except _JSON_ERRORS:
            raise NodeError(self.name, f"{path}: not Ollama (reply is not JSON: {_excerpt(data)})") from None
        if not isinstance(obj, dict):
            raise NodeError(self.name, f"{path}: not Ollama (unexpected reply {_excerpt(data)})")
        return obj

    async def get_jsons(self, paths: Sequence[str]) -> List[Dict[str, Any]]:
        """Several small GETs at once: pipelined on one connection where the transport
        allows it, else concurrently."""
        if self.transport.can_pipeline:
            await self.transport.prepare()
            try:
                answers = await self.transport.get_pipelined(paths, self.probe_timeout)
            except asyncio.TimeoutError:
                raise NodeError(self.name, f"no reply within {self.probe_timeout:g}s") from None
            except _EmptyReply:
                # closed without a word: the single-request path says why (and may switch mode)
                return [await self.get_json(p) for p in paths]
            except ProtocolError as exc:
                raise NodeError(self.name, f"not an Ollama reply: {exc}") from None
            except (ConnectionError, OSError) as exc:
                raise NodeError(self.name, f"cannot reach Ollama: {exc}") from None
            self.touched()
            return [self._json_answer(p, status, data) for p, (status, data) in zip(paths, answers)]
        results = await asyncio.gather(*(self.get_json(p) for p in paths), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)  # type: ignore[arg-type]

    async def read_facts(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """GPU, VRAM, RAM and load, asked with standard tools over the node's own
        transport (FACTS_COMMAND); a node that can't tell keeps what it had.  A failure
        here never marks the node down: the facts are extra."""
        try:
            out = await self.transport.run_shell(FACTS_COMMAND, timeout or self.probe_timeout)
        except (MeshError, asyncio.TimeoutError, OSError) as exc:
            logger.debug("%s: no node facts: %s", self.name, exc)
            return self.facts
        if out is not None:
            self.facts = parse_node_facts(out)
        self.facts_at = time.monotonic()
        return self.facts

    def can_hold(self, model: str) -> bool:
        """False only when the facts say this node can't hold the model (fits_in_memory)."""
        key = model_key(model)
        if key in self.loaded:
            return True
        return fits_in_memory((self.models.get(key) or {}).get("size"), self.facts)

    async def call(self, method: str, path: str, body: Optional[bytes], *,
                   timeout: Optional[float]) -> Tuple[int, Dict[str, str], bytes]:
        """One whole exchange with any method (DELETE /api/delete, HEAD /api/blobs/...):
        (status, lowercased headers, body).  A reply whose every read waits more than
        `timeout` seconds is a NodeError."""
        ex = await self.open(path, body, first_byte_timeout=timeout, method=method)
        try:
            data = await ex.read_body(timeout, limit=64 << 20)
        except asyncio.TimeoutError:
            raise NodeError(self.name, f"{path}: reply stalled") from None
        except ProtocolError as exc:
            raise NodeError(self.name, f"{path}: {exc}") from None
        finally:
            await ex.close()
        return ex.status, ex.headers, data

    async def refresh(self) -> None:
        """Version, models and loaded models, through the node's transport.  The three
        requests go out together: one round trip on a real link, not three."""
        paths = ("/api/version", "/api/tags", "/api/ps")
        version, tags, ps = await self.get_jsons(paths)
        if "version" not in version:
            raise NodeError(self.name, "not Ollama (/api/version has no version)")
        if not isinstance(tags.get("models"), list):
            raise NodeError(self.name, "not Ollama (/api/tags has no model list)")
        if self.version != str(version["version"]):
            self.unsupported = set()    # a new Ollama may have the endpoints the old one lacked
        self.version = str(version["version"])
        self.models = {model_key(m.get("name") or m.get("model", "")): m
                       for m in tags["models"] if isinstance(m, dict)}
        self.loaded = {model_key(m.get("name") or m.get("model", "")): m
                       for m in (ps.get("models") or []) if isinstance(m, dict)}
        self.inventory_at = time.monotonic()
        self.route.set_loaded(list(self.loaded), self.inventory_at)


# ---------------------------------------------------------------------------
# Orchestrator: the public API.
# ---------------------------------------------------------------------------

class RawStream:
    """A node's reply as the bytes the node sent: what `serve` relays.

    Async iteration yields byte blocks of whole NDJSON lines (or whole SSE events, for
    `text/event-stream`), exactly as the node sent them, as many as had arrived at
    each read: one block per wake-up, not one per token.  Nothing after the reply's end
    is passed on (Ollama's final `"done": true` line, `data: [DONE]`, `message_stop`).
    `node` is the node's name, `content_type` the node's Content-Type.  After the end,
    `final` is the final line decoded (Ollama's statistics: eval_count, eval_duration,
    prompt_eval_count, prompt_eval_duration, load_duration, total_duration) or None.
    A failure after the first block raises StreamInterruptedError; closing early
    (aclose) ends the node's request, and with it the ssh child or channel.  A stream
    let go without aclose (a caller that left `async for` early) is closed soon after
    on its event loop, as asyncio closes an async generator let go (__del__)."""

    def __init__(self, orch: "MeshOrchestrator", node: SSHNode, ex: _Exchange, path: str,
                 streaming: bool) -> None:
        self._orch, self._node, self._ex = orch, node, ex
        self._loop = asyncio.get_running_loop()
        self.node = node.name
        self.status = ex.status
        self.content_type = ex.headers.get("content-type") or "application/x-ndjson"
        self.sse = "text/event-stream" in self.content_type.lower()
        # A whole (stream=false) reply is one line: as large as any reply mesh reads whole
        # (read_body's 256 MiB: an embeddings answer for thousands of inputs passes 64 MiB) -
        # also one relayed as it comes (OpenAI's /v1/embeddings: application/json, not a stream).
        whole = not streaming or not (self.sse or "ndjson" in self.content_type.lower())
        self._scan = ReplyScanner(sse=self.sse, strict=streaming,
                                  max_line=(256 if whole else 64) * 1024 * 1024)
        self._path = path
        self._streaming = streaming
        self._first = b""
        self._relayed = False
        self._ended = False
        self._closed = False
        self._error: Optional[NodeError] = None
        self._handed_off = False         # the exchange finishes its body in the background
        self._whole: Dict[str, Any] = {}  # stream=False: the answer
        self.whole_bytes: Optional[bytes] = None   # ... and its bytes, when the node sent one object
        self.route_req: Optional[RouteRequest] = None   # what the balancer planned, if it did
        # stream=False: a single-object answer longer than this is not decoded (see _collect)
        self.decode_limit: Optional[int] = None

    @property
    def final(self) -> Optional[Dict[str, Any]]:
        return self._scan.final_obj() if self._ended else None

    @property
    def usage(self) -> Optional[Dict[str, Any]]:
        """After the end of an SSE reply: its last event with token counts ("usage"), or None."""
        return self._scan.usage_obj() if self._ended else None

    def __aiter__(self) -> "RawStream":
        return self

    async def __anext__(self) -> bytes:
        if self._first:
            block, self._first = self._first, b""
            self._relayed = True
            return block
        try:
            block = await self._next_block()
        except NodeError as exc:
            await self.aclose()
            raise self._interrupted(exc) from None
        except BaseException:
            await self.aclose()
            raise
        if not block:
            await self.aclose()
            raise StopAsyncIteration
        self._relayed = True
        return block

    @staticmethod
    def _interrupted(exc: NodeError) -> StreamInterruptedError:
        return StreamInterruptedError(f"{exc} (after part of the answer was sent; not retried)",
                                      node=exc.node, reason=exc.reason)

    @property
    def complete(self) -> bool:
        """The reply has ended properly and all of it has been handed out."""
        return self._ended and self._error is None and not self._first

    async def relay_rest(self, write: Any, drain: Any, write_chunk: Any = None, write_end: Any = None) -> None:
        """Pass the rest of the reply on as it arrives: write(block) for each block (the
        node's bytes, whole lines or events, as iteration yields them); when write returns
        True the receiver is full, and the node is not read until `await drain()`
        returns.  Returns at the reply's proper end, closed; raises
        StreamInterruptedError as iteration does, and closes the stream on any exception.
        On a node's socket (HTTP, or an SSH forward) the bytes go from the connection's
        data_received through the dechunker and the scanner to write() in the same call,
        no await per read (_NodeRelay); else by iteration.  write_chunk(chunk, size) and
        write_end(block), if given (Exchange.relay_writers), take a read that is exactly
        one of the node's chunks holding one token line, as the node framed it, and the
        block that ends the reply properly (ending the receiver's body with it)."""
        if self._first:
            block, self._first = self._first, b""
            self._relayed = True
            if (write_end if write_end is not None and self.complete else write)(block):
                await drain()
        relay = _NodeRelay.start(self, write, write_chunk, write_end)
        if relay is None:
            async for block in self:
                if write(block):
                    await drain()
            return
        try:
            while not relay.ended:
                await relay.wait()
                if relay.full and not relay.ended:
                    await drain()
                    relay.resume()
        except BaseException:
            relay.stop()
            await self.aclose()
            raise
        await self.aclose()
        if relay.error is not None:
            raise self._interrupted(relay.error)

    async def _read_whole(self) -> bool:
        """stream=False: when the node's Content-Length body has wholly arrived already
        (its usual case: one write from the node), take it in one read, with no idle
        timer and, for one "done" object, one decode (ReplyScanner.whole_object); as
        _prime would, `_first` then holds it.  False, nothing read, when more must
        still come: then _prime reads as for a stream."""
        ex = self._ex
        remaining = ex._remaining
        buffered = getattr(ex.reader, "_buffer", None)    # asyncio.StreamReader's own buffer
        if remaining is None or ex.leftover or ex._dechunk is not None or buffered is None \
                or len(buffered) < remaining or ex._complete:
            return False
        data = ex.unframe(await ex.reader.readexactly(remaining))
        if self._scan.whole_object(data):
            self._first = data
            self._ended = True
            self._finish(None)
            return True
        out = self._take(data, None, True)
        if out is None:
            out = self._take(b"", None, True)    # the body's end: a last line without its newline
        if not out:
            await self.aclose()
            raise NodeError(self.node, "empty reply")
        self._first = out
        return True

    async def _prime(self) -> None:
        """Read up to the first whole line: a node that fails before it can still be
        replaced by another (nothing was passed on yet)."""
        self._first = await self._next_block()
        if not self._first:
            await self.aclose()
            raise NodeError(self.node, "empty reply")

    async def _next_block(self) -> bytes:
        """The next block to pass on; b"" at the reply's proper end; NodeError otherwise."""
        if self._error is not None:
            raise self._error
        if self._ended:
            return b""
        ex = self._ex
        first = not self._relayed and not self._first
        try:
            while True:
                cut: Optional[_CutOff] = None
                try:
                    data = await ex.read_payload()
                except _CutOff as exc:
                    data, cut = b"", exc
                out = self._take(data, cut, first)
                if out is not None:
                    return out
        except asyncio.TimeoutError:
            raise _Silent(self.node, f"no data for idle_timeout={self._orch.idle_timeout:g}s",
                          retryable=first) from None
        except ProtocolError as exc:
            raise NodeError(self.node, f"bad reply: {exc}", retryable=first) from None

    def _take(self, data: bytes, cut: Optional[_CutOff], first: bool) -> Optional[bytes]:
        """One piece of the body's payload (b"": the body or the connection ended, `cut`
        saying which) through the scanner: the block to pass on, b"" at the proper end,
        None when more must be read first; NodeError when the reply must end here."""
        scan, node = self._scan, self.node
        had_error = scan.error
        out = scan.feed(data) if data else scan.finish()
        if scan.error:
            reason = scan.error if scan.node_error is not None else f"bad reply: {scan.error}"
            if cut is not None and not had_error and scan.node_error is None:
                reason = f"bad reply: {cut}"   # the connection ended inside that line: half a line
            self._error = NodeError(node, reason, retryable=first and not out, mark_down=scan.node_error is None)
            if not out:
                raise self._error
            return out
        if scan.done or not data:
            self._ended = True
            try:
                self._finish(cut)
            except NodeError:
                if not out:
                    raise
                return out      # pass on what came; the error (self._error) ends the reply next
            if not out and scan.lines == 0 and not scan.sse:
                raise NodeError(node, "empty reply", retryable=first)
            return out
        return out or None

    def _finish(self, cut: Optional[ProtocolError]) -> None:
        """The reply ended: its final line, the body's end, or the connection's (cut).
        A final line is what counts: a node that closes right after it has answered."""
        scan, ex = self._scan, self._ex
        if not scan.done and self._streaming and not scan.sse and \
                self._path in ("/api/generate", "/api/chat") and scan.lines:
            last = scan.final_obj() or {}
            if "done_reason" not in last:
                # Ollama always ends a stream with a done line: anything else was cut off.
                how = "the connection closed inside the body" if cut is not None else \
                    'the body ended with no "done": true line'
                self._error = NodeError(self.node, f"stream ended before its final line (truncated: {how})",
                                        retryable=False)
                raise self._error
        elif cut is not None and not scan.done:
            # Nothing handed on yet: another node may answer - for a whole answer (stream=false)
            # however much of it came, as its first whole line is all of it.
            self._error = NodeError(self.node, f"bad reply: {cut}",
                                    retryable=not self._relayed and (not scan.lines or not self._streaming))
            raise self._error
        if cut is not None:
            ex.retire = True
        if scan.extra or ex.leftover:
            ex.retire = True      # bytes after the end: the connection is not trusted again
        elif not ex._complete and ex.proc is None:
            # Stopped at the final line; the body's last chunk is usually a moment behind:
            # wait for it in the background, so the connection can serve again.
            self._handed_off = True
            self._orch._spawn(ex.finish_body())
        self._node.served += 1

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self._handed_off:
                await self._ex.close()
        finally:
            # (the final line only for a request the balancer planned: it learns from it)
            req = self.route_req
            self._orch._release(self._node, req, self.final if req is not None and req.ticket else None)

    async def __aenter__(self) -> "RawStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Let go unclosed: `async for chunk in await mesh.generate(..., stream=True)` left by
        # break, return or an exception.  asyncio closes an async generator let go that way
        # (its asyncgen hooks); a class must do it itself, or the node's slot stays taken
        # and its request (socket, channel, ssh child) runs on.  aclose() goes on the loop.
        if getattr(self, "_closed", True):     # closed, or never made whole (__init__ raised)
            return
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._orch._spawn, self.aclose())
            return
        proc = self._ex.proc             # no loop left to reap it: end the ssh child at least
        if proc is not None and proc.returncode is None:
            try:
                os.killpg(proc.pid, _SIGKILL)
            except OSError:
                pass


_IDLE_LOOKS = 8     # _NodeRelay's idle timer looks this often per idle_timeout (at most 1/8 late)


class _NodeRelay:
    """The protocol of a node's connection while its streamed reply is relayed
    (RawStream.relay_rest): asyncio hands each read to data_received, which takes the
    framing off (_Exchange.unframe), scans (RawStream._take) and passes the block to
    the receiver's write() - the data path without a StreamReader wake-up, a task step
    and a chain of awaits per read.  One idle timer for the whole relay.  When the
    receiver is full, the node's socket is not read (pause_reading) until the relay's
    task has drained it.  At the reply's end (or any failure) the connection's own
    StreamReader protocol is put back before anything else runs, so the connection is
    pooled, finished in the background (finish_body) or retired exactly as after
    iteration."""

    def __init__(self, raw: RawStream, write: Any, transport: Any, write_chunk: Any = None,
                 write_end: Any = None) -> None:
        self.raw, self.ex, self.write, self.write_end = raw, raw._ex, write, write_end
        # A node chunk passes on as it is when both sides are chunked and nothing but
        # the scanner must look at it (not SSE: events may span chunks).
        self.write_chunk = write_chunk if raw._ex._dechunk is not None and not raw.sse else None
        self.transport = transport
        self.orig = transport.get_protocol()
        self.loop = asyncio.get_running_loop()
        self.timeout = raw._orch.idle_timeout
        self.ended = False
        self.full = False
        self.error: Optional[NodeError] = None
        self.seen = False              # data since the idle timer last looked
        self.quiet = 0                 # the timer's looks in a row that saw no data
        self._waiter: Any = None
        self._timer: Any = None

    @classmethod
    def start(cls, raw: RawStream, write: Any, write_chunk: Any = None,
              write_end: Any = None) -> "Optional[_NodeRelay]":
        """Take over the connection's reads, or None when it is not a socket whose
        buffered bytes are all taken (then the caller iterates)."""
        ex = raw._ex
        if raw._ended or raw._error is not None or ex.proc is not None or ex._complete or ex.leftover:
            return None
        reader, transport = ex.reader, getattr(ex.writer, "transport", None)
        buffered = getattr(reader, "_buffer", None)      # asyncio.StreamReader's, not yet read
        if transport is None or not hasattr(transport, "set_protocol") or buffered is None or buffered \
                or reader.exception() is not None or reader.at_eof() or transport.is_closing():
            return None
        relay = cls(raw, write, transport, write_chunk, write_end)
        ex.unwatch()                      # this relay's own idle timer takes over
        if relay.timeout:
            relay._timer = relay.loop.call_later(relay.timeout / _IDLE_LOOKS, relay._check)
        transport.set_protocol(relay)
        return relay

    # -- asyncio's protocol calls ------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.seen = True
        if self.write_chunk is not None and self._one_token_chunk(data):
            return
        raw, ex = self.raw, self.ex
        try:
            payload = ex.unframe(data)
            if payload:
                self._pass(raw._take(payload, None, False))
            if ex._complete and not raw._ended and raw._error is None:
                # The body's end, the scanner's too: what came with it is passed on
                # before an error that end may raise (a reply without its final line).
                self._pass(raw._take(b"", None, False))
        except NodeError as exc:
            self._end(exc)
            return
        except ProtocolError as exc:
            self._end(NodeError(raw.node, f"bad reply: {exc}", retryable=False))
            return
        if raw._error is not None:
            self._end(raw._error)
        elif raw._ended:
            self._end(None)

    def _one_token_chunk(self, data: bytes) -> bool:
        """The usual read of a token stream: exactly one whole chunk holding one token
        line (ReplyDechunker.one_chunk, ReplyScanner.token_line), passed on as the node
        framed it.  True when it was."""
        dechunk = self.ex._dechunk
        payload = dechunk.one_chunk(data) if dechunk is not None else None
        if payload is None or not self.raw._scan.token_line(payload):
            return False
        self.raw._relayed = True
        self._sent(self.write_chunk(data, len(payload)))
        return True

    def _pass(self, block: Optional[bytes]) -> None:
        """A block to the receiver (the one that ends the reply properly by write_end)."""
        if not block:
            return
        raw = self.raw
        raw._relayed = True
        end = self.write_end is not None and raw._ended and raw._error is None
        self._sent((self.write_end if end else self.write)(block))

    def _sent(self, full: bool) -> None:
        """After a write: when the receiver is full, stop reading the node."""
        if full and not self.full:
            self.full = True
            self.transport.pause_reading()
            self._wake()

    def eof_received(self) -> Any:
        self._cut()
        return self.orig.eof_received()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self._cut()
        self.orig.connection_lost(exc)

    def pause_writing(self) -> None:
        self.orig.pause_writing()

    def resume_writing(self) -> None:
        self.orig.resume_writing()

    def _cut(self) -> None:
        """The connection ended (EOF or lost) while this relay had it."""
        if self.ended:
            return
        raw = self.raw
        cut: Optional[_CutOff] = None
        try:
            self.ex.unframe(b"")
        except _CutOff as exc:
            cut = exc
        try:
            self._pass(raw._take(b"", cut, False))
        except NodeError as exc:
            self._end(exc)
            return
        self._end(raw._error)

    def _check(self) -> None:
        """The idle timer, every idle_timeout / _IDLE_LOOKS: the reply ends once that many
        looks in a row saw no data - after a silence of idle_timeout to idle_timeout plus
        one look, without a clock read per chunk."""
        if self.ended:
            return
        if self.seen or self.full:        # a full receiver is not the node's silence
            self.seen = False
            self.quiet = 0
        else:
            self.quiet += 1
            if self.quiet >= _IDLE_LOOKS:
                self._end(NodeError(self.raw.node, f"no data for idle_timeout={self.timeout:g}s",
                                    retryable=False))
                return
        self._timer = self.loop.call_later(self.timeout / _IDLE_LOOKS, self._check)

    # -- for the relay's task --------------------------------------------------------
    def _end(self, error: Optional[NodeError]) -> None:
        self.error = error
        self.stop()
        self._wake()

    def stop(self) -> None:
        """Give the connection back to its own protocol (reading, if it was paused)."""
        if self.ended:
            return
        self.ended = True
        if self._timer is not None:
            self._timer.cancel()
        self.transport.set_protocol(self.orig)
        if self.full:
            self.full = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    async def wait(self) -> None:
        """Until the relay ended or the receiver is full."""
        if self.ended or self.full:
            return
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def resume(self) -> None:
        """The receiver took its bytes: read the node again."""
        if self.full and not self.ended:
            self.full = False
            self.transport.resume_reading()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Stream:
    """What `await generate(..., stream=True)` returns: an async iterator of chunk
    dicts (each with "node") that ends the node's request (and its ssh child) when
    closed early."""

    def __init__(self, raw: RawStream) -> None:
        self._raw = raw
        self._objs: List[Dict[str, Any]] = []

    @property
    def node(self) -> str:
        return self._raw.node

    def __aiter__(self) -> "_Stream":
        return self

    async def __anext__(self) -> Dict[str, Any]:
        while not self._objs:
            block = await self._raw.__anext__()
            try:
                self._objs = self.decode(block, self._raw)
            except NodeError as exc:
                await self._raw.aclose()
                raise RawStream._interrupted(exc) from None
            self._objs.reverse()
        return self._objs.pop()

    @staticmethod
    def decode(block: bytes, raw: RawStream) -> List[Dict[str, Any]]:
        """A block's lines as dicts, each with "node" (SSE: {"event": text, "node": ...})."""
        if raw.sse:
            return [{"event": block.decode("utf-8", "replace"), "node": raw.node}]
        objs = []
        for line in block.splitlines():
            if line.strip():
                # The relay's scan takes a line in braces for an object without decoding
                # it (ReplyScanner._ndjson); here each is decoded, and one that is not
                # JSON ends the reply as a bad line does there: the lines before it are
                # handed out first, then the reply's next block raises.
                try:
                    obj = json.loads(line)
                except _JSON_ERRORS:
                    obj = None
                if not isinstance(obj, dict):
                    error = NodeError(raw.node, f"bad reply: not JSON: {_excerpt(line)}", retryable=False)
                    if not objs:
                        raise error
                    raw._error = error
                    break
                obj["node"] = raw.node
                objs.append(obj)
        return objs

    async def aclose(self) -> None:
        await self._raw.aclose()

    async def __aenter__(self) -> "_Stream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


class MeshOrchestrator:
    """Routes Ollama requests over the nodes of an SSH config.

    config: SSH config path (default: MESH_SSH_CONFIG, else ~/.ssh/config); it is
    passed to every ssh call as -F when given.  nodes: restrict to these aliases.
    Timeouts are in seconds: connect_timeout (ssh connect and master start),
    first_byte_timeout (until the reply starts; a cold model load takes minutes),
    idle_timeout (silence between chunks).  Masters stay up for control_persist
    seconds after the last use so the next command starts warm; close(stop_masters=True)
    ends the ones this orchestrator started.  facts_ttl (seconds): when set, inventory
    refreshes also re-read each node's GPU/VRAM/RAM/load once they are older (serve sets
    it); else they are read on request (node_facts(), check_node(facts=True)).
    routing: "mesh" (default, or MESH_ROUTING):
    by expected completion time (see Balancer); "score", "least-connections",
    "round-robin": the simple policies, kept for comparison (tests/bench_routing.py).
    retries: how many other nodes a request may go to after a node went silent with
    it (the request had reached the node, which then stopped answering its liveness
    probe: the node may still be generating).  Failures where the node never took the
    request (ssh can't connect, channel refused, 5xx, busy, model missing) fail over
    to every other candidate as before; a node that keeps answering is waited for.
    max_starts: ssh masters connecting at once (default 64); the others wait their turn.
        With more ssh nodes than that, each node's ssh port is first knocked on (a
        plain TCP connect, closed at once): answering nodes start first, refusing and
        silent ones are down without an ssh process (start_rank).
    """

    def __init__(self, config: Optional[str] = None, nodes: Optional[Sequence[str]] = None, *,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 first_byte_timeout: Optional[float] = DEFAULT_FIRST_BYTE_TIMEOUT,
                 idle_timeout: Optional[float] = DEFAULT_IDLE_TIMEOUT,
                 control_persist: int = DEFAULT_CONTROL_PERSIST,
                 liveness_interval: float = LIVENESS_INTERVAL,
                 ssh: str = "ssh", default_model: Optional[str] = None,
                 facts_ttl: Optional[float] = None, routing: Optional[str] = None,
                 retries: int = DEFAULT_RETRIES, max_starts: int = MAX_MASTER_STARTS) -> None:
        explicit = config or os.environ.get("MESH_SSH_CONFIG") or None
        self.routing = routing or os.environ.get("MESH_ROUTING") or "mesh"
        if self.routing not in ROUTING_POLICIES:
            raise UsageError(f"routing={self.routing!r}: one of {', '.join(ROUTING_POLICIES)}")
        self.config_path = os.path.expanduser(explicit) if explicit else default_config_path()
        if explicit and not os.access(self.config_path, os.R_OK):
            where = "--config/config=" if config else "MESH_SSH_CONFIG="
            what = "no such file" if not os.path.exists(self.config_path) else "cannot read it"
            raise UsageError(f"{where}{self.config_path}: {what}")
        self.connect_timeout = connect_timeout
        self.first_byte_timeout = first_byte_timeout
        self.idle_timeout = idle_timeout
        self.liveness_interval = liveness_interval
        if retries < 0:
            raise UsageError(f"retries={retries}: must be 0 or more")
        self.retries = retries
        self.start_gate = _StartGate(max_starts)   # ssh masters connecting at once, for all nodes
        self.facts_ttl = facts_ttl   # re-read node facts (GPU, RAM, load) this often on refresh; None: on request
        self.default_model = default_model or os.environ.get("MESH_MODEL") or DEFAULT_MODEL
        self._only = nodes
        self.ssh_config = self.config_path if explicit else None   # passed to ssh as -F
        self._ssh_config = self.ssh_config
        self._ssh, self._control_persist = ssh, control_persist
        self._pass_config = bool(explicit)
        self.probe_timeout = min(PROBE_TIMEOUT, max(1.0, connect_timeout))
        self._watch_paths: Optional[List[str]] = None    # _stat_config: what to stat, and its last stamp
        self._watch_stamp: Tuple[Any, ...] = ()
        self._config_stamp = self._stat_config()
        self._ctl_dir: Optional[str] = None
        specs = load_node_specs(self.config_path, only=nodes, ssh=ssh, pass_config=self._pass_config)
        self.nodes: List[SSHNode] = [self._make_node(spec) for spec in specs]
        self._by_name = {n.name: n for n in self.nodes}
        self._count_ssh_nodes()
        # No Host in the SSH config: the local Ollama stands in (load_node_specs); its
        # failures then mean "nothing to use", which the user is told in those words.
        self.implicit_local = any(spec.fallback for spec in specs)
        self.router = Balancer()
        for n in self.nodes:
            self.router.nodes[n.name] = n.route
        self._waiting: List[RouteRequest] = []
        self._plan_timer: Any = None
        self._load_watch: Optional[asyncio.Task] = None
        self._load_wake: Any = None
        self._rr = 0
        self._cond: Optional[asyncio.Condition] = None
        self._tasks: set = set()
        self._refreshing: Dict[str, Any] = {}
        self._queued: Dict[int, Tuple[str, ...]] = {}    # simple policies: queued request -> nodes it may go to
        self._retired: List[SSHNode] = []                # removed or changed nodes still finishing
        self._reload_wanted: Optional[asyncio.Event] = None
        self.reloads = {"ok": 0, "error": 0}
        # how "X: marked down" / "X: back up" are logged: INFO (-v) for commands; serve
        # raises it to WARNING, since for an operator a node leaving or coming back is news
        self.health_log_level = logging.INFO
        self._closed = False

    def _control_dir(self) -> str:
        """The control directory, found and checked once per orchestrator, on first use."""
        if self._ctl_dir is None:
            self._ctl_dir = control_dir()
        return self._ctl_dir

    def _count_ssh_nodes(self) -> None:
        # more ssh nodes than master starts at once: the gate knocks first (start_rank)
        ssh_nodes = [n.transport for n in self.nodes if isinstance(n.transport, SSHTransport)]
        self.start_gate.pool = len(ssh_nodes)
        self.start_gate.knockable = sum(t.knock_address is not None for t in ssh_nodes)

    def _make_node(self, spec: NodeSpec) -> SSHNode:
        if spec.transport == "http":
            transport: Transport = Transport(spec.name, spec.ollama_host, spec.ollama_port,
                                             connect_timeout=self.connect_timeout)
        else:
            transport = SSHTransport(spec.name, spec.ollama_host, spec.ollama_port,
                                     config=self._ssh_config, ssh=self._ssh,
                                     connect_timeout=self.connect_timeout,
                                     control_persist=self._control_persist, mode=spec.transport,
                                     ctl_dir=self._control_dir, destination=spec.destination(),
                                     start_gate=self.start_gate, knock_address=spec.knock_address())
        node = SSHNode(spec, transport)
        node.probe_timeout = self.probe_timeout
        return node

    async def __aenter__(self) -> "MeshOrchestrator":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self, *, stop_masters: bool = False) -> None:
        """Stop background probes and pooled connections.  Masters stay for
        ControlPersist unless stop_masters=True."""
        self._closed = True
        if self._plan_timer is not None:
            self._plan_timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except BaseException:
                pass
        if self._load_watch is not None and not self._load_watch.done():
            # Let it finish a reading in progress (a child cancelled while being spawned
            # could be left unreaped), but not wait on a frozen node.
            self._load_wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._load_watch), 1.0)
            except (asyncio.TimeoutError, Exception):
                self._load_watch.cancel()   # its ssh child is killed and reaped
                try:
                    await self._load_watch
                except BaseException:
                    pass
        await asyncio.gather(*(n.transport.close(stop_master=stop_masters) for n in self.nodes),
                             *(n.transport.retire() for n in self._retired),
                             return_exceptions=True)

    def node(self, name: str) -> SSHNode:
        try:
            return self._by_name[name]
        except KeyError:
            raise UsageError(f"unknown node {name!r} (configured: {', '.join(sorted(self._by_name))})") from None

    # -- health ------------------------------------------------------------
    def _mark_down(self, node: SSHNode, reason: str) -> None:
        if node.healthy:
            logger.log(self.health_log_level, "%s: marked down: %s", node.name, reason)
        node.healthy = False
        node.reason = reason
        node.failures += 1
        node.down_since = node.down_since or time.monotonic()
        if isinstance(node.transport, SSHTransport) and reason.startswith("ssh"):
            node.transport.master_lost()
        if node.retired:
            return  # out of the config: nobody needs it back
        if not self._closed and (node._probe_task is None or node._probe_task.done()):
            node._probe_task = self._spawn(self._reprobe(node))

    def _mark_up(self, node: SSHNode) -> None:
        if not node.healthy:
            logger.log(self.health_log_level, "%s: back up", node.name)
        node.healthy, node.reason, node.failures, node.down_since = True, None, 0, None
        self._notify()
        if self._waiting:
            self._plan()

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _reprobe(self, node: SSHNode) -> None:
        """Background: probe a node in cooldown with backoff until it answers again."""
        delay = COOLDOWN_MIN
        while not node.healthy and not self._closed and not node.retired:
            await asyncio.sleep(delay)
            try:
                await node.transport.prepare()
                await asyncio.wait_for(node.refresh(), self.connect_timeout + self.probe_timeout * 3)
            except (MeshError, asyncio.TimeoutError, OSError) as exc:
                node.reason = getattr(exc, "reason", None) or str(exc) or node.reason
                delay = min(delay * 2, COOLDOWN_MAX)
                continue
            self._mark_up(node)

    def _notify(self) -> None:
        if self._cond is None or not (self._queued or self._retired):
            return      # nobody waits on the condition (_acquire queues, _retire): no task to spawn
        cond = self._cond

        async def wake() -> None:
            async with cond:
                cond.notify_all()
        self._spawn(wake())

    async def watch_health(self, interval: float = HEALTH_INTERVAL) -> None:
        """Background, for `serve`: ask each healthy node every `interval` seconds what
        it has (version, models, loaded models), so a node that dies while idle is seen
        within about `interval` plus the probe timeout, and what is loaded stays current.
        Nodes that are down already have their own re-probe with backoff."""
        while not self._closed:
            await asyncio.sleep(interval)
            for node in list(self.nodes):
                if node.healthy:
                    self._refresh_task(node)

    # -- the SSH config, re-read while running -------------------------------------
    def _stat_config(self) -> Tuple[Any, ...]:
        """A stamp of every file and Include directory the config reads: it differs
        whenever one is edited, replaced, created or deleted.  The list of what to
        stat is kept while none of it changes: which files a config reads can change
        only through one of them (an Include line) or a directory an Include looks in,
        and parsing the config for it again every poll blocked serve for ~20 ms every
        CONFIG_POLL_INTERVAL with 300 hosts."""
        paths = self._watch_paths
        if paths is not None:
            stamp = self._stamp(paths)
            if stamp == self._watch_stamp:
                return stamp
        try:
            paths = SSHConfig(self.config_path).watch_paths()
        except (MeshError, OSError):
            paths = [self.config_path]
        stamp = self._stamp(paths)
        self._watch_paths, self._watch_stamp = paths, stamp
        return stamp

    @staticmethod
    def _stamp(paths: Sequence[str]) -> Tuple[Any, ...]:
        stamp = []
        for path in paths:
            try:
                st = os.stat(path)
                stamp.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamp.append((path, None, None, None))
        return tuple(stamp)

    def request_reload(self) -> None:
        """Have watch_config() re-read the config now (serve's SIGHUP)."""
        if self._reload_wanted is not None:
            self._reload_wanted.set()

    async def watch_config(self, interval: float = CONFIG_POLL_INTERVAL) -> None:
        """Background, for `serve`: stat() the config and its Includes every `interval`
        seconds and apply it again when anything changed (or request_reload() asked):
        see apply_specs.  New and changed nodes are asked for their models at once.  A
        config that does not parse changes nothing; the error is logged and counted in
        self.reloads["error"]."""
        self._reload_wanted = asyncio.Event()
        while not self._closed:
            try:
                await asyncio.wait_for(self._reload_wanted.wait(), interval)
            except asyncio.TimeoutError:
                pass
            asked = self._reload_wanted.is_set()
            self._reload_wanted.clear()
            stamp = self._stat_config()
            if not asked and stamp == self._config_stamp:
                continue
            self._config_stamp = stamp
            try:
                report = self.reload()
            except MeshError as exc:
                self.reloads["error"] += 1
                logger.warning("SSH config changed but was not applied (nodes unchanged): %s", exc)
                continue
            self.reloads["ok"] += 1
            if asked and not any(report.values()):
                # a SIGHUP gets an answer even when there was nothing to do
                logger.warning("SSH config re-read: no change (%d node(s))", len(self.nodes))
            for name in report["added"] + report["changed"]:
                self._refresh_task(self._by_name[name])

    # -- configuration -------------------------------------------------------
    def reload(self) -> Dict[str, List[str]]:
        """Read the SSH config again and apply it (see apply_specs).  Raises
        ConfigError for a config ssh would reject; the nodes stay as they were then."""
        return self.apply_specs(load_node_specs(self.config_path, only=self._only, ssh=self._ssh,
                                                pass_config=self._pass_config))

    def apply_specs(self, specs: Sequence[NodeSpec]) -> Dict[str, List[str]]:
        """Make `specs` the node list.  A node whose destination (NodeSpec.destination:
        what ssh resolves - host, port, user, proxy) is unchanged keeps its master, its
        health and inventory, and takes the new weights and limits; a changed one gets
        a new node with a master of its own, so new requests go to the new machine;
        the old master is retired (ssh -O exit) once its requests in flight are done.
        A removed node takes no new requests; its running ones finish.
        Returns {"added": [...], "changed": [...], "removed": [...]} (aliases)."""
        old = dict(self._by_name)
        nodes: List[SSHNode] = []
        report: Dict[str, List[str]] = {"added": [], "changed": [], "removed": []}
        joined: List[SSHNode] = []
        for spec in specs:
            node = old.pop(spec.name, None)
            if node is not None and node.spec.destination() == spec.destination():
                node.configure(spec)
                nodes.append(node)
                continue
            fresh = self._make_node(spec)
            nodes.append(fresh)
            if node is None:
                report["added"].append(spec.name)
            else:
                report["changed"].append(spec.name)
                self._retire(node)
            joined.append(fresh)
        for node in old.values():
            report["removed"].append(node.name)
            self._retire(node)
        self.nodes = nodes
        self._by_name = {n.name: n for n in nodes}
        self._count_ssh_nodes()
        # the balancer plans over exactly these nodes (a removed one gets no new requests)
        self.router.nodes.clear()
        self.router.nodes.update((n.name, n.route) for n in nodes)
        self.router.nodes_changed()
        self.implicit_local = any(spec.fallback for spec in specs)
        if any(report.values()):
            logger.warning("configuration applied: %s",
                           "; ".join(f"{k} {', '.join(v)}" for k, v in report.items() if v))
        for fresh in joined:
            try:
                self._spawn(self._warm(fresh))
            except RuntimeError:  # no event loop (a synchronous caller): nothing is in use yet
                pass
        self._notify()
        return report

    async def _warm(self, node: SSHNode) -> None:
        """A node that joins while the pool is in use gets the model most in use loaded
        (Ollama's preload: /api/generate with only "model", as `ollama run` sends before
        the first prompt), if it has it and can hold it.  Without this, routing keeps to
        the nodes that have the model loaded while they have free slots - rightly, no
        request should wait for a cold load - and the new node would get no work.  In
        use: loaded on another node and asked for there within NEEDED_WINDOW seconds.
        Errors are logged, never raised."""
        now = time.monotonic()
        use: Dict[str, int] = {}
        for other in self.nodes:
            if other is not node:
                for key, when in other.route.loaded.items():
                    if now - when < NEEDED_WINDOW:
                        use[key] = use.get(key, 0) + 1
        if not use:
            return
        try:
            await self._refresh_task(node)
        except MeshError:
            return
        for key in sorted(use, key=lambda k: -use[k]):
            entry = node.models.get(key)
            if entry is None or node.retired or not node.healthy or not node.can_hold(key):
                continue
            if key not in node.route.loaded:
                name = str(entry.get("name") or entry.get("model"))
                try:
                    await self.request("/api/generate", {"model": name}, node=node.name, stream=False)
                    logger.warning("%s: loaded %s, which the pool is using", node.name, name)
                except MeshError as exc:
                    logger.info("%s: could not load %s for the pool: %s", node.name, name, exc)
            return

    def _retire(self, node: SSHNode) -> None:
        node.retired = True
        self._retired.append(node)
        if self._refreshing.get(node.name) is not None:
            del self._refreshing[node.name]   # the name's next refresh is the new node's

        async def when_idle() -> None:
            if self._cond is None:
                self._cond = asyncio.Condition()
            async with self._cond:
                await self._cond.wait_for(lambda: node.active_requests <= 0)
            await node.transport.retire()
            self._retired.remove(node)
        try:
            self._spawn(when_idle())
        except RuntimeError:  # no event loop (a synchronous caller): retired by close()
            pass

    # -- inventory -----------------------------------------------------------
    @staticmethod
    def check_result(node: SSHNode, error: Optional[str] = None) -> Dict[str, Any]:
        """The shape of one node's `test` result, before anything is known."""
        return {"name": node.name, "display_name": node.display_name, "ok": False, "ssh_ms": None,
                "ollama_ms": None, "version": None, "models": [], "loaded": [], "error": error,
                "transport": node.transport.mode, "facts": dict(node.facts)}

    async def check_node(self, node: SSHNode, *, facts: bool = False) -> Dict[str, Any]:
        """Reach one node and ask its Ollama what it has (for `test` and status).  With
        facts=True, or when facts_ttl is set and they are older, the node's GPU/VRAM/RAM/
        load are read at the same time in the background (node.facts_task; they never
        make the check slower or fail it: result["facts"] holds what was known)."""
        result = self.check_result(node)
        want_facts = facts or (self.facts_ttl is not None and time.monotonic() - node.facts_at > self.facts_ttl)
        if want_facts and (node.facts_task is None or node.facts_task.done()):
            node.facts_task = self._spawn(node.read_facts())
        try:
            started = time.monotonic()
            await node.transport.prepare()
            if isinstance(node.transport, SSHTransport):
                result["ssh_ms"] = round((time.monotonic() - started) * 1000, 1)
            async def ollama() -> None:
                started = time.monotonic()
                await node.refresh()
                result["ollama_ms"] = round((time.monotonic() - started) * 1000, 1)
            await ollama()
        except NodeError as exc:
            result["error"] = exc.reason
            self._mark_down(node, exc.reason)
        except OSError as exc:
            # mesh.py's own limits (out of file descriptors or processes): no ssh could be
            # started; the node is asked again at its next check, like any down node.
            reason = f"mesh.py could not start ssh for it: {exc.strerror or exc}"
            result["error"] = reason
            self._mark_down(node, reason)
        else:
            result.update(ok=True, version=node.version,
                          models=sorted(m["name"] for m in node.models.values()),
                          loaded=sorted(m["name"] for m in node.loaded.values()))
            self._mark_up(node)
        result["transport"] = node.transport.mode
        result["facts"] = dict(node.facts)
        return result

    def _refresh_task(self, node: SSHNode) -> "asyncio.Future[Any]":
        """One inventory refresh per node at a time, shared by every caller."""
        task = self._refreshing.get(node.name)
        if task is None or task.done():
            async def one() -> None:
                try:
                    # The master first: its start may wait its turn (MAX_MASTER_STARTS) behind
                    # hundreds of dead nodes, and is bounded by connect_timeout once it runs -
                    # the time limit below is for the node's own answers, not for that queue.
                    await node.transport.prepare()
                except NodeError as exc:
                    self._mark_down(node, exc.reason)
                    return
                except (MeshError, OSError):
                    pass   # check_node says what it is
                try:
                    await asyncio.wait_for(self.check_node(node), self.connect_timeout + self.probe_timeout * 3)
                except asyncio.TimeoutError:
                    self._mark_down(node, f"no answer within {self.connect_timeout + self.probe_timeout * 3:g}s "
                                          "(node frozen or unreachable?)")
            task = self._spawn(one())
            self._refreshing[node.name] = task
        return task

    def _stale_nodes(self, force: bool = False) -> List[SSHNode]:
        """The healthy nodes whose model lists are older than INVENTORY_TTL (all of them: force)."""
        now = time.monotonic()
        return [n for n in self.nodes if n.healthy and (force or now - n.inventory_at > INVENTORY_TTL)]

    async def refresh(self, *, force: bool = False, model: Optional[str] = None,
                      grace: float = 0.5) -> None:
        """Bring the healthy nodes' model lists up to date, concurrently.

        With `model`, return once some node is known to have it and the others had
        `grace` seconds more to answer: a frozen or dead node (or hundreds of them, whose
        ssh waits out its ConnectTimeout) does not hold every request; they are read in
        the background and join when they answer."""
        stale = self._stale_nodes(force)
        if not stale:
            return
        if any(isinstance(n.transport, SSHTransport) for n in stale):
            self._control_dir()   # an unsafe one is one MeshError here, not one per node's task
        pending = {self._refresh_task(n) for n in stale}
        key = model_key(model) if model else None
        deadline: Optional[float] = None
        while pending:
            if key is not None and deadline is None and any(
                    n.healthy and key in n.models for n in self.nodes):
                # Not "as long again as the first one took": with many dead nodes that time
                # is mostly a wait for a free start (MAX_MASTER_STARTS), not the nodes' own.
                deadline = time.monotonic() + grace
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                return  # grace is over; the slow nodes finish in the background

    async def recheck(self, model: Optional[str] = None, node: Optional[str] = None) -> None:
        """When no healthy node could take `model` (or the pinned `node` is down), probe
        the down nodes that may have it now and wait for their answers (each at most
        connect_timeout + 3 probe timeouts); otherwise return at once.

        For a caller whose event loop sat idle between requests - the chat, blocked in
        readline at its prompt: the background re-probe of a down node only runs while
        the loop does, so without this a restarted node would stay down for the whole
        session.  Raises nothing; what the probes found is in each node's health."""
        key = model_key(model) if model else None
        if node:
            maybe = [self.node(node)]
        else:
            maybe = [n for n in self.nodes if key is None or key in n.models or not n.inventory_at]
        if any(n.healthy for n in maybe):
            return
        down = [n for n in maybe if not n.retired]
        if down:
            await asyncio.wait({self._refresh_task(n) for n in down})

    async def tags(self) -> List[Dict[str, Any]]:
        """The union of models across healthy nodes, each once."""
        await self.refresh()
        merged: Dict[str, Dict[str, Any]] = {}
        for node in self.nodes:
            if node.healthy:
                for key, entry in node.models.items():
                    merged.setdefault(key, dict(entry))
        return sorted(merged.values(), key=lambda m: m.get("name", ""))

    async def ps(self) -> List[Dict[str, Any]]:
        """Loaded models on every healthy node, each entry with a "node" key."""
        await self.refresh(force=True)
        return [dict(entry, node=node.name) for node in self.nodes if node.healthy
                for entry in node.loaded.values()]

    def connections(self) -> List[Dict[str, Any]]:
        """The ssh masters mesh keeps in its control directory, for every config and
        node (list_masters): [{node, since, transport, socket, alive, ollama, config}]."""
        return list_masters(self._control_dir())

    async def stop_connections(self, node: Optional[str] = None) -> List[Dict[str, Any]]:
        """End mesh's masters (all, or the ones for ssh alias `node`); returns those ended."""
        chosen = [m for m in self.connections() if node is None or m["node"] == node]
        await asyncio.gather(*(stop_master(m["socket"]) for m in chosen))
        for n in self.nodes:
            if isinstance(n.transport, SSHTransport) and any(m["socket"] == n.transport.ctl for m in chosen):
                n.transport.master_lost()
        return chosen

    async def node_facts(self) -> Dict[str, Dict[str, Any]]:
        """Every healthy node's facts (parse_node_facts: GPU, VRAM, RAM, load), read now
        and at once: {node: facts}; a node that can't tell gives {}."""
        healthy = [n for n in self.nodes if n.healthy]
        await asyncio.gather(*(n.read_facts() for n in healthy))
        return {n.name: dict(n.facts) for n in healthy}

    # -- model management over the pool (the CLI's list/show/pull/rm/stop) ------
    def _targets(self, nodes: Optional[Sequence[str]]) -> List[SSHNode]:
        return [self.node(n) for n in nodes] if nodes else list(self.nodes)

    async def models(self) -> Dict[str, Any]:
        """Which node has which model, from a fresh inventory of every node:
        {"models": [{name, size, digest, modified_at, details, nodes: [node names]}],
         "down": {node: reason}}.  Sizes are bytes, as /api/tags gives them."""
        await self.refresh(force=True)
        merged: Dict[str, Dict[str, Any]] = {}
        for node in self.nodes:
            if not node.healthy:
                continue
            for key, entry in sorted(node.models.items()):
                row = merged.setdefault(key, dict(entry, nodes=[]))
                row["nodes"].append(node.name)
        return {"models": sorted(merged.values(), key=lambda m: m.get("name", "")),
                "down": {n.name: n.reason for n in self.nodes if not n.healthy}}

    async def show(self, model: str, *, node: Optional[str] = None) -> Dict[str, Any]:
        """Ollama's /api/show for `model` from a node that has it, plus "node".
        Raises ModelNotFoundError (with the closest names) when no healthy node has it."""
        return await self.request("/api/show", {"model": model}, node=node, stream=False)

    async def pull(self, model: str, *, nodes: Optional[Sequence[str]] = None,
                   progress: Optional[Any] = None) -> Dict[str, Optional[str]]:
        """Pull `model` onto the named nodes (default: all), all at once.  progress(node,
        line) is called with each of Ollama's progress lines ({status, digest, total,
        completed}), and with {"error": why} when that node fails (at once, while the
        others go on).  A failure on one node does not stop the others.  Returns
        {node: None on success, else why it failed}."""
        targets = self._targets(nodes)
        await self.refresh(force=True)
        body = json.dumps({"model": model, "stream": True}).encode("utf-8")

        async def one(node: SSHNode) -> Optional[str]:
            why = await pull_one(node)
            if why is not None and progress is not None:
                progress(node.name, {"error": why})
            return why

        async def pull_one(node: SSHNode) -> Optional[str]:
            if not node.healthy:
                return f"down: {node.reason}"
            last: Dict[str, Any] = {}
            try:
                async for obj in self._relay(node, "/api/pull", body, True):
                    last = obj
                    if progress is not None:
                        progress(node.name, obj)
            except NodeError as exc:
                return exc.reason.replace("Ollama error: ", "")
            finally:
                node.inventory_at = 0.0   # its model list changed: read it again
            if last.get("status") != "success":
                return f"pull ended without success (last: {last.get('status')!r})"
            return None

        results = await asyncio.gather(*(one(n) for n in targets))
        return {n.name: r for n, r in zip(targets, results)}

    async def delete(self, model: str, *, nodes: Optional[Sequence[str]] = None) -> Dict[str, Optional[str]]:
        """Remove `model` (DELETE /api/delete) from the named nodes, or from every
        healthy node that has it.  Raises ModelNotFoundError when no node has it.
        Returns {node: None on success, else why it failed}."""
        await self.refresh(force=True)
        key = model_key(model)
        if nodes:
            targets = self._targets(nodes)
        else:
            targets = [n for n in self.nodes if n.healthy and key in n.models]
            if not targets:
                raise self.model_not_found(model)

        async def one(node: SSHNode) -> Optional[str]:
            if not node.healthy:
                return f"down: {node.reason}"
            try:
                await node.get_json("/api/delete", {"model": model}, method="DELETE",
                                    timeout=max(self.probe_timeout, 30.0))
            except NodeError as exc:
                return exc.reason.replace("/api/delete: ", "")
            finally:
                node.inventory_at = 0.0
            node.models.pop(key, None)
            return None

        results = await asyncio.gather(*(one(n) for n in targets))
        return {n.name: r for n, r in zip(targets, results)}

    async def unload(self, model: str, *, nodes: Optional[Sequence[str]] = None) -> Dict[str, Optional[str]]:
        """Unload `model` from memory wherever it is loaded (or on the named nodes), as
        `ollama stop` does: /api/generate with keep_alive 0 and no prompt.  Raises
        MeshError when no node has it loaded.  Returns {node: None or why it failed}."""
        await self.refresh(force=True)
        key = model_key(model)
        targets = self._targets(nodes) if nodes else [n for n in self.nodes if n.healthy and key in n.loaded]
        if not targets:
            if not any(key in n.models for n in self.nodes):
                raise self.model_not_found(model)
            down = "; ".join(f"{n.name} is down ({n.reason})" for n in self.nodes if not n.healthy)
            raise MeshError(f'couldn\'t find model "{model}" to stop (not loaded on any node'
                            + (f"; {down})" if down else ")"))

        async def one(node: SSHNode) -> Optional[str]:
            if not node.healthy:
                return f"down: {node.reason}"
            try:
                await node.get_json("/api/generate", {"model": model, "keep_alive": 0, "stream": False},
                                    timeout=max(self.probe_timeout, 30.0))
            except NodeError as exc:
                return exc.reason.replace("/api/generate: ", "")
            node.loaded.pop(key, None)
            return None

        results = await asyncio.gather(*(one(n) for n in targets))
        return {n.name: r for n, r in zip(targets, results)}

    # -- routing ---------------------------------------------------------------
    def select_best_node(self, model: Optional[str] = None) -> SSHNode:
        """The node the next request for `model` would go to (no waiting, no I/O)."""
        candidates = self._candidates(model, None, set())
        return rank_nodes(candidates, model=model)[0]

    def _candidates(self, model: Optional[str], pinned: Optional[str], exclude: set) -> List[SSHNode]:
        if pinned:
            node = self.node(pinned)
            if node.name in exclude:
                return []
            return [node]
        key = model_key(model) if model else None
        if key is not None:
            # The usual case, in one pass: healthy nodes that have the model (then it is known,
            # and they are what the general rules below would choose too).
            found = [n for n in self.nodes if key in n.models and n.healthy and n.name not in exclude]
            if len(found) > 1:
                found = [n for n in found if n.can_hold(key)] or found
            if found:
                return found
        # A node that is down and was never asked what it has is down, not a place the model
        # may be: otherwise a misspelt model is reported as that node's failure.
        # A node not yet heard from (its master may still be connecting - or never will,
        # on a dead node) is a candidate only while no node is known to have the model.
        known = key is not None and any(n.healthy and key in n.models for n in self.nodes)
        have = [n for n in self.nodes
                if key is None or key in n.models or (n.inventory_at == 0 and n.healthy and not known)]
        if key is not None and not have and any(n.inventory_at for n in self.nodes):
            raise self.model_not_found(model or "")
        healthy = [n for n in have if n.healthy and n.name not in exclude]
        if key is not None and len(healthy) > 1:
            # A node whose memory (VRAM + RAM, from its facts) can't hold the model is left
            # out while another could; if none could, Ollama gets to say so.
            healthy = [n for n in healthy if n.can_hold(key)] or healthy
        if not have:
            reasons = "; ".join(f"{n.name}: {n.reason or 'failed'}" for n in self.nodes)
            raise self._no_nodes(f"no node could be asked for {model or 'requests'}: {reasons}")
        if not healthy:
            reasons = "; ".join(f"{n.name}: {n.reason or 'failed'}" for n in have)
            what = f'model "{model}"' if model else "requests"
            raise NoNodeAvailableError(f"no healthy node can take {what}: {reasons}")
        return healthy

    def model_not_found(self, model: str, asked: Sequence[str] = ()) -> "ModelNotFoundError":
        """The error for a model no healthy node has: which nodes were searched, which
        were down (and why), and the closest names that do exist."""
        searched = [n.name for n in self.nodes if n.healthy and (n.inventory_at or n.name in asked)]
        down = [f"{n.name} ({n.reason or 'down'})" for n in self.nodes if not n.healthy]
        msg = f'model "{model}" not found on any node'
        if searched:
            msg += f" (searched: {', '.join(searched)})"
        if down:
            msg += f"; down: {', '.join(down)}"
        names = sorted({m.get("name") or m.get("model") or "" for n in self.nodes for m in n.models.values()} - {""})
        close = closest_names(model, names)
        if close:
            msg += f"; closest: {', '.join(close)}"
        return ModelNotFoundError(msg)

    def _no_nodes(self, message: str) -> MeshError:
        """A failure of every node; with no node configured, say that instead."""
        if not self.implicit_local:
            return NoNodeAvailableError(message)
        local = self.nodes[0]
        where = self.config_path
        what = "has no Host marked '# mesh: on'" if os.path.exists(where) else "does not exist"
        return NoNodeAvailableError(
            f"no nodes: {where} {what}, and no Ollama answers on this machine "
            f"({local.transport.host}:{local.transport.port}: {local.reason or 'not answering'}). "
            f"Add a node: a Host block with a '# mesh: on' line in {where} (see ssh_config.example, "
            "or run setup-ssh-mesh.sh), "
            "or start Ollama here (OLLAMA_HOST says where it listens)")

    async def _acquire(self, model: Optional[str], pinned: Optional[str], exclude: set,
                       req: Optional[RouteRequest] = None) -> SSHNode:
        """Pick a node and take one of its slots, queueing while all candidates are full."""
        if req is not None and not pinned and self.routing == "mesh":
            return await self._acquire_planned(model, exclude, req)
        if self._cond is None:
            self._cond = asyncio.Condition()
        ticket = id(asyncio.current_task())
        try:
            while True:
                candidates = self._candidates(model, pinned, exclude)
                free = [n for n in candidates if n.active_requests < n.max_concurrent]
                if free:
                    node = self._pick_simple(free, model)
                    node.active_requests += 1
                    return node
                self._queued[ticket] = tuple(n.name for n in candidates)
                async with self._cond:
                    await self._cond.wait()
        finally:
            self._queued.pop(ticket, None)

    def queue_length(self, node: Optional[str] = None) -> int:
        """Requests waiting in mesh.py for a node (planned ones, and under the simple
        policies those for which every node they could go to is at max_concurrent); with
        `node`, those of them this node could take."""
        if node is None:
            return len(self._queued) + len(self._waiting)
        return (sum(1 for names in self._queued.values() if node in names)
                + sum(1 for req in self._waiting if not req.candidates or node in req.candidates))

    def _pick_simple(self, free: List[SSHNode], model: Optional[str]) -> SSHNode:
        """The comparison policies: the original score, fewest in flight, or in turn."""
        if self.routing == "least-connections":
            low = min(n.active_requests for n in free)
            return random.choice([n for n in free if n.active_requests == low])
        if self.routing == "round-robin":
            self._rr += 1
            return free[self._rr % len(free)]
        return rank_nodes(free, model=model)[0]

    async def _acquire_planned(self, model: Optional[str], exclude: set, req: RouteRequest) -> SSHNode:
        """Wait in mesh until the router sends this request to a node (Balancer.plan)."""
        req.candidates = [n.name for n in self._candidates(model, None, exclude)
                          if n.active_requests < n.max_concurrent]
        req.fresh = True        # _plan need not work its candidates out again this time
        req.exclude = exclude
        req.future = asyncio.get_event_loop().create_future()
        self._waiting.append(req)
        self._plan()
        try:
            return await req.future
        except asyncio.CancelledError:
            if req in self._waiting:
                self._waiting.remove(req)
            elif req.future.done() and not req.future.cancelled() and req.future.exception() is None:
                node = req.future.result()
                self.router.finished(req, node.name, time.monotonic(), None)
                self._release(node)
            raise

    def _plan(self) -> None:
        """Send the waiting requests the router says can go now; wake again soon while
        any wait (estimates move with time)."""
        if self._plan_timer is not None:
            self._plan_timer.cancel()
            self._plan_timer = None
        if not self._waiting or self._closed:
            return
        now = time.monotonic()
        for req in self._waiting[:PLAN_DEPTH]:
            if req.fresh:
                req.fresh = False
                continue
            try:
                req.candidates = [n.name for n in self._candidates(req.payload.get("model"), None, req.exclude)
                                  if n.active_requests < n.max_concurrent]
            except MeshError as exc:
                self._waiting.remove(req)
                if not req.future.done():
                    req.future.set_exception(exc)
        explain = logger.isEnabledFor(logging.DEBUG)
        for req, name, expected, why in self.router.plan(self._waiting, now, explain=explain):
            node = self._by_name[name]
            self._waiting.remove(req)
            if req.future.done():
                continue
            node.active_requests += 1
            self.router.dispatched(req, name, expected, now)
            req.concurrency = node.route.busy()
            if explain:
                logger.debug("route %s ~%d prompt tokens -> %s (expected %.2fs, %d waiting): %s",
                             req.model, req.tokens, name, expected, len(self._waiting), why)
            req.future.set_result(node)
        if self._waiting:
            loop = asyncio.get_event_loop()
            self._plan_timer = loop.call_later(0.25, self._plan)
            self._watch_load()   # requests wait: whose else are the nodes busy with?

    def _watch_load(self) -> None:
        """Start reading the nodes' own connection counts (others' requests) once requests
        wait in mesh; it stops by itself when mesh has been idle a while."""
        if self._load_watch is None or self._load_watch.done():
            if len(self.nodes) > 1 and any(isinstance(n.transport, SSHTransport) for n in self.nodes):
                self._load_wake = asyncio.Event()
                self._load_watch = asyncio.ensure_future(self._read_loads())

    async def _read_loads(self) -> None:
        idle_since = time.monotonic()
        unsupported: set = set()
        while not self._closed and time.monotonic() - idle_since < LOAD_IDLE_STOP:
            busy_nodes = [n for n in self.nodes if n.healthy and n.name not in unsupported
                          and isinstance(n.transport, SSHTransport)]
            if self._waiting or any(n.active_requests for n in self.nodes):
                idle_since = time.monotonic()

            async def one(node: SSHNode) -> None:
                before = node.active_requests
                try:
                    busy = await node.busy_connections()
                except (MeshError, asyncio.TimeoutError, OSError):
                    return
                if busy is None:
                    unsupported.add(node.name)
                    return
                if busy < 0:
                    return
                # Ours among them: those in flight, and those that ended too recently to
                # look idle (see count_busy_connections).
                now = time.monotonic()
                node.recent_done = [t for t in node.recent_done if now - t < STREAM_GAP + 0.5]
                ours = min(before, node.active_requests) + len(node.recent_done)
                node.route.external = max(0, busy - ours)
            await asyncio.gather(*(one(n) for n in busy_nodes))
            if self._waiting:
                self._plan()
            try:
                await asyncio.wait_for(self._load_wake.wait(), LOAD_INTERVAL)
            except asyncio.TimeoutError:
                pass
        for node in self.nodes:
            node.route.external = 0

    def _release(self, node: SSHNode, req: Optional[RouteRequest] = None,
                 reply: Optional[Dict[str, Any]] = None) -> None:
        """A request on `node` ended (reply: its final line, None on failure): free its
        slot and tell the balancer what the node reported."""
        node.active_requests -= 1
        node.touched()
        if req is not None and req.ticket:
            loaded = self.router.finished(req, node.name, time.monotonic(), reply, concurrency=req.concurrency)
            req.ticket = 0
            if loaded and len(node.route.loaded) > 1 and not self._closed:
                self._spawn(self._check_unloaded(node))
        self._notify()
        if self._waiting:
            self._plan()

    async def _check_unloaded(self, node: SSHNode) -> None:
        """After a reply that loaded a model: did the node unload another to make room?
        (Then it holds no more models than it has now.)"""
        try:
            ps = await node.get_json("/api/ps")
        except (MeshError, asyncio.TimeoutError, OSError):
            return
        entries = [m for m in (ps.get("models") or []) if isinstance(m, dict)]
        node.loaded = {model_key(m.get("name") or m.get("model", "")): m for m in entries}
        self.router.evicted(node.name, list(node.loaded), time.monotonic())

    async def request(self, path: str, payload: Dict[str, Any], *, node: Optional[str] = None,
                      stream: Optional[bool] = None) -> Any:
        """Send any Ollama API request through the router.  With stream true (Ollama's
        default for generate/chat), returns an async iterator of chunk dicts; else a dict.
        Every result carries "node"."""
        payload = dict(payload)
        if stream is not None:
            payload["stream"] = stream
        streaming = payload.get("stream", True) \
            if path in ("/api/generate", "/api/chat", "/api/pull", "/api/create", "/api/push") \
            else bool(payload.get("stream", False))
        raw = await self.open_stream(path, payload, node=node, stream=streaming)
        if streaming:
            return _Stream(raw)
        return await self._answer(raw)

    async def open_stream(self, path: str, payload: Dict[str, Any], *, node: Optional[str] = None,
                          stream: bool = True, body: Optional[bytes] = None, decode: bool = True) -> RawStream:
        """Route a request and return the reply as a RawStream of the node's own bytes
        (what `serve` relays).  Failover happens here, before anything is returned: a
        node that fails before its first whole line is replaced by the next best one.
        For stream=False the whole reply is read before returning.  `body` is sent as
        is when given (the client's own bytes), else payload as JSON.  A node whose
        Ollama lacks `path` (Go's plain 404) is skipped, and remembered.  Raises
        MeshError (ModelNotFoundError, NoNodeAvailableError, UnsupportedPathError when
        no node can serve `path`, NodeError ...).  decode=False (stream=False, for a
        caller that passes the answer's bytes on, as `serve`): a one-object answer over
        WHOLE_DECODE_LIMIT bytes is checked at its ends only, not decoded - its bytes are in
        raw.whole_bytes and raw._whole is {"node": name}."""
        model = payload.get("model")
        pinned = node
        if pinned is None and model and len(self.nodes) > 1:
            # With one node there is nothing to choose: the request itself tells whether the
            # node has the model (404), one round trip sooner than asking /api/tags first.
            if self._stale_nodes():     # (as refresh would find: most requests have no list to read)
                await self.refresh(model=model)
        if body is None:
            body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        planned = path in _PLANNED_PATHS and isinstance(model, str) and len(self.nodes) > 1
        req = RouteRequest(path, payload, now=time.monotonic()) if planned else None
        # Nodes whose Ollama is known to lack this endpoint are not asked again.
        too_old = [n.name for n in self.nodes if path in n.unsupported]
        tried: set = set(too_old) if not pinned else set()
        failures: List[str] = []
        not_found: List[str] = []
        # Nodes that answered with an error (a 5xx, a reply that is not Ollama's, an error line):
        # each is marked down (if its error says so) only when another node then answers this
        # request - the node's fault; when none can, the request's.  (node, reason, status, mark)
        answered_error: List[Tuple[SSHNode, str, int, bool]] = []
        silent = 0          # nodes that went silent with this request (NodeError.timed_out)
        rechecked = False
        while True:
            try:
                try:
                    chosen = await self._acquire(model, pinned, tried, req)
                except NoNodeAvailableError:
                    if too_old and not failures:
                        raise UnsupportedPathError(
                            f"no node can serve {path}: the Ollama on {', '.join(too_old)} does not support "
                            f"{path} (too old: update Ollama there)") from None
                    raise
            except ModelNotFoundError:
                # The model lists may be up to INVENTORY_TTL old: a model pulled a moment
                # ago on a node is looked for once more before the caller hears "not found".
                stale = [n for n in self.nodes if n.healthy and time.monotonic() - n.inventory_at > 2.0]
                if rechecked or not stale or pinned:
                    raise
                rechecked = True
                await self.refresh(force=True, model=model)
                continue
            except MeshError as exc:
                if not_found and not isinstance(exc, UsageError):
                    try:  # the closest names need the model lists (a single node skips them)
                        await asyncio.wait_for(self.refresh(), self.probe_timeout)
                    except (MeshError, asyncio.TimeoutError):
                        pass
                    raise self.model_not_found(model or "", not_found) from None
                if failures and not isinstance(exc, UsageError):
                    if answered_error and len(answered_error) == len(failures):
                        raise RequestFailedError("every node failed: " + "; ".join(failures),
                                                 status=answered_error[-1][2]) from None
                    raise self._no_nodes("every node failed: " + "; ".join(failures)) from None
                if isinstance(exc, NoNodeAvailableError) and self.implicit_local:
                    raise self._no_nodes(str(exc)) from None
                raise
            try:
                raw = await self._attempt(chosen, path, body, stream, req,
                                          decode_limit=None if decode else WHOLE_DECODE_LIMIT)
            except _ClientError:
                raise
            except _UnsupportedPath as exc:
                chosen.unsupported.add(path)
                too_old.append(chosen.name)
                tried.add(chosen.name)
                if pinned:
                    raise UnsupportedPathError(str(exc)) from None
                logger.info("%s; trying another node", exc)
            except NodeError as exc:
                if not exc.retryable:
                    raise
                tried.add(chosen.name)
                failures.append(str(exc))
                if exc.status == 404 and model:
                    chosen.models.pop(model_key(model), None)
                    not_found.append(chosen.name)
                    if pinned:
                        raise ModelNotFoundError(f'model "{model}" not found on node {chosen.name}') from None
                elif exc.answered and exc.status != 503:
                    # (a 5xx is an answer too; 503: Ollama's queue is full - the node is busy, not the
                    # request at fault)
                    status = exc.status if (exc.status or 0) >= 500 else 502 if exc.mark_down else 500
                    if pinned:      # the node the client chose answered: its error is the answer
                        raise RequestFailedError(str(exc), status=status) from None
                    answered_error.append((chosen, exc.reason, status, exc.mark_down))
                elif exc.mark_down:
                    self._mark_down(chosen, exc.reason)
                if pinned:
                    raise
                if exc.timed_out:
                    # The node had the request and went silent: it may be generating still.
                    # One prompt is not run on node after node (retries, --retries).
                    silent += 1
                    if silent > self.retries:
                        message = f"{exc.reason}; not sent to another node (retries={self.retries})"
                        if len(failures) > 1:
                            message += "; before: " + "; ".join(failures[:-1])
                        raise NodeError(exc.node, message, timed_out=True) from None
                logger.info("%s failed before the first byte; trying another node: %s", chosen.name, exc.reason)
            else:
                for node_, reason, _, mark in answered_error:   # another node answered what they failed
                    if mark:
                        self._mark_down(node_, reason)
                return raw

    async def _attempt(self, node: SSHNode, path: str, body: bytes, streaming: bool,
                       req: Optional[RouteRequest] = None, *, decode_limit: Optional[int] = None) -> RawStream:
        """One node's try: the reply's head and its first whole line (all of it for
        stream=False).  The node's slot is released on failure, else when the stream closes."""
        try:
            ex = await node.open(path, body, first_byte_timeout=self.first_byte_timeout,
                                 liveness_interval=self.liveness_interval, patient=True)
        except BaseException:
            self._release(node, req)
            raise
        raw = RawStream(self, node, ex, path, streaming)
        raw.route_req = req
        raw.decode_limit = decode_limit
        try:
            if ex.status != 200:
                try:
                    data = await ex.read_body(self.idle_timeout, limit=1 << 20)
                except (ProtocolError, asyncio.TimeoutError):
                    data = b""
                self._refused(node, path, ex, data)
            ctype = ex.headers.get("content-type", "")
            if ctype and "json" not in ctype and not raw.sse:
                raise NodeError(node.name, f"not Ollama (reply is {ctype})")
            if streaming or not await raw._read_whole():
                ex.watch(self.idle_timeout)
                await raw._prime()
            if not streaming:
                raw._whole = await self._collect(raw)
        except BaseException as exc:
            if isinstance(exc, NodeError) and not isinstance(exc, _Silent):
                exc.answered = True     # (the node answered: see open_stream)
            await raw.aclose()
            raise
        return raw

    async def _collect(self, raw: RawStream, limit: int = 256 * 1024 * 1024) -> Dict[str, Any]:
        """A whole (stream=False) reply as one dict: the final done line when the node
        sent lines, else the one JSON object.  Anything after done is ignored."""
        parts, size = [raw._first], len(raw._first)
        raw._first = b""
        while True:
            block = await raw._next_block()
            if not block:
                break
            parts.append(block)
            size += len(block)
            if size > limit:
                raise NodeError(raw.node, "reply too large")
        data = b"".join(parts)
        obj = raw._scan.final_obj() if raw._scan.final is not None else None
        if obj is not None:
            obj = dict(obj)       # the answer (it gets "node"); final_obj stays the node's line
            if raw._scan.lines > 1:
                obj = self._merge_lines(data, obj)
            else:
                raw.whole_bytes = data
        if obj is None and raw.decode_limit is not None and len(data) > raw.decode_limit \
                and data.lstrip()[:1] == b"{" and data.rstrip()[-1:] == b"}":
            # A large object (embeddings for many inputs) that is passed on as its bytes: not
            # decoded only to be checked - 16 MB took ~0.35 s here, while every other stream
            # waited; an error answer is small, and is decoded.
            raw.whole_bytes = data
            return {"node": raw.node}
        if obj is None:
            try:
                obj = json.loads(data)
                raw.whole_bytes = data
            except _JSON_ERRORS:
                obj = raw._scan.final_obj()   # several lines, none done: the last one
                obj = dict(obj) if isinstance(obj, dict) else obj
        if not isinstance(obj, dict):
            raise NodeError(raw.node, f"bad reply: not a JSON object: {_excerpt(data)}")
        if "error" in obj and len(obj) <= 2:
            raise NodeError(raw.node, f"Ollama error: {obj['error']}", mark_down=False)
        obj["node"] = raw.node
        return obj

    async def _relay(self, node: SSHNode, path: str, body: bytes, streaming: bool
                     ) -> AsyncIterator[Dict[str, Any]]:
        """One node, no failover and no queueing (pull and the like on every node): the
        reply's lines as dicts with "node".  Failures raise NodeError, midway too."""
        node.active_requests += 1          # released by _attempt on failure, else by aclose
        raw = await self._attempt(node, path, body, streaming)
        try:
            if not streaming:
                yield raw._whole
                return
            block, raw._first = raw._first, b""
            while block:
                for obj in _Stream.decode(block, raw):
                    yield obj
                block = await raw._next_block()
        finally:
            await raw.aclose()

    @staticmethod
    def _refused(node: SSHNode, path: str, ex: _Exchange, data: bytes) -> None:
        """Raise what a non-200 reply means: the endpoint missing on an old Ollama
        (Go's plain-text 404), the request's own fault (4xx, not retried), or the
        node's (retried elsewhere)."""
        if is_unsupported_reply(ex.status, ex.headers, data):
            raise _UnsupportedPath(node.name, path, node.version)
        msg = error_message(ex.status, data)
        if 400 <= ex.status < 500 and ex.status != 404:
            raise _ClientError(ex.status, msg, node.name)
        raise NodeError(node.name, msg, status=ex.status, mark_down=ex.status >= 500 and ex.status != 503)

    @staticmethod
    def _merge_lines(data: bytes, final: Dict[str, Any]) -> Dict[str, Any]:
        """A node that streamed although asked not to: its text joined into the final
        line, as Ollama itself answers stream=False."""
        pieces: List[str] = []
        for line in data.splitlines():
            try:
                obj = json.loads(line)
            except _JSON_ERRORS:
                continue
            if isinstance(obj, dict):
                piece = obj.get("response")
                if piece is None and isinstance(obj.get("message"), dict):
                    piece = obj["message"].get("content")
                if isinstance(piece, str):
                    pieces.append(piece)
        if "response" in final:
            final["response"] = "".join(pieces)
        elif isinstance(final.get("message"), dict):
            final["message"]["content"] = "".join(pieces)
        return final

    async def _answer(self, raw: RawStream) -> Dict[str, Any]:
        try:
            return raw._whole
        finally:
            await raw.aclose()

    # -- the familiar calls ------------------------------------------------------
    async def generate(self, prompt: str, model: Optional[str] = None, *, node: Optional[str] = None,
                       system: Optional[str] = None, stream: bool = False,
                       options: Optional[Dict[str, Any]] = None, **extra: Any) -> Any:
        """Ollama's /api/generate on the best node.  stream=False: the response dict
        (plus "node"); stream=True: an async iterator of chunk dicts."""
        payload: Dict[str, Any] = {"model": model or self.default_model, "prompt": prompt, **extra}
        if system is not None:
            payload["system"] = system
        if options:
            payload["options"] = options
        return await self.request("/api/generate", payload, node=node, stream=stream)

    async def chat(self, messages: List[Dict[str, Any]], model: Optional[str] = None, *,
                   node: Optional[str] = None, stream: bool = False,
                   options: Optional[Dict[str, Any]] = None, **extra: Any) -> Any:
        """Ollama's /api/chat on the best node; shapes as generate()."""
        payload: Dict[str, Any] = {"model": model or self.default_model, "messages": messages, **extra}
        if options:
            payload["options"] = options
        return await self.request("/api/chat", payload, node=node, stream=stream)

    async def embed(self, input: Any, model: Optional[str] = None, *, node: Optional[str] = None,
                    **extra: Any) -> Dict[str, Any]:
        """Ollama's /api/embed: {"embeddings": [[...]], "node": ...}."""
        payload = {"model": model or self.default_model, "input": input, **extra}
        return await self.request("/api/embed", payload, node=node, stream=False)

    # -- model management across the pool -------------------------------------------
    # Each operation reads the model lists fresh first and again right after, so the
    # next request (and /api/tags) sees the change.

    async def nodes_with(self, model: str, *, loaded: bool = False) -> List[SSHNode]:
        """Healthy nodes that have `model` (in memory, with loaded=True), after reading
        every node's lists afresh.  Configuration order."""
        await self.refresh(force=True)
        key = model_key(model)
        return [n for n in self.nodes if n.healthy and key in (n.loaded if loaded else n.models)]

    async def _changed(self, nodes: Sequence[SSHNode]) -> None:
        """Read the lists of nodes whose models just changed, before answering."""
        for node in nodes:
            node.inventory_at = 0.0
        await asyncio.gather(*(self._refresh_task(n) for n in nodes if n.healthy), return_exceptions=True)

    async def _call_each(self, nodes: Sequence[SSHNode], method: str, path: str,
                         payload: Dict[str, Any]) -> Dict[str, Tuple[int, str]]:
        """The same request to each node at once: {node: (status, error text or "")}."""
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")

        async def one(node: SSHNode) -> Tuple[int, str]:
            try:
                status, _, data = await node.call(method, path, body, timeout=self.first_byte_timeout)
            except NodeError as exc:
                return 502, exc.reason
            return status, "" if status == 200 else error_message(status, data)

        results = await asyncio.gather(*(one(n) for n in nodes))
        await self._changed(nodes)
        return {n.name: r for n, r in zip(nodes, results)}

    @staticmethod
    def _check_all(what: str, results: Dict[str, Tuple[int, str]]) -> List[str]:
        failed = {k: v for k, v in results.items() if v[0] != 200}
        if failed:
            done = [k for k in results if k not in failed]
            raise NoNodeAvailableError(
                f"{what} failed on " + "; ".join(f"{k}: {v[1]}" for k, v in failed.items())
                + (f" (done on {', '.join(done)})" if done else ""))
        return list(results)

    async def copy(self, source: str, destination: str, *, node: Optional[str] = None) -> List[str]:
        """Ollama's /api/copy on every healthy node that has `source` (or on the node
        given).  Returns the node names changed.  ModelNotFoundError only when no node
        has the source; NoNodeAvailableError (naming the nodes) when some failed."""
        targets = [self.node(node)] if node else await self.nodes_with(source)
        if not targets:
            raise self.model_not_found(source)
        results = await self._call_each(targets, "POST", "/api/copy",
                                        {"source": source, "destination": destination})
        if all(status == 404 for status, _ in results.values()):
            raise ModelNotFoundError(f'model "{source}" not found')
        return self._check_all("copy", results)

    def blob_node(self, node: Optional[str] = None) -> SSHNode:
        """Where blobs go and where a `create` from files (no base model) runs: the node
        given, else the first healthy node in configuration order - one fixed node, so
        that HEAD, POST /api/blobs/DIGEST and the create that uses them meet."""
        if node:
            return self.node(node)
        for candidate in self.nodes:
            if candidate.healthy:
                return candidate
        raise NoNodeAvailableError("no healthy node: " + "; ".join(f"{n.name}: {n.reason}" for n in self.nodes))

    async def create_targets(self, payload: Dict[str, Any], *, node: Optional[str] = None) -> List[SSHNode]:
        """Where /api/create runs: the node given; else, when the request names a base
        model (`from`, or FROM in a legacy `modelfile`) and brings no files of its own
        (`files`, `adapters`), every healthy node that has that base; else blob_node()."""
        if node:
            return [self.node(node)]
        base = payload.get("from")
        if not base and isinstance(payload.get("modelfile"), str):
            m = re.search(r"^\s*FROM\s+(\S+)", payload["modelfile"], re.IGNORECASE | re.MULTILINE)
            base = m.group(1) if m else None
        if base and not payload.get("files") and not payload.get("adapters"):
            have = await self.nodes_with(base)
            if have:
                return have
        await self.refresh()
        return [self.blob_node()]

    async def progress(self, path: str, payload: Dict[str, Any], nodes: Sequence[SSHNode]
                       ) -> AsyncIterator[Dict[str, Any]]:
        """A streaming management request (/api/pull, /api/create, /api/push) on each
        node in turn: yields every progress object with "node" added, then one final
        {"status": "success"} only if all succeeded, else {"error": "..."} naming the
        nodes that failed.  The nodes' model lists are read again afterwards."""
        failures = []
        payload = dict(payload, stream=True)
        try:
            for target in nodes:
                try:
                    stream = await self.request(path, payload, node=target.name, stream=True)
                    async for obj in stream:
                        if obj.get("status") != "success":
                            yield obj
                except MeshError as exc:
                    failures.append(f"{target.name}: {exc}")
        finally:
            await self._changed(nodes)
        yield {"status": "success"} if not failures else {"error": "; ".join(failures)}


# ---------------------------------------------------------------------------
# Dashboard: the page GET /mesh/ serves.  One self-contained document (inline CSS
# and JS, no external assets, works offline) that polls GET /mesh/status every 2 s.
# The page itself holds no data and is served without the token; its script sends
# the token as "Authorization: Bearer" (typed in once, or given as /mesh/#token=T -
# a fragment never reaches the server) and keeps it in sessionStorage.
# ---------------------------------------------------------------------------

DASHBOARD_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mesh</title>
<style>
:root { --bg: #fafafa; --fg: #1d1d1f; --card: #fff; --line: #ddd; --muted: #6e6e73; --ok: #1a7f37; --bad: #c62828; --warn: #9a6700; }
@media (prefers-color-scheme: dark) { :root { --bg: #161618; --fg: #e8e8ea; --card: #212124; --line: #38383c; --muted: #9a9aa0; --ok: #3fb950; --bad: #f85149; --warn: #d29922; } }
* { box-sizing: border-box; }
body { margin: 0; padding: 12px; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; background: var(--bg); color: var(--fg); }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: 6px 16px; margin-bottom: 12px; }
h1 { font-size: 20px; margin: 0; }
h2 { font-size: 15px; margin: 20px 0 8px; }
.muted { color: var(--muted); }
.ok { color: var(--ok); } .bad { color: var(--bad); } .warn { color: var(--warn); }
#nodes { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 10px; }
.card { background: var(--card); border: 1px solid var(--line); border-left: 4px solid var(--ok); border-radius: 6px; padding: 10px; overflow-wrap: anywhere; }
.card.down { border-left-color: var(--bad); }
.card h3 { margin: 0 0 4px; font-size: 15px; display: flex; justify-content: space-between; gap: 8px; }
.card dl { display: grid; grid-template-columns: auto 1fr; gap: 2px 10px; margin: 6px 0 0; }
.card dt { color: var(--muted); } .card dd { margin: 0; }
.wrap { overflow-x: auto; -webkit-overflow-scrolling: touch; }
table { border-collapse: collapse; background: var(--card); min-width: 100%; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
#auth { display: none; background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 12px; max-width: 420px; }
#auth input { width: 100%; padding: 8px; font: inherit; margin: 6px 0; }
#auth button { padding: 6px 14px; font: inherit; }
@media (max-width: 480px) { body { padding: 8px; font-size: 13px; } }
</style>
</head>
<body data-updates="0">
<header><h1>mesh</h1><span id="summary" class="muted">loading...</span><span id="state" class="muted"></span></header>
<form id="auth"><label for="token">This mesh needs its bearer token (serve --token). It is kept for this browser tab only and sent as an Authorization header.</label>
<input id="token" type="password" autocomplete="current-password"><button>Show the pool</button> <span id="autherr" class="bad"></span></form>
<main id="main">
<section id="nodes"></section>
<h2>Models &times; nodes</h2><div class="wrap"><table id="models"></table></div>
<h2>Recent requests</h2><div class="wrap"><table id="recent"></table></div>
</main>
<script>
"use strict";
var POLL_MS = 2000, updates = 0, timer = null;
var KEY = "mesh-token";
(function takeTokenFromFragment() {
  // http://HOST:PORT/mesh/#token=T: the fragment never reaches the server or its log
  var m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (m) { sessionStorage.setItem(KEY, decodeURIComponent(m[1])); history.replaceState(null, "", location.pathname); }
})();
function el(tag, attrs) {
  var node = document.createElement(tag);
  for (var k in (attrs || {})) { if (attrs[k] !== null && attrs[k] !== undefined) node.setAttribute(k, attrs[k]); }
  for (var i = 2; i < arguments.length; i++) {
    var c = arguments[i];
    if (c === null || c === undefined) continue;
    node.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
  }
  return node;
}
function fmt(v, unit) { return v === null || v === undefined ? "-" : v + (unit || ""); }
function gb(v) { return typeof v === "number" ? (v / 1e9).toFixed(1) : "-"; }
function factRows(n) {
  // the node's facts (read over ssh: nvidia-smi, /proc), as far as it could tell them
  var f = n.facts || {}, rows = [];
  if (f.gpu) rows.push(["GPU", f.gpu]);
  if (f.vram_total) rows.push(["VRAM", gb(f.vram_used) + " / " + gb(f.vram_total) + " GB used"]);
  if (f.ram_total) rows.push(["RAM", gb(f.ram_total) + " GB (" + gb(f.ram_available) + " GB free)"]);
  if (typeof f.load_1m === "number") rows.push(["load", f.load_1m.toFixed(2) + (f.cpus ? " / " + f.cpus + " cpus" : "")]);
  return rows;
}
function card(n) {
  var up = n.healthy;
  var badge = el("span", {"class": up ? "ok" : "bad"}, up ? "up" : "down");
  var title = el("h3", null, el("span", null, n.name), badge);
  var rows = [
    ["in flight", n.in_flight + " / " + n.max_concurrent],
    ["queued", fmt(n.queued)],
    ["latency", fmt(n.latency_ms, " ms")],
    ["speed", n.speed && n.speed.tokens_per_s !== null ? n.speed.tokens_per_s + " tok/s" : "-"],
    ["first token", n.speed && n.speed.ttft_ms !== null ? n.speed.ttft_ms + " ms" : "-"],
    ["loaded", (n.loaded || []).join(", ") || "-"],
    ["served", fmt(n.served)],
    ["Ollama", fmt(n.version)],
    ["transport", fmt(n.transport)]
  ].concat(factRows(n));
  var dl = el("dl");
  rows.forEach(function (r) { dl.appendChild(el("dt", null, r[0])); dl.appendChild(el("dd", null, r[1])); });
  var c = el("div", {"class": up ? "card" : "card down", "data-node": n.name, "data-healthy": String(up)}, title);
  if (n.display_name && n.display_name !== n.name) c.appendChild(el("div", {"class": "muted"}, n.display_name));
  if (!up) c.appendChild(el("div", {"class": "bad reason"}, n.reason || "down"));
  c.appendChild(dl);
  return c;
}
function modelsTable(nodes) {
  var names = {};
  nodes.forEach(function (n) { (n.models || []).concat(n.loaded || []).forEach(function (m) { names[m] = 1; }); });
  var head = el("tr", null, el("th", null, "model"));
  nodes.forEach(function (n) { head.appendChild(el("th", {"class": n.healthy ? "" : "bad"}, n.name)); });
  var rows = [el("thead", null, head)], body = el("tbody");
  Object.keys(names).sort().forEach(function (m) {
    var tr = el("tr", null, el("td", null, m));
    nodes.forEach(function (n) {
      var loaded = (n.loaded || []).indexOf(m) >= 0, has = (n.models || []).indexOf(m) >= 0;
      tr.appendChild(el("td", {"class": loaded ? "ok" : "muted"}, loaded ? "loaded" : has ? "yes" : ""));
    });
    body.appendChild(tr);
  });
  if (!Object.keys(names).length) body.appendChild(el("tr", null, el("td", {"class": "muted"}, "no models known yet")));
  rows.push(body);
  return rows;
}
function recentTable(recent) {
  var head = el("tr");
  ["time", "model", "node", "status", "first token", "tokens/s", "tokens", "duration"].forEach(function (h) { head.appendChild(el("th", null, h)); });
  var body = el("tbody");
  recent.forEach(function (r) {
    body.appendChild(el("tr", null, el("td", null, r.time ? new Date(r.time).toLocaleTimeString() : "-"), el("td", null, fmt(r.model)),
      el("td", null, fmt(r.node)), el("td", {"class": r.status >= 400 || r.error ? "bad" : ""}, fmt(r.status)),
      el("td", {"class": "num"}, fmt(r.ttft_ms, " ms")), el("td", {"class": "num"}, fmt(r.tokens_per_s)),
      el("td", {"class": "num"}, fmt(r.tokens)), el("td", {"class": "num"}, fmt(r.duration_ms, " ms"))));
  });
  if (!recent.length) body.appendChild(el("tr", null, el("td", {"class": "muted", colspan: "8"}, "no requests yet")));
  return [el("thead", null, head), body];
}
function fill(id, children) {
  var node = document.getElementById(id);
  while (node.firstChild) node.removeChild(node.firstChild);
  children.forEach(function (c) { node.appendChild(c); });
}
function render(data) {
  var nodes = data.nodes || [], up = nodes.filter(function (n) { return n.healthy; }).length;
  var inflight = nodes.reduce(function (a, n) { return a + (n.in_flight || 0); }, 0);
  document.getElementById("summary").textContent = up + " of " + nodes.length + " nodes up \u00b7 " +
    inflight + " in flight \u00b7 " + (data.queue || 0) + " queued";
  fill("nodes", nodes.map(card));
  fill("models", modelsTable(nodes));
  fill("recent", recentTable(data.recent || []));
  updates += 1;
  document.body.setAttribute("data-updates", String(updates));
  document.getElementById("state").textContent = "updated " + new Date().toLocaleTimeString();
  document.getElementById("state").className = "muted";
}
function showAuth(message) {
  document.getElementById("auth").style.display = "block";
  document.getElementById("main").style.display = "none";
  document.getElementById("autherr").textContent = message || "";
}
function poll() {
  clearTimeout(timer);
  var token = sessionStorage.getItem(KEY), headers = {};
  if (token) headers["Authorization"] = "Bearer " + token;
  fetch("/mesh/status", {headers: headers, cache: "no-store"}).then(function (r) {
    if (r.status === 401) { showAuth(token ? "That token was refused." : ""); return null; }
    if (!r.ok) throw new Error("HTTP " + r.status);
    return r.json();
  }).then(function (data) {
    if (!data) return;
    document.getElementById("auth").style.display = "none";
    document.getElementById("main").style.display = "";
    render(data);
    timer = setTimeout(poll, POLL_MS);
  }).catch(function (e) {
    var s = document.getElementById("state");
    s.textContent = "serve not answering (" + e.message + "), retrying";
    s.className = "bad";
    timer = setTimeout(poll, POLL_MS);
  });
}
document.getElementById("auth").addEventListener("submit", function (e) {
  e.preventDefault();
  sessionStorage.setItem(KEY, document.getElementById("token").value);
  poll();
});
poll();
</script>
</body>
</html>
"""


# ---------------------------------------------------------------------------
# HTTP front: the whole mesh behind one Ollama-compatible address.
#
#   ServerLimits   every limit and timeout of the front, with its default
#   Route, Router  (method, path pattern) -> handler; a table per API
#   OllamaAPI      Ollama's API (and MeshOpsAPI: mesh's own operations)
#   Exchange       one request and its response: what a handler gets
#   StreamRelay    moves a node's streamed reply to the client (RawStream.relay_rest)
#   _ClientReader  a client connection's protocol: its bytes, and its leaving, which
#                  cancels the request's task (no task per request watches it)
#   MeshServer     connections: reading heads and bodies, keep-alive, errors
# ---------------------------------------------------------------------------

_STREAMING_PATHS = ("/api/generate", "/api/chat", "/api/pull")


class ServerLimits:
    """Every limit and timeout of the HTTP front, in one place (bytes, seconds).

    max_header_bytes: request line plus header fields; past it 431 (Go's
      MaxHeaderBytes).
    max_body: a request body; past it 413, known from Content-Length before a byte
      is read, and while reading a chunked body (`--max-body`; several base64 images
      fit).
    header_timeout: a request head must be complete this long after its first byte
      (or after the connection opened); Go's ReadHeaderTimeout.
    keepalive_timeout: an idle keep-alive connection is closed after this.
    body_timeout: silence allowed while a request body arrives (nginx's
      client_body_timeout).
    max_pipelined: bytes a client may send while its reply streams (a pipelined next
      request); beyond that they are dropped and the connection closes after the reply.
    drain_body: an unread request body up to this size is read and discarded so the
      connection can be kept (Go's maxPostHandlerReadBytes); a larger one closes it.
    write_timeout: a client that takes none of its reply for this long is
      disconnected (its node request is cancelled)."""

    max_header_bytes = 64 * 1024
    max_body = 128 * 1024 * 1024
    header_timeout = 10.0
    keepalive_timeout = 60.0
    body_timeout = 60.0
    max_pipelined = 64 * 1024
    drain_body = 256 * 1024
    write_timeout = 120.0

    def __init__(self, **overrides: Any) -> None:
        for key, value in overrides.items():
            if not hasattr(ServerLimits, key) or key.startswith("_"):
                raise TypeError(f"unknown server limit {key!r}")
            setattr(self, key, value)


def _is_loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Route:
    """One entry of a route table: methods ("GET" also answers HEAD), a path
    pattern, the handler's method name on its API class, and whether the bearer
    token is required.  Patterns: "/api/tags" exact; "/api/blobs/:digest" a
    parameter (one path segment, in request.params["digest"]); "/mesh/*rest" the
    rest of the path (may be empty, may contain "/")."""

    __slots__ = ("methods", "pattern", "handler", "auth", "api", "_regex")

    def __init__(self, methods: str, pattern: str, handler: str, *, auth: bool = True) -> None:
        self.methods = frozenset(methods.split())
        if "GET" in self.methods:
            self.methods |= {"HEAD"}
        self.pattern = pattern
        self.handler = handler
        self.auth = auth
        self.api: Any = None
        parts = []
        for seg in pattern.split("/"):
            if seg.startswith(":"):
                parts.append(f"(?P<{seg[1:]}>[^/]+)")
            elif seg.startswith("*"):
                parts.append(f"(?P<{seg[1:]}>.*)")
            else:
                parts.append(re.escape(seg))
        self._regex = re.compile("/".join(parts) + r"\Z")

    def match(self, path: str) -> Optional[Dict[str, str]]:
        m = self._regex.match(path)
        return m.groupdict() if m else None


class Router:
    """Finds the route for (method, path).  A path some route has, asked with
    another method, is 405 with an Allow header; a path no route has is 404."""

    def __init__(self, apis: Sequence[Any]) -> None:
        self.routes: List[Route] = []
        for api in apis:
            for route in api.routes:
                bound = Route(" ".join(sorted(route.methods)), route.pattern, route.handler, auth=route.auth)
                bound.api = api
                self.routes.append(bound)
        # (method, path) -> the route found for it with no parameters: the table never
        # changes, so the hot paths are looked up once (bounded: paths come from clients).
        self._found: Dict[Tuple[str, str], Route] = {}

    def match(self, method: str, path: str) -> Tuple[Optional[Route], Dict[str, str], Optional[HTTPError]]:
        """(route, params, None), or (None, {}, the 404/405 error to give)."""
        found = self._found.get((method, path))
        if found is not None:
            return found, {}, None
        allowed: set = set()
        for route in self.routes:
            params = route.match(path)
            if params is None:
                continue
            if method in route.methods:
                if not params and len(self._found) < 256:
                    self._found[(method, path)] = route
                return route, params, None
            allowed |= route.methods
        if allowed:
            return None, {}, HTTPError(405, f"method {method} not allowed on {path}",
                                       headers=[("Allow", ", ".join(sorted(allowed)))])
        return None, {}, HTTPError(404, f"404 page not found: {path}")


class _API:
    """A group of routes and their handlers: one API (Ollama's, OpenAI's,
    Anthropic's, mesh's own operations).

    Handler contract: `async def handler(self, ex: Exchange) -> None`, named in the
    class's `routes` table.  A handler
    - reads the request from ex.request (method, path, query, headers, params) and
      the body with `await ex.body()` or `await ex.json()` (the body is read only
      when asked for; the token was checked before);
    - answers exactly once: `await ex.send_json(status, obj)`, `await ex.send(...)`,
      or a stream: `await ex.start_stream(...)`, `await ex.write(bytes)` per piece,
      `await ex.end_stream()`; StreamRelay does this for a node's stream;
    - raises HTTPError(status, message) for an error reply before it answered: the
      front sends it in this API's error shape (`error_body`); a MeshError becomes
      the status _status_for gives; after the answer started an error ends the
      connection instead;
    - sets ex.model / ex.node when it knows them (for the access log), and never
      writes to the socket itself."""

    routes: List[Route] = []

    def __init__(self, server: "MeshServer") -> None:
        self.server = server
        self.orch: MeshOrchestrator = server.orch

    def error_body(self, status: int, message: str) -> Dict[str, Any]:
        """This API's error shape; Ollama's is {"error": "..."}."""
        return {"error": message}

    async def typed_json(self, ex: "Exchange") -> Dict[str, Any]:
        """The JSON request body; 400 with Go's message when a field mesh reads has
        the wrong type (see ollama_type_error)."""
        payload = await ex.json()
        problem = ollama_type_error(payload, OLLAMA_REQUEST_TYPES.get(ex.request.path, "Request"))
        if problem:
            raise HTTPError(400, problem)
        return payload

    def pinned(self, ex: "Exchange") -> Optional[str]:
        """The node the X-Mesh-Node header names, if any."""
        pinned = ex.request.header("x-mesh-node") or None
        if pinned and pinned not in self.orch._by_name:
            raise HTTPError(400, f"unknown node {pinned!r} in X-Mesh-Node")
        return pinned


class OllamaAPI(_API):
    """Ollama's API, with the shapes of Ollama's server/routes.go."""

    routes = [
        Route("GET", "/", "root"),
        Route("GET", "/api/version", "version"),
        Route("GET", "/api/tags", "tags"),
        Route("GET", "/api/ps", "ps"),
        Route("POST", "/api/show", "forward"),
        Route("POST", "/api/generate", "forward"),
        Route("POST", "/api/chat", "forward"),
        Route("POST", "/api/embed", "forward"),
        Route("POST", "/api/embeddings", "forward"),
        Route("POST", "/api/pull", "pull"),
        Route("POST", "/api/create", "create"),
        Route("POST", "/api/push", "push"),
        Route("POST", "/api/copy", "copy"),
        Route("DELETE", "/api/delete", "delete"),
        Route("HEAD POST", "/api/blobs/:digest", "blob"),
    ]

    async def root(self, ex: "Exchange") -> None:
        await ex.send(200, b"Ollama is running", "text/plain; charset=utf-8")

    async def version(self, ex: "Exchange") -> None:
        await self.orch.refresh()
        versions = sorted({n.version for n in self.orch.nodes if n.healthy and n.version})
        await ex.send_json(200, {"version": versions[0] if versions else "0.0.0", "mesh": __version__})

    async def tags(self, ex: "Exchange") -> None:
        await ex.send_json(200, {"models": await self.orch.tags()})

    async def ps(self, ex: "Exchange") -> None:
        """Ollama's /api/ps, one entry per model, each with "nodes" (see merge_ps)."""
        await ex.send_json(200, {"models": merge_ps(await self.orch.ps())})

    async def payload(self, ex: "Exchange") -> Dict[str, Any]:
        """The JSON request body with "model" set (Ollama still takes "name")."""
        payload = await self.typed_json(ex)
        if not payload.get("model") and not payload.get("name"):
            raise HTTPError(400, "model is required")
        if "model" not in payload:
            payload["model"] = payload["name"]
            ex.clean_body = None       # the node gets the request with "model" set
        ex.model = str(payload["model"])
        return payload

    async def forward(self, ex: "Exchange") -> None:
        """generate, chat, embed, embeddings, show: to the best node; streamed
        replies go through StreamRelay."""
        payload = await self.payload(ex)
        pinned = self.pinned(ex)
        path = ex.request.path
        streaming = path in _STREAMING_PATHS and payload.get("stream", True) is not False
        if path in ("/api/generate", "/api/chat") and is_unload_request(path, payload):
            await self.unload(ex, path, payload, pinned)
            return
        # The node's work is watched from the start: a client that leaves while a model
        # loads, or before a stream=false answer is whole, ends the node's request too.
        # The client's own bytes go to the node unless mesh changed the request (Ollama
        # reads them as it would have); a node's one-object answer comes back as its bytes.
        body = ex.clean_body
        if not streaming:
            raw = await ex.unless_client_leaves(
                self.orch.open_stream(path, payload, node=pinned, stream=False, body=body, decode=False))
            try:        # the answer goes out first, then the node's slot is given back
                result = raw._whole
                result.pop("node", None)
                if raw.whole_bytes is None:
                    await ex.send_json(200, result, node=raw.node, drain=False)
                else:
                    await ex.send(200, raw.whole_bytes, "application/json; charset=utf-8", node=raw.node,
                                  drain=False)
                    ex._note(result)        # the token counts, for the access log: after the answer left
            finally:
                await raw.aclose()
            await ex.drain_client()     # a slow client holds its connection, not the node's slot
            return
        stream = await ex.unless_client_leaves(
            self.orch.open_stream(path, payload, node=pinned, stream=True, body=body))
        await self.server.relay(ex).run(stream)

    async def unload(self, ex: "Exchange", path: str, payload: Dict[str, Any], pinned: Optional[str]) -> None:
        """`ollama stop`: every node that has the model loaded (or the X-Mesh-Node node)
        lets it go (MeshOrchestrator.unload); Ollama's answer comes only when all did.
        Loaded nowhere: one node that has the model answers, as Ollama would."""
        model = str(payload["model"])
        try:
            results = await self.orch.unload(model, nodes=[pinned] if pinned else None)
        except ModelNotFoundError:
            raise
        except MeshError:     # loaded on no node
            result = await self.orch.request(path, payload, stream=False)
            await ex.send_json(200, result, node=result.pop("node", None))
            return
        failed = {n: why for n, why in results.items() if why}
        if failed:
            raise HTTPError(502, "unload failed on " + "; ".join(f"{n}: {why}" for n, why in failed.items()))
        answer: Dict[str, Any] = {"model": model, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if path == "/api/chat":
            answer["message"] = {"role": "assistant", "content": ""}
        else:
            answer["response"] = ""
        answer.update(done=True, done_reason="unload")
        await ex.send_json(200, answer, node=",".join(results))

    async def progress(self, ex: "Exchange", path: str, payload: Dict[str, Any],
                       targets: Sequence[SSHNode]) -> None:
        """Pull, create or push on `targets`, one after another: progress lines carry
        "node"; the last line is {"status": "success"} only if all succeeded."""
        names = ",".join(t.name for t in targets)
        stream_out = payload.get("stream", True) is not False
        final: Dict[str, Any] = {}
        if stream_out:
            await ex.start_stream(node=names)
        async for obj in self.orch.progress(path, payload, targets):
            if "node" not in obj:
                final = obj
            elif stream_out:
                await ex.write_json_line(obj)
        if stream_out:
            await ex.write_json_line(final)
            await ex.end_stream()
        else:
            await ex.send_json(200 if "error" not in final else 502, final, node=names)

    async def pull(self, ex: "Exchange") -> None:
        """Pull onto the X-Mesh-Node node, or onto every healthy node in turn."""
        payload = await self.payload(ex)
        pinned = self.pinned(ex)
        targets = [self.orch.node(pinned)] if pinned else [n for n in self.orch.nodes if n.healthy]
        if not targets:
            raise HTTPError(503, "no healthy node to pull onto")
        await self.progress(ex, "/api/pull", payload, targets)

    async def create(self, ex: "Exchange") -> None:
        """On the X-Mesh-Node node; else on every node that has the base model; else
        on the blob node (MeshOrchestrator.create_targets)."""
        payload = await self.payload(ex)
        targets = await self.orch.create_targets(payload, node=self.pinned(ex))
        await self.progress(ex, "/api/create", payload, targets)

    async def push(self, ex: "Exchange") -> None:
        """From the X-Mesh-Node node, else from the first node that has the model."""
        payload = await self.payload(ex)
        pinned = self.pinned(ex)
        have = [self.orch.node(pinned)] if pinned else await self.orch.nodes_with(payload["model"])
        if not have:
            raise HTTPError(404, f"model \"{payload['model']}\" not found on any node")
        await self.progress(ex, "/api/push", payload, have[:1])

    async def copy(self, ex: "Exchange") -> None:
        """On every node that has the source (MeshOrchestrator.copy); 200, empty body."""
        payload = await self.typed_json(ex)
        if not payload.get("source") or not payload.get("destination"):
            raise HTTPError(400, "source and destination are required")
        ex.model = str(payload["source"])
        names = await self.orch.copy(payload["source"], payload["destination"], node=self.pinned(ex))
        await ex.send(200, b"", "application/json; charset=utf-8", node=",".join(names))

    async def delete(self, ex: "Exchange") -> None:
        """On every node that has the model (MeshOrchestrator.delete); 200, empty body;
        404 only when no node has it."""
        payload = await self.payload(ex)
        pinned = self.pinned(ex)
        results = await self.orch.delete(payload["model"], nodes=[pinned] if pinned else None)
        failed = {n: why for n, why in results.items() if why}
        if failed and all("not found" in why for why in failed.values()) and len(failed) == len(results):
            raise HTTPError(404, f"model '{payload['model']}' not found")
        if failed:
            raise HTTPError(502, "delete failed on " + "; ".join(f"{n}: {why}" for n, why in failed.items()))
        await self.orch.refresh(force=True)   # the next request sees the change
        await ex.send(200, b"", "application/json; charset=utf-8", node=",".join(results))

    async def blob(self, ex: "Exchange") -> None:
        """HEAD and POST /api/blobs/DIGEST on the node a create from files will use
        (MeshOrchestrator.blob_node): HEAD is 200 only if that node has the blob."""
        digest = ex.request.params["digest"]
        if not re.fullmatch(r"sha256[:-][0-9a-f]{64}", digest):
            raise HTTPError(400, "invalid digest format")
        pinned = self.pinned(ex)
        body = await ex.body() if ex.request.method == "POST" else None
        await self.orch.refresh()
        node = self.orch.blob_node(pinned)
        status, headers, data = await node.call(ex.request.method, ex.request.path, body,
                                                timeout=self.orch.first_byte_timeout)
        await ex.send(status, data, headers.get("content-type", "text/plain; charset=utf-8"), node=node.name)


class OpenAIAPI(_API):
    """The OpenAI API as Ollama serves it (its openai middleware): each node's own
    Ollama answers; mesh routes by "model" and relays the reply byte for byte, and
    merges the model list itself."""

    routes = [
        Route("POST", "/v1/chat/completions", "relay"),
        Route("POST", "/v1/completions", "relay"),
        Route("POST", "/v1/embeddings", "relay"),
        Route("POST", "/v1/responses", "relay"),
        Route("GET", "/v1/models", "models"),
        Route("GET", "/v1/models/*model", "model"),
    ]

    def error_body(self, status: int, message: str) -> Dict[str, Any]:
        return error_body("openai", status, message)

    async def relay(self, ex: "Exchange") -> None:
        """Route by "model" and pass the node's answer on as it comes: Server-Sent
        Events for streams, one JSON object otherwise."""
        body = await ex.body()
        payload = await self.typed_json(ex)
        if not payload.get("model"):
            raise HTTPError(400, "model is required")
        ex.model = str(payload["model"])
        pinned = self.pinned(ex)
        # Watched from the start: a reply with "stream": false comes whole, only at the end.
        reply = await ex.unless_client_leaves(
            self.orch.open_stream(ex.request.path, payload, node=pinned, stream=True, body=body))
        await self.server.relay(ex).run(reply)

    async def models(self, ex: "Exchange") -> None:
        await ex.send_json(200, openai_model_list(await self.orch.tags()))

    async def model(self, ex: "Exchange") -> None:
        import urllib.parse
        name = urllib.parse.unquote(ex.request.params["model"])
        key = model_key(name)
        for entry in await self.orch.tags():
            if model_key(entry.get("name") or entry.get("model", "")) == key:
                await ex.send_json(200, openai_model(entry, name))
                return
        raise HTTPError(404, f"model '{name}' not found")


class AnthropicAPI(OpenAIAPI):
    """The Anthropic Messages API as Ollama serves it: relayed like OpenAIAPI."""

    routes = [
        Route("POST", "/v1/messages", "relay"),
    ]

    def error_body(self, status: int, message: str) -> Dict[str, Any]:
        return error_body("anthropic", status, message)


class MeshOpsAPI(_API):
    """mesh's own operations: status, health, metrics and the dashboard."""

    routes = [
        Route("GET", "/mesh/status", "status"),
        Route("GET", "/mesh/health", "health"),
        Route("GET", "/metrics", "metrics"),
        # The page holds no data (its script sends the token for /mesh/status), so a
        # browser can load it and ask for the token.
        Route("GET", "/mesh/", "dashboard", auth=False),
        Route("GET", "/mesh", "dashboard", auth=False),
    ]

    async def _fresh_enough(self) -> None:
        # Model lists, but bounded: polled by the dashboard and load balancers, and one
        # frozen node must not hold them.  watch_health keeps them current anyway.
        await asyncio.wait({self.orch._spawn(self.orch.refresh())}, timeout=2.0)

    async def status(self, ex: "Exchange") -> None:
        """{"nodes": [status of each, plus queued and speed], "queue", "recent"}."""
        await self._fresh_enough()
        await ex.send_json(200, self.server.ops.status())

    async def health(self, ex: "Exchange") -> None:
        """200 when at least one node answers, else 503 (for load balancers, systemd).
        A node counts once it has answered since serve started and is not down now."""
        await self._fresh_enough()
        nodes = self.orch.nodes
        healthy = [n.name for n in nodes if n.healthy and n.version is not None]
        down = {n.name: n.reason or "not reached yet" for n in nodes if n.name not in healthy}
        await ex.send_json(200 if healthy else 503,
                           {"status": "ok" if healthy else "unavailable", "healthy": healthy, "down": down})

    async def metrics(self, ex: "Exchange") -> None:
        await ex.send(200, self.server.ops.render_metrics().encode("utf-8"), PROMETHEUS_CONTENT_TYPE)

    async def dashboard(self, ex: "Exchange") -> None:
        await ex.send(200, DASHBOARD_HTML.encode("utf-8"), "text/html; charset=utf-8")


def _time_out(waiter: Any) -> None:
    """A timer's end for a wait on one future: the wait raises asyncio.TimeoutError."""
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())


class _ClientReader:
    """A client connection's protocol and its bytes, buffered: request heads, bodies,
    and watching for the client leaving while a reply is made.  asyncio calls it
    (connection_made, data_received, eof_received, connection_lost, pause_writing,
    resume_writing); the front reads from it.  Bytes read ahead (a pipelined next
    request) are kept for the next head - up to limits.max_pipelined while a reply is
    made.  A wait for more bytes is one future and one timer (no task per read, as
    asyncio.wait_for costs); the client leaving is learnt here, from the transport,
    and cancels the request (watch) without a task watching it."""

    HIGH_WATER = 256 * 1024    # buffered and not taken: stop reading from the client

    def __init__(self, limits: ServerLimits) -> None:
        self._buf = bytearray()
        self.limits = limits
        self.eof = False               # the client closed its side (or the connection is gone)
        self.lost = False              # the connection is gone
        self.overflowed = False        # pipelined bytes were dropped: close after this reply
        self.transport: Any = None
        self._waiter: Any = None       # a read waiting for bytes
        self._on_gone: Any = None      # watch(): called once when the client leaves
        self._read_paused = False
        self.write_paused = False      # the client's socket buffer is full (pause_writing)
        self._drain_waiters: List[Any] = []

    # -- asyncio's protocol calls ------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._on_gone is not None:
            # A reply is being made: keep what a pipelining client sends, up to a limit,
            # and read on regardless - reading is how its leaving is seen.
            if self.overflowed or len(self._buf) + len(data) > self.limits.max_pipelined:
                self.overflowed = True
                self._buf.clear()
                return
        self._buf += data
        if self._waiter is not None:
            self._wake()
        elif self._on_gone is None and len(self._buf) > self.HIGH_WATER and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self._on_gone is not None and self._buf:
            self.eof = True     # pipelined, then half-closed: see left()
            return True
        self._gone()
        return True         # half-closed: the reply can still be written

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.lost = True
        self._gone()
        for fut in self._drain_waiters:
            if not fut.done():
                fut.set_exception(ConnectionResetError("Connection lost"))
        self._drain_waiters.clear()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for fut in self._drain_waiters:
            if not fut.done():
                fut.set_result(None)
        self._drain_waiters.clear()

    def _gone(self) -> None:
        self.eof = True
        if self._waiter is not None:
            self._wake()
        on_gone, self._on_gone = self._on_gone, None
        if on_gone is not None:
            on_gone()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if not waiter.done():
            waiter.set_result(None)

    # -- for the front -------------------------------------------------------------
    def left(self) -> bool:
        """Whether the client has gone: its connection is lost, or it closed its side
        with no request of its own waiting.  A client that pipelined its next request
        and then half-closed has said all it will, not left: the reply being made goes
        on (Go's net/http stops watching at the first pipelined byte; nginx peeks and
        sees it), and the connection closes after it.  A client really gone shows
        when the reply is written to it (connection_lost)."""
        return self.lost or (self.eof and not self._buf)

    def watch(self, on_gone: Any) -> None:
        """Call on_gone() once if the client leaves (left()) before unwatch() (at once
        if it already has)."""
        if self.left():
            on_gone()
            return
        self._on_gone = on_gone
        if self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()

    def unwatch(self) -> None:
        self._on_gone = None

    async def drain(self) -> None:
        """Return when the client's socket buffer has room again (at once if it has);
        ConnectionResetError once the connection is gone."""
        if self.lost:
            raise ConnectionResetError("Connection lost")
        if not self.write_paused:
            return
        fut = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(fut)
        await fut

    async def _fill(self, timeout: Optional[float]) -> bool:
        """Wait for more bytes; False at EOF (nothing more will come).
        asyncio.TimeoutError after timeout seconds."""
        if self.eof:
            return False
        if self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        handle = None if timeout is None else loop.call_later(timeout, _time_out, waiter)
        before = len(self._buf)
        try:
            await waiter
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()
        return len(self._buf) > before or not self.eof

    async def read_head(self, *, first_wait: float) -> Optional[bytes]:
        """The next request head, or None when the client closed (or stayed silent
        for first_wait seconds) before sending one.  Raises HTTPError 431 past
        limits.max_header_bytes, 408 when a started head is not complete within
        limits.header_timeout, 400 when the client closed in the middle of it."""
        loop = asyncio.get_running_loop()
        deadline: Optional[float] = None
        scanned = 0
        while True:
            # RFC 9112 2.2: empty lines before a request line are ignored (some
            # clients send a CRLF after a POST body).
            while self._buf.startswith((b"\n", b"\r\n")):
                del self._buf[:1 if self._buf[0] == 10 else 2]      # 10: LF
            if self._buf:
                end = find_head_end(self._buf, max(0, scanned - 3))
                if 0 <= end <= self.limits.max_header_bytes:
                    head = bytes(self._buf[:end])
                    del self._buf[:end]
                    return head
                if end > self.limits.max_header_bytes or len(self._buf) > self.limits.max_header_bytes:
                    raise HTTPError(431, f"request head larger than {self.limits.max_header_bytes} bytes")
                scanned = len(self._buf)
                if deadline is None:
                    deadline = loop.time() + self.limits.header_timeout
            wait = first_wait if deadline is None else deadline - loop.time()
            try:
                if not await self._fill(max(wait, 0.0)):
                    if self._buf:
                        raise HTTPError(400, "connection closed in the middle of a request head")
                    return None
            except asyncio.TimeoutError:
                if deadline is None:
                    return None
                raise HTTPError(408, f"request head not complete within {self.limits.header_timeout:g} s") \
                    from None

    async def read_body(self, req: HTTPRequest, *, max_body: int) -> AsyncIterator[bytes]:
        """The request body in pieces as they arrive (Content-Length or chunked).
        Raises HTTPError 413 past max_body (before reading when the length is known),
        408 after limits.body_timeout of silence, 400 when the client closes early
        or the chunked framing is bad."""
        if req.chunked:
            decoder = ChunkedDecoder(max_body=max_body)
            while not decoder.done:
                if not self._buf and not await self._fill_body():
                    raise HTTPError(400, "connection closed in the middle of the request body")
                data, used = decoder.feed(bytes(self._buf))
                del self._buf[:used]
                if data:
                    yield data
            return
        left = req.content_length or 0
        if left > max_body:
            raise HTTPError(413, f"request body larger than {max_body} bytes")
        while left:
            if not self._buf and not await self._fill_body():
                raise HTTPError(400, "connection closed in the middle of the request body")
            piece = bytes(self._buf[:left])
            del self._buf[:len(piece)]
            left -= len(piece)
            yield piece

    async def _fill_body(self) -> bool:
        try:
            return await self._fill(self.limits.body_timeout)
        except asyncio.TimeoutError:
            raise HTTPError(408, f"no request body data for {self.limits.body_timeout:g} s") from None

    def buffered(self) -> int:
        """How many bytes are read and not yet taken."""
        return len(self._buf)

    def take(self, size: int) -> bytes:
        """The next `size` buffered bytes (there must be as many: see buffered())."""
        data = bytes(self._buf[:size])
        del self._buf[:size]
        return data

    def peek(self) -> bytes:
        """What is buffered and not yet taken (the start of an unfinished head)."""
        return bytes(self._buf[:1024])


class _ClientWriter:
    """The writing side of a client connection (what asyncio's StreamWriter offers,
    of it what the front uses), over the _ClientReader protocol's transport."""

    def __init__(self, proto: _ClientReader) -> None:
        self._proto = proto
        self.transport = proto.transport

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    async def drain(self) -> None:
        await self._proto.drain()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def close(self) -> None:
        self.transport.close()


class Exchange:
    """One request and its response on a client connection - what a handler gets
    (see _API for the handler contract).

    request: the HTTPRequest; route: the matched Route (None for errors before
    routing).  For the access log: status (None until answered), model and node
    (set by handlers), started / first_byte_at / first_token_at (time.monotonic();
    the last is the first block of a relayed stream), bytes_out (body bytes written),
    tokens / eval_duration (Ollama's eval_count / eval_duration in ns, from the
    final object sent), error (what went wrong, if anything; never request text)."""

    def __init__(self, conn: "_Connection", request: HTTPRequest) -> None:
        self.conn = conn
        self.request = request
        self.route: Optional[Route] = None
        self.status: Optional[int] = None
        self.model: Optional[str] = None
        self.node: Optional[str] = None
        self.started = time.monotonic()
        self.first_byte_at: Optional[float] = None
        self.first_token_at: Optional[float] = None
        self.bytes_out = 0
        self.tokens: Optional[int] = None
        self.eval_duration: Optional[int] = None
        self.error: Optional[str] = None
        self.body_read = not request.has_body
        self.keep_alive = request.keep_alive
        self._pending_head = b""
        self._chunked = False
        self._streaming = False
        self._body_ended = False     # a chunked body's last chunk is written
        self._body: Optional[bytes] = None
        self.extra_headers: List[Tuple[str, str]] = []   # on every response (CORS)
        self.clean_body: Optional[bytes] = None   # json(): the body, while it says what the object does

    # -- the request body -----------------------------------------------------
    async def body_chunks(self, *, max_body: Optional[int] = None) -> AsyncIterator[bytes]:
        """The body in pieces as they arrive; `100 Continue` goes out first when the
        client asked for it.  At most max_body bytes (default limits.max_body)."""
        if self.body_read:
            return
        limit = self.conn.server.limits.max_body if max_body is None else max_body
        if self.request.expect_continue and (self.request.content_length or 0) <= limit:
            # (a Content-Length over the limit gets its 413 at once: no upload asked for first)
            self.conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.body_read = True
        try:
            async for piece in self.conn.reader.read_body(self.request, max_body=limit):
                yield piece
        except HTTPError:
            self.keep_alive = False       # the body's end is unknown now
            raise

    async def body(self) -> bytes:
        """The whole body (b"" when there is none); read once, kept for later calls."""
        if self._body is None:
            req, reader = self.request, self.conn.reader
            length = req.content_length or 0
            if not self.body_read and not req.chunked and not req.expect_continue \
                    and length <= self.conn.server.limits.max_body and reader.buffered() >= length:
                self.body_read = True        # it came with the head (a small request): no reading loop
                self._body = reader.take(length)
            else:
                self._body = b"".join([piece async for piece in self.body_chunks()])
        return self._body

    async def json(self) -> Dict[str, Any]:
        """The body as a JSON object (see decode_json_body); HTTPError 400 otherwise,
        with Ollama's messages.  Sets clean_body to the body's bytes when they say
        exactly what the object does; a handler that changes the object before sending
        it on sets clean_body to None."""
        body = await self.body()
        try:
            payload, sound = _decode_json(body)
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
        if payload is None:
            raise HTTPError(400, "missing request body")
        if not isinstance(payload, dict):
            raise HTTPError(400, "request body must be a JSON object")
        # Invalid UTF-8 or a lone surrogate: the node gets the object re-encoded (as mended).
        self.clean_body = body if sound else None
        return payload

    # -- the response ---------------------------------------------------------
    @property
    def answered(self) -> bool:
        return self.status is not None

    def _head(self, status: int, length: Optional[int], content_type: str,
              headers: Sequence[Tuple[str, str]], node: Optional[str]) -> None:
        """The response head, kept until the body's first bytes; the request's body
        must have been read (or discarded: conn.discard_body) before."""
        if self.status is not None:
            raise RuntimeError("a response was already started for this request")
        self.status = status
        if node:
            self.node = node
        framing, self._chunked, self.keep_alive = response_framing(
            self.request.version, self.request.method, status, length, keep_alive=self.keep_alive)
        fields = [("Content-Type", content_type), *framing]
        if node:
            fields.append(("X-Mesh-Node", node))
        fields.extend(self.extra_headers)
        fields.extend(headers)
        # Kept until the body's first bytes: head and body leave in one write (one send(),
        # one segment) - a socket takes each write at once, so two writes cost two.
        self._pending_head = response_head(status, fields)

    def _with_head(self, data: bytes) -> bytes:
        head, self._pending_head = self._pending_head, b""
        return head + data if head else data

    async def send(self, status: int, body: bytes, content_type: str, *, node: Optional[str] = None,
                   headers: Sequence[Tuple[str, str]] = (), drain: bool = True) -> None:
        """A whole response with Content-Length (HEAD: the head alone).  drain=False:
        written without waiting for the client to take it (the caller drains later)."""
        if not self.body_read:
            await self.conn.discard_body(self)
        self._head(status, len(body), content_type, headers, node)
        if body_allowed(self.request.method, status):
            self.bytes_out += len(body)
        else:
            body = b""
        self.conn.writer.write(self._with_head(body))
        self.first_byte_at = time.monotonic()
        if drain:
            await self.conn.drain()

    def _note(self, obj: Any) -> None:
        # the final object of a generation carries Ollama's token count and timing
        if not isinstance(obj, dict):
            return
        if obj.get("done") is True and isinstance(obj.get("eval_count"), int):
            self.tokens, self.eval_duration = obj["eval_count"], obj.get("eval_duration")
            return
        # OpenAI's usage.completion_tokens; Anthropic's and the Responses API's output_tokens
        # (the latter inside response.completed's "response")
        inner = obj.get("response")
        usage = obj.get("usage") or (inner.get("usage") if isinstance(inner, dict) else None)
        if isinstance(usage, dict):
            count = usage.get("completion_tokens", usage.get("output_tokens"))
            if isinstance(count, int) and count > 0:
                self.tokens = count

    async def send_json(self, status: int, obj: Any, *, node: Optional[str] = None,
                        headers: Sequence[Tuple[str, str]] = (), drain: bool = True) -> None:
        self._note(obj)
        try:
            body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:   # a lone surrogate from a node: keep it as the \\udXXX escape it came as
            body = json.dumps(obj).encode("ascii")
        await self.send(status, body, "application/json; charset=utf-8", node=node, headers=headers, drain=drain)

    async def start_stream(self, content_type: str = "application/x-ndjson", *, status: int = 200,
                           node: Optional[str] = None, headers: Sequence[Tuple[str, str]] = (),
                           first: bytes = b"", last: bool = False) -> None:
        """Start a body of unknown length: chunked to HTTP/1.1, close-delimited to 1.0.
        `first`, the body's first piece, goes out with the head (one write, one segment);
        last=True: it is the whole body, and the body's end goes with it too."""
        if not self.body_read:
            await self.conn.discard_body(self)
        self._head(status, None, content_type, headers, node)
        self._streaming = True
        if first:
            self.write_nowait(first, last=last)
        if self._pending_head:          # no first piece (or a body HEAD does not get)
            self.conn.writer.write(self._with_head(b""))
        await self.conn.drain()

    def write_nowait(self, data: bytes, *, last: bool = False) -> bool:
        """One piece of a streamed body, written without waiting for the client (the
        socket takes it at once when it can); last=True: the body's last, and a chunked
        body's end goes in the same write.  True when the client's side has more than
        _WRITE_HIGH_WATER bytes queued: the caller should then await drain_client()."""
        if not data or not body_allowed(self.request.method, self.status or 200):
            return False
        if self.first_byte_at is None:
            self.first_byte_at = time.monotonic()
        self.bytes_out += len(data)
        if last and self._chunked:
            self._body_ended = True
        writer = self.conn.writer
        writer.write(self._with_head(_chunk(data, last=last) if self._chunked else data))
        return writer.transport.get_write_buffer_size() > _WRITE_HIGH_WATER

    def relay_writers(self) -> Tuple[Any, Any, Any]:
        """For a relayed stream after start_stream, made once: the body's checks done
        ahead, each piece straight to the client's transport.  (write, write_chunk,
        write_end), each returning True when the client has more than _WRITE_HIGH_WATER
        bytes queued: write(data), one piece (write_nowait's work); write_chunk(chunk,
        size), one of the node's own HTTP/1.1 chunks (size line, `size` payload bytes,
        CRLF) passed on as it is - the bytes write() would make of its payload;
        write_end(data), the body's last piece with the body's end in the same write
        (one segment: the client has its whole reply before mesh's bookkeeping).  The
        last two are None when this response is not chunked."""
        if not body_allowed(self.request.method, self.status or 200):
            return (lambda data: False), None, None
        transport, chunked = self.conn.writer.transport, self._chunked
        if self.first_byte_at is None:
            self.first_byte_at = time.monotonic()

        def sent(size: int, data: bytes) -> bool:
            self.bytes_out += size
            transport.write(data)
            return transport.get_write_buffer_size() > _WRITE_HIGH_WATER

        def write(data: bytes) -> bool:
            return sent(len(data), _chunk(data) if chunked else data)
        if not chunked:
            return write, None, None

        def write_end(data: bytes) -> bool:
            self._body_ended = True
            return sent(len(data), _chunk(data, last=True))
        return write, lambda chunk, size: sent(size, chunk), write_end

    async def drain_client(self) -> None:
        await self.conn.drain()

    async def write(self, data: bytes) -> None:
        """One piece of a streamed body, sent at once."""
        if not data or not body_allowed(self.request.method, self.status or 200):
            return
        if self.first_byte_at is None:
            self.first_byte_at = time.monotonic()
        self.bytes_out += len(data)
        if self._chunked:
            self.conn.writer.write(_chunk(data))
        else:
            self.conn.writer.write(data)
        await self.conn.drain()

    async def write_json_line(self, obj: Dict[str, Any]) -> None:
        self._note(obj)
        if "error" in obj and len(obj) == 1:
            self.error = str(obj["error"])[:200]
        try:
            line = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:   # a lone surrogate from a node
            line = json.dumps(obj).encode("ascii")
        await self.write(line + b"\n")

    async def end_stream(self) -> None:
        if self._chunked and not self._body_ended:
            self._body_ended = True
            self.conn.writer.write(b"0\r\n\r\n")
            await self.conn.drain()
        self._streaming = False

    async def unless_client_leaves(self, work: Any, *, what: str = "before the reply") -> Any:
        """Await `work` (a coroutine: the node's part of this request) while watching the
        client.  A client that closes its connection first cancels `work` - and with it
        the node's request: its channel or ssh child is closed, which makes the node's
        Ollama stop generating, as Ollama's own server stops when its client leaves (Go's
        net/http ends the request's context) - and ConnectionResetError is raised.
        What `work` returns or raises otherwise is passed on.  `work` runs in this task;
        the client connection's protocol, which learns of the client leaving anyway,
        cancels it (no watching task, no asyncio.wait per request)."""
        reader = self.conn.reader
        if reader.left():
            work.close()
            return self._client_left(what)
        task = asyncio.current_task()
        left = [False]

        def client_left() -> None:
            left[0] = True
            task.cancel()

        reader.watch(client_left)
        try:
            result = await work
        except asyncio.CancelledError:
            if not left[0]:
                raise
            uncancel = getattr(task, "uncancel", None)    # Python 3.11+: this cancel is handled
            if uncancel is not None:
                uncancel()
            return self._client_left(what)
        finally:
            reader.unwatch()
        if left[0]:         # the cancel came too late to stop `work`: nobody will read its result
            uncancel = getattr(task, "uncancel", None)
            if uncancel is not None:
                uncancel()
            closer = getattr(result, "aclose", None)
            if closer is not None:
                await closer()
            return self._client_left(what)
        return result

    def _client_left(self, what: str) -> Any:
        logger.info("client went away %s; cancelling the node's request", what)
        self.error = CLIENT_WENT_AWAY
        raise ConnectionResetError("client disconnected")


_WRITE_HIGH_WATER = 256 * 1024   # bytes queued for a client before the relay waits for it


class StreamRelay:
    """Moves a node's streamed reply to the client as the bytes the node sent (NDJSON,
    or SSE for the OpenAI/Anthropic endpoints), with the node's Content-Type: one
    chunk and one write per read from the node (several of its lines when they came
    together), written from the node connection's data_received (RawStream.relay_rest),
    waiting for the client only when its socket buffer is full.  The
    stream arrives with its first line in hand (open_stream), so failures before it
    already got a proper status; after it an error becomes a last line or event in
    the stream's own format (_error_event).  A client that goes away cancels the
    node's request.  One job, replaceable: MeshServer.relay() makes one per streamed reply."""

    def __init__(self, ex: Exchange) -> None:
        self.ex = ex

    async def run(self, stream: "Any") -> None:
        if isinstance(stream, _Stream):
            stream = stream._raw          # a dict stream not yet read: relay its bytes
        try:
            await self.ex.unless_client_leaves(self._pump(stream), what="mid-stream")
        finally:
            await stream.aclose()

    async def _pump(self, stream: "RawStream") -> None:
        ex = self.ex
        headers = [("Cache-Control", "no-cache")] if stream.sse else []
        started = False
        try:
            async for block in stream:      # the first block: the head goes out with it
                started = True
                ex.first_token_at = time.monotonic()
                await ex.start_stream(stream.content_type, node=stream.node, headers=headers, first=block,
                                      last=stream.complete)
                break
            if started:
                write, write_chunk, write_end = ex.relay_writers()
                await stream.relay_rest(write, ex.drain_client, write_chunk, write_end)
        except MeshError as exc:
            if not started:
                raise
            ex.error = str(exc)[:200]
            if stream.sse or "ndjson" in stream.content_type.lower():
                ex.write_nowait(_error_event(stream, str(exc)))
            else:
                # A whole answer (one JSON document: stream=false) cut off: an error line after
                # part of it would leave neither readable.  The body ends short instead (no
                # last chunk, the connection closed), as the client would see it from the node.
                ex.keep_alive = False
                ex._body_ended = True
        if not started:
            raise HTTPError(502, "node sent no data")
        ex._note(stream.final or stream.usage)   # the token counts, for the access log and the metrics
        await ex.end_stream()


class _Connection:
    """One client connection: reads request heads, runs an Exchange for each,
    keeps the connection alive between them as HTTP/1.1 allows."""

    def __init__(self, server: "MeshServer", reader: _ClientReader, writer: "_ClientWriter") -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.client = peer[0] if isinstance(peer, (tuple, list)) and peer else "-"   # for the access log
        self.write_timed_out: Optional[str] = None    # why drain aborted the connection (request_finished)

    async def serve(self) -> None:
        server, limits = self.server, self.server.limits
        task = asyncio.current_task()
        first = True
        while not server.stopping:
            server.idle.add(task)
            try:
                head = await self.reader.read_head(
                    first_wait=limits.header_timeout if first else limits.keepalive_timeout)
            except HTTPError as exc:
                await self._reply_error(self.reader.peek(), exc)
                return
            finally:
                server.idle.discard(task)
            first = False
            if head is None:
                return
            try:
                request = parse_request_head(head)
            except HTTPError as exc:
                await self._reply_error(head, exc)
                return
            ex = Exchange(self, request)
            try:
                await server.dispatch(ex)
            finally:
                server.request_finished(ex)
            if not ex.keep_alive or self.reader.overflowed or self.reader.eof:
                return

    async def _reply_error(self, head: bytes, exc: HTTPError) -> None:
        """A request that could not be parsed: answer (unless the client is gone) and
        close.  Its method and target are what the request line seems to say (for
        the access log, and so that a HEAD gets no body even here)."""
        words = head.split(b"\n", 1)[0].decode("latin-1").split(" ")
        method = "HEAD" if words[0] == "HEAD" else words[0][:16] or "-"
        target = words[1][:200] if len(words) > 1 else "-"
        ex = Exchange(self, HTTPRequest(method, target, target, "", (1, 1), []))
        ex.body_read = True
        ex.keep_alive = False
        try:
            # in the shape of the API the target seems to be for, as every other error
            await ex.send_json(exc.status, error_body(api_family(target.split("?", 1)[0]), exc.status, str(exc)),
                               headers=exc.headers)
        except (ConnectionError, RuntimeError):
            pass
        finally:
            self.server.request_finished(ex)

    async def drain(self) -> None:
        """Wait until the client has taken what was written, for at most
        limits.write_timeout: a client that stops reading would otherwise hold its
        request (and the node's slot) for ever.  Past it the connection is aborted."""
        reader = self.reader
        if not reader.lost and not reader.write_paused:
            return      # the client's socket has room: the usual case, with no await at all
        transport = self.writer.transport
        if transport.get_write_buffer_size() <= 65536:
            await self.writer.drain()         # returns at once: no timer to set up
            return
        try:
            await asyncio.wait_for(self.writer.drain(), self.server.limits.write_timeout)
        except asyncio.TimeoutError:
            transport.abort()
            self.write_timed_out = f"client read nothing for {self.server.limits.write_timeout:g} s"
            raise ConnectionResetError(self.write_timed_out) from None

    async def discard_body(self, ex: Exchange) -> None:
        """Before a response to a request whose body the handler did not read: a
        small body is read and dropped so the connection can serve the next request;
        a large one (or one the client waits to be asked for) closes it instead."""
        req = ex.request
        if req.expect_continue or req.chunked or (req.content_length or 0) > self.server.limits.drain_body:
            ex.body_read = True
            ex.keep_alive = False
            return
        try:
            async for _ in ex.body_chunks():
                pass
        except HTTPError:
            ex.keep_alive = False


class ServeOps:
    """What `serve` knows about its own traffic: the metrics behind GET /metrics, the
    recent requests and per-node speed behind /mesh/status, and the access log.

    access_log: "plain", "json" or "off" (format_access_line); lines go to the
    "mesh.access" logger at INFO.  Label values stay few: `path` is the matched route's
    pattern or "other", `model` is set only when a node answered."""

    RECENT = 50

    def __init__(self, orch: MeshOrchestrator, *, access_log: str = "plain") -> None:
        import collections
        self.orch = orch
        self.access_log = access_log
        self.recent: "collections.deque[AccessRecord]" = collections.deque(maxlen=self.RECENT)
        self.speed: Dict[str, Dict[str, Optional[float]]] = {}   # node -> EWMAs
        r = self.registry = MetricsRegistry()
        self.requests = r.add("mesh_requests_total", "counter",
                              "HTTP requests answered, by route, model, node and status code.",
                              ("path", "model", "node", "code"))
        self.errors = r.add("mesh_request_errors_total", "counter",
                            "Requests that failed: type client (4xx), server (5xx), stream (an error "
                            "after the answer began) or disconnect (the client left before the end of "
                            "its answer).",
                            ("path", "model", "node", "type"))
        self.ttft = r.add("mesh_time_to_first_token_seconds", "histogram",
                          "Time from the request to the first streamed chunk, by model and node.",
                          ("model", "node"))
        self.duration = r.add("mesh_request_duration_seconds", "histogram",
                              "Time from the request to its last byte, by model and node.", ("model", "node"))
        self.tokens = r.add("mesh_tokens_generated_total", "counter",
                            "Tokens generated (Ollama's eval_count; OpenAI's/Anthropic's usage), by model and node.", ("model", "node"))
        self.in_flight = r.add("mesh_requests_in_flight", "gauge", "Requests running on each node.", ("node",))
        self.queue = r.add("mesh_queue_length", "gauge",
                           "Requests waiting in mesh.py because every node they could go to is full.")
        self.node_queue = r.add("mesh_node_queue_length", "gauge",
                                "Waiting requests this node could take once it has a free slot.", ("node",))
        self.up = r.add("mesh_node_up", "gauge", "1 while the node answers, 0 while it is down.", ("node",))
        self.max_concurrent = r.add("mesh_node_max_concurrent", "gauge",
                                    "The node's max_concurrent setting.", ("node",))
        self.reloads = r.add("mesh_config_reloads_total", "counter",
                             "SSH config re-reads, by result (error: the config did not parse; nodes "
                             "unchanged).", ("result",))

    def finished(self, ex: "Exchange") -> None:
        """MeshServer.request_finished: one request is over (answered or not)."""
        now = time.monotonic()
        rec = AccessRecord(ex.conn.client, ex.request.method, ex.request.path,
                           started=time.time() - (now - ex.started))
        rec.model, rec.node, rec.status, rec.error = ex.model, ex.node, ex.status, ex.error
        rec.tokens, rec.eval_duration = ex.tokens, ex.eval_duration
        if ex.first_byte_at is not None:
            rec.ttfb = ex.first_byte_at - ex.started
        if ex.first_token_at is not None:
            rec.first_token = ex.first_token_at - ex.started
        rec.duration = now - ex.started
        self.record(rec, ex.route.pattern if ex.route else None)

    def record(self, rec: AccessRecord, route: Optional[str] = None) -> None:
        """Account for one finished request: metrics, recent list, access-log line.
        `route` is the pattern of the route that answered it (None: none did)."""
        if rec.duration is None:
            rec.duration = rec.elapsed()
        path = route or "other"
        model = (rec.model or "") if rec.node else ""
        node = rec.node or ""
        code = str(rec.status or 499)   # 499: the client left before an answer (nginx's code)
        self.requests.inc((path, model, node, code))
        kind = None
        if rec.status is None:
            kind = "disconnect"
        elif rec.status >= 500:
            kind = "server"
        elif rec.status >= 400:
            kind = "client"
        elif rec.error:
            # after the answer began: the client leaving is a disconnect, anything else the stream's fault
            kind = "disconnect" if rec.error == CLIENT_WENT_AWAY else "stream"
        if kind:
            self.errors.inc((path, model, node, kind))
        if rec.node and rec.model:
            self.duration.observe((model, node), rec.duration)
            if rec.first_token is not None:
                self.ttft.observe((model, node), rec.first_token)
            if rec.tokens:
                self.tokens.inc((model, node), rec.tokens)
            if rec.status == 200 and not rec.error:
                self._note_speed(rec)
            self.recent.append(rec)          # made a dict only when /mesh/status asks
        if self.access_log != "off":
            access_logger.info(format_access_line(rec, self.access_log))

    def _note_speed(self, rec: AccessRecord) -> None:
        speed = self.speed.setdefault(rec.node or "", {"tokens_per_s": None, "ttft_ms": None})
        rate = rec.tokens_per_second()
        if rate is not None:
            speed["tokens_per_s"] = round(ewma(speed["tokens_per_s"], rate), 1)
        if rec.first_token is not None:
            speed["ttft_ms"] = round(ewma(speed["ttft_ms"], rec.first_token * 1000), 1)

    def render_metrics(self) -> str:
        """The /metrics page: the counters so far plus gauges read from the pool now."""
        for family in (self.in_flight, self.node_queue, self.up, self.max_concurrent):
            family.samples.clear()   # nodes removed from the config drop out
        for node in self.orch.nodes:
            self.in_flight.set((node.name,), node.active_requests)
            self.node_queue.set((node.name,), self.orch.queue_length(node.name))
            self.up.set((node.name,), 1 if node.healthy else 0)
            self.max_concurrent.set((node.name,), node.max_concurrent)
        self.queue.set((), self.orch.queue_length())
        for result, count in self.orch.reloads.items():
            self.reloads.samples[(result,)] = float(count)
        return self.registry.render()

    def status(self) -> Dict[str, Any]:
        """/mesh/status: every node's status() plus queued and speed, the pool's queue,
        and the recent requests (newest first)."""
        nodes = []
        for node in self.orch.nodes:
            entry = node.status()
            entry["queued"] = self.orch.queue_length(node.name)
            entry["speed"] = self.speed.get(node.name)
            nodes.append(entry)
        return {"nodes": nodes, "queue": self.orch.queue_length(),
                "recent": [rec.as_dict() for rec in reversed(self.recent)],
                "mesh": __version__}


class MeshServer:
    """Ollama's HTTP API (and mesh's operations) over asyncio streams, answered by
    a MeshOrchestrator.

    apis: the API classes whose route tables make up the server, in order.
    limits: a ServerLimits.  request_finished(ex) is called once per finished
    request: it feeds `ops` (a ServeOps: metrics, recent requests, the access log in
    the `access_log` format)."""

    apis: Sequence[type] = (OllamaAPI, OpenAIAPI, AnthropicAPI, MeshOpsAPI)

    def __init__(self, orch: MeshOrchestrator, *, token: Optional[str] = None,
                 limits: Optional[ServerLimits] = None, origins: Optional[str] = None,
                 listen_host: str = "127.0.0.1", access_log: str = "plain") -> None:
        self.orch = orch
        self.token = token
        self.limits = limits or ServerLimits()
        self.ops = ServeOps(orch, access_log=access_log)
        self.router = Router([api(self) for api in self.apis])
        self.origins = allowed_origins(origins)    # origins: extra ones, as OLLAMA_ORIGINS
        self.listen_host = listen_host
        # Ollama checks the Host header only when it listens on loopback; so does mesh.
        self.check_host = _is_loopback(listen_host)
        self.active: set = set()     # connection handler tasks
        self.idle: set = set()       # ... of which waiting for a next request
        self.stopping = False

    async def handle(self, reader: _ClientReader, writer: _ClientWriter) -> None:
        """Serve one client connection (Listener calls this for each)."""
        task = asyncio.current_task()
        self.active.add(task)
        try:
            await _Connection(self, reader, writer).serve()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass
        except Exception as exc:       # a bug: one line (the traceback with -vv), and the next client
            logger.error("connection dropped: internal error: %r", exc, exc_info=logger.isEnabledFor(logging.DEBUG))
        finally:
            self.active.discard(task)
            writer.close()

    def authorized(self, req: HTTPRequest) -> bool:
        """Whether the request carries the token (always, without --token): as a
        bearer token, or as x-api-key (what the Anthropic SDK sends its api_key as)."""
        if not self.token:
            return True
        import hmac
        token = self.token.encode("latin-1", "replace")
        # The scheme is case-insensitive (RFC 9110 section 11.1): "bearer T" is the same token.
        scheme, _, credentials = req.header("authorization").partition(" ")
        bearer = credentials.strip() if scheme.lower() == "bearer" else ""
        return hmac.compare_digest(bearer.encode("latin-1"), token) or \
            hmac.compare_digest(req.header("x-api-key").encode("latin-1"), token)

    def browser_check(self, req: HTTPRequest) -> List[Tuple[str, str]]:
        """Ollama's rules for browsers, before anything else: the Host header must name
        this machine when listening on loopback (allowedHostsMiddleware: DNS
        rebinding), and a request from a page on another origin must come from an
        allowed origin - gin-contrib/cors refuses the rest with 403, whatever the
        method or content type (so a cross-site text/plain POST never runs).
        Returns the CORS headers for the reply (none for same-origin and non-browser
        requests); raises HTTPError 403."""
        host = req.header("host")
        if self.check_host and not host_allowed(host, self.listen_host):
            raise HTTPError(403, f"Host {host!r} is not this machine (DNS rebinding protection); "
                                 "use localhost or the listen address")
        origin = req.header("origin")
        if not origin or origin.lower() in (f"http://{host}".lower(), f"https://{host}".lower()):
            return []
        if not origin_allowed(origin, self.origins):
            raise HTTPError(403, f"origin {origin!r} is not allowed (add it to --origins or OLLAMA_ORIGINS)")
        fields = [("Access-Control-Allow-Origin", "*" if "*" in self.origins else origin), ("Vary", "Origin")]
        if req.method == "OPTIONS":
            fields += [("Access-Control-Allow-Methods", CORS_ALLOW_METHODS),
                       ("Access-Control-Allow-Headers", ",".join(CORS_ALLOW_HEADERS)),
                       ("Access-Control-Max-Age", str(CORS_MAX_AGE))]
        return fields

    async def dispatch(self, ex: Exchange) -> None:
        """Route, check the token (before any body byte), run the handler, and turn
        what it raises into an error reply in its API's shape."""
        req = ex.request
        route, params, not_found = self.router.match(req.method, req.path)
        api = route.api if route else self._api_for(req.path)
        try:
            ex.extra_headers = self.browser_check(req)
            if req.method == "OPTIONS" and ex.extra_headers:
                # a CORS preflight: answered before the token check (browsers send none with it)
                await ex.send(204, b"", "text/plain; charset=utf-8")
                return
            if (route is None or route.auth) and not self.authorized(req):
                raise HTTPError(401, "unauthorized: missing or wrong bearer token")
            if not_found:
                raise not_found
            assert route is not None
            ex.route = route
            req.params = params
            try:
                await getattr(route.api, route.handler)(ex)
            except HTTPError:
                raise
            except MeshError as exc:
                raise HTTPError(_status_for(exc), str(exc)) from None
            except (ConnectionError, asyncio.CancelledError):
                raise
            except Exception as exc:   # a bug: one log line with the traceback, a 500, and on
                logger.error("%s %s: internal error: %r", req.method, req.path, exc,
                             exc_info=logger.isEnabledFor(logging.DEBUG))
                ex.keep_alive = False
                raise HTTPError(500, f"internal error: {exc!r}") from None
        except HTTPError as exc:
            ex.error = ex.error or str(exc)[:200]
            if ex.answered:
                logger.info("error after the reply started: %s", exc)
                ex.keep_alive = False
                return
            await ex.send_json(exc.status, api.error_body(exc.status, str(exc)), headers=exc.headers)

    def relay(self, ex: Exchange) -> StreamRelay:
        """The relay for a node's streamed reply to this exchange."""
        return StreamRelay(ex)

    def _api_for(self, path: str) -> _API:
        """The API whose error shape a path with no route gets."""
        family = api_family(path)
        wanted = {"openai": OpenAIAPI, "anthropic": AnthropicAPI}.get(family, OllamaAPI)
        for route in self.router.routes:
            if type(route.api) is wanted:
                return route.api
        return self.router.routes[0].api

    def request_finished(self, ex: Exchange) -> None:
        """Called once per finished request, answered or not (status None when the
        client left first)."""
        if ex.error is None and ex.conn.write_timed_out:
            ex.error = ex.conn.write_timed_out    # the access log and metrics say the reply was cut
        self.ops.finished(ex)


def _error_event(stream: RawStream, message: str) -> bytes:
    """How a stream that fails midway says so, in its own format: Ollama's error line
    for NDJSON; for SSE, Anthropic's `error` event on /v1/messages, else OpenAI's
    `data: {"error": {...}}` (what each API sends when a stream fails).  After a last
    line the node sent without its newline (an event without its blank line), that
    ends first: the error is a line (event) of its own."""
    if not stream.sse:
        return (b"\n" if stream._scan.open else b"") + json.dumps({"error": message}).encode("ascii") + b"\n"
    start = b"\n\n" if stream._scan.open else b""
    if stream._path.startswith("/v1/messages"):
        obj = {"type": "error", "error": {"type": "api_error", "message": message}}
        return start + b"event: error\ndata: " + json.dumps(obj).encode("ascii") + b"\n\n"
    obj2 = {"error": {"message": message, "type": "api_error", "param": None, "code": None}}
    return start + b"data: " + json.dumps(obj2).encode("ascii") + b"\n\n"


def _status_for(exc: MeshError) -> int:
    if isinstance(exc, HTTPError):
        return exc.status
    if isinstance(exc, (ModelNotFoundError, UnsupportedPathError)):
        return 404
    if isinstance(exc, _ClientError):
        return exc.status or 400
    if isinstance(exc, UsageError):
        return 400
    if isinstance(exc, NoNodeAvailableError):
        return 503
    if isinstance(exc, RequestFailedError):
        return exc.status
    return 502


def listen_backlog() -> int:
    """The kernel's limit for a listen queue (net.core.somaxconn), as Go's net package
    (Ollama) uses: asyncio's default of 100 drops SYNs in a burst of a few hundred
    connects, and each dropped client waits a second for its SYN retry."""
    import socket
    try:
        with open("/proc/sys/net/core/somaxconn") as fh:
            return max(int(fh.read().split()[0]), 128)
    except (OSError, ValueError, IndexError):
        return max(socket.SOMAXCONN, 511)   # nginx's default on systems without /proc


class Listener:
    """The listening sockets of a MeshServer and their accept loops.

    asyncio's own accept loop, out of file descriptors (EMFILE), logs a traceback for
    every pending connection and retries many times a second - hundreds of thousands
    of lines while the process is out of descriptors.  Here the first failure logs
    one line, accepting pauses (polling every accept_retry seconds, as Go's
    net/http backs off), and one more line says when connections are taken again.
    Within starved_quiet seconds of that line a new shortage is not logged again:
    while descriptors stay scarce, serve's own background work (health probes, the
    config poll) frees one now and then, and each would make a pair of lines."""

    accept_retry = 0.25
    starved_quiet = 60.0

    def __init__(self, server: "MeshServer", host: str, port: int, *, backlog: Optional[int] = None) -> None:
        self.server = server
        self.host, self.port, self.backlog = host, port, backlog or listen_backlog()
        self.sockets: List[Any] = []
        self._tasks: List[Any] = []

    def open(self) -> None:
        """Bind and listen on every address host resolves to; OSError if none works."""
        import socket
        infos = socket.getaddrinfo(self.host or None, self.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        error: Optional[OSError] = None
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
                sock.listen(self.backlog)
                sock.setblocking(False)
            except OSError as exc:
                sock.close()
                error = error or exc
                continue
            self.sockets.append(sock)
        if not self.sockets:
            raise error or OSError("no address to listen on")

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._accept_loop(sock)) for sock in self.sockets]

    def close(self) -> None:
        """Stop accepting; connections already accepted go on."""
        for task in self._tasks:
            task.cancel()
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            loop.remove_reader(sock.fileno())
            sock.close()

    async def _accept_loop(self, sock: Any) -> None:
        import errno
        loop = asyncio.get_running_loop()
        starved = False
        logged_at: Optional[float] = None
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                        continue        # the client gave up before we took it
                    raise
                if not starved and (logged_at is None or time.monotonic() - logged_at > self.starved_quiet):
                    logger.warning("cannot accept connections: %s; retrying every %g s until some close",
                                   exc.strerror, self.accept_retry)
                    starved, logged_at = True, time.monotonic()
                await asyncio.sleep(self.accept_retry)
                continue
            if starved:
                logger.warning("accepting connections again")
                starved = False
            asyncio.ensure_future(self._connection(conn))

    async def _connection(self, conn: Any) -> None:
        proto = _ClientReader(self.server.limits)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: proto, sock=conn)
        except OSError:
            conn.close()
            return
        await self.server.handle(proto, _ClientWriter(proto))


def _raise_open_files_limit() -> None:
    """The soft RLIMIT_NOFILE up to the hard one, as Go's runtime does at every start (so
    Ollama's server runs with it): serve holds two descriptors per relayed stream (the
    client's, the node's), and the usual soft limit of 1024 capped it near 500 streams."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        for want in (hard, 10240):      # macOS refuses RLIM_INFINITY; its OPEN_MAX is 10240
            if soft != resource.RLIM_INFINITY and (want == resource.RLIM_INFINITY or want > soft):
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                    logger.debug("open files limit raised from %s to %s", soft, want)
                    return
                except (OSError, ValueError):
                    continue
    except (ImportError, OSError, ValueError):
        pass


async def cmd_serve(orch: MeshOrchestrator, args: Any) -> int:
    import signal
    _raise_open_files_limit()
    host, port = parse_host_port(args.listen, 11500, listen=True)
    if not _is_loopback(host) and not args.token and not args.allow_remote:
        raise UsageError(f"refusing to listen on non-loopback {host} without --token "
                         "(anyone who can reach it could use your GPUs); add --allow-remote to force")
    limits = ServerLimits(max_body=args.max_body, max_header_bytes=args.max_header_bytes,
                          header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                          keepalive_timeout=args.keepalive_timeout, write_timeout=args.write_timeout)
    _setup_access_log(args.access_log, args.access_log_file)
    orch.health_log_level = logging.WARNING
    front = MeshServer(orch, token=args.token, limits=limits, origins=args.origins, listen_host=host,
                       access_log=args.access_log)
    server = Listener(front, host, port)
    try:
        server.open()
    except OSError as exc:
        raise MeshError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig, action in ((signal.SIGTERM, stop.set), (signal.SIGINT, stop.set),
                        (signal.SIGHUP, orch.request_reload)):
        try:
            loop.add_signal_handler(sig, action)
        except (NotImplementedError, RuntimeError, AttributeError):
            pass
    bound = server.sockets[0].getsockname()
    _print(f"mesh: serving {len(orch.nodes)} node(s) as Ollama on http://{bound[0]}:{bound[1]}"
           + (" (bearer token required)" if args.token else ""), file=sys.stderr)
    _print(f"mesh: dashboard on http://{bound[0]}:{bound[1]}/mesh/, metrics on /metrics", file=sys.stderr)
    orch._spawn(orch.refresh())
    orch._spawn(orch.watch_config(float(os.environ.get("MESH_CONFIG_POLL_INTERVAL") or CONFIG_POLL_INTERVAL)))
    orch._spawn(orch.watch_health())
    await stop.wait()
    _print("mesh: shutting down: no new connections; waiting for running requests", file=sys.stderr)
    server.close()
    front.stopping = True
    for task in list(front.idle):      # keep-alive connections between requests: close now
        task.cancel()
    pending = {t for t in front.active if t is not None and t not in front.idle}
    if pending:
        done, pending = await asyncio.wait(pending, timeout=args.shutdown_grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
    return 0


def _setup_access_log(fmt: str, path: Optional[str]) -> None:
    """serve's access log: its own handler, at any -v level (lines are the product,
    not diagnostics); to stderr, or appended to `path` - reopened when the file is moved
    or removed (logrotate), as logging.handlers.WatchedFileHandler does."""
    if fmt not in ACCESS_LOG_FORMATS:
        raise UsageError(f"access log format {fmt!r}: one of {', '.join(ACCESS_LOG_FORMATS)}")
    if fmt == "off":
        return
    try:
        import logging.handlers
        handler: logging.Handler = (logging.handlers.WatchedFileHandler(path, encoding="utf-8") if path
                                    else logging.StreamHandler(sys.stderr))
    except OSError as exc:
        raise UsageError(f"--access-log-file {path}: {exc.strerror or exc}") from None
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_logger.handlers[:] = [handler]
    access_logger.propagate = False
    access_logger.setLevel(logging.INFO)


async def cmd_bench(orch: MeshOrchestrator, args: Any) -> int:
    """Time to first token and tokens per second, node by node (masters warmed first)."""
    if args.model and args.model_word and args.model != args.model_word:
        raise UsageError(f"bench: two models given ({args.model_word} and --model {args.model})")
    model = args.model or args.model_word or orch.default_model
    key = model_key(model)
    nodes = [orch.node(args.node)] if args.node else orch.nodes
    await orch.refresh(force=True)
    _print(f"{model}: {'node':<16} {'runs':>4} {'first token ms':>15} {'tokens/s':>9}  note")
    measured = 0
    failed: List[str] = []
    for node in nodes:
        if not node.healthy:
            _print(f"{'':{len(model) + 2}}{node.name:<16} {0:>4} {'-':>15} {'-':>9}  down: {node.reason}")
            failed.append(f"{node.name} (down: {node.reason})")
            continue
        if key not in node.models:
            _print(f"{'':{len(model) + 2}}{node.name:<16} {0:>4} {'-':>15} {'-':>9}  does not have the model")
            continue
        ttfts: List[float] = []
        rates: List[float] = []
        note = ""
        for _ in range(max(1, args.runs)):
            started = time.monotonic()
            first = None
            final: Dict[str, Any] = {}
            try:
                stream = await orch.generate(args.prompt, model=model, node=node.name, stream=True,
                                             options={"temperature": 0})
                async for chunk in stream:
                    if first is None and (chunk.get("response") or chunk.get("done")):
                        first = time.monotonic() - started
                    final = chunk
            except MeshError as exc:
                note = str(exc)
                break
            ttfts.append((first or 0.0) * 1000)
            count, dur = final.get("eval_count"), final.get("eval_duration")
            if count and dur:
                rates.append(count / (dur / 1e9))
        if ttfts:
            measured += 1
        if note:
            failed.append(f"{node.name} ({note})")
        ttft = f"{sorted(ttfts)[len(ttfts) // 2]:.1f}" if ttfts else "-"
        rate = f"{sorted(rates)[len(rates) // 2]:.1f}" if rates else "-"
        _print(f"{'':{len(model) + 2}}{node.name:<16} {len(ttfts):>4} {ttft:>15} {rate:>9}  {note}")
    if not measured:
        raise MeshError(f'no node could be measured with model "{model}"')
    if failed:   # a figure missing for a node must not look like success to a script
        raise MeshError(f"could not measure {', '.join(failed)}")
    return 0


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------

_CONTROL_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")   # all but \t and \n
_CONTROL_CHARS_ONE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SURROGATES = re.compile("[\ud800-\udfff]")


def _visible_char(m: "re.Match[str]") -> str:
    c = m.group()
    return "\ufffd" if "\ud800" <= c <= "\udfff" else repr(c)[1:-1]


def terminal_text(text: str, *, one_line: bool = False) -> str:
    """Text from a node made safe for a terminal: control characters shown as escapes
    (ESC as `\\x1b`: no fake lines, window titles or cleared screens), \t and \n kept
    unless one_line; a lone surrogate (JSON allows `\\ud800`, UTF-8 cannot carry it)
    becomes U+FFFD."""
    return (_CONTROL_CHARS_ONE_LINE if one_line else _CONTROL_CHARS).sub(_visible_char, text)


def _for_stream(stream: Any, text: str) -> str:
    """Text as it may be written to stream: through terminal_text() on a terminal;
    elsewhere byte for byte but for lone surrogates (U+FFFD: UTF-8 cannot carry them)."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return terminal_text(text) if tty else _SURROGATES.sub("\ufffd", text)


def _print(text: str = "", *, end: str = "\n", file: Any = None) -> None:
    """Write a line of output (see _for_stream)."""
    stream = file or sys.stdout
    _write_out(stream, _for_stream(stream, text) + end)


_OPEN_LINE: Dict[int, bool] = {}     # id(stream) -> the last text written to it ended mid-line


def _write_out(stream: Any, text: str) -> None:
    """Write and flush, remembering whether the stream was left mid-line (an answer cut
    off by an error: see _end_open_line)."""
    stream.write(text)
    stream.flush()
    if text:
        _OPEN_LINE[id(stream)] = not text.endswith("\n")


def _end_open_line(stream: Any) -> None:
    """Before an error line on a terminal: end an answer left mid-line on `stream`, so the
    error starts a line of its own ('Hello' then 'mesh: error: ...', not 'Hellomesh: error')."""
    try:
        if _OPEN_LINE.pop(id(stream), False) and stream.isatty():
            stream.write("\n")
            stream.flush()
    except (AttributeError, ValueError, OSError):
        pass


async def _ssh_g(alias: str, config: Optional[str], ssh: str = "ssh") -> Dict[str, Any]:
    """Ask ssh itself (ssh -G) for a host whose settings a `Match exec` decides."""
    argv = [ssh] + (["-F", config] if config else []) + ["-G", "-T", "--", alias]
    rc, out, err = await run_command(argv, timeout=30)
    if rc != 0:
        raise ConfigError(f"{alias}: ssh -G failed: {describe_ssh_failure(err, rc)}")
    values: Dict[str, Any] = {"identityfile": []}
    for line in out.decode("utf-8", "replace").splitlines():
        key, _, value = line.partition(" ")
        if key == "identityfile":
            values["identityfile"].append(value)
        elif key in ("hostname", "user", "port"):
            values[key] = int(value) if key == "port" else value
    return values


def _all_hosts(orch: MeshOrchestrator) -> List[Tuple[NodeSpec, Optional[str]]]:
    """Every concrete alias of the config with why it is not a node (None: it is);
    the local fallback node last when no Host is marked."""
    out: List[Tuple[NodeSpec, Optional[str]]] = []
    if os.path.exists(orch.config_path):
        for info in SSHConfig.load(orch.config_path).aliases():
            out.append((NodeSpec.from_settings(info.alias, info.mesh, info, where=orch.config_path),
                        node_verdict(info)))
    out += [(n.spec, None) for n in orch.nodes if n.spec.fallback]
    return out


async def cmd_nodes(orch: MeshOrchestrator, args: Any) -> int:
    rows = []
    ssh_cfg = orch.ssh_config
    if getattr(args, "all", False):
        specs = _all_hosts(orch)
    else:
        specs = [(n.spec, None) for n in orch.nodes]
    for spec, why_not in specs:
        row = spec.as_dict()
        if row["unresolved"]:
            row.update(await _ssh_g(spec.name, ssh_cfg))
        if getattr(args, "all", False):
            row.update(node=why_not is None, reason=why_not)
        rows.append(row)
    if args.json:
        _print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        if "node" in r and not r["node"]:
            _print(f"{r['name']:<{width}}  -  {r['reason']}")
            continue
        target = f"{r['user']}@{r['hostname']}:{r['port']}" if r["user"] else f"{r['hostname']}:{r['port']}"
        extra = []
        if r["display_name"] != r["name"]:
            extra.append(repr(r["display_name"]))
        if r["weight"] != 1:
            extra.append(f"weight={r['weight']:g}")
        extra.append(f"max_concurrent={r['max_concurrent']}")
        if r["ollama_port"] != DEFAULT_OLLAMA_PORT:
            extra.append(f"ollama_port={r['ollama_port']}")
        if r["transport"] not in ("auto", "http"):
            extra.append(f"transport={r['transport']}")
        _print(f"{r['name']:<{width}}  {target}  {' '.join(extra)}")
    return 0


def _format_check(r: Dict[str, Any], width: int) -> str:
    if not r["ok"]:
        return f"FAIL  {r['name']:<{width}}  {r['error']}"
    parts = []
    if r["ssh_ms"] is not None:
        parts.append(f"ssh {r['ssh_ms']:.0f} ms")
    parts.append(f"ollama {r['version']} ({r['ollama_ms']:.0f} ms)")
    parts.append("models: " + (", ".join(r["models"]) or "none"))
    if r["loaded"]:
        parts.append("loaded: " + ", ".join(r["loaded"]))
    if r.get("facts"):
        parts.append(_facts_text(r["facts"]))
    return f"ok    {r['name']:<{width}}  " + "  ".join(parts)


def _facts_text(facts: Dict[str, Any]) -> str:
    """A node's facts in one short phrase: 'RTX 4090 1.2/24.0 GB VRAM, RAM 64 GB (40 GB free), load 0.42'."""
    parts = []
    if facts.get("gpu"):
        parts.append(f"{facts['gpu']} {_gb(facts.get('vram_used'))}/{_gb(facts.get('vram_total'))} GB VRAM")
    if facts.get("ram_total"):
        parts.append(f"RAM {_gb(facts['ram_total'])} GB ({_gb(facts.get('ram_available'))} GB free)")
    if "load_1m" in facts:
        parts.append(f"load {facts['load_1m']:.2f}" + (f"/{facts['cpus']} cpus" if facts.get("cpus") else ""))
    return ", ".join(parts)


def _gb(size: Optional[int]) -> str:
    return "-" if size is None else f"{size / 1e9:.1f}"


async def cmd_test(orch: MeshOrchestrator, args: Any) -> int:
    limit = asyncio.Semaphore(max(1, args.parallel))
    timeout = args.timeout or (orch.connect_timeout + 3 * orch.probe_timeout)
    width = max(len(n.name) for n in orch.nodes)

    async def one(node: SSHNode) -> Dict[str, Any]:
        async with limit:
            started = time.monotonic()
            try:
                result = await asyncio.wait_for(orch.check_node(node, facts=True), timeout)
            except asyncio.TimeoutError:
                reason = f"no answer within {timeout:g}s (node frozen or unreachable?)"
                orch._mark_down(node, reason)
                return orch.check_result(node, reason)
            if result["ok"] and node.facts_task is not None:
                # the facts may take what is left of the node's time; without them it is still ok
                await asyncio.wait({node.facts_task}, timeout=max(0.0, started + timeout - time.monotonic()))
                result["facts"] = dict(node.facts)
            return result

    results: Dict[str, Dict[str, Any]] = {}
    waiting = _Pending([n.name for n in orch.nodes], enabled=not args.json)
    try:
        for fut in asyncio.as_completed([one(n) for n in orch.nodes]):
            r = await fut
            results[r["name"]] = r
            waiting.done(r["name"])
            if not args.json:
                waiting.live.clear()
                _print(_format_check(r, width))
                waiting.show()
    finally:
        waiting.close()
    ordered = [results[n.name] for n in orch.nodes]
    if args.json:
        _print(json.dumps(ordered, indent=2))
    else:
        bad = [r["name"] for r in ordered if not r["ok"]]
        _print(f"{len(ordered) - len(bad)} of {len(ordered)} nodes healthy"
               + (f"; failing: {', '.join(bad)}" if bad else ""), file=sys.stderr)
    return 0 if all(r["ok"] for r in ordered) else 1


def _read_prompt(arg: Optional[str]) -> str:
    if arg is None or arg == "-":
        if sys.stdin is None or (arg is None and sys.stdin.isatty()):
            raise UsageError("no prompt: give PROMPT, or pipe it on stdin")
        prompt = sys.stdin.buffer.read().decode("utf-8", "surrogateescape")
    else:
        prompt = arg
    if not prompt.strip():
        raise UsageError("empty prompt")
    return prompt


async def cmd_generate(orch: MeshOrchestrator, args: Any) -> int:
    prompt = args.prompt_text  # read in main(), before the event loop: no blocking read in async code
    extra: Dict[str, Any] = {}
    if args.format:
        extra["format"] = args.format
    if args.keep_alive is not None:
        extra["keep_alive"] = args.keep_alive
    options = _parse_options(args.option)
    if args.json or args.no_stream:
        result = await orch.generate(prompt, model=args.model, node=args.node, system=args.system,
                                     stream=False, options=options, **extra)
        if args.verbose:
            _print(f"mesh: served by {result.get('node')}", file=sys.stderr)
        if args.json:
            _print(json.dumps(result, ensure_ascii=False))
        else:
            text = result.get("response", "")
            _print(text, end="" if text.endswith("\n") else "\n")
        return 0
    # as `ollama run` does: a spinner until the first token, on a terminal only
    spinner = _Spinner(sys.stdout) if sys.stdout is not None and sys.stdout.isatty() else None
    stream = None
    last = ""
    try:
        stream = await orch.generate(prompt, model=args.model, node=args.node, system=args.system,
                                     stream=True, options=options, **extra)
        first = True
        async for chunk in stream:
            piece = chunk.get("response") or ""
            if spinner and (piece or chunk.get("done") or (first and args.verbose)):
                spinner.stop()
            if first and args.verbose:
                _print(f"mesh: served by {chunk.get('node')}", file=sys.stderr)
            first = False
            if piece:
                _print(piece, end="")
                last = piece
    finally:
        if spinner:
            spinner.stop()
        if stream is not None:
            await stream.aclose()
    if not last.endswith("\n"):
        _print()
    return 0


# The types of Ollama's options (api.Options and its Runner, older names included):
# `/set parameter` converts to them as Ollama's api.FormatParams does, because the
# server rejects a value of the wrong JSON type on every later request.
_OPTION_TYPES: Dict[str, type] = dict(
    {n: int for n in ("num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch",
                      "num_gpu", "main_gpu", "num_thread", "mirostat", "num_gqa")},
    **{n: float for n in ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                          "frequency_penalty", "tfs_z", "mirostat_tau", "mirostat_eta")},
    **{n: bool for n in ("penalize_newline", "use_mmap", "use_mlock", "low_vram", "f16_kv", "numa",
                         "vocab_only")},
    stop=list)


def _chat_parameter(name: str, words: Sequence[str]) -> Any:
    """The value of `/set parameter NAME WORDS...` as Ollama's api.FormatParams gives it:
    int, float or bool by the option's type (the first word), `stop` a list of the words
    (one stop sequence each).  An option mesh does not know keeps the JSON value of the
    words, else the text (a newer Ollama may know it).  Raises ValueError with Ollama's
    message ("invalid float value [abc]")."""
    kind = _OPTION_TYPES.get(name)
    text = " ".join(words)
    if kind is list:
        return list(words)
    if kind is None:
        try:
            return json.loads(text)
        except ValueError:
            return text
    try:
        if kind is bool:
            # strconv.ParseBool's spellings
            return {"1": True, "t": True, "true": True, "0": False, "f": False, "false": False}[words[0].lower()]
        return kind(words[0])
    except (KeyError, ValueError):
        raise ValueError(f"invalid {kind.__name__} value [{text}]") from None


def _parse_options(items: Optional[List[str]]) -> Optional[Dict[str, Any]]:
    if not items:
        return None
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"bad --option {item!r} (expected KEY=VALUE, e.g. temperature=0.2)")
        try:
            parsed = _chat_parameter(key, [value])
        except ValueError as exc:
            raise UsageError(f"bad --option {item!r}: {exc}") from None
        # stop is a list: --option stop=A --option stop=B gives both
        out[key] = out.get(key, []) + parsed if isinstance(parsed, list) and key == "stop" else parsed
    return out


def _stdin_lines() -> "asyncio.Queue[Optional[str]]":
    """Lines of stdin as they are typed, read on a daemon thread: a thread of the
    default executor would keep Ctrl-C from ending the program until Enter."""
    import threading
    loop = asyncio.get_running_loop()
    queue: "asyncio.Queue[Optional[str]]" = asyncio.Queue()

    def pump() -> None:
        while True:
            line = sys.stdin.readline() if sys.stdin is not None else ""
            loop.call_soon_threadsafe(queue.put_nowait, line or None)
            if not line:
                return

    threading.Thread(target=pump, name="mesh-stdin", daemon=True).start()
    return queue


async def cmd_chat(orch: MeshOrchestrator, args: Any) -> int:
    """A chat with the pool (ChatSession); `run MODEL` without a prompt comes here too."""
    session = ChatSession(orch, model=args.model or orch.default_model, node=args.node,
                          system=args.system, options=_parse_options(getattr(args, "option", None)),
                          verbose=bool(args.verbose), format=getattr(args, "format", None),
                          keep_alive=getattr(args, "keep_alive", None))
    return await session.run()


async def cmd_run(orch: MeshOrchestrator, args: Any) -> int:
    """`ollama run MODEL [PROMPT]`: one answer when there is a prompt (or piped stdin),
    else a chat."""
    args.model = args.model_name
    if args.prompt_text is None:
        return await cmd_chat(orch, args)
    return await cmd_generate(orch, args)


_CHAT_HELP = """Available Commands:
  /set            Set session variables
  /show           Show model information
  /load <model>   Load a session or model
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command
  /? shortcuts    Help for keyboard shortcuts

Use \"\"\" to begin a multi-line message."""

_CHAT_SET_HELP = """Available Commands:
  /set parameter ...     Set a parameter
  /set system <string>   Set system message
  /set history           Enable history
  /set nohistory         Disable history
  /set format json       Enable JSON mode
  /set noformat          Disable formatting
  /set verbose           Show node, time to first token and tokens/s after each answer
  /set quiet             Disable verbose"""

_CHAT_SHOW_HELP = """Available Commands:
  /show info         Show details for this model (and the node asked)
  /show license      Show model license
  /show modelfile    Show Modelfile for this model
  /show parameters   Show parameters for this model
  /show system       Show system message
  /show template     Show prompt template"""

_CHAT_SHORTCUTS = """Available keyboard shortcuts:
  Ctrl + a            Move to the beginning of the line (Home)
  Ctrl + e            Move to the end of the line (End)
  Alt + b / Alt + f   Move back / forward one word
  Ctrl + k            Delete the sentence after the cursor
  Ctrl + u            Delete the sentence before the cursor
  Ctrl + w            Delete the word before the cursor
  Up / Down           Previous / next line of history
  Ctrl + l            Clear the screen
  Ctrl + c            Stop the answer; at an empty prompt, leave
  Ctrl + d            Leave (at an empty prompt)"""


class ChatSession:
    """The interactive chat of `run MODEL` and `chat`, as `ollama run` behaves.

    On a terminal: GNU readline line editing and history (file: $MESH_HISTORY, else
    ~/.mesh_history; empty disables it), bracketed paste and `\"\"\"...\"\"\"` make one turn,
    /? /help /set /show /clear /load /bye are handled here and never sent to the model.
    Ctrl-C during an answer stops it (the node's request is cancelled) and keeps the
    session; Ctrl-C at an empty prompt or Ctrl-D leaves.  A spinner turns while the
    first token is awaited (terminal only).  A node failing before the answer is failed
    over by the orchestrator; after the answer has started the session says what
    happened, drops that turn from the history and carries on.

    Not on a terminal (piped): each line is one turn, nothing is drawn.
    """

    def __init__(self, orch: MeshOrchestrator, *, model: str, node: Optional[str] = None,
                 system: Optional[str] = None, options: Optional[Dict[str, Any]] = None,
                 verbose: bool = False, format: Optional[str] = None, keep_alive: Optional[str] = None,
                 stdin: Any = None, stdout: Any = None, stderr: Any = None) -> None:
        self.orch = orch
        self.model = model
        self.node = node
        self.system = system
        self.options: Dict[str, Any] = dict(options or {})
        self.verbose = verbose
        self.format = format
        self.keep_alive = keep_alive
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.messages: List[Dict[str, Any]] = []
        self.info: Dict[str, Any] = {}
        self.interactive = bool(self.stdin is not None and self.stdin.isatty() and self.stdout.isatty())
        self.readline: Any = None
        self.history_file: Optional[str] = None
        self._line_at_interrupt = ""
        self._lines: Optional["asyncio.Queue[Optional[str]]"] = None

    # -- the loop --------------------------------------------------------------
    async def run(self) -> int:
        """Check the model, then read and answer turns until /bye, Ctrl-D or EOF.
        Returns the exit status: 0, or 130 when left with Ctrl-C."""
        try:   # a typo fails here, before any prompt
            self.info = await self.orch.show(self.model, node=self.node)
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(f"{exc}; to get it: mesh.py pull {self.model}") from None
        if not self.interactive:
            self._lines = _stdin_lines()
            while True:
                line = await self._lines.get()
                if line is None:
                    return 0
                text = await self._gather_piped(line.rstrip("\n"))
                if text is None:
                    return 0
                if await self._turn(text) is False:
                    return 0
        import signal
        self._setup_readline()
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            while True:
                try:
                    text = self._read_turn()
                except KeyboardInterrupt:
                    if self._line_at_interrupt:
                        self._write("\n")
                        continue    # Ctrl-C on a half-typed line clears it
                    self._write("\n")
                    return 130
                except EOFError:
                    self._write("\n")
                    return 0
                if text is None:
                    continue
                if await self._turn(text) is False:
                    return 0
        finally:
            signal.signal(signal.SIGINT, previous)
            self._save_history()

    async def _turn(self, text: str) -> Optional[bool]:
        """One input: a command, or a message to answer.  False means leave."""
        if not text.strip():
            return None
        if text.lstrip().startswith("/"):
            return await self.command(text.strip())
        await self.answer(text)
        return None

    # -- input -----------------------------------------------------------------
    def _setup_readline(self) -> None:
        try:
            import readline
        except ImportError:     # no GNU readline (some builds): plain input() still works
            return
        self.readline = readline
        readline.parse_and_bind("set enable-bracketed-paste on")   # a pasted block is one turn
        path = os.environ.get("MESH_HISTORY", os.path.join(_home_dir(), ".mesh_history"))
        self.history_file = path or None
        if self.history_file:
            try:
                readline.read_history_file(self.history_file)
            except OSError:
                pass
        readline.set_history_length(1000)

    def _save_history(self) -> None:
        if self.readline is not None and self.history_file:
            try:
                self.readline.write_history_file(self.history_file)
            except OSError as exc:
                logger.info("could not save the chat history to %s: %s", self.history_file, exc)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        # Runs inside input() before readline discards the line: was anything typed?
        self._line_at_interrupt = self.readline.get_line_buffer() if self.readline is not None else ""
        raise KeyboardInterrupt

    def _read_turn(self) -> Optional[str]:
        """One turn from the terminal: a line, a pasted block, or a \"\"\" block."""
        self._line_at_interrupt = ""
        block = _Multiline()
        text = block.feed(input(">>> "))
        while text is None:
            try:
                text = block.feed(input("... "))
            except KeyboardInterrupt:
                self._write("\n")
                return None     # Ctrl-C inside a triple-quote block drops the block, not the session
        return text

    async def _gather_piped(self, line: str) -> Optional[str]:
        assert self._lines is not None
        block = _Multiline()
        text = block.feed(line)
        while text is None:
            more = await self._lines.get()
            if more is None:
                return block.end()
            text = block.feed(more.rstrip("\n"))
        return text

    def _write(self, text: str, *, err: bool = False) -> None:
        stream = self.stderr if err else self.stdout
        _write_out(stream, _for_stream(stream, text))

    def _say(self, text: str) -> None:
        self._write(text + "\n")

    # -- commands --------------------------------------------------------------
    async def command(self, text: str) -> Optional[bool]:
        """A slash command (never sent to the model).  False means leave."""
        words = text.split()
        cmd, rest = words[0], words[1:]
        if cmd in ("/bye", "/exit", "/quit"):
            return False
        if cmd in ("/?", "/help"):
            topic = rest[0] if rest else ""
            self._say({"shortcuts": _CHAT_SHORTCUTS, "shortcut": _CHAT_SHORTCUTS, "/set": _CHAT_SET_HELP,
                       "set": _CHAT_SET_HELP, "/show": _CHAT_SHOW_HELP, "show": _CHAT_SHOW_HELP
                       }.get(topic, _CHAT_HELP))
        elif cmd == "/set":
            self._set(rest, text)
        elif cmd == "/show":
            await self._show(rest)
        elif cmd == "/clear":
            self.messages = []
            self._say("Cleared session context")
        elif cmd == "/load":
            if len(rest) != 1:
                self._say("Usage:\n  /load <modelname>")
                return None
            try:
                info = await self.orch.show(rest[0], node=self.node)
            except MeshError as exc:
                self._say(f"error: {exc}")
                return None
            self.model, self.info, self.messages = rest[0], info, []
            self._say(f"Loading model '{self.model}'")
        else:
            self._say(f"Unknown command '{cmd}'. Type /? for help")
        return None

    def _set(self, rest: List[str], text: str) -> None:
        if not rest:
            self._say(_CHAT_SET_HELP)
            return
        what = rest[0]
        if what == "parameter":
            if len(rest) < 3:
                self._say("Usage: /set parameter <name> <value>   (e.g. /set parameter temperature 0.2)")
                return
            name, value = rest[1], " ".join(rest[2:])
            try:
                self.options[name] = _chat_parameter(name, rest[2:])
            except ValueError as exc:
                self._say(f"Couldn't set parameter: {json.dumps(str(exc))}")
                return
            self._say(f"Set parameter '{name}' to '{value}'")
        elif what == "system":
            system = text.split(None, 2)[2] if len(rest) > 1 else ""
            if system.startswith('"') and system.endswith('"') and len(system) > 1:
                system = system[1:-1]
            self.system = system or None
            self._say("Set system message.")
        elif what in ("verbose", "quiet"):
            self.verbose = what == "verbose"
            self._say(f"Set '{what}' mode.")
        elif what in ("history", "nohistory"):
            if self.readline is not None:
                self.readline.set_auto_history(what == "history")
            self._say(f"Set '{what}' mode.")
        elif what == "format" and rest[1:] == ["json"]:
            self.format = "json"
            self._say("Set format to 'json' mode.")
        elif what == "noformat":
            self.format = None
            self._say("Disabled format.")
        else:
            self._say(f"Unknown command '/set {what}'. Type /? for help")

    async def _show(self, rest: List[str]) -> None:
        if not rest:
            self._say(_CHAT_SHOW_HELP)
            return
        what = rest[0]
        if what == "info":
            self._say(_format_show(self.info))
        elif what == "parameters":
            params = (self.info.get("parameters") or "").strip()
            lines = ["Model defined parameters:", params or "No parameters were specified for this model."]
            if self.options:
                lines += ["", "User defined parameters:"] + [f"{k:<30} {json.dumps(v)}" for k, v in self.options.items()]
            self._say("\n".join(lines))
        elif what == "system":
            self._say(self.system or self.info.get("system") or "No system message was specified for this model.")
        elif what in ("modelfile", "template", "license"):
            self._say(str(self.info.get(what) or f"No {what} was specified for this model.").rstrip("\n"))
        else:
            self._say(f"Unknown command '/show {what}'. Type /? for help")

    # -- answering -------------------------------------------------------------
    async def answer(self, text: str) -> None:
        """Send the conversation plus `text`; stream the reply.  Ctrl-C (on a terminal)
        stops it: the partial answer is kept as the assistant's turn, as it was seen."""
        self.messages.append({"role": "user", "content": text})
        task = asyncio.ensure_future(self._stream())
        loop = asyncio.get_running_loop()
        import signal
        watching = False
        if self.interactive:
            try:
                loop.add_signal_handler(signal.SIGINT, task.cancel)
                watching = True
            except (NotImplementedError, RuntimeError):
                pass
        try:
            await asyncio.wait({task})
        finally:
            if watching:
                loop.remove_signal_handler(signal.SIGINT)
                signal.signal(signal.SIGINT, self._on_sigint)
        if task.cancelled():
            self._write("\n")
            return
        exc = task.exception()
        if exc is None:
            return
        if not isinstance(exc, MeshError):
            raise exc
        self.messages.pop()   # the turn failed: it is not part of the conversation
        if isinstance(exc, StreamInterruptedError):
            self._write(f"\nmesh: the answer broke off: {exc.node} failed mid-answer ({exc.reason})\n"
                        "mesh: that turn is not kept; send it again to ask another node\n", err=True)
        else:
            _end_open_line(self.stdout)
            self._write(f"mesh: error: {terminal_text(str(exc), one_line=True)}\n", err=True)

    async def _stream(self) -> None:
        messages = list(self.messages)
        if self.system:
            messages.insert(0, {"role": "system", "content": self.system})
        extra: Dict[str, Any] = {}
        if self.format:
            extra["format"] = self.format
        if self.keep_alive is not None:
            extra["keep_alive"] = self.keep_alive
        spinner = _Spinner(self.stdout) if self.interactive else None
        started = time.monotonic()
        first: Optional[float] = None
        parts: List[str] = []
        final: Dict[str, Any] = {}
        stream = None
        try:
            # the loop stood still at the prompt: a node that went down is asked again now
            await self.orch.recheck(self.model, self.node)
            stream = await self.orch.chat(messages, model=self.model, node=self.node, stream=True,
                                          options=self.options or None, **extra)
            async for chunk in stream:
                piece = (chunk.get("message") or {}).get("content") or ""
                if piece and first is None:
                    first = time.monotonic() - started
                    if spinner:
                        spinner.stop()
                if piece:
                    parts.append(piece)
                    self._write(piece)
                final = chunk
        except asyncio.CancelledError:
            if parts:
                self.messages.append({"role": "assistant", "content": "".join(parts)})
            else:
                self.messages.pop()
            raise
        finally:
            if spinner:
                spinner.stop()
            if stream is not None:
                await stream.aclose()
        text = "".join(parts)
        self._write("\n" if not text.endswith("\n") else "")
        if self.interactive:
            self._write("\n")
        self.messages.append({"role": "assistant", "content": text})
        if self.verbose:
            self._write(_answer_stats(final, first, time.monotonic() - started), err=True)


class _Multiline:
    """Ollama's triple-quote blocks: a line starting with three double quotes opens one,
    a line ending with them closes it; the lines between are one message.  feed()
    returns the message once it is complete (a plain line is complete at once), else None."""

    def __init__(self) -> None:
        self.parts: Optional[List[str]] = None

    def feed(self, line: str) -> Optional[str]:
        if self.parts is None:
            if not line.lstrip().startswith('"""'):
                return line
            self.parts = []
            line = line.lstrip()[3:]
            if line.rstrip().endswith('"""') and line.strip() != "":
                return line.rstrip()[:-3]
        if line.rstrip().endswith('"""'):
            line = line.rstrip()[:-3]
            if line:
                self.parts.append(line)
            return self.end()
        if line or self.parts:
            self.parts.append(line)
        return None

    def end(self) -> str:
        return "\n".join(self.parts or [])


def _answer_stats(final: Dict[str, Any], ttft: Optional[float], elapsed: float) -> str:
    """What `ollama run --verbose` prints after an answer, plus the node and time to first token."""
    def dur(ns: Any) -> str:
        return f"{ns / 1e6:.2f}ms" if isinstance(ns, (int, float)) and ns < 1e9 else \
            f"{ns / 1e9:.2f}s" if isinstance(ns, (int, float)) else "-"
    rows = [("node", final.get("node") or "-"),
            ("time to first token", "-" if ttft is None else f"{ttft * 1000:.0f}ms"),
            ("total duration", dur(final.get("total_duration")) if final.get("total_duration") else f"{elapsed:.2f}s"),
            ("load duration", dur(final.get("load_duration")) if final.get("load_duration") is not None else None),
            ("prompt eval count", f"{final['prompt_eval_count']} token(s)" if "prompt_eval_count" in final else None)]

    def timing(prefix: str) -> None:
        # `<prefix>eval duration` and `<prefix>eval rate`, in ollama run --verbose's order
        field = prefix.replace(" ", "_")
        count, ns = final.get(field + "eval_count"), final.get(field + "eval_duration")
        if isinstance(ns, (int, float)) and ns:
            rows.append((prefix + "eval duration", dur(ns)))
            if count:
                rows.append((prefix + "eval rate", f"{count / (ns / 1e9):.2f} tokens/s"))
    timing("prompt ")
    rows.append(("eval count", f"{final['eval_count']} token(s)" if "eval_count" in final else None))
    timing("")
    return "".join(f"{k + ':':<22}{v}\n" for k, v in rows if v is not None)


# What is drawn in place on the terminal right now (the chat's spinner, live lines):
# each has wipe().  A log line written over one would be mangled (a spinner frame before
# it, or a live line's redraw moving up over it), so the CLI's log handler wipes them first.
_DRAWN: List[Any] = []


class _TerminalLogHandler(logging.StreamHandler):
    """The CLI's log handler: wipes what is drawn in place before each line, so the log
    line stands alone and the drawing comes back below it at its next update."""

    def emit(self, record: logging.LogRecord) -> None:
        for drawing in list(_DRAWN):
            drawing.wipe()
        super().emit(record)


class _Spinner:
    """A turning mark while the first token is awaited; only ever made for a terminal."""

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.drawn = False
        self._task = asyncio.ensure_future(self._spin())
        _DRAWN.append(self)

    async def _spin(self) -> None:
        i = 0
        while True:
            self.stream.write("\r" + self.FRAMES[i % len(self.FRAMES)] + " ")
            self.stream.flush()
            self.drawn = True
            i += 1
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        """Stop and wipe the mark at once, before the first token is written."""
        if not self._task.done():
            self._task.cancel()
        if self in _DRAWN:
            _DRAWN.remove(self)
        self.wipe()

    def wipe(self) -> None:
        """Take the mark off the line (it comes back at the next turn while spinning)."""
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False


# -- what people wait for: live lines on a terminal, nothing drawn otherwise -------

class _LiveLines:
    """A few status lines redrawn in place on a terminal (pull bars, `test`'s pending
    nodes).  When the stream is not a terminal nothing is drawn at all."""

    def __init__(self, stream: Any = None, *, interval: float = 0.1) -> None:
        self.stream = stream or sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self.lines: Dict[str, str] = {}
        self._drawn = 0
        self._last = 0.0

    def set(self, key: str, text: str, *, force: bool = False) -> None:
        self.lines[key] = text
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self.draw()

    def draw(self) -> None:
        if not self.enabled:
            return
        self._last = time.monotonic()
        width = max(20, _terminal_width(self.stream) - 1)
        out = ["\x1b[%dF" % self._drawn] if self._drawn else []
        for text in self.lines.values():
            out.append("\x1b[2K" + terminal_text(text, one_line=True)[:width] + "\n")
        self.stream.write("".join(out))
        self.stream.flush()
        self._drawn = len(self.lines)
        if self not in _DRAWN:
            _DRAWN.append(self)

    def clear(self) -> None:
        """Take the lines off the screen (what is printed next takes their place)."""
        if self.enabled and self._drawn:
            self.stream.write("\x1b[%dF\x1b[J" % self._drawn)
            self.stream.flush()
        self._drawn = 0
        if self in _DRAWN:
            _DRAWN.remove(self)

    wipe = clear   # before a log line; the next draw puts the lines back below it


async def _showing_pending(orch: MeshOrchestrator, work: Any, *, enabled: bool = True) -> Any:
    """Await `work` (a coroutine that asks every node what it has: list, ps) and, on a
    terminal, show which nodes it still waits for - a frozen node can take the whole
    connect timeout.  A node is done once it answered since we began, or is down."""
    since = time.monotonic()
    pending = _Pending([n.name for n in orch.nodes], enabled=enabled)

    async def watch() -> None:
        while True:
            for node in orch.nodes:
                if not node.healthy or node.inventory_at >= since:
                    pending.done(node.name)
            await asyncio.sleep(0.1)
    watcher = asyncio.ensure_future(watch()) if pending.live.enabled else None
    try:
        return await work
    finally:
        if watcher is not None:
            watcher.cancel()
        pending.close()


class _Pending:
    """`test`'s live line on a terminal: which nodes are still being waited for, and how long."""

    def __init__(self, names: Sequence[str], *, enabled: bool = True) -> None:
        self.pending = list(names)
        self.live = _LiveLines(sys.stderr)
        self.live.enabled = self.live.enabled and enabled
        self.started = time.monotonic()
        self._ticker = asyncio.ensure_future(self._tick()) if self.live.enabled else None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.5)   # the first results usually come sooner: no flash of the line
            self.show()

    def show(self) -> None:
        if not self.pending or time.monotonic() - self.started < 0.5:
            return
        names = ", ".join(self.pending[:6]) + (f" and {len(self.pending) - 6} more" if len(self.pending) > 6 else "")
        self.live.set("pending", f"waiting for {names} ({time.monotonic() - self.started:.0f} s)", force=True)

    def done(self, name: str) -> None:
        if name in self.pending:
            self.pending.remove(name)

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        self.live.clear()


def _terminal_width(stream: Any) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80   # 0: a pty nobody sized
    except (OSError, ValueError, AttributeError):
        return 80


def _human_size(size: Optional[float]) -> str:
    """Bytes as Ollama's CLI shows them (decimal units: 4.7 GB)."""
    if size is None:
        return "-"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            value = size / scale
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{int(size)} B"


def _parse_time(text: Any) -> Optional[float]:
    """Ollama's RFC 3339 times (nanosecond fractions, 'Z' or an offset) -> epoch seconds."""
    import datetime
    if not isinstance(text, str) or not text:
        return None
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?", text.strip())
    if not m:
        return None
    frac = (m.group(2) or ".0")[:7]
    zone = m.group(3) or "Z"
    zone = "+00:00" if zone == "Z" else zone
    try:
        return datetime.datetime.fromisoformat(m.group(1) + frac + zone).timestamp()
    except ValueError:
        return None


def _relative(when: Optional[float], now: Optional[float] = None) -> str:
    """'4 minutes from now', '2 days ago', 'Forever' - as `ollama ps` and `ollama list` say it."""
    if when is None:
        return "-"
    delta = when - (time.time() if now is None else now)
    if delta > 10 * 365 * 86400:
        return "Forever"
    ahead, secs = delta >= 0, abs(delta)
    for unit, size in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400), ("day", 86400),
                       ("hour", 3600), ("minute", 60)):
        if secs >= size:
            n = int(secs // size)
            text = f"{n} {unit}{'s' if n != 1 else ''}"
            break
    else:
        if secs < 1:
            return "now" if ahead else "just now"
        text = "less than a minute"
    return f"{text} from now" if ahead else f"{text} ago"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    lines = ["    ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines)


def _processor(entry: Dict[str, Any]) -> str:
    """Where a loaded model sits, as `ollama ps` says: 100% GPU, 100% CPU, 48%/52% CPU/GPU."""
    size, vram = entry.get("size") or 0, entry.get("size_vram")
    if not size or vram is None:
        return "-"
    gpu = round(100 * vram / size)
    if gpu >= 100:
        return "100% GPU"
    if gpu <= 0:
        return "100% CPU"
    return f"{100 - gpu}%/{gpu}% CPU/GPU"


def _require_a_node(orch: MeshOrchestrator, down: Dict[str, Optional[str]]) -> None:
    """Every node is down: one error that says so (with no node configured, how to add
    one), instead of an empty table and a line per node."""
    if len(down) == len(orch.nodes):
        raise orch._no_nodes("no node answered: " + "; ".join(f"{n}: {r}" for n, r in down.items()))


def _warn_down(down: Dict[str, Optional[str]]) -> None:
    for name, reason in down.items():
        _print(f"mesh: {name} is down ({reason}); its models are not listed", file=sys.stderr)


def _results_out(args: Any, results: Dict[str, Optional[str]], done: str) -> int:
    """The per-node outcome of pull/rm/stop: JSON rows or one line per node; exit 1 if any failed."""
    if args.json:
        _print(json.dumps([{"node": n, "ok": r is None, "error": r} for n, r in results.items()], indent=2))
    else:
        width = max(len(n) for n in results)
        for name, reason in results.items():
            _print(f"{name:<{width}}  {done if reason is None else 'error: ' + reason}")
    return 0 if all(r is None for r in results.values()) else 1


async def cmd_connections(orch: MeshOrchestrator, args: Any) -> int:
    """mesh's own ssh masters: list them, or end them (--stop [NODE])."""
    if args.stop is not None:
        node = args.stop or None
        stopped = await orch.stop_connections(node)
        if args.json:
            _print(json.dumps(stopped, indent=2))
        elif not stopped:
            _print("mesh: no ssh master " + (f"for {node}" if node else "to stop"), file=sys.stderr)
        for m in stopped if not args.json else ():
            _print(f"stopped {m['node']} ({m['socket']})")
        return 0 if stopped or node is None else 1
    masters = orch.connections()
    if args.json:
        _print(json.dumps(masters, indent=2))
        return 0
    if not masters:
        _print("mesh: no ssh masters (they start with the first command that reaches a node)", file=sys.stderr)
        return 0
    _print(_table(("NODE", "SINCE", "TRANSPORT", "STATE", "SOCKET"), [
        (m["node"], _relative(m["since"]), m["transport"], "up" if m["alive"] else "stale", m["socket"])
        for m in masters]))
    return 0


async def cmd_list(orch: MeshOrchestrator, args: Any) -> int:
    """`ollama list` over the pool: each model once, with the nodes that have it."""
    inventory = await _showing_pending(orch, orch.models(), enabled=not args.json)
    _require_a_node(orch, inventory["down"])
    if not args.json:
        _warn_down(inventory["down"])
    if args.json:
        _print(json.dumps(inventory, indent=2))
        return 0
    rows = [(m.get("name", ""), (m.get("digest") or "").replace("sha256:", "")[:12], _human_size(m.get("size")),
             _relative(_parse_time(m.get("modified_at"))), ", ".join(m["nodes"])) for m in inventory["models"]]
    _print(_table(("NAME", "ID", "SIZE", "MODIFIED", "NODES"), rows))
    return 0


async def cmd_ps(orch: MeshOrchestrator, args: Any) -> int:
    """`ollama ps` over the pool: what is loaded where, how much of it in VRAM, until when."""
    loaded = await _showing_pending(orch, orch.ps(), enabled=not args.json)
    down = {n.name: n.reason for n in orch.nodes if not n.healthy}
    _require_a_node(orch, down)
    facts = await orch.node_facts()
    if args.json:
        _print(json.dumps({"models": loaded, "nodes": [n.status() for n in orch.nodes]}, indent=2))
        return 0
    rows = [(m.get("name", ""), m["node"], _human_size(m.get("size")), _processor(m),
             _relative(_parse_time(m.get("expires_at")))) for m in loaded]
    _print(_table(("NAME", "NODE", "SIZE", "PROCESSOR", "UNTIL"), rows))
    told = {n: f for n, f in facts.items() if f}
    if told:
        _print()
        _print(_table(("NODE", "GPU", "VRAM USED", "RAM FREE", "LOAD"), [
            (n, f.get("gpu") or "-",
             f"{_gb(f.get('vram_used'))}/{_gb(f.get('vram_total'))} GB" if f.get("gpu") else "-",
             f"{_gb(f.get('ram_available'))}/{_gb(f.get('ram_total'))} GB" if f.get("ram_total") else "-",
             f"{f['load_1m']:.2f}" if "load_1m" in f else "-") for n, f in told.items()]))
    for name, reason in down.items():
        _print(f"mesh: {name} is down ({reason})", file=sys.stderr)
    return 0


_SHOW_SECTIONS = ("modelfile", "parameters", "template", "system", "license")


async def cmd_show(orch: MeshOrchestrator, args: Any) -> int:
    """`ollama show MODEL` from a node that has it."""
    info = await orch.show(args.model, node=args.node)
    if args.json:
        _print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    for section in _SHOW_SECTIONS:
        if getattr(args, section, False):
            _print(str(info.get(section) or "").rstrip("\n"))
            return 0
    _print(_format_show(info))
    return 0


def _format_show(info: Dict[str, Any]) -> str:
    details = info.get("details") or {}
    model_info = info.get("model_info") or {}
    arch = model_info.get("general.architecture") or details.get("family")
    facts = [("architecture", arch), ("parameters", details.get("parameter_size")),
             ("context length", model_info.get(f"{arch}.context_length")),
             ("embedding length", model_info.get(f"{arch}.embedding_length")),
             ("quantization", details.get("quantization_level")), ("format", details.get("format")),
             ("node", info.get("node"))]
    out = ["  Model"] + [f"    {k:<20}{v}" for k, v in facts if v not in (None, "")]
    if info.get("capabilities"):
        out += ["", "  Capabilities"] + [f"    {c}" for c in info["capabilities"]]
    params = (info.get("parameters") or "").strip()
    if params:
        out += ["", "  Parameters"] + ["    " + " ".join(line.split()) for line in params.splitlines()]
    if info.get("system"):
        out += ["", "  System", "    " + str(info["system"]).strip().replace("\n", "\n    ")]
    lic = (info.get("license") or "").strip()
    if lic:
        out += ["", "  License"] + ["    " + line for line in lic.splitlines()[:2]]
    return "\n".join(out)


def _pull_line(node: str, width: int, obj: Dict[str, Any]) -> str:
    if "error" in obj:
        return f"{node:<{width}}  error: {obj['error']}"
    status = str(obj.get("status") or "")
    total, done = obj.get("total"), obj.get("completed") or 0
    if isinstance(total, (int, float)) and total > 0:
        frac = min(1.0, done / total)
        bar = "█" * int(frac * 25) + "▏" * (frac < 1) + " " * (25 - int(frac * 25) - (frac < 1))
        return f"{node:<{width}}  {status[:28]:<28} {frac:4.0%} ▕{bar}▏ {_human_size(done)}/{_human_size(total)}"
    return f"{node:<{width}}  {status}"


async def cmd_pull(orch: MeshOrchestrator, args: Any) -> int:
    """Pull onto the named nodes (or all) at once, one live progress bar per node."""
    targets = args.targets or [n.name for n in orch.nodes]
    for name in targets:
        orch.node(name)   # an unknown name is a usage error before anything starts
    width = max(len(n) for n in targets)
    live = _LiveLines(sys.stderr)
    if args.json:
        live.enabled = False
    for name in targets:
        live.lines[name] = f"{name:<{width}}  waiting"

    def progress(node: str, obj: Dict[str, Any]) -> None:
        live.set(node, _pull_line(node, width, obj))

    live.draw()
    results = await orch.pull(args.model, nodes=targets, progress=progress)
    live.clear()
    return _results_out(args, results, "success")


def _ask(prompt: str) -> str:
    """A line typed at the terminal, read where Ctrl-C still interrupts: asyncio's own
    SIGINT handler (3.11+) would only cancel the task while input() went on waiting."""
    import signal
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return input(prompt)
    except EOFError:
        return ""
    finally:
        signal.signal(signal.SIGINT, previous)


async def cmd_rm(orch: MeshOrchestrator, args: Any) -> int:
    """Delete a model from the named nodes, or from every node that has it, after a yes."""
    key = model_key(args.model)
    if args.targets:
        for name in args.targets:
            orch.node(name)
        targets = list(args.targets)
    else:
        await orch.refresh(force=True)
        targets = [n.name for n in orch.nodes if n.healthy and key in n.models]
        if not targets:
            raise orch.model_not_found(args.model)
        for node in orch.nodes:
            if not node.healthy:
                _print(f"mesh: {node.name} is down ({node.reason}); {args.model} can't be deleted there now",
                       file=sys.stderr)
    if not args.yes:
        if sys.stdin is None or not sys.stdin.isatty():
            raise UsageError(f"rm: add --yes to delete {args.model} from {', '.join(targets)} "
                             "(stdin is not a terminal to ask)")
        answer = _ask(f"delete {args.model} from {', '.join(targets)}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            _print("mesh: nothing deleted", file=sys.stderr)
            return 1
    results = await orch.delete(args.model, nodes=targets)
    return _results_out(args, _with_down(orch, results, args.targets), f"deleted '{args.model}'")


def _with_down(orch: MeshOrchestrator, results: Dict[str, Optional[str]],
               named: Optional[Sequence[str]]) -> Dict[str, Optional[str]]:
    """rm/stop over every node: one that is down may still hold the model, so it gets a
    result line of its own (and the exit status 1), as pull's down nodes do."""
    if not named:
        for node in orch.nodes:
            if not node.healthy and node.name not in results:
                results[node.name] = f"down: {node.reason}"
    return results


async def cmd_stop(orch: MeshOrchestrator, args: Any) -> int:
    """Unload a model everywhere it is loaded (or on the named nodes), like `ollama stop`."""
    for name in args.targets or ():
        orch.node(name)
    results = await orch.unload(args.model, nodes=args.targets or None)
    return _results_out(args, _with_down(orch, results, args.targets), f"stopped '{args.model}'")


def _build_parser() -> Any:
    import argparse

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError("must be > 0")
        return value

    def count(text: str) -> int:
        if not re.fullmatch(r"\d+", text.strip()):
            raise argparse.ArgumentTypeError(f"not a whole number >= 0: {text!r}")
        return int(text)

    def size(text: str) -> int:
        m = re.fullmatch(r"(\d+)\s*([KMG]?)(?:i?B)?", text.strip(), re.I)
        if not m:
            raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 65536, 64K, 200M, 1G)")
        value = int(m.group(1)) * 1024 ** " KMG".index((m.group(2) or " ").upper())
        if value <= 0:
            raise argparse.ArgumentTypeError("must be > 0")
        return value

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # one line, exit 2
            raise UsageError(message)

    common = Parser(add_help=False)
    g = common.add_argument_group("global options (also accepted before the command)")
    g.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                   help="SSH config to read and pass to ssh as -F (default: $MESH_SSH_CONFIG, else ~/.ssh/config)")
    g.add_argument("--nodes", metavar="A,B", default=argparse.SUPPRESS,
                   help="use only these nodes (ssh aliases, comma-separated)")
    g.add_argument("--connect-timeout", type=seconds, metavar="S", default=argparse.SUPPRESS,
                   help=f"ssh connect and master start (default {DEFAULT_CONNECT_TIMEOUT:g})")
    g.add_argument("--first-byte-timeout", type=seconds, metavar="S", default=argparse.SUPPRESS,
                   help="wait for a reply to start; past it a generation waits on only while its node "
                        f"answers liveness probes (default {DEFAULT_FIRST_BYTE_TIMEOUT:g})")
    g.add_argument("--retries", type=count, metavar="N", default=argparse.SUPPRESS,
                   help="other nodes a request may go to after its node went silent with it "
                        f"(default {DEFAULT_RETRIES})")
    g.add_argument("--idle-timeout", type=seconds, metavar="S", default=argparse.SUPPRESS,
                   help=f"silence allowed between chunks (default {DEFAULT_IDLE_TIMEOUT:g})")
    g.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                   help="say which node served; -vv logs routing and ssh events")

    parser = Parser(prog="mesh.py", parents=[common],
                    description="One pool of Ollama machines over nothing but SSH. Nodes are the Host "
                                "entries of your SSH config with a '# mesh: on' line; each node's Ollama "
                                "stays on its own localhost.",
                    epilog="Exit codes: 0 success, 1 node/model failure, 2 usage error. "
                           "Per-node settings: '# mesh: name=\"...\" weight=N max_concurrent=N "
                           "ollama_port=N' inside a Host block (any '# mesh:' line makes the host a node); "
                           "'# mesh: off' keeps a host out.")
    parser.add_argument("--version", action="version", version=f"mesh.py {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = False  # no command: main prints the short help

    p = sub.add_parser("test", parents=[common], help="check every node: ssh, Ollama, models",
                       description="Check every node at once; each line prints as soon as that node is "
                                   "known. Exit 0 only when every node is healthy.")
    p.add_argument("--json", action="store_true", help="print a JSON array, one object per node")
    p.add_argument("--timeout", type=seconds, metavar="S",
                   help="give up on a node after S seconds (default: connect timeout + 3 probes "
                        "of min(5, connect timeout) s: 25 s with the defaults)")
    p.add_argument("--parallel", type=int, default=64, metavar="N", help="nodes checked at once (default 64)")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("nodes", parents=[common], help="list the configured nodes (no network)",
                       description="The nodes the SSH config defines and their mesh settings. A Host "
                                   "block is a node when it has a '# mesh:' line ('# mesh: on').")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.add_argument("--all", action="store_true",
                   help="every Host alias of the config, with \"node\": true|false and the reason")
    p.set_defaults(func=cmd_nodes)

    def model_opts(p: Any, system: bool = True) -> None:
        p.add_argument("--model", "-m", help=f"model (default: $MESH_MODEL, else {DEFAULT_MODEL})")
        p.add_argument("--node", metavar="NAME", help="send to this node only (no failover)")
        if system:
            p.add_argument("--system", help="system prompt")

    p = sub.add_parser("run", parents=[common], help="chat with a model, or answer one prompt (as `ollama run`)",
                       description="With PROMPT (or text piped on stdin): one answer, streamed. Without: a chat "
                                   "with line editing and history; /? lists its commands.")
    p.add_argument("model_name", metavar="MODEL", help="the model, e.g. qwen2.5:7b")
    p.add_argument("prompt", nargs="*", default=[], help="the prompt (several words are joined by spaces)")
    p.add_argument("--node", metavar="NAME", help="send to this node only (no failover)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--format", help="'json' or a JSON schema, as Ollama's format")
    p.add_argument("--keep-alive", "--keepalive", help="how long the node keeps the model loaded (e.g. 5m, 0; "
                                                       "--keepalive is `ollama run`'s spelling)")
    p.add_argument("--option", "-o", action="append", metavar="KEY=VALUE",
                   help="a model option, e.g. temperature=0.2 (repeatable)")
    p.set_defaults(func=cmd_run, json=False, no_stream=False)

    p = sub.add_parser("generate", parents=[common], help="ask the pool one prompt",
                       description="Send a prompt to the best node; tokens stream to stdout as they arrive.")
    p.add_argument("prompt", nargs="*", help="the prompt; '-' or absent reads it from stdin")
    model_opts(p)
    p.add_argument("--no-stream", action="store_true", help="print the answer only when complete")
    p.add_argument("--json", action="store_true", help="print Ollama's final response object plus \"node\"")
    p.add_argument("--format", help="'json' or a JSON schema, as Ollama's format")
    p.add_argument("--keep-alive", help="how long the node keeps the model loaded (e.g. 5m, 0)")
    p.add_argument("--option", "-o", action="append", metavar="KEY=VALUE",
                   help="a model option, e.g. temperature=0.2 (repeatable)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", parents=[common], help="multi-turn chat in the terminal",
                       description="Chat with the pool, as `ollama run` does: line editing and history, "
                                   "\"\"\" for several lines, /? for commands; Ctrl-C stops an answer; "
                                   "/bye, Ctrl-D or Ctrl-C at an empty prompt ends it. Piped stdin: one turn per line.")
    model_opts(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("connections", parents=[common], help="mesh's own ssh masters: list or --stop them",
                       description="The ssh ControlMasters mesh keeps (one per node; they outlive a command "
                                   "by ControlPersist): node, since when, transport. --stop ends them all, or "
                                   "one node's.")
    p.add_argument("--stop", nargs="?", const="", default=None, metavar="NODE",
                   help="end the masters (all, or this node's)")
    p.add_argument("--json", action="store_true", help="print [{node, since, transport, socket, alive, ...}]")
    p.set_defaults(func=cmd_connections)

    p = sub.add_parser("list", aliases=["ls"], parents=[common], help="models on each node (as `ollama list`)",
                       description="Every model in the pool once, with its size and the nodes that have it.")
    p.add_argument("--json", action="store_true", help='print {"models": [... "nodes": [...]], "down": {...}}')
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("ps", parents=[common], help="what is loaded where (as `ollama ps`)",
                       description="Models loaded in memory on each node: size, share in VRAM, until when; "
                                   "and each node's GPU, VRAM, RAM and load where the node tells.")
    p.add_argument("--json", action="store_true", help='print {"models": [...], "nodes": [status...]}')
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("show", parents=[common], help="details of a model (as `ollama show`)",
                       description="Ollama's /api/show for MODEL, from a node that has it.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--node", metavar="NAME", help="ask this node")
    p.add_argument("--json", action="store_true", help="print Ollama's reply plus \"node\"")
    for section in _SHOW_SECTIONS:
        p.add_argument(f"--{section}", action="store_true", help=f"print only the {section}")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("pull", parents=[common], help="pull a model onto nodes (all by default)",
                       description="Pull MODEL onto the named nodes, or every node, all at once: one progress "
                                   "bar per node on a terminal. A node that fails does not stop the others; "
                                   "exit 1 if any failed.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("targets", nargs="*", default=[], metavar="NODE", help="nodes to pull onto (default: all)")
    p.add_argument("--json", action="store_true", help="print [{node, ok, error}]")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("rm", parents=[common], help="remove a model from nodes",
                       description="Delete MODEL from the named nodes, or from every node that has it, "
                                   "after a confirmation (--yes skips it; required when stdin is not a terminal).")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("targets", nargs="*", default=[], metavar="NODE",
                   help="nodes to delete from (default: all that have it)")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask")
    p.add_argument("--json", action="store_true", help="print [{node, ok, error}]")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("stop", parents=[common], help="unload a model everywhere (as `ollama stop`)",
                       description="Unload MODEL from memory on every node where it is loaded (or the named ones).")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("targets", nargs="*", default=[], metavar="NODE", help="only these nodes")
    p.add_argument("--json", action="store_true", help="print [{node, ok, error}]")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("serve", parents=[common], help="look like one Ollama on a local address",
                       description="An Ollama-compatible HTTP API in front of the whole mesh. Point any "
                                   "Ollama client at it (OLLAMA_HOST=http://127.0.0.1:11500).")
    p.add_argument("--listen", default=os.environ.get("MESH_LISTEN", DEFAULT_LISTEN), metavar="HOST:PORT",
                   help=f"address to bind (default {DEFAULT_LISTEN}; env MESH_LISTEN)")
    p.add_argument("--token", default=os.environ.get("MESH_TOKEN"),
                   help="require 'Authorization: Bearer TOKEN' (env MESH_TOKEN); clients send OLLAMA_API_KEY")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow binding a non-loopback address without --token")
    p.add_argument("--origins", default=os.environ.get("OLLAMA_ORIGINS"), metavar="A,B",
                   help="browser origins allowed besides Ollama's defaults (localhost, 127.0.0.1, "
                        "app://, file://, ...), comma-separated, '*' for any (env OLLAMA_ORIGINS)")
    p.add_argument("--shutdown-grace", type=seconds, default=30.0, metavar="S",
                   help="on SIGTERM/Ctrl-C, let running streams finish for up to S seconds (default 30)")
    lim = p.add_argument_group("limits (what a client may send; past them it gets 413/431/408)")
    lim.add_argument("--max-body", type=size, default=ServerLimits.max_body, metavar="BYTES",
                     help=f"largest request body, e.g. 200M (default {ServerLimits.max_body // 2**20}M)")
    lim.add_argument("--max-header-bytes", type=size, default=ServerLimits.max_header_bytes, metavar="BYTES",
                     help=f"largest request head (default {ServerLimits.max_header_bytes // 2**10}K)")
    lim.add_argument("--header-timeout", type=seconds, default=ServerLimits.header_timeout, metavar="S",
                     help=f"a request head must arrive within S seconds (default {ServerLimits.header_timeout:g})")
    lim.add_argument("--body-timeout", type=seconds, default=ServerLimits.body_timeout, metavar="S",
                     help=f"silence allowed while a body arrives (default {ServerLimits.body_timeout:g})")
    lim.add_argument("--write-timeout", type=seconds, default=ServerLimits.write_timeout, metavar="S",
                     help=f"disconnect a client that reads nothing of its reply for S seconds "
                          f"(default {ServerLimits.write_timeout:g})")
    lim.add_argument("--keepalive-timeout", type=seconds, default=ServerLimits.keepalive_timeout, metavar="S",
                     help=f"close an idle keep-alive connection after S seconds "
                          f"(default {ServerLimits.keepalive_timeout:g})")
    p.add_argument("--access-log", choices=ACCESS_LOG_FORMATS, metavar="FORMAT",
                   default=os.environ.get("MESH_ACCESS_LOG", "plain"),
                   help="one line per request: plain (key=value), json, or off (default plain; "
                        "env MESH_ACCESS_LOG); never prompt text")
    p.add_argument("--access-log-file", metavar="PATH",
                   help="append the access log to PATH instead of stderr")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", parents=[common], help="time to first token and tokens/s per node",
                       description="Measure each node's time to first token and generation speed, one "
                                   "node at a time, through the mesh transport.")
    model_opts(p, system=False)
    p.add_argument("model_word", nargs="?", metavar="MODEL", help="the model, as `run MODEL` takes it (or --model)")
    p.add_argument("--prompt", default="Write one sentence about the sea.", help="prompt to time")
    p.add_argument("--runs", type=int, default=3, help="runs per node (default 3)")
    p.set_defaults(func=cmd_bench)
    return parser


def _setup_logging(verbosity: int) -> None:
    handler = _TerminalLogHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mesh: %(message)s"))
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity == 1 else logging.WARNING)


def _use_pidfd_watcher() -> None:
    """CLI only: on Linux before Python 3.12 asyncio waits for each child in a thread
    of its own; a pidfd watcher waits in the event loop (3.12 does this by itself).
    Not done for library users: the child watcher is process-wide."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return  # kernel or sandbox without pidfd
    watcher = asyncio.PidfdChildWatcher()
    asyncio.set_child_watcher(watcher)
    watcher.attach_loop(asyncio.get_running_loop())


async def _run(args: Any) -> int:
    _use_pidfd_watcher()
    nodes = None
    if getattr(args, "nodes", None) is not None:
        nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
        if not nodes:
            raise UsageError("--nodes needs at least one node name (ssh aliases, comma-separated)")
    kwargs: Dict[str, Any] = {}
    for key in ("connect_timeout", "first_byte_timeout", "idle_timeout", "retries"):
        if getattr(args, key, None) is not None:
            kwargs[key] = getattr(args, key)
    if os.environ.get("MESH_LIVENESS_INTERVAL"):
        kwargs["liveness_interval"] = float(os.environ["MESH_LIVENESS_INTERVAL"])
    if os.environ.get("MESH_CONTROL_PERSIST"):
        kwargs["control_persist"] = int(os.environ["MESH_CONTROL_PERSIST"])
    if args.func is cmd_serve:
        kwargs["facts_ttl"] = FACTS_TTL   # /mesh/status and the dashboard show them, kept fresh
    orch = MeshOrchestrator(config=getattr(args, "config", None), nodes=nodes, **kwargs)
    if any(n.spec.fallback for n in orch.nodes):
        where = orch.config_path if os.path.exists(orch.config_path) else f"{orch.config_path} (missing)"
        _print(f"mesh: no Host in {where} is marked as a node; using the {orch.nodes[0].display_name} "
               f"as node 'local' (to make a host a node, {MARK_HINT})", file=sys.stderr)
    try:
        if args.func is not cmd_nodes and any(isinstance(n.transport, SSHTransport) for n in orch.nodes):
            orch._control_dir()   # an unsafe control dir: one error line before any node is tried
        return await args.func(orch, args)
    finally:
        await orch.close()


def _one_prompt(words: List[str]) -> Optional[str]:
    """generate's PROMPT: one argument.  Two, the first like a model name, is the
    `ollama run MODEL PROMPT` habit: say how it is written here."""
    if len(words) <= 1:
        return words[0] if words else None
    if re.fullmatch(r"[\w.\-/]+(:[\w.\-]+)?", words[0]):
        raise UsageError(f"generate takes one PROMPT; to pick the model: mesh.py run {words[0]} "
                         f"\"{' '.join(words[1:])}\" (or generate --model {words[0]} \"...\")")
    raise UsageError("generate takes one PROMPT: put it in quotes")


def _short_help(parser: Any) -> str:
    """What `mesh.py` alone prints: usage and the commands, one line each."""
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    width = max(len(a.dest) for a in sub._choices_actions)
    lines = ["usage: mesh.py COMMAND [options]   (mesh.py COMMAND --help for more)", "",
             "One pool of Ollama machines over nothing but SSH; the nodes are the Host entries "
             "of your SSH config marked '# mesh: on'.", "", "commands:"]
    lines += [f"  {a.dest:<{width}}  {a.help}" for a in sub._choices_actions]
    return "\n".join(lines) + "\n"


def _take_trailing_words(parser: Any, args: Any, extra: List[str]) -> None:
    """Give words that follow an option to the command's list positional, as cobra (the
    `ollama` CLI) does: `run MODEL --verbose PROMPT`, `pull MODEL --json NODE`. argparse
    alone fills the list before the option and rejects what comes after it. Anything
    else left over (an unknown option; a second word for generate, whose own hint is
    about its one PROMPT) is the usual usage error (UsageError)."""
    dest = {cmd_run: "prompt", cmd_pull: "targets", cmd_rm: "targets", cmd_stop: "targets"}.get(args.func)
    if not extra:
        return
    if dest is None or any(w.startswith("-") and w != "-" for w in extra):
        parser.error("unrecognized arguments: " + " ".join(extra))
    setattr(args, dest, list(getattr(args, dest) or []) + extra)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit status (0 ok, 1 failure, 2 usage)."""
    try:
        parser = _build_parser()
        if not (sys.argv[1:] if argv is None else list(argv)):
            sys.stdout.write(_short_help(parser))
            return 0
        args, extra = parser.parse_known_args(argv)
        if getattr(args, "func", None) is None:
            if extra:
                parser.error("unrecognized arguments: " + " ".join(extra))
            # Only global options (`mesh.py --config X`): the same short help as no arguments.
            sys.stdout.write(_short_help(parser))
            return 0
        _take_trailing_words(parser, args, extra)
        for key in ("verbose",):
            if not hasattr(args, key):
                setattr(args, key, 0)
        _setup_logging(args.verbose)
        if getattr(args, "config", None) is not None:
            args.config = os.path.expanduser(args.config)
            if not os.path.isfile(args.config):
                raise UsageError(f"--config {args.config}: no such file")
        if args.func is cmd_generate:
            args.prompt_text = _read_prompt(_one_prompt(args.prompt))
        elif args.func is cmd_run:
            if sys.stdin is None or sys.stdin.isatty():
                args.prompt_text = _read_prompt(" ".join(args.prompt)) if args.prompt else None
            else:
                # as `ollama run`: what is piped in comes first, then the PROMPT words
                # (`cat notes.txt | mesh.py run llama3 "sum this up"`)
                piped = sys.stdin.buffer.read().decode("utf-8", "surrogateescape")
                args.prompt_text = _read_prompt(" ".join(([piped] if piped else []) + list(args.prompt)))
        return asyncio.run(_run(args))
    except MeshError as exc:
        _end_open_line(sys.stdout)
        sys.stderr.write(f"mesh: error: {terminal_text(str(exc), one_line=True)}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("mesh: interrupted\n")
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


if __name__ == "__main__":
    sys.exit(main())
