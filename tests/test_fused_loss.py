"""The fused per-token terms (megatron_renio/losses/fused*.py) equal the unfused ``token_terms``.

Documented tolerances of the fused path against ``token_terms`` on the same inputs:
- float32: divergence D, sampled-token log-probs s and u, and the gradient w.r.t. the student logits
  (of sum gD * D + gS * s, random gD and gS) within rtol 1e-5 and atol 1e-5.
- bfloat16: both paths compute in float32 from the same bf16 values, so D, s and u keep the float32
  tolerance, and both round the gradient to bf16 once; their float32 gradients differ in the last
  bits (another order of operations, base-2 exponentials in the kernels), which can move a bf16
  rounding by one step: within rtol 2^-7 and atol 2^-8 of the largest gradient entry (measured on
  these inputs: 0.48 of that bound for unclamped reverse KL at T = 0.7, under 0.3 with the clamp).
Every divergence kind and both JSD endpoints, the clamp binding, at 0.05, not binding and absent,
temperature 1 and not, padded vocabulary, TP=1 here and TP=2 in one torchrun launch (which also
runs the Triton kernels in interpreter mode when triton is installed, with full blocks, tails,
padding, a shard of padding only, a persistent grid and prefetching, through both forwards: one
sweep for a KL without a clamp, two otherwise). Every kernel is also compiled for Hopper (sm_90a) on
the CPU and checked by ptxas for register spills. GPU-marked tests compare the Triton kernels with
the chunked path and ``token_terms`` on CUDA.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from megatron_renio.errors import UserInputError
from megatron_renio.losses import fused, fused_chunked, fused_plan, fused_triton
from megatron_renio.losses.divergence import DivergenceConfig, token_terms
from megatron_renio.losses.fused import fused_token_terms, triton_available
from megatron_renio.renio.vocab_parallel import VocabShard
from tests.torchrun_harness import run_torchrun
from tests.workers.fused_loss_worker import (
    OUTPUTS, STUDENT_POSITIONS, STUDENT_ROWS, TP_CASES, TP_LAYOUTS, TRITON_CASES, TRITON_NONFINITE,
    TRITON_PADDING_RANK_CASES, OFFSET_CASES, LARGE_LOGIT_CASES, large_logit_errors, make_logits, rows_nonfinite_flags,
    rows_results, run_path, sequence_logits,
)

WORKER = Path(__file__).parent / "workers" / "fused_loss_worker.py"
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
BF16_GRAD_RTOL, BF16_GRAD_ATOL = 2.0**-7, 2.0**-8

CASES = [  # (kind, beta, token_clip, temperature)
    ("forward_kl", 0.5, 0.05, 1.0),
    ("forward_kl", 0.5, 0.001, 1.3),
    ("forward_kl", 0.5, None, 1.0),
    ("reverse_kl", 0.5, 0.05, 1.1),
    ("reverse_kl", 0.5, 10.0, 1.0),
    ("reverse_kl", 0.5, None, 0.7),
    ("jsd", 0.5, 0.05, 1.1),
    ("jsd", 0.5, None, 1.0),
    ("jsd", 0.2, 0.001, 1.0),
    ("jsd", 0.0, 0.05, 1.0),
    ("jsd", 1.0, 0.05, 1.7),
]


def case_id(case) -> str:
    kind, beta, clip, temperature = case
    return f"{kind}{'' if kind != 'jsd' else beta}-k{clip}-T{temperature}"


def config(case) -> DivergenceConfig:
    kind, beta, clip, temperature = case
    return DivergenceConfig(kind=kind, beta=beta, temperature=temperature, token_clip=clip)


def both_paths(student, teacher, tokens, cfg, shard, grad_d, grad_s, impl="chunked"):
    args = (student, teacher, tokens, cfg, shard, None, grad_d, grad_s)
    return run_path(fused_token_terms, *args, impl=impl), run_path(token_terms, *args)


def assert_same(got: dict, want: dict, bf16_grad: bool = False) -> None:
    for key in OUTPUTS:
        if key == "grad" and bf16_grad:
            scale = want[key].abs().max().float()
            torch.testing.assert_close(got[key].float(), want[key].float(), rtol=BF16_GRAD_RTOL,
                                       atol=BF16_GRAD_ATOL * scale.item(), msg=lambda m: f"grad: {m}")
        else:
            torch.testing.assert_close(got[key], want[key], **FP32_TOL, msg=lambda m, k=key: f"{k}: {m}")
    assert got["nonfinite"] == want["nonfinite"]


def assert_same_in_megatron_layout(student, teacher, tokens, grad_d, grad_s, cfg, shard, impl: str) -> None:
    """fused_token_terms(impl) == token_terms on logits stored as Megatron's [t, b, V] and viewed as [b, t, V]:
    D, s and the gradient (of sum gD * D + gS * s) w.r.t. the [t, b, V] storage."""
    results = []
    for fn, kwargs in ((fused_token_terms, {"impl": impl}), (token_terms, {})):
        base = student.transpose(0, 1).contiguous().requires_grad_()
        teacher_view = teacher.transpose(0, 1).contiguous().transpose(0, 1)
        terms = fn(base.transpose(0, 1), teacher_view, tokens, cfg, shard, None, **kwargs)
        (terms.divergence * grad_d + terms.student_logprobs * grad_s).sum().backward()
        results.append((terms.divergence.detach(), terms.student_logprobs.detach(), base.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **FP32_TOL)


def assert_rows_in_place(runs: dict) -> None:
    """Reading rows through positions == token_terms on the gathered rows; empty cells give D = s = u = 0
    and the student rows that no cell reads get a zero gradient."""
    got = runs["fused"]
    assert_same(got, runs["gathered"])
    empty = torch.tensor(STUDENT_POSITIONS) < 0
    for key in ("divergence", "student_logprobs", "teacher_logprobs"):
        assert (got[key][empty] == 0).all(), key
    read = torch.zeros(3, STUDENT_ROWS, dtype=torch.bool)
    for i, row in enumerate(STUDENT_POSITIONS):
        read[i, [p for p in row if p >= 0]] = True
    assert (got["grad"][~read] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_unfused_fp32(case, monkeypatch):
    """Padded vocabulary (500 real of 512), ten row blocks per call."""
    monkeypatch.setattr(fused_chunked, "_CHUNK_ELEMS", 8 * 500)
    student, teacher, tokens, grad_d, grad_s = make_logits(2, 40, 512, seed=1)
    got, want = both_paths(student, teacher, tokens, config(case), VocabShard(0, 512, 500), grad_d, grad_s)
    assert_same(got, want)
    assert not got["nonfinite"]


def test_clamp_binds_per_entry():
    """k = 0.001 binds (smaller D than without clamp, the gradient differs too), k = 10 does not bind above."""
    student, teacher, tokens, grad_d, grad_s = make_logits(2, 8, 256, seed=2)
    shard = VocabShard(0, 256, 256)
    runs = {clip: run_path(fused_token_terms, student, teacher, tokens, config(("forward_kl", 0.5, clip, 1.0)),
                           shard, None, grad_d, grad_s) for clip in (0.001, 10.0, None)}
    assert (runs[0.001]["divergence"] < runs[10.0]["divergence"]).all()
    assert not torch.allclose(runs[0.001]["grad"], runs[10.0]["grad"])
    assert (runs[10.0]["divergence"] <= 10.0).all() and (runs[None]["divergence"] < runs[10.0]["divergence"]).all()


def test_row_blocks_across_samples_and_megatron_layout(monkeypatch):
    """Blocks spanning several samples; logits as Megatron's [t, b, V] transposed to [b, t, V] (a view)."""
    monkeypatch.setattr(fused_chunked, "_CHUNK_ELEMS", 5 * 300)  # 5 rows: blocks of 2 samples x 2 positions
    student, teacher, tokens, grad_d, grad_s = make_logits(6, 2, 320, seed=3)
    cfg, shard = config(("jsd", 0.5, 0.05, 1.1)), VocabShard(0, 320, 300)
    assert_same_in_megatron_layout(student, teacher, tokens, grad_d, grad_s, cfg, shard, "chunked")


@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[6], CASES[9]], ids=case_id)
def test_positions_read_rows_in_place(case, monkeypatch):
    """Student [3, 9, V] in Megatron's layout and teacher [3, 11, V] read through positions (a one-token
    prompt, empty cells); blocks of 4 cells: runs of rows read as views, a block where a completion ends
    (gathered rows, the gradient scattered), blocks of empty cells only (left out)."""
    monkeypatch.setattr(fused_chunked, "_CHUNK_ELEMS", 4 * 130)
    assert_rows_in_place(rows_results(case, 130, 120, None, seed=15))


def test_blocks_read_runs_of_rows_as_views_and_leave_out_empty_blocks(monkeypatch):
    """How the chunked sweeps read each block through positions (``chunked_blocks``): ``starts`` where every cell
    is filled and both models' rows are consecutive from the same row in each of the block's samples."""
    monkeypatch.setattr(fused_chunked, "_CHUNK_ELEMS", 6 * 100)  # 6 rows: blocks of 2 samples x 3 cells
    student = torch.tensor([[2, 3, 4], [2, 3, 4], [1, 2, 3], [4, 5, 6]])
    teacher = torch.tensor([[5, 6, 7], [5, 6, 7], [1, 2, 3], [4, 5, 6]])
    blocks = fused_chunked.chunked_blocks(fused_plan.Cells((4, 3), (student, teacher)), 100)
    assert [(b.bs, b.ts, b.starts) for b in blocks] == [(slice(0, 2), slice(0, 3), (2, 5)),  # one run in both samples
                                                         (slice(2, 4), slice(0, 3), None)]  # runs from other rows
    monkeypatch.setattr(fused_chunked, "_CHUNK_ELEMS", 3 * 100)  # blocks of 1 sample x 3 cells
    student = torch.tensor([[0, 1, -1], [-1, -1, -1], [3, 5, 6], [3, 4, 5], [7, 8, 9]])
    teacher = torch.tensor([[0, 1, 0], [0, 0, 0], [3, 4, 5], [3, 4, 6], [9, 10, 11]])
    blocks = fused_chunked.chunked_blocks(fused_plan.Cells((5, 3), (student, teacher)), 100)
    assert [(b.bs.start, b.starts) for b in blocks] == [(0, None), (2, None), (3, None), (4, (7, 9))]


def test_runs_of_rows_across_samples_match_gathered_rows(monkeypatch):
    """Every sample's completion at the same rows (as ``tools/bench_loss.py --prompt-rows`` lays them out):
    blocks of two samples read them as views and write the gradient in place, with the numbers of
    ``token_terms`` on the gathered rows, and zeros on the prompt rows. The blocks are made once, for
    forward and backward (each making copies the positions to the host)."""
    monkeypatch.setattr(fused_chunked, "_CHUNK_ELEMS", 6 * 130)
    made = []
    monkeypatch.setattr(fused, "chunked_blocks", lambda *a: made.append(a) or fused_chunked.chunked_blocks(*a))
    student, teacher, tokens, grad_d, grad_s = make_logits(4, 7, 130, seed=21)
    rows = torch.arange(4, 7).expand(4, 3)
    args = (student, teacher, tokens[:, :3], config(CASES[6]), VocabShard(0, 130, 120), None, grad_d[:, :3],
            grad_s[:, :3])
    assert [b.starts for b in fused_chunked.chunked_blocks(fused_plan.Cells((4, 3), (rows, rows)), 120)] == [(4, 4)] * 2
    got = run_path(fused_token_terms, *args, impl="chunked", positions=(rows, rows))
    assert len(made) == 1
    assert_same(got, run_path(fused._unfused_on_rows, *args, positions=(rows, rows)))
    assert (got["grad"][:, :4] == 0).all()


def test_positions_nonfinite_flag_counts_read_rows_only():
    assert rows_nonfinite_flags("chunked") == [False, True]


@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[6]], ids=case_id)
def test_matches_unfused_bf16(case):
    student, teacher, tokens, grad_d, grad_s = make_logits(2, 24, 512, seed=4, dtype=torch.bfloat16)
    got, want = both_paths(student, teacher, tokens, config(case), VocabShard(0, 512, 500), grad_d, grad_s)
    assert got["grad"].dtype == torch.bfloat16
    assert_same(got, want, bf16_grad=True)


def test_float64_stays_float64():
    student, teacher, tokens, grad_d, grad_s = make_logits(2, 6, 128, seed=5, dtype=torch.float64)
    got, want = both_paths(student, teacher, tokens, config(CASES[6]), VocabShard(0, 128, 120),
                           grad_d.double(), grad_s.double())
    assert got["divergence"].dtype == torch.float64
    for key in OUTPUTS:
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-12)


def test_tokens_outside_the_vocabulary_give_zero_logprobs():
    student, teacher, tokens, grad_d, grad_s = make_logits(1, 4, 64, seed=6)
    tokens[0, 0], tokens[0, 1] = -100, 62  # an ignore id, a padding id (60 real entries)
    got, want = both_paths(student, teacher, tokens, config(CASES[0]), VocabShard(0, 64, 60), grad_d, grad_s)
    assert_same(got, want)
    assert (got["student_logprobs"][0, :2] == 0).all() and (got["teacher_logprobs"][0, :2] == 0).all()


@pytest.mark.parametrize(
    "where, value, flagged",
    [(("student", 3), float("inf"), True), (("teacher", 7), float("-inf"), True),
     (("student", 61), float("nan"), False)],  # column 61 is padding: ignored
    ids=["student-inf", "teacher-neginf", "nan-in-padding"],
)
def test_nonfinite_flag_without_raising(where, value, flagged):
    student, teacher, tokens, grad_d, grad_s = make_logits(1, 4, 64, seed=7)
    (student if where[0] == "student" else teacher)[0, 1, where[1]] = value
    got, want = both_paths(student, teacher, tokens, config(CASES[6]), VocabShard(0, 64, 60), grad_d, grad_s)
    assert got["nonfinite"] is flagged and want["nonfinite"] is flagged
    if not flagged:
        assert_same(got, want)


def test_top_k_falls_back_to_token_terms():
    student, teacher, tokens, _, _ = make_logits(2, 3, 64, seed=8)
    cfg = DivergenceConfig(kind="jsd", beta=0.5, top_k=5)
    got = fused_token_terms(student, teacher, tokens, cfg, VocabShard(0, 64, 64))
    want = token_terms(student, teacher, tokens, cfg, VocabShard(0, 64, 64), None)
    assert torch.equal(got.divergence, want.divergence)


def test_no_grad_and_frozen_student_store_nothing():
    student, teacher, tokens, _, _ = make_logits(2, 3, 64, seed=9)
    shard, cfg = VocabShard(0, 64, 64), config(CASES[0])
    want = token_terms(student, teacher, tokens, cfg, shard, None)
    with torch.no_grad():
        leaf = student.clone().requires_grad_()
        terms = fused_token_terms(leaf, teacher, tokens, cfg, shard)
    assert not terms.divergence.requires_grad
    torch.testing.assert_close(terms.divergence, want.divergence, **FP32_TOL)
    terms = fused_token_terms(student, teacher, tokens, cfg, shard)
    assert not terms.divergence.requires_grad and not terms.student_logprobs.requires_grad


@contextlib.contextmanager
def intra_op_threads(count: int):
    """torch's intra-op thread count set to ``count`` for the block, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_intra_op_thread_count_restored():
    """The chunked path runs its block ops on one intra-op thread and restores the caller's setting,
    forward and backward."""
    student, teacher, tokens, _, _ = make_logits(1, 2, 32, seed=13)
    with intra_op_threads(2):
        leaf = student.requires_grad_()
        fused_token_terms(leaf, teacher, tokens, config(CASES[0]), VocabShard(0, 32, 32)).divergence.sum().backward()
        assert torch.get_num_threads() == 2


@pytest.mark.parametrize("in_place", [False, True], ids=["rows", "positions"])
def test_block_threads_give_the_same_bits_as_one_thread(in_place, monkeypatch):
    """The chunked path with torch's intra-op count at 3 hands blocks of three rows to 3 threads; forward
    and backward give bit for bit what one thread gives. Through positions, the blocks of runs write
    their gradient rows in place while a block where a completion ends scatters its own (its empty cell
    adds zeros to a row of its own filled cells, _Block.store)."""
    monkeypatch.setattr(fused_chunked, "_CHUNK_ELEMS", 3 * 130)
    workers = []
    spread = fused_chunked.for_each_block
    monkeypatch.setattr(fused_chunked, "for_each_block",
                        lambda blocks, fn, count: workers.append(count) or spread(blocks, fn, count))
    runs = {}
    for threads in (1, 3):
        with intra_op_threads(threads):
            if in_place:
                runs[threads] = rows_results(CASES[6], 130, 120, None, seed=15)["fused"]
            else:
                student, teacher, tokens, grad_d, grad_s = make_logits(2, 9, 130, seed=16)
                runs[threads] = run_path(fused_token_terms, student, teacher, tokens, config(CASES[3]),
                                         VocabShard(0, 130, 120), None, grad_d, grad_s, impl="chunked")
    assert workers == [1, 1, 3, 3]  # forward and backward, per thread count
    for key in OUTPUTS:
        assert torch.equal(torch.as_tensor(runs[3][key]), torch.as_tensor(runs[1][key])), key


def test_block_threads_under_inference_mode(monkeypatch):
    """Tensors made under torch.inference_mode take in-place writes only in inference mode: the helper
    threads run in the caller's mode, and give what one thread gives."""
    monkeypatch.setattr(fused_chunked, "_CHUNK_ELEMS", 130)
    student, teacher, tokens, _, _ = make_logits(2, 9, 130, seed=17)
    divergences = []
    for threads in (1, 3):
        with intra_op_threads(threads), torch.inference_mode():
            divergences.append(fused_token_terms(student, teacher, tokens, config(CASES[6]), VocabShard(0, 130, 120),
                                                 impl="chunked").divergence)
    assert torch.equal(divergences[0], divergences[1])


def test_block_threads_follow_torch_up_to_the_cap_on_the_cpu_only():
    with intra_op_threads(2), fused_chunked.block_threads(torch.device("cpu")) as workers:
        assert (workers, torch.get_num_threads()) == (2, 1)
    with intra_op_threads(16), fused_chunked.block_threads(torch.device("cpu")) as workers:
        assert workers == fused_chunked._MAX_BLOCK_THREADS == 4
    with intra_op_threads(2), fused_chunked.block_threads(torch.device("meta")) as workers:
        assert (workers, torch.get_num_threads()) == (1, 2)  # another device: torch's setting untouched


def test_for_each_block_calls_every_block_once_across_threads_each_with_its_own_scratch():
    calls, lock = [], threading.Lock()
    all_started = threading.Barrier(3, timeout=60)  # each thread's first block waits for the other two

    def record(block, scratch):
        with lock:
            first = all(thread != threading.get_ident() for _, thread, _ in calls)
            calls.append((block, threading.get_ident(), id(scratch)))
        if first:
            all_started.wait()  # broken (an error) unless three threads take blocks, however loaded the machine

    blocks = [(b, t) for b in range(3) for t in range(10)]
    fused_chunked.for_each_block(blocks, record, 3)
    assert sorted(block for block, _, _ in calls) == blocks
    assert len({thread for _, thread, _ in calls}) == 3
    assert len({(thread, scratch) for _, thread, scratch in calls}) == 3  # one scratch per thread


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_chunked_sweeps_allocate_no_block_sized_tensor_per_block(kind, monkeypatch):
    """Forward and backward allocate as many block-sized tensors (each thread's scratch buffers) for 20
    blocks as for 40: no block op allocates one (_Scratch)."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setattr(fused_chunked, "_CHUNK_ELEMS", 4 * 500)  # blocks of 4 rows: 8,000 bytes
    counts = []
    for rows in (40, 80):
        student, teacher, tokens, _, _ = make_logits(2, rows, 500, seed=19)
        cfg = DivergenceConfig(kind=kind, beta=0.5, temperature=1.0, token_clip=0.05)
        with intra_op_threads(1), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            leaf = student.requires_grad_()
            fused_token_terms(leaf, teacher, tokens, cfg, VocabShard(0, 500, 500), impl="chunked").divergence.sum().backward()
        gradient_bytes = student.numel() * 4
        counts.append(sum(4 * 500 * 4 <= e.self_cpu_memory_usage < gradient_bytes for e in prof.events()))
    assert counts[0] == counts[1] and 0 < counts[0] <= 12, counts


def test_scratch_buffers_are_reused_and_grow_when_a_block_needs_more():
    scratch = fused_chunked._Scratch()
    first = scratch.take("a", torch.Size([4, 5]), torch.float32, torch.device("cpu"))
    smaller = scratch.take("a", torch.Size([2, 3]), torch.float32, torch.device("cpu"))
    assert smaller.is_contiguous() and smaller.data_ptr() == first.data_ptr()
    assert scratch.take("b", torch.Size([2, 3]), torch.float32, torch.device("cpu")).data_ptr() != first.data_ptr()
    assert scratch.take("a", torch.Size([4, 5]), torch.float32, torch.device("cpu")) is first  # no new view
    larger = scratch.take("a", torch.Size([5, 5]), torch.float32, torch.device("cpu"))
    assert larger.shape == (5, 5) and larger.data_ptr() != first.data_ptr()
    again = scratch.take("a", torch.Size([4, 5]), torch.float32, torch.device("cpu"))
    assert again.data_ptr() == larger.data_ptr()  # a view of the grown buffer, not of the old one
    assert scratch.like("a", torch.zeros(3, 2, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("failing_thread", ["caller", "helper"])
def test_for_each_block_raises_the_first_error_after_the_threads_stop(failing_thread):
    """A block's error stops the hand-out of the remaining blocks and is raised in the caller, whichever
    thread it happened on."""
    caller, done, failed = threading.get_ident(), [], []

    def fail_once(block, scratch):
        time.sleep(0.002)
        done.append(block)
        if not failed and (threading.get_ident() == caller) == (failing_thread == "caller"):
            failed.append(block)
            raise ValueError(f"block {block}")

    blocks = list(range(200))
    with pytest.raises(ValueError, match="block"):
        fused_chunked.for_each_block(blocks, fail_once, 2)
    assert len(done) < len(blocks) // 2


def test_backward_twice_recomputes_the_same_gradient():
    """Nothing logits-sized is consumed by backward: retain_graph and a second backward give the same gradient."""
    student, teacher, tokens, _, _ = make_logits(1, 2, 32, seed=10)
    leaf = student.requires_grad_()
    loss = fused_token_terms(leaf, teacher, tokens, config(CASES[6]), VocabShard(0, 32, 30)).divergence.sum()
    loss.backward(retain_graph=True)
    first = leaf.grad.clone()
    leaf.grad = None
    loss.backward()
    assert torch.equal(leaf.grad, first)


@pytest.mark.skipif(not triton_available(), reason="needs triton (pip install triton)")
def test_backward_uses_the_gradient_launch_in_effect_at_the_forward(monkeypatch):
    """A launch set around the forward (tools/bench_loss.py --triton-launch F/G) also shapes its backward,
    which runs after the caller has put the defaults back. The kernels are stubbed: this checks the launch."""
    launches = []

    def forward_stub(zs, zt, cells, col, plan, tp_group):
        zeros = torch.zeros(cells.shape)
        return torch.zeros((4, *cells.shape)), zeros, zeros, zeros, zeros, torch.zeros((), dtype=torch.bool)

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets impl='triton' take CPU tensors
    monkeypatch.setattr(fused_triton, "triton_forward", forward_stub)
    monkeypatch.setattr(fused_triton, "triton_grad", lambda *args: launches.append(args[-1]))
    student, teacher, tokens, _, _ = make_logits(1, 2, 32, seed=10)
    leaf = student.requires_grad_()
    chosen = fused_triton.TritonLaunch(None, 2, 64)
    monkeypatch.setattr(fused_triton, "TRITON_GRAD_LAUNCH", chosen)
    loss = fused_token_terms(leaf, teacher, tokens, config(CASES[0]), VocabShard(0, 32, 30), impl="triton")
    monkeypatch.setattr(fused_triton, "TRITON_GRAD_LAUNCH", fused_triton.TritonLaunch())
    loss.divergence.sum().backward()
    assert launches == [chosen]


@pytest.fixture
def kernel_launches(monkeypatch) -> list:
    """The Triton kernels stubbed by recorders of their launches, (name, grid, keyword arguments) in order:
    for tests of the launch arguments, not of the numbers (the outputs stay zeros)."""
    calls = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.name, grid, kwargs))

    for name in ("_forward_kernel", "_terms_kernel", "_grad_kernel"):
        monkeypatch.setattr(fused_triton, name, Recorder(name))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets impl='triton' take CPU tensors
    return calls


@pytest.mark.skipif(not triton_available(), reason="needs triton (pip install triton)")
def test_each_kernel_runs_with_its_launch(kernel_launches, monkeypatch):
    """The forward kernel gets TRITON_LAUNCH's shape (warps, block, running-max group, prefetch) and the
    gradient kernel TRITON_GRAD_LAUNCH's, as in effect at the forward."""
    calls = kernel_launches
    monkeypatch.setattr(fused_triton, "TRITON_LAUNCH", fused_triton.TritonLaunch(None, 2, 64, max_group=8))
    monkeypatch.setattr(fused_triton, "TRITON_GRAD_LAUNCH", fused_triton.TritonLaunch(3, 8, 128, prefetch=False))
    student, teacher, tokens, _, _ = make_logits(1, 4, 500, seed=10)
    terms = fused_token_terms(student.requires_grad_(), teacher, tokens, config(CASES[0]), VocabShard(0, 500, 490),
                              impl="triton")
    monkeypatch.setattr(fused_triton, "TRITON_LAUNCH", fused_triton.TritonLaunch())
    monkeypatch.setattr(fused_triton, "TRITON_GRAD_LAUNCH", fused_triton.TritonLaunch())
    terms.divergence.sum().backward()
    (forward_name, forward_grid, forward), (grad_name, grad_grid, grad) = calls
    assert (forward_name, forward_grid) == ("_forward_kernel", (4,))  # one program per token row
    assert {key: forward[key] for key in ("num_warps", "BLOCK_V", "GROUP", "PREFETCH", "STATS_ONLY")} == \
        {"num_warps": 2, "BLOCK_V": 64, "GROUP": 8, "PREFETCH": True, "STATS_ONLY": False}
    assert (grad_name, grad_grid) == ("_grad_kernel", (3,))  # 3 programs per SM; the interpreter counts one
    assert {key: grad[key] for key in ("num_warps", "BLOCK_V", "PREFETCH")} == \
        {"num_warps": 8, "BLOCK_V": 128, "PREFETCH": False}


@pytest.mark.skipif(not triton_available(), reason="needs triton (pip install triton)")
@pytest.mark.parametrize("case, weight", [(CASES[2], 1), (CASES[5], 2), (CASES[0], 0), (CASES[7], 0)], ids=str)
def test_only_unclamped_kl_takes_the_one_sweep_forward(kernel_launches, case, weight):
    """Forward KL (WEIGHT 1: teacher weights) and reverse KL (2: student weights) without a clamp: one forward
    kernel, sweep 1 only (STATS_ONLY), so the forward reads the logits once; a clamp or JSD: sweeps 1 and 2
    (WEIGHT 0). Either way, no second kernel without TP. The numbers: test_triton_kernels_in_interpreter."""
    student, teacher, tokens, _, _ = make_logits(1, 4, 500, seed=10)
    fused_token_terms(student, teacher, tokens, config(case), VocabShard(0, 500, 490), impl="triton")
    [(name, _, forward)] = kernel_launches
    assert (name, forward["WEIGHT"], forward["STATS_ONLY"]) == ("_forward_kernel", weight, weight != 0)


def test_bad_arguments_raise_user_input_error(monkeypatch):
    student, teacher, tokens, _, _ = make_logits(1, 2, 32, seed=11)
    cfg, shard = config(CASES[0]), VocabShard(0, 32, 32)
    with pytest.raises(UserInputError, match="impl must be one of"):
        fused_token_terms(student, teacher, tokens, cfg, shard, impl="cuda")
    with pytest.raises(UserInputError, match="shard size"):
        fused_token_terms(student, teacher, tokens, cfg, VocabShard(0, 16, 32))
    with pytest.raises(UserInputError, match="tokens \\(1, 3\\)"):
        fused_token_terms(student, teacher, tokens[:, [0, 1, 1]], cfg, shard)
    rows_s, rows_t, grid_tokens, _, _, (pos_s, pos_t) = sequence_logits(32, seed=11)
    for positions in ((pos_s, pos_t[:, :2]), (pos_s.float(), pos_t)):
        with pytest.raises(UserInputError, match="both positions"):
            fused_token_terms(rows_s, rows_t, grid_tokens, cfg, shard, positions=positions)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserInputError, match="impl='triton'"):
        fused_token_terms(student, teacher, tokens, cfg, shard, impl="triton")


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_forward_and_backward_take_the_same_clamp_mask_where_the_models_agree(temperature):
    """Both models confident on the same token, as on most tokens of a distillation run: there the JSD
    element d_v is of the order of (p_v - q_v)^2, about 1e-9, and its sign can turn on the last bit of p
    or q. The gradient (h_j - q_j H) / T stays within the fp32 tolerance of float64 only if the forward's
    H and the backward's h_j take the same mask; when the forward formed p and q as exp(a - m) / S and
    the backward as exp(log p), 3 of 128 rows missed it by up to 36x (T = 0.7)."""
    g = torch.Generator().manual_seed(0)
    student = 2.0 * torch.randn(4, 32, 3000, generator=g)
    student[..., 0] += 15.0
    teacher = student + 0.3 * torch.randn(4, 32, 3000, generator=g)
    grad_d, grad_s = torch.randn(2, 4, 32, generator=g)
    cfg = DivergenceConfig(kind="jsd", beta=0.5, temperature=temperature, token_clip=0.05)
    args = (torch.zeros(4, 32, dtype=torch.long), cfg, VocabShard(0, 3000, 3000), None, grad_d, grad_s)
    exact = run_path(token_terms, student.double(), teacher.double(), *args)["grad"]
    got = run_path(fused_token_terms, student, teacher, *args, impl="chunked")["grad"]
    torch.testing.assert_close(got.double(), exact, **FP32_TOL)


def test_an_empty_token_grid_gives_empty_terms_as_token_terms():
    """[b, 0] tokens: empty terms and an empty gradient (the chunked path divided by zero tiling them)."""
    student = torch.randn(2, 0, 50, requires_grad=True)
    tokens, cfg, shard = torch.zeros(2, 0, dtype=torch.long), DivergenceConfig(kind="jsd", beta=0.5), VocabShard(0, 50, 50)
    terms = fused_token_terms(student, torch.randn(2, 0, 50), tokens, cfg, shard, impl="chunked")
    expected = token_terms(student, torch.randn(2, 0, 50), tokens, cfg, shard, None)
    assert terms.divergence.shape == terms.student_logprobs.shape == expected.divergence.shape == (2, 0)
    assert not terms.nonfinite
    (terms.divergence.sum() + terms.student_logprobs.sum()).backward()
    assert student.grad.shape == (2, 0, 50)


def test_finite_fp16_logits_whose_row_sum_passes_fp16s_range_are_finite():
    """The chunked path's non-finite test sums each row in fp32: ordinary fp16 logits near 5 over 32,000
    entries sum past 65,504, and the step was flagged (and would have been skipped)."""
    g = torch.Generator().manual_seed(0)
    student, teacher = ((3 * torch.randn(1, 4, 32000, generator=g) + 5.0).half() for _ in range(2))
    assert torch.isinf(student.sum(-1)).all()  # in fp16
    tokens, cfg, shard = torch.zeros(1, 4, dtype=torch.long), DivergenceConfig(kind="forward_kl"), VocabShard(0, 32000, 32000)
    assert not fused_token_terms(student, teacher, tokens, cfg, shard, impl="chunked").nonfinite
    student[0, 2, 7] = float("inf")
    assert fused_token_terms(student, teacher, tokens, cfg, shard, impl="chunked").nonfinite


@pytest.mark.parametrize("case", LARGE_LOGIT_CASES, ids=lambda case: f"{case[0]}-k{case[1]}-T{case[2]}")
def test_keeps_fp32_precision_on_large_logits(case):
    """Logits of standard deviation 24 (maxima near 100): D, s, u and the gradient stay within the fp32
    tolerance of the float64 formula. Log-probs are formed as (z/T - max/T) - log_sum; as z / T - LSE they
    rounded at the size of the LSE (D and the gradient 1.1-1.3x the tolerance). The forward's D and H
    and the backward's h take the same clamp mask: when the forward formed p and q otherwise, a JSD
    mask flip where the models agree put the gradient at 15x (T = 1) and 11x (T = 0.7)."""
    errors = large_logit_errors(*case, impl="chunked")["chunked"]
    assert max(errors.values()) <= 1.0, errors


# TP=2 (and the Triton interpreter) in one torchrun launch
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")  # read by triton at import: the workers run the kernels on the CPU
        return run_torchrun(WORKER, 2, tmp_path_factory.mktemp("fused_tp2"), timeout=300)


@pytest.mark.parametrize("layout", TP_LAYOUTS, ids=lambda lay: f"local{lay[0]}-true{lay[1]}")
@pytest.mark.parametrize("case", TP_CASES, ids=case_id)
def test_tp2_matches_unfused(tp2, case, layout):
    """Per rank: fused == unfused on the shards, and == token_terms on the full vocabulary (TP=1)."""
    for rank in tp2:
        runs = rank["chunked"][case, layout]
        assert_same(runs["fused"], runs["unfused"])
        assert_same(runs["fused"], runs["full"])


@pytest.mark.parametrize("layout", TP_LAYOUTS, ids=lambda lay: f"local{lay[0]}-true{lay[1]}")
@pytest.mark.parametrize("case", TP_CASES, ids=case_id)
def test_tp2_positions_read_rows_in_place(tp2, case, layout):
    for rank in tp2:
        assert_rows_in_place(rank["rows", "chunked"][case, layout])


@pytest.mark.parametrize("case", LARGE_LOGIT_CASES, ids=lambda case: f"{case[0]}-k{case[1]}-T{case[2]}")
def test_tp2_keeps_fp32_precision_on_large_logits(tp2, case):
    """As at TP=1, with the row statistics combined across the two ranks (the terms sweep of its own)."""
    for rank, result in enumerate(tp2):
        errors = result["chunked_large_logits"][case]["chunked"]
        assert max(errors.values()) <= 1.0, (rank, errors)


@pytest.mark.parametrize("case", LARGE_LOGIT_CASES, ids=lambda case: f"{case[0]}-k{case[1]}-T{case[2]}")
def test_tp2_keeps_fp32_precision_when_the_students_logits_sit_high(tp2, case):
    """Logits of spread 3, the student's raised by 1,000 (max / T near 1,400, rounded at 1e-4): each rank's
    sum-exp is rescaled to the global max by exp(m_r/T - M/T) formed from the rounded shifts its sweeps
    subtract, so that their roundings cancel as at TP=1. From (m_r - M)/T they did not: D 2.3x the
    tolerance (16x with an offset of 10,000)."""
    for rank, result in enumerate(tp2):
        errors = result["chunked_high_student"][case]["chunked"]
        assert max(errors.values()) <= 1.0, (rank, errors)


def test_tp2_bf16(tp2):
    for rank in tp2:
        assert_same(rank["bf16"]["fused"], rank["bf16"]["unfused"], bf16_grad=True)


def skip_unless_triton_ran(tp2) -> None:
    if not tp2[0]["triton_checked"]:
        pytest.skip("triton is not installed: the Triton kernels were not run (pip install triton to check "
                    "them on the CPU with TRITON_INTERPRET=1)")


@pytest.mark.parametrize("tp", ["tp1", "tp2", "tp1-no-prefetch"])
@pytest.mark.parametrize("case", TRITON_CASES, ids=case_id)
def test_triton_kernels_in_interpreter(tp2, case, tp):
    skip_unless_triton_ran(tp2)
    for rank in tp2:
        runs = rank["triton"][case, tp]
        assert_same(runs["fused"], runs["unfused"])
        assert_same(runs["fused"], runs["full"])
        assert_rows_in_place(rank["rows", "triton"][case, tp])


@pytest.mark.parametrize("case", TRITON_PADDING_RANK_CASES, ids=case_id)
def test_triton_kernels_with_a_shard_of_padding_only(tp2, case):
    """Rank 1 holds no real column (its kernels see N_VALID = 0): both ranks still match the full vocabulary."""
    skip_unless_triton_ran(tp2)
    for rank in tp2:
        runs = rank["triton"][case, "tp2-padding-rank"]
        assert_same(runs["fused"], runs["unfused"])
        assert_same(runs["fused"], runs["full"])


@pytest.mark.parametrize("case", OFFSET_CASES, ids=lambda case: f"{case[0]}-offset{case[1]:+.0f}-T{case[2]}-V{case[3]}")
def test_one_sweep_error_stays_near_the_two_sweeps_when_the_models_logits_sit_apart(tp2, case):
    """D of the one-sweep forward is a difference of two terms that grow with an offset between the two
    models' logits (here up to 300 nats): with the row offset taken out of its weighted sum, its error
    against the float64 formula stays within twice that of the two-sweep forward (measured: 0.6-1.5x).
    On a shard narrower than one block the offsets come from the tail (they were 0, and D's error grew
    with the offset: 1.5x the fp32 tolerance at 100, 7.3x at 1,000)."""
    skip_unless_triton_ran(tp2)
    errors = tp2[0]["triton_offset"][case]
    assert errors["one"] <= 2.0 * errors["two"], errors


@pytest.mark.parametrize("case", LARGE_LOGIT_CASES, ids=lambda case: f"{case[0]}-k{case[1]}-T{case[2]}")
def test_triton_keeps_fp32_precision_on_large_logits(tp2, case):
    """Logits of standard deviation 24 (maxima near 100): D, s, u and the gradient of every Triton forward stay
    within the fp32 tolerance of the float64 formula. Log-probs are formed as (z - max) / T - log_sum; as
    z / T - LSE they rounded at the size of the LSE and reverse KL's gradient missed it by 3.7-8.3x."""
    skip_unless_triton_ran(tp2)
    for forward, errors in tp2[1]["triton_large_logits"][case].items():
        assert max(errors.values()) <= 1.0, (forward, errors)


def test_triton_nonfinite_flag_in_interpreter(tp2):
    skip_unless_triton_ran(tp2)
    for rank in tp2:
        assert rank["triton_nonfinite"] == [entry[-1] for entry in TRITON_NONFINITE]
        assert rank["triton_tp2_nonfinite"] == [True, True]  # inf on rank 1's shard only: both ranks flag it
        assert rank["triton_rows_nonfinite"] == [False, True]


# ------------------------------------------------------------------------------------------------
# Triton kernels compiled for a Hopper GPU (no GPU needed: triton's compiler and ptxas run on the CPU)
# ------------------------------------------------------------------------------------------------

KERNEL_ARG_TYPES = {"zs_ptr": "*bf16", "zt_ptr": "*bf16", "g_ptr": "*bf16", "out_ptr": "*fp32", "stats_ptr": "*fp32",
                    "coef_ptr": "*fp32", "col_ptr": "*i32", "spos_ptr": "*i32", "tpos_ptr": "*i32", "cell_ptr": "*i32",
                    "scale": "fp32", "beta": "fp32", "clip2": "fp32"}


def ptxas_report_for_hopper(kernel, constants: dict, num_warps: int, tmp_path) -> str:
    """Compile a @triton.jit kernel for sm_90a with ``num_warps``; returns ptxas's resource report."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource, compile as triton_compile

    signature = {name: "constexpr" if name in constants else KERNEL_ARG_TYPES.get(name, "i32")
                 for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    compiled = triton_compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps})
    ptx = tmp_path / f"{kernel.fn.__name__}.ptx"
    ptx.write_text(compiled.asm["ptx"])
    report = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", str(ptx), "-o", str(ptx.with_suffix(".o"))],
                            capture_output=True, text=True, check=True)
    return report.stdout + report.stderr


@pytest.mark.skipif(not triton_available(), reason="needs triton (pip install triton)")
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_triton_kernels_compile_for_hopper_without_spills(kind, tmp_path):
    """Each kernel compiles at Qwen3's vocabulary shard with the default launch and keeps its values in registers."""
    plan = fused_plan.Plan.build(DivergenceConfig(kind=kind, beta=0.5, token_clip=0.05), VocabShard(0, 151936, 151936))
    forward, grad = fused_triton.TRITON_LAUNCH, fused_triton.TRITON_GRAD_LAUNCH
    common = dict(KIND=plan.kind, HAS_CLIP=True, BLOCK_V=forward.block_v, GRID=132, PREFETCH=forward.prefetch)
    group = forward.block_v if forward.max_group is None else forward.max_group
    two_sweeps = dict(common, WEIGHT=0)
    kernels = [
        (fused_triton._forward_kernel, dict(two_sweeps, N_VALID=151936, GROUP=group, STATS_ONLY=False), forward),
        (fused_triton._forward_kernel, dict(two_sweeps, N_VALID=151936, GROUP=forward.block_v, STATS_ONLY=False),
         forward),
        (fused_triton._forward_kernel, dict(two_sweeps, N_VALID=75968, GROUP=group, STATS_ONLY=True), forward),  # TP
        (fused_triton._terms_kernel, dict(common, N_VALID=75968), forward),
        (fused_triton._grad_kernel, dict(common, N_VALID=151936, N_LOCAL=152064, BLOCK_V=grad.block_v,
                                  PREFETCH=grad.prefetch), grad),
    ]
    if kind != "jsd":  # the one-sweep forward of a KL without a clamp (Plan.one_sweep)
        one_sweep = dict(common, HAS_CLIP=False, GROUP=group, STATS_ONLY=True, WEIGHT=1 + plan.kind)
        kernels += [(fused_triton._forward_kernel, dict(one_sweep, N_VALID=151936), forward),
                    (fused_triton._forward_kernel, dict(one_sweep, N_VALID=75968), forward)]
    for kernel, constants, launch in kernels:
        report = ptxas_report_for_hopper(kernel, constants, launch.num_warps, tmp_path)
        assert f"Compiling entry function '{kernel.fn.__name__}' for 'sm_90a'" in report
        assert "0 bytes spill stores, 0 bytes spill loads" in report, report


# ------------------------------------------------------------------------------------------------
# GPU: Triton == chunked on CUDA
# ------------------------------------------------------------------------------------------------

GPU_SHAPES = [(2, 64, 1024, 1000, torch.float32), (1, 512, 151936, 151936, torch.bfloat16)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("case", LARGE_LOGIT_CASES, ids=lambda case: f"{case[0]}-k{case[1]}-T{case[2]}")
def test_triton_keeps_fp32_precision_on_large_logits_on_cuda(case):
    """As in the interpreter, with the GPU's approximate exponential and log2."""
    for forward, errors in large_logit_errors(*case, device="cuda").items():
        assert max(errors.values()) <= 1.0, (forward, errors)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[5], CASES[6]], ids=case_id)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}-{str(s[4])[6:]}")
def test_triton_matches_chunked_on_cuda(case, shape):
    b, t, vocab, true_vocab, dtype = shape
    student, teacher, tokens, grad_d, grad_s = (x.cuda() for x in make_logits(b, t, vocab, seed=12, dtype=dtype))
    shard = VocabShard(0, vocab, true_vocab)
    got, want = both_paths(student, teacher, tokens, config(case), shard, grad_d, grad_s, impl="triton")
    chunked = run_path(fused_token_terms, student, teacher, tokens, config(case), shard, None, grad_d, grad_s,
                       impl="chunked")
    bf16 = dtype == torch.bfloat16
    assert_same(got, chunked, bf16_grad=bf16)
    assert_same(got, want, bf16_grad=bf16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("launch", [fused_triton.TritonLaunch(None, 8, 1024, prefetch=False), fused_triton.TritonLaunch(1, 16, 4096, True),
                                    fused_triton.TritonLaunch(3, 4, 512, max_group=8)], ids=str)
def test_triton_launch_shapes_and_megatron_layout_on_cuda(launch, monkeypatch):
    """Launch shapes (one row per program, persistent grids, prefetch or not, grouped running max) on
    [t, b, V] logits viewed as [b, t, V]."""
    monkeypatch.setattr(fused_triton, "TRITON_LAUNCH", launch)
    monkeypatch.setattr(fused_triton, "TRITON_GRAD_LAUNCH", launch)
    student, teacher, tokens, grad_d, grad_s = (x.cuda() for x in make_logits(3, 200, 3000, seed=14))
    cfg, shard = config(CASES[6]), VocabShard(0, 3000, 2990)
    assert_same_in_megatron_layout(student, teacher, tokens, grad_d, grad_s, cfg, shard, "triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("case", [CASES[0], CASES[6]], ids=case_id)
def test_triton_positions_read_rows_in_place_on_cuda(case):
    assert_rows_in_place(rows_results(case, 3000, 2990, None, seed=16, impl="triton", device="cuda"))
