"""torchrun worker (2 ranks, gloo): the ReNIO core with the 2-rank group as TP, then as DP, in one launch.

argv: out_dir inputs_path (the input sets of tests/renio_cases.py, saved by the test). Each rank
saves {"tp": ..., "dp": ...}; tests/test_renio_parallel.py compares them with the reference.
"""

import sys

import torch
import torch.distributed as dist

from megatron_renio.losses.distillation import reduce_stats
from megatron_renio.renio.weights import ReNIONormalizer
from tests import renio_cases as rc
from tests.torchrun_harness import save_rank_result


def tp_results(inputs, group):
    """Every matrix case, non-finite flags and an all-masked batch with the group as TP."""
    out = {case.id: rc.run_library(case, inputs[case.inputs], group) for case in rc.matrix()}
    mb = inputs["v64"][1]
    poisoned = {
        "nan_student_rank1": ("student", (1, 2, 40), float("nan")),
        "inf_teacher_rank0": ("teacher", (0, 0, 3), float("inf")),
        "nan_student_padding": ("student", (1, 2, 60), float("nan")),
        "clean": None,
    }
    out["nonfinite"] = {}
    for name, poison in poisoned.items():
        bad = dict(mb, student=mb["student"].clone(), teacher=mb["teacher"].clone())
        if poison is not None:
            bad[poison[0]][poison[1]] = poison[2]
        (result,) = rc.run_library(rc.Case("v64"), [bad], group)
        out["nonfinite"][name] = bool(result["nonfinite"])
    empty = dict(mb, mask=torch.zeros_like(mb["mask"]))
    out["all_masked"] = {
        case.id: rc.run_library(case, [empty], group)[0]
        for case in (rc.Case("v64", "divergence", "jsd", 0.3), rc.Case("v64", "sampled_rkl", renio="off"),
                     rc.Case("v64", "divergence", top_k=5, renio="ema", scope="global"))
    }
    return out


def dp_results(inputs, group):
    """Every DP case: per step, this rank's two micro-batches, its statistics and the EMA afterwards."""
    rank = dist.get_rank(group)
    out = {}
    for case in rc.dp_matrix():
        normalizer, steps = ReNIONormalizer(), []
        for step in rc.DP_STEPS:
            outputs = rc.run_library(case, inputs[step][2 * rank: 2 * rank + 2], None, normalizer, keep_terms=True)
            stats = reduce_stats([o.pop("loss_terms") for o in outputs], group)
            normalizer.end_step(case.renio_config(), group)
            steps.append(dict(outputs=outputs, stats=stats, ema=normalizer.ema.clone()))
        out[case.id] = steps
    return out


def main(out_dir, inputs_path):
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    group = dist.new_group([0, 1])
    inputs = torch.load(inputs_path)
    result = {"tp": tp_results(inputs, group), "dp": dp_results(inputs, group)}
    save_rank_result(out_dir, result)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
