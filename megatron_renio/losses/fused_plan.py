"""What both implementations of the fused loss (:mod:`~megatron_renio.losses.fused`) read: the
constants of one call (:class:`Plan`), the token grid with the logits row each cell reads in each
model (:class:`Cells`), and the combination of per-rank statistics into the global log-sum-exps
(:func:`combine_stats`, the only communication of sweep 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_renio.losses.divergence import DivergenceConfig
from megatron_renio.renio.vocab_parallel import VocabShard, group_size

FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2  # Plan.kind


@dataclass(frozen=True)
class Plan:
    """Constants of one call: divergence kind code, beta, clip (None = no clamp), 1/T, real columns."""

    kind: int
    beta: float
    clip: float | None
    inv_temp: float
    n_valid: int

    @property
    def one_sweep(self) -> bool:
        """Forward or reverse KL without a clamp: D and H follow from sweep 1's statistics and one weighted
        sum, so the Triton forward reads the logits once (:mod:`~megatron_renio.losses.fused`)."""
        return self.kind != JSD and self.clip is None

    @staticmethod
    def build(cfg: DivergenceConfig, shard: VocabShard) -> "Plan":
        beta = float(cfg.mix)
        kind = FORWARD_KL if beta == 0.0 else REVERSE_KL if beta == 1.0 else JSD
        return Plan(kind, beta, cfg.token_clip, 1.0 / cfg.temperature, shard.num_valid)


@dataclass(frozen=True)
class Cells:
    """The [b, t] token grid of one call and the logits row that each cell reads in each model.

    ``positions`` None: the logits are [b, t, V] and cell (i, j) reads row (i, j) of both models.
    Otherwise (student, teacher), each [b, t] int64: cell (i, j) reads row (i, student[i, j]) of the
    student's logits [b, S, V] and row (i, teacher[i, j]) of the teacher's; a cell whose student
    position is -1 is empty (``fused_token_terms``).
    """

    shape: tuple[int, int]
    positions: tuple[torch.Tensor, torch.Tensor] | None

    def filled(self) -> torch.Tensor | None:
        """[b, t] bool, True where a cell holds a token; None when every cell does."""
        return None if self.positions is None else self.positions[0] >= 0

    def index(self, model: int, device: torch.device):
        """(samples [b, 1], positions [b, t]): the row of every cell in ``model`` (0 student, 1 teacher);
        empty cells point at position 0."""
        n_b, n_t = self.shape
        samples = torch.arange(n_b, device=device).unsqueeze(-1)
        if self.positions is None:
            return samples, torch.arange(n_t, device=device).expand(n_b, n_t)
        return samples, self.positions[model].clamp(min=0)

    def kernel_positions(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, teacher) positions as contiguous int32 [b, t] for the Triton kernels (-1 kept)."""
        if self.positions is None:
            n_b, n_t = self.shape
            identity = torch.arange(n_t, device=device, dtype=torch.int32).expand(n_b, n_t).contiguous()
            return identity, identity
        return tuple(p.to(torch.int32).contiguous() for p in self.positions)

    def cell_of_row(self, n_rows: int, device: torch.device) -> torch.Tensor:
        """[b, n_rows] int32: the cell that reads student row (i, r), -1 where none does."""
        n_b, n_t = self.shape
        cells = torch.arange(n_b * n_t, device=device, dtype=torch.int32).view(n_b, n_t)
        if self.positions is None:
            return cells
        positions = self.positions[0]
        target = torch.where(positions >= 0, positions, n_rows).long()  # empty cells land in a spare column
        inverse = torch.full((n_b, n_rows + 1), -1, dtype=torch.int32, device=device)
        return inverse.scatter_(1, target, cells)[:, :n_rows].contiguous()



def combine_stats(stats, bad, tp_group, inv_temp: float, shift=None):
    """Global row statistics (max, log_sum) [2, ...] (student, teacher) from per-rank statistics; and the flag.

    ``stats`` is [4, ...] = (max_s, sumexp_s, max_t, sumexp_t): the max of the raw logits z and the sum
    of exp((z - max) / T). The log-sum-exp of z / T is ``max / T + log_sum``; keeping the two apart
    lets a kernel form log-probs as (z - max) / T - log_sum, exact near the max however large the
    logits are (z / T - lse rounds at the size of lse: at |lse| ~ 500 an error of 3e-5 in every
    log-prob). Under TP: one MAX all-reduce (both maxima and the flag), then one SUM all-reduce of the
    sum-exps rescaled to the global max M, exp((m_r - M) / T) (0 for a rank whose real columns are
    empty, m_r = -inf). ``shift``: for sweeps that subtract a rounded max / T per row (``shift(max)``)
    rather than form (z - max) / T, the rescale is exp(shift(m_r) - shift(M)), so that the roundings
    of both shifts cancel against the log-probs formed with shift(M), as they do without TP.
    """
    maxes = stats[0::2]
    sum_exp = stats[1::2]
    if group_size(tp_group) > 1:
        packed = torch.cat([maxes.reshape(-1), bad.to(maxes.dtype).reshape(1)])
        dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=tp_group)
        local_max, maxes, bad = maxes, packed[:-1].view_as(maxes), packed[-1] > 0
        safe = torch.where(torch.isneginf(maxes), torch.zeros_like(maxes), maxes)
        if shift is None:
            rescale = torch.exp((local_max - safe) * inv_temp)
        else:  # exp(-shift(M)) may overflow where this rank's sum is 0 (no real columns): 0 there
            rescale = torch.where(torch.isneginf(local_max), 0.0, torch.exp(shift(local_max) - shift(safe)))
        sum_exp = sum_exp * rescale
        dist.all_reduce(sum_exp, group=tp_group)
    return maxes, sum_exp.log(), bad
