"""The chunked PyTorch implementation of the fused loss (formulas: :mod:`~megatron_renio.losses.fused`).

Blocks of token rows spanning the local vocabulary, about ``_CHUNK_ELEMS`` elements each, so that no
temporary is larger than a block. Without TP the terms of a block follow its statistics while it is
in cache and reuse their exponentials (q = exp(a - m) / S). On the CPU the blocks are shared out
among as many threads as torch's intra-op thread count, each running its block ops single-threaded
(:func:`block_threads`); every block writes only its own rows, so the result does not depend on the
thread count. Arithmetic in float32, float64 inputs kept in float64. This is the CPU path and the
fallback wherever the Triton kernels do not apply.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from megatron_renio.losses.fused_plan import FORWARD_KL, REVERSE_KL, Cells, Plan, combine_stats
from megatron_renio.renio.vocab_parallel import compute_dtype, group_size

# Elements per block (rows x local vocabulary): the four or so fp32 temporaries of a block fit in a
# server core's L2 cache (2 MiB); a block is large enough that Python's per-op overhead stays small.
_CHUNK_ELEMS = 1 << 17
# At most this many threads share the blocks: each holds Python's GIL between its ops, about a
# quarter of a block's time on the CPU profile at 2048 x 32000 (the rest runs without it), so more
# threads would queue on the GIL.
_MAX_BLOCK_THREADS = 4


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
    """New tensor z/T - shift (shift per row) in the dtype of ``shift``, in one pass over the block
    (one rounding: torch's CPU add with alpha is a fused multiply-add)."""
    return torch.add(shift.neg().unsqueeze(-1), z_block, alpha=inv_temp)


def _max_shift(row_max: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """max(z)/T per row (== max(z/T) for T > 0), 0 where the row is all -inf (an empty shard)."""
    shift = row_max * inv_temp
    return torch.where(torch.isneginf(shift), 0.0, shift)


def _log_probs(z_block: torch.Tensor, inv_temp: float, row_max: torch.Tensor, log_sum: torch.Tensor):
    """New tensor log softmax(z/T) of a block = (z/T - M/T) - log_sum, from the global row max M of the
    raw logits and log_sum = log sum exp(z/T - M/T) (:func:`~megatron_renio.losses.fused_plan.combine_stats`).

    Subtracting M/T first keeps the values near the max exact however large the logits are; z/T - LSE
    in one step rounds every log-prob at the size of the LSE (on logits of spread 8, the size of a
    language model's, that alone put D's error against float64 at 0.7-1.6x the fp32 tolerance).
    """
    return _scaled(z_block, inv_temp, _max_shift(row_max, inv_temp)).sub_(log_sum.unsqueeze(-1))


def _block_log_probs(zs, zt, cells: Cells, bs: slice, ts: slice, plan: Plan, row_stats):
    """(student, teacher) log-prob blocks of cells [bs, ts] (:func:`_log_probs`); ``row_stats`` [4, b, t]
    = (max, log_sum) of the student then the teacher."""
    return tuple(_log_probs(cells.block(z, i, bs, ts, plan.n_valid), plan.inv_temp, row_stats[2 * i, bs, ts],
                            row_stats[2 * i + 1, bs, ts]) for i, z in enumerate((zs, zt)))


def _chunk_stats(z_block: torch.Tensor, inv_temp: float):
    """(max of z, sum of exp((z - max) / T), non-finite per row, (z - max) / T, its exp) over the last dim.

    The non-finite test is a row sum of the logits (inf, -inf or NaN anywhere makes it non-finite),
    cheaper on the CPU than an elementwise isfinite.
    """
    dtype = compute_dtype(z_block)
    if z_block.shape[-1] == 0:  # a TP rank holding only vocabulary padding
        empty = z_block.new_full(z_block.shape[:-1], float("-inf"), dtype=dtype)
        no_rows = torch.zeros(empty.shape, dtype=torch.bool, device=empty.device)
        return empty, torch.zeros_like(empty), no_rows, None, None
    row_max = z_block.amax(-1).to(dtype)
    bad = ~torch.isfinite(z_block.sum(-1))
    shifted = _scaled(z_block, inv_temp, _max_shift(row_max, inv_temp))
    exps = shifted.exp()
    return row_max, exps.sum(-1), bad, shifted, exps


def _chunk_elements(ls, lp, plan: Plan, exps=None, want_q: bool = False):
    """(clamped d, h, q or None) of one block, elementwise (module docstring); q = student probabilities.

    ``ls``, ``lp``: the block's student and teacher log-probs (:func:`_log_probs`), overwritten.
    ``exps``: optional ((exp(a - m_s), S_s), (exp(b - m_t), S_t)) from :func:`_chunk_stats` when those
    statistics are already global (no TP): then q = exp_s / S_s and p = exp_t / S_t need no new exp.
    """

    def prob(i, log_prob):
        if exps is None:
            return log_prob.exp()
        e, total = exps[i]
        return e.div_(total.unsqueeze(-1))

    q = None
    if plan.kind == FORWARD_KL:
        p = prob(1, lp)
        d = lp.sub_(ls).mul_(p)
        h = p.neg_()
        if want_q:
            q = ls.exp_()
    elif plan.kind == REVERSE_KL:
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


def chunked_forward(zs, zt, cells: Cells, col, plan: Plan, tp_group, workers: int = 1):
    """Sweeps 1 and 2 with the chunked path on ``workers`` threads (:func:`block_threads`): the row
    statistics that :func:`chunked_grad` reads ([4, b, t]: the global max of the raw logits and
    log_sum, :func:`_log_probs`, of the student then the teacher), per cell (D, H, s, u) of this
    shard, and the flag.

    D and H are 0 at empty cells, whose rows do not count for the flag.
    """
    n_b, n_t = cells.shape
    nv = plan.n_valid
    dtype = compute_dtype(zs)
    stats = zs.new_empty((4, n_b, n_t), dtype=dtype)  # max_s, sumexp_s, max_t, sumexp_t; sums to log-sums once global
    sums = zs.new_empty((2, n_b, n_t), dtype=dtype)  # D, H
    bad_rows = torch.zeros((n_b, n_t), dtype=torch.bool, device=zs.device)
    filled = cells.filled()
    fuse = group_size(tp_group) == 1
    blocks = list(_row_blocks(n_b, n_t, nv))

    def terms(bs, ts, log_probs, exps=None):
        d, h, _ = _chunk_elements(*log_probs, plan, exps)
        sums[0, bs, ts], sums[1, bs, ts] = d.sum(-1), h.sum(-1)

    def first_sweep(bs, ts):
        shifted, exps = [], []
        for i, z in enumerate((zs, zt)):
            row_max, sum_exp, row_bad, a, e = _chunk_stats(cells.block(z, i, bs, ts, nv), plan.inv_temp)
            stats[2 * i, bs, ts], stats[2 * i + 1, bs, ts] = row_max, sum_exp
            shifted.append(a)
            exps.append((e, sum_exp))
            bad_rows[bs, ts] |= row_bad
        if fuse:  # without TP a block's statistics are final: finish it while it is in cache
            log_sums = stats[1::2, bs, ts].log_()
            terms(bs, ts, [a.sub_(log_sum.unsqueeze(-1)) for a, log_sum in zip(shifted, log_sums)], exps)

    for_each_block(blocks, first_sweep, workers)
    bad = (bad_rows if filled is None else bad_rows & filled).any()
    if not fuse:
        maxes, log_sums, bad = combine_stats(stats, bad, tp_group, plan.inv_temp)
        stats[0::2], stats[1::2] = maxes, log_sums
        for_each_block(blocks, lambda bs, ts: terms(bs, ts, _block_log_probs(zs, zt, cells, bs, ts, plan, stats)),
                       workers)
    if filled is not None:
        sums.masked_fill_(~filled, 0.0)
    s = _sampled_logprobs(zs, cells, 0, stats[0:2], col, plan.inv_temp)
    u = _sampled_logprobs(zt, cells, 1, stats[2:4], col, plan.inv_temp)
    return stats, sums[0], sums[1], s, u, bad


def chunked_grad(zs, zt, cells: Cells, plan: Plan, row_stats, coef, grad, workers: int = 1):
    """Sweep 3 into the filled rows of ``grad`` (real columns) on ``workers`` threads: coef_h * h -
    coef_q * q per block; the one-hot term follows. ``row_stats``: from :func:`chunked_forward`."""
    coef_h, coef_q = coef
    nv = plan.n_valid
    # with positions a store also adds zeros to row 0 of each sample (Cells.store), which another
    # block may be writing: stores then take turns
    store_lock = threading.Lock() if cells.positions is not None else contextlib.nullcontext()

    def third_sweep(bs, ts):
        _, h, q = _chunk_elements(*_block_log_probs(zs, zt, cells, bs, ts, plan, row_stats), plan, want_q=True)
        out = grad[bs, ts, :nv] if cells.positions is None else None  # a view to write into
        g = torch.mul(h, coef_h[bs, ts].unsqueeze(-1), out=out if out is not None and out.dtype == h.dtype else h)
        g.addcmul_(q, coef_q[bs, ts].neg().unsqueeze(-1))
        if g is not out:
            with store_lock:
                cells.store(grad, bs, ts, nv, g)

    for_each_block(list(_row_blocks(*cells.shape, nv)), third_sweep, workers)


@contextlib.contextmanager
def block_threads(device: torch.device):
    """Yield how many threads the chunked loops use: torch's intra-op thread count on the CPU (at most
    ``_MAX_BLOCK_THREADS``), 1 elsewhere.

    Meanwhile torch's intra-op thread count is 1 (restored after), so that each block op runs on the
    thread that calls it. A block op is small (tens of microseconds): splitting it over intra-op
    threads adds a synchronisation per op, and on an oversubscribed machine a preempted thread stalls
    every op. Handing whole blocks to threads (:func:`for_each_block`) has no per-op synchronisation.
    Measured on 2 shared cores at 2048 x 32000 fp32, forward + backward, forward KL: one thread
    1.0-1.6 s and two threads of whole blocks 0.6-1.0 s (2026-11-28); two threads per op 1.0-17 s on
    an earlier day (the high end whenever other processes were running). Under torchrun with several
    ranks per node the intra-op count is 1 (OMP_NUM_THREADS=1) unless the user sets it, so each rank
    runs one thread.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield 1
        return
    torch.set_num_threads(1)
    try:
        yield min(threads, _MAX_BLOCK_THREADS)
    finally:
        torch.set_num_threads(threads)


def for_each_block(blocks: list, fn, workers: int) -> None:
    """Call ``fn(bs, ts)`` once for every block, on ``workers`` threads taking the next block in turn.

    ``fn`` must write only its own block's rows. The calling thread is one of the workers; the
    others run under ``torch.no_grad()`` and the caller's inference mode (both are per thread; no
    block op needs autograd), with the intra-op thread count that new threads start with (1 inside
    :func:`block_threads`). The first exception stops the hand-out and is raised after every thread
    is done.
    """
    if workers <= 1 or len(blocks) <= 1:
        for bs, ts in blocks:
            fn(bs, ts)
        return
    todo = iter(blocks)
    lock = threading.Lock()
    failed = threading.Event()
    inference = torch.is_inference_mode_enabled()  # tensors made in inference mode take in-place writes only there

    def work():
        while not failed.is_set():
            with lock:
                block = next(todo, None)
            if block is None:
                return
            try:
                fn(*block)
            except BaseException:
                failed.set()
                raise

    def helper():
        with torch.inference_mode(inference), torch.no_grad():
            work()

    with ThreadPoolExecutor(max_workers=workers - 1, thread_name_prefix="fused-loss-block") as pool:
        helpers = [pool.submit(helper) for _ in range(workers - 1)]
        work()  # an error here still waits for the helpers (leaving the pool joins them)
    for future in helpers:
        future.result()  # re-raises a helper's error


def _sampled_logprobs(z, cells: Cells, model: int, row_stats, col, inv_temp: float):
    """This rank's share of log softmax(z/T)[x] per cell from the local column of x (-1 where x is not
    here, or the cell is empty: 0); ``model`` 0 student, 1 teacher; ``row_stats`` its (max, log_sum)."""
    hit = col >= 0
    samples, positions = cells.index(model, z.device)
    row_max, log_sum = row_stats
    value = _scaled(z[samples, positions, col.clamp(min=0)].unsqueeze(-1), inv_temp, _max_shift(row_max, inv_temp))
    value = value.squeeze(-1) - log_sum
    return torch.where(hit, value, torch.zeros_like(value))
