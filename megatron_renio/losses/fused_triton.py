"""The Triton implementation of the fused loss (formulas: :mod:`~megatron_renio.losses.fused`).

One program per token row (or a persistent grid, :class:`TritonLaunch`) loops over vocabulary
blocks; fp32 arithmetic on fp32/bf16/fp16 logits with the GPU's approximate exponential and log2
(ex2 / lg2.approx, errors of a few float32 ulp); the gradient is rounded once, to the logits' dtype.
The kernels also run on CPU tensors under ``TRITON_INTERPRET=1`` (how the CPU tests check them).

Traffic in logits-sized units: 2 + 2 reads forward, 2 reads + 1 write backward (7, against 3 for
the bandwidth floor: read both logits once, write one gradient); 2 reads forward (5 in all) for a KL
without a clamp, whose forward is sweep 1 alone (``Plan.one_sweep``). Without TP the two forward sweeps
run in one kernel per row, the second over the vocabulary blocks in reverse order, so that its first
reads hit the blocks the first sweep read last (still in the GPU's L2 cache while they are recent).
Measured on one H200 at 8,192 x 151,936 bf16 (README, Performance): the forward 2.36 ms for forward
KL (its 4 units take 2.27 ms at the floor's bandwidth), the backward 1.89 ms (3 units: 1.70 ms),
forward + backward 2.5x the floor for forward KL and 2.6x for JSD: the kernels run at about the
copy bandwidth for the traffic they make, and the 7 units are what is left between them and the
floor. Rows shared by several programs, so that the second forward sweep re-reads only a part of
a row it has just read (from the L2 cache), were built and measured on the H200: no faster (README).
The one-sweep forward has not been measured on a GPU yet (tools/gpu_check, step bench_loss_unclamped).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from megatron_renio.losses.fused_plan import FORWARD_KL, Cells, Plan, combine_stats
from megatron_renio.renio.vocab_parallel import group_size

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the chunked PyTorch path is always available
    triton = None
try:
    from triton.language.extra.cuda import libdevice
except ImportError:  # a triton without CUDA's libdevice wrappers: the kernels use tl.log2
    libdevice = None


def triton_available() -> bool:
    """True when the triton package imported (GPU kernels, or the interpreter on CPU)."""
    return triton is not None


@dataclass(frozen=True)
class TritonLaunch:
    """Launch shape of the Triton kernels.

    programs_per_sm: a persistent grid of this many programs per streaming multiprocessor, program
    p walking rows p, p + grid, ... (the grid depends only on the device: one compilation; the
    interpreter on the CPU counts one multiprocessor); None = one program per token row.
    num_warps: warps per program. block_v: vocabulary entries per loop step (a power of two).
    prefetch: load the next block of a loop before computing on the current one. max_group: the
    statistics sweep keeps one running max per group of this many consecutive entries (a power of
    two); None = one per block, which costs a reduction across the program's threads (barriers
    with more than one warp) per block and one exponential per entry; 8 = each thread's own
    entries (128-bit bf16 loads), no cross-thread reduction and 1 + 1/8 exponentials per entry.
    """

    programs_per_sm: int | None = None
    num_warps: int = 4
    block_v: int = 1024
    prefetch: bool = True
    max_group: int | None = None

    def grid(self, rows: int, device: torch.device) -> tuple[int, int]:
        """(programs to launch, the GRID constant: the row stride of each program)."""
        if self.programs_per_sm is None:
            return max(rows, 1), 1 << 30  # one row per program
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        return sms * self.programs_per_sm, sms * self.programs_per_sm


# The launches of the forward kernels and of the gradient kernel. The forward's was chosen with
# tools/bench_loss.py --triton-launch on an H200 at 8192 x 151936 bf16 (README, Performance; shapes
# within 5% of each other there are ties): one row per program of four warps, prefetching the next
# block, over blocks of 2048 with a running max per thread's 8 entries. The gradient's: the same
# over blocks of 1024, no running max (blocks of 2048 with four or eight warps were ties, blocks of
# 512 with two warps 2-3% slower; tools/gpu_check times them with bench_loss --triton-launch F/G).
TRITON_LAUNCH = TritonLaunch(block_v=2048, max_group=8)
TRITON_GRAD_LAUNCH = TritonLaunch()



if triton is not None:
    # Arithmetic in base 2 (ex2 and lg2 are the GPU's native exponentials): with M_S the row's max of
    # the raw logits and L_S the log of its sum-exp relative to M_S (combine_stats),
    # log2 q_v = (z_v - M_S) log2(e) / T - L_S log2(e). Elements d are formed in bits (d / ln 2, clamped
    # at k / ln 2) and their sum converted once; h, H, L and the sums are in natural units, maxima
    # and c in raw logits. N_VALID (real columns
    # of the shard) is a compile-time constant, one compilation per shard width: each sweep runs its
    # full blocks unmasked and masks only the tail, and
    # for-loops get the constant trip counts that triton 3.6's interpreter needs with numpy >= 2.4
    # (runtime bounds only in while loops). Every kernel walks rows pid, pid + GRID, ...
    # (TritonLaunch). Row outputs are fp32 arrays [k, rows].
    _LN2 = tl.constexpr(0.6931471805599453)
    _LOG2E = tl.constexpr(1.4426950408889634)
    _EXACT_LOG2 = tl.constexpr(libdevice is None or os.environ.get("TRITON_INTERPRET") == "1")

    @triton.jit
    def _log2(x):
        """log2 with the GPU's lg2.approx (libdevice fast_log2f; tl.log2 compiles to a longer exact
        sequence); tl.log2 in the interpreter, which has no libdevice, or without libdevice."""
        if _EXACT_LOG2:
            return tl.log2(x)
        else:
            return libdevice.fast_log2f(x)

    @triton.jit
    def _row_base(ptr, sample, position, stride_b, stride_t):
        """Pointer to the first vocabulary entry of row (sample, position) of a [b, S, V] tensor."""
        return ptr + sample.to(tl.int64) * stride_b + position.to(tl.int64) * stride_t

    @triton.jit
    def _cell_rows(zs_ptr, zs_sb, zs_st, zt_ptr, zt_sb, zt_st, spos_ptr, tpos_ptr, cell, n_t):
        """(student row, teacher row, filled) of cell ``cell`` of the [b, n_t] grid (``Cells``)."""
        sample = cell // n_t
        pos_s = tl.load(spos_ptr + cell)
        pos_t = tl.load(tpos_ptr + cell)
        zs_base = _row_base(zs_ptr, sample, tl.maximum(pos_s, 0), zs_sb, zs_st)
        return zs_base, _row_base(zt_ptr, sample, tl.maximum(pos_t, 0), zt_sb, zt_st), pos_s >= 0

    @triton.jit
    def _load_pair(zs_base, zt_base, cols, N_VALID: tl.constexpr, MASKED: tl.constexpr):
        """Both logits at ``cols`` in fp32; MASKED: 0 beyond the real columns (a tail block)."""
        if MASKED:
            inside = cols < N_VALID
            zs = tl.load(zs_base + cols, mask=inside, other=0.0)
            zt = tl.load(zt_base + cols, mask=inside, other=0.0)
        else:
            zs = tl.load(zs_base + cols)
            zt = tl.load(zt_base + cols)
        return zs.to(tl.float32), zt.to(tl.float32)

    @triton.jit
    def _online_sum_exp(z, scale, run_max, acc, diff, acc_w, WEIGHTED: tl.constexpr):
        """One tile [R, G] of the online sum-exp: a running max of the raw logits z per group of G
        entries (shape [R]), and per-entry sums of e_v = 2^((z_v - max) scale) = e^((z_v - max) / T)
        (z_v - max is exact near the max, however large the logits);
        WEIGHTED: also per-entry sums of e_v diff_v in acc_w (else acc_w is returned as it came)."""
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp2((run_max - shift) * scale)[:, None]
        e = tl.exp2((z - shift[:, None]) * scale)
        if WEIGHTED:
            acc_w = acc_w * rescale + e * diff
        return new_max, acc * rescale + e, acc_w

    @triton.jit
    def _stats_block(zs, zt, cols, scale, max_s, acc_s, max_t, acc_t, acc_z, acc_w, first_s, first_t,
                     N_VALID: tl.constexpr, MASKED: tl.constexpr, WEIGHT: tl.constexpr):
        acc_z += zs + zt
        diff = (zt - first_t) - (zs - first_s)  # beyond the real columns its weight is e^-inf = 0
        if MASKED:
            zs = tl.where(cols < N_VALID, zs, float("-inf"))
            zt = tl.where(cols < N_VALID, zt, float("-inf"))
        max_s, acc_s, acc_w = _online_sum_exp(zs, scale, max_s, acc_s, -diff, acc_w, WEIGHT == 2)
        max_t, acc_t, acc_w = _online_sum_exp(zt, scale, max_t, acc_t, diff, acc_w, WEIGHT == 1)
        return max_s, acc_s, max_t, acc_t, acc_z, acc_w

    @triton.jit
    def _finish_sum_exp(run_max, acc, acc_w, scale):
        """(max of the raw logits, sum-exp relative to it, the same sum of acc_w) of a row from
        :func:`_online_sum_exp`'s state."""
        row_max = tl.max(run_max, axis=0)
        shift = tl.where(row_max == float("-inf"), 0.0, row_max)
        rescale = tl.exp2((run_max - shift) * scale)
        total = tl.sum(tl.sum(acc, axis=1) * rescale, axis=0)
        return row_max, total, tl.sum(tl.sum(acc_w, axis=1) * rescale, axis=0)

    @triton.jit
    def _stats_sweep(zs_base, zt_base, scale, N_VALID: tl.constexpr, BLOCK_V: tl.constexpr,
                     PREFETCH: tl.constexpr, GROUP: tl.constexpr, WEIGHT: tl.constexpr):
        """Sweep 1 of a row: (max_s, sumexp_s, max_t, sumexp_t, W, c_s, c_t, non-finite 0/1) over the real
        columns: each max of the raw logits, each sum-exp of (z - max) / T.

        Blocks are tiles [BLOCK_V / GROUP, GROUP] of consecutive entries, each tile row with its own
        running max (TritonLaunch.max_group). Non-finite: the plain sum of both rows' logits is not
        finite (inf, -inf or NaN anywhere; a sum that overflows float32 counts too). W, the weighted
        sum of a one-sweep forward (``Plan.one_sweep``), in raw logits, with c_s and c_t each row's max
        over the real columns of its first block (the tail when no block is full: without it a narrow
        shard's W cancelled at the size of the models' offset; 0 in a shard of padding only) and
        diff_v = (z^T_v - c_t) - (z^S_v - c_s):
        WEIGHT 1 (forward KL) sum_v e^(b_v - max_t) diff_v, WEIGHT 2 (reverse KL) sum_v e^(a_v - max_s) (-diff_v),
        WEIGHT 0: W = 0 (c_s = c_t = 0). Each logit less its row's c is exact near c, and an offset between
        the models (which ``_one_sweep_terms`` adds back exactly) leaves the summands: they are of the
        size of each row's spread below its c (so a first block far below a row's max, e.g. 200 at
        T = 0.3, costs precision that the two-sweep forward keeps).
        """
        N_FULL: tl.constexpr = N_VALID // BLOCK_V * BLOCK_V
        R: tl.constexpr = BLOCK_V // GROUP
        tile = tl.arange(0, R)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        max_s = tl.full([R], float("-inf"), tl.float32)
        max_t = tl.full([R], float("-inf"), tl.float32)
        acc_s = tl.zeros([R, GROUP], tl.float32)
        acc_t = tl.zeros([R, GROUP], tl.float32)
        acc_z = tl.zeros([R, GROUP], tl.float32)
        acc_w = tl.zeros([R, GROUP], tl.float32)
        # the first block: a full one (which the loop below starts from), else the tail
        zs, zt = _load_pair(zs_base, zt_base, tile, N_VALID, True)
        first_s = 0.0
        first_t = 0.0
        if WEIGHT != 0:  # its max over the real columns; 0 in a shard of padding only
            first_s = tl.max(tl.max(tl.where(tile < N_VALID, zs, float("-inf")), axis=1), axis=0)
            first_t = tl.max(tl.max(tl.where(tile < N_VALID, zt, float("-inf")), axis=1), axis=0)
            first_s = tl.where(first_s == float("-inf"), 0.0, first_s)
            first_t = tl.where(first_t == float("-inf"), 0.0, first_t)
        for v0 in range(0, N_FULL, BLOCK_V):
            cols = v0 + tile
            if PREFETCH:
                next_cols = tl.minimum(v0 + BLOCK_V, N_FULL - BLOCK_V) + tile
                next_zs, next_zt = _load_pair(zs_base, zt_base, next_cols, N_VALID, False)
            else:
                zs, zt = _load_pair(zs_base, zt_base, cols, N_VALID, False)
            max_s, acc_s, max_t, acc_t, acc_z, acc_w = _stats_block(zs, zt, cols, scale, max_s, acc_s, max_t, acc_t,
                                                                    acc_z, acc_w, first_s, first_t, N_VALID, False,
                                                                    WEIGHT)
            if PREFETCH:
                zs, zt = next_zs, next_zt
        for v0 in range(N_FULL, N_VALID, BLOCK_V):  # the tail, at most one block
            cols = v0 + tile
            zs, zt = _load_pair(zs_base, zt_base, cols, N_VALID, True)
            max_s, acc_s, max_t, acc_t, acc_z, acc_w = _stats_block(zs, zt, cols, scale, max_s, acc_s, max_t, acc_t,
                                                                    acc_z, acc_w, first_s, first_t, N_VALID, True,
                                                                    WEIGHT)
        total = tl.sum(tl.sum(acc_z, axis=1), axis=0)
        bad = tl.where(tl.abs(total) < float("inf"), 0.0, 1.0)  # False for inf and NaN
        max_s, sum_s, w_s = _finish_sum_exp(max_s, acc_s, acc_w, scale)
        max_t, sum_t, w_t = _finish_sum_exp(max_t, acc_t, acc_w, scale)
        return max_s, sum_s, max_t, sum_t, w_s if WEIGHT == 2 else w_t, first_s, first_t, bad

    @triton.jit
    def _element_terms(ls2, lp2, beta, clip2, KIND: tl.constexpr, HAS_CLIP: tl.constexpr):
        """(clamped d_v / ln 2, h_v, q_v) from log2 q_v and log2 p_v (module docstring)."""
        q = tl.exp2(ls2)
        if KIND == 0:
            p = tl.exp2(lp2)
            d = p * (lp2 - ls2)
            h = -p
        elif KIND == 1:
            d = q * (ls2 - lp2)
            h = d * _LN2 + q
        else:
            p_part = beta * tl.exp2(lp2)
            q_part = (1.0 - beta) * q
            lm2 = _log2(tl.maximum(p_part + q_part, 1.1754943508222875e-38))
            h2 = q_part * (ls2 - lm2)
            d = p_part * (lp2 - lm2) + h2
            h = h2 * _LN2
        if HAS_CLIP:
            clamped = tl.minimum(tl.maximum(d, 0.0), clip2)
            h = tl.where(clamped == d, h, 0.0)  # 0 <= d <= k (False for NaN): torch.clamp's gradient mask
            d = clamped
        return d, h, q

    @triton.jit
    def _log2_probs(zs, zt, scale, max_s, log_sum2_s, max_t, log_sum2_t):
        """(log2 q, log2 p) = (z - max) log2(e) / T - log2 of the sum-exp, per model (``combine_stats``)."""
        return (zs - max_s) * scale - log_sum2_s, (zt - max_t) * scale - log_sum2_t

    @triton.jit
    def _terms_block(zs, zt, cols, scale, max_s, log_sum2_s, max_t, log_sum2_t, beta, clip2, acc_d, acc_h,
                     N_VALID: tl.constexpr, KIND: tl.constexpr, HAS_CLIP: tl.constexpr, MASKED: tl.constexpr):
        ls2, lp2 = _log2_probs(zs, zt, scale, max_s, log_sum2_s, max_t, log_sum2_t)
        d, h, _ = _element_terms(ls2, lp2, beta, clip2, KIND, HAS_CLIP)
        if MASKED:
            d = tl.where(cols < N_VALID, d, 0.0)
            h = tl.where(cols < N_VALID, h, 0.0)
        return acc_d + d, acc_h + h

    @triton.jit
    def _terms_sweep(zs_base, zt_base, scale, max_s, log_sum_s, max_t, log_sum_t, beta, clip2, N_VALID: tl.constexpr,
                     KIND: tl.constexpr, HAS_CLIP: tl.constexpr, BLOCK_V: tl.constexpr, PREFETCH: tl.constexpr):
        """Sweep 2 of a row, tail first, then the full blocks in reverse order: (sum of clamped d_v, sum of h_v)."""
        N_FULL: tl.constexpr = N_VALID // BLOCK_V * BLOCK_V
        log_sum2_s = log_sum_s * _LOG2E
        log_sum2_t = log_sum_t * _LOG2E
        acc_d = tl.zeros([BLOCK_V], tl.float32)
        acc_h = tl.zeros([BLOCK_V], tl.float32)
        for v0 in range(N_FULL, N_VALID, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            zs, zt = _load_pair(zs_base, zt_base, cols, N_VALID, True)
            acc_d, acc_h = _terms_block(zs, zt, cols, scale, max_s, log_sum2_s, max_t, log_sum2_t, beta, clip2,
                                        acc_d, acc_h, N_VALID, KIND, HAS_CLIP, True)
        last = tl.maximum(N_FULL - BLOCK_V, 0) + tl.arange(0, BLOCK_V)
        zs, zt = _load_pair(zs_base, zt_base, last, N_FULL, True)  # the last full block
        for i in range(0, N_FULL // BLOCK_V):
            v0 = N_FULL - (i + 1) * BLOCK_V
            cols = v0 + tl.arange(0, BLOCK_V)
            if PREFETCH:
                next_cols = tl.maximum(v0 - BLOCK_V, 0) + tl.arange(0, BLOCK_V)
                next_zs, next_zt = _load_pair(zs_base, zt_base, next_cols, N_VALID, False)
            else:
                zs, zt = _load_pair(zs_base, zt_base, cols, N_VALID, False)
            acc_d, acc_h = _terms_block(zs, zt, cols, scale, max_s, log_sum2_s, max_t, log_sum2_t, beta, clip2,
                                        acc_d, acc_h, N_VALID, KIND, HAS_CLIP, False)
            if PREFETCH:
                zs, zt = next_zs, next_zt
        return tl.sum(acc_d, axis=0) * _LN2, tl.sum(acc_h, axis=0)

    @triton.jit
    def _sampled_logit(base, col):
        """The raw logit z[col] of a row's sampled token; 0 when it is not here (col = -1)."""
        hit = col >= 0
        return tl.where(hit, tl.load(base + tl.where(hit, col, 0)).to(tl.float32), 0.0)

    @triton.jit
    def _lookup(base, col, scale, row_max, log_sum):
        """Natural log-prob (z[col] - max) / T - log_sum of a row's sampled token; 0 when it is not here (col = -1)."""
        return tl.where(col >= 0, (_sampled_logit(base, col) - row_max) * (scale * _LN2) - log_sum, 0.0)

    @triton.jit
    def _terms_row(zs_base, zt_base, col, terms_ptr, row, n_rows, scale, max_s, log_sum_s, max_t, log_sum_t, beta,
                   clip2, N_VALID: tl.constexpr, KIND: tl.constexpr, HAS_CLIP: tl.constexpr, BLOCK_V: tl.constexpr,
                   PREFETCH: tl.constexpr):
        """Sweep 2 of a row and its sampled-token lookups, stored as [D, H, s, u] (stride n_rows) at terms_ptr."""
        d, h = _terms_sweep(zs_base, zt_base, scale, max_s, log_sum_s, max_t, log_sum_t, beta, clip2, N_VALID, KIND,
                            HAS_CLIP, BLOCK_V, PREFETCH)
        tl.store(terms_ptr + row, d)
        tl.store(terms_ptr + n_rows + row, h)
        tl.store(terms_ptr + 2 * n_rows + row, _lookup(zs_base, col, scale, max_s, log_sum_s))
        tl.store(terms_ptr + 3 * n_rows + row, _lookup(zt_base, col, scale, max_t, log_sum_t))

    @triton.jit
    def _forward_kernel(zs_ptr, zs_sb, zs_st, zt_ptr, zt_sb, zt_st, spos_ptr, tpos_ptr, col_ptr, out_ptr, n_rows,
                        n_t, scale, beta, clip2, N_VALID: tl.constexpr, KIND: tl.constexpr, HAS_CLIP: tl.constexpr,
                        BLOCK_V: tl.constexpr, GRID: tl.constexpr, PREFETCH: tl.constexpr, GROUP: tl.constexpr,
                        STATS_ONLY: tl.constexpr, WEIGHT: tl.constexpr):
        """Per filled cell, without TP sweeps 1 and 2: out = [max_s, log_sum_s, max_t, log_sum_t, D, H, s, u,
        non-finite] (``combine_stats``'s row statistics, then the terms); under TP (STATS_ONLY) sweep 1 of this
        shard: out = [max_s, sumexp_s, max_t, sumexp_t, non-finite]; a one-sweep forward (STATS_ONLY, WEIGHT 1
        or 2, with or without TP) adds [W, z^S_x, z^T_x, c_s, c_t] (the sampled token's raw logits where it is in
        this shard, else 0; W, c_s and c_t of ``_stats_sweep``). Zeros, left as they are at empty cells."""
        row = tl.program_id(0)
        while row < n_rows:
            zs_base, zt_base, filled = _cell_rows(zs_ptr, zs_sb, zs_st, zt_ptr, zt_sb, zt_st, spos_ptr, tpos_ptr,
                                                  row, n_t)
            if filled:
                max_s, sum_s, max_t, sum_t, w, first_s, first_t, bad = _stats_sweep(zs_base, zt_base, scale, N_VALID,
                                                                                     BLOCK_V,
                                                                          PREFETCH, GROUP, WEIGHT)
                if STATS_ONLY:
                    tl.store(out_ptr + row, max_s)
                    tl.store(out_ptr + n_rows + row, sum_s)
                    tl.store(out_ptr + 2 * n_rows + row, max_t)
                    tl.store(out_ptr + 3 * n_rows + row, sum_t)
                    tl.store(out_ptr + 4 * n_rows + row, bad)
                    if WEIGHT != 0:
                        col = tl.load(col_ptr + row)
                        tl.store(out_ptr + 5 * n_rows + row, w)
                        tl.store(out_ptr + 6 * n_rows + row, _sampled_logit(zs_base, col))
                        tl.store(out_ptr + 7 * n_rows + row, _sampled_logit(zt_base, col))
                        tl.store(out_ptr + 8 * n_rows + row, first_s)
                        tl.store(out_ptr + 9 * n_rows + row, first_t)
                else:
                    log_sum_s = tl.log(sum_s)
                    log_sum_t = tl.log(sum_t)
                    tl.store(out_ptr + row, max_s)
                    tl.store(out_ptr + n_rows + row, log_sum_s)
                    tl.store(out_ptr + 2 * n_rows + row, max_t)
                    tl.store(out_ptr + 3 * n_rows + row, log_sum_t)
                    _terms_row(zs_base, zt_base, tl.load(col_ptr + row), out_ptr + 4 * n_rows, row, n_rows, scale,
                               max_s, log_sum_s, max_t, log_sum_t, beta, clip2, N_VALID, KIND, HAS_CLIP, BLOCK_V,
                               PREFETCH)
                    tl.store(out_ptr + 8 * n_rows + row, bad)
            row += GRID

    @triton.jit
    def _terms_kernel(zs_ptr, zs_sb, zs_st, zt_ptr, zt_sb, zt_st, spos_ptr, tpos_ptr, col_ptr, stats_ptr, out_ptr,
                      n_rows, n_t, scale, beta, clip2, N_VALID: tl.constexpr, KIND: tl.constexpr,
                      HAS_CLIP: tl.constexpr, BLOCK_V: tl.constexpr, GRID: tl.constexpr, PREFETCH: tl.constexpr):
        """Under TP, sweep 2 per filled cell from the global row statistics [max_s, log_sum_s, max_t,
        log_sum_t]; out = [D, H, s, u] (this shard; zeros, left as they are at empty cells)."""
        row = tl.program_id(0)
        while row < n_rows:
            zs_base, zt_base, filled = _cell_rows(zs_ptr, zs_sb, zs_st, zt_ptr, zt_sb, zt_st, spos_ptr, tpos_ptr,
                                                  row, n_t)
            if filled:
                _terms_row(zs_base, zt_base, tl.load(col_ptr + row), out_ptr, row, n_rows, scale,
                           tl.load(stats_ptr + row), tl.load(stats_ptr + n_rows + row),
                           tl.load(stats_ptr + 2 * n_rows + row), tl.load(stats_ptr + 3 * n_rows + row), beta, clip2,
                           N_VALID, KIND, HAS_CLIP, BLOCK_V, PREFETCH)
            row += GRID

    @triton.jit
    def _grad_block(zs, zt, g_base, cols, scale, max_s, log_sum2_s, max_t, log_sum2_t, beta, clip2, coef_h, coef_q,
                    N_VALID: tl.constexpr, N_LOCAL: tl.constexpr, KIND: tl.constexpr, HAS_CLIP: tl.constexpr,
                    MASKED: tl.constexpr):
        ls2, lp2 = _log2_probs(zs, zt, scale, max_s, log_sum2_s, max_t, log_sum2_t)
        _, h, q = _element_terms(ls2, lp2, beta, clip2, KIND, HAS_CLIP)
        g = coef_h * h - coef_q * q
        if MASKED:
            g = tl.where(cols < N_VALID, g, 0.0)
            tl.store(g_base + cols, g.to(g_base.dtype.element_ty), mask=cols < N_LOCAL)
        else:
            tl.store(g_base + cols, g.to(g_base.dtype.element_ty))

    @triton.jit
    def _grad_row(zs_base, zt_base, g_base, cell, col_ptr, coef_ptr, n_cells, scale, beta, clip2,
                  N_VALID: tl.constexpr, N_LOCAL: tl.constexpr, KIND: tl.constexpr, HAS_CLIP: tl.constexpr,
                  BLOCK_V: tl.constexpr, PREFETCH: tl.constexpr):
        """Sweep 3 of one cell from coef = [max_s, log_sum_s, max_t, log_sum_t, coef_h, coef_q, coef_x]
        (stride n_cells; the row statistics of ``combine_stats``):
        g_j = coef_h h_j - coef_q q_j + [j == col] coef_x on the real columns, 0 on the padding.

        The sampled token's entry is formed again on its own and stored after a barrier (ordering it
        after the block stores), so the blocks carry no per-entry comparison with ``col``.
        """
        N_FULL: tl.constexpr = N_VALID // BLOCK_V * BLOCK_V
        max_s = tl.load(coef_ptr + cell)
        log_sum2_s = tl.load(coef_ptr + n_cells + cell) * _LOG2E
        max_t = tl.load(coef_ptr + 2 * n_cells + cell)
        log_sum2_t = tl.load(coef_ptr + 3 * n_cells + cell) * _LOG2E
        coef_h = tl.load(coef_ptr + 4 * n_cells + cell)
        coef_q = tl.load(coef_ptr + 5 * n_cells + cell)
        zs, zt = _load_pair(zs_base, zt_base, tl.arange(0, BLOCK_V), N_FULL, True)  # the first full block
        for v0 in range(0, N_FULL, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            if PREFETCH:
                next_cols = tl.minimum(v0 + BLOCK_V, N_FULL - BLOCK_V) + tl.arange(0, BLOCK_V)
                next_zs, next_zt = _load_pair(zs_base, zt_base, next_cols, N_VALID, False)
            else:
                zs, zt = _load_pair(zs_base, zt_base, cols, N_VALID, False)
            _grad_block(zs, zt, g_base, cols, scale, max_s, log_sum2_s, max_t, log_sum2_t, beta, clip2, coef_h,
                        coef_q, N_VALID, N_LOCAL, KIND, HAS_CLIP, False)
            if PREFETCH:
                zs, zt = next_zs, next_zt
        for v0 in range(N_FULL, N_LOCAL, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            zs, zt = _load_pair(zs_base, zt_base, cols, N_VALID, True)
            _grad_block(zs, zt, g_base, cols, scale, max_s, log_sum2_s, max_t, log_sum2_t, beta, clip2, coef_h,
                        coef_q, N_VALID, N_LOCAL, KIND, HAS_CLIP, True)
        col = tl.load(col_ptr + cell)
        hit = col >= 0
        col = tl.where(hit, col, 0)
        ls2, lp2 = _log2_probs(tl.load(zs_base + col).to(tl.float32), tl.load(zt_base + col).to(tl.float32), scale,
                               max_s, log_sum2_s, max_t, log_sum2_t)
        _, h, q = _element_terms(ls2, lp2, beta, clip2, KIND, HAS_CLIP)
        g = coef_h * h - coef_q * q + tl.load(coef_ptr + 6 * n_cells + cell)
        tl.debug_barrier()
        tl.store(g_base + col, g.to(g_base.dtype.element_ty), mask=hit)

    @triton.jit
    def _zero_row(g_base, N_LOCAL: tl.constexpr, BLOCK_V: tl.constexpr):
        """A gradient row of zeros (a logits row that no cell reads)."""
        for v0 in range(0, N_LOCAL, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            tl.store(g_base + cols, tl.zeros([BLOCK_V], g_base.dtype.element_ty), mask=cols < N_LOCAL)

    @triton.jit
    def _grad_kernel(zs_ptr, zs_sb, zs_st, zt_ptr, zt_sb, zt_st, g_ptr, g_sb, g_st, cell_ptr, tpos_ptr, col_ptr,
                     coef_ptr, n_rows, n_s, n_cells, scale, beta, clip2, N_VALID: tl.constexpr, N_LOCAL: tl.constexpr,
                     KIND: tl.constexpr, HAS_CLIP: tl.constexpr, BLOCK_V: tl.constexpr, GRID: tl.constexpr,
                     PREFETCH: tl.constexpr):
        """Sweep 3 over every row of the student's logits [b, n_s, V] (n_rows = b n_s): the row of the
        cell ``cell_ptr`` names (``Cells.cell_of_row``; teacher row from ``tpos_ptr``), zeros where none."""
        row = tl.program_id(0)
        while row < n_rows:
            sample = row // n_s
            position = row % n_s
            cell = tl.load(cell_ptr + row)
            g_base = _row_base(g_ptr, sample, position, g_sb, g_st)
            if cell >= 0:
                zs_base = _row_base(zs_ptr, sample, position, zs_sb, zs_st)
                zt_base = _row_base(zt_ptr, sample, tl.load(tpos_ptr + cell), zt_sb, zt_st)
                _grad_row(zs_base, zt_base, g_base, cell, col_ptr, coef_ptr, n_cells, scale, beta, clip2, N_VALID, N_LOCAL, KIND, HAS_CLIP, BLOCK_V, PREFETCH)
            else:
                _zero_row(g_base, N_LOCAL, BLOCK_V)
            row += GRID


def _triton_launch(plan: Plan, rows: int, device: torch.device, n_cols: int, launch: TritonLaunch):
    """((programs,), constants and launch options) of a kernel over ``rows`` rows of ``n_cols`` columns."""
    programs, stride = launch.grid(rows, device)
    block = max(16, min(launch.block_v, triton.next_power_of_2(max(n_cols, 1))))
    return (programs,), dict(KIND=plan.kind, HAS_CLIP=plan.clip is not None, BLOCK_V=block, GRID=stride,
                             PREFETCH=launch.prefetch, num_warps=launch.num_warps)


def _kernel_scalars(plan: Plan):
    """(scale, beta, clip2): log2(e) / T, beta, and the clamp k in bits (k / ln 2; unused without a clamp)."""
    clip2 = 0.0 if plan.clip is None else plan.clip / math.log(2.0)
    return plan.inv_temp / math.log(2.0), plan.beta, clip2


def _strides(z):
    return z, z.stride(0), z.stride(1)


def triton_forward(zs, zt, cells: Cells, col, plan: Plan, tp_group):
    """Sweeps 1 and 2 with the Triton kernels (sweep 1 alone for ``Plan.one_sweep``): the row statistics
    that :func:`triton_grad` reads ([4, b, t]: max_s, log_sum_s, max_t, log_sum_t of ``combine_stats``),
    per cell (D, H, s, u) of this shard, and the flag.

    D, H, s and u are 0 at empty cells; the row statistics there are without meaning (nothing reads them).
    """
    n_b, n_t = cells.shape
    rows = n_b * n_t
    grid, opts = _triton_launch(plan, rows, zs.device, plan.n_valid, TRITON_LAUNCH)
    group = opts["BLOCK_V"] if TRITON_LAUNCH.max_group is None else min(TRITON_LAUNCH.max_group, opts["BLOCK_V"])
    scale, beta, clip2 = _kernel_scalars(plan)
    addressing = (*_strides(zs), *_strides(zt), *cells.kernel_positions(zs.device))
    launch = dict(N_VALID=plan.n_valid, GROUP=group, WEIGHT=1 + plan.kind if plan.one_sweep else 0, **opts)
    if not plan.one_sweep and group_size(tp_group) == 1:
        out = zs.new_zeros((9, n_b, n_t), dtype=torch.float32)
        _forward_kernel[grid](*addressing, col, out, rows, n_t, scale, beta, clip2, STATS_ONLY=False, **launch)
        return (out[:4], *out[4:8], out[8].any())
    stats = zs.new_zeros((10 if plan.one_sweep else 5, n_b, n_t), dtype=torch.float32)
    _forward_kernel[grid](*addressing, col, stats, rows, n_t, scale, beta, clip2, STATS_ONLY=True, **launch)
    maxes, log_sums, bad = combine_stats(stats[:4], stats[4].any(), tp_group, plan.inv_temp)
    row_stats = torch.stack([maxes[0], log_sums[0], maxes[1], log_sums[1]])
    if plan.one_sweep:
        return (row_stats, *_one_sweep_terms(stats, maxes, log_sums, col, cells, plan), bad)
    out = zs.new_zeros((4, n_b, n_t), dtype=torch.float32)
    _terms_kernel[grid](*addressing, col, row_stats, out, rows, n_t, scale, beta, clip2, N_VALID=plan.n_valid, **opts)
    return (row_stats, *out, bad)


def _one_sweep_terms(stats, maxes, log_sums, col, cells: Cells, plan: Plan):
    """This shard's (D, H, s, u) per cell from sweep 1 alone (``Plan.one_sweep``) and the global row
    statistics (max M and log_sum L [2, ...] of ``combine_stats``: LSE = M / T + L).

    With w the weighting model (the teacher for forward KL, the student for reverse KL), o the other,
    m_r and S_r the shard's max of w's raw logits and the sum-exp of (z^w - m_r) / T, c_w and c_o the
    shard's first-block maxima of each model's logits and W_r the weighted sum of
    (z^w - c_w) - (z^o - c_o) (``_stats_sweep``), the shard's share of w's probability mass is
    P_r = S_r e_r with e_r = exp((m_r - M_w) / T - L_w), and, since LSE_w - LSE_o = (M_w - M_o) / T + L_w - L_o,

        D_r = e_r W_r / T + P_r (((c_w - M_w) - (c_o - M_o)) / T - (L_w - L_o))   (sum over the shard of w_v (log w_v - log o_v))
        H_r = -P_r (forward KL: h_v = -p_v),   D_r + P_r (reverse KL: h_v = d_v + q_v).

    Raw logits are subtracted from logits of their own row before any division by T, so no term is the
    size of an LSE or of an offset between the models.
    s and u: (z_x - M) / T - L of the sampled token where it is in this shard, else 0. Empty cells get zeros.
    """
    w, o = (1, 0) if plan.kind == FORWARD_KL else (0, 1)
    share = torch.exp((stats[2 * w] - maxes[w]) * plan.inv_temp - log_sums[w])  # 0 on a shard with no real column
    mass = stats[2 * w + 1] * share
    offset = ((stats[8 + w] - maxes[w]) - (stats[8 + o] - maxes[o])) * plan.inv_temp - (log_sums[w] - log_sums[o])
    d_sum = share * stats[5] * plan.inv_temp + mass * offset
    h_sum = -mass if plan.kind == FORWARD_KL else d_sum + mass
    here = col >= 0  # false at empty cells too
    logprobs = [torch.where(here, (stats[6 + model] - maxes[model]) * plan.inv_temp - log_sums[model], 0.0)
                for model in (0, 1)]
    terms = torch.stack([d_sum, h_sum, *logprobs])
    filled = cells.filled()
    return (terms if filled is None else terms.masked_fill_(~filled, 0.0)).unbind(0)


def triton_grad(zs, zt, cells: Cells, col, plan: Plan, row_stats, coef, grad, launch: TritonLaunch):
    """Sweep 3 into every row and column of ``grad`` with the Triton kernel; ``row_stats`` from
    :func:`triton_forward`, coef = (coef_h, coef_q, coef_x)."""
    n_b, n_s, n_local = zs.shape
    packed = torch.stack([*row_stats, *coef]).to(torch.float32).contiguous()
    grid, opts = _triton_launch(plan, n_b * n_s, zs.device, n_local, launch)
    _grad_kernel[grid](*_strides(zs), *_strides(zt), *_strides(grad), cells.cell_of_row(n_s, zs.device),
                       cells.kernel_positions(zs.device)[1], col, packed, n_b * n_s, n_s, col.numel(),
                       *_kernel_scalars(plan), N_VALID=plan.n_valid, N_LOCAL=n_local, **opts)
