"""Run several model commands (``eval``, ``score``) in ONE torchrun launch: a launch costs seconds,
a command on the tiny test models a fraction of that.

Usage: ``commands_worker.py OUT_DIR JOBS.json`` where JOBS.json is a list of ``[module, argv]``
(``module``: ``megatron_renio.eval.runner`` or ``megatron_renio.eval.score``). Each job runs through
the command's own ``parse_args`` and ``run`` (the process groups stay up between jobs; only the
model-parallel layout is rebuilt); each rank saves a dict: ``returns``, the list of what ``run``
returned; per job, ``gathers``, what :func:`record_gathers` saw of its gather on rank 0, and
``loads``, the ``fully_parallel`` argument of each ``load_model_checkpoint`` call.

This module also holds what the tests of ``gather_to_rank0`` share: :func:`record_gathers` and
:func:`check_gather`.
"""

import importlib
import inspect
import json
import sys
from pathlib import Path

# The object collectives and point-to-point calls a gather to rank 0 may make, and the argument that
# names the other side (global ranks).
_CALLS = {"gather_object": "dst", "send_object_list": "dst", "recv_object_list": "src"}


def record_gathers(log: list) -> None:
    """Wrap ``gather_to_rank0`` (under both names: eval's module and score's import of it) so that
    each call appends to ``log`` a dict: this rank's ``rank``, ``tp``, ``pp``, ``pp_size``, how many
    ``items`` it gave, what it ``returned``, and ``calls``: each object collective or point-to-point
    call it made, as ``(name, ranks of the group, dst or src)``."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_renio.eval import runner, score

    inside: list[dict] = []

    def watched(name, real):
        signature = inspect.signature(real)

        def call(*args, **kwargs):
            if inside:
                bound = signature.bind(*args, **kwargs).arguments
                group = bound.get("group")
                ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
                inside[-1]["calls"].append((name, ranks, bound.get(_CALLS[name])))
            return real(*args, **kwargs)

        return call

    for name in _CALLS:
        setattr(dist, name, watched(name, getattr(dist, name)))
    real_gather = runner.gather_to_rank0

    def gather(items, *args, **kwargs):
        entry = {"rank": dist.get_rank(), "tp": parallel_state.get_tensor_model_parallel_rank(),
                 "pp": parallel_state.get_pipeline_model_parallel_rank(),
                 "pp_size": parallel_state.get_pipeline_model_parallel_world_size(), "items": len(items), "calls": []}
        inside.append(entry)
        try:
            entry["returned"] = real_gather(items, *args, **kwargs)
        finally:
            inside.pop()
        log.append(entry)
        return entry["returned"]

    runner.gather_to_rank0 = score.gather_to_rank0 = gather


def check_gather(entries: list[dict], stage: str) -> None:
    """One gather to rank 0 (``entries``: :func:`record_gathers`'s entry of every rank, in rank order)
    took only the ranks that hold results: the first TP rank of pipeline stage ``stage`` ('first' or
    'last') of every replica. No other rank had items or made a call, except rank 0 receiving the
    whole list from the first holder when it is not one; the holders gathered over a group of exactly
    themselves onto the first of them (no gather when there is one); rank 0 returned every item."""
    holders = [e["rank"] for e in entries if e["tp"] == 0 and e["pp"] == (0 if stage == "first" else e["pp_size"] - 1)]
    first = holders[0]
    for e in entries:
        if e["rank"] not in holders:
            assert e["items"] == 0, e
            expected = [("recv_object_list", list(range(len(entries))), first)] if e["rank"] == 0 else []
            assert e["calls"] == expected, (e["rank"], e["calls"], holders)
            continue
        expected = [("gather_object", holders, first)] if len(holders) > 1 else []
        if e["rank"] == first and first != 0:
            expected.append(("send_object_list", list(range(len(entries))), 0))
        assert e["calls"] == expected, (e["rank"], e["calls"], holders)
    for e in entries:
        if e["rank"] == 0:
            assert e["returned"] is not None and len(e["returned"]) == sum(entries[h]["items"] for h in holders), e
        else:
            assert e["returned"] is None, e


if __name__ == "__main__":
    from megatron_renio import distributed
    from megatron_renio.models import checkpoint
    from tests.torchrun_harness import save_rank_result

    out_dir, jobs = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    gathers, loads = [], []
    record_gathers(gathers)
    real_load = checkpoint.load_model_checkpoint

    def load(model, directory, fully_parallel=False):
        loads[-1].append(fully_parallel)
        return real_load(model, directory, fully_parallel)

    checkpoint.load_model_checkpoint = load  # eval and score import it from the module at each call
    results = []
    for module_name, argv in jobs:
        module = importlib.import_module(module_name)
        loads.append([])
        results.append(module.run(module.parse_args(argv)))
    distributed.destroy()
    save_rank_result(out_dir, {"returns": results, "gathers": gathers, "loads": loads})
