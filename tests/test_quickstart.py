"""The quickstart (`megatron-renio quickstart --quick`) end to end, through the real console entry.

One run (module fixture) of the smoke-test sizes; the checks read its output folder.
"""

import json

import pytest

from megatron_renio.quickstart import METHODS, format_table
from tests.python_forkserver import run_python
from tests.torchrun_harness import subprocess_env


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "out"
    env = subprocess_env() | dict(MASTER_ADDR="10.255.255.1", WORLD_SIZE="2")  # a shell's launcher variables change nothing
    proc = run_python(["-m", "megatron_renio.cli", "quickstart", "--quick", "--out", out], env=env, timeout=900)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
    return out, proc.stdout, json.loads((out / "summary.json").read_text())


def test_outputs_exist_and_are_well_formed(quick):
    out, stdout, summary = quick
    assert summary["settings"]["quick"] is True
    for name in ("accuracy.png", "weights.png", "weight_vs_correctness.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert summary["plots"] == ["accuracy.png", "weights.png", "weight_vs_correctness.png"]
    for role in ("teacher", "student"):
        assert 0.0 <= summary[role]["accuracy"] <= 1.0 and summary[role]["mean_length"] > 0
        assert (out / "models" / role / "renio_model.json").is_file()
    assert format_table(summary) in stdout  # the printed table is the summary's


def test_teacher_beats_the_initial_student(quick):
    _, _, summary = quick
    assert summary["teacher"]["accuracy"] > summary["student"]["accuracy"]


def test_every_method_completes(quick):
    out, _, summary = quick
    plan = summary["settings"]["plan"]
    assert list(summary["methods"]) == [m.name for m in METHODS]
    for name, result in summary["methods"].items():
        steps = [point["step"] for point in result["curve"]]
        assert steps[0] == 0 and steps[-1] == plan["distill_iters"], (name, steps)
        assert result["curve"][0]["accuracy"] == summary["student"]["accuracy"]
        assert all(0.0 <= p["accuracy"] <= 1.0 for p in result["curve"])
        assert len(result["train_accuracy"]) == plan["distill_iters"] and result["time_s"] > 0
        metrics = (out / "runs" / name / "metrics.jsonl").read_text().splitlines()
        assert len(metrics) == plan["distill_iters"]
        samples = (out / "runs" / name / "samples_rank0.jsonl").read_text().splitlines()
        assert {"completion", "correct", "weight", "raw_weight", "num_tokens"} <= set(json.loads(samples[0]))


def test_incorrect_completions_get_higher_renio_weights(quick):
    _, _, summary = quick
    for m in METHODS:
        w = summary["methods"][m.name]["weights"]
        assert w["n_correct"] > 0 and w["n_incorrect"] > 0, (m.name, w)
        if m.renio:
            assert w["mean_weight_incorrect"] > w["mean_weight_correct"], (m.name, w)


@pytest.mark.parametrize("argv, message", [(["--seed", "-1"], "--seed must be an integer in [0, 4294967295], got -1"),
                                           (["--tp", "3"], "argument --tp: invalid choice: 3 (choose from 1, 2)"),
                                           (["--bogus"], "unrecognized arguments: --bogus"),
                                           (["--out", ""], "argument --out: must be a path, got '' (an unset shell "
                                                           "variable?)")])
def test_bad_flags_are_one_line_before_anything_runs(argv, message, tmp_path, capsys):
    """A bad seed used to start the run and end in torchrun's traceback, its message only in a log file."""
    from megatron_renio.quickstart import main

    assert main(argv + ["--out", str(tmp_path / "qs")]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "qs").exists()


class _Bar:
    def __init__(self):
        self.n, self.postfix = 0, None

    def set_postfix(self, refresh=False, **values):
        self.postfix = values

    def update(self, steps):
        self.n += steps


def test_the_progress_bar_shows_a_skipped_step(tmp_path):
    """A step whose loss was not finite is logged as null; the bar's loss format ended the quickstart."""
    from megatron_renio.quickstart import _follow

    metrics, bar = tmp_path / "metrics.jsonl", _Bar()
    metrics.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": null}\n{"step": 3, "lo')
    _follow(bar, metrics)
    assert bar.n == 2 and bar.postfix == {"loss": "skipped"}
    metrics.write_text('{"step": 1, "loss": 0.123456}\n')
    _follow(bar, metrics)
    assert bar.postfix == {"loss": "0.1235"}


SLEEPER = """
import os, sys, time
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(600)
"""


def test_a_failing_quickstart_stops_the_launch_it_started(tmp_path, monkeypatch):
    """Whatever ends the quickstart while a launch runs (here its progress bar) also ends that launch,
    instead of leaving torchrun's worker training on."""
    import os
    import time

    from megatron_renio import quickstart

    (tmp_path / "renio_test_sleeper.py").write_text(SLEEPER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    pid_file = tmp_path / "worker.pid"

    def failing_follow(bar, metrics_file):
        if pid_file.is_file() and pid_file.read_text():
            raise RuntimeError("the bar failed")

    monkeypatch.setattr(quickstart, "_follow", failing_follow)
    launcher = quickstart.Launcher(1, tmp_path)
    with pytest.raises(RuntimeError, match="the bar failed"):
        launcher.run("sleeper", "renio_test_sleeper", [str(pid_file)], tmp_path / "metrics.jsonl", 1)
    worker = int(pid_file.read_text())
    for _ in range(100):  # torchrun forwards the SIGTERM to its worker
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(worker, 9)
        raise AssertionError("the launch's worker outlived the quickstart")
