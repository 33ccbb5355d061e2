"""Inputs, case matrix, library runner and comparison shared by the ReNIO core tests and their torchrun worker.

Inputs: true vocabulary 50 padded to 64 (TP=2 shards of 32, the second one partly padding) or to 128
(TP=2: the second shard is all padding). Padded columns hold large logits, so any padding that
leaks into a softmax changes the numbers. Masks have a prompt column, random holes and one
all-masked sample; invalid positions carry ids outside the vocabulary (padding ids, -100).
Generation retries seeds until no value lies within rounding distance of a clamp, clip, threshold or
cap boundary (float32 against float64 could otherwise take different branches), so every
comparison is decided by the formulas, not by rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_renio.losses.distillation import distillation_loss
from megatron_renio.losses.divergence import DivergenceConfig, token_terms
from megatron_renio.renio.vocab_parallel import VocabShard, group_rank, group_size
from megatron_renio.renio.weights import ReNIOConfig, ReNIONormalizer
from tests import reference_renio as ref

TRUE_VOCAB = 50
TEMPERATURE = 0.7
TOKEN_CLIP = 0.05
LOGIT_SCALE = 1.5
ATOL = RTOL = 1e-5

DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 0.5), ("jsd", 1.0)]
# ReNIO presets: None = disabled. Caps and clamp bounds are chosen so that they bind for some samples.
RENIO_PRESETS = {
    "off": None,
    "none": dict(norm="none", temperature=0.7),
    "batch_mean": dict(norm="batch_mean", max_weight=1.5),
    "ema": dict(norm="ema", max_weight=1.5, ema_alpha=0.3),
    "clamp": dict(norm="clamp", clamp_min=1.5, clamp_max=6.0, temperature=1.3),
    "batch_mean_nocap": dict(norm="batch_mean", max_weight=100.0),
    "ema_nocap": dict(norm="ema", max_weight=100.0, ema_alpha=0.3),
}


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def _draw(seed: int, padded_vocab: int, num_micro_batches: int, b: int, t: int):
    g = torch.Generator().manual_seed(seed)
    micro_batches = []
    for k in range(num_micro_batches):
        student = torch.randn(b, t, padded_vocab, generator=g) * LOGIT_SCALE
        teacher = torch.randn(b, t, padded_vocab, generator=g) * LOGIT_SCALE
        student[..., TRUE_VOCAB:] += 20.0
        teacher[..., TRUE_VOCAB:] += 25.0
        mask = torch.rand(b, t, generator=g) < 0.8
        mask[:, 0] = False
        mask[:, -1] = True
        if k == 0:
            mask[b // 2] = False
        tokens = torch.randint(0, TRUE_VOCAB, (b, t), generator=g)
        junk = torch.randint(TRUE_VOCAB, padded_vocab, (b, t), generator=g)
        junk[:, 0] = -100
        tokens = torch.where(mask, tokens, junk)
        micro_batches.append(dict(student=student, teacher=teacher, tokens=tokens, mask=mask))
    return micro_batches


def _margins_ok(micro_batches, margin: float = 1e-5) -> bool:
    """No divergence element near 0 (KL kinds) or the token clip, no log-ratio near c or tau, no
    weight ratio near a cap or clamp bound."""
    for mb in micro_batches:
        for top_k in (None, 5, 40):
            zs, zt = mb["student"][..., :TRUE_VOCAB].double(), mb["teacher"][..., :TRUE_VOCAB].double()
            if top_k is not None:
                idx = zt.topk(top_k, dim=-1).indices
                zs, zt = zs.gather(-1, idx), zt.gather(-1, idx)
            q, p = torch.softmax(zs / TEMPERATURE, -1), torch.softmax(zt / TEMPERATURE, -1)
            for kind, beta in [("forward_kl", 0), ("reverse_kl", 0), ("jsd", 0.3), ("jsd", 0.5)]:
                d = ref.divergence_elements(p, q, kind, beta)
                if (d - TOKEN_CLIP).abs().min() < margin:
                    return False
                if kind != "jsd" and ((d.abs() < margin * (p + q)) & (p + q > 1e-6)).any():
                    return False
        s = ref.sampled_logprobs(mb["student"], mb["tokens"], mb["mask"], TRUE_VOCAB, TEMPERATURE)
        u = ref.sampled_logprobs(mb["teacher"], mb["tokens"], mb["mask"], TRUE_VOCAB, TEMPERATURE)
        r = (s - u)[mb["mask"]]
        if (r - ref.RENIO_DEFAULTS["clip"]).abs().min() < margin or (r - ref.RENIO_DEFAULTS["threshold"]).abs().min() < margin:
            return False
        for preset in filter(None, RENIO_PRESETS.values()):
            w = ref.renio_weights(s, u, mb["mask"], ref.RENIO_DEFAULTS["clip"], ref.RENIO_DEFAULTS["threshold"],
                                  preset.get("temperature", 1.0))
            bounds = [preset.get("clamp_min", 0.1), preset.get("clamp_max", 10.0)]
            if (w / w.mean() - preset.get("max_weight", 10.0)).abs().min() < margin:
                return False
            if min((w - bound).abs().min() for bound in bounds) < margin:
                return False
    return True


def make_micro_batches(seed: int, padded_vocab: int, num_micro_batches: int = 2, b: int = 4, t: int = 6):
    """Micro-batches (dicts of student/teacher logits [b, t, padded_vocab] fp32, tokens, mask) with safe margins."""
    for attempt in range(100):
        micro_batches = _draw(seed * 1000 + attempt, padded_vocab, num_micro_batches, b, t)
        if _margins_ok(micro_batches):
            return micro_batches
    raise RuntimeError("no input draw kept every value away from the branch boundaries")


def make_input_sets():
    """All named input sets of the core and parallel tests."""
    return {
        "v64": make_micro_batches(1, 64),
        "v128": make_micro_batches(2, 128),
        "dp_step1": make_micro_batches(3, 64, num_micro_batches=4, b=3),
        "dp_step2": make_micro_batches(4, 64, num_micro_batches=4, b=3),
    }


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    inputs: str
    loss_kind: str = "divergence"
    kind: str = "forward_kl"
    beta: float = 0.5
    token_clip: float | None = TOKEN_CLIP
    top_k: int | None = None
    renio: str = "batch_mean"
    scope: str = "local"

    @property
    def id(self) -> str:
        div = "sampled_rkl" if self.loss_kind == "sampled_rkl" else f"{self.kind}{self.beta if self.kind == 'jsd' else ''}"
        return f"{self.inputs}-{div}-clip{self.token_clip}-top{self.top_k}-{self.renio}-{self.scope}"

    def divergence_config(self) -> DivergenceConfig:
        return DivergenceConfig(self.kind, self.beta, TEMPERATURE, self.token_clip, self.top_k)

    def renio_config(self) -> ReNIOConfig:
        preset = RENIO_PRESETS[self.renio]
        return ReNIOConfig(enabled=preset is not None, scope=self.scope, **(preset or {}))

    def reference_normaliser(self) -> ref.Normaliser | None:
        cfg = self.renio_config()
        if not cfg.enabled:
            return None
        return ref.Normaliser(cfg.norm, cfg.max_weight, cfg.ema_alpha, cfg.clamp_min, cfg.clamp_max)

    def reference_renio(self) -> dict | None:
        cfg = self.renio_config()
        return dict(clip=cfg.clip, threshold=cfg.threshold, gamma=cfg.temperature) if cfg.enabled else None


def matrix() -> list[Case]:
    """The reference-comparison matrix: every loss kind x clip / no clip x full / top-k x ReNIO preset (local)."""
    cases = []
    for renio in ("off", "none", "batch_mean", "ema", "clamp"):
        for kind, beta in DIVERGENCES:
            for clip in (TOKEN_CLIP, None):
                for top_k in (None, 5):
                    cases.append(Case("v64", "divergence", kind, beta, clip, top_k, renio))
        cases.append(Case("v64", "sampled_rkl", renio=renio))
    for kind, beta in DIVERGENCES:
        for top_k in (None, 5):
            cases.append(Case("v128", "divergence", kind, beta, TOKEN_CLIP, top_k, "batch_mean"))
    cases.append(Case("v128", "sampled_rkl", renio="ema"))
    cases += [Case("v64", "divergence", "forward_kl", top_k=40), Case("v64", "divergence", "jsd", 0.3, None, 40, "clamp")]
    return cases


# Data parallelism: each step is one input set of 4 micro-batches; rank r runs micro-batches 2r, 2r+1.
DP_STEPS = ("dp_step1", "dp_step2")


def dp_matrix() -> list[Case]:
    """DP=2 cases: global scope for every mode without a binding cap (== one batch of all samples),
    global with a binding cap (the documented approximation), local scope (== per micro-batch reference)."""
    cases = [
        Case("dp", loss_kind, renio=renio, scope="global")
        for renio in ("off", "none", "batch_mean_nocap", "ema_nocap", "clamp")
        for loss_kind in ("divergence", "sampled_rkl")
    ]
    cases += [Case("dp", "divergence", "jsd", 0.3, renio=renio, scope="global") for renio in ("batch_mean", "ema")]
    cases += [Case("dp", "divergence", renio=renio) for renio in ("batch_mean", "ema")]
    return cases


# ------------------------------------------------------------------------------------------------
# Running the library and the reference
# ------------------------------------------------------------------------------------------------


def shard_of(padded_vocab: int, tp_group) -> VocabShard:
    return VocabShard.for_rank(padded_vocab // group_size(tp_group), TRUE_VOCAB, tp_group)


def run_library(case: Case, micro_batches, tp_group=None, normalizer=None, keep_terms=False):
    """Library outputs per micro-batch (this rank's vocabulary shard of the gradient); ``keep_terms`` adds
    the LossTerms under 'loss_terms'."""
    shard = shard_of(micro_batches[0]["student"].shape[-1], tp_group)
    cols = slice(shard.start, shard.start + shard.size)
    normalizer = normalizer or ReNIONormalizer()
    outputs = []
    for mb in micro_batches:
        student = mb["student"][..., cols].clone().requires_grad_(True)
        terms = token_terms(student, mb["teacher"][..., cols], mb["tokens"], case.divergence_config(), shard, tp_group)
        loss = distillation_loss(terms, mb["mask"], case.renio_config(), normalizer, case.loss_kind)
        (grad,) = torch.autograd.grad(loss.numerator, student)
        outputs.append(dict(
            loss=loss.numerator.detach(), denominator=loss.denominator, weights=loss.sample_weights,
            per_sample=loss.per_sample_loss, raw_weights=loss.stats["raw_weight"], s=terms.student_logprobs.detach(),
            u=terms.teacher_logprobs, divergence=terms.divergence.detach(), nonfinite=terms.nonfinite, grad=grad,
            tp_rank=group_rank(tp_group),
        ))
        if keep_terms:
            outputs[-1]["loss_terms"] = loss
    return outputs


def run_reference(case: Case, micro_batches):
    """Reference outputs per micro-batch, with the gradient of the loss w.r.t. the full padded student logits."""
    normaliser = case.reference_normaliser()
    outputs = []
    for mb in micro_batches:
        student = mb["student"].double().requires_grad_(True)
        out = ref.micro_batch(
            student, mb["teacher"], mb["tokens"], mb["mask"], TRUE_VOCAB, kind=case.kind, beta=case.beta,
            temperature=TEMPERATURE, token_clip=case.token_clip, top_k=case.top_k, loss_kind=case.loss_kind,
            renio=case.reference_renio(), normaliser=normaliser,
        )
        (out["grad"],) = torch.autograd.grad(out["loss"], student)
        outputs.append({k: v.detach() for k, v in out.items()})
    return outputs


def assert_close(actual, expected, what: str):
    actual = torch.as_tensor(actual).double()
    expected = torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values {actual}"
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def compare(library, reference, micro_batches):
    """Assert library == reference for every micro-batch (library grads already span the full padded vocabulary)."""
    for k, (lib, want, mb) in enumerate(zip(library, reference, micro_batches)):
        valid = mb["mask"]
        assert_close(lib["s"][valid], want["s"][valid], f"mb{k} student log-probs")
        assert_close(lib["u"][valid], want["u"][valid], f"mb{k} teacher log-probs")
        assert_close(lib["divergence"], want["divergence"], f"mb{k} divergence")
        assert_close(lib["raw_weights"], want["raw_weights"], f"mb{k} raw weights")
        assert_close(lib["weights"], want["weights"], f"mb{k} weights")
        assert_close(lib["per_sample"], want["per_sample"], f"mb{k} per-sample loss")
        assert_close(lib["loss"], want["loss"], f"mb{k} loss")
        assert_close(lib["grad"], want["grad"], f"mb{k} gradient")
        assert (lib["grad"][..., TRUE_VOCAB:] == 0).all(), f"mb{k}: padded columns got a gradient"
        assert not bool(lib["nonfinite"]), f"mb{k}: nonfinite flag set on finite logits"
