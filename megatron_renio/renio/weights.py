"""ReNIO per-sample weights from prefix-conditioned token log-probs, and their normalisation.

Per sample i and completion position t, with s_it / u_it the student / teacher log-probs of the
sampled token (temperature T) and m_it = 1 on valid completion tokens (README, 'The method, as implemented'):

    r_it = min(s_it - u_it, c)                                  clipped log-ratio (c = ``clip``)
    P_i  = { t : m_it = 1 and r_it >= tau }                     pivotal tokens (tau = ``threshold``)
    a_i  = sum_{t in P_i} r_it / max(|P_i|, 1)                  0 when P_i is empty
    w_i  = exp(a_i / gamma)                                     gamma = ``temperature``

A sample without valid tokens has a_i = 0, so w_i = 1. Weights never carry a gradient.

Normalisation, ``scope='local'`` (per micro-batch, as the reference; M = ``max_weight``):

    none        w_i
    batch_mean  min(w_i / mean_b(w), M)
    ema         ema <- mean_b(w) on the first batch, else (1 - alpha) ema + alpha mean_b(w);
                min(w_i / ema, M)
    clamp       w_i <- clamp(w_i, clamp_min, clamp_max);  w_i / mean_b(w)

``scope='global'`` (across micro-batches and data-parallel ranks) uses the identity
mean_i((w_i / mean(w)) L_i) = sum_i w_i L_i / sum_i w_i: each micro-batch contributes a numerator
sum_i w~_i L_i and a denominator b * e, both summed over the step by the trainer (Megatron's deferred
per-token-loss division), where e is the micro-batch's share of the divisor:

    none        w~ = w;                      e = 1
    batch_mean  w~ = min(w, M e);            e = mean_b(w)              (sum of e*b = sum of all w)
    ema         w~ = min(w, M e);            e = (1 - alpha) ema_prev + alpha mean_b(w)
                                             (mean_b(w) on the first step), ema_prev = the EMA of the
                                             previous step; sum of e*b = N * ema_step
    clamp       w~ = clamp(w, lo, hi);       e = mean_b(w~)

max_weight in global scope: the cap min(w_i, M e) uses this micro-batch's divisor e instead of the
step's global one (the global mean is known only after the step's last micro-batch). This is the
one approximation of global scope: without a binding cap, global scope over N samples equals local
scope on one batch of all N samples exactly, and with one micro-batch on one rank it equals local
scope exactly, cap included. The global EMA is updated once per step by :meth:`ReNIONormalizer.end_step`
from the step's sums all-reduced over data parallelism, so every DP rank holds the same EMA.
(In local scope the EMA is updated per micro-batch on each rank, as in the reference.)
A batch whose weight mean is not finite (non-finite logits: the trainer skips that step) leaves the
EMA unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_renio.errors import UserInputError
from megatron_renio.renio.vocab_parallel import group_size

NORM_MODES = ("none", "batch_mean", "ema", "clamp")
# Largest |a_i / gamma| allowed (a_i lies in {0} and [threshold, clip]): exp(60) = 1.1e26, so sums of
# up to 1e12 weights stay finite in float32, and exp(-60) = 8.8e-27 stays a normal float32.
MAX_EXPONENT = 60.0


def weight_exponent_bound(clip: float, threshold: float, temperature: float) -> float:
    """The largest |a_i / gamma| a configuration allows; at most :data:`MAX_EXPONENT` is accepted."""
    return max(clip, -threshold) / temperature


def batch_mean_weight_bound(clip: float, threshold: float, temperature: float, batch_size: int) -> float:
    """The largest w_i / mean_b(w) a micro-batch of b samples allows (``batch_mean``, before the cap).

    a_i lies in {0} and [threshold, clip], so w_i in [L, W] with W = exp(clip / gamma) and
    L = exp(min(0, threshold) / gamma); the ratio is largest with one sample at W and the others at L:
    b W / (W + (b - 1) L).
    """
    high = math.exp(clip / temperature)
    low = math.exp(min(0.0, threshold) / temperature)
    return batch_size * high / (high + (batch_size - 1) * low)


SCOPES = ("local", "global")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class ReNIOConfig:
    """ReNIO settings (module docstring): c = clip, tau = threshold, gamma = temperature."""

    enabled: bool = True
    clip: float = 2.5
    threshold: float = 0.8
    temperature: float = 1.0
    norm: str = "batch_mean"
    scope: str = "local"
    max_weight: float = 10.0
    ema_alpha: float = 0.1
    clamp_min: float = 0.1
    clamp_max: float = 10.0

    def validate(self) -> None:
        """Raise :class:`UserInputError` (one line naming the field and what is allowed) on a bad value."""

        def bad(field: str, allowed: str):
            return UserInputError(f"ReNIOConfig.{field}={getattr(self, field)!r} is not allowed; allowed: {allowed}")

        if self.norm not in NORM_MODES:
            raise bad("norm", ", ".join(NORM_MODES))
        if self.scope not in SCOPES:
            raise bad("scope", ", ".join(SCOPES))
        for field in ("clip", "temperature", "max_weight", "clamp_min"):
            if not _positive(getattr(self, field)):
                raise bad(field, "a number > 0")
        if not (isinstance(self.threshold, (int, float)) and -float("inf") < self.threshold <= self.clip):
            raise bad("threshold", f"a finite number <= clip ({self.clip}; a clipped log-ratio never exceeds it, so "
                                   "no token would be pivotal)")
        if weight_exponent_bound(self.clip, self.threshold, self.temperature) > MAX_EXPONENT:
            raise bad("temperature", f"a number >= max(clip, -threshold) / {MAX_EXPONENT} (exp(a_i / temperature) "
                                     "and its batch sums must stay finite and nonzero in float32)")
        if not (_positive(self.ema_alpha) and self.ema_alpha <= 1):
            raise bad("ema_alpha", "a number in (0, 1]")
        if not (_positive(self.clamp_max) and self.clamp_max >= self.clamp_min):
            raise bad("clamp_max", f"a number >= clamp_min ({self.clamp_min})")


@dataclass
class RawWeights:
    """Output of :func:`raw_weights`, all detached. Per sample [b]: weight w_i, mean_log_ratio a_i,
    num_pivotal |P_i|, num_valid sum_t m_it. Per token [b, t]: log_ratio r_it (0 on invalid tokens),
    pivotal (t in P_i)."""

    weight: torch.Tensor
    mean_log_ratio: torch.Tensor
    num_pivotal: torch.Tensor
    num_valid: torch.Tensor
    log_ratio: torch.Tensor
    pivotal: torch.Tensor


def raw_weights(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor, cfg: ReNIOConfig
) -> RawWeights:
    """w_i = exp(a_i / gamma) from s [b, t], u [b, t] and the valid-token mask [b, t] (module docstring).

    Values at invalid positions are ignored (they may be anything, even NaN).
    """
    cfg.validate()
    with torch.no_grad():
        mask = mask.bool()
        log_ratio = torch.where(mask, (student_logprobs - teacher_logprobs).clamp(max=cfg.clip), 0.0)
        pivotal = mask & (log_ratio >= cfg.threshold)
        num_pivotal = pivotal.sum(dim=-1)
        mean_log_ratio = torch.where(pivotal, log_ratio, 0.0).sum(dim=-1) / num_pivotal.clamp(min=1)
        weight = torch.exp(mean_log_ratio / cfg.temperature)
    return RawWeights(weight, mean_log_ratio, num_pivotal, mask.sum(dim=-1), log_ratio, pivotal)


@dataclass
class NormalizedWeights:
    """Output of :meth:`ReNIONormalizer.normalize`.

    local scope: ``weights`` are the final normalised weights and ``denominator`` is 1 (the
    micro-batch loss is mean_i(weights_i L_i)). global scope: ``weights`` are w~ and ``denominator``
    is b * e; the loss is (sum over the step of sum_i w~_i L_i) / (sum over the step of b * e), so the
    effective weight of a sample is w~_i * N / (sum of denominators). ``final`` says whether
    ``weights`` already are the effective weights (local scope, mode none, or ReNIO disabled).
    """

    weights: torch.Tensor
    denominator: torch.Tensor
    final: bool


def _ema_candidate(previous: torch.Tensor, mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """mean when the EMA is unset (NaN), else (1 - alpha) previous + alpha mean."""
    return torch.where(torch.isnan(previous), mean, (1 - alpha) * previous + alpha * mean)


class ReNIONormalizer:
    """Normalises raw ReNIO weights (module docstring) and holds the EMA state of mode 'ema'.

    The EMA is a 0-dim tensor, NaN until the first batch (local) or step (global) sets it; it is
    saved and restored with :meth:`state_dict` / :meth:`load_state_dict`. In global scope the trainer
    calls :meth:`end_step` once after every step's micro-batches.
    """

    def __init__(self):
        self.ema = torch.tensor(float("nan"))
        self._step_sums = None  # global ema: [sum of raw w, number of samples] of this step's micro-batches

    def normalize(self, raw_w: torch.Tensor, cfg: ReNIOConfig) -> NormalizedWeights:
        """Normalise this micro-batch's raw weights [b] (detached) for ``cfg.scope`` and ``cfg.norm``.

        ReNIO disabled: weights 1 (as mode 'none' with w = 1). Local ema updates the EMA here.
        """
        cfg.validate()
        w = raw_w.detach()
        if not cfg.enabled:
            w = torch.ones_like(w)
        norm = cfg.norm if cfg.enabled else "none"
        if norm == "clamp":
            w = w.clamp(cfg.clamp_min, cfg.clamp_max)
        divisor = self._divisor(w, norm, cfg)
        capped = norm in ("batch_mean", "ema")
        if cfg.scope == "local":
            weights = w if divisor is None else w / divisor
            weights = weights.clamp(max=cfg.max_weight) if capped else weights
            return NormalizedWeights(weights, torch.ones((), dtype=w.dtype, device=w.device), final=True)
        weights = torch.minimum(w, cfg.max_weight * divisor) if capped else w
        denominator = w.new_full((), float(w.numel()))  # no host-to-device copy: no sync per micro-batch
        if divisor is not None:
            denominator = denominator * divisor
        return NormalizedWeights(weights, denominator, final=norm == "none")

    def _divisor(self, w: torch.Tensor, norm: str, cfg: ReNIOConfig):
        """The divisor of the local formulas (global: this micro-batch's share e); None for mode 'none'."""
        if norm == "none":
            return None
        if norm != "ema":
            return w.mean()
        self.ema = self.ema.to(device=w.device, dtype=w.dtype)
        mean = w.mean()
        if cfg.scope == "local":
            self._update_ema(mean, cfg.ema_alpha)
            return self.ema
        sums = torch.stack([w.sum(), w.new_full((), float(w.numel()))])
        self._step_sums = sums if self._step_sums is None else self._step_sums + sums
        return _ema_candidate(self.ema, mean, cfg.ema_alpha)

    def _update_ema(self, mean: torch.Tensor, alpha: float) -> None:
        """ema <- mean (unset) or (1 - alpha) ema + alpha mean; unchanged when mean is not finite."""
        self.ema = torch.where(torch.isfinite(mean), _ema_candidate(self.ema, mean, alpha), self.ema)

    def end_step(self, cfg: ReNIOConfig, dp_group=None) -> None:
        """Global ema: update the EMA from this step's raw-weight mean over every micro-batch and DP rank.

        A collective over ``dp_group`` (call it on every DP rank); a no-op for other configurations.
        """
        if not (cfg.enabled and cfg.scope == "global" and cfg.norm == "ema"):
            return
        sums = self._step_sums if self._step_sums is not None else torch.zeros(2, dtype=self.ema.dtype, device=self.ema.device)
        self._step_sums = None
        if group_size(dp_group) > 1:
            sums = sums.clone()
            dist.all_reduce(sums, group=dp_group)
        self._update_ema(sums[0] / sums[1], cfg.ema_alpha)

    def state_dict(self) -> dict:
        """{'ema': 0-dim CPU tensor, NaN when unset}. Saved at step boundaries (no per-step sums)."""
        return {"ema": self.ema.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.ema = torch.as_tensor(state["ema"]).detach().clone()
