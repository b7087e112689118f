"""The README tells the truth about how the tests are run."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_runs_the_test_command_the_readme_gives():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    m = re.search(r"<!-- test-command -->\s*```sh\n(.*?)\n```", readme, re.S)
    assert m, "README.md lacks the marked test command block"
    command = m.group(1).strip().splitlines()[-1]
    assert command == "python3 -m pytest -q tests"
    assert "\n" + command + "\n" in ci


def test_readme_documents_every_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    for command in ("test", "nodes", "generate", "chat", "serve", "bench"):
        assert f"python3 mesh.py {command}" in readme or f"mesh.py {command}" in readme, command


def test_mesh_py_is_executable():
    """`./mesh.py test`, as the README shows it: the executable bit, in git too."""
    import subprocess
    path = os.path.join(ROOT, "mesh.py")
    assert os.access(path, os.X_OK) and open(path).readline() == "#!/usr/bin/env python3\n"
    mode = subprocess.run(["git", "ls-files", "-s", "mesh.py"], cwd=ROOT, capture_output=True, text=True).stdout
    assert not mode or mode.startswith("100755 ")
    assert subprocess.run([path, "--version"], capture_output=True, text=True).stdout.startswith("mesh.py ")
