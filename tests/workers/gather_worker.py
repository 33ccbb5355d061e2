"""``gather_to_rank0`` (megatron_renio/eval/runner.py) on 4 ranks, without a model.

Usage: ``gather_worker.py OUT_DIR``. For each layout TP x PP (2x1, 1x2, 2x2: DP = 4 / (TP x PP)) and
each holder stage ('first': eval's graders, 'last': score's reporters), the holders give items of
different sizes (rank r: r + 1 items naming r), the other ranks none, and ``gather_to_rank0`` runs
under :func:`tests.workers.commands_worker.record_gathers`; then the same items go through the
previous implementation, ``gather_object`` over the whole world onto rank 0, for comparison. Each
rank saves ``{"cases": [(tp, pp, stage), ...], "gathers": [entry per case], "world": [what the
world gather returned per case]}``.
"""

import sys

if __name__ == "__main__":
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_renio import distributed
    from megatron_renio.eval import runner
    from tests.torchrun_harness import save_rank_result
    from tests.workers.commands_worker import record_gathers

    world_gather = dist.gather_object  # before record_gathers wraps it: the reference is not recorded
    gathers, world, cases = [], [], []
    record_gathers(gathers)
    for tp, pp in ((2, 1), (1, 2), (2, 2)):
        distributed.initialize(distributed.ParallelConfig(tp, pp), timeout_minutes=2)
        rank = dist.get_rank()
        for stage in ("first", "last"):
            holder_stage = 0 if stage == "first" else pp - 1
            holder = (parallel_state.get_tensor_model_parallel_rank() == 0
                      and parallel_state.get_pipeline_model_parallel_rank() == holder_stage)
            items = [(rank, k, "x" * 100 * rank) for k in range(rank + 1)] if holder else []
            runner.gather_to_rank0(items, stage)
            parts = [None] * dist.get_world_size() if rank == 0 else None
            world_gather(items, parts, dst=0)
            world.append([item for part in parts for item in part] if rank == 0 else None)
            cases.append((tp, pp, stage))
    distributed.destroy()
    save_rank_result(sys.argv[1], {"cases": cases, "gathers": gathers, "world": world})
