"""A student + teacher GPTModel step under TP=2 (with and without sequence parallelism), PP=2 and DP=2 equals
one process on the same batch; and (slow, 4 ranks) under the layouts that combine them: TP=2 x DP=2, PP=2 x
DP=2, TP=2 x PP=2 and DP=4.

Loss and student gradients (after Megatron DDP and finalize_model_grads) are compared with a
plain-PyTorch computation of DESIGN.md section 2 on the full batch; the teacher must stay bitwise
unchanged and out of the gradient buffers.
"""

import pytest

from tests.torchrun_harness import REPO_ROOT, run_torchrun
from tests.workers.paired_step_worker import CASES

LAYOUTS = ("tp2", "tp2-sp", "pp2", "dp2")  # tp2-sp: --sequence-parallel (the norms' gradients are summed over TP)
# DP=2 with each rank's micro-batches formed longest first (--micro-batch-order length): global scope only
# (under local scope the regrouping changes the loss; checked when this was written: jsd_renio_local moves by 1e-3)
GLOBAL_CASES = sorted(name for name, case in CASES.items() if case["scope"] == "global")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_torchrun(REPO_ROOT / "tests" / "workers" / "paired_step_worker.py", 2, tmp_path_factory.mktemp("paired"))[0]


@pytest.mark.parametrize("case, layout", [(case, layout) for case in sorted(CASES) for layout in LAYOUTS]
                         + [(case, "dp2-longest-first") for case in GLOBAL_CASES])
def test_loss_and_gradients_match_single_process(results, case, layout):
    assert_matches_single_process(results[(case, layout)], case)


def assert_matches_single_process(r: dict, case: str) -> None:
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5, abs=1e-7)
    assert r["grad_scale"] > 0
    if CASES[case]["renio"]:
        assert r["weight_spread"] > 0.05  # the ReNIO weights really differ between samples
    # fp32 through a whole backward pass with a different reduction order: 1e-7 absolute
    assert r["max_grad_err"] <= 1e-7 + 1e-5 * r["grad_scale"], r
    if CASES[case].get("norm") == "ema" and CASES[case]["scope"] == "global":
        # one EMA for every replica: the mean raw weight of all their samples, not of one replica's
        assert r["ema"] == pytest.approx((r["ref_ema"], r["ref_ema"]), rel=1e-5), r


@pytest.mark.parametrize("layout", LAYOUTS)
def test_teacher_is_frozen_and_outside_the_optimizer(results, layout):
    for case in CASES:
        assert results[(case, layout)]["teacher_unchanged"]
        assert results[(case, layout)]["only_student"]


# The same worker at 4 ranks: each layout's other ranks are data-parallel replicas, and TP=2 x PP=2 (about
# 2 minutes on 2 cores: out of CI, `pytest -m slow`).
FOUR_RANK_LAYOUTS = ("tp2", "tp2-sp", "pp2", "dp2", "tp2-pp2")


@pytest.fixture(scope="module")
def four_rank_results(tmp_path_factory):
    return run_torchrun(REPO_ROOT / "tests" / "workers" / "paired_step_worker.py", 4,
                        tmp_path_factory.mktemp("paired4"), timeout=1200)[0]


@pytest.mark.slow
@pytest.mark.parametrize("case, layout", [(case, layout) for case in sorted(CASES) for layout in FOUR_RANK_LAYOUTS])
def test_combined_layouts_match_single_process(four_rank_results, case, layout):
    r = four_rank_results[(case, layout)]
    assert_matches_single_process(r, case)
    assert r["teacher_unchanged"] and r["only_student"]
