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


def test_a_stop_id_inside_a_longer_prompt_does_not_end_that_sample(model):
    """Only generated tokens end a completion: a stop id that a longer prompt holds past the
    shortest prompt's length (fed while the batch decodes the shorter one) is prompt, not EOS."""
    eos = 2
    short, long = [11, 12, 13], [21, 22, 23, eos, 24, eos]
    cfg = SamplingConfig(greedy=True, max_new_tokens=6)
    kw = dict(eos_id=eos, true_vocab_size=256, seed=0, max_sequence_length=64)
    together = generate(model, [short, long], cfg, **kw).completions
    alone = [generate(model, [p], cfg, **kw).completions[0] for p in (short, long)]
    assert together[1] and together == alone
    # the same with eos among several stop ids, and the longer prompt first
    together = generate(model, [long, short], cfg, **{**kw, "eos_id": [7, eos]}).completions
    assert together[0] and together == [generate(model, [p], cfg, **{**kw, "eos_id": [7, eos]}).completions[0]
                                        for p in (long, short)]


def test_each_position_draws_fresh_noise(model, monkeypatch):
    """Noise is keyed by (row, position): each step of a sample draws a new uniform number (never the
    same one at every position), the rows of a step draw different ones, and so does another seed."""
    from megatron_renio.rollout import generate as rollout

    seen = []

    def recording(logits, cfg, generator=None, uniforms=None):
        seen.append(uniforms.clone())
        return sample_next(logits, cfg, generator, uniforms)

    monkeypatch.setattr(rollout, "sample_next", recording)
    monkeypatch.setattr(rollout, "_COMPACT_BELOW", 0.0)  # both rows stay in every step
    cfg = SamplingConfig(temperature=1.5, max_new_tokens=8)
    kw = dict(eos_id=2, true_vocab_size=256, seed=17, max_sequence_length=64)
    generate(model, [[5, 6, 7], [8, 9, 10]], cfg, **kw)
    assert len(seen) >= 2 and all(u.shape == (2,) for u in seen)
    for row in range(2):
        per_step = [float(u[row]) for u in seen]
        assert len(set(per_step)) == len(per_step), per_step
        assert all(0 <= x < 1 for x in per_step)
    # the two samples of a step draw different numbers, and another seed draws others
    assert all(u[0] != u[1] for u in seen)
    first = [u.clone() for u in seen]
    seen.clear()
    generate(model, [[5, 6, 7], [8, 9, 10]], cfg, **{**kw, "seed": 18})
    assert not torch.equal(seen[0], first[0])
