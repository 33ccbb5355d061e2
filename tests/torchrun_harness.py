"""Launch a worker script under ``torchrun`` (gloo, CPU) and collect what each rank reported.

Multi-process tests group many checks into one launch, because a launch costs seconds on two
cores while a check costs milliseconds. A worker script receives an output directory as its first
argument; each rank writes ``rank{R}.pt`` (any torch-serialisable object) there through
:func:`save_rank_result`. :func:`run_torchrun` returns those objects in rank order, or fails the test
with the workers' output when the launch exits non-zero.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch

from tests.python_forkserver import run_python

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    """The environment of a child process: this checkout importable, one OpenMP thread, no GPU."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def read_jsonl(path) -> list:
    """Every JSON object of a JSONL file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def torchrun_args(nproc: int) -> list[str]:
    """Python's arguments for a one-node torchrun of ``nproc`` workers on a free local port; the script
    (or ``-m module``) and its arguments follow."""
    return ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}"]


def run_torchrun(script: str | Path, nproc: int, out_dir: str | Path, *args: str, timeout: float = 600):
    """Run ``torchrun --nproc-per-node nproc script out_dir *args``; return each rank's result."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = run_python([*torchrun_args(nproc), script, out_dir, *args], timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {Path(script).name} failed with exit code {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-12000:]}"
        )
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


def save_rank_result(out_dir: str | Path, result) -> None:
    """Called inside a worker: store this rank's result for :func:`run_torchrun`."""
    rank = int(os.environ.get("RANK", "0"))
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
