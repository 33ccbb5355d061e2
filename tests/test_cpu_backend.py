"""The CPU/gloo backend: inactive under CUDA, and Megatron's real code paths run with it."""

import subprocess
import sys
import textwrap

import pytest
import torch

from tests.torchrun_harness import REPO_ROOT, run_torchrun

WORKER = REPO_ROOT / "tests" / "workers" / "cpu_backend_worker.py"


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )


def test_never_activates_when_cuda_is_available():
    proc = _run_python(
        """
        import torch
        torch.cuda.is_available = lambda: True
        torch.cuda.device_count = lambda: 1
        torch.cuda.set_device = lambda device: None
        from megatron_renio import cpu_backend, distributed
        try:
            cpu_backend.activate()
        except RuntimeError as e:
            print("refused:", e)
        backend, device = distributed.select_backend(0)
        print(backend, device.type, cpu_backend.is_active(), torch.cuda.current_device.__module__)
        """
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("refused:")
    assert lines[1].split()[:3] == ["nccl", "cuda", "False"]
    assert "megatron_renio" not in lines[1]  # torch.cuda.current_device is torch's own


def test_activation_redirects_cuda_allocations_and_is_reversible():
    from megatron_renio import cpu_backend

    if torch.cuda.is_available():
        pytest.skip("this check is about a machine without CUDA")
    original_zeros = torch.zeros
    cpu_backend.activate()
    try:
        assert cpu_backend.is_active()
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.tensor([1.0], device=torch.device("cuda")).device.type == "cpu"
        assert torch.cuda.current_device() == torch.device("cpu")
        t = torch.ones(3)
        assert t.cuda() is t
        assert t.type() == "torch.cuda.FloatTensor"
        assert t.type(torch.float64).dtype == torch.float64
        torch.cuda.synchronize()
    finally:
        cpu_backend.deactivate()
    assert torch.zeros is original_zeros and not cpu_backend.is_active()


def test_a_patch_target_missing_from_megatron_is_an_error_naming_it_and_nothing_stays_patched(monkeypatch):
    """Another Megatron-Core without a patched name: activation stops with its name and the version it
    targets, and deactivate() restores what was patched before it (the tracker globals included)."""
    from megatron.core.tensor_parallel import random as mp_random

    from megatron_renio import cpu_backend

    if torch.cuda.is_available():
        pytest.skip("this check is about a machine without CUDA")
    monkeypatch.delattr(mp_random, "_set_cuda_rng_state")
    tracker, original_zeros = mp_random._CUDA_RNG_STATE_TRACKER, torch.zeros
    with pytest.raises(RuntimeError, match=r"^CPU backend: megatron\.core\.tensor_parallel\.random\._set_cuda_rng_state "
                                           r"does not exist in this torch .* megatron-core .*; it targets megatron-core 0\.16\.x$"):
        cpu_backend.activate()
    assert mp_random._CUDA_RNG_STATE_TRACKER is not tracker  # patched before the missing name
    cpu_backend.deactivate()
    assert mp_random._CUDA_RNG_STATE_TRACKER is tracker and torch.zeros is original_zeros


@pytest.mark.parametrize("granularity, method", [("full", "uniform"), ("full", "block"), ("selective", "uniform")])
def test_activation_recompute_gives_the_same_outputs_and_gradients(granularity, method):
    """--recompute-granularity runs Megatron's CheckpointFunction, which saves and restores the RNG
    streams around each block (patch 7); the recomputed forward and backward equal the kept ones
    bitwise (fp32, no dropout), and the flags reach the model's config."""
    from megatron_renio import distributed
    from megatron_renio.config import TrainConfig
    from megatron_renio.distributed import ParallelConfig
    from megatron_renio.models.builder import build_gpt_model
    from megatron_renio.models.presets import get_preset
    from megatron_renio.training.components import recompute_settings

    if torch.cuda.is_available():
        pytest.skip("this check is about a machine without CUDA")
    cfg = TrainConfig(recompute_granularity=granularity, recompute_method=method, recompute_num_layers=1)
    distributed.initialize(ParallelConfig(), seed=5)
    try:
        results = []
        for overrides in ({}, recompute_settings(cfg)):
            distributed.set_seeds(5)
            model, _ = build_gpt_model(get_preset("tiny-qwen3"), ParallelConfig(), **overrides)
            assert model.config.recompute_granularity == overrides.get("recompute_granularity")
            tokens = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
            out = model(tokens, torch.arange(16).expand(2, 16), None)
            out.pow(2).mean().backward()
            results.append((out.detach(), [param.grad for param in model.parameters()]))
        (kept, kept_grads), (recomputed, recomputed_grads) = results
        assert torch.equal(kept, recomputed)
        assert all(torch.equal(a, b) for a, b in zip(kept_grads, recomputed_grads))
    finally:
        distributed.destroy()


def test_default_device_context_and_transformers_loading_still_work(tmp_path):
    """torch's default-device context recognises the patched factories (the set it caches holds the
    originals), so transformers' from_pretrained, which builds under the meta device, loads a model
    whose RoPE buffer is computed (it was uninitialised memory), in a process where the backend is on."""
    import transformers

    from megatron_renio import cpu_backend

    if torch.cuda.is_available():
        pytest.skip("this check is about a machine without CUDA")
    config = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    transformers.Qwen3ForCausalLM(config).save_pretrained(tmp_path)
    want = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).model.rotary_emb.inv_freq
    from torch.utils._device import _device_constructors

    _device_constructors.cache_clear()  # as in a fresh process
    cpu_backend.activate()
    try:
        with torch.device("meta"):
            assert torch.tensor([1.0]).device.type == "meta" and torch.arange(3).device.type == "meta"
        got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).model.rotary_emb.inv_freq
    finally:
        cpu_backend.deactivate()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_rng_tracker_forks_per_rank_streams_and_restores_the_default():
    from megatron_renio.cpu_backend import CPURNGStatesTracker

    tracker = CPURNGStatesTracker()
    tracker.add("model-parallel-rng", 100)
    torch.manual_seed(7)
    expected_outer = torch.Generator().manual_seed(7)
    with tracker.fork():
        inside_a = torch.rand(4)
    outer = torch.rand(4)
    assert torch.equal(outer, torch.rand(4, generator=expected_outer))
    assert torch.equal(inside_a, torch.rand(4, generator=torch.Generator().manual_seed(100)))
    with tracker.fork():  # the forked stream continues where it stopped
        inside_b = torch.rand(4)
    g = torch.Generator().manual_seed(100)
    torch.rand(4, generator=g)
    assert torch.equal(inside_b, torch.rand(4, generator=g))
    with pytest.raises(RuntimeError, match="not added"):
        with tracker.fork("missing"):
            pass


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    return run_torchrun(WORKER, 2, tmp_path_factory.mktemp("cpu_backend"))


def test_gpt_model_forward_backward_with_tp2(worker_results):
    for r in worker_results:
        assert r["tp_forward_shape"] == (2, 16, 128)  # vocab 256 split over 2 ranks
        assert r["tp_grads_finite"] and r["tp_grad_count"] > 0
    # TP ranks hold different shards of the same full weight matrix
    assert not torch.equal(worker_results[0]["qkv_shard"], worker_results[1]["qkv_shard"])


def test_no_pipelining_schedule_runs(worker_results):
    for r in worker_results:
        assert len(r["no_pipelining_losses"]) == 3 and all(torch.isfinite(torch.tensor(r["no_pipelining_losses"])))
    # TP ranks compute the same (all-reduced) loss
    assert worker_results[0]["no_pipelining_losses"] == worker_results[1]["no_pipelining_losses"]


def test_1f1b_schedule_runs_with_pp2(worker_results):
    last = worker_results[1]
    assert len(last["pp_losses"]) == 4 and all(torch.isfinite(torch.tensor(last["pp_losses"])))
    assert worker_results[0]["pp_losses"] == []  # only the last stage sees losses
    for r in worker_results:
        assert r["pp_grads_finite"] and r["pp_grad_count"] > 0


def test_seeded_builds_are_deterministic(worker_results):
    for r in worker_results:
        assert r["same_seed_same_weights"]
        assert r["other_seed_other_weights"]


def test_destroy_undoes_the_patches():
    """After distributed.destroy() code in the same process sees torch unpatched (transformers models
    loaded later in a process that trained on the CPU)."""
    from megatron_renio import cpu_backend, distributed
    from megatron_renio.distributed import ParallelConfig

    if torch.cuda.is_available():
        pytest.skip("this check is about a machine without CUDA")
    original_zeros = torch.zeros
    distributed.initialize(ParallelConfig(), seed=0)
    assert cpu_backend.is_active() and torch.zeros is not original_zeros
    distributed.destroy()
    assert not cpu_backend.is_active() and torch.zeros is original_zeros
