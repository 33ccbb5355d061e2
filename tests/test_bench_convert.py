"""tools/bench_convert.py measures the conversion process's own peak memory, not the benchmark's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import psutil

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "bench_convert.py"


def test_a_small_process_peak_is_its_own_not_the_parents(tmp_path):
    """A child inherits its parent's peak in ru_maxrss (at fork, kept across exec): this process (torch and
    the test suite loaded) is far larger than ``python -m json.tool``, whose measured peak must stay its own."""
    spec = importlib.util.spec_from_file_location("bench_convert", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "in.json").write_text('{"a": 1}')
    ours = psutil.Process().memory_info().rss
    peak, sampled, _ = module.measure("json.tool", str(tmp_path / "in.json"), str(tmp_path / "out.json"))
    assert (tmp_path / "out.json").read_text().strip().startswith("{")
    assert 0 < peak < 100e6 < ours, (peak, sampled, ours)
    assert sampled <= peak
