"""Fused vs unfused per-token terms: shared helpers, and a torchrun worker (2 ranks, gloo) for TP=2.

As a worker (argv: out_dir): every rank builds the same full-vocabulary logits, keeps its shard and
returns, per case, the outputs of ``fused_token_terms`` and ``token_terms`` on the shards with the
2-rank group as TP, and of ``token_terms`` on the full vocabulary (TP=1) with the gradient cut to the
rank's shard; and, reading rows of whole sequences through ``positions``, the outputs of
``fused_token_terms`` and of ``token_terms`` on the gathered rows. When triton imports and
TRITON_INTERPRET=1 is set, the same comparisons run with impl='triton' (interpreted on the CPU) at
TP=2 and at TP=1. tests/test_fused_loss.py asserts.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from megatron_renio.losses import fused, fused_chunked, fused_plan, fused_triton
from megatron_renio.losses.divergence import DivergenceConfig, token_terms
from megatron_renio.losses.fused import fused_token_terms
from megatron_renio.renio.vocab_parallel import VocabShard
from tests.torchrun_harness import save_rank_result

OUTPUTS = ("divergence", "student_logprobs", "teacher_logprobs", "grad")


def make_logits(b: int, t: int, vocab: int, seed: int, dtype=torch.float32, scale: float = 3.0):
    """(student, teacher, tokens, upstream grad of D, upstream grad of s) on the full vocabulary.

    Logits of spread ``scale``; the teacher is the student plus noise of half that spread (a
    distillation-like pair: D of a few nats, large elements next to tiny ones).
    """
    g = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(b, t, vocab, generator=g)
    teacher = (student + 0.5 * scale * torch.randn(b, t, vocab, generator=g)).to(dtype)
    student = student.to(dtype)
    tokens = torch.randint(0, vocab, (b, t), generator=g)
    return student, teacher, tokens, torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)


def run_path(fn, student, teacher, tokens, cfg, shard, group, grad_d, grad_s, **kwargs) -> dict:
    """Outputs of ``fn`` (token_terms or fused_token_terms) and d(sum gD*D + gS*s)/d student."""
    leaf = student.detach().clone().requires_grad_()
    terms = fn(leaf, teacher, tokens, cfg, shard, group, **kwargs)
    (terms.divergence * grad_d + terms.student_logprobs * grad_s).sum().backward()
    return {
        "divergence": terms.divergence.detach(),
        "student_logprobs": terms.student_logprobs.detach(),
        "teacher_logprobs": terms.teacher_logprobs,
        "grad": leaf.grad,
        "nonfinite": bool(terms.nonfinite),
    }


# (kind, beta, token_clip, temperature): every kind, both JSD endpoints, clamp binding (0.001),
# at the reference value (0.05), not binding (10.0) and absent, temperature 1 and not.
TP_CASES = [
    ("forward_kl", 0.5, 0.001, 1.0),
    ("reverse_kl", 0.5, None, 1.7),
    ("jsd", 0.5, 0.05, 1.1),
    ("jsd", 0.0, 10.0, 1.0),
    ("jsd", 1.0, 0.001, 1.3),
    ("jsd", 0.3, None, 0.8),
]
# (local vocabulary, true vocabulary): padding on the last rank only; the last rank all padding.
TP_LAYOUTS = [(320, 600), (128, 100)]
# Reverse KL with a clamp: there h_v = d_v + q_v keeps its q_v only where the clamp does not bind (without
# one, the q_v terms cancel in h - q H). The two KL cases without a clamp take the one-sweep forward
# (Plan.one_sweep), the others sweeps 1 and 2.
TRITON_CASES = [("forward_kl", 0.5, 0.001, 1.0), ("reverse_kl", 0.5, None, 0.7), ("jsd", 0.3, 0.05, 1.1),
                ("reverse_kl", 0.5, 0.05, 1.1), ("forward_kl", 0.5, None, 1.3)]
# Triton at TP=2 with rank 1's shard all padding (TP_LAYOUTS[1]): a one-sweep and a two-sweep forward.
TRITON_PADDING_RANK_CASES = [TRITON_CASES[4], TRITON_CASES[2]]
# (which logits, column, value, flagged): non-finite entries in a full block, in the tail, in padding.
TRITON_NONFINITE = [("student", 5, float("inf"), True), ("teacher", 386, float("-inf"), True),
                    ("student", 395, float("nan"), False)]


def case_results(case, local: int, true_vocab: int, group, seed: int, impl="chunked", dtype=torch.float32, b=2, t=5):
    """{'fused', 'unfused', 'full'} outputs of one case on this rank's shard of ``group`` (None: TP=1).

    'full' is token_terms on the whole vocabulary without TP, its gradient cut to the rank's shard.
    """
    kind, beta, clip, temperature = case
    cfg = DivergenceConfig(kind=kind, beta=beta, temperature=temperature, token_clip=clip)
    rank, world = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))
    student, teacher, tokens, grad_d, grad_s = make_logits(b, t, world * local, seed, dtype)
    cols = slice(rank * local, (rank + 1) * local)
    shard = VocabShard(rank * local, local, true_vocab)
    args = (student[..., cols], teacher[..., cols], tokens, cfg, shard, group, grad_d, grad_s)
    full_shard = VocabShard(0, world * local, true_vocab)
    full = run_path(token_terms, student, teacher, tokens, cfg, full_shard, None, grad_d, grad_s)
    full["grad"] = full["grad"][..., cols]
    fused_run = run_path(fused_token_terms, *args, impl=impl)
    return {"fused": fused_run, "unfused": run_path(token_terms, *args), "full": full}


# Grid cells reading rows of whole sequences (``fused_token_terms(positions=...)``), as the trainer
# does: student [3, 9, V] (a slice of [3, 11, V], stored as Megatron's [s, b, V]) and teacher
# [3, 11, V]. Sample 0 has a one-token student prompt (cell (0, 0) reads position 0, which its empty
# cell would read too if empty cells were not skipped), sample 1 fills its row, sample 2 has two
# tokens and three empty cells (student position -1; their teacher positions are never read: 0 as
# pack_pairs writes them, and one beyond the teacher's rows).
STUDENT_POSITIONS = [[0, 1, 2, 3, -1], [4, 5, 6, 7, 8], [6, 7, -1, -1, -1]]
TEACHER_POSITIONS = [[2, 3, 4, 5, 0], [6, 7, 8, 9, 10], [9, 10, 0, 0, 99]]
STUDENT_ROWS = 9


def sequence_logits(vocab: int, seed: int, device="cpu"):
    """(student [3, 9, V], teacher [3, 11, V], tokens [3, 5], grad of D, grad of s, positions) on ``device``."""
    student, teacher, _, _, _ = make_logits(3, 11, vocab, seed)
    g = torch.Generator().manual_seed(seed + 1000)
    tokens = torch.randint(0, vocab, (3, 5), generator=g)
    grad_d, grad_s = torch.randn(2, 3, 5, generator=g)
    positions = (torch.tensor(STUDENT_POSITIONS), torch.tensor(TEACHER_POSITIONS))
    tensors = (student[:, :STUDENT_ROWS], teacher, tokens, grad_d, grad_s)
    return (*(x.to(device) for x in tensors), tuple(p.to(device) for p in positions))


def rows_results(case, local: int, true_vocab: int, group, seed: int, impl="chunked", device="cpu") -> dict:
    """{'fused', 'gathered'}: ``fused_token_terms(impl)`` reading rows through positions, and
    ``token_terms`` on the gathered rows (empty cells: D = s = u = 0), on this rank's shard; the gradient
    is w.r.t. the student logits [3, 9, V_local]."""
    kind, beta, clip, temperature = case
    cfg = DivergenceConfig(kind=kind, beta=beta, temperature=temperature, token_clip=clip)
    rank, world = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))
    student, teacher, tokens, grad_d, grad_s, positions = sequence_logits(world * local, seed, device)
    cols = slice(rank * local, (rank + 1) * local)
    shard = VocabShard(rank * local, local, true_vocab)
    out = {}
    for name, fn, kwargs in (("fused", fused_token_terms, {"impl": impl}), ("gathered", fused._unfused_on_rows, {})):
        storage = student[..., cols].transpose(0, 1).contiguous().requires_grad_()  # Megatron's [s, b, V]
        terms = fn(storage.transpose(0, 1), teacher[..., cols], tokens, cfg, shard, group, positions=positions,
                   **kwargs)
        (terms.divergence * grad_d + terms.student_logprobs * grad_s).sum().backward()
        out[name] = {"divergence": terms.divergence.detach(), "student_logprobs": terms.student_logprobs.detach(),
                     "teacher_logprobs": terms.teacher_logprobs, "grad": storage.grad.transpose(0, 1),
                     "nonfinite": bool(terms.nonfinite)}
        out[name] = {key: value.cpu() if torch.is_tensor(value) else value for key, value in out[name].items()}
    return out


def rows_nonfinite_flags(impl: str) -> list[bool]:
    """The flag with inf in a student row no cell reads, and with NaN in a teacher row that cell (0, 0) reads."""
    flags = []
    for which, row in (("student", (2, 8)), ("teacher", (0, 2))):
        student, teacher, tokens, _, _, positions = sequence_logits(64, seed=5)
        (student if which == "student" else teacher)[row][3] = float("inf") if which == "student" else float("nan")
        cfg = DivergenceConfig(kind="jsd", beta=0.5, temperature=1.0, token_clip=0.05)
        terms = fused_token_terms(student, teacher, tokens, cfg, VocabShard(0, 64, 60), impl=impl, positions=positions)
        flags.append(bool(terms.nonfinite))
    return flags


# (kind, offset of the teacher's logits, temperature, vocabulary): models whose logits sit apart, by up to
# 300 nats; 1,000 columns are fewer than one block of the default launch (the row offsets come from the tail).
OFFSET_CASES = [("forward_kl", -50.0, 0.3, 3000), ("forward_kl", 300.0, 1.0, 3000), ("reverse_kl", 300.0, 1.0, 3000),
                ("reverse_kl", -50.0, 0.3, 3000), ("forward_kl", 300.0, 1.0, 1000), ("reverse_kl", 300.0, 1.0, 1000)]


def triton_forwards(student, teacher, forwards, *args) -> dict:
    """{forward: run_path of the Triton path} for each of ``forwards``: 'one' (``Plan.one_sweep`` as
    it is) and 'two' (turned off: the two-sweep forward), at the module's default launch."""
    one_sweep, runs = fused_plan.Plan.one_sweep, {}
    try:
        for name in forwards:
            fused_plan.Plan.one_sweep = one_sweep if name == "one" else property(lambda plan: False)
            runs[name] = run_path(fused_token_terms, student, teacher, *args, impl="triton")
    finally:
        fused_plan.Plan.one_sweep = one_sweep
    return runs


def offset_errors(kind: str, offset: float, temperature: float, vocab: int) -> dict:
    """Largest error of D against ``token_terms`` in float64, on ``vocab`` columns of logits whose teacher is
    the student's plus noise plus ``offset``, of the Triton path's one-sweep forward ('one') and of its two
    sweeps ('two', ``Plan.one_sweep`` turned off), both at the module's default launch."""
    student, teacher, tokens, grad_d, grad_s = make_logits(2, 4, vocab, seed=31)
    teacher = teacher + offset
    cfg = DivergenceConfig(kind=kind, beta=0.5, temperature=temperature, token_clip=None)
    args = (tokens, cfg, VocabShard(0, vocab, vocab), None, grad_d, grad_s)
    exact = run_path(token_terms, student.double(), teacher.double(), *args)["divergence"]
    return {name: float((got["divergence"].double() - exact).abs().max())
            for name, got in triton_forwards(student, teacher, ("one", "two"), *args).items()}


# (kind, token_clip, temperature) on logits of standard deviation 24 (maxima near 100, larger than a
# language model's): the fused paths' log-probs must not lose precision with the size of the logits.
LARGE_LOGIT_CASES = [("reverse_kl", None, 0.7), ("forward_kl", None, 1.0), ("forward_kl", 0.05, 0.7),
                     ("jsd", 0.05, 1.0), ("jsd", 0.05, 0.7)]


def large_logit_errors(kind: str, clip, temperature: float, device="cpu", impl="triton", group=None,
                       spread: float = 8.0, student_offset: float = 0.0) -> dict:
    """{forward: {output: largest |error| / (1e-5 + 1e-5 |exact|)}} of ``fused_token_terms(impl)`` on this
    rank's shard of ``group`` (None: TP=1) against ``token_terms`` in float64 on the whole vocabulary, on
    ``device``, on make_logits' logits times ``spread`` (standard deviation 24 by default), the student's
    raised by ``student_offset`` (the same softmax). Forwards: the chunked path ('chunked'); the Triton path
    at the module's default launch, at TP=1 only: 'one' and 'two' sweeps for a KL without a clamp, else
    'two'."""
    rank, world = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))
    student, teacher, tokens, grad_d, grad_s = (x.to(device) for x in make_logits(2, 4, 3000, seed=32))
    student, teacher = student * spread + student_offset, teacher * spread
    cfg = DivergenceConfig(kind=kind, beta=0.5, temperature=temperature, token_clip=clip)
    exact = run_path(token_terms, student.double(), teacher.double(), tokens, cfg, VocabShard(0, 3000, 3000), None,
                     grad_d, grad_s)
    local = 3000 // world
    cols = slice(rank * local, (rank + 1) * local)
    exact["grad"] = exact["grad"][..., cols]
    shards = (student[..., cols], teacher[..., cols])
    args = (tokens, cfg, VocabShard(rank * local, local, 3000), group, grad_d, grad_s)
    if impl == "triton":
        runs = triton_forwards(*shards, ("one", "two") if clip is None and kind != "jsd" else ("two",), *args)
    else:
        runs = {impl: run_path(fused_token_terms, *shards, *args, impl=impl)}
    return {name: {key: float(((got[key].double() - exact[key]).abs() / (1e-5 + 1e-5 * exact[key].abs())).max())
                   for key in OUTPUTS if key != "nonfinite"}
            for name, got in runs.items()}


def nonfinite_flag(which: str, column: int, value: float, _expected: bool) -> bool:
    """The Triton path's non-finite flag with ``value`` at one entry of a [1, 3, 400] shard (390 real columns)."""
    student, teacher, tokens, _, _ = make_logits(1, 3, 400, seed=7)
    (student if which == "student" else teacher)[0, 1, column] = value
    cfg = DivergenceConfig(kind="jsd", beta=0.5, temperature=1.0, token_clip=0.05)
    return bool(fused_token_terms(student, teacher, tokens, cfg, VocabShard(0, 400, 390), impl="triton").nonfinite)


def tp2_nonfinite_flags(group) -> list[bool]:
    """The Triton path's flag at TP=2 with inf in a real column of rank 1's shard only (student, then
    teacher): every rank must report it (the flag is agreed over TP)."""
    rank = dist.get_rank(group)
    flags = []
    for which in ("student", "teacher"):
        student, teacher, tokens, _, _ = make_logits(1, 3, 400, seed=7)
        (student if which == "student" else teacher)[0, 1, 205] = float("inf")  # column 5 of rank 1's shard
        cfg = DivergenceConfig(kind="jsd", beta=0.5, temperature=1.0, token_clip=0.05)
        shard = VocabShard(rank * 200, 200, 390)
        flags.append(bool(fused_token_terms(student[..., rank * 200:(rank + 1) * 200],
                                            teacher[..., rank * 200:(rank + 1) * 200], tokens, cfg, shard, group,
                                            impl="triton").nonfinite))
    return flags


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    group = dist.group.WORLD
    fused_chunked._CHUNK_ELEMS = 1024  # several row blocks per shard on these small shapes
    result = {"chunked": {}, "triton": {}, ("rows", "chunked"): {}, ("rows", "triton"): {}}
    for i, (layout, case) in enumerate((layout, case) for layout in TP_LAYOUTS for case in TP_CASES):
        result["chunked"][case, layout] = case_results(case, *layout, group, seed=i)
        result["rows", "chunked"][case, layout] = rows_results(case, *layout, group, seed=i)
    result["chunked_large_logits"] = {case: large_logit_errors(*case, impl="chunked", group=group)
                                      for case in LARGE_LOGIT_CASES}
    result["chunked_high_student"] = {case: large_logit_errors(*case, impl="chunked", group=group, spread=1.0,
                                                               student_offset=1000.0) for case in LARGE_LOGIT_CASES}
    result["bf16"] = case_results(("jsd", 0.5, 0.05, 1.1), *TP_LAYOUTS[0], group, seed=99, dtype=torch.bfloat16)
    result["triton_checked"] = fused_triton.triton_available() and os.environ.get("TRITON_INTERPRET") == "1"
    if result["triton_checked"]:
        if dist.get_rank(group) == 0:  # at the default launch, set below for the other checks
            result["triton_offset"] = {case: offset_errors(*case) for case in OFFSET_CASES}
        else:
            result["triton_large_logits"] = {case: large_logit_errors(*case) for case in LARGE_LOGIT_CASES}
        # Blocks of 64: full blocks, a tail and padding in every shard; one program per row at TP=2
        # with a running max per 8 entries, and at TP=1 a persistent grid of 3 programs (the
        # interpreter counts one SM) walking the 10 rows, prefetching the next block.
        fused_triton.TRITON_LAUNCH = fused_triton.TRITON_GRAD_LAUNCH = fused_triton.TritonLaunch(None, 4, 64, max_group=8)
        for i, case in enumerate(TRITON_CASES):
            result["triton"][case, "tp2"] = case_results(case, 200, 390, group, seed=i, impl="triton", t=2)
            result["rows", "triton"][case, "tp2"] = rows_results(case, 200, 390, group, seed=i, impl="triton")
        result["triton_tp2_nonfinite"] = tp2_nonfinite_flags(group)
        for case in TRITON_PADDING_RANK_CASES:
            result["triton"][case, "tp2-padding-rank"] = case_results(case, *TP_LAYOUTS[1], group, seed=40,
                                                                      impl="triton", t=2)
        fused_triton.TRITON_LAUNCH = fused_triton.TRITON_GRAD_LAUNCH = fused_triton.TritonLaunch(3, 4, 64, prefetch=True)
        for i, case in enumerate(TRITON_CASES):
            result["triton"][case, "tp1"] = case_results(case, 400, 390, None, seed=i, impl="triton", t=5)
            result["rows", "triton"][case, "tp1"] = rows_results(case, 400, 390, None, seed=i, impl="triton")
        result["triton_nonfinite"] = [nonfinite_flag(*entry) for entry in TRITON_NONFINITE]
        result["triton_rows_nonfinite"] = rows_nonfinite_flags("triton")
        # every sweep without prefetching
        fused_triton.TRITON_LAUNCH = fused_triton.TRITON_GRAD_LAUNCH = fused_triton.TritonLaunch(None, 4, 64, prefetch=False, max_group=8)
        for i, case in enumerate(TRITON_CASES):
            result["triton"][case, "tp1-no-prefetch"] = case_results(case, 400, 390, None, seed=20 + i, impl="triton")
            result["rows", "triton"][case, "tp1-no-prefetch"] = rows_results(case, 400, 390, None, seed=20 + i,
                                                                              impl="triton")
    save_rank_result(out_dir, result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
