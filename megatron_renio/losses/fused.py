"""Fused vocab-parallel divergence, sampled-token log-probs and student gradient.

:func:`fused_token_terms` returns the same :class:`~megatron_renio.losses.divergence.TokenTerms` as
:func:`~megatron_renio.losses.divergence.token_terms` (forward KL, reverse KL, JSD(beta) with its
endpoints, per-entry clamp or none, temperature, padded vocabulary) without materialising log-probs,
probabilities or divergence elements of the vocabulary: nothing logits-sized is allocated besides
the gradient itself; between forward and backward it keeps only per-token values and references to
the two logits tensors, which backward reads again.

Notation (per token; vocabulary index v over the FULL vocabulary, split across tensor-parallel ranks):
a_v = z^S_v / T, b_v = z^T_v / T, log q_v = a_v - LSE_S, log p_v = b_v - LSE_T, where LSE is the
log-sum-exp over the real (unpadded) vocabulary; d_v is the divergence element of :mod:`~megatron_renio.losses.divergence` and
D = sum_v clamp(d_v, 0, k) (no clamp when ``token_clip`` is None).

Gradient. d log q_v / d z_j = (delta_vj - q_j) / T, so for D = sum_v c(d_v), c the clamp,

    dD/dz_j = (1/T) sum_v g_v (d d_v / d log q_v) (delta_vj - q_j) = (h_j - q_j H) / T,
    h_v = g_v * d d_v / d log q_v,   H = sum_v h_v (over the full vocabulary),

where g_v = c'(d_v) = 1 for 0 <= d_v <= k and 0 otherwise (torch.clamp's convention at the two
boundaries, so the numbers equal autograd through torch.clamp), g_v = 1 without a clamp. The teacher
log-probs are constants. Per divergence kind (p, q, m are probabilities; derivative at fixed p):

- forward KL, d_v = p_v (log p_v - log q_v):        d d_v / d log q_v = -p_v
- reverse KL, d_v = q_v (log q_v - log p_v):        d d_v / d log q_v = d_v + q_v
  (q_v log q_v differentiates to q_v log q_v + q_v)
- JSD(beta), m_v = beta p_v + (1 - beta) q_v,
  d_v = beta p_v (log p_v - log m_v) + (1 - beta) q_v (log q_v - log m_v):
  using d log m_v / d log q_v = (1 - beta) q_v / m_v, the two terms in log m_v contribute
  -(beta p_v + (1 - beta) q_v) (1 - beta) q_v / m_v = -(1 - beta) q_v, which cancels the "+ q_v" of
  the q log q term:                                  d d_v / d log q_v = (1 - beta) q_v (log q_v - log m_v)
  (beta = 0 and beta = 1 are forward and reverse KL, as in ``DivergenceConfig``; the formula above
  would give 0 at beta = 1, so the endpoints map to the KL kinds.)

With gD, gs the incoming gradients of D and of the sampled-token log-prob s = log q_x
(ds/dz_j = (delta_xj - q_j) / T; gs counts only for tokens of the real vocabulary, for other ids s is
the constant 0, as in ``token_terms``):

    dL/dz_j = (gD h_j - q_j (gD H + gs)) / T + [j == x] gs / T.

Sweeps over one rank's shard [b, t, V_local], each reading both logits shards once:

1. statistics (forward): max and sum-exp of a and b (online across vocabulary blocks: a running max
   per block, or per group of entries with ``TritonLaunch.max_group``, and about one exponential per
   entry), the non-finite flag. Combined across TP with
   two O(b*t) all-reduces: M = max_r m_r, then S = sum_r S_r * exp((m_r - M) / T); LSE = M / T + log S,
   with m_r, M maxima of the raw logits (``fused_plan.combine_stats``).
2. terms (forward): per token the local sums of clamp(d_v) and of h_v, and the local lookups of the
   sampled token's log-probs, all four summed over TP in one O(b*t) all-reduce.
3. gradient (backward): h_j and q_j recomputed from both shards and the saved per-token row
   statistics (M and log S of each model) and H, the formula above written straight into the
   gradient. No communication (the outputs
   are identical on every TP rank and each rank differentiates its own shard, the identity-backward
   convention of Megatron's reductions).

Why three sweeps and not the gradient inside the forward: the clamp mask g_v needs the global LSE
(sweep 1 must finish first), H needs the whole masked row (sweep 2 must finish before any gradient
entry is final), and gD, gs come from the loss only after the forward (the ReNIO weights are formed
from s and u of every token). Writing a Jacobian (h - qH)/T in the forward would cost a stored
logits-sized tensor and a scaling sweep in backward (read + write), more traffic than recomputing.

One-sweep forward (``Plan.one_sweep``: forward or reverse KL without a clamp; Triton path). There
D needs no per-entry normalised value: with w the weighting model (p for forward KL, q for reverse
KL) and o the other, log w_v - log o_v = (z^w_v - z^o_v) / T - LSE_w + LSE_o, so

    D = sum_v w_v (log w_v - log o_v) = E_w[z^w - z^o] / T - LSE_w + LSE_o,

and E_w[z^w - z^o] = sum_v e^(z^w_v / T - M) (z^w_v - z^o_v) / S_w is one more online sum, rescaled
with the running max exactly as S_w is. H is -1 (forward KL) or D + 1 (reverse KL), per shard
-P_r and D_r + P_r with P_r the shard's mass of w. So sweep 1 alone gives D, H, s and u, and the
forward reads each logits tensor once (2 logits-sized reads instead of 4; 5 units forward + backward
instead of 7). Under TP each rank turns its shard's sums into its shares D_r, H_r after the two
statistics all-reduces (``fused_triton._one_sweep_terms``), and the shares are summed as sweep 2's.

Precision: arithmetic in fp32 for fp32/bf16/fp16 inputs (fp64 kept by the chunked path), with the
GPU's approximate exponential and log2 in the Triton kernels; the gradient is rounded once, to the
logits' dtype. tests/test_fused_loss.py states the tolerances against ``token_terms``. The Triton
kernels form log-probs as (z - M) / T - log S, z - M exact near the max; the chunked path as
(z/T - M/T) - log S, one fused multiply-add with M/T rounded once per row (a shift common to the row,
which cancels against log S). Both keep fp32 precision however large the logits: formed as
z / T - LSE they rounded at the size of the LSE, and on logits of standard deviation 24 (maxima near
100) reverse KL's gradient missed the fp32 tolerance by 3.7-8.3x in the Triton kernels, D and the
gradient by 1.1-1.6x in the chunked path. The
one-sweep D is a difference of two terms that each grow with the offset between the two models'
logits; sweep 1 subtracts each model's first-block max from its own logits before the difference,
and ``fused_triton._one_sweep_terms`` adds the offsets back in raw logits:
at offsets of 50-300 nats its error is 0.6-1.5x the two-sweep path's (measured on the CPU).

Implementations: ``'triton'`` (:mod:`~megatron_renio.losses.fused_triton`: GPU kernels, each program
walking token rows and looping over vocabulary blocks; also runs on CPU tensors under
``TRITON_INTERPRET=1``) and ``'chunked'`` (:mod:`~megatron_renio.losses.fused_chunked`: PyTorch over
blocks of token rows spanning the local vocabulary, so no temporary is larger than a block).
``'auto'`` picks triton for CUDA inputs when triton imports, chunked otherwise. Both read the
constants and token grid of :mod:`~megatron_renio.losses.fused_plan`.

Rows are addressed through the two leading strides, so Megatron's [s, b, V] logits transposed to
[b, s, V] are read in place and the gradient has the student's strides. With ``positions`` the
token grid [b, t] is separate from the logits [b, S, V] (``fused_plan.Cells``): each grid cell
names the row it reads in each model, empty cells are skipped, and the gradient kernel walks every row of the
student's logits, writing a cell's gradient or zeros; the trainer so reads the completion rows of
whole sequences without copying them (the chunked path copies one block of rows at a time).
``cfg.top_k`` (teacher top-k renormalisation) is not fused: such calls return
:func:`~megatron_renio.losses.divergence.token_terms`, on gathered rows with ``positions``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from megatron_renio.errors import UserInputError
from megatron_renio.losses import fused_triton
from megatron_renio.losses.divergence import DivergenceConfig, TokenTerms, gather_grid, token_terms
from megatron_renio.losses.fused_chunked import block_threads, chunked_blocks, chunked_forward, chunked_grad
from megatron_renio.losses.fused_plan import Cells, Plan
from megatron_renio.losses.fused_triton import triton_available
from megatron_renio.renio.vocab_parallel import VocabShard, compute_dtype, group_size

__all__ = ["IMPLS", "fused_token_terms", "triton_available"]

IMPLS = ("auto", "triton", "chunked")


class _FusedTokenTerms(torch.autograd.Function):
    """(student, teacher, tokens) -> (D, s, u, nonfinite) per cell; gradient w.r.t. the student logits only."""

    @staticmethod
    def forward(ctx, zs, zt, tokens, cells: Cells, plan: Plan, shard: VocabShard, tp_group, use_triton: bool,
                need_grad: bool):
        local = tokens.to(torch.int64) - shard.start
        here = (local >= 0) & (local < plan.n_valid)
        filled = cells.filled()
        col = torch.where(here if filled is None else here & filled, local, -1)
        blocks = None  # the chunked path's, for its backward too
        if use_triton:
            col = col.to(torch.int32).contiguous()
            row_stats, d_sum, h_sum, s, u, bad = fused_triton.triton_forward(zs, zt, cells, col, plan, tp_group)
        else:
            blocks = chunked_blocks(cells, plan.n_valid)
            with block_threads(zs.device) as workers:
                row_stats, d_sum, h_sum, s, u, bad = chunked_forward(zs, zt, cells, blocks, col, plan, tp_group,
                                                                     workers)
        per_token = torch.stack([d_sum, h_sum, s, u])
        if group_size(tp_group) > 1:
            dist.all_reduce(per_token, group=tp_group)
        d_sum, h_sum, s, u = per_token.unbind(0)
        ctx.mark_non_differentiable(u, bad)
        if need_grad:
            in_vocab = (tokens >= 0) & (tokens < shard.true_vocab_size)  # else s = 0, a constant
            ctx.save_for_backward(zs, zt, row_stats, h_sum, col, in_vocab)
        ctx.cells, ctx.plan, ctx.use_triton, ctx.blocks = cells, plan, use_triton, blocks
        ctx.grad_launch = fused_triton.TRITON_GRAD_LAUNCH  # the launch in effect at the forward, as for its kernels
        return d_sum, s, u, bad

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_d, grad_s, _grad_u, _grad_bad):
        zs, zt, row_stats, h_sum, col, in_vocab = ctx.saved_tensors
        cells, plan = ctx.cells, ctx.plan
        grad_s = torch.where(in_vocab, grad_s, 0.0)
        coef_h = grad_d * plan.inv_temp
        coef_q = (grad_d * h_sum + grad_s) * plan.inv_temp
        coef_x = torch.where(col >= 0, grad_s * plan.inv_temp, 0.0)
        if ctx.use_triton:  # the kernel writes every entry
            grad = torch.empty_like(zs)  # the student's strides (dense: a view of a contiguous tensor)
            fused_triton.triton_grad(zs, zt, cells, col, plan, row_stats, (coef_h, coef_q, coef_x), grad,
                                     ctx.grad_launch)
            return grad, *[None] * 8
        with block_threads(zs.device) as workers:
            if cells.positions is None:  # every row is a cell's: only the padding columns need zeros
                grad = torch.empty_like(zs)
                grad[..., plan.n_valid:] = 0
            else:
                grad = torch.zeros_like(zs)
            chunked_grad(zs, zt, cells, ctx.blocks, plan, row_stats, (coef_h, coef_q), grad, workers)
            samples, positions = cells.index(0, zs.device)  # coef_x is 0 at empty cells
            grad.index_put_((samples.expand_as(positions), positions, col.clamp(min=0)), coef_x.to(grad.dtype),
                            accumulate=True)
        return grad, *[None] * 8


def _check_shapes(student_logits, teacher_logits, tokens, shard: VocabShard, positions) -> None:
    """One-line UserInputError unless the logits, tokens and positions fit together (``fused_token_terms``)."""
    shapes = f"student logits {tuple(student_logits.shape)}, teacher logits {tuple(teacher_logits.shape)}, " \
             f"tokens {tuple(tokens.shape)}"
    if positions is None:
        expected = f"logits [b, t, {shard.size}] (the shard size) and tokens [b, t]"
        fits = student_logits.shape == teacher_logits.shape and student_logits.shape[:2] == tokens.shape
    else:
        expected = f"logits [b, S, {shard.size}] (the shard size), tokens and both positions [b, t] (integers)"
        shapes += ", positions " + ", ".join(str(tuple(p.shape)) for p in positions)
        fits = (len(positions) == 2 and all(p.shape == tokens.shape and not p.is_floating_point() for p in positions)
                and student_logits.shape[0] == teacher_logits.shape[0] == tokens.shape[0]
                and teacher_logits.shape[-1] == student_logits.shape[-1])
    if not fits or student_logits.dim() != 3 or student_logits.shape[-1] != shard.size:
        raise UserInputError(f"fused_token_terms: {shapes}; expected {expected}")


def fused_token_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    cfg: DivergenceConfig,
    shard: VocabShard,
    tp_group=None,
    *,
    impl: str = "auto",
    positions: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> TokenTerms:
    """Fused :func:`~megatron_renio.losses.divergence.token_terms`: same contract, same numbers.

    student_logits, teacher_logits: [b, t, V_local] vocabulary shards (any float dtype, last dim
    contiguous; other strides free); tokens: [b, t] global ids (ids outside the real vocabulary give
    s = u = 0). Returns ``TokenTerms`` with divergence D [b, t] (differentiable w.r.t. the student
    logits), student_logprobs s [b, t] (differentiable), teacher_logprobs u [b, t] (no grad), all
    float32 (float64 for float64 inputs), and the TP-agreed non-finite flag. The teacher logits
    never receive a gradient; backward reads them again (they are kept, not copied, until then).

    ``positions`` (student, teacher), each [b, t] integer: the logits are whole sequences
    [b, S, V_local] (S may differ between the models) and cell (i, j) reads row (i, student[i, j]) of
    the student's logits and row (i, teacher[i, j]) of the teacher's. A student position of -1 marks
    an empty cell: D = s = u = 0 there, and its rows count neither for the flag nor the gradient. The
    filled cells of a sample must read distinct student rows. The gradient is [b, S, V_local], 0 on
    the rows no cell reads. This is how the trainer reads the completion rows where the models wrote
    them, instead of gathering both into [b, t, V_local] copies and scattering the gradient back.

    ``impl``: 'auto' (triton for CUDA inputs when triton imports, else chunked), 'triton' (CUDA
    tensors, or CPU tensors under TRITON_INTERPRET=1), 'chunked'. Arithmetic in float32; the chunked
    path keeps float64 inputs in float64 as ``token_terms`` does ('auto' sends them there).
    ``cfg.top_k`` set: falls back to ``token_terms`` (top-k is not fused) on gathered rows.
    """
    if impl not in IMPLS:
        raise UserInputError(f"fused_token_terms: impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    cfg.validate()
    _check_shapes(student_logits, teacher_logits, tokens, shard, positions)
    if positions is not None:  # the teacher position of an empty cell is never read: make it -1 (reads as 0)
        positions = (positions[0], torch.where(positions[0] >= 0, positions[1], -1))
    if cfg.top_k is not None:
        return _unfused_on_rows(student_logits, teacher_logits, tokens, cfg, shard, tp_group, positions)
    fp32_compute = compute_dtype(student_logits) == torch.float32
    if impl == "triton" and (not triton_available() or not fp32_compute):
        raise UserInputError(
            "fused_token_terms: impl='triton' needs the triton package and fp32/bf16/fp16 logits; "
            f"triton {'present' if triton_available() else 'missing'}, logits {student_logits.dtype}"
        )
    if impl == "triton" and not student_logits.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserInputError("fused_token_terms: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    use_triton = impl == "triton" or (impl == "auto" and triton_available() and student_logits.is_cuda and fp32_compute)
    student = student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous()
    teacher = teacher_logits.detach()
    teacher = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    cells = Cells(tuple(tokens.shape), positions)
    plan = Plan.build(cfg, shard)
    d_sum, s, u, bad = _FusedTokenTerms.apply(student, teacher, tokens, cells, plan, shard, tp_group, use_triton,
                                              need_grad)
    return TokenTerms(divergence=d_sum, student_logprobs=s, teacher_logprobs=u, nonfinite=bad)


def _unfused_on_rows(student_logits, teacher_logits, tokens, cfg, shard, tp_group, positions) -> TokenTerms:
    """``token_terms`` on the rows the cells read (gathered copies with ``positions``; empty cells give 0)."""
    if positions is None:
        return token_terms(student_logits, teacher_logits, tokens, cfg, shard, tp_group)
    filled = positions[0] >= 0
    student, teacher = (gather_grid(z, torch.where(filled, p, 0)) for z, p in zip((student_logits, teacher_logits),
                                                                                 positions))
    terms = token_terms(student, teacher, torch.where(filled, tokens, -1), cfg, shard, tp_group)
    terms.divergence = torch.where(filled, terms.divergence, 0.0)
    return terms
