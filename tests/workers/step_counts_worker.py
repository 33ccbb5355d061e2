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
    save_rank_result(out_dir, counts)
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
