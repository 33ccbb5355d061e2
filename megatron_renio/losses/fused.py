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

1. statistics (forward): max and sum-exp of a and b (online across vocabulary blocks: one max
   reduction per block and one exponential per entry), the non-finite flag. Combined across TP with
   two O(b*t) all-reduces: M = max_r m_r, then S = sum_r S_r * exp(m_r - M); LSE = M + log S.
2. terms (forward): per token the local sums of clamp(d_v) and of h_v, and the local lookups of the
   sampled token's log-probs, all four summed over TP in one O(b*t) all-reduce.
3. gradient (backward): h_j and q_j recomputed from both shards and the saved per-token LSE_S,
   LSE_T and H, the formula above written straight into the gradient. No communication (the outputs
   are identical on every TP rank and each rank differentiates its own shard, the identity-backward
   convention of Megatron's reductions).

Why three sweeps and not the gradient inside the forward: the clamp mask g_v needs the global LSE
(sweep 1 must finish first), H needs the whole masked row (sweep 2 must finish before any gradient
entry is final), and gD, gs come from the loss only after the forward (the ReNIO weights are formed
from s and u of every token). Writing a Jacobian (h - qH)/T in the forward would cost a stored
logits-sized tensor and a scaling sweep in backward (read + write), more traffic than recomputing.

Traffic in logits-sized units: 2 + 2 reads forward, 2 reads + 1 write backward (7, against 3 for
the bandwidth floor: read both logits once, write one gradient). Without TP the two forward sweeps
run in one kernel per row, the second over the vocabulary blocks in reverse order, so that its first
reads hit the blocks the first sweep read last (still in the GPU's L2 cache while they are recent).
Measured on one H200 at 8,192 x 151,936 bf16 (README, Performance): the forward 2.36 ms for forward
KL (its 4 units take 2.27 ms at the floor's bandwidth), the backward 1.89 ms (3 units: 1.70 ms),
forward + backward 2.5x the floor for forward KL and 2.6x for JSD: the kernels run at about the
copy bandwidth for the traffic they make, and the 7 units are what is left between them and the
floor. Rows shared by several programs, so that the second forward sweep re-reads only a part of
a row it has just read (from the L2 cache), were built and measured on the H200: no faster (README).

Precision: arithmetic in fp32 for fp32/bf16/fp16 inputs (fp64 kept by the chunked path); the
Triton kernels use the GPU's approximate exponential and log2 (ex2 / lg2.approx, errors of a few
float32 ulp); the gradient is rounded once, to the logits' dtype. tests/test_fused_loss.py states the tolerances
against ``token_terms``.

Implementations: ``'triton'`` (GPU kernels, each program walking token rows and looping over
vocabulary blocks; also runs on CPU tensors under ``TRITON_INTERPRET=1``) and ``'chunked'``
(PyTorch over blocks of token rows spanning the local vocabulary, about ``_CHUNK_ELEMS`` elements, so
no temporary is larger than a block; without TP the terms of a block follow its statistics while it
is in cache and reuse their exponentials, q = exp(a - m) / S; on one intra-op thread, see
``_one_intra_op_thread``). ``'auto'`` picks triton for CUDA inputs when triton imports, chunked
otherwise.

Rows are addressed through the two leading strides, so Megatron's [s, b, V] logits transposed to
[b, s, V] are read in place and the gradient has the student's strides. With ``positions`` the
token grid [b, t] is separate from the logits [b, S, V] (``_Cells``): each grid cell names the row
it reads in each model, empty cells are skipped, and the gradient kernel walks every row of the
student's logits, writing a cell's gradient or zeros; the trainer so reads the completion rows of
whole sequences without copying them (the chunked path copies one block of rows at a time).
``cfg.top_k`` (teacher top-k renormalisation) is not fused: such calls return
:func:`~megatron_renio.losses.divergence.token_terms`, on gathered rows with ``positions``.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from megatron_renio.errors import UserInputError
from megatron_renio.losses.divergence import DivergenceConfig, TokenTerms, gather_grid, token_terms
from megatron_renio.renio.vocab_parallel import VocabShard, compute_dtype, group_size

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the chunked PyTorch path is always available
    triton = None
try:
    from triton.language.extra.cuda import libdevice
except ImportError:  # a triton without CUDA's libdevice wrappers: the kernels use tl.log2
    libdevice = None

IMPLS = ("auto", "triton", "chunked")
_FORWARD_KL, _REVERSE_KL, _JSD = 0, 1, 2
# Elements per block of the chunked path (rows x local vocabulary): a few fp32 temporaries of this
# size stay in a CPU core's L2 cache.
_CHUNK_ELEMS = 1 << 16


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


@dataclass(frozen=True)
class _Cells:
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

    def block(self, z: torch.Tensor, model: int, bs: slice, ts: slice, n_cols: int) -> torch.Tensor:
        """The first ``n_cols`` columns of the rows of cells [bs, ts] in ``model``: a view without
        positions, else a copy of those rows (an empty cell reads position 0)."""
        if self.positions is None:
            return z[bs, ts, :n_cols]
        samples = torch.arange(z.shape[0], device=z.device)[bs].unsqueeze(-1)
        return z[samples, self.positions[model][bs, ts].clamp(min=0), :n_cols]

    def store(self, grad: torch.Tensor, bs: slice, ts: slice, n_cols: int, values: torch.Tensor) -> None:
        """Write ``values`` [len bs, len ts, n_cols] into the student rows of the filled cells [bs, ts]."""
        if self.positions is None:
            grad[bs, ts, :n_cols] = values
            return
        positions = self.positions[0][bs, ts]
        filled = positions >= 0
        samples = torch.arange(grad.shape[0], device=grad.device)[bs].unsqueeze(-1).expand_as(positions)
        grad[samples[filled], positions[filled], :n_cols] = values[filled].to(grad.dtype)

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
    """(max of z/T, sum of exp(z/T - max), non-finite per row, the exp block) over the last dim.

    The non-finite test is a row sum of the logits (inf, -inf or NaN anywhere makes it non-finite),
    cheaper on the CPU than an elementwise isfinite.
    """
    dtype = compute_dtype(z_block)
    if z_block.shape[-1] == 0:  # a TP rank holding only vocabulary padding
        empty = z_block.new_full(z_block.shape[:-1], float("-inf"), dtype=dtype)
        return empty, torch.zeros_like(empty), torch.zeros(empty.shape, dtype=torch.bool, device=empty.device), None
    row_max = z_block.amax(-1).to(dtype) * inv_temp  # max(z)/T == max(z/T) for T > 0
    bad = ~torch.isfinite(z_block.sum(-1))
    exps = _scaled(z_block, inv_temp, torch.where(torch.isneginf(row_max), 0.0, row_max)).exp_()
    return row_max, exps.sum(-1), bad, exps

def _chunk_elements(zs_block, zt_block, lse_s, lse_t, plan: _Plan, exps=None, want_q: bool = False):
    """(clamped d, h, q or None) of one block, elementwise (module docstring); q = student probabilities.

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

    q = None
    if plan.kind == _FORWARD_KL:
        p = prob(1, lp)
        d = lp.sub_(ls).mul_(p)
        h = p.neg_()
        if want_q:
            q = ls.exp_()
    elif plan.kind == _REVERSE_KL:
        q = prob(0, ls)
        d = ls.sub_(lp).mul_(q)
        h = q + d if want_q else q.add_(d)
    else:  # with p' = beta p and q' = (1 - beta) q: m = p' + q', h = q' (ls - lm), d = p' (lp - lm) + h
        p = prob(1, lp).mul_(plan.beta)
        q = prob(0, ls).mul_(1.0 - plan.beta)
        log_m = torch.add(p, q).clamp_min_(torch.finfo(p.dtype).tiny).log_()
        h = ls.sub_(log_m).mul_(q)
        d = lp.sub_(log_m).mul_(p).add_(h)
        q = q.div_(1.0 - plan.beta) if want_q else None
    if plan.clip is not None:
        clamped = d.clamp(0.0, plan.clip)
        h.mul_(d.eq_(clamped))  # 1 where 0 <= d <= k, else 0 (torch.clamp's gradient mask)
        d = clamped
    return d, h, q


def _chunked_forward(zs, zt, cells: _Cells, col, plan: _Plan, tp_group):
    """Sweeps 1 and 2 with the chunked path; per cell (lse_s, lse_t, D, H, s, u) of this shard, and the flag.

    D and H are 0 at empty cells, whose rows do not count for the flag.
    """
    n_b, n_t = cells.shape
    nv = plan.n_valid
    dtype = compute_dtype(zs)
    stats = zs.new_empty((4, n_b, n_t), dtype=dtype)  # max_s, sumexp_s, max_t, sumexp_t
    lse = zs.new_empty((2, n_b, n_t), dtype=dtype)
    sums = zs.new_empty((2, n_b, n_t), dtype=dtype)  # D, H
    bad = torch.zeros((), dtype=torch.bool, device=zs.device)
    filled = cells.filled()
    fuse = group_size(tp_group) == 1
    blocks = list(_row_blocks(n_b, n_t, nv))

    def rows(bs, ts):
        return cells.block(zs, 0, bs, ts, nv), cells.block(zt, 1, bs, ts, nv)

    def terms(block, bs, ts, exps=None):
        d, h, _ = _chunk_elements(*block, lse[0, bs, ts], lse[1, bs, ts], plan, exps)
        sums[0, bs, ts], sums[1, bs, ts] = d.sum(-1), h.sum(-1)

    for bs, ts in blocks:
        block = rows(bs, ts)
        exps = []
        for i, z in enumerate(block):
            row_max, sum_exp, row_bad, e = _chunk_stats(z, plan.inv_temp)
            stats[2 * i, bs, ts], stats[2 * i + 1, bs, ts] = row_max, sum_exp
            exps.append((e, sum_exp))
            bad |= (row_bad if filled is None else row_bad & filled[bs, ts]).any()
        if fuse:  # without TP a block's statistics are final: finish it while it is in cache
            lse[:, bs, ts], _ = _combine_stats(stats[:, bs, ts], bad, None)
            terms(block, bs, ts, exps)
    if not fuse:
        lse, bad = _combine_stats(stats, bad, tp_group)
        for bs, ts in blocks:
            terms(rows(bs, ts), bs, ts)
    if filled is not None:
        sums.masked_fill_(~filled, 0.0)
    s = _sampled_logprobs(zs, cells, 0, lse[0], col, plan.inv_temp)
    u = _sampled_logprobs(zt, cells, 1, lse[1], col, plan.inv_temp)
    return lse[0], lse[1], sums[0], sums[1], s, u, bad


def _chunked_grad(zs, zt, cells: _Cells, plan: _Plan, saved, coef, grad):
    """Sweep 3 into the filled rows of ``grad`` (real columns): coef_h * h - coef_q * q per block; the
    one-hot term follows."""
    lse_s, lse_t = saved
    coef_h, coef_q = coef
    nv = plan.n_valid
    for bs, ts in _row_blocks(*cells.shape, nv):
        _, h, q = _chunk_elements(cells.block(zs, 0, bs, ts, nv), cells.block(zt, 1, bs, ts, nv), lse_s[bs, ts],
                                  lse_t[bs, ts], plan, want_q=True)
        out = grad[bs, ts, :nv] if cells.positions is None else None  # a view to write into
        g = torch.mul(h, coef_h[bs, ts].unsqueeze(-1), out=out if out is not None and out.dtype == h.dtype else h)
        g.addcmul_(q, coef_q[bs, ts].neg().unsqueeze(-1))
        if g is not out:
            cells.store(grad, bs, ts, nv, g)


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
    # Arithmetic in base 2 (ex2 and lg2 are the GPU's native exponentials): A_v = z_v log2(e) / T and
    # log2 q_v = A_v - LSE2_S. Elements d are formed in bits (d / ln 2, clamped at k / ln 2) and their
    # sum converted once; h, H and every stored statistic are in natural units. N_VALID (real columns
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
        """(student row, teacher row, filled) of cell ``cell`` of the [b, n_t] grid (``_Cells``)."""
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
    def _online_sum_exp(z, scale, run_max, acc):
        """One tile [R, G] of the online sum-exp: a running max of the raw logits z per group of G
        entries (shape [R]), and per-entry sums of 2^((z - max) scale) = e^((z - max) / T)."""
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp2((run_max - shift) * scale)
        return new_max, acc * rescale[:, None] + tl.exp2(z * scale - (shift * scale)[:, None])

    @triton.jit
    def _stats_block(zs, zt, cols, scale, max_s, acc_s, max_t, acc_t, acc_z, N_VALID: tl.constexpr,
                     MASKED: tl.constexpr):
        acc_z += zs + zt
        if MASKED:
            zs = tl.where(cols < N_VALID, zs, float("-inf"))
            zt = tl.where(cols < N_VALID, zt, float("-inf"))
        max_s, acc_s = _online_sum_exp(zs, scale, max_s, acc_s)
        max_t, acc_t = _online_sum_exp(zt, scale, max_t, acc_t)
        return max_s, acc_s, max_t, acc_t, acc_z

    @triton.jit
    def _finish_sum_exp(run_max, acc, scale):
        """(max in natural units, sum-exp relative to it) of a row from :func:`_online_sum_exp`'s state."""
        row_max = tl.max(run_max, axis=0)
        shift = tl.where(row_max == float("-inf"), 0.0, row_max)
        total = tl.sum(tl.sum(acc, axis=1) * tl.exp2((run_max - shift) * scale), axis=0)
        return row_max * scale * _LN2, total

    @triton.jit
    def _stats_sweep(zs_base, zt_base, scale, N_VALID: tl.constexpr, BLOCK_V: tl.constexpr,
                     PREFETCH: tl.constexpr, GROUP: tl.constexpr):
        """Sweep 1 of a row: (max_s, sumexp_s, max_t, sumexp_t, non-finite 0/1), natural units, real columns.

        Blocks are tiles [BLOCK_V / GROUP, GROUP] of consecutive entries, each tile row with its own
        running max (TritonLaunch.max_group). Non-finite: the plain sum of both rows' logits is not
        finite (inf, -inf or NaN anywhere; a sum that overflows float32 counts too).
        """
        N_FULL: tl.constexpr = N_VALID // BLOCK_V * BLOCK_V
        R: tl.constexpr = BLOCK_V // GROUP
        tile = tl.arange(0, R)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        max_s = tl.full([R], float("-inf"), tl.float32)
        max_t = tl.full([R], float("-inf"), tl.float32)
        acc_s = tl.zeros([R, GROUP], tl.float32)
        acc_t = tl.zeros([R, GROUP], tl.float32)
        acc_z = tl.zeros([R, GROUP], tl.float32)
        zs, zt = _load_pair(zs_base, zt_base, tile, N_FULL, True)  # the first full block
        for v0 in range(0, N_FULL, BLOCK_V):
            cols = v0 + tile
            if PREFETCH:
                next_cols = tl.minimum(v0 + BLOCK_V, N_FULL - BLOCK_V) + tile
                next_zs, next_zt = _load_pair(zs_base, zt_base, next_cols, N_VALID, False)
            else:
                zs, zt = _load_pair(zs_base, zt_base, cols, N_VALID, False)
            max_s, acc_s, max_t, acc_t, acc_z = _stats_block(zs, zt, cols, scale, max_s, acc_s, max_t, acc_t, acc_z,
                                                             N_VALID, False)
            if PREFETCH:
                zs, zt = next_zs, next_zt
        for v0 in range(N_FULL, N_VALID, BLOCK_V):  # the tail, at most one block
            cols = v0 + tile
            zs, zt = _load_pair(zs_base, zt_base, cols, N_VALID, True)
            max_s, acc_s, max_t, acc_t, acc_z = _stats_block(zs, zt, cols, scale, max_s, acc_s, max_t, acc_t, acc_z,
                                                             N_VALID, True)
        total = tl.sum(tl.sum(acc_z, axis=1), axis=0)
        bad = tl.where(tl.abs(total) < float("inf"), 0.0, 1.0)  # False for inf and NaN
        max_s, sum_s = _finish_sum_exp(max_s, acc_s, scale)
        max_t, sum_t = _finish_sum_exp(max_t, acc_t, scale)
        return max_s, sum_s, max_t, sum_t, bad

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
    def _terms_block(zs, zt, cols, scale, lse2_s, lse2_t, beta, clip2, acc_d, acc_h,
                     N_VALID: tl.constexpr, KIND: tl.constexpr, HAS_CLIP: tl.constexpr, MASKED: tl.constexpr):
        d, h, _ = _element_terms(zs * scale - lse2_s, zt * scale - lse2_t, beta, clip2, KIND, HAS_CLIP)
        if MASKED:
            d = tl.where(cols < N_VALID, d, 0.0)
            h = tl.where(cols < N_VALID, h, 0.0)
        return acc_d + d, acc_h + h

    @triton.jit
    def _terms_sweep(zs_base, zt_base, scale, lse_s, lse_t, beta, clip2, N_VALID: tl.constexpr,
                     KIND: tl.constexpr, HAS_CLIP: tl.constexpr, BLOCK_V: tl.constexpr, PREFETCH: tl.constexpr):
        """Sweep 2 of a row, tail first, then the full blocks in reverse order: (sum of clamped d_v, sum of h_v)."""
        N_FULL: tl.constexpr = N_VALID // BLOCK_V * BLOCK_V
        lse2_s = lse_s * _LOG2E
        lse2_t = lse_t * _LOG2E
        acc_d = tl.zeros([BLOCK_V], tl.float32)
        acc_h = tl.zeros([BLOCK_V], tl.float32)
        for v0 in range(N_FULL, N_VALID, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            zs, zt = _load_pair(zs_base, zt_base, cols, N_VALID, True)
            acc_d, acc_h = _terms_block(zs, zt, cols, scale, lse2_s, lse2_t, beta, clip2, acc_d, acc_h, N_VALID,
                                        KIND, HAS_CLIP, True)
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
            acc_d, acc_h = _terms_block(zs, zt, cols, scale, lse2_s, lse2_t, beta, clip2, acc_d, acc_h, N_VALID,
                                        KIND, HAS_CLIP, False)
            if PREFETCH:
                zs, zt = next_zs, next_zt
        return tl.sum(acc_d, axis=0) * _LN2, tl.sum(acc_h, axis=0)

    @triton.jit
    def _lookup(base, col, scale, lse):
        """Natural log-prob z[col]/T - lse of a row's sampled token; 0 when it is not here (col = -1)."""
        hit = col >= 0
        z = tl.load(base + tl.where(hit, col, 0)).to(tl.float32)
        return tl.where(hit, z * scale * _LN2 - lse, 0.0)

    @triton.jit
    def _terms_row(zs_base, zt_base, col, terms_ptr, row, n_rows, scale, lse_s, lse_t, beta, clip2,
                   N_VALID: tl.constexpr, KIND: tl.constexpr, HAS_CLIP: tl.constexpr, BLOCK_V: tl.constexpr,
                   PREFETCH: tl.constexpr):
        """Sweep 2 of a row and its sampled-token lookups, stored as [D, H, s, u] (stride n_rows) at terms_ptr."""
        d, h = _terms_sweep(zs_base, zt_base, scale, lse_s, lse_t, beta, clip2, N_VALID, KIND, HAS_CLIP, BLOCK_V,
                            PREFETCH)
        tl.store(terms_ptr + row, d)
        tl.store(terms_ptr + n_rows + row, h)
        tl.store(terms_ptr + 2 * n_rows + row, _lookup(zs_base, col, scale, lse_s))
        tl.store(terms_ptr + 3 * n_rows + row, _lookup(zt_base, col, scale, lse_t))

    @triton.jit
    def _forward_kernel(zs_ptr, zs_sb, zs_st, zt_ptr, zt_sb, zt_st, spos_ptr, tpos_ptr, col_ptr, out_ptr, n_rows,
                        n_t, scale, beta, clip2, N_VALID: tl.constexpr, KIND: tl.constexpr, HAS_CLIP: tl.constexpr,
                        BLOCK_V: tl.constexpr, GRID: tl.constexpr, PREFETCH: tl.constexpr, GROUP: tl.constexpr,
                        STATS_ONLY: tl.constexpr):
        """Per filled cell, without TP sweeps 1 and 2: out = [lse_s, lse_t, D, H, s, u, non-finite]; under TP
        (STATS_ONLY) sweep 1 of this shard: out = [max_s, sumexp_s, max_t, sumexp_t, non-finite]. Zeros, left
        as they are at empty cells."""
        row = tl.program_id(0)
        while row < n_rows:
            zs_base, zt_base, filled = _cell_rows(zs_ptr, zs_sb, zs_st, zt_ptr, zt_sb, zt_st, spos_ptr, tpos_ptr,
                                                  row, n_t)
            if filled:
                max_s, sum_s, max_t, sum_t, bad = _stats_sweep(zs_base, zt_base, scale, N_VALID, BLOCK_V, PREFETCH,
                                                               GROUP)
                if STATS_ONLY:
                    tl.store(out_ptr + row, max_s)
                    tl.store(out_ptr + n_rows + row, sum_s)
                    tl.store(out_ptr + 2 * n_rows + row, max_t)
                    tl.store(out_ptr + 3 * n_rows + row, sum_t)
                    tl.store(out_ptr + 4 * n_rows + row, bad)
                else:
                    lse_s = max_s + tl.log(sum_s)
                    lse_t = max_t + tl.log(sum_t)
                    tl.store(out_ptr + row, lse_s)
                    tl.store(out_ptr + n_rows + row, lse_t)
                    _terms_row(zs_base, zt_base, tl.load(col_ptr + row), out_ptr + 2 * n_rows, row, n_rows, scale,
                               lse_s, lse_t, beta, clip2, N_VALID, KIND, HAS_CLIP, BLOCK_V, PREFETCH)
                    tl.store(out_ptr + 6 * n_rows + row, bad)
            row += GRID

    @triton.jit
    def _terms_kernel(zs_ptr, zs_sb, zs_st, zt_ptr, zt_sb, zt_st, spos_ptr, tpos_ptr, col_ptr, lse_ptr, out_ptr,
                      n_rows, n_t, scale, beta, clip2, N_VALID: tl.constexpr, KIND: tl.constexpr,
                      HAS_CLIP: tl.constexpr, BLOCK_V: tl.constexpr, GRID: tl.constexpr, PREFETCH: tl.constexpr):
        """Under TP, sweep 2 per filled cell from the global lse = [lse_s, lse_t]; out = [D, H, s, u] (this
        shard; zeros, left as they are at empty cells)."""
        row = tl.program_id(0)
        while row < n_rows:
            zs_base, zt_base, filled = _cell_rows(zs_ptr, zs_sb, zs_st, zt_ptr, zt_sb, zt_st, spos_ptr, tpos_ptr,
                                                  row, n_t)
            if filled:
                lse_s = tl.load(lse_ptr + row)
                lse_t = tl.load(lse_ptr + n_rows + row)
                _terms_row(zs_base, zt_base, tl.load(col_ptr + row), out_ptr, row, n_rows, scale, lse_s, lse_t, beta,
                           clip2, N_VALID, KIND, HAS_CLIP, BLOCK_V, PREFETCH)
            row += GRID

    @triton.jit
    def _grad_block(zs, zt, g_base, cols, scale, lse2_s, lse2_t, beta, clip2, coef_h, coef_q,
                    N_VALID: tl.constexpr, N_LOCAL: tl.constexpr, KIND: tl.constexpr, HAS_CLIP: tl.constexpr,
                    MASKED: tl.constexpr):
        _, h, q = _element_terms(zs * scale - lse2_s, zt * scale - lse2_t, beta, clip2, KIND, HAS_CLIP)
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
        """Sweep 3 of one cell from coef = [lse_s, lse_t, coef_h, coef_q, coef_x] (stride n_cells):
        g_j = coef_h h_j - coef_q q_j + [j == col] coef_x on the real columns, 0 on the padding.

        The sampled token's entry is formed again on its own and stored after a barrier (ordering it
        after the block stores), so the blocks carry no per-entry comparison with ``col``.
        """
        N_FULL: tl.constexpr = N_VALID // BLOCK_V * BLOCK_V
        lse2_s = tl.load(coef_ptr + cell) * _LOG2E
        lse2_t = tl.load(coef_ptr + n_cells + cell) * _LOG2E
        coef_h = tl.load(coef_ptr + 2 * n_cells + cell)
        coef_q = tl.load(coef_ptr + 3 * n_cells + cell)
        zs, zt = _load_pair(zs_base, zt_base, tl.arange(0, BLOCK_V), N_FULL, True)  # the first full block
        for v0 in range(0, N_FULL, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            if PREFETCH:
                next_cols = tl.minimum(v0 + BLOCK_V, N_FULL - BLOCK_V) + tl.arange(0, BLOCK_V)
                next_zs, next_zt = _load_pair(zs_base, zt_base, next_cols, N_VALID, False)
            else:
                zs, zt = _load_pair(zs_base, zt_base, cols, N_VALID, False)
            _grad_block(zs, zt, g_base, cols, scale, lse2_s, lse2_t, beta, clip2, coef_h, coef_q, N_VALID,
                        N_LOCAL, KIND, HAS_CLIP, False)
            if PREFETCH:
                zs, zt = next_zs, next_zt
        for v0 in range(N_FULL, N_LOCAL, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            zs, zt = _load_pair(zs_base, zt_base, cols, N_VALID, True)
            _grad_block(zs, zt, g_base, cols, scale, lse2_s, lse2_t, beta, clip2, coef_h, coef_q, N_VALID,
                        N_LOCAL, KIND, HAS_CLIP, True)
        col = tl.load(col_ptr + cell)
        hit = col >= 0
        col = tl.where(hit, col, 0)
        _, h, q = _element_terms(tl.load(zs_base + col).to(tl.float32) * scale - lse2_s,
                                 tl.load(zt_base + col).to(tl.float32) * scale - lse2_t, beta, clip2, KIND,
                                 HAS_CLIP)
        g = coef_h * h - coef_q * q + tl.load(coef_ptr + 4 * n_cells + cell)
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
        cell ``cell_ptr`` names (``_Cells.cell_of_row``; teacher row from ``tpos_ptr``), zeros where none."""
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


def _triton_launch(plan: _Plan, rows: int, device: torch.device, n_cols: int, launch: TritonLaunch):
    """((programs,), constants and launch options) of a kernel over ``rows`` rows of ``n_cols`` columns."""
    programs, stride = launch.grid(rows, device)
    block = max(16, min(launch.block_v, triton.next_power_of_2(max(n_cols, 1))))
    return (programs,), dict(KIND=plan.kind, HAS_CLIP=plan.clip is not None, BLOCK_V=block, GRID=stride,
                             PREFETCH=launch.prefetch, num_warps=launch.num_warps)


def _kernel_scalars(plan: _Plan):
    """(scale, beta, clip2): log2(e) / T, beta, and the clamp k in bits (k / ln 2; unused without a clamp)."""
    clip2 = 0.0 if plan.clip is None else plan.clip / math.log(2.0)
    return plan.inv_temp / math.log(2.0), plan.beta, clip2


def _strides(z):
    return z, z.stride(0), z.stride(1)


def _triton_forward(zs, zt, cells: _Cells, col, plan: _Plan, tp_group):
    """Sweeps 1 and 2 with the Triton kernels; per cell (lse_s, lse_t, D, H, s, u) of this shard, and the flag.

    Every output is 0 at empty cells (the lse too, without meaning: nothing reads it there).
    """
    n_b, n_t = cells.shape
    rows = n_b * n_t
    grid, opts = _triton_launch(plan, rows, zs.device, plan.n_valid, TRITON_LAUNCH)
    group = opts["BLOCK_V"] if TRITON_LAUNCH.max_group is None else min(TRITON_LAUNCH.max_group, opts["BLOCK_V"])
    scale, beta, clip2 = _kernel_scalars(plan)
    addressing = (*_strides(zs), *_strides(zt), *cells.kernel_positions(zs.device))
    if group_size(tp_group) == 1:
        out = zs.new_zeros((7, n_b, n_t), dtype=torch.float32)
        _forward_kernel[grid](*addressing, col, out, rows, n_t, scale, beta, clip2, N_VALID=plan.n_valid,
                              GROUP=group, STATS_ONLY=False, **opts)
        return (*out[:6], out[6].any())
    stats = zs.new_zeros((5, n_b, n_t), dtype=torch.float32)
    _forward_kernel[grid](*addressing, col, stats, rows, n_t, scale, beta, clip2, N_VALID=plan.n_valid,
                          GROUP=group, STATS_ONLY=True, **opts)
    lse, bad = _combine_stats(stats[:4], stats[4].any(), tp_group)
    out = zs.new_zeros((4, n_b, n_t), dtype=torch.float32)
    _terms_kernel[grid](*addressing, col, lse.contiguous(), out, rows, n_t, scale, beta, clip2,
                        N_VALID=plan.n_valid, **opts)
    return (lse[0], lse[1], *out, bad)


def _triton_grad(zs, zt, cells: _Cells, col, plan: _Plan, saved, coef, grad, launch: TritonLaunch):
    """Sweep 3 into every row and column of ``grad`` with the Triton kernel; coef = (coef_h, coef_q, coef_x)."""
    n_b, n_s, n_local = zs.shape
    packed = torch.stack([*saved, *coef]).to(torch.float32).contiguous()
    grid, opts = _triton_launch(plan, n_b * n_s, zs.device, n_local, launch)
    _grad_kernel[grid](*_strides(zs), *_strides(zt), *_strides(grad), cells.cell_of_row(n_s, zs.device),
                       cells.kernel_positions(zs.device)[1], col, packed, n_b * n_s, n_s, col.numel(),
                       *_kernel_scalars(plan), N_VALID=plan.n_valid, N_LOCAL=n_local, **opts)


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


def _sampled_logprobs(z, cells: _Cells, model: int, lse, col, inv_temp: float):
    """This rank's share of log softmax(z/T)[x] per cell from the local column of x (-1 where x is not
    here, or the cell is empty: 0); ``model`` 0 student, 1 teacher."""
    hit = col >= 0
    samples, positions = cells.index(model, z.device)
    value = z[samples, positions, col.clamp(min=0)].to(lse.dtype) * inv_temp - lse
    return torch.where(hit, value, torch.zeros_like(value))


class _FusedTokenTerms(torch.autograd.Function):
    """(student, teacher, tokens) -> (D, s, u, nonfinite) per cell; gradient w.r.t. the student logits only."""

    @staticmethod
    def forward(ctx, zs, zt, tokens, cells: _Cells, plan: _Plan, shard: VocabShard, tp_group, use_triton: bool,
                need_grad: bool):
        local = tokens.to(torch.int64) - shard.start
        here = (local >= 0) & (local < plan.n_valid)
        filled = cells.filled()
        col = torch.where(here if filled is None else here & filled, local, -1)
        if use_triton:
            col = col.to(torch.int32).contiguous()
            lse_s, lse_t, d_sum, h_sum, s, u, bad = _triton_forward(zs, zt, cells, col, plan, tp_group)
        else:
            with _one_intra_op_thread(zs.device):
                lse_s, lse_t, d_sum, h_sum, s, u, bad = _chunked_forward(zs, zt, cells, col, plan, tp_group)
        per_token = torch.stack([d_sum, h_sum, s, u])
        if group_size(tp_group) > 1:
            dist.all_reduce(per_token, group=tp_group)
        d_sum, h_sum, s, u = per_token.unbind(0)
        ctx.mark_non_differentiable(u, bad)
        if need_grad:
            in_vocab = (tokens >= 0) & (tokens < shard.true_vocab_size)  # else s = 0, a constant
            ctx.save_for_backward(zs, zt, lse_s, lse_t, h_sum, col, in_vocab)
        ctx.cells, ctx.plan, ctx.use_triton = cells, plan, use_triton
        ctx.grad_launch = TRITON_GRAD_LAUNCH  # the launch in effect at the forward, as for its kernels
        return d_sum, s, u, bad

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_d, grad_s, _grad_u, _grad_bad):
        zs, zt, lse_s, lse_t, h_sum, col, in_vocab = ctx.saved_tensors
        cells, plan = ctx.cells, ctx.plan
        grad_s = torch.where(in_vocab, grad_s, 0.0)
        coef_h = grad_d * plan.inv_temp
        coef_q = (grad_d * h_sum + grad_s) * plan.inv_temp
        coef_x = torch.where(col >= 0, grad_s * plan.inv_temp, 0.0)
        if ctx.use_triton:  # the kernel writes every entry
            grad = torch.empty_like(zs)  # the student's strides (dense: a view of a contiguous tensor)
            _triton_grad(zs, zt, cells, col, plan, (lse_s, lse_t), (coef_h, coef_q, coef_x), grad, ctx.grad_launch)
            return grad, *[None] * 8
        with _one_intra_op_thread(zs.device):
            if cells.positions is None:  # every row is a cell's: only the padding columns need zeros
                grad = torch.empty_like(zs)
                grad[..., plan.n_valid:] = 0
            else:
                grad = torch.zeros_like(zs)
            _chunked_grad(zs, zt, cells, plan, (lse_s, lse_t), (coef_h, coef_q), grad)
            samples, positions = cells.index(0, zs.device)  # coef_x is 0 at empty cells
            grad.index_put_((samples.expand_as(positions), positions, col.clamp(min=0)), coef_x.to(grad.dtype),
                            accumulate=True)
        return grad, *[None] * 8


def triton_available() -> bool:
    """True when the triton package imported (GPU kernels, or the interpreter on CPU)."""
    return triton is not None


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
    cells = _Cells(tuple(tokens.shape), positions)
    plan = _Plan.build(cfg, shard)
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
