"""Sampling noise is keyed by (sample row, position): a sample draws the same completion whatever
batch (or data-parallel replica) holds it."""

import pytest
import torch

from megatron_renio import distributed
from megatron_renio.distributed import ParallelConfig
from megatron_renio.models.builder import build_gpt_model
from megatron_renio.models.presets import get_preset
from megatron_renio.rollout.generate import generate
from megatron_renio.rollout.sampling import SamplingConfig, sample_next


@pytest.fixture(scope="module")
def model():
    distributed.initialize(ParallelConfig(), seed=0)
    model, _ = build_gpt_model(get_preset("tiny-qwen3"), ParallelConfig())
    yield model
    distributed.destroy()


def test_split_batches_sample_what_the_whole_batch_samples(model):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    cfg = SamplingConfig(temperature=1.5, top_p=0.95, max_new_tokens=10)
    kw = dict(eos_id=2, true_vocab_size=256, seed=17, max_sequence_length=64)
    whole = generate(model, prompts, cfg, **kw).completions
    first = generate(model, prompts[:2], cfg, rows=(0, 4), **kw).completions
    second = generate(model, prompts[2:], cfg, rows=(2, 4), **kw).completions
    assert first + second == whole
    other_seed = generate(model, prompts, cfg, **{**kw, "seed": 18}).completions
    assert other_seed != whole


def test_inverse_cdf_follows_the_distribution_and_skips_zero_probability():
    probs = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3])
    logits = probs.log().expand(20000, 5)
    cfg = SamplingConfig(max_new_tokens=1)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(1))
    tokens = sample_next(logits, cfg, uniforms=u)
    freq = torch.bincount(tokens, minlength=5).double() / 20000
    assert freq[0] == 0 and freq[2] == 0
    torch.testing.assert_close(freq, probs.double(), atol=0.015, rtol=0)
    assert int(sample_next(logits[:1], cfg, uniforms=torch.zeros(1))) == 1
