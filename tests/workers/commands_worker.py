"""Run several model commands (``eval``, ``score``) in ONE torchrun launch: a launch costs seconds,
a command on the tiny test models a fraction of that.

Usage: ``commands_worker.py OUT_DIR JOBS.json`` where JOBS.json is a list of ``[module, argv]``
(``module``: ``megatron_renio.eval.runner`` or ``megatron_renio.eval.score``). Each job runs through
the command's own ``parse_args`` and ``run`` (the process groups stay up between jobs; only the
model-parallel layout is rebuilt); each rank saves the list of what ``run`` returned.
"""

import importlib
import json
import sys
from pathlib import Path

from megatron_renio import distributed
from tests.torchrun_harness import save_rank_result

if __name__ == "__main__":
    out_dir, jobs = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    results = []
    for module_name, argv in jobs:
        module = importlib.import_module(module_name)
        results.append(module.run(module.parse_args(argv)))
    distributed.destroy()
    save_rank_result(out_dir, results)
