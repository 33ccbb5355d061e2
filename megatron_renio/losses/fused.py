"""Fused vocab-parallel divergence, sampled-token log-probs and student gradient (issue 7).

:func:`fused_token_terms` returns the same :class:`~megatron_renio.losses.divergence.TokenTerms` as
:func:`~megatron_renio.losses.divergence.token_terms` (forward KL, reverse KL, JSD(beta) with its
endpoints, per-entry clamp or none, temperature, padded vocabulary) while reading each logits shard
twice in the forward and writing one logits-sized tensor, instead of materialising log-probs,
probabilities and divergence elements of the whole vocabulary for autograd.

Notation (per token; vocabulary index v over the FULL vocabulary, split across tensor-parallel ranks):
a_v = z^S_v / T, b_v = z^T_v / T, log q_v = a_v - LSE_S, log p_v = b_v - LSE_T, where LSE is the
log-sum-exp over the real (unpadded) vocabulary; d_v is the divergence element of DESIGN.md §2 and
D = sum_v clamp(d_v, 0, k) (no clamp when ``token_clip`` is None).

Passes over one rank's shard [b, t, V_local]:

1. statistics: max and sum-exp of a and b (fp32 accumulation of any input dtype; online across
   vocabulary blocks in the Triton kernel) and a non-finite flag. Combined across TP with two O(b*t)
   all-reduces: M = max_r m_r, then S = sum_r S_r * exp(m_r - M); LSE = M + log S.
2. terms: per token the local sums of clamp(d_v) and of h_v (below), the local lookups of the
   sampled token's log-probs, all four summed over TP in one O(b*t) all-reduce; and, when the student
   logits need a gradient, h_v written to a buffer of the logits' shape and dtype.

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

H couples every vocabulary entry of a token (it is the "through the normaliser" term), so it is known
only after pass 2 and its TP all-reduce. The buffer therefore holds h, and backward finishes the
gradient in place with per-token scalars, also covering the sampled-token log-prob s = log q_x,
ds/dz_j = (delta_xj - q_j) / T:

    dL/dz_j = (gD h_j - q_j (gD H + gs)) / T + [j == x] gs / T,

with gD, gs the incoming gradients of D and s (gs counts only for tokens of the real vocabulary:
for other ids s is the constant 0, as in ``token_terms``). backward reads the student logits once more to form
q_j (one exp per entry); it needs no communication (the outputs are identical on every TP rank and
each rank differentiates its own shard, the identity-backward convention of Megatron's reductions).
Peak extra memory is the one buffer; the returned gradient IS that buffer, so backward may run once
(``retain_graph`` double backward raises). Memory traffic in units of one logits tensor: forward
2 + 2 reads + 1 write (the write only with grad), backward 2 reads + 1 write: 8 units, against 3 for
the bandwidth floor (read both logits once, write one gradient). The extra passes come from the
exact clamp gradient: the clamp mask needs the global LSE (a full pass first), and H needs the whole
row of the second pass before any gradient entry is final, so the gradient cannot be finished there.

Precision: arithmetic in fp32 for fp32/bf16/fp16 inputs. The buffer holds h in the logits' dtype,
so with bf16 logits the gradient carries the rounding of h (2^-9 |h_j| gD / T) besides its own; h
exceeds the gradient it cancels to only for large unclamped elements (the reference clamp k = 0.05
bounds it). tests/test_fused_loss.py states the tolerances against ``token_terms``.

Implementations: ``'triton'`` (GPU kernels, one program per token row looping over vocabulary
blocks; also runs on CPU tensors under ``TRITON_INTERPRET=1``) and ``'chunked'`` (PyTorch over
blocks of token rows spanning the local vocabulary, about ``_CHUNK_ELEMS`` elements, so no
temporary is larger than a block; without TP the terms of a block follow its statistics while it is
in cache and reuse their exponentials, q = exp(a - m) / S; on one intra-op thread, see
``_one_intra_op_thread``). Both address rows through the two leading strides, so Megatron's
[s, b, V] logits transposed to [b, s, V] are read in place. ``'auto'`` picks triton for CUDA inputs
when triton imports, chunked otherwise. ``cfg.top_k`` (teacher top-k renormalisation) is not fused:
such calls return :func:`~megatron_renio.losses.divergence.token_terms` unchanged.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from megatron_renio.errors import UserInputError
from megatron_renio.losses.divergence import DivergenceConfig, TokenTerms, token_terms
from megatron_renio.renio.vocab_parallel import VocabShard, compute_dtype, group_size

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the chunked PyTorch path is always available
    triton = None

IMPLS = ("auto", "triton", "chunked")
_FORWARD_KL, _REVERSE_KL, _JSD = 0, 1, 2
# Elements per block of the chunked path (rows x local vocabulary): a few fp32 temporaries of this
# size stay in a CPU core's L2 cache.
_CHUNK_ELEMS = 1 << 16
# Vocabulary entries per Triton loop step.
_TRITON_BLOCK_V = 4096


@dataclass(frozen=True)
class _Plan:
    """Constants of one call: divergence kind code, beta, clip (None = no clamp), 1/T, real columns."""

    kind: int
    beta: float
    clip: float | None
    inv_temp: float
    n_valid: int

    @staticmethod
    def build(cfg: DivergenceConfig, shard: VocabShard) -> "_Plan":
        beta = float(cfg.mix)
        kind = _FORWARD_KL if beta == 0.0 else _REVERSE_KL if beta == 1.0 else _JSD
        return _Plan(kind, beta, cfg.token_clip, 1.0 / cfg.temperature, shard.num_valid)


# ----------------------------------------------------------------------------------------------
# Chunked PyTorch implementation
# ----------------------------------------------------------------------------------------------


def _row_blocks(n_b: int, n_t: int, n_cols: int):
    """Yield (b-slice, t-slice) pairs tiling the [n_b, n_t] token grid, each about _CHUNK_ELEMS / n_cols rows.

    Slicing the two leading dimensions (rather than flattening them) keeps every block a view, also
    for Megatron's [s, b, V] logits transposed to [b, s, V].
    """
    rows = max(1, _CHUNK_ELEMS // max(n_cols, 1))
    t_step = min(n_t, rows)
    b_step = max(1, rows // t_step)
    for b0 in range(0, n_b, b_step):
        for t0 in range(0, n_t, t_step):
            yield slice(b0, b0 + b_step), slice(t0, t0 + t_step)


def _scaled(z_block: torch.Tensor, inv_temp: float, shift: torch.Tensor) -> torch.Tensor:
    """New tensor z/T - shift (shift per row) in the dtype of ``shift``, in one pass over the block."""
    return torch.add(shift.neg().unsqueeze(-1), z_block, alpha=inv_temp)


def _chunk_stats(z_block: torch.Tensor, inv_temp: float):
    """(max of z/T, sum of exp(z/T - max), non-finite flag, the exp block) over the last dim.

    The non-finite test is a row sum of the logits (inf, -inf or NaN anywhere makes it non-finite),
    cheaper on the CPU than an elementwise isfinite.
    """
    dtype = compute_dtype(z_block)
    if z_block.shape[-1] == 0:  # a TP rank holding only vocabulary padding
        empty = z_block.new_full(z_block.shape[:-1], float("-inf"), dtype=dtype)
        return empty, torch.zeros_like(empty), torch.zeros((), dtype=torch.bool, device=z_block.device), None
    row_max = z_block.amax(-1).to(dtype) * inv_temp  # max(z)/T == max(z/T) for T > 0
    bad = ~torch.isfinite(z_block.sum(-1)).all()
    exps = _scaled(z_block, inv_temp, torch.where(torch.isneginf(row_max), 0.0, row_max)).exp_()
    return row_max, exps.sum(-1), bad, exps


def _chunk_terms(zs_block, zt_block, lse_s, lse_t, plan: _Plan, h_out, exps=None):
    """Per-token clamped divergence sum and H of one block; writes h into ``h_out`` when given.

    ``exps``: optional ((exp(a - m_s), S_s), (exp(b - m_t), S_t)) from :func:`_chunk_stats` when those
    statistics are already global (no TP): then q = exp_s / S_s and p = exp_t / S_t need no new exp.
    """
    ls = _scaled(zs_block, plan.inv_temp, lse_s)
    lp = _scaled(zt_block, plan.inv_temp, lse_t)

    def prob(i, log_prob):
        if exps is None:
            return log_prob.exp()
        e, total = exps[i]
        return e.div_(total.unsqueeze(-1))

    if plan.kind == _FORWARD_KL:
        p = prob(1, lp)
        d = lp.sub_(ls).mul_(p)
        h = p.neg_()
    elif plan.kind == _REVERSE_KL:
        q = prob(0, ls)
        d = ls.sub_(lp).mul_(q)
        h = q.add_(d)
    else:  # with p' = beta p and q' = (1 - beta) q: m = p' + q', h = q' (ls - lm), d = p' (lp - lm) + h
        p = prob(1, lp).mul_(plan.beta)
        q = prob(0, ls).mul_(1.0 - plan.beta)
        log_m = torch.add(p, q).clamp_min_(torch.finfo(p.dtype).tiny).log_()
        h = ls.sub_(log_m).mul_(q)
        d = lp.sub_(log_m).mul_(p).add_(h)
    if plan.clip is not None:
        clamped = d.clamp(0.0, plan.clip)
        h.mul_(d.eq_(clamped))  # 1 where 0 <= d <= k, else 0 (torch.clamp's gradient mask)
        d = clamped
    if h_out is not None:
        h_out.copy_(h)
    return d.sum(-1), h.sum(-1)


def _chunk_grad(zs_block, lse_s, coef_h, coef_q, inv_temp: float, buf_block):
    """In place on ``buf_block`` (holding h): coef_h * h - coef_q * q, per-token coefficients."""
    q = _scaled(zs_block, inv_temp, lse_s).exp_()
    g = buf_block.to(lse_s.dtype)  # the buffer itself unless it is bf16/fp16
    g.mul_(coef_h.unsqueeze(-1)).addcmul_(q, coef_q.neg().unsqueeze(-1))
    if g is not buf_block:
        buf_block.copy_(g)


def _chunked_forward(zs, zt, plan: _Plan, tp_group, h_buf):
    """Both passes with the chunked path; returns per-token (lse_s, lse_t, D_local, H_local, bad)."""
    n_b, n_t, _ = zs.shape
    nv = plan.n_valid
    dtype = compute_dtype(zs)
    stats = zs.new_empty((4, n_b, n_t), dtype=dtype)  # max_s, sumexp_s, max_t, sumexp_t
    lse = zs.new_empty((2, n_b, n_t), dtype=dtype)
    sums = zs.new_empty((2, n_b, n_t), dtype=dtype)  # D, H
    bad = torch.zeros((), dtype=torch.bool, device=zs.device)
    fuse = group_size(tp_group) == 1
    blocks = list(_row_blocks(n_b, n_t, nv))

    def terms(bs, ts, exps=None):
        h_out = None if h_buf is None else h_buf[bs, ts, :nv]
        sums[0, bs, ts], sums[1, bs, ts] = _chunk_terms(
            zs[bs, ts, :nv], zt[bs, ts, :nv], lse[0, bs, ts], lse[1, bs, ts], plan, h_out, exps
        )

    for bs, ts in blocks:
        exps = []
        for i, z in enumerate((zs, zt)):
            row_max, sum_exp, bad_i, e = _chunk_stats(z[bs, ts, :nv], plan.inv_temp)
            stats[2 * i, bs, ts], stats[2 * i + 1, bs, ts] = row_max, sum_exp
            exps.append((e, sum_exp))
            bad |= bad_i
        if fuse:  # without TP a block's statistics are final: finish it while it is in cache
            lse[:, bs, ts], _ = _combine_stats(stats[:, bs, ts], bad, None)
            terms(bs, ts, exps)
    if not fuse:
        lse, bad = _combine_stats(stats, bad, tp_group)
        for bs, ts in blocks:
            terms(bs, ts)
    return lse[0], lse[1], sums[0], sums[1], bad


def _chunked_grad(zs, plan: _Plan, lse_s, coef_h, coef_q, buf):
    nv = plan.n_valid
    for bs, ts in _row_blocks(zs.shape[0], zs.shape[1], nv):
        _chunk_grad(zs[bs, ts, :nv], lse_s[bs, ts], coef_h[bs, ts], coef_q[bs, ts], plan.inv_temp, buf[bs, ts, :nv])


@contextlib.contextmanager
def _one_intra_op_thread(device: torch.device):
    """Run the chunked loops on the calling thread only (CPU), restoring the thread count after.

    Each block op is small (tens of microseconds): a second intra-op thread gains nothing there but
    adds a synchronisation per op, and when the machine is oversubscribed a preempted thread stalls
    every op. Measured on 2 shared cores at 2048 x 32000 fp32, forward + backward, CPU time: 1 thread
    0.5-1.0 s, 2 threads 1.0-17 s (the high end whenever other processes were running).
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# Triton implementation
# ----------------------------------------------------------------------------------------------

if triton is not None:
    # N_VALID (real columns of the shard) is a compile-time constant: one compilation per shard width,
    # and a constant loop bound, which triton 3.6's interpreter needs with numpy >= 2.4.

    @triton.jit
    def _row_base(ptr, row, n_t, stride_b, stride_t):
        """Pointer to the first vocabulary entry of token row ``row`` of a [b, t, V] tensor."""
        return ptr + (row // n_t).to(tl.int64) * stride_b + (row % n_t).to(tl.int64) * stride_t

    @triton.jit
    def _stats_kernel(z_ptr, stride_b, stride_t, n_t, inv_temp, max_ptr, sum_ptr, bad_ptr,
                      N_VALID: tl.constexpr, BLOCK_V: tl.constexpr):
        """Per row: max and sum-exp of z/T over the real columns (online, per lane), non-finite flag."""
        row = tl.program_id(0)
        base = _row_base(z_ptr, row, n_t, stride_b, stride_t)
        run_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_V], tl.float32)
        bad = tl.zeros([BLOCK_V], tl.int32)
        for v0 in range(0, N_VALID, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            inside = cols < N_VALID
            a = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_temp
            bad = bad | (inside & ((a != a) | (tl.abs(a) == float("inf")))).to(tl.int32)
            new_max = tl.maximum(run_max, a)
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - shift) + tl.exp(a - shift)
            run_max = new_max
        row_max = tl.max(run_max, axis=0)
        shift = tl.where(row_max == float("-inf"), 0.0, row_max)
        tl.store(max_ptr + row, row_max)
        tl.store(sum_ptr + row, tl.sum(run_sum * tl.exp(run_max - shift), axis=0))
        tl.store(bad_ptr + row, tl.max(bad, axis=0))

    @triton.jit
    def _terms_kernel(zs_ptr, zs_sb, zs_st, zt_ptr, zt_sb, zt_st, n_t, n_local, inv_temp,
                      lse_s_ptr, lse_t_ptr, d_ptr, hsum_ptr, h_ptr, beta, clip, N_VALID: tl.constexpr,
                      KIND: tl.constexpr, HAS_CLIP: tl.constexpr, NEED_GRAD: tl.constexpr,
                      BLOCK_V: tl.constexpr):
        """Per row: sums of clamped d_v and of h_v over the real columns; h written to ``h_ptr`` there."""
        row = tl.program_id(0)
        zs_base = _row_base(zs_ptr, row, n_t, zs_sb, zs_st)
        zt_base = _row_base(zt_ptr, row, n_t, zt_sb, zt_st)
        h_base = h_ptr + row.to(tl.int64) * n_local
        lse_s = tl.load(lse_s_ptr + row)
        lse_t = tl.load(lse_t_ptr + row)
        acc_d = tl.zeros([BLOCK_V], tl.float32)
        acc_h = tl.zeros([BLOCK_V], tl.float32)
        for v0 in range(0, N_VALID, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            inside = cols < N_VALID
            ls = tl.load(zs_base + cols, mask=inside, other=0.0).to(tl.float32) * inv_temp - lse_s
            lp = tl.load(zt_base + cols, mask=inside, other=0.0).to(tl.float32) * inv_temp - lse_t
            if KIND == 0:
                p = tl.exp(lp)
                d = p * (lp - ls)
                h = -p
            elif KIND == 1:
                q = tl.exp(ls)
                d = q * (ls - lp)
                h = d + q
            else:
                p = tl.exp(lp)
                q = tl.exp(ls)
                log_m = tl.log(tl.maximum(beta * p + (1.0 - beta) * q, 1.1754943508222875e-38))
                h = (1.0 - beta) * q * (ls - log_m)
                d = beta * p * (lp - log_m) + h
            if HAS_CLIP:
                h = tl.where((d >= 0.0) & (d <= clip), h, 0.0)
                d = tl.minimum(tl.maximum(d, 0.0), clip)
            d = tl.where(inside, d, 0.0)
            h = tl.where(inside, h, 0.0)
            acc_d += d
            acc_h += h
            if NEED_GRAD:
                tl.store(h_base + cols, h.to(h_ptr.dtype.element_ty), mask=inside)
        tl.store(d_ptr + row, tl.sum(acc_d, axis=0))
        tl.store(hsum_ptr + row, tl.sum(acc_h, axis=0))

    @triton.jit
    def _grad_kernel(zs_ptr, zs_sb, zs_st, n_t, n_local, inv_temp, lse_s_ptr, coef_h_ptr,
                     coef_q_ptr, g_ptr, N_VALID: tl.constexpr, BLOCK_V: tl.constexpr):
        """Per row, in place over the real columns of ``g_ptr`` (holding h): coef_h * h - coef_q * q."""
        row = tl.program_id(0)
        zs_base = _row_base(zs_ptr, row, n_t, zs_sb, zs_st)
        g_base = g_ptr + row.to(tl.int64) * n_local
        lse_s = tl.load(lse_s_ptr + row)
        coef_h = tl.load(coef_h_ptr + row)
        coef_q = tl.load(coef_q_ptr + row)
        for v0 in range(0, N_VALID, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            inside = cols < N_VALID
            q = tl.exp(tl.load(zs_base + cols, mask=inside, other=0.0).to(tl.float32) * inv_temp - lse_s)
            h = tl.load(g_base + cols, mask=inside, other=0.0).to(tl.float32)
            tl.store(g_base + cols, (coef_h * h - coef_q * q).to(g_ptr.dtype.element_ty), mask=inside)


def _triton_block(n_cols: int) -> int:
    """Vocabulary block of the kernels: a power of two, at most _TRITON_BLOCK_V, no wider than needed."""
    return max(16, min(_TRITON_BLOCK_V, triton.next_power_of_2(max(n_cols, 1))))


def _triton_forward(zs, zt, plan: _Plan, tp_group, h_buf):
    """Both passes with the Triton kernels; same results as :func:`_chunked_forward`."""
    n_b, n_t, n_local = zs.shape
    rows = n_b * n_t
    stats = zs.new_empty((4, n_b, n_t), dtype=torch.float32)
    bad_rows = zs.new_empty((2, n_b, n_t), dtype=torch.int32)
    block = _triton_block(plan.n_valid)
    for i, z in enumerate((zs, zt)):
        _stats_kernel[(rows,)](z, z.stride(0), z.stride(1), n_t, plan.inv_temp, stats[2 * i], stats[2 * i + 1],
                               bad_rows[i], N_VALID=plan.n_valid, BLOCK_V=block, num_warps=8)
    lse, bad = _combine_stats(stats, bad_rows.any(), tp_group)
    sums = zs.new_empty((2, n_b, n_t), dtype=torch.float32)
    need_grad = h_buf is not None
    _terms_kernel[(rows,)](
        zs, zs.stride(0), zs.stride(1), zt, zt.stride(0), zt.stride(1), n_t, n_local, plan.inv_temp,
        lse[0], lse[1], sums[0], sums[1], h_buf if need_grad else zs,
        plan.beta, 0.0 if plan.clip is None else plan.clip, N_VALID=plan.n_valid,
        KIND=plan.kind, HAS_CLIP=plan.clip is not None, NEED_GRAD=need_grad,
        BLOCK_V=block, num_warps=8,
    )
    return lse[0], lse[1], sums[0], sums[1], bad


def _triton_grad(zs, plan: _Plan, lse_s, coef_h, coef_q, buf):
    n_b, n_t, n_local = zs.shape
    _grad_kernel[(n_b * n_t,)](zs, zs.stride(0), zs.stride(1), n_t, n_local, plan.inv_temp,
                               lse_s.contiguous(), coef_h.contiguous(), coef_q.contiguous(), buf,
                               N_VALID=plan.n_valid, BLOCK_V=_triton_block(plan.n_valid), num_warps=8)


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


def _combine_stats(stats, bad, tp_group):
    """Global log-sum-exp [2, ...] (student, teacher) from per-rank statistics; and the non-finite flag.

    ``stats`` is [4, ...] = (max_s, sumexp_s, max_t, sumexp_t), each sum-exp relative to its max.
    Under TP: one MAX all-reduce (both maxima and the flag), then one SUM all-reduce of the sum-exps
    rescaled to the global max, exp(m_r - M) (0 for a rank whose real columns are empty, m_r = -inf).
    """
    maxes = stats[0::2]
    sum_exp = stats[1::2]
    if group_size(tp_group) > 1:
        packed = torch.cat([maxes.reshape(-1), bad.to(maxes.dtype).reshape(1)])
        dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=tp_group)
        local_max, maxes, bad = maxes, packed[:-1].view_as(maxes), packed[-1] > 0
        safe = torch.where(torch.isneginf(maxes), torch.zeros_like(maxes), maxes)
        sum_exp = sum_exp * torch.exp(local_max - safe)
        dist.all_reduce(sum_exp, group=tp_group)
    return maxes + sum_exp.log(), bad


def _sampled_logprobs(z, lse, tokens, shard: VocabShard, plan: _Plan):
    """This rank's share of log softmax(z/T)[x]: the value where x is a real column of the shard, else 0.

    Returns (values [b, t] in the dtype of ``lse``, hit [b, t] bool, local column [b, t] int64).
    """
    local = tokens.to(torch.int64) - shard.start
    hit = (local >= 0) & (local < plan.n_valid)
    col = torch.where(hit, local, torch.zeros_like(local))
    value = z.gather(-1, col.unsqueeze(-1)).squeeze(-1).to(lse.dtype) * plan.inv_temp - lse
    return torch.where(hit, value, torch.zeros_like(value)), hit, col


class _FusedTokenTerms(torch.autograd.Function):
    """(student, teacher, tokens) -> (D, s, u, nonfinite); gradient w.r.t. the student logits only."""

    @staticmethod
    def forward(ctx, zs, zt, tokens, plan: _Plan, shard: VocabShard, tp_group, use_triton: bool, need_grad: bool):
        h_buf = None
        if need_grad:
            h_buf = torch.empty(zs.shape, dtype=zs.dtype, device=zs.device)
            h_buf[..., plan.n_valid:].zero_()
        if use_triton:
            lse_s, lse_t, d_sum, h_sum, bad = _triton_forward(zs, zt, plan, tp_group, h_buf)
        else:
            with _one_intra_op_thread(zs.device):
                lse_s, lse_t, d_sum, h_sum, bad = _chunked_forward(zs, zt, plan, tp_group, h_buf)
        s, hit, col = _sampled_logprobs(zs, lse_s, tokens, shard, plan)
        u, _, _ = _sampled_logprobs(zt, lse_t, tokens, shard, plan)
        per_token = torch.stack([d_sum, h_sum, s, u])
        if group_size(tp_group) > 1:
            dist.all_reduce(per_token, group=tp_group)
        d_sum, h_sum, s, u = per_token.unbind(0)
        ctx.mark_non_differentiable(u, bad)
        in_vocab = (tokens >= 0) & (tokens < shard.true_vocab_size)  # else s = 0, a constant
        ctx.save_for_backward(zs, lse_s, h_sum, hit, col, in_vocab)
        ctx.plan, ctx.use_triton, ctx.h_buf = plan, use_triton, h_buf
        return d_sum, s, u, bad

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_d, grad_s, _grad_u, _grad_bad):
        if ctx.h_buf is None:
            raise RuntimeError(
                "fused_token_terms: backward ran twice (the gradient is formed in place in the stored "
                "buffer); recompute the loss instead of using retain_graph"
            )
        zs, lse_s, h_sum, hit, col, in_vocab = ctx.saved_tensors
        buf, ctx.h_buf = ctx.h_buf, None
        plan = ctx.plan
        grad_s = torch.where(in_vocab, grad_s, 0.0)
        coef_h = grad_d * plan.inv_temp
        coef_q = (grad_d * h_sum + grad_s) * plan.inv_temp
        if ctx.use_triton:
            _triton_grad(zs, plan, lse_s, coef_h, coef_q, buf)
        else:
            with _one_intra_op_thread(zs.device):
                _chunked_grad(zs, plan, lse_s, coef_h, coef_q, buf)
        onehot = torch.where(hit, grad_s * plan.inv_temp, torch.zeros_like(coef_h))
        buf.scatter_add_(-1, col.unsqueeze(-1), onehot.unsqueeze(-1).to(buf.dtype))
        return buf, None, None, None, None, None, None, None


def triton_available() -> bool:
    """True when the triton package imported (GPU kernels, or the interpreter on CPU)."""
    return triton is not None


def fused_token_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    cfg: DivergenceConfig,
    shard: VocabShard,
    tp_group=None,
    *,
    impl: str = "auto",
) -> TokenTerms:
    """Fused :func:`~megatron_renio.losses.divergence.token_terms`: same contract, same numbers.

    student_logits, teacher_logits: [b, t, V_local] vocabulary shards (any float dtype, last dim
    contiguous; other strides free); tokens: [b, t] global ids (ids outside the real vocabulary give
    s = u = 0). Returns ``TokenTerms`` with divergence D [b, t] (differentiable w.r.t. the student
    logits), student_logprobs s [b, t] (differentiable), teacher_logprobs u [b, t] (no grad), all
    float32 (float64 for float64 inputs), and the TP-agreed non-finite flag. The teacher logits
    never receive a gradient. The student gradient is formed in place in one stored logits-sized
    buffer of the student dtype (see the module docstring), so backward may run once.

    ``impl``: 'auto' (triton for CUDA inputs when triton imports, else chunked), 'triton' (CUDA
    tensors, or CPU tensors under TRITON_INTERPRET=1), 'chunked'. Arithmetic in float32; the chunked
    path keeps float64 inputs in float64 as ``token_terms`` does ('auto' sends them there).
    ``cfg.top_k`` set: falls back to ``token_terms`` (top-k is not fused).
    """
    if impl not in IMPLS:
        raise UserInputError(f"fused_token_terms: impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    cfg.validate()
    if cfg.top_k is not None:
        return token_terms(student_logits, teacher_logits, tokens, cfg, shard, tp_group)
    if student_logits.shape != teacher_logits.shape or student_logits.shape[-1] != shard.size:
        raise UserInputError(
            f"fused_token_terms: student {tuple(student_logits.shape)} and teacher "
            f"{tuple(teacher_logits.shape)} logits must both be [b, t, {shard.size}] (the shard size)"
        )
    fp32_compute = compute_dtype(student_logits) == torch.float32
    if impl == "triton" and (triton is None or not fp32_compute):
        raise UserInputError(
            "fused_token_terms: impl='triton' needs the triton package and fp32/bf16/fp16 logits; "
            f"triton {'missing' if triton is None else 'present'}, logits {student_logits.dtype}"
        )
    if impl == "triton" and not student_logits.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserInputError("fused_token_terms: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    use_triton = impl == "triton" or (impl == "auto" and triton is not None and student_logits.is_cuda and fp32_compute)
    student = student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous()
    teacher = teacher_logits.detach()
    teacher = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    plan = _Plan.build(cfg, shard)
    d_sum, s, u, bad = _FusedTokenTerms.apply(student, teacher, tokens, plan, shard, tp_group, use_triton, need_grad)
    return TokenTerms(divergence=d_sum, student_logprobs=s, teacher_logprobs=u, nonfinite=bad)
