"""tools/bench_loss.py refuses flags it cannot honour with one line (argparse's ``error:``), before it
starts a process group or touches a device."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "bench_loss.py"


def bench_loss():
    spec = importlib.util.spec_from_file_location("bench_loss", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, expected", [
    (["--tp", "2"], "--tp 2 needs torchrun --nproc-per-node 2 (got 1 processes)"),
    (["--device", "cuda"], "--device cuda: no CUDA device is available to torch here"),
    (["--shard-proxy", "3", "--vocab", "100"], "--shard-proxy 3 must be a positive divisor of --vocab 100"),
])
def test_flags_it_cannot_honour_are_one_line(argv, expected, monkeypatch, capsys):
    if argv[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        bench_loss().main(argv)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith(f": error: {expected}")  # after the program name, which argparse takes from argv[0]


def test_a_failing_comparison_is_dropped_with_one_line_and_the_others_stay():
    """Liger-Kernel's JSD is an optional third-party comparison: its failure (not running out of memory,
    which the measurement reports) must not end the benchmark before the project's own rows."""
    module = bench_loss()

    def liger():
        raise RuntimeError("triton compilation failed\nlong details")

    def out_of_memory():
        raise torch.OutOfMemoryError("no memory")

    steps = {"fused": lambda: None, "liger(+lsm)": liger}
    assert module._drop_if_failing(steps, "liger(+lsm)") == "failed: RuntimeError: triton compilation failed"
    assert list(steps) == ["fused"]
    assert module._drop_if_failing(steps, "liger(+lsm)") is None  # absent: nothing to run
    steps["liger(+lsm)"] = out_of_memory
    assert module._drop_if_failing(steps, "liger(+lsm)") is None and "liger(+lsm)" in steps


def test_the_forward_alone_is_not_compared_with_the_references_forward_and_backward(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    bench_loss().main(["--tokens", "32", "--vocab", "256", "--iters", "1", "--split", "--kinds", "forward_kl"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.split() and line.split()[0] in ("fused", "fused(forward)")}
    assert rows["fused"][3].endswith("x") and rows["fused"][5].endswith("x")  # time_ms x_time extra_MiB x_mem
    assert rows["fused(forward)"][3] == rows["fused(forward)"][5] == "-"
