"""The chat REPL (`run MODEL`, `chat`) on a real terminal (a pty), through real sshd nodes."""
import json
import os
import re
import select
import signal
import sys

import pytest

import mesh
from conftest import needs_sshd
from lab import MESH, wait_for

pytestmark = needs_sshd


class Terminal:
    """mesh.py on a pseudo-terminal: type into it, wait for what it shows."""

    def __init__(self, lab, *args, tmp_path=None):
        import pty
        env = lab.env(MESH_HISTORY=str(tmp_path / "history") if tmp_path else "", TERM="xterm")
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.environ.clear()
            os.environ.update(env)
            os.execv(sys.executable, [sys.executable, MESH, "--config", lab.config_path, *args])
        import fcntl
        import struct
        import termios
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.seen = bytearray()
        self.mark = 0
        self.status = None

    def _pump(self):
        r, _, _ = select.select([self.fd], [], [], 0.05)
        if r:
            try:
                self.seen.extend(os.read(self.fd, 65536))
            except OSError:
                pass

    def expect(self, needle, timeout=20):
        """Wait until `needle` shows after the previous expectation; returns what came before it."""
        needle = needle.encode() if isinstance(needle, str) else needle

        def found():
            self._pump()
            return self.seen.find(needle, self.mark) >= 0
        wait_for(found, timeout, f"{needle!r} on the terminal; got {bytes(self.seen[self.mark:])!r}")
        at = self.seen.find(needle, self.mark)
        before = bytes(self.seen[self.mark:at])
        self.mark = at + len(needle)
        return before

    def wait_reading(self):
        """Wait until mesh.py is blocked reading the terminal.  A Ctrl-C typed in the instant
        between a prompt's write and the read that follows sets Python's signal flag but
        interrupts no system call, and the read then waits for a key (a CPython race no
        person can hit; a test typing at machine speed can)."""
        def blocked():
            self._pump()
            try:
                with open(f"/proc/{self.pid}/wchan") as fh:
                    self.wchan = fh.read().strip().split(".")[0]   # e.g. poll_schedule_timeout.constprop.0
                return self.wchan in ("wait_woken", "n_tty_read", "do_select", "poll_schedule_timeout",
                                      "do_sys_poll", "core_sys_select")
            except OSError:
                return True   # no /proc: nothing to wait for
        wait_for(blocked, 20, "mesh.py to wait for the terminal")

    def type(self, data):
        os.write(self.fd, data.encode() if isinstance(data, str) else data)

    def exit_code(self, timeout=20):
        def reaped():
            self._pump()
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.status = os.waitstatus_to_exitcode(status)
            return done
        wait_for(reaped, timeout, f"mesh.py to exit; the terminal shows {bytes(self.seen)!r}")
        return self.status

    def close(self):
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(self.fd)


def chats(fake):
    return [r["body"] for r in fake.requests if r["path"] == "/api/chat"]


def test_commands_paste_multiline_and_ctrl_c(lab, tmp_path):
    fake = lab.add_node("alpha", ["qwen2.5:7b"], token_delay=0.05)
    term = Terminal(lab, "run", "qwen2.5:7b", tmp_path=tmp_path)
    try:
        term.expect(">>> ")
        term.type("/?\r")
        assert "/set" in term.expect(">>> ").decode()
        term.type("/set parameter temperature 0.25\r")
        term.expect("Set parameter 'temperature' to '0.25'")
        term.type("/set parameter temperature warm\r")          # Ollama would reject it on every turn
        term.expect('Couldn\'t set parameter: "invalid float value [warm]"')
        term.type("/set parameter stop <|end|> ###\r")           # one stop sequence per word, as a list
        term.expect("Set parameter 'stop' to '<|end|> ###'")
        term.type("/set system You are terse.\r")
        term.expect("Set system message.")
        term.type("/nonsense\r")
        term.expect("Unknown command '/nonsense'. Type /? for help")
        term.expect(">>> ")
        assert chats(fake) == []                       # none of that went to the model

        term.type("\x1b[200~line one\nline two\nline three\x1b[201~")   # a bracketed paste
        term.type("\r")
        term.expect("Hello from alpha.")
        term.expect(">>> ")
        first = chats(fake)[-1]
        assert first["messages"] == [{"role": "system", "content": "You are terse."},
                                     {"role": "user", "content": "line one\nline two\nline three"}]
        assert first["options"] == {"temperature": 0.25, "stop": ["<|end|>", "###"]}

        term.type('"""\rfirst\rsecond"""\r')
        term.expect("Hello from alpha.")
        term.expect(">>> ")
        assert chats(fake)[-1]["messages"][-1] == {"role": "user", "content": "first\nsecond"}

        fake.token_delay, fake.tokens = 0.3, ["tok "] * 60
        term.type("a long answer please\r")
        term.expect("tok tok ")
        term.type("\x03")                              # Ctrl-C: stop the answer, keep the session
        term.expect(">>> ")
        wait_for(lambda: fake.active == 0, 10, "the node's request to be cancelled")
        fake.token_delay, fake.tokens = 0.0, ["Hello", " again."]
        term.type("and now?\r")
        term.expect("Hello again.")
        term.expect(">>> ")
        history = chats(fake)[-1]["messages"]
        assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant",
                                                "user", "assistant", "user"]
        assert history[-2]["content"].startswith("tok tok") and history[-1]["content"] == "and now?"

        term.type("half-typed")
        term.expect("half-typed")
        term.wait_reading()
        term.type("\x03")                              # Ctrl-C on a typed line: clears it
        term.expect(">>> ")
        term.type("/load lama3\r")                  # a typo'd model: said, and the session stays
        assert 'not found on any node' in term.expect(">>> ").decode()
        term.type("/clear\r")
        term.expect("Cleared session context")
        term.expect(">>> ")
        term.type("\x04")                              # Ctrl-D leaves
        assert term.exit_code() == 0
    finally:
        term.close()
    assert "a long answer please" in (tmp_path / "history").read_text()   # readline history kept
    assert lab.ssh_processes() == []


def test_node_killed_mid_answer_keeps_the_session_and_verbose_names_the_node(lab):
    lab.add_node("alpha", ["qwen2.5:7b"], token_delay=0.2, tokens=["a "] * 50)
    lab.add_node("beta", ["qwen2.5:7b"], token_delay=0.2, tokens=["b "] * 50)
    term = Terminal(lab, "chat", "--model", "qwen2.5:7b")
    try:
        term.expect(">>> ")
        term.type("/set verbose\r")
        term.expect(">>> ")
        term.type("go\r")
        # Two tokens on the screen: the answer has begun (the spinner before it draws a
        # space too, and a node killed before its first token is rightly replaced).
        marks = {"alpha": b"a a ", "beta": b"b b "}

        def answering():
            term._pump()
            return [n for n, mark in marks.items() if term.seen.find(mark, term.mark) >= 0]
        serving = wait_for(answering, 20, "the answer to begin")[0]
        other = "beta" if serving == "alpha" else "alpha"
        lab.nodes[serving].kill()
        broke = term.expect(">>> ").decode()
        assert f"the answer broke off: {serving} failed mid-answer (" in broke and "send it again" in broke
        lab.fakes[other].token_delay, lab.fakes[other].tokens = 0.0, ["fine."]
        term.type("go\r")
        stats = term.expect(">>> ").decode()
        assert "fine." in stats and f"node:                 {other}" in stats
        assert "time to first token:" in stats and "eval rate:" in stats
        assert "prompt eval duration:" in stats and "prompt eval rate:" in stats and "\neval duration:" in stats
        sent = chats(lab.fakes[other])[-1]["messages"]
        assert sent == [{"role": "user", "content": "go"}]   # the broken turn was not kept
        term.type("/bye\r")
        assert term.exit_code() == 0
    finally:
        term.close()


def test_a_node_back_up_answers_the_next_turn(lab):
    # While the chat waits at its prompt nothing else runs; the node that went down must
    # still be asked again on the next turn (it used to stay down for the whole session).
    lab.add_node("alpha", ["llama3"], tokens=["hi."])
    term = Terminal(lab, "-v", "run", "llama3")
    try:
        term.expect(">>> ")
        term.type("one\r")
        assert "hi." in term.expect(">>> ").decode()
        lab.nodes["alpha"].kill()
        term.type("two\r")
        failed = term.expect(">>> ").decode()
        assert "mesh: alpha: marked down" in failed and "mesh: error:" in failed
        # -v's log lines stand alone: the spinner is wiped before them, not left in front
        assert not re.search(f"[{mesh._Spinner.FRAMES}] *mesh:", failed), failed
        lab.nodes["alpha"].start()
        term.type("three\r")
        assert "hi." in term.expect(">>> ").decode()
        term.type("/bye\r")
        assert term.exit_code() == 0
    finally:
        term.close()


def test_one_answer_on_a_terminal_spins_until_the_first_token(lab):
    lab.add_node("alpha", ["llama3"], delay=1.0)          # a slow first token (a model loading)
    term = Terminal(lab, "run", "llama3", "hi")
    try:
        assert term.exit_code() == 0
        out = bytes(term.seen).decode()
        assert any(frame in out.split("Hello")[0] for frame in mesh._Spinner.FRAMES)
        assert "\r\x1b[KHello from alpha." in out            # wiped before the answer
    finally:
        term.close()


def test_misspelt_model_fails_before_the_first_prompt(lab):
    lab.add_node("alpha", ["llama3", "qwen2.5:7b"])
    term = Terminal(lab, "run", "lama3")
    try:
        assert term.exit_code() == 1
        out = bytes(term.seen).decode()
        assert 'mesh: error: model "lama3" not found on any node' in out and "closest: llama3" in out
        assert "to get it: mesh.py pull lama3" in out
        assert ">>> " not in out
    finally:
        term.close()


def test_pull_draws_bars_on_a_terminal(lab):
    lab.add_node("alpha", ["llama3"], token_delay=0.5)
    lab.add_node("beta", ["llama3"], token_delay=0.5)
    lab.fakes["beta"].pull_error = "pull model manifest: file does not exist"
    term = Terminal(lab, "pull", "phi3:mini")
    try:
        assert term.exit_code() == 1
        out = bytes(term.seen).decode()
        assert "pulling 8eeb52dfb3bb" in out and "▕" in out and "100%" in out
        # beta's failure is drawn as it happens, while alpha's bar goes on
        assert out.index("beta   error: pull model manifest") < out.index("100%")
        assert out.endswith("alpha  success\r\nbeta   error: pull model manifest: file does not exist\r\n")
        assert "\x1b[" in out
    finally:
        term.close()


def test_piped_chat_runs_one_turn_per_line_and_handles_commands(lab):
    fake = lab.add_node("alpha", ["qwen2.5:7b"])
    p = lab.run("chat", input=b'/set parameter seed 7\nfirst\n"""\ntwo\nlines\n"""\n/bye\nnever sent\n')
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode() == "Set parameter 'seed' to '7'\nHello from alpha.\nHello from alpha.\n"
    bodies = chats(fake)
    assert [b["messages"][-1]["content"] for b in bodies] == ["first", "two\nlines"]
    assert bodies[0]["options"] == {"seed": 7}
    assert "\x1b" not in p.stdout.decode() + p.stderr.decode()
    assert json.loads(json.dumps(bodies))   # plain JSON bodies


@pytest.mark.parametrize("lines, text", [
    (["plain"], "plain"), (['"""one line"""'], "one line"), (['"""', "x", 'y"""'], "x\ny"),
    (['"""', "x", "", "y", '"""'], "x\n\ny"), (['"""first', 'second"""'], "first\nsecond"),
    (['"""', "open"], None),
])
def test_triple_quote_blocks(lines, text):
    block = mesh._Multiline()
    out = [block.feed(line) for line in lines]
    assert out[-1] == text and all(o is None for o in out[:-1])


def test_test_shows_pending_nodes_live_on_a_terminal_only(lab):
    lab.add_node("quick", ["qwen2.5:7b"])
    lab.add_node("frozen", ["qwen2.5:7b"])
    lab.nodes["frozen"].freeze()
    term = Terminal(lab, "test", "--timeout", "3")
    try:
        term.expect("ok    quick")
        term.expect("waiting for frozen (")
        assert term.exit_code() == 1
        assert "FAIL  frozen  no answer within 3s" in bytes(term.seen).decode()
        term.close()
        term = Terminal(lab, "--connect-timeout", "3", "list")    # list waits for every node too
        term.expect("waiting for frozen (")
        assert term.exit_code() == 0
        assert "qwen2.5:7b" in bytes(term.seen).decode().split("waiting for frozen")[-1]
    finally:
        term.close()
        lab.nodes["frozen"].thaw()
    p = lab.run("test", "--timeout", "3", "--nodes", "quick")
    assert p.returncode == 0 and "\x1b" not in p.stdout.decode() + p.stderr.decode()


def test_rm_asks_on_a_terminal(lab):
    fake = lab.add_node("alpha", ["llama3", "phi3:mini"])
    term = Terminal(lab, "rm", "phi3:mini")
    try:
        term.expect("delete phi3:mini from alpha? [y/N] ")
        term.type("n\r")
        assert term.exit_code() == 1 and "nothing deleted" in bytes(term.seen).decode()
    finally:
        term.close()
    assert "phi3:mini" in fake.models
    term = Terminal(lab, "rm", "phi3:mini")
    try:
        term.expect("[y/N] ")
        term.wait_reading()
        term.type("\x03")
        assert term.exit_code() == 130
    finally:
        term.close()
    term = Terminal(lab, "rm", "phi3:mini")
    try:
        term.expect("[y/N] ")
        term.type("y\r")
        term.expect("alpha  deleted 'phi3:mini'")
        assert term.exit_code() == 0
    finally:
        term.close()
    assert fake.models == ["llama3"]


def test_ctrl_c_at_an_empty_prompt_leaves(lab):
    """Typed at a terminal: Ctrl-C while chat waits for input ends it (exit 130), no ssh child left."""
    lab.add_node("a", ["qwen2.5:7b"])
    term = Terminal(lab, "chat")
    try:
        term.expect(">>> ")
        term.type("hello\r")
        term.expect("Hello from a.")
        term.expect(">>> ")
        term.wait_reading()
        term.type("\x03")
        assert term.exit_code() == 130
    finally:
        term.close()
    assert lab.ssh_processes() == []


@pytest.mark.parametrize("args", [["run", "m:1", "hi"], ["generate", "--model", "m:1", "hi"]])
def test_an_error_after_part_of_the_answer_starts_its_own_line(lab, args):
    """On a terminal, an answer a node cut off with an error line is ended before
    'mesh: error:' (it showed 'Hellomesh: error: ...')."""
    fake = lab.add_node("h", ["m:1"])
    fake.mode, fake.error_text = "error_line", "CUDA error: out of memory"
    term = Terminal(lab, *args)
    try:
        assert term.exit_code() == 1
        out = bytes(term.seen).decode()
        assert "Hello\r\nmesh: error: h: Ollama error: CUDA error: out of memory" in out, out
    finally:
        term.close()
