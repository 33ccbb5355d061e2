"""Per-token divergences between teacher and student on vocab-parallel logits (README, 'The method, as implemented').

With p = softmax(z^T / T) (teacher) and q = softmax(z^S / T) (student) over the full vocabulary, the
divergence *element* of vocabulary entry v is

    forward KL      d_v = p_v (log p_v - log q_v)
    reverse KL      d_v = q_v (log q_v - log p_v)
    JSD(beta)       d_v = beta p_v (log p_v - log m_v) + (1 - beta) q_v (log q_v - log m_v),
                    m_v = beta p_v + (1 - beta) q_v,   0 < beta < 1

(kind 'jsd' with beta = 0 is the forward KL and with beta = 1 the reverse KL, the reference's
convention; the JSD formula itself would vanish there). Each element is clamped before the
vocabulary sum, D_t = sum_v clamp(d_v, 0, k) with k = ``token_clip``; ``token_clip=None`` gives
D_t = sum_v d_v. Under tensor parallelism every rank clamps and sums its own shard and the partial
sums are added over TP (identity backward).

Top-k (``top_k = k``): the k largest teacher logits of each token over the whole vocabulary (local
top-k, all-gather of the k candidates of each rank, global top-k of those), both models'
logits at those ids renormalised by a log-softmax over the k entries, then the same elements and clamp.

Every element is computed from log-probs with padded entries replaced by 0 (finite), and padded
elements are set to exactly 0, so padding (log-prob -inf) never produces NaN in values or gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_renio.errors import UserInputError
from megatron_renio.renio.vocab_parallel import (
    VocabShard,
    all_reduce_max_,
    all_reduce_sum_identity_grad,
    compute_dtype,
    group_size,
    lookup,
    lookup_tokens,
    vocab_parallel_log_softmax,
)

DIVERGENCE_KINDS = ("forward_kl", "reverse_kl", "jsd")


@dataclass(frozen=True)
class DivergenceConfig:
    """What ``token_terms`` computes. ``beta`` is used by kind 'jsd' only (0 = forward KL, 1 = reverse KL)."""

    kind: str
    beta: float = 0.5
    temperature: float = 1.0
    token_clip: float | None = 0.05
    top_k: int | None = None

    def validate(self) -> None:
        """Raise :class:`UserInputError` (one line naming the field and what is allowed) on a bad value."""

        def bad(field: str, allowed: str):
            return UserInputError(f"DivergenceConfig.{field}={getattr(self, field)!r} is not allowed; allowed: {allowed}")

        if self.kind not in DIVERGENCE_KINDS:
            raise bad("kind", ", ".join(DIVERGENCE_KINDS))
        if not 0.0 <= self.beta <= 1.0:
            raise bad("beta", "a number in [0, 1]")
        if not self.temperature > 0:
            raise bad("temperature", "a number > 0")
        if self.token_clip is not None and not self.token_clip > 0:
            raise bad("token_clip", "a number > 0, or None (no clamp)")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise bad("top_k", "an integer >= 1, or None (full vocabulary)")

    @property
    def mix(self) -> float:
        """The generalised-JSD weight of the element formula: 0 forward KL, 1 reverse KL, beta in between."""
        return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(self.kind, self.beta)


@dataclass
class TokenTerms:
    """Per-token outputs of :func:`token_terms`, all [b, t].

    divergence: D (differentiable w.r.t. the student logits); student_logprobs: s = log q[x]
    (differentiable); teacher_logprobs: u = log p[x] (no gradient); nonfinite: bool scalar tensor, True
    when any real-vocabulary logit of either model is non-finite, identical on every TP rank.
    """

    divergence: torch.Tensor
    student_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor
    nonfinite: torch.Tensor


def gather_grid(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[b, S, V] -> [b, t, V]``: row ``index[i, j]`` of sample i at (i, j) (a copy)."""
    return torch.gather(logits, 1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


def _kl_elements(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """a_v (log a_v - log b_v) from finite log-probs."""
    return log_a.exp() * (log_a - log_b)


def divergence_elements(teacher_logp: torch.Tensor, student_logp: torch.Tensor, mix: float, valid=None) -> torch.Tensor:
    """Per-entry d_v (module docstring) for ``mix`` = 0 (forward KL), 1 (reverse KL) or beta in (0, 1) (JSD).

    ``valid`` (bool, broadcast over the last dim): entries where it is False are padding; they give 0.
    log m_v = logaddexp(log beta + log p_v, log(1 - beta) + log q_v) stays finite where p, q underflow.
    """
    if valid is not None:
        teacher_logp = teacher_logp.masked_fill(~valid, 0.0)
        student_logp = student_logp.masked_fill(~valid, 0.0)
    if mix == 0.0:
        d = _kl_elements(teacher_logp, student_logp)
    elif mix == 1.0:
        d = _kl_elements(student_logp, teacher_logp)
    else:
        log_m = torch.logaddexp(teacher_logp + math.log(mix), student_logp + math.log1p(-mix))
        d = mix * _kl_elements(teacher_logp, log_m) + (1.0 - mix) * _kl_elements(student_logp, log_m)
    return d if valid is None else d.masked_fill(~valid, 0.0)


def _clamped_sum(elements: torch.Tensor, token_clip: float | None) -> torch.Tensor:
    """sum_v clamp(d_v, 0, k) over the last dim; no clamp when k is None."""
    return (elements if token_clip is None else elements.clamp(0.0, token_clip)).sum(dim=-1)


def _nonfinite(student_logits: torch.Tensor, teacher_logits: torch.Tensor, shard: VocabShard, tp_group) -> torch.Tensor:
    """True (on every TP rank) when any real-vocabulary logit of either model is inf or NaN."""
    with torch.no_grad():
        n = shard.num_valid
        bad = ~(torch.isfinite(student_logits[..., :n]).all() & torch.isfinite(teacher_logits[..., :n]).all())
        return all_reduce_max_(bad.to(torch.float32).reshape(1), tp_group)[0] > 0


def _teacher_top_k(teacher_logits: torch.Tensor, k: int, shard: VocabShard, tp_group):
    """(logits [..., k], global ids [..., k]) of the teacher's k largest real logits over the whole vocabulary."""
    z = teacher_logits.to(compute_dtype(teacher_logits)).masked_fill(~shard.valid_mask(teacher_logits.device), float("-inf"))
    values, ids = z.topk(min(k, shard.size), dim=-1)
    ids = ids + shard.start
    if group_size(tp_group) > 1:
        parts = [torch.empty_like(values) for _ in range(group_size(tp_group))]
        dist.all_gather(parts, values.contiguous(), group=tp_group)
        id_parts = [torch.empty_like(ids) for _ in range(group_size(tp_group))]
        dist.all_gather(id_parts, ids.contiguous(), group=tp_group)
        values, ids = torch.cat(parts, dim=-1), torch.cat(id_parts, dim=-1)
    values, pos = values.topk(k, dim=-1)
    return values, ids.gather(-1, pos)


def token_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    cfg: DivergenceConfig,
    shard: VocabShard,
    tp_group,
) -> TokenTerms:
    """D_t, s_t = log q[x_t], u_t = log p[x_t] and the non-finite flag for vocab-parallel logits [b, t, V_local].

    tokens: [b, t] global ids (ids outside the real vocabulary give s = u = 0). D follows the module
    docstring (full vocabulary, or the teacher's top-k); s and u are always full-vocabulary log-probs
    at temperature T. The teacher side runs under no_grad. Computed in float32 (float64 inputs stay
    float64). A non-finite logit does not raise: the flag is returned and the trainer skips the step.
    """
    cfg.validate()
    if cfg.top_k is not None and cfg.top_k > shard.true_vocab_size:
        raise UserInputError(
            f"DivergenceConfig.top_k={cfg.top_k} is not allowed; allowed: at most the vocabulary size {shard.true_vocab_size}"
        )
    nonfinite = _nonfinite(student_logits, teacher_logits, shard, tp_group)
    student_logp = vocab_parallel_log_softmax(student_logits, shard, cfg.temperature, tp_group)
    student_lp = lookup_tokens(student_logp, tokens, shard, tp_group)
    with torch.no_grad():
        teacher_logp = vocab_parallel_log_softmax(teacher_logits, shard, cfg.temperature, tp_group)
        teacher_lp = lookup_tokens(teacher_logp, tokens, shard, tp_group)
    if cfg.top_k is None:
        elements = divergence_elements(teacher_logp, student_logp, cfg.mix, shard.valid_mask(student_logp.device))
        divergence = all_reduce_sum_identity_grad(_clamped_sum(elements, cfg.token_clip), tp_group)
    else:
        with torch.no_grad():
            teacher_top, top_ids = _teacher_top_k(teacher_logits, cfg.top_k, shard, tp_group)
            teacher_top_logp = torch.log_softmax(teacher_top / cfg.temperature, dim=-1)
        student_top = lookup(student_logits.to(compute_dtype(student_logits)), top_ids, shard, tp_group)
        student_top_logp = torch.log_softmax(student_top / cfg.temperature, dim=-1)
        divergence = _clamped_sum(divergence_elements(teacher_top_logp, student_top_logp, cfg.mix), cfg.token_clip)
    return TokenTerms(divergence=divergence, student_logprobs=student_lp, teacher_logprobs=teacher_lp, nonfinite=nonfinite)
