#!/usr/bin/env bash
# setup-ssh-mesh.sh - one-time SSH bootstrap for mesh.py, safe to run again.
#
# Generates a dedicated key (only when missing), installs it on each node, and
# writes the nodes' Host blocks into a managed region of your SSH config.
# Running it again with the same nodes changes nothing.
set -euo pipefail

PROG=${0##*/}
HERE=$(cd "$(dirname "$0")" && pwd)

usage() {
  cat <<'EOF'
Usage: setup-ssh-mesh.sh [options] NODE...
       setup-ssh-mesh.sh [options] --nodes-file FILE

NODE is ALIAS=[USER@]HOST[:PORT]; an IPv6 address goes in brackets:
  vengeance=allan@192.0.2.46   runpod=root@198.51.100.132:13323   v6=[2001:db8::7]:2222

Options:
  --nodes-file FILE  one NODE per line; '#' starts a comment; mesh settings may
                     follow the NODE:  runpod=root@198.51.100.132:13323 name="RunPod RTX 4090" weight=2
  --config FILE      SSH config to write (default ~/.ssh/config)
  --key FILE         private key to use or create (default ~/.ssh/mesh_ed25519)
  --passphrase       ask for a passphrase when generating the key (default: none)
  --accept-new       accept unknown host keys on first connection
                     (StrictHostKeyChecking=accept-new); changed keys are still refused
  --dry-run          print every action; change nothing on disk or on any node
  -h, --help         this help

What it does, in order:
  1. creates the key with ssh-keygen -t ed25519 if the file does not exist
     (an existing key is never overwritten and never asked about);
  2. writes one Host block per node (its key with IdentitiesOnly yes, and the
     '# mesh: on' line that makes it a mesh node) between the lines
     "# >>> mesh nodes (setup-ssh-mesh.sh) >>>" and "# <<< mesh nodes <<<"
     of the config (created 0600 when missing; other entries are untouched;
     a node already in the region is updated in place);
  3. installs the public key on each node over ssh (you may be asked for the
     node's password, as ssh normally asks);
  4. checks each node with ssh and exactly the options mesh.py uses, then runs
     `python3 mesh.py --nodes ... test` when mesh.py sits beside this script
     (reported only: Ollama may not be installed yet).

Exit status: 0 when every node works, 1 when any node failed, 2 for usage errors.
EOF
}

die_usage() { printf '%s: error: %s\n' "$PROG" "$1" >&2; printf "Try '%s --help'.\n" "$PROG" >&2; exit 2; }
say() { printf '%s\n' "$*"; }

CONFIG="$HOME/.ssh/config"
CONFIG_GIVEN=0
KEY="$HOME/.ssh/mesh_ed25519"
DRY=0
ACCEPT_NEW=0
PASSPHRASE=0
NODES_FILE=""
SPECS=()       # raw NODE strings
SETTINGS=()    # mesh settings per NODE (may be empty)

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY=1 ;;
    --accept-new) ACCEPT_NEW=1 ;;
    --passphrase) PASSPHRASE=1 ;;
    --config) [ $# -ge 2 ] || die_usage "--config needs a FILE"; CONFIG=$2; CONFIG_GIVEN=1; shift ;;
    --config=*) CONFIG=${1#*=}; CONFIG_GIVEN=1 ;;
    --key) [ $# -ge 2 ] || die_usage "--key needs a FILE"; KEY=$2; shift ;;
    --key=*) KEY=${1#*=} ;;
    --nodes-file) [ $# -ge 2 ] || die_usage "--nodes-file needs a FILE"; NODES_FILE=$2; shift ;;
    --nodes-file=*) NODES_FILE=${1#*=} ;;
    --) shift; while [ $# -gt 0 ]; do SPECS+=("$1"); SETTINGS+=(""); shift; done; break ;;
    -*) die_usage "unknown option $1" ;;
    *) SPECS+=("$1"); SETTINGS+=("") ;;
  esac
  shift
done

if [ -n "$NODES_FILE" ]; then
  [ -r "$NODES_FILE" ] || die_usage "cannot read --nodes-file $NODES_FILE"
  while IFS= read -r line || [ -n "$line" ]; do
    line=${line%%$'\r'}
    case "$line" in ''|'#'*) continue ;; esac
    # strip a trailing comment: a '#' after whitespace and outside quotes (name="RunPod #1" stays)
    line=$(printf '%s\n' "$line" | awk '{
      q = ""; out = ""
      for (i = 1; i <= length($0); i++) {
        c = substr($0, i, 1)
        if (q == "") {
          if (c == "\"" || c == "\047") q = c
          else if (c == "#" && (i == 1 || substr($0, i - 1, 1) ~ /[ \t]/)) break
        } else if (c == q) q = ""
        out = out c
      }
      sub(/^[ \t]+/, "", out); sub(/[ \t]+$/, "", out); print out }')
    [ -n "$line" ] || continue
    spec=${line%%[[:space:]]*}
    rest=""
    if [ "$spec" != "$line" ]; then rest=$(printf '%s' "${line#"$spec"}" | sed 's/^[[:space:]]*//'); fi
    SPECS+=("$spec"); SETTINGS+=("$rest")
  done < "$NODES_FILE"
fi
[ ${#SPECS[@]} -gt 0 ] || die_usage "no NODE given (ALIAS=[USER@]HOST[:PORT], or --nodes-file FILE)"

# ---- parse NODE specs -------------------------------------------------------
ALIASES=(); USERS=(); HOSTS=(); PORTS=()
i=0
while [ $i -lt ${#SPECS[@]} ]; do
  spec=${SPECS[$i]}
  case "$spec" in *=*) ;; *) die_usage "bad NODE '$spec': expected ALIAS=[USER@]HOST[:PORT]" ;; esac
  alias=${spec%%=*}
  target=${spec#*=}
  re_alias='^[A-Za-z0-9._-]+$'
  [[ $alias =~ $re_alias ]] || die_usage "bad NODE '$spec': the alias may use letters, digits, '.', '_' and '-'"
  user=""
  case "$target" in *@*) user=${target%@*}; target=${target##*@} ;; esac
  port=""
  re_v6='^\[([0-9A-Fa-f:.]+)\](:([0-9]+))?$'
  re_host='^([A-Za-z0-9._-]+)(:([0-9]+))?$'
  if [[ $target =~ $re_v6 ]]; then
    host=${BASH_REMATCH[1]}; port=${BASH_REMATCH[3]}
  elif [[ $target =~ $re_host ]]; then
    host=${BASH_REMATCH[1]}; port=${BASH_REMATCH[3]}
  else
    die_usage "bad NODE '$spec': expected ALIAS=[USER@]HOST[:PORT] (IPv6 in brackets)"
  fi
  re_user='^[A-Za-z0-9._][A-Za-z0-9._-]*$'
  if [ -n "$user" ] && ! [[ $user =~ $re_user ]]; then die_usage "bad NODE '$spec': bad user '$user'"; fi
  if [ -n "$port" ] && { [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; }; then
    die_usage "bad NODE '$spec': port must be 1-65535"
  fi
  j=0
  while [ $j -lt $i ]; do
    [ "${ALIASES[$j]}" != "$alias" ] || die_usage "node '$alias' given twice"
    j=$((j + 1))
  done
  case "${SETTINGS[$i]}" in *$'\n'*) die_usage "bad settings for '$alias'" ;; esac
  ALIASES+=("$alias"); USERS+=("$user"); HOSTS+=("$host"); PORTS+=("$port")
  i=$((i + 1))
done

SSH_F=()
if [ "$CONFIG_GIVEN" -eq 1 ]; then SSH_F=(-F "$CONFIG"); fi
# The options mesh.py gives every ssh call (mesh.py's SSH_OPTIONS; a test keeps them
# equal), so "ready" here means ready for mesh.py.  No ControlPath: no master here.
MESH_SSH_OPTS=(-o BatchMode=yes -o ClearAllForwardings=yes -o RemoteCommand=none -o RequestTTY=no
  -o StdinNull=no -o LogLevel=INFO -o PermitLocalCommand=no -o ForwardAgent=no -o ForwardX11=no
  -o SessionType=default -o ConnectTimeout=10 -o ControlPath=none)
HOSTKEY_OPTS=()
if [ "$ACCEPT_NEW" -eq 1 ]; then HOSTKEY_OPTS=(-o StrictHostKeyChecking=accept-new); fi

run() {  # run a command, or only show it in --dry-run
  if [ "$DRY" -eq 1 ]; then
    printf 'would run:'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

# ---- 1. the key ----------------------------------------------------------------
if [ -e "$KEY" ]; then
  say "key: using existing $KEY"
  if [ ! -e "$KEY.pub" ]; then
    if [ "$DRY" -eq 1 ]; then say "would write $KEY.pub (ssh-keygen -y -f $KEY)"
    else ssh-keygen -y -f "$KEY" > "$KEY.pub"; say "key: wrote missing $KEY.pub"; fi
  fi
else
  keydir=$(dirname "$KEY")
  if [ ! -d "$keydir" ]; then run mkdir -p "$keydir"; run chmod 700 "$keydir"; fi
  if [ "$PASSPHRASE" -eq 1 ]; then
    run ssh-keygen -t ed25519 -f "$KEY" -C "mesh@$(hostname 2>/dev/null || echo host)"
  else
    run ssh-keygen -q -t ed25519 -N "" -f "$KEY" -C "mesh@$(hostname 2>/dev/null || echo host)"
  fi
  [ "$DRY" -eq 1 ] || say "key: created $KEY"
fi

# The IdentityFile as written: ~/... when the key is under the home ssh expands ~
# to (the passwd entry's, which is not always $HOME), else the absolute path.
TILDE='~'
me=$(id -un)
PW_HOME=""
re_name='^[A-Za-z0-9._-]+$'
if [[ $me =~ $re_name ]]; then eval "PW_HOME=~$me"; fi
KEY_ABS=$KEY
case "$KEY_ABS" in /*) ;; *) KEY_ABS="$(pwd)/$KEY_ABS" ;; esac
case "$KEY_ABS" in
  "$PW_HOME"/*) KEY_IN_CONFIG="$TILDE/${KEY_ABS#"$PW_HOME"/}" ;;
  *) KEY_IN_CONFIG=$KEY_ABS ;;
esac
case "$KEY_IN_CONFIG" in *[[:space:]]*) KEY_IN_CONFIG="\"$KEY_IN_CONFIG\"" ;; esac

# ---- 2. the config ---------------------------------------------------------------
BEGIN_MARK='# >>> mesh nodes (setup-ssh-mesh.sh) >>>'
END_MARK='# <<< mesh nodes <<<'
TMPD=$(mktemp -d "${TMPDIR:-/tmp}/setup-mesh.XXXXXX")
trap 'rm -rf "$TMPD"' EXIT

blocks="$TMPD/blocks"
: > "$blocks"
i=0
while [ $i -lt ${#ALIASES[@]} ]; do
  {
    printf 'Host %s\n' "${ALIASES[$i]}"
    printf '    HostName %s\n' "${HOSTS[$i]}"
    [ -z "${USERS[$i]}" ] || printf '    User %s\n' "${USERS[$i]}"
    [ -z "${PORTS[$i]}" ] || printf '    Port %s\n' "${PORTS[$i]}"
    printf '    IdentityFile %s\n' "$KEY_IN_CONFIG"
    printf '    IdentitiesOnly yes\n'
    printf '    ServerAliveInterval 60\n'
    if [ -z "${SETTINGS[$i]}" ]; then printf '    # mesh: on\n'; else printf '    # mesh: on %s\n' "${SETTINGS[$i]}"; fi
  } >> "$blocks"
  i=$((i + 1))
done

new="$TMPD/config"
if [ -f "$CONFIG" ] && grep -qxF "$BEGIN_MARK" "$CONFIG"; then
  grep -qxF "$END_MARK" "$CONFIG" || { printf '%s: error: %s has "%s" but no "%s"; fix the file by hand\n' \
    "$PROG" "$CONFIG" "$BEGIN_MARK" "$END_MARK" >&2; exit 1; }
  # Replace the region: nodes given now take the place of their old block, new
  # nodes go at the end, nodes not given are kept as they were.
  awk -v newfile="$blocks" -v begin="$BEGIN_MARK" -v end="$END_MARK" '
    function flush_old() { if (cur != "") { oldblk[cur] = oldtext } cur = ""; oldtext = "" }
    BEGIN {
      n = 0; c = ""
      while ((getline line < newfile) > 0) {
        if (line ~ /^Host /) { c = substr(line, 6); n++; order[n] = c; newblk[c] = line "\n" }
        else if (c != "") newblk[c] = newblk[c] line "\n"
      }
      inside = 0; m = 0; cur = ""
    }
    $0 == begin { inside = 1; print; next }
    inside && $0 == end {
      flush_old()
      sep = ""
      for (k = 1; k <= m; k++) {
        a = oldorder[k]
        if (a in newblk) { printf "%s%s", sep, newblk[a]; done[a] = 1 } else printf "%s%s", sep, oldblk[a]
        sep = "\n"
      }
      for (k = 1; k <= n; k++) if (!(order[k] in done)) { printf "%s%s", sep, newblk[order[k]]; sep = "\n" }
      inside = 0; print; next
    }
    inside {
      if ($0 ~ /^Host /) { flush_old(); cur = substr($0, 6); m++; oldorder[m] = cur; oldtext = $0 "\n" }
      else if (cur != "" && $0 != "") oldtext = oldtext $0 "\n"
      next
    }
    { print }
  ' "$CONFIG" > "$new"
else
  {
    printf '%s\n' "$BEGIN_MARK"
    awk 'NR > 1 && /^Host / { print "" } { print }' "$blocks"
    printf '%s\n' "$END_MARK"
    if [ -s "$CONFIG" ]; then printf '\n'; cat "$CONFIG"; fi
  } > "$new"
fi

if [ -f "$CONFIG" ] && cmp -s "$new" "$CONFIG"; then
  say "config: $CONFIG unchanged"
elif [ "$DRY" -eq 1 ]; then
  if [ -f "$CONFIG" ]; then
    say "would update $CONFIG:"
    diff -u "$CONFIG" "$new" | sed -n '3,$p' || true
  else
    say "would create $CONFIG (mode 0600):"
    cat "$new"
  fi
else
  cfgdir=$(dirname "$CONFIG")
  if [ ! -d "$cfgdir" ]; then mkdir -p "$cfgdir" && chmod 700 "$cfgdir"; fi
  if [ -f "$CONFIG" ]; then
    cat "$new" > "$CONFIG"      # in place: keeps the file's mode, owner and any symlink
    say "config: updated $CONFIG"
  else
    (umask 077 && cat "$new" > "$CONFIG")
    say "config: created $CONFIG"
  fi
fi

# A Host block for the same alias earlier in the file would win over ours (first value wins).
i=0
while [ $i -lt ${#ALIASES[@]} ]; do
  if [ -f "$CONFIG" ] && awk -v a="${ALIASES[$i]}" -v begin="$BEGIN_MARK" -v end="$END_MARK" '
      $0 == begin { inside = 1 } $0 == end { inside = 0 }
      !inside && tolower($1) == "host" { for (k = 2; k <= NF; k++) if ($k == a) found = 1 }
      END { exit !found }' "$CONFIG"; then
    say "note: ${ALIASES[$i]} also has a Host block outside the managed region; ssh uses the first value it reads"
  fi
  i=$((i + 1))
done

# ---- 3. install the public key on each node ------------------------------------------
FAILED=()
PUB=""
if [ -f "$KEY.pub" ]; then
  read -r kt kb _ < "$KEY.pub" || true
  PUB="$kt $kb mesh"
fi
valid_pub='^(ssh-[a-z0-9-]+|ecdsa-[a-z0-9-]+|sk-[a-z0-9@.-]+) [A-Za-z0-9+/=]+ mesh$'
# Runs under the node's login shell; POSIX sh does the work whatever that shell is.
remote_install() {
  printf '%s' "exec sh -c 'cd && umask 077 && mkdir -p .ssh && touch .ssh/authorized_keys && \
if [ -s .ssh/authorized_keys ] && [ -n \"\$(tail -c1 .ssh/authorized_keys)\" ]; then echo >> .ssh/authorized_keys; fi && \
if grep -q \"$kb\" .ssh/authorized_keys; then echo present; else printf \"%s\\n\" \"$PUB\" >> .ssh/authorized_keys && echo added; fi'"
}

i=0
while [ $i -lt ${#ALIASES[@]} ]; do
  a=${ALIASES[$i]}
  if [ "$DRY" -eq 1 ]; then
    say "would install $KEY.pub on $a (ssh ${SSH_F[*]+${SSH_F[*]} }$a, asking for a password if needed)"
    i=$((i + 1)); continue
  fi
  if ! [[ $PUB =~ $valid_pub ]]; then
    say "$a: FAILED: $KEY.pub is not a public key"; FAILED+=("$a"); i=$((i + 1)); continue
  fi
  # Already working with the mesh key? Then nothing to install.
  if ssh ${SSH_F[@]+"${SSH_F[@]}"} ${HOSTKEY_OPTS[@]+"${HOSTKEY_OPTS[@]}"} "${MESH_SSH_OPTS[@]}" \
      -- "$a" true </dev/null >/dev/null 2>&1; then
    say "$a: key already installed"
  # Installing may need the user's other keys (agent) or a password: the block's
  # IdentitiesOnly is lifted for this one call.
  elif out=$(ssh ${SSH_F[@]+"${SSH_F[@]}"} ${HOSTKEY_OPTS[@]+"${HOSTKEY_OPTS[@]}"} -o ConnectTimeout=15 \
      -o ControlPath=none -o IdentitiesOnly=no -o NumberOfPasswordPrompts=3 -- "$a" "$(remote_install)" 2>"$TMPD/err"); then
    say "$a: key ${out:-installed}"
  else
    say "$a: FAILED to install the key: $(grep -v '^Warning: Permanently added' "$TMPD/err" | tail -n 1)"
    FAILED+=("$a")
  fi
  i=$((i + 1))
done

# ---- 4. check ------------------------------------------------------------------------
if [ "$DRY" -eq 1 ]; then
  say "would check each node: ssh ${MESH_SSH_OPTS[*]} ALIAS true"
  say "dry run: nothing was changed"
  exit 0
fi
OK_NODES=()
i=0
while [ $i -lt ${#ALIASES[@]} ]; do
  a=${ALIASES[$i]}
  if ssh ${SSH_F[@]+"${SSH_F[@]}"} ${HOSTKEY_OPTS[@]+"${HOSTKEY_OPTS[@]}"} "${MESH_SSH_OPTS[@]}" \
      -- "$a" true </dev/null 2>"$TMPD/err"; then
    say "check $a: ok (key login works)"
    OK_NODES+=("$a")
  else
    say "check $a: FAILED: $(grep -v '^Warning: Permanently added' "$TMPD/err" | tail -n 1)"
    case " ${FAILED[*]+${FAILED[*]}} " in *" $a "*) ;; *) FAILED+=("$a") ;; esac
  fi
  i=$((i + 1))
done

if [ -f "$HERE/mesh.py" ] && [ ${#OK_NODES[@]} -gt 0 ] && command -v python3 >/dev/null 2>&1; then
  nodes_csv=$(IFS=,; printf '%s' "${OK_NODES[*]}")
  say "mesh.py test (reported only; Ollama may not be installed yet):"
  if [ "$CONFIG_GIVEN" -eq 1 ]; then
    python3 "$HERE/mesh.py" --config "$CONFIG" --nodes "$nodes_csv" test || true
  else
    python3 "$HERE/mesh.py" --nodes "$nodes_csv" test || true
  fi
fi

if [ ${#FAILED[@]} -gt 0 ]; then
  say "failed: ${FAILED[*]}"
  exit 1
fi
say "all ${#ALIASES[@]} node(s) ready"
