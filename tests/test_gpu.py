"""Checks that need CUDA (marked ``gpu``; run by tools/gpu_check, never in CPU CI)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.torchrun_harness import REPO_ROOT

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.fail("the gpu-marked checks need CUDA (run them with tools/gpu_check on a GPU machine)")


def test_cpu_backend_stays_off_and_nccl_is_used():
    code = (
        "from megatron_renio import cpu_backend, distributed\n"
        "from megatron_renio.distributed import ParallelConfig\n"
        "import torch\n"
        "ctx = distributed.initialize(ParallelConfig(), seed=0)\n"
        "print(torch.distributed.get_backend(), ctx.device.type, cpu_backend.is_active())\n"
        "distributed.destroy()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-3:] == ["nccl", "cuda", "False"]


def test_a_local_rank_without_a_gpu_is_one_line():
    """LOCAL_RANK beyond the visible GPUs (more processes per node than GPUs) is a one-line error, not
    CUDA's 'invalid device ordinal' traceback."""
    code = (
        "from megatron_renio import distributed, entrypoint\n"
        "raise SystemExit(entrypoint.run_command(lambda argv: None, "
        "lambda _: distributed.initialize(distributed.ParallelConfig()), []))\n"
    )
    env = dict(os.environ, LOCAL_RANK=str(torch.cuda.device_count()))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().startswith(f"error: LOCAL_RANK {torch.cuda.device_count()} has no GPU")


def test_gpu_rollout_kv_cache_equals_recompute():
    from megatron_renio import distributed
    from megatron_renio.distributed import ParallelConfig
    from megatron_renio.models.builder import build_gpt_model
    from megatron_renio.models.presets import get_preset
    from megatron_renio.rollout.generate import generate
    from megatron_renio.rollout.sampling import SamplingConfig

    distributed.initialize(ParallelConfig(), seed=0)
    try:
        model, _ = build_gpt_model(get_preset("tiny-qwen3"), ParallelConfig())
        prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17]]
        cfg = SamplingConfig(greedy=True, max_new_tokens=24)
        kw = dict(eos_id=2, true_vocab_size=256, seed=0, max_sequence_length=64)
        assert generate(model, prompts, cfg, **kw).completions == generate(model, prompts, cfg, use_kv_cache=False, **kw).completions
    finally:
        distributed.destroy()


def test_gpu_training_run_bf16(tmp_path):
    from megatron_renio.data.arithmetic_task import Difficulty, build_char_tokenizer, make_splits, write_jsonl

    train, _ = make_splits(0, 16, 2, Difficulty(min_ops=2, max_ops=2, max_operand=9))
    write_jsonl(tmp_path / "train.jsonl", train)
    build_char_tokenizer(tmp_path / "tok")
    metrics = tmp_path / "m.jsonl"
    cmd = [sys.executable, "-m", "megatron_renio.train", "--model", "tiny-qwen3", "--tokenizer", str(tmp_path / "tok"),
           "--data-path", str(tmp_path / "train.jsonl"), "--seq-length", "384", "--max-new-tokens", "16",
           "--global-batch-size", "4", "--micro-batch-size", "2", "--train-iters", "3", "--lr", "1e-4", "--bf16",
           "--renio", "--renio-scope", "global", "--metrics-file", str(metrics), "--use-distributed-optimizer",
           "--save", str(tmp_path / "run")]
    # 2 steps and a checkpoint (the distributed optimizer's default format), then a resume for step 3
    for extra in (["--exit-interval", "2"], ["--load", str(tmp_path / "run")]):
        out = subprocess.run(cmd + extra, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                             env=dict(os.environ))
        assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 and not r["skipped"] for r in rows)
    assert rows[-1]["peak_memory_gb"] > 0
