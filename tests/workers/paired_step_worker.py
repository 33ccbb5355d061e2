"""torchrun worker (2 or 4 ranks): one distillation step under TP=2 (also with sequence parallelism), PP=2 and
DP=2 equals one process; at 4 ranks the same layouts with the other ranks as data-parallel replicas (TP=2 x
DP=2, PP=2 x DP=2, DP=4) and TP=2 x PP=2.

A student and a (wider) teacher GPTModel are built once at TP=1 and saved with dist_checkpointing.
The reference is computed in plain PyTorch on the full batch: Megatron TP=1 forwards, then the
formulas of tests/reference_renio.py, then autograd. Each layout loads the same weights, runs
:class:`DistillationStep` (Megatron DDP + schedule) on micro-batches each padded to its own length, writes its reduced student gradients into a
dist checkpoint, and the gradients are reloaded at TP=1 and compared with the reference.
"""

import shutil
import sys
import tempfile
from pathlib import Path

import torch

from megatron.core import dist_checkpointing

from megatron_renio import distributed
from megatron_renio.data.batching import pack_pairs
from megatron_renio.distributed import ParallelConfig
from megatron_renio.losses.divergence import DivergenceConfig, gather_grid
from megatron_renio.models.builder import build_gpt_model, freeze
from megatron_renio.models.presets import get_preset
from megatron_renio.renio.weights import ReNIOConfig, ReNIONormalizer
from megatron_renio.training.components import wrap_ddp
from megatron_renio.training.paired import PairedModel
from megatron_renio.training.step import DistillationStep, LossSettings
from tests import reference_renio as ref
from tests.torchrun_harness import save_rank_result

VOCAB = 250
STUDENT = get_preset("tiny-qwen3").replace(vocab_size=VOCAB)
TEACHER = get_preset("tiny-qwen3").replace(vocab_size=VOCAB, hidden_size=96, ffn_hidden_size=192, head_dim=24)
NUM_SAMPLES, MICRO = 8, 2
CASES = {
    "forward_kl_renio_global": dict(kind="forward_kl", beta=0.0, loss_kind="divergence", renio=True, scope="global", impl="unfused"),
    "jsd_renio_local": dict(kind="jsd", beta=0.5, loss_kind="divergence", renio=True, scope="local", impl="unfused"),
    "reverse_kl_fused_global": dict(kind="reverse_kl", beta=1.0, loss_kind="divergence", renio=True, scope="global", impl="chunked"),
    # the first step of the global EMA normaliser: each micro-batch's divisor is its mean weight (the EMA is
    # unset), so the loss is batch_mean's; after the step the EMA is the mean raw weight of every replica's samples
    "forward_kl_renio_ema_global": dict(kind="forward_kl", beta=0.0, loss_kind="divergence", renio=True,
                                        scope="global", impl="chunked", norm="ema"),
    "sampled_rkl_plain": dict(kind="reverse_kl", beta=1.0, loss_kind="sampled_rkl", renio=False, scope="global", impl="unfused"),
    "sampled_rkl_fused": dict(kind="reverse_kl", beta=1.0, loss_kind="sampled_rkl", renio=False, scope="global", impl="chunked"),
    # the teacher's top-k ids (gathered over TP) and the clamp normalisation
    "jsd_top_k_renio_clamp_local": dict(kind="jsd", beta=0.5, loss_kind="divergence", renio=True, scope="local",
                                        impl="unfused", top_k=5, norm="clamp"),
}
TEMPERATURE, CLIP = 1.1, 0.05


def make_batch():
    g = torch.Generator().manual_seed(11)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    s_prompts = [torch.randint(3, VOCAB, (rand(3, 9),), generator=g).tolist() for _ in range(NUM_SAMPLES)]
    s_prompts[4] = s_prompts[4][:1]  # a one-token prompt and a short completion: its first token is predicted at
    # position 0, which its padded grid cells name too (gather_index 0)
    t_prompts = [p + torch.randint(3, VOCAB, (rand(0, 7),), generator=g).tolist() for p in s_prompts]  # OPSD-like
    completions = [torch.randint(3, VOCAB, (rand(1, 10),), generator=g).tolist() for _ in range(NUM_SAMPLES)]
    completions[3] = completions[3][:4] + [2]  # one ends with EOS (id 2)
    return pack_pairs(s_prompts, t_prompts, completions, eos_id=2, pad_id=0, seq_length=32)


def settings(case):
    div = DivergenceConfig(kind=case["kind"], beta=case["beta"], temperature=TEMPERATURE, token_clip=CLIP,
                           top_k=case.get("top_k"))
    renio = ReNIOConfig(enabled=case["renio"], scope=case["scope"], clip=0.6, threshold=0.05,
                        norm=case.get("norm", "batch_mean"))
    return LossSettings(div, renio, case["loss_kind"], case["impl"])


def build(preset, parallel):
    model, _ = build_gpt_model(preset, parallel)
    return model


def reference(student, teacher, batch, case):
    """Loss and student gradients of the whole batch, from the formulas (one process, TP=1)."""
    student.zero_grad()
    s_logits = gather_grid(student(batch.student.tokens, batch.student.position_ids, attention_mask=None), batch.student.gather_index)
    with torch.no_grad():
        t_logits = gather_grid(teacher(batch.teacher.tokens, batch.teacher.position_ids, attention_mask=None), batch.teacher.gather_index)
    renio = {"clip": 0.6, "threshold": 0.05, "gamma": 1.0} if case["renio"] else None
    parts = []
    for start in range(0, NUM_SAMPLES, MICRO):
        rows = slice(start, start + MICRO)
        parts.append(ref.micro_batch(
            s_logits[rows], t_logits[rows], batch.completion_ids[rows], batch.completion_mask[rows], VOCAB,
            kind=case["kind"], beta=case["beta"], temperature=TEMPERATURE, token_clip=CLIP, top_k=case.get("top_k"),
            loss_kind=case["loss_kind"], renio=renio, normaliser=ref.Normaliser(case.get("norm", "batch_mean")),
        ))
    if case["scope"] == "local":
        loss = torch.stack([p["loss"] for p in parts]).mean()
    elif case["renio"]:  # global batch_mean: self-normalised over every sample of the step
        w = torch.cat([p["raw_weights"] for p in parts])
        loss = (w * torch.cat([p["per_sample"] for p in parts])).sum() / w.sum()
    else:  # plain sampled-token loss: mean over every valid token of the step
        mask = batch.completion_mask.bool()
        n = mask.sum(-1).double()
        loss = (torch.cat([p["per_sample"] for p in parts]) * n).sum() / n.sum()
    loss.backward()
    raw = torch.cat([p["raw_weights"] for p in parts])
    return (float(loss), float(raw.max() - raw.min()), float(raw.mean()),
            {n: p.grad.clone() for n, p in student.named_parameters()})


def run_layout(parallel, case, batch, ckpt, out, longest_first=False):
    """One DistillationStep in ``parallel``; the reduced gradients are saved to ``out``. ``longest_first``:
    each rank groups its samples into micro-batches longest first (``--micro-batch-order length``)."""
    ctx = distributed.initialize(parallel, seed=0)
    student, teacher = build(STUDENT, parallel), build(TEACHER, parallel)
    student.load_state_dict(dist_checkpointing.load(student.sharded_state_dict(), ckpt / "student"))
    teacher.load_state_dict(dist_checkpointing.load(teacher.sharded_state_dict(), ckpt / "teacher"))
    freeze(teacher)
    teacher_before = [p.clone() for p in teacher.parameters()]
    ddp = wrap_ddp(student, use_distributed_optimizer=False)
    paired = PairedModel(ddp, teacher, STUDENT.hidden_size, TEACHER.hidden_size)
    normalizer = ReNIONormalizer()
    step = DistillationStep(paired, [ddp], settings(case), normalizer, VOCAB)
    per_rank = NUM_SAMPLES // ctx.dp_size
    mine = batch.rows(ctx.dp_rank * per_rank, (ctx.dp_rank + 1) * per_rank)
    if longest_first:
        order = mine.longest_first()
        assert order != sorted(order), order  # the grouping really changes
        mine = mine.reordered(order)
    ddp.zero_grad_buffer()
    # each micro-batch padded to its own length, as the trainer does (the reference reads the whole batch at
    # its padded length; under PP the stages exchange every micro-batch's shape)
    micro = [mine.rows(i, i + MICRO).trimmed() for i in range(0, per_rank, MICRO)]
    assert len({mb.seq_len for mb in micro}) > 1 or ctx.dp_size > 1, [mb.seq_len for mb in micro]
    result = step.run(micro)
    teacher_unchanged = all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))
    only_student_in_buffers = all(
        any(p is q for q in student.parameters()) for p in ddp.param_to_bucket_group
    ) and not any(p.grad is not None for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.copy_(p.main_grad)
    if torch.distributed.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(student.sharded_state_dict(), out)
    # the normaliser's EMA after the step where the loss is (the last stage): the largest and the smallest over
    # the replicas
    value = float(normalizer.ema)
    ema = torch.tensor([value, -value] if ctx.is_last_stage else [float("-inf")] * 2, dtype=torch.float64)
    torch.distributed.all_reduce(ema, op=torch.distributed.ReduceOp.MAX)
    return result.loss, teacher_unchanged, only_student_in_buffers, (float(ema[0]), -float(ema[1]))


def compare(out, ref_grads, loss, ref_loss, weight_spread, teacher_unchanged, only_student, ema, ref_ema) -> dict:
    """A layout's result: its loss and the largest difference of its gradients (saved in ``out``, read
    back at TP=1) from the reference's; the normaliser's EMA after the step (largest, smallest over the
    replicas) and the reference's mean raw weight."""
    distributed.initialize(ParallelConfig(), seed=0)
    holder = build(STUDENT, ParallelConfig())
    holder.load_state_dict(dist_checkpointing.load(holder.sharded_state_dict(), out))
    max_err = max(float((p - ref_grads[n]).abs().max()) for n, p in holder.named_parameters())
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    return dict(loss=loss, ref_loss=ref_loss, max_grad_err=max_err, grad_scale=scale, weight_spread=weight_spread,
                teacher_unchanged=teacher_unchanged, only_student=only_student, ema=ema, ref_ema=ref_ema)


def main(out_dir):
    layouts = {  # named by their model-parallel sizes; the remaining ranks are data-parallel replicas
        "tp2": ParallelConfig(tensor_model_parallel_size=2),
        "tp2-sp": ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
        "pp2": ParallelConfig(pipeline_model_parallel_size=2),
        "dp2": ParallelConfig(),
    }
    distributed.initialize(ParallelConfig(), seed=0)
    four_ranks = torch.distributed.get_world_size() == 4
    if four_ranks:
        layouts["tp2-pp2"] = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    shared = [str(Path(tempfile.mkdtemp(prefix="paired_step_")))]
    torch.distributed.broadcast_object_list(shared, src=0)
    tmp = Path(shared[0])
    ckpt = tmp / "weights"
    student, teacher = build(STUDENT, ParallelConfig()), build(TEACHER, ParallelConfig())
    if torch.distributed.get_rank() == 0:
        (ckpt / "student").mkdir(parents=True)
        (ckpt / "teacher").mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save(student.sharded_state_dict(), ckpt / "student")
    dist_checkpointing.save(teacher.sharded_state_dict(), ckpt / "teacher")
    batch = make_batch()

    results = {}
    for name, case in CASES.items():
        distributed.initialize(ParallelConfig(), seed=0)
        student, teacher = build(STUDENT, ParallelConfig()), build(TEACHER, ParallelConfig())
        student.load_state_dict(dist_checkpointing.load(student.sharded_state_dict(), ckpt / "student"))
        teacher.load_state_dict(dist_checkpointing.load(teacher.sharded_state_dict(), ckpt / "teacher"))
        ref_loss, weight_spread, ref_ema, ref_grads = reference(student, teacher, batch, case)
        for layout, parallel in layouts.items():
            out = tmp / f"grads_{name}_{layout}"
            loss, teacher_unchanged, only_student, ema = run_layout(parallel, case, batch, ckpt, out)
            results[(name, layout)] = compare(out, ref_grads, loss, ref_loss, weight_spread, teacher_unchanged,
                                              only_student, ema, ref_ema)
        # where the grouping of samples into micro-batches does not change the loss (at 4 ranks a replica
        # holds one micro-batch: nothing to regroup)
        if case["scope"] == "global" and not four_ranks:
            out = tmp / f"grads_{name}_dp2_longest_first"
            loss, teacher_unchanged, only_student, ema = run_layout(ParallelConfig(), case, batch, ckpt, out,
                                                                    longest_first=True)
            results[(name, "dp2-longest-first")] = compare(out, ref_grads, loss, ref_loss, weight_spread,
                                                           teacher_unchanged, only_student, ema, ref_ema)
    save_rank_result(out_dir, results)

    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
