"""Log-softmax and token log-probs over a vocabulary split across tensor-parallel ranks.

Rank r of the TP group holds the logits shard z[..., V_local] of global vocabulary entries
[r * V_local, (r + 1) * V_local) (:class:`VocabShard`). Entries with global id >= true_vocab_size are
Megatron's vocabulary padding: they are treated as logits of -inf (probability exactly 0).
Nothing here gathers the vocabulary; only O(b * t) values cross ranks:

    M          = max_r max_v z_rv / T                   (all-reduce MAX, no gradient: a shift only)
    S          = sum_r sum_v exp(z_rv / T - M)          (all-reduce SUM, *summing* backward)
    log q_rv   = z_rv / T - M - log S                   (this rank's shard of the log-softmax)
    log q[x]   = sum_r [x in shard r] log q_r,x         (all-reduce SUM, *identity* backward)

Gradient convention (Megatron's): the loss is computed identically on every TP rank and each rank
back-propagates it into its own shard. A value that every rank consumes whole (a final cross-rank
sum such as log q[x]) therefore needs an identity backward: each rank's copy already carries the full
gradient. An intermediate that each rank consumes only through its *local* terms (S, used by the
local log-probs, whose contributions are later summed across ranks) needs a summing backward: the
gradient of S is the sum of every rank's local contribution. Using the summing backward for the final
sum would count the gradient TP times.

``tp_group=None`` (or a group of size 1) means no tensor parallelism and no communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def group_size(group) -> int:
    """Number of ranks in ``group``; 1 for ``None`` (no parallelism)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank in ``group``; 0 for ``None``."""
    return 0 if group is None else dist.get_rank(group)


@dataclass(frozen=True)
class VocabShard:
    """The global vocabulary entries [start, start + size) held by this rank; ids >= true_vocab_size are padding."""

    start: int
    size: int
    true_vocab_size: int

    @classmethod
    def for_rank(cls, local_size: int, true_vocab_size: int, tp_group) -> "VocabShard":
        """This rank's shard: start = tp_rank * local_size."""
        return cls(group_rank(tp_group) * local_size, local_size, true_vocab_size)

    @property
    def num_valid(self) -> int:
        """Real (unpadded) entries of the shard; they are its first ``num_valid`` columns."""
        return min(max(self.true_vocab_size - self.start, 0), self.size)

    def valid_mask(self, device=None) -> torch.Tensor:
        """Bool [size]: True for real vocabulary entries, False for padding."""
        return torch.arange(self.size, device=device) < self.num_valid


class _AllReduceSumSummedGrad(torch.autograd.Function):
    """y = sum over the group of x; dL/dx = sum over the group of dL/dy."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum_summed_grad(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable sum over ``group`` whose backward also sums, dL/dx = sum over the group of dL/dy
    (for intermediates every rank then uses locally; torch.distributed.nn's all-reduce does this but is
    deprecated in torch 2.13, and Megatron has no such mapping)."""
    return x if group_size(group) == 1 else _AllReduceSumSummedGrad.apply(x, group)


def all_reduce_sum_identity_grad(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable sum over ``group`` whose backward is the identity, dL/dx = dL/dy (Megatron's
    ``reduce_from_tensor_model_parallel_region``; for final, replicated sums). ``x`` is left as it is:
    Megatron's mapping reduces its input in place, so it gets a copy."""
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    if group_size(group) == 1:
        return x
    return reduce_from_tensor_model_parallel_region(x.clone(memory_format=torch.contiguous_format), group=group)


def all_reduce_max_(x: torch.Tensor, group) -> torch.Tensor:
    """In-place max over ``group`` of a tensor that carries no gradient; returns ``x``."""
    if group_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """Arithmetic dtype of the loss path: float32, or the input's dtype when that is wider (float64)."""
    return torch.promote_types(logits.dtype, torch.float32)


def vocab_parallel_log_softmax(logits: torch.Tensor, shard: VocabShard, temperature: float, tp_group) -> torch.Tensor:
    """This rank's shard [..., V_local] of log softmax(z / T) over the FULL vocabulary; padding = -inf.

    log q_v = z_v / T - M - log S with M the TP-global max and S = sum over every rank's real entries
    of exp(z_v / T - M) (module docstring). Differentiable w.r.t. ``logits``; padded entries get a
    zero gradient. Computed in :func:`compute_dtype`.
    """
    z = logits.to(compute_dtype(logits)) / temperature
    z = z.masked_fill(~shard.valid_mask(z.device), float("-inf"))
    z_max = all_reduce_max_(z.detach().amax(dim=-1, keepdim=True), tp_group)
    shifted = z - z_max
    sum_exp = all_reduce_sum_summed_grad(shifted.exp().sum(dim=-1, keepdim=True), tp_group)
    return shifted - sum_exp.log()


def lookup(values: torch.Tensor, ids: torch.Tensor, shard: VocabShard, tp_group) -> torch.Tensor:
    """values[..., x] for global vocabulary ids x [..., n] from vocab-sharded values [..., V_local].

    Each rank picks the ids that are real entries of its shard (0 elsewhere) and the picks are summed
    over TP with an identity backward. Ids outside the real vocabulary (padding ids, ignore ids such
    as -100) give 0 on every rank, never -inf.
    """
    local = ids.to(torch.int64) - shard.start
    owned = (local >= 0) & (local < shard.num_valid)
    picked = values.gather(-1, torch.where(owned, local, 0))
    return all_reduce_sum_identity_grad(torch.where(owned, picked, 0.0), tp_group)


def lookup_tokens(values: torch.Tensor, tokens: torch.Tensor, shard: VocabShard, tp_group) -> torch.Tensor:
    """values[b, t, x_bt] [b, t] for token ids x [b, t] (:func:`lookup` with one id per position)."""
    return lookup(values, tokens.unsqueeze(-1), shard, tp_group).squeeze(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, shard: VocabShard, temperature: float, tp_group) -> torch.Tensor:
    """log softmax(z / T)[x] [b, t] for global token ids x [b, t]: masked local lookup + TP sum.

    Differentiable w.r.t. ``logits`` (summing backward inside the log-softmax, identity backward for
    the final sum). Tokens outside the real vocabulary give 0 (see :func:`lookup`).
    """
    return lookup_tokens(vocab_parallel_log_softmax(logits, shard, temperature, tp_group), tokens, shard, tp_group)
