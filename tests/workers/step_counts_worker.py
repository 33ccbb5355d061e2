"""torchrun worker (2 ranks, DP=2): the trainer's per-step counts over the data-parallel replicas."""

import sys

import torch

from megatron_renio import distributed
from megatron_renio.distributed import ParallelConfig
from megatron_renio.train import _step_counts
from tests.torchrun_harness import save_rank_result

EOS = [2]


def main(out_dir):
    ctx = distributed.initialize(ParallelConfig(), seed=0)
    if ctx.dp_rank == 0:  # two end with EOS (one right at its limit), one is cut at its own limit of 3, one is neither
        completions, limits, seconds = [[5, 2], [5, 6, 7], [5], [5, 6, 2]], [8, 3, 8, 3], 1.5
    else:  # cut at --max-new-tokens 8
        completions, limits, seconds = [[9] * 8], [8], 4.0
    counts = _step_counts(completions, EOS, limits, generated=sum(map(len, completions)), positions=10 * (ctx.dp_rank + 1),
                          flops=100.0 * (ctx.dp_rank + 1), rollout_seconds=seconds, device=torch.device("cpu"))
    # gradients_are_finite sums the float32 squares over every rank: 1.5e19 on each rank is finite alone
    # (2.25e38) and overflows together; a NaN on rank 1 alone is seen by every rank
    from types import SimpleNamespace
    from megatron_renio.training.components import gradients_are_finite

    def ddp(values):
        return SimpleNamespace(buffers=[SimpleNamespace(grad_data=torch.tensor(values, dtype=torch.float32))],
                               expert_parallel_buffers=[])

    counts["finite"] = [gradients_are_finite(ddp([1.0, 2.0])), gradients_are_finite(ddp([1.5e19])),
                        gradients_are_finite(ddp([float("nan") if ctx.rank == 1 else 1.0]))]
    save_rank_result(out_dir, counts)
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
