"""Single-process (TP=1, tp_group=None) tests of the ReNIO core and distillation losses against
the independent reference in tests/reference_renio.py."""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch

from megatron_renio.errors import UserInputError
from megatron_renio.losses.distillation import distillation_loss, reduce_stats
from megatron_renio.losses.divergence import DivergenceConfig, TokenTerms, divergence_elements, token_terms
from megatron_renio.renio.vocab_parallel import VocabShard, token_logprobs, vocab_parallel_log_softmax
from megatron_renio.renio.weights import ReNIOConfig, ReNIONormalizer, batch_mean_weight_bound, raw_weights
from tests import reference_renio as ref
from tests import renio_cases as rc

CASES = rc.matrix()


@pytest.fixture(scope="module")
def inputs():
    return rc.make_input_sets()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_reference(case, inputs):
    micro_batches = inputs[case.inputs]
    rc.compare(rc.run_library(case, micro_batches), rc.run_reference(case, micro_batches), micro_batches)


def test_inputs_exercise_every_branch(inputs):
    """The matrix cannot pass vacuously: element clamps, the log-ratio clip, the threshold, the
    batch_mean cap and both clamp bounds bind for some values and not for others; one sample has no
    valid token; invalid positions hold ids outside the real vocabulary."""
    for name in ("v64", "v128"):
        micro_batches = inputs[name]
        assert (~micro_batches[0]["mask"]).all(dim=-1).any(), "an all-masked sample"
        ratios_r, ratios, clamp_w = [], [], []
        for mb in micro_batches:
            assert ((mb["tokens"] >= rc.TRUE_VOCAB) | (mb["tokens"] < 0))[~mb["mask"]].all()
            q = torch.softmax(mb["student"][..., : rc.TRUE_VOCAB].double() / rc.TEMPERATURE, -1)
            p = torch.softmax(mb["teacher"][..., : rc.TRUE_VOCAB].double() / rc.TEMPERATURE, -1)
            for kind, beta in rc.DIVERGENCES:
                d = ref.divergence_elements(p, q, kind, beta)
                above = (d > rc.TOKEN_CLIP).double().mean()
                inside = ((d > 0) & (d < rc.TOKEN_CLIP)).double().mean()
                assert 0.01 < above < 0.9 and inside > 0.1, (kind, beta, above, inside)
                if kind != "jsd" or beta in (0.0, 1.0):
                    assert (d < 0).any(), "negative KL elements exercise the clamp at 0"
            s = ref.sampled_logprobs(mb["student"], mb["tokens"], mb["mask"], rc.TRUE_VOCAB, rc.TEMPERATURE)
            u = ref.sampled_logprobs(mb["teacher"], mb["tokens"], mb["mask"], rc.TRUE_VOCAB, rc.TEMPERATURE)
            ratios_r.append((s - u)[mb["mask"]])
            w = ref.renio_weights(s, u, mb["mask"], 2.5, 0.8, 1.0)
            ratios.append(w / w.mean())
            clamp_w.append(ref.renio_weights(s, u, mb["mask"], 2.5, 0.8, 1.3))
        r, ratios, clamp_w = torch.cat(ratios_r), torch.cat(ratios), torch.cat(clamp_w)
        assert (r > 2.5).any() and ((r >= 0.8) & (r < 2.5)).any() and (r < 0.8).any(), "clip c and threshold tau bind"
        assert (ratios > 1.5).any() and (ratios < 1.5).any(), "the batch_mean / ema cap 1.5 binds for some samples"
        assert (clamp_w < 1.5).any() and (clamp_w > 6.0).any() and ((clamp_w > 1.5) & (clamp_w < 6.0)).any()


def test_log_softmax_and_token_logprobs_match_reference(inputs):
    mb = inputs["v64"][0]
    shard = VocabShard(0, 64, rc.TRUE_VOCAB)
    logits = mb["student"].clone().requires_grad_(True)
    lp = vocab_parallel_log_softmax(logits, shard, rc.TEMPERATURE, None)
    assert torch.isneginf(lp[..., rc.TRUE_VOCAB:]).all()
    rc.assert_close(lp[..., : rc.TRUE_VOCAB], ref.log_probs(mb["student"], rc.TRUE_VOCAB, rc.TEMPERATURE), "log-softmax")
    s = token_logprobs(logits, mb["tokens"], shard, rc.TEMPERATURE, None)
    want_logits = mb["student"].double().requires_grad_(True)
    want = ref.sampled_logprobs(want_logits, mb["tokens"], mb["mask"], rc.TRUE_VOCAB, rc.TEMPERATURE)
    rc.assert_close(s[mb["mask"]], want[mb["mask"]], "token log-probs")
    assert (s[~mb["mask"]] == 0).all(), "ids outside the real vocabulary give 0"
    weights = torch.linspace(0.5, 2.0, s.numel()).reshape(s.shape)
    (grad,) = torch.autograd.grad((torch.where(mb["mask"], s, 0.0) * weights).sum(), logits)
    (want_grad,) = torch.autograd.grad((want * weights.double()).sum(), want_logits)
    rc.assert_close(grad, want_grad, "token log-prob gradient")


def test_divergence_elements_padding_is_exactly_zero_without_nan():
    logp = torch.log_softmax(torch.randn(2, 8), -1).masked_fill(torch.arange(8) >= 6, float("-inf"))
    other = torch.log_softmax(torch.randn(2, 8), -1).masked_fill(torch.arange(8) >= 6, float("-inf"))
    other.requires_grad_(True)
    valid = torch.arange(8) < 6
    for mix in (0.0, 0.3, 1.0):
        d = divergence_elements(logp, other, mix, valid)
        assert (d[:, 6:] == 0).all() and torch.isfinite(d).all()
        (grad,) = torch.autograd.grad(d.sum(), other)
        assert torch.isfinite(grad).all() and (grad[:, 6:] == 0).all()


@pytest.mark.parametrize("loss_kind", ["divergence", "sampled_rkl"])
@pytest.mark.parametrize("renio", ["off", "none", "batch_mean", "ema", "clamp"])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_zero_valid_tokens(inputs, loss_kind, renio, scope):
    """A micro-batch without any valid token: raw weights 1, loss 0, zero (finite) gradient."""
    case = rc.Case("v64", loss_kind, "jsd", 0.3, renio=renio, scope=scope)
    mb = dict(inputs["v64"][1], mask=torch.zeros(4, 6, dtype=torch.bool))
    shard = VocabShard(0, 64, rc.TRUE_VOCAB)
    student = mb["student"].clone().requires_grad_(True)
    terms = token_terms(student, mb["teacher"], mb["tokens"], case.divergence_config(), shard, None)
    out = distillation_loss(terms, mb["mask"], case.renio_config(), ReNIONormalizer(), loss_kind)
    (grad,) = torch.autograd.grad(out.numerator, student)
    assert out.numerator.item() == 0.0 and (out.per_sample_loss == 0).all()
    assert (out.stats["raw_weight"] == 1).all() and (out.stats["num_pivotal"] == 0).all()
    assert torch.isfinite(out.sample_weights).all() and torch.isfinite(out.denominator)
    assert (grad == 0).all()
    stats = reduce_stats([out])
    assert all(v == v for v in stats.values()), stats  # no NaN


def test_nonfinite_flag_does_not_raise(inputs):
    mb = inputs["v64"][1]
    shard = VocabShard(0, 64, rc.TRUE_VOCAB)
    cfg = DivergenceConfig("forward_kl", temperature=rc.TEMPERATURE)

    def flag(student, teacher):
        terms = token_terms(student, teacher, mb["tokens"], cfg, shard, None)
        distillation_loss(terms, mb["mask"], ReNIOConfig(), ReNIONormalizer(), "divergence")
        return bool(terms.nonfinite)

    nan_student, inf_teacher, nan_padding = mb["student"].clone(), mb["teacher"].clone(), mb["student"].clone()
    nan_student[1, 2, 7] = float("nan")
    inf_teacher[0, 0, 49] = float("inf")
    nan_padding[1, 2, 55] = float("nan")
    assert flag(nan_student, mb["teacher"]) and flag(mb["student"], inf_teacher)
    assert not flag(nan_padding, mb["teacher"]) and not flag(mb["student"], mb["teacher"])


def test_padding_logits_do_not_matter(inputs):
    """Padded columns are -inf whatever they hold (NaN included): the terms are bit-identical."""
    mb = inputs["v64"][0]
    shard = VocabShard(0, 64, rc.TRUE_VOCAB)
    cfg = DivergenceConfig("jsd", 0.3, rc.TEMPERATURE)
    a = token_terms(mb["student"], mb["teacher"], mb["tokens"], cfg, shard, None)
    garbage = mb["student"].clone()
    garbage[..., rc.TRUE_VOCAB:] = float("nan")
    b = token_terms(garbage, mb["teacher"], mb["tokens"], cfg, shard, None)
    assert torch.equal(a.divergence, b.divergence) and torch.equal(a.student_logprobs, b.student_logprobs)


def test_bf16_logits_compute_in_float32(inputs):
    mb = inputs["v64"][0]
    shard = VocabShard(0, 64, rc.TRUE_VOCAB)
    cfg = DivergenceConfig("reverse_kl", temperature=rc.TEMPERATURE)
    student, teacher = mb["student"].bfloat16(), mb["teacher"].bfloat16()
    low = token_terms(student, teacher, mb["tokens"], cfg, shard, None)
    high = token_terms(student.float(), teacher.float(), mb["tokens"], cfg, shard, None)
    assert low.divergence.dtype == torch.float32
    assert torch.equal(low.divergence, high.divergence) and torch.equal(low.student_logprobs, high.student_logprobs)


def test_weights_carry_no_gradient(inputs):
    mb = inputs["v64"][0]
    s = torch.randn(4, 6, requires_grad=True)
    u = torch.randn(4, 6)
    raw = raw_weights(s, u, mb["mask"], ReNIOConfig())
    assert not raw.weight.requires_grad and not raw.log_ratio.requires_grad
    for norm in ("none", "batch_mean", "ema", "clamp"):
        for scope in ("local", "global"):
            out = ReNIONormalizer().normalize(raw.weight, ReNIOConfig(norm=norm, scope=scope))
            assert not out.weights.requires_grad and not out.denominator.requires_grad


def test_ema_state_dict_round_trip(inputs):
    cfg = ReNIOConfig(norm="ema", ema_alpha=0.3)
    w = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 5.0, 1.5]), torch.tensor([1.0, 1.0, 7.0])]
    fresh = ReNIONormalizer()
    state = fresh.state_dict()
    assert torch.isnan(state["ema"]), "unset EMA is saved as NaN"
    original = ReNIONormalizer()
    original.normalize(w[0], cfg)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = ReNIONormalizer()
    restored.load_state_dict(torch.load(buffer))
    assert restored.ema.item() == pytest.approx(2.0)
    for batch in w[1:]:
        assert torch.equal(original.normalize(batch, cfg).weights, restored.normalize(batch, cfg).weights)
    assert torch.equal(original.state_dict()["ema"], restored.state_dict()["ema"])
    assert restored.ema.item() == pytest.approx(0.7 * (0.7 * 2.0 + 0.3 * 2.833333) + 0.3 * 3.0, rel=1e-5)


def test_ema_ignores_non_finite_batches():
    cfg = ReNIOConfig(norm="ema", ema_alpha=0.5)
    norm = ReNIONormalizer()
    norm.normalize(torch.tensor([float("nan"), 1.0]), cfg)
    assert torch.isnan(norm.ema), "a non-finite first batch leaves the EMA unset"
    norm.normalize(torch.tensor([2.0, 4.0]), cfg)
    norm.normalize(torch.tensor([float("inf"), 1.0]), cfg)
    assert norm.ema.item() == 3.0


@pytest.mark.parametrize("loss_kind", ["divergence", "sampled_rkl"])
@pytest.mark.parametrize("renio", ["off", "none", "batch_mean", "ema", "clamp"])
def test_global_scope_one_micro_batch_equals_local(inputs, loss_kind, renio):
    """One micro-batch per step on one rank: global numerator / denominator == local loss, caps included,
    over two steps (the EMA advances per micro-batch locally and per step globally: the same here)."""
    local_case = rc.Case("v64", loss_kind, "jsd", 0.5, renio=renio)
    global_case = rc.Case("v64", loss_kind, "jsd", 0.5, renio=renio, scope="global")
    local_norm, global_norm = ReNIONormalizer(), ReNIONormalizer()
    for mb in inputs["v64"]:
        (local,) = rc.run_library(local_case, [mb], normalizer=local_norm)
        (glob,) = rc.run_library(global_case, [mb], normalizer=global_norm)
        global_norm.end_step(global_case.renio_config(), None)
        assert local["denominator"].item() == 1.0
        rc.assert_close(glob["loss"] / glob["denominator"], local["loss"], "loss")
        rc.assert_close(glob["grad"] / glob["denominator"], local["grad"], "gradient")
        effective = glob["weights"] * glob["weights"].numel() / glob["denominator"]
        if renio != "off" or loss_kind != "sampled_rkl":
            rc.assert_close(effective, local["weights"], "effective weights")


def test_reduce_stats_weight_scale_gives_the_reported_weights(inputs):
    """Global scope over two micro-batches: w~ times weight_scale are the weights that weight_mean / min /
    max summarise (StepResult.per_sample and the samples file report these), not w~ itself."""
    case = rc.Case("v64", "divergence", "forward_kl", renio="batch_mean", scope="global")
    norm = ReNIONormalizer()
    losses = []
    for mb in inputs["v64"]:
        terms = token_terms(mb["student"], mb["teacher"], mb["tokens"], case.divergence_config(),
                            VocabShard(0, 64, rc.TRUE_VOCAB), None)
        losses.append(distillation_loss(terms, mb["mask"], case.renio_config(), norm, "divergence"))
    stats = reduce_stats(losses)
    tilde = torch.cat([lt.sample_weights for lt in losses]).double()
    reported = tilde * stats["weight_scale"]
    assert stats["weight_scale"] != pytest.approx(1.0)
    assert stats["weight_mean"] == pytest.approx(reported.mean().item(), rel=1e-9)
    assert (stats["weight_min"], stats["weight_max"]) == pytest.approx((reported.min().item(), reported.max().item()))


def test_reduce_stats_single_process(inputs):
    case = rc.Case("v64", "divergence", "forward_kl", renio="batch_mean")
    norm = ReNIONormalizer()
    losses = []
    for mb in inputs["v64"]:
        shard = VocabShard(0, 64, rc.TRUE_VOCAB)
        terms = token_terms(mb["student"], mb["teacher"], mb["tokens"], case.divergence_config(), shard, None)
        losses.append(distillation_loss(terms, mb["mask"], case.renio_config(), norm, "divergence"))
    stats = reduce_stats(losses)
    want = rc.run_reference(case, inputs["v64"])
    weights = torch.cat([w["weights"] for w in want])
    masks = torch.cat([mb["mask"] for mb in inputs["v64"]])
    assert stats["loss"] == pytest.approx(sum(w["loss"].item() for w in want) / 2, rel=1e-5)
    assert stats["weight_mean"] == pytest.approx(weights.mean().item(), rel=1e-5)
    assert stats["weight_max"] == pytest.approx(1.5, rel=1e-6)
    assert stats["weight_min"] == pytest.approx(weights.min().item(), rel=1e-5)
    assert stats["weight_std"] == pytest.approx(weights.std(unbiased=False).item(), rel=1e-4)
    assert stats["num_samples"] == 8 and stats["num_valid_tokens"] == masks.sum().item()


INVALID = [
    (lambda: DivergenceConfig("kl"), "DivergenceConfig.kind", "forward_kl, reverse_kl, jsd"),
    (lambda: DivergenceConfig("jsd", beta=1.5), "DivergenceConfig.beta", "[0, 1]"),
    (lambda: DivergenceConfig("jsd", beta=-0.1), "DivergenceConfig.beta", "[0, 1]"),
    (lambda: DivergenceConfig("forward_kl", temperature=0.0), "DivergenceConfig.temperature", "> 0"),
    (lambda: DivergenceConfig("forward_kl", token_clip=0.0), "DivergenceConfig.token_clip", "> 0"),
    (lambda: DivergenceConfig("forward_kl", token_clip=-1.0), "DivergenceConfig.token_clip", "> 0"),
    (lambda: DivergenceConfig("forward_kl", top_k=0), "DivergenceConfig.top_k", ">= 1"),
    (lambda: DivergenceConfig("forward_kl", top_k=2.5), "DivergenceConfig.top_k", ">= 1"),
    (lambda: ReNIOConfig(clip=0.0), "ReNIOConfig.clip", "> 0"),
    (lambda: ReNIOConfig(temperature=-1.0), "ReNIOConfig.temperature", "> 0"),
    (lambda: ReNIOConfig(max_weight=0.0), "ReNIOConfig.max_weight", "> 0"),
    (lambda: ReNIOConfig(norm="mean"), "ReNIOConfig.norm", "none, batch_mean, ema, clamp"),
    (lambda: ReNIOConfig(scope="world"), "ReNIOConfig.scope", "local, global"),
    (lambda: ReNIOConfig(ema_alpha=0.0), "ReNIOConfig.ema_alpha", "(0, 1]"),
    (lambda: ReNIOConfig(clamp_min=0.0), "ReNIOConfig.clamp_min", "> 0"),
    (lambda: ReNIOConfig(clamp_min=2.0, clamp_max=1.0), "ReNIOConfig.clamp_max", ">= clamp_min"),
    (lambda: ReNIOConfig(threshold=float("nan")), "ReNIOConfig.threshold", "finite"),
    (lambda: ReNIOConfig(clip=0.5), "ReNIOConfig.threshold", "<= clip (0.5; a clipped log-ratio never exceeds it"),
    (lambda: ReNIOConfig(clip=2.5, temperature=0.025), "ReNIOConfig.temperature", "max(clip, -threshold) / 60"),
    (lambda: ReNIOConfig(threshold=-4.0, temperature=0.05), "ReNIOConfig.temperature", "stay finite"),
]


def test_smallest_allowed_weight_temperature_gives_finite_weights():
    """At the smallest temperature validate() allows, weights at the clip and at a negative threshold
    normalise to the exact values (float32 sums neither overflow nor vanish)."""
    for a, threshold in ((2.5, 0.8), (-3.0, -3.0)):
        cfg = ReNIOConfig(clip=2.5, threshold=threshold, temperature=max(2.5, -threshold) / 60)
        mask = torch.ones(4, 1, dtype=torch.bool)
        s = torch.tensor([[a], [a], [a], [a]], dtype=torch.float32)
        u = torch.zeros_like(s)
        s[3] = 0.0 if a > 0 else a  # one sample below the clip (a > 0) / all at the threshold
        raw = raw_weights(s, u, mask, cfg)
        got = ReNIONormalizer().normalize(raw.weight, dataclasses.replace(cfg, max_weight=100.0)).weights
        exact = torch.exp(raw.mean_log_ratio.double() / cfg.temperature)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), exact / exact.mean(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("clip, threshold, gamma", [(2.5, 0.8, 1.0), (1.0, 1.0, 0.5), (2.0, -1.5, 2.0)])
def test_batch_mean_weight_bound_is_the_largest_normalised_weight(clip, threshold, gamma):
    """batch_mean_weight_bound is attained (one sample with every token at the clip, the others at the
    smallest weight: no pivotal token, or every token at a negative threshold) and never exceeded by
    random micro-batches; the normalised weights come from the normaliser without a binding cap."""
    cfg = ReNIOConfig(clip=clip, threshold=threshold, temperature=gamma, max_weight=1e6)
    for b in (2, 5, 16):
        u = torch.zeros(b, 3)
        low = threshold if threshold < 0 else threshold - 1.0  # r = tau < 0 is pivotal; r < tau > 0 is not
        s = torch.full((b, 3), low)
        s[0] = clip + 1.0  # clipped to c
        mask = torch.ones(b, 3, dtype=torch.bool)
        top = ReNIONormalizer().normalize(raw_weights(s, u, mask, cfg).weight, cfg).weights.max().item()
        bound = batch_mean_weight_bound(clip, threshold, gamma, b)
        assert top == pytest.approx(bound, rel=1e-5) and bound == pytest.approx(
            b * math.exp(clip / gamma) / (math.exp(clip / gamma) + (b - 1) * math.exp(min(0.0, threshold) / gamma)))
        generator = torch.Generator().manual_seed(b)
        for _ in range(20):
            s = torch.randn(b, 3, generator=generator) * 3
            mask = torch.rand(b, 3, generator=generator) > 0.3
            weights = ReNIONormalizer().normalize(raw_weights(s, u, mask, cfg).weight, cfg).weights
            assert weights.max().item() <= bound * (1 + 1e-6)


def test_pivotal_tokens_at_the_threshold_and_at_masked_positions():
    """r = tau counts as pivotal (r >= tau); a masked position is never pivotal, also when tau <= 0 would
    admit its r = 0 (values from the module docstring's formulas, computed by hand)."""
    cfg = ReNIOConfig(threshold=0.5, temperature=2.0)
    s, u = torch.tensor([[0.0, -1.0]]), torch.tensor([[-0.5, -1.0]])  # r = 0.5 (= tau) and 0
    raw = raw_weights(s, u, torch.ones(1, 2, dtype=torch.bool), cfg)
    assert raw.num_pivotal.tolist() == [1] and raw.mean_log_ratio.tolist() == [0.5]
    assert raw.weight.item() == pytest.approx(math.exp(0.5 / 2.0), rel=1e-6)
    cfg = ReNIOConfig(threshold=-1.0)
    raw = raw_weights(torch.tensor([[-0.5, 5.0]]), torch.zeros(1, 2), torch.tensor([[True, False]]), cfg)
    assert raw.num_pivotal.tolist() == [1] and raw.mean_log_ratio.tolist() == [-0.5]


@pytest.mark.parametrize("scope", ["local", "global"])
def test_clamp_mode_is_not_capped_by_max_weight(scope):
    """Mode clamp is clamp(w) / mean(clamp(w)) (global: w~ = clamp(w)), with no max_weight cap, also where
    a weight ends above it."""
    cfg = ReNIOConfig(norm="clamp", scope=scope)
    raw = torch.tensor([0.1] * 20 + [10.0])
    clamped = raw.clamp(cfg.clamp_min, cfg.clamp_max)
    got = ReNIONormalizer().normalize(raw, cfg)
    want = clamped / clamped.mean() if scope == "local" else clamped
    assert (clamped / clamped.mean()).max() > cfg.max_weight  # a cap would bind
    torch.testing.assert_close(got.weights, want)
    if scope == "global":
        torch.testing.assert_close(got.denominator, clamped.sum())


@pytest.mark.parametrize("loss_kind", ["divergence", "sampled_rkl"])
@pytest.mark.parametrize("renio", [False, True])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_values_at_invalid_positions_never_reach_the_loss(loss_kind, renio, scope):
    """NaN and inf in D, s and u at masked positions: the loss, weights and gradients are those of the same
    terms with zeros there (finite, and no gradient at the masked positions)."""
    mask = torch.tensor([[True, True, False, False], [True, False, True, False]])
    finite = torch.tensor([[0.3, 0.7, 0.0, 0.0], [1.1, 0.0, 0.2, 0.0]]), \
        torch.tensor([[-0.2, -1.5, 0.0, 0.0], [-0.4, 0.0, -2.0, 0.0]]), \
        torch.tensor([[-1.2, -0.5, 0.0, 0.0], [-1.4, 0.0, -0.1, 0.0]])
    junk = torch.tensor([[0.0, 0.0, float("nan"), float("inf")], [0.0, float("-inf"), 0.0, float("nan")]])
    cfg = ReNIOConfig(enabled=renio, scope=scope, threshold=-1.0)
    results = []
    for extra in (torch.zeros_like(junk), junk):
        d, s = (x + extra for x in finite[:2])
        d.requires_grad_(True)
        s.requires_grad_(True)
        terms = TokenTerms(divergence=d, student_logprobs=s, teacher_logprobs=finite[2] + extra,
                           nonfinite=torch.tensor(False))
        out = distillation_loss(terms, mask, cfg, ReNIONormalizer(), loss_kind)
        grads = torch.autograd.grad(out.numerator, (d, s), allow_unused=True)
        grads = [torch.zeros_like(d) if g is None else g for g in grads]
        results.append((out.numerator.detach(), out.denominator, out.sample_weights, *grads))
    for clean, dirty in zip(*results):
        assert torch.isfinite(dirty).all()
        torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
    assert (results[1][3][~mask] == 0).all() and (results[1][4][~mask] == 0).all()


@pytest.mark.parametrize("make, field, allowed", INVALID, ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(INVALID)])
def test_invalid_config_raises_user_input_error(make, field, allowed):
    with pytest.raises(UserInputError) as err:
        make().validate()
    message = str(err.value)
    assert "\n" not in message and field in message and allowed in message and "allowed" in message


def test_invalid_call_arguments_raise_user_input_error(inputs):
    mb = inputs["v64"][0]
    shard = VocabShard(0, 64, rc.TRUE_VOCAB)
    with pytest.raises(UserInputError, match="top_k"):
        token_terms(mb["student"], mb["teacher"], mb["tokens"], DivergenceConfig("forward_kl", top_k=51), shard, None)
    terms = token_terms(mb["student"], mb["teacher"], mb["tokens"], DivergenceConfig("forward_kl"), shard, None)
    with pytest.raises(UserInputError, match="loss_kind.*divergence, sampled_rkl"):
        distillation_loss(terms, mb["mask"], ReNIOConfig(), ReNIONormalizer(), "forward_kl")
    with pytest.raises(UserInputError, match="ReNIOConfig.clip"):
        distillation_loss(terms, mb["mask"], ReNIOConfig(clip=-1.0), ReNIONormalizer(), "divergence")
