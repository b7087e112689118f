import gc
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from lab import HAVE_SSHD, SSHLab  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _private_config_cache(tmp_path_factory):
    """mesh caches the ssh referee's verdicts; tests keep theirs out of the real ~/.cache."""
    old = os.environ.get("MESH_CACHE_DIR")
    os.environ["MESH_CACHE_DIR"] = str(tmp_path_factory.mktemp("mesh-cache"))
    yield
    if old is None:
        os.environ.pop("MESH_CACHE_DIR", None)
    else:
        os.environ["MESH_CACHE_DIR"] = old

@pytest.fixture(autouse=True)
def _finalise_leftovers():
    """Whatever a test left to the garbage collector (an asyncio subprocess transport whose
    event loop has closed) is finalised at the end of that test, where its warning names
    the test, rather than at a random later allocation: on CPython 3.11 such a finaliser
    running inside pytest's own ast.parse (the terminal summary imports a plugin late) made
    the ast module's recursion bookkeeping raise SystemError and pytest end in INTERNALERROR."""
    yield
    gc.collect()


needs_sshd = pytest.mark.skipif(not HAVE_SSHD, reason="OpenSSH sshd/ssh/ssh-keygen not installed "
                                "(apt-get install openssh-server openssh-client)")


@pytest.fixture
def lab():
    """A fresh lab of real sshd nodes; everything it started is stopped afterwards."""
    if not HAVE_SSHD:
        pytest.skip("OpenSSH sshd not installed")
    the_lab = SSHLab()
    try:
        yield the_lab
    finally:
        the_lab.close()


@pytest.fixture
def mesh_env(lab, monkeypatch):
    """In-process module API use: the lab's control dir."""
    monkeypatch.setenv("MESH_CONTROL_DIR", lab.control_dir)
    monkeypatch.delenv("MESH_MODEL", raising=False)
    return lab
