"""Benchmark of the per-token distillation loss, forward + backward.

Side by side, on the same logits and in one run:

- ``reference``: the per-token loss (README, 'The method, as implemented') on full tensors as a user of the public reference writes it, in
  the logits' dtype: log_softmax of both models (teacher under no_grad), the per-entry divergence
  tensor (``F.kl_div`` elements; JSD with log m = logsumexp of the stacked, beta-weighted log-probs),
  clamp (none with ``--clip none``), sum over the vocabulary (the sampled-token lookups, O(tokens), are left out).
- ``unfused``: :func:`megatron_renio.losses.divergence.token_terms` (the foundation path).
- ``fused``: :func:`megatron_renio.losses.fused.fused_token_terms` with ``impl='auto'`` (triton on a
  GPU with triton, chunked otherwise); ``fused[chunked]`` too on a GPU with ``--chunked``.
- ``fused(forward)`` (``--split``): the fused forward alone; backward is the rest of ``fused``.
- ``floor``: read both logits once and write one logits-sized tensor (``torch.add`` with ``out=``),
  the memory-bandwidth floor of any exact loss + gradient. After each divergence kind's rows, a
  ``ratios`` line gives what the issue's targets are about: the fused path's time as a multiple of
  the floor's (GPU target: at most 2x), its speedup over the reference (GPU: 6x forward KL, 25x JSD;
  CPU: 2x) and, for JSD on a GPU with liger-kernel, over Liger-Kernel (3x).
- ``fused[F/G]`` (GPU, ``--triton-launch``): the Triton path with other launch shapes of the forward
  kernels (F) and the gradient kernel (G), each P:W:B[:pf][:gN] (programs per SM or 'row',
  warps, vocabulary block, prefetch, entries per running max; see
  ``TritonLaunch`` in fused_triton.py), to choose the defaults.
- ``liger`` (GPU, JSD): Liger-Kernel's JSD (``liger_kernel.ops.jsd``) on log-prob inputs plus the two
  log-softmaxes, when liger-kernel imports (reported as skipped otherwise).

Each path runs ``loss = D.mean(); loss.backward()`` on student logits [1, tokens, vocab] that
require grad. Time: median over ``--iters`` after ``--warmup`` runs (CUDA events on a GPU,
``time.perf_counter`` on the CPU). Peak extra memory: above what was allocated before the call
(inputs), the gradient included. GPU: ``torch.cuda.max_memory_allocated``. CPU: the kernel's peak
resident-set size (VmHWM, reset through ``/proc/self/clear_refs``) minus the resident size before
the call, after ``malloc_trim`` returns freed heap pages; this counts every page the call touches,
including allocator slack, so it is an upper bound of what torch allocated.

The paths are timed round-robin within each divergence kind, so that changing machine load hits them
alike, each timed call right after an untimed call of the same path. On the CPU the chunked fused
path hands its row blocks to as many threads as torch has intra-op threads, each running its block
ops single-threaded (see ``block_threads`` in fused_chunked.py); the others use torch's intra-op
threads op by op. Liger-Kernel's JSD has no per-entry clamp: its row is a speed
comparison only. A path that runs out of memory is reported as such and left out of the ratios.

``--tp 2`` under ``torchrun --nproc-per-node 2``: each rank holds half the vocabulary; rank 0 first
measures the TP=1 run alone, then all ranks run TP=2 together; prints per-rank time and memory and
their ratios to TP=1 (the issue's target: both halve within 20%). ``--shard-proxy 2`` on a single
device: the fused path on the full vocabulary and on one half of it (the kernel work of one rank
at TP=2, without its three O(tokens) all-reduces and with the TP=1 kernels), for a machine with one GPU.
``--prompt-rows P``: the fused path as the trainer calls it, on whole sequences [1, P + tokens, vocab]
whose last ``tokens`` rows are the completion: gathering both models' completion rows into copies
first (``gathered``, how the trainer called it before) against reading them in place through
``positions`` (``in_place``).

The last line is machine-readable: ``speedup_vs_reference=<x> memory_vs_reference=<y>`` for the
fused path, the worst over the measured divergence kinds (lowest speedup, highest memory ratio).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_renio.config import NON_NEGATIVE_INT, POSITIVE_INT, typed_arg  # noqa: E402
from megatron_renio.losses.divergence import DivergenceConfig, gather_grid, token_terms  # noqa: E402
from megatron_renio.losses import fused_triton  # noqa: E402
from megatron_renio.losses.fused import fused_token_terms, triton_available  # noqa: E402
from megatron_renio.renio.vocab_parallel import VocabShard  # noqa: E402

KINDS = ("forward_kl", "reverse_kl", "jsd")
JSD_BETA = 0.5


# ---------------------------------------------------------------------------------------------
# loss paths: each takes (student, teacher, tokens, cfg, shard, group) and returns the loss
# ---------------------------------------------------------------------------------------------


def reference_loss(zs, zt, tokens, cfg: DivergenceConfig, shard, group):
    """The per-token loss on full tensors, in the logits' dtype (no vocabulary parallelism)."""
    log_q = F.log_softmax(zs / cfg.temperature, dim=-1)
    with torch.no_grad():
        log_p = F.log_softmax(zt / cfg.temperature, dim=-1)
    beta = cfg.mix
    if beta == 0.0:
        elements = F.kl_div(log_q, log_p, reduction="none", log_target=True)
    elif beta == 1.0:
        elements = F.kl_div(log_p, log_q, reduction="none", log_target=True)
    else:
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0)
        elements = beta * F.kl_div(log_m, log_p, reduction="none", log_target=True) + (1 - beta) * F.kl_div(
            log_m, log_q, reduction="none", log_target=True
        )
    if cfg.token_clip is not None:
        elements = elements.clamp(0.0, cfg.token_clip)
    return elements.sum(-1).float().mean()


def unfused_loss(zs, zt, tokens, cfg, shard, group):
    return token_terms(zs, zt, tokens, cfg, shard, group).divergence.mean()


def fused_loss(impl):
    def loss(zs, zt, tokens, cfg, shard, group):
        return fused_token_terms(zs, zt, tokens, cfg, shard, group, impl=impl).divergence.mean()

    return loss


def rows_loss(in_place: bool):
    """The fused path on whole sequences whose last ``tokens.shape[1]`` rows are the completion:
    reading those rows in place (``positions``) or from gathered copies."""

    def loss(zs, zt, tokens, cfg, shard, group):
        rows = torch.arange(zs.shape[1] - tokens.shape[1], zs.shape[1], device=zs.device).expand_as(tokens)
        if in_place:
            terms = fused_token_terms(zs, zt, tokens, cfg, shard, group, positions=(rows, rows))
        else:
            terms = fused_token_terms(gather_grid(zs, rows), gather_grid(zt, rows), tokens, cfg, shard, group)
        return terms.divergence.mean()

    return loss


def launch_loss(launches: tuple):
    """The fused Triton path with (forward, gradient) launch shapes in place of the defaults."""

    def loss(zs, zt, tokens, cfg, shard, group):
        defaults = fused_triton.TRITON_LAUNCH, fused_triton.TRITON_GRAD_LAUNCH
        fused_triton.TRITON_LAUNCH, fused_triton.TRITON_GRAD_LAUNCH = launches
        try:
            return fused_token_terms(zs, zt, tokens, cfg, shard, group, impl="triton").divergence.mean()
        finally:
            fused_triton.TRITON_LAUNCH, fused_triton.TRITON_GRAD_LAUNCH = defaults

    return loss


def parse_launch(spec: str) -> tuple:
    """'F[/G]' with F, G = 'P:W:B[:pf][:gN]' (P programs per SM or 'row', W warps, B vocabulary block,
    pf: prefetch, gN: a running max per N entries in the statistics sweep) -> (forward, gradient)
    TritonLaunch; without G the gradient kernel keeps its default."""

    def one(part: str):
        pps, warps, block, *options = part.split(":")
        groups = [int(o[1:]) for o in options if o.startswith("g")]
        if any(o != "pf" and not o.startswith("g") for o in options) or len(groups) > 1:
            raise ValueError(part)
        return fused_triton.TritonLaunch(None if pps == "row" else int(pps), int(warps), int(block), "pf" in options,
                                  groups[0] if groups else None)

    try:
        forward, *grad = spec.split("/")
        return one(forward), one(grad[0]) if grad else fused_triton.TRITON_GRAD_LAUNCH
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(
            f"{spec!r} is not P:W:B[:pf][:gN][/P:W:B[:pf]] (e.g. row:4:2048:pf:g8/row:4:1024:pf)")


def liger_loss(zs, zt, tokens, cfg, shard, group):
    """Liger-Kernel's JSD on the two log-softmaxes (flattened to [tokens, vocab])."""
    from liger_kernel.ops.jsd import LigerJSDFunction

    log_q = F.log_softmax(zs / cfg.temperature, dim=-1).flatten(0, 1)
    with torch.no_grad():
        log_p = F.log_softmax(zt / cfg.temperature, dim=-1).flatten(0, 1)
    return LigerJSDFunction.apply(log_q, log_p, None, cfg.beta)


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------


class CpuMemory:
    """Peak resident-set growth of this process during a call (Linux VmHWM, reset via clear_refs)."""

    def __init__(self):
        self._libc = ctypes.CDLL("libc.so.6")

    @staticmethod
    def _status_kib(field: str) -> int:
        return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))

    def start(self):
        gc.collect()
        self._libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        self._base = self._status_kib("VmRSS")

    def peak_extra_bytes(self) -> int:
        return (self._status_kib("VmHWM") - self._base) * 1024


class CudaMemory:
    def start(self):
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self._base = torch.cuda.memory_allocated()

    def peak_extra_bytes(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self._base


def timed(fn, device: torch.device) -> float:
    """Milliseconds of one call of ``fn``."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(steps: dict, device, iters: int, warmup: int, memory, idle: bool = False) -> dict:
    """{name: (median ms, peak extra bytes[, median idle ms]), or None when the step ran out of memory}.

    At least one warm-up call each (it also finds the steps that run out of memory); then the steps
    are timed round-robin (one timed call of each per round) so that a change of machine load hits
    every path alike. Each timed call is queued behind an untimed call of the same step, so on a GPU
    it measures the GPU's work alone, as in a training step, where the host runs ahead of the GPU
    and its launch work is hidden. ``idle`` (GPU): also time one call started on an idle GPU, which
    adds the host's launch work until the GPU is kept busy. Memory comes from one extra call of each
    after the timed rounds.
    """
    result = {name: None for name in steps}
    alive = {}
    for name, step in steps.items():
        try:
            for _ in range(max(warmup, 1)):
                step()
            alive[name] = step
        except torch.OutOfMemoryError:
            pass  # the traceback (and the tensors its frames hold) is released when this block ends
        if name not in alive:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if device.type == "cuda":
        torch.cuda.synchronize()  # the first idle call starts on an idle GPU too
    times = {name: [] for name in alive}
    idle_times = {name: [] for name in alive}
    for _ in range(iters):
        for name, step in alive.items():
            if idle:
                idle_times[name].append(timed(step, device))  # timed() returns with the GPU idle
            step()
            times[name].append(timed(step, device))
    for name, step in alive.items():
        memory.start()
        step()
        result[name] = (statistics.median(times[name]), memory.peak_extra_bytes())
        if idle:
            result[name] += (statistics.median(idle_times[name]),)
    return result


def loss_step(path, zs, zt, tokens, cfg, shard, group):
    def step():
        zs.grad = None
        path(zs, zt, tokens, cfg, shard, group).backward()
        zs.grad = None

    return step


def forward_step(path, zs, zt, tokens, cfg, shard, group):
    """The loss forward alone (what backward adds is the difference to the full step)."""

    def step():
        path(zs, zt, tokens, cfg, shard, group)

    return step


def floor_step(zs, zt):
    out = torch.empty_like(zs)

    def step():
        torch.add(zs.detach(), zt, out=out)

    return step


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------


def make_inputs(tokens: int, vocab: int, dtype, device, seed: int = 0):
    """Student logits [1, tokens, vocab] (requiring grad), teacher logits, sampled ids; made on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    zs = torch.randn(1, tokens, vocab, generator=g, device=device, dtype=dtype).mul_(2.0).requires_grad_()
    zt = torch.randn(1, tokens, vocab, generator=g, device=device, dtype=dtype).mul_(2.0)
    ids = torch.randint(0, vocab, (1, tokens), generator=g, device=device)
    return zs, zt, ids


def fmt_row(name, kind, ms, mem, *idle_ms, ref=None):
    """One table row; ratios to ``ref`` = (ms, bytes, ...) of the reference, when it ran; the idle time
    (``measure``) last, '-' without one."""
    x_t = f"{ref[0] / ms:8.2f}x" if ref else "        -"
    x_m = f"{mem / ref[1]:8.3f}x" if ref and ref[1] > 0 else "        -"
    idle = f"{idle_ms[0]:10.2f}" if idle_ms else "         -"
    return f"{name:16s} {kind:11s} {ms:10.2f} {x_t} {mem / 2**20:12.1f} {x_m} {idle}"


def run_single(args, device, dtype, memory):
    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}) "
          f"tokens={args.tokens} vocab={args.vocab} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} triton={'yes' if triton_available() else 'no'}")
    zs, zt, ids = make_inputs(args.tokens, args.vocab, dtype, device)
    shard = VocabShard(0, args.vocab, args.vocab)
    logits_mb = zs.numel() * zs.element_size() / 2**20
    print(f"one logits tensor = {logits_mb:.1f} MiB; time = median ms of forward+backward; "
          f"x = speedup vs reference; memory = peak extra MiB, x = ratio to reference; "
          f"idle = median ms of a call started on an idle GPU (host launch work included)")
    print(f"{'path':16s} {'kind':11s} {'time_ms':>10s} {'x_time':>9s} {'extra_MiB':>12s} {'x_mem':>9s} {'idle_ms':>10s}")
    floor_ms, mem, *_ = measure({"floor": floor_step(zs, zt)}, device, args.iters, args.warmup, memory)["floor"]
    moved = 3 * zs.numel() * zs.element_size()
    print(fmt_row("floor", "-", floor_ms, mem) + f"   ({moved / floor_ms / 1e9:.2f} TB/s)")
    paths = {"reference": reference_loss, "unfused": unfused_loss, "fused": fused_loss("auto")}
    if device.type == "cuda" and args.chunked:
        paths["fused[chunked]"] = fused_loss("chunked")
    for spec, launch in args.triton_launch if device.type == "cuda" else ():
        paths[f"fused[{spec}]"] = launch_loss(launch)
    if device.type == "cuda" and liger_available() and "jsd" in args.kinds:
        paths["liger(+lsm)"] = liger_loss
    speedups, mem_ratios = [], []
    for kind in args.kinds:
        cfg = DivergenceConfig(kind=kind, beta=JSD_BETA, temperature=args.temperature, token_clip=args.clip)
        steps = {label: loss_step(path, zs, zt, ids, cfg, shard, None) for label, path in paths.items()
                 if kind == "jsd" or path is not liger_loss}
        if args.split:
            steps["fused(forward)"] = forward_step(paths["fused"], zs, zt, ids, cfg, shard, None)
        liger_failure = _drop_if_failing(steps, "liger(+lsm)")
        results = measure(steps, device, args.iters, args.warmup, memory, idle=device.type == "cuda")
        ref = results["reference"]
        for label, measured in results.items():
            if measured is None:
                print(f"{label:16s} {kind:11s} out of memory")
            else:
                # the forward alone is not compared with the reference's forward + backward
                print(fmt_row(label, kind, *measured, ref=None if label in ("reference", "fused(forward)") else ref))
        fused = results["fused"]
        speedup = ref[0] / fused[0] if ref is not None and fused is not None else None
        if speedup is not None:
            speedups.append(speedup)
            mem_ratios.append(fused[1] / ref[1])
        print(ratios_line(kind, results, floor_ms, speedup))
        if kind == "jsd" and "liger(+lsm)" not in results:
            reason = liger_failure or ("liger_kernel is not installed" if not liger_available()
                                       else "Liger-Kernel needs a GPU")
            print(f"{'liger(+lsm)':16s} jsd         skipped: {reason}")
    print(f"speedup_vs_reference={min(speedups, default=math.nan):.2f} "
          f"memory_vs_reference={max(mem_ratios, default=math.nan):.3f}")


def _drop_if_failing(steps: dict, label: str) -> str | None:
    """Run the optional comparison ``steps[label]`` once; an error other than running out of memory
    (which ``measure`` reports) removes it and is returned as one line, so that it cannot cost the
    rows of the project's own paths."""
    if label not in steps:
        return None
    try:
        steps[label]()
    except torch.OutOfMemoryError:
        return None
    except Exception as e:  # noqa: BLE001 (a third-party kernel: any failure)
        del steps[label]
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def ratios_line(kind: str, results: dict, floor_ms: float, speedup: float | None) -> str:
    """The fused path of one divergence kind: its time as a multiple of the floor's, its ``speedup``
    over the reference (None: one of them did not run) and over Liger-Kernel's JSD, from ``measure``'s
    results (None: out of memory)."""
    fused = results["fused"]
    if fused is None:
        return f"ratios {kind}: the fused path ran out of memory"
    parts = [f"fused {fused[0]:.2f} ms = {fused[0] / floor_ms:.2f}x the floor"]
    if speedup is not None:
        parts.append(f"speedup over the reference {speedup:.2f}x")
    if results.get("liger(+lsm)") is not None:
        parts.append(f"speedup over liger(+lsm) {results['liger(+lsm)'][0] / fused[0]:.2f}x")
    return f"ratios {kind}: " + "; ".join(parts)


def liger_available() -> bool:
    try:
        import liger_kernel.ops.jsd  # noqa: F401
    except ImportError:
        return False
    return True


def print_pair_header(base: str, other: str) -> None:
    """Header of the tables that set one measurement (``other``) against a baseline (``base``)."""
    print(f"{'path':10s} {'kind':11s} {base + '_ms':>9s} {other + '_ms':>9s} {'ratio':>6s} "
          f"{base + '_MiB':>9s} {other + '_MiB':>9s} {'ratio':>6s}")


def print_pair_row(label: str, kind: str, base, other) -> None:
    """One row: times, extra memory and their ratios other / base; ``None`` (out of memory) says so."""
    if base is None or other is None:
        print(f"{label:10s} {kind:11s} out of memory")
        return
    (t1, m1), (tn, mn) = base, other
    print(f"{label:10s} {kind:11s} {t1:9.2f} {tn:9.2f} {tn / t1:6.2f} "
          f"{m1 / 2**20:9.1f} {mn / 2**20:9.1f} {mn / max(m1, 1):6.2f}")


def run_shard_proxy(args, device, dtype, memory):
    """Fused path on the full vocabulary and on 1/args.shard_proxy of it, one process (module docstring)."""
    zs, zt, ids = make_inputs(args.tokens, args.vocab, dtype, device)
    local = args.vocab // args.shard_proxy
    zs_local = zs.detach()[..., :local].clone().requires_grad_()
    zt_local = zt[..., :local].clone()
    print(f"device={device} tokens={args.tokens} vocab={args.vocab} dtype={args.dtype} "
          f"proxy of one rank at TP={args.shard_proxy}: a {local}-column shard, no communication")
    print_pair_header("full", "shard")
    for kind in args.kinds:
        cfg = DivergenceConfig(kind=kind, beta=JSD_BETA, temperature=args.temperature, token_clip=args.clip)
        steps = {"full": loss_step(fused_loss("auto"), zs, zt, ids, cfg, VocabShard(0, args.vocab, args.vocab), None),
                 "shard": loss_step(fused_loss("auto"), zs_local, zt_local, ids % local, cfg,
                                    VocabShard(0, local, local), None)}
        got = measure(steps, device, args.iters, args.warmup, memory)
        print_pair_row("fused", kind, got["full"], got["shard"])


def run_rows(args, device, dtype, memory):
    """The trainer's call on sequences of ``--prompt-rows`` + ``--tokens`` rows: gathered rows vs rows in place."""
    zs, zt, ids = make_inputs(args.prompt_rows + args.tokens, args.vocab, dtype, device)
    ids = ids[:, args.prompt_rows:]
    shard = VocabShard(0, args.vocab, args.vocab)
    print(f"device={device} tokens={args.tokens} after {args.prompt_rows} prompt rows, vocab={args.vocab} "
          f"dtype={args.dtype}: the fused path on gathered completion rows and on the rows in place")
    print_pair_header("gathered", "in_place")
    for kind in args.kinds:
        cfg = DivergenceConfig(kind=kind, beta=JSD_BETA, temperature=args.temperature, token_clip=args.clip)
        steps = {name: loss_step(rows_loss(name == "in_place"), zs, zt, ids, cfg, shard, None)
                 for name in ("gathered", "in_place")}
        got = measure(steps, device, args.iters, args.warmup, memory)
        print_pair_row("fused", kind, got["gathered"], got["in_place"])


def run_tp(args, device, dtype, memory):
    """Per-rank time and memory of the fused and unfused paths at TP=1 (rank 0 alone) and TP=args.tp."""
    import torch.distributed as dist

    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    zs, zt, ids = make_inputs(args.tokens, args.vocab, dtype, device)
    local = args.vocab // args.tp
    zs_local = zs.detach()[..., rank * local:(rank + 1) * local].clone().requires_grad_()
    zt_local = zt[..., rank * local:(rank + 1) * local].clone()
    shard_full, shard_local = VocabShard(0, args.vocab, args.vocab), VocabShard(rank * local, local, args.vocab)
    if rank == 0:
        print(f"device={device} tokens={args.tokens} vocab={args.vocab} dtype={args.dtype} tp={args.tp} "
              f"threads/rank={torch.get_num_threads()}")
        print_pair_header("tp1", "tp")
    for kind in args.kinds:
        cfg = DivergenceConfig(kind=kind, beta=JSD_BETA, temperature=args.temperature, token_clip=args.clip)
        paths = {"unfused": unfused_loss, "fused": fused_loss("auto")}
        single = {}
        if rank == 0:
            single = measure({label: loss_step(path, zs, zt, ids, cfg, shard_full, None)
                              for label, path in paths.items()}, device, args.iters, args.warmup, memory)
        dist.barrier()
        split = measure({label: loss_step(path, zs_local, zt_local, ids, cfg, shard_local, dist.group.WORLD)
                         for label, path in paths.items()}, device, args.iters, args.warmup, memory)
        dist.barrier()
        for label in paths if rank == 0 else ():
            print_pair_row(label, kind, single[label], split[label])
    dist.destroy_process_group()


def clip_arg(text: str) -> float | None:
    """--clip: a number > 0, or none (no clamp)."""
    return None if text.lower() == "none" else typed_arg(float, lambda v: v > 0, "> 0 or none")(text)


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=POSITIVE_INT, default=8192 if cuda else 2048, help="b*t (GPU 8192, CPU 2048)")
    p.add_argument("--vocab", type=POSITIVE_INT, default=151936 if cuda else 32000, help="vocabulary (GPU 151936, CPU 32000)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16" if cuda else "float32")
    p.add_argument("--kinds", type=lambda s: s.split(","), default=["forward_kl", "jsd"],
                   help=f"comma-separated of {', '.join(KINDS)} (jsd uses beta {JSD_BETA})")
    p.add_argument("--clip", type=clip_arg, default=0.05,
                   help="per-entry token clip k, or none (on a GPU forward and reverse KL then take the one-sweep "
                        "Triton forward)")
    p.add_argument("--temperature", type=typed_arg(float, lambda v: v > 0, "> 0"), default=1.1)
    p.add_argument("--iters", type=POSITIVE_INT, default=10 if cuda else 3)
    p.add_argument("--warmup", type=NON_NEGATIVE_INT, default=2 if cuda else 1)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--chunked", action="store_true", help="on a GPU also time the chunked fused path")
    p.add_argument("--split", action="store_true", help="also time the fused forward alone")
    p.add_argument("--tp", type=POSITIVE_INT, default=1, help="tensor-parallel size (run under torchrun)")
    p.add_argument("--shard-proxy", type=POSITIVE_INT, default=1, metavar="N",
                   help="one device: time the fused path on 1/N of the vocabulary against the full one")
    p.add_argument("--prompt-rows", type=NON_NEGATIVE_INT, default=0, metavar="P",
                   help="time the trainer's call on sequences of P prompt rows + --tokens completion rows: "
                        "gathered completion rows against rows read in place")
    p.add_argument("--triton-launch", type=lambda s: [(x, parse_launch(x)) for x in s.split(",")], default=[],
                   metavar="F[/G],...", help="GPU: also time the Triton path with these launch shapes")
    args = p.parse_args(argv)
    if args.vocab % args.shard_proxy:
        p.error(f"--shard-proxy {args.shard_proxy} must be a positive divisor of --vocab {args.vocab}")
    bad = [k for k in args.kinds if k not in KINDS]
    if bad:
        p.error(f"--kinds: unknown {', '.join(bad)}; allowed: {', '.join(KINDS)}")
    if args.device == "cuda" and not cuda:
        p.error("--device cuda: no CUDA device is available to torch here")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tp > 1 and world != args.tp:
        p.error(f"--tp {args.tp} needs torchrun --nproc-per-node {args.tp} (got {world} processes)")
    if args.vocab % args.tp:
        p.error(f"--vocab {args.vocab} must be divisible by --tp {args.tp}")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and cuda) else "cpu")
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    memory = CudaMemory() if device.type == "cuda" else CpuMemory()
    dtype = getattr(torch, args.dtype)
    run = run_tp if args.tp > 1 else run_shard_proxy if args.shard_proxy > 1 else run_rows if args.prompt_rows \
        else run_single
    run(args, device, dtype, memory)


if __name__ == "__main__":
    main()
