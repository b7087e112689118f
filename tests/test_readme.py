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
