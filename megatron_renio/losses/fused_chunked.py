"""The chunked PyTorch implementation of the fused loss (formulas: :mod:`~megatron_renio.losses.fused`).

Blocks of token rows spanning the local vocabulary, about ``_CHUNK_ELEMS`` elements each, so that no
temporary is larger than a block. Without TP the terms of a block follow its statistics while it is
in cache, from the shifted logits (z - max) / T of the statistics. On the CPU the blocks are shared out
among as many threads as torch's intra-op thread count, each running its block ops single-threaded
(:func:`block_threads`); every block writes only its own rows, so the result does not depend on the
thread count. Each thread writes its block-sized temporaries into buffers it reuses from block to
block (:class:`_Scratch`). Arithmetic in float32, float64 inputs kept in float64. This is the CPU path
and the fallback wherever the Triton kernels do not apply.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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


class _Scratch:
    """The block-sized buffers of one thread of one sweep, reused from block to block, so that the
    block ops allocate no block-sized tensor (only per-row ones).

    On the CPU each freed block temporary (512 KiB) would otherwise go back to the system: glibc maps
    allocations from 128 KiB up and returns them when freed, and trims the top of its heap beyond 128
    KiB, until a larger free raises both thresholds. The next block then faults its pages in again.
    Measured at 2,048 x 32,000 fp32, forward KL, one thread, in a process that ran only the loss
    (2026-11-29): 543k page faults and 1.6-2.1 s per call with a new tensor per block op, 64k (the
    gradient's own pages) and 0.84-1.2 s with these buffers. Two temporaries of one block share a
    buffer name only where their lifetimes do not overlap.
    """

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}
        self._views: dict[tuple, torch.Tensor] = {}  # (name, shape, dtype, device) -> the view ``take`` gives

    def take(self, name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Buffer ``name`` as a contiguous tensor of ``shape`` (its values are left over from earlier
        blocks); grown when a block needs more. The same tensor object for the same shape (blocks are
        of one or two shapes), which costs a dictionary lookup, not two view ops."""
        key = (name, shape, dtype, device)
        view = self._views.get(key)
        if view is None:
            count = shape.numel()
            buffer = self._buffers.get(name)
            if buffer is None or buffer.numel() < count or buffer.dtype != dtype or buffer.device != device:
                buffer = self._buffers[name] = torch.empty(count, dtype=dtype, device=device)
                self._views = {k: v for k, v in self._views.items() if k[0] != name}  # views of the old buffer
            view = self._views[key] = buffer[:count].view(shape)
        return view

    def like(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Buffer ``name`` with the shape, dtype and device of ``tensor``."""
        return self.take(name, tensor.shape, tensor.dtype, tensor.device)


def _row_blocks(n_b: int, n_t: int, n_cols: int):
    """Yield (b-slice, t-slice) pairs tiling the [n_b, n_t] token grid, each about _CHUNK_ELEMS / n_cols
    rows, the slices clipped to the grid.

    Slicing the two leading dimensions (rather than flattening them) keeps every block a view, also
    for Megatron's [s, b, V] logits transposed to [b, s, V].
    """
    if n_b == 0 or n_t == 0:  # an empty token grid: no block
        return
    rows = max(1, _CHUNK_ELEMS // max(n_cols, 1))
    t_step = min(n_t, rows)
    b_step = max(1, rows // t_step)
    for b0 in range(0, n_b, b_step):
        for t0 in range(0, n_t, t_step):
            yield slice(b0, min(b0 + b_step, n_b)), slice(t0, min(t0 + t_step, n_t))


@dataclass(frozen=True)
class _Block:
    """The cells [bs, ts] of one block and where their logits rows are.

    ``starts`` (student, teacher): every cell of the block is filled and, in each model, the block's
    cells read consecutive rows beginning at that row in each of its samples; the rows are then read
    as views and the gradient is written in place. None: without positions the rows are the cells
    themselves (views too); with positions the rows are gathered and the gradient scattered back
    (``rows`` and ``store``).
    """

    bs: slice
    ts: slice
    starts: tuple[int, int] | None = None

    def rows(self, z: torch.Tensor, model: int, cells: Cells, n_cols: int) -> torch.Tensor:
        """The first ``n_cols`` columns of the rows of this block's cells in ``model`` (0 student, 1 teacher):
        a view, or with positions and no ``starts`` a copy (an empty cell reads position 0)."""
        bs, ts = self.bs, self.ts
        if cells.positions is None:
            return z[bs, ts, :n_cols]
        if self.starts is not None:
            start = self.starts[model]
            return z[bs, start:start + ts.stop - ts.start, :n_cols]
        samples = torch.arange(z.shape[0], device=z.device)[bs].unsqueeze(-1)
        return z[samples, cells.positions[model][bs, ts].clamp(min=0), :n_cols]

    def grad_rows(self, grad: torch.Tensor, cells: Cells, n_cols: int) -> torch.Tensor | None:
        """The view of ``grad`` that this block's gradient fills, where its rows are a view (else None)."""
        if cells.positions is not None and self.starts is None:
            return None
        return self.rows(grad, 0, cells, n_cols)

    def store(self, grad: torch.Tensor, cells: Cells, n_cols: int, values: torch.Tensor) -> None:
        """Scatter ``values`` [len bs, len ts, n_cols] into the student rows of this block's filled cells
        (positions, no ``starts``). ``grad`` must be zero on those rows, as the chunked backward makes it.

        The empty cells of the block add zeros to the row of one of its filled cells (every block that is
        stored has one: :func:`chunked_blocks` leaves out blocks without), which no other block writes: filled
        cells read distinct student rows, so blocks on different threads never write the same row. No
        boolean indexing (a host sync per block on a GPU).
        """
        positions = cells.positions[0][self.bs, self.ts]
        filled = positions >= 0
        samples = torch.arange(grad.shape[0], device=grad.device)[self.bs].unsqueeze(-1).expand_as(positions)
        spare = filled.flatten().to(torch.uint8).argmax()  # a filled cell of the block
        samples = torch.where(filled, samples, samples.flatten()[spare])
        positions = torch.where(filled, positions, positions.flatten()[spare])
        values = torch.where(filled.unsqueeze(-1), values, 0.0).to(grad.dtype)
        grad[:, :, :n_cols].index_put_((samples, positions), values, accumulate=True)


def chunked_blocks(cells: Cells, n_cols: int) -> list[_Block]:
    """The blocks of the chunked sweeps (:func:`_row_blocks`), with positions less those without a filled
    cell (their D, H, s and u are 0 and their rows get no gradient) and with their ``starts`` where their
    rows are runs (:class:`_Block`): the trainer's completion rows are, but for the block where a
    sample's completion ends. Made once per call (it copies the positions to the host), for
    :func:`chunked_forward` and :func:`chunked_grad`."""
    tiles = _row_blocks(*cells.shape, n_cols)
    if cells.positions is None:
        return [_Block(bs, ts) for bs, ts in tiles]
    positions = torch.stack(cells.positions).cpu()  # [2, b, t]: student, teacher
    filled = positions[0] >= 0
    follows = torch.ones_like(filled)  # the cell reads the rows after those of the previous cell, in both models
    follows[:, 1:] = (positions[:, :, 1:] == positions[:, :, :-1] + 1).all(0)
    filled_before = torch.nn.functional.pad(filled.cumsum(1), (1, 0)).tolist()  # filled cells before column j
    breaks_before = torch.nn.functional.pad((~follows).cumsum(1), (1, 0)).tolist()
    first_rows = positions.tolist()
    blocks = []
    for bs, ts in tiles:
        samples, width = range(bs.start, bs.stop), ts.stop - ts.start
        counts = [filled_before[i][ts.stop] - filled_before[i][ts.start] for i in samples]
        if not any(counts):
            continue
        runs = all(count == width and breaks_before[i][ts.stop] == breaks_before[i][ts.start + 1] for i, count in
                   zip(samples, counts))
        starts = {(first_rows[0][i][ts.start], first_rows[1][i][ts.start]) for i in samples}
        blocks.append(_Block(bs, ts, starts.pop() if runs and len(starts) == 1 else None))
    return blocks


def _scaled(z_block: torch.Tensor, inv_temp: float, shift: torch.Tensor, out: torch.Tensor | None = None):
    """z/T - shift (shift per row) in the dtype of ``shift``, into ``out`` (else a new tensor), in one
    pass over the block (one rounding: torch's CPU add with alpha is a fused multiply-add)."""
    return torch.add(shift.neg().unsqueeze(-1), z_block, alpha=inv_temp, out=out)


def _max_shift(row_max: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """max(z)/T per row (== max(z/T) for T > 0), 0 where the row is all -inf (an empty shard)."""
    shift = row_max * inv_temp
    return torch.where(torch.isneginf(shift), 0.0, shift)


def _log_probs(z_block: torch.Tensor, inv_temp: float, row_max: torch.Tensor, log_sum: torch.Tensor,
               out: torch.Tensor | None = None):
    """log softmax(z/T) of a block = (z/T - M/T) - log_sum into ``out`` (else a new tensor), from the
    global row max M of the raw logits and log_sum = log sum exp(z/T - M/T)
    (:func:`~megatron_renio.losses.fused_plan.combine_stats`).

    z/T - M/T is one fused multiply-add with M/T rounded once per row: that rounding is common to the
    row and cancels against log_sum, and each value is rounded once at its own size, which is small
    near the max however large the logits are. z/T - LSE in one step rounds every log-prob at the size
    of the LSE (on logits of spread 24, maxima near 100, D's error against float64 was up to 1.6x the
    fp32 tolerance).
    """
    return _normalised(_scaled(z_block, inv_temp, _max_shift(row_max, inv_temp), out), log_sum)


def _normalised(shifted: torch.Tensor, log_sum: torch.Tensor) -> torch.Tensor:
    """The log-probs ``shifted - log_sum`` (per row) in place, from ``shifted`` = z/T - M/T."""
    return shifted.sub_(log_sum.unsqueeze(-1))


def _block_log_probs(zs, zt, cells: Cells, block: _Block, plan: Plan, row_stats, scratch: _Scratch):
    """(student, teacher) log-prob blocks of ``block``'s cells (:func:`_log_probs`) in ``scratch``'s
    buffers ``a0`` and ``a1``; ``row_stats`` [4, b, t] = (max, log_sum) of the student then the teacher."""
    bs, ts = block.bs, block.ts
    dtype = compute_dtype(zs)
    log_probs = []
    for i, z in enumerate((zs, zt)):
        rows = block.rows(z, i, cells, plan.n_valid)
        out = scratch.take(f"a{i}", rows.shape, dtype, rows.device)
        log_probs.append(_log_probs(rows, plan.inv_temp, row_stats[2 * i, bs, ts], row_stats[2 * i + 1, bs, ts], out))
    return log_probs


def _chunk_stats(z_block: torch.Tensor, inv_temp: float, shifted: torch.Tensor, exps: torch.Tensor):
    """(max of z, sum of exp((z - max) / T), non-finite per row, (z - max) / T as :func:`_log_probs`
    forms it, in ``shifted``) over the last dim; ``exps`` is overwritten.

    The non-finite test is a row sum of the logits (inf, -inf or NaN anywhere makes it non-finite),
    cheaper on the CPU than an elementwise isfinite; it is summed in the compute dtype (fp16 logits of an
    ordinary row sum past fp16's 65,504).
    """
    dtype = compute_dtype(z_block)
    if z_block.shape[-1] == 0:  # a TP rank holding only vocabulary padding
        empty = z_block.new_full(z_block.shape[:-1], float("-inf"), dtype=dtype)
        return empty, torch.zeros_like(empty), torch.zeros(empty.shape, dtype=torch.bool, device=empty.device), None
    row_max = z_block.amax(-1).to(dtype)
    bad = ~torch.isfinite(z_block.sum(-1, dtype=dtype))
    shifted = _scaled(z_block, inv_temp, _max_shift(row_max, inv_temp), shifted)
    return row_max, torch.exp(shifted, out=exps).sum(-1), bad, shifted


def _chunk_elements(ls, lp, plan: Plan, scratch: _Scratch, want_q: bool = False):
    """(clamped d, h, q or None) of one block, elementwise (module docstring); q = student probabilities.

    ``ls``, ``lp``: the block's student and teacher log-probs (:func:`_log_probs`), overwritten; the
    other temporaries are ``scratch``'s buffers ``p``, ``q``, ``m`` and ``clamped``. Every
    sweep forms them, and p and q from them, with the same ops, so that the forward's D and H and the
    backward's h take the same clamp mask bit for bit (for JSD, d_v is of the order of (p_v - q_v)^2:
    where the models agree, another rounding of p or q can flip its sign).
    """
    q = None
    if plan.kind == FORWARD_KL:
        p = torch.exp(lp, out=scratch.like("p", lp))
        d = lp.sub_(ls).mul_(p)
        h = p.neg_()
        if want_q:
            q = ls.exp_()
    elif plan.kind == REVERSE_KL:
        q = torch.exp(ls, out=scratch.like("q", ls))
        d = ls.sub_(lp).mul_(q)
        h = torch.add(q, d, out=scratch.like("p", q)) if want_q else q.add_(d)
    else:  # with p' = beta p and q' = (1 - beta) q: m = p' + q', h = q' (ls - lm), d = p' (lp - lm) + h
        p = torch.exp(lp, out=scratch.like("p", lp)).mul_(plan.beta)
        q = torch.exp(ls, out=scratch.like("q", ls)).mul_(1.0 - plan.beta)
        log_m = torch.add(p, q, out=scratch.like("m", p)).clamp_min_(torch.finfo(p.dtype).tiny).log_()
        h = ls.sub_(log_m).mul_(q)
        d = lp.sub_(log_m).mul_(p).add_(h)
        q = q.div_(1.0 - plan.beta) if want_q else None
    if plan.clip is not None:
        clamped = torch.clamp(d, 0.0, plan.clip, out=scratch.like("clamped", d))
        h.mul_(d.eq_(clamped))  # 1 where 0 <= d <= k, else 0 (torch.clamp's gradient mask)
        d = clamped
    return d, h, q


def chunked_forward(zs, zt, cells: Cells, blocks: list[_Block], col, plan: Plan, tp_group, workers: int = 1):
    """Sweeps 1 and 2 over ``blocks`` (:func:`chunked_blocks`) on ``workers`` threads (:func:`block_threads`): the row
    statistics that :func:`chunked_grad` reads ([4, b, t]: the global max of the raw logits and
    log_sum, :func:`_log_probs`, of the student then the teacher), per cell (D, H, s, u) of this
    shard, and the flag.

    D and H are 0 at empty cells, whose rows do not count for the flag.
    """
    n_b, n_t = cells.shape
    nv = plan.n_valid
    dtype = compute_dtype(zs)
    # max_s, sumexp_s, max_t, sumexp_t (the sums become log-sums once global); zeros where no block goes
    stats = zs.new_zeros((4, n_b, n_t), dtype=dtype)
    sums = zs.new_zeros((2, n_b, n_t), dtype=dtype)  # D, H
    bad_rows = torch.zeros((n_b, n_t), dtype=torch.bool, device=zs.device)
    filled = cells.filled()
    fuse = group_size(tp_group) == 1

    def terms(block: _Block, log_probs, scratch: _Scratch):
        d, h, _ = _chunk_elements(*log_probs, plan, scratch)
        sums[0, block.bs, block.ts], sums[1, block.bs, block.ts] = d.sum(-1), h.sum(-1)

    def first_sweep(block: _Block, scratch: _Scratch):
        bs, ts = block.bs, block.ts
        shifted = []
        for i, z in enumerate((zs, zt)):
            rows = block.rows(z, i, cells, nv)
            buffers = [scratch.take(name, rows.shape, dtype, rows.device) for name in (f"a{i}", "p")]
            row_max, sum_exp, row_bad, a = _chunk_stats(rows, plan.inv_temp, *buffers)
            stats[2 * i, bs, ts], stats[2 * i + 1, bs, ts] = row_max, sum_exp
            shifted.append(a)
            bad_rows[bs, ts] |= row_bad
        if fuse:  # without TP a block's statistics are final: finish it while it is in cache
            log_sums = stats[1::2, bs, ts].log_()
            terms(block, [_normalised(a, log_sum) for a, log_sum in zip(shifted, log_sums)], scratch)

    for_each_block(blocks, first_sweep, workers)
    bad = (bad_rows if filled is None else bad_rows & filled).any()
    if not fuse:
        maxes, log_sums, bad = combine_stats(stats, bad, tp_group, plan.inv_temp,
                                             shift=lambda row_max: _max_shift(row_max, plan.inv_temp))
        stats[0::2], stats[1::2] = maxes, log_sums
        for_each_block(blocks, lambda block, scratch: terms(
            block, _block_log_probs(zs, zt, cells, block, plan, stats, scratch), scratch), workers)
    if filled is not None:
        sums.masked_fill_(~filled, 0.0)
    s = _sampled_logprobs(zs, cells, 0, stats[0:2], col, plan.inv_temp)
    u = _sampled_logprobs(zt, cells, 1, stats[2:4], col, plan.inv_temp)
    return stats, sums[0], sums[1], s, u, bad


def chunked_grad(zs, zt, cells: Cells, blocks: list[_Block], plan: Plan, row_stats, coef, grad, workers: int = 1):
    """Sweep 3 over ``blocks`` into the rows of the filled cells in ``grad`` (real columns; with positions
    ``grad`` must be zero there) on ``workers`` threads: coef_h * h - coef_q * q per block; the one-hot
    term follows. ``blocks`` and ``row_stats``: as :func:`chunked_forward` had them."""
    coef_h, coef_q = coef
    nv = plan.n_valid

    def third_sweep(block: _Block, scratch: _Scratch):
        bs, ts = block.bs, block.ts
        log_probs = _block_log_probs(zs, zt, cells, block, plan, row_stats, scratch)
        _, h, q = _chunk_elements(*log_probs, plan, scratch, want_q=True)
        out = block.grad_rows(grad, cells, nv)
        g = torch.mul(h, coef_h[bs, ts].unsqueeze(-1), out=out if out is not None and out.dtype == h.dtype else h)
        g.addcmul_(q, coef_q[bs, ts].neg().unsqueeze(-1))
        if out is None:
            block.store(grad, cells, nv, g)
        elif g is not out:
            out.copy_(g)

    for_each_block(blocks, third_sweep, workers)


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
    """Call ``fn(block, scratch)`` once for every block, on ``workers`` threads taking the next block in
    turn; ``scratch`` is the calling thread's :class:`_Scratch`, one per thread and call.

    ``fn`` must write only its own block's rows. The calling thread is one of the workers; the
    others run under ``torch.no_grad()`` and the caller's inference mode (both are per thread; no
    block op needs autograd), with the intra-op thread count that new threads start with (1 inside
    :func:`block_threads`). The first exception stops the hand-out and is raised after every thread
    is done.
    """
    if workers <= 1 or len(blocks) <= 1:
        scratch = _Scratch()
        for block in blocks:
            fn(block, scratch)
        return
    todo = iter(blocks)
    lock = threading.Lock()
    failed = threading.Event()
    inference = torch.is_inference_mode_enabled()  # tensors made in inference mode take in-place writes only there

    def work():
        scratch = _Scratch()
        while not failed.is_set():
            with lock:
                block = next(todo, None)
            if block is None:
                return
            try:
                fn(block, scratch)
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
    value = _log_probs(z[samples, positions, col.clamp(min=0)].unsqueeze(-1), inv_temp, *row_stats).squeeze(-1)
    return torch.where(hit, value, torch.zeros_like(value))
