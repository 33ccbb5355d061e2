"""Per-micro-batch distillation loss with ReNIO sample weights, and step statistics.

From the per-token terms of :func:`~megatron_renio.losses.divergence.token_terms` and the valid-token
mask m [b, t] (README, 'The method, as implemented'):

    loss_kind 'divergence'   l_it = D_it
    loss_kind 'sampled_rkl'  l_it = -A_it s_it,  A_it = (u_it - s_it) detached
    L_i = sum_t m_it l_it / max(sum_t m_it, 1)          (0 for a sample without valid tokens)

CONTRACT: the step's loss is (sum over micro-batches and DP ranks of ``numerator``) / (sum of
``denominator``); the trainer passes them to Megatron's schedule as (loss, num_tokens) with
calculate_per_token_loss=True, which defers this division to finalize_model_grads.

    scope 'local'   numerator = mean_i(w_i L_i) with the micro-batch's normalised weights; denominator = 1
                    (the reference, micro-batch by micro-batch)
    scope 'global'  numerator = sum_i w~_i L_i; denominator = b * e  (renio/weights.py: batch_mean gives
                    sum_i w_i, so the step is the self-normalised mean over every micro-batch and DP rank;
                    none gives b; clamp gives sum_i clamp(w_i); ema gives (1 - alpha) ema_prev b + alpha sum_i w_i)

max_weight in global scope caps w_i at max_weight times the *micro-batch's* divisor, the one
approximation of global scope (renio/weights.py). Deviation from the spec text: for batch_mean the
global denominator is sum_i w_i (uncapped), not sum_i w~_i, so that one micro-batch on one rank gives
exactly the local (reference) loss, cap included.

ReNIO disabled: w = 1 (local: mean_i L_i; global: sum_i L_i over sum of b). 'sampled_rkl' without
ReNIO is the reference's token mean: local numerator = sum_it m l / max(sum_it m, 1), denominator 1;
global numerator = sum_it m l, denominator = number of valid tokens (a step without any valid token
has denominator 0: its gradients are all 0, Megatron's finalize_model_grads leaves them unscaled, and
reduce_stats reports a loss of 0). With ReNIO it is the per-sample token mean L_i,
weighted like the divergence.

Values at invalid positions never reach the loss or its gradient (torch.where, not multiplication by
m), so padding, prompt positions and ignore ids cannot produce NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from megatron_renio.errors import UserInputError
from megatron_renio.losses.divergence import TokenTerms
from megatron_renio.renio.vocab_parallel import group_size
from megatron_renio.renio.weights import ReNIOConfig, ReNIONormalizer, raw_weights

LOSS_KINDS = ("divergence", "sampled_rkl")


@dataclass
class LossTerms:
    """One micro-batch's contribution to the step loss (module docstring).

    numerator: scalar, differentiable; denominator: scalar, detached; sample_weights [b]: the weights
    applied (normalised in local scope; w~ in global scope, see ``stats['weights_final']``);
    per_sample_loss [b]: L_i, detached; stats: detached per-sample values for :func:`reduce_stats`
    (raw_weight, mean_log_ratio, num_pivotal, num_valid, log_ratio_sum = sum_t m r over valid tokens),
    nonfinite (the TokenTerms flag) and weights_final (bool).
    """

    numerator: torch.Tensor
    denominator: torch.Tensor
    sample_weights: torch.Tensor
    per_sample_loss: torch.Tensor
    stats: dict


def distillation_loss(
    terms: TokenTerms, mask: torch.Tensor, renio: ReNIOConfig, normalizer: ReNIONormalizer, loss_kind: str
) -> LossTerms:
    """This micro-batch's (numerator, denominator) and weights from token terms and the mask [b, t]."""
    renio.validate()
    if loss_kind not in LOSS_KINDS:
        raise UserInputError(f"loss_kind={loss_kind!r} is not allowed; allowed: {', '.join(LOSS_KINDS)}")
    mask = mask.bool()
    s = torch.where(mask, terms.student_logprobs, 0.0)
    u = torch.where(mask, terms.teacher_logprobs, 0.0)
    token_loss = terms.divergence if loss_kind == "divergence" else -(u - s).detach() * s
    token_sum = torch.where(mask, token_loss, 0.0).sum(dim=-1)
    raw = raw_weights(s, u, mask, renio)
    per_sample = token_sum / raw.num_valid.clamp(min=1)
    normalized = normalizer.normalize(raw.weight, renio)
    if loss_kind == "sampled_rkl" and not renio.enabled:
        num_valid = raw.num_valid.sum().to(token_sum.dtype)
        local = renio.scope == "local"
        numerator = token_sum.sum() / num_valid.clamp(min=1) if local else token_sum.sum()
        denominator = torch.ones_like(num_valid) if local else num_valid
    else:
        weighted = normalized.weights * per_sample
        numerator = weighted.mean() if renio.scope == "local" else weighted.sum()
        denominator = normalized.denominator
    stats = {
        "raw_weight": raw.weight,
        "mean_log_ratio": raw.mean_log_ratio,
        "num_pivotal": raw.num_pivotal,
        "num_valid": raw.num_valid,
        "log_ratio_sum": raw.log_ratio.sum(dim=-1),
        "nonfinite": terms.nonfinite,
        "weights_final": normalized.final,
    }
    return LossTerms(numerator, denominator, normalized.weights, per_sample.detach(), stats)


def effective_weights(losses: Sequence[LossTerms], weight_scale) -> torch.Tensor:
    """The applied per-sample weights of ``losses`` (float64): final weights as they are, w~ of
    global-scope micro-batches times ``weight_scale`` (:func:`reduce_stats`)."""
    return torch.cat([lt.sample_weights.detach().to(torch.float64)
                      * (1.0 if lt.stats["weights_final"] else weight_scale) for lt in losses])


def reduce_stats(losses: Sequence[LossTerms], dp_group=None) -> dict[str, float]:
    """Logging statistics of one step's micro-batches (this rank's ``losses``), reduced over ``dp_group``.

    Keys: loss (sum numerator / sum denominator), weight_mean / weight_min / weight_max / weight_std
    (population std) of the effective per-sample weights over all samples (global scope: w~ times
    N / sum of denominators), pivotal_fraction (pivotal / valid tokens), log_ratio_mean (clipped r over
    valid tokens), sample_loss_mean (mean L_i over samples with a valid token), num_samples,
    num_valid_tokens, nonfinite (micro-batches with the flag set), weight_scale (N / sum of
    denominators: the factor from w~ to the effective weight of global-scope micro-batches; 1 when
    there are none). Collectives: two sums and one min.
    """
    f64 = dict(dtype=torch.float64, device=losses[0].numerator.device)

    def all_reduce(x, op=dist.ReduceOp.SUM):
        if group_size(dp_group) > 1:
            dist.all_reduce(x, op=op, group=dp_group)
        return x

    pending = [lt for lt in losses if not lt.stats["weights_final"]]
    scale_terms = torch.tensor([sum(lt.sample_weights.numel() for lt in pending), 0.0], **f64)
    for lt in pending:
        scale_terms[1] += lt.denominator.detach().to(torch.float64)
    all_reduce(scale_terms)
    scale = scale_terms[0] / scale_terms[1].clamp(min=torch.finfo(torch.float64).tiny)
    weights = effective_weights(losses, scale)
    num_valid = torch.cat([lt.stats["num_valid"] for lt in losses]).to(torch.float64)
    per_sample = torch.cat([lt.per_sample_loss for lt in losses]).to(torch.float64)

    def total(key):
        return torch.stack([lt.stats[key].to(torch.float64).sum() for lt in losses]).sum()

    sums = all_reduce(torch.stack([
        torch.tensor(float(weights.numel()), **f64),
        weights.sum(),
        (weights * weights).sum(),
        total("num_pivotal"),
        num_valid.sum(),
        total("log_ratio_sum"),
        torch.where(num_valid > 0, per_sample, 0.0).sum(),
        (num_valid > 0).sum().to(torch.float64),
        torch.stack([lt.numerator.detach().to(torch.float64) for lt in losses]).sum(),
        torch.stack([lt.denominator.detach().to(torch.float64) for lt in losses]).sum(),
        total("nonfinite"),
    ]))
    extremes = all_reduce(torch.stack([weights.min(), -weights.max()]), dist.ReduceOp.MIN)
    n, w_sum, w2_sum, pivotal, valid, r_sum, l_sum, nonempty, num, den, nonfinite = sums.tolist()
    mean = w_sum / n
    return {
        "loss": num / den if den else 0.0,
        "weight_mean": mean,
        "weight_min": extremes[0].item(),
        "weight_max": -extremes[1].item(),
        "weight_std": max(w2_sum / n - mean * mean, 0.0) ** 0.5,
        "pivotal_fraction": pivotal / max(valid, 1.0),
        "log_ratio_mean": r_sum / max(valid, 1.0),
        "sample_loss_mean": l_sum / max(nonempty, 1.0),
        "num_samples": n,
        "num_valid_tokens": valid,
        "nonfinite": nonfinite,
        "weight_scale": float(scale) if pending else 1.0,
    }
