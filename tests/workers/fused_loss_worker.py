"""Fused vs unfused per-token terms: shared helpers, and a torchrun worker (2 ranks, gloo) for TP=2.

As a worker (argv: out_dir): every rank builds the same full-vocabulary logits, keeps its shard and
returns, per case, the outputs of ``fused_token_terms`` and ``token_terms`` on the shards with the
2-rank group as TP, and of ``token_terms`` on the full vocabulary (TP=1) with the gradient cut to the
rank's shard. When triton imports and TRITON_INTERPRET=1 is set, the same comparison runs with
impl='triton' (interpreted on the CPU) at TP=2 and at TP=1. tests/test_fused_loss.py asserts.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from megatron_renio.losses import fused
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
TRITON_CASES = [("forward_kl", 0.5, 0.001, 1.0), ("reverse_kl", 0.5, None, 0.7), ("jsd", 0.3, 0.05, 1.1)]
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


def nonfinite_flag(which: str, column: int, value: float, _expected: bool) -> bool:
    """The Triton path's non-finite flag with ``value`` at one entry of a [1, 3, 400] shard (390 real columns)."""
    student, teacher, tokens, _, _ = make_logits(1, 3, 400, seed=7)
    (student if which == "student" else teacher)[0, 1, column] = value
    cfg = DivergenceConfig(kind="jsd", beta=0.5, temperature=1.0, token_clip=0.05)
    return bool(fused_token_terms(student, teacher, tokens, cfg, VocabShard(0, 400, 390), impl="triton").nonfinite)


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    group = dist.group.WORLD
    fused._CHUNK_ELEMS = 1024  # several row blocks per shard on these small shapes
    result = {"chunked": {}, "triton": {}}
    for i, (layout, case) in enumerate((layout, case) for layout in TP_LAYOUTS for case in TP_CASES):
        result["chunked"][case, layout] = case_results(case, *layout, group, seed=i)
    result["bf16"] = case_results(("jsd", 0.5, 0.05, 1.1), *TP_LAYOUTS[0], group, seed=99, dtype=torch.bfloat16)
    result["triton_checked"] = fused.triton_available() and os.environ.get("TRITON_INTERPRET") == "1"
    if result["triton_checked"]:
        # Blocks of 64: full blocks, a tail and padding in every shard; one program per row at TP=2
        # with a running max per 8 entries, and at TP=1 a persistent grid of 3 programs (the
        # interpreter counts one SM) walking the 10 rows, prefetching the next block.
        fused.TRITON_LAUNCH = fused.TRITON_GRAD_LAUNCH = fused.TritonLaunch(None, 4, 64, max_group=8)
        for i, case in enumerate(TRITON_CASES):
            result["triton"][case, "tp2"] = case_results(case, 200, 390, group, seed=i, impl="triton", t=2)
        fused.TRITON_LAUNCH = fused.TRITON_GRAD_LAUNCH = fused.TritonLaunch(3, 4, 64, prefetch=True)
        for i, case in enumerate(TRITON_CASES):
            result["triton"][case, "tp1"] = case_results(case, 400, 390, None, seed=i, impl="triton", t=5)
        result["triton_nonfinite"] = [nonfinite_flag(*entry) for entry in TRITON_NONFINITE]
    save_rank_result(out_dir, result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
