"""Kill -9 and resume: every later step equals an uninterrupted run, bitwise on CPU.

All ranks of a 2-process run die with SIGKILL at a chosen point (``MEGATRON_RENIO_FAULT``); a fresh
launch with ``--load`` resumes from the latest *complete* checkpoint. A checkpoint interrupted while
being written is never the one loaded. The rollout and backward cases are marked slow (the
checkpoint case, which covers the most, runs in CI).
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.torchrun_harness import REPO_ROOT, read_jsonl, subprocess_env, torchrun_args
from tests.test_train import base_args, train, workdir  # noqa: F401  (fixture)


def _run_to_death(cmd, env, log_path, timeout):
    """Run a launch that is expected to fail; returns its exit status.

    Own session, output to a file: a SIGKILLed rank can orphan the helper process that
    dist_checkpointing's writer spawned (a multiprocessing manager), which would hold a captured
    pipe open; it is reaped with the process group.
    """
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _kill_then_resume(workdir, phase, iteration, tag):
    common = {"--train-iters": 4, "--teacher": "ema", "--ema-decay": 0.9, "--renio-scope": "global",
              "--rollout-temperature": 1.3}
    straight = workdir / "kill_straight.jsonl"  # one uninterrupted reference run for every case
    if not straight.exists():
        train(base_args(workdir, **common, **{"--metrics-file": straight}), nproc=2)
    save, log = workdir / f"{tag}_run", workdir / f"{tag}_resumed.jsonl"
    args = base_args(workdir, **common, **{"--save": save, "--save-interval": 1, "--metrics-file": log})
    env = dict(subprocess_env(), MEGATRON_RENIO_FAULT=f"{phase}:{iteration}")
    cmd = [sys.executable, *torchrun_args(2), "-m", "megatron_renio.train"] + [str(a) for a in args]
    assert _run_to_death(cmd, env, workdir / f"{tag}_killed.log", 600) != 0  # the run really died
    complete = iteration - 1
    marker = save / "latest_checkpointed_iteration.txt"
    assert marker.read_text() == str(complete)
    assert not (save / f"iter_{iteration:07d}").exists()
    train(args + ["--load", save], nproc=2)
    a = {m["step"]: m for m in read_jsonl(straight)}
    b = read_jsonl(log)
    # the killed run may have logged a step it did not save: the resumed run drops it and logs it again
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for m in b:
        x = a[m["step"]]
        assert (m["loss"], m["grad_norm"], m["completion_length_mean"]) == (x["loss"], x["grad_norm"], x["completion_length_mean"])
    assert os.path.exists(save / "iter_0000004")


def test_killed_while_writing_a_checkpoint(workdir):
    _kill_then_resume(workdir, "checkpoint", 3, "kill_ckpt")


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["rollout", "backward"])
def test_killed_during_a_step(workdir, phase):
    _kill_then_resume(workdir, phase, 3, f"kill_{phase}")


def test_a_dead_rank_ends_the_job_with_the_rank_named(workdir):
    """Rank 1 dies mid-step: the job ends within a bounded time (no hang), and the launcher's report
    names the failed rank."""
    args = base_args(workdir, **{"--train-iters": 4, "--distributed-timeout-minutes": 1})
    cmd = [sys.executable, *torchrun_args(2), "-m", "megatron_renio.train"] + [str(a) for a in args]
    env = dict(subprocess_env(), MEGATRON_RENIO_FAULT="backward:2:1")
    started = time.time()
    returncode = _run_to_death(cmd, env, workdir / "dead_rank.log", 240)
    log = (workdir / "dead_rank.log").read_text()
    assert returncode != 0 and time.time() - started < 240
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", log) and "SIGKILL" in log
