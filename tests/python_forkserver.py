"""A fork server for the tests' ``python -m ...`` / ``python -c ...`` / ``python script.py`` runs.

A fresh interpreter spends seconds importing torch and Megatron-Core before the command does
anything (7 s on the 2-core CI machine; a refused flag then takes milliseconds). The suite starts
this server once: it imports those modules, then forks one child per command line. A child is a
new process as the command would get from ``subprocess.run([sys.executable, *args])``: its own
pid, argv, environment, working directory, stdin from /dev/null, stdout and stderr in files, its
``__main__`` run by :mod:`runpy` (``-m``, a script) or ``exec`` (``-c``) with the ``sys.path[0]``
Python gives that form, the interpreter's default signal handlers (the server sets none),
``atexit`` handlers run at its exit, and its exit status (``-N`` when signal N ended it). Only the
imports are shared, copied on write after fork.

Forking is safe here because the server has one thread when it forks (it checks, and refuses
otherwise) and has started no torch thread pool, process group or CUDA context. Environment
variables read at import time would keep the server's values, so :func:`run_python` starts a new
server when a command's environment differs from the server's in any variable other than those of
:data:`RUNTIME_ENV` (read by the commands when they run): tests change the environment (a
monkeypatched variable; Megatron-Core sets some when it builds a model in the test process).

Protocol: one JSON request per line on stdin ``{"args", "env", "cwd", "stdout", "stderr",
"timeout"}``; one JSON reply per line on stdout ``{"returncode"}`` or ``{"timeout": true}`` (the
child was killed).
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
import warnings
from pathlib import Path

# The imports the children share, besides every module of PACKAGES that is not a command: the
# libraries those reach lazily.
PRELOAD = ("torch.distributed.run", "transformers.models.qwen3.modeling_qwen3", "transformers.models.qwen2.modeling_qwen2",
           "transformers.models.llama.modeling_llama", "safetensors.torch", "tokenizers")
PACKAGES = ("megatron_renio", "checkpoints_conversion")

# Variables read when a command runs (not at import), which a request may set differently: the
# trainer's fault injection, a launcher's, and the name of the running test that pytest sets.
RUNTIME_ENV = ("MEGATRON_RENIO_FAULT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "PYTEST_CURRENT_TEST")


def _preload() -> None:
    """Import PRELOAD and every module of PACKAGES that is not a command (no ``__main__`` block), so
    that a command run with ``-m`` is not already imported (as in a fresh interpreter), unless a
    module it does not run imports it."""
    import importlib
    import pkgutil

    for name in PRELOAD:
        importlib.import_module(name)
    for package in PACKAGES:
        for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
            spec = importlib.util.find_spec(info.name)
            source = Path(spec.origin).read_text() if spec and spec.origin and spec.origin.endswith(".py") else ""
            if '__name__ == "__main__"' not in source:
                importlib.import_module(info.name)


def _single_threaded() -> bool:
    try:
        tasks = len(os.listdir("/proc/self/task"))
    except OSError:
        tasks = 1
    return threading.active_count() == 1 and tasks == 1


def _main_of(args: list[str]):
    """(sys.argv, sys.path[0], a function running the command's __main__) for python's argument forms."""
    if args[0] == "-m":
        module = args[1]
        return [module, *args[2:]], os.getcwd(), lambda: runpy.run_module(module, run_name="__main__", alter_sys=True)
    if args[0] == "-c":
        code = args[1]

        def run_code():
            main = types.ModuleType("__main__")
            sys.modules["__main__"] = main
            exec(compile(code, "<string>", "exec"), main.__dict__)

        return ["-c", *args[2:]], "", run_code
    script = os.path.abspath(args[0])
    return list(args), os.path.dirname(script), lambda: runpy.run_path(script, run_name="__main__")


_REPLIES_FD = 1  # the server's reply channel (serve() moves it off fd 1)


def _child(request: dict) -> None:
    """Become the command: never returns."""
    code = 1
    try:
        os.close(_REPLIES_FD)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY),
                                (2, request["stderr"], os.O_WRONLY)):
            opened = os.open(path, flags)
            os.dup2(opened, fd)
            os.close(opened)
        sys.stdin = open(os.devnull)  # not the server's stdin object, whose buffer may hold requests
        # runpy's warning about a module already imported (by a preloaded module) before it runs as __main__
        warnings.filterwarnings("ignore", message=".* found in sys.modules after import of package",
                                category=RuntimeWarning)
        argv, path0, run = _main_of(request["args"])
        sys.argv = argv
        sys.path[0] = path0
        try:
            run()
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:  # sys.exit("message"): the message on stderr, status 1
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:  # as the interpreter does: the traceback on stderr, status 1
            import traceback

            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code & 0xFF)


def _wait(pid: int, timeout: float):
    """The child's exit status as subprocess reports it, or None after killing it at ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def serve() -> None:
    global _REPLIES_FD
    _REPLIES_FD = os.dup(1)
    replies = os.fdopen(_REPLIES_FD, "w")
    os.dup2(2, 1)  # what an import prints goes to stderr, not into the replies
    _preload()
    ready = _single_threaded()
    print(json.dumps({"ready": ready}), file=replies, flush=True)
    if not ready:
        return
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()  # nothing buffered by an import may reach a child's output
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        returncode = _wait(pid, request["timeout"])
        reply = {"timeout": True} if returncode is None else {"returncode": returncode}
        print(json.dumps(reply), file=replies, flush=True)


class _Server:
    """The running server of this test session, and the environment it was started with."""

    def __init__(self, env: dict):
        self.env = env
        # stderr: the import warnings of the libraries (a command's child prints them in a fresh interpreter)
        self.proc = subprocess.Popen([sys.executable, __file__], env=env, cwd=Path(__file__).parents[1],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        self.ready = json.loads(self.proc.stdout.readline() or '{"ready": false}')["ready"]
        if not self.ready:
            warnings.warn("the tests' python fork server did not start: commands run in fresh interpreters")
        atexit.register(self.close)

    def is_up(self) -> bool:
        return self.ready and self.proc.poll() is None

    def close(self) -> None:
        atexit.unregister(self.close)
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)

    def serves(self, env: dict) -> bool:
        """Whether a command with ``env`` may be forked here: the environments differ only in
        :data:`RUNTIME_ENV`."""
        differ = {k for k in self.env.keys() | env.keys() if self.env.get(k) != env.get(k)}
        return differ <= set(RUNTIME_ENV)

    def run(self, args: list[str], env: dict, cwd, timeout: float) -> tuple[int | None, str, str]:
        """(exit status or None at the timeout, stdout, stderr) of one command."""
        with tempfile.TemporaryDirectory(prefix="forkserver_") as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            out.touch()
            err.touch()
            request = {"args": args, "env": env, "cwd": str(cwd), "stdout": str(out), "stderr": str(err),
                       "timeout": timeout}
            try:
                self.proc.stdin.write(json.dumps(request) + "\n")
                self.proc.stdin.flush()
                line = self.proc.stdout.readline()
            except BrokenPipeError:
                line = ""
            if not line:
                raise RuntimeError(f"the tests' fork server ended (exit status {self.proc.wait()}) while running {args}")
            reply = json.loads(line)
            read = (p.read_text(errors="replace") for p in (out, err))
            return (None if reply.get("timeout") else reply["returncode"]), *read


_SERVER: _Server | None = None


def run_python(args: list, env: dict | None = None, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True,
    timeout=timeout)`` (default ``env``: ``subprocess_env()``; ``cwd``: the repository root), forked
    from a server started with ``env`` (less :data:`RUNTIME_ENV`). ``MEGATRON_RENIO_TESTS_FRESH_PYTHON=1``
    runs every command in a fresh interpreter instead, as does a server that could not start."""
    from tests.torchrun_harness import REPO_ROOT, subprocess_env

    global _SERVER
    args = [str(a) for a in args]
    env = subprocess_env() if env is None else env
    cwd = REPO_ROOT if cwd is None else cwd
    if os.environ.get("MEGATRON_RENIO_TESTS_FRESH_PYTHON") != "1":
        if _SERVER is None or not _SERVER.serves(env) or (_SERVER.ready and not _SERVER.is_up()):
            if _SERVER is not None:
                _SERVER.close()
            _SERVER = _Server({k: v for k, v in env.items() if k not in RUNTIME_ENV})
        if _SERVER.is_up():
            returncode, stdout, stderr = _SERVER.run(args, env, cwd, timeout)
            if returncode is None:
                raise subprocess.TimeoutExpired([sys.executable, *args], timeout, stdout, stderr)
            return subprocess.CompletedProcess([sys.executable, *args], returncode, stdout, stderr)
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


if __name__ == "__main__":
    serve()
