"""The tests' fork server runs a command as a fresh interpreter would (tests/python_forkserver.py)."""

import json
import os
import subprocess
import sys

import pytest

from tests.python_forkserver import run_python
from tests.torchrun_harness import REPO_ROOT, subprocess_env

REPORT = """
import json, os, sys
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "stdin": sys.stdin.read(),
                  "fault": os.environ.get("MEGATRON_RENIO_FAULT"), "main": __name__,
                  "file": globals().get("__file__"), "ppid": os.getppid()}))
sys.exit(int(sys.argv[-1]))
"""


@pytest.fixture(autouse=True)
def forking(monkeypatch):
    """These tests are of the server: on also where the suite runs without it."""
    monkeypatch.delenv("MEGATRON_RENIO_TESTS_FRESH_PYTHON", raising=False)


def fresh(args, env=None, cwd=REPO_ROOT):
    return subprocess.run([sys.executable, *map(str, args)], env=subprocess_env() if env is None else env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("form", ["-c", "script", "-m"])
def test_a_forked_command_sees_what_a_fresh_interpreter_sees(tmp_path, form):
    (tmp_path / "report_mod.py").write_text(REPORT)
    args = {"-c": ["-c", REPORT], "script": [tmp_path / "report_mod.py"], "-m": ["-m", "report_mod"]}[form]
    args = [*args, "first arg", "3"]
    env = subprocess_env() | {"MEGATRON_RENIO_FAULT": "x:1"}  # -m finds report_mod in the working directory
    want = fresh(args, env=env, cwd=tmp_path)
    got = run_python(args, env=env, cwd=tmp_path)
    assert (got.returncode, got.stderr) == (want.returncode, want.stderr) == (3, "")
    want, got = json.loads(want.stdout), json.loads(got.stdout)
    assert got["ppid"] != os.getpid()  # forked by the server, not started by this process
    assert {k: v for k, v in got.items() if k != "ppid"} == {k: v for k, v in want.items() if k != "ppid"}


def test_a_forked_command_has_the_servers_imports_and_not_the_last_commands_changes():
    """Each command is its own process: what one changes in a module does not reach the next."""
    change = "import megatron_renio.config as c; c.CHANGED = 1; print(hasattr(c, 'CHANGED'))"
    assert run_python(["-c", change]).stdout == "True\n"
    check = "import sys; print('megatron.core' in sys.modules, hasattr(sys.modules['megatron_renio.config'], 'CHANGED'))"
    forked = run_python(["-c", check])
    assert forked.stdout == "True False\n" and forked.returncode == 0, forked.stderr


def test_exit_by_a_signal_atexit_and_a_traceback():
    code = "import atexit, os, signal, sys; atexit.register(print, 'bye'); sys.stdout.flush(); "
    for tail, status, stdout in (("", 0, "bye\n"), ("sys.exit('boom')", 1, "bye\n"), ("1 / 0", 1, "bye\n"),
                                 ("os.kill(os.getpid(), signal.SIGTERM)", -15, "")):
        want, got = fresh(["-c", code + tail]), run_python(["-c", code + tail])
        assert (got.returncode, got.stdout) == (want.returncode, want.stdout) == (status, stdout), tail
        assert got.stderr.splitlines()[-1:] == want.stderr.splitlines()[-1:], tail  # "boom", the ZeroDivisionError


def test_a_command_past_its_timeout_is_killed():
    with pytest.raises(subprocess.TimeoutExpired):
        run_python(["-c", "import time; time.sleep(60)"], timeout=1)
    assert run_python(["-c", "print('next')"]).stdout == "next\n"  # the server goes on


def test_another_import_time_environment_gets_a_server_started_with_it():
    """A variable that is not read at run time only (RUNTIME_ENV) could change an import: such a
    command is forked from a new server, started with the command's environment."""
    report = "import os; print(os.getppid())"
    other = subprocess_env() | {"MEGATRON_RENIO_TEST_VARIABLE": "1"}
    first = run_python(["-c", report]).stdout
    assert run_python(["-c", report], env=subprocess_env() | {"MEGATRON_RENIO_FAULT": "x:1"}).stdout == first
    server = int(run_python(["-c", report], env=other).stdout)
    assert server != int(first) and server != os.getpid()
    assert b"MEGATRON_RENIO_TEST_VARIABLE=1" in open(f"/proc/{server}/environ", "rb").read().split(b"\0")


def test_a_server_that_died_is_started_again():
    from tests import python_forkserver

    run_python(["-c", "pass"])
    server = python_forkserver._SERVER.proc
    server.kill()
    server.wait()
    with pytest.raises(RuntimeError, match="fork server ended"):
        python_forkserver._SERVER.run(["-c", "pass"], subprocess_env(), REPO_ROOT, 10)
    proc = run_python(["-c", "import os; print(os.getppid())"])
    assert proc.returncode == 0 and int(proc.stdout) not in (server.pid, os.getpid())
