"""TP=2 and DP=2 tests of the ReNIO core (2 gloo processes, ONE torchrun launch shared by the module).

TP: the 2-rank group holds vocabulary shards; losses, weights and the concatenated shard gradients
must equal the reference on the full vocabulary, and replicated values must agree across ranks.
DP: the same group as data parallelism with two micro-batches per rank and two steps; global scope
must equal one batch of all samples (reference), with a binding cap the documented approximation,
and local scope the reference per micro-batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import reference_renio as ref
from tests import renio_cases as rc
from tests.torchrun_harness import run_torchrun

WORKER = Path(__file__).parent / "workers" / "renio_tp_worker.py"
CASES = rc.matrix()
DP_CASES = rc.dp_matrix()
GLOBAL_EXACT = [c for c in DP_CASES if c.scope == "global" and c.renio not in ("batch_mean", "ema")]
GLOBAL_CAPPED = [c for c in DP_CASES if c.scope == "global" and c.renio in ("batch_mean", "ema")]
LOCAL = [c for c in DP_CASES if c.scope == "local"]
REPLICATED = ("loss", "weights", "per_sample", "raw_weights", "s", "u", "divergence", "nonfinite")


@pytest.fixture(scope="module")
def inputs():
    return rc.make_input_sets()


@pytest.fixture(scope="module")
def ranks(inputs, tmp_path_factory):
    work = tmp_path_factory.mktemp("renio_parallel")
    torch.save(inputs, work / "inputs.pt")
    return run_torchrun(WORKER, 2, work / "out", work / "inputs.pt", timeout=300)


def _ids(cases):
    return [c.id for c in cases]


# ------------------------------------------------------------------------------------------------
# TP = 2
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_tp2_matches_reference(case, inputs, ranks):
    per_rank = [r["tp"][case.id] for r in ranks]
    assert [mb["tp_rank"] for mb in per_rank[1]] == [1, 1]
    for mb0, mb1 in zip(*per_rank):
        for key in REPLICATED:
            assert torch.equal(torch.as_tensor(mb0[key]), torch.as_tensor(mb1[key])), f"TP ranks disagree on {key}"
    library = [dict(mb0, grad=torch.cat([mb0["grad"], mb1["grad"]], dim=-1)) for mb0, mb1 in zip(*per_rank)]
    micro_batches = inputs[case.inputs]
    rc.compare(library, rc.run_reference(case, micro_batches), micro_batches)


def test_tp2_nonfinite_flag_on_every_rank(ranks):
    for r in ranks:
        flags = r["tp"]["nonfinite"]
        assert flags == {"nan_student_rank1": True, "inf_teacher_rank0": True, "nan_student_padding": False, "clean": False}


def test_tp2_all_masked_batch(ranks):
    for r in ranks:
        for case_id, out in r["tp"]["all_masked"].items():
            assert out["loss"].item() == 0.0, case_id
            assert (out["raw_weights"] == 1).all() and (out["per_sample"] == 0).all(), case_id
            assert torch.isfinite(out["weights"]).all() and torch.isfinite(out["denominator"]), case_id
            assert (out["grad"] == 0).all(), case_id


# ------------------------------------------------------------------------------------------------
# DP = 2
# ------------------------------------------------------------------------------------------------


def _concat(micro_batches):
    return {key: torch.cat([mb[key] for mb in micro_batches]) for key in micro_batches[0]}


def _step(ranks, case, k):
    """Library outputs of step k over both ranks in global micro-batch order, and the step's sums."""
    outputs = [mb for r in ranks for mb in r["dp"][case.id][k]["outputs"]]
    denominator = sum(o["denominator"].double() for o in outputs)
    num_samples = sum(o["weights"].numel() for o in outputs)
    loss = sum(o["loss"].double() for o in outputs) / denominator
    grad = torch.cat([o["grad"] for o in outputs]).double() / denominator
    weights = torch.cat([o["weights"].double() * (1 if case.renio in ("off", "none") else num_samples / denominator)
                         for o in outputs])
    return outputs, loss, grad, weights


def _reference_stats(reference, micro_batch, case):
    cfg = case.renio_config()
    valid = micro_batch["mask"]
    r = torch.clamp(reference["s"] - reference["u"], max=cfg.clip)[valid]
    nonempty = valid.any(dim=-1)
    w = reference["weights"]
    return {
        "weight_mean": w.mean().item(), "weight_min": w.min().item(), "weight_max": w.max().item(),
        "weight_std": w.std(unbiased=False).item(), "pivotal_fraction": (r >= cfg.threshold).double().mean().item(),
        "log_ratio_mean": r.mean().item(), "sample_loss_mean": reference["per_sample"][nonempty].mean().item(),
        "num_samples": float(valid.shape[0]), "num_valid_tokens": float(valid.sum()), "nonfinite": 0.0,
    }


@pytest.mark.parametrize("case", GLOBAL_EXACT, ids=_ids(GLOBAL_EXACT))
def test_dp2_global_equals_one_batch_of_all_samples(case, inputs, ranks):
    steps = [_concat(inputs[step]) for step in rc.DP_STEPS]
    reference = rc.run_reference(case, steps)
    for k, (want, batch) in enumerate(zip(reference, steps)):
        outputs, loss, grad, weights = _step(ranks, case, k)
        rc.assert_close(loss, want["loss"], f"step {k} loss")
        rc.assert_close(grad, want["grad"], f"step {k} gradient")
        rc.assert_close(weights, want["weights"], f"step {k} effective weights")
        rc.assert_close(torch.cat([o["per_sample"] for o in outputs]), want["per_sample"], f"step {k} per-sample loss")
        assert (want["weights"] < 100).all(), "the no-cap presets must not bind"
        stats = [r["dp"][case.id][k]["stats"] for r in ranks]
        assert stats[0] == stats[1], "reduce_stats differs between DP ranks"
        expected = dict(_reference_stats(want, batch, case), loss=want["loss"].item())
        for key, value in expected.items():
            assert stats[0][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    if case.renio == "ema_nocap":
        alpha = case.renio_config().ema_alpha
        means = [want["raw_weights"].mean().item() for want in reference]
        for k, ema in enumerate([means[0], (1 - alpha) * means[0] + alpha * means[1]]):
            assert ranks[0]["dp"][case.id][k]["ema"] == ranks[1]["dp"][case.id][k]["ema"]
            assert ranks[0]["dp"][case.id][k]["ema"].item() == pytest.approx(ema, rel=1e-6)


@pytest.mark.parametrize("case", GLOBAL_CAPPED, ids=_ids(GLOBAL_CAPPED))
def test_dp2_global_cap_is_the_documented_approximation(case, inputs, ranks):
    """w~_i = min(w_i, M e_mb) with the micro-batch divisor e_mb, loss = sum w~ L / sum_mb b e_mb."""
    cfg = case.renio_config()
    ema, binds = None, False
    for k, step in enumerate(rc.DP_STEPS):
        leaves = [mb["student"].double().requires_grad_(True) for mb in inputs[step]]
        refs = [
            ref.micro_batch(leaf, mb["teacher"], mb["tokens"], mb["mask"], rc.TRUE_VOCAB, kind=case.kind, beta=case.beta,
                            temperature=rc.TEMPERATURE, token_clip=case.token_clip, top_k=case.top_k,
                            loss_kind=case.loss_kind, renio=None, normaliser=None)
            for leaf, mb in zip(leaves, inputs[step])
        ]
        raw = [out["raw_weights"] for out in refs]
        divisors = [w.mean() if ema is None else (1 - cfg.ema_alpha) * ema + cfg.ema_alpha * w.mean() for w in raw]
        capped = [torch.minimum(w, cfg.max_weight * e) for w, e in zip(raw, divisors)]
        binds |= any(bool((w > cfg.max_weight * e).any()) for w, e in zip(raw, divisors))
        denominator = sum(len(w) * e for w, e in zip(raw, divisors))
        loss = sum((c * out["per_sample"]).sum() for c, out in zip(capped, refs)) / denominator
        grad = torch.cat(torch.autograd.grad(loss, leaves))
        if cfg.norm == "ema":
            step_mean = torch.cat(raw).mean()
            ema = step_mean if ema is None else (1 - cfg.ema_alpha) * ema + cfg.ema_alpha * step_mean
        _, lib_loss, lib_grad, lib_weights = _step(ranks, case, k)
        rc.assert_close(lib_loss, loss.detach(), f"step {k} loss")
        rc.assert_close(lib_grad, grad, f"step {k} gradient")
        rc.assert_close(lib_weights, torch.cat(capped) * len(lib_weights) / denominator, f"step {k} effective weights")
    assert binds, "the cap must bind for this test to mean anything"


@pytest.mark.parametrize("case", LOCAL, ids=_ids(LOCAL))
def test_dp2_local_equals_reference_per_micro_batch(case, inputs, ranks):
    for rank, r in enumerate(ranks):
        micro_batches = [mb for step in rc.DP_STEPS for mb in inputs[step][2 * rank: 2 * rank + 2]]
        library = [mb for k in range(len(rc.DP_STEPS)) for mb in r["dp"][case.id][k]["outputs"]]
        reference = rc.run_reference(case, micro_batches)
        rc.compare(library, reference, micro_batches)
        for k in range(len(rc.DP_STEPS)):
            step_losses = [mb["loss"] for other in ranks for mb in other["dp"][case.id][k]["outputs"]]
            assert r["dp"][case.id][k]["stats"]["loss"] == pytest.approx(torch.stack(step_losses).mean().item(), rel=1e-6)
