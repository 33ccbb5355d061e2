"""The EMA teacher (megatron_renio/training/ema.py) against the fp32 formula, in bf16, and its checkpoint."""

import pytest
import torch

from megatron_renio import distributed
from megatron_renio.distributed import ParallelConfig
from megatron_renio.models.builder import build_gpt_model
from megatron_renio.models.presets import get_preset
from megatron_renio.training.ema import EmaTeacher

DECAY, STEPS = 0.999, 200


@pytest.fixture
def models():
    distributed.initialize(ParallelConfig(), seed=0)
    try:
        preset = get_preset("tiny-qwen3")
        teacher, _ = build_gpt_model(preset, ParallelConfig(), dtype="bf16")
        student, _ = build_gpt_model(preset, ParallelConfig(), dtype="bf16")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # a student 10% away from the teacher
            for s, t in zip(student.parameters(), teacher.parameters()):
                s.copy_(t.float() * (1 + 0.1 * torch.randn(t.shape, generator=g)))
        yield teacher, student
    finally:
        distributed.destroy()


def test_bf16_teacher_follows_the_fp32_average(models):
    """After 200 steps towards a fixed student the average has moved 1 - 0.999^200 = 18% of the way, as
    the fp32 formula says, and the teacher is its bf16 rounding; the same update applied to the bf16
    weights in place (each step 1e-4 of a weight, under half a bf16 unit) leaves them where they were."""
    teacher, student = models
    start = [p.detach().float().clone() for p in teacher.parameters()]
    in_place = [p.detach().clone() for p in teacher.parameters()]
    ema = EmaTeacher(teacher, DECAY)
    for _ in range(STEPS):
        ema.update(student)
        for t, s in zip(in_place, student.parameters()):
            t.mul_(DECAY).add_(s.detach(), alpha=1 - DECAY)
    for average, t, s, b in zip(ema.average, teacher.parameters(), student.parameters(), start):
        expected = s.detach().float() + (b - s.detach().float()) * DECAY**STEPS
        torch.testing.assert_close(average, expected, rtol=1e-4, atol=1e-6)  # 200 fp32 roundings; bf16 is 4e-3
        assert torch.equal(t.detach(), average.bfloat16())
    moved = lambda now: float(sum((a.detach().float() - b).abs().sum() for a, b in zip(now, start)))  # noqa: E731
    target = moved(student.parameters()) * (1 - DECAY**STEPS)
    assert moved(teacher.parameters()) == pytest.approx(target, rel=0.1)
    assert moved(in_place) < 0.01 * target


def test_checkpoint_restores_the_fp32_average(models, tmp_path):
    from megatron.core import dist_checkpointing

    teacher, student = models
    start = [p.detach().clone() for p in teacher.parameters()]
    ema = EmaTeacher(teacher, DECAY)
    for _ in range(3):
        ema.update(student)
    dist_checkpointing.save(ema.sharded_state_dict(), str(tmp_path))
    with torch.no_grad():
        for p, s in zip(teacher.parameters(), start):
            p.copy_(s)
    fresh = EmaTeacher(teacher, DECAY)
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), str(tmp_path)))
    for got, want, weight in zip(fresh.average, ema.average, teacher.parameters()):
        assert got.dtype == torch.float32 and torch.equal(got, want)
        assert torch.equal(weight, want.bfloat16())
