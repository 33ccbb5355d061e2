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
